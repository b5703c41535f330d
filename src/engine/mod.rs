//! The blob engine: turns a byte range of a data blob into verified bytes.
//!
//! A range maps to aligned fetch units ("chunks"). Chunks already fetched or being fetched
//! are found in an LRU keyed by (blob key, chunk index), so concurrent readers of one
//! chunk share a single registry request. The blob key ([`BlobKey`]) names the blob digest
//! together with the chunk digests its bytes are verified against: an image that claims
//! another image's blob digest with its own table gets its own key, so its bytes never reach
//! the other image's readers. Missing adjacent chunks are merged into one range
//! request up to `merge_max`, whose body is verified and handed out chunk by chunk as it
//! streams in (`run`). Every chunk is checked against the image's chunk digest table before
//! anyone sees it. A frontend may hand a fetch its cache (`landing`): the runs then write
//! each unit there themselves, whole or in pieces checked leaf by leaf (`pieces`), and say
//! how far they have written. Runs fetched ahead of readers pause while their units wait to be written
//! beyond a budget (`gate`). The engine knows the registry, never a kernel: frontends write
//! the bytes into their cache files.

#![forbid(unsafe_code)]

pub mod chunks;
pub mod gate;
pub(crate) mod inflight;
pub mod landing;
pub mod leaves;
mod piece;
mod pieces;
pub(crate) mod pool;
mod stats;

use piece::Unit;
pub use piece::{Body, Pending, Piece};
pub use stats::{BlobCounters, EngineStats};
pub mod run;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::image::digest::Digest;
use crate::image::format::ChunkDigest;
use futures::channel::oneshot;
use futures::future::FutureExt;

use crate::config::EngineConfig;
use crate::registry::{BlobSource, Registry, RegistryError};
use chunks::{plan_runs, ChunkGeometry};
pub use gate::Need;
use inflight::{ChunkFuture, ChunkKey, Fetching, Inflight};
use run::RunSink;

/// Why a read could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The registry failed (after retries and the deadline).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A read outside the blob.
    #[error("range {offset}+{len} is outside blob {digest} ({size} bytes)")]
    OutOfRange {
        /// The blob.
        digest: Digest,
        /// Where the read starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The blob's size.
        size: u64,
    },
    /// A fetch task ended without an answer.
    #[error("fetch task failed: {0}")]
    Task(String),
}

/// What the bytes of a blob are verified against: the blob digest, its size and every chunk
/// digest of the table that describes it (with chunk size and algorithm), hashed into one
/// digest. Everything that holds a blob's bytes (in-flight fetches, cache files) is keyed by
/// it, never by the blob digest alone, which an image can claim without owning the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobKey(Digest);

impl BlobKey {
    fn new(source: &BlobSource, table_chunk: u64, algorithm: ChunkDigest, digests: &[[u8; 32]]) -> BlobKey {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"lazyblob blob key v1\0");
        h.update(source.digest.as_str().as_bytes());
        h.update(source.size.to_le_bytes());
        h.update(table_chunk.to_le_bytes());
        h.update(algorithm.to_string().as_bytes());
        h.update(b"\0");
        for d in digests {
            h.update(d);
        }
        BlobKey(Digest::from_raw(h.finalize().into()))
    }

    /// A file name for the blob's cache file: 64 hex digits.
    pub fn file_name(&self) -> &str {
        self.0.hex()
    }
}

/// A data blob the engine can serve: where it lives and the digests of its chunks.
#[derive(Debug)]
pub struct DataBlob {
    /// Where the blob is fetched from.
    pub source: BlobSource,
    /// Verified chunk size of the table.
    pub table_chunk: u64,
    /// Digest of each `table_chunk`-sized piece.
    pub digests: Vec<[u8; 32]>,
    /// How its chunks are hashed.
    pub algorithm: ChunkDigest,
    /// Where its leaves are (format 3): small ranges are verifiable on their own.
    pub leaves: Option<leaves::BlobLeaves>,
    key: BlobKey,
}

