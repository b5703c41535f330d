//! Where the fanotify frontend may keep its files, on this machine's kernel: EROFS mounts
//! the metadata blob and cache files file-backed, which tmpfs files cannot back.

mod common;

use std::time::Duration;

use common::*;

/// EROFS cannot mount files kept on tmpfs: a daemon whose cache or state is there refuses to
/// start and says why, rather than failing every mount with a bare ENOTBLK.
#[test]
fn a_cache_on_tmpfs_is_refused_at_start() {
    require_root();
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let fs = nix::sys::statfs::statfs(dir.path()).unwrap().filesystem_type();
    require(fs == nix::sys::statfs::TMPFS_MAGIC, "/dev/shm on tmpfs");
    let (d, cfg) = (dir.path().display(), dir.path().join("config.toml"));
    let text = format!(
        "[daemon]\nstate_dir = \"{d}/s\"\ncache_dir = \"{d}/c\"\nsocket = \"{d}/l.sock\"\nfrontend = \"fanotify\"\n"
    );
    std::fs::write(&cfg, text).unwrap();
    let mut daemon = std::process::Command::new(common::daemon::binary());
    let mut child = daemon
        .arg("daemon")
        .arg("--config")
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            common::procs::terminate(&mut child, Duration::from_secs(5));
            panic!("the daemon started with its cache on tmpfs");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success() && err.contains("cache_dir") && err.contains("is on tmpfs"),
        "{status}: {err}"
    );
}
