//! EROFS mounts for both frontends, with the syscalls directly (util-linux would turn a
//! regular-file source into a loop device and bypass the pre-content hooks), and the
//! per-mount read-ahead (the one ioctl of this family, `FS_IOC_GETFSSYSFSPATH`, is in `sys`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rustix::io::Errno;
use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags, FsOpenFlags,
    MountAttrFlags, MoveMountFlags,
};

mod sys;

/// A mount point opened once, when the mount is asked for: the mount lands on that directory
/// whatever happens to the path meanwhile (a registration waits for the network, and a user
/// who can write a component of the path could swap in a symlink to `/etc`). Opened with
/// `O_PATH` and `RESOLVE_NO_SYMLINKS` on its canonical path, mounted on through
/// `/proc/self/fd/N` (`mount(2)`) or the fd itself (`move_mount`).
#[derive(Debug)]
pub struct MountPoint {
    fd: OwnedFd,
    path: PathBuf,
}

impl MountPoint {
    /// Open `path` for a mount (a directory, no symlink in its canonical path).
    pub fn open(path: &Path) -> io::Result<MountPoint> {
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| io::Error::new(e.kind(), format!("mount point {}: {e}", path.display())))?;
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = openat2(AT_FDCWD, &canonical, how).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!(
                    "mount point {}: {e} (a directory, reached without symlinks)",
                    canonical.display()
                ),
            )
        })?;
        Ok(MountPoint { fd, path: canonical })
    }

    /// The canonical path it had when opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path `mount(2)` is given: the opened directory itself.
    fn by_fd(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Whether setuid/setgid bits and device nodes of an image take effect on its mount. A
/// registry's image mounted on the host is `Ignored` (`nosuid,nodev`) unless the user says
/// they trust it; a container's runtime applies its own rules to its rootfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecialFiles {
    /// `nosuid,nodev`: a setuid binary runs with the caller's rights, device nodes fail.
    #[default]
    Ignored,
    /// Setuid binaries and device nodes work (`lazyblob mount --allow-suid-dev`).
    Honoured,
}

impl SpecialFiles {
    fn flags(self) -> MsFlags {
        match self {
            SpecialFiles::Ignored => MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            SpecialFiles::Honoured => MsFlags::MS_RDONLY,
        }
    }

    /// The same as the attributes of a mount made with `fsmount`.
    fn attrs(self) -> MountAttrFlags {
        match self {
            SpecialFiles::Ignored => {
                MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV
            }
            SpecialFiles::Honoured => MountAttrFlags::MOUNT_ATTR_RDONLY,
        }
    }
}

/// `mount(2)` of a read-only EROFS; errors name what was mounted where.
fn mount_erofs(source: &Path, target: &MountPoint, opts: &str, what: &str, special: SpecialFiles) -> io::Result<()> {
    mount(
        Some(source),
        &target.by_fd(),
        Some("erofs"),
        special.flags(),
        Some(opts),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("mount erofs {what} on {}: {e}", target.path().display()),
        )
    })
}

/// Mount an image over fscache: `mount -t erofs none -o fsid=FSID TARGET`. Blocks until the
/// cachefiles frontend answered the kernel's OPENs.
pub fn mount_fscache(fsid: &str, target: &MountPoint, special: SpecialFiles) -> io::Result<()> {
    mount_erofs(
        Path::new("none"),
        target,
        &format!("fsid={fsid}"),
        &format!("fsid={fsid}"),
        special,
    )
}

/// Mount the metadata blob file-backed with the data blobs' cache files as its devices, in
/// device order, through the new mount API: `fsopen`, one `fsconfig` a parameter, `fsmount`,
/// `move_mount` onto the opened mount point. `mount(2)` takes all options in one page, room
/// for the paths of ~40 data blobs, fewer than an image may have layers (Docker allows 127).
pub fn mount_file_backed(
    meta: &Path,
    devices: &[PathBuf],
    target: &MountPoint,
    special: SpecialFiles,
) -> io::Result<()> {
    let fail = |step: &str, e: Errno, log: String| {
        // what EROFS answers for a file it cannot mount (no `read_folio`: tmpfs, overlayfs)
        let hint = if e == Errno::NOTBLK {
            " (EROFS mounts files only from disk filesystems: ext4, xfs, btrfs...)"
        } else {
            ""
        };
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "mount erofs {} on {}: {step}: {e}{log}{hint}",
                meta.display(),
                target.path().display()
            ),
        )
    };
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| fail("fsopen", e, String::new()))?;
    let fs = fs.as_fd();
    fsconfig_set_string(fs, "source", meta).map_err(|e| fail("source", e, kernel_log(fs)))?;
    for d in devices {
        fsconfig_set_string(fs, "device", d)
            .map_err(|e| fail(&format!("device {}", d.display()), e, kernel_log(fs)))?;
    }
    fsconfig_set_flag(fs, "ro").map_err(|e| fail("ro", e, kernel_log(fs)))?;
    fsconfig_create(fs).map_err(|e| fail("create", e, kernel_log(fs)))?;
    let mnt =
        fsmount(fs, FsMountFlags::FSMOUNT_CLOEXEC, special.attrs()).map_err(|e| fail("fsmount", e, kernel_log(fs)))?;
    move_mount(
        mnt.as_fd(),
        "",
        target.fd.as_fd(),
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| fail("move_mount", e, String::new()))
}

/// What the kernel said about a failed step of a mount being set up (`read` on its fs
/// context: one message a read, `e erofs: ...`), as `" (e erofs: ...; ...)"`.
fn kernel_log(fs: BorrowedFd<'_>) -> String {
    let mut said = Vec::new();
    let mut buf = [0u8; 512];
    while said.len() < 8 {
        match rustix::io::read(fs, &mut buf) {
            Ok(n) if n > 0 => said.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string()),
            _ => break,
        }
    }
    if said.is_empty() {
        return String::new();
    }
    format!(" ({})", said.join("; "))
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

/// Set the kernel read-ahead of the EROFS mounted at `target`, in KiB: how much a page-cache
/// miss of a sequential reader asks for at once, so how many bytes each pre-content event
/// or cachefiles READ covers (the kernel's default is 128 KiB).
pub fn set_read_ahead(target: &Path, kib: u32) -> io::Result<()> {
    let knob = read_ahead_knob(target)?;
    std::fs::write(&knob, kib.to_string()).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", knob.display())))
}

/// The kernel read-ahead of the EROFS mounted at `target`, in KiB.
pub fn read_ahead(target: &Path) -> io::Result<u32> {
    let knob = read_ahead_knob(target)?;
    let text =
        std::fs::read_to_string(&knob).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", knob.display())))?;
    text.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {text:?}: {e}", knob.display())))
}

/// `/sys/class/bdi/<the mount's bdi>/read_ahead_kb`.
fn read_ahead_knob(target: &Path) -> io::Result<PathBuf> {
    let name = sys::sysfs_name(target)?;
    let bdi = name.rsplit('/').next().unwrap_or_default();
    Ok(Path::new("/sys/class/bdi").join(bdi).join("read_ahead_kb"))
}
