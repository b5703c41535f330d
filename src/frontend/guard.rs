//! The guard: a daemon that stops or dies costs its readers a pause, not an error, and never
//! zeros, on either kernel frontend.
//!
//! The daemon starts `lazyblob guard`, a small child process in its own process group that
//! holds a duplicate of the kernel fds (the fanotify groups, or `/dev/cachefiles` bound to
//! the cache), the read end of a pipe, and a socket on which the daemon hands it the fds the next
//! daemon will need, each under a key, once: fanotify blobs' writers (event fds, which write
//! into a cache file without raising events), cachefiles objects' anonymous fds with their
//! keys (the kernel fails a READ whose object fd closes, and a new daemon needs the fd to
//! answer the READs `restore` sends again). While the daemon lives the guard only keeps
//! these. A clean shutdown (mounts already removed) writes `bye` and the guard exits. If the
//! pipe closes without `bye` (crash, `kill -9`, a stop under busy mounts, an upgrade), the
//! guard takes over and waits on `<state_dir>/guard.sock`:
//!
//! - for `hold` it answers nothing: readers wait in the kernel;
//! - a daemon that connects gets the kernel fd and everything kept, and serves the readers;
//! - past `hold` without a daemon: fanotify events are denied with `EIO` (pending and new,
//!   never zeros) while it still waits to hand over; the events the dead daemon read are
//!   answered by fd number in slices, lowest first, between looks at the queues, so new
//!   readers are not kept waiting by the sweep; a cachefiles guard exits, and the kernel
//!   fails the pending reads with `EIO`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::fanotify::{event, journal, sys};
use super::fdpass;
use super::Frontend;

/// The socket a guard that took over listens on.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("guard.sock")
}

/// What `lazyblob guard` is started with (fd numbers it inherited, and its settings).
#[derive(Debug, Clone)]
pub struct Args {
    /// Which frontend's fd it holds.
    pub kind: Frontend,
    /// The kernel fds: the fanotify groups or `/dev/cachefiles`.
    pub kernel_fds: Vec<RawFd>,
    /// The read end of the daemon's pipe.
    pub pipe_fd: RawFd,
    /// The guard's end of the keeper socket.
    pub keeper_fd: RawFd,
    /// Answer every fanotify fd number below this after `hold` (what the daemon could have had).
    pub max_fd: u64,
    /// How long readers are held for the next daemon.
    pub hold: Duration,
    /// The daemon's state directory (`guard.sock`, the fanotify journal).
    pub state_dir: PathBuf,
}

/// A running guard, owned by the daemon.
pub struct Guard {
    pipe: Option<OwnedFd>,
    keeper: UnixStream,
    child: Child,
}

/// An fd kept by the guard for the next daemon, under the daemon's key, with its details.
pub struct Kept {
    /// The daemon's key (a cachefiles object id; a hash of a cache file's identity).
    pub key: u64,
    /// What the daemon said about it (a cachefiles object's keys).
    pub detail: Vec<u8>,
    /// The fd.
    pub fd: OwnedFd,
}

/// What a new daemon gets from a guard: the kernel fds and the fds kept with them.
pub struct Handover {
    /// The fanotify groups (with their marks, in the daemon's order) or `/dev/cachefiles`
    /// (bound to the cache): never empty.
    pub kernel: Vec<OwnedFd>,
    /// What the old daemon kept with its guard.
    pub kept: Vec<Kept>,
}

