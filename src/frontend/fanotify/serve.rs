//! The fanotify frontend's event loop: every `FAN_PRE_ACCESS` event names a range of a data
//! blob's sparse cache file; missing chunks are fetched through the blob engine (verified),
//! written through the event's fd, and the read is allowed. A failed fetch denies the read
//! with `EIO`: a reader never gets a hole's zeros. This file dispatches events; the jobs
//! behind them have their own modules: `blob` (cache files, pinning, completion), `demand`
//! (the on-demand fill), `busy_poll` (polling without sleeping while cached re-reads go
//! on), `prefetch` (the fetches of the read-ahead state machine,
//! `frontend::readahead`), `background` (the fill of idle blobs), `store` (writing into
//! cache files).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::fanotify::Fanotify;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tracing::Instrument;

use super::event::{self, FAN_PRE_ACCESS};
use super::journal::{Journal, Left};
use super::{cache, sys};
use crate::engine::Engine;
use crate::frontend::admission::Admission;
use crate::frontend::guard;
use crate::lock::lock;
use blob::CachedBlob;

mod background;
mod blob;
mod busy_poll;
mod demand;
mod drop_behind;
mod leaves;
mod orphans;
mod prefetch;
mod startup;
mod store;

/// Largest part of a unit a reader waits for that is written without the blocking pool.
const INLINE_WRITE_MAX: usize = 128 << 10;

/// Counters exported in `status`.
#[derive(Debug, Default, Serialize)]
pub struct FanotifyStats {
    /// Events received.
    pub events: AtomicU64,
    /// Reads allowed.
    pub allowed: AtomicU64,
    /// Reads denied with EIO.
    pub denied: AtomicU64,
    /// Reads answered as their event was read: all they asked for was verified in the cache
    /// (whole chunks, or leaves written in this run).
    pub answered_at_once: AtomicU64,
    /// Reads of a group by the busy poll that found events (not waiting for a wake-up).
    pub busy_poll_reads: AtomicU64,
    /// Chunks written for readers.
    pub chunks_filled: AtomicU64,
    /// Chunks written by read-ahead.
    pub chunks_prefetched: AtomicU64,
    /// Pieces of units the engine's runs wrote before the rest of their unit arrived
    /// (`engine::pieces`).
    pub pieces_placed: AtomicU64,
    /// Chunks found on disk and verified.
    pub chunks_present: AtomicU64,
    /// Chunks with leaves found on disk (an earlier run's) and verified.
    pub leaves_present: AtomicU64,
    /// Chunks fetched by the background fill of idle blobs.
    pub chunks_background: AtomicU64,
    /// Bytes of cache files behind sequential readers advised out of the page cache.
    pub drop_behind_bytes: AtomicU64,
    /// Chunks fetched by the startup prefetch of mounted images.
    pub chunks_startup: AtomicU64,
    /// Blobs complete on disk (their events are off).
    pub blobs_complete: AtomicU64,
    /// Event buffers that did not parse.
    pub bad_events: AtomicU64,
    /// Read latencies for the metrics endpoint.
    #[serde(skip)]
    pub read_times: crate::metrics::ReadTimes,
}

