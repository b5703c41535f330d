//! The persisted catalog (`state.json`), written atomically and durably. Reading it never
//! stops the daemon: a record that does not parse is skipped and logged, a file that is not
//! JSON at all is set aside as `state.json.corrupt` and the daemon starts empty.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What survives a restart.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The registered images.
    pub images: Vec<Entry>,
}

/// One registered image.
#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    /// As the user gave it.
    pub reference: String,
    /// `host/repo@sha256:...`: the manifest it resolved to.
    pub pinned: String,
}

/// Largest state file read (a record is about 200 bytes).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// The records of a state file, as far as they can be read: the file is a JSON list of
/// records, or an object holding that list under `field`. A missing file is an empty state;
/// a record that does not parse is skipped; a file of any other shape is moved aside to
/// `<name>.corrupt` (nothing is lost) and counts as empty. Every problem is logged.
pub fn load_records<T: serde::de::DeserializeOwned>(path: &Path, field: Option<&str>) -> Vec<T> {
    let read = std::fs::metadata(path).and_then(|m| {
        if m.len() > MAX_STATE_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} bytes", m.len())));
        }
        std::fs::read(path)
    });
    let body = match read {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            set_aside(path, &e.to_string());
            return Vec::new();
        }
    };
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            set_aside(path, &e.to_string());
            return Vec::new();
        }
    };
    let records = match (value, field) {
        (serde_json::Value::Array(a), None) => a,
        (serde_json::Value::Object(mut o), Some(field)) => match o.remove(field) {
            Some(serde_json::Value::Array(a)) => a,
            _ => {
                set_aside(path, &format!("no list {field:?}"));
                return Vec::new();
            }
        },
        _ => {
            set_aside(path, "unexpected shape");
            return Vec::new();
        }
    };
    records
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| match serde_json::from_value(r) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(path = %path.display(), record = i, error = %e, "skipping a bad record of a state file");
                None
            }
        })
        .collect()
}

fn set_aside(path: &Path, why: &str) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    let moved = std::fs::rename(path, &aside);
    tracing::error!(
        path = %path.display(),
        error = why,
        kept_as = %std::path::Path::new(&aside).display(),
        moved = moved.is_ok(),
        "state file unreadable: starting without it"
    );
}

/// Load the catalog state (see [`load_records`]).
pub fn load(path: &Path) -> State {
    State {
        images: load_records(path, Some("images")),
    }
}

/// Write the state atomically and durably, readable by root only.
pub fn save(path: &Path, state: &State) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    crate::private_fs::write_atomic(path, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s/state.json");
        assert!(load(&p).images.is_empty());
        save(
            &p,
            &State {
                images: vec![Entry {
                    reference: "r/a:1".into(),
                    pinned: "r/a@sha256:00".into(),
                }],
            },
        )
        .unwrap();
        assert_eq!(load(&p).images[0].pinned, "r/a@sha256:00");
        // one bad record is skipped, the others load
        std::fs::write(
            &p,
            r#"{"images":[{"reference":1},{"reference":"r/b:1","pinned":"r/b@sha256:11"}]}"#,
        )
        .unwrap();
        let s = load(&p);
        assert_eq!(s.images.len(), 1);
        assert_eq!(s.images[0].reference, "r/b:1");
        // a file that is not JSON is set aside, not lost, and counts as empty
        std::fs::write(&p, "{").unwrap();
        assert!(load(&p).images.is_empty());
        assert!(!p.exists());
        assert_eq!(std::fs::read(d.path().join("s/state.json.corrupt")).unwrap(), b"{");
    }
}
