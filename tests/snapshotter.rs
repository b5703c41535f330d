//! The snapshotter's gRPC service driven directly (as containerd would call it), against the
//! real daemon on this machine's kernel and registry-mock in its fault and hostile modes:
//! every bad Prepare gets a clear gRPC error with the code containerd acts on, and the
//! service keeps serving.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::DaemonProc;
use common::*;
use lazyblob::image::format::{ANNOTATION_LAYER, MEDIA_TYPE_META};
use lazyblob::snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use lazyblob::snapshotter::api::snapshots::{
    CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use lazyblob::snapshotter::remote::{LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_REF};
use registry_mock::{HostileImage, MockConfig, MockRegistry};
use tonic::Code;

type Client = SnapshotsClient<tonic::transport::Channel>;

async fn connect(socket: &Path) -> Client {
    SnapshotsClient::new(common::containerd::unix_channel(socket).await.unwrap())
}

/// The labels containerd's CRI plugin gives a lazyblob layer.
fn layer_labels(image: &str, manifest: &str, layer: &str) -> HashMap<String, String> {
    [
        (LABEL_REF, format!("sha256:{}", "c".repeat(64))),
        (ANNOTATION_LAYER, "meta".into()),
        (LABEL_IMAGE_REF, image.into()),
        (LABEL_MANIFEST, manifest.into()),
        (LABEL_LAYER, layer.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn prepare(
    c: &mut Client,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    c.prepare(PrepareSnapshotRequest {
        snapshotter: "lazyblob".into(),
        key: key.into(),
        parent: parent.into(),
        labels,
    })
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_prepares_get_clear_grpc_errors_and_the_service_keeps_serving() {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    // a lazyblob image, a plain image, and one whose metadata layer is corrupt
    let good_manifest = push_image(&reg, &host, "good/app:v1", &build_files(&mixed_files(5, 4, &[]), 1)).await;
    let good_meta = HostileImage::from_store(mock.store(), "good/app", "v1").layer_digest_of(MEDIA_TYPE_META, 0);
    let plain_manifest = oci::push_source(
        &reg,
        &format!("{host}/plain/app:v1"),
        &[oci::compress(b"not a tar", oci::Compression::None)],
    )
    .await;
    let corrupt_manifest = push_image(&reg, &host, "corrupt/app:v1", &build_files(&mixed_files(6, 4, &[]), 1)).await;
    let mut corrupt = HostileImage::from_store(mock.store(), "corrupt/app", "v1");
    let meta = corrupt.layer_digest_of(MEDIA_TYPE_META, 0);
    let mut wrong = mock.store().blob(&meta).unwrap().to_vec();
    wrong[1500] ^= 0xff; // same size, one byte off: a digest mismatch
    corrupt.serve_blob_as(&meta, wrong);

    let work = tempfile::tempdir().unwrap();
    let sock = work.path().join("d/snapshotter.sock");
    let d = DaemonProc::start_with(
        &work.path().join("d"),
        &[&host, "127.0.0.1:1"],
        &format!(
            "frontend = \"fanotify\"\n[snapshotter]\nsocket = \"{}\"",
            sock.display()
        ),
        "deadline_ms = 2000\nrequest_timeout_ms = 1000\nmax_attempts = 2",
    );
    common::containerd::wait_for_socket(&sock, &d);
    let mut c = connect(&sock).await;
    let any_layer = format!("sha256:{}", "d".repeat(64));

    let cases: Vec<(&str, HashMap<String, String>, Code, &str)> = vec![
        (
            "not a lazyblob image",
            layer_labels(&format!("{host}/plain/app:v1"), &plain_manifest, &any_layer),
            Code::FailedPrecondition,
            "not a lazyblob image",
        ),
        (
            "corrupt metadata layer",
            layer_labels(&format!("{host}/corrupt/app:v1"), &corrupt_manifest, &meta),
            Code::FailedPrecondition,
            "digest mismatch",
        ),
        (
            "registry down",
            layer_labels(
                "127.0.0.1:1/down/app:v1",
                &format!("sha256:{}", "e".repeat(64)),
                &any_layer,
            ),
            Code::FailedPrecondition,
            "127.0.0.1:1",
        ),
        (
            "no CRI labels",
            [(LABEL_REF, "sha256:x"), (ANNOTATION_LAYER, "meta")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            Code::FailedPrecondition,
            "disable_snapshot_annotations",
        ),
        (
            "a manifest digest that names a path",
            layer_labels(&format!("{host}/good/app:v1"), "sha256:../../../etc/passwd", &any_layer),
            Code::FailedPrecondition,
            "cri.manifest-digest",
        ),
    ];
    for (i, (what, labels, code, says)) in cases.into_iter().enumerate() {
        let t0 = Instant::now();
        let e = prepare(&mut c, &format!("extract-{i}"), "", labels)
            .await
            .expect_err(what);
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(
            e.message().contains(says),
            "{what}: {:?} does not say {says:?}",
            e.message()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            t0.elapsed()
        );
        // nothing is left behind by a refused Prepare
        let st = c
            .stat(StatSnapshotRequest {
                snapshotter: "lazyblob".into(),
                key: format!("extract-{i}"),
            })
            .await;
        assert_eq!(
            st.map(|_| ()).unwrap_err().code(),
            Code::NotFound,
            "{what}: a snapshot was left"
        );
    }

    // keys containerd never created
    let e = c
        .mounts(MountsRequest {
            snapshotter: "lazyblob".into(),
            key: "never-created".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .remove(RemoveSnapshotRequest {
            snapshotter: "lazyblob".into(),
            key: "never-created".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = prepare(&mut c, "child", "never-committed", HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // still serving: a good lazyblob layer commits remotely, a plain snapshot prepares
    let good = layer_labels(&format!("{host}/good/app:v1"), &good_manifest, &good_meta);
    let e = prepare(&mut c, "extract-good", "", good).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    prepare(&mut c, "plain", "", HashMap::new()).await.unwrap();
    c.commit(CommitSnapshotRequest {
        snapshotter: "lazyblob".into(),
        name: "plain-committed".into(),
        key: "plain".into(),
        labels: HashMap::new(),
        parent: String::new(),
    })
    .await
    .unwrap();
    let e = c
        .remove(RemoveSnapshotRequest {
            snapshotter: "lazyblob".into(),
            key: "plain-committed".into(),
        })
        .await;
    assert!(e.is_ok(), "{e:?}");
}
