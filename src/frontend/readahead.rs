//! Read-ahead of one blob's sequential readers, in chunks, as a pure state machine: a miss
//! right behind the previous one opens a window that doubles up to the maximum, reaching
//! at most a quarter as far past the reader as its run has read (a reader that stops leaves
//! little fetched and unread); a reader that finds its chunks cached past the middle of the
//! window moves it on. A hit anywhere else (data cached long ago, read again after the page
//! cache dropped it) closes the window: re-reading cached data never fetches. What to fetch
//! is returned; the frontend fetches it (fanotify: `serve/prefetch`; cachefiles, which sees
//! only misses, since the kernel reads what is in its cache file without asking:
//! `cachefiles/ahead`).

use std::num::NonZeroU64;
use std::ops::Range;

/// Read-ahead state of one blob.
#[derive(Debug)]
pub struct ReadAhead {
    /// Largest window in chunks (0: read-ahead off).
    max_window: u64,
    /// The last chunk a reader missed.
    last_miss: Option<u64>,
    /// The current window (0: the reader is not sequential).
    window: u64,
    /// The first chunk of the current sequential run: what is fetched ahead stays within
    /// a quarter of what the run has read.
    run_start: u64,
    /// The first chunk of the window scheduled last.
    scheduled: u64,
    /// The chunk the scheduled read-ahead reaches (exclusive).
    until: u64,
}

impl ReadAhead {
    /// Read-ahead with windows up to `max_window` chunks (0: none).
    pub fn new(max_window: u64) -> ReadAhead {
        ReadAhead {
            max_window,
            last_miss: None,
            window: 0,
            run_start: 0,
            scheduled: 0,
            until: 0,
        }
    }

    /// Read-ahead in chunks of `chunk` bytes with windows up to `max_bytes` (at least 2
    /// chunks; `None`: read-ahead off).
    pub fn of_bytes(max_bytes: Option<NonZeroU64>, chunk: u64) -> ReadAhead {
        ReadAhead::new(max_bytes.map_or(0, |max| (max.get() / chunk).max(2)))
    }

    /// Whether a miss starting at chunk `first` continues a sequential reader: forward,
    /// right behind the last miss or inside the open window scheduled after it (a jump back
    /// is a random reader, not a sequential one; a closed window reaches nowhere).
    pub fn continues(&self, first: u64) -> bool {
        let reach = |l: u64| if self.window > 0 { l.max(self.until) } else { l };
        self.max_window > 0 && self.last_miss.is_some_and(|l| first > l && first <= reach(l) + 1)
    }

    /// The first chunk of the sequential run a reader is in, while its window is open.
    pub fn sequential_since(&self) -> Option<u64> {
        (self.window > 0).then_some(self.run_start)
    }

    /// A reader missed chunks `first..=last`: the chunks to fetch ahead of it, if it reads
    /// sequentially (its miss starts right behind the previous miss or the window).
    pub fn on_miss(&mut self, first: u64, last: u64) -> Option<Range<u64>> {
        if self.max_window == 0 {
            return None;
        }
        let sequential = self.continues(first);
        if !sequential {
            self.run_start = first;
        }
        self.window = if sequential {
            (self.window * 2).clamp(2, self.max_window).min(self.budget(last))
        } else {
            0
        };
        self.last_miss = Some(last);
        if self.window == 0 {
            return None;
        }
        self.scheduled = last + 1;
        self.until = last + 1 + self.window;
        Some(last + 1..self.until)
    }

