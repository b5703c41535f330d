//! Reads of a few leaves of a chunk (format 3, `image::leaves`): a random reader's pages
//! verified without the rest of their chunk. The leaves and the chunk's slot of leaf values
//! are fetched side by side (two small range requests at once, so one round trip); the slot
//! is checked against the chunk digest of the table, each leaf against the slot. Once the
//! catalog has kept the whole leaves layer on disk (fetched in the background after
//! registration, 0.2% of the image), slots are read from there and a leaf read is one range
//! request. Slots are kept in a small LRU either way.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};

use lru::LruCache;

use super::inflight::ChunkKey;
use super::{DataBlob, Engine, EngineError, Piece};
use crate::image::leaves::{self, Cv, LeafLayout, CV_LEN};
use crate::lock::lock;
use crate::registry::{BlobSource, RegistryError};

/// Slots kept in memory (2 KiB each with 1 MiB chunks and 16 KiB leaves).
const SLOTS_KEPT: usize = 1024;

/// Where a data blob's leaves are: its slots in the image's leaves layer.
#[derive(Debug, Clone)]
pub struct BlobLeaves {
    /// The leaves layer.
    pub source: BlobSource,
    /// The slot of the blob's chunk 0 (the chunks of the blobs before it in the table come
    /// first).
    pub first_slot: u64,
    /// Leaf and chunk size.
    pub layout: LeafLayout,
    /// The leaves layer kept on disk (verified against its digest), once it is there; shared
    /// by the image's blobs.
    pub local: Arc<OnceLock<File>>,
}

/// The leaves of one chunk that cover a reader's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafSpan {
    /// The chunk.
    pub chunk: u64,
    /// Its leaves `first..end`.
    pub first: u64,
    /// One past its last leaf.
    pub end: u64,
    /// Blob offset of the first leaf.
    pub start: u64,
    /// Blob offset past the last leaf (the chunk's end for its last leaf).
    pub stop: u64,
}

impl DataBlob {
    /// The leaves covering `[offset, offset + len)` (clamped to the blob), if the blob has
    /// leaves and the range lies in one chunk of at least two leaves.
    pub fn leaf_span(&self, offset: u64, len: u64) -> Option<LeafSpan> {
        let l = self.leaves.as_ref()?.layout;
        let size = self.source.size;
        let (unit, leaf) = (self.table_chunk, l.leaf_size);
        let end = offset.checked_add(len.max(1))?.min(size);
        if offset >= end {
            return None;
        }
        let chunk = offset / unit;
        let (cs, ce) = (chunk * unit, ((chunk + 1) * unit).min(size));
        if end > ce || l.leaves_of(ce - cs) < 2 {
            return None;
        }
        let (first, last) = ((offset - cs) / leaf, (end - cs).div_ceil(leaf));
        Some(LeafSpan {
            chunk,
            first,
            end: last,
            start: cs + first * leaf,
            stop: (cs + last * leaf).min(ce),
        })
    }

    /// Leaves `leaves` (not empty) of table chunk `c`, as the span a range over them gives
    /// ([`leaf_span`](Self::leaf_span)'s `None`s included).
    pub fn chunk_leaves(&self, c: u64, leaves: std::ops::Range<u64>) -> Option<LeafSpan> {
        let leaf = self.leaves.as_ref()?.layout.leaf_size;
        self.leaf_span(
            c * self.table_chunk + leaves.start * leaf,
            (leaves.end - leaves.start) * leaf,
        )
    }

    /// Whether the blob's leaf values are on disk (its units can be landed in pieces).
    pub fn leaves_kept(&self) -> bool {
        self.leaves.as_ref().is_some_and(|l| l.local.get().is_some())
    }

    /// Leaves of a whole table chunk (0 without leaves).
    pub fn leaves_per_chunk(&self) -> u64 {
        self.leaves.as_ref().map_or(0, |l| l.layout.leaves_of(self.table_chunk))
    }

    /// Leaves of table chunk `c` (the last one may be short; 0 without leaves).
    pub fn leaves_in(&self, c: u64) -> u64 {
        self.leaves
            .as_ref()
            .map_or(0, |l| l.layout.leaves_of(self.chunk_len(c)))
    }

    /// Bytes of table chunk `c`.
    fn chunk_len(&self, c: u64) -> u64 {
        let r = self.chunk_range(c);
        r.end - r.start
    }
}

/// Recently used slots, by chunk.
pub struct Slots(Mutex<LruCache<ChunkKey, Arc<Vec<Cv>>>>);

impl Default for Slots {
    fn default() -> Self {
        Slots(Mutex::new(LruCache::new(
            NonZeroUsize::MIN.saturating_add(SLOTS_KEPT - 1),
        )))
    }
}

