//! Background fill (cachefiles): once an object's readers have been quiet for `fill_after`
//! (a READ of it is what the daemon sees of them), the rest of its blob is fetched one merged
//! run at a time, daemon-wide one request at a time, and written through the object's
//! anonymous fd; a reader that comes back pauses it, and a CLOSE of the object ends it. The
//! kernel then never asks for the blob again.

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use super::ahead::in_cache;
use super::serve::{Cachefiles, Object};
use crate::catalog::Target;
use crate::engine::chunks::first_missing_run;
use crate::frontend::until_quiet;
use crate::lock::lock;

/// Failed runs in a row after which a fill gives up (readers still fetch on demand).
const MAX_FAILURES: u32 = 5;

impl Cachefiles {
    /// A READ of `obj`: its readers are active now; once they are quiet, fill the rest.
    pub(super) fn start_fill(self: &Arc<Self>, obj: &Arc<Object>) {
        let Some(quiet) = self.fill_after else {
            return;
        };
        let Target::Data(_, blob) = &obj.target else {
            return;
        };
        *lock(&obj.last_read) = Instant::now();
        // a READ is a miss: the fills of every object wait for it
        self.engine.reader_fetching();
        if obj.filling.swap(true, Relaxed) {
            return;
        }
        let (me, obj, blob) = (Arc::clone(self), Arc::clone(obj), Arc::clone(blob));
        let span = tracing::info_span!("background_fill", object = %obj.name);
        tokio::spawn(
            async move {
                let unit = blob.table_chunk;
                let (n_chunks, per_run) = (blob.source.size.div_ceil(unit), (me.engine.merge_max() / unit).max(1));
                let (mut cursor, mut failures) = (0u64, 0u32);
                loop {
                    until_quiet(&[&obj.last_read, me.engine.last_reader_fetch()], quiet).await;
                    if !me.is_open(&obj) {
                        break;
                    }
                    let Ok(_slot) = me.fill_slot.acquire().await else {
                        break;
                    };
                    // the next run of chunks not in the cache file
                    let next = first_missing_run(cursor..n_chunks, per_run, |c| {
                        Ok::<bool, std::convert::Infallible>(in_cache(&obj, &blob, c))
                    });
                    let Ok(Some(run)) = next else {
                        break;
                    };
                    let written = me.write_runs(&obj, &blob, std::slice::from_ref(&run), |s| &s.units_background);
                    if written.await.is_some() {
                        cursor = run.end;
                        failures = 0;
                    } else {
                        failures += 1;
                        tracing::warn!(failures, "background fill run failed; readers still fetch on demand");
                        if failures >= MAX_FAILURES {
                            break;
                        }
                        tokio::time::sleep(quiet * failures).await;
                    }
                }
                obj.filling.store(false, Relaxed);
            }
            .instrument(span),
        );
    }

    /// Whether the kernel still has `obj` open (no CLOSE yet).
    fn is_open(&self, obj: &Arc<Object>) -> bool {
        lock(&self.objects).values().any(|o| Arc::ptr_eq(o, obj))
    }
}
