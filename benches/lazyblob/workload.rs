//! What the start bench asks of a daemon's mount, lazyblob's or nydusd's alike: the startup
//! set cold, the same again with the page cache dropped (data local), random 4 KiB reads of a
//! file no one read, a sequential read of another; every cold read checked against the tree.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use crate::util::*;

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
    /// Its RSS at rest ([`REST`] after the workload), anonymous and file-backed (the binary's
    /// text, mapped files), MiB.
    pub rss_split_mib: (f64, f64),
}

/// How long a daemon rests after the workload before its RSS at rest is read: longer than
/// lazyblob keeps idle buffers (`recycle::IDLE_TTL`, checked every half of it).
pub const REST: std::time::Duration = std::time::Duration::from_millis(3_500);

/// The RSS of daemon `pid` after [`REST`]: anonymous and file-backed, MiB.
pub fn at_rest(pid: i32) -> (f64, f64) {
    std::thread::sleep(REST);
    crate::util::rss_split(pid)
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
