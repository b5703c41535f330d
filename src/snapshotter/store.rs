//! The snapshots containerd asked for: key or name, kind, parent, labels, times, and the id
//! that names each one's directories (`<root>/snapshots/<id>/{fs,work}`). The table lives
//! in memory and in `<root>/metadata.json`, written atomically after every change, so a
//! restart gives the same answers. Rules follow containerd's snapshotter contract: a parent
//! must be committed, keys are unique across kinds, a snapshot with children cannot go.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::lock::lock;
use crate::private_fs;

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a parent.
    View,
    /// Writable, not yet committed.
    Active,
    /// Read-only, may be a parent.
    Committed,
}

/// Where a committed snapshot's tree comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Its own directory (unpacked by containerd, or a committed container).
    #[default]
    Local,
    /// A layer of a lazyblob image (pinned `repo@digest`), committed without unpacking: the
    /// image's lazy EROFS mount holds it and every layer below it.
    Remote {
        /// The lazyblob image (`repo@digest`) it reads through.
        image: String,
    },
}

/// One snapshot's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its number (names its directory).
    pub id: u64,
    /// Active, view or committed.
    pub kind: Kind,
    #[serde(default)]
    /// Local directories or a remote image.
    pub source: Source,
    /// The parent snapshot's name.
    pub parent: Option<String>,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// When it was created.
    pub created: SystemTime,
    /// When it was last changed.
    pub updated: SystemTime,
}

/// Why a request cannot be done; each maps to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No snapshot of that name.
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    /// A snapshot of that name exists.
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The operation does not apply to the snapshot's state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bad name or argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// A file operation failed.
    #[error("snapshot storage: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Table {
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
}

/// The snapshot table and its directories.
pub struct Store {
    root: PathBuf,
    table: Mutex<Table>,
}

