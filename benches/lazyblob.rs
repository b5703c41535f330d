//! `cargo bench --bench lazyblob [-- --quick]`: lazyblob against its baselines, side by side, on
//! one machine in one run, everything against Debian's docker-registry on loopback (registry-mock
//! with zero latency for the scale test). Prints a markdown table and writes
//! `target/bench/lazyblob-bench.json`. Needs root (mounts, fanotify), docker-registry, curl,
//! tar, mkfs.erofs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lazyblob::config::{HostConfig, RegistryConfig};
use lazyblob::image::convert::{convert, ConvertOptions};
use lazyblob::registry::{parse_reference, sha256_digest, Registry};
use rand::{RngCore, SeedableRng};
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;
use common::daemon::DaemonProc;
use common::oci::{compress, convert_ref, lazy_manifest, push_source, Compression, Layer};

struct Scale {
    small_files: usize,
    large_mib: Vec<usize>,
    layers: usize,
    seq_mib: usize,
    random_reads: usize,
    images: usize,
    concurrent: usize,
    vm_mib: usize,
}

fn scale(quick: bool) -> Scale {
    if quick {
        Scale {
            small_files: 2000,
            large_mib: vec![48, 32],
            layers: 3,
            seq_mib: 128,
            random_reads: 50,
            images: 20,
            concurrent: 200,
            vm_mib: 64,
        }
    } else {
        Scale {
            small_files: 12_000,
            large_mib: vec![300, 200, 120],
            layers: 4,
            seq_mib: 1024,
            random_reads: 200,
            images: 100,
            concurrent: 1000,
            vm_mib: 256,
        }
    }
}

/// Repetitions of the throughput measurements (medians are reported: this machine is shared).
const REPS: usize = 3;

