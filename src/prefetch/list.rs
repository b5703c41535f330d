//! A startup prefetch list: the chunks of each data blob an image's first start on a node
//! read, as sorted runs of chunk numbers, and (version 2) the order in which the start first
//! read those chunks, across blobs, which is the order they are fetched in. It comes from this node's state directory or from a
//! registry, so it is parsed with a size bound and checked against the image it is used
//! with (same manifest, known blobs, the table's chunk size, runs inside each blob, in order,
//! one place in the read order per chunk) before a single byte is fetched for it.

#![forbid(unsafe_code)]

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::Image;
use crate::engine::DataBlob;
use crate::image::digest::Digest;

/// Media type (and artifact type) of a prefetch list pushed to a registry.
pub const MEDIA_TYPE: &str = "application/vnd.lazyblob.prefetch.v1+json";

/// Largest list accepted: about 40,000 runs, far more than a startup reads.
pub const MAX_LIST_BYTES: u64 = 1 << 20;

/// The version this build writes: 2 adds the read order of the chunks.
pub const VERSION: u32 = 2;

/// Why a list cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// Larger than [`MAX_LIST_BYTES`].
    #[error("prefetch list of {0} bytes is larger than {MAX_LIST_BYTES}")]
    TooLarge(u64),
    /// Not JSON of this format (or a digest of the wrong form).
    #[error("prefetch list does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    /// A version this daemon does not read.
    #[error("prefetch list version {0} is not supported (1 and 2 are)")]
    Version(u32),
    /// Recorded for another image.
    #[error("prefetch list is for image {found}, not {expected}")]
    OtherImage {
        /// The image it names.
        found: Digest,
        /// The image it was used with.
        expected: Digest,
    },
    /// A blob, chunk size or run that does not fit the image.
    #[error("prefetch list does not fit the image: {0}")]
    Mismatch(String),
}

/// The list, as stored and pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchList {
    /// Format version: 1 or 2.
    pub version: u32,
    /// Digest of the image manifest it was recorded for.
    pub image: Digest,
    /// The blobs read, in the order their first chunk was read.
    pub blobs: Vec<BlobRuns>,
}

/// The chunks read of one data blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRuns {
    /// The data blob's digest.
    pub digest: Digest,
    /// The chunk size the runs count in (the blob's table chunk size).
    pub chunk_size: u64,
    /// `[first, end)` chunk numbers, sorted, not overlapping, not touching.
    pub runs: Vec<[u64; 2]>,
    /// Version 2: the place (0 first) of each chunk of the runs, in run order, in the order
    /// the recorded start first read the chunks of all blobs. Version 1 has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order: Vec<u32>,
}

/// What a list asks of an image.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Each blob with its runs of chunk numbers, in list order.
    pub blobs: Vec<(Arc<DataBlob>, Vec<Range<u64>>)>,
    /// Version 2: every chunk of the runs, as `(blob index, chunk)`, in the order the
    /// recorded start first read them. Version 1 lists have none.
    pub order: Option<Vec<(usize, u64)>>,
}

impl Plan {
    /// The plan cut into pieces to fetch, in order, each `(blob index, chunks)` inside one run
    /// and at most `per_piece(blob)` chunks long: version 2 in the read order (a piece starts
    /// at the earliest-read chunk not yet in a piece and goes on through the chunks after it),
    /// version 1 the runs of the blobs in turn.
    pub fn pieces(&self, per_piece: impl Fn(&DataBlob) -> u64) -> Vec<(usize, Range<u64>)> {
        let per: Vec<u64> = self.blobs.iter().map(|(b, _)| per_piece(b).max(1)).collect();
        let mut out = Vec::new();
        let Some(order) = &self.order else {
            let most = self.blobs.iter().map(|(_, runs)| runs.len()).max().unwrap_or(0);
            for i in 0..most {
                for (b, (_, runs)) in self.blobs.iter().enumerate() {
                    let Some(run) = runs.get(i) else { continue };
                    let mut s = run.start;
                    while s < run.end {
                        out.push((b, s..(s + per[b]).min(run.end)));
                        s += per[b];
                    }
                }
            }
            return out;
        };
        let mut taken: Vec<std::collections::HashSet<u64>> = vec![Default::default(); self.blobs.len()];
        for &(b, c) in order {
            let runs = &self.blobs[b].1;
            let at = runs.partition_point(|r| r.end <= c);
            let Some(run) = runs.get(at).filter(|r| r.contains(&c)) else {
                continue;
            };
            let mut e = c;
            while e < run.end && e - c < per[b] && taken[b].insert(e) {
                e += 1;
            }
            if e > c {
                out.push((b, c..e));
            }
        }
        out
    }
}

