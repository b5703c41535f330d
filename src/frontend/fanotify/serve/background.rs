//! The background fill: once a blob in use has been quiet (no reader event, miss or hit) for
//! `fill_after`, and no reader of any blob has fetched for as long, what it still misses is
//! fetched one merged run at a time, one blob at a time daemon-wide, pausing whenever a
//! reader comes back; when it is complete its events stop.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tracing::Instrument;

use super::blob::CachedBlob;
use super::FanotifyFrontend;
use crate::lock::lock;

impl FanotifyFrontend {
    /// Once a blob in use has been quiet for `fill_after`, fetch what it still misses, one
    /// merged run at a time, pausing whenever a reader comes back; when it is complete its
    /// events stop, so reads of it cost what a local file costs.
    pub(super) fn start_background_fill(self: &Arc<Self>, cached: &Arc<CachedBlob>) {
        let Some(quiet) = self.fill_after else {
            return;
        };
        if cached.complete.load(Relaxed) || cached.filling.swap(true, Relaxed) {
            return;
        }
        let (me, cached) = (Arc::clone(self), Arc::clone(cached));
        let span = tracing::info_span!("background_fill", blob = %cached.blob.source.digest);
        tokio::spawn(
            async move {
                let unit = cached.blob.table_chunk;
                let per_run = (me.engine.merge_max() / unit).max(1);
                let n_chunks = cached.n_chunks();
                let (mut failures, mut cursor) = (0u32, 0u64);
                loop {
                    crate::frontend::until_quiet(&[&cached.last_read, me.engine.last_reader_fetch()], quiet).await;
                    let Ok(slot) = me.fill_slot.acquire().await else {
                        break;
                    };
                    let Some(via) = lock(&cached.writer).clone() else {
                        break;
                    };
                    let run = match me.next_missing_run(&cached, &via, cursor..n_chunks, per_run) {
                        Ok(Some(run)) => run,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "background fill: cache file unreadable");
                            break;
                        }
                    };
                    cursor = run.end;
                    let (s, e) = (run.start * unit, (run.end * unit).min(cached.blob.source.size));
                    let fetched = me.fetch_and_store(&cached, s, e, via, super::demand::For::Ahead(|s| &s.chunks_background)).await;
                    drop(slot); // not held while backing off: other blobs may fill meanwhile
                    match fetched {
                        // (counted as chunks_background as they are written)
                        Ok(_) => failures = 0,
                        Err(err) => {
                            failures += 1;
                            cursor = run.start;
                            tracing::warn!(error = %err, failures, "background fill failed; readers still fetch on demand");
                            if failures >= 5 {
                                break;
                            }
                            tokio::time::sleep(quiet * failures).await;
                        }
                    }
                }
                me.unmark_if_complete(&cached);
                cached.filling.store(false, Relaxed);
            }
            .instrument(span),
        );
    }

    /// The first run of at most `per_run` chunks in `within` that are neither verified nor on
    /// disk from an earlier run (`via`: the blob's writer, which raises no events).
    pub(super) fn next_missing_run(
        &self,
        cached: &CachedBlob,
        via: &std::fs::File,
        within: std::ops::Range<u64>,
        per_run: u64,
    ) -> std::io::Result<Option<std::ops::Range<u64>>> {
        crate::engine::chunks::first_missing_run(within, per_run, |c| self.present(cached, via, c))
    }
}
