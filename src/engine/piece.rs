//! What a fetch hands its caller: one [`Pending`] unit per fetch unit of the range, which
//! yields a [`Piece`] once verified, whose [`Body`] is the bytes or, for a unit its run wrote
//! into the caller's cache piece by piece, only their length.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;

use super::inflight::{ChunkFuture, ChunkKey};
use super::{gate, Engine, EngineError};

/// A unit's verified bytes as its readers get them.
#[derive(Debug, Clone)]
pub enum Body {
    /// At hand.
    Bytes(Bytes),
    /// This many, written into the landing of the fetch that started the unit's run and
    /// recorded there as cached, piece by piece as they were verified (see `pieces`): in the
    /// frontend's cache, not in memory.
    Landed(u64),
}

impl Body {
    /// Bytes in the unit.
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::Landed(n) => *n,
        }
    }

    /// Whether the unit has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, if they are at hand.
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            Body::Bytes(b) => Some(b),
            Body::Landed(_) => None,
        }
    }
}

/// One piece of a served range: the chunk starting at `offset`.
#[derive(Debug, Clone)]
pub struct Piece {
    /// Blob offset of the first byte.
    pub offset: u64,
    /// Its verified bytes.
    pub body: Body,
    /// The engine's unit this piece is, kept among the recently completed ones until its
    /// reader reports it stored ([`Engine::stored`]); `None` for a read of some leaves.
    pub(super) unit: Option<ChunkKey>,
    /// The unit's share of the budget of bytes fetched ahead, if it holds one (`gate`).
    pub(super) lease: Option<Arc<gate::Lease>>,
}

impl Piece {
    /// The verified bytes. A unit its run wrote piece by piece into the landing of the
    /// fetch that started it has none in memory: an error for anyone who needs them (that
    /// landing's frontend finds them in its cache instead).
    pub fn bytes(&self) -> Result<&Bytes, EngineError> {
        self.body.bytes().ok_or_else(|| {
            EngineError::Task(format!(
                "the {} bytes at {} were written into another fetch's cache",
                self.body.len(),
                self.offset
            ))
        })
    }

    /// The piece is written into its cache, or will not be (the write failed): a share of
    /// the budget it holds is free again, whoever still keeps the bytes.
    pub fn let_go(&self) {
        if let Some(l) = &self.lease {
            l.let_go();
        }
    }
}

/// A unit being fetched (or just fetched) for a reader; [`Pending::wait`] yields it verified.
/// One that will not be waited for after all is simply dropped: its run settles the unit in
/// the engine either way, and a share of the budget it holds goes with the last handle.
pub struct Pending {
    /// Blob offset of the unit.
    pub offset: u64,
    /// Blob offset where it ends.
    pub end: u64,
    pub(super) key: ChunkKey,
    pub(super) unit: Unit,
}

/// Where a pending unit's bytes come from.
pub(super) enum Unit {
    /// Recently completed: at hand (its share of the budget, if any, stays with its run's
    /// own waiters).
    Ready(Bytes),
    /// A fetch in flight, shared with every other reader of the unit, by this run.
    Fetch(ChunkFuture, Arc<gate::RunGate>),
    /// A fetch of the unit failed a moment ago (see [`inflight`]).
    Failed(EngineError),
}

impl Pending {
    /// The verified unit. A failed fetch is held briefly, then the next read tries again.
    pub async fn wait(self, engine: &Engine) -> Result<Piece, EngineError> {
        let (offset, key) = (self.offset, self.key.clone());
        let data = self.resolve().await.inspect_err(|_| {
            engine.stats.failed_reads.fetch_add(1, Relaxed);
        })?;
        engine.stats.served(key.blob(), data.body.len());
        Ok(Piece {
            offset,
            body: data.body,
            unit: Some(key),
            lease: data.lease,
        })
    }

    /// The unit's outcome (its run has moved it out of the running ones by then).
    async fn resolve(self) -> Result<gate::Delivered, EngineError> {
        match self.unit {
            Unit::Ready(data) => Ok(gate::Delivered {
                body: Body::Bytes(data),
                lease: None,
            }),
            Unit::Failed(e) => Err(e),
            Unit::Fetch(f, _) => f.await,
        }
    }

    /// Wait until the unit's bytes before blob offset `to` are written into the landing of
    /// the run fetching it (true: a frontend whose cache that landing writes finds them
    /// there, verified, before the rest of the unit is; the unit counts as served, as if
    /// waited for), or until the unit is settled without that (false: [`Pending::wait`] says
    /// how it ended).
    pub async fn placed_to(&self, engine: &Engine, to: u64) -> bool {
        let Unit::Fetch(unit, run) = &self.unit else {
            return false;
        };
        let placed = tokio::select! {
            biased;
            () = run.placed_to(to) => true,
            _ = unit.clone() => false,
        };
        if placed {
            engine.stats.served(self.key.blob(), self.end - self.offset);
        }
        placed
    }
}
