//! One merged range request ("run") of consecutive fetch units: the body is cut into units as
//! it arrives and hashed as it arrives (verification overlaps the transfer), each unit is
//! checked against the chunk table the moment it is complete and handed to its waiters at
//! once, so a unit never waits for the rest of its run and only the unit being assembled is
//! buffered. A retry resumes at the first unit not yet handed out. A run given a landing
//! whose leaves are at hand buffers not even the unit: it writes it piece by piece
//! (`pieces`), and a retry resumes at the first piece not written.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;

use super::chunks::ChunkGeometry;
use super::gate::{Delivered, Share};
use super::inflight::{ChunkKey, Inflight, Outcome};
use super::landing::{blocking, land, Landing};
use super::leaves::Slots;
use super::pieces::{Pieces, Progress};
use super::pool::{BufPool, PoolBuf};
use super::{Body, DataBlob, EngineError};
use crate::image::format::ChunkHasher;
use crate::registry::range::RangeSink;
use crate::registry::RegistryError;

/// Where a unit's waiters learn its outcome.
pub type UnitSender = oneshot::Sender<Result<Delivered, EngineError>>;

/// The receiving side of a run: assembles, verifies and delivers units in order.
pub struct RunSink {
    blob: Arc<DataBlob>,
    geo: ChunkGeometry,
    /// The unit being assembled, and how.
    next: u64,
    assembly: Assembly,
    pool: Arc<BufPool>,
    /// Blob offset of the next byte to hash, and the digest of its table chunk so far.
    hashed_to: u64,
    hasher: Option<ChunkHasher>,
    /// Senders of units `next..`, in order.
    senders: VecDeque<UnitSender>,
    /// The run's share of the budget of bytes fetched ahead (see `gate`).
    share: Share,
    /// Where each unit's outcome is settled as it is handed out.
    inflight: Arc<Inflight>,
    /// Where each verified unit is written before its waiters hear of it, if anywhere.
    landing: Option<Arc<dyn Landing>>,
    /// Leaf values kept, which let a unit be landed in pieces.
    slots: Arc<Slots>,
    /// Whether every unit handed out so far is in the landing.
    trail: Trail,
}

/// Whether a run's landing holds every byte the run has handed out: only then does it tell
/// readers how far its bytes are written (`RunGate::placed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trail {
    /// All of them, from the run's first byte.
    Gapless,
    /// A unit went to its waiters unlanded (or the run lands nothing).
    Gap,
}

/// How the unit being received is put together.
enum Assembly {
    /// Whole, in memory, each table chunk hashed as it streams (`None`: no byte of it yet).
    Whole(Option<PoolBuf>),
    /// Written into the landing piece by piece.
    Pieces(Pieces),
}

impl RunSink {
    /// A run starting at unit `first`, with one sender per unit, held to `share`; each unit
    /// leaves `inflight`'s running ones as it is handed out.
    pub fn new(
        blob: Arc<DataBlob>,
        geo: ChunkGeometry,
        first: u64,
        senders: Vec<UnitSender>,
        pool: Arc<BufPool>,
        share: Share,
        inflight: Arc<Inflight>,
    ) -> RunSink {
        RunSink {
            hashed_to: geo.start(first),
            blob,
            geo,
            next: first,
            assembly: Assembly::Whole(None),
            pool,
            hasher: None,
            senders: senders.into(),
            share,
            inflight,
            landing: None,
            slots: Arc::default(),
            trail: Trail::Gap,
        }
    }

    /// The run writes each unit into the landing as soon as it is verified, in pieces where
    /// the kept leaf values (`slots`) allow.
    pub fn landing_in(mut self, landing: Option<(Arc<dyn Landing>, Arc<Slots>)>) -> RunSink {
        if let Some((to, slots)) = landing {
            self.landing = Some(to);
            self.slots = slots;
            self.trail = Trail::Gapless;
        }
        self
    }

    /// Bytes of the current unit received (written or buffered).
    fn received(&self) -> u64 {
        match &self.assembly {
            Assembly::Whole(buf) => buf.as_ref().map_or(0, |b| b.len() as u64),
            Assembly::Pieces(p) => p.resume_at() + p.buffered() - self.geo.start(self.next),
        }
    }