impl PrefetchList {
    /// A list of `blobs` for `image`: each blob with the chunks read, sorted by chunk
    /// number, each with when it was first read (any increasing count).
    pub fn new(image: Digest, blobs: Vec<(&DataBlob, Vec<(u64, u64)>)>) -> PrefetchList {
        let mut blobs: Vec<(BlobRuns, Vec<(u64, u64)>)> = blobs
            .into_iter()
            .map(|(blob, mut chunks)| {
                chunks.dedup_by_key(|(c, _)| *c);
                let runs = BlobRuns {
                    digest: blob.source.digest.clone(),
                    chunk_size: blob.table_chunk,
                    runs: runs_of(chunks.iter().map(|(c, _)| *c)),
                    order: vec![0; chunks.len()],
                };
                (runs, chunks)
            })
            .filter(|(_, chunks)| !chunks.is_empty())
            .collect();
        // every chunk's place in the order of first reads, across blobs
        let mut all: Vec<(u64, usize, usize)> = blobs
            .iter()
            .enumerate()
            .flat_map(|(b, (_, chunks))| chunks.iter().enumerate().map(move |(i, &(_, t))| (t, b, i)))
            .collect();
        all.sort_unstable();
        for (place, &(_, b, i)) in all.iter().enumerate() {
            blobs[b].0.order[i] = place as u32;
        }
        PrefetchList {
            version: VERSION,
            image,
            blobs: blobs.into_iter().map(|(runs, _)| runs).collect(),
        }
    }

    /// Parse a list read from a file or a registry.
    pub fn from_slice(body: &[u8]) -> Result<PrefetchList, ListError> {
        if body.len() as u64 > MAX_LIST_BYTES {
            return Err(ListError::TooLarge(body.len() as u64));
        }
        let list: PrefetchList = serde_json::from_slice(body)?;
        if !(1..=VERSION).contains(&list.version) {
            return Err(ListError::Version(list.version));
        }
        Ok(list)
    }

    /// The list as stored (compact JSON).
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Check the list against `image` and say what to fetch, blob by blob in list order.
    pub fn plan(&self, image: &Image) -> Result<Plan, ListError> {
        if self.image != image.manifest_digest {
            return Err(ListError::OtherImage {
                found: self.image.clone(),
                expected: image.manifest_digest.clone(),
            });
        }
        let mut plan = Plan::default();
        // (place in the read order, blob, chunk)
        let mut order: Vec<(u32, usize, u64)> = Vec::new();
        for (bi, b) in self.blobs.iter().enumerate() {
            let mismatch = |why: String| ListError::Mismatch(format!("blob {}: {why}", b.digest));
            let blob = image
                .data
                .iter()
                .find(|d| d.source.digest == b.digest)
                .ok_or_else(|| mismatch("not a data blob of the image".into()))?;
            if b.chunk_size != blob.table_chunk {
                return Err(mismatch(format!(
                    "chunk size {} where the table has {}",
                    b.chunk_size, blob.table_chunk
                )));
            }
            let n_chunks = blob.source.size.div_ceil(blob.table_chunk);
            let mut end_before = None;
            let mut runs = Vec::with_capacity(b.runs.len());
            for &[s, e] in &b.runs {
                if s >= e || e > n_chunks || end_before.is_some_and(|p| s <= p) {
                    return Err(mismatch(format!(
                        "run {s}..{e} is empty, past its {n_chunks} chunks or out of order"
                    )));
                }
                end_before = Some(e);
                runs.push(s..e);
            }
            // version 2: one place per chunk (which bounds the chunks by the list's size)
            let chunks: u64 = runs.iter().map(|r| r.end - r.start).sum();
            let places = if self.version >= 2 { chunks } else { 0 };
            if b.order.len() as u64 != places {
                return Err(mismatch(format!(
                    "{} places in the read order for {chunks} chunks (version {})",
                    b.order.len(),
                    self.version
                )));
            }
            let mut places = b.order.iter();
            for c in runs.iter().flat_map(|r| r.clone()).take(b.order.len()) {
                order.extend(places.next().map(|&p| (p, bi, c)));
            }
            plan.blobs.push((Arc::clone(blob), runs));
        }
        if self.version >= 2 {
            order.sort_unstable();
            plan.order = Some(order.into_iter().map(|(_, b, c)| (b, c)).collect());
        }
        Ok(plan)
    }