    /// A reader found its chunks up to `last` cached: the next window, once it has passed
    /// the middle of the current one, so a sequential reader never waits for a cold chunk.
    /// Only a reader inside (or just past) the window scheduled last moves it; a hit further
    /// on is some other read of cached data (a re-read after the page cache dropped it): the
    /// window closes, and nothing is fetched.
    pub fn on_hit(&mut self, last: u64) -> Option<Range<u64>> {
        if self.window == 0 {
            return None;
        }
        // past the window by more than what it scheduled (at least 2 chunks): another read
        // of cached data elsewhere (a window grown larger than its budget let it schedule
        // reaches no further)
        if last >= self.until + (self.until - self.scheduled).max(2) {
            self.window = 0;
            return None;
        }
        if last < self.scheduled || last + self.window / 2 < self.until {
            return None;
        }
        // what is scheduled past the reader stays within what its run has read; a reader
        // that got ahead of the window (its own misses fetched the chunks) is followed
        self.window = (self.window * 2).min(self.max_window);
        let from = self.until.max(last + 1);
        let ahead = from - (last + 1);
        let next = self.window.min(self.budget(last).saturating_sub(ahead));
        if next == 0 {
            return None;
        }
        self.scheduled = from;
        self.until = from + next;
        Some(from..self.until)
    }

