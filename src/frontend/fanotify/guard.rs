//! The guard: a daemon that dies costs its readers a pause, not an error, and never zeros.
//!
//! A fanotify listener that exits normally takes its group with it, and reads of unfilled
//! holes then return zeros. So the daemon starts `lazyblob guard`, a small child process in
//! its own process group that holds a duplicate of the group fd, the read end of a pipe,
//! and a socket on which the daemon hands it each blob's writer (an event fd, which writes
//! into the cache file without raising events). While the daemon lives the guard only
//! collects writers. A clean shutdown (mounts already removed) writes `bye` and the guard
//! exits. If the pipe closes without `bye` (crash, `kill -9`, a stop under busy mounts, an
//! upgrade), the guard takes over and waits on `<state_dir>/guard.sock`:
//!
//! - for `hold` it answers nothing: new events queue in the kernel and the dead daemon's
//!   unanswered ones stay pending, their readers blocked;
//! - a daemon that connects gets the group (with its marks) and the writers; it fills what
//!   the dead daemon's journal says was pending, answers it, and serves the queue;
//! - past `hold` without a daemon, it answers every pending and every new event with
//!   `FAN_DENY` + `EIO`: readers get errors, never zeros, and it still waits to hand over.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::fanotify::Fanotify;

use super::{event, fdpass, sys};

/// The socket a guard that took over listens on.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("guard.sock")
}

/// What `lazyblob guard` is started with (fd numbers it inherited, and its settings).
#[derive(Debug, Clone)]
pub struct Args {
    /// The fanotify group.
    pub group_fd: RawFd,
    /// The read end of the daemon's pipe.
    pub pipe_fd: RawFd,
    /// The guard's end of the writer socket.
    pub keeper_fd: RawFd,
    /// Answer every fd number below this after `hold` (what the daemon could have had).
    pub max_fd: u64,
    /// How long readers are held for the next daemon.
    pub hold: Duration,
    /// The daemon's state directory (`guard.sock`).
    pub state_dir: PathBuf,
}

/// A running guard, owned by the daemon.
pub struct Guard {
    pipe: Option<OwnedFd>,
    keeper: UnixStream,
    child: Child,
}

/// What a new daemon gets from a guard: the group and the blobs' writers.
pub struct Handover {
    /// The fanotify group, with its marks.
    pub group: Fanotify,
    /// Writers of cache files (event fds: writing through them raises no event).
    pub writers: Vec<OwnedFd>,
}

impl Guard {
    /// Start `lazyblob guard` holding a duplicate of `group`; it holds readers for `hold`
    /// should the daemon die.
    pub fn spawn(group: &Fanotify, state_dir: &Path, hold: Duration) -> io::Result<Guard> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let (keeper, theirs) = UnixStream::pair()?;
        // dup() gives descriptors without FD_CLOEXEC: these three are what the child inherits
        let g = nix::unistd::dup(group.as_fd()).map_err(io::Error::from)?;
        let rr = nix::unistd::dup(r.as_fd()).map_err(io::Error::from)?;
        let k = nix::unistd::dup(theirs.as_fd()).map_err(io::Error::from)?;
        drop((r, theirs));
        let max_fd = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft.min(1 << 20))
            .unwrap_or(1024);
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg("guard")
            .args(["--group-fd", &g.as_raw_fd().to_string()])
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

    /// A handle on the writer socket: each blob's writer is sent through it once.
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

/// Hand a cache file's writer to the guard (best effort: a guard that does not keep up
/// costs the file's readers their wait after a crash, nothing else).
pub fn keep_writer(keeper: &UnixStream, writer: &std::fs::File) {
    if let Err(e) = fdpass::send_fds(keeper, &[writer.as_fd()], b"W") {
        tracing::warn!(error = %e, "could not hand a cache file's writer to the guard");
    }
}

/// Ask a guard that took over for the fanotify group and the writers, if one is waiting.
pub fn reclaim(state_dir: &Path) -> io::Result<Option<Handover>> {
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
    let fd = fdpass::recv_fd(&sock)?;
    if !fdpass::is_fanotify(&fd) {
        return Err(io::Error::other(format!(
            "{} handed over something that is not a fanotify group",
            path.display()
        )));
    }
    let mut writers = Vec::new();
    loop {
        let (n, fds) = fdpass::recv_fds(&sock, &mut [0u8; 1])?;
        if n == 0 && fds.is_empty() {
            break;
        }
        writers.extend(fds);
    }
    tracing::warn!(
        writers = writers.len(),
        "took over the fanotify group from the guard of a daemon that stopped"
    );
    Ok(Some(Handover {
        group: sys::adopt_group(fd),
        writers,
    }))
}

