//! The startup prefetch of mounts: a mounted image whose prefetch list is known (kept on this
//! node) has it fetched first, beside its readers; an image without one has its startup
//! recorded for `prefetch.record_window`, and the list is kept when the window closes or the
//! image is unmounted.

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;

use super::Daemon;
use crate::catalog::Image;
use crate::prefetch::{store, PrefetchList, Recorder};

impl Daemon {
    /// After `image` was mounted: fetch its list first, or record its startup.
    pub(super) async fn start_prefetch(&self, image: &Arc<Image>) {
        let cfg = &self.config.prefetch;
        if self.recorder.is_recording(&image.manifest_digest) {
            return; // mounted again while its first start is recorded
        }
        let list = match cfg.replay {
            true => self.find_list(image).await,
            false => None,
        };
        // a list that does not fit the image is recorded anew (and replaced)
        let plan = list.map(|l| l.plan(image)).and_then(|p| {
            p.inspect_err(|e| tracing::warn!(reference = %image.reference, error = %e, "prefetch list ignored"))
                .ok()
        });
        match plan {
            Some(plan) => {
                let bytes = PrefetchList::bytes(&plan);
                if self.frontend.replay(&image.reference, plan) {
                    tracing::info!(reference = %image.reference, bytes, "startup prefetch started");
                }
            }
            None => {
                let Some(window) = cfg.record_window else {
                    return;
                };
                self.recorder.start(Arc::clone(image));
                tracing::info!(reference = %image.reference, window_ms = window.as_millis() as u64, "recording the image's startup");
                let (recorder, state_dir, image) = (
                    Arc::clone(&self.recorder),
                    self.config.daemon.state_dir.clone(),
                    Arc::clone(image),
                );
                tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    keep(&recorder, &state_dir, &image);
                });
            }
        }
    }

    /// `image` was unmounted: a recording of its startup ends now.
    pub(super) fn end_recording(&self, image: &Image) {
        keep(&self.recorder, &self.config.daemon.state_dir, image);
    }

    /// The image's list: kept on this node.
    async fn find_list(&self, image: &Image) -> Option<PrefetchList> {
        match store::load(&self.config.daemon.state_dir, &image.manifest_digest) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(reference = %image.reference, error = %e, "kept prefetch list unreadable");
                None
            }
        }
    }
}

/// End the recording of `image`, if one runs, and keep its list.
fn keep(recorder: &Recorder, state_dir: &Path, image: &Image) {
    let Some(list) = recorder.finish(&image.manifest_digest) else {
        return;
    };
    let runs: usize = list.blobs.iter().map(|b| b.runs.len()).sum();
    match store::save(state_dir, &list) {
        Ok(path) => {
            tracing::info!(reference = %image.reference, runs, path = %path.display(), "startup prefetch list kept")
        }
        Err(e) => tracing::warn!(reference = %image.reference, error = %e, "could not keep the prefetch list"),
    }
}
