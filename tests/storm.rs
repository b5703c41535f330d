//! A storm of cold readers against a registry that stalls, on this machine's kernel
//! (fanotify frontend): 10,000 threads read 4 KiB pages of a lazily mounted file at once,
//! with read-ahead off (`POSIX_FADV_RANDOM`), 128 pages spread over 10 chunks, so 128 kernel
//! requests are pending at a time (readers of one page queue behind each other in the page
//! cache). The daemon serves at most `max_reads_in_flight` (32 here) at a time; the rest wait
//! in the kernel's queue. The daemon's open fds and memory stay bounded, and every reader
//! ends: with the right bytes when the stall ends before the deadline, with `EIO` when it
//! does not. Never with wrong bytes, never hanging.
//!
//! Why not 10,000 distinct pages: the kernel keeps one wait queue per fanotify group and
//! wakes every waiting reader on each response, so n pending readers make each response cost
//! O(n) (about 40 ms at n = 10,000 on this machine, whatever the daemon does).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::DaemonProc;
use common::*;
use lazyblob::image::format::MEDIA_TYPE_DATA;
use registry_mock::{Fault, FaultRule, HostileImage, MockConfig, MockRegistry};

const READERS: usize = 10_000;
/// Distinct pages read, `STRIDE` pages apart.
const PAGES: usize = 128;
const STRIDE: usize = 20;
const SLOTS: usize = 32;
const MIB: u64 = 1 << 20;

/// What one reader got.
#[derive(Debug, PartialEq)]
enum Outcome {
    Right,
    Wrong,
    Eio,
    Other(String),
}

