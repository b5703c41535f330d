//! Credentials captured from kubelet's image pulls (the CRI proxy sees each `PullImage`'s
//! pull secret): kept per registry host **and repository**, so an image's secret is used for
//! that repository only, persisted root-only so a restart still has them, and dropped once
//! neither a pull nor a read has used them for the configured time.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};

use crate::lock::lock;

/// The file's format version.
const VERSION: u32 = 1;
/// A use refreshes an entry's expiry in memory; the file is rewritten for it at most this
/// often (a restart then counts from the last write).
const PERSIST_EVERY: Duration = Duration::from_secs(3600);

/// A captured credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Secret {
    /// User name and password (or the decoded `auth` field).
    Basic {
        /// The user.
        username: String,
        /// The password.
        password: String,
    },
    /// A registry token (`registry_token`), sent as a bearer token.
    Bearer {
        /// The token.
        token: String,
    },
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // secrets are never printed
        match self {
            Secret::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Secret::Bearer { .. } => write!(f, "Bearer(<redacted>)"),
        }
    }
}

impl Secret {
    fn auth(&self) -> RegistryAuth {
        match self {
            Secret::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
            Secret::Bearer { token } => RegistryAuth::Bearer(token.clone()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    host: String,
    repository: String,
    secret: Secret,
    /// Seconds since the epoch after which the entry is dropped.
    expires: u64,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    entries: Vec<Entry>,
}

type Key = (String, String);

/// The captured credentials of one daemon (`<state_dir>/cri-auths.json`, mode 0600).
#[derive(Debug)]
pub struct Captured {
    path: PathBuf,
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    entries: BTreeMap<Key, Entry>,
    written: SystemTime,
}

/// A state file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CapturedError {
    /// Reading or writing the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Captured {
    /// Open the store at `path`, keeping entries for `ttl` after their last use. A file that
    /// cannot be parsed is moved aside (`.bad`) with a warning, never silently dropped.
    pub fn open(path: &Path, ttl: Duration) -> Result<Captured, CapturedError> {
        let io_err = |source| CapturedError::Io {
            path: path.to_path_buf(),
            source,
        };
        let entries = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(f) if f.version == VERSION => f.entries,
                Ok(f) => {
                    set_aside(path, &format!("unknown version {}", f.version)).map_err(io_err)?;
                    Vec::new()
                }
                Err(e) => {
                    set_aside(path, &e.to_string()).map_err(io_err)?;
                    Vec::new()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(e)),
        };
        let t = now();
        let entries = entries
            .into_iter()
            .filter(|e| e.expires > t)
            .map(|e| ((e.host.clone(), e.repository.clone()), e))
            .collect();
        Ok(Captured {
            path: path.to_path_buf(),
            ttl,
            state: Mutex::new(State {
                entries,
                written: SystemTime::now(),
            }),
        })
    }

    /// Keep `secret` for `repository` on `host` (replacing what was kept), and persist.
    pub fn capture(&self, host: &str, repository: &str, secret: Secret) -> Result<(), CapturedError> {
        let mut state = lock(&self.state);
        let entry = Entry {
            host: host.to_string(),
            repository: repository.to_string(),
            secret,
            expires: now().saturating_add(self.ttl.as_secs()),
        };
        state.entries.insert((host.to_string(), repository.to_string()), entry);
        self.persist(&mut state)
    }

    /// The credential captured for `repository` on `host`, if one is kept and not expired; a
    /// use extends its life.
    pub fn lookup(&self, host: &str, repository: &str) -> Option<RegistryAuth> {
        let mut state = lock(&self.state);
        let key = (host.to_string(), repository.to_string());
        let t = now();
        let entry = state.entries.get_mut(&key)?;
        if entry.expires <= t {
            state.entries.remove(&key);
            tracing::info!(host, repository, "captured pull credential expired");
            let _ = self.persist(&mut state);
            return None;
        }
        entry.expires = t.saturating_add(self.ttl.as_secs());
        let auth = entry.secret.auth();
        let stale = state.written.elapsed().map_or(true, |e| e >= PERSIST_EVERY);
        if stale {
            if let Err(e) = self.persist(&mut state) {
                tracing::warn!(error = %e, "could not persist the captured pull credentials");
            }
        }
        Some(auth)
    }

    /// How many credentials are kept.
    pub fn len(&self) -> usize {
        lock(&self.state).entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn persist(&self, state: &mut State) -> Result<(), CapturedError> {
        let file = File {
            version: VERSION,
            entries: state.entries.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| CapturedError::Io {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        crate::private_fs::write_atomic(&self.path, &bytes).map_err(|source| CapturedError::Io {
            path: self.path.clone(),
            source,
        })?;
        state.written = SystemTime::now();
        Ok(())
    }
}

/// Move an unreadable state file aside so that nothing is lost and the daemon still starts.
fn set_aside(path: &Path, why: &str) -> io::Result<()> {
    let mut bad = path.as_os_str().to_os_string();
    bad.push(".bad");
    tracing::warn!(file = %path.display(), error = why, "unreadable captured credentials: moved aside, pulls will capture them again");
    std::fs::rename(path, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str) -> Secret {
        Secret::Basic {
            username: u.into(),
            password: "pw".into(),
        }
    }

    #[test]
    fn kept_per_repository_persisted_root_only_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cri-auths.json");
        let c = Captured::open(&path, Duration::from_secs(3600)).unwrap();
        c.capture("reg.example", "team/app", basic("alice")).unwrap();
        assert!(matches!(c.lookup("reg.example", "team/app"), Some(RegistryAuth::Basic(u, _)) if u == "alice"));
        assert!(c.lookup("reg.example", "team/other").is_none());
        assert!(c.lookup("other.example", "team/app").is_none());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = Captured::open(&path, Duration::from_secs(3600)).unwrap();
        assert!(again.lookup("reg.example", "team/app").is_some());
        assert!(!format!("{:?}", basic("bob")).contains("pw"));
    }

    #[test]
    fn expired_entries_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cri-auths.json");
        let c = Captured::open(&path, Duration::ZERO).unwrap();
        c.capture("reg.example", "app", basic("alice")).unwrap();
        assert!(c.lookup("reg.example", "app").is_none());
        assert!(c.is_empty());
        assert!(Captured::open(&path, Duration::from_secs(60)).unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cri-auths.json");
        std::fs::write(&path, b"{not json").unwrap();
        let c = Captured::open(&path, Duration::from_secs(60)).unwrap();
        assert!(c.is_empty());
        assert_eq!(
            std::fs::read(dir.path().join("cri-auths.json.bad")).unwrap(),
            b"{not json"
        );
    }
}
