//! Recording an image's startup: for a window after an image is mounted on a node that has no
//! prefetch list for it, the frontends report every range a reader asks the kernel for; when
//! the window closes (or the image is unmounted first) the chunks read become the image's
//! prefetch list. A frontend's report costs one atomic load while nothing records.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::list::PrefetchList;
use crate::catalog::Image;
use crate::engine::DataBlob;
use crate::image::digest::Digest;
use crate::lock::lock;

/// Largest number of chunks one recording keeps per blob (a reader that reads a whole
/// 64 GiB blob of 1 MiB chunks stays within this); the list holds runs, far fewer.
const MAX_CHUNKS_PER_BLOB: usize = 1 << 16;

/// The images being recorded and what their readers read.
#[derive(Default)]
pub struct Recorder {
    recordings: Mutex<Vec<Recording>>,
    /// `recordings.len()`, read without the lock on every report.
    active: AtomicUsize,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("recording", &self.active.load(Relaxed))
            .finish()
    }
}

struct Recording {
    image: Arc<Image>,
    /// Per data blob (by digest): when its first chunk was read (report count) and its chunks,
    /// each with when it was first read.
    blobs: HashMap<Digest, (u64, BTreeMap<u64, u64>)>,
    reports: u64,
}

impl Recorder {
    /// Start recording `image` (a second start while it records changes nothing).
    pub fn start(&self, image: Arc<Image>) {
        let mut r = lock(&self.recordings);
        if r.iter().any(|x| x.image.manifest_digest == image.manifest_digest) {
            return;
        }
        r.push(Recording {
            image,
            blobs: HashMap::new(),
            reports: 0,
        });
        self.active.store(r.len(), Relaxed);
    }

    /// Whether `image` is being recorded.
    pub fn is_recording(&self, image: &Digest) -> bool {
        self.active.load(Relaxed) > 0 && lock(&self.recordings).iter().any(|x| &x.image.manifest_digest == image)
    }

    /// A reader asked for `len` bytes at `offset` of `blob`.
    pub fn read(&self, blob: &DataBlob, offset: u64, len: u64) {
        if self.active.load(Relaxed) == 0 || len == 0 || offset >= blob.source.size {
            return;
        }
        let unit = blob.table_chunk;
        let end = offset.saturating_add(len).min(blob.source.size);
        let chunks = offset / unit..end.div_ceil(unit);
        for rec in lock(&self.recordings).iter_mut() {
            if !rec.image.data.iter().any(|d| d.source.digest == blob.source.digest) {
                continue;
            }
            rec.reports += 1;
            let order = rec.reports;
            let (_, chunks_read) = rec
                .blobs
                .entry(blob.source.digest.clone())
                .or_insert_with(|| (order, BTreeMap::new()));
            for c in chunks.clone() {
                if chunks_read.len() >= MAX_CHUNKS_PER_BLOB {
                    break;
                }
                chunks_read.entry(c).or_insert(order);
            }
        }
    }

    /// Stop recording `image`: its list (None if it was not recording or nothing was read).
    pub fn finish(&self, image: &Digest) -> Option<PrefetchList> {
        let rec = {
            let mut r = lock(&self.recordings);
            let at = r.iter().position(|x| &x.image.manifest_digest == image)?;
            let rec = r.swap_remove(at);
            self.active.store(r.len(), Relaxed);
            rec
        };
        let mut blobs: Vec<_> = rec.blobs.into_iter().collect();
        blobs.sort_by_key(|(_, (order, _))| *order);
        let blobs: Vec<(&DataBlob, Vec<(u64, u64)>)> = blobs
            .iter()
            .filter_map(|(digest, (_, chunks))| {
                let blob = rec.image.data.iter().find(|d| &d.source.digest == digest)?;
                Some((blob.as_ref(), chunks.iter().map(|(&c, &t)| (c, t)).collect()))
            })
            .collect();
        let list = PrefetchList::new(rec.image.manifest_digest.clone(), blobs);
        (!list.blobs.is_empty()).then_some(list)
    }
}