/// `READERS` threads each read the 4 KiB page `(i % PAGES) * STRIDE` of `path`, all at
/// once, without read-ahead; returns their outcomes.
fn storm(path: &std::path::Path, expected: &Arc<Vec<u8>>) -> Vec<Outcome> {
    let file = Arc::new(std::fs::File::open(path).unwrap());
    nix::fcntl::posix_fadvise(&*file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM).unwrap();
    let threads: Vec<_> = (0..READERS)
        .map(|i| {
            let (file, expected) = (Arc::clone(&file), Arc::clone(expected));
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let at = ((i % PAGES) * STRIDE) as u64 * 4096;
                    let mut buf = vec![0u8; 4096];
                    match file.read_exact_at(&mut buf, at) {
                        Ok(()) if buf[..] == expected[at as usize..at as usize + 4096] => Outcome::Right,
                        Ok(()) => Outcome::Wrong,
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => Outcome::Eio,
                        Err(e) => Outcome::Other(e.to_string()),
                    }
                })
                .expect("spawning a reader thread")
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Samples the open fds of `pid` until dropped; `max()` is the most seen.
struct FdSampler {
    max: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FdSampler {
    fn start(pid: i32) -> FdSampler {
        let (max, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (m, s) = (Arc::clone(&max), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                let n = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
                m.fetch_max(n, Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        FdSampler {
            max,
            stop,
            thread: Some(thread),
        }
    }

    fn max(&self) -> usize {
        self.max.load(Relaxed)
    }
}

impl Drop for FdSampler {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn count(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in outcomes {
        let k = match o {
            Outcome::Other(e) => format!("other: {e}"),
            o => format!("{o:?}"),
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// 10,000 cold readers while the registry stalls: first a stall that never ends (every
/// reader gets EIO, in waves of admitted requests), then, on the same still cold file, a
/// stall shorter than the fetch deadline (every reader gets its bytes). The daemon's fds stay
/// within the admitted requests plus one batch, its memory grows by less than 128 MiB, and no
/// chunk is fetched twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cold_readers_against_a_stalling_registry() {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let data = Arc::new(bytes(77, PAGES * STRIDE * 4096));
    let files: BTreeMap<String, Vec<u8>> = [("a.bin".to_string(), data.to_vec())].into();
    let mut cfg = insecure_config(&[&host]);
    (cfg.request_timeout, cfg.deadline) = (Duration::from_secs(60), Duration::from_secs(120));
    push_image(&client(&cfg), &host, "storm/app:v1", &build_files(&files, 1)).await;
    let blob = HostileImage::from_store(mock.store(), "storm/app", "v1").layer_digest_of(MEDIA_TYPE_DATA, 0);
    let work = tempfile::tempdir().unwrap();
    // only what readers ask for is fetched (no read-ahead, no background fill), one attempt
    // of at most 1.5 s per fetch
    let d = DaemonProc::start_with(
        &work.path().join("d"),
        &[&host],
        &format!(
            "frontend = \"fanotify\"\n[engine]\nread_ahead_max = 0\nfill_after_idle_ms = 0\nmax_reads_in_flight = {SLOTS}\nfailed_fetch_hold_ms = 5000"
        ),
        "deadline_ms = 1500\nrequest_timeout_ms = 1500\nmax_attempts = 1\nmin_rate_kib_s = 0",
    );
    let mnt = work.path().join("mnt");
    d.mount(&format!("{host}/storm/app:v1"), &mnt);
    let path = mnt.join("a.bin");
    let rss_before = common::procs::vm_kib(d.pid(), "VmRSS:");
    let fds_before = std::fs::read_dir(format!("/proc/{}/fd", d.pid())).unwrap().count();

    // a stall that never ends: every reader gets EIO, in waves of at most SLOTS admitted
    // requests (failures are held for 5 s, so the requests queued behind one fail at once)
    mock.set_faults(vec![
        FaultRule::always(Fault::Latency(Duration::from_secs(3600))).for_blob(&blob)
    ]);
    let fds = FdSampler::start(d.pid());
    let t0 = Instant::now();
    let got = storm(&path, &data);
    let (endless, endless_fds) = (t0.elapsed(), fds.max());
    drop(fds);
    assert_eq!(
        count(&got),
        BTreeMap::from([("Eio".to_string(), READERS)]),
        "an endless stall: every reader must end with EIO"
    );
    assert!(
        endless < Duration::from_secs(60),
        "readers of an endless stall took {endless:?}"
    );

    // past the hold of those failures, a stall shorter than the deadline: every reader gets
    // its bytes, and no chunk is fetched twice
    std::thread::sleep(Duration::from_millis(5100));
    mock.reset_counters();
    mock.set_faults(vec![
        FaultRule::always(Fault::Latency(Duration::from_millis(300))).for_blob(&blob)
    ]);
    let fds = FdSampler::start(d.pid());
    let t0 = Instant::now();
    let got = storm(&path, &data);
    let (short, short_fds) = (t0.elapsed(), fds.max());
    drop(fds);
    mock.clear_faults();
    assert_eq!(
        count(&got),
        BTreeMap::from([("Right".to_string(), READERS)]),
        "a stall shorter than the deadline\n{}",
        d.log()
    );
    let (requests, fetched) = (mock.counters().blob_requests(&blob), mock.counters().blob_bytes(&blob));
    assert!(
        fetched <= data.len() as u64 + MIB,
        "{READERS} readers of a {} byte file fetched {fetched} bytes in {requests} requests",
        data.len()
    );

    // bounded: the admitted requests' fds (the event's and its writer's), at most one batch
    // read from the kernel (about a slot's worth: 10 events), the registry connections (8);
    // unbounded, the PAGES pending events hold 2 each
    let fd_bound = fds_before + 2 * SLOTS + 48;
    for (phase, n) in [("endless stall", endless_fds), ("short stall", short_fds)] {
        assert!(
            n <= fd_bound,
            "{phase}: the daemon held {n} fds for {READERS} readers (bound {fd_bound})"
        );
    }
    let hwm = common::procs::vm_kib(d.pid(), "VmHWM:");
    assert!(
        hwm < rss_before + 128 * 1024,
        "peak RSS {hwm} KiB, {rss_before} KiB before the storm"
    );
    eprintln!(
        "storm: {fds_before} fds before, endless stall {endless:?} (max {endless_fds} fds), short stall {short:?} (max {short_fds} fds, {requests} range requests, {fetched} bytes), RSS {rss_before} -> peak {hwm} KiB"
    );
    assert!(std::fs::read(&path).unwrap() == *data, "the file after the storms");
    d.umount(&mnt);
}
