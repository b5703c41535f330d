//! registry-mock: an OCI distribution registry for tests and the demo.
//!
//! Serves pushes and pulls of manifests and blobs (`HEAD`, `Range` -> 206), with anonymous,
//! basic or token auth. Faults are injected per test and per blob (latency, 5xx bursts,
//! connections dropped mid-body, corrupted bytes), and counters record every request and byte
//! served per blob, so tests can prove laziness and single-flight. Hostile mode
//! ([`HostileImage`]) rewrites stored images the way an attacker's registry would serve them.

mod auth;
mod faults;
mod hostile;
mod referrers;
mod server;
mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub use auth::AuthMode;
pub use faults::{Fault, FaultRule};
pub use hostile::HostileImage;
pub use store::Store;

/// One request the registry answered for a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobHit {
    pub digest: String,
    /// First byte and length served (the whole blob when no Range was asked).
    pub offset: u64,
    pub len: u64,
    pub status: u16,
    /// Whether the request carried an Authorization header.
    pub had_authorization: bool,
}

/// Counters of what the registry served.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub requests: u64,
    pub manifest_requests: u64,
    pub token_requests: u64,
    pub unauthorized: u64,
    pub blob_hits: Vec<BlobHit>,
    /// Upload PATCH requests accepted (pieces of chunked uploads).
    pub upload_patches: u64,
    /// Upload requests refused with 413 for their body's size.
    pub uploads_too_large: u64,
}

impl Counters {
    /// Blob GETs of `digest` that succeeded.
    pub fn blob_requests(&self, digest: impl AsRef<str>) -> usize {
        let digest = digest.as_ref();
        self.blob_hits
            .iter()
            .filter(|h| h.digest == digest && h.status < 300)
            .count()
    }

    /// Bytes of `digest` served by successful GETs.
    pub fn blob_bytes(&self, digest: impl AsRef<str>) -> u64 {
        let digest = digest.as_ref();
        self.blob_hits
            .iter()
            .filter(|h| h.digest == digest && h.status < 300)
            .map(|h| h.len)
            .sum()
    }

    /// Bytes served for all blobs.
    pub fn total_blob_bytes(&self) -> u64 {
        self.blob_hits.iter().filter(|h| h.status < 300).map(|h| h.len).sum()
    }

    /// Successful GETs of `digest` whose range overlaps `[offset, offset + len)`.
    pub fn requests_overlapping(&self, digest: impl AsRef<str>, offset: u64, len: u64) -> usize {
        let digest = digest.as_ref();
        self.blob_hits
            .iter()
            .filter(|h| h.digest == digest && h.status < 300 && h.offset < offset + len && offset < h.offset + h.len)
            .count()
    }
}

/// Settings of one registry instance.
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    pub auth: AuthMode,
    /// Answer blob GETs with a 307 to this base URL (another host), like registries that
    /// hand blobs off to object storage.
    pub redirect_blobs_to: Option<String>,
    /// The OCI 1.1 referrers API: absent (the route is unknown, as on docker-registry 2.8),
    /// served, or answered with junk.
    pub referrers_api: ReferrersApi,
    /// Refuse upload requests whose body is longer with 413, like a proxy in front of a
    /// registry that caps request bodies (None: no cap).
    pub max_upload_body: Option<usize>,
    /// Answer the PUT that completes an upload this late (a registry moving a large blob
    /// into its storage).
    pub upload_commit_delay: Option<std::time::Duration>,
    /// Never answer a streamed upload PATCH (one without `Content-Range`): a registry that
    /// hangs on a stream.
    pub stall_streamed_uploads: bool,
}

/// What the registry does with the referrers API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReferrersApi {
    /// 404, as for any unknown route.
    #[default]
    Absent,
    /// Lists the manifests whose subject is the digest; answers pushes with `OCI-Subject`.
    Served,
    /// 200 with a body that is not an image index (a hostile or broken registry).
    Garbled,
}

/// State shared by the server tasks and the test's handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Store,
    pub config: Mutex<MockConfig>,
    pub faults: Mutex<Vec<FaultRule>>,
    pub counters: Mutex<Counters>,
    pub tokens: auth::Tokens,
    pub addr: SocketAddr,
}

/// A running registry. Dropping it stops the server.
pub struct MockRegistry {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MockRegistry {
    /// Start on `127.0.0.1` with a free port.
    pub async fn start(config: MockConfig) -> std::io::Result<MockRegistry> {
        Self::start_on(
            "127.0.0.1:0".parse().expect("literal address"),
            config,
            Store::default(),
        )
        .await
    }

    /// Start on `addr`, serving `store` (share a store between instances for redirects).
    pub async fn start_on(addr: SocketAddr, config: MockConfig, store: Store) -> std::io::Result<MockRegistry> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store,
            config: Mutex::new(config),
            faults: Mutex::new(Vec::new()),
            counters: Mutex::new(Counters::default()),
            tokens: auth::Tokens::default(),
            addr,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = server::router(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(MockRegistry {
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        self.shared.addr.to_string()
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        lock(&self.shared.counters).clone()
    }

    pub fn reset_counters(&self) {
        *lock(&self.shared.counters) = Counters::default();
    }

    /// Replace the fault rules.
    pub fn set_faults(&self, rules: Vec<FaultRule>) {
        *lock(&self.shared.faults) = rules;
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    pub fn set_config(&self, config: MockConfig) {
        *lock(&self.shared.config) = config;
    }

    /// Make every issued token expire now (tests re-authentication).
    pub fn expire_tokens(&self) {
        self.shared.tokens.expire_all();
    }

    /// Stop serving and wait for the server task.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for MockRegistry {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
