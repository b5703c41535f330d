//! Chunk tables, manifests of every version, hostile input.
use super::*;

#[test]
fn chunk_table_round_trip_and_validation() {
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let b = BlobChunks::of(&data, 4096, ChunkDigest::Blake3);
    assert_eq!(b.chunks.len(), 3 * 64);
    let t = ChunkTable {
        version: 1,
        chunk_size: 4096,
        chunk_digest: ChunkDigest::Blake3,
        leaf_size: None,
        blobs: vec![b.clone()],
    };
    let parsed = ChunkTable::parse(&t.to_json()).unwrap();
    assert_eq!(parsed, t);
    let d = parsed.blobs[0].digests(4096).unwrap();
    assert_eq!(d[2], *blake3::hash(&data[8192..]).as_bytes());

    // a table without `chunk_digest` (the first format-1 images) is SHA-256
    let old = BlobChunks::of(&data, 4096, ChunkDigest::Sha256);
    let json = format!(
        r#"{{"version":1,"chunk_size":4096,"blobs":[{{"digest":"{}","size":10000,"chunks":"{}"}}]}}"#,
        old.digest, old.chunks
    );
    let parsed = ChunkTable::parse(json.as_bytes()).unwrap();
    assert_eq!(parsed.chunk_digest, ChunkDigest::Sha256);
    assert_eq!(
        parsed.blobs[0].digests(4096).unwrap()[2].to_vec(),
        Sha256::digest(&data[8192..]).to_vec()
    );
    assert!(ChunkTable::parse(br#"{"version":1,"chunk_size":4096,"chunk_digest":"md5","blobs":[]}"#).is_err());

    // leaves: BLAKE3 only, a power of two up to half a chunk
    let with_leaves = |digest: &str, leaf: u64| {
        format!(r#"{{"version":1,"chunk_size":65536,"chunk_digest":"{digest}","leaf_size":{leaf},"blobs":[]}}"#)
    };
    assert_eq!(
        ChunkTable::parse(with_leaves("blake3", 16384).as_bytes())
            .unwrap()
            .leaf_size,
        Some(16384)
    );
    for (digest, leaf) in [
        ("sha256", 16384),
        ("blake3", 65536),
        ("blake3", 12288),
        ("blake3", 1024),
    ] {
        assert!(
            ChunkTable::parse(with_leaves(digest, leaf).as_bytes()).is_err(),
            "{digest} {leaf}"
        );
    }

    let mut short = t.clone();
    short.blobs[0].chunks.truncate(64);
    assert!(ChunkTable::parse(&short.to_json()).is_err());
    let mut odd = t.clone();
    odd.chunk_size = 5000;
    assert!(ChunkTable::parse(&odd.to_json()).is_err());
    assert!(ChunkTable::parse(b"{not json").is_err());
    let mut huge = t;
    huge.blobs[0].size = u64::MAX;
    assert!(ChunkTable::parse(&huge.to_json()).is_err());
}

proptest::proptest! {
    /// Hostile tables and manifests: arbitrary bytes and arbitrary JSON with the right
    /// shape are errors or valid values, never panics.
    #[test]
    fn parsers_never_panic_on_hostile_input(
        raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        digest in "\\PC{0,80}",
        size in proptest::prelude::any::<i64>(),
        chunk_size in proptest::prelude::any::<u64>(),
        chunks in "[0-9a-fA-Z]{0,200}",
    ) {
        let _ = ChunkTable::parse(&raw);
        let table = format!(
            r#"{{"version":1,"chunk_size":{chunk_size},"blobs":[{{"digest":{},"size":{},"chunks":"{chunks}"}}]}}"#,
            serde_json::to_string(&digest).unwrap(),
            size.unsigned_abs()
        );
        let _ = ChunkTable::parse(table.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"sha256:00","size":1}},
               "annotations":{{"{ANNOTATION_FORMAT}":"{FORMAT_VERSION}"}},
               "layers":[{{"mediaType":"{MEDIA_TYPE_DATA}","digest":{},"size":{size}}}]}}"#,
            serde_json::to_string(&digest).unwrap()
        );
        if let Ok(m) = serde_json::from_str::<OciImageManifest>(&manifest) {
            let _ = LazyManifest::from_manifest(&m);
        }
    }
}

#[test]
fn version_1_images_are_still_read() {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let manifest = |version: &str, types: [&str; 3]| {
        let layers: Vec<serde_json::Value> = types
            .iter()
            .zip(['a', 'b', 'c'])
            .map(|(t, c)| serde_json::json!({"mediaType": t, "digest": d(c), "size": 10}))
            .collect();
        let m = serde_json::json!({"schemaVersion": 2, "config": {"mediaType": "x", "digest": d('f'), "size": 1},
            "annotations": {ANNOTATION_FORMAT: version}, "layers": layers});
        serde_json::from_value::<OciImageManifest>(m).unwrap()
    };
    let v1 = [V1_MEDIA_TYPE_META, V1_MEDIA_TYPE_CHUNKS, V1_MEDIA_TYPE_DATA];
    let v2 = [MEDIA_TYPE_META, MEDIA_TYPE_CHUNKS, MEDIA_TYPE_DATA];
    assert_eq!(LazyManifest::from_manifest(&manifest("1", v1)).unwrap().data.len(), 1);
    assert_eq!(LazyManifest::from_manifest(&manifest("2", v2)).unwrap().data.len(), 1);
    assert!(LazyManifest::from_manifest(&manifest("2", v1)).is_err());
    assert!(LazyManifest::from_manifest(&manifest("4", v2)).is_err());
    // format 3: the version 2 layers and a leaves layer, only there
    let v3 = [MEDIA_TYPE_META, MEDIA_TYPE_CHUNKS, MEDIA_TYPE_LEAVES];
    assert!(LazyManifest::from_manifest(&manifest("3", v3))
        .unwrap()
        .leaves
        .is_some());
    assert!(LazyManifest::from_manifest(&manifest("2", v3)).is_err());
    assert!(LazyManifest::from_manifest(&manifest("3", v2))
        .unwrap()
        .leaves
        .is_none());
    // containerd treats version 2 layers as layers
    assert!(v2.iter().all(|t| t.starts_with("application/vnd.oci.image.layer.")));
}

#[test]
fn fsid_and_tag() {
    let d = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    assert_eq!(fsid_for(&d), format!("lb-{}", "ab".repeat(16)));
    assert_eq!(device_tag(&d).len(), 64);
}
