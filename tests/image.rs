//! The lazyblob image built without Docker (`deploy/image/build-image.sh`: umoci, skopeo),
//! pushed to a real `docker-registry` and run by Debian's containerd and runc the way the
//! DaemonSet runs it (`ctr run --privileged` with the node's `/run/lazyblob` and `/` mounted):
//! the printed digest is the registry's, `lazyblob status` inside answers from the daemon on
//! the host, and the image's node installer and containerd-config step work on a scratch node
//! root with nothing but what the image holds.

mod common;

use std::path::Path;
use std::process::Command;

use common::containerd::{wait_for_socket, Containerd};
use common::daemon::{binary, DaemonProc};
use common::*;

fn build_and_push(reference: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/image/build-image.sh");
    let out = Command::new("sh")
        .arg(script)
        .arg("--binary")
        .arg(binary())
        .arg("--plain-http")
        .arg(reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-image.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The digest of the manifest the registry serves for `reference` (sha256 of its bytes).
async fn served_digest(host: &str, repo: &str, tag: &str) -> String {
    let url = format!("http://{host}/v2/{repo}/manifests/{tag}");
    let body = reqwest::Client::new()
        .get(url)
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    format!("sha256:{}", sha256_hex(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_under_containerd_and_reaches_the_host_daemon() {
    require_root();
    require_tool("umoci", "umoci");
    require_tool("skopeo", "skopeo");
    let dr = DockerRegistry::start(None);
    let reference = format!("{}/lazyblob:test", dr.host);
    let digest = build_and_push(&reference);
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(digest, served_digest(&dr.host, "lazyblob", "test").await);

    let tmp = tempfile::tempdir().unwrap();
    let snapshotter = tmp.path().join("node/run/snapshotter.sock");
    // the node's daemon: its admin socket in what the DaemonSet mounts as /run/lazyblob
    let d = DaemonProc::start(
        &tmp.path().join("node/run"),
        &[],
        &format!(
            "frontend = \"fanotify\"\n[snapshotter]\nsocket = \"{}\"",
            snapshotter.display()
        ),
    );
    wait_for_socket(&snapshotter, &d);
    let host_root = tmp.path().join("node/root");
    std::fs::create_dir_all(host_root.join("etc/containerd")).unwrap();
    let config = std::process::Command::new("containerd")
        .args(["config", "default"])
        .output()
        .unwrap()
        .stdout;
    std::fs::write(host_root.join("etc/containerd/config.toml"), &config).unwrap();

    let c = Containerd::start(&tmp.path().join("containerd"), &snapshotter, None);
    c.ctr_ok(&["images", "pull", "--plain-http", &reference]);
    let listed = c.ctr_ok(&["images", "ls"]);
    assert!(listed.contains(&digest), "{listed}");
    let run = |id: &str, script: &str| {
        let run_mount = format!("type=bind,src={},dst=/run/lazyblob,options=rbind:rw", d.dir.display());
        let root_mount = format!("type=bind,src={},dst=/host,options=rbind:rw", host_root.display());
        c.ctr_ok(&[
            "run",
            "--rm",
            "--privileged",
            "--mount",
            &run_mount,
            "--mount",
            &root_mount,
            "--env",
            "HOST_ROOT=/host",
            &reference,
            id,
            "/bin/sh",
            "-c",
            script,
        ])
    };

    // the DaemonSet's watcher: the image's binary talks to the host's daemon
    let status = run("image-status", "lazyblob status --socket /run/lazyblob/lazyblob.sock");
    assert!(status.contains("frontend=fanotify"), "{status}");
    assert!(
        status.starts_with(&format!("lazyblob {}", env!("CARGO_PKG_VERSION"))),
        "{status}"
    );

    // the DaemonSet's init steps, with only the image's tools (busybox): the node service
    // installer (systemctl recorded, no systemd here) and the containerd config
    let installed = run(
        "image-install",
        "SYSTEMCTL='echo systemctl' LAZYBLOB_CONFIG=/run/lazyblob/config.toml install-host-service.sh && \
         lazyblob containerd-config install --config /run/lazyblob/config.toml \
           --containerd-config /host/etc/containerd/config.toml --on-change 'echo restart containerd'",
    );
    assert!(installed.contains("systemctl restart lazyblob.service"), "{installed}");
    assert!(installed.contains("restart containerd"), "{installed}");
    let node_bin = std::fs::read(host_root.join("opt/lazyblob/bin/lazyblob")).unwrap();
    let out = Command::new(host_root.join("opt/lazyblob/bin/lazyblob"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        node_bin.len() > 1_000_000 && out.status.success(),
        "the installed binary does not run"
    );
    let edited = std::fs::read_to_string(host_root.join("etc/containerd/config.toml")).unwrap();
    assert!(edited.contains(&snapshotter.display().to_string()), "{edited}");
    assert!(host_root.join("etc/containerd/config.toml.lazyblob-backup").exists());
}