/// The fanotify frontend.
pub struct FanotifyFrontend {
    /// The pre-content groups; each cache file is marked in one, chosen by its identity.
    groups: Vec<AsyncFd<Fanotify>>,
    engine: Arc<Engine>,
    cache_dir: PathBuf,
    /// (dev, ino) of a cache file -> its blob.
    files: Mutex<HashMap<(u64, u64), Arc<CachedBlob>>>,
    /// Largest read-ahead window in bytes (None: no read-ahead).
    read_ahead_max: Option<NonZeroU64>,
    /// How far behind a sequential reader the cache file's pages are let go (None: never).
    drop_behind: Option<NonZeroU64>,
    /// Quiet time after which a blob in use is fetched to the end (None: never).
    fill_after: Option<Duration>,
    /// One background fill request at a time, daemon-wide: readers come first.
    fill_slot: tokio::sync::Semaphore,
    /// Metadata blobs of mounted images, locked in memory (None: not pinned).
    pinned: Option<Mutex<HashMap<PathBuf, super::pin::Pinned>>>,
    /// Signalled each time a blob becomes complete.
    completions: tokio::sync::Notify,
    /// Slots of events being served.
    admission: Admission,
    /// Events read and not answered yet, in a file that outlives the process.
    journal: Arc<Journal>,
    /// Handed over by a previous daemon's guard: its unanswered events and its highest
    /// event fd number, resolved by [`FanotifyFrontend::resolve_orphans`] before serving.
    orphans: Mutex<Option<Left>>,
    /// Writers of cache files handed over by the guard, by (dev, ino), until `prepare`
    /// attaches them to their blob.
    adopted_writers: Mutex<HashMap<(u64, u64), File>>,
    /// The socket to this daemon's guard: each blob's writer is handed to it once.
    keeper: Mutex<Option<std::os::unix::net::UnixStream>>,
    /// Told of every range a reader asks for, while an image's startup is recorded.
    recorder: Arc<crate::prefetch::Recorder>,
    /// How long the groups are polled without sleeping after an event answered at once.
    busy_poll: busy_poll::BusyPoll,
    /// This process's pid: its own reads (the startup prefetch's) are not a workload's.
    own_pid: u32,
    /// Counters for `status`.
    pub stats: FanotifyStats,
}

/// How the fanotify frontend serves (from the engine config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest read-ahead window in bytes (None: no read-ahead).
    pub read_ahead_max: Option<NonZeroU64>,
    /// Let go of the cache file's pages this far behind a sequential reader (None: never).
    pub drop_behind: Option<NonZeroU64>,
    /// Quiet time after which a blob in use is fetched to the end (None: never).
    pub fill_after: Option<Duration>,
    /// Lock the metadata blobs of mounted images in memory.
    pub pin_metadata: bool,
    /// Pre-content groups to spread cache files over (fewer if the kernel's per-user limit
    /// is reached; a handover brings its own).
    pub groups: usize,
    /// Where readers' ranges are reported while an image's startup is recorded.
    pub recorder: Arc<crate::prefetch::Recorder>,
    /// After an event answered at once, poll the groups without sleeping this long (None:
    /// never).
    pub busy_poll: Option<Duration>,
}

impl FanotifyFrontend {
    /// Create the pre-content groups, or adopt the ones (with their marks and writers) a guard
    /// handed over;
    /// `journal` is this daemon's fresh journal and `left` what the previous one left in it
    /// (its unanswered events and highest event fd number), used only with a handover.
    pub fn new(
        cache_dir: &Path,
        engine: Arc<Engine>,
        handover: Option<guard::Handover>,
        settings: Settings,
        admission: Admission,
        (journal, left): (Arc<Journal>, Left),
    ) -> io::Result<Arc<FanotifyFrontend>> {
        let (groups, writers, orphans): (Vec<Fanotify>, Vec<std::os::fd::OwnedFd>, _) = match handover {
            Some(h) => (
                h.kernel.into_iter().map(sys::adopt_group).collect(),
                h.kept.into_iter().map(|k| k.fd).collect(),
                Some(left),
            ),
            None => (create_groups(settings.groups)?, Vec::new(), None),
        };
        let adopted_writers = writers
            .into_iter()
            .map(File::from)
            .filter_map(|f| f.metadata().ok().map(|m| ((m.dev(), m.ino()), f)))
            .collect();
        let Settings {
            read_ahead_max,
            drop_behind,
            fill_after,
            pin_metadata,
            groups: _,
            recorder,
            busy_poll,
        } = settings;
        Ok(Arc::new(FanotifyFrontend {
            groups: groups.into_iter().map(sys::into_async).collect::<io::Result<_>>()?,
            engine,
            cache_dir: cache_dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
            read_ahead_max,
            drop_behind,
            fill_after,
            fill_slot: tokio::sync::Semaphore::new(1),
            pinned: pin_metadata.then(|| Mutex::new(HashMap::new())),
            completions: tokio::sync::Notify::new(),
            admission,
            journal,
            orphans: Mutex::new(orphans),
            adopted_writers: Mutex::new(adopted_writers),
            keeper: Mutex::new(None),
            recorder,
            busy_poll: busy_poll::BusyPoll::new(busy_poll),
            own_pid: std::process::id(),
            stats: FanotifyStats::default(),
        }))
    }

