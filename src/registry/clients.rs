//! The HTTP clients of the registry, one set per TLS trust setting: the bundled public roots
//! for every host, plus the host's own CA for each host with a `ca_file` (trusted for that
//! host only), or no verification for a host with `skip_verify` (that host only). Each set
//! is an `oci-client` for pulls (blobs, auth), one for pushes and plain `reqwest` clients
//! (bounded manifest GETs; pushes of growing blobs) built with the same roots and timeouts.

use std::collections::HashMap;
use std::sync::OnceLock;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};

use super::error::{error_chain, RegistryError};
use crate::config::{RegistryConfig, Transport};

/// The clients of one TLS trust setting.
pub(super) struct Clients {
    oci: oci_client::Client,
    /// For pushes (see [`Purpose::Push`]), made at the first push: the daemon never pushes,
    /// and a client costs about 5 ms to make.
    push: OnceLock<oci_client::Client>,
    pub http: reqwest::Client,
    /// Plain HTTP for pushes, made at the first one (as `push`).
    push_http: OnceLock<reqwest::Client>,
    /// What the clients were built from (a repository with its own credential gets a client of
    /// its own built the same way).
    pub settings: OciSettings,
}

impl Clients {
    /// The shared `oci-client` for `purpose`.
    pub fn oci(&self, purpose: Purpose) -> Result<oci_client::Client, RegistryError> {
        match purpose {
            Purpose::Pull => Ok(self.oci.clone()),
            Purpose::Push => made_once(&self.push, || self.settings.client(Purpose::Push)),
        }
    }

    /// The plain HTTP client for `purpose`.
    pub fn http_for(&self, purpose: Purpose) -> Result<reqwest::Client, RegistryError> {
        match purpose {
            Purpose::Pull => Ok(self.http.clone()),
            Purpose::Push => made_once(&self.push_http, || self.settings.http(Purpose::Push)),
        }
    }
}

/// The client in `cell`, made by `make` the first time. Two first uses at once may both
/// make one: the first stored is kept.
fn made_once<T: Clone>(
    cell: &OnceLock<T>,
    make: impl FnOnce() -> Result<T, RegistryError>,
) -> Result<T, RegistryError> {
    match cell.get() {
        Some(c) => Ok(c.clone()),
        None => {
            let made = make()?;
            Ok(cell.get_or_init(|| made).clone())
        }
    }
}

/// What an `oci-client` is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Purpose {
    /// Pulls: a response that stalls longer than the request timeout between two reads fails.
    Pull,
    /// Pushes: a blob goes up in one request, which reads nothing until the whole body is
    /// sent; the retry policy's allowance for the blob's size bounds each attempt instead.
    Push,
}

/// Which certificates a set of clients trusts.
#[derive(Clone)]
enum Trust {
    /// The system (or bundled) roots.
    Roots,
    /// Those and a host's own CA (PEM).
    WithCa(Vec<u8>),
    /// Any certificate (`skip_verify`).
    Unverified,
}

/// What an `oci-client` of one trust setting is built from.
pub(super) struct OciSettings {
    insecure: Vec<String>,
    trust: Trust,
    connect_timeout: std::time::Duration,
    read_timeout: std::time::Duration,
}

impl OciSettings {
    /// A new `oci-client` for `purpose` (its own credential store and token cache).
    pub fn client(&self, purpose: Purpose) -> Result<oci_client::Client, RegistryError> {
        let extra = match &self.trust {
            Trust::WithCa(data) => vec![Certificate {
                encoding: CertificateEncoding::Pem,
                data: data.clone(),
            }],
            Trust::Roots | Trust::Unverified => Vec::new(),
        };
        let config = ClientConfig {
            accept_invalid_certificates: matches!(self.trust, Trust::Unverified),
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            extra_root_certificates: extra,
            connect_timeout: Some(self.connect_timeout),
            read_timeout: (purpose == Purpose::Pull).then_some(self.read_timeout),
            platform_resolver: None,
            user_agent: concat!("lazyblob/", env!("CARGO_PKG_VERSION")),
            use_monolithic_push: purpose == Purpose::Push,
            ..Default::default()
        };
        Ok(oci_client::Client::try_from(config)?)
    }

    /// A plain HTTP client for `purpose`, with the same trust and timeouts.
    pub fn http(&self, purpose: Purpose) -> Result<reqwest::Client, RegistryError> {
        let mut http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .user_agent(concat!("lazyblob/", env!("CARGO_PKG_VERSION")));
        if purpose == Purpose::Pull {
            http = http.read_timeout(self.read_timeout);
        }
        match &self.trust {
            Trust::WithCa(data) => {
                let certs = reqwest::Certificate::from_pem_bundle(data)
                    .map_err(|e| RegistryError::Credentials(format!("ca_file: {e}")))?;
                http = http.tls_certs_merge(certs);
            }
            Trust::Unverified => http = http.danger_accept_invalid_certs(true),
            Trust::Roots => {}
        }
        http.build().map_err(|e| RegistryError::Transport(error_chain(&e)))
    }
}

/// Every set of clients a configuration needs.
pub(super) struct HostClients {
    pub default: Clients,
    pub by_host: HashMap<String, Clients>,
    /// Hosts spoken to over plain HTTP: only those marked insecure themselves (a mirror of an
    /// insecure host is TLS unless it has its own `insecure = true` entry).
    pub insecure: Vec<String>,
}

impl HostClients {
    pub fn new(cfg: &RegistryConfig) -> Result<HostClients, RegistryError> {
        let insecure: Vec<String> = cfg
            .hosts
            .iter()
            .filter(|h| h.transport() == Transport::Plain)
            .map(|h| h.host.clone())
            .collect();
        let build = |trust: Trust| -> Result<Clients, RegistryError> {
            let settings = OciSettings {
                insecure: insecure.clone(),
                trust,
                connect_timeout: cfg.connect_timeout,
                read_timeout: cfg.request_timeout,
            };
            Ok(Clients {
                oci: settings.client(Purpose::Pull)?,
                push: OnceLock::new(),
                http: settings.http(Purpose::Pull)?,
                push_http: OnceLock::new(),
                settings,
            })
        };
        let default = build(Trust::Roots)?;
        let mut by_host = HashMap::new();
        for h in &cfg.hosts {
            match h.transport() {
                Transport::TlsWithCa(ca) => {
                    let data = std::fs::read(ca)
                        .map_err(|e| RegistryError::Credentials(format!("ca_file {}: {e}", ca.display())))?;
                    by_host.insert(h.host.clone(), build(Trust::WithCa(data))?);
                }
                Transport::TlsUnverified => {
                    tracing::warn!(
                        host = h.host,
                        "TLS certificates of this host are not verified (skip_verify)"
                    );
                    by_host.insert(h.host.clone(), build(Trust::Unverified)?);
                }
                Transport::Tls | Transport::Plain => {}
            }
        }
        Ok(HostClients {
            default,
            by_host,
            insecure,
        })
    }
}
