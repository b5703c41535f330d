//! Registry errors, classified as retryable or final.

use oci_client::errors::OciDistributionError;

/// What went wrong talking to a registry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid reference {0:?}: {1}")]
    Reference(String, String),
    #[error("{what} not found at {url}")]
    NotFound { what: &'static str, url: String },
    #[error("not authorized at {0}")]
    Unauthorized(String),
    #[error("registry answered HTTP {status} at {url}")]
    Status { status: u16, url: String },
    #[error("transport error: {0}")]
    Transport(String),
    #[error("request timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("body truncated: expected {expected} bytes, got {got}")]
    Truncated { expected: u64, got: u64 },
    #[error("digest mismatch for {what}: expected {expected}, got {got}")]
    DigestMismatch {
        what: String,
        expected: String,
        got: String,
    },
    #[error("bad manifest: {0}")]
    Manifest(String),
    #[error("{what} of {size} bytes exceeds registry.limits ({max} bytes)")]
    TooLarge { what: String, size: u64, max: u64 },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    Exhausted {
        attempts: u32,
        elapsed: std::time::Duration,
        last: Box<RegistryError>,
    },
}

impl RegistryError {
    /// Faults worth another attempt: server errors, broken connections, timeouts, bodies that
    /// arrived short or corrupted.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            RegistryError::Transport(_)
            | RegistryError::Timeout(_)
            | RegistryError::Truncated { .. }
            | RegistryError::DigestMismatch { .. } => true,
            _ => false,
        }
    }
}

impl From<OciDistributionError> for RegistryError {
    fn from(e: OciDistributionError) -> Self {
        use OciDistributionError as E;
        match e {
            E::UnauthorizedError { url } => RegistryError::Unauthorized(url),
            E::AuthenticationFailure(m) => RegistryError::Unauthorized(m),
            E::ServerError { code: 404, url, .. } => RegistryError::NotFound { what: "object", url },
            E::ServerError { code, url, .. } => RegistryError::Status { status: code, url },
            E::RegistryError { envelope, url } => {
                let unknown = envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::BlobUnknown
                            | oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                    )
                });
                if unknown {
                    RegistryError::NotFound { what: "object", url }
                } else {
                    let denied = envelope.errors.iter().any(|e| {
                        matches!(
                            e.code,
                            oci_client::errors::OciErrorCode::Denied | oci_client::errors::OciErrorCode::Unauthorized
                        )
                    });
                    if denied {
                        RegistryError::Unauthorized(url)
                    } else {
                        RegistryError::Status { status: 400, url }
                    }
                }
            }
            E::RequestError(r) => {
                if r.is_timeout() {
                    RegistryError::Timeout(std::time::Duration::ZERO)
                } else if let Some(s) = r.status() {
                    RegistryError::Status {
                        status: s.as_u16(),
                        url: r.url().map(|u| u.to_string()).unwrap_or_default(),
                    }
                } else {
                    RegistryError::Transport(error_chain(&r))
                }
            }
            E::IoError(io) => RegistryError::Transport(io.to_string()),
            E::ImageManifestNotFoundError(m) => RegistryError::Manifest(m),
            E::ManifestParsingError(m) | E::VersionedParsingError(m) => RegistryError::Manifest(m),
            E::UnsupportedMediaTypeError(m) => RegistryError::Manifest(format!("unsupported media type {m}")),
            E::UnsupportedSchemaVersionError(v) => RegistryError::Manifest(format!("unsupported schema version {v}")),
            E::DigestError(d) => RegistryError::DigestMismatch {
                what: "manifest".into(),
                expected: String::new(),
                got: d.to_string(),
            },
            other => RegistryError::Transport(other.to_string()),
        }
    }
}

/// `Display` of an error and its sources, for messages that must name the root cause.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(RegistryError::Status {
            status: 503,
            url: String::new()
        }
        .is_retryable());
        assert!(RegistryError::Status {
            status: 429,
            url: String::new()
        }
        .is_retryable());
        assert!(!RegistryError::Status {
            status: 403,
            url: String::new()
        }
        .is_retryable());
        assert!(!RegistryError::NotFound {
            what: "blob",
            url: String::new()
        }
        .is_retryable());
        assert!(RegistryError::Truncated { expected: 2, got: 1 }.is_retryable());
        assert!(!RegistryError::Unauthorized(String::new()).is_retryable());
    }
}