    /// The group fds, in order (for the guard that keeps them alive if the daemon dies).
    pub fn groups(&self) -> impl ExactSizeIterator<Item = std::os::fd::BorrowedFd<'_>> {
        self.groups.iter().map(|g| g.get_ref().as_fd())
    }

    /// Group number `g`.
    fn group(&self, g: usize) -> &Fanotify {
        self.groups[g].get_ref()
    }

    /// The group a cache file (device, inode) is marked in: the same one for the same file,
    /// in this daemon and in the next one, which adopts the groups in order.
    /// (A full 64-bit mix, murmur3's finalizer: cache files created together get neighbouring
    /// inode numbers, which a single multiply left in one group.)
    fn group_of(&self, (dev, ino): (u64, u64)) -> usize {
        let mut h = dev.rotate_left(32) ^ ino;
        for k in [0xff51_afd7_ed55_8ccd_u64, 0xc4ce_b9fe_1a85_ec53] {
            h ^= h >> 33;
            h = h.wrapping_mul(k);
        }
        h ^= h >> 33;
        (h % self.groups.len() as u64) as usize
    }

    /// Serve events of every group until `shutdown` fires.
    pub async fn run(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) -> io::Result<()> {
        // a task of its own: it runs beside the event loops, on whichever worker is free
        let poll = tokio::spawn(Arc::clone(&self).run_busy_poll(shutdown.clone()));
        let loops = (0..self.groups.len()).map(|g| self.serve_group(g, shutdown.clone()));
        let served = futures::future::try_join_all(loops).await;
        poll.abort();
        served.map(drop)
    }

    async fn serve_group(self: &Arc<Self>, g: usize, shutdown: tokio::sync::watch::Receiver<bool>) -> io::Result<()> {
        // 341 events a read, per group; fewer when fewer slots are free
        let mut buf = vec![0u8; 16 * 1024];
        let admission = self.admission.clone();
        let read = |fan: &Fanotify, b: &mut [u8], room: usize| read_events(fan, b, room);
        crate::frontend::drain_loop(&self.groups[g], &mut buf, &admission, shutdown, read, |raw| {
            self.dispatch(g, raw);
        })
        .await
    }

    /// Answer at once what the cache holds (and keep the busy poll going), hand the rest of a
    /// batch of raw events to tasks.
    fn dispatch(self: &Arc<Self>, g: usize, raw: &[u8]) -> Batch {
        let mut batch = Batch::Settled;
        let (events, err) = event::parse(raw);
        if let Some(e) = err {
            self.stats.bad_events.fetch_add(1, Relaxed);
            tracing::error!(error = %e, "malformed fanotify event buffer");
        }
        for ev in events {
            let t0 = Instant::now();
            self.stats.events.fetch_add(1, Relaxed);
            let Some(fd) = sys::adopt_event_fd(ev.fd) else {
                tracing::warn!(mask = ev.mask, "fanotify event without fd (queue overflow?)");
                continue;
            };
            let file = File::from(fd);
            let id = file.metadata().map(|m| (m.dev(), m.ino())).unwrap_or_default();
            let cached = lock(&self.files).get(&id).cloned();
            // before anything can fail: the blob's writer with the guard, the event in the
            // journal, so that a crash from here on costs the reader a wait, not an error
            if let Some(c) = &cached {
                self.ensure_writer(c, &file);
            }
            let journaled = self.journal.record(ev.fd, id, ev.range);
            if let (Some(c), Some((at, len))) = (&cached, ev.range) {
                // the daemon's own reads (startup prefetch) are not a workload's
                if ev.pid as u32 != self.own_pid {
                    self.recorder.read(&c.blob, at, len);
                }
            }
            if ev.mask & FAN_PRE_ACCESS != 0 && self.all_verified(cached.as_ref(), ev.range) {
                // fast path: everything asked for is already in the cache and verified
                if let Err(e) = sys::respond(self.group(g).as_fd(), file.as_fd(), sys::FAN_ALLOW) {
                    tracing::error!(error = %e, "fanotify response failed");
                }
                self.stats.allowed.fetch_add(1, Relaxed);
                self.stats.answered_at_once.fetch_add(1, Relaxed);
                self.stats.read_times.warm(t0.elapsed());
                self.busy_poll.answered();
                drop(journaled);
                continue;
            }
            batch = Batch::Pending;
            let me = Arc::clone(self);
            // debug: an info span per event cost ~18 us of a ~350 us cold read (its fields are
            // formatted when it is made); a denied read names its reader and range itself
            let span = tracing::debug_span!("pre_access", pid = ev.pid, range = ?ev.range);
            let ticket = self.admission.admit();
            tokio::spawn(
                async move {
                    let _slot = ticket.enter().await;
                    me.handle(g, ev, Arc::new(file), cached).await;
                    drop(journaled);
                }
                .instrument(span),
            );
        }
        batch
    }

    async fn handle(self: &Arc<Self>, g: usize, ev: event::Event, file: Arc<File>, cached: Option<Arc<CachedBlob>>) {
        let t0 = Instant::now();
        let result = if ev.mask & FAN_PRE_ACCESS != 0 {
            self.fill(&file, cached, ev.range).await
        } else {
            Ok(0)
        };
        let response = match &result {
            Ok(_) => sys::FAN_ALLOW,
            Err(_) => sys::deny_with(libc::EIO),
        };
        if let Err(e) = sys::respond(self.group(g).as_fd(), file.as_fd(), response) {
            tracing::error!(error = %e, "fanotify response failed");
        }
        match result {
            Ok(filled) => {
                self.stats.allowed.fetch_add(1, Relaxed);
                self.stats.read_times.cold(t0.elapsed());
                tracing::debug!(latency_us = t0.elapsed().as_micros() as u64, filled, "allowed");
            }
            Err(e) => {
                self.stats.denied.fetch_add(1, Relaxed);
                tracing::warn!(latency_us = t0.elapsed().as_micros() as u64, pid = ev.pid, range = ?ev.range, error = %e, "read denied with EIO");
            }
        }
        // `file` (the event fd) is closed here, after the response.
    }
}

