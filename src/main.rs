//! The `lazyblob` command line: arguments, logging, the runtime; what each verb does lives
//! in `lazyblob::commands`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use lazyblob::commands;
use lazyblob::config::Config;
use lazyblob::frontend::mount::SpecialFiles;
use lazyblob::image::convert::Limits;

/// The daemon's admin socket.
#[derive(Args)]
struct Socket {
    #[arg(long, default_value = lazyblob::api::DEFAULT_SOCKET)]
    socket: PathBuf,
}

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

/// What a source image may make `convert` read and hold (a hostile or broken image stops at
/// these, with the layer and entry named).
#[derive(Args)]
struct ConvertLimits {
    /// Largest size one layer may expand to, decompressed.
    #[arg(long, default_value_t = Limits::default().max_layer)]
    max_layer_bytes: u64,
    /// Largest regular file.
    #[arg(long, default_value_t = Limits::default().max_file)]
    max_file_bytes: u64,
    /// Most entries (files, directories, links) of the image.
    #[arg(long, default_value_t = Limits::default().max_entries)]
    max_entries: usize,
    /// Most bytes of metadata held in memory: names, small files, link targets, xattrs.
    #[arg(long, default_value_t = Limits::default().max_metadata)]
    max_metadata_bytes: u64,
}

impl From<ConvertLimits> for Limits {
    fn from(l: ConvertLimits) -> Limits {
        Limits {
            max_layer: l.max_layer_bytes,
            max_file: l.max_file_bytes,
            max_entries: l.max_entries,
            max_metadata: l.max_metadata_bytes,
            ..Limits::default()
        }
    }
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
        #[command(flatten)]
        socket: Socket,
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
        /// Verified chunk size of data blobs (a power of two >= 4096).
        #[arg(long, default_value_t = lazyblob::image::format::DEFAULT_CHUNK_SIZE, value_parser = chunk_size)]
        chunk_size: u64,
        /// Chunk digest algorithm: blake3 (fast to verify) or sha256.
        #[arg(long, default_value_t = lazyblob::image::format::ChunkDigest::default())]
        chunk_digest: lazyblob::image::format::ChunkDigest,
        /// Write no leaves layer: chunks are verified whole, and the image is format 2, which
        /// daemons older than format 3 read (leaves need BLAKE3 and chunks of 32 KiB or more).
        #[arg(long)]
        no_leaves: bool,
        /// Configuration (registry credentials, insecure hosts).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Directory for the unnamed temporary files layers and data blobs are spooled to
        /// (about a layer's compressed plus converted size at a time; default: $TMPDIR).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        #[command(flatten)]
        limits: ConvertLimits,
    },
    /// Mount an image lazily on DIR through the running daemon.
    Mount {
        image: String,
        dir: PathBuf,
        /// Let setuid/setgid binaries and device nodes of the image take effect (mounts are
        /// `nosuid,nodev` by default: the image comes from a registry).
        #[arg(long)]
        allow_suid_dev: bool,
        #[command(flatten)]
        socket: Socket,
    },
    /// Unmount a lazyblob mount.
    Umount {
        dir: PathBuf,
        /// Detach a busy mount (open files keep being served).
        #[arg(long)]
        lazy: bool,
        #[command(flatten)]
        socket: Socket,
    },
    /// (internal) The guard the daemon starts: keeps the fanotify group alive if the daemon
    /// stops, holds readers for the next daemon, then denies reads with EIO.
    #[command(hide = true)]
    Guard {
        #[arg(long)]
        kind: String,
        #[arg(long, required = true)]
        kernel_fd: Vec<i32>,
        #[arg(long)]
        pipe_fd: i32,
        #[arg(long)]
        keeper_fd: i32,
        #[arg(long)]
        max_fd: u64,
        #[arg(long)]
        hold_ms: u64,
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Add lazyblob's proxy snapshotter and CRI settings to containerd's config (version 2
    /// or 3, its imports too), keeping a backup of each edited file; or restore the backups.
    /// A run that finds everything in place writes nothing.
    ContainerdConfig {
        #[command(subcommand)]
        action: ContainerdAction,
    },
    /// Startup prefetch lists (what an image's first start read).
    Prefetch {
        #[command(subcommand)]
        action: PrefetchAction,
    },
    /// Register an image with the running daemon; prints its fsid.
    Register {
        reference: String,
        #[command(flatten)]
        socket: Socket,
    },
}

/// `lazyblob prefetch` verbs.
#[derive(Subcommand)]
enum PrefetchAction {
    /// Push IMAGE's list to its registry, as an artifact referring to the image (listed in its
    /// `sha256-<hex>` referrers tag), for every node that mounts it.
    Push {
        image: String,
        /// The list to push (default: the one the daemon kept for IMAGE under its state_dir).
        #[arg(long)]
        list: Option<PathBuf>,
        /// Configuration (registry credentials, insecure hosts, state_dir).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// `lazyblob containerd-config` verbs.
#[derive(Subcommand)]
enum ContainerdAction {
    /// Add the settings (backups kept as `<file>.lazyblob-backup`).
    Install(ContainerdArgs),
    /// Restore the backups of files lazyblob edited (a file changed since is left alone).
    Uninstall(ContainerdArgs),
}

#[derive(Args)]
struct ContainerdArgs {
    /// lazyblob's config: the snapshotter socket and root containerd is pointed at.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// containerd's config file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// Run this with `sh -c` when a file was written (restart containerd, e.g.
    /// `systemctl restart containerd`); not run when nothing changed.
    #[arg(long)]
    on_change: Option<String>,
}

/// `--chunk-size`: the format's rule.
fn chunk_size(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if !lazyblob::image::format::is_valid_chunk_size(n) {
        return Err("must be a power of two >= 4096".into());
    }
    Ok(n)
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
        Cmd::Daemon { .. } | Cmd::Demo | Cmd::Mkfs { push: Some(_), .. } | Cmd::Convert { .. } | Cmd::Prefetch { .. }
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
    if let Cmd::Guard {
        kind,
        kernel_fd,
        pipe_fd,
        keeper_fd,
        max_fd,
        hold_ms,
        state_dir,
    } = &cli.cmd
    {
        let kind = match kind.as_str() {
            "cachefiles" => lazyblob::frontend::Frontend::Cachefiles,
            _ => lazyblob::frontend::Frontend::Fanotify,
        };
        let args = lazyblob::frontend::guard::Args {
            kind,
            kernel_fds: kernel_fd.clone(),
            pipe_fd: *pipe_fd,
            keeper_fd: *keeper_fd,
            max_fd: *max_fd,
            hold: std::time::Duration::from_millis(*hold_ms),
            state_dir: state_dir.clone(),
        };
        return Ok(lazyblob::frontend::guard::run(&args)?);
    }
    lazyblob::malloc::pin_mmap_threshold(lazyblob::malloc::MMAP_THRESHOLD);
    lazyblob::malloc::limit_arenas(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        // cache writes and file I/O run on the blocking pool: bound it, each thread costs
        // memory (~100 KiB of stack it touched, kept for its life): 8 on 2 cores were as fast
        // as 32, 11 threads at the peak instead of 29-35, 1.2-2 MiB less (`--only start`,
        // 10,000 readers in `--only scale`: 33.8-34.4 MiB against 40.5-43.7, no slower)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let out = rt.block_on(run(cli.cmd))?;
    print(&out)
}

/// Do what `cmd` asks; what to print on stdout.
async fn run(cmd: Cmd) -> Result<String> {
    match cmd {
        #[cfg(feature = "demo")]
        Cmd::Demo => lazyblob::demo::run().await.map(|()| String::new()),
        #[cfg(not(feature = "demo"))]
        Cmd::Demo => anyhow::bail!("this lazyblob was built without the `demo` feature"),
        Cmd::Daemon { config } => {
            let cfg = Config::load_or_default(config.as_deref())?;
            lazyblob::service::run(cfg).await.map(|()| String::new())
        }
        Cmd::Status { socket, json } => commands::status(&socket.socket, json).await,
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
            commands::mkfs(&source, &out, &opts, push.as_deref(), config.as_deref()).await
        }
        Cmd::Convert {
            src,
            dst,
            platform,
            all_platforms,
            chunk_size,
            chunk_digest,
            no_leaves,
            config,
            work_dir,
            limits,
        } => {
            let opts = lazyblob::image::convert::ConvertOptions {
                platform: platform.map(|p| p.parse()).transpose()?,
                all_platforms,
                chunk_size,
                chunk_digest,
                leaves: !no_leaves,
                progress: true,
                work_dir,
                limits: limits.into(),
            };
            commands::convert(&src, &dst, &opts, config.as_deref()).await
        }
        Cmd::Mount {
            image,
            dir,
            allow_suid_dev,
            socket,
        } => {
            let special = match allow_suid_dev {
                true => SpecialFiles::Honoured,
                false => SpecialFiles::Ignored,
            };
            commands::mount(&socket.socket, &image, &dir, special).await
        }
        Cmd::Umount { dir, lazy, socket } => commands::umount(&socket.socket, &dir, lazy).await,
        Cmd::ContainerdConfig { action } => {
            let (action, args) = match action {
                ContainerdAction::Install(a) => (commands::NodeAction::Install, a),
                ContainerdAction::Uninstall(a) => (commands::NodeAction::Uninstall, a),
            };
            commands::containerd_config(
                action,
                args.config.as_deref(),
                &args.containerd_config,
                args.on_change.as_deref(),
            )
        }
        Cmd::Register { reference, socket } => commands::register(&socket.socket, &reference).await,
        Cmd::Prefetch {
            action: PrefetchAction::Push { image, list, config },
        } => commands::prefetch_push(&image, list.as_deref(), config.as_deref()).await,
        Cmd::Guard { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// Print `text` on stdout; a reader that went away (`| head`, `| grep -q`) is not an error.
fn print(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
