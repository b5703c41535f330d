//! Pushes against registry-mock: a blob in one request, an upload commit slower than the
//! request timeout, and pieces for a registry that refuses a body that large (413).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use lazyblob::registry::{parse_reference, sha256_digest, BlobSource};
use registry_mock::{Fault, FaultRule, MockConfig, MockRegistry};

/// A registry that takes longer than the request timeout to answer an upload (as when it
/// moves a large blob into its storage) still gets the blob: a push waits for its answer.
#[tokio::test]
async fn a_push_waits_for_a_slow_registry_longer_than_a_read() {
    let mock = MockRegistry::start(MockConfig {
        upload_commit_delay: Some(Duration::from_millis(1500)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut cfg = insecure_config(&[&mock.host()]);
    cfg.request_timeout = Duration::from_millis(500);
    let reg = client(&cfg);
    let repo = parse_reference(&format!("{}/slow/app:1", mock.host())).unwrap();
    let data = bytes(10, 1 << 20);
    let d = reg.push_blob(&repo, Bytes::from(data.clone())).await.unwrap();
    assert_eq!(mock.store().blob(&d).unwrap(), data);
    // a pull with the same client still gives up on a stall of that length
    mock.set_faults(vec![FaultRule::always(Fault::Latency(Duration::from_millis(1500)))]);
    let src = BlobSource {
        repo,
        digest: d.parse().unwrap(),
        size: data.len() as u64,
    };
    assert!(
        reg.fetch_range(&src, 0, 4096).await.is_err(),
        "a pull waited past its timeout"
    );
}

/// A blob goes up in one request; a registry (or a proxy in front of it) that caps request
/// bodies at 1 MiB refuses that, and the 4 MiB pieces after it, and gets 512 KiB pieces.
#[tokio::test]
async fn a_blob_too_large_for_one_request_is_pushed_in_pieces() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let reg = client(&insecure_config(&[&mock.host()]));
    let repo = parse_reference(&format!("{}/big/app:1", mock.host())).unwrap();
    let one = bytes(7, 3 << 20);
    let file = |data: &[u8]| {
        let f = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, data, 0).unwrap();
        std::sync::Arc::new(f)
    };
    let d = reg
        .push_blob_file(&repo, file(&one), one.len() as u64, sha256_digest(&one))
        .await
        .unwrap();
    assert_eq!(mock.store().blob(&d).unwrap(), one);
    let c = mock.counters();
    assert_eq!((c.upload_patches, c.uploads_too_large), (0, 0), "one request");

    mock.set_config(MockConfig {
        max_upload_body: Some(1 << 20),
        ..Default::default()
    });
    let data = bytes(8, (5 << 20) + 12_345);
    let d = reg
        .push_blob_file(&repo, file(&data), data.len() as u64, sha256_digest(&data))
        .await
        .unwrap();
    assert_eq!(mock.store().blob(&d).unwrap(), data, "the pieces make the blob");
    let c = mock.counters();
    assert_eq!(c.uploads_too_large, 2, "the whole blob, then its first 4 MiB piece");
    assert_eq!(c.upload_patches, 11, "10 whole pieces of 512 KiB and the rest");
    // from memory, the same way
    let small = bytes(9, (2 << 20) + 1);
    let d = reg.push_blob(&repo, Bytes::from(small.clone())).await.unwrap();
    assert_eq!(mock.store().blob(&d).unwrap(), small);
    assert_eq!(mock.counters().upload_patches, 11 + 5);
}
