//! Kubernetes pull secrets reach lazy reads through lazyblob's CRI image-service proxy, with
//! Debian's real containerd (1.6, CRI plugin, lazyblob snapshotter, no registry credentials
//! of its own) and a `docker-registry` with htpasswd: a `PullImage` through the proxy without
//! a secret is refused, with kubelet's secret it succeeds (forwarded to containerd, every
//! layer committed remotely); the secret is persisted root-only for that repository; after a
//! lazyblob restart a lazy read of the image succeeds with it (bytes checked), while an image
//! of another repository on the same registry gets no credentials and is refused.

mod common;

use common::containerd::{cri_pull, cri_pull_with, wait_for_socket, Containerd, Cri, Release};
use common::daemon::DaemonProc;
use common::*;

const USER: &str = "kubelet-pull";
const PASS: &str = "s3cret-from-a-pod";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_secrets_reach_lazy_reads_through_the_cri_proxy() {
    require_root();
    let dr = DockerRegistry::start(Some((USER, PASS)));
    let mut cfg = insecure_config(&[&dr.host]);
    cfg.hosts[0].username = Some(USER.into());
    cfg.hosts[0].password = Some(PASS.into());
    let reg = client(&cfg);
    let busybox = common::busybox();
    let big = bytes(21, 3 << 20);
    let mut layer = oci::Layer::new();
    layer
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .dir("data", 0o755)
        .file("data/big.bin", 0o644, &big);
    let src = format!("{}/plain/app:v1", dr.host);
    oci::push_runnable(&reg, &src, &[layer.tar()]).await;
    let private = format!("{}/private/app:v1", dr.host);
    let other = format!("{}/other/app:v1", dr.host);
    oci::convert_ref(&reg, &src, &private).await;
    oci::convert_ref(&reg, &src, &other).await;

    let work = tempfile::tempdir().unwrap();
    let snap_sock = work.path().join("d/snapshotter.sock");
    let cri_sock = work.path().join("d/cri.sock");
    let cri = Cri {
        hosts: &[&dr.host],
        auth: None,
    };
    let c = Containerd::start_release(Release::Installed, &work.path().join("c"), &snap_sock, Some(cri));
    // lazyblob has no credentials of its own (an empty docker config)
    let docker_config = work.path().join("docker-config.json");
    std::fs::write(&docker_config, "{\"auths\": {}}").unwrap();
    let mut d = DaemonProc::start_with(
        &work.path().join("d"),
        &[&dr.host],
        &format!(
            "frontend = \"fanotify\"\n[snapshotter]\nsocket = \"{}\"\n[engine]\nfill_after_idle_ms = 0\nread_ahead_max = 0\nread_ahead_kb = 0\n[cri]\nsocket = \"{}\"\ncontainerd_socket = \"{}\"",
            snap_sock.display(),
            cri_sock.display(),
            c.socket.display()
        ),
        &format!("docker_config = \"{}\"", docker_config.display()),
    );
    wait_for_socket(&snap_sock, &d);
    wait_for_socket(&cri_sock, &d);

    // kubelet without the secret: containerd (through the proxy) is refused by the registry
    let refused = cri_pull(&cri_sock, &private).await;
    assert!(refused.is_err(), "an anonymous pull of a private image succeeded");

    // with the pod's pull secret: forwarded to containerd, pulled lazily
    let secret = k8s_cri::v1::AuthConfig {
        username: USER.into(),
        password: PASS.into(),
        ..Default::default()
    };
    let image_ref = cri_pull_with(&cri_sock, &private, Some(secret))
        .await
        .unwrap_or_else(|e| panic!("PullImage through the proxy: {e}\n{}", d.log()));
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert!(d.log().contains("lazyblob layer committed remotely"), "{}", d.log());
    let listed = c.ctr_ok_in("k8s.io", &["images", "ls", "-q"]);
    assert!(listed.lines().any(|l| l == private), "{listed}");

    // kept root-only, for that repository alone, without the password in the log
    let file = work.path().join("d/state/cri-auths.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let entries = kept["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{kept}");
    assert_eq!(entries[0]["host"], dr.host.as_str());
    assert_eq!(entries[0]["repository"], "private/app");
    assert!(!d.log().contains(PASS), "the secret was logged");

    // after a restart, a lazy read of the image carries the captured secret
    d.stop();
    d.restart();
    wait_for_socket(&cri_sock, &d);
    let mnt = work.path().join("mnt");
    d.mount(&private, &mnt);
    let read = std::fs::read(mnt.join("data/big.bin")).unwrap();
    assert!(read == big, "wrong bytes through the lazy mount");
    d.umount(&mnt);

    // another repository of the same registry gets no credentials
    let mnt2 = work.path().join("mnt2");
    std::fs::create_dir_all(&mnt2).unwrap();
    let out = d.cli(&["mount", &other, mnt2.to_str().unwrap()]);
    assert!(!out.status.success(), "a repository without a captured secret was read");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("not authorized") || err.contains("401"), "{err}");
    assert!(!d.log().contains(PASS), "the secret was logged");
    drop(c);
}
