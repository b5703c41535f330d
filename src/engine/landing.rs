//! Where a run writes its units itself: a frontend that hands the engine a [`Landing`] with a
//! fetch has each unit written into its cache by the run, the moment the unit is verified,
//! before its waiters hear of it. The run's buffer then goes straight back to the pool, so a
//! sequential reader holds one unit per run in memory instead of every unit its waiters have
//! not written yet, and the unit needs no trip to another task to be stored. Where the leaves
//! of a unit's chunks are at hand (format 3), the run writes it piece by piece as each piece
//! is verified and holds one piece, not the unit (`pieces`). Only verified bytes are ever
//! written.

use std::io;

use tokio::runtime::{Handle, RuntimeFlavor};

/// A frontend's cache for one blob, written by runs.
pub trait Landing: Send + Sync {
    /// Write verified unit bytes `data` at blob offset `at` and record them as cached (a
    /// unit cached already is left as it is). Called on the run's task, so it may block for
    /// as long as a page-cache write takes.
    fn land(&self, at: u64, data: &[u8]) -> io::Result<()>;

    /// Write verified bytes `data` of a unit not complete yet at blob offset `at`, recording
    /// nothing: readers of the unit still wait for its run.
    fn place(&self, at: u64, data: &[u8]) -> io::Result<()>;

    /// The unit `[at, at + len)` has been placed whole: record it as cached.
    fn seal(&self, at: u64, len: u64) -> io::Result<()>;
}

/// Run `write` (a call on a [`Landing`]) from a run's task: on a multi-threaded runtime the
/// worker's other tasks move to another thread while the write blocks.
pub fn blocking<T>(write: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(write),
        _ => write(),
    }
}

/// Land `data` at `at` from a run's task. Whether the unit is in the cache now.
pub fn land(to: &dyn Landing, at: u64, data: &[u8]) -> bool {
    match blocking(|| to.land(at, data)) {
        Ok(()) => true,
        Err(e) => {
            // its waiters get the bytes and write them themselves
            tracing::debug!(error = %e, at, "a run could not land its unit");
            false
        }
    }
}
