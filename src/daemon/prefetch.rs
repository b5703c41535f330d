//! The startup prefetch of mounts: a mounted image whose prefetch list is known has it
//! fetched first, beside its readers. The list is this node's (kept under the state
//! directory) or, failing that, the one pushed to the image's registry, looked up on its own
//! task while the mount proceeds. An image without a list has its startup recorded for
//! `prefetch.record_window`; the list is kept when the window closes or the image is
//! unmounted (a list found in the registry meanwhile ends the recording unkept).

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;

use super::Daemon;
use crate::catalog::Image;
use crate::frontend::active::ActiveFrontend;
use crate::prefetch::{registry, store, PrefetchList, Recorder};

impl Daemon {
    /// After `image` was mounted: fetch its list first, or record its startup.
    pub(super) fn start_prefetch(&self, image: &Arc<Image>) {
        let cfg = &self.config.prefetch;
        if self.recorder.is_recording(&image.manifest_digest) {
            return; // mounted again while its first start is recorded
        }
        let kept = match store::load(&self.config.daemon.state_dir, &image.manifest_digest) {
            Ok(kept) => kept.filter(|_| cfg.replay),
            Err(e) => {
                tracing::warn!(reference = %image.reference, error = %e, "kept prefetch list unreadable");
                None
            }
        };
        // a list that does not fit the image is recorded anew (and replaced)
        if let Some(list) = kept {
            if replay(&self.frontend, image, &list) {
                return;
            }
        }
        if let Some(window) = cfg.record_window {
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
        if cfg.replay && cfg.from_registry {
            let (reg, frontend, recorder, state_dir, image) = (
                self.catalog.registry(),
                self.frontend.clone(),
                Arc::clone(&self.recorder),
                self.config.daemon.state_dir.clone(),
                Arc::clone(image),
            );
            tokio::spawn(async move {
                let repo = match crate::registry::parse_reference(&image.pinned) {
                    Ok(r) => r,
                    Err(e) => return tracing::warn!(error = %e, "no prefetch list lookup"),
                };
                match registry::pull(&reg, &repo, &image.manifest_digest).await {
                    Ok(Some((list, found))) if replay(&frontend, &image, &list) => {
                        tracing::info!(reference = %image.reference, ?found, "prefetch list from the registry");
                        let _ = recorder.finish(&image.manifest_digest);
                        if let Err(e) = store::save(&state_dir, &list) {
                            tracing::warn!(error = %e, "could not keep the registry's prefetch list");
                        }
                    }
                    Ok(_) => tracing::debug!(reference = %image.reference, "no usable prefetch list in the registry"),
                    Err(e) => {
                        tracing::warn!(reference = %image.reference, error = %e, "prefetch list lookup in the registry failed")
                    }
                }
            });
        }
    }

    /// `image` was unmounted: a recording of its startup ends now.
    pub(super) fn end_recording(&self, image: &Image) {
        keep(&self.recorder, &self.config.daemon.state_dir, image);
    }
}

/// Check `list` against `image` and have the frontend fetch it; false if it does not fit.
fn replay(frontend: &ActiveFrontend, image: &Image, list: &PrefetchList) -> bool {
    match list.plan(image) {
        Ok(plan) => {
            let bytes = PrefetchList::bytes(&plan);
            frontend.replay(image, plan);
            tracing::info!(reference = %image.reference, bytes, "startup prefetch started");
            true
        }
        Err(e) => {
            tracing::warn!(reference = %image.reference, error = %e, "prefetch list ignored");
            false
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
