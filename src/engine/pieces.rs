//! A unit landed piece by piece (format 3): when the leaf values of a unit's chunks are at
//! hand (the leaves layer is on disk), a run given a landing does not gather the unit in
//! memory. It checks each piece of up to [`PIECE_MAX`] bytes leaf by leaf as it arrives,
//! writes it into the landing (`Landing::place`) and forgets it; once the last piece is
//! written the unit is recorded as cached (`Landing::seal`) and its waiters hear of it. A run
//! then holds at most one piece, not one unit, and a retry resumes at the first piece not
//! written. Only pieces whose every leaf matched its value are written.

use std::sync::Arc;

use bytes::Bytes;

use super::landing::{blocking, Landing};
use super::leaves::{check_leaves, Slots};
use super::pool::{BufPool, PoolBuf};
use super::DataBlob;
use crate::image::leaves::Cv;
use crate::registry::RegistryError;

/// Largest piece: 4 writes per MiB (each write costs ~14 us of fixed overhead on ext4).
pub const PIECE_MAX: u64 = 256 << 10;

/// One unit being landed piece by piece.
pub struct Pieces {
    /// Leaf values of the unit's table chunks, in order, each checked against its digest.
    slots: Vec<Arc<Vec<Cv>>>,
    /// The unit's first table chunk.
    first_chunk: u64,
    /// Bytes of a piece (leaves that divide the table chunk).
    piece: u64,
    /// Blob offset where the unit ends.
    end: u64,
    /// Blob offset of the first byte not written: every byte of the unit before it is.
    at: u64,
    /// Bytes from `at` on, not checked yet (less than one piece; taken when first needed).
    buf: Option<PoolBuf>,
}

/// Where a unit landed piece by piece stands after some bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Some of it is still to come.
    Partial,
    /// Every byte is written (not recorded as cached yet).
    Placed,
}

impl Pieces {
    /// The unit `[start, end)` of `blob`, landed in pieces, if all its table chunks have
    /// leaves whose values are at hand (none of them is fetched here).
    pub fn begin(blob: &DataBlob, slots: &Slots, start: u64, end: u64) -> Option<Pieces> {
        let leaf = blob.leaves.as_ref()?.layout.leaf_size;
        let tc = blob.table_chunk;
        let chunks = start / tc..end.div_ceil(tc);
        let mut kept = Vec::with_capacity((chunks.end - chunks.start) as usize);
        for c in chunks.clone() {
            if blob.leaves_in(c) < 2 {
                return None;
            }
            match slots.at_hand(blob, c)? {
                Ok(slot) => kept.push(slot),
                Err(e) => {
                    tracing::debug!(error = %e, chunk = c, "leaf values on disk do not verify: the unit is kept whole");
                    return None;
                }
            }
        }
        Some(Pieces {
            slots: kept,
            first_chunk: chunks.start,
            // whole leaves within one chunk (max/min, not clamp: no panic whatever a table says)
            piece: PIECE_MAX.max(leaf).min(tc),
            end,
            at: start,
            buf: None,
        })
    }

    /// Blob offset the next attempt resumes at after a failed one (unchecked bytes are
    /// dropped), or of the next byte expected.
    pub fn resume_at(&self) -> u64 {
        self.at
    }

