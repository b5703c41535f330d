//! What a lazy mount fetches, counted at the registry (registry-mock's byte counters), with
//! the default read-ahead on (background fill off, so every byte is a reader's doing), on
//! this machine's kernel (fanotify):
//! - data already in the cache, read again after the page cache dropped it, fetches nothing,
//!   even right after a sequential reader left its read-ahead window open (it used to move
//!   that window on and fetch the rest of the blob);
//! - a random 4 KiB reader fetches its leaves (format 3) and nothing ahead of them; past a
//!   quarter of a chunk the rest of its leaves come; after a daemon restart the leaves written
//!   before are read back from the cache file and verified, not fetched again; each range
//!   is one request (the credential is kept: no auth probe before it).

mod common;

use std::collections::BTreeMap;

use common::daemon::DaemonProc;
use common::oci::{serve, serve_one};
use common::*;
use registry_mock::MockRegistry;

const MIB: usize = 1 << 20;

/// Taken for writing by a test whose outcome depends on idle cores, for reading by the others
/// (the test command runs two tests at a time).
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A fanotify daemon (background fill off, and the `[engine]` lines `engine`) with `repo`
/// of `mock` mounted: its directory, the daemon and the mount point.
fn mounted(mock: &MockRegistry, repo: &str, engine: &str) -> (tempfile::TempDir, DaemonProc, std::path::PathBuf) {
    common::daemon::fanotify_mounted(&mock.host(), repo, &format!("fill_after_idle_ms = 0\n{engine}"))
}

/// (offset, length) of the ranges of blob `digest` served (2xx) since hit number `since`,
/// starting in `within`.
fn hits(mock: &MockRegistry, digest: &str, since: usize, within: std::ops::Range<u64>) -> Vec<(u64, u64)> {
    mock.counters().blob_hits[since..]
        .iter()
        .filter(|h| h.digest == digest && h.status < 300 && within.contains(&h.offset))
        .map(|h| (h.offset, h.len))
        .collect()
}

