//! `cargo bench --bench containerd [-- --quick]`: "pull + start" through Debian's containerd,
//! lazyblob against containerd's own overlayfs path, side by side in one run, one
//! `docker-registry` on loopback. lazyblob: CRI `PullImage` of the converted image (layers
//! committed remotely), then `ctr run` of a command that reads the startup set. Baseline:
//! `ctr images pull` of the source image with the overlayfs snapshotter (download and unpack
//! every layer), then the same `ctr run`. Prints a markdown table with the ratios. Needs
//! root, containerd, runc, docker-registry, busybox-static.

use std::time::{Duration, Instant};

use lazyblob::registry::Registry;
use rand::{Rng, SeedableRng};

#[path = "../tests/common/mod.rs"]
mod common;
use common::containerd::{cri_pull, Containerd, Cri};
use common::daemon::DaemonProc;

/// An ordinary image: busybox, a startup set of `startup` files of 1 MiB, and `bulk` MiB
/// more in 16 MiB files nobody reads at start, over `layers` gzip layers.
async fn push_source(reg: &Registry, reference: &str, startup: usize, bulk: usize, layers: usize) {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut tars = Vec::new();
    for l in 0..layers {
        let mut layer = common::oci::Layer::new();
        layer.dir("app", 0o755);
        if l == 0 {
            layer
                .dir("bin", 0o755)
                .file("bin/busybox", 0o755, &busybox)
                .symlink("bin/sh", "busybox");
        }
        for i in (0..startup).filter(|i| i % layers == l) {
            let mut data = vec![0u8; 1 << 20];
            rng.fill_bytes(&mut data);
            layer.file(&format!("app/start-{i:03}.bin"), 0o644, &data);
        }
        for i in (0..bulk / 16).filter(|i| i % layers == l) {
            let mut data = vec![0u8; 16 << 20];
            rng.fill_bytes(&mut data);
            layer.file(&format!("app/bulk-{i:03}.bin"), 0o644, &data);
        }
        tars.push(layer.tar());
    }
    common::oci::push_runnable(reg, reference, &tars).await;
}

/// `ctr run` of a reader of the startup set; its wall time.
fn run_startup(c: &Containerd, snapshotter: &str, image: &str, id: &str) -> Duration {
    let t0 = Instant::now();
    let out = c.run_sh_ok(
        "k8s.io",
        "--rm",
        snapshotter,
        image,
        id,
        "cat /app/start-*.bin | sha256sum",
    );
    let took = t0.elapsed();
    assert_eq!(out.split_whitespace().next().map(str::len), Some(64), "{out}");
    took
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark runs containerd: run as root"
    );
    let (startup, bulk, layers) = if quick { (16, 240, 3) } else { (60, 960, 4) };
    let work = tempfile::Builder::new()
        .prefix("lazyblob-bench-containerd.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dr = common::DockerRegistry::start(None);
    let reg = common::client(&common::insecure_config(&[&dr.host]));
    let src = format!("{}/bench/app:v1", dr.host);
    let dst = format!("{}/bench/app:v1-lazy", dr.host);
    push_source(&reg, &src, startup, bulk, layers).await;
    common::oci::convert_ref(&reg, &src, &dst).await;

    let sock = work.path().join("d/snapshotter.sock");
    let d = DaemonProc::start(
        &work.path().join("d"),
        &[&dr.host],
        &format!("[snapshotter]\nsocket = \"{}\"", sock.display()),
    );
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = Containerd::start(
        &work.path().join("c"),
        &sock,
        Some(Cri {
            hosts: &[&dr.host],
            auth: None,
        }),
    );

    // lazyblob: CRI pull (remote layers), then start
    drop_caches();
    let t0 = Instant::now();
    cri_pull(&c.socket, &dst).await.expect("CRI PullImage");
    let lazy_pull = t0.elapsed();
    drop_caches();
    let lazy_run = run_startup(&c, "lazyblob", &dst, "bench-lazy");
    let fetched = d.status().await.registry.bytes;

    // baseline: containerd's own download + unpack with overlayfs, then start
    drop_caches();
    let t0 = Instant::now();
    c.ctr_ok_in(
        "k8s.io",
        &["images", "pull", "--plain-http", "--snapshotter", "overlayfs", &src],
    );
    let full_pull = t0.elapsed();
    drop_caches();
    let full_run = run_startup(&c, "overlayfs", &src, "bench-full");

    let lazy_total = lazy_pull + lazy_run;
    let full_total = full_pull + full_run;
    let image_mib = startup + bulk;
    println!(
        "\n## pull + start through containerd ({image_mib} MiB image, {startup} MiB startup set, {layers} layers)\n"
    );
    println!("| phase | lazyblob (CRI, remote layers) | overlayfs (containerd pull + unpack) | speed-up |");
    println!("| --- | --- | --- | --- |");
    for (phase, l, f) in [
        ("pull", lazy_pull, full_pull),
        ("start (read the startup set)", lazy_run, full_run),
        ("pull + start", lazy_total, full_total),
    ] {
        println!(
            "| {phase} | {:.2} s | {:.2} s | {:.1}x |",
            l.as_secs_f64(),
            f.as_secs_f64(),
            f.as_secs_f64() / l.as_secs_f64()
        );
    }
    println!(
        "\nlazyblob fetched {:.1} MiB of the {image_mib} MiB image (pull + start).",
        fetched as f64 / (1 << 20) as f64
    );
}
