//! Read stalls across restarts and upgrades: a daemon with 100 mounted images (fanotify),
//! 8 readers streaming cold files from registry-mock (answering at once: what is measured is
//! lazyblob's own takeover), the daemon `kill -9`ed and restarted 3 times, then upgraded 3
//! times. The longest single read of each reader is reported (p50 / p99 over readers and
//! disruptions) against the same readers' longest read with no disruption, side by side.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common;
use crate::util::*;

/// What happens to the daemon while the readers stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Disruption {
    None,
    Kill9,
    Upgrade,
}

pub async fn restart(b: &Bench<'_>, r: &mut Report) {
    let w = b.work;
    let mock = registry_mock::MockRegistry::start(Default::default()).await.unwrap();
    let host = mock.host();
    let reg = registry(&[&host]);
    let files: BTreeMap<String, Vec<u8>> = (0..8)
        .map(|k| (format!("data/f{k}.bin"), rng_bytes(700 + k, 48 << 20)))
        .collect();
    eprintln!("restart stalls: 100 small images and one of 8 x 48 MiB...");
    for i in 0..100u64 {
        let small: BTreeMap<String, Vec<u8>> = [("f.bin".to_string(), rng_bytes(9000 + i, 8192))].into();
        common::push_image(&reg, &host, &format!("many/img{i}:v1"), &common::build_files(&small, 1)).await;
    }
    let mut results = serde_json::Map::new();
    let mut baseline = 0.0;
    for (k, how) in [Disruption::None, Disruption::Kill9, Disruption::Upgrade]
        .into_iter()
        .enumerate()
    {
        // each round on cold data: its own image of the same files
        let image = format!("{host}/stream/app{k}:v1");
        common::push_image(
            &reg,
            &host,
            &format!("stream/app{k}:v1"),
            &common::build_files(&files, 8),
        )
        .await;
        let dir = w.join(format!("restart-{k}"));
        let mut d = daemon(&dir, &[&host], "");
        for i in 0..100 {
            let m = dir.join(format!("m{i}"));
            d.mount(&format!("{host}/many/img{i}:v1"), &m);
        }
        let mnt = dir.join("mnt");
        d.mount(&image, &mnt);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = files.keys().map(|p| stream(mnt.join(p), Arc::clone(&stop))).collect();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            match how {
                Disruption::None => {}
                Disruption::Kill9 => {
                    d.kill9();
                    d.restart();
                }
                Disruption::Upgrade => d.upgrade(),
            }
        }
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Relaxed);
        let mut longest: Vec<f64> = readers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{how:?}: a reader failed: {e}"))
            })
            .collect();
        let (p50, p99) = (percentile(&mut longest.clone(), 0.5), percentile(&mut longest, 0.99));
        eprintln!("{how:?}: longest read per reader p50 {p50:.3} s, p99 {p99:.3} s");
        if how == Disruption::None {
            baseline = p99;
        } else {
            r.rows.push((
                format!("longest read stall across 3 {how:?}s, 100 images mounted, 8 readers: p50 / p99"),
                format!("{:.0} / {:.0} ms", p50 * 1e3, p99 * 1e3),
                format!("no disruption: p99 {:.0} ms", baseline * 1e3),
                format!("{:+.0} ms at p99 (goal: p99 < 1 s)", (p99 - baseline) * 1e3),
            ));
        }
        results.insert(
            format!("{how:?}").to_lowercase(),
            json!({"longest_read_p50_s": p50, "longest_read_p99_s": p99}),
        );
        for i in 0..100 {
            d.umount(&dir.join(format!("m{i}")));
        }
        d.umount(&mnt);
    }
    r.json
        .insert("restart_stalls".into(), serde_json::Value::Object(results));
}

/// A reader of a file in 128 KiB reads until the end or `stop`; its longest read in seconds.
fn stream(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<f64, String>> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let (mut buf, mut longest) = (vec![0u8; 128 << 10], 0f64);
        while !stop.load(Relaxed) {
            let t = Instant::now();
            let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
            longest = longest.max(t.elapsed().as_secs_f64());
            if n == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(8));
        }
        Ok(longest)
    })
}