/// How much the frontend counter `k` grew from status `before` to `after`.
fn grew(before: &lazyblob::api::Status, after: &lazyblob::api::Status, k: &str) -> u64 {
    let at = |s: &lazyblob::api::Status| s.frontend_counters[k].as_u64().unwrap();
    at(after) - at(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rereads_fetch_nothing_and_random_reads_fetch_their_leaves() {
    require_root();
    let _shared = ALONE.read().await;
    // a large file first in the blob, small files after it (1 MiB chunks)
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    files.insert("a-big.bin".into(), bytes(41, 48 * MIB));
    for i in 0..12 {
        files.insert(format!("z/small{i:02}.bin"), bytes(100 + i, 200_000));
    }
    let (mock, data_digest) = serve(&files, "policy/app:v1").await;
    let (_work, mut d, mnt) = mounted(&mock, "policy/app:v1", "");
    let big = &files["a-big.bin"];

    // pass 1: the small files, then the head of the large one read sequentially, which
    // leaves the read-ahead window open
    let smalls: Vec<&String> = files.keys().filter(|k| k.starts_with("z/")).collect();
    let pass = || {
        for p in &smalls {
            assert!(std::fs::read(mnt.join(p)).unwrap() == files[*p], "{p}");
        }
        for off in (0..8 * MIB).step_by(MIB) {
            assert!(read_at(&mnt.join("a-big.bin"), off, MIB) == big[off..off + MIB]);
        }
    };
    pass();
    // the read-ahead the sequential reader started lands before we count
    let before = settled(|| mock.counters().total_blob_bytes()).await;

    // pass 2: the same reads, page cache dropped: all from the cache file
    drop_page_cache();
    pass();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = mock.counters().total_blob_bytes();
    assert_eq!(after, before, "re-reading cached data fetched {} bytes", after - before);

    // random 4 KiB reads, three chunks apart and out of order, beyond what was read ahead:
    // each fetches the leaf its page is in (16 KiB), verified on its own against the leaf
    // values of the leaves layer the daemon kept after registering the image (or, before that,
    // its chunk's 2 KiB of values fetched alongside), not its 1 MiB chunk
    let chunks = [40usize, 22, 31, 46, 28, 37, 25, 43, 34];
    let leaf_reads = d.status().await.engine.leaf_reads;
    let requests = mock.counters().requests;
    // bytes of the data blob fetched from here on past chunk 20 (a late read-ahead of pass 1,
    // at the file's head, is not theirs)
    let since = mock.counters().blob_hits.len();
    let fetched = || -> u64 {
        hits(&mock, &data_digest, since, (20 * MIB) as u64..u64::MAX)
            .iter()
            .map(|h| h.1)
            .sum()
    };
    for c in chunks {
        let off = c * MIB + 12_288;
        assert!(read_at(&mnt.join("a-big.bin"), off, 4096) == big[off..off + 4096]);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let random = fetched();
    assert!(
        random <= (chunks.len() * (64 << 10)) as u64,
        "{} random 4 KiB reads fetched {random} bytes (over 64 KiB each): {:?}",
        chunks.len(),
        mock.counters().blob_hits[since..]
            .iter()
            .map(|h| (h.digest == data_digest, h.offset, h.len))
            .collect::<Vec<_>>()
    );
    assert!(random >= (chunks.len() * 4096) as u64);
    eprintln!("{} random 4 KiB reads fetched {random} bytes", chunks.len());
    assert_eq!(d.status().await.engine.leaf_reads - leaf_reads, chunks.len() as u64);
    // one request each: the credential is kept, no `GET /v2/` probe goes before a range
    assert_eq!(
        mock.counters().requests - requests,
        chunks.len() as u64,
        "requests per leaf read"
    );
    // the same pages again, page cache dropped: from the cache file, nothing fetched, each
    // event answered as it was read (the leaves written are as good as a verified chunk)
    drop_page_cache();
    let before = d.status().await;
    for c in chunks {
        let off = c * MIB + 12_288;
        assert!(read_at(&mnt.join("a-big.bin"), off, 4096) == big[off..off + 4096]);
    }
    assert_eq!(fetched(), random, "re-reading leaves fetched");
    let after = d.status().await;
    let events = grew(&before, &after, "events");
    let at_once = grew(&before, &after, "answered_at_once");
    assert!(
        events >= chunks.len() as u64,
        "{events} events for {} reads",
        chunks.len()
    );
    assert_eq!(at_once, events, "re-reads of leaves waited for the daemon's tasks");
    // a random reader back in one of those chunks: each miss fetches its own leaf again
    // (or two, where the kernel's read crosses a leaf), until a quarter of the chunk's 64
    // leaves are here; the next miss fetches the rest of the chunk's leaves (each request
    // verified against the chunk's leaf values), in at most 8 requests, and from then on it
    // is a verified chunk
    let hits_in_40 = || hits(&mock, &data_digest, since, 40 * MIB as u64..41 * MIB as u64);
    let mut rest = 0;
    for l in (5..64).step_by(4).chain([2, 6, 10]) {
        let before = fetched();
        let asked_before = hits_in_40().len();
        let off = 40 * MIB + l * (16 << 10) + 100;
        assert!(read_at(&mnt.join("a-big.bin"), off, 4096) == big[off..off + 4096]);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let more = fetched() - before;
        if more > 32 << 10 {
            rest = hits_in_40().len() - asked_before;
            break;
        }
        assert!(more <= 32 << 10, "a miss at leaf {l} of chunk 40 fetched {more} bytes");
    }
    // each 16 KiB leaf of chunk 40 fetched, once, except the leaves between runs of missing
    // ones read as one request to keep to 8 (a quarter here, scattered: up to 17 runs)
    let mut times = [0u32; 64];
    for (o, n) in hits_in_40() {
        let first = (o - 40 * MIB as u64) / (16 << 10);
        for leaf in first..first + n.div_ceil(16 << 10) {
            times[leaf as usize] += 1;
        }
    }
    assert!((1..=8).contains(&rest), "the rest of chunk 40 in {rest} requests");
    let twice = times.iter().filter(|&&t| t > 1).count();
    assert!(
        times.iter().all(|&t| (1..=2).contains(&t)) && twice <= 9,
        "leaves of chunk 40 fetched {times:?} times: {:?}",
        hits_in_40()
    );

    // the daemon killed and started again (the mount stays, its group kept by the guard):
    // the leaves the last one wrote are found in the cache file, checked against their leaf
    // values and served; the data blob is not asked for them again
    d.kill9();
    d.restart();
    drop_page_cache();
    let asked = |c: usize| {
        mock.counters()
            .requests_overlapping(&data_digest, (c * MIB) as u64, MIB as u64)
    };
    // all but the last chunk read at their leaf; the last one read whole below
    let (reread, last) = chunks.split_at(chunks.len() - 1);
    let before: Vec<usize> = reread.iter().map(|&c| asked(c)).collect();
    for &c in reread {
        let off = c * MIB + 12_288;
        assert!(read_at(&mnt.join("a-big.bin"), off, 4096) == big[off..off + 4096]);
    }
    let again: Vec<usize> = reread.iter().map(|&c| asked(c)).collect();
    assert_eq!(again, before, "leaves written before the restart were fetched again");
    let present = d.status().await.frontend_counters["leaves_present"].as_u64();
    // chunk 40 was completed: a verified chunk, not leaves
    assert_eq!(present, Some(reread.len() as u64 - 1));
    // a reader of all of the last chunk, whose first leaf the last daemon wrote: that leaf is
    // found on disk and verified, the rest of the chunk's leaves are fetched, 1 MiB - 16 KiB
    let c = last[0];
    let from = mock.counters().blob_hits.len();
    assert!(read_at(&mnt.join("a-big.bin"), c * MIB, MIB) == big[c * MIB..(c + 1) * MIB]);
    let rest: u64 = hits(&mock, &data_digest, from, (c * MIB) as u64..((c + 1) * MIB) as u64)
        .iter()
        .map(|h| h.1)
        .sum();
    assert_eq!(rest, (MIB - (16 << 10)) as u64, "chunk {c} read whole after a restart");
    d.umount(&mnt);
}

/// A sequential reader (with its read-ahead) over chunks a random reader left some leaves
/// in: those chunks get the rest of their leaves, not the whole chunk again; each byte of
/// the blob is fetched once. The runs write the units they fetch ahead in checked pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_completes_chunks_with_leaves_by_the_rest() {
    require_root();
    let _shared = ALONE.read().await;
    let data = bytes(23, 16 * MIB);
    let (mock, blob) = serve_one(&data, "policy/seq:v1").await;
    let (_work, d, mnt) = mounted(&mock, "policy/seq:v1", "");
    let f = mnt.join("f.bin");
    // random 4 KiB reads in chunks 6 and 9: their leaves only
    for c in [6, 9] {
        let off = c * MIB + 200_000;
        assert!(read_at(&f, off, 4096) == data[off..off + 4096]);
    }
    let leaf_reads = d.status().await.engine.leaf_reads;
    assert_eq!(leaf_reads, 2, "two random reads, two leaf reads");
    // the whole file, 1 MiB at a time
    for off in (0..16 * MIB).step_by(MIB) {
        assert!(read_at(&f, off, MIB) == data[off..off + MIB], "bytes at {off}");
    }
    let fetched = settled(|| mock.counters().blob_bytes(&blob)).await;
    let st = d.status().await;
    let c = &st.frontend_counters;
    let counter = |k: &str| c[k].as_u64().unwrap_or(0);
    assert!(counter("chunks_prefetched") > 0, "no read-ahead: {c:?}");
    assert_eq!(
        fetched,
        data.len() as u64,
        "each byte once: {:?}",
        hits(&mock, &blob, 0, 0..u64::MAX)
    );
    assert!(
        st.engine.leaf_reads > leaf_reads,
        "chunks 6 and 9 were not completed by leaves"
    );
    // leaves kept: runs wrote units in 256 KiB pieces, 4 a unit (all chunks ahead but 6 and 9, by leaves)
    let (ahead, units_in_pieces) = (counter("chunks_prefetched"), counter("pieces_placed") / 4);
    let whole = ahead.saturating_sub(2).saturating_sub(units_in_pieces);
    assert_eq!(whole, 0, "units fetched ahead landed whole: {c:?}");
    d.umount(&mnt);
}

/// A sequential reader's cache file does not stay in the page cache behind it (the mount
/// keeps its own copy of what was read): with the default `drop_behind` at most half of the
/// blob is still resident after a 128 MiB read (`fincore`), with `drop_behind = 0` all of it.
/// Either way a re-read after the mount's pages are gone has the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_readers_cache_file_pages_are_let_go_behind_it() {
    use std::io::Read;
    require_root();
    let _shared = ALONE.read().await;
    let data = bytes(29, 128 * MIB);
    let (mock, _) = serve_one(&data, "policy/behind:v1").await;
    for (engine, let_go) in [("", true), ("drop_behind = 0", false)] {
        let (work, d, mnt) = mounted(&mock, "policy/behind:v1", engine);
        let mut got = Vec::with_capacity(data.len());
        let mut f = std::fs::File::open(mnt.join("f.bin")).unwrap();
        f.read_to_end(&mut got).unwrap();
        assert!(got == data, "[{engine}] wrong bytes");
        // the blob's cache file: the largest one (the metadata blob is small)
        let blobs = work.path().join("d/cache/blobs");
        let cache = std::fs::read_dir(&blobs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await; // the last advice lands
        let out = common::procs::run_ok(
            std::process::Command::new("fincore")
                .args(["--bytes", "--noheadings", "--output", "RES"])
                .arg(&cache),
        );
        let out = String::from_utf8_lossy(&out.stdout);
        let resident: u64 = out.trim().parse().unwrap_or_else(|_| panic!("fincore said {out:?}"));
        let advised = d.status().await.frontend_counters["drop_behind_bytes"]
            .as_u64()
            .unwrap();
        eprintln!("[{engine}] cache file resident {resident} bytes, {advised} advised out");
        let half = 64 * MIB as u64;
        let expected = match let_go {
            true => advised >= half && resident <= half,
            false => advised == 0 && resident >= 120 * MIB as u64,
        };
        assert!(
            expected,
            "[{engine}] {resident} bytes of the cache file resident, {advised} advised out"
        );
        // the mount's pages dropped: the re-read comes from the cache file, whatever it kept
        nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
        for off in (0..128 * MIB).step_by(7 * MIB) {
            assert!(
                read_at(&mnt.join("f.bin"), off, MIB) == data[off..off + MIB],
                "re-read at {off}"
            );
        }
        drop(f);
        d.umount(&mnt);
    }
}

/// Leaves that do not verify are never served: a registry whose leaves layer is wrong still
/// serves the right bytes (the chunk is fetched whole and checked against its digest), one
/// whose data is wrong gets EIO, never the wrong bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_that_do_not_verify_are_never_served() {
    require_root();
    let _shared = ALONE.read().await;
    let data = bytes(7, 8 * MIB);
    let (mock, _) = serve_one(&data, "policy/bad:v1").await;
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let lazy = common::oci::lazy_manifest(&reg, &format!("{host}/policy/bad:v1")).await;
    let leaves = lazy
        .leaves
        .expect("a format 3 image has a leaves layer")
        .digest
        .to_string();
    let blob = lazy.data[0].digest.to_string();
    // every leaf value of chunk 2 altered; the data blob altered in chunk 5 only
    let mut bad_leaves = mock.store().blob(&leaves).unwrap().to_vec();
    bad_leaves[2 * 2048..3 * 2048].iter_mut().for_each(|b| *b ^= 0x55);
    mock.store().corrupt_blob(&leaves, bad_leaves);
    let mut bad_data = mock.store().blob(&blob).unwrap().to_vec();
    bad_data[5 * MIB + 20_000] ^= 1;
    mock.store().corrupt_blob(&blob, bad_data);

    let (_work, d, mnt) = mounted(&mock, "policy/bad:v1", "failed_fetch_hold_ms = 0");
    let f = mnt.join("f.bin");
    // chunk 0: leaves verify
    assert!(read_at(&f, 40_000, 4096) == data[40_000..44_096]);
    assert_eq!(d.status().await.engine.leaf_reads, 1);
    // chunk 2: its leaf values are wrong: the chunk is fetched whole, the bytes are right
    let before = mock.counters().total_blob_bytes();
    let off = 2 * MIB + 70_000;
    assert!(read_at(&f, off, 4096) == data[off..off + 4096]);
    assert_eq!(
        d.status().await.engine.leaf_reads,
        1,
        "a leaf read with wrong leaf values"
    );
    assert!(
        mock.counters().total_blob_bytes() - before >= MIB as u64,
        "chunk 2 was not fetched whole"
    );
    // chunk 5: the byte read is wrong in the registry: neither the leaf nor the chunk verifies
    let mut buf = vec![0u8; 4096];
    let e = std::fs::File::open(&f)
        .and_then(|h| std::os::unix::fs::FileExt::read_exact_at(&h, &mut buf, (5 * MIB + 16_384) as u64))
        .expect_err("a read of corrupt data succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(d.status().await.engine.leaf_reads, 1);
    d.umount(&mnt);
}

/// Concurrent first misses in one chunk: one reader reads its leaves, the others take the
/// chunk whole through the engine's single flight; the chunk's bytes are asked for at most
/// twice (its leaves and the chunk), never once per reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_in_a_chunk_read_leaves_once() {
    require_root();
    let _shared = ALONE.read().await;
    let data = bytes(9, 4 * MIB);
    let (mock, blob) = serve_one(&data, "policy/hot:v1").await;
    let (_work, d, mnt) = mounted(&mock, "policy/hot:v1", "");
    // the data blob answers slowly: the readers' misses overlap
    mock.set_faults(vec![registry_mock::FaultRule::always(registry_mock::Fault::Latency(
        std::time::Duration::from_millis(300),
    ))
    .for_blob(&blob)]);
    let f = mnt.join("f.bin");
    // 8 readers, each in its own leaf of chunk 2, started together
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (f, barrier) = (f.clone(), std::sync::Arc::clone(&barrier));
            std::thread::spawn(move || {
                let off = 2 * MIB + i * 100_000;
                barrier.wait();
                (off, read_at(&f, off, 4096))
            })
        })
        .collect();
    for r in readers {
        let (off, got) = r.join().unwrap();
        assert!(got[..] == data[off..off + 4096], "wrong bytes at {off}");
    }
    let asked = mock.counters().requests_overlapping(&blob, 2 * MIB as u64, MIB as u64);
    assert!((1..=2).contains(&asked), "chunk 2 asked for {asked} times by 8 readers");
    assert!(d.status().await.engine.leaf_reads <= 1);
    mock.clear_faults();
    d.umount(&mnt);
}