    /// Bytes the list names in `image` (chunks, the last one of a blob short).
    pub fn bytes(plan: &Plan) -> u64 {
        plan.blobs
            .iter()
            .flat_map(|(blob, runs)| {
                runs.iter()
                    .map(|r| (r.end * blob.table_chunk).min(blob.source.size) - r.start * blob.table_chunk)
            })
            .sum()
    }
}

/// Sorted chunk numbers as `[first, end)` runs.
fn runs_of(chunks: impl Iterator<Item = u64>) -> Vec<[u64; 2]> {
    let mut runs: Vec<[u64; 2]> = Vec::new();
    for c in chunks {
        match runs.last_mut() {
            Some(r) if r[1] == c => r[1] = c + 1,
            Some(r) if r[1] > c => {}
            _ => runs.push([c, c + 1]),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_coalesce_neighbours_only() {
        let runs = |c: &[u64]| runs_of(c.iter().copied());
        assert_eq!(runs(&[0, 1, 2, 5, 6, 9]), vec![[0, 3], [5, 7], [9, 10]]);
        assert_eq!(runs(&[3, 3, 4]), vec![[3, 5]]);
        assert!(runs(&[]).is_empty());
    }

    fn image(sizes: &[u64]) -> Image {
        let repo: oci_client::Reference = "localhost:5000/x:1".parse().unwrap();
        let data = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let source = crate::registry::BlobSource {
                    repo: repo.clone(),
                    digest: Digest::of(&[i as u8]),
                    size,
                };
                let n = size.div_ceil(1 << 20) as usize;
                Arc::new(DataBlob::new(source, 1 << 20, vec![[0; 32]; n], Default::default()))
            })
            .collect();
        Image {
            reference: "localhost:5000/x:1".into(),
            pinned: "localhost:5000/x@sha256:0".into(),
            manifest_digest: Digest::of(b"manifest"),
            fsid: "lb-x".into(),
            meta: crate::registry::BlobSource {
                repo,
                digest: Digest::of(b"meta"),
                size: 1,
            },
            meta_path: "/nonexistent".into(),
            data,
        }
    }

    #[test]
    fn a_list_round_trips_and_plans_against_its_image() {
        let img = image(&[(5 << 20) + 7, 3 << 20]);
        // read first: blob 0's chunk 5, then blob 1's chunk 2, then blob 0's chunks 1 and 0
        let list = PrefetchList::new(
            img.manifest_digest.clone(),
            vec![
                (&img.data[1], vec![(2, 20)]),
                (&img.data[0], vec![(0, 40), (1, 30), (5, 10)]),
            ],
        );
        assert_eq!(list.version, 2);
        let back = PrefetchList::from_slice(&list.to_vec()).unwrap();
        assert_eq!(back, list);
        let plan = back.plan(&img).unwrap();
        assert_eq!(plan.blobs.len(), 2);
        assert_eq!(plan.blobs[0].1, vec![2..3]);
        assert_eq!(plan.blobs[1].1, vec![0..2, 5..6]);
        assert_eq!(plan.order, Some(vec![(1, 5), (0, 2), (1, 1), (1, 0)]));
        // read backwards: each chunk is a piece of its own, in the order read
        assert_eq!(plan.pieces(|_| 4), vec![(1, 5..6), (0, 2..3), (1, 1..2), (1, 0..1)]);
        // chunk 5 of blob 0 is its short last one: 7 bytes
        assert_eq!(PrefetchList::bytes(&plan), (1 << 20) + (2 << 20) + 7);
        // a version 1 list (no read order) still plans: the runs of the blobs in turn
        let mut v1 = back.clone();
        v1.version = 1;
        v1.blobs.iter_mut().for_each(|b| b.order.clear());
        let plan = PrefetchList::from_slice(&v1.to_vec()).unwrap().plan(&img).unwrap();
        assert_eq!(plan.order, None);
        assert_eq!(plan.pieces(|_| 4), vec![(0, 2..3), (1, 0..2), (1, 5..6)]);
    }

    #[test]
    fn pieces_follow_the_reader_across_blobs() {
        let img = image(&[16 << 20, 16 << 20]);
        // blob 0's chunks 0..10 read first, then blob 1's 3..6 and blob 0's 12..14 in turn
        let mut zero: Vec<(u64, u64)> = (0..10).map(|c| (c, c)).collect();
        zero.extend([(12, 10), (13, 12)]);
        let one = vec![(3, 11), (4, 13), (5, 14)];
        let list = PrefetchList::new(
            img.manifest_digest.clone(),
            vec![(&img.data[0], zero), (&img.data[1], one)],
        );
        let plan = list.plan(&img).unwrap();
        let want = vec![(0, 0..4), (0, 4..8), (0, 8..10), (0, 12..14), (1, 3..6)];
        assert_eq!(plan.pieces(|_| 4), want);
        // every chunk in exactly one piece, whatever the piece size
        for per in 1..12 {
            let mut got: Vec<(usize, u64)> = plan
                .pieces(|_| per)
                .into_iter()
                .flat_map(|(b, r)| r.map(move |c| (b, c)))
                .collect();
            got.sort_unstable();
            let mut all: Vec<(usize, u64)> = (0..10)
                .chain(12..14)
                .map(|c| (0, c))
                .chain((3..6).map(|c| (1, c)))
                .collect();
            all.sort_unstable();
            assert_eq!(got, all, "pieces of {per}");
        }
    }

    #[test]
    fn a_list_that_does_not_fit_its_image_is_refused() {
        let img = image(&[4 << 20]);
        let with = |runs: Vec<[u64; 2]>, chunk_size: u64| PrefetchList {
            version: 2,
            image: img.manifest_digest.clone(),
            blobs: vec![BlobRuns {
                digest: img.data[0].source.digest.clone(),
                chunk_size,
                order: (0..runs.iter().map(|r| r[1].saturating_sub(r[0])).sum::<u64>() as u32).collect(),
                runs,
            }],
        };
        for runs in [vec![[0, 5]], vec![[2, 2]], vec![[2, 3], [1, 2]], vec![[0, 2], [1, 3]]] {
            assert!(matches!(with(runs, 1 << 20).plan(&img), Err(ListError::Mismatch(_))));
        }
        assert!(matches!(
            with(vec![[0, 1]], 4096).plan(&img),
            Err(ListError::Mismatch(_))
        ));
        let mut other = with(vec![[0, 1]], 1 << 20);
        other.image = Digest::of(b"another");
        assert!(matches!(other.plan(&img), Err(ListError::OtherImage { .. })));
        let mut unknown = with(vec![[0, 1]], 1 << 20);
        unknown.blobs[0].digest = Digest::of(b"not in the image");
        assert!(matches!(unknown.plan(&img), Err(ListError::Mismatch(_))));
        // one place in the read order per chunk in version 2, none in version 1
        let mut short = with(vec![[0, 1], [2, 3]], 1 << 20);
        short.blobs[0].order.pop();
        assert!(matches!(short.plan(&img), Err(ListError::Mismatch(_))));
        let mut v1 = with(vec![[0, 1]], 1 << 20);
        v1.version = 1;
        assert!(matches!(v1.plan(&img), Err(ListError::Mismatch(_))));
        v1.blobs[0].order.clear();
        assert!(v1.plan(&img).is_ok());
    }

    #[test]
    fn hostile_lists_are_refused() {
        let big = vec![b' '; MAX_LIST_BYTES as usize + 1];
        assert!(matches!(PrefetchList::from_slice(&big), Err(ListError::TooLarge(_))));
        let d = "sha256:".to_string() + &"a".repeat(64);
        for v in [0, 3] {
            let other = format!(r#"{{"version":{v},"image":"{d}","blobs":[]}}"#);
            assert!(matches!(
                PrefetchList::from_slice(other.as_bytes()),
                Err(ListError::Version(x)) if x == v
            ));
        }
        let path = r#"{"version":1,"image":"sha256:../../etc/passwd","blobs":[]}"#;
        assert!(matches!(
            PrefetchList::from_slice(path.as_bytes()),
            Err(ListError::Parse(_))
        ));
        let extra = format!(r#"{{"version":1,"image":"{d}","blobs":[],"x":1}}"#);
        assert!(PrefetchList::from_slice(extra.as_bytes()).is_err());
    }
}
