//! lazyblob images run through Debian's real `containerd` (1.6, 1.7, 2.x) and `runc`, pulled from
//! `docker-registry` through containerd's CRI image service as kubelet pulls: remote layers,
//! lazy reads, a private registry, restarts of lazyblob under running containers, GC.
//! containerd is started by the test with a temporary root, state and socket and
//! `deploy/containerd/config-v2.toml`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::containerd::{Containerd, Cri, Release};
use common::daemon::DaemonProc;
use common::*;
use serde_json::json;

/// A lazyblob image (converted with `lazyblob convert`) pulled through containerd's CRI image
/// service, as kubelet pulls: every layer is committed remotely (containerd's content store
/// holds no layer blob, lazyblob fetched only the metadata and table), then `ctr run` reads
/// two files through the lazy mount: their sha256 are right and a 16 MiB file nobody read
/// was never fetched. Removing the image releases the lazy mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazyblob_image_pulled_through_cri_runs_lazily() {
    cri_pull_and_run(Release::Installed, None).await;
}

/// The same through containerd 2.x (Debian's package, unpacked by `scripts/test.sh`) with
/// `deploy/containerd/config-v3.toml`; there `ctr image pull` goes through the transfer
/// service, which must commit the layers remotely too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_pulls_lazily_through_cri_and_the_transfer_service() {
    cri_pull_and_run(Release::v2(), None).await;
}

/// The same through containerd 1.7 (Debian trixie's package, unpacked by `scripts/test.sh`)
/// with `deploy/containerd/config-v2.toml`, as 1.6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_1_7_pulls_lazily_through_cri() {
    cri_pull_and_run(Release::v1_7(), None).await;
}

/// The same from a `docker-registry` with htpasswd basic auth: containerd has the credentials
/// in its CRI registry config, lazyblob in a docker `config.json` (`registry.docker_config`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_registry_works_through_cri() {
    cri_pull_and_run(Release::Installed, Some(("puller", "s3cret-pass"))).await;
}

