//! Pushes against registry-mock: a blob in one request, an upload commit slower than the
//! request timeout, pieces for a registry that refuses a body that large (413), and a
//! converted data blob pushed while it is written.

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

/// Convert an image of two layers of one 3 MiB file each (seeds `seed`, `seed + 1`) into
/// `host/lazy/<name>:v1`: each file and its converted data blob, in layer order, and the
/// upload PATCHes accepted and bodies refused (413) during the conversion.
async fn convert_two_layers(
    reg: &lazyblob::registry::Registry,
    mock: &MockRegistry,
    name: &str,
    seed: u64,
) -> (Vec<(Vec<u8>, Vec<u8>)>, u64, u64) {
    use common::oci::{compress, push_source, Compression, Layer};
    use lazyblob::image::convert::{convert, ConvertOptions};
    let host = mock.host();
    let files: Vec<Vec<u8>> = (0..2).map(|i| bytes(seed + i, 3 << 20)).collect();
    let layers: Vec<_> = files
        .iter()
        .map(|f| {
            let mut l = Layer::new();
            l.file("f", 0o644, f);
            compress(&l.tar(), Compression::Gzip)
        })
        .collect();
    let (src, dst) = (format!("{host}/src/{name}:v1"), format!("{host}/lazy/{name}:v1"));
    push_source(reg, &src, &layers).await;
    let before = mock.counters();
    let opts = ConvertOptions::default();
    convert(reg, &src.parse().unwrap(), &dst.parse().unwrap(), &opts)
        .await
        .unwrap();
    let after = mock.counters();
    let resolved = reg.resolve(&parse_reference(&dst).unwrap()).await.unwrap();
    let lazy = lazyblob::image::format::LazyManifest::from_manifest(&resolved.manifest).unwrap();
    assert_eq!(lazy.data.len(), 2);
    let stored = lazy.data.iter().map(|d| mock.store().blob(d.digest.as_ref()).unwrap());
    (
        files.into_iter().zip(stored.map(|b| b.to_vec())).collect(),
        after.upload_patches - before.upload_patches,
        after.uploads_too_large - before.uploads_too_large,
    )
}

/// A converted layer's data blob goes up while the layer converts: one upload session, its
/// bytes in one streamed PATCH, committed with the digest once known. A registry that
/// refuses that body (413) gets the finished blob again, in pieces. Either way each stored
/// blob holds its layer's file from offset 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converted_data_blob_goes_up_while_its_layer_converts() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let reg = client(&insecure_config(&[&mock.host()]));
    let (blobs, patches, refused) = convert_two_layers(&reg, &mock, "streamed", 60).await;
    for (file, blob) in blobs {
        assert_eq!(blob.len(), file.len(), "a 3 MiB file fills its blob");
        assert!(blob == file, "the data blob holds the layer's file");
    }
    assert_eq!((patches, refused), (2, 0), "one PATCH per data blob");
    assert_eq!(mock.store().open_uploads(), 0, "every session committed");
    // the same image again: the registry has both blobs, their new sessions are cancelled
    let (blobs, _, refused) = convert_two_layers(&reg, &mock, "streamed", 60).await;
    assert!(blobs.iter().all(|(file, blob)| blob == file) && refused == 0);
    let t = std::time::Instant::now();
    while mock.store().open_uploads() > 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mock.store().open_uploads(), 0, "sessions left open");

    mock.set_config(MockConfig {
        max_upload_body: Some(1 << 20),
        ..Default::default()
    });
    let (blobs, patches, refused) = convert_two_layers(&reg, &mock, "capped", 70).await;
    for (file, blob) in blobs {
        assert!(blob == file, "the data blob pushed again holds the layer's file");
    }
    // per blob: the streamed body, the whole blob in one request, its first 4 MiB piece
    assert_eq!(refused, 2 * 3);
    assert_eq!(patches, 2 * 6, "then 6 pieces of 512 KiB each");
}

/// A registry that takes a streamed body and never answers: the wait for it ends within one
/// attempt's allowance, and the finished blob is pushed again in one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_registry_never_answers_is_pushed_again() {
    let mock = MockRegistry::start(MockConfig {
        stall_streamed_uploads: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut cfg = insecure_config(&[&mock.host()]);
    cfg.request_timeout = Duration::from_millis(500);
    cfg.min_rate_kib_s = None;
    let reg = client(&cfg);
    let t = std::time::Instant::now();
    let (blobs, patches, refused) = convert_two_layers(&reg, &mock, "stalled", 80).await;
    for (file, blob) in blobs {
        assert!(blob == file, "the data blob pushed again holds the layer's file");
    }
    assert_eq!(
        (patches, refused),
        (0, 0),
        "no stream answered; one request per blob after"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "waited {:?}", t.elapsed());
}

/// A token that expires while a streamed blob is still being produced (a long layer): the
/// commit is refused (401), gets a new token and stores the blob from the one stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_commit_renews_a_token_that_expired_meanwhile() {
    use futures::SinkExt;
    let mock = token_registry(None).await;
    let reg = client(&insecure_config(&[&mock.host()]));
    let repo = parse_reference(&format!("{}/tok/app:1", mock.host())).unwrap();
    let data = bytes(90, 3 << 20);
    let (mut tx, rx) = futures::channel::mpsc::channel::<std::io::Result<Bytes>>(4);
    let push = reg.push_streamed(&repo, rx).await.unwrap();
    for piece in data.chunks(1 << 20) {
        tx.send(Ok(Bytes::copy_from_slice(piece))).await.unwrap();
    }
    drop(tx);
    let t = std::time::Instant::now();
    while mock.counters().upload_patches == 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tokens = mock.counters().token_requests;
    mock.expire_tokens();
    let d = sha256_digest(&data);
    let committed = push.commit(&d, data.len() as u64).await.unwrap();
    assert_eq!(committed, lazyblob::registry::streamed::Committed::Stored);
    assert_eq!(mock.store().blob(&d).unwrap(), data);
    let c = mock.counters();
    assert!(c.token_requests > tokens, "a new token for the commit");
    assert_eq!(c.upload_patches, 1, "the one stream, nothing pushed again");
}