    /// The run's bytes before `to` are all in its landing: say so, while that holds for
    /// every unit handed out.
    fn tell_placed(&self, to: u64) {
        if self.trail == Trail::Gapless {
            self.share.run().placed(to);
        }
    }

    /// The run failed for good: every unit not delivered gets the error.
    pub fn fail(&mut self, e: &EngineError) {
        for (s, index) in std::mem::take(&mut self.senders).into_iter().zip(self.next..) {
            let _ = s.send(Err(e.clone()));
            self.settle(index, Outcome::Failed(e));
        }
    }

    fn settle(&self, index: u64, outcome: Outcome<'_>) {
        let key = ChunkKey::new(self.blob.key(), index);
        self.inflight.settle(&key, self.share.run(), outcome);
    }

    fn unit_len(&self) -> usize {
        (self.geo.end(self.next) - self.geo.start(self.next)) as usize
    }
}

impl RangeSink for RunSink {
    fn resume_at(&self) -> u64 {
        match &self.assembly {
            // (a piece not checked yet is dropped when an attempt fails)
            Assembly::Pieces(p) => p.resume_at(),
            Assembly::Whole(_) => (self.geo.start(self.next) + self.received()).min(self.geo.size),
        }
    }

    fn accept(&mut self, _at: u64, mut data: Bytes) -> Result<(), RegistryError> {
        while !data.is_empty() {
            if self.received() == 0 {
                self.begin_unit();
            }
            if let (Assembly::Pieces(p), Some(to)) = (&mut self.assembly, &self.landing) {
                let progress = p.take(&self.blob, &mut data, to.as_ref(), &self.pool);
                let placed = p.resume_at();
                self.tell_placed(placed);
                if progress? == Progress::Placed {
                    self.sealed()?;
                }
                continue;
            }
            let unit_len = self.unit_len();
            let want = unit_len - self.received() as usize;
            if self.received() == 0 && data.len() >= want {
                // a whole unit in one piece: no copy
                let unit = data.split_to(want);
                self.hash(&unit)?;
                self.deliver(unit);
                continue;
            }
            let part = data.split_to(want.min(data.len()));
            self.hash(&part)?;
            let pool = &self.pool;
            if let Assembly::Whole(slot) = &mut self.assembly {
                let buf = slot.get_or_insert_with(|| pool.take(unit_len));
                buf.extend_from_slice(&part);
                if buf.len() == unit_len {
                    if let Some(full) = slot.take() {
                        self.deliver(full.freeze());
                    }
                }
            }
        }
        Ok(())
    }

    fn room(&self) -> Option<futures::future::BoxFuture<'static, ()>> {
        if self.senders.is_empty() {
            return None;
        }
        self.share.room(self.next, self.unit_len())
    }

    fn need(&self) -> crate::registry::slots::Need {
        self.share.need()
    }

    fn abort_attempt(&mut self) {
        // a partial unit is unverified: the retry fetches it whole (or its pieces not written)
        match &mut self.assembly {
            Assembly::Whole(buf) => {
                if let Some(b) = buf.as_mut() {
                    b.clear();
                }
            }
            Assembly::Pieces(p) => p.abort(),
        }
        self.hasher = None;
        self.hashed_to = self.geo.start(self.next).min(self.geo.size);
    }
}

impl RunSink {
    /// Feed bytes (the next ones of the body) to the digest of their table chunk; at each
    /// chunk's end compare with the table. A mismatch fails the attempt.
    fn hash(&mut self, mut data: &[u8]) -> Result<(), RegistryError> {
        let tc = self.blob.table_chunk;
        while !data.is_empty() {
            let idx = self.hashed_to / tc;
            let end = ((idx + 1) * tc).min(self.geo.size);
            let n = ((end - self.hashed_to) as usize).min(data.len());
            let algorithm = self.blob.algorithm;
            self.hasher.get_or_insert_with(|| algorithm.hasher()).update(&data[..n]);
            self.hashed_to += n as u64;
            data = &data[n..];
            if self.hashed_to == end {
                if let Some(h) = self.hasher.take() {
                    self.blob.check_chunk(idx, h.finalize())?;
                }
            }
        }
        Ok(())
    }

