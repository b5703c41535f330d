//! The OCI registry client: manifests (with platform choice), whole blobs verified by digest,
//! exact byte ranges, pushes. Built on `oci-client` (its token flow, pushes; manifest and
//! blob GETs are sent here with the credential its auth step gave, kept per repository:
//! `kept`); adds credentials from docker configs and helpers, re-authentication on 401,
//! retries with backoff and jitter, mirrors, per-host concurrency limits and plain HTTP only
//! for hosts configured as insecure.
//!
//! The registry knows nothing of caches or kernels: it hands bytes to the blob engine.

#![forbid(unsafe_code)]

mod blob_urls;
mod blobs;
pub mod captured;
mod clients;
pub mod credentials;
pub mod error;
mod kept;
mod manifest;
pub mod platform;
pub mod push;
pub(crate) mod range;
pub mod reference;
pub mod streamed;
mod types;

pub use types::{BlobSource, HostStats, RegistryStats, ResolvedManifest, MANIFEST_MEDIA_TYPES};
pub mod retry;
pub mod roots;
pub mod slots;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use oci_client::manifest::OciManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};

use crate::image::digest::Digest;
use crate::lock::lock;
use credentials::Scope;
pub use error::RegistryError;
use platform::Platform;
use retry::RetryPolicy;

use crate::config::RegistryConfig;

/// A repository's own client: its host, repository and purpose.
type ScopedKey = (String, String, clients::Purpose);

/// The registry client shared by the catalog and the blob engine.
pub struct Registry {
    /// The clients for hosts without a `ca_file` (the bundled public roots).
    clients: clients::Clients,
    /// Clients per host with a `ca_file`: a private CA is trusted for its host only (and
    /// for what that host redirects to), never for the others.
    host_clients: HashMap<String, clients::Clients>,
    /// Hosts spoken to over plain HTTP.
    insecure: Vec<String>,
    creds: credentials::Credentials,
    /// Clients of repositories with a credential of their own ([`Scope::Repository`]):
    /// `oci-client` keeps one credential per host, which must not serve another repository.
    /// Keyed by host, repository and purpose, with a fingerprint of the credential they hold.
    scoped: Mutex<HashMap<ScopedKey, (String, oci_client::Client)>>,
    /// The credential blob GETs carry, per repository.
    kept: kept::KeptCredentials,
    /// Blob URLs, parsed once.
    blob_urls: blob_urls::BlobUrls,
    cfg: RegistryConfig,
    policy: RetryPolicy,
    platform: Platform,
    /// Concurrent requests per host, some kept for readers.
    slots: slots::Slots,
    /// Counters for `status`.
    pub stats: RegistryStats,
}

impl Registry {
    /// Build a client from the registry config. `max_concurrent` bounds range requests per host.
    pub fn new(cfg: &RegistryConfig, max_concurrent: usize) -> Result<Registry, RegistryError> {
        let creds = credentials::Credentials::new(&cfg.hosts, cfg.docker_config.as_deref())?;
        Self::with_credentials(cfg, max_concurrent, creds)
    }

    /// Build a client with explicit credentials (tests, embedded uses).
    pub fn with_credentials(
        cfg: &RegistryConfig,
        max_concurrent: usize,
        creds: credentials::Credentials,
    ) -> Result<Registry, RegistryError> {
        let clients::HostClients {
            default: default_clients,
            by_host: host_clients,
            insecure,
        } = clients::HostClients::new(cfg)?;
        let platform = cfg.platform.clone().unwrap_or_else(Platform::current);
        Ok(Registry {
            clients: default_clients,
            host_clients,
            insecure,
            creds,
            scoped: Mutex::new(HashMap::new()),
            kept: kept::KeptCredentials::default(),
            blob_urls: Default::default(),
            policy: RetryPolicy {
                max_attempts: cfg.max_attempts,
                initial: cfg.backoff_initial,
                max: cfg.backoff_max,
                deadline: cfg.deadline,
                attempt_timeout: cfg.request_timeout,
                min_rate: cfg.min_rate_kib_s.map_or(0, |r| r.get().saturating_mul(1024)),
            },
            cfg: cfg.clone(),
            platform,
            slots: slots::Slots::new(max_concurrent),
            stats: RegistryStats::default(),
        })
    }

