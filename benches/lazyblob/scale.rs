//! Many images, many concurrent cold reads.

use std::time::Instant;

use lazyblob::registry::parse_reference;
use serde_json::json;

use crate::util::*;

/// Many registered images and a burst of concurrent cold reads spread over all of them (each
/// reader its own 64 KiB slot of one image's file), the registry answering at once
/// (registry-mock): RSS, CPU and cold chunk reads per second.
pub async fn scale(b: &Bench<'_>, r: &mut Report) {
    let (s, w) = (&b.scale, b.work);
    eprintln!(
        "scale test: {} images, {} concurrent cold reads...",
        s.images, s.concurrent
    );
    let mock = registry_mock::MockRegistry::start(Default::default()).await.unwrap();
    let mhost = mock.host();
    let mreg = registry(&[&mhost]);
    // the readers are spread over every image: each image's file has a 64 KiB slot per reader
    let per_image = s.concurrent.div_ceil(s.images);
    let big_len = per_image * 64 * 1024;
    let files: Vec<Vec<u8>> = (0..s.images).map(|i| rng_bytes(5000 + i as u64, big_len)).collect();
    for (i, data) in files.iter().enumerate() {
        let mut tree = lazyblob::image::tree::Tree::new(lazyblob::image::tree::Meta {
            perm: 0o755,
            ..Default::default()
        });
        let mut bw = lazyblob::image::build::BlobWriter::new(1);
        let fd = bw.add(0, data);
        tree.insert(
            0,
            b"big.bin",
            lazyblob::image::tree::Node {
                meta: lazyblob::image::tree::Meta {
                    perm: 0o644,
                    ..Default::default()
                },
                kind: lazyblob::image::tree::Kind::File(fd),
            },
        )
        .unwrap();
        // LAZYBLOB_BENCH_NO_LEAVES=1: format 2 images (no leaves layer), for A/B runs
        let built = if std::env::var_os("LAZYBLOB_BENCH_NO_LEAVES").is_some() {
            bw.finish_with(tree, 1 << 20, lazyblob::image::format::ChunkDigest::default())
        } else {
            bw.finish(tree, 1 << 20)
        }
        .unwrap();
        lazyblob::image::build::push(
            &mreg,
            &parse_reference(&format!("{mhost}/scale/img{i}:v1")).unwrap(),
            &built,
            None,
        )
        .await
        .unwrap();
    }
    // LAZYBLOB_BENCH_SCALE_EXTRA: config lines for this daemon (e.g. "[prefetch]\nfrom_registry
    // = false\n"), for A/B runs
    let d = daemon(
        &w.join("d4"),
        &[&mhost],
        &format!(
            "{}[engine]\nfill_after_idle_ms = 0",
            std::env::var("LAZYBLOB_BENCH_SCALE_EXTRA").unwrap_or_default()
        ),
    );
    let mnt4 = w.join("d4/mnt");
    for i in 0..s.images {
        let m = mnt4.join(format!("m{i}"));
        std::fs::create_dir_all(&m).unwrap();
        d.mount(&format!("{mhost}/scale/img{i}:v1"), &m);
    }
    let profiler = profile_start();
    let t = Instant::now();
    let handles: Vec<_> = (0..s.concurrent)
        .map(|i| {
            let (img, slot) = (i % s.images, i / s.images);
            let p = mnt4.join(format!("m{img}/big.bin"));
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || read_range(&p, (slot * 64 * 1024) as u64, 4096))
                .unwrap()
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap();
        let (img, off) = (i % s.images, (i / s.images) * 64 * 1024);
        assert!(got[..] == files[img][off..off + 4096]);
    }
    let burst = t.elapsed().as_secs_f64();
    profile_stop(profiler);
    let (rss_kib, cpu_s) = usage(d.pid());
    // requests per second when the registry answers at once: cold 4 KiB reads, one per chunk
    let d2 = daemon(&w.join("d5"), &[&mhost], "[engine]\nfill_after_idle_ms = 0\n");
    let m5 = w.join("d5/mnt");
    let sample = s.images.min(10);
    for i in 0..sample {
        std::fs::create_dir_all(m5.join(format!("m{i}"))).unwrap();
        d2.mount(&format!("{mhost}/scale/img{i}:v1"), &m5.join(format!("m{i}")));
    }
    let chunks = sample * big_len.div_ceil(1 << 20);
    let t = Instant::now();
    for i in 0..sample {
        for c in 0..big_len.div_ceil(1 << 20) {
            let _ = read_range(&m5.join(format!("m{i}/big.bin")), (c << 20) as u64, 4096);
        }
    }
    let rps = chunks as f64 / t.elapsed().as_secs_f64();
    r.rows.push((
        format!(
            "scale: {} images mounted, {} concurrent cold reads",
            s.images, s.concurrent
        ),
        format!("RSS {:.1} MiB, CPU {cpu_s:.2} s", rss_kib as f64 / 1024.0),
        format!("burst {burst:.2} s"),
        format!("{rps:.0} cold chunk reads/s"),
    ));
    r.json.insert("scale".into(), json!({"images": s.images, "concurrent": s.concurrent, "peak_rss_kib": rss_kib, "cpu_s": cpu_s, "burst_s": burst, "cold_chunk_reads_per_s": rps}));
    drop(d2);
    drop(d);
}
