//! The guard: no silent zeros when the daemon dies.
//!
//! A fanotify listener that exits normally takes its group with it, and reads of unfilled
//! holes then return zeros. So the daemon starts `lazyblob guard`, a small child process in
//! its own process group that holds a duplicate of the group fd and the read end of a pipe.
//! While the daemon lives the guard only waits on the pipe. A clean shutdown (mounts already
//! removed) writes `bye` and the guard exits. If the pipe closes without `bye` (crash,
//! `kill -9`), the guard takes over: it answers every pending and every new pre-content
//! event with `FAN_DENY` + `EIO`, so readers get errors, never zeros, and it waits on
//! `<state_dir>/guard.sock` to hand the group (with its marks) to the next daemon, which then
//! resumes serving the same mounts.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::fanotify::Fanotify;

use super::{event, fdpass, sys};

/// The socket a guard that took over listens on.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("guard.sock")
}

/// A running guard, owned by the daemon.
pub struct Guard {
    pipe: Option<OwnedFd>,
    child: Child,
}

impl Guard {
    /// Start `lazyblob guard` holding a duplicate of `group`.
    pub fn spawn(group: &Fanotify, state_dir: &Path) -> io::Result<Guard> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // dup() gives descriptors without FD_CLOEXEC: these two are what the child inherits
        let g = nix::unistd::dup(group.as_fd()).map_err(io::Error::from)?;
        let rr = nix::unistd::dup(r.as_fd()).map_err(io::Error::from)?;
        drop(r);
        let max_fd = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft.min(1 << 20))
            .unwrap_or(1024);
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg("guard")
            .arg("--group-fd")
            .arg(g.as_raw_fd().to_string())
            .arg("--pipe-fd")
            .arg(rr.as_raw_fd().to_string())
            .arg("--max-fd")
            .arg(max_fd.to_string())
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            // its own process group: a terminal's Ctrl-C or a kill of the daemon's group
            // does not take the guard down with the daemon
            .process_group(0)
            .spawn()?;
        drop(g);
        drop(rr);
        Ok(Guard { pipe: Some(w), child })
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

/// Ask a guard that took over for the fanotify group, if one is waiting.
pub fn reclaim(state_dir: &Path) -> io::Result<Option<Fanotify>> {
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
    tracing::warn!("took over the fanotify group from the guard of a daemon that died");
    Ok(Some(sys::adopt_group(fd)))
}

/// Entry point of `lazyblob guard`: never returns normally.
pub fn run(group_fd: RawFd, pipe_fd: RawFd, max_fd: u64, state_dir: &Path) -> io::Result<()> {
    let group = sys::adopt_group(sys::inherited_fd(group_fd)?);
    let mut pipe = std::fs::File::from(sys::inherited_fd(pipe_fd)?);
    let mut msg = Vec::new();
    let _ = pipe.read_to_end(&mut msg);
    if msg.starts_with(b"bye") {
        return Ok(());
    }
    eprintln!("lazyblob guard: the daemon died; denying reads with EIO until a daemon takes over");
    take_over(&group, max_fd, state_dir)
}

fn take_over(group: &Fanotify, max_fd: u64, state_dir: &Path) -> io::Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // Events the dead daemon read but never answered: the kernel matches a response by the
    // event's fd number only, so answer every number the daemon could have had.
    for fd in 0..max_fd as i32 {
        let _ = sys::respond_raw(group.as_fd(), fd, sys::deny_with(libc::EIO));
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            PollFd::new(group.as_fd(), PollFlags::POLLIN),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let group_ready = fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        let client_ready = fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        if group_ready {
            deny_all(group, &mut buf);
        }
        if client_ready {
            if let Ok((sock, _)) = listener.accept() {
                if !fdpass::peer_is_root(&sock).unwrap_or(false) {
                    eprintln!("lazyblob guard: refused a peer that is not root");
                    continue;
                }
                // answer what is queued, hand over, and leave
                deny_all(group, &mut buf);
                if fdpass::send_fd(&sock, group.as_fd()).is_ok() {
                    let _ = std::fs::remove_file(&path);
                    eprintln!("lazyblob guard: handed the fanotify group to the new daemon");
                    return Ok(());
                }
            }
        }
    }
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