impl DataBlob {
    /// A blob of `table_chunk`-byte chunks with these digests.
    pub fn new(source: BlobSource, table_chunk: u64, digests: Vec<[u8; 32]>, algorithm: ChunkDigest) -> DataBlob {
        let key = BlobKey::new(&source, table_chunk, algorithm, &digests);
        DataBlob {
            source,
            table_chunk,
            digests,
            algorithm,
            leaves: None,
            key,
        }
    }

    /// The blob, with its leaves at `leaves`.
    pub fn with_leaves(mut self, leaves: leaves::BlobLeaves) -> DataBlob {
        self.leaves = Some(leaves);
        self
    }

    /// The bytes of table chunk `c` (the last one may be short).
    pub fn chunk_range(&self, c: u64) -> std::ops::Range<u64> {
        let geo = ChunkGeometry::new(self.table_chunk, self.table_chunk, self.source.size);
        geo.start(c)..geo.end(c)
    }

    /// The key of everything that holds this blob's verified bytes.
    pub fn key(&self) -> &BlobKey {
        &self.key
    }

    /// Check `data`, which starts at `offset` (a multiple of `table_chunk`), against the table.
    pub fn verify(&self, offset: u64, data: &[u8]) -> Result<(), RegistryError> {
        let first = offset / self.table_chunk;
        for (i, piece) in data.chunks(self.table_chunk as usize).enumerate() {
            self.check_chunk(first + i as u64, self.algorithm.hash(piece))?;
        }
        Ok(())
    }

    /// Check the digest `got` of table chunk `index` against the table.
    pub fn check_chunk(&self, index: u64, got: [u8; 32]) -> Result<(), RegistryError> {
        let want = usize::try_from(index)
            .ok()
            .and_then(|i| self.digests.get(i))
            .ok_or_else(|| RegistryError::DigestMismatch {
                what: format!("chunk {index} of {}", self.source.digest),
                expected: "a table entry".into(),
                got: "none".into(),
            })?;
        if &got != want {
            return Err(RegistryError::DigestMismatch {
                what: format!("chunk {index} of {}", self.source.digest),
                expected: hex::encode(want),
                got: hex::encode(got),
            });
        }
        Ok(())
    }
}

/// The blob engine.
pub struct Engine {
    registry: Arc<Registry>,
    cfg: EngineConfig,
    inflight: Arc<Inflight>,
    pool: Arc<pool::BufPool>,
    /// Bytes fetched ahead of readers that may wait to be let go (`gate`).
    ahead: Option<Arc<gate::Budget>>,
    slots: Arc<leaves::Slots>,
    /// When a reader of any blob last fetched (a miss, or read-ahead on its behalf).
    last_reader_fetch: std::sync::Mutex<std::time::Instant>,
    /// Counters for `status`.
    pub stats: EngineStats,
}

impl Engine {
    /// An engine fetching through `registry`.
    pub fn new(registry: Arc<Registry>, cfg: EngineConfig) -> Engine {
        Engine {
            registry,
            inflight: Arc::new(Inflight::new(cfg.completed_chunks_kept, cfg.failed_fetch_hold)),
            // enough idle buffers for the fetches one host runs at once (freed once idle)
            pool: pool::BufPool::new(cfg.max_concurrent_fetches),
            ahead: cfg.ahead_buffer_max.map(|b| gate::Budget::new(b.get())),
            cfg,
            slots: Arc::default(),
            last_reader_fetch: std::sync::Mutex::new(std::time::Instant::now()),
            stats: EngineStats::default(),
        }
    }

    /// A reader fetches now, of any blob (a miss, or read-ahead on its behalf): background
    /// fills, which run for nobody in particular, wait until this has been quiet a while
    /// (`last_reader_fetch`), so they never take a reader's bandwidth and CPU.
    pub fn reader_fetching(&self) {
        *crate::lock::lock(&self.last_reader_fetch) = std::time::Instant::now();
    }

    /// When a reader last fetched (see [`Engine::reader_fetching`]).
    pub fn last_reader_fetch(&self) -> &std::sync::Mutex<std::time::Instant> {
        &self.last_reader_fetch
    }