    /// Use the credentials captured from kubelet's pulls (the CRI proxy), per repository.
    pub fn with_captured(mut self, captured: Arc<captured::Captured>) -> Self {
        self.creds = std::mem::take(&mut self.creds).with_captured(captured);
        self
    }

    /// The clients of `reference`'s host (its own CA, or the bundled roots).
    fn clients_of(&self, reference: &Reference) -> &clients::Clients {
        self.host_clients.get(reference.registry()).unwrap_or(&self.clients)
    }

    /// The `oci-client` for `purpose` that talks to `reference`'s host with `auth`: the
    /// host's shared one, or for a repository's own credential a client of that repository
    /// alone.
    fn client(
        &self,
        reference: &Reference,
        auth: &RegistryAuth,
        scope: Scope,
        purpose: clients::Purpose,
    ) -> Result<oci_client::Client, RegistryError> {
        let host = self.clients_of(reference);
        if scope == Scope::Host {
            return host.oci(purpose);
        }
        let fingerprint = kept::fingerprint(auth);
        let key = (
            reference.registry().to_string(),
            reference.repository().to_string(),
            purpose,
        );
        let mut scoped = lock(&self.scoped);
        match scoped.get(&key) {
            Some((f, client)) if *f == fingerprint => Ok(client.clone()),
            _ => {
                let client = host.settings.client(purpose)?;
                scoped.insert(key, (fingerprint, client.clone()));
                Ok(client)
            }
        }
    }

    /// The HTTP client for `reference`'s host (bounded manifest GETs).
    fn http(&self, reference: &Reference) -> &reqwest::Client {
        &self.clients_of(reference).http
    }

    /// `<scheme>://<registry>/v2/<repository>` of `reference`, as `oci-client` would build it.
    fn repository_url(&self, reference: &Reference) -> String {
        let registry = reference.resolve_registry();
        let scheme = if self.insecure.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{registry}/v2/{}", reference.repository())
    }

    /// The manifest URL of `reference`, as `oci-client` would build it.
    fn manifest_url(&self, reference: &Reference) -> String {
        let name = reference.digest().or(reference.tag()).unwrap_or("latest");
        let ns = reference.namespace().map(|ns| format!("?ns={ns}")).unwrap_or_default();
        format!("{}/manifests/{name}{ns}", self.repository_url(reference))
    }

    /// The platform chosen from image indexes.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// Resolve a reference to an image manifest; an index resolves to this node's platform.
    pub async fn resolve(&self, reference: &Reference) -> Result<ResolvedManifest, RegistryError> {
        let (raw, digest) = self.fetch_manifest_raw(reference).await?;
        let parsed: OciManifest =
            serde_json::from_slice(&raw).map_err(|e| RegistryError::Manifest(format!("{reference}: {e}")))?;
        match parsed {
            OciManifest::Image(manifest) => Ok(ResolvedManifest { manifest, digest, raw }),
            OciManifest::ImageIndex(index) => {
                let chosen = self.platform.choose(&index.manifests).ok_or_else(|| {
                    RegistryError::Manifest(format!(
                        "{reference}: index has no manifest for platform {}",
                        self.platform
                    ))
                })?;
                // validated before it names anything: it becomes a URL and a kept file's name
                let chosen =
                    Digest::parse(&chosen).map_err(|e| RegistryError::Manifest(format!("{reference}: {e}")))?;
                let by_digest = reference.clone_with_digest(chosen.to_string());
                let (raw, digest) = self.fetch_manifest_raw(&by_digest).await?;
                match serde_json::from_slice::<OciManifest>(&raw) {
                    Ok(OciManifest::Image(manifest)) => Ok(ResolvedManifest { manifest, digest, raw }),
                    Ok(OciManifest::ImageIndex(_)) => Err(RegistryError::Manifest(format!(
                        "{reference}: index entry {chosen} is itself an index"
                    ))),
                    Err(e) => Err(RegistryError::Manifest(format!("{by_digest}: {e}"))),
                }
            }
        }
    }

