//! Cold start, warm re-reads and conversion throughput.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use lazyblob::registry::sha256_digest;
use serde_json::json;

use crate::common::oci::{convert_ref, lazy_manifest, push_source};
use crate::nydus;
use crate::util::*;
use crate::workload;

/// Cold start (mount + startup set) against a full pull, warm re-reads against a local
/// EROFS image, and conversion throughput against mkfs.erofs.
pub async fn start(b: &Bench<'_>, r: &mut Report) {
    let (s, w, host, reg) = (&b.scale, b.work, b.host.as_str(), &b.reg);
    // ---- the image: many small files, a few large ones, several layers
    eprintln!("building the source image...");
    let mut all: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..s.small_files {
        let len = 2_000 + (i * 7919) % 60_000;
        all.insert(
            format!("usr/lib/pkg{:03}/file{i:05}.so", i % 300),
            rng_bytes(i as u64, len),
        );
    }
    for (k, mib) in s.large_mib.iter().enumerate() {
        all.insert(
            format!("opt/big/blob{k}.bin"),
            rng_bytes(1_000_000 + k as u64, mib << 20),
        );
    }
    let total_bytes: u64 = all.values().map(|d| d.len() as u64).sum();
    let mut layer_entries: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); s.layers];
    for (i, (p, d)) in all.iter().enumerate() {
        layer_entries[i % s.layers].push((p.clone(), d.clone()));
    }
    let layers: Vec<(Vec<u8>, &str)> = layer_entries.iter().map(|e| gzip_layer(e)).collect();
    drop(layer_entries);
    let src = format!("{host}/bench/app:src");
    let dst = format!("{host}/bench/app:lazy");
    push_source(reg, &src, &layers).await;
    let layer_digests: Vec<String> = layers.iter().map(|(l, _)| sha256_digest(l)).collect();
    drop(layers);

    // ---- conversion (timed) against mkfs.erofs on the unpacked tree (below)
    let t = Instant::now();
    // LAZYBLOB_BENCH_NO_LEAVES=1: a format 2 image (no leaves layer), for A/B runs
    let report = if std::env::var_os("LAZYBLOB_BENCH_NO_LEAVES").is_some() {
        let opts = lazyblob::image::convert::ConvertOptions {
            leaves: false,
            ..Default::default()
        };
        lazyblob::image::convert::convert(reg, &src.parse().unwrap(), &dst.parse().unwrap(), &opts)
            .await
            .unwrap()
    } else {
        convert_ref(reg, &src, &dst).await
    };
    let convert_s = t.elapsed().as_secs_f64();

    // startup set: ~6% of the bytes, small files of a few packages plus the head of one large file
    let mut startup: Vec<(String, u64, usize)> = Vec::new();
    let mut budget = total_bytes * 6 / 100;
    let big_head = (budget / 3) as usize;
    startup.push(("opt/big/blob0.bin".into(), 0, big_head.min(s.large_mib[0] << 20)));
    budget -= big_head as u64;
    for (p, d) in all.iter().filter(|(p, _)| p.starts_with("usr/")) {
        if budget < d.len() as u64 {
            break;
        }
        budget -= d.len() as u64;
        startup.push((p.clone(), 0, d.len()));
    }
    let startup_bytes: u64 = startup.iter().map(|x| x.2 as u64).sum();

    // what lazyblob and nydusd are both asked (`nydus.rs`): the startup set, cold and again;
    // random reads of one large file no one read, a sequential read of another
    let big = s.large_mib.len() - 1;
    let (random_file, seq_file) = ("opt/big/blob1.bin".to_string(), format!("opt/big/blob{big}.bin"));
    let workload = workload::Workload {
        all: &all,
        startup: &startup,
        random_file: &random_file,
        seq_file: &seq_file,
    };

    // a cold start on a fresh daemon in `dir` (background fill off): page cache dropped, then
    // mount + the startup set read and checked; the daemon, its mount point and the seconds
    let cold_start = |dir: &str| {
        drop_caches();
        let d = daemon(&w.join(dir), &[host], "[engine]\nfill_after_idle_ms = 0\n");
        let mnt = w.join(dir).join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let t = Instant::now();
        d.mount(&dst, &mnt);
        let mount_s = t.elapsed().as_secs_f64();
        eprintln!("{dir}: mounted in {mount_s:.3} s (the CLI's own start included)");
        workload::read_startup(&mnt, &workload);
        (d, mnt, t.elapsed().as_secs_f64(), mount_s)
    };

    // ---- 1. cold start: lazyblob mount + startup set, against full pull (download + untar)
    // (this daemon also gives the "partially cached" warm row)
    let (d, mnt, lazy_cold, mount_s) = cold_start("d1");
    let cold_fetched = d.status().await.registry.bytes;

    let pull_dir = w.join("pull");
    std::fs::create_dir_all(pull_dir.join("rootfs")).unwrap();
    drop_caches();
    let t = Instant::now();
    let repo = format!("http://{host}/v2/bench/app/blobs");
    let downloads: Vec<std::process::Child> = layer_digests
        .iter()
        .enumerate()
        .map(|(i, dg)| {
            Command::new("curl")
                .args(["-sf", "-o"])
                .arg(pull_dir.join(format!("l{i}.tgz")))
                .arg(format!("{repo}/{dg}"))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in downloads {
        assert!(c.wait().unwrap().success());
    }
    for i in 0..layer_digests.len() {
        sh_ok(&format!(
            "tar -xzf {}/l{i}.tgz -C {}/rootfs",
            pull_dir.display(),
            pull_dir.display()
        ));
    }
    sh("sync");
    let full_pull = t.elapsed().as_secs_f64();
    r.rows.push((
        "cold start (mount + read 6% startup set)".into(),
        format!("{lazy_cold:.2} s"),
        format!("full pull + untar {full_pull:.2} s"),
        format!("{:.1}x faster", full_pull / lazy_cold),
    ));
    r.json.insert("cold_start".into(), json!({"image_bytes": total_bytes, "startup_bytes": startup_bytes, "lazyblob_s": lazy_cold, "mount_s": mount_s, "full_pull_s": full_pull, "speedup": full_pull / lazy_cold}));

    // ---- 4. warm reads: the startup set again (page cache dropped) against a local EROFS image
    let warm = |root: &Path| workload::reread(root, &workload);
    let (before, cpu0) = (d.status().await, usage(d.pid()).1);
    let lazy_partial = warm(&mnt);
    let (after, cpu1) = (d.status().await, usage(d.pid()).1);
    // the daemon's CPU per pass (the busy poll spins while such reads go on)
    let partial_cpu = (cpu1 - cpu0) / REPS as f64;
    let reread_fetched = after.registry.bytes - before.registry.bytes;
    // what the re-read cost the frontend: its events, how many were answered at once, and
    // how many reads of a group the busy poll made (each of those found events)
    let count = |k: &str| {
        let c = |s: &lazyblob::api::Status| s.frontend_counters[k].as_u64().unwrap_or_default();
        c(&after) - c(&before)
    };
    let (partial_events, partial_at_once) = (count("events"), count("answered_at_once"));
    let partial_polled = count("busy_poll_reads");
    // the daemon's peak RSS over a cold start and the re-reads (nydusd measured 40-43 MiB on
    // this tree in the side-by-side run)
    let rss_mib = usage(d.pid()).0 as f64 / 1024.0;
    // unmounted and mounted again first: the unmount ends the recording of the cold start
    // (its list must not hold these reads); the new mount replays that list, all cached
    d.umount(&mnt);
    d.mount(&dst, &mnt);
    let before = d.status().await.registry.bytes;
    let (random_p50_ms, random_p99_ms) = workload::random_reads(&mnt, &workload);
    let random_bytes = d.status().await.registry.bytes - before;
    let lazy_side = workload::Measured {
        cold_s: lazy_cold,
        cold_bytes: cold_fetched,
        reread_s: lazy_partial,
        random_p50_ms,
        random_p99_ms,
        random_bytes_per_read: random_bytes as f64 / workload::RANDOM_READS as f64,
        seq_mbs: workload::sequential(&mnt, &workload),
        rss_mib: usage(d.pid()).0 as f64 / 1024.0,
        rss_split_mib: workload::at_rest(d.pid()),
    };
    drop(d); // its recording of the cold start ends: the list is kept in its state

    // ---- 2. cold start on a node that has the startup prefetch list (a copy of the one the
    // first cold start recorded): mount, the list fetched at once, the same startup set
    let lists = w.join("d1p/state/prefetch");
    std::fs::create_dir_all(&lists).unwrap();
    let kept: Vec<_> = std::fs::read_dir(w.join("d1/state/prefetch"))
        .expect("the first cold start kept no prefetch list")
        .map(|e| e.unwrap().path())
        .collect();
    for k in &kept {
        std::fs::copy(k, lists.join(k.file_name().unwrap())).unwrap();
    }
    let (dp, mnt_p, prefetch_cold, prefetch_mount_s) = cold_start("d1p");
    let st = dp.status().await;
    let prefetch_fetched = st.registry.bytes;
    let prefetch_chunks = st.frontend_counters["chunks_startup"].as_u64().unwrap_or(0);
    let prefetch_rss_mib = usage(dp.pid()).0 as f64 / 1024.0;
    dp.umount(&mnt_p);
    drop(dp);
    // a second daemon with background fill: cold start again, then wait until every
    // blob in use is complete (its events off) before the warm passes
    let d = daemon(&w.join("d1f"), &[host], "[engine]\nfill_after_idle_ms = 200\n");
    let mnt = w.join("d1f/mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    d.mount(&dst, &mnt);
    let _ = workload::read_again(&mnt, &workload);
    let t = Instant::now();
    let lazy = lazy_manifest(reg, &dst).await;
    let n_blobs = lazy.data.len() as u64;
    eprintln!("metadata blob: {} bytes (pinned in memory by default)", lazy.meta.size);
    while d.status().await.frontend_counters["blobs_complete"].as_u64() != Some(n_blobs) {
        assert!(t.elapsed().as_secs() < 300, "background fill did not complete");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let fill_s = t.elapsed().as_secs_f64();
    // and until the daemon has put the mount's own read-ahead back (it follows the last
    // completion at once)
    while lazyblob::frontend::mount::read_ahead(&mnt).unwrap()
        == lazyblob::config::EngineConfig::default()
            .read_ahead_kb
            .map_or(0, |k| k.get())
    {
        assert!(t.elapsed().as_secs() < 310, "read-ahead not restored after the fill");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let lazy_warm = warm(&mnt);
    let img = w.join("local.erofs");
    let t = Instant::now();
    sh_ok(&format!(
        "mkfs.erofs --quiet {} {}/rootfs",
        img.display(),
        pull_dir.display()
    ));
    let mkfs_s = t.elapsed().as_secs_f64();
    let local = w.join("local-mnt");
    std::fs::create_dir_all(&local).unwrap();
    nix::mount::mount(
        Some(&img),
        &local,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    let local_warm = warm(&local);
    let _ = nix::mount::umount(&local);
    r.rows.push((
        "cold start with the startup prefetch list of the first start".into(),
        format!("{prefetch_cold:.2} s"),
        format!("full pull + untar {full_pull:.2} s; without the list {lazy_cold:.2} s"),
        format!("{:.1}x faster", full_pull / prefetch_cold),
    ));
    r.rows.push((
        "bytes fetched: cold start with the list".into(),
        format!(
            "{:.1} MB ({prefetch_chunks} chunks by the prefetch)",
            prefetch_fetched as f64 / 1e6
        ),
        format!("startup set {:.1} MB", startup_bytes as f64 / 1e6),
        format!("{:.2}x the set", prefetch_fetched as f64 / startup_bytes as f64),
    ));
    r.json.insert(
        "startup_prefetch".into(),
        json!({"lazyblob_s": prefetch_cold, "mount_s": prefetch_mount_s, "full_pull_s": full_pull, "without_list_s": lazy_cold,
            "speedup": full_pull / prefetch_cold, "fetched_bytes": prefetch_fetched,
            "startup_bytes": startup_bytes, "prefetch_chunks": prefetch_chunks}),
    );
    r.rows.push((
        "peak RSS of the daemon: cold start + re-reads / cold start with the list".into(),
        format!("{rss_mib:.1} MiB / {prefetch_rss_mib:.1} MiB"),
        "nydusd 40-43 MiB in the issue's run (not this one)".into(),
        format!("{:.2}x / {:.2}x of 43", rss_mib / 43.0, prefetch_rss_mib / 43.0),
    ));
    r.json.insert(
        "daemon_rss_mib".into(),
        json!({"cold_and_rereads": rss_mib, "cold_with_list": prefetch_rss_mib}),
    );
    r.rows.push((
        "warm reads of the startup set, after background fill (page cache dropped)".into(),
        format!("{:.3} s", lazy_warm),
        format!("local EROFS {local_warm:.3} s"),
        format!("{:.2}x local", lazy_warm / local_warm),
    ));
    r.rows.push((
        "warm reads of the startup set, blobs partly cached (fill off)".into(),
        format!("{lazy_partial:.3} s (in {REPS} passes: {partial_events} events, {partial_at_once} answered at once, {partial_polled} busy-poll reads; daemon CPU {partial_cpu:.3} s a pass)"),
        format!("local EROFS {local_warm:.3} s"),
        format!("{:.2}x local", lazy_partial / local_warm),
    ));
    r.rows.push((
        "bytes fetched: cold start / re-reads of cached data (fill off)".into(),
        format!(
            "{:.1} MB / {:.1} MB",
            cold_fetched as f64 / 1e6,
            reread_fetched as f64 / 1e6
        ),
        format!("startup set {:.1} MB", startup_bytes as f64 / 1e6),
        format!(
            "{:.2}x the set / {reread_fetched} B",
            cold_fetched as f64 / startup_bytes as f64
        ),
    ));
    r.json.insert(
        "fetched".into(),
        json!({"startup_bytes": startup_bytes, "cold_start_bytes": cold_fetched,
            "cold_ratio": cold_fetched as f64 / startup_bytes as f64,
            "reread_bytes": reread_fetched, "reread_passes": REPS}),
    );
    r.json.insert(
        "warm".into(),
        json!({"lazyblob_s": lazy_warm, "lazyblob_partial_s": lazy_partial, "local_erofs_s": local_warm,
            "ratio": lazy_warm / local_warm, "ratio_partial": lazy_partial / local_warm,
            "partial_events": partial_events, "partial_answered_at_once": partial_at_once, "partial_busy_poll_reads": partial_polled, "partial_daemon_cpu_s": partial_cpu,
            "background_fill_s": fill_s}),
    );
    eprintln!("background fill of the rest of the image took {fill_s:.2} s");
    drop(d);

    // ---- 6. conversion throughput
    let conv_mbs = report.layer_bytes as f64 / 1e6 / convert_s;
    let mkfs_mbs = total_bytes as f64 / 1e6 / mkfs_s;
    r.rows.push((
        "conversion (MB/s of file data)".into(),
        format!("{conv_mbs:.0} MB/s"),
        format!("mkfs.erofs {mkfs_mbs:.0} MB/s"),
        format!("{:.2}x", conv_mbs / mkfs_mbs),
    ));
    r.json.insert("conversion".into(), json!({"lazyblob_mbs": conv_mbs, "mkfs_erofs_mbs": mkfs_mbs, "ratio": conv_mbs / mkfs_mbs, "note": "lazyblob pulls from the registry and verifies and hashes every chunk; mkfs.erofs reads a local tree"}));
    // ---- 7. nydusd on the same tree, where it is installed
    match nydus::tools() {
        Some(t) => {
            eprintln!("nydusd side by side: building RAFS v6 and v5 images...");
            let rootfs = pull_dir.join("rootfs");
            let v6 = nydus::build(&t, &rootfs, &w.join("nydus6"), reg, host, "6").await;
            let v5 = nydus::build(&t, &rootfs, &w.join("nydus5"), reg, host, "5").await;
            let off = nydus::measure(&t, &v6, host, &w.join("nydus-off"), &workload, false);
            let on = nydus::measure(&t, &v5, host, &w.join("nydus-on"), &workload, true);
            nydus::report(r, &lazy_side, &off, &on);
        }
        None => {
            eprintln!("\nNOTE: nydusd and nydus-image are not installed: no side-by-side rows (scripts/nydus.sh installs them)\n");
            r.rows.push((
                "vs nydusd".into(),
                "not run".into(),
                "nydusd not installed (scripts/nydus.sh)".into(),
                "-".into(),
            ));
        }
    }
    eprintln!("\nimage: {} files, {:.0} MB in {} layers; startup set {:.0} MB ({:.1}%); all against docker-registry on loopback\n",
    all.len(), total_bytes as f64 / 1e6, s.layers, startup_bytes as f64 / 1e6, 100.0 * startup_bytes as f64 / total_bytes as f64);
}