    /// How far past the reader the read-ahead may reach: a quarter of what the current
    /// sequential run has read up to `last` (at least 2 chunks), so a reader that stops
    /// leaves at most a quarter as much fetched and unread as it read (a startup reading
    /// runs of small files ends many runs).
    fn budget(&self, last: u64) -> u64 {
        ((last + 1).saturating_sub(self.run_start) / 4).max(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_misses_fetch_nothing_ahead() {
        let mut r = ReadAhead::new(64);
        for c in [10, 500, 3, 77, 1000, 200, 199, 150] {
            assert_eq!(r.on_miss(c, c), None, "miss at {c}");
        }
        assert_eq!(r.on_hit(150), None);
    }

    /// A random reader after a sequential run: the run's window, once closed, makes none of
    /// its misses sequential, however many land below where the window reached.
    #[test]
    fn a_closed_window_reaches_nowhere() {
        let mut r = ReadAhead::new(64);
        for c in 0..60 {
            r.on_miss(c, c);
        }
        assert!(r.until > 60, "the run's window reaches chunk {}", r.until);
        for c in [5, 30, 12, 44, 20, 33, 9, 47] {
            assert_eq!(r.on_miss(c, c), None, "a random miss at {c} read ahead");
        }
        // right behind the last miss is still the start of a sequential reader
        assert_eq!(r.on_miss(48, 48), Some(49..51));
    }

    #[test]
    fn sequential_misses_grow_the_window_up_to_the_maximum() {
        let mut r = ReadAhead::new(8);
        assert_eq!(r.on_miss(0, 0), None, "chunk 0 alone says nothing");
        assert_eq!(r.on_miss(1, 1), Some(2..4));
        // a reader missing right after each window: windows grow with the run, to the maximum
        let mut sizes = Vec::new();
        let mut next = 4;
        for _ in 0..12 {
            let w = r.on_miss(next, next).unwrap();
            assert_eq!(w.start, next + 1);
            sizes.push(w.end - w.start);
            next = w.end;
        }
        assert!(sizes.windows(2).all(|p| p[0] <= p[1]), "{sizes:?}");
        assert_eq!(sizes.last(), Some(&8), "{sizes:?}");
    }

    #[test]
    fn hits_past_the_middle_move_the_window_on() {
        let mut r = ReadAhead::new(4);
        r.on_miss(0, 0);
        for c in 1..=40 {
            r.on_miss(c, c);
        }
        // a long run: the window is the maximum, 41..45
        assert_eq!(r.on_hit(42), None, "before the middle of 41..45");
        assert_eq!(r.on_hit(43), Some(45..49));
        assert_eq!(r.on_hit(44), None, "45..49 is scheduled");
        assert_eq!(r.on_hit(47), Some(49..53));
        // a jump elsewhere ends the sequence
        assert_eq!(r.on_miss(100, 100), None);
        assert_eq!(r.on_hit(101), None);
    }

    #[test]
    fn hits_outside_the_window_fetch_nothing_and_close_it() {
        let mut r = ReadAhead::new(4);
        r.on_miss(5, 5);
        assert_eq!(r.on_miss(6, 6), Some(7..9));
        assert_eq!(r.on_miss(9, 9), Some(10..12));
        // cached data far ahead read again (page cache dropped): no fetch, and no later
        // hit inside the old window reopens it
        assert_eq!(r.on_hit(500), None);
        assert_eq!(r.on_hit(11), None);
        assert_eq!(r.on_hit(10), None);
        // what the reader itself read, read again: nothing is fetched
        let mut r = ReadAhead::new(4);
        r.on_miss(0, 0);
        assert_eq!(r.on_miss(1, 1), Some(2..4));
        for c in [0, 1, 0, 1, 1] {
            assert_eq!(r.on_hit(c), None, "hit at {c}");
        }
        // the rest of the chunk it missed is still the sequential reader: the window stays
        assert_eq!(r.on_hit(2), None, "before the middle of 2..4");
        assert_eq!(r.on_hit(3), Some(4..6));
    }

    /// A run whose window grew while its budget kept what it scheduled short (16..17), then
    /// a re-read of cached data 31 chunks further on: the hit is not the reader, and the
    /// window closes instead of moving there (it once fetched 49..61, and the next random miss,
    /// at 40, counted as sequential and fetched 41..51: seen in `tests/fetch_policy.rs`).
    #[test]
    fn a_hit_past_what_was_scheduled_is_not_the_reader() {
        let mut r = ReadAhead::new(64);
        r.on_miss(0, 0);
        assert_eq!(r.on_miss(1, 1), Some(2..4));
        assert_eq!(r.on_hit(3), Some(4..6));
        r.on_miss(4, 4);
        r.on_miss(6, 6);
        assert_eq!(r.on_miss(7, 7), Some(8..10));
        assert_eq!(r.on_hit(9), Some(10..12));
        assert_eq!(r.on_hit(10), Some(12..13));
        assert_eq!(r.on_hit(12), Some(13..16));
        assert_eq!(r.on_hit(13), Some(16..17));
        assert_eq!(r.on_hit(48), None, "a hit 31 chunks past the window");
        assert_eq!(r.on_miss(40, 40), None, "a random miss after it");
        // a reader just past a short window is still followed
        let mut r = ReadAhead::new(64);
        r.on_miss(0, 0);
        r.on_miss(1, 1);
        r.on_hit(3);
        r.on_miss(4, 4);
        r.on_miss(6, 6);
        r.on_miss(7, 7);
        r.on_hit(9);
        assert_eq!(r.on_hit(10), Some(12..13));
        assert_eq!(r.on_hit(13), Some(14..17), "one chunk past 12..13");
    }

    #[test]
    fn the_read_ahead_reaches_at_most_a_quarter_of_the_run_past_the_reader() {
        let mut r = ReadAhead::new(1024);
        r.on_miss(100, 100);
        let mut reach = r.on_miss(101, 101).map_or(0, |w| w.end);
        // the reader goes on chunk by chunk through what was read ahead, then stops: what
        // was fetched past its last chunk is never more than what it read
        for stop in [103, 150, 333, 399] {
            let mut r2 = ReadAhead::new(1024);
            r2.on_miss(100, 100);
            reach = r2.on_miss(101, 101).map_or(reach, |w| w.end);
            for c in 102..=stop {
                if let Some(w) = r2.on_hit(c) {
                    assert!(
                        w.end - (c + 1) <= ((c + 1 - 100) / 4).max(2),
                        "window {w:?} at chunk {c}"
                    );
                    reach = w.end;
                }
            }
            let (read, wasted) = (stop + 1 - 100, reach - (stop + 1));
            assert!(
                wasted <= read,
                "{wasted} chunks fetched past chunk {stop} for {read} read"
            );
        }
    }

    #[test]
    fn off_means_never() {
        let mut r = ReadAhead::new(0);
        for c in 0..10 {
            assert_eq!(r.on_miss(c, c), None);
            assert_eq!(r.on_hit(c), None);
        }
    }
}
