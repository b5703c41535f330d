//! What the command-line verbs do, so that `main.rs` only parses arguments and prints: each
//! function returns the text the verb prints on stdout.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::api::client::ApiClient;
use crate::api::Status;
use crate::config::Config;
use crate::frontend::mount::SpecialFiles;
use crate::image::build::{self, BuildOptions};
use crate::image::convert::{convert as convert_image, ConvertOptions, ConvertReport, Location};
use crate::registry::{parse_reference, Registry};

/// A registry client configured by `config` (or the defaults).
fn registry(config: Option<&Path>) -> Result<Registry> {
    registry_of(&Config::load_or_default(config)?)
}

/// A registry client configured by `cfg`.
fn registry_of(cfg: &Config) -> Result<Registry> {
    Ok(Registry::new(&cfg.registry, cfg.engine.max_concurrent_fetches)?)
}

/// `lazyblob status`: a summary, or the whole status as JSON.
pub async fn status(socket: &Path, json: bool) -> Result<String> {
    let s = ApiClient::new(socket)?.status().await?;
    if json {
        return Ok(serde_json::to_string_pretty(&s)? + "\n");
    }
    Ok(summary(&s))
}

/// The human-readable `status`.
fn summary(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lazyblob {} frontend={} kernel={}",
        s.version, s.frontend, s.kernel
    );
    let _ = writeln!(
        out,
        "registry: {} requests, {} bytes, {} retries, {} failures; engine: {} chunks fetched, {} leaf reads, {} shared, {} in flight",
        s.registry.requests,
        s.registry.bytes,
        s.registry.retries,
        s.registry.failures,
        s.engine.chunks_fetched,
        s.engine.leaf_reads,
        s.engine.shared_hits,
        s.inflight_chunks
    );
    let _ = writeln!(out, "cache: {} bytes on disk", s.cache_bytes);
    for i in &s.images {
        let _ = writeln!(
            out,
            "image {}  fsid={}  {} data blobs  {} bytes",
            i.reference, i.fsid, i.data_blobs, i.total_size
        );
    }
    for m in &s.mounts {
        let _ = writeln!(
            out,
            "mount {} on {}  ({})",
            m.reference,
            m.target.display(),
            m.frontend.name()
        );
    }
    out
}

/// `lazyblob mkfs`: build an image from `source` into `out`; with `push`, push it there too
/// and return its manifest digest.
pub async fn mkfs(
    source: &Path,
    out: &Path,
    opts: &BuildOptions,
    push: Option<&str>,
    config: Option<&Path>,
) -> Result<String> {
    let img = build::from_dir(source, opts).with_context(|| format!("building an image from {}", source.display()))?;
    img.write_to(out)
        .with_context(|| format!("writing the image to {}", out.display()))?;
    let Some(reference) = push else {
        return Ok(String::new());
    };
    let registry = registry(config)?;
    let digest = build::push(&registry, &parse_reference(reference)?, &img, None).await?;
    Ok(format!("{digest}\n"))
}

/// `lazyblob convert`: the converted image's digest; a summary goes to stderr.
pub async fn convert(src: &str, dst: &str, opts: &ConvertOptions, config: Option<&Path>) -> Result<String> {
    let registry = registry(config)?;
    let src_loc: Location = src.parse().with_context(|| format!("source {src}"))?;
    let dst_loc: Location = dst.parse().with_context(|| format!("destination {dst}"))?;
    let t0 = std::time::Instant::now();
    let r: ConvertReport = convert_image(&registry, &src_loc, &dst_loc, opts)
        .await
        .with_context(|| format!("converting {src} to {dst}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let peak_kib = peak_rss_kib().unwrap_or(0);
    eprintln!(
        "converted {} image(s), {} entries, {} bytes of file data in {:.2}s ({:.1} MB/s), peak RSS {:.1} MiB, {} data blob(s) pushed while converting",
        r.images,
        r.files,
        r.layer_bytes,
        secs,
        r.layer_bytes as f64 / 1e6 / secs.max(1e-9),
        peak_kib as f64 / 1024.0,
        r.blobs_streamed
    );
    Ok(format!("{}\n", r.digest))
}

/// `lazyblob mount`: mount `image` on `dir` through the daemon.
pub async fn mount(socket: &Path, image: &str, dir: &Path, special: SpecialFiles) -> Result<String> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("mount point {}", dir.display()))?;
    let m = ApiClient::new(socket)?.mount(image, &dir, special).await?;
    Ok(format!(
        "{} mounted on {} (fsid {}, {})\n",
        m.reference,
        m.target.display(),
        m.fsid,
        m.frontend.name()
    ))
}

