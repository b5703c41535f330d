//! nydusd side by side with lazyblob on the start bench's tree: Nydus's daemon in FUSE mode,
//! registry backend (the same docker-registry), 1 MiB chunks, no compression, its data check
//! off (RAFS v6) and on (RAFS v5: nydusd 2.2 refuses the check on v6). Runs where `nydusd` and `nydus-image` are installed
//! (`scripts/nydus.sh`; `LAZYBLOB_BENCH_NYDUS_DIR` names their folder); elsewhere the rows
//! say so. What both daemons are asked is one [`Workload`]: the startup set cold, the same
//! again with the page cache dropped (data local), random 4 KiB reads of a file no one read,
//! a sequential read of another.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazyblob::registry::{parse_reference, Registry};
use serde_json::json;

use crate::util::*;

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

/// What each daemon is asked, on the start bench's tree.
pub struct Workload<'a> {
    /// Every file of the tree and its bytes.
    pub all: &'a BTreeMap<String, Vec<u8>>,
    /// The startup set: (path, offset, length).
    pub startup: &'a [(String, u64, usize)],
    /// A file for random 4 KiB reads and one for a sequential read; neither is in the set.
    pub random_file: &'a str,
    pub seq_file: &'a str,
}

/// One daemon's answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measured {
    /// Startup set read, seconds from the mount (or the daemon's start) on.
    pub cold_s: f64,
    /// Bytes fetched for it.
    pub cold_bytes: u64,
    /// The set again, page cache dropped, data local: median seconds.
    pub reread_s: f64,
    /// Random cold 4 KiB reads: p50 and p99 ms, and bytes fetched per read.
    pub random_p50_ms: f64,
    pub random_p99_ms: f64,
    pub random_bytes_per_read: f64,
    /// Sequential cold read, MB/s.
    pub seq_mbs: f64,
    /// Daemon peak RSS, MiB.
    pub rss_mib: f64,
}

/// Random reads per daemon.
pub const RANDOM_READS: usize = 200;

/// Read the startup set and check it; seconds.
pub fn read_startup(root: &Path, w: &Workload) -> f64 {
    let t = Instant::now();
    for (p, off, len) in w.startup {
        let got = read_range(&root.join(p), *off, *len);
        assert!(
            got[..] == w.all[p][*off as usize..*off as usize + len],
            "{p}: wrong bytes"
        );
    }
    t.elapsed().as_secs_f64()
}

/// Read the startup set again, not checked (the cold pass checked it); seconds.
pub fn read_again(root: &Path, w: &Workload) -> f64 {
    let t = Instant::now();
    for (p, off, len) in w.startup {
        let _ = read_range(&root.join(p), *off, *len);
    }
    t.elapsed().as_secs_f64()
}

/// The re-read, page cache dropped before each of `REPS` passes: median seconds.
pub fn reread(root: &Path, w: &Workload) -> f64 {
    let mut v: Vec<f64> = (0..REPS)
        .map(|_| {
            drop_caches();
            read_again(root, w)
        })
        .collect();
    percentile(&mut v, 0.5)
}

/// Random cold 4 KiB reads (one offset sequence for every daemon), checked: p50, p99 in ms.
pub fn random_reads(root: &Path, w: &Workload) -> (f64, f64) {
    drop_caches();
    let data = &w.all[w.random_file];
    let pages = (data.len() / 4096) as u64;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut ms: Vec<f64> = (0..RANDOM_READS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % pages) * 4096;
            let t = Instant::now();
            let got = read_range(&root.join(w.random_file), off, 4096);
            let e = t.elapsed().as_secs_f64() * 1e3;
            assert!(
                got[..] == data[off as usize..off as usize + 4096],
                "random read at {off}: wrong bytes"
            );
            e
        })
        .collect();
    (percentile(&mut ms, 0.5), percentile(&mut ms, 0.99))
}

/// A sequential cold read of the whole file, checked: MB/s.
pub fn sequential(root: &Path, w: &Workload) -> f64 {
    use std::io::Read;
    drop_caches();
    let data = &w.all[w.seq_file];
    let t = Instant::now();
    let mut f = std::fs::File::open(root.join(w.seq_file)).unwrap();
    let mut got = Vec::with_capacity(data.len());
    f.read_to_end(&mut got).unwrap();
    let s = t.elapsed().as_secs_f64();
    assert!(got == *data, "{}: wrong bytes", w.seq_file);
    data.len() as f64 / 1e6 / s
}

/// A RAFS image of `rootfs` (format `version`, 1 MiB chunks, no compression) with its data
/// blob pushed to `host`'s `bench/nydus` repository: the bootstrap's path.
pub async fn build(t: &Tools, rootfs: &Path, dir: &Path, reg: &Registry, host: &str, version: &str) -> PathBuf {
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let bootstrap = dir.join("bootstrap");
    let out = Command::new(&t.image)
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
        .arg(rootfs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nydus-image: {}",
        String::from_utf8_lossy(&out.stderr)
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

/// nydusd's answers to `w`, its data check `validate` on or off.
pub fn measure(t: &Tools, bootstrap: &Path, host: &str, dir: &Path, w: &Workload, validate: bool) -> Measured {
    drop_caches();
    let t0 = Instant::now();
    let d = Nydusd::start(t, bootstrap, host, dir, validate);
    let cold = t0.elapsed().as_secs_f64() + read_startup(d.mnt(), w);
    let cold_bytes = d.cached_bytes();
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
    }
}

/// The side-by-side rows: lazyblob's answers against nydusd's, check off and on.
pub fn report(r: &mut Report, lazy: &Measured, off: &Measured, on: &Measured) {
    type Show = fn(&Measured) -> String;
    type Value = fn(&Measured) -> f64;
    let rows: [(&str, Show, Value); 7] = [
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
            "random_p99_ms": m.random_p99_ms, "random_bytes_per_read": m.random_bytes_per_read, "seq_mbs": m.seq_mbs, "rss_mib": m.rss_mib})
    };
    r.json.insert(
        "vs_nydusd".into(),
        json!({"lazyblob": j(lazy), "nydusd_check_off": j(off), "nydusd_check_on": j(on)}),
    );
}