fn rng_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill_bytes(&mut v);
    v
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// Flush dirty pages (so earlier writes do not compete with the next measurement) and drop
/// the page cache.
fn drop_caches() {
    nix::unistd::sync();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn registry(hosts: &[&str]) -> Registry {
    let cfg = RegistryConfig {
        hosts: hosts
            .iter()
            .map(|h| HostConfig {
                host: h.to_string(),
                insecure: true,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Registry::new(&cfg, 16).unwrap()
}

/// A gzip tar layer of regular files (mode 0644, owner 0:0), with its media type.
fn gzip_layer(entries: &[(String, Vec<u8>)]) -> (Vec<u8>, &'static str) {
    let mut l = Layer::new();
    for (p, d) in entries {
        l.file(p, 0o644, d);
    }
    compress(&l.tar(), Compression::Gzip)
}

/// CPU seconds of this process's finished children (curl, dd) so far.
fn self_cpu() -> f64 {
    let r = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    tv(r.user_time()) + tv(r.system_time())
}

/// Peak RSS (KiB) and CPU seconds of a process so far.
fn usage(pid: i32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (hwm, (field(11) + field(12)) / 100.0)
}

/// p50 latency of 4 KiB reads of `file` at `offsets` after dropping each page from the
/// mount's page cache (the daemon's cache file keeps it), and of the same reads of `local`,
/// with `idle` before each read; (mount, local) in microseconds.
fn cache_file_hits(file: &Path, offsets: &[u64], want: &[u8], local: &Path, idle: Option<Duration>) -> (f64, f64) {
    let local_len = std::fs::metadata(local).unwrap().len();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for off in offsets {
        let f = std::fs::File::open(file).unwrap();
        nix::fcntl::posix_fadvise(
            &f,
            *off as i64,
            4096,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        drop(f);
        for (path, at, out) in [(file, *off, &mut ours), (local, *off % local_len, &mut theirs)] {
            if let Some(d) = idle {
                std::thread::sleep(d);
            }
            let t = Instant::now();
            let got = read_range(path, at, 4096);
            out.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(got.len(), 4096);
        }
        assert!(read_range(file, *off, 4096)[..] == want[*off as usize..*off as usize + 4096]);
    }
    (percentile(&mut ours, 0.5), percentile(&mut theirs, 0.5))
}

/// Copy an image from the bench registry to registry-mock (same repository and tag);
/// returns its reference there.
async fn copy_image(reg: &Registry, reference: &str, mock: &registry_mock::MockRegistry) -> String {
    let r = lazyblob::registry::parse_reference(reference).unwrap();
    let (raw, _) = reg.fetch_manifest_raw(&r).await.unwrap();
    let m: oci_client::manifest::OciImageManifest = serde_json::from_slice(&raw).unwrap();
    for d in std::iter::once(&m.config).chain(&m.layers) {
        let src = lazyblob::registry::BlobSource {
            repo: r.clone(),
            digest: d.digest.parse().unwrap(),
            size: d.size as u64,
        };
        mock.store().put_blob(reg.fetch_blob(&src).await.unwrap());
    }
    let mt = m
        .media_type
        .clone()
        .unwrap_or_else(|| oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.into());
    mock.store().put_manifest(r.repository(), r.tag(), &mt, raw);
    format!("{}/{}:{}", mock.host(), r.repository(), r.tag().unwrap_or("latest"))
}

/// The daemon (the release binary), fanotify frontend, with `extra` config lines.
fn daemon(dir: &Path, hosts: &[&str], extra: &str) -> DaemonProc {
    DaemonProc::start(dir, hosts, &format!("frontend = \"fanotify\"\n{extra}"))
}

/// `LAZYBLOB_BENCH_PROFILE="perf record -a -g -o /tmp/p.data"`: a profiler around the
/// sequential read, stopped with SIGINT.
fn profile_start() -> Option<std::process::Child> {
    let cmd = std::env::var("LAZYBLOB_BENCH_PROFILE").ok()?;
    let child = Command::new("sh").arg("-c").arg(format!("exec {cmd}")).spawn().ok()?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    Some(child)
}

fn profile_stop(child: Option<std::process::Child>) {
    if let Some(mut c) = child {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = c.wait();
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn read_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Sequential cold reads of a `mib` MiB file in the VM rig (cachefiles frontend) against wget
/// of the same blob in the same guest, `REPS` times each, alternating; medians.
async fn vm_sequential(
    reg: &Registry,
    host: &str,
    mib: usize,
) -> ((String, String, String, String), serde_json::Value) {
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
    std::fs::write(
        p.join("cfg.toml"),
        format!(
            "[daemon]\nstate_dir = \"/var/lib/lazyblob\"\ncache_dir = \"/var/cache/lazyblob\"\nsocket = \"/run/lazyblob.sock\"\nfrontend = \"cachefiles\"\n[[registry.hosts]]\nhost = \"10.0.2.2:{port}\"\ninsecure = true\n"
        ),
    )
    .unwrap();
    let script = format!(
        r#"#!/bin/sh
R=10.0.2.2:{port}; LB=/host/lazyblob; SOCK=/run/lazyblob.sock
now() {{ cut -d' ' -f1 /proc/uptime; }}
mkdir -p /mnt/l
i=0
while [ $i -lt {REPS} ]; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  a=$(now); wget -q -O /var/cache/w.bin http://$R/v2/bench/vmseq/blobs/{blob}; rc=$?; b=$(now)
  echo "RESULT wget $rc $a $b"; rm -f /var/cache/w.bin
  rm -rf /var/lib/lazyblob /var/cache/lazyblob; mkdir -p /var/lib/lazyblob
  $LB daemon --config /cfg.toml 2>>/tmp/daemon.log & DPID=$!
  n=0; while [ ! -S $SOCK ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done
  $LB mount --socket $SOCK $R/bench/vmseq:lazy /mnt/l || cat /tmp/daemon.log
  sync; echo 3 > /proc/sys/vm/drop_caches
  a=$(now); dd if=/mnt/l/data/large.bin of=/dev/null bs=1M 2>/dev/null; rc=$?; b=$(now)
  echo "RESULT lazy $rc $a $b"
  $LB umount --socket $SOCK /mnt/l; kill $DPID; wait $DPID
  i=$((i+1))
done
exit 0
"#
    );
    common::write_guest_script(p, &script);
    let accel = "TCG"; // what the rig runs (nested KVM is not available here)
    let (code, console) = common::run_vm(p, share.path(), &[bin], 900).await;
    assert_eq!(code, 0, "VM run failed:\n{console}");
    let mut runs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for l in console.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let ["RESULT", who, rc, a, b] = f[..] {
            assert_eq!(rc, "0", "{who} failed in the guest:\n{console}");
            let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
            runs.entry(if who == "wget" { "wget" } else { "lazy" })
                .or_default()
                .push(b - a);
        }
    }
    let (mut w, mut l) = (
        runs.remove("wget").unwrap_or_default(),
        runs.remove("lazy").unwrap_or_default(),
    );
    assert!(w.len() == REPS && l.len() == REPS, "missing results:\n{console}");
    eprintln!("VM ({accel}) runs (s): wget {w:.2?}, lazyblob {l:.2?}");
    let (ws, ls) = (percentile(&mut w, 0.5), percentile(&mut l, 0.5));
    let mb = (mib << 20) as f64 / 1e6;
    (
        (
            format!("sequential cold read, {mib} MiB file (cachefiles, VM rig, {accel})"),
            format!("{:.0} MB/s", mb / ls),
            format!("wget in the guest {:.0} MB/s", mb / ws),
            format!("{:.0}% of wget", 100.0 * ws / ls),
        ),
        json!({"bytes": mib << 20, "accel": accel, "lazyblob_mbs": mb / ls, "wget_mbs": mb / ws, "ratio": ws / ls}),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only seq,random,scale,start` runs a subset (start = cold start, warm, conversion)
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|v| v.split(',').map(str::to_string).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark mounts filesystems: run as root"
    );
    let mut s = scale(quick);
    // LAZYBLOB_BENCH_LAYERS: how many layers the start image has (default 4; 1 isolates the
    // on-disk layout of several blob files from the rest of the warm-read cost)
    if let Some(n) = std::env::var("LAZYBLOB_BENCH_LAYERS").ok().and_then(|v| v.parse().ok()) {
        s.layers = n;
    }
    let work = tempfile::Builder::new()
        .prefix("lazyblob-bench.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = work.path();
    let dr = common::DockerRegistry::start(None);
    let host = dr.host.clone();
    let reg = registry(&[&host]);
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let mut json_out = serde_json::Map::new();

    if want("start") {
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
        push_source(&reg, &src, &layers).await;
        let layer_digests: Vec<String> = layers.iter().map(|(l, _)| sha256_digest(l)).collect();
        drop(layers);

        // ---- conversion (timed) against mkfs.erofs on the unpacked tree (below)
        let t = Instant::now();
        let report = convert_ref(&reg, &src, &dst).await;
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

        // ---- 1. cold start: lazyblob mount + startup set, against full pull (download + untar)
        // background fill off here: this daemon also gives the "partially cached" warm row
        drop_caches();
        let d = daemon(&w.join("d1"), &[&host], "[engine]\nfill_after_idle_ms = 0\n");
        let mnt = w.join("d1/mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let t = Instant::now();
        d.mount(&dst, &mnt);
        for (p, off, len) in &startup {
            let got = read_range(&mnt.join(p), *off, *len);
            assert!(
                got[..] == all[p][*off as usize..*off as usize + len],
                "{p}: wrong bytes"
            );
        }
        let lazy_cold = t.elapsed().as_secs_f64();

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
            let out = sh(&format!(
                "tar -xzf {}/l{i}.tgz -C {}/rootfs",
                pull_dir.display(),
                pull_dir.display()
            ));
            assert!(out.status.success());
        }
        sh("sync");
        let full_pull = t.elapsed().as_secs_f64();
        rows.push((
            "cold start (mount + read 6% startup set)".into(),
            format!("{lazy_cold:.2} s"),
            format!("full pull + untar {full_pull:.2} s"),
            format!("{:.1}x faster", full_pull / lazy_cold),
        ));
        json_out.insert("cold_start".into(), json!({"image_bytes": total_bytes, "startup_bytes": startup_bytes, "lazyblob_s": lazy_cold, "full_pull_s": full_pull, "speedup": full_pull / lazy_cold}));

        // ---- 4. warm reads: the startup set again (page cache dropped) against a local EROFS image
        let read_set = |root: &Path| {
            let t = Instant::now();
            for (p, off, len) in &startup {
                let _ = read_range(&root.join(p), *off, *len);
            }
            t.elapsed().as_secs_f64()
        };
        // median of REPS passes, each with the page cache dropped
        let warm = |root: &Path| {
            let mut v: Vec<f64> = (0..REPS)
                .map(|_| {
                    drop_caches();
                    read_set(root)
                })
                .collect();
            percentile(&mut v, 0.5)
        };
        let lazy_partial = warm(&mnt);
        drop(d);
        // a second daemon with background fill: cold start again, then wait until every
        // blob in use is complete (its events off) before the warm passes
        let d = daemon(&w.join("d1f"), &[&host], "[engine]\nfill_after_idle_ms = 200\n");
        let mnt = w.join("d1f/mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        d.mount(&dst, &mnt);
        let _ = read_set(&mnt);
        let t = Instant::now();
        let lazy = lazy_manifest(&reg, &dst).await;
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
            == lazyblob::config::EngineConfig::default().read_ahead_kb
        {
            assert!(t.elapsed().as_secs() < 310, "read-ahead not restored after the fill");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let lazy_warm = warm(&mnt);
        let img = w.join("local.erofs");
        let t = Instant::now();
        assert!(sh(&format!(
            "mkfs.erofs --quiet {} {}/rootfs",
            img.display(),
            pull_dir.display()
        ))
        .status
        .success());
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
        rows.push((
            "warm reads of the startup set, after background fill (page cache dropped)".into(),
            format!("{:.3} s", lazy_warm),
            format!("local EROFS {local_warm:.3} s"),
            format!("{:.2}x local", lazy_warm / local_warm),
        ));
        rows.push((
            "warm reads of the startup set, blobs partly cached (fill off)".into(),
            format!("{:.3} s", lazy_partial),
            format!("local EROFS {local_warm:.3} s"),
            format!("{:.2}x local", lazy_partial / local_warm),
        ));
        json_out.insert(
            "warm".into(),
            json!({"lazyblob_s": lazy_warm, "lazyblob_partial_s": lazy_partial, "local_erofs_s": local_warm,
                "ratio": lazy_warm / local_warm, "ratio_partial": lazy_partial / local_warm,
                "background_fill_s": fill_s}),
        );
        eprintln!("background fill of the rest of the image took {fill_s:.2} s");
        drop(d);

        // ---- 6. conversion throughput
        let conv_mbs = report.layer_bytes as f64 / 1e6 / convert_s;
        let mkfs_mbs = total_bytes as f64 / 1e6 / mkfs_s;
        rows.push((
            "conversion (MB/s of file data)".into(),
            format!("{conv_mbs:.0} MB/s"),
            format!("mkfs.erofs {mkfs_mbs:.0} MB/s"),
            format!("{:.2}x", conv_mbs / mkfs_mbs),
        ));
        json_out.insert("conversion".into(), json!({"lazyblob_mbs": conv_mbs, "mkfs_erofs_mbs": mkfs_mbs, "ratio": conv_mbs / mkfs_mbs, "note": "lazyblob pulls from the registry and verifies and hashes every chunk; mkfs.erofs reads a local tree"}));
        eprintln!("\nimage: {} files, {:.0} MB in {} layers; startup set {:.0} MB ({:.1}%); all against docker-registry on loopback\n",
        all.len(), total_bytes as f64 / 1e6, s.layers, startup_bytes as f64 / 1e6, 100.0 * startup_bytes as f64 / total_bytes as f64);
    }

    // ---- 2. sequential cold read of one large file, against curl of the same blob
    let seq_data = rng_bytes(42, s.seq_mib << 20);
    let seq_src = format!("{host}/bench/seq:src");
    let seq_dst = format!("{host}/bench/seq:lazy");
    let small_dst = format!("{host}/bench/seq:lazy64k");
    if want("seq") || want("random") {
        eprintln!("building the sequential-read image ({} MiB)...", s.seq_mib);
        push_source(
            &reg,
            &seq_src,
            &[gzip_layer(&[("data/large.bin".into(), seq_data.clone())])],
        )
        .await;
        convert_ref(&reg, &seq_src, &seq_dst).await;
        let opts64 = ConvertOptions {
            chunk_size: 64 * 1024,
            ..Default::default()
        };
        convert(&reg, &seq_src.parse().unwrap(), &small_dst.parse().unwrap(), &opts64)
            .await
            .unwrap();
    }
    let blob = if want("seq") || want("random") {
        lazy_manifest(&reg, &seq_dst).await.data[0].digest.to_string()
    } else {
        String::new()
    };
    if want("seq") {
        // curl and each lazyblob variant alternate, `REPS` times each, all cold every time;
        // medians reported, and the CPU seconds each party spent per run
        let all_variants = [
            ("1 MiB chunks", &seq_dst, ""),
            ("64 KiB chunks", &small_dst, "[engine]\nchunk_size = 65536\n"),
        ];
        // LAZYBLOB_BENCH_SEQ_VARIANT=0: only the first (profiling)
        let pick = std::env::var("LAZYBLOB_BENCH_SEQ_VARIANT")
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        let variants: Vec<_> = all_variants
            .iter()
            .enumerate()
            .filter(|(i, _)| pick.is_none_or(|p| p == *i))
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
            assert!(sh(&format!(
                "curl -sf -o {}/curl.bin http://{host}/v2/bench/seq/blobs/{blob}",
                w.display()
            ))
            .status
            .success());
            curl_runs.push(t.elapsed().as_secs_f64());
            curl_cpu[0] += usage(dr.pid()).1 - reg0;
            curl_cpu[1] += self_cpu() - me0;
            let _ = std::fs::remove_file(w.join("curl.bin"));
            for (v, (_, image, extra)) in variants.iter().enumerate() {
                let dir = w.join(format!("d2-{rep}-{v}"));
                let d = daemon(&dir, &[&host], extra);
                let mnt2 = dir.join("mnt");
                std::fs::create_dir_all(&mnt2).unwrap();
                d.mount(image, &mnt2);
                drop_caches();
                let profiler = profile_start();
                let (reg0, me0, d0) = (usage(dr.pid()).1, self_cpu(), usage(d.pid()).1);
                let t = Instant::now();
                let out = sh(&format!(
                    "dd if={}/data/large.bin of=/dev/null bs=1M status=none",
                    mnt2.display()
                ));
                assert!(out.status.success());
                lazy_runs[v].push(t.elapsed().as_secs_f64());
                lazy_cpu[v][0] += usage(dr.pid()).1 - reg0;
                lazy_cpu[v][1] += self_cpu() - me0;
                lazy_cpu[v][2] += usage(d.pid()).1 - d0;
                if rep == 0 {
                    let st = d.status().await;
                    eprintln!(
                        "{}: {} range requests, {} bytes from the registry",
                        variants[v].0, st.registry.requests, st.registry.bytes
                    );
                }
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
            rows.push((
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
        seq_json.insert(
            "curl_cpu_s_per_run".into(),
            json!({"registry": curl_cpu[0] / n, "curl": curl_cpu[1] / n}),
        );
        json_out.insert("sequential".into(), serde_json::Value::Object(seq_json));
    }

    // ---- 2b. sequential cold read through the cachefiles frontend: the daemon in the VM rig
    // (this kernel has no cachefiles on-demand mode), docker-registry on the host; wget in the
    // same guest is the baseline
    if want("vm") {
        let (row, j) = vm_sequential(&reg, &host, s.vm_mib).await;
        rows.push(row);
        json_out.insert("sequential_cachefiles_vm".into(), j);
    }

    // ---- 3. random 4 KiB cold reads, against raw HTTP range GETs of the same size; with the
    // default 1 MiB chunks and with an image converted with 64 KiB chunks
    if want("random") {
        let chunks = (s.seq_mib as u64) - 1;
        let mut r = rand::rngs::SmallRng::seed_from_u64(7);
        let offsets: Vec<u64> = (0..s.random_reads)
            .map(|i| ((i as u64 * 7919) % chunks) * (1 << 20) + (r.next_u64() % 250) * 4096)
            .collect();
        // the registry's storage is read once first: both sides then measure the network path
        // and the registry's per-request work, not its disk
        assert!(sh(&format!(
            "curl -sf -o /dev/null http://{host}/v2/bench/seq/blobs/{blob}"
        ))
        .status
        .success());
        // the same images on registry-mock, which answers from memory at once: the difference
        // to the raw GET there is what lazyblob itself adds, without docker-registry's jitter
        let mock = registry_mock::MockRegistry::start(Default::default()).await.unwrap();
        let mhost = mock.host();
        let mock_seq = copy_image(&reg, &seq_dst, &mock).await;
        let mock_small = copy_image(&reg, &small_dst, &mock).await;
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
        for (k, (name, reg_host, image, unit, extra)) in [
            ("1 MiB chunks", &host, &seq_dst, 1 << 20, one_mib),
            ("64 KiB chunks", &host, &small_dst, 64 << 10, small),
            ("1 MiB chunks, registry-mock", &mhost, &mock_seq, 1 << 20, one_mib),
            ("64 KiB chunks, registry-mock", &mhost, &mock_small, 64 << 10, small),
        ]
        .into_iter()
        .enumerate()
        {
            let dir = w.join(format!("d3-{k}"));
            let d = daemon(&dir, &[reg_host], extra);
            let m = dir.join("mnt");
            std::fs::create_dir_all(&m).unwrap();
            d.mount(image, &m);
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
            // the same pages again, dropped from the mount's page cache but cached and verified
            // in the daemon's cache file, whose blob is still marked (fill is off): each read is
            // one fanotify event answered at once, the frontend's fixed cost; back to back and
            // after 5 ms idle (as the cold reads above), against a local file in the page cache
            let file = m.join("data/large.bin");
            let hot = cache_file_hits(&file, &offsets, &seq_data, &local, None);
            let idle = cache_file_hits(&file, &offsets, &seq_data, &local, Some(Duration::from_millis(5)));
            let (rp50, rp99) = (percentile(&mut raw_lat.clone(), 0.5), percentile(&mut raw_lat, 0.99));
            let (lp50, lp99) = (percentile(&mut lazy_lat.clone(), 0.5), percentile(&mut lazy_lat, 0.99));
            let added_p50 = percentile(&mut added, 0.5);
            let over_unit_p50 = percentile(&mut added_over_unit, 0.5);
            rows.push((
                format!("random 4 KiB cold reads p50 / p99, {name}"),
                format!("{lp50:.0} / {lp99:.0} us"),
                format!("range GET {rp50:.0} / {rp99:.0} us"),
                format!("{added_p50:+.0} us; {over_unit_p50:+.0} us over a GET of the chunk"),
            ));
            if k == 0 {
                rows.push((
                    "4 KiB read served from the cache file, blob still marked (fanotify round trip) p50, back to back / after 5 ms idle".into(),
                    format!("{:.0} / {:.0} us", hot.0, idle.0),
                    format!("local file {:.0} / {:.0} us", hot.1, idle.1),
                    format!("{:+.0} / {:+.0} us", hot.0 - hot.1, idle.0 - idle.1),
                ));
            }
            json_out.insert(format!("random_4k_{}", name.replace([' ', ','], "_")), json!({"lazyblob_p50_us": lp50, "lazyblob_p99_us": lp99, "raw_get_p50_us": rp50, "raw_get_p99_us": rp99, "added_p50_us": added_p50, "added_over_chunk_get_p50_us": over_unit_p50, "cache_file_hit_p50_us": [hot.0, idle.0], "local_page_cache_p50_us": [hot.1, idle.1],
            "note": "a cold 4 KiB read fetches and verifies its whole chunk; each read is paired with a raw GET of the same range just before it"}));
        }
    }

    // ---- 5. scale: many registered images and concurrent cold reads, registry answering at once
    if want("scale") {
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
        rows.push((
            format!(
                "scale: {} images mounted, {} concurrent cold reads",
                s.images, s.concurrent
            ),
            format!("RSS {:.1} MiB, CPU {cpu_s:.2} s", rss_kib as f64 / 1024.0),
            format!("burst {burst:.2} s"),
            format!("{rps:.0} cold chunk reads/s"),
        ));
        json_out.insert("scale".into(), json!({"images": s.images, "concurrent": s.concurrent, "peak_rss_kib": rss_kib, "cpu_s": cpu_s, "burst_s": burst, "cold_chunk_reads_per_s": rps}));
        drop(d2);
        drop(d);
    }

    // ---- report
    println!("\n| benchmark | lazyblob | baseline | ratio |\n| --- | --- | --- | --- |");
    for (a, b, c, d) in &rows {
        println!("| {a} | {b} | {c} | {d} |");
    }
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let path = out_dir.join("lazyblob-bench.json");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(
        serde_json::to_string_pretty(&serde_json::Value::Object(json_out))
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    println!("JSON: {}", path.display());
}
