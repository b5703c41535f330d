//! Kernel frontends and the probe that picks one for the running kernel.

pub mod active;
pub mod admission;
pub mod cachefiles;
pub mod fanotify;
pub mod fdpass;
pub mod guard;
pub mod leaf_book;
pub mod mount;
pub mod readahead;
pub(crate) mod wire;

use std::os::fd::AsRawFd;

/// The event loop both frontends share: whenever the kernel fd is readable, read records
/// into `buf` and hand each batch to `dispatch` until a read would block; stop on `shutdown`.
/// Nothing is read while `admission` has no free slot; `read` is told how many records
/// there is room for (and may read fewer).
pub async fn drain_loop<T: AsRawFd>(
    fd: &tokio::io::unix::AsyncFd<T>,
    buf: &mut [u8],
    admission: &admission::Admission,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut read: impl FnMut(&T, &mut [u8], usize) -> std::io::Result<usize>,
    mut dispatch: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    loop {
        let mut guard = tokio::select! {
            g = fd.readable() => g?,
            _ = shutdown.changed() => return Ok(()),
        };
        loop {
            let room = tokio::select! {
                r = admission.room() => r,
                _ = shutdown.changed() => return Ok(()),
            };
            match read(fd.get_ref(), buf, room) {
                Ok(0) => {
                    guard.clear_ready();
                    break;
                }
                Ok(n) => dispatch(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // out of fds or memory for an event's fd: back-pressure, not an exit; the
                // loop pauses and reads again while in-flight work closes its fds
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)) => {
                    tracing::warn!(error = %e, "kernel event read failed for lack of resources; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

use std::path::Path;

use crate::config::FrontendChoice;

/// A usable kernel frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    /// cachefiles on-demand + EROFS over fscache (`mount -o fsid=`).
    Cachefiles,
    /// fanotify pre-content + EROFS file-backed mounts (`device=`).
    Fanotify,
}

impl Frontend {
    /// Its name in config and status.
    pub fn name(self) -> &'static str {
        match self {
            Frontend::Cachefiles => "cachefiles",
            Frontend::Fanotify => "fanotify",
        }
    }
}

/// Why no frontend can run on this kernel.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Neither frontend is available.
    #[error("no lazy-loading frontend on kernel {0}: needs /dev/cachefiles with CONFIG_CACHEFILES_ONDEMAND (Linux 5.19-7.1) or fanotify pre-content events (Linux 6.14+, CONFIG_FANOTIFY_ACCESS_PERMISSIONS) with EROFS file-backed mounts (CONFIG_EROFS_FS_BACKED_BY_FILE), and root")]
    NoFrontend(String),
    /// The configured frontend is not available.
    #[error("frontend {0:?} was forced by the config but the kernel lacks it: {1}")]
    Forced(FrontendChoice, String),
    /// The kernel has no EROFS.
    #[error("EROFS is not available: /proc/filesystems has no erofs (needs CONFIG_EROFS_FS)")]
    NoErofs,
}

/// What the running kernel offers.
#[derive(Debug, Clone)]
pub struct KernelFacts {
    /// The kernel release.
    pub release: String,
    /// EROFS is available.
    pub erofs: bool,
    /// `/dev/cachefiles` exists.
    pub cachefiles_device: bool,
    /// A `FAN_CLASS_PRE_CONTENT` group with `FAN_PRE_ACCESS` could be created.
    pub fanotify_pre_content: bool,
}

impl KernelFacts {
    /// Read the facts from `/proc` and `/dev`.
    pub fn read() -> KernelFacts {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let erofs = std::fs::read_to_string("/proc/filesystems")
            .map(|s| s.lines().any(|l| l.split_whitespace().last() == Some("erofs")))
            .unwrap_or(false);
        KernelFacts {
            release,
            erofs,
            cachefiles_device: Path::new(cachefiles::device::DEVICE_PATH).exists(),
            fanotify_pre_content: fanotify::sys::available(),
        }
    }
}

/// Pick the frontend for `facts`, honouring a forced choice.
pub fn choose(facts: &KernelFacts, choice: FrontendChoice) -> Result<Frontend, ProbeError> {
    if !facts.erofs {
        return Err(ProbeError::NoErofs);
    }
    match choice {
        FrontendChoice::Cachefiles | FrontendChoice::Auto if facts.cachefiles_device => Ok(Frontend::Cachefiles),
        FrontendChoice::Cachefiles => Err(ProbeError::Forced(choice, "no /dev/cachefiles".into())),
        FrontendChoice::Fanotify | FrontendChoice::Auto if facts.fanotify_pre_content => Ok(Frontend::Fanotify),
        FrontendChoice::Fanotify => Err(ProbeError::Forced(
            choice,
            "no fanotify pre-content events (Linux 6.14+)".into(),
        )),
        FrontendChoice::Auto => Err(ProbeError::NoFrontend(facts.release.clone())),
    }
}

/// Wait until every clock in `last_read` has been quiet for `quiet` (each reader's request
/// moves its blob's clock on, each reader's fetch the engine's): what both frontends'
/// background fills wait for before each run.
pub async fn until_quiet(last_read: &[&std::sync::Mutex<std::time::Instant>], quiet: std::time::Duration) {
    loop {
        let idle = last_read
            .iter()
            .map(|clock| crate::lock::lock(clock).elapsed())
            .min()
            .unwrap_or(quiet);
        if idle >= quiet {
            return;
        }
        tokio::time::sleep(quiet - idle).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_follows_the_kernel() {
        let mut f = KernelFacts {
            release: "6.12".into(),
            erofs: true,
            cachefiles_device: true,
            fanotify_pre_content: true,
        };
        assert_eq!(choose(&f, FrontendChoice::Auto).unwrap(), Frontend::Cachefiles);
        assert_eq!(choose(&f, FrontendChoice::Fanotify).unwrap(), Frontend::Fanotify);
        f.cachefiles_device = false;
        assert_eq!(choose(&f, FrontendChoice::Auto).unwrap(), Frontend::Fanotify);
        f.fanotify_pre_content = false;
        let e = choose(&f, FrontendChoice::Auto).unwrap_err().to_string();
        assert!(e.contains("CONFIG_CACHEFILES_ONDEMAND"), "{e}");
        assert!(choose(&f, FrontendChoice::Cachefiles).is_err());
        f.erofs = false;
        assert!(matches!(choose(&f, FrontendChoice::Auto), Err(ProbeError::NoErofs)));
    }
}
