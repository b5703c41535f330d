//! Conversion of a large image by the `lazyblob convert` binary against `mkfs.erofs` on the same
//! tree: throughput and peak RSS. The image is 4 GiB of file data (a 2 GiB file, a 1 GiB file,
//! 16,384 files of 4-124 KiB) in one zstd layer on docker-registry.
//!
//! What each side does: lazyblob pulls the layer from the registry, verifies its digest,
//! decompresses and parses the tar stream, writes and hashes every byte (SHA-256 of the blob,
//! BLAKE3 of each chunk), pushes the data and metadata blobs back. mkfs.erofs reads an unpacked
//! tree from the local disk (page cache warm: it was just written) and writes one image file,
//! with no digest and no network.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde_json::json;

use crate::common::oci::push_source;
use crate::common::Pattern;
use crate::util::{drop_caches, rng_bytes, sh_ok, Bench, Report};

/// Write `len` bytes of `period` (starting at `skew`) to `path`.
fn write_pattern(path: &Path, period: &[u8], skew: usize, len: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    std::io::copy(&mut Pattern::new(period, skew, len), &mut f).unwrap();
    f.flush().unwrap();
}

/// Run `lazyblob convert SRC DST` with the page cache dropped first: (seconds, peak RSS MiB).
fn run_convert(src: &str, dst: &str, config: &Path, work: &Path) -> (f64, f64) {
    drop_caches();
    let t = Instant::now();
    let out = crate::common::procs::run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_lazyblob"))
            .args(["convert", src, dst, "--config"])
            .arg(config)
            .arg("--work-dir")
            .arg(work),
    );
    let secs = t.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}", stderr.trim_end());
    (secs, crate::common::convert_peak_rss(&stderr))
}

/// Under `base`: `lazyblob convert` into an OCI layout, then `mkfs.erofs` of `rootfs`, each
/// with the page cache dropped; (lazyblob s, its peak RSS MiB, mkfs.erofs s).
fn side_by_side(base: &Path, rootfs: &Path, src: &str, config: &Path) -> (f64, f64, f64) {
    let layout = base.join("layout");
    let (secs, rss) = run_convert(src, &format!("oci:{}:lazy", layout.display()), config, base);
    let _ = std::fs::remove_dir_all(&layout);
    drop_caches();
    let img = base.join("mkfs.erofs");
    let t = Instant::now();
    sh_ok(&format!("mkfs.erofs --quiet {} {}", img.display(), rootfs.display()));
    let mkfs_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&img);
    (secs, rss, mkfs_s)
}

pub async fn convert(b: &Bench<'_>, r: &mut Report) {
    let div = b.scale.convert_div;
    let w = b.work.join("convert");
    let rootfs = w.join("rootfs");
    std::fs::create_dir_all(rootfs.join("small")).unwrap();
    let period = rng_bytes(41, 1_048_573);
    write_pattern(&rootfs.join("model.bin"), &period, 0, (2 << 30) / div);
    write_pattern(&rootfs.join("data.bin"), &period, 12_345, (1 << 30) / div);
    let mut total = (3 << 30) / div;
    for i in 0..16_384 / div {
        let len = 4096 + (i * 7919 % 30) * 4096;
        write_pattern(&rootfs.join(format!("small/f{i:05}")), &period, i as usize * 4099, len);
        total += len;
    }
    let layer = w.join("layer.tar.zst");
    sh_ok(&format!(
        "tar -C {} --sort=name -cf - . | zstd -3 -q -T0 -c > {}",
        rootfs.display(),
        layer.display()
    ));
    let bytes = std::fs::read(&layer).unwrap();
    let src = format!("{}/bench/big:src", b.host);
    let dst = format!("{}/bench/big:lazy", b.host);
    push_source(&b.reg, &src, &[(bytes, "application/vnd.oci.image.layer.v1.tar+zstd")]).await;
    let _ = std::fs::remove_file(&layer);
    let config = w.join("lazyblob.toml");
    std::fs::write(
        &config,
        format!("[[registry.hosts]]\nhost = \"{}\"\ninsecure = true\n", b.host),
    )
    .unwrap();

    // into an OCI layout on the local disk (what mkfs.erofs does too), then into the registry
    let (local_s, local_rss, mkfs_s) = side_by_side(&w, &rootfs, &src, &config);
    let (convert_s, rss) = run_convert(&src, &dst, &config, &w);
    // both again in memory: the CPU side of each, without the disk
    let shm = Path::new("/dev/shm");
    let in_memory = (nix::sys::statvfs::statvfs(shm)
        .map(|v| v.blocks_available() * v.fragment_size())
        .unwrap_or(0)
        > total * 5 / 2)
        .then(|| {
            let base = tempfile::tempdir_in(shm).unwrap();
            sh_ok(&format!("cp -a {} {}/", rootfs.display(), base.path().display()));
            side_by_side(base.path(), &base.path().join("rootfs"), &src, &config)
        });
    let _ = std::fs::remove_dir_all(&rootfs);

    let mbs = |s: f64| total as f64 / 1e6 / s;
    let mut row = |what: String, ours: f64, mkfs: f64| {
        r.rows.push((
            what,
            format!("{:.0} MB/s ({ours:.1} s)", mbs(ours)),
            format!("mkfs.erofs {:.0} MB/s ({mkfs:.1} s)", mbs(mkfs)),
            format!("{:.2}x", mkfs / ours),
        ))
    };
    row(
        format!(
            "conversion of {:.1} GB of file data (one zstd layer) into a local OCI layout",
            total as f64 / 1e9
        ),
        local_s,
        mkfs_s,
    );
    if let Some((ours, _, mkfs)) = in_memory {
        row("the same, both sides in memory (tmpfs)".into(), ours, mkfs);
    }
    row("the same conversion, registry to registry".into(), convert_s, mkfs_s);
    r.rows.push((
        "peak RSS of `lazyblob convert` on that image".into(),
        format!("{:.1} MiB", rss.max(local_rss)),
        format!(
            "largest file {:.1} GiB",
            (2u64 << 30) as f64 / div as f64 / (1u64 << 30) as f64
        ),
        format!("{:.3} of the data", rss.max(local_rss) * 1048576.0 / total as f64),
    ));
    r.json.insert(
        "conversion_large".into(),
        json!({"file_bytes": total, "lazyblob_layout_s": local_s, "lazyblob_registry_s": convert_s,
            "mkfs_erofs_s": mkfs_s, "ratio": mkfs_s / local_s, "ratio_registry": mkfs_s / convert_s,
            "tmpfs": in_memory.map(|(ours, _, mkfs)| json!({"lazyblob_layout_s": ours, "mkfs_erofs_s": mkfs, "ratio": mkfs / ours})),
            "peak_rss_mib": rss.max(local_rss),
            "note": "lazyblob: registry pull, digest check, zstd, tar, SHA-256 + BLAKE3 of every byte, push; mkfs.erofs: local tree, no digests"}),
    );
}
