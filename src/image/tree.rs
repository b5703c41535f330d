//! The in-memory filesystem tree an EROFS metadata image is written from: an arena of nodes,
//! directories mapping names to node indices (several names may share a node: hard links).

use std::collections::BTreeMap;

/// Ownership, permissions, times and extended attributes of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds).
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes by full name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// Stored in the metadata blob (small files).
    Inline(Vec<u8>),
    /// `size` bytes at `offset` (4 KiB aligned) of data blob `device` (1-based device id).
    Blob {
        /// The data blob (device 1 is the first).
        device: u16,
        /// Offset in that blob (block aligned).
        offset: u64,
        /// File size.
        size: u64,
    },
}

impl FileData {
    /// File size.
    pub fn size(&self) -> u64 {
        match self {
            FileData::Inline(d) => d.len() as u64,
            FileData::Blob { size, .. } => *size,
        }
    }
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory: its entries by name.
    Dir(BTreeMap<Vec<u8>, usize>),
    /// A regular file.
    File(FileData),
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A character device (`rdev`).
    CharDev(u32),
    /// A block device (`rdev`).
    BlockDev(u32),
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

/// One inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Owner, mode, times, xattrs.
    pub meta: Meta,
    /// What it is.
    pub kind: Kind,
}

/// A filesystem tree; node 0 is the root directory.
#[derive(Debug, Clone)]
pub struct Tree {
    /// Every node; the root is [`Tree::ROOT`].
    pub nodes: Vec<Node>,
}

/// Errors building a tree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    /// A name that is empty, `.`, `..` or holds `/` or NUL.
    #[error("invalid file name {0:?}")]
    BadName(String),
    /// A path component that is not a directory.
    #[error("{0:?} is not a directory")]
    NotDir(String),
}

/// `makedev`-style encoding of a device number as EROFS stores it (`new_encode_dev`).
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

impl Tree {
    /// A tree with an empty root directory.
    pub fn new(root: Meta) -> Tree {
        Tree {
            nodes: vec![Node {
                meta: root,
                kind: Kind::Dir(BTreeMap::new()),
            }],
        }
    }

    /// The root directory's index.
    pub const ROOT: usize = 0;

    fn check_name(name: &[u8]) -> Result<(), TreeError> {
        if name.is_empty()
            || name.len() > 255
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(TreeError::BadName(String::from_utf8_lossy(name).into_owned()));
        }
        Ok(())
    }

    fn children_mut(&mut self, dir: usize) -> Result<&mut BTreeMap<Vec<u8>, usize>, TreeError> {
        match self.nodes.get_mut(dir).map(|n| &mut n.kind) {
            Some(Kind::Dir(c)) => Ok(c),
            _ => Err(TreeError::NotDir(format!("node {dir}"))),
        }
    }

    /// Children of a directory node.
    pub fn children(&self, dir: usize) -> Option<&BTreeMap<Vec<u8>, usize>> {
        match &self.nodes.get(dir)?.kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    /// Add (or replace) `name` in directory `parent`; returns the new node's index.
    pub fn insert(&mut self, parent: usize, name: &[u8], node: Node) -> Result<usize, TreeError> {
        Self::check_name(name)?;
        let idx = self.nodes.len();
        self.children_mut(parent)?.insert(name.to_vec(), idx);
        self.nodes.push(node);
        Ok(idx)
    }

    /// Add `name` in `parent` as another name of node `target` (a hard link).
    pub fn link(&mut self, parent: usize, name: &[u8], target: usize) -> Result<(), TreeError> {
        Self::check_name(name)?;
        self.children_mut(parent)?.insert(name.to_vec(), target);
        Ok(())
    }

    /// Remove `name` from `parent` (whiteouts); the node stays in the arena, unreachable.
    pub fn remove(&mut self, parent: usize, name: &[u8]) -> Result<Option<usize>, TreeError> {
        Ok(self.children_mut(parent)?.remove(name))
    }
}
