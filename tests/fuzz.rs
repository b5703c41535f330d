//! Time-bounded mutation fuzzing of every parser that reads hostile bytes, run by the test
//! command (`cargo fuzz` needs a nightly toolchain the CI machine does not have; this is the
//! stable equivalent). Each target starts from valid seeds and feeds mutants (bit flips,
//! byte overwrites, inserts, deletes, truncations, splices, interesting integers) to:
//! the cachefiles message parser, the fanotify event parser, manifests and chunk tables, and
//! the tar/gzip/zstd layer reader; the EROFS writer is fuzzed by round trip (random trees
//! written, then extracted by erofs-utils' `fsck.erofs` and compared).
//!
//! Zero panics is the pass condition: a panic prints the target and the input in hex.
//! `LAZYBLOB_FUZZ_SECS` sets the budget of each target (default 8 s); `LAZYBLOB_FUZZ_SEED`
//! replays a run. The executions run are printed.

mod common;

use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use common::*;
use lazyblob::config::LimitsConfig;
use lazyblob::frontend::cachefiles::protocol::{Header, Message};
use lazyblob::frontend::fanotify::event;
use lazyblob::image::format::{BlobChunks, ChunkDigest, ChunkTable, LazyManifest};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn budget() -> Duration {
    let secs = std::env::var("LAZYBLOB_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    Duration::from_secs_f64(secs)
}

fn rng(target: &str) -> (StdRng, u64) {
    let seed = std::env::var("LAZYBLOB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("fuzz {target}: seed {seed}");
    (StdRng::seed_from_u64(seed), seed)
}

/// One mutant of `input`, possibly spliced with `other`.
fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = b.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                b[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                b.drain(i..i + n);
            }
            4 if len > 0 => b.truncate(rng.random_range(0..len)),
            5 if !other.is_empty() => {
                let i = rng.random_range(0..=len);
                let j = rng.random_range(0..other.len());
                let n = rng.random_range(1..=(other.len() - j).min(256));
                b.splice(i.., other[j..j + n].iter().copied());
            }
            6 if len >= 8 => {
                // an interesting integer at a 4-aligned place: sizes and offsets
                let i = rng.random_range(0..len / 4) * 4;
                let v: u64 = [0, 1, u64::MAX, u32::MAX as u64, 1 << 31, 1 << 63, len as u64][rng.random_range(0..7)];
                let w = (len - i).min(8);
                b[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            _ => {}
        }
    }
    b
}

/// Run `parse` on mutants of `seeds` for the budget; returns executions. A panic fails the
/// test with the input that caused it.
fn fuzz(target: &str, seeds: &[Vec<u8>], mut parse: impl FnMut(&[u8])) -> u64 {
    let (mut rng, seed) = rng(target);
    let (t0, limit) = (Instant::now(), budget());
    let mut runs = 0u64;
    let mut corpus: Vec<Vec<u8>> = seeds.to_vec();
    while t0.elapsed() < limit {
        let a = &corpus[rng.random_range(0..corpus.len())];
        let b = &corpus[rng.random_range(0..corpus.len())];
        let input = mutate(&mut rng, a, b);
        if catch_unwind(AssertUnwindSafe(|| parse(&input))).is_err() {
            panic!(
                "fuzz {target}: panic on input (seed {seed}, run {runs}): {}",
                hex::encode(&input)
            );
        }
        runs += 1;
        // keep some mutants as new starting points (bounded)
        if runs % 16 == 0 && corpus.len() < 256 {
            corpus.push(input);
        }
    }
    eprintln!("fuzz {target}: {runs} executions, no panic");
    runs
}

#[test]
fn cachefiles_messages() {
    let h = |id| Header {
        msg_id: id,
        object_id: 7,
    };
    let seeds: Vec<Vec<u8>> = [
        Message::Open {
            header: h(1),
            volume_key: b"erofs,lb-0123".to_vec(),
            cookie_key: b"lb-0123".to_vec(),
            fd: 5,
            flags: 0,
        },
        Message::Read {
            header: h(2),
            offset: 1 << 20,
            len: 4096,
        },
        Message::Close { header: h(3) },
    ]
    .iter()
    .map(Message::encode)
    .collect();
    assert!(
        fuzz("cachefiles", &seeds, |b| {
            let _ = Message::parse(b);
        }) > 0
    );
}

#[test]
fn fanotify_events() {
    let ev = |fd, range| event::Event {
        mask: event::FAN_PRE_ACCESS,
        fd,
        pid: 42,
        range,
    };
    let one = event::encode(&ev(9, Some((4096, 131072))));
    let batch = [one.clone(), event::encode(&ev(10, None)), one.clone()].concat();
    assert!(
        fuzz("fanotify", &[one, batch], |b| {
            let _ = event::parse(b);
        }) > 0
    );
}

#[test]
fn manifests_and_chunk_tables() {
    let img = build_files(&mixed_files(3, 4, &[1]), 2);
    let config = lazyblob::image::build::minimal_config(&lazyblob::registry::platform::Platform::current());
    let manifest = lazyblob::image::build::assemble(&img, &config)
        .unwrap()
        .manifest
        .to_vec();
    let table = img.table.to_json();
    let limits = LimitsConfig::default();
    let chunks = BlobChunks::of(&bytes(4, 100_000), 4096, ChunkDigest::Blake3);
    assert!(
        fuzz("manifest+table", &[manifest, table, chunks_json(&chunks)], |b| {
            let _ = ChunkTable::parse_within(b, &limits);
            if let Ok(m) = serde_json::from_slice::<oci_client::manifest::OciImageManifest>(b) {
                let _ = LazyManifest::from_manifest_within(&m, &limits);
            }
            if let Ok(m) = serde_json::from_slice::<oci_client::manifest::OciImageIndex>(b) {
                let _ = serde_json::to_vec(&m);
            }
        }) > 0
    );
}

fn chunks_json(c: &BlobChunks) -> Vec<u8> {
    serde_json::to_vec(c).unwrap()
}

#[test]
fn tar_gzip_zstd_layers() {
    let mut layer = oci::Layer::new();
    layer
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
        .file("bin/big", 0o755, &bytes(5, 9000))
        .symlink("bin/sh", "busybox")
        .hardlink("bin/hard", "bin/big")
        .file(".wh.gone", 0o644, b"")
        .file("etc/.wh..wh..opq", 0o644, b"")
        .device("dev/null", false, 1, 3)
        .fifo("run/fifo");
    let tar = layer.tar();
    let gz = oci::compress(&tar, oci::Compression::Gzip).0;
    let zst = oci::compress(&tar, oci::Compression::Zstd).0;
    let limits = lazyblob::image::convert::layer::Limits {
        max_file: 1 << 20,
        max_layer: 8 << 20,
        inline_max: 512,
        max_entries: 10_000,
        max_metadata: 1 << 20,
        max_headers: 64 << 10,
    };
    assert!(
        fuzz("layer", &[tar, gz, zst], |b| {
            let mut tree = lazyblob::image::tree::Tree::new(lazyblob::image::tree::Meta::default());
            let mut blobs = lazyblob::image::build::BlobWriter::new(1);
            let Ok(decoded) = lazyblob::image::convert::layer::decoder(b) else {
                return;
            };
            let _ = lazyblob::image::convert::layer::Applier::new(
                &mut tree,
                &mut blobs.slot(0),
                "fuzz".into(),
                limits.clone(),
            )
            .apply(decoded.take(32 << 20));
        }) > 0
    );
}

/// Random trees (odd names, modes, symlinks, small files kept inline) written by the EROFS
/// writer, extracted by `fsck.erofs --extract` and compared with what was written.
#[test]
fn erofs_writer_round_trip() {
    require_tool("fsck.erofs", "erofs-utils");
    let (mut rng, seed) = rng("erofs");
    let (t0, limit) = (Instant::now(), budget());
    let mut runs = 0u64;
    while t0.elapsed() < limit {
        let src = tempfile::tempdir().unwrap();
        let n = rng.random_range(1..40);
        let mut names = Vec::new();
        for i in 0..n {
            // printable ASCII but '/' and any byte from 0x80, sometimes long (control bytes
            // would confuse the shell that lists the trees, not the writer)
            let len = if rng.random_range(0..10) == 0 {
                255
            } else {
                rng.random_range(1..20)
            };
            let mut name: Vec<u8> = (0..len)
                .map(|_| rng.random_range(0x20..=0xffu8))
                .filter(|&c| c != b'/' && c != 0x7f)
                .collect();
            if name.is_empty() || name == b"." || name == b".." {
                name = format!("f{i}").into_bytes();
            }
            names.push(name);
        }
        names.sort();
        names.dedup();
        for (i, name) in names.iter().enumerate() {
            use std::os::unix::ffi::OsStrExt;
            let dir = if i % 5 == 0 {
                src.path().join("d")
            } else {
                src.path().to_path_buf()
            };
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join(std::ffi::OsStr::from_bytes(name));
            if p.symlink_metadata().is_ok() {
                continue; // the name of the subdirectory
            }
            match rng.random_range(0..4) {
                0 => std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&name[..name.len().min(100)]), &p).unwrap(),
                1 => std::fs::create_dir_all(&p).unwrap(),
                _ => {
                    let size = rng.random_range(0..400);
                    let data: Vec<u8> = (0..size).map(|_| rng.random()).collect();
                    std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
                }
            }
        }
        let img = match catch_unwind(AssertUnwindSafe(|| {
            lazyblob::image::build::from_dir(
                src.path(),
                &lazyblob::image::build::BuildOptions {
                    chunk_size: 4096,
                    inline_max: 512,
                    blobs: 1,
                },
            )
        })) {
            Ok(r) => r.unwrap_or_else(|e| panic!("fuzz erofs (seed {seed}, run {runs}): build failed: {e}")),
            Err(_) => panic!("fuzz erofs (seed {seed}, run {runs}): the writer panicked"),
        };
        let work = tempfile::tempdir().unwrap();
        let meta = work.path().join("meta.erofs");
        std::fs::write(&meta, &img.meta).unwrap();
        let out = work.path().join("out");
        let r = std::process::Command::new("fsck.erofs")
            .arg(format!("--extract={}", out.display()))
            .arg(&meta)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "fuzz erofs (seed {seed}, run {runs}): fsck.erofs: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        oci::assert_same_tree(&oci::walk(&out), &oci::walk(src.path()));
        runs += 1;
    }
    eprintln!("fuzz erofs: {runs} round trips, no difference");
    assert!(runs > 0);
}
