//! Events a stopped daemon left unanswered: after a handover, before this daemon reads a
//! single event (the kernel matches an answer by fd number only, and a new event's number
//! could equal an orphan's), each journaled range is filled through the blob's writer and
//! answered by its number, and every other number the old daemon could have held is denied
//! (an event read in the instant before it was journaled).

use std::fs::File;
use std::sync::Arc;

use super::{sys, FanotifyFrontend};
use crate::frontend::fanotify::journal::{Left, Orphan};
use crate::lock::lock;

impl FanotifyFrontend {
    /// Resolve what the previous daemon left pending (nothing without a handover); returns
    /// how many of its readers got their bytes.
    pub async fn resolve_orphans(self: &Arc<Self>) -> usize {
        let Some(Left { orphans, max_fd }) = lock(&self.orphans).take() else {
            return 0;
        };
        if !orphans.is_empty() {
            tracing::warn!(
                events = orphans.len(),
                "serving the reads a stopped daemon left unanswered"
            );
        }
        let served = futures::future::join_all(orphans.iter().map(|o| self.resolve(o))).await;
        let answered: std::collections::HashSet<i32> = orphans.iter().map(|o| o.fd).collect();
        for fd in (0..=max_fd).filter(|fd| !answered.contains(fd)) {
            for g in self.groups() {
                let _ = sys::respond_raw(g, fd, sys::deny_with(libc::EIO));
            }
        }
        served.into_iter().filter(|ok| *ok).count()
    }

    /// Fill one orphan's range and answer it; whether its reader was allowed.
    async fn resolve(self: &Arc<Self>, o: &Orphan) -> bool {
        let cached = lock(&self.files).get(&(o.dev, o.ino)).cloned();
        let writer: Option<Arc<File>> = cached.as_ref().and_then(|c| lock(&c.writer).clone());
        let result = match (cached, writer) {
            (Some(c), Some(w)) => self.fill(&w, Some(c), o.range).await,
            _ => Err(std::io::Error::other(
                "a pending read of a file no writer was handed over for",
            )),
        };
        let response = match &result {
            Ok(_) => sys::FAN_ALLOW,
            Err(_) => sys::deny_with(libc::EIO),
        };
        // the journal does not say which group the event came from: only that group takes
        // the answer (the others have no event of that number)
        if !self.groups().any(|g| sys::respond_raw(g, o.fd, response).is_ok()) {
            tracing::warn!(fd = o.fd, "no group took the answer to a stopped daemon's event");
        }
        match result {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(fd = o.fd, error = %e, "a stopped daemon's reader denied with EIO");
                false
            }
        }
    }
}
