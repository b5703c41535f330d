//! The blob engine against registry-mock: single flight, merging, verification, faults; and
//! the catalog restoring its images after a restart while the registry is gone.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lazyblob::catalog::Catalog;
use lazyblob::config::EngineConfig;
use lazyblob::engine::{DataBlob, Engine};
use lazyblob::image::format::{BlobChunks, ChunkDigest};
use lazyblob::registry::{parse_reference, BlobSource};
use registry_mock::{Fault, FaultRule, MockConfig, MockRegistry};

struct Fixture {
    mock: MockRegistry,
    engine: Arc<Engine>,
    blob: Arc<DataBlob>,
    data: Vec<u8>,
}

async fn fixture(size: usize, deadline_ms: u64) -> Fixture {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let data = bytes(5, size);
    let digest = mock.store().put_blob(data.clone());
    let mut cfg = insecure_config(&[&mock.host()]);
    cfg.deadline = Duration::from_millis(deadline_ms);
    cfg.max_attempts = 4;
    let reg = Arc::new(client(&cfg));
    let engine = Arc::new(Engine::new(reg, EngineConfig::default()));
    let blob = data_blob(&mock, &digest, &data);
    Fixture {
        mock,
        engine,
        blob,
        data,
    }
}

/// `data`, stored in `mock` as `digest`, as a blob of 1 MiB chunks.
fn data_blob(mock: &MockRegistry, digest: &str, data: &[u8]) -> Arc<DataBlob> {
    let table = BlobChunks::of(data, 1 << 20, ChunkDigest::Blake3);
    Arc::new(DataBlob::new(
        BlobSource {
            repo: parse_reference(&format!("{}/t/blob:x", mock.host())).unwrap(),
            digest: digest.parse().unwrap(),
            size: data.len() as u64,
        },
        1 << 20,
        table.digests(1 << 20).unwrap(),
        ChunkDigest::Blake3,
    ))
}

