//! lazyblob as containerd's snapshotter, against Debian's real `containerd` (1.6) and `runc`
//! and `docker-registry`: containerd is started by the test with a temporary root, state and
//! socket and `[proxy_plugins.lazyblob]` pointing at the daemon's snapshotter socket.
//!
//! An ordinary OCI image (gzip layers, a whiteout, a hard link, busybox to run) is pulled
//! and unpacked through lazyblob's snapshots service and run with `ctr run`: the container
//! sees the same tree (names, modes, link counts, sha256 of every file) as with containerd's
//! own overlayfs snapshotter; after `ctr image rm` and containerd's GC, lazyblob's snapshots
//! are gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::daemon::DaemonProc;
use common::*;
use lazyblob::registry::{parse_reference, sha256_digest, Registry};
use serde_json::json;

/// Debian's containerd with a private root, state and socket; stopped (with its shims and
/// mounts) on drop.
struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    fn start(dir: &Path, snapshotter_socket: &Path) -> Containerd {
        require_tool("containerd", "containerd");
        require_tool("runc", "runc");
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{sock}.debug"
[proxy_plugins.lazyblob]
  type = "snapshot"
  address = "{snap}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            snap = snapshotter_socket.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            dir: dir.to_path_buf(),
            socket,
            child: Some(child),
        };
        let t0 = Instant::now();
        while !c.ctr(&["version"]).status.success() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "containerd did not start:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this containerd, namespace `test`.
    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "test"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ctr` that must succeed; its stdout.
    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\n--- containerd log (tail)\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // shims started for our containerd (their command line names our state dir)
        let state = self.dir.join("state").to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&state) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        let root = self.dir.to_string_lossy().into_owned();
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut targets: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter(|t| t.starts_with(&root))
                .collect();
            targets.reverse();
            for t in targets {
                let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Push an ordinary OCI image whose layers are these tars (gzip-compressed), with the
/// config's `rootfs.diff_ids` right, as containerd checks them.
async fn push_runnable(reg: &Registry, reference: &str, tars: &[Vec<u8>]) {
    let r = parse_reference(reference).unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": tars.iter().map(|t| sha256_digest(t)).collect::<Vec<_>>()},
    });
    let config = serde_json::to_vec(&config).unwrap();
    reg.push_blob(&r, Bytes::from(config.clone())).await.unwrap();
    let mut descs = Vec::new();
    for t in tars {
        let (data, mt) = oci::compress(t, oci::Compression::Gzip);
        reg.push_blob(&r, Bytes::from(data.clone())).await.unwrap();
        descs.push(json!({"mediaType": mt, "digest": sha256_digest(&data), "size": data.len()}));
    }
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(&config), "size": config.len()},
        "layers": descs
    });
    reg.push_manifest(
        &r,
        Bytes::from(serde_json::to_vec(&manifest).unwrap()),
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await
    .unwrap();
}

/// Two layers: busybox and data files; then a whiteout, a hard link, a replaced file.
fn plain_layers() -> Vec<Vec<u8>> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| std::fs::read(p).unwrap())
        .expect("busybox-static");
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
    require_root();
    let dr = DockerRegistry::start(None);
    let reg = client(&insecure_config(&[&dr.host]));
    let image = format!("{}/plain/app:v1", dr.host);
    push_runnable(&reg, &image, &plain_layers()).await;

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
    let t0 = Instant::now();
    while !snap_sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no snapshotter socket:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = Containerd::start(&work.path().join("c"), &snap_sock);
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
        let out = c.ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            &image,
            &format!("list-{snapshotter}"),
            "/bin/sh",
            "-c",
            LIST,
        ]);
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
