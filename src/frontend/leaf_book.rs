//! What one blob's random readers got by their leaves (format 3), for either frontend: the
//! leaves written in this run into chunks not fetched whole, and the chunks whose leaf read
//! is under way. A miss is served by its leaves only while fewer than a quarter of its
//! chunk's leaves would be here with its own (a reader that keeps coming back to a chunk
//! reads around, and one request for the chunk costs less than many for its leaves) and no
//! leaf read of the chunk is under way. What a concurrent miss does is the frontend's: the
//! fanotify one fetches the chunk whole (once for every such reader, through the engine's
//! single flight), the cachefiles one waits for that read ([`LeafBook::wait_for`]) and then
//! reads the rest of the chunk's leaves, so no byte comes twice.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use crate::engine::leaves::LeafSpan;
use crate::engine::DataBlob;
use crate::lock::lock;

/// Runs of missing leaves read side by side for the rest of a chunk; of a chunk with more,
/// the runs with the fewest leaves between them are read as one (those leaves come twice).
const REST_RUNS_MAX: usize = 8;

/// The leaves of one blob's chunks written in this run, and the leaf reads under way.
#[derive(Debug, Default)]
pub struct LeafBook {
    /// The leaves written.
    written: Mutex<Written>,
    /// Chunks whose leaves a reader is reading now, each with what wakes those waiting for
    /// that read to end.
    reading: Mutex<HashMap<u64, Arc<Notify>>>,
}

/// The leaves written: each of a chunk some of whose leaves are here, and the chunks all of
/// whose leaves are (one entry each: a blob whose chunks all came by leaves keeps a few bytes
/// per chunk, not 64 entries).
#[derive(Debug, Default)]
struct Written {
    /// (chunk, leaf) of every leaf written into a chunk not complete.
    leaves: BTreeSet<(u64, u64)>,
    /// Chunks all of whose leaves were written.
    complete: HashSet<u64>,
}

impl Written {
    fn has(&self, chunk: u64, leaf: u64) -> bool {
        self.complete.contains(&chunk) || self.leaves.contains(&(chunk, leaf))
    }

    /// The leaves written into `chunk`, in order (none if it is complete).
    fn of(&self, chunk: u64) -> impl Iterator<Item = u64> + '_ {
        self.leaves.range((chunk, 0)..(chunk + 1, 0)).map(|&(_, l)| l)
    }
}

/// A chunk taken for one leaf read; released when dropped, whatever the read's outcome.
#[derive(Debug)]
pub struct LeafRead<'a> {
    book: &'a LeafBook,
    chunk: u64,
}

impl Drop for LeafRead<'_> {
    fn drop(&mut self) {
        if let Some(ended) = lock(&self.book.reading).remove(&self.chunk) {
            ended.notify_waiters();
        }
    }
}

impl LeafBook {
    /// Whether every leaf of `span` was written in this run.
    pub fn has(&self, span: LeafSpan) -> bool {
        let w = lock(&self.written);
        (span.first..span.end).all(|l| w.has(span.chunk, l))
    }

    /// The leaves of `span` not written: from its first missing leaf to its last (`None`: all
    /// written).
    pub fn unwritten(&self, span: LeafSpan) -> Option<std::ops::Range<u64>> {
        let w = lock(&self.written);
        let mut missing = (span.first..span.end).filter(|&l| !w.has(span.chunk, l));
        let first = missing.next()?;
        Some(first..missing.next_back().unwrap_or(first) + 1)
    }

