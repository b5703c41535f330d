//! What a lazy mount fetches, counted at the registry (registry-mock's byte counters), with
//! the default read-ahead on (background fill off, so every byte is a reader's doing), on
//! this machine's kernel (fanotify):
//! - data already in the cache, read again after the page cache dropped it, fetches nothing,
//!   even right after a sequential reader left its read-ahead window open (it used to move
//!   that window on and fetch the rest of the blob);
//! - a random 4 KiB reader fetches its own chunk and nothing ahead of it.

mod common;

use std::collections::BTreeMap;

use common::daemon::DaemonProc;
use common::*;
use registry_mock::{MockConfig, MockRegistry};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rereads_fetch_nothing_and_random_reads_fetch_their_chunk() {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    // a large file first in the blob, small files after it (1 MiB chunks)
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    files.insert("a-big.bin".into(), bytes(41, 48 * MIB));
    for i in 0..12 {
        files.insert(format!("z/small{i:02}.bin"), bytes(100 + i, 200_000));
    }
    push_image(&reg, &host, "policy/app:v1", &build_files(&files, 1)).await;
    let work = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(
        &work.path().join("d"),
        &[&host],
        "frontend = \"fanotify\"\n[engine]\nfill_after_idle_ms = 0",
    );
    let mnt = work.path().join("d/mnt");
    d.mount(&format!("{host}/policy/app:v1"), &mnt);
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
    let mut before = mock.counters().total_blob_bytes();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = mock.counters().total_blob_bytes();
        if now == before {
            break;
        }
        before = now;
    }

    // pass 2: the same reads, page cache dropped: all from the cache file
    drop_page_cache();
    pass();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = mock.counters().total_blob_bytes();
    assert_eq!(after, before, "re-reading cached data fetched {} bytes", after - before);

    // random 4 KiB reads, three chunks apart and out of order, beyond what was read ahead
    let chunks = [40usize, 22, 31, 46, 28, 37, 25, 43, 34];
    for c in chunks {
        let off = c * MIB + 12_288;
        assert!(read_at(&mnt.join("a-big.bin"), off, 4096) == big[off..off + 4096]);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let random = mock.counters().total_blob_bytes() - after;
    assert!(
        random <= (chunks.len() * MIB) as u64,
        "{} random 4 KiB reads fetched {random} bytes (over one 1 MiB chunk each)",
        chunks.len()
    );
    assert!(random >= (chunks.len() * 4096) as u64);
    d.umount(&mnt);
}
