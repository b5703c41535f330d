//! The one `unsafe` of the mount family: `FS_IOC_GETFSSYSFSPATH`, which names a mounted
//! filesystem's sysfs directory (and so its bdi).

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `struct fs_sysfs_path` of `<linux/fs.h>`.
#[repr(C)]
struct FsSysfsPath {
    len: u8,
    name: [u8; 128],
}

nix::ioctl_read!(
    /// `ioctl(fd, FS_IOC_GETFSSYSFSPATH, &path)`: `_IOR(0x15, 1, struct fs_sysfs_path)`.
    get_fs_sysfs_path,
    0x15,
    1,
    FsSysfsPath
);

/// The sysfs name of the filesystem mounted at `target` (`erofs/erofs-2831`); Linux 6.11+.
pub fn sysfs_name(target: &Path) -> io::Result<String> {
    let dir = std::fs::File::open(target)?;
    let mut out = FsSysfsPath { len: 0, name: [0; 128] };
    // SAFETY: `dir` is an open fd for the whole call and `out` is a properly sized, writable
    // `struct fs_sysfs_path`, the only memory this ioctl writes.
    unsafe { get_fs_sysfs_path(dir.as_raw_fd(), &mut out) }.map_err(io::Error::from)?;
    let name = out.name.get(..usize::from(out.len)).unwrap_or(&[]);
    Ok(String::from_utf8_lossy(name).into_owned())
}
