//! Paths from tar entries, contained inside the image root: `..` never climbs above the root,
//! absolute paths are rooted at the image root, and symlinks met on the way are followed
//! inside the image (like a container runtime's secure join), never on the host.

use crate::image::tree::{Kind, Meta, Node, Tree};

/// Components of a path after lexical normalisation (`.`, empty and leading `/` dropped, `..`
/// popping but never above the root).
pub fn normalize(path: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c.to_vec()),
        }
    }
    out
}

/// How deep symlink resolution may go before it is called a loop.
const MAX_LINKS: usize = 40;

/// Why a path could not be resolved inside the tree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// A path that leads to itself.
    #[error("too many levels of symbolic links")]
    Loop,
    /// A path component that is not a directory.
    #[error("a parent of the path is not a directory")]
    NotDir,
}

/// Resolve the directory `components` names, following symlinks inside the tree and creating
/// missing directories with `default` metadata when `create` is set. Returns the node index,
/// or `None` when it does not exist and `create` is off.
pub fn resolve_dir(
    tree: &mut Tree,
    components: &[Vec<u8>],
    create: bool,
    default: &Meta,
) -> Result<Option<usize>, PathError> {
    let mut budget = MAX_LINKS;
    resolve_from(tree, Tree::ROOT, components, create, default, &mut budget)
}

fn resolve_from(
    tree: &mut Tree,
    start: usize,
    components: &[Vec<u8>],
    create: bool,
    default: &Meta,
    budget: &mut usize,
) -> Result<Option<usize>, PathError> {
    // `stack` holds the directories walked, so `..` inside a symlink target can go back.
    let mut stack = vec![start];
    for c in components {
        let cur = *stack.last().unwrap_or(&Tree::ROOT);
        let child = tree.children(cur).and_then(|ch| ch.get(c).copied());
        match child {
            Some(idx) => match &tree.nodes[idx].kind {
                Kind::Dir(_) => stack.push(idx),
                Kind::Symlink(target) => {
                    if *budget == 0 {
                        return Err(PathError::Loop);
                    }
                    *budget -= 1;
                    let target = target.clone();
                    let (base, rest): (usize, Vec<Vec<u8>>) = if target.starts_with(b"/") {
                        (Tree::ROOT, normalize(&target))
                    } else {
                        // relative to the symlink's directory; `..` handled against the stack
                        let mut base_stack = stack.clone();
                        let mut rest = Vec::new();
                        for t in target.split(|&b| b == b'/') {
                            match t {
                                b"" | b"." => {}
                                b".." if rest.is_empty() => {
                                    if base_stack.len() > 1 {
                                        base_stack.pop();
                                    }
                                }
                                b".." => {
                                    rest.pop();
                                }
                                t => rest.push(t.to_vec()),
                            }
                        }
                        (*base_stack.last().unwrap_or(&Tree::ROOT), rest)
                    };
                    match resolve_from(tree, base, &rest, create, default, budget)? {
                        Some(d) => stack.push(d),
                        None => return Ok(None),
                    }
                }
                _ => return Err(PathError::NotDir),
            },
            None if create => {
                let idx = tree
                    .insert(
                        cur,
                        c,
                        Node {
                            meta: default.clone(),
                            kind: Kind::Dir(Default::default()),
                        },
                    )
                    .map_err(|_| PathError::NotDir)?;
                stack.push(idx);
            }
            None => return Ok(None),
        }
    }
    Ok(stack.last().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(p: &str) -> Vec<Vec<u8>> {
        normalize(p.as_bytes())
    }

    #[test]
    fn lexical_normalisation_stays_inside() {
        assert_eq!(v("/etc/passwd"), v("etc/passwd"));
        assert_eq!(v("../../etc/passwd"), v("etc/passwd"));
        assert_eq!(v("a/./b/../../../c"), v("c"));
        assert!(v("..").is_empty());
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let m = Meta::default();
        let mut t = Tree::new(m.clone());
        let etc = resolve_dir(&mut t, &v("real/etc"), true, &m).unwrap().unwrap();
        t.insert(
            Tree::ROOT,
            b"abs",
            Node {
                meta: m.clone(),
                kind: Kind::Symlink(b"/real".to_vec()),
            },
        )
        .unwrap();
        t.insert(
            Tree::ROOT,
            b"up",
            Node {
                meta: m.clone(),
                kind: Kind::Symlink(b"../../../real".to_vec()),
            },
        )
        .unwrap();
        t.insert(
            Tree::ROOT,
            b"loop",
            Node {
                meta: m.clone(),
                kind: Kind::Symlink(b"loop".to_vec()),
            },
        )
        .unwrap();
        assert_eq!(resolve_dir(&mut t, &v("abs/etc"), false, &m).unwrap(), Some(etc));
        assert_eq!(
            resolve_dir(&mut t, &v("up/etc"), false, &m).unwrap(),
            Some(etc),
            ".. clamps at the root"
        );
        assert_eq!(resolve_dir(&mut t, &v("loop/x"), true, &m), Err(PathError::Loop));
        t.insert(
            etc,
            b"file",
            Node {
                meta: m.clone(),
                kind: Kind::Fifo,
            },
        )
        .unwrap();
        assert_eq!(
            resolve_dir(&mut t, &v("real/etc/file/x"), true, &m),
            Err(PathError::NotDir)
        );
    }
}
