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
    /// Register an image with the running daemon; prints its fsid.
    Register {
        reference: String,
        #[arg(long, default_value = "/run/lazyblob/lazyblob.sock")]
        socket: PathBuf,
    },
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Daemon { config } => {
                let cfg = match config {
                    Some(p) => Config::load(&p)?,
                    None => Config::default(),
                };
                lazyblob::daemon::run(cfg).await
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
                    for i in &s.images {
                        println!("{}  fsid={}  {} data blobs  {} bytes", i.reference, i.fsid, i.data_blobs, i.total_size);
                    }
                }
                Ok(())
            }
            Cmd::Register { reference, socket } => {
                let info = lazyblob::api::client::ApiClient::new(&socket)?.register(&reference).await?;
                println!("{}", info.fsid);
                Ok(())
            }
        }
    })
}