impl Engine {
    /// The verified leaves of `span`: one piece starting at `span.start`. Not shared with
    /// other readers nor kept: the caller writes them into its cache file. A chunk whose
    /// fetch failed a moment ago fails at once, and a registry failure here is held for the
    /// chunk like a failed chunk fetch (`inflight`): readers queued behind a stalled registry
    /// do not wait one deadline each.
    pub async fn read_leaves(&self, blob: &Arc<DataBlob>, span: LeafSpan) -> Result<Piece, EngineError> {
        let key = ChunkKey::new(blob.key(), span.chunk);
        if let Some(e) = self.inflight.lock().recent_failure(&key) {
            return Err(e);
        }
        let slot = self.slot(blob, span.chunk);
        let data = self
            .registry
            .fetch_range(&blob.source, span.start, span.stop - span.start);
        // the request first: a kept slot is read and checked without a wait, which would
        // otherwise hold the request back
        let (data, slot) = tokio::join!(data, slot);
        let failed = |e: EngineError| {
            // a mismatch is the registry's bytes, not its availability: the chunk fetch may
            // still succeed (and is checked against the chunk digest)
            if !matches!(e, EngineError::Registry(RegistryError::DigestMismatch { .. })) {
                self.inflight.hold_failure(&key, &e);
            }
            e
        };
        let (slot, data) = (slot.map_err(failed)?, data.map_err(|e| failed(e.into()))?);
        self.stats.fetched(blob.key(), data.len() as u64);
        // not a failed read: the caller fetches the chunk whole, and only that can fail
        check_leaves(blob, span, &slot, &data)?;
        self.stats.leaf_reads.fetch_add(1, Relaxed);
        self.stats.served(blob.key(), data.len() as u64);
        Ok(Piece {
            offset: span.start,
            body: super::Body::Bytes(data),
            unit: None,
            lease: None,
        })
    }

    /// Check `data`, the bytes of `span` found in a cache file (leaves an earlier run wrote),
    /// against the chunk's leaf values.
    pub async fn verify_leaves(&self, blob: &Arc<DataBlob>, span: LeafSpan, data: &[u8]) -> Result<(), EngineError> {
        let slot = self.slot(blob, span.chunk).await?;
        Ok(check_leaves(blob, span, &slot, data)?)
    }

    /// The leaf values of chunk `c`, checked against its digest (kept, or fetched).
    async fn slot(&self, blob: &Arc<DataBlob>, c: u64) -> Result<Arc<Vec<Cv>>, EngineError> {
        if let Some(kept) = self.slots.at_hand(blob, c) {
            return Ok(kept?);
        }
        let want = SlotOf::new(blob, c)?;
        let raw = self
            .registry
            .fetch_range_checked(want.source, want.at, want.len(), |b| want.check(b).map(drop))
            .await?;
        Ok(self.slots.keep(ChunkKey::new(blob.key(), c), values(&raw)))
    }
}

impl Slots {
    /// The leaf values of chunk `c` if they need no request: kept, or read from the leaves
    /// layer on disk (checked all the same: a slot costs a few dozen compressions). `None`
    /// if they must be fetched; an error if the blob has none or they do not verify.
    pub(super) fn at_hand(&self, blob: &DataBlob, c: u64) -> Option<Result<Arc<Vec<Cv>>, RegistryError>> {
        let key = ChunkKey::new(blob.key(), c);
        if let Some(s) = lock(&self.0).get(&key) {
            return Some(Ok(Arc::clone(s)));
        }
        let want = match SlotOf::new(blob, c) {
            Ok(w) => w,
            Err(e) => return Some(Err(e)),
        };
        let mut raw = vec![0u8; want.len() as usize];
        want.local.get()?.read_exact_at(&mut raw, want.at).ok()?;
        Some(want.check(&raw).map(|cvs| self.keep(key, cvs)))
    }

    /// Keep the verified leaf values `cvs` of `key`'s chunk.
    fn keep(&self, key: ChunkKey, cvs: Vec<Cv>) -> Arc<Vec<Cv>> {
        let slot = Arc::new(cvs);
        lock(&self.0).put(key, Arc::clone(&slot));
        slot
    }
}

/// The leaf values a slot's bytes hold.
fn values(raw: &[u8]) -> Vec<Cv> {
    raw.chunks_exact(CV_LEN as usize)
        .filter_map(|c| c.try_into().ok())
        .collect()
}

/// Where the slot of one chunk is and what it must merge to.
struct SlotOf<'a> {
    source: &'a BlobSource,
    local: &'a OnceLock<File>,
    /// Offset in the leaves layer.
    at: u64,
    /// Leaves of the chunk.
    leaves: u64,
    chunk: u64,
    chunk_len: u64,
    leaf_size: u64,
    root: Cv,
    blob: &'a DataBlob,
}

