//! Many images, many concurrent cold reads.

use std::collections::BTreeMap;
use std::time::Instant;

use lazyblob::registry::parse_reference;
use serde_json::json;

use crate::util::*;

/// Many registered images and a burst of concurrent cold reads, the registry answering at
/// once (registry-mock): RSS, CPU and cold chunk reads per second.
pub async fn scale(b: &Bench<'_>, r: &mut Report) {
    let (s, w) = (&b.scale, b.work);
    eprintln!(
        "scale test: {} images, {} concurrent cold reads...",
        s.images, s.concurrent
    );
    let mock = registry_mock::MockRegistry::start(Default::default()).await.unwrap();
    let mhost = mock.host();
    let mreg = registry(&[&mhost]);
    let big_len = s.concurrent * 64 * 1024;
    let mut big_tree = BTreeMap::new();
    big_tree.insert("data/big.bin".to_string(), rng_bytes(99, big_len));
    for i in 0..s.images {
        let mut tree = lazyblob::image::tree::Tree::new(lazyblob::image::tree::Meta {
            perm: 0o755,
            ..Default::default()
        });
        let mut bw = lazyblob::image::build::BlobWriter::new(1);
        let data = if i == 0 {
            big_tree["data/big.bin"].clone()
        } else {
            rng_bytes(5000 + i as u64, 8192)
        };
        let fd = bw.add(0, &data);
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
        let built = bw.finish(tree, 1 << 20).unwrap();
        lazyblob::image::build::push(
            &mreg,
            &parse_reference(&format!("{mhost}/scale/img{i}:v1")).unwrap(),
            &built,
            None,
        )
        .await
        .unwrap();
    }
    let d = daemon(&w.join("d4"), &[&mhost], "[engine]\nfill_after_idle_ms = 0\n");
    let mnt4 = w.join("d4/mnt");
    for i in 0..s.images {
        let m = mnt4.join(format!("m{i}"));
        std::fs::create_dir_all(&m).unwrap();
        d.mount(&format!("{mhost}/scale/img{i}:v1"), &m);
    }
    let target = mnt4.join("m0/big.bin");
    let t = Instant::now();
    let handles: Vec<_> = (0..s.concurrent)
        .map(|i| {
            let p = target.clone();
            std::thread::spawn(move || read_range(&p, (i * 64 * 1024) as u64, 4096))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap();
        let off = i * 64 * 1024;
        assert!(got[..] == big_tree["data/big.bin"][off..off + 4096]);
    }
    let burst = t.elapsed().as_secs_f64();
    let (rss_kib, cpu_s) = usage(d.pid());
    // requests per second when the registry answers at once: cold 4 KiB reads, one per chunk
    let d2 = daemon(&w.join("d5"), &[&mhost], "[engine]\nfill_after_idle_ms = 0\n");
    let m5 = w.join("d5/mnt");
    std::fs::create_dir_all(&m5).unwrap();
    d2.mount(&format!("{mhost}/scale/img0:v1"), &m5);
    let chunks = big_len / (1 << 20);
    let t = Instant::now();
    for c in 0..chunks {
        let _ = read_range(&m5.join("big.bin"), (c << 20) as u64, 4096);
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
