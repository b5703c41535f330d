//! How an image's chunks are hashed when it is built: the table's algorithm, and with BLAKE3
//! the leaves (`leaves`) each chunk's digest is merged from. Each byte is hashed once: with
//! leaves, the chunk digest is the root of the leaves' tree.

use super::format::{ChunkDigest, ChunkHasher};
use super::leaves::{self, LeafHasher, LeafLayout};

/// The hashing of an image's chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashing {
    /// The chunk digest algorithm.
    pub algorithm: ChunkDigest,
    /// Leaf size of the leaves layer (BLAKE3 only); `None`: chunks are verified whole.
    pub leaf_size: Option<u64>,
}

impl From<ChunkDigest> for Hashing {
    /// Whole chunks, no leaves.
    fn from(algorithm: ChunkDigest) -> Hashing {
        Hashing {
            algorithm,
            leaf_size: None,
        }
    }
}

impl Hashing {
    /// `algorithm`, with leaves of the default size where it allows them (BLAKE3, chunks of
    /// at least two leaves).
    pub fn with_default_leaves(algorithm: ChunkDigest, chunk_size: u64) -> Hashing {
        let leaf = leaves::DEFAULT_LEAF_SIZE;
        Hashing {
            algorithm,
            leaf_size: (algorithm == ChunkDigest::Blake3 && leaves::is_valid_leaf_size(leaf, chunk_size))
                .then_some(leaf),
        }
    }

    /// Where leaves go for chunks of `chunk_size` bytes, if there are leaves.
    pub fn layout(&self, chunk_size: u64) -> Option<LeafLayout> {
        self.leaf_size.map(|leaf_size| LeafLayout { leaf_size, chunk_size })
    }

    /// A hasher for one chunk.
    pub fn chunk(&self) -> ChunkState {
        match self.leaf_size {
            Some(leaf) if self.algorithm == ChunkDigest::Blake3 => ChunkState::Leaves(Box::new(LeafHasher::new(leaf))),
            _ => ChunkState::Whole(self.algorithm.hasher()),
        }
    }
}

/// One chunk being hashed.
pub enum ChunkState {
    /// Its digest only.
    Whole(ChunkHasher),
    /// Its leaves, and the digest merged from them.
    Leaves(Box<LeafHasher>),
}

impl ChunkState {
    /// Hash `data` too.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            ChunkState::Whole(h) => h.update(data),
            ChunkState::Leaves(h) => h.update(data),
        }
    }

    /// The chunk's digest; with leaves, its slot of the leaves layer is appended to `slots`.
    pub fn finish(self, layout: Option<LeafLayout>, slots: &mut Vec<u8>) -> [u8; 32] {
        match (self, layout) {
            (ChunkState::Leaves(h), Some(l)) => {
                let (root, cvs) = h.finish();
                let start = slots.len();
                slots.extend(cvs.iter().flatten());
                slots.resize(start + l.slot_len() as usize, 0);
                root
            }
            (ChunkState::Leaves(h), None) => h.finish().0,
            (ChunkState::Whole(h), _) => h.finalize(),
        }
    }
}
