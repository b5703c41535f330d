//! `cargo bench --bench lazyblob [-- --quick] [--only start,convert,seq,vm,random,scale,restart,slices]`: lazyblob
//! against its baselines, side by side, on one machine in one run, everything against
//! Debian's docker-registry on loopback (registry-mock with zero latency for the scale test).
//! Prints a markdown table and writes `target/bench/lazyblob-bench.json`. Needs root
//! (mounts, fanotify), docker-registry, curl, tar, mkfs.erofs. One module per scenario.

use std::io::Write;
use std::path::Path;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "lazyblob/convert.rs"]
mod convert;
#[path = "lazyblob/nydus.rs"]
mod nydus;
#[path = "lazyblob/reads.rs"]
mod reads;
#[path = "lazyblob/restart.rs"]
mod restart;
#[path = "lazyblob/scale.rs"]
mod scale;
#[path = "lazyblob/slices.rs"]
mod slices;
#[path = "lazyblob/start.rs"]
mod start;
#[path = "lazyblob/util.rs"]
mod util;
#[path = "lazyblob/workload.rs"]
mod workload;

use util::{Bench, Report};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only seq,random,scale,start,convert,vm,restart,slices` runs a subset (start = cold start, warm, conversion; convert = a 4 GiB image)
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|v| v.split(',').map(str::to_string).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark mounts filesystems: run as root"
    );
    let mut s = util::scale(quick);
    // LAZYBLOB_BENCH_LAYERS: how many layers the start image has (default 4; 1 isolates the
    // on-disk layout of several blob files from the rest of the warm-read cost)
    if let Some(n) = std::env::var("LAZYBLOB_BENCH_LAYERS").ok().and_then(|v| v.parse().ok()) {
        s.layers = n;
    }
    // the scale test's readers (spread over its 100 images), e.g. 10000; every daemon's
    // extra [engine] lines: LAZYBLOB_BENCH_ENGINE="max_reads_in_flight = 8192"
    if let Some(n) = std::env::var("LAZYBLOB_BENCH_CONCURRENT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        s.concurrent = n;
    }
    let work = tempfile::Builder::new()
        .prefix("lazyblob-bench.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dr = common::DockerRegistry::start(None);
    let b = Bench {
        scale: s,
        work: work.path(),
        registry: &dr,
        host: dr.host.clone(),
        reg: util::registry(&[&dr.host]),
    };
    let mut r = Report::default();
    if want("start") {
        start::start(&b, &mut r).await;
    }
    if want("convert") {
        convert::convert(&b, &mut r).await;
    }
    if want("seq") || want("random") {
        let img = reads::seq_images(&b).await;
        if want("seq") {
            reads::sequential(&b, &img, &mut r).await;
        }
        if want("random") {
            reads::random(&b, &img, &mut r).await;
        }
    }
    if want("vm") {
        reads::vm_reads(&b.reg, &b.host, b.scale.vm_mib, &mut r).await;
    }
    if want("scale") {
        scale::scale(&b, &mut r).await;
    }
    if want("restart") {
        restart::restart(&b, &mut r).await;
    }
    if want("slices") {
        slices::slices(&b, &mut r);
    }
    report(&r);
}

/// The markdown table on stdout and the JSON file.
fn report(r: &Report) {
    println!("\n| benchmark | lazyblob | baseline | ratio |\n| --- | --- | --- | --- |");
    for (a, b, c, d) in &r.rows {
        println!("| {a} | {b} | {c} | {d} |");
    }
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let path = out_dir.join("lazyblob-bench.json");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(
        serde_json::to_string_pretty(&serde_json::Value::Object(r.json.clone()))
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    println!("JSON: {}", path.display());
}
