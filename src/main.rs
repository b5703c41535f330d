//! The `lazyblob` command line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use lazyblob::config::Config;

#[derive(Parser)]
#[command(name = "lazyblob", version, about = "Lazy-loading EROFS images from OCI registries")]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), also read from LAZYBLOB_LOG.
    #[arg(long, global = true, env = "LAZYBLOB_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount a built-in sample image lazily from an embedded registry, read a few files and
    /// show what was read against what was fetched (needs root).
    Demo,
    /// Run the daemon.
    Daemon {
        /// TOML configuration file (see config/lazyblob.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show the running daemon's images, objects and counters.
    Status {
        #[arg(long, default_value = "/run/lazyblob/lazyblob.sock")]
        socket: PathBuf,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Build a lazyblob image from a local directory into OUT (meta.erofs, chunks.json,
    /// data-N.blob); with --push, push it to a registry as REFERENCE.
    Mkfs {
        source: PathBuf,
        out: PathBuf,
        /// Number of data blobs files are spread over.
        #[arg(long, default_value_t = 1)]
        blobs: usize,
        /// Files up to this size are stored inline in the metadata blob.
        #[arg(long, default_value_t = 2048)]
        inline_max: u64,
        /// Push to this reference as well.
        #[arg(long)]
        push: Option<String>,
        /// Configuration (registry credentials, insecure hosts) for --push.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Convert an OCI/Docker image into a lazyblob image. SRC and DST are registry references
    /// (`host/repo:tag`, `docker://...`) or OCI layouts (`oci:DIR:TAG`).
    Convert {
        src: String,
        dst: String,
        /// Platform to convert from an index (`os/arch[/variant]`; default: this node's).
        #[arg(long)]
        platform: Option<String>,
        /// Convert every platform of an index and write an index.
        #[arg(long)]
        all_platforms: bool,
        /// Verified chunk size of data blobs.
        #[arg(long, default_value_t = lazyblob::image::format::DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// Chunk digest algorithm: blake3 (fast to verify) or sha256.
        #[arg(long, default_value_t = lazyblob::image::format::ChunkDigest::default())]
        chunk_digest: lazyblob::image::format::ChunkDigest,
        /// Configuration (registry credentials, insecure hosts).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Mount an image lazily on DIR through the running daemon.
    Mount {
        image: String,
        dir: PathBuf,
        /// Let setuid/setgid binaries and device nodes of the image take effect (mounts are
        /// `nosuid,nodev` by default: the image comes from a registry).
        #[arg(long)]
        allow_suid_dev: bool,
        #[arg(long, default_value = "/run/lazyblob/lazyblob.sock")]
        socket: PathBuf,
    },
    /// Unmount a lazyblob mount.
    Umount {
        dir: PathBuf,
        /// Detach a busy mount (open files keep being served).
        #[arg(long)]
        lazy: bool,
        #[arg(long, default_value = "/run/lazyblob/lazyblob.sock")]
        socket: PathBuf,
    },
    /// (internal) The guard the daemon starts: keeps the fanotify group alive if the daemon
    /// dies and denies reads with EIO until a new daemon takes over.
    #[command(hide = true)]
    Guard {
        #[arg(long)]
        group_fd: i32,
        #[arg(long)]
        pipe_fd: i32,
        #[arg(long)]
        max_fd: u64,
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Register an image with the running daemon; prints its fsid.
    Register {
        reference: String,
        #[arg(long, default_value = "/run/lazyblob/lazyblob.sock")]
        socket: PathBuf,
    },
}

fn init_logging(filter: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // the demo prints a report on stdout: only warnings on stderr unless asked otherwise
    let level = if matches!(cli.cmd, Cmd::Demo) && std::env::var_os("LAZYBLOB_LOG").is_none() && cli.log == "info" {
        "warn"
    } else {
        cli.log.as_str()
    };
    init_logging(level, cli.log_json);
    if matches!(
        cli.cmd,
        Cmd::Daemon { .. } | Cmd::Demo | Cmd::Mkfs { push: Some(_), .. } | Cmd::Convert { .. }
    ) {
        // Before any thread exists: registry clients need a CA store to be built at all.
        match lazyblob::registry::roots::ensure_ca_store(&std::env::temp_dir()) {
            Ok(Some(p)) => {
                tracing::warn!(path = %p.display(), "no system CA certificates: trusting the bundled Mozilla roots")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "no system CA certificates and the bundled roots could not be written")
            }
        }
    }
    lazyblob::malloc::pin_mmap_threshold(256 * 1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        // cache writes and file I/O run on the blocking pool: bound it (each thread costs memory)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Demo => lazyblob::demo::run().await,
            Cmd::Daemon { config } => {
                let cfg = match config {
                    Some(p) => Config::load(&p)?,
                    None => Config::default(),
                };
                lazyblob::daemon::run(cfg, None).await
            }
            Cmd::Status { socket, json } => {
                let s = lazyblob::api::client::ApiClient::new(&socket)?.status().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    println!("lazyblob {} frontend={} kernel={}", s.version, s.frontend, s.kernel);
                    println!(
                        "registry: {} requests, {} bytes, {} retries, {} failures; engine: {} chunks fetched, {} shared, {} in flight",
                        s.registry.requests, s.registry.bytes, s.registry.retries, s.registry.failures,
                        s.engine.chunks_fetched, s.engine.shared_hits, s.inflight_chunks
                    );
                    println!("cache: {} bytes on disk", s.cache_bytes);
                    for i in &s.images {
                        println!("image {}  fsid={}  {} data blobs  {} bytes", i.reference, i.fsid, i.data_blobs, i.total_size);
                    }
                    for m in &s.mounts {
                        println!("mount {} on {}  ({:?})", m.reference, m.target.display(), m.frontend);
                    }
                }
                Ok(())
            }
            Cmd::Mkfs {
                source,
                out,
                blobs,
                inline_max,
                push,
                config,
            } => {
                let opts = lazyblob::image::build::BuildOptions {
                    blobs,
                    inline_max,
                    ..Default::default()
                };
                let img = lazyblob::image::build::from_dir(&source, &opts)
                    .with_context(|| format!("building an image from {}", source.display()))?;
                std::fs::create_dir_all(&out)?;
                std::fs::write(out.join("meta.erofs"), &img.meta)?;
                std::fs::write(out.join("chunks.json"), img.table.to_json())?;
                for (i, d) in img.data.iter().enumerate() {
                    std::fs::write(out.join(format!("data-{}.blob", i + 1)), d)?;
                }
                if let Some(reference) = push {
                    let cfg = match config {
                        Some(p) => Config::load(&p)?,
                        None => Config::default(),
                    };
                    let registry = lazyblob::registry::Registry::new(&cfg.registry, cfg.engine.max_concurrent_fetches)?;
                    let r = lazyblob::registry::parse_reference(&reference)?;
                    let digest = lazyblob::image::build::push(&registry, &r, &img, None).await?;
                    println!("{digest}");
                }
                Ok(())
            }
            Cmd::Convert {
                src,
                dst,
                platform,
                all_platforms,
                chunk_size,
                chunk_digest,
                config,
            } => {
                use lazyblob::image::convert::{convert, ConvertOptions, Location};
                if chunk_size < 4096 || !chunk_size.is_power_of_two() {
                    anyhow::bail!("--chunk-size must be a power of two >= 4096");
                }
                let cfg = match config {
                    Some(p) => Config::load(&p)?,
                    None => Config::default(),
                };
                let registry = lazyblob::registry::Registry::new(&cfg.registry, cfg.engine.max_concurrent_fetches)?;
                let src_loc: Location = src.parse().with_context(|| format!("source {src}"))?;
                let dst_loc: Location = dst.parse().with_context(|| format!("destination {dst}"))?;
                let opts = ConvertOptions {
                    platform: platform.map(|p| p.parse()).transpose().map_err(anyhow::Error::msg)?,
                    all_platforms,
                    chunk_size,
                    chunk_digest,
                    progress: true,
                    ..Default::default()
                };
                let t0 = std::time::Instant::now();
                let r = convert(&registry, &src_loc, &dst_loc, &opts)
                    .await
                    .with_context(|| format!("converting {src} to {dst}"))?;
                let secs = t0.elapsed().as_secs_f64();
                eprintln!(
                    "converted {} image(s), {} entries, {} bytes of file data in {:.2}s ({:.1} MB/s)",
                    r.images,
                    r.files,
                    r.layer_bytes,
                    secs,
                    r.layer_bytes as f64 / 1e6 / secs.max(1e-9)
                );
                println!("{}", r.digest);
                Ok(())
            }
            Cmd::Mount {
                image,
                dir,
                allow_suid_dev,
                socket,
            } => {
                use lazyblob::frontend::mount::SpecialFiles;
                let dir = std::fs::canonicalize(&dir).with_context(|| format!("mount point {}", dir.display()))?;
                let special = match allow_suid_dev {
                    true => SpecialFiles::Honoured,
                    false => SpecialFiles::Ignored,
                };
                let m = lazyblob::api::client::ApiClient::new(&socket)?
                    .mount(&image, &dir, special)
                    .await?;
                println!("{} mounted on {} (fsid {}, {:?})", m.reference, m.target.display(), m.fsid, m.frontend);
                Ok(())
            }
            Cmd::Umount { dir, lazy, socket } => {
                let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
                lazyblob::api::client::ApiClient::new(&socket)?.umount(&dir, lazy).await?;
                Ok(())
            }
            Cmd::Guard {
                group_fd,
                pipe_fd,
                max_fd,
                state_dir,
            } => Ok(lazyblob::frontend::fanotify::guard::run(group_fd, pipe_fd, max_fd, &state_dir)?),
            Cmd::Register { reference, socket } => {
                let info = lazyblob::api::client::ApiClient::new(&socket)?.register(&reference).await?;
                println!("{}", info.fsid);
                Ok(())
            }
        }
    })
}