async fn cri_pull_and_run(release: Release, auth: Option<(&str, &str)>) {
    require_root();
    let dr = DockerRegistry::start(auth);
    let mut cfg = insecure_config(&[&dr.host]);
    if let Some((u, p)) = auth {
        cfg.hosts[0].username = Some(u.into());
        cfg.hosts[0].password = Some(p.into());
    }
    let reg = client(&cfg);
    let busybox = common::busybox();
    let (small, big1, big2) = (bytes(11, 5000), bytes(12, 8 << 20), bytes(13, 24 << 20));
    let mut base = oci::Layer::new();
    base.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .dir("data", 0o755)
        .file("data/small.txt", 0o644, &small)
        .file("data/big1.bin", 0o644, &big1);
    let mut top = oci::Layer::new();
    top.dir("data", 0o755).file("data/big2.bin", 0o644, &big2);
    let src = format!("{}/plain/app:v1", dr.host);
    let dst = format!("{}/lazy/app:v1", dr.host);
    oci::push_runnable(&reg, &src, &[base.tar(), top.tar()]).await;
    let report = oci::convert_ref(&reg, &src, &dst).await;
    let lazy = oci::lazy_manifest(&reg, &dst).await;
    // against docker-registry, anonymous or with htpasswd
    assert_eq!(
        report.blobs_streamed,
        lazy.data.len(),
        "data blobs pushed while converted"
    );
    let layers = 2 + usize::from(lazy.leaves.is_some()) + lazy.data.len();

    let work = tempfile::tempdir().unwrap();
    let snap_sock = work.path().join("d/snapshotter.sock");
    // lazyblob's credentials, if any, from a docker config.json
    let docker_config = work.path().join("docker-config.json");
    let auths = match auth {
        Some((u, p)) => {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            json!({"auths": {dr.host.clone(): {"auth": token}}})
        }
        None => json!({"auths": {}}),
    };
    std::fs::write(&docker_config, auths.to_string()).unwrap();
    let mut d = DaemonProc::start_with(
        &work.path().join("d"),
        &[&dr.host],
        // only what is read is fetched (no background fill, no read-ahead, the kernel's own
        // 128 KiB windows): unread parts of the image stay holes, as the restart case needs
        &format!(
            "frontend = \"fanotify\"\n[snapshotter]\nsocket = \"{}\"\n[engine]\nfill_after_idle_ms = 0\nread_ahead_max = 0\nread_ahead_kb = 0",
            snap_sock.display()
        ),
        &format!("docker_config = \"{}\"", docker_config.display()),
    );
    common::containerd::wait_for_socket(&snap_sock, &d);
    let cri = Cri {
        hosts: &[&dr.host],
        auth,
    };
    let c = Containerd::start_release(release.clone(), &work.path().join("c"), &snap_sock, Some(cri));
    let t0 = Instant::now();
    let image_ref = common::containerd::cri_pull(&c.socket, &dst).await.unwrap_or_else(|e| {
        panic!(
            "CRI PullImage: {e}\n{}\n{}",
            common::containerd::tail(&c.log(), 30),
            d.log()
        )
    });
    let pull = t0.elapsed();
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");

    // every layer was committed remotely, and containerd downloaded none of them
    let log = d.log();
    assert_eq!(
        log.matches("lazyblob layer committed remotely").count(),
        layers,
        "remote commits:\n{log}"
    );
    let content = c.ctr_ok_in("k8s.io", &["content", "ls"]);
    let stored: Vec<&str> = content
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        stored.len(),
        2,
        "containerd should hold the manifest and config only:\n{content}"
    );
    for blob in std::iter::once(&lazy.meta).chain(&lazy.leaves).chain(&lazy.data) {
        assert!(
            !stored.contains(&blob.digest.as_str()),
            "containerd fetched {}:\n{content}",
            blob.digest
        );
    }
    let after_pull = d.status().await.registry.bytes;
    let data_bytes: u64 = lazy.data.iter().map(|b| b.size).sum();
    assert!(after_pull < data_bytes / 10, "the pull fetched {after_pull} bytes");

    let id = format!("lazy-reader-{}", rand::random::<u32>());
    let out = c.run_sh_ok(
        "k8s.io",
        "--rm",
        "lazyblob",
        &dst,
        &id,
        "sha256sum /data/small.txt /data/big1.bin",
    );
    for (name, data) in [("/data/small.txt", &small), ("/data/big1.bin", &big1)] {
        let want = format!("{}  {name}", sha256_hex(data));
        assert!(out.lines().any(|l| l == want), "{name}: expected {want}, got:\n{out}");
    }
    let fetched = d.status().await.registry.bytes;
    assert!(
        fetched < data_bytes - big2.len() as u64 / 2,
        "fetched {fetched} of {data_bytes} data bytes: the unread 16 MiB file was fetched"
    );
    eprintln!("cri: pull {pull:?}, {after_pull} bytes fetched by the pull, {fetched} after the run, of {data_bytes}");

    // a container snapshot over the image answers the same Mounts after a lazyblob restart,
    // and the image's lazy mount is there again to serve it
    let snaps = c.ctr_ok_in("k8s.io", &["snapshots", "--snapshotter", "lazyblob", "ls"]);
    let rows: Vec<Vec<&str>> = snaps.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    let top = rows
        .iter()
        .map(|r| r[0])
        .find(|k| !rows.iter().any(|r| r.len() == 3 && r[1] == *k))
        .expect("a top layer");
    c.ctr_ok_in(
        "k8s.io",
        &[
            "snapshots",
            "--snapshotter",
            "lazyblob",
            "prepare",
            "restart-probe",
            top,
        ],
    );
    let probe = [
        "snapshots",
        "--snapshotter",
        "lazyblob",
        "mounts",
        "/mnt",
        "restart-probe",
    ];
    let mounts = |c: &Containerd| c.ctr_ok_in("k8s.io", &probe);
    let before = mounts(&c);
    assert!(
        before.contains("lowerdir=") && before.contains("/images/lb-"),
        "{before}"
    );
    d.stop();
    d.restart();
    common::containerd::wait_for_socket(&snap_sock, &d);
    // containerd keeps its proxy connection and redials
    let t0 = Instant::now();
    let after = loop {
        let out = c.ctr_in("k8s.io", &probe);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "Mounts after the restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(before, after, "Mounts changed across a lazyblob restart");
    let lower = after
        .split("lowerdir=")
        .nth(1)
        .and_then(|l| l.split([',', ' ', '\n']).next())
        .expect("lowerdir");
    let image_mount = lower.rsplit(':').next().unwrap();
    assert!(
        lazyblob::frontend::mount::is_erofs_mount(Path::new(image_mount)),
        "{image_mount} is not mounted after the restart"
    );
    c.ctr_ok_in(
        "k8s.io",
        &["snapshots", "--snapshotter", "lazyblob", "rm", "restart-probe"],
    );

    if auth.is_none() {
        lazyblob_stops_under_a_running_container(&c, &mut d, &snap_sock, &dst, &big2, Stop::Term);
        lazyblob_stops_under_a_running_container(&c, &mut d, &snap_sock, &dst, &big2, Stop::Kill);
    }

    // the image goes: containerd's GC removes the snapshots, lazyblob releases the mount
    // (CRI names an image by tag, by manifest digest and by its id)
    let names = c.ctr_ok_in("k8s.io", &["images", "ls", "-q"]);
    let mut rm = vec!["images", "rm", "--sync"];
    rm.extend(names.lines().filter(|l| !l.is_empty()));
    c.ctr_ok_in("k8s.io", &rm);
    let images_dir = work.path().join("d/state/snapshotter/images");
    let t0 = Instant::now();
    loop {
        let snaps = c.ctr_ok_in("k8s.io", &["snapshots", "--snapshotter", "lazyblob", "ls"]);
        let mounted: Vec<_> = std::fs::read_dir(&images_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| lazyblob::frontend::mount::is_erofs_mount(p))
                    .collect()
            })
            .unwrap_or_default();
        if snaps.lines().count() <= 1 && mounted.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "after image rm: snapshots\n{snaps}\nmounted {mounted:?}\n--- lazyblob log (tail)\n{}",
            common::containerd::tail(&d.log(), 12)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // (after the GC: containerd would otherwise reuse the CRI namespace's snapshots)
    if matches!(release, Release::V2(_)) {
        transfer_service_pull(&c, &d, &dst, layers, &small);
    }
}

