//! The mounts containerd performs for a snapshot, as its overlayfs snapshotter gives them:
//! a bind mount when there is one tree (read-write for an active snapshot without parent,
//! read-only for a view of one layer), else an `overlay` whose lower directories are the
//! committed ancestors, nearest first, with an upper and work directory for active ones.

use std::path::Path;

use super::api::Mount;
use super::store::{Kind, Snapshot, Store, StoreError};

/// The mounts of snapshot `s` (key `key`).
pub fn for_snapshot(store: &Store, key: &str, s: &Snapshot) -> Result<Vec<Mount>, StoreError> {
    let parents = store.ancestors(key)?;
    let lower = |ids: &[u64]| {
        ids.iter()
            .map(|&id| store.fs_dir(id).display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    Ok(vec![match (s.kind, parents.as_slice()) {
        (Kind::Active, []) => bind(&store.fs_dir(s.id), "rw"),
        (Kind::View, []) => bind(&store.fs_dir(s.id), "ro"),
        (Kind::View, [only]) => bind(&store.fs_dir(*only), "ro"),
        (Kind::View, ids) => overlay(vec![format!("lowerdir={}", lower(ids))]),
        (Kind::Active, ids) => overlay(vec![
            format!("workdir={}", store.work_dir(s.id).display()),
            format!("upperdir={}", store.fs_dir(s.id).display()),
            format!("lowerdir={}", lower(ids)),
        ]),
        // a committed snapshot reads as a view of itself over its ancestors
        (Kind::Committed, []) => bind(&store.fs_dir(s.id), "ro"),
        (Kind::Committed, ids) => {
            let all: Vec<u64> = std::iter::once(s.id).chain(ids.iter().copied()).collect();
            overlay(vec![format!("lowerdir={}", lower(&all))])
        }
    }])
}

fn bind(dir: &Path, mode: &str) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: dir.display().to_string(),
        target: String::new(),
        options: vec![mode.into(), "rbind".into()],
    }
}

fn overlay(mut options: Vec<String>) -> Mount {
    // containerd's overlayfs snapshotter turns the index off: lower layers are shared
    options.insert(0, "index=off".into());
    Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn overlay_layout_like_containerd() {
        let root = tempfile::tempdir().unwrap();
        let st = Store::open(root.path()).unwrap();
        let none = BTreeMap::new;
        let a = st.create(Kind::Active, "a", None, none()).unwrap();
        let m = for_snapshot(&st, "a", &a).unwrap();
        assert_eq!(
            (m[0].r#type.as_str(), m[0].options.clone()),
            ("bind", vec!["rw".into(), "rbind".into()])
        );
        st.commit("A", "a", none()).unwrap();
        let v = st.create(Kind::View, "v", Some("A"), none()).unwrap();
        let m = for_snapshot(&st, "v", &v).unwrap();
        assert_eq!(m[0].source, st.fs_dir(a.id).display().to_string());
        let b = st.create(Kind::Active, "b", Some("A"), none()).unwrap();
        st.commit("B", "b", none()).unwrap();
        let c = st.create(Kind::Active, "c", Some("B"), none()).unwrap();
        let m = for_snapshot(&st, "c", &c).unwrap();
        assert_eq!(m[0].r#type, "overlay");
        let lower = format!("lowerdir={}:{}", st.fs_dir(b.id).display(), st.fs_dir(a.id).display());
        assert_eq!(m[0].options.last(), Some(&lower));
        assert!(m[0]
            .options
            .contains(&format!("upperdir={}", st.fs_dir(c.id).display())));
    }
}