    /// Bytes received past the written ones.
    pub fn buffered(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.len() as u64)
    }

    /// An attempt failed: the bytes not checked yet go.
    pub fn abort(&mut self) {
        if let Some(b) = self.buf.as_mut() {
            b.clear();
        }
    }

    /// Take the unit's next bytes from the front of `data` (the rest belongs to the next
    /// units): each piece completed is checked and written into `to`. A piece that does not
    /// verify or cannot be written fails the attempt.
    pub fn take(
        &mut self,
        blob: &DataBlob,
        data: &mut Bytes,
        to: &dyn Landing,
        pool: &Arc<BufPool>,
    ) -> Result<Progress, RegistryError> {
        while !data.is_empty() && self.at < self.end {
            let piece_end = (self.at + self.piece).min(self.end);
            let want = (piece_end - self.at - self.buffered()) as usize;
            if self.buffered() == 0 && data.len() >= want {
                // a whole piece in one part of the body: no copy
                let piece = data.split_to(want);
                self.at += self.write(blob, &piece, to)?;
                continue;
            }
            let part = data.split_to(want.min(data.len()));
            let cap = self.piece as usize;
            let buf = self.buf.get_or_insert_with(|| pool.take(cap));
            buf.extend_from_slice(&part);
            if self.buffered() == piece_end - self.at {
                let n = match &self.buf {
                    Some(b) => self.write(blob, b.as_ref(), to)?,
                    None => 0,
                };
                self.at += n;
                self.abort();
            }
        }
        Ok(match self.at == self.end {
            true => Progress::Placed,
            false => Progress::Partial,
        })
    }

    /// Check the piece at `self.at` leaf by leaf and write it; its length.
    fn write(&self, blob: &DataBlob, piece: &[u8], to: &dyn Landing) -> Result<u64, RegistryError> {
        let len = piece.len() as u64;
        let span = blob
            .leaf_span(self.at, len)
            .filter(|s| s.start == self.at && s.stop == self.at + len)
            .ok_or_else(|| RegistryError::Keep(format!("no leaves for {len} bytes at {}", self.at)))?;
        let slot = self
            .slots
            .get((span.chunk - self.first_chunk) as usize)
            .ok_or_else(|| RegistryError::Keep(format!("no leaf values for chunk {}", span.chunk)))?;
        check_leaves(blob, span, slot, piece)?;
        blocking(|| to.place(self.at, piece)).map_err(|e| RegistryError::Keep(e.to_string()))?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Mutex, OnceLock};

    use futures::channel::oneshot;

    use super::*;
    use crate::engine::chunks::ChunkGeometry;
    use crate::engine::gate::{Delivered, Need, RunGate, Share};
    use crate::engine::inflight::Inflight;
    use crate::engine::leaves::BlobLeaves;
    use crate::engine::run::RunSink;
    use crate::engine::{Body, EngineError};
    use crate::image::digest::Digest;
    use crate::image::format::ChunkDigest;
    use crate::image::leaves::{hash_chunk, LeafLayout, CV_LEN};
    use crate::registry::range::RangeSink;
    use crate::registry::BlobSource;

    const CHUNK: u64 = 1 << 20;
    const LEAF: u64 = 16 << 10;

    /// What a run did to its landing, in order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Call {
        Land(u64, u64),
        Place(u64, u64),
        Seal(u64, u64),
    }

    struct Disk {
        bytes: Mutex<Vec<u8>>,
        calls: Mutex<Vec<Call>>,
    }

    impl Landing for Disk {
        fn land(&self, at: u64, data: &[u8]) -> std::io::Result<()> {
            self.calls.lock().unwrap().push(Call::Land(at, data.len() as u64));
            self.write(at, data)
        }
        fn place(&self, at: u64, data: &[u8]) -> std::io::Result<()> {
            self.calls.lock().unwrap().push(Call::Place(at, data.len() as u64));
            self.write(at, data)
        }
        fn seal(&self, at: u64, len: u64) -> std::io::Result<()> {
            self.calls.lock().unwrap().push(Call::Seal(at, len));
            Ok(())
        }
    }

    impl Disk {
        fn write(&self, at: u64, data: &[u8]) -> std::io::Result<()> {
            let at = at as usize;
            self.bytes.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    /// `size` bytes in 1 MiB chunks of 16 KiB leaves, their leaves layer on disk if `local`.
    fn blob(size: usize, local: bool) -> (Vec<u8>, Arc<DataBlob>, tempfile::NamedTempFile) {
        let data: Vec<u8> = (0..size as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let layout = LeafLayout {
            leaf_size: LEAF,
            chunk_size: CHUNK,
        };
        let mut layer = tempfile::NamedTempFile::new().unwrap();
        let mut digests = Vec::new();
        for c in data.chunks(CHUNK as usize) {
            let (root, cvs) = hash_chunk(c, LEAF);
            digests.push(root);
            let mut slot = vec![0u8; layout.slot_len() as usize];
            for (i, cv) in cvs.iter().enumerate() {
                slot[i * CV_LEN as usize..(i + 1) * CV_LEN as usize].copy_from_slice(cv);
            }
            layer.write_all(&slot).unwrap();
        }
        let src = BlobSource {
            repo: "r.test/a:b".parse().unwrap(),
            digest: Digest::of(&data),
            size: size as u64,
        };
        let kept = Arc::new(OnceLock::new());
        if local {
            let _ = kept.set(layer.reopen().unwrap());
        }
        let b = DataBlob::new(src.clone(), CHUNK, digests, ChunkDigest::Blake3).with_leaves(BlobLeaves {
            source: src,
            first_slot: 0,
            layout,
            local: kept,
        });
        (data, Arc::new(b), layer)
    }

    type Waiter = oneshot::Receiver<Result<Delivered, EngineError>>;

    fn run(b: &Arc<DataBlob>, disk: &Arc<Disk>, pool: &Arc<BufPool>) -> (RunSink, Vec<Waiter>) {
        run_of(b, disk, pool, &RunGate::new(Need::Ahead))
    }

    fn run_of(b: &Arc<DataBlob>, disk: &Arc<Disk>, pool: &Arc<BufPool>, gate: &Arc<RunGate>) -> (RunSink, Vec<Waiter>) {
        let geo = ChunkGeometry::new(CHUNK, CHUNK, b.source.size);
        let n = b.source.size.div_ceil(CHUNK);
        let (tx, rx): (Vec<_>, Vec<_>) = (0..n).map(|_| oneshot::channel()).unzip();
        let share = Share::new(None, gate);
        let to: Arc<dyn Landing> = disk.clone();
        let sink = RunSink::new(
            Arc::clone(b),
            geo,
            0,
            tx,
            Arc::clone(pool),
            share,
            Arc::new(Inflight::new(4, None)),
        )
        .landing_in(Some((to, Arc::default())));
        (sink, rx)
    }

    fn disk(size: usize) -> Arc<Disk> {
        Arc::new(Disk {
            bytes: Mutex::new(vec![0; size]),
            calls: Mutex::default(),
        })
    }

    /// With its leaves at hand, a run writes each unit in checked pieces of at most
    /// `PIECE_MAX` bytes, seals it once all are written, and only then tells its waiters,
    /// who get no bytes: the run never held a buffer the size of a unit.
    #[test]
    fn units_are_landed_in_checked_pieces_and_sealed_before_their_waiters_hear() {
        let size = (2 << 20) + (300 << 10) + 5; // the last chunk short, its last leaf too
        let (data, b, _layer) = blob(size, true);
        let (disk, pool) = (disk(size), BufPool::new(4));
        let (mut sink, mut rx) = run(&b, &disk, &pool);
        let mut at = 0;
        for part in data.chunks(10_007) {
            sink.accept(at, Bytes::copy_from_slice(part)).unwrap();
            at += part.len() as u64;
            // a unit's waiters hear of it once it is sealed, not before
            let sealed = disk
                .calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| matches!(c, Call::Seal(..)))
                .count();
            for (i, r) in rx.iter_mut().enumerate().skip(sealed) {
                assert!(
                    r.try_recv().unwrap().is_none(),
                    "unit {i} handed out before it was sealed"
                );
            }
        }
        assert!(*disk.bytes.lock().unwrap() == data, "every byte written");
        for (i, r) in rx.iter_mut().enumerate() {
            let unit = r.try_recv().unwrap().unwrap().unwrap();
            let len = (size as u64 - i as u64 * CHUNK).min(CHUNK);
            assert!(
                matches!(unit.body, Body::Landed(n) if n == len),
                "unit {i}: {:?}",
                unit.body
            );
        }
        let calls = disk.calls.lock().unwrap().clone();
        let mut want = Vec::new();
        for u in 0..3u64 {
            let end = ((u + 1) * CHUNK).min(size as u64);
            let mut p = u * CHUNK;
            while p < end {
                want.push(Call::Place(p, PIECE_MAX.min(end - p)));
                p += PIECE_MAX;
            }
            want.push(Call::Seal(u * CHUNK, end - u * CHUNK));
        }
        assert_eq!(calls, want);
        assert!(pool.idle() > 0, "the piece buffer went back");
        assert!(
            pool.reuse(|b| b.capacity() > PIECE_MAX as usize).is_none(),
            "a unit-sized buffer was used"
        );
    }

    /// A piece that does not verify fails the attempt before it is written; the retry
    /// resumes at that piece, not at its unit.
    #[test]
    fn a_corrupt_piece_is_not_written_and_the_retry_resumes_at_it() {
        let size = 2 << 20;
        let (data, b, _layer) = blob(size, true);
        let (disk, pool) = (disk(size), BufPool::new(4));
        let (mut sink, mut rx) = run(&b, &disk, &pool);
        let mut bad = data.clone();
        bad[(CHUNK + PIECE_MAX + 100) as usize] ^= 1;
        sink.accept(0, Bytes::copy_from_slice(&bad[..(CHUNK + 2 * PIECE_MAX + 10) as usize]))
            .unwrap_err();
        sink.abort_attempt();
        assert_eq!(sink.resume_at(), CHUNK + PIECE_MAX, "the pieces checked stay written");
        assert!(disk.bytes.lock().unwrap()[(CHUNK + PIECE_MAX) as usize..]
            .iter()
            .all(|&x| x == 0));
        let from = sink.resume_at() as usize;
        sink.accept(from as u64, Bytes::copy_from_slice(&data[from..])).unwrap();
        assert!(*disk.bytes.lock().unwrap() == data);
        for r in rx.iter_mut() {
            assert!(r.try_recv().unwrap().unwrap().is_ok());
        }
    }

    /// A reader of part of a unit hears that its bytes are written once the pieces that
    /// hold them are, before the unit is complete.
    #[test]
    fn the_run_tells_how_far_its_pieces_are_written() {
        use futures::FutureExt;
        let size = 2 << 20;
        let (data, b, _layer) = blob(size, true);
        let (disk, pool, gate) = (disk(size), BufPool::new(4), RunGate::new(Need::Reader));
        let (mut sink, mut rx) = run_of(&b, &disk, &pool, &gate);
        let upto = |to: u64| gate.placed_to(to).now_or_never().is_some();
        let first = (PIECE_MAX + 10) as usize;
        sink.accept(0, Bytes::copy_from_slice(&data[..first])).unwrap();
        assert!(upto(PIECE_MAX) && !upto(PIECE_MAX + 1), "one piece written");
        assert!(rx[0].try_recv().unwrap().is_none(), "the unit is not complete");
        sink.accept(first as u64, Bytes::copy_from_slice(&data[first..]))
            .unwrap();
        assert!(upto(size as u64));
    }

    /// Leaves not on disk yet: the run gathers and lands whole units as before.
    #[test]
    fn without_leaves_at_hand_units_are_landed_whole() {
        let size = (1 << 20) + 5;
        let (data, b, _layer) = blob(size, false);
        let (disk, pool) = (disk(size), BufPool::new(4));
        let (mut sink, mut rx) = run(&b, &disk, &pool);
        for (i, part) in data.chunks(70_000).enumerate() {
            sink.accept((i * 70_000) as u64, Bytes::copy_from_slice(part)).unwrap();
        }
        assert_eq!(
            *disk.calls.lock().unwrap(),
            vec![Call::Land(0, CHUNK), Call::Land(CHUNK, 5)]
        );
        let unit = rx[0].try_recv().unwrap().unwrap().unwrap();
        assert!(matches!(unit.body, Body::Bytes(ref b) if b[..] == data[..CHUNK as usize]));
    }
}
