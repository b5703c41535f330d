//! Authentication modes: anonymous, HTTP basic, and the distribution token flow (a `/token`
//! endpoint issuing bearer tokens that expire).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;

/// How clients must authenticate.
#[derive(Debug, Clone, Default)]
pub enum AuthMode {
    #[default]
    Anonymous,
    /// Every request needs `Authorization: Basic` with these credentials.
    Basic { user: String, password: String },
    /// Requests need a bearer token from `/token`; the token endpoint checks these basic
    /// credentials when given (anonymous tokens otherwise). Tokens live `ttl`.
    Token {
        credentials: Option<(String, String)>,
        ttl: Duration,
    },
}

/// Issued tokens and their expiry.
#[derive(Debug, Default)]
pub struct Tokens {
    issued: Mutex<HashMap<String, Instant>>,
}

impl Tokens {
    pub fn issue(&self, ttl: Duration) -> String {
        let token = format!("tok-{:032x}", rand::random::<u128>());
        crate::lock(&self.issued).insert(token.clone(), Instant::now() + ttl);
        token
    }

    pub fn valid(&self, token: &str) -> bool {
        crate::lock(&self.issued)
            .get(token)
            .is_some_and(|exp| *exp > Instant::now())
    }

    pub fn expire_all(&self) {
        let now = Instant::now();
        for exp in crate::lock(&self.issued).values_mut() {
            *exp = now;
        }
    }
}

/// `user:password` from an `Authorization: Basic ...` header.
pub fn basic_credentials(header: Option<&str>) -> Option<(String, String)> {
    let b64 = header?.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The token from an `Authorization: Bearer ...` header.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    header?.strip_prefix("Bearer ")
}