impl<'a> SlotOf<'a> {
    fn new(blob: &'a DataBlob, c: u64) -> Result<SlotOf<'a>, RegistryError> {
        let no = |what: String| RegistryError::Manifest(format!("{what} of blob {}", blob.source.digest));
        let l = blob.leaves.as_ref().ok_or_else(|| no("no leaves layer".into()))?;
        let root = *blob
            .digests
            .get(c as usize)
            .ok_or_else(|| no(format!("no digest for chunk {c}")))?;
        let chunk_len = blob.chunk_len(c);
        Ok(SlotOf {
            source: &l.source,
            local: &l.local,
            at: (l.first_slot + c) * l.layout.slot_len(),
            leaves: l.layout.leaves_of(chunk_len),
            chunk: c,
            chunk_len,
            leaf_size: l.layout.leaf_size,
            root,
            blob,
        })
    }

    /// Bytes of the slot's values.
    fn len(&self) -> u64 {
        self.leaves * CV_LEN
    }

    /// The values `raw` holds, if they merge to the chunk's digest.
    fn check(&self, raw: &[u8]) -> Result<Vec<Cv>, RegistryError> {
        let cvs = values(raw);
        if leaves::check_slot(&self.root, &cvs, self.chunk_len, self.leaf_size) {
            return Ok(cvs);
        }
        Err(RegistryError::DigestMismatch {
            what: format!("leaves of chunk {} of {}", self.chunk, self.blob.source.digest),
            expected: hex::encode(self.root),
            got: "leaf values that do not merge to it".into(),
        })
    }
}

/// Check the bytes of `span` (all of it) leaf by leaf against the chunk's verified `slot`.
pub(super) fn check_leaves(blob: &DataBlob, span: LeafSpan, slot: &[Cv], data: &[u8]) -> Result<(), RegistryError> {
    if data.len() as u64 != span.stop - span.start {
        return Err(RegistryError::Truncated {
            expected: span.stop - span.start,
            got: data.len() as u64,
        });
    }
    let leaf = blob.leaves.as_ref().map_or(1, |l| l.layout.leaf_size);
    for (i, piece) in (span.first..span.end).zip(data.chunks(leaf as usize)) {
        let want = slot.get(i as usize).copied().unwrap_or_default();
        let got = leaves::leaf_cv(piece, i * leaf);
        if got != want {
            return Err(RegistryError::DigestMismatch {
                what: format!(
                    "leaf {i} at {} of {}",
                    span.start + (i - span.first) * leaf,
                    blob.source.digest
                ),
                expected: hex::encode(want),
                got: hex::encode(got),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::digest::Digest;

    fn blob(size: u64) -> DataBlob {
        let src = BlobSource {
            repo: "r.test/a:b".parse().unwrap(),
            digest: Digest::of(b"x"),
            size,
        };
        let layout = LeafLayout {
            leaf_size: 16 << 10,
            chunk_size: 1 << 20,
        };
        let n = size.div_ceil(1 << 20) as usize;
        DataBlob::new(src.clone(), 1 << 20, vec![[0; 32]; n], Default::default()).with_leaves(BlobLeaves {
            source: src,
            first_slot: 0,
            layout,
            local: Default::default(),
        })
    }

    #[test]
    fn leaves_are_checked_one_by_one_against_their_slot() {
        let b = blob(2 << 20);
        let chunk: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let leaf = 16 << 10;
        let slot: Vec<Cv> = chunk
            .chunks(leaf)
            .enumerate()
            .map(|(i, l)| leaves::leaf_cv(l, (i * leaf) as u64))
            .collect();
        // leaves 2 and 3 of chunk 1
        let span = b.leaf_span((1 << 20) + 2 * leaf as u64 + 100, leaf as u64).unwrap();
        let mut data = chunk[2 * leaf..4 * leaf].to_vec();
        assert!(check_leaves(&b, span, &slot, &data).is_ok());
        data[leaf + 7] ^= 1;
        assert!(check_leaves(&b, span, &slot, &data).is_err(), "a changed byte");
        assert!(
            check_leaves(&b, span, &slot, &chunk[..2 * leaf]).is_err(),
            "other leaves' bytes"
        );
        assert!(
            check_leaves(&b, span, &slot, &chunk[2 * leaf..3 * leaf]).is_err(),
            "too short"
        );
    }

    #[test]
    fn a_range_maps_to_the_leaves_of_its_chunk() {
        let b = blob((3 << 20) + 20_000);
        // 4 KiB inside leaf 1 of chunk 2
        let s = b.leaf_span((2 << 20) + 20_000, 4096).unwrap();
        assert_eq!((s.chunk, s.first, s.end), (2, 1, 2));
        assert_eq!((s.start, s.stop), ((2 << 20) + 16384, (2 << 20) + 32768));
        // across a leaf boundary: two leaves
        let s = b.leaf_span((1 << 20) + 16380, 8).unwrap();
        assert_eq!((s.first, s.end), (0, 2));
        // across chunks: none
        assert_eq!(b.leaf_span((1 << 20) - 8, 16), None);
        // the short last chunk (20,000 bytes, two leaves): the last leaf ends at the blob's end
        let s = b.leaf_span((3 << 20) + 19_000, 4096).unwrap();
        assert_eq!((s.first, s.end, s.stop), (1, 2, (3 << 20) + 20_000));
        // a last chunk of one leaf: verified whole
        assert_eq!(blob((1 << 20) + 9000).leaf_span(1 << 20, 10), None);
        // out of the blob
        assert_eq!(b.leaf_span(4 << 20, 10), None);
        assert_eq!(b.leaf_span(u64::MAX - 1, 10), None);
    }
}
