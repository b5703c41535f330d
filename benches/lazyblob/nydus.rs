//! nydusd side by side with lazyblob on the start bench's tree: Nydus's daemon in FUSE mode,
//! registry backend (the same docker-registry), 1 MiB chunks, no compression, its data check
//! off (RAFS v6) and on (RAFS v5: nydusd 2.2 refuses the check on v6). Runs where `nydusd`
//! and `nydus-image` are installed (`scripts/nydus.sh`; `LAZYBLOB_BENCH_NYDUS_DIR` names
//! their folder); elsewhere the rows say so. Both daemons are asked the same
//! [`Workload`](crate::workload::Workload).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazyblob::registry::{parse_reference, Registry};
use serde_json::json;

use crate::util::*;
use crate::workload::{at_rest, random_reads, read_startup, reread, sequential, Measured, Workload, RANDOM_READS};

/// The two Nydus programs.
pub struct Tools {
    nydusd: PathBuf,
    image: PathBuf,
}

/// `nydusd` and `nydus-image`, from `LAZYBLOB_BENCH_NYDUS_DIR`, `/opt/nydus/bin` or `PATH`.
pub fn tools() -> Option<Tools> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LAZYBLOB_BENCH_NYDUS_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push("/opt/nydus/bin".into());
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    Some(Tools {
        nydusd: find("nydusd")?,
        image: find("nydus-image")?,
    })
}

/// A RAFS image of `rootfs` (format `version`, 1 MiB chunks, no compression) with its data
/// blob pushed to `host`'s `bench/nydus` repository: the bootstrap's path.
pub async fn build(t: &Tools, rootfs: &Path, dir: &Path, reg: &Registry, host: &str, version: &str) -> PathBuf {
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let bootstrap = dir.join("bootstrap");
    crate::common::procs::run_ok(
        Command::new(&t.image)
            .args([
                "create",
                "--fs-version",
                version,
                "--chunk-size",
                "0x100000",
                "--compressor",
                "none",
            ])
            .args(["--whiteout-spec", "none", "--log-level", "warn", "--blob-dir"])
            .arg(&blobs)
            .arg("--bootstrap")
            .arg(&bootstrap)
            .arg(rootfs),
    );
    let repo = parse_reference(&format!("{host}/bench/nydus:x")).unwrap();
    for e in std::fs::read_dir(&blobs).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.len() == 64 && name.bytes().all(|c| c.is_ascii_hexdigit()) {
            let data = Bytes::from(std::fs::read(&p).unwrap());
            let pushed = reg.push_blob(&repo, data).await.unwrap();
            assert_eq!(pushed, format!("sha256:{name}"), "nydus names a blob by its sha256");
        }
    }
    bootstrap
}

/// A running nydusd with its FUSE mount; unmounted and stopped on drop.
pub struct Nydusd {
    child: Child,
    mnt: PathBuf,
    cache: PathBuf,
}