/// `lazyblob umount`.
pub async fn umount(socket: &Path, dir: &Path, lazy: bool) -> Result<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    ApiClient::new(socket)?.umount(&dir, lazy).await?;
    Ok(String::new())
}

/// `lazyblob register`: the image's fsid.
pub async fn register(socket: &Path, reference: &str) -> Result<String> {
    let info = ApiClient::new(socket)?.register(reference).await?;
    Ok(format!("{}\n", info.fsid))
}

/// What `lazyblob containerd-config` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAction {
    /// Add lazyblob's settings.
    Install,
    /// Restore the backups.
    Uninstall,
}

/// `lazyblob containerd-config`: edit (or restore) containerd's config files; with
/// `on_change`, run it through `sh -c` when a file was written. Prints one line per file.
pub fn containerd_config(
    action: NodeAction,
    config: Option<&Path>,
    containerd_config: &Path,
    on_change: Option<&str>,
) -> Result<String> {
    use crate::node::containerd_files::{self, FileOutcome};
    let cfg = Config::load_or_default(config)?;
    let settings = crate::node::settings(&cfg)
        .context("lazyblob's config has no `[snapshotter] socket`: containerd would have nothing to talk to")?;
    let outcome = match action {
        NodeAction::Install => containerd_files::install(containerd_config, &settings)?,
        NodeAction::Uninstall => containerd_files::uninstall(containerd_config, &settings)?,
    };
    let mut out = String::new();
    for file in &outcome.files {
        let _ = match file {
            FileOutcome::Unchanged(p) => writeln!(out, "unchanged {}", p.display()),
            FileOutcome::Changed(p) => writeln!(out, "changed {}", p.display()),
            FileOutcome::Diverged(p) => {
                tracing::warn!(
                    file = %p.display(),
                    backup = %containerd_files::backup_of(p).display(),
                    "changed since lazyblob edited it: left alone, restore it from its backup by hand"
                );
                writeln!(out, "diverged {}", p.display())
            }
        };
    }
    if let (true, Some(cmd)) = (outcome.changed(), on_change) {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .with_context(|| format!("running `{cmd}`"))?;
        anyhow::ensure!(status.success(), "`{cmd}` failed: {status}");
        let _ = writeln!(out, "ran {cmd}");
    }
    Ok(out)
}

/// This process's peak resident set (`VmHWM`, KiB). Not `getrusage`: its `ru_maxrss` carries
/// the peak of the process image before `execve`, which for a child of a large process is the
/// parent's.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `lazyblob prefetch push`: push an image's startup prefetch list (`list`, or the one the
/// daemon configured by `config` kept for it) to its registry, as an artifact referring to it.
pub async fn prefetch_push(image: &str, list: Option<&Path>, config: Option<&Path>) -> Result<String> {
    use crate::prefetch::{registry as lists, store};
    let cfg = Config::load_or_default(config)?;
    let reg = registry_of(&cfg)?;
    let reference = parse_reference(image)?;
    let resolved = reg
        .resolve(&reference)
        .await
        .with_context(|| format!("resolving {image}"))?;
    let list = match list {
        Some(path) => store::read(path)?,
        None => store::load(&cfg.daemon.state_dir, &resolved.digest)?.with_context(|| {
            format!(
                "no prefetch list kept for {image} ({}) under {}: mount it once with the daemon, or pass --list",
                resolved.digest,
                cfg.daemon.state_dir.display()
            )
        })?,
    };
    anyhow::ensure!(
        list.image == resolved.digest,
        "the list was recorded for image {}, not {image} ({})",
        list.image,
        resolved.digest
    );
    let runs: usize = list.blobs.iter().map(|b| b.runs.len()).sum();
    let pushed = lists::push(&reg, &reference, &list).await?;
    let listed = match pushed.listed_by {
        lists::Found::ReferrersApi => "listed by the registry's referrers API".to_string(),
        lists::Found::ReferrersTag => format!("listed in the referrers tag sha256-{}", list.image.hex()),
    };
    Ok(format!(
        "pushed the prefetch list of {image} ({runs} runs) as {}, {listed}\n",
        pushed.digest
    ))
}