/// containerd 2.x: `ctr image pull` (the transfer service, with the `unpack_config` and the
/// `enable_remote_snapshot_annotations` export of config-v3.toml) into another namespace
/// commits every layer remotely too, containerd stores no layer, and a container reads.
fn transfer_service_pull(c: &Containerd, d: &DaemonProc, image: &str, layers: usize, small: &[u8]) {
    let before = d.log().matches("lazyblob layer committed remotely").count();
    c.ctr_ok(&["image", "pull", "--plain-http", "--snapshotter", "lazyblob", image]);
    let log = d.log();
    assert_eq!(
        log.matches("lazyblob layer committed remotely").count() - before,
        layers,
        "remote commits of the transfer service's pull:\n{log}"
    );
    let content = c.ctr_ok(&["content", "ls"]);
    assert_eq!(
        content.lines().skip(1).count(),
        2,
        "manifest and config only:\n{content}"
    );
    let id = format!("transfer-{}", rand::random::<u32>());
    let out = c.run_sh_ok("test", "--rm", "lazyblob", image, &id, "sha256sum /data/small.txt");
    assert_eq!(out.trim(), format!("{}  /data/small.txt", sha256_hex(small)));
    c.ctr_ok(&["image", "rm", "--sync", image]);
}

/// How lazyblob goes down under the container.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Term,
    Kill,
}

