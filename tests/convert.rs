//! `lazyblob convert` end to end on this machine's real kernel: source images pushed to
//! Debian's docker-registry, converted, checked by fsck.erofs, mounted file-backed with
//! `device=` and compared entry by entry with an independent unpack (skopeo + GNU tar).
//! Hostile layers end with errors naming the entry and leave the destination tag untouched.

mod common;

use std::path::Path;

use common::oci::*;
use common::*;
use lazyblob::image::convert::{convert, ConvertOptions, Location};
use lazyblob::image::format::{ChunkTable, LazyManifest};
use lazyblob::registry::{parse_reference, BlobSource, Registry};
use registry_mock::{Fault, FaultRule, MockConfig, MockRegistry};

/// Fetch a converted image, check it with fsck.erofs, mount it file-backed.
async fn fetch_and_mount(reg: &Registry, reference: &str, work: &Path) -> Mounted {
    let r = parse_reference(reference).unwrap();
    let resolved = reg.resolve(&r).await.unwrap();
    let lazy = LazyManifest::from_manifest(&resolved.manifest).unwrap();
    let get = |d: &lazyblob::image::format::BlobRef| {
        let src = BlobSource {
            repo: r.clone(),
            digest: d.digest.clone(),
            size: d.size,
        };
        async move { reg.fetch_blob(&src).await.unwrap() }
    };
    let meta = work.join("meta.erofs");
    std::fs::write(&meta, get(&lazy.meta).await).unwrap();
    let table = ChunkTable::parse(&get(&lazy.table).await).unwrap();
    let mut devices = Vec::new();
    for (i, d) in lazy.data.iter().enumerate() {
        let p = work.join(format!("data-{i}"));
        let data = get(d).await;
        // the chunk table describes exactly these bytes
        let entry = table.blobs.iter().find(|b| b.digest == d.digest).expect("table entry");
        assert_eq!(
            lazyblob::image::format::BlobChunks::of(&data, table.chunk_size, table.chunk_digest).chunks,
            entry.chunks
        );
        std::fs::write(&p, data).unwrap();
        devices.push(p);
    }
    require_tool("fsck.erofs", "erofs-utils");
    let mut fsck = std::process::Command::new("fsck.erofs");
    for d in &devices {
        fsck.arg(format!("--device={}", d.display()));
    }
    // fsck.erofs accepts the metadata blob
    common::procs::run_ok(fsck.arg(&meta));
    mount_erofs(&meta, &devices, &work.join("mnt"))
}

async fn round_trip(dr: &DockerRegistry, reg: &Registry, name: &str, layers: &[(Vec<u8>, &str)]) -> String {
    let work = tempfile::tempdir().unwrap();
    let src = format!("{}/src/{name}:v1", dr.host);
    let dst = format!("{}/lazy/{name}:v1", dr.host);
    push_source(reg, &src, layers).await;
    let report = convert_ref(reg, &src, &dst).await;
    let data_blobs = lazy_manifest(reg, &dst).await.data.len();
    assert_eq!(
        report.blobs_streamed, data_blobs,
        "every data blob went up while converted"
    );
    let reference = walk(&skopeo_unpack(&src, work.path()));
    let m = fetch_and_mount(reg, &dst, work.path()).await;
    let ours = walk(&m.dir);
    assert!(!reference.is_empty());
    assert_same_tree(&ours, &reference);
    report.digest
}