    /// Take `span`'s chunk for a leaf read if that is how its miss is served: fewer than a
    /// quarter of the chunk's `per_chunk` leaves here with these, and no leaf read of the
    /// chunk under way. `None`: fetch the chunk whole.
    pub fn take(&self, span: LeafSpan, per_chunk: u64) -> Option<LeafRead<'_>> {
        let here = {
            let w = lock(&self.written);
            if w.complete.contains(&span.chunk) {
                per_chunk
            } else {
                w.of(span.chunk).count() as u64
            }
        };
        if (here + span.end - span.first) * 4 > per_chunk {
            return None;
        }
        // (a guard is made only once taken: dropping one releases the chunk)
        self.take_chunk(span.chunk)
    }

    /// The runs of leaves of `chunk` (of `per_chunk`) not written, in order (none of a
    /// complete chunk); `None` if none of its leaves was written.
    pub fn missing(&self, chunk: u64, per_chunk: u64) -> Option<Vec<std::ops::Range<u64>>> {
        let w = lock(&self.written);
        if w.complete.contains(&chunk) {
            return Some(Vec::new());
        }
        let here: Vec<u64> = w.of(chunk).collect();
        if here.is_empty() {
            return None;
        }
        let mut runs = Vec::new();
        let mut from = 0;
        for l in here.into_iter().chain([per_chunk]) {
            if l > from {
                runs.push(from..l.min(per_chunk));
            }
            from = l + 1;
        }
        Some(runs)
    }

    /// The rest of chunk `c` of `blob` by leaves, one request a span: its runs of missing
    /// leaves, at most [`REST_RUNS_MAX`] ([`fewest_runs`]). `None` if none of its leaves was
    /// written, or none is missing.
    pub fn rest(&self, blob: &DataBlob, c: u64) -> Option<Vec<LeafSpan>> {
        let runs = self.missing(c, blob.leaves_in(c))?;
        if runs.is_empty() {
            return None;
        }
        let runs = fewest_runs(runs, REST_RUNS_MAX);
        runs.into_iter().map(|r| blob.chunk_leaves(c, r)).collect()
    }

    /// Take `chunk` for a read of the rest of its leaves, if no leaf read of it is under way.
    pub fn take_chunk(&self, chunk: u64) -> Option<LeafRead<'_>> {
        let mut reading = lock(&self.reading);
        if reading.contains_key(&chunk) {
            return None;
        }
        reading.insert(chunk, Arc::new(Notify::new()));
        Some(LeafRead { book: self, chunk })
    }

    /// Whether some leaf of `chunk` was written.
    pub fn any_written(&self, chunk: u64) -> bool {
        let w = lock(&self.written);
        w.complete.contains(&chunk) || w.of(chunk).next().is_some()
    }

    /// Whether a leaf read of `chunk` is under way.
    pub fn reading(&self, chunk: u64) -> bool {
        lock(&self.reading).contains_key(&chunk)
    }

    /// The end of the leaf read of `chunk` under way, if one is (it fires even if that read
    /// ends before it is first awaited).
    pub fn wait_for(&self, chunk: u64) -> Option<OwnedNotified> {
        lock(&self.reading).get(&chunk).map(|n| Arc::clone(n).notified_owned())
    }

    /// The leaves of `span` (of `blob`) are in the cache file. Once all of a chunk's are, it
    /// takes one entry, not one per leaf.
    pub fn written(&self, blob: &DataBlob, span: LeafSpan) {
        self.note(span, blob.leaves_in(span.chunk));
    }

    /// [`written`](Self::written), for a chunk of `per_chunk` leaves.
    fn note(&self, span: LeafSpan, per_chunk: u64) {
        let mut w = lock(&self.written);
        if w.complete.contains(&span.chunk) {
            return;
        }
        w.leaves.extend((span.first..span.end).map(|l| (span.chunk, l)));
        if w.of(span.chunk).count() as u64 >= per_chunk {
            let c = span.chunk;
            w.leaves.retain(|&(chunk, _)| chunk != c);
            w.complete.insert(c);
        }
    }
}

