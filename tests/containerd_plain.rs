//! lazyblob as the snapshotter of ordinary images, against Debian's real `containerd` (1.6,
//! and 2.1 through its transfer service) and `runc`: an OCI image (gzip layers, a whiteout, a hard link, busybox to run) is pulled
//! and unpacked through lazyblob's snapshots service and run with `ctr run`; the container
//! sees the same tree (names, modes, link counts, sha256 of every file) as with containerd's
//! own overlayfs snapshotter; after `ctr image rm` and containerd's GC, lazyblob's snapshots
//! and their directories are gone.

mod common;

use std::time::{Duration, Instant};

use common::containerd::{Containerd, Release};
use common::daemon::DaemonProc;
use common::*;

/// Two layers: busybox and data files; then a whiteout, a hard link, a replaced file.
fn plain_layers() -> Vec<Vec<u8>> {
    let busybox = common::busybox();
    let mut base = oci::Layer::new();
    base.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .dir("data", 0o755)
        .file("data/a.bin", 0o644, &bytes(1, 300_000))
        .file("data/gone.txt", 0o644, b"removed by the next layer\n")
        .file("data/replaced.txt", 0o600, b"old\n")
        .dir("etc", 0o755)
        .file("etc/app.conf", 0o640, b"mode = test\n");
    let mut top = oci::Layer::new();
    top.dir("data", 0o755)
        .file("data/.wh.gone.txt", 0o644, b"")
        .file("data/replaced.txt", 0o644, b"new\n")
        .file("data/b.bin", 0o755, &bytes(2, 70_000))
        .hardlink("data/b-link.bin", "data/b.bin");
    vec![base.tar(), top.tar()]
}

/// What the container sees: every path under /data and /etc with type, mode, link count,
/// size and sha256 (busybox inside the container lists it).
const LIST: &str = "cd / && for p in $(find data etc | sort); do \
    if [ -f $p ]; then echo \"$p $(stat -c '%F %a %h %s' $p) $(sha256sum $p | cut -d' ' -f1)\"; \
    else echo \"$p $(stat -c '%F %a' $p)\"; fi; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_image_runs_on_lazyblob_as_on_overlayfs() {
    plain_image_on(Release::Installed).await;
}

/// The same on containerd 1.7 (Debian trixie's package, unpacked by `scripts/test.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_image_runs_on_lazyblob_as_on_overlayfs_with_containerd_1_7() {
    plain_image_on(Release::v1_7()).await;
}

/// The same on containerd 2.x, where `ctr images pull` unpacks through the transfer service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_image_runs_on_lazyblob_as_on_overlayfs_with_containerd_2() {
    plain_image_on(Release::v2()).await;
}

async fn plain_image_on(release: Release) {
    require_root();
    let dr = DockerRegistry::start(None);
    let reg = client(&insecure_config(&[&dr.host]));
    let image = format!("{}/plain/app:v1", dr.host);
    oci::push_runnable(&reg, &image, &plain_layers()).await;

    let work = tempfile::tempdir().unwrap();
    let snap_sock = work.path().join("d/snapshotter.sock");
    let d = DaemonProc::start(
        &work.path().join("d"),
        &[&dr.host],
        &format!(
            "frontend = \"fanotify\"\n[snapshotter]\nsocket = \"{}\"",
            snap_sock.display()
        ),
    );
    common::containerd::wait_for_socket(&snap_sock, &d);
    let c = Containerd::start_release(release, &work.path().join("c"), &snap_sock, None);
    let plugins = c.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1") && l.contains("lazyblob") && l.contains("ok")),
        "containerd does not list the lazyblob proxy snapshotter:\n{plugins}"
    );

    let mut trees = Vec::new();
    for snapshotter in ["lazyblob", "overlayfs"] {
        c.ctr_ok(&["images", "pull", "--plain-http", "--snapshotter", snapshotter, &image]);
        let id = format!("list-{snapshotter}-{}", rand::random::<u32>());
        let out = c.run_sh_ok("test", "--rm", snapshotter, &image, &id, LIST);
        trees.push(out);
    }
    assert!(
        trees[0]
            .lines()
            .any(|l| l.starts_with("data/b.bin regular file") && l.contains(" 2 70000 ")),
        "hard link count:\n{}",
        trees[0]
    );
    assert!(
        !trees[0].contains("gone.txt"),
        "the whiteout was not applied:\n{}",
        trees[0]
    );
    assert_eq!(trees[0], trees[1], "lazyblob and overlayfs trees differ");
    let snaps = c.ctr_ok(&["snapshots", "--snapshotter", "lazyblob", "ls"]);
    assert!(
        snaps.lines().count() >= 3,
        "two committed layers expected in lazyblob:\n{snaps}"
    );

    // the image goes, containerd's GC removes the snapshots from lazyblob
    c.ctr_ok(&["images", "rm", "--sync", &image]);
    let t0 = Instant::now();
    loop {
        let snaps = c.ctr_ok(&["snapshots", "--snapshotter", "lazyblob", "ls"]);
        if snaps.lines().count() <= 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "snapshots left in lazyblob after the image was removed:\n{snaps}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let left: Vec<_> = std::fs::read_dir(work.path().join("d/state/snapshotter/snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "snapshot directories left: {left:?}");
}
