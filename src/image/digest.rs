//! Content digests as a type that can only hold a valid one: `sha256:` followed by 64
//! lower-case hex digits. Every digest that comes from outside (manifests, indexes, chunk
//! tables, references, kept state) is parsed into a [`Digest`] once, where it is read; file
//! names, cache keys, mount options and kernel cookies are derived only from this type, so a
//! registry cannot make the daemon name a path (`/etc/cron.d/x`, `sha256:x/../../y`) or hand a
//! byte string that panics when sliced.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Why a string is not a digest lazyblob accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {shown:?}: {why} (expected sha256: and 64 lower-case hex digits)")]
pub struct DigestError {
    /// The offending value, cut short and with control characters escaped by `{:?}`.
    shown: String,
    why: &'static str,
}

/// A validated `sha256:<64 lower-case hex>` digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;

impl Digest {
    /// Parse and validate; the only way to make a [`Digest`] from a string.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let err = |why| DigestError {
            shown: s.chars().take(80).collect(),
            why,
        };
        let hex = s.strip_prefix(PREFIX).ok_or_else(|| err("unsupported algorithm"))?;
        if hex.len() != HEX_LEN {
            return Err(err("wrong length"));
        }
        if !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(err("not lower-case hex"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The SHA-256 digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_raw(Sha256::digest(data).into())
    }

    /// The digest whose SHA-256 value is `raw`.
    pub fn from_raw(raw: [u8; 32]) -> Digest {
        Digest(format!("{PREFIX}{}", hex::encode(raw)))
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// A file name for this digest: `sha256-<hex>` (no separator, no dot, fixed length).
    pub fn file_name(&self) -> String {
        format!("sha256-{}", self.hex())
    }

    /// Whether `data` hashes to this digest.
    pub fn matches(&self, data: &[u8]) -> bool {
        Digest::of(data) == *self
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<String> for Digest {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_only_sha256_lower_hex() {
        let good = format!("sha256:{}", "0a".repeat(32));
        let d = Digest::parse(&good).unwrap();
        assert_eq!(d.hex(), "0a".repeat(32));
        assert_eq!(d.file_name(), format!("sha256-{}", "0a".repeat(32)));
        for bad in [
            String::new(),
            "/tmp/x".into(),
            "sha256:x/../../etc/cron.d/x".into(),
            format!("sha256:{}", "0A".repeat(32)),
            format!("sha512:{}", "0a".repeat(64)),
            format!("sha256:{}", "0a".repeat(31)),
            format!("sha256:{}/", "0a".repeat(32)),
            format!("sha256:{}é", "0a".repeat(31)),
            format!("sha256:../{}", "0".repeat(61)),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<Digest>("\"/etc/passwd\"").is_err());
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{good}\""));
        assert!(Digest::of(b"x").matches(b"x"));
    }

    proptest! {
        #[test]
        fn parsed_digests_are_safe_file_names(s in "\\PC{0,80}") {
            if let Ok(d) = Digest::parse(&s) {
                let name = d.file_name();
                prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
                prop_assert_eq!(name.len(), 71);
            }
        }
    }
}