    /// The registry client.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Largest merged range request, in bytes.
    pub fn merge_max(&self) -> u64 {
        self.cfg.merge_max
    }

    /// `piece` is in its frontend's cache now (and marked there, so no reader asks for it
    /// again): the engine stops keeping its bytes among the recently completed units. Those
    /// are kept only for the readers that come between a fetch's end and this call, so the
    /// memory of fetched data is what is in flight or not stored yet, not a fixed number of
    /// chunks (`completed_chunks_kept` remains its bound).
    pub fn stored(&self, piece: &Piece) {
        piece.let_go();
        if let Some(key) = &piece.unit {
            self.inflight.lock().recent.pop(key);
        }
    }

    /// Whether table chunk `chunk` of `blob` is being fetched whole, or was just fetched and
    /// not yet stored: a read of it joins that fetch rather than reading its leaves.
    pub fn fetching(&self, blob: &DataBlob, chunk: u64) -> bool {
        let geo = ChunkGeometry::new(self.cfg.chunk_size, blob.table_chunk, blob.source.size);
        let unit = geo.chunks_for(chunk * blob.table_chunk, 1).start;
        let key = inflight::ChunkKey::new(blob.key(), unit);
        let st = self.inflight.lock();
        st.running.contains_key(&key) || st.recent.contains(&key)
    }

    /// Times a fetch made ahead of readers paused for want of room (`gate`), and of those
    /// the pauses that went on without it after `gate::PAUSE_MAX`.
    pub fn ahead_pauses(&self) -> (u64, u64) {
        self.ahead
            .as_ref()
            .map_or((0, 0), |b| (b.pauses.load(Relaxed), b.expired.load(Relaxed)))
    }