/// Entry point of `lazyblob guard`: never returns normally.
pub fn run(args: &Args) -> io::Result<()> {
    let group = sys::adopt_group(sys::inherited_fd(args.group_fd)?);
    let pipe = std::fs::File::from(sys::inherited_fd(args.pipe_fd)?);
    let keeper = UnixStream::from(sys::inherited_fd(args.keeper_fd)?);
    let writers = keep_until_the_daemon_goes(&pipe, &keeper)?;
    let Some(writers) = writers else {
        return Ok(()); // `bye`
    };
    eprintln!(
        "lazyblob guard: the daemon stopped; holding readers for {:?} until a daemon takes over",
        args.hold
    );
    take_over(&group, writers, args)
}

/// Collect writers until the pipe closes: `None` after a `bye`, else the writers.
fn keep_until_the_daemon_goes(pipe: &std::fs::File, keeper: &UnixStream) -> io::Result<Option<Vec<OwnedFd>>> {
    let mut writers: Vec<OwnedFd> = Vec::new();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut keeper_open = true;
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
            match fdpass::recv_fds(keeper, &mut [0u8; 1]) {
                Ok((0, fds)) if fds.is_empty() => keeper_open = false,
                Ok((_, fds)) => {
                    for fd in fds {
                        let id =
                            std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).map(|m| (m.dev(), m.ino()));
                        if id.is_ok_and(|id| seen.insert(id)) {
                            writers.push(fd);
                        }
                    }
                }
                Err(_) => keeper_open = false,
            }
        }
        if ready(&fds[0]) {
            let mut msg = Vec::new();
            let _ = (&mut &*pipe).read_to_end(&mut msg);
            return Ok((!msg.starts_with(b"bye")).then_some(writers));
        }
    }
}

fn take_over(group: &Fanotify, writers: Vec<OwnedFd>, args: &Args) -> io::Result<()> {
    let path = socket_path(&args.state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let deadline = Instant::now() + args.hold;
    let mut denying = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !denying && Instant::now() >= deadline {
            denying = true;
            eprintln!("lazyblob guard: no daemon took over in time; denying reads with EIO");
            // Events the dead daemon read but never answered: the kernel matches a response
            // by the event's fd number only, so answer every number the daemon could have had.
            for fd in 0..args.max_fd as i32 {
                let _ = sys::respond_raw(group.as_fd(), fd, sys::deny_with(libc::EIO));
            }
            super::journal::forget(&args.state_dir.join(super::journal::FILE_NAME));
        }
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(group.as_fd(), PollFlags::POLLIN),
        ];
        // while holding, the queue is left alone for the next daemon
        let n = if denying { 2 } else { 1 };
        match poll(&mut fds[..n], PollTimeout::from(200u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let client_ready = fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        let group_ready = n == 2 && fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        if group_ready {
            deny_all(group, &mut buf);
        }
        if client_ready {
            if let Ok((sock, _)) = listener.accept() {
                if !fdpass::peer_is_root(&sock).unwrap_or(false) {
                    eprintln!("lazyblob guard: refused a peer that is not root");
                    continue;
                }
                if denying {
                    deny_all(group, &mut buf);
                }
                if hand_over(&sock, group, &writers).is_ok() {
                    let _ = std::fs::remove_file(&path);
                    eprintln!("lazyblob guard: handed the fanotify group to the new daemon");
                    return Ok(());
                }
            }
        }
    }
}

/// The group first, then the writers in batches; the end of the stream ends the list.
fn hand_over(sock: &UnixStream, group: &Fanotify, writers: &[OwnedFd]) -> io::Result<()> {
    fdpass::send_fd(sock, group.as_fd())?;
    for batch in writers.chunks(fdpass::MAX_FDS) {
        let fds: Vec<_> = batch.iter().map(|f| f.as_fd()).collect();
        fdpass::send_fds(sock, &fds, b"W")?;
    }
    sock.shutdown(std::net::Shutdown::Write)
}

fn deny_all(group: &Fanotify, buf: &mut [u8]) {
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
