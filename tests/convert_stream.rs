//! The streaming converter where holding a layer in memory would not do: a layer with a
//! 1 GiB file converted by the `lazyblob convert` binary through Debian's docker-registry in
//! bounded memory (its peak RSS, the data blob's digest computed here independently), and
//! compression bombs (file data, non-file data, PAX headers, entry counts) stopped at their
//! limits with the layer and entry named and nothing tagged.

mod common;

use std::process::Command;

use common::oci::*;
use common::*;
use lazyblob::image::convert::{ConvertOptions, Limits};
use registry_mock::{MockConfig, MockRegistry};
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_file_converts_in_bounded_memory() {
    const SIZE: u64 = (1 << 30) + 12_345;
    const MAX_RSS_MIB: f64 = 256.0;
    let dr = DockerRegistry::start(None);
    let reg = client(&insecure_config(&[&dr.host]));
    // the layer is built streaming too: the test holds its compressed bytes only
    let mut tar = tar::Builder::new(zstd::Encoder::new(Vec::new(), 3).unwrap());
    // a pseudo-random period of about 1 MiB: not zeros, not aligned to chunks
    let period = bytes(7, 1_048_573);
    let mut h = header(tar::EntryType::Regular, 0o644, SIZE);
    tar.append_data(&mut h, "models/weights.bin", Pattern::new(&period, 0, SIZE))
        .unwrap();
    let mut h = header(tar::EntryType::Regular, 0o644, 5);
    tar.append_data(&mut h, "etc/hostname", &b"node\n"[..]).unwrap();
    let layer = tar.into_inner().unwrap().finish().unwrap();
    assert!(layer.len() < 64 << 20, "source layer of {} bytes", layer.len());
    let src = format!("{}/src/big:v1", dr.host);
    let dst = format!("{}/lazy/big:v1", dr.host);
    push_source(&reg, &src, &[(layer, "application/vnd.oci.image.layer.v1.tar+zstd")]).await;

    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let config = dir.path().join("lazyblob.toml");
    std::fs::write(
        &config,
        format!("[[registry.hosts]]\nhost = \"{}\"\ninsecure = true\n", dr.host),
    )
    .unwrap();
    let out = common::procs::run_ok(
        Command::new(env!("CARGO_BIN_EXE_lazyblob"))
            .args(["convert", &src, &dst, "--config"])
            .arg(&config)
            .arg("--work-dir")
            .arg(&work),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let peak = convert_peak_rss(&stderr);
    eprintln!("converted a {SIZE}-byte file with a peak RSS of {peak:.1} MiB");
    assert!(peak < MAX_RSS_MIB, "peak RSS {peak} MiB converting a 1 GiB file");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "spool files left behind");

    // the data blob is the file padded to a whole block: its digest, computed here
    let mut expected = Sha256::new();
    std::io::copy(&mut Pattern::new(&period, 0, SIZE), &mut DigestWriter(&mut expected)).unwrap();
    expected.update(vec![0u8; (SIZE.next_multiple_of(4096) - SIZE) as usize]);
    let expected = format!("sha256:{}", hex::encode(expected.finalize()));
    let m = lazy_manifest(&reg, &dst).await;
    assert_eq!(m.data.len(), 1);
    assert_eq!(m.data[0].digest.to_string(), expected);
    assert_eq!(m.data[0].size, SIZE.next_multiple_of(4096));
}

/// A gzip layer compressed as hard as a bomb's maker would (the helper's fast level leaves
/// 300 MiB of zeros at 3 MB with zlib-rs).
fn gzip_best(tar: &[u8]) -> (Vec<u8>, &'static str) {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(tar).unwrap();
    (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
}

struct DigestWriter<'a>(&'a mut Sha256);

impl std::io::Write for DigestWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_bombs_stop_at_their_limits() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let small = ConvertOptions {
        limits: Limits {
            max_layer: 64 << 20,
            ..Limits::default()
        },
        ..Default::default()
    };

    // 300 MiB of zeros in a file: refused at its header, before any of it is read
    let mut l = Layer::new();
    l.file("ok", 0o644, b"fine")
        .file("bomb.bin", 0o644, &vec![0u8; 300 << 20]);
    let gz = gzip_best(&l.tar());
    assert!(gz.0.len() < 2 << 20);
    convert_refused(
        &reg,
        &host,
        "file-bomb",
        &[gz],
        &small,
        &["layer 0", "bomb.bin", "limit"],
    )
    .await;

    // 300 MiB of data behind a directory entry (never file data): stopped while reading it
    let mut h = header(tar::EntryType::Directory, 0o755, 300 << 20);
    h.set_path("hollow").unwrap();
    h.set_cksum();
    let mut t = h.as_bytes().to_vec();
    t.resize(512 + (300 << 20), 0);
    t.extend_from_slice(&[0u8; 1024]);
    let gz = gzip_best(&t);
    convert_refused(
        &reg,
        &host,
        "dir-bomb",
        &[gz],
        &small,
        &["layer 0", "hollow", "expands past the limit"],
    )
    .await;

    // an 8 MiB PAX header (the tar crate would hold it whole) in front of a tiny file
    let mut pax = header(tar::EntryType::XHeader, 0o644, 8 << 20);
    pax.set_path("PaxHeaders/x").unwrap();
    pax.set_cksum();
    let mut t = pax.as_bytes().to_vec();
    let record = b"30 SCHILY.xattr.user.a=aaaaaa\n";
    while t.len() < 512 + (8 << 20) {
        t.extend_from_slice(record);
    }
    t.truncate(512 + (8 << 20));
    let mut l = Layer::new();
    l.file("x", 0o644, b"x");
    t.extend_from_slice(&l.tar());
    let zst = compress(&t, Compression::Zstd);
    convert_refused(
        &reg,
        &host,
        "pax-bomb",
        &[zst],
        &ConvertOptions::default(),
        &["layer 0", "headers", "limit of 1048576"],
    )
    .await;

    // a layer announcing more bytes than it may expand to: refused before it is fetched
    let mut l = Layer::new();
    l.file("x", 0o644, &bytes(3, 200_000));
    let tiny = ConvertOptions {
        limits: Limits {
            max_layer: 64 << 10,
            ..Limits::default()
        },
        ..Default::default()
    };
    convert_refused(
        &reg,
        &host,
        "announced",
        &[compress(&l.tar(), Compression::None)],
        &tiny,
        &["layer 0", "exceed the limit"],
    )
    .await;

    // more entries than allowed
    let mut l = Layer::new();
    for i in 0..200 {
        l.file(&format!("f{i}"), 0o644, b"");
    }
    let few = ConvertOptions {
        limits: Limits {
            max_entries: 100,
            ..Limits::default()
        },
        ..Default::default()
    };
    convert_refused(
        &reg,
        &host,
        "entries",
        &[compress(&l.tar(), Compression::Gzip)],
        &few,
        &["layer 0", "more than 100 entries"],
    )
    .await;
}
