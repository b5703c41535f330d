//! Where a run writes its units itself: a frontend that hands the engine a [`Landing`] with a
//! fetch has each unit written into its cache by the run, the moment the unit is verified,
//! before its waiters hear of it. The run's buffer then goes straight back to the pool, so a
//! sequential reader holds one unit per run in memory instead of every unit its waiters have
//! not written yet, and the unit needs no trip to another task to be stored. Only verified
//! bytes are ever landed.

use std::io;

use tokio::runtime::{Handle, RuntimeFlavor};

/// A frontend's cache for one blob, written by runs.
pub trait Landing: Send + Sync {
    /// Write verified unit bytes `data` at blob offset `at` and record them as cached (a
    /// unit cached already is left as it is). Called on the run's task, so it may block for
    /// as long as a page-cache write takes.
    fn land(&self, at: u64, data: &[u8]) -> io::Result<()>;
}

/// Land `data` at `at` from a run's task: on a multi-threaded runtime the worker's other tasks
/// move to another thread while the write blocks. Whether the unit is in the cache now.
pub fn land(to: &dyn Landing, at: u64, data: &[u8]) -> bool {
    let write = || to.land(at, data);
    let r = match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(write),
        _ => write(),
    };
    match r {
        Ok(()) => true,
        Err(e) => {
            // its waiters get the bytes and write them themselves
            tracing::debug!(error = %e, at, "a run could not land its unit");
            false
        }
    }
}
