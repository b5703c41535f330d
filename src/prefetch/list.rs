//! A startup prefetch list: the chunks of each data blob an image's first start on a node
//! read, as sorted runs of chunk numbers. It comes from this node's state directory or from a
//! registry, so it is parsed with a size bound and checked against the image it is used
//! with (same manifest, known blobs, the table's chunk size, runs inside each blob, in order)
//! before a single byte is fetched for it.

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
    #[error("prefetch list version {0} is not supported (1 is)")]
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
    /// Format version: 1.
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
}

/// What a list asks of an image: each blob with its runs of chunk numbers.
pub type Plan = Vec<(Arc<DataBlob>, Vec<Range<u64>>)>;

impl PrefetchList {
    /// A list of `blobs` (each with its sorted chunk numbers) for `image`.
    pub fn new(image: Digest, blobs: Vec<(&DataBlob, Vec<u64>)>) -> PrefetchList {
        let blobs = blobs
            .into_iter()
            .filter(|(_, chunks)| !chunks.is_empty())
            .map(|(blob, chunks)| BlobRuns {
                digest: blob.source.digest.clone(),
                chunk_size: blob.table_chunk,
                runs: runs_of(&chunks),
            })
            .collect();
        PrefetchList {
            version: 1,
            image,
            blobs,
        }
    }

    /// Parse a list read from a file or a registry.
    pub fn from_slice(body: &[u8]) -> Result<PrefetchList, ListError> {
        if body.len() as u64 > MAX_LIST_BYTES {
            return Err(ListError::TooLarge(body.len() as u64));
        }
        let list: PrefetchList = serde_json::from_slice(body)?;
        if list.version != 1 {
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
        let mut plan = Vec::with_capacity(self.blobs.len());
        for b in &self.blobs {
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
            plan.push((Arc::clone(blob), runs));
        }
        Ok(plan)
    }

    /// Bytes the list names in `image` (chunks, the last one of a blob short).
    pub fn bytes(plan: &Plan) -> u64 {
        plan.iter()
            .flat_map(|(blob, runs)| {
                runs.iter()
                    .map(|r| (r.end * blob.table_chunk).min(blob.source.size) - r.start * blob.table_chunk)
            })
            .sum()
    }
}

/// Sorted chunk numbers as `[first, end)` runs.
fn runs_of(chunks: &[u64]) -> Vec<[u64; 2]> {
    let mut runs: Vec<[u64; 2]> = Vec::new();
    for &c in chunks {
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
        assert_eq!(runs_of(&[0, 1, 2, 5, 6, 9]), vec![[0, 3], [5, 7], [9, 10]]);
        assert_eq!(runs_of(&[3, 3, 4]), vec![[3, 5]]);
        assert!(runs_of(&[]).is_empty());
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
        let list = PrefetchList::new(
            img.manifest_digest.clone(),
            vec![(&img.data[1], vec![2]), (&img.data[0], vec![0, 1, 5])],
        );
        let back = PrefetchList::from_slice(&list.to_vec()).unwrap();
        assert_eq!(back, list);
        let plan = back.plan(&img).unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].1, vec![2..3]);
        assert_eq!(plan[1].1, vec![0..2, 5..6]);
        // chunk 5 of blob 0 is its short last one: 7 bytes
        assert_eq!(PrefetchList::bytes(&plan), (1 << 20) + (2 << 20) + 7);
    }

    #[test]
    fn a_list_that_does_not_fit_its_image_is_refused() {
        let img = image(&[4 << 20]);
        let with = |runs: Vec<[u64; 2]>, chunk_size: u64| PrefetchList {
            version: 1,
            image: img.manifest_digest.clone(),
            blobs: vec![BlobRuns {
                digest: img.data[0].source.digest.clone(),
                chunk_size,
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
    }

    #[test]
    fn hostile_lists_are_refused() {
        let big = vec![b' '; MAX_LIST_BYTES as usize + 1];
        assert!(matches!(PrefetchList::from_slice(&big), Err(ListError::TooLarge(_))));
        let d = "sha256:".to_string() + &"a".repeat(64);
        let v2 = format!(r#"{{"version":2,"image":"{d}","blobs":[]}}"#);
        assert!(matches!(
            PrefetchList::from_slice(v2.as_bytes()),
            Err(ListError::Version(2))
        ));
        let path = r#"{"version":1,"image":"sha256:../../etc/passwd","blobs":[]}"#;
        assert!(matches!(
            PrefetchList::from_slice(path.as_bytes()),
            Err(ListError::Parse(_))
        ));
        let extra = format!(r#"{{"version":1,"image":"{d}","blobs":[],"x":1}}"#);
        assert!(PrefetchList::from_slice(extra.as_bytes()).is_err());
    }
}
