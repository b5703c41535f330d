//! The persisted catalog (`state.json`), written atomically.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What survives a restart.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
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

/// Load the state; a missing file is an empty state, a corrupt one an error.
pub fn load(path: &Path) -> io::Result<State> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e),
    }
}

/// Write the state via a temporary file and rename, so a crash never leaves half a file.
pub fn save(path: &Path, state: &State) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s/state.json");
        assert!(load(&p).unwrap().images.is_empty());
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
        assert_eq!(load(&p).unwrap().images[0].pinned, "r/a@sha256:00");
        std::fs::write(&p, "{broken").unwrap();
        assert!(load(&p).is_err());
    }
}
