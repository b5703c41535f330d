//! Restarts, upgrades and stops cost readers a pause, never an error and never wrong bytes
//! (fanotify frontend, this machine's kernel, the real daemon, registry-mock answering every
//! request late so that fetches are in flight when the daemon goes): 8 readers stream whole
//! files while the daemon is `kill -9`ed and restarted three times, or upgraded three times
//! (a new daemon started while the old one runs), with read-ahead and background fill on,
//! the 8 blobs spread over 4 fanotify groups that each new daemon takes over in order;
//! and a reader that holds a file open across a `SIGTERM` waits for the next daemon instead
//! of failing. (A daemon that stays down longer than `restart_hold_ms` gives `EIO`, never
//! zeros: `tests/fanotify.rs`.)

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::DaemonProc;
use common::*;
use registry_mock::{Fault, FaultRule, MockConfig, MockRegistry};

/// How the daemon goes away under the readers.
#[derive(Debug, Clone, Copy)]
enum Disruption {
    Kill9,
    Upgrade,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_fail_across_three_kill9_restarts() {
    readers_across(Disruption::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_fail_across_three_upgrades() {
    readers_across(Disruption::Upgrade).await;
}

/// 8 files of 12 MiB, each in its own data blob, on a registry that answers after 100 ms.
async fn slow_image(mock: &MockRegistry) -> (BTreeMap<String, Vec<u8>>, String) {
    let files: BTreeMap<String, Vec<u8>> = (0..8)
        .map(|k| (format!("data/f{k}.bin"), bytes(300 + k, 12 << 20)))
        .collect();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    push_image(&reg, &host, "restart/app:v1", &build_files(&files, 8)).await;
    mock.set_faults(vec![FaultRule::always(Fault::Latency(Duration::from_millis(100)))]);
    (files, format!("{host}/restart/app:v1"))
}

fn daemon(dir: &Path, host: &str) -> DaemonProc {
    // small runs, two at a time: the image takes seconds to arrive, so fetches are in flight
    // whenever the daemon goes
    DaemonProc::start(
        dir,
        &[host],
        "frontend = \"fanotify\"\n[engine]\nmerge_max = 1048576\nmax_concurrent_fetches = 2\nfill_after_idle_ms = 300\nfanotify_groups = 4",
    )
}

/// A reader of a whole file in 256 KiB reads: the sha256 of what it read, the longest
/// single read, or the first error.
fn stream(path: PathBuf) -> std::thread::JoinHandle<Result<(String, Duration), String>> {
    std::thread::spawn(move || {
        use sha2::{Digest, Sha256};
        let mut f = std::fs::File::open(&path).map_err(|e| format!("open: {e}"))?;
        let (mut h, mut buf, mut longest) = (Sha256::new(), vec![0u8; 256 << 10], Duration::ZERO);
        loop {
            let t = Instant::now();
            let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
            longest = longest.max(t.elapsed());
            if n == 0 {
                return Ok((hex::encode(h.finalize()), longest));
            }
            h.update(&buf[..n]);
            // a steady reader, not one that is done before the daemon goes
            std::thread::sleep(Duration::from_millis(4));
        }
    })
}

/// The slow image mounted by a daemon: the registry, the files, the work directory (kept
/// alive), the daemon and the mount point.
async fn mounted() -> (
    MockRegistry,
    BTreeMap<String, Vec<u8>>,
    tempfile::TempDir,
    DaemonProc,
    PathBuf,
) {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let (files, image) = slow_image(&mock).await;
    let work = tempfile::tempdir().unwrap();
    let d = daemon(&work.path().join("d"), &mock.host());
    let mnt = work.path().join("d/mnt");
    d.mount(&image, &mnt);
    (mock, files, work, d, mnt)
}

async fn readers_across(how: Disruption) {
    let (_mock, files, _work, mut d, mnt) = mounted().await;
    // the kernel's view: 4 groups, each blob's cache file marked once, in more than one group
    let groups = procs::fanotify_marks(d.pid());
    assert_eq!(groups.len(), 4, "{how:?}: fanotify groups of the daemon: {groups:?}");
    assert_eq!(
        groups.iter().map(|g| g.len()).sum::<usize>(),
        8,
        "{how:?}: marks: {groups:?}"
    );
    assert!(
        groups.iter().filter(|g| !g.is_empty()).count() > 1,
        "{how:?}: marks: {groups:?}"
    );

    let readers: Vec<_> = files.keys().map(|p| stream(mnt.join(p))).collect();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        match how {
            Disruption::Kill9 => {
                d.kill9();
                // a temporary a crash left an hour ago is swept at start; a fresh one (an
                // upgrade's old daemon writing) is not
                let (stale, fresh) = (d.dir.join("state/.tmp-crashed"), d.dir.join("state/.tmp-now"));
                if round == 0 {
                    let f = std::fs::File::create(&stale).unwrap();
                    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
                        .unwrap();
                    std::fs::File::create(&fresh).unwrap();
                }
                d.restart();
                assert!(
                    !stale.exists() && fresh.exists(),
                    "{round}: stale temporaries not swept"
                );
            }
            Disruption::Upgrade => d.upgrade(),
        }
        eprintln!("{how:?} {round}: a new daemon serves after {:?}", t.elapsed());
        // the new daemon holds the same groups in the same order: a mark it has (blobs
        // completed since are unmarked) is in the group it was in
        let now = procs::fanotify_marks(d.pid());
        assert_eq!(now.len(), 4, "{how:?} {round}: groups {now:?}");
        for (i, (was, is)) in groups.iter().zip(&now).enumerate() {
            assert!(is.is_subset(was), "{how:?} {round}: group {i} was {was:?}, is {is:?}");
        }
    }
    let mut stalls = Vec::new();
    for (p, r) in files.keys().zip(readers) {
        let (sum, longest) = r.join().unwrap().unwrap_or_else(|e| {
            panic!(
                "{how:?}: a reader failed: {e}\n--- daemon log (tail)\n{}",
                containerd_tail(&d)
            )
        });
        assert_eq!(sum, sha256_hex(&files[p]), "{how:?}: {p} read wrong bytes");
        stalls.push(longest);
    }
    stalls.sort();
    eprintln!(
        "{how:?}: longest read stall per reader: p50 {:?}, max {:?}",
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1]
    );
    // the daemons really took over from each other, each with every blob's writer, and
    // found reads left pending
    let log = d.log();
    let takeovers: Vec<&str> = log.lines().filter(|l| l.contains("took over the kernel fd")).collect();
    assert_eq!(takeovers.len(), 3, "{how:?}: takeovers:\n{log}");
    assert!(
        takeovers.iter().all(|l| l.contains("kept=8")),
        "{how:?}: a daemon lost writers: {takeovers:#?}"
    );
    assert!(
        log.contains("serving the reads a stopped daemon left unanswered"),
        "{how:?}: no read was in flight at any of the 3 disruptions:\n{log}"
    );
    d.umount(&mnt);
}

fn containerd_tail(d: &DaemonProc) -> String {
    common::containerd::tail(&d.log(), 40)
}

/// A reader holds a file open across a `SIGTERM` (the mount is busy, so it stays, and the
/// guard keeps its group): its next read of a cold range waits while no daemon runs and
/// gets the right bytes from the next daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_holding_a_file_across_sigterm_waits_for_the_next_daemon() {
    let (_mock, files, _work, mut d, mnt) = mounted().await;
    let want = files["data/f3.bin"].clone();
    let mut f = std::fs::File::open(mnt.join("data/f3.bin")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    f.read_exact(&mut head).unwrap();
    assert!(head[..] == want[..1 << 20]);

    d.stop();
    assert!(
        lazyblob::frontend::mount::is_erofs_mount(&mnt),
        "a busy mount must stay mounted across the stop"
    );
    let reader = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let t = Instant::now();
        let mut b = vec![0u8; 64 << 10];
        let r = f.read_exact_at(&mut b, 9 << 20).map(|()| b);
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!reader.is_finished(), "a read while no daemon runs must wait, not fail");
    d.restart();
    let (got, waited) = reader.join().unwrap();
    let got = got.unwrap_or_else(|e| panic!("the held reader failed: {e}\n{}", containerd_tail(&d)));
    assert!(
        got[..] == want[9 << 20..(9 << 20) + (64 << 10)],
        "the held reader got wrong bytes"
    );
    assert!(got.iter().any(|&b| b != 0));
    eprintln!("held across SIGTERM for {waited:?}, then served");
    d.umount(&mnt);
}