    /// Fetch units currently tracked by the in-flight LRU.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Verified chunks covering `[offset, offset + len)` of `blob` (clamped to its size), in
    /// order. The first piece may start before `offset`, the last may end after the range.
    pub async fn read(
        self: &Arc<Self>,
        blob: &Arc<DataBlob>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Piece>, EngineError> {
        let mut out = Vec::new();
        let mut first_err = None;
        for p in self.fetch(blob, offset, len, Need::Reader)? {
            match p.wait(self).await {
                Ok(piece) => out.push(piece),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Start fetching the units covering `[offset, offset + len)` of `blob` that are neither
    /// in flight nor recent, and return one [`Pending`] per unit, in order; each can be
    /// awaited as soon as its own bytes are verified. A fetch for a reader hurries the runs
    /// of the units it joins; one made ahead of readers is held to the budget (`gate`).
    pub fn fetch(
        self: &Arc<Self>,
        blob: &Arc<DataBlob>,
        offset: u64,
        len: u64,
        need: Need,
    ) -> Result<Vec<Pending>, EngineError> {
        self.fetch_to(blob, offset, len, need, None)
    }

    /// [`Engine::fetch`], and the runs it starts write each unit into `landing` as soon as it
    /// is verified (see `landing`); units it joins are landed by their own runs, or not.
    pub fn fetch_to(
        self: &Arc<Self>,
        blob: &Arc<DataBlob>,
        offset: u64,
        len: u64,
        need: Need,
        landing: Option<&Arc<dyn landing::Landing>>,
    ) -> Result<Vec<Pending>, EngineError> {
        let size = blob.source.size;
        if offset >= size || len == 0 {
            return Err(EngineError::OutOfRange {
                digest: blob.source.digest.clone(),
                offset,
                len,
                size,
            });
        }
        let geo = ChunkGeometry::new(self.cfg.chunk_size, blob.table_chunk, size);
        let wanted = geo.chunks_for(offset, len);
        let first = wanted.start;
        let mut st = self.inflight.lock();
        let mut slots: Vec<(ChunkKey, Option<Unit>)> = Vec::with_capacity(wanted.clone().count());
        let mut missing = Vec::new();
        for idx in wanted {
            let key = ChunkKey::new(blob.key(), idx);
            let unit = if let Some(data) = st.recent.get(&key) {
                Some(Unit::Ready(data.clone()))
            } else if let Some(e) = st.recent_failure(&key) {
                Some(Unit::Failed(e))
            } else {
                st.running.get(&key).map(|f| {
                    if need == Need::Reader {
                        f.run.hurry(idx);
                    }
                    Unit::Fetch(f.fut.clone(), Arc::clone(&f.run))
                })
            };
            if matches!(unit, Some(Unit::Ready(_) | Unit::Fetch(..))) {
                self.stats.shared_hits.fetch_add(1, Relaxed);
            } else if unit.is_none() {
                missing.push(idx);
            }
            slots.push((key, unit));
        }
        for run in plan_runs(&missing, &geo, self.cfg.merge_max) {
            let gate = gate::RunGate::new(need);
            let futs = self.start_run(blob, &geo, run.clone(), &gate, landing.cloned());
            for (idx, f) in run.zip(futs) {
                if let Some((key, unit)) = slots.get_mut((idx - first) as usize) {
                    let run = Arc::clone(&gate);
                    st.running.insert(key.clone(), Fetching { fut: f.clone(), run });
                    *unit = Some(Unit::Fetch(f, Arc::clone(&gate)));
                }
            }
        }
        slots
            .into_iter()
            .zip(first..)
            .map(|((key, unit), idx)| {
                let unit = unit
                    .ok_or_else(|| EngineError::Task(format!("chunk {idx} of {} has no fetch", blob.source.digest)))?;
                Ok(Pending {
                    offset: geo.start(idx),
                    end: geo.end(idx),
                    key,
                    unit,
                })
            })
            .collect()
    }

    /// Start one range request for the units of `run` on its own task (so it finishes even
    /// if the reader that started it goes away) and return one shared future per unit, each
    /// resolved as soon as that unit is verified.
    fn start_run(
        self: &Arc<Self>,
        blob: &Arc<DataBlob>,
        geo: &ChunkGeometry,
        run: std::ops::Range<u64>,
        gate: &Arc<gate::RunGate>,
        landing: Option<Arc<dyn landing::Landing>>,
    ) -> Vec<ChunkFuture> {
        let start = geo.start(run.start);
        let end = geo.end(run.end - 1);
        self.stats.runs.fetch_add(1, Relaxed);
        self.stats.chunks_fetched.fetch_add(run.end - run.start, Relaxed);
        self.stats.fetched(blob.key(), end - start);
        let (senders, receivers): (Vec<_>, Vec<_>) = run.clone().map(|_| oneshot::channel()).unzip();
        let parts = (
            Arc::clone(blob),
            *geo,
            senders,
            gate::Share::new(self.ahead.as_ref(), gate),
        );
        let engine = Arc::clone(self);
        let src = blob.source.clone();
        let span = tracing::debug_span!("fetch", blob = %blob.source.digest, start, len = end - start);
        let first = run.start;
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                // made in the task: a sink dropped settles its units, which takes the lock
                // `fetch` holds while it spawns this (a task dropped unpolled drops only parts)
                let (blob, geo, senders, share) = parts;
                let (pool, inflight) = (Arc::clone(&engine.pool), Arc::clone(&engine.inflight));
                let landing = landing.map(|to| (to, Arc::clone(&engine.slots)));
                let sink = RunSink::new(blob, geo, first, senders, pool, share, inflight).landing_in(landing);
                let sink = std::sync::Mutex::new(sink);
                let t0 = std::time::Instant::now();
                let r = engine.registry.fetch_range_into(&src, end, &sink).await;
                tracing::debug!(elapsed = ?t0.elapsed(), ok = r.is_ok(), "range fetched");
                if let Err(e) = r {
                    crate::lock::lock(&sink).fail(&EngineError::from(e));
                }
            },
            span,
        ));
        receivers
            .into_iter()
            .map(|rx| {
                async move {
                    match rx.await {
                        Ok(r) => r,
                        Err(_) => Err(EngineError::Task("fetch task ended without a result".into())),
                    }
                }
                .boxed()
                .shared()
            })
            .collect()
    }
}
