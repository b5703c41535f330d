//! The background fill yields to the readers of every blob, not only to its own blob's, on
//! this machine's kernel (fanotify) against registry-mock: a blob read once and then quiet is
//! not filled while a reader of another blob keeps fetching; once that reader is quiet too,
//! the fill completes both blobs, each byte fetched once.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::daemon::fanotify_mounted;
use common::oci::serve_blobs;
use common::*;
use lazyblob::registry::sha256_digest;

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fill_waits_while_a_reader_of_another_blob_fetches() {
    require_root();
    // each file its own data blob (round robin): a.bin in the first, b.bin in the second
    let files = BTreeMap::from([
        ("a.bin".to_string(), bytes(81, 8 * MIB)),
        ("b.bin".to_string(), bytes(82, 32 * MIB)),
    ]);
    let (mock, img) = serve_blobs(&files, "fill/two:v1", 2).await;
    let host = mock.host();
    let (blob_a, blob_b) = (sha256_digest(&img.data[0]), sha256_digest(&img.data[1]));
    let engine = "read_ahead_max = 0\nfill_after_idle_ms = 1500";
    let (_work, d, mnt) = fanotify_mounted(&host, "fill/two:v1", engine);
    // one read of a.bin: its blob is in use, then quiet
    assert_eq!(read_at(&mnt.join("a.bin"), 0, 4096), files["a.bin"][..4096]);
    let a_read = mock.counters().blob_bytes(&blob_a);
    assert!(a_read > 0);
    // a reader of b.bin misses a new chunk every 200 ms for 3 s and more: a.bin's blob is
    // quiet for twice `fill_after_idle_ms` meanwhile, and must not be filled
    let b = &files["b.bin"];
    for k in 0..16 {
        let at = k * 2 * MIB + 8192;
        assert_eq!(read_at(&mnt.join("b.bin"), at, 4096), b[at..at + 4096]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = mock.counters();
    assert_eq!(
        c.blob_bytes(&blob_a),
        a_read,
        "blob a was filled while b's reader fetched"
    );
    assert!(
        c.blob_bytes(&blob_b) < 8 * MIB as u64,
        "blob b was filled under its reader"
    );
    // once b's reader is quiet too, both are filled
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.status().await.frontend_counters["blobs_complete"].as_u64() != Some(2) {
        assert!(Instant::now() < deadline, "the fill did not complete both blobs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = mock.counters();
    for (digest, data) in [(&blob_a, &img.data[0]), (&blob_b, &img.data[1])] {
        assert_eq!(c.blob_bytes(digest), data.len() as u64, "each byte once");
    }
    for (p, want) in &files {
        assert_eq!(&std::fs::read(mnt.join(p)).unwrap(), want, "{p}");
    }
    d.umount(&mnt);
}