impl Guard {
    /// Start `lazyblob guard` holding duplicates of `kernel` (of frontend `kind`); it holds
    /// readers for `hold` should the daemon stop.
    pub fn spawn(
        kind: Frontend,
        kernel: &[std::os::fd::BorrowedFd<'_>],
        state_dir: &Path,
        hold: Duration,
    ) -> io::Result<Guard> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let (keeper, theirs) = UnixStream::pair()?;
        // dup() gives descriptors without FD_CLOEXEC: these are what the child inherits
        let g = kernel
            .iter()
            .map(|k| nix::unistd::dup(k).map_err(io::Error::from))
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        let rr = nix::unistd::dup(r.as_fd()).map_err(io::Error::from)?;
        let k = nix::unistd::dup(theirs.as_fd()).map_err(io::Error::from)?;
        drop((r, theirs));
        let max_fd = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft.min(1 << 20))
            .unwrap_or(1024);
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("guard").args(["--kind", kind.name()]);
        for k in &g {
            cmd.args(["--kernel-fd", &k.as_raw_fd().to_string()]);
        }
        let child = cmd
            .args(["--pipe-fd", &rr.as_raw_fd().to_string()])
            .args(["--keeper-fd", &k.as_raw_fd().to_string()])
            .args(["--max-fd", &max_fd.to_string()])
            .args(["--hold-ms", &hold.as_millis().to_string()])
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            // its own process group: a terminal's Ctrl-C or a kill of the daemon's group
            // does not take the guard down with the daemon
            .process_group(0)
            .spawn()?;
        drop((g, rr, k));
        keeper.set_nonblocking(true)?;
        Ok(Guard {
            pipe: Some(w),
            keeper,
            child,
        })
    }

    /// A handle on the keeper socket (see [`keep`] and [`forget`]).
    pub fn keeper(&self) -> io::Result<UnixStream> {
        self.keeper.try_clone()
    }

    /// The daemon is shutting down cleanly (no mounts left): let the guard go.
    pub fn release(mut self) {
        if let Some(w) = self.pipe.take() {
            let mut f = std::fs::File::from(w);
            let _ = f.write_all(b"bye");
        }
        let _ = self.child.wait();
    }
}

/// Hand `fd` to the guard under `key` with `detail` (best effort: a guard that does not keep
/// up costs readers their wait after a crash, nothing else).
pub fn keep(keeper: &UnixStream, key: u64, detail: &[u8], fd: std::os::fd::BorrowedFd<'_>) {
    let mut msg = Vec::with_capacity(9 + detail.len());
    msg.push(b'K');
    msg.extend_from_slice(&key.to_le_bytes());
    msg.extend_from_slice(detail);
    if let Err(e) = fdpass::send_fds(keeper, &[fd], &msg) {
        tracing::warn!(error = %e, "could not hand an fd to the guard");
    }
}

/// Tell the guard to drop what it keeps under `key`.
pub fn forget(keeper: &UnixStream, key: u64) {
    let mut msg = vec![b'D'];
    msg.extend_from_slice(&key.to_le_bytes());
    if let Err(e) = fdpass::send_fds(keeper, &[], &msg) {
        tracing::warn!(error = %e, "could not tell the guard to drop an fd");
    }
}

/// Ask a guard that took over for the kernel fds of frontend `kind` and what it kept, if one
/// is waiting.
pub fn reclaim(state_dir: &Path, kind: Frontend) -> io::Result<Option<Handover>> {
    let path = socket_path(state_dir);
    let sock = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !fdpass::peer_is_root(&sock)? {
        return Err(io::Error::other(format!(
            "{} is served by a process that is not root",
            path.display()
        )));
    }
    let kernel = fdpass::recv_fds(&sock, &mut [0u8; 1])?.1;
    let expected = match kind {
        Frontend::Fanotify => 1..=crate::config::MAX_FANOTIFY_GROUPS,
        Frontend::Cachefiles => 1..=1,
    };
    if !expected.contains(&kernel.len()) || kernel.iter().any(|k| fdpass::fd_kind(k) != Some(kind)) {
        return Err(io::Error::other(format!(
            "{} handed over {} fds that are not all {} fds",
            path.display(),
            kernel.len(),
            kind.name()
        )));
    }
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, fds) = fdpass::recv_fds(&sock, &mut buf)?;
        if n == 0 && fds.is_empty() {
            break;
        }
        if let (Some(fd), Some((key, detail))) = (fds.into_iter().next(), parse_keep(&buf[..n])) {
            kept.push(Kept {
                key,
                detail: detail.to_vec(),
                fd,
            });
        }
    }
    tracing::warn!(
        kept = kept.len(),
        frontend = kind.name(),
        "took over the kernel fd from the guard of a daemon that stopped"
    );
    Ok(Some(Handover { kernel, kept }))
}

/// `K<key><detail>`: the key and detail of a kept fd.
fn parse_keep(msg: &[u8]) -> Option<(u64, &[u8])> {
    let rest = msg.strip_prefix(b"K")?;
    let key = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    Some((key, &rest[8..]))
}

