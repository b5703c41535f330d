//! Sequential and random cold reads of one large file, and the sequential read through
//! the cachefiles frontend in the VM rig.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use lazyblob::image::convert::{convert, ConvertOptions};
use lazyblob::registry::Registry;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common;
use crate::common::oci::{convert_ref, lazy_manifest, push_source};
use crate::util::*;

/// The image of one large file for the sequential and random reads, converted with 1 MiB
/// and with 64 KiB chunks.
pub async fn seq_images(b: &Bench<'_>) -> SeqImages {
    let (s, host, reg) = (&b.scale, b.host.as_str(), &b.reg);
    let data = rng_bytes(42, s.seq_mib << 20);
    let src = format!("{host}/bench/seq:src");
    let lazy = format!("{host}/bench/seq:lazy");
    let lazy_64k = format!("{host}/bench/seq:lazy64k");
    eprintln!("building the sequential-read image ({} MiB)...", s.seq_mib);
    push_source(reg, &src, &[gzip_layer(&[("data/large.bin".into(), data.clone())])]).await;
    convert_ref(reg, &src, &lazy).await;
    let opts64 = ConvertOptions {
        chunk_size: 64 * 1024,
        ..Default::default()
    };
    convert(reg, &src.parse().unwrap(), &lazy_64k.parse().unwrap(), &opts64)
        .await
        .unwrap();
    let blob = lazy_manifest(reg, &lazy).await.data[0].digest.to_string();
    SeqImages {
        data,
        lazy,
        lazy_64k,
        blob,
    }
}

/// The variant whose sequential reader competes with another blob's background fill.
const OTHER_FILLS: &str = "1 MiB chunks, while another blob fills";