fn registry_for(dr: &DockerRegistry) -> Registry {
    client(&insecure_config(&[&dr.host]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_layer_whiteouts_links_devices_xattrs() {
    require_root();
    let dr = DockerRegistry::start(None);
    let reg = registry_for(&dr);
    let big = bytes(1, 3 << 20);
    let mut l1 = Layer::new();
    l1.dir("etc", 0o755)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("var", 0o755)
        .dir("var/lib", 0o750)
        .dir("var/lib/app", 0o700)
        .dir("opq", 0o755)
        .dir("opq/sub", 0o755)
        .dir("tmp", 0o1777)
        .dir("dev", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/gone", 0o600, b"to be whited out")
        .file("usr/bin/tool", 0o4755, &bytes(2, 50_000))
        .file("usr/bin/big", 0o755, &big)
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .symlink("etc/link", "passwd")
        .symlink("abs", "/usr/bin/tool")
        .device("dev/null", false, 1, 3)
        .device("dev/sda", true, 8, 0)
        .fifo("dev/pipe")
        .file_owned("var/lib/app/data", 0o640, 1000, 1000, &bytes(3, 9000))
        .file_xattrs(
            "usr/bin/ping",
            0o755,
            &bytes(4, 7000),
            &[
                (
                    "security.capability",
                    &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ),
                ("user.note", b"hello"),
            ],
        )
        .file("opq/a", 0o644, b"a")
        .file("opq/b", 0o644, &bytes(5, 6000))
        .file("opq/sub/c", 0o644, b"c");
    let mut l2 = Layer::new();
    l2.dir("etc", 0o755)
        .file("etc/.wh.gone", 0o644, b"")
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0::/root:/bin/bash\nuser:x:1000:1000::/home:/bin/sh\n",
        )
        .dir("opq", 0o755)
        .file("opq/.wh..wh..opq", 0o644, b"")
        .file("opq/new", 0o644, &bytes(6, 5000))
        .dir("layer2", 0o755)
        .file("layer2/file", 0o644, &bytes(7, 100_000));
    let mut l3 = Layer::new();
    l3.dir("var", 0o755)
        .file("var/.wh.lib", 0o644, b"")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .hardlink("usr/bin/tool3", "usr/bin/tool")
        .file("usr/bin/small", 0o755, b"#!/bin/sh\necho hi\n");
    let layers = vec![
        compress(&l1.tar(), Compression::Gzip),
        compress(&l2.tar(), Compression::Zstd),
        compress(&l3.tar(), Compression::None),
    ];
    let digest = round_trip(&dr, &reg, "multi", &layers).await;

    // deterministic: converting again (to another tag and to an OCI layout) gives the same digest
    let src: Location = format!("{}/src/multi:v1", dr.host).parse().unwrap();
    let again = convert(
        &reg,
        &src,
        &format!("{}/lazy/multi:again", dr.host).parse().unwrap(),
        &ConvertOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(again.digest, digest);
    assert_eq!(
        again.blobs_streamed, 0,
        "the registry had every data blob: none waited for"
    );
    let layout = tempfile::tempdir().unwrap();
    let dst: Location = format!("oci:{}:v1", layout.path().display()).parse().unwrap();
    let to_layout = convert(&reg, &src, &dst, &ConvertOptions::default()).await.unwrap();
    assert_eq!(to_layout.digest, digest);
    assert_eq!(to_layout.blobs_streamed, 0, "a layout links its files");
    // every blob of the layout (data blobs are linked in from their spool files) is what its
    // name says, and no temporary file is left
    for e in std::fs::read_dir(layout.path().join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let data = std::fs::read(e.path()).unwrap();
        assert_eq!(lazyblob::registry::sha256_digest(&data), format!("sha256:{name}"));
    }
    // the converted config keeps the source's entrypoint and env and names the new layers
    let r = parse_reference(&format!("{}/lazy/multi:v1", dr.host)).unwrap();
    let m = reg.resolve(&r).await.unwrap().manifest;
    let cfg = reg
        .fetch_blob(&BlobSource {
            repo: r.clone(),
            digest: m.config.digest.parse().unwrap(),
            size: m.config.size as u64,
        })
        .await
        .unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
    assert_eq!(cfg["config"]["Entrypoint"][0], "/bin/app");
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), m.layers.len());
    // metadata, table, leaves, and one data blob per layer that stores file data (layer 3
    // holds only an inline script and a hard link)
    assert_eq!(m.layers.len(), 3 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_small_files() {
    require_root();
    let dr = DockerRegistry::start(None);
    let reg = registry_for(&dr);
    let mut l = Layer::new();
    for d in 0..200 {
        l.dir(&format!("d{d:03}"), 0o755);
        for f in 0..101 {
            let len = (d * 131 + f * 17) % 5000;
            l.file(
                &format!("d{d:03}/file-{f:03}.txt"),
                0o644,
                &bytes((d * 1000 + f) as u64, len),
            );
        }
    }
    let layers = vec![compress(&l.tar(), Compression::Gzip)];
    round_trip(&dr, &reg, "many", &layers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_sparse_looking_file() {
    require_root();
    let dr = DockerRegistry::start(None);
    let reg = registry_for(&dr);
    let mut data = vec![0u8; 256 << 20];
    for (i, at) in [0usize, 7 << 20, 100 << 20, (256 << 20) - 5000].iter().enumerate() {
        let piece = bytes(i as u64, 5000);
        data[*at..*at + 5000].copy_from_slice(&piece);
    }
    let mut l = Layer::new();
    l.dir("data", 0o755).file("data/disk.img", 0o644, &data);
    let layers = vec![compress(&l.tar(), Compression::None)];
    round_trip(&dr, &reg, "large", &layers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_are_contained_or_refused() {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));

    // contained: `..`, absolute paths and paths through symlinks stay inside the image
    let mut l1 = Layer::new();
    l1.raw_file(b"../../etc/evil", b"evil").raw_file(b"/abs/file", b"abs");
    l1.symlink("escape", "../../../../../tmp/outside")
        .symlink("rooted", "/srv");
    let mut l2 = Layer::new();
    l2.file("escape/pwned", 0o644, b"inside").file("rooted/x", 0o644, b"x");
    let layers = vec![
        compress(&l1.tar(), Compression::None),
        compress(&l2.tar(), Compression::Gzip),
    ];
    let src = format!("{host}/src/contained:v1");
    let dst = format!("{host}/lazy/contained:v1");
    push_source(&reg, &src, &layers).await;
    convert_ref(&reg, &src, &dst).await;
    let work = tempfile::tempdir().unwrap();
    let m = fetch_and_mount(&reg, &dst, work.path()).await;
    assert_eq!(std::fs::read(m.dir.join("etc/evil")).unwrap(), b"evil");
    assert_eq!(std::fs::read(m.dir.join("abs/file")).unwrap(), b"abs");
    assert_eq!(std::fs::read(m.dir.join("tmp/outside/pwned")).unwrap(), b"inside");
    assert_eq!(std::fs::read(m.dir.join("srv/x")).unwrap(), b"x");
    assert!(!Path::new("/tmp/outside/pwned").exists());
    drop(m);

    // refused: an absurd size, a truncated archive, a corrupt gzip stream, a dangling hard link
    let mut huge = header(tar::EntryType::Regular, 0o644, 1 << 40);
    huge.set_path("huge.bin").unwrap();
    huge.set_cksum();
    let mut t = huge.as_bytes().to_vec();
    t.extend_from_slice(&[0u8; 4096]);
    convert_refused(
        &reg,
        &host,
        "huge",
        &[(t, "application/vnd.oci.image.layer.v1.tar")],
        &ConvertOptions::default(),
        &["layer 0", "huge.bin", "exceeds"],
    )
    .await;

    let mut l = Layer::new();
    l.file("ok.txt", 0o644, b"fine")
        .file("cut.bin", 0o644, &bytes(9, 100_000));
    let mut t = l.tar();
    t.truncate(60_000);
    convert_refused(
        &reg,
        &host,
        "truncated",
        &[(t, "application/vnd.oci.image.layer.v1.tar")],
        &ConvertOptions::default(),
        &["layer 0", "cut.bin"],
    )
    .await;

    let mut l = Layer::new();
    l.file("a", 0o644, &bytes(10, 50_000));
    let (mut gz, mt) = compress(&l.tar(), Compression::Gzip);
    let n = gz.len();
    for b in gz[20..n - 8].iter_mut() {
        *b ^= 0x55;
    }
    convert_refused(
        &reg,
        &host,
        "corrupt",
        &[(gz, mt)],
        &ConvertOptions::default(),
        &["layer 0"],
    )
    .await;

    let mut l = Layer::new();
    l.hardlink("link", "no/such/file");
    convert_refused(
        &reg,
        &host,
        "dangling",
        &[compress(&l.tar(), Compression::None)],
        &ConvertOptions::default(),
        &["layer 0", "link", "not found"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_platforms_produces_an_index() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let mut digests = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let mut l = Layer::new();
        l.file("arch", 0o644, arch.as_bytes())
            .file("blob", 0o644, &bytes(i as u64, 20_000));
        digests.push((
            push_source(
                &reg,
                &format!("{host}/src/multi:{arch}"),
                &[compress(&l.tar(), Compression::Gzip)],
            )
            .await,
            arch,
        ));
    }
    let entries: Vec<_> = digests
        .iter()
        .map(|(d, a)| serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": 1, "platform": {"os": "linux", "architecture": a}}))
        .collect();
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries});
    let src = format!("{host}/src/multi:latest");
    reg.push_manifest(
        &parse_reference(&src).unwrap(),
        bytes::Bytes::from(serde_json::to_vec(&index).unwrap()),
        "application/vnd.oci.image.index.v1+json",
    )
    .await
    .unwrap();
    let dst = format!("{host}/lazy/multi:latest");
    let opts = ConvertOptions {
        all_platforms: true,
        ..Default::default()
    };
    convert(&reg, &src.parse().unwrap(), &dst.parse().unwrap(), &opts)
        .await
        .unwrap();
    let (raw, _) = reg.fetch_manifest_raw(&parse_reference(&dst).unwrap()).await.unwrap();
    let out: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let ms = out["manifests"].as_array().unwrap();
    assert_eq!(ms.len(), 2);
    for m in ms {
        let r = parse_reference(&format!("{dst}@{}", m["digest"].as_str().unwrap()).replace(":latest@", "@")).unwrap();
        let resolved = reg.resolve(&r).await.unwrap();
        LazyManifest::from_manifest(&resolved.manifest).unwrap();
    }
    // the default converts only this node's platform into a single manifest
    let single = format!("{host}/lazy/multi:single");
    convert_ref(&reg, &src, &single).await;
    let resolved = reg.resolve(&parse_reference(&single).unwrap()).await.unwrap();
    assert!(LazyManifest::from_manifest(&resolved.manifest).is_ok());
}

/// A destination that refuses a layer's data blob fails the conversion while the next layer
/// converts, and nothing is tagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_blob_the_destination_refuses_fails_the_conversion() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let layers: Vec<_> = (0..3u64)
        .map(|i| {
            let mut l = Layer::new();
            l.file(&format!("f{i}"), 0o644, &bytes(40 + i, 700_000));
            compress(&l.tar(), Compression::Gzip)
        })
        .collect();
    let (src, dst) = (format!("{host}/src/big:v1"), format!("{host}/lazy/big:v1"));
    push_source(&reg, &src, &layers).await;
    // bodies up to 100 KiB: the manifest, config and metadata pass; no data blob does, in one
    // request or in pieces
    mock.set_config(MockConfig {
        max_upload_body: Some(100 << 10),
        ..Default::default()
    });
    // each layer's download starts late: the first blob is refused while the second layer
    // downloads, which then stops midway (its decoder must not wait for it forever)
    mock.set_faults(vec![FaultRule::always(Fault::Latency(
        std::time::Duration::from_millis(300),
    ))]);
    let err = convert(
        &reg,
        &src.parse().unwrap(),
        &dst.parse().unwrap(),
        &ConvertOptions::default(),
    )
    .await
    .expect_err("a refused data blob must fail the conversion");
    assert!(err.to_string().contains("413"), "{err}");
    assert!(
        mock.counters().uploads_too_large >= 3,
        "the blob, then its pieces, were refused"
    );
    assert!(
        reg.resolve(&parse_reference(&dst).unwrap()).await.is_err(),
        "nothing may be tagged at {dst} after a failure"
    );
}