/// Entry point of `lazyblob guard`: never returns normally.
pub fn run(args: &Args) -> io::Result<()> {
    let kernel = args
        .kernel_fds
        .iter()
        .map(|&fd| sys::inherited_fd(fd))
        .collect::<io::Result<Vec<OwnedFd>>>()?;
    let pipe = std::fs::File::from(sys::inherited_fd(args.pipe_fd)?);
    let keeper = UnixStream::from(sys::inherited_fd(args.keeper_fd)?);
    let Some(kept) = keep_until_the_daemon_goes(&pipe, &keeper)? else {
        return Ok(()); // `bye`
    };
    eprintln!(
        "lazyblob guard: the daemon stopped; holding readers for {:?} until a daemon takes over",
        args.hold
    );
    take_over(kernel, kept, args)
}

/// Keep what the daemon hands over until the pipe closes: `None` after a `bye`.
fn keep_until_the_daemon_goes(pipe: &std::fs::File, keeper: &UnixStream) -> io::Result<Option<Vec<Kept>>> {
    let mut kept: HashMap<u64, Kept> = HashMap::new();
    let mut keeper_open = true;
    let mut buf = vec![0u8; 4096];
    loop {
        let mut fds = [
            PollFd::new(pipe.as_fd(), PollFlags::POLLIN),
            PollFd::new(keeper.as_fd(), PollFlags::POLLIN),
        ];
        let n = if keeper_open { 2 } else { 1 };
        match poll(&mut fds[..n], PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready = |f: &PollFd<'_>| {
            f.revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR))
        };
        if keeper_open && ready(&fds[1]) {
            match fdpass::recv_fds(keeper, &mut buf) {
                Ok((0, fds)) if fds.is_empty() => keeper_open = false,
                Ok((n, fds)) => match (buf[..n].first(), fds.into_iter().next()) {
                    (Some(b'K'), Some(fd)) => {
                        if let Some((key, detail)) = parse_keep(&buf[..n]) {
                            let detail = detail.to_vec();
                            kept.insert(key, Kept { key, detail, fd });
                        }
                    }
                    (Some(b'D'), _) if n >= 9 => {
                        let key = u64::from_le_bytes(buf[1..9].try_into().unwrap_or_default());
                        kept.remove(&key);
                    }
                    _ => {}
                },
                Err(_) => keeper_open = false,
            }
        }
        if ready(&fds[0]) {
            let mut msg = Vec::new();
            let _ = (&mut &*pipe).read_to_end(&mut msg);
            return Ok((!msg.starts_with(b"bye")).then(|| kept.into_values().collect()));
        }
    }
}

/// What a guard that took over does with the readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Answers nothing until `until`: readers wait in the kernel for the next daemon.
    Holding { until: Instant },
    /// Past the hold: new events are denied as they come, and the events the dead daemon
    /// read but never answered are denied by fd number, `next` onwards still to go.
    Sweeping { next: i32 },
    /// Every fd number the daemon could have had is answered; new events are denied.
    Denying,
}

/// fd numbers answered on every group between two looks at the queues: 1,024 numbers on 32
/// groups take about 60 ms, so new readers get their `EIO` without waiting for the whole
/// sweep (up to `RLIMIT_NOFILE` numbers per group: 1,048,576 under the shipped unit).
const SWEEP_SLICE: i32 = 1024;

