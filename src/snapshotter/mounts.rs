//! The mounts containerd performs for a snapshot, as its overlayfs snapshotter gives them:
//! a bind mount when there is one tree (read-write for an active snapshot without parent,
//! read-only for a view of one layer), else an `overlay` whose lower directories are the
//! committed ancestors, nearest first, with an upper and work directory for active ones.
//! The first remote (lazyblob) ancestor stands for itself and everything below it: its
//! image's lazy EROFS mount is the last lower directory.

use std::path::Path;

use super::api::Mount;
use super::store::{Kind, Snapshot, Source, Store};

/// The lazyblob image a snapshot reads through, if any: its own, or that of its first
/// remote ancestor (`ancestors` as [`Store::ancestors`] gives them, nearest first).
pub fn remote_image<'a>(s: &'a Snapshot, ancestors: &'a [(u64, Source)]) -> Option<&'a str> {
    std::iter::once(&s.source)
        .chain(ancestors.iter().map(|(_, src)| src))
        .find_map(|src| match src {
            Source::Remote { image } => Some(image.as_str()),
            Source::Local => None,
        })
}

/// The directories of a snapshot's lower layers, nearest first: local ancestors' trees up to
/// the first remote one, whose image mount (`image_mount`) ends the list.
pub fn lower_dirs(
    store: &Store,
    ancestors: &[(u64, Source)],
    image_mount: &dyn Fn(&str) -> std::path::PathBuf,
) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for (id, source) in ancestors {
        match source {
            Source::Local => out.push(store.fs_dir(*id)),
            Source::Remote { image } => {
                out.push(image_mount(image));
                break;
            }
        }
    }
    out
}

/// The mounts of snapshot `s`, whose ancestors are `ancestors`.
pub fn for_snapshot(
    store: &Store,
    ancestors: &[(u64, Source)],
    s: &Snapshot,
    image_mount: &dyn Fn(&str) -> std::path::PathBuf,
) -> Vec<Mount> {
    let parents = lower_dirs(store, ancestors, image_mount);
    let lower = |dirs: &[std::path::PathBuf]| {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    vec![match (s.kind, &s.source, parents.as_slice()) {
        (Kind::Committed, Source::Remote { image }, _) => bind(&image_mount(image), "ro"),
        (Kind::Active, _, []) => bind(&store.fs_dir(s.id), "rw"),
        (Kind::View, _, []) => bind(&store.fs_dir(s.id), "ro"),
        (Kind::View, _, [only]) => bind(only, "ro"),
        (Kind::View, _, dirs) => overlay(vec![format!("lowerdir={}", lower(dirs))]),
        (Kind::Active, _, dirs) => overlay(vec![
            format!("workdir={}", store.work_dir(s.id).display()),
            format!("upperdir={}", store.fs_dir(s.id).display()),
            format!("lowerdir={}", lower(dirs)),
        ]),
        // a committed snapshot reads as a view of itself over its ancestors
        (Kind::Committed, Source::Local, []) => bind(&store.fs_dir(s.id), "ro"),
        (Kind::Committed, Source::Local, dirs) => {
            let all: Vec<std::path::PathBuf> = std::iter::once(store.fs_dir(s.id))
                .chain(dirs.iter().cloned())
                .collect();
            overlay(vec![format!("lowerdir={}", lower(&all))])
        }
    }]
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

    fn none_mount(_: &str) -> std::path::PathBuf {
        unreachable!("no remote layers here")
    }

    #[test]
    fn overlay_layout_like_containerd() {
        let root = tempfile::tempdir().unwrap();
        let st = Store::open(root.path()).unwrap();
        let none = BTreeMap::new;
        let a = st.create(Kind::Active, "a", None, none()).unwrap();
        let m = for_snapshot(&st, &st.ancestors("a").unwrap(), &a, &none_mount);
        assert_eq!(
            (m[0].r#type.as_str(), m[0].options.clone()),
            ("bind", vec!["rw".into(), "rbind".into()])
        );
        st.commit("A", "a", none()).unwrap();
        let v = st.create(Kind::View, "v", Some("A"), none()).unwrap();
        let m = for_snapshot(&st, &st.ancestors("v").unwrap(), &v, &none_mount);
        assert_eq!(m[0].source, st.fs_dir(a.id).display().to_string());
        let b = st.create(Kind::Active, "b", Some("A"), none()).unwrap();
        st.commit("B", "b", none()).unwrap();
        let c = st.create(Kind::Active, "c", Some("B"), none()).unwrap();
        let m = for_snapshot(&st, &st.ancestors("c").unwrap(), &c, &none_mount);
        assert_eq!(m[0].r#type, "overlay");
        let lower = format!("lowerdir={}:{}", st.fs_dir(b.id).display(), st.fs_dir(a.id).display());
        assert_eq!(m[0].options.last(), Some(&lower));
        assert!(m[0]
            .options
            .contains(&format!("upperdir={}", st.fs_dir(c.id).display())));
    }
}
