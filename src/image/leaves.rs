//! Leaves: chunks verifiable in small pieces. A BLAKE3 chunk digest is the root of a hash
//! tree over the chunk; its subtrees of `leaf_size` bytes (16 KiB by default) are the leaves.
//! The chaining value of every leaf of every chunk is kept in the image's leaves layer, one
//! fixed-size slot per chunk. A reader that needs a few leaves fetches them and its chunk's
//! slot: the slot is checked against the chunk digest of the table (merging the leaves'
//! values up the tree must give it), and each leaf against its value in the slot. Neither the
//! layer's digest nor the rest of the chunk is needed.
//!
//! The tree is BLAKE3's own (`blake3::hazmat`): a leaf starting at byte `o` of its chunk is
//! hashed as the subtree at input offset `o`, and subtrees merge at BLAKE3's split points,
//! which for power-of-two leaves always fall on leaf boundaries.

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

/// A leaf's chaining value.
pub type Cv = [u8; 32];

/// Bytes of one chaining value in the leaves layer.
pub const CV_LEN: u64 = 32;

/// Leaf size of new images.
pub const DEFAULT_LEAF_SIZE: u64 = 16 << 10;

/// The rule for leaf sizes: a power of two from 4 KiB up to half the chunk size (a chunk has
/// at least two leaves, and leaves are whole BLAKE3 subtrees).
pub fn is_valid_leaf_size(leaf_size: u64, chunk_size: u64) -> bool {
    leaf_size >= 4096 && leaf_size.is_power_of_two() && leaf_size.saturating_mul(2) <= chunk_size
}

/// Where the leaves of each chunk are in the leaves layer: one slot of `chunk_size /
/// leaf_size` values per chunk, the chunks of every data blob in table order; a short last
/// chunk's slot is zero past its leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafLayout {
    /// Bytes per leaf.
    pub leaf_size: u64,
    /// Bytes per chunk (the table's).
    pub chunk_size: u64,
}

impl LeafLayout {
    /// Leaves of a whole chunk.
    pub fn per_chunk(&self) -> u64 {
        self.chunk_size / self.leaf_size
    }

    /// Bytes of one chunk's slot.
    pub fn slot_len(&self) -> u64 {
        self.per_chunk() * CV_LEN
    }

    /// Leaves of a chunk of `len` bytes.
    pub fn leaves_of(&self, len: u64) -> u64 {
        len.div_ceil(self.leaf_size)
    }
}

/// The chaining values of the leaves of one chunk, and its digest (the tree's root). A chunk
/// of one leaf has no values: it is verified whole.
pub fn hash_chunk(chunk: &[u8], leaf_size: u64) -> (Cv, Vec<Cv>) {
    let mut h = LeafHasher::new(leaf_size);
    h.update(chunk);
    h.finish()
}

/// The value of a leaf starting `offset` bytes into its chunk (the chunk has more than one leaf).
pub fn leaf_cv(leaf: &[u8], offset: u64) -> Cv {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(leaf);
    h.finalize_non_root()
}

/// Whether `cvs` are the leaves of a chunk of `len` bytes whose digest is `root`.
pub fn check_slot(root: &Cv, cvs: &[Cv], len: u64, leaf_size: u64) -> bool {
    cvs.len() >= 2 && cvs.len() as u64 == len.div_ceil(leaf_size) && merge(cvs, len, leaf_size, true) == *root
}

