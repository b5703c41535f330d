//! Prefetch lists kept on this node: `<state_dir>/prefetch/<manifest hex>.json`, root only,
//! written atomically, read with the list's size bound. The name comes from a validated
//! digest only.

#![forbid(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};

use super::list::{ListError, PrefetchList, MAX_LIST_BYTES};
use crate::image::digest::Digest;

/// Why a kept list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The list's file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not a usable list.
    #[error("{path}: {source}")]
    List {
        /// The list's file.
        path: PathBuf,
        /// Why.
        source: ListError,
    },
}

/// Where the list of `image` is kept.
pub fn path(state_dir: &Path, image: &Digest) -> PathBuf {
    state_dir.join("prefetch").join(format!("{}.json", image.hex()))
}

/// The kept list of `image`, if there is one.
pub fn load(state_dir: &Path, image: &Digest) -> Result<Option<PrefetchList>, StoreError> {
    match read(&path(state_dir, image)) {
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        read => read.map(Some),
    }
}

/// The list in the file at `path` (its size bounded before it is read).
pub fn read(path: &Path) -> Result<PrefetchList, StoreError> {
    let io_err = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io_err)?.len();
    let list_err = |source| StoreError::List {
        path: path.to_path_buf(),
        source,
    };
    if len > MAX_LIST_BYTES {
        return Err(list_err(ListError::TooLarge(len)));
    }
    let body = std::fs::read(path).map_err(io_err)?;
    PrefetchList::from_slice(&body).map_err(list_err)
}

/// Keep `list` (replacing the one kept for its image).
pub fn save(state_dir: &Path, list: &PrefetchList) -> io::Result<PathBuf> {
    let dir = state_dir.join("prefetch");
    crate::private_fs::private_dir(&dir)?;
    let path = path(state_dir, &list.image);
    crate::private_fs::write_atomic(&path, &list.to_vec())?;
    Ok(path)
}
