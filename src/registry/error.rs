//! Registry errors, classified as retryable or final.

use oci_client::errors::OciDistributionError;

/// What went wrong talking to a registry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// A reference that does not parse (the reference, why).
    #[error("invalid reference {0:?}: {1}")]
    Reference(String, String),
    /// A manifest or blob the registry does not have.
    #[error("{what} not found at {url}")]
    NotFound {
        /// A manifest, a blob...
        what: &'static str,
        /// Where it was looked for.
        url: String,
    },
    /// The registry refused the credentials (or there were none).
    #[error("not authorized at {0}")]
    Unauthorized(String),
    /// An HTTP status that is not success.
    #[error("registry answered HTTP {status} at {url}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The request.
        url: String,
    },
    /// The connection failed.
    #[error("transport error: {0}")]
    Transport(String),
    /// A request took too long.
    #[error("request timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// A body shorter than announced.
    #[error("body truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes announced.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// Bytes that do not match their digest.
    #[error("digest mismatch for {what}: expected {expected}, got {got}")]
    DigestMismatch {
        /// What they are.
        what: String,
        /// The digest expected.
        expected: String,
        /// The digest of the bytes.
        got: String,
    },
    /// A manifest or index that cannot be used.
    #[error("bad manifest: {0}")]
    Manifest(String),
    /// A range outside its blob.
    #[error("range {start}..{end} is outside blob {blob} of {size} bytes")]
    Range {
        /// Where the range starts.
        start: u64,
        /// Where it ends (exclusive).
        end: u64,
        /// The blob.
        blob: String,
        /// The blob's size.
        size: u64,
    },
    /// A platform that is not `os/arch[/variant]`.
    #[error(transparent)]
    Platform(#[from] super::platform::BadPlatform),
    /// A size over its ceiling.
    #[error(transparent)]
    TooLarge(#[from] crate::config::TooLarge),
    /// Credentials could not be found or used.
    #[error("credentials: {0}")]
    Credentials(String),
    /// Every attempt failed.
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: std::time::Duration,
        /// The last failure.
        last: Box<RegistryError>,
    },
    /// The receiver of a body could not keep verified bytes (a local write failed): not the
    /// registry's fault, and no other attempt would fare better.
    #[error("the fetched bytes could not be kept: {0}")]
    Keep(String),
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
        classify(e).redacted()
    }
}

impl RegistryError {
    /// The same error with every URL in it stripped of query strings (presigned blob URLs
    /// carry their signature there) and userinfo: errors end up in logs and API answers.
    fn redacted(self) -> RegistryError {
        use RegistryError as R;
        match self {
            R::Unauthorized(u) => R::Unauthorized(redact_urls(&u)),
            R::NotFound { what, url } => R::NotFound {
                what,
                url: redact_urls(&url),
            },
            R::Status { status, url } => R::Status {
                status,
                url: redact_urls(&url),
            },
            R::Transport(m) => R::Transport(redact_urls(&m)),
            R::Manifest(m) => R::Manifest(redact_urls(&m)),
            other => other,
        }
    }
}

/// `text` with each `http(s)://` URL's userinfo removed and its query replaced by
/// `?<redacted>`.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["https://", "http://"].iter().filter_map(|p| rest.find(p)).min() {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ','))
            .unwrap_or(tail.len());
        let url = &tail[..end];
        let (scheme, after) = url.split_once("://").unwrap_or(("", url));
        let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, path) = after.split_at(authority_end);
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        out.push_str(scheme);
        out.push_str("://");
        out.push_str(host);
        match path.split_once('?') {
            Some((p, _)) => {
                out.push_str(p);
                out.push_str("?<redacted>");
            }
            None => out.push_str(path),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

impl From<reqwest::Error> for RegistryError {
    fn from(e: reqwest::Error) -> Self {
        request_error(e).redacted()
    }
}

/// An HTTP client error: a timeout, a status, or a transport failure with its causes (the
/// URL left out: it may carry a presigned signature).
fn request_error(r: reqwest::Error) -> RegistryError {
    let r = r.without_url();
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

fn classify(e: OciDistributionError) -> RegistryError {
    {
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
            E::RequestError(r) => request_error(r),
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

    #[test]
    fn urls_in_errors_lose_query_strings_and_userinfo() {
        let text = "error sending request for url (https://user:pw@s3.example/b/sha256?X-Amz-Signature=abc&X-Amz-Credential=k) and http://r.example:5000/v2/x/blobs/y";
        let r = redact_urls(text);
        assert_eq!(
            r,
            "error sending request for url (https://s3.example/b/sha256?<redacted>) and http://r.example:5000/v2/x/blobs/y"
        );
        let e = RegistryError::Status {
            status: 403,
            url: "https://s3.example/o?sig=secret".into(),
        }
        .redacted();
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