fn assemble(pieces: &[lazyblob::engine::Piece], off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        let lo = off.max(p.offset);
        let hi = (off + len).min(p.offset + p.bytes().unwrap().len() as u64);
        if lo < hi {
            out.extend_from_slice(&p.bytes().unwrap()[(lo - p.offset) as usize..(hi - p.offset) as usize]);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_of_one_chunk_share_one_request() {
    let f = fixture(8 << 20, 5_000).await;
    f.mock
        .set_faults(vec![FaultRule::always(Fault::Latency(Duration::from_millis(200)))]);
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let (e, b) = (f.engine.clone(), f.blob.clone());
        tasks.push(tokio::spawn(async move {
            let off = (3 << 20) + i * 4096;
            (off, e.read(&b, off, 4096).await.unwrap())
        }));
    }
    for t in tasks {
        let (off, pieces) = t.await.unwrap();
        assert_eq!(assemble(&pieces, off, 4096), f.data[off as usize..off as usize + 4096]);
    }
    let c = f.mock.counters();
    assert_eq!(
        c.blob_requests(&f.blob.source.digest),
        1,
        "one registry request for 64 readers"
    );
    assert_eq!(c.blob_bytes(&f.blob.source.digest), 1 << 20);
    assert!(f.engine.stats.shared_hits.load(std::sync::atomic::Ordering::Relaxed) >= 63);
}

#[tokio::test]
async fn adjacent_missing_chunks_merge_into_one_range() {
    let f = fixture(10 << 20, 5_000).await;
    let pieces = f.engine.read(&f.blob, (1 << 20) + 5, 3 << 20).await.unwrap();
    assert_eq!(pieces.len(), 4);
    assert_eq!(
        assemble(&pieces, (1 << 20) + 5, 3 << 20),
        f.data[(1 << 20) + 5..(4 << 20) + 5]
    );
    let c = f.mock.counters();
    assert_eq!(c.blob_requests(&f.blob.source.digest), 1);
    // chunks already fetched are not fetched again; the tail chunk (partial) is
    let pieces = f.engine.read(&f.blob, 4 << 20, 6 << 20).await.unwrap();
    assert_eq!(assemble(&pieces, 4 << 20, 6 << 20), f.data[4 << 20..]);
    let c = f.mock.counters();
    // chunks 1..=9 were read (chunk 0 never), each fetched exactly once
    assert_eq!(
        c.blob_bytes(&f.blob.source.digest),
        9 << 20,
        "every byte fetched exactly once"
    );
}

/// A completed unit is kept for readers until its frontend reports it stored, then let go:
/// the engine holds no fetched bytes a cache file already has.
#[tokio::test]
async fn a_stored_unit_is_no_longer_kept() {
    let f = fixture(3 << 20, 5_000).await;
    let digest = &f.blob.source.digest;
    let first = f.engine.read(&f.blob, 5, 10).await.unwrap();
    // not stored yet: a second reader gets the kept unit, no request
    let again = f.engine.read(&f.blob, 100, 10).await.unwrap();
    assert_eq!(assemble(&again, 100, 10), f.data[100..110]);
    assert_eq!(f.mock.counters().blob_requests(digest), 1);
    f.engine.stored(&first[0]);
    // stored: a reader that still asks the engine (its frontend lost the bytes) fetches anew
    let third = f.engine.read(&f.blob, 200, 10).await.unwrap();
    assert_eq!(assemble(&third, 200, 10), f.data[200..210]);
    assert_eq!(f.mock.counters().blob_requests(digest), 2);
    assert_eq!(f.mock.counters().blob_bytes(digest), 2 << 20);
}

#[tokio::test]
async fn corrupted_chunks_fail_then_succeed_after_the_fault_clears() {
    let f = fixture(3 << 20, 3_000).await;
    f.mock.set_faults(vec![FaultRule::always(Fault::Corrupt)]);
    let err = f.engine.read(&f.blob, 0, 100).await.unwrap_err().to_string();
    assert!(err.contains("digest mismatch"), "{err}");
    f.mock.clear_faults();
    // past the hold of failed fetches (see a_failed_fetch_is_held_briefly_then_retried)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let pieces = f.engine.read(&f.blob, 0, 100).await.unwrap();
    assert_eq!(assemble(&pieces, 0, 100), f.data[..100]);
}

#[tokio::test]
async fn transient_faults_are_retried() {
    let f = fixture(2 << 20, 5_000).await;
    f.mock.set_faults(vec![
        FaultRule::times(Fault::Status(503), 2),
        FaultRule::times(Fault::DropMidBody, 1),
        FaultRule::times(Fault::Corrupt, 1),
    ]);
    // the rules apply to the same first requests: 503, 503, then dropped+corrupt, then clean
    let pieces = f.engine.read(&f.blob, 1 << 20, 4096).await.unwrap();
    assert_eq!(assemble(&pieces, 1 << 20, 4096), f.data[1 << 20..(1 << 20) + 4096]);
    let c = f.mock.counters();
    assert!(c.blob_hits.iter().filter(|h| h.status == 503).count() == 2);
    assert!(
        f.engine
            .registry()
            .stats
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
}

#[tokio::test]
async fn a_dead_registry_fails_within_the_deadline() {
    let f = fixture(2 << 20, 1_500).await;
    f.mock
        .set_faults(vec![FaultRule::always(Fault::Latency(Duration::from_secs(30)))]);
    let t0 = Instant::now();
    assert!(f.engine.read(&f.blob, 0, 10).await.is_err());
    assert!(t0.elapsed() < Duration::from_secs(4), "took {:?}", t0.elapsed());
    f.mock.set_faults(vec![FaultRule::always(Fault::Status(500))]);
    assert!(f.engine.read(&f.blob, 0, 10).await.is_err());
}

#[tokio::test]
async fn reads_outside_the_blob_are_errors() {
    let f = fixture(100_000, 1_000).await;
    assert!(f.engine.read(&f.blob, 100_000, 1).await.is_err());
    let pieces = f.engine.read(&f.blob, 99_990, 1 << 20).await.unwrap();
    assert_eq!(assemble(&pieces, 99_990, 10), f.data[99_990..]);
}

#[tokio::test]
async fn a_restart_restores_images_without_the_registry() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = Arc::new(client(&insecure_config(&[&host])));
    let img = build_files(&mixed_files(3, 20, &[1]), 2);
    push_image(&reg, &host, "app/restore:v1", &img).await;
    let state = tempfile::tempdir().unwrap();
    let first = Catalog::new(Arc::clone(&reg), state.path())
        .register(&format!("{host}/app/restore:v1"))
        .await
        .unwrap();
    // the registry goes away: what the catalog kept is enough to serve the image again
    drop(mock);
    let mut cfg = insecure_config(&[&host]);
    cfg.max_attempts = 1;
    cfg.deadline = Duration::from_millis(500);
    let offline = Arc::new(client(&cfg));
    let restored = Catalog::new(Arc::clone(&offline), state.path());
    let failed = restored.restore().await;
    assert!(failed.is_empty(), "restore needed the registry: {failed:?}");
    let again = restored.get(&first.fsid).expect("image restored");
    assert_eq!(again.manifest_digest, first.manifest_digest);
    assert_eq!(again.meta.digest, first.meta.digest);
    let digests = |i: &lazyblob::catalog::Image| i.data.iter().map(|d| d.digests.clone()).collect::<Vec<_>>();
    assert_eq!(digests(&again), digests(&first));
    // a kept manifest that fails verification is not used: the registry is asked, and is gone
    let kept = state.path().join("blobs").join(first.manifest_digest.file_name());
    let mut raw = std::fs::read(&kept).unwrap();
    raw[10] ^= 1;
    std::fs::write(&kept, raw).unwrap();
    let failed = Catalog::new(offline, state.path()).restore().await;
    assert_eq!(failed.len(), 1, "a corrupt kept manifest must not be trusted");
}

/// A failed fetch is held for `failed_fetch_hold_ms`: reads of its chunk in that time fail
/// at once without another request (readers queued behind a stall do not each wait a
/// deadline); after it, a read fetches again and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_is_held_briefly_then_retried() {
    let f = fixture(4 << 20, 300).await;
    f.mock.set_faults(vec![FaultRule::always(Fault::Status(404))]);
    let err = f.engine.read(&f.blob, 1 << 20, 4096).await.unwrap_err();
    let requests = f.mock.counters().blob_hits.len();
    assert!(requests >= 1, "{err}");
    f.mock.clear_faults();
    let t0 = Instant::now();
    let held = f.engine.read(&f.blob, (1 << 20) + 8192, 4096).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_millis(100), "a held failure waited");
    assert_eq!(held.to_string(), err.to_string());
    assert_eq!(
        f.mock.counters().blob_hits.len(),
        requests,
        "a held failure made a request"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let pieces = f.engine.read(&f.blob, 1 << 20, 4096).await.unwrap();
    assert_eq!(assemble(&pieces, 1 << 20, 4096), f.data[1 << 20..(1 << 20) + 4096]);
}