    /// A unit starts: landed in pieces if the run has a landing and the unit's leaf values
    /// are at hand, else gathered whole.
    fn begin_unit(&mut self) {
        let (start, end) = (self.geo.start(self.next), self.geo.end(self.next));
        self.assembly = match self.landing {
            Some(_) => {
                Pieces::begin(&self.blob, &self.slots, start, end).map_or(Assembly::Whole(None), Assembly::Pieces)
            }
            None => Assembly::Whole(None),
        };
    }

    /// Every piece of the unit is written: record it as cached and tell its waiters. A unit
    /// that cannot be recorded fails the attempt (its bytes are gone from memory).
    fn sealed(&mut self) -> Result<(), RegistryError> {
        let (at, len) = (self.geo.start(self.next), self.unit_len() as u64);
        if let Some(to) = &self.landing {
            blocking(|| to.seal(at, len)).map_err(|e| RegistryError::Keep(e.to_string()))?;
        }
        self.assembly = Assembly::Whole(None);
        self.hashed_to = at + len;
        let unit = self.share.landed(Body::Landed(len));
        self.hand_out(unit, Landed::Yes);
        Ok(())
    }

    /// Hand a complete unit (all its table chunks checked) to its waiters, once it is
    /// landed if the run has somewhere to land it. A landed unit holds no share of the budget
    /// and is not kept among the recent ones: its waiters find it in their cache.
    fn deliver(&mut self, unit: Bytes) {
        let at = self.geo.start(self.next);
        if self.landing.as_deref().is_some_and(|l| land(l, at, &unit)) {
            self.tell_placed(at + unit.len() as u64);
            let unit = self.share.landed(Body::Bytes(unit));
            self.hand_out(unit, Landed::Yes);
        } else {
            self.trail = Trail::Gap;
            let unit = self.share.attach(unit);
            self.hand_out(unit, Landed::No);
        }
    }

    /// Tell the waiters of the current unit, settle it, and go on to the next.
    fn hand_out(&mut self, unit: Delivered, landed: Landed) {
        if let Some(s) = self.senders.pop_front() {
            let _ = s.send(Ok(unit.clone()));
            let outcome = match (landed, &unit.body) {
                (Landed::No, Body::Bytes(data)) => Outcome::Delivered(data),
                _ => Outcome::Landed,
            };
            self.settle(self.next, outcome);
        }
        self.next += 1;
    }
}

/// Whether a unit handed out is in its landing already.
#[derive(Clone, Copy)]
enum Landed {
    Yes,
    No,
}