/// `runs` (in order, apart) as at most `max` runs: while there are more, the two with the
/// fewest leaves between them become one.
fn fewest_runs(mut runs: Vec<std::ops::Range<u64>>, max: usize) -> Vec<std::ops::Range<u64>> {
    while runs.len() > max.max(1) {
        let Some(i) = (0..runs.len() - 1).min_by_key(|&i| runs[i + 1].start - runs[i].end) else {
            break;
        };
        runs[i].end = runs[i + 1].end;
        runs.remove(i + 1);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(chunk: u64, first: u64, end: u64) -> LeafSpan {
        LeafSpan {
            chunk,
            first,
            end,
            start: 0,
            stop: 0,
        }
    }

    #[test]
    fn a_quarter_of_a_chunk_by_leaves_then_whole() {
        let book = LeafBook::default();
        // 64 leaves a chunk: up to 16 by leaves
        let first = book.take(span(3, 0, 8), 64).expect("a first leaf read");
        // a concurrent miss in the same chunk: whole; another chunk: its own leaves
        assert!(book.take(span(3, 20, 21), 64).is_none());
        assert!(book.take(span(4, 0, 1), 64).is_some());
        book.note(span(3, 0, 8), 64);
        drop(first);
        assert!(book.has(span(3, 2, 5)) && !book.has(span(3, 7, 9)));
        assert_eq!(book.unwritten(span(3, 6, 10)), Some(8..10));
        assert_eq!(book.unwritten(span(3, 2, 5)), None);
        // 8 here + 8 more = a quarter: still leaves; then 16 + 1 is past it
        let second = book.take(span(3, 8, 16), 64).expect("up to a quarter");
        book.note(span(3, 8, 16), 64);
        drop(second);
        assert!(book.take(span(3, 40, 41), 64).is_none());
        assert!(book.take(span(5, 0, 17), 64).is_none(), "one read past a quarter");
        // the rest of chunk 3: leaves 16..64; of a chunk with leaves here and there, the
        // runs between them; none of a chunk without any, nothing of a chunk all here
        assert_eq!(book.missing(3, 64), Some(std::iter::once(16..64).collect::<Vec<_>>()));
        book.note(span(7, 0, 2), 64);
        book.note(span(7, 5, 6), 64);
        book.note(span(7, 60, 64), 64);
        assert_eq!(book.missing(7, 64), Some(vec![2..5, 6..60]));
        assert_eq!(book.missing(9, 64), None);
        assert!(book.any_written(7) && !book.any_written(9) && !book.any_written(8));
        book.note(span(9, 0, 64), 64);
        assert_eq!(book.missing(9, 64), Some(vec![]), "all here");
        // a complete chunk is one entry, and still answers as all here
        {
            let w = lock(&book.written);
            assert!(w.complete.contains(&9) && w.of(9).next().is_none());
        }
        assert!(book.has(span(9, 3, 5)) && book.any_written(9));
        assert_eq!(book.unwritten(span(9, 0, 64)), None);
        assert!(book.take(span(9, 0, 1), 64).is_none());
        book.note(span(9, 0, 2), 64);
        assert!(
            lock(&book.written).of(9).next().is_none(),
            "noted again: still one entry"
        );
        let t = book.take_chunk(7).expect("not being read");
        assert!(book.take_chunk(7).is_none());
        let ended = book.wait_for(7).expect("a read under way");
        assert!(book.wait_for(8).is_none());
        drop(t);
        // the read ended before its waiter first polled: it still wakes
        block_on_within_5s(ended);
        assert!(book.take_chunk(7).is_some());
    }

    #[test]
    fn the_rest_in_at_most_max_runs_with_the_fewest_leaves_twice() {
        let runs = vec![0..2, 3..5, 9..12, 13..20, 30..31];
        assert_eq!(fewest_runs(runs.clone(), 8), runs);
        // the gaps are 1, 4, 1, 10 leaves: the two 1-leaf gaps go first, then the 4-leaf one
        assert_eq!(fewest_runs(runs.clone(), 3), vec![0..5, 9..20, 30..31]);
        assert_eq!(fewest_runs(runs.clone(), 2), vec![0..20, 30..31]);
        assert_eq!(fewest_runs(runs, 1), vec![0..31]);
    }

    fn block_on_within_5s(f: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), f)
                .await
                .expect("woken")
        });
    }
}
