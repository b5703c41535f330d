//! Busy polling while cached data is re-read. Every kernel read of a marked cache file raises
//! an event, also when its range is cached: a reader going through data already here (its
//! page cache dropped, its blob not complete yet, so still marked) raises thousands, each
//! answered from memory in a few microseconds. What such an event costs is the wake-ups: the
//! event loop's thread sleeping in the reactor and, in a VM, its vCPU halted, 20-40 us to
//! wake each time, several times the answer. So after an event answered at once, one task
//! looks at every group for further events without sleeping, for `engine.busy_poll_us` after
//! the last one answered at once, yielding to the runtime every [`SLICE`] so other tasks run.
//! It costs up to one core while such reads go on and nothing once they stop; events that
//! need a fetch still go to tasks of their own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{read_events, sys, Batch, FanotifyFrontend};

/// Longest stretch of polling before the task yields to the runtime.
const SLICE: Duration = Duration::from_micros(100);

/// The busy poll's settings and state.
pub(super) struct BusyPoll {
    /// How long polling goes on after the last event answered at once (None: never).
    window: Option<Duration>,
    /// When the last event was answered at once, by whichever loop read it: nanoseconds
    /// since `epoch`.
    last_answer: AtomicU64,
    epoch: Instant,
    /// Signalled on an answer given at once while not polling.
    start: tokio::sync::Notify,
    /// Whether the task is polling now (the loops do not signal it then).
    polling: AtomicBool,
}

impl BusyPoll {
    pub(super) fn new(window: Option<Duration>) -> BusyPoll {
        BusyPoll {
            window,
            last_answer: AtomicU64::new(0),
            epoch: Instant::now(),
            start: tokio::sync::Notify::new(),
            polling: AtomicBool::new(false),
        }
    }

    /// An event was answered at once: poll for the next ones (on until `window` has passed
    /// without such an answer, whichever loop gives it).
    pub(super) fn answered(&self) {
        if self.window.is_none() {
            return;
        }
        self.last_answer.store(self.epoch.elapsed().as_nanos() as u64, Relaxed);
        if !self.polling.load(Relaxed) {
            self.start.notify_one();
        }
    }

    /// Time since the last answer given at once.
    fn quiet(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_nanos(self.last_answer.load(Relaxed)))
    }
}

impl FanotifyFrontend {
    /// Poll the groups each time an event loop signals, until `shutdown` fires.
    pub(super) async fn run_busy_poll(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(window) = self.busy_poll.window else {
            return;
        };
        let mut set = match sys::ReadySet::new(self.groups()) {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(error = %e, "no busy poll: epoll over the fanotify groups failed");
                return;
            }
        };
        let (mut ready, mut buf) = (Vec::with_capacity(self.groups.len()), vec![0u8; 4096]);
        loop {
            tokio::select! {
                _ = self.busy_poll.start.notified() => {}
                _ = shutdown.changed() => return,
            }
            self.busy_poll.polling.store(true, Relaxed);
            let mut slice = Instant::now();
            while self.busy_poll.quiet() < window {
                if slice.elapsed() >= SLICE {
                    tokio::task::yield_now().await;
                    slice = Instant::now();
                }
                // a full admission stops the loops reading; the poll stops with them
                let room = self.admission.room_now();
                if room == 0 {
                    break;
                }
                if let Err(e) = set.ready(&mut ready) {
                    tracing::warn!(error = %e, "busy poll stopped: epoll_wait failed");
                    break;
                }
                if ready.is_empty() {
                    std::hint::spin_loop();
                }
                for &g in &ready {
                    let n = match read_events(self.group(g), &mut buf, room) {
                        Ok(n) if n > 0 => n,
                        // none left (the group's own loop read them first), or an error,
                        // which that loop meets too and handles
                        _ => continue,
                    };
                    self.stats.busy_poll_reads.fetch_add(1, Relaxed);
                    // the tasks it spawned run now, not after the poll
                    if let Batch::Pending = self.dispatch(g, &buf[..n]) {
                        tokio::task::yield_now().await;
                        slice = Instant::now();
                    }
                }
            }
            self.busy_poll.polling.store(false, Relaxed);
        }
    }
}