/// What became of a batch of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// Nothing of it waits: each event was answered as it was read (or had no fd).
    Settled,
    /// Some wait for a fetch (or a check of the disk) in tasks of their own.
    Pending,
}

/// Read events into `buf`: as many as `room` slots take (a pre-access event with its range
/// is 48 bytes), never less than 512 bytes, so one event always fits.
fn read_events(fan: &Fanotify, buf: &mut [u8], room: usize) -> io::Result<usize> {
    let len = room.saturating_mul(48).clamp(512, buf.len());
    sys::read_events(fan, &mut buf[..len])
}

/// Create `n` pre-content groups; fewer (with a warning) once the kernel refuses more, none
/// being an error.
fn create_groups(n: usize) -> io::Result<Vec<Fanotify>> {
    let mut groups = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        match sys::init() {
            Ok(g) => groups.push(g),
            Err(e) if groups.is_empty() => {
                let why = match e.raw_os_error() {
                    Some(libc::EMFILE) => "this user has fs.fanotify.max_user_groups groups already",
                    _ => "needs Linux 6.14+ with CONFIG_FANOTIFY_ACCESS_PERMISSIONS, and root",
                };
                return Err(io::Error::new(
                    e.kind(),
                    format!("fanotify_init(FAN_CLASS_PRE_CONTENT): {e} ({why})"),
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, wanted = n, created = groups.len(), "fewer fanotify groups than configured (fs.fanotify.max_user_groups?)");
                break;
            }
        }
    }
    Ok(groups)
}