    /// Fetch a manifest or index as raw bytes with its content digest (a digest reference is
    /// verified; a body over `limits.max_manifest_bytes` is refused).
    pub async fn fetch_manifest_raw(&self, reference: &Reference) -> Result<(Bytes, Digest), RegistryError> {
        let want = reference
            .digest()
            .map(Digest::parse)
            .transpose()
            .map_err(|e| RegistryError::Manifest(format!("{reference}: {e}")))?;
        let accept = MANIFEST_MEDIA_TYPES.join(", ");
        let (raw, digest) = self
            .get_bounded(reference, "manifest", &accept, |ep| Ok(self.manifest_url(ep)))
            .await?;
        // oci-client checks a digest reference; check it again so a mirror cannot lie.
        let actual = Digest::of(&raw);
        if let Some(want) = want {
            if want != actual {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {reference}"),
                    expected: want.to_string(),
                    got: actual.to_string(),
                });
            }
        }
        if digest.as_deref().is_some_and(|d| d != actual.as_str()) {
            tracing::debug!(header = ?digest, %actual, "registry digest header differs from content; using content");
        }
        Ok((raw, actual))
    }

    /// The referrers of `subject` (a manifest digest in `repo`'s repository) by the OCI 1.1
    /// referrers API, asked for `artifact_type` only (a registry may ignore the filter): the
    /// image index's bytes, bounded like a manifest's, or `None` from a registry without the
    /// API (404 from every endpoint), whose referrers are found by their tag instead. The
    /// index names digests and sizes the caller has yet to check.
    pub async fn referrers(
        &self,
        repo: &Reference,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        let at = repo.clone_with_digest(subject.to_string());
        let url = |ep: &Reference| {
            reqwest::Url::parse_with_params(
                &format!("{}/referrers/{subject}", self.repository_url(ep)),
                [("artifactType", artifact_type)],
            )
            .map(String::from)
            .map_err(|e| RegistryError::Reference(ep.to_string(), e.to_string()))
        };
        let accept = oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE;
        match self.get_bounded(&at, "referrers", accept, url).await {
            Ok((raw, _)) => Ok(Some(raw)),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GET `url(endpoint)` for `reference` accepting `accept`, on each endpoint (mirrors first)
    /// with retries and re-authentication, the body bounded like a manifest's: the body and
    /// its `Docker-Content-Digest` header, if any.
    async fn get_bounded(
        &self,
        reference: &Reference,
        what: &'static str,
        accept: &str,
        url: impl Fn(&Reference) -> Result<String, RegistryError>,
    ) -> Result<(Bytes, Option<String>), RegistryError> {
        let url = &url;
        self.with_endpoints(
            reference,
            what,
            0,
            slots::Need::Reader,
            |ep, auth, client, _| async move {
                let credential = manifest::Credential::obtain(&client, &ep, &auth, RegistryOperation::Pull).await?;
                manifest::get(self.http(&ep), &url(&ep)?, accept, credential, &self.cfg.limits).await
            },
        )
        .await
    }

    /// The ceilings on what a registry may make this client hold.
    pub fn limits(&self) -> &crate::config::LimitsConfig {
        &self.cfg.limits
    }

    async fn auth_for(&self, reference: &Reference) -> Result<(RegistryAuth, Scope), RegistryError> {
        self.creds
            .for_repository(reference.registry(), reference.repository())
            .await
    }

    /// Mirrors of the reference's registry in order, then the origin.
    fn endpoints(&self, reference: &Reference) -> Vec<Reference> {
        let mut eps: Vec<Reference> = self
            .cfg
            .host(reference.registry())
            .map(|h| h.mirrors.iter().map(|m| retarget(reference, m)).collect())
            .unwrap_or_default();
        eps.push(reference.clone());
        eps
    }

    /// Run `op`, which moves about `bytes` of data, against each endpoint (mirrors first) with
    /// retries, within one deadline for the whole operation. On 401 the credential is looked
    /// up again and `op` runs once more (it runs the auth step itself). `op` gets the
    /// endpoint's statistics for the kind of request `what` names. Each attempt holds a slot
    /// of its host for `need` (`slots`).
    async fn with_endpoints<T, F, Fut>(
        &self,
        reference: &Reference,
        what: &'static str,
        bytes: u64,
        need: slots::Need,
        op: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Reference, RegistryAuth, oci_client::Client, Arc<HostStats>) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let policy = self.policy.for_transfer(bytes);
        let until = Instant::now() + policy.deadline;
        let eps = self.endpoints(reference);
        let mut last = None;
        let n_eps = eps.len();
        for (i, ep) in eps.into_iter().enumerate() {
            let (auth, scope) = self.auth_for(&ep).await?;
            let client = self.client(&ep, &auth, scope, clients::Purpose::Pull)?;
            client.store_auth_if_needed(ep.resolve_registry(), &auth).await;
            let host = ep.registry().to_string();
            let host_stats = self.stats.host(&host, what);
            let res = policy
                .run_until(
                    what,
                    until,
                    || self.slots.acquire(&host, need),
                    |n| {
                        let ep = ep.clone();
                        let auth = auth.clone();
                        let client = client.clone();
                        let op = &op;
                        let host_stats = &host_stats;
                        async move {
                            use std::sync::atomic::Ordering::Relaxed;
                            self.stats.requests.fetch_add(1, Relaxed);
                            host_stats.requests.fetch_add(1, Relaxed);
                            if n > 1 {
                                self.stats.retries.fetch_add(1, Relaxed);
                                host_stats.retries.fetch_add(1, Relaxed);
                            }
                            let t0 = Instant::now();
                            let first = op(ep.clone(), auth.clone(), client, Arc::clone(host_stats)).await;
                            host_stats.latency.observe(t0.elapsed().as_secs_f64());
                            match first {
                                Err(RegistryError::Unauthorized(url)) => {
                                    tracing::info!(registry = ep.registry(), "401 from registry, re-authenticating");
                                    // a credential helper's answer may have expired: ask again
                                    self.creds.forget(ep.registry());
                                    let (auth, scope) = self.auth_for(&ep).await?;
                                    let client = self.client(&ep, &auth, scope, clients::Purpose::Pull)?;
                                    // `op` runs the auth step itself (a manifest GET each time, a
                                    // blob GET once its kept credential was refused)
                                    op(ep, auth, client, Arc::clone(host_stats)).await.map_err(|e| match e {
                                        RegistryError::Unauthorized(_) => RegistryError::Unauthorized(url),
                                        other => other,
                                    })
                                }
                                other => other,
                            }
                        }
                    },
                )
                .await;
            match res {
                Ok(v) => return Ok(v),
                Err(e) => {
                    // a 404 is the registry's answer (a mirror without the blob, a registry
                    // without the referrers API or a prefetch list), not a fault of it
                    if !matches!(e, RegistryError::NotFound { .. }) {
                        self.stats.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        host_stats.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if i + 1 < n_eps {
                        tracing::warn!(endpoint = ep.registry(), error = %e, "endpoint failed, trying the next one");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Transport("no endpoint".into())))
    }
}

/// The same repository and tag/digest on another registry host (a mirror).
fn retarget(r: &Reference, host: &str) -> Reference {
    match (r.tag(), r.digest()) {
        (_, Some(d)) => Reference::with_digest(host.to_string(), r.repository().to_string(), d.to_string()),
        (Some(t), None) => Reference::with_tag(host.to_string(), r.repository().to_string(), t.to_string()),
        (None, None) => Reference::with_tag(host.to_string(), r.repository().to_string(), "latest".into()),
    }
}

/// `sha256:<hex>` of some bytes, as a string (see [`Digest::of`]).
pub fn sha256_digest(data: &[u8]) -> String {
    Digest::of(data).to_string()
}

/// Parse an image reference (`host[:port]/repo[:tag|@digest]`).
pub fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    reference::parse(s).map_err(|e| RegistryError::Reference(s.to_string(), e.to_string()))
}