fn take_over(kernel: Vec<OwnedFd>, kept: Vec<Kept>, args: &Args) -> io::Result<()> {
    let path = socket_path(&args.state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let groups = match args.kind {
        Frontend::Fanotify => kernel
            .iter()
            .map(|k| k.try_clone().map(sys::adopt_group))
            .collect::<io::Result<Vec<_>>>()?,
        Frontend::Cachefiles => Vec::new(),
    };
    let max_fd = i32::try_from(args.max_fd).unwrap_or(i32::MAX);
    let mut phase = Phase::Holding {
        until: Instant::now() + args.hold,
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        phase = match phase {
            Phase::Holding { until } if Instant::now() >= until => {
                if groups.is_empty() {
                    // cachefiles: closing the device fails the pending reads with EIO
                    eprintln!("lazyblob guard: no daemon took over in time; releasing the cache (reads get EIO)");
                    let _ = std::fs::remove_file(&path);
                    return Ok(());
                }
                eprintln!("lazyblob guard: no daemon took over in time; denying reads with EIO");
                journal::forget(&args.state_dir.join(journal::FILE_NAME));
                Phase::Sweeping { next: 0 }
            }
            Phase::Sweeping { next } => {
                // Events the dead daemon read but never answered: the kernel matches a
                // response by the event's fd number only, so answer every number the daemon
                // could have had, on every group (only the group holding that event accepts
                // it), lowest first: the kernel hands out the lowest free number.
                let end = next.saturating_add(SWEEP_SLICE).min(max_fd);
                deny_numbers(&groups, next..end);
                if end >= max_fd {
                    Phase::Denying
                } else {
                    Phase::Sweeping { next: end }
                }
            }
            other => other,
        };
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        // while holding, the queues are left alone for the next daemon
        if !matches!(phase, Phase::Holding { .. }) {
            fds.extend(groups.iter().map(|g| PollFd::new(g.as_fd(), PollFlags::POLLIN)));
        }
        let wait = match phase {
            Phase::Sweeping { .. } => PollTimeout::ZERO,
            Phase::Holding { .. } | Phase::Denying => PollTimeout::from(200u16),
        };
        match poll(&mut fds, wait) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let readable = |f: &PollFd<'_>| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        let client_ready = readable(&fds[0]);
        let ready: Vec<bool> = fds[1..].iter().map(readable).collect();
        drop(fds);
        for (g, _) in groups.iter().zip(ready).filter(|(_, r)| *r) {
            deny_all(g, &mut buf);
        }
        if client_ready {
            if let Ok((sock, _)) = listener.accept() {
                if !fdpass::peer_is_root(&sock).unwrap_or(false) {
                    eprintln!("lazyblob guard: refused a peer that is not root");
                    continue;
                }
                if let Phase::Sweeping { next } = phase {
                    // the new daemon does not know which numbers are left: finish first
                    deny_numbers(&groups, next..max_fd);
                }
                if !matches!(phase, Phase::Holding { .. }) {
                    for g in &groups {
                        deny_all(g, &mut buf);
                    }
                }
                if hand_over(&sock, &kernel, &kept).is_ok() {
                    let _ = std::fs::remove_file(&path);
                    eprintln!("lazyblob guard: handed the kernel fds over to the new daemon");
                    return Ok(());
                }
            }
        }
    }
}

/// The kernel fds first (one message, in order), then each kept fd with its key and detail;
/// the end of the stream ends the list.
fn hand_over(sock: &UnixStream, kernel: &[OwnedFd], kept: &[Kept]) -> io::Result<()> {
    let fds: Vec<_> = kernel.iter().map(|k| k.as_fd()).collect();
    fdpass::send_fds(sock, &fds, b"G")?;
    for k in kept {
        let mut msg = vec![b'K'];
        msg.extend_from_slice(&k.key.to_le_bytes());
        msg.extend_from_slice(&k.detail);
        fdpass::send_fds(sock, &[k.fd.as_fd()], &msg)?;
    }
    sock.shutdown(std::net::Shutdown::Write)
}

/// Deny, on every group, the events with these fd numbers (a number no event of a group has
/// is refused by the kernel, at about 2 us).
fn deny_numbers(groups: &[nix::sys::fanotify::Fanotify], numbers: std::ops::Range<i32>) {
    for g in groups {
        for fd in numbers.clone() {
            let _ = sys::respond_raw(g.as_fd(), fd, sys::deny_with(libc::EIO));
        }
    }
}

fn deny_all(group: &nix::sys::fanotify::Fanotify, buf: &mut [u8]) {
    while let Ok(n) = sys::read_events(group, buf) {
        if n == 0 {
            break;
        }
        let (events, _) = event::parse(&buf[..n]);
        for ev in events {
            if let Some(fd) = sys::adopt_event_fd(ev.fd) {
                let _ = sys::respond(group.as_fd(), fd.as_fd(), sys::deny_with(libc::EIO));
            }
        }
    }
}
