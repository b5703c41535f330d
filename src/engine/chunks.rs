//! Chunk arithmetic: which fetch units cover a byte range, and how missing units are merged
//! into range requests.

use std::ops::Range;

/// Fetch-unit geometry of one blob.
#[derive(Debug, Clone, Copy)]
pub struct ChunkGeometry {
    /// Fetch unit: the configured chunk size rounded up to a multiple of the table's.
    pub unit: u64,
    /// Blob size in bytes.
    pub size: u64,
}

impl ChunkGeometry {
    /// `configured` and `table_chunk` are powers of two; the unit is the larger one, so it is
    /// always a whole number of verified chunks.
    pub fn new(configured: u64, table_chunk: u64, size: u64) -> ChunkGeometry {
        ChunkGeometry {
            unit: configured.max(table_chunk).max(1),
            size,
        }
    }

    /// Indices of the units overlapping `[offset, offset + len)`, clamped to the blob.
    pub fn chunks_for(&self, offset: u64, len: u64) -> Range<u64> {
        if offset >= self.size || len == 0 {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.size);
        offset / self.unit..end.div_ceil(self.unit)
    }

    /// First byte of unit `idx`.
    pub fn start(&self, idx: u64) -> u64 {
        idx * self.unit
    }

    /// End (exclusive) of unit `idx`, clamped to the blob.
    pub fn end(&self, idx: u64) -> u64 {
        ((idx + 1) * self.unit).min(self.size)
    }
}

/// Group sorted missing unit indices into runs of consecutive units, each at most
/// `merge_max` bytes (and at least one unit).
pub fn plan_runs(missing: &[u64], geo: &ChunkGeometry, merge_max: u64) -> Vec<Range<u64>> {
    consecutive(missing, (merge_max / geo.unit).max(1))
}

/// Runs of consecutive values of a sorted list, each at most `max_len` long.
pub fn consecutive(sorted: &[u64], max_len: u64) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for &v in sorted {
        match runs.last_mut() {
            Some(r) if r.end == v && r.end - r.start < max_len => r.end += 1,
            _ => runs.push(v..v + 1),
        }
    }
    runs
}

/// The first run of at most `max_len` consecutive chunks in `within` that `present` says are
/// missing (what a fill fetches next); `present` stops at the run's first present chunk.
pub fn first_missing_run<E>(
    within: Range<u64>,
    max_len: u64,
    mut present: impl FnMut(u64) -> Result<bool, E>,
) -> Result<Option<Range<u64>>, E> {
    let mut run: Option<Range<u64>> = None;
    for c in within {
        if run.as_ref().is_some_and(|r| r.end - r.start >= max_len) {
            break;
        }
        match (present(c)?, &mut run) {
            (true, None) => {}
            (true, Some(_)) => break,
            (false, r) => r.get_or_insert(c..c).end = c + 1,
        }
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn covering_units() {
        let g = ChunkGeometry::new(1 << 20, 4096, (5 << 20) + 10);
        assert_eq!(g.chunks_for(0, 1), 0..1);
        assert_eq!(g.chunks_for((1 << 20) - 1, 2), 0..2);
        assert_eq!(g.chunks_for(5 << 20, 100), 5..6);
        assert_eq!(g.end(5), (5 << 20) + 10);
        assert_eq!(g.chunks_for(6 << 20, 1), 0..0);
        // the table's chunk wins when larger
        assert_eq!(ChunkGeometry::new(4096, 1 << 20, 1).unit, 1 << 20);
    }

    #[test]
    fn runs_merge_and_split() {
        let g = ChunkGeometry::new(1 << 20, 4096, 100 << 20);
        assert_eq!(plan_runs(&[1, 2, 3, 7, 8], &g, 4 << 20), vec![1..4, 7..9]);
        assert_eq!(plan_runs(&[0, 1, 2, 3, 4, 5], &g, 2 << 20), vec![0..2, 2..4, 4..6]);
        assert_eq!(plan_runs(&[0, 1], &g, 1), vec![0..1, 1..2]);
        assert!(plan_runs(&[], &g, 1).is_empty());
    }

    #[test]
    fn the_first_missing_run_skips_present_chunks_and_stops_at_the_next() {
        let have = [0u64, 1, 4, 9];
        let present = |c: u64| Ok::<bool, ()>(have.contains(&c));
        assert_eq!(first_missing_run(0..12, 8, present), Ok(Some(2..4)));
        assert_eq!(first_missing_run(4..12, 3, present), Ok(Some(5..8)));
        assert_eq!(first_missing_run(9..10, 3, present), Ok(None));
        assert_eq!(first_missing_run(0..12, 8, |_| Err::<bool, ()>(())), Err(()));
    }

    proptest! {
        #[test]
        fn units_cover_the_range(off in 0u64..1<<30, len in 1u64..1<<24, size in 1u64..1<<31, unit_shift in 12u32..24) {
            let g = ChunkGeometry::new(1 << unit_shift, 4096, size);
            let r = g.chunks_for(off, len);
            if off < size {
                prop_assert!(g.start(r.start) <= off);
                prop_assert!(g.end(r.end - 1) >= (off + len).min(size));
            } else {
                prop_assert!(r.is_empty());
            }
        }
    }
}