impl Store {
    /// Open (or create) the store under `root`. A metadata file that does not parse is set
    /// aside (see `catalog::state`) and the store starts empty.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        private_fs::private_dir(&root.join("snapshots"))?;
        let path = root.join("metadata.json");
        let table = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                let aside = path.with_extension("json.corrupt");
                tracing::error!(error = %e, path = %path.display(), aside = %aside.display(), "snapshot metadata unreadable: set aside, starting empty");
                let _ = std::fs::rename(&path, &aside);
                Table::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(Store {
            root: root.to_path_buf(),
            table: Mutex::new(table),
        })
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The writable (or committed) tree of snapshot `id`.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// The overlay work directory of snapshot `id`.
    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    fn persist(&self, t: &Table) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(t).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        private_fs::write_atomic(&self.root.join("metadata.json"), &body)?;
        Ok(())
    }

    /// A new active snapshot or view `key` on `parent` (which must be committed).
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot, StoreError> {
        if key.is_empty() {
            return Err(StoreError::InvalidArgument("empty snapshot key".into()));
        }
        let mut t = lock(&self.table);
        if t.snapshots.contains_key(key) {
            return Err(StoreError::AlreadyExists(key.to_string()));
        }
        if let Some(p) = parent {
            match t.snapshots.get(p) {
                None => return Err(StoreError::NotFound(p.to_string())),
                Some(s) if s.kind != Kind::Committed => {
                    return Err(StoreError::FailedPrecondition(format!("parent {p:?} is not committed")))
                }
                Some(_) => {}
            }
        }
        t.next_id += 1;
        let id = t.next_id;
        std::fs::create_dir_all(self.fs_dir(id))?;
        if kind == Kind::Active {
            std::fs::create_dir_all(self.work_dir(id))?;
        }
        // the tree a container sees starts world-readable, like overlayfs' own snapshotter
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir(id), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(self.fs_dir(id), std::fs::Permissions::from_mode(0o755))?;
        let now = SystemTime::now();
        let s = Snapshot {
            id,
            kind,
            source: Source::Local,
            parent: parent.map(str::to_string),
            labels,
            created: now,
            updated: now,
        };
        t.snapshots.insert(key.to_string(), s.clone());
        if let Err(e) = self.persist(&t) {
            t.snapshots.remove(key);
            let _ = std::fs::remove_dir_all(self.dir(id));
            return Err(e);
        }
        Ok(s)
    }

    /// Commit active snapshot `key` as `name`, with `labels` added.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<Snapshot, StoreError> {
        self.commit_as(name, key, labels, Source::Local)
    }

    /// Commit active snapshot `key` as `name` with its tree from `source`.
    pub fn commit_as(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        source: Source,
    ) -> Result<Snapshot, StoreError> {
        let mut t = lock(&self.table);
        if t.snapshots.contains_key(name) {
            return Err(StoreError::AlreadyExists(name.to_string()));
        }
        let mut s = t
            .snapshots
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        if s.kind != Kind::Active {
            return Err(StoreError::FailedPrecondition(format!(
                "{key:?} is not an active snapshot"
            )));
        }
        s.kind = Kind::Committed;
        s.source = source;
        s.labels.extend(labels);
        s.updated = SystemTime::now();
        t.snapshots.remove(key);
        t.snapshots.insert(name.to_string(), s.clone());
        self.persist(&t)?;
        // the work directory of a committed snapshot is never used again
        let _ = std::fs::remove_dir_all(self.work_dir(s.id));
        Ok(s)
    }

    /// Remove `key` and its directories; refused while another snapshot has it as parent.
    pub fn remove(&self, key: &str) -> Result<Snapshot, StoreError> {
        let mut t = lock(&self.table);
        if t.snapshots.values().any(|s| s.parent.as_deref() == Some(key)) {
            return Err(StoreError::FailedPrecondition(format!("{key:?} has children")));
        }
        let s = t
            .snapshots
            .remove(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        if let Err(e) = self.persist(&t) {
            t.snapshots.insert(key.to_string(), s);
            return Err(e);
        }
        drop(t);
        std::fs::remove_dir_all(self.dir(s.id))?;
        Ok(s)
    }

    /// The record of `key`.
    pub fn get(&self, key: &str) -> Result<Snapshot, StoreError> {
        lock(&self.table)
            .snapshots
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.to_string()))
    }

    /// Replace the labels of `key` (`only`: just these label keys; all when empty).
    pub fn set_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        only: &[String],
    ) -> Result<Snapshot, StoreError> {
        let mut t = lock(&self.table);
        let s = t
            .snapshots
            .get_mut(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        if only.is_empty() {
            s.labels = labels;
        } else {
            for k in only {
                match labels.get(k) {
                    Some(v) => s.labels.insert(k.clone(), v.clone()),
                    None => s.labels.remove(k),
                };
            }
        }
        s.updated = SystemTime::now();
        let s = s.clone();
        self.persist(&t)?;
        Ok(s)
    }

    /// Every snapshot, by key.
    pub fn all(&self) -> Vec<(String, Snapshot)> {
        lock(&self.table)
            .snapshots
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// `key`'s ancestors (id and source), nearest first.
    pub fn ancestors(&self, key: &str) -> Result<Vec<(u64, Source)>, StoreError> {
        let t = lock(&self.table);
        let mut out = Vec::new();
        let mut cur = t
            .snapshots
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?
            .parent
            .clone();
        while let Some(p) = cur {
            let s = t
                .snapshots
                .get(&p)
                .ok_or_else(|| StoreError::FailedPrecondition(format!("parent {p:?} of {key:?} is gone")))?;
            out.push((s.id, s.source.clone()));
            if out.len() > t.snapshots.len() {
                return Err(StoreError::FailedPrecondition(format!("{key:?} has a parent cycle")));
            }
            cur = s.parent.clone();
        }
        Ok(out)
    }

    /// Remove directories under `snapshots/` that no record names (left by a crash between a
    /// directory and its record); returns how many.
    pub fn cleanup(&self) -> Result<usize, StoreError> {
        let known: std::collections::HashSet<String> =
            lock(&self.table).snapshots.values().map(|s| s.id.to_string()).collect();
        let mut n = 0;
        for e in std::fs::read_dir(self.root.join("snapshots"))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) && e.path().is_dir() {
                std::fs::remove_dir_all(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_snapshot_contract() {
        let root = tempfile::tempdir().unwrap();
        let st = Store::open(root.path()).unwrap();
        let a = st.create(Kind::Active, "a", None, labels(&[("x", "1")])).unwrap();
        assert!(matches!(
            st.create(Kind::Active, "a", None, BTreeMap::new()),
            Err(StoreError::AlreadyExists(_))
        ));
        // an active snapshot cannot be a parent
        assert!(matches!(
            st.create(Kind::Active, "b", Some("a"), BTreeMap::new()),
            Err(StoreError::FailedPrecondition(_))
        ));
        st.commit("A", "a", labels(&[("y", "2")])).unwrap();
        assert!(matches!(st.get("a"), Err(StoreError::NotFound(_))));
        let c = st.get("A").unwrap();
        assert_eq!((c.id, c.kind, c.labels.len()), (a.id, Kind::Committed, 2));
        let b = st.create(Kind::Active, "b", Some("A"), BTreeMap::new()).unwrap();
        assert_eq!(st.ancestors("b").unwrap(), vec![(a.id, Source::Local)]);
        assert!(matches!(st.remove("A"), Err(StoreError::FailedPrecondition(_))));
        // a restart gives the same table
        drop(st);
        let st = Store::open(root.path()).unwrap();
        assert_eq!(st.get("b").unwrap().id, b.id);
        st.remove("b").unwrap();
        assert!(!st.dir(b.id).exists());
        st.remove("A").unwrap();
        std::fs::create_dir_all(st.fs_dir(99)).unwrap();
        assert_eq!(st.cleanup().unwrap(), 1);
        assert!(st.all().is_empty());
        std::fs::write(root.path().join("metadata.json"), "{").unwrap();
        assert!(Store::open(root.path()).unwrap().all().is_empty());
    }
}