/// A running container (a shell that sleeps) reads pages of a file nobody read before, with
/// `ctr task exec`: one before lazyblob goes down (`how`), one while no daemon runs, another
/// after it is back. The lazy mount under the container's overlay stays and the guard keeps
/// its group and holds the read while no daemon runs; the new daemon takes the group over and
/// serves it: a pause, never an error and never a hole's zeros. `how` picks disjoint chunks.
fn lazyblob_stops_under_a_running_container(
    c: &Containerd,
    d: &mut DaemonProc,
    sock: &Path,
    image: &str,
    big2: &[u8],
    how: Stop,
) {
    // containerd redials its proxy snapshotter with a growing backoff after lazyblob
    // restarts: a new container may need a few tries, as kubelet would retry
    let t0 = Instant::now();
    let id = loop {
        let id = format!("restart-{how:?}-{}", rand::random::<u32>()).to_lowercase();
        let run = c.run_sh("k8s.io", "-d", "lazyblob", image, &id, "sleep 120");
        if run.status.success() {
            break id;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "ctr run -d ({how:?}): {}\n--- lazyblob log (tail)\n{}",
            String::from_utf8_lossy(&run.stderr),
            common::containerd::tail(&d.log(), 25)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let base = if how == Stop::Term { 0 } else { 8 };
    let mut n = 0;
    let mut read = |chunk: usize| -> String {
        n += 1;
        let script = format!(
            "dd if=/data/big2.bin bs=4096 skip={} count=1 2>/dev/null | sha256sum | cut -d' ' -f1",
            (base + chunk) * 256
        );
        let out = c.ctr_ok_in(
            "k8s.io",
            &[
                "task",
                "exec",
                "--exec-id",
                &format!("r{n}"),
                &id,
                "/bin/sh",
                "-c",
                &script,
            ],
        );
        out.trim().to_string()
    };
    let want = |chunk: usize| {
        let at = (base + chunk) << 20;
        sha256_hex(&big2[at..at + 4096])
    };
    assert_eq!(read(0), want(0), "before {how:?}");
    let mounts = |c: &Containerd| {
        c.ctr_in(
            "k8s.io",
            &["snapshots", "--snapshotter", "lazyblob", "mounts", "/mnt", &id],
        )
    };
    let before = mounts(c);
    assert!(before.status.success());
    match how {
        Stop::Term => d.stop(),
        Stop::Kill => d.kill9(),
    }
    // a read while no daemon runs waits (the guard holds it), and the next daemon serves it
    let (zeros, (down, held)) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let t = Instant::now();
            (read(1), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(1500));
        let waiting = !reader.is_finished();
        d.restart();
        common::containerd::wait_for_socket(sock, d);
        assert!(waiting, "a read while no daemon ran did not wait ({how:?})");
        (sha256_hex(&[0u8; 4096]), reader.join().unwrap())
    });
    assert_ne!(down, zeros, "a page read as zeros while no daemon ran ({how:?})");
    assert_eq!(
        down,
        want(1),
        "the page read while no daemon ran, served by the next one ({how:?})\n{}",
        d.log()
    );
    eprintln!("{how:?}: a read while lazyblob was down waited {held:?}, then got its bytes");
    assert_eq!(read(2), want(2), "a new page after the restart ({how:?})");
    // the container's Mounts are the same, once containerd has redialled (its backoff grows
    // with each restart; its GC reaches lazyblob only over a live connection)
    let t0 = Instant::now();
    let after = loop {
        let out = mounts(c);
        if out.status.success() {
            break out;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "containerd never redialled lazyblob ({how:?})"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(before.stdout, after.stdout, "Mounts changed across a {how:?}");
    let _ = c.ctr_in("k8s.io", &["task", "kill", "--signal", "SIGKILL", &id]);
    let t0 = Instant::now();
    while !c.ctr_in("k8s.io", &["task", "rm", &id]).status.success() {
        assert!(t0.elapsed() < Duration::from_secs(10), "task {id} did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.ctr_ok_in("k8s.io", &["containers", "rm", &id]);
    eprintln!("{how:?} under a running container: right before, held while down (no zeros), right after");
}
