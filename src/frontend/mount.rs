//! EROFS mounts for both frontends, with `mount(2)` directly (util-linux would turn a
//! regular-file source into a loop device and bypass the pre-content hooks).

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// `mount(2)` of a read-only EROFS; errors name what was mounted where.
fn mount_erofs(source: &Path, target: &Path, opts: &str, what: &str) -> io::Result<()> {
    mount(Some(source), target, Some("erofs"), MsFlags::MS_RDONLY, Some(opts)).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("mount erofs {what} on {}: {e}", target.display()),
        )
    })
}

/// Mount an image over fscache: `mount -t erofs none -o fsid=FSID TARGET`. Blocks until the
/// cachefiles frontend answered the kernel's OPENs.
pub fn mount_fscache(fsid: &str, target: &Path) -> io::Result<()> {
    mount_erofs(
        Path::new("none"),
        target,
        &format!("fsid={fsid}"),
        &format!("fsid={fsid}"),
    )
}

/// Mount the metadata blob file-backed with one `device=` per data blob cache file.
pub fn mount_file_backed(meta: &Path, devices: &[PathBuf], target: &Path) -> io::Result<()> {
    let opts: Vec<String> = devices.iter().map(|d| format!("device={}", d.display())).collect();
    let opts = opts.join(",");
    if opts.len() >= 4096 {
        return Err(io::Error::other("too many data blobs for one mount option page"));
    }
    mount_erofs(meta, target, &opts, &meta.display().to_string())
}

/// Unmount; `lazy` detaches a busy mount (open files keep working through the frontend).
pub fn unmount(target: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy { MntFlags::MNT_DETACH } else { MntFlags::empty() };
    umount2(target, flags)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("umount {}: {e}", target.display())))
}

/// Whether `target` is currently an EROFS mount point (from `/proc/self/mountinfo`).
pub fn is_erofs_mount(target: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = target.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| {
        let mut parts = l.split(" - ");
        let head = parts.next().unwrap_or("");
        let fstype = parts.next().and_then(|t| t.split_whitespace().next()).unwrap_or("");
        head.split_whitespace().nth(4) == Some(want.as_str()) && fstype == "erofs"
    })
}
