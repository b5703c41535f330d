//! The fanotify syscalls of the pre-content frontend. All `unsafe` of this family is here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use super::event::FAN_PRE_ACCESS;

/// `FAN_ALLOW`.
pub const FAN_ALLOW: u32 = 0x01;
/// `FAN_DENY`.
pub const FAN_DENY: u32 = 0x02;

/// `FAN_DENY | FAN_ERRNO(errno)` (6.14+): the reader's syscall fails with `errno`.
pub fn deny_with(errno: i32) -> u32 {
    FAN_DENY | (((errno as u32) & 0xff) << 24)
}

/// A pre-content fanotify group (`FAN_CLASS_PRE_CONTENT`, non-blocking; event fds O_RDWR so
/// the listener can fill the ranges it is asked for).
pub fn init() -> io::Result<Fanotify> {
    Fanotify::init(
        InitFlags::FAN_CLASS_PRE_CONTENT
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::FAN_UNLIMITED_QUEUE,
        EventFFlags::O_RDWR | EventFFlags::O_LARGEFILE,
    )
    .map_err(io::Error::from)
}

/// Ask for `FAN_PRE_ACCESS` events on one file.
pub fn mark_pre_access(fan: &Fanotify, path: &Path) -> io::Result<()> {
    fan.mark(
        MarkFlags::FAN_MARK_ADD,
        MaskFlags::from_bits_retain(FAN_PRE_ACCESS),
        nix::fcntl::AT_FDCWD,
        Some(path),
    )
    .map_err(io::Error::from)
}

/// Remove the marks of one file.
pub fn unmark(fan: &Fanotify, path: &Path) -> io::Result<()> {
    fan.mark(
        MarkFlags::FAN_MARK_REMOVE,
        MaskFlags::from_bits_retain(FAN_PRE_ACCESS),
        nix::fcntl::AT_FDCWD,
        Some(path),
    )
    .map_err(io::Error::from)
}

/// An epoll set over the groups (level-triggered, beside the tokio reactor's), asked without
/// waiting which of them have events: the busy poll's one syscall per look.
pub struct ReadySet {
    epoll: Epoll,
    /// Room for every group's readiness in one look.
    events: Vec<EpollEvent>,
}

impl ReadySet {
    /// Group number `i` is reported as `i`.
    pub fn new<'a>(groups: impl ExactSizeIterator<Item = BorrowedFd<'a>>) -> io::Result<ReadySet> {
        let events = vec![EpollEvent::empty(); groups.len().max(1)];
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, fd) in groups.enumerate() {
            epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        }
        Ok(ReadySet { epoll, events })
    }

    /// The groups with events now, into `ready` (cleared first); never waits.
    pub fn ready(&mut self, ready: &mut Vec<usize>) -> io::Result<()> {
        ready.clear();
        let n = self.epoll.wait(&mut self.events, EpollTimeout::ZERO)?;
        ready.extend(self.events[..n].iter().map(|e| e.data() as usize));
        Ok(())
    }
}

/// Register the group with the tokio reactor.
pub fn into_async(fan: Fanotify) -> io::Result<tokio::io::unix::AsyncFd<Fanotify>> {
    // SAFETY: `Fanotify` owns its fd and returns the same descriptor from `as_raw_fd` for its
    // whole life; the AsyncFd takes ownership of it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fan, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Take ownership of a fanotify group fd received from elsewhere (inherited, SCM_RIGHTS).
///
/// The caller must own `fd` exclusively and it must be a fanotify group.
pub fn adopt_group(fd: OwnedFd) -> Fanotify {
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` came from an OwnedFd we just consumed, so this process owns it exactly
    // once; Fanotify closes it on drop.
    unsafe { Fanotify::from_raw_fd(raw) }
}

/// Take ownership of fd number `raw`, inherited from the daemon for this process alone (the
/// guard's group and pipe, passed by number on its command line by `Guard::spawn`). Only
/// the guard's entry point calls this, once per fd, before anything else runs; a number
/// that is not an open fd is refused.
pub fn inherited_fd(raw: std::os::fd::RawFd) -> io::Result<OwnedFd> {
    nix::fcntl::fcntl(
        // SAFETY: only borrowed for the F_GETFD check below, while nothing closes it.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("fd {raw} is not open: {e}")))?;
    // SAFETY: `raw` is open (checked above) and was inherited for this process alone; no
    // other owner exists (see the contract above), so exactly one OwnedFd closes it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
}

/// Read raw events (non-blocking: `WouldBlock` when none).
pub fn read_events(fan: &Fanotify, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fan.as_fd(), buf).map_err(io::Error::from)
}

/// Take ownership of the fd an event carries (the kernel opened it for us; we must close it).
pub fn adopt_event_fd(fd: i32) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel installed this fd in our table for this event only; nothing else in
    // the process knows it, so the OwnedFd is its single owner and closes it once.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Answer a permission event.
pub fn respond(fan: BorrowedFd<'_>, event_fd: BorrowedFd<'_>, response: u32) -> io::Result<()> {
    respond_raw(fan, event_fd.as_raw_fd(), response)
}

/// Answer a permission event by its fd number (the guard answering for a dead daemon).
pub fn respond_raw(fan: BorrowedFd<'_>, event_fd: RawFd, response: u32) -> io::Result<()> {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&event_fd.to_le_bytes());
    b[4..].copy_from_slice(&response.to_le_bytes());
    let n = nix::unistd::write(fan, &b).map_err(io::Error::from)?;
    if n != b.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short fanotify response"));
    }
    Ok(())
}

/// Whether this kernel offers pre-content events (6.14+): a group can be created, or the
/// kernel refused one only for the per-user group limit (`EMFILE`: the frontend exists, and
/// the daemon then says which limit is reached).
pub fn available() -> bool {
    match init() {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(libc::EMFILE),
    }
}

/// Map the journal `file` shared and writable: a record is a store into the page cache, not
/// a `pwrite` (which cost ~12 us per event on ext4, most of it the inode's time update).
pub fn map_journal(file: &std::fs::File) -> io::Result<memmap2::MmapMut> {
    // SAFETY: the file is a fresh inode this process created (0600, in the root-only state
    // directory) and put in place by rename; it is never truncated while mapped (a later
    // daemon replaces the path with another inode in the same way), so the mapping cannot
    // shrink under us. Only this process writes it while it lives; the guard and the next
    // daemon read or write it with read/pwrite only after this one is gone.
    unsafe { memmap2::MmapMut::map_mut(file) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn deny_errno_encoding() {
        assert_eq!(super::deny_with(libc::EIO), 0x0500_0002);
    }
}