/// Re-reads of cached data in a blob not complete yet raise an event per kernel read, each
/// answered at once; back to back, the busy poll reads a good share of them (at least a
/// quarter, in one of up to 3 passes) without waiting for a wake-up (`busy_poll_reads`); with
/// `busy_poll_us = 0`, none. Each re-read has the right bytes and fetches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_reads_back_to_back_rereads() {
    require_root();
    // alone: what the busy poll reads depends on a core being free for it
    let _alone = ALONE.write().await;
    let data = bytes(11, 4 * MIB);
    let files = BTreeMap::from([
        ("a.bin".to_string(), data.clone()),
        ("b.bin".to_string(), bytes(12, 4 * MIB)),
    ]);
    let (mock, _) = serve(&files, "policy/poll:v1").await;
    // a window of 2 ms, longer than any gap between two of these reads (the default 50 us is
    // about one read here: whether the next event comes inside it is a matter of timing)
    for (engine, polled) in [("busy_poll_us = 2000", true), ("busy_poll_us = 0", false)] {
        let (_work, d, mnt) = mounted(&mock, "policy/poll:v1", engine);
        let f = std::fs::File::open(mnt.join("a.bin")).unwrap();
        // a.bin cached, b.bin not: the blob stays marked
        assert!(read_at(&mnt.join("a.bin"), 0, 4 * MIB) == data);
        // the read-ahead that read started (into b.bin) lands before we count
        let fetched = settled(|| mock.counters().total_blob_bytes()).await;
        // the writeback of what this and earlier tests wrote, done before the core is timed
        nix::unistd::sync();
        // what the busy poll reads depends on a free core: a pass on a busy machine (another
        // process's burst) is tried again, up to 3 passes; with the poll off, every pass reads 0
        let mut passes = Vec::new();
        for _ in 0..3 {
            let before = d.status().await;
            let mut buf = vec![0u8; 4096];
            for i in 0..400usize {
                // the file's pages dropped, so the read goes to the cache file and raises an event
                nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
                let off = (i * 40_961) % (4 * MIB - 4096);
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, off as u64).unwrap();
                assert!(buf[..] == data[off..off + 4096], "wrong bytes at {off}");
            }
            let after = d.status().await;
            let delta = |k: &str| grew(&before, &after, k);
            let (events, polled_reads) = (delta("events"), delta("busy_poll_reads"));
            eprintln!("[{engine}] {events} events, {polled_reads} read by the busy poll");
            assert!(events >= 400, "{events} events for 400 re-reads");
            assert_eq!(delta("answered_at_once"), events);
            assert_eq!(mock.counters().total_blob_bytes(), fetched, "re-reads fetched");
            if !polled {
                assert_eq!(polled_reads, 0, "busy poll off, yet it read events");
            }
            passes.push((polled_reads, events));
            if !polled || polled_reads * 4 >= events {
                break;
            }
        }
        if polled {
            // the group's own loop, woken by the reactor, takes some of them first
            assert!(
                passes.iter().any(|&(p, e)| p * 4 >= e),
                "the busy poll read (of the events) {passes:?}"
            );
        }
        drop(f);
        d.umount(&mnt);
    }
}
