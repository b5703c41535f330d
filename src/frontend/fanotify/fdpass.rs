//! Passing a file descriptor over a unix socket (SCM_RIGHTS): how the guard hands the
//! fanotify group to a restarted daemon. The one `unsafe` of this syscall family is here.

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

/// Whether `fd` is a fanotify group (its `/proc/self/fd` link is `anon_inode:[fanotify]`).
pub fn is_fanotify(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:[fanotify]")
}

/// Send `fd` with a one-byte message.
pub fn send_fd(sock: &UnixStream, fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(b"G")], &cmsg, MsgFlags::empty(), None).map_err(io::Error::from)?;
    Ok(())
}

/// Receive one fd sent with [`send_fd`].
pub fn recv_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel installed this fd in our table with the message; we are
                // its only owner (any extra fds in the message are not expected).
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no file descriptor in the message",
    ))
}
