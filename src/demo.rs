//! `lazyblob demo`: a real lazy mount from a built-in registry. Starts registry-mock in
//! process with a sample image, runs the daemon's parts with the best frontend this kernel
//! offers, mounts the image, reads a few files, prints what was read against what was
//! fetched, and cleans up.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::config::{Config, HostConfig};
use crate::daemon::Daemon;
use crate::frontend::{self, KernelFacts};
use crate::image::build::{self, BlobWriter, BuiltImage};
use crate::image::tree::{Kind, Meta, Node, Tree};
use crate::registry::{parse_reference, Registry};

/// Deterministic sample bytes.
fn sample(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest([seed.to_le_bytes(), i.to_le_bytes()].concat()));
        i += 1;
    }
    out.truncate(len);
    out
}

/// The built-in image: an "application" with a binary, libraries, a model file and many
/// small files, spread over two data blobs like two layers.
/// Files the demo reads: path and contents.
type ReadSet = Vec<(&'static str, Vec<u8>)>;

fn sample_image() -> Result<(BuiltImage, ReadSet)> {
    let dir = Meta {
        perm: 0o755,
        ..Default::default()
    };
    let mut tree = Tree::new(dir.clone());
    let mut blobs = BlobWriter::new(2);
    let add_dir = |tree: &mut Tree, parent: usize, name: &str| -> Result<usize> {
        Ok(tree.insert(
            parent,
            name.as_bytes(),
            Node {
                meta: dir.clone(),
                kind: Kind::Dir(Default::default()),
            },
        )?)
    };
    let bin = add_dir(&mut tree, Tree::ROOT, "bin")?;
    let lib = add_dir(&mut tree, Tree::ROOT, "lib")?;
    let etc = add_dir(&mut tree, Tree::ROOT, "etc")?;
    let share = add_dir(&mut tree, Tree::ROOT, "share")?;
    let models = add_dir(&mut tree, Tree::ROOT, "models")?;
    let file = |perm: u32| Meta {
        perm,
        ..Default::default()
    };
    let read_set: Vec<(&str, usize, u64, usize, u32)> = vec![
        ("bin/app", bin, 1, 6 << 20, 0o755),
        ("lib/libdemo.so", lib, 2, 12 << 20, 0o755),
        ("etc/app.conf", etc, 3, 3_000, 0o644),
        ("models/weights.bin", models, 4, 48 << 20, 0o644),
    ];
    let mut contents = Vec::new();
    for (i, (path, parent, seed, len, perm)) in read_set.into_iter().enumerate() {
        let data = sample(seed, len);
        let fd = blobs.add(i % 2, &data);
        let name = path.rsplit('/').next().unwrap_or(path);
        tree.insert(
            parent,
            name.as_bytes(),
            Node {
                meta: file(perm),
                kind: Kind::File(fd),
            },
        )?;
        contents.push((path, data));
    }
    for i in 0..2000u64 {
        let data = sample(1000 + i, 5_000 + (i as usize * 7919) % 20_000);
        let fd = blobs.add((i % 2) as usize, &data);
        tree.insert(
            share,
            format!("doc-{i:04}.txt").as_bytes(),
            Node {
                meta: file(0o644),
                kind: Kind::File(fd),
            },
        )?;
    }
    Ok((blobs.finish(tree, crate::image::format::DEFAULT_CHUNK_SIZE)?, contents))
}

/// Run the demo.
pub async fn run() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("lazyblob demo needs root: it mounts EROFS and serves the kernel through fanotify or /dev/cachefiles (try: sudo lazyblob demo)");
    }
    let facts = KernelFacts::read();
    let chosen = frontend::choose(&facts, crate::config::FrontendChoice::Auto)
        .with_context(|| format!("this kernel ({}) cannot run lazy mounts", facts.release))?;
    println!("kernel {}: using the {:?} frontend", facts.release, chosen);

    let mock = registry_mock::MockRegistry::start(Default::default()).await?;
    let host = mock.host();
    println!("built-in registry at http://{host} (registry-mock, loopback only)");
    let (img, contents) = tokio::task::spawn_blocking(sample_image).await??;
    let image_size: u64 = img.meta.len() as u64 + img.data.iter().map(|d| d.len() as u64).sum::<u64>();

    // a private work area on a disk-backed filesystem (cachefiles refuses tmpfs)
    let work = tempfile::Builder::new()
        .prefix("lazyblob-demo.")
        .tempdir_in("/var/tmp")?;
    let mut cfg = Config::default();
    cfg.daemon.state_dir = work.path().join("state");
    cfg.daemon.cache_dir = work.path().join("cache");
    cfg.daemon.socket = work.path().join("lazyblob.sock");
    cfg.daemon.tag = format!("lazyblob-demo-{}", std::process::id());
    cfg.registry.hosts.push(HostConfig {
        host: host.clone(),
        insecure: true,
        ..Default::default()
    });
    let registry = Registry::new(&cfg.registry, 4)?;
    let reference = format!("{host}/demo/app:latest");
    build::push(&registry, &parse_reference(&reference)?, &img, None).await?;
    mock.reset_counters();

    let daemon = Daemon::start(cfg, crate::daemon::Takeover::IfWaiting).await?;
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let result = demo_reads(&daemon, &reference, &mnt, &contents, &mock, image_size).await;
    daemon.shutdown().await;
    mock.shutdown().await;
    result
}

async fn demo_reads(
    daemon: &Arc<Daemon>,
    reference: &str,
    mnt: &std::path::Path,
    contents: &[(&'static str, Vec<u8>)],
    mock: &registry_mock::MockRegistry,
    image_size: u64,
) -> Result<()> {
    let t0 = Instant::now();
    daemon
        .mount(reference, mnt, crate::frontend::mount::SpecialFiles::Ignored)
        .await?;
    let mount_time = t0.elapsed();
    let files = std::fs::read_dir(mnt.join("share"))?.count();
    println!(
        "mounted {reference} on {} in {mount_time:.2?}; share/ lists {files} files",
        mnt.display()
    );
    println!();
    println!("| file | size | bytes read | verified | time |");
    println!("| --- | ---: | ---: | --- | ---: |");
    let mut read_total = 0u64;
    for (path, data) in contents {
        let p = mnt.join(path);
        let (lo, hi) = if data.len() > 1 << 20 {
            (data.len() / 2, data.len() / 2 + 64 * 1024)
        } else {
            (0, data.len())
        };
        let t = Instant::now();
        let got = tokio::task::spawn_blocking({
            let p = p.clone();
            move || -> std::io::Result<Vec<u8>> {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(p)?;
                let mut buf = vec![0u8; hi - lo];
                f.read_exact_at(&mut buf, lo as u64)?;
                Ok(buf)
            }
        })
        .await??;
        let ok = got == data[lo..hi];
        read_total += (hi - lo) as u64;
        println!(
            "| /{path} | {} | {} | {} | {:.1?} |",
            data.len(),
            hi - lo,
            if ok { "sha256 ok" } else { "MISMATCH" },
            t.elapsed()
        );
        if !ok {
            bail!("{path}: the bytes read differ from the image");
        }
    }
    let fetched = mock.counters().total_blob_bytes();
    println!();
    println!("| image size | read by the demo | fetched from the registry | fetched / image |");
    println!("| ---: | ---: | ---: | ---: |");
    println!(
        "| {image_size} | {read_total} | {fetched} | {:.1}% |",
        100.0 * fetched as f64 / image_size as f64
    );
    println!();
    println!("cleaning up: unmounting and stopping the built-in registry");
    Ok(())
}