/// Sequential cold reads of one large file (1 MiB and 64 KiB chunks) against curl of the
/// same blob, alternating, medians, with the CPU seconds of each party.
pub async fn sequential(b: &Bench<'_>, img: &SeqImages, r: &mut Report) {
    let (s, w, host, dr) = (&b.scale, b.work, b.host.as_str(), b.registry);
    let (seq_dst, small_dst, blob) = (&img.lazy, &img.lazy_64k, &img.blob);
    // curl and each lazyblob variant alternate, `REPS` times each, all cold every time;
    // medians reported, and the CPU seconds each party spent per run
    let all_variants = [
        ("1 MiB chunks", &seq_dst, ""),
        ("64 KiB chunks", &small_dst, "[engine]\nchunk_size = 65536\n"),
        // the background fill must yield to a sequential reader: this against the first
        (
            "1 MiB chunks, background fill off",
            &seq_dst,
            "[engine]\nfill_after_idle_ms = 0\n",
        ),
        // and to readers of other blobs: another image's blob, read at random first, fills
        (OTHER_FILLS, &seq_dst, ""),
    ];
    // LAZYBLOB_BENCH_SEQ_VARIANT=0: only the first (profiling); 2,3: those two
    let pick: Option<Vec<usize>> = std::env::var("LAZYBLOB_BENCH_SEQ_VARIANT")
        .ok()
        .map(|v| v.split(',').filter_map(|i| i.parse().ok()).collect());
    let variants: Vec<_> = all_variants
        .iter()
        .enumerate()
        .filter(|(i, _)| pick.as_ref().is_none_or(|p| p.contains(i)))
        .map(|(_, v)| *v)
        .collect();
    let mut curl_runs = Vec::new();
    let mut curl_cpu = [0.0; 2];
    let mut lazy_runs = vec![Vec::new(); variants.len()];
    let mut lazy_cpu = vec![[0.0; 3]; variants.len()];
    for rep in 0..REPS {
        drop_caches();
        let (reg0, me0) = (usage(dr.pid()).1, self_cpu());
        let t = Instant::now();
        sh_ok(&format!(
            "curl -sf -o {}/curl.bin http://{host}/v2/bench/seq/blobs/{blob}",
            w.display()
        ));
        curl_runs.push(t.elapsed().as_secs_f64());
        curl_cpu[0] += usage(dr.pid()).1 - reg0;
        curl_cpu[1] += self_cpu() - me0;
        let _ = std::fs::remove_file(w.join("curl.bin"));
        for (v, (_, image, extra)) in variants.iter().enumerate() {
            let dir = w.join(format!("d2-{rep}-{v}"));
            let d = daemon(&dir, &[host], extra);
            let mnt2 = dir.join("mnt");
            std::fs::create_dir_all(&mnt2).unwrap();
            d.mount(image, &mnt2);
            if variants[v].0 == OTHER_FILLS {
                // a few reads of the 64 KiB-chunk image's blob (another cache file), then its
                // fill starts once they have been quiet for `fill_after_idle_ms` (1 s)
                let other = dir.join("other");
                std::fs::create_dir_all(&other).unwrap();
                d.mount(small_dst, &other);
                for k in 0..8u64 {
                    read_range(&other.join("data/large.bin"), k * (97 << 20), 4096);
                }
                std::thread::sleep(Duration::from_millis(1200));
            }
            drop_caches();
            let profiler = profile_start();
            let bytes0 = d.status().await.registry.bytes;
            let (reg0, me0, d0) = (usage(dr.pid()).1, self_cpu(), usage(d.pid()).1);
            let t = Instant::now();
            sh_ok(&format!(
                "dd if={}/data/large.bin of=/dev/null bs=1M status=none",
                mnt2.display()
            ));
            lazy_runs[v].push(t.elapsed().as_secs_f64());
            lazy_cpu[v][0] += usage(dr.pid()).1 - reg0;
            lazy_cpu[v][1] += self_cpu() - me0;
            lazy_cpu[v][2] += usage(d.pid()).1 - d0;
            let st = d.status().await;
            eprintln!(
                "{} (run {rep}): {} range requests, {} bytes from the registry ({} during the read); fetches ahead paused {} times ({} for a whole second)",
                variants[v].0, st.registry.requests, st.registry.bytes, st.registry.bytes - bytes0, st.engine.ahead_pauses, st.engine.ahead_pauses_expired
            );
            profile_stop(profiler);
            drop(d);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let n = REPS as f64;
    eprintln!(
        "curl runs (s) {curl_runs:.3?}; CPU s per run: registry {:.2}, curl {:.2}",
        curl_cpu[0] / n,
        curl_cpu[1] / n
    );
    let curl_s = percentile(&mut curl_runs, 0.5);
    let mb = (s.seq_mib << 20) as f64 / 1e6;
    let mut seq_json = serde_json::Map::new();
    seq_json.insert("bytes".into(), json!(s.seq_mib << 20));
    seq_json.insert("curl_mbs".into(), json!(mb / curl_s));
    for (v, (name, _, _)) in variants.iter().enumerate() {
        let c = lazy_cpu[v];
        eprintln!(
            "lazyblob {name} runs (s) {:.3?}; CPU s per run: registry {:.2}, dd {:.2}, daemon {:.2}",
            lazy_runs[v],
            c[0] / n,
            c[1] / n,
            c[2] / n
        );
        let seq_s = percentile(&mut lazy_runs[v], 0.5);
        r.rows.push((
            format!("sequential cold read, {} MiB file (fanotify), {name}", s.seq_mib),
            format!("{:.0} MB/s", mb / seq_s),
            format!("curl {:.0} MB/s", mb / curl_s),
            format!("{:.0}% of curl", 100.0 * curl_s / seq_s),
        ));
        seq_json.insert(
            name.replace(' ', "_"),
            json!({"lazyblob_mbs": mb / seq_s, "ratio": curl_s / seq_s,
                "cpu_s_per_run": {"registry": c[0] / n, "reader": c[1] / n, "daemon": c[2] / n}}),
        );
    }
    let mbs = |name: &str| {
        seq_json
            .get(&name.replace(' ', "_"))
            .and_then(|v| v["lazyblob_mbs"].as_f64())
    };
    let off = mbs("1 MiB chunks, background fill off");
    let against_off = [
        (
            "1 MiB chunks",
            "sequential cold read with background fill on vs off",
            "fill_on_vs_off",
        ),
        (
            OTHER_FILLS,
            "sequential cold read while another blob fills vs fill off",
            "other_fills_vs_off",
        ),
    ];
    let pairs: Vec<_> = against_off
        .iter()
        .map(|&(name, row, key)| (mbs(name), row, key))
        .collect();
    for (on, row, key) in pairs {
        if let (Some(on), Some(off)) = (on, off) {
            r.rows.push((
                row.into(),
                format!("{on:.0} MB/s"),
                format!("fill off {off:.0} MB/s"),
                format!("{:.0}%", 100.0 * on / off),
            ));
            seq_json.insert(key.into(), json!(on / off));
        }
    }
    seq_json.insert(
        "curl_cpu_s_per_run".into(),
        json!({"registry": curl_cpu[0] / n, "curl": curl_cpu[1] / n}),
    );
    r.json.insert("sequential".into(), serde_json::Value::Object(seq_json));
}

/// Random 4 KiB cold reads against raw range GETs of the same size, each read paired with a
/// GET just before it; 1 MiB and 64 KiB chunks, on docker-registry and on registry-mock.
pub async fn random(b: &Bench<'_>, img: &SeqImages, r: &mut Report) {
    let (s, w, host, reg) = (&b.scale, b.work, b.host.as_str(), &b.reg);
    let (seq_data, seq_dst, small_dst, blob) = (&img.data, &img.lazy, &img.lazy_64k, &img.blob);
    let chunks = (s.seq_mib as u64) - 1;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let offsets: Vec<u64> = (0..s.random_reads)
        .map(|i| ((i as u64 * 7919) % chunks) * (1 << 20) + (rng.next_u64() % 250) * 4096)
        .collect();
    // the registry's storage is read once first: both sides then measure the network path
    // and the registry's per-request work, not its disk
    sh_ok(&format!(
        "curl -sf -o /dev/null http://{host}/v2/bench/seq/blobs/{blob}"
    ));
    // the same images on registry-mock, which answers from memory at once: the difference
    // to the raw GET there is what lazyblob itself adds, without docker-registry's jitter
    let mock = registry_mock::MockRegistry::start(Default::default()).await.unwrap();
    let mhost = mock.host();
    let mock_seq = copy_image(reg, seq_dst, &mock).await;
    let mock_small = copy_image(reg, small_dst, &mock).await;
    // a local file for the page-cache baseline of re-reads
    let local = w.join("local.bin");
    std::fs::write(&local, &seq_data[..64 << 20]).unwrap();
    let http = reqwest::Client::new();
    let raw_get = |host: &str, off: u64, len: u64| {
        let (http, url) = (http.clone(), format!("http://{host}/v2/bench/seq/blobs/{blob}"));
        async move {
            let t = Instant::now();
            let body = http
                .get(url)
                .header("Range", format!("bytes={}-{}", off, off + len - 1))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(body.len() as u64, len);
            t.elapsed().as_secs_f64() * 1e6
        }
    };
    let one_mib = "[engine]\nchunk_size = 1048576\nread_ahead_max = 0\nfill_after_idle_ms = 0\n";
    let small = "[engine]\nchunk_size = 65536\nread_ahead_max = 0\nfill_after_idle_ms = 0\n";
    // the defaults: read-ahead on (it must not open for a random reader), fill after 2 s idle
    let defaults = "[engine]\nchunk_size = 1048576\n";
    for (k, (name, reg_host, image, unit, extra)) in [
        ("1 MiB chunks", host, seq_dst.as_str(), 1 << 20, one_mib),
        (
            "1 MiB chunks, read-ahead and fill as by default",
            host,
            seq_dst.as_str(),
            1 << 20,
            defaults,
        ),
        ("64 KiB chunks", host, small_dst.as_str(), 64 << 10, small),
        (
            "1 MiB chunks, registry-mock",
            mhost.as_str(),
            mock_seq.as_str(),
            1 << 20,
            one_mib,
        ),
        (
            "64 KiB chunks, registry-mock",
            mhost.as_str(),
            mock_small.as_str(),
            64 << 10,
            small,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = w.join(format!("d3-{k}"));
        let d = daemon(&dir, &[reg_host], extra);
        let m = dir.join("mnt");
        std::fs::create_dir_all(&m).unwrap();
        d.mount(image, &m);
        // the leaves layer a mount keeps comes in the background (2 MiB for the 1 GiB blob):
        // landed before the reads, so it neither counts as theirs nor competes with them
        let mut fetched_before = d.status().await.registry.bytes;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = d.status().await.registry.bytes;
            if now == fetched_before {
                break;
            }
            fetched_before = now;
        }
        // each cold read right after a raw GET of the same range: both see the same
        // machine; the added latency is the median of the paired differences
        let (mut raw_lat, mut lazy_lat, mut added) = (Vec::new(), Vec::new(), Vec::new());
        let mut added_over_unit = Vec::new();
        for off in &offsets {
            // each of the three starts after a short pause, so none pays for work the
            // registry may still be doing for the request before it
            let settle = || std::thread::sleep(std::time::Duration::from_millis(5));
            settle();
            let raw = raw_get(reg_host, *off, 4096).await;
            settle();
            let unit_get = raw_get(reg_host, *off / unit * unit, unit).await;
            settle();
            let t = Instant::now();
            let got = read_range(&m.join("data/large.bin"), *off, 4096);
            let lazy = t.elapsed().as_secs_f64() * 1e6;
            assert!(got[..] == seq_data[*off as usize..*off as usize + 4096]);
            raw_lat.push(raw);
            lazy_lat.push(lazy);
            added.push(lazy - raw);
            added_over_unit.push(lazy - unit_get);
        }
        let per_read = (d.status().await.registry.bytes - fetched_before) / offsets.len() as u64;
        // the same pages again, dropped from the mount's page cache but cached and verified
        // in the daemon's cache file, whose blob is still marked (fill is off): each read is
        // one fanotify event answered at once, the frontend's fixed cost; back to back and
        // after 5 ms idle (as the cold reads above), against a local file in the page cache
        let file = m.join("data/large.bin");
        let hot = cache_file_hits(&file, &offsets, seq_data, &local, None);
        let idle = cache_file_hits(&file, &offsets, seq_data, &local, Some(Duration::from_millis(5)));
        let (rp50, rp99) = (percentile(&mut raw_lat.clone(), 0.5), percentile(&mut raw_lat, 0.99));
        let (lp50, lp99) = (percentile(&mut lazy_lat.clone(), 0.5), percentile(&mut lazy_lat, 0.99));
        let added_p50 = percentile(&mut added, 0.5);
        let over_unit_p50 = percentile(&mut added_over_unit, 0.5);
        // the target: a cold read costs at most 100 us more than a raw GET of its range plus
        // one fanotify round trip of a cache-file hit (after 5 ms idle, as the cold reads)
        let over_floor = added_p50 - idle.0;
        r.rows.push((
            format!("random 4 KiB cold reads p50 / p99, {name}"),
            format!("{lp50:.0} / {lp99:.0} us"),
            format!("range GET {rp50:.0} / {rp99:.0} us"),
            format!(
                "{added_p50:+.0} us ({over_floor:+.0} us over GET + cache-file hit); {over_unit_p50:+.0} us over a GET of the chunk; {:.1} KiB fetched per read",
                per_read as f64 / 1024.0
            ),
        ));
        if k == 0 {
            r.rows.push((
                "4 KiB read served from the cache file, blob still marked (fanotify round trip) p50, back to back / after 5 ms idle".into(),
                format!("{:.0} / {:.0} us", hot.0, idle.0),
                format!("local file {:.0} / {:.0} us", hot.1, idle.1),
                format!("{:+.0} / {:+.0} us", hot.0 - hot.1, idle.0 - idle.1),
            ));
        }
        r.json.insert(format!("random_4k_{}", name.replace([' ', ','], "_")), json!({"lazyblob_p50_us": lp50, "lazyblob_p99_us": lp99, "raw_get_p50_us": rp50, "raw_get_p99_us": rp99, "added_p50_us": added_p50, "added_over_chunk_get_p50_us": over_unit_p50, "added_over_get_plus_cache_hit_p50_us": over_floor, "fetched_per_read_bytes": per_read, "cache_file_hit_p50_us": [hot.0, idle.0], "local_page_cache_p50_us": [hot.1, idle.1],
        "note": "format 3: a cold 4 KiB read fetches and verifies its 16 KiB leaf and its chunk's leaf values, side by side; each read is paired with a raw GET of the same range just before it"}));
    }
}

/// Random 4 KiB cold reads per VM run: one in each of this many 1 MiB chunks.
const VM_RANDOM_READS: usize = 32;

/// In the VM rig (cachefiles frontend), against the same guest's `wget`, `REPS` times each,
/// alternating; medians: sequential cold reads of a `mib` MiB file against a download of its
/// blob, and random 4 KiB cold reads (each its own `dd`, a fresh daemon and cache) against a
/// 4 KiB range GET of the blob each (its own `nc`: busybox's `wget` refuses a 206) and
/// against the same reads again from the cache file.
pub async fn vm_reads(reg: &Registry, host: &str, mib: usize, r: &mut Report) {
    let port = host.rsplit(':').next().unwrap_or_default();
    let src = format!("{host}/bench/vmseq:src");
    let dst = format!("{host}/bench/vmseq:lazy");
    let data = rng_bytes(43, mib << 20);
    push_source(reg, &src, &[gzip_layer(&[("data/large.bin".into(), data)])]).await;
    convert_ref(reg, &src, &dst).await;
    let blob = lazy_manifest(reg, &dst).await.data[0].digest.clone();
    let (share, payload) = common::vm_dirs();
    let bin = Path::new(env!("CARGO_BIN_EXE_lazyblob"));
    let p = payload.path();
    let port: u16 = port.parse().expect("a port");
    std::fs::write(p.join("cfg.toml"), common::guest_config(port, "", "")).unwrap();
    // 4 KiB blocks: one at a random place in each of VM_RANDOM_READS distinct chunks
    let mut rng = rand::rngs::StdRng::seed_from_u64(47);
    let blocks: Vec<String> = rand::seq::index::sample(&mut rng, mib, VM_RANDOM_READS.min(mib))
        .into_iter()
        .map(|c| (c as u64 * 256 + rng.next_u64() % 256).to_string())
        .collect();
    let script = format!(
        r#"#!/bin/sh
R=10.0.2.2:{port}; LB=/host/lazyblob; SOCK=/run/lazyblob.sock; U=http://$R/v2/bench/vmseq/blobs/{blob}
BLOCKS="{blocks}"
now() {{ cut -d' ' -f1 /proc/uptime; }}
mkdir -p /mnt/l
up() {{
  rm -rf /var/lib/lazyblob /var/cache/lazyblob; mkdir -p /var/lib/lazyblob
  $LB daemon --config /cfg.toml 2>>/tmp/daemon.log & DPID=$!
  n=0; while [ ! -S $SOCK ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done
  $LB mount --socket $SOCK $R/bench/vmseq:lazy /mnt/l || cat /tmp/daemon.log
  sync; echo 3 > /proc/sys/vm/drop_caches
}}
down() {{ $LB umount --socket $SOCK /mnt/l; kill $DPID; wait $DPID; }}
# one 4 KiB dd per block of BLOCKS; rc=1 if any fails
dds() {{ rc=0; for k in $BLOCKS; do dd if=/mnt/l/data/large.bin of=/dev/null bs=4096 count=1 skip=$k 2>/dev/null || rc=1; done; }}
i=0
while [ $i -lt {REPS} ]; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  a=$(now); wget -q -O /var/cache/w.bin $U; rc=$?; b=$(now)
  echo "RESULT wget $rc $a $b"; rm -f /var/cache/w.bin
  up
  a=$(now); dd if=/mnt/l/data/large.bin of=/dev/null bs=1M 2>/dev/null; rc=$?; b=$(now)
  echo "RESULT lazy $rc $a $b"
  echo "CPU daemon $(cut -d' ' -f14,15 /proc/$DPID/stat)"
  down
  a=$(now); rc=0
  for k in $BLOCKS; do
    printf 'GET /v2/bench/vmseq/blobs/{blob} HTTP/1.0\r\nHost: %s\r\nRange: bytes=%d-%d\r\n\r\n' \
      $R $((k*4096)) $((k*4096+4095)) | nc 10.0.2.2 {port} >/var/cache/r.bin
    [ "$(wc -c </var/cache/r.bin)" -gt 4096 ] || rc=1
  done
  b=$(now); echo "RESULT range-random $rc $a $b"
  up
  a=$(now); dds; b=$(now); echo "RESULT lazy-random $rc $a $b"
  sync; echo 3 > /proc/sys/vm/drop_caches
  a=$(now); dds; b=$(now); echo "RESULT lazy-hit $rc $a $b"
  down
  i=$((i+1))
done
exit 0
"#,
        blocks = blocks.join(" ")
    );
    common::write_guest_script(p, &script);
    let accel = "TCG"; // what the rig runs (nested KVM is not available here)
    let (code, console) = common::run_vm(p, share.path(), &[bin], 900).await;
    assert_eq!(code, 0, "VM run failed:\n{console}");
    let mut runs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // the daemon's CPU seconds (user + system) in each run: steadier than the wall time
    let hz = 100.0;
    let mut cpu = Vec::new();
    for l in console.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let ["CPU", "daemon", u, s] = f[..] {
            cpu.push((u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0)) / hz);
        }
        if let ["RESULT", who, rc, a, b] = f[..] {
            assert_eq!(rc, "0", "{who} failed in the guest:\n{console}");
            let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
            runs.entry(who.to_string()).or_default().push(b - a);
        }
    }
    let mut median = |who: &str| {
        let mut v = runs.remove(who).unwrap_or_default();
        assert!(v.len() == REPS, "missing results for {who}:\n{console}");
        eprintln!("VM ({accel}) {who} runs (s): {v:.2?}");
        percentile(&mut v, 0.5)
    };
    let (ws, ls) = (median("wget"), median("lazy"));
    let n = VM_RANDOM_READS.min(mib) as f64;
    let ms = |t: f64| t / n * 1e3;
    let (wr, lr, hit) = (
        ms(median("range-random")),
        ms(median("lazy-random")),
        ms(median("lazy-hit")),
    );
    eprintln!("VM ({accel}) daemon CPU s per sequential run {cpu:.2?}");
    let mb = (mib << 20) as f64 / 1e6;
    r.rows.push((
        format!("sequential cold read, {mib} MiB file (cachefiles, VM rig, {accel})"),
        format!("{:.0} MB/s", mb / ls),
        format!("wget in the guest {:.0} MB/s", mb / ws),
        format!("{:.0}% of wget", 100.0 * ws / ls),
    ));
    r.json.insert(
        "sequential_cachefiles_vm".into(),
        json!({"bytes": mib << 20, "accel": accel, "lazyblob_mbs": mb / ls, "wget_mbs": mb / ws, "ratio": ws / ls, "daemon_cpu_s": cpu}),
    );
    r.rows.push((
        format!("random 4 KiB cold reads, one per chunk, each its own dd (cachefiles, VM rig, {accel})"),
        format!("{lr:.1} ms a read (re-read from the cache file, page cache dropped: {hit:.1} ms)"),
        format!("a 4 KiB range GET by nc in the guest {wr:.1} ms"),
        format!("{:+.1} ms over the GET; {:+.1} ms over the re-read", lr - wr, lr - hit),
    ));
    r.json.insert(
        "random_cachefiles_vm".into(),
        json!({"reads": n, "accel": accel, "lazyblob_ms": lr, "cached_ms": hit, "range_get_ms": wr}),
    );
}