impl Drop for RunSink {
    /// A run whose task ended without an outcome for some units (cancelled): they fail, so
    /// none stays among the running ones.
    fn drop(&mut self) {
        if !self.senders.is_empty() {
            self.fail(&EngineError::Task("the fetch ended without a result".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn blob(data: &[u8], chunk: usize) -> Arc<DataBlob> {
        Arc::new(DataBlob::new(
            crate::registry::BlobSource {
                repo: crate::registry::parse_reference("localhost:1/r:t").unwrap(),
                digest: crate::image::digest::Digest::of(data),
                size: data.len() as u64,
            },
            chunk as u64,
            data.chunks(chunk).map(|c| Sha256::digest(c).into()).collect(),
            crate::image::format::ChunkDigest::Sha256,
        ))
    }

    /// The bytes a waiter was handed.
    fn bytes_of(r: &mut oneshot::Receiver<Result<Delivered, EngineError>>) -> Bytes {
        let unit = r.try_recv().unwrap().unwrap().unwrap();
        unit.body.bytes().cloned().unwrap()
    }

    fn reader() -> Share {
        let gate = super::super::gate::RunGate::new(super::super::gate::Need::Reader);
        Share::new(None, &gate)
    }

    /// No fetch of these units is registered as running.
    fn idle() -> Arc<Inflight> {
        Arc::new(Inflight::new(4, None))
    }

    fn sink(data: &[u8], chunk: usize) -> (RunSink, Vec<oneshot::Receiver<Result<Delivered, EngineError>>>) {
        let b = blob(data, chunk);
        let geo = ChunkGeometry::new(chunk as u64, chunk as u64, data.len() as u64);
        let n = data.len().div_ceil(chunk);
        let (tx, rx): (Vec<_>, Vec<_>) = (0..n).map(|_| oneshot::channel()).unzip();
        (RunSink::new(b, geo, 0, tx, BufPool::new(2), reader(), idle()), rx)
    }

    #[test]
    fn units_are_delivered_as_they_complete_whatever_the_piece_sizes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        for piece in [1usize, 999, 4096, 5000, 10_000] {
            let (mut s, mut rx) = sink(&data, 4096);
            let (mut at, mut received) = (0, 0);
            for p in data.chunks(piece) {
                s.accept(at, Bytes::copy_from_slice(p)).unwrap();
                at += p.len() as u64;
                // every unit that is complete has been handed out already, the next one not
                let done = (at as usize / 4096).min(2) + usize::from(at as usize == data.len());
                for (i, r) in rx.iter_mut().enumerate().take(done).skip(received) {
                    let got = bytes_of(r);
                    assert_eq!(
                        got,
                        data[i * 4096..((i + 1) * 4096).min(data.len())],
                        "piece size {piece}"
                    );
                }
                received = done;
                if let Some(r) = rx.get_mut(done) {
                    assert!(r.try_recv().unwrap().is_none(), "unit {done} handed out early");
                }
            }
            assert_eq!(s.resume_at(), data.len() as u64);
        }
    }

    #[test]
    fn a_corrupt_unit_fails_the_attempt_and_the_retry_resumes_at_it() {
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let (mut s, mut rx) = sink(&data, 4096);
        s.accept(0, Bytes::copy_from_slice(&data[..4096])).unwrap();
        let mut bad = data[4096..].to_vec();
        bad[5] ^= 1;
        assert!(matches!(
            s.accept(4096, Bytes::from(bad)),
            Err(RegistryError::DigestMismatch { .. })
        ));
        s.abort_attempt();
        assert_eq!(s.resume_at(), 4096, "the verified first unit is not fetched again");
        s.accept(4096, Bytes::copy_from_slice(&data[4096..5000])).unwrap();
        s.abort_attempt();
        assert_eq!(s.resume_at(), 4096, "a partial unit is dropped");
        s.accept(4096, Bytes::copy_from_slice(&data[4096..])).unwrap();
        assert_eq!(bytes_of(&mut rx[0]), data[..4096]);
        assert_eq!(bytes_of(&mut rx[1]), data[4096..]);
    }

    #[test]
    fn units_of_several_table_chunks_check_each_chunk_as_it_streams() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let b = blob(&data, 4096);
        let geo = ChunkGeometry::new(8192, 4096, data.len() as u64);
        let (tx, mut rx): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        let mut s = RunSink::new(Arc::clone(&b), geo, 0, tx, BufPool::new(2), reader(), idle());
        let mut bad = data.clone();
        bad[4096 + 10] ^= 0xff; // second table chunk of the first unit
        let err = s.accept(0, Bytes::copy_from_slice(&bad[..6000]));
        assert!(err.is_ok(), "the first table chunk is fine");
        assert!(matches!(
            s.accept(6000, Bytes::copy_from_slice(&bad[6000..9000])),
            Err(RegistryError::DigestMismatch { .. })
        ));
        s.abort_attempt();
        assert_eq!(s.resume_at(), 0);
        for (at, piece) in [(0usize, 3000usize), (3000, 9000), (12_000, 8000)] {
            s.accept(at as u64, Bytes::copy_from_slice(&data[at..at + piece]))
                .unwrap();
        }
        for (i, r) in rx.iter_mut().enumerate() {
            let got = bytes_of(r);
            assert_eq!(got, data[i * 8192..((i + 1) * 8192).min(data.len())]);
        }
    }

    #[test]
    fn a_failed_run_tells_every_waiter_left() {
        let data = vec![3u8; 8192];
        let (mut s, mut rx) = sink(&data, 4096);
        s.accept(0, Bytes::copy_from_slice(&data[..4096])).unwrap();
        s.fail(&EngineError::Task("gone".into()));
        assert!(rx[0].try_recv().unwrap().unwrap().is_ok());
        assert!(rx[1].try_recv().unwrap().unwrap().is_err());
    }
}
