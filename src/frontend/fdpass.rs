//! Passing file descriptors over a unix socket (SCM_RIGHTS): how the daemon hands fds to its
//! guard and the guard hands the kernel fds to the next daemon. The one `unsafe` of this
//! syscall family is here.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Whether the peer of `sock` runs as root (`SO_PEERCRED`): the group is handed only to,
/// and only taken from, root.
pub fn peer_is_root(sock: &UnixStream) -> io::Result<bool> {
    let cred =
        nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials).map_err(io::Error::from)?;
    Ok(cred.uid() == 0)
}

/// Which frontend's kernel fd `fd` is, by its `/proc/self/fd` link: a fanotify group
/// (`anon_inode:[fanotify]`) or the cachefiles device.
pub fn fd_kind(fd: &OwnedFd) -> Option<super::Frontend> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    if link.as_os_str() == "anon_inode:[fanotify]" {
        Some(super::Frontend::Fanotify)
    } else if link == std::path::Path::new(super::cachefiles::device::DEVICE_PATH) {
        Some(super::Frontend::Cachefiles)
    } else {
        None
    }
}

/// Most fds sent in one message (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 200;

/// Send up to [`MAX_FDS`] fds with a non-empty `payload`.
pub fn send_fds(sock: &UnixStream, fds: &[BorrowedFd<'_>], payload: &[u8]) -> io::Result<()> {
    let raw: Vec<std::os::fd::RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(payload)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    Ok(())
}

/// Receive one message (into `buf`) and the fds that came with it; `(0, [])` at the end of
/// the stream.
pub fn recv_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut out = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel installed these fds in our table with the message; we
                // are their only owner.
                out.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, out))
}