/// An engine on the fixture's registry whose fetches ahead may leave `budget` bytes unwritten.
fn budgeted(f: &Fixture, budget: u64) -> Arc<Engine> {
    let cfg = EngineConfig {
        ahead_buffer_max: std::num::NonZeroU64::new(budget),
        ..EngineConfig::default()
    };
    Arc::new(Engine::new(Arc::clone(f.engine.registry()), cfg))
}

/// Body bytes the fixture's registry client has received.
fn fetched_bytes(f: &Fixture) -> u64 {
    f.engine
        .registry()
        .stats
        .bytes
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// A run fetched ahead of readers stops reading its body once its units that nobody has
/// written yet fill `ahead_buffer_max`; a reader that needs a later unit of it gets that unit
/// at once; once the units are written the run finishes, each byte fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_fetched_ahead_pauses_at_its_budget_and_a_reader_unpauses_it() {
    use lazyblob::engine::Need;
    let f = fixture(32 << 20, 30_000).await;
    let engine = budgeted(&f, 4 << 20);
    let fetched = || fetched_bytes(&f);
    let until = |at_least: u64| async move {
        let t0 = Instant::now();
        while fetched() < at_least && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // well inside `gate::PAUSE_MAX`: a paused stream would still be paused
        tokio::time::sleep(Duration::from_millis(200)).await;
        fetched()
    };
    let ahead = engine.fetch(&f.blob, 0, 32 << 20, Need::Ahead).unwrap();
    let n = until(4 << 20).await;
    // 4 units took the budget; the fifth may have begun in the body piece that ended the fourth
    assert!(
        (4 << 20..5 << 20).contains(&n),
        "{n} bytes streamed with 4 MiB unwritten"
    );
    assert!(engine.ahead_pauses().0 >= 1);
    let reader = engine.fetch(&f.blob, (20 << 20) + 5, 4096, Need::Reader).unwrap();
    let piece = reader.into_iter().next().unwrap().wait(&engine).await.unwrap();
    assert_eq!(&piece.bytes().unwrap()[..], &f.data[20 << 20..21 << 20]);
    let n = until(21 << 20).await;
    assert!(
        (21 << 20..22 << 20).contains(&n),
        "{n} bytes: paused again after the reader's unit"
    );
    for p in ahead {
        let piece = p.wait(&engine).await.unwrap();
        let at = piece.offset as usize;
        assert_eq!(
            &piece.bytes().unwrap()[..],
            &f.data[at..at + piece.bytes().unwrap().len()]
        );
        engine.stored(&piece); // written: its share is free
    }
    assert_eq!(fetched(), 32 << 20, "every byte once");
}