impl Nydusd {
    /// Start nydusd on `bootstrap` at `dir/mnt` (fresh cache) and wait for its mount.
    pub fn start(t: &Tools, bootstrap: &Path, host: &str, dir: &Path, validate: bool) -> Nydusd {
        let (mnt, cache) = (dir.join("mnt"), dir.join("cache"));
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        let config = json!({
            "device": {
                "backend": {"type": "registry", "config": {"scheme": "http", "host": host, "repo": "bench/nydus",
                    "timeout": 30, "connect_timeout": 10, "retry_limit": 2}},
                "cache": {"type": "blobcache", "config": {"work_dir": cache}}
            },
            "mode": "direct", "digest_validate": validate, "iostats_files": false, "enable_xattr": false,
            "fs_prefetch": {"enable": false}
        });
        let cfg = dir.join("config.json");
        std::fs::write(&cfg, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("nydusd.log")).unwrap();
        let child = Command::new(&t.nydusd)
            .arg("--config")
            .arg(&cfg)
            .arg("--mountpoint")
            .arg(&mnt)
            .arg("--bootstrap")
            .arg(bootstrap)
            // 0: keep the limit it was given (raising it to its default 1,000,000 fails where the
            // hard limit is lower)
            .args(["--log-level", "warn", "--rlimit-nofile", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Nydusd { child, mnt, cache };
        let parent = std::fs::metadata(dir).unwrap().dev();
        let t0 = Instant::now();
        while std::fs::metadata(&d.mnt).map(|m| m.dev()).unwrap_or(parent) == parent {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "nydusd did not mount:\n{}",
                std::fs::read_to_string(dir.join("nydusd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        d
    }

    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// Bytes in its cache (allocated blocks: the blob cache is a sparse file per blob).
    pub fn cached_bytes(&self) -> u64 {
        std::fs::read_dir(&self.cache)
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    pub fn rss_mib(&self) -> f64 {
        usage(self.child.id() as i32).0 as f64 / 1024.0
    }
}

impl Drop for Nydusd {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nydusd's answers to `w`, its data check `validate` on or off. Its cold bytes count the
/// bootstrap, which the bench hands it as a file but a node fetches from the registry before
/// mounting (lazyblob's count has its metadata blob).
pub fn measure(t: &Tools, bootstrap: &Path, host: &str, dir: &Path, w: &Workload, validate: bool) -> Measured {
    drop_caches();
    let t0 = Instant::now();
    let d = Nydusd::start(t, bootstrap, host, dir, validate);
    let cold = t0.elapsed().as_secs_f64() + read_startup(d.mnt(), w);
    let bootstrap_bytes = std::fs::metadata(bootstrap).unwrap().len();
    eprintln!("nydusd: bootstrap {bootstrap_bytes} bytes, counted with the cold start's");
    let cold_bytes = d.cached_bytes() + bootstrap_bytes;
    let reread_s = reread(d.mnt(), w);
    let before = d.cached_bytes();
    let (p50, p99) = random_reads(d.mnt(), w);
    let random_bytes = d.cached_bytes() - before;
    let seq_mbs = sequential(d.mnt(), w);
    Measured {
        cold_s: cold,
        cold_bytes,
        reread_s,
        random_p50_ms: p50,
        random_p99_ms: p99,
        random_bytes_per_read: random_bytes as f64 / RANDOM_READS as f64,
        seq_mbs,
        rss_mib: d.rss_mib(),
        rss_split_mib: at_rest(d.child.id() as i32),
    }
}

/// The side-by-side rows: lazyblob's answers against nydusd's, check off and on.
pub fn report(r: &mut Report, lazy: &Measured, off: &Measured, on: &Measured) {
    type Show = fn(&Measured) -> String;
    type Value = fn(&Measured) -> f64;
    let rows: [(&str, Show, Value); 8] = [
        (
            "cold start, startup set",
            |m| format!("{:.2} s", m.cold_s),
            |m| m.cold_s,
        ),
        (
            "bytes fetched for the set",
            |m| format!("{:.1} MB", m.cold_bytes as f64 / 1e6),
            |m| m.cold_bytes as f64,
        ),
        (
            "re-read, data local",
            |m| format!("{:.3} s", m.reread_s),
            |m| m.reread_s,
        ),
        (
            "random cold 4 KiB p50 / p99 (ratio: p50)",
            |m| format!("{:.2} / {:.2} ms", m.random_p50_ms, m.random_p99_ms),
            |m| m.random_p50_ms,
        ),
        (
            "bytes fetched per random read",
            |m| format!("{:.1} KiB", m.random_bytes_per_read / 1024.0),
            |m| m.random_bytes_per_read,
        ),
        (
            "sequential cold read",
            |m| format!("{:.0} MB/s", m.seq_mbs),
            |m| m.seq_mbs,
        ),
        ("daemon peak RSS", |m| format!("{:.1} MiB", m.rss_mib), |m| m.rss_mib),
        (
            "daemon RSS at rest, 3.5 s after (anonymous + file-backed)",
            |m| {
                let (anon, file) = m.rss_split_mib;
                format!("{:.1} MiB ({anon:.1} + {file:.1})", anon + file)
            },
            |m| m.rss_split_mib.0 + m.rss_split_mib.1,
        ),
    ];
    for (what, show, value) in rows {
        r.rows.push((
            format!("vs nydusd: {what}"),
            show(lazy),
            format!("nydusd check off {} / on (v5) {}", show(off), show(on)),
            format!(
                "{:.2}x / {:.2}x nydusd's",
                value(lazy) / value(off),
                value(lazy) / value(on)
            ),
        ));
    }
    let j = |m: &Measured| {
        json!({"cold_s": m.cold_s, "cold_bytes": m.cold_bytes, "reread_s": m.reread_s, "random_p50_ms": m.random_p50_ms,
            "random_p99_ms": m.random_p99_ms, "random_bytes_per_read": m.random_bytes_per_read, "seq_mbs": m.seq_mbs, "rss_mib": m.rss_mib,
            "rest_rss_anon_mib": m.rss_split_mib.0, "rest_rss_file_mib": m.rss_split_mib.1})
    };
    r.json.insert(
        "vs_nydusd".into(),
        json!({"lazyblob": j(lazy), "nydusd_check_off": j(off), "nydusd_check_on": j(on)}),
    );
}