/// Merge the values of the leaves of `len` bytes (more than one leaf) up BLAKE3's tree.
fn merge(cvs: &[Cv], len: u64, leaf_size: u64, root: bool) -> Cv {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let n = (left / leaf_size) as usize;
    let (l, r) = (
        merge(&cvs[..n], left, leaf_size, false),
        merge(&cvs[n..], len - left, leaf_size, false),
    );
    if root {
        *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
}

/// Hashes one chunk as it streams in: each leaf once, the digest merged from the leaves.
pub struct LeafHasher {
    leaf_size: u64,
    leaf: blake3::Hasher,
    in_leaf: u64,
    len: u64,
    cvs: Vec<Cv>,
}

impl LeafHasher {
    /// A chunk with leaves of `leaf_size` bytes.
    pub fn new(leaf_size: u64) -> LeafHasher {
        LeafHasher {
            leaf_size,
            leaf: blake3::Hasher::new(),
            in_leaf: 0,
            len: 0,
            cvs: Vec::new(),
        }
    }

    /// Hash `data` too.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.in_leaf == self.leaf_size {
                self.cvs.push(self.leaf.finalize_non_root());
                self.leaf = blake3::Hasher::new();
                self.leaf.set_input_offset(self.len);
                self.in_leaf = 0;
            }
            let take = ((self.leaf_size - self.in_leaf) as usize).min(data.len());
            self.leaf.update(&data[..take]);
            self.in_leaf += take as u64;
            self.len += take as u64;
            data = &data[take..];
        }
    }

    /// The chunk's digest and its leaves' values (none for a chunk of one leaf).
    pub fn finish(mut self) -> (Cv, Vec<Cv>) {
        if self.cvs.is_empty() {
            return (*self.leaf.finalize().as_bytes(), Vec::new());
        }
        self.cvs.push(self.leaf.finalize_non_root());
        let root = merge(&self.cvs, self.len, self.leaf_size, true);
        (root, self.cvs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn the_root_of_the_leaves_is_blake3_of_the_chunk() {
        for len in [1, 16 << 10, (16 << 10) + 1, 48 << 10, (1 << 20) - 5, 1 << 20, 700_001] {
            let d = data(len);
            let (root, cvs) = hash_chunk(&d, 16 << 10);
            assert_eq!(root, *blake3::hash(&d).as_bytes(), "{len} bytes");
            if len > 16 << 10 {
                assert!(check_slot(&root, &cvs, len as u64, 16 << 10), "{len} bytes");
                for (i, cv) in cvs.iter().enumerate() {
                    let s = i * (16 << 10);
                    let e = (s + (16 << 10)).min(len);
                    assert_eq!(leaf_cv(&d[s..e], s as u64), *cv, "leaf {i} of {len} bytes");
                }
            } else {
                assert!(cvs.is_empty());
            }
        }
    }

    #[test]
    fn streamed_in_pieces_it_hashes_the_same() {
        let d = data(300_000);
        let mut h = LeafHasher::new(4096);
        for piece in d.chunks(777) {
            h.update(piece);
        }
        assert_eq!(h.finish(), hash_chunk(&d, 4096));
    }

    #[test]
    fn a_changed_leaf_or_slot_fails() {
        let d = data(1 << 20);
        let (root, mut cvs) = hash_chunk(&d, 16 << 10);
        let mut leaf = d[32 << 10..48 << 10].to_vec();
        leaf[100] ^= 1;
        assert_ne!(leaf_cv(&leaf, 32 << 10), cvs[2]);
        // the right bytes at the wrong offset are another leaf
        assert_ne!(leaf_cv(&d[32 << 10..48 << 10], 16 << 10), cvs[2]);
        cvs[5][0] ^= 1;
        assert!(!check_slot(&root, &cvs, 1 << 20, 16 << 10));
        cvs[5][0] ^= 1;
        assert!(
            !check_slot(&root, &cvs[..63], 1 << 20, 16 << 10),
            "a slot short of a leaf"
        );
        assert!(check_slot(&root, &cvs, 1 << 20, 16 << 10));
    }

    #[test]
    fn leaf_sizes() {
        assert!(is_valid_leaf_size(16 << 10, 1 << 20));
        assert!(is_valid_leaf_size(4096, 8192));
        assert!(!is_valid_leaf_size(4096, 4096));
        assert!(!is_valid_leaf_size(2048, 1 << 20));
        assert!(!is_valid_leaf_size(12 << 10, 1 << 20));
        let l = LeafLayout {
            leaf_size: 16 << 10,
            chunk_size: 1 << 20,
        };
        assert_eq!((l.per_chunk(), l.slot_len(), l.leaves_of(20_000)), (64, 2048, 2));
    }
}