/// Fetches ahead of readers never hold every connection slot of a host: with all of theirs
/// stalled at the registry, a reader's miss still gets a slot at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_gets_a_slot_while_fetches_ahead_stall() {
    use lazyblob::engine::Need;
    let f = fixture(32 << 20, 30_000).await;
    let other = bytes(9, 2 << 20);
    let digest = f.mock.store().put_blob(other.clone());
    let b = data_blob(&f.mock, &digest, &other);
    f.mock.set_faults(vec![FaultRule {
        fault: Fault::Latency(Duration::from_secs(3)),
        digest: Some(f.blob.source.digest.to_string()),
        times: None,
    }]);
    // one run per chunk (every other one): as many as the host's 16 slots (`common::client`)
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for c in (0..32u64).step_by(2) {
        let pending = f.engine.fetch(&f.blob, c << 20, 4096, Need::Ahead).unwrap();
        let (e, done) = (Arc::clone(&f.engine), Arc::clone(&done));
        tokio::spawn(async move {
            for p in pending {
                p.wait(&e).await.unwrap();
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pieces = f.engine.read(&b, 5, 4096).await.unwrap();
    assert_eq!(assemble(&pieces, 5, 4096), other[5..4101]);
    // 12 of the 16 fetches ahead hold a slot (the other 4 wait), the reader took a fifth:
    // it did not wait for one of theirs to give its slot up (none has been answered yet)
    let requests = f
        .engine
        .registry()
        .stats
        .requests
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(requests, 12 + 1, "requests sent when the reader's bytes arrived");
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Units a caller drops instead of waiting for (an error cut it short) give their shares of
/// the budget back and leave the running fetches, so the rest of their run streams without
/// waiting out pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_units_give_their_budget_back() {
    use lazyblob::engine::Need;
    let f = fixture(8 << 20, 30_000).await;
    let engine = budgeted(&f, 2 << 20);
    let fetched = || fetched_bytes(&f);
    let mut units = engine.fetch(&f.blob, 0, 8 << 20, Need::Ahead).unwrap().into_iter();
    let first = units.next().unwrap().wait(&engine).await.unwrap();
    assert_eq!(&first.bytes().unwrap()[..], &f.data[..1 << 20]);
    drop(units);
    let t0 = Instant::now();
    while fetched() < 8 << 20 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fetched(), 8 << 20, "the run finished");
    // the first unit, never written, still holds its share: one pause at most waits it out
    assert!(
        engine.ahead_pauses().1 <= 1,
        "pauses waited out: {:?}",
        engine.ahead_pauses()
    );
    // no waiter moved them, yet none of the units stays among the running fetches
    while engine.inflight_len() > 0 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(engine.inflight_len(), 0, "units left running");
}

/// A run given a landing writes each unit there the moment it is verified, before its
/// waiters hear of it; a landed unit holds no share of the budget and the engine keeps no
/// copy of it. A unit that cannot be landed goes to its waiters (and is kept) as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_land_their_units_before_their_waiters_hear_of_them() {
    use lazyblob::engine::landing::Landing;
    use lazyblob::engine::Need;
    use std::sync::Mutex;
    struct Disk {
        bytes: Mutex<Vec<u8>>,
        full_at: u64,
    }
    impl Landing for Disk {
        fn land(&self, at: u64, data: &[u8]) -> std::io::Result<()> {
            if at == self.full_at {
                return Err(std::io::Error::other("no space left"));
            }
            let at = at as usize;
            self.bytes.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn place(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
            unreachable!("the blob has no leaves: its units are landed whole")
        }
        fn seal(&self, _: u64, _: u64) -> std::io::Result<()> {
            unreachable!("the blob has no leaves: its units are landed whole")
        }
    }
    let size = (8 << 20) + 5;
    let f = fixture(size, 30_000).await;
    let disk = Arc::new(Disk {
        bytes: Mutex::new(vec![0; size]),
        full_at: 3 << 20,
    });
    let to: Arc<dyn Landing> = disk.clone();
    let pending = f
        .engine
        .fetch_to(&f.blob, 0, size as u64, Need::Ahead, Some(&to))
        .unwrap();
    assert_eq!(pending.len(), 9);
    for p in pending {
        // how far the run has written is told only while every unit before is landed
        let placed = p.placed_to(&f.engine, p.end).await;
        assert_eq!(placed, p.offset < 3 << 20, "unit at {} told placed", p.offset);
        let piece = p.wait(&f.engine).await.unwrap();
        let (at, end) = (
            piece.offset as usize,
            piece.offset as usize + piece.bytes().unwrap().len(),
        );
        assert!(
            piece.bytes().unwrap()[..] == f.data[at..end],
            "its waiter gets the bytes too"
        );
        let on_disk = disk.bytes.lock().unwrap()[at..end].to_vec();
        match at == 3 << 20 {
            true => assert!(on_disk.iter().all(|&b| b == 0), "the unit that failed to land"),
            false => assert!(
                on_disk == f.data[at..end],
                "unit at {at} landed before it was handed out"
            ),
        }
    }
    for c in 0..9 {
        assert_eq!(
            f.engine.fetching(&f.blob, c),
            c == 3,
            "only the unit not landed is kept (chunk {c})"
        );
    }
    assert_eq!(f.engine.inflight_len(), 0);
    // 8 MiB fetched ahead against a 4 MiB budget and nothing reported stored: landed units
    // gave their share back as they landed, so the stream never paused
    assert_eq!(f.engine.ahead_pauses().0, 0);
    assert_eq!(fetched_bytes(&f), size as u64, "every byte once");
}
