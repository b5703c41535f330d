//! Read-ahead for the cachefiles frontend. The kernel asks only for ranges missing from its
//! cache file and reads what is there without asking, so READs are the misses of the shared
//! read-ahead state machine (`frontend::readahead`): a READ right behind the previous one
//! opens a window, whose chunks are fetched in merged runs and written through the object's
//! anonymous fd before the reader gets there. The kernel then never asks for them. Best
//! effort: a unit that fails is left to a reader's own READ, which fetches it again.

#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::device::{AlignedBuf, DIO_ALIGN};
use super::serve::{Cachefiles, Object};
use crate::catalog::Target;
use crate::engine::chunks::consecutive;
use crate::engine::{DataBlob, Pending};
use crate::lock::lock;

impl Cachefiles {
    /// A READ of table chunks `first..=last` of `obj`: a sequential reader's next window is
    /// fetched and written ahead of it (chunks already in the cache file or being written are
    /// skipped).
    pub(super) fn read_ahead(self: &Arc<Self>, obj: &Arc<Object>, first: u64, last: u64) {
        let Target::Data(_, blob) = &obj.target else {
            return;
        };
        let Some(window) = lock(&obj.ahead).on_miss(first, last) else {
            return;
        };
        let unit = blob.table_chunk;
        let todo: Vec<u64> = (window.start..window.end.min(blob.source.size.div_ceil(unit)))
            .filter(|&c| !in_cache(obj, blob, c))
            .filter(|&c| lock(&obj.writing).insert(c))
            .collect();
        for run in consecutive(&todo, u64::MAX) {
            let (s, e) = (run.start * unit, (run.end * unit).min(blob.source.size));
            match self.engine.fetch(blob, s, e - s) {
                Ok(pending) => {
                    // each unit ends where the next begins (the last at the run's end)
                    let ends: Vec<u64> = pending.iter().skip(1).map(|p| p.offset).chain([e]).collect();
                    for (p, end) in pending.into_iter().zip(ends) {
                        let (me, obj) = (Arc::clone(self), Arc::clone(obj));
                        tokio::spawn(async move { me.write_ahead(&obj, p, end).await });
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, object = %obj.name, "read-ahead not started");
                    let mut writing = lock(&obj.writing);
                    run.for_each(|c| {
                        writing.remove(&c);
                    });
                }
            }
        }
    }

    /// Wait for one fetched unit (`[p.offset, end)`) and write it into the cache file (padded
    /// with zeros to the direct-I/O alignment at the blob's end, as a READ of the last chunk
    /// is); its chunks are no longer being written, whatever the outcome.
    async fn write_ahead(self: &Arc<Self>, obj: &Arc<Object>, p: Pending, end: u64) {
        let offset = p.offset;
        let written = match p.wait(&self.engine).await {
            Ok(piece) => {
                let o = Arc::clone(obj);
                tokio::task::spawn_blocking(move || -> io::Result<u64> {
                    let len = piece.data.len();
                    let mut buf = AlignedBuf::zeroed(len.div_ceil(DIO_ALIGN) * DIO_ALIGN)?;
                    buf.as_mut_slice()[..len].copy_from_slice(&piece.data);
                    o.fd.write_all_at(&buf, piece.offset)?;
                    Ok(len as u64)
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
            }
            Err(e) => Err(io::Error::other(e)),
        };
        if let Target::Data(_, blob) = &obj.target {
            let unit = blob.table_chunk;
            let mut writing = lock(&obj.writing);
            for c in offset / unit..end.div_ceil(unit) {
                writing.remove(&c);
            }
        }
        match written {
            Ok(n) => {
                self.stats.units_ahead.fetch_add(1, Relaxed);
                self.stats.bytes_written.fetch_add(n, Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, object = %obj.name, offset, "read-ahead unit not written"),
        }
    }
}

/// Whether table chunk `c` of `blob` is in the object's cache file already (asked through
/// the anonymous fd, which seeks in the cache file; an error counts as not there).
fn in_cache(obj: &Object, blob: &DataBlob, c: u64) -> bool {
    let unit = blob.table_chunk;
    let (s, e) = (c * unit, ((c + 1) * unit).min(blob.source.size));
    crate::frontend::fanotify::cache::is_data(&obj.fd, s, e).unwrap_or(false)
}
