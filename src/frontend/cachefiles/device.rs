//! The syscalls of the cachefiles on-demand frontend: `/dev/cachefiles` itself and the
//! per-object anonymous fds. All `unsafe` of this syscall family lives here.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::protocol::{Command, MSG_MAX_SIZE};

/// Path of the cachefiles control device.
pub const DEVICE_PATH: &str = "/dev/cachefiles";

nix::ioctl_write_int_bad!(
    /// `ioctl(anon_fd, CACHEFILES_IOC_READ_COMPLETE, msg_id)`: `_IOW(0x98, 1, int)`.
    ioc_read_complete,
    nix::request_code_write!(0x98, 1, std::mem::size_of::<libc::c_int>())
);

/// The opened `/dev/cachefiles` (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Device {
    file: File,
}

impl Device {
    /// Open the control device. `EBUSY` means another daemon (e.g. cachefilesd) has it.
    pub fn open() -> io::Result<Device> {
        Self::open_path(Path::new(DEVICE_PATH))
    }

    /// Open a control device at an explicit path.
    pub fn open_path(path: &Path) -> io::Result<Device> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Device { file })
    }

    /// Write one text command (no trailing NUL).
    pub fn command(&self, cmd: &Command<'_>) -> io::Result<()> {
        let bytes = cmd.to_bytes();
        let n = (&self.file).write(&bytes)?;
        if n != bytes.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short command write"));
        }
        Ok(())
    }

    /// The device handed over by a guard (already open, bound to the cache, non-blocking).
    pub fn from_fd(fd: OwnedFd) -> Device {
        Device { file: File::from(fd) }
    }

    /// Register with the tokio reactor for readiness (POLLIN = a request is pending).
    pub fn into_async(self) -> io::Result<tokio::io::unix::AsyncFd<Device>> {
        // SAFETY: `Device` owns its `File`, so the fd stays open and `as_raw_fd` returns the
        // same descriptor for as long as the AsyncFd (which takes ownership) lives.
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
    }

    /// Read one pending message into `buf`; `Ok(0)` or `WouldBlock` when none is pending.
    pub fn read_message(&self, buf: &mut [u8; MSG_MAX_SIZE]) -> io::Result<usize> {
        (&self.file).read(buf)
    }
}

impl AsRawFd for Device {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The anonymous fd the kernel installed for one cache object.
#[derive(Debug)]
pub struct AnonFd {
    file: File,
}

impl AsFd for AnonFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AnonFd {
    /// Take ownership of the fd number carried in an OPEN message.
    ///
    /// Must be called exactly once per OPEN: the kernel installed `fd` in this process's
    /// fd table for us and nobody else owns it.
    pub fn from_open_message(fd: u32) -> io::Result<AnonFd> {
        let raw =
            RawFd::try_from(fd).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "anon fd out of range"))?;
        // Refuse fd numbers that are not open, rather than adopting a stranger's later fd.
        nix::fcntl::fcntl(
            // SAFETY: `raw` is only borrowed for this F_GETFD probe, which cannot close it.
            unsafe { BorrowedFd::borrow_raw(raw) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .map_err(io::Error::from)?;
        // SAFETY: the kernel created this fd for us in the OPEN request and transferred its
        // ownership to the daemon; no other code in this process holds or closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(AnonFd {
            file: File::from(owned),
        })
    }

    /// An object fd handed over by a guard (the kernel installed it for a previous daemon).
    pub fn from_fd(fd: OwnedFd) -> AnonFd {
        AnonFd { file: File::from(fd) }
    }

    /// Write `data` at `offset` (direct I/O: offset and buffer must be 4 KiB aligned).
    pub fn write_all_at(&self, data: &AlignedBuf, offset: u64) -> io::Result<()> {
        self.file.write_all_at(data.as_slice(), offset)
    }

    /// Tell the kernel a READ is finished; unwritten bytes of its range give readers `EIO`.
    pub fn read_complete(&self, msg_id: u32) -> io::Result<()> {
        let id = libc::c_int::try_from(msg_id)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "msg_id out of range"))?;
        // SAFETY: the fd is a live cachefiles anon fd owned by `self`; this ioctl takes its
        // argument by value (no pointer), so no memory is shared with the kernel.
        unsafe { ioc_read_complete(self.file.as_raw_fd(), id) }
            .map(drop)
            .map_err(io::Error::from)
    }
}

/// Alignment the anon fd's direct I/O needs.
pub const DIO_ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`DIO_ALIGN`], for direct-I/O writes.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to the alignment (at least one block).
    pub fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        let size = len.max(1).div_ceil(DIO_ALIGN) * DIO_ALIGN;
        let layout = std::alloc::Layout::from_size_align(size, DIO_ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuf { ptr, len: size, layout })
    }

    /// Bytes allocated (what [`AlignedBuf::set_len`] may use).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Use the first `len` bytes, rounded up to the alignment (at least one block, at most
    /// the capacity). They hold what was written there last (zeros in a new buffer).
    pub fn set_len(&mut self, len: usize) {
        self.len = (len.max(1).div_ceil(DIO_ALIGN) * DIO_ALIGN).min(self.capacity());
    }

    /// The whole (rounded-up) buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `capacity()` bytes owned by `self`, all initialised (zeroed
        // at allocation, written only through `as_mut_slice` since), and `len <= capacity()`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole buffer, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_uapi() {
        assert_eq!(
            nix::request_code_write!(0x98, 1, std::mem::size_of::<libc::c_int>()) as u64,
            0x4004_9801
        );
    }

    #[test]
    fn aligned_buffer_is_aligned_and_rounded() {
        let mut b = AlignedBuf::zeroed(5000).unwrap();
        assert_eq!(b.as_slice().len(), 8192);
        b.set_len(100);
        assert_eq!(b.as_slice().len(), 4096);
        b.set_len(1 << 20);
        assert_eq!(
            (b.as_slice().len(), b.capacity()),
            (8192, 8192),
            "never past the capacity"
        );
        assert_eq!(b.as_slice().as_ptr() as usize % DIO_ALIGN, 0);
        b.as_mut_slice()[8191] = 1;
        assert!(b.as_slice()[..8191].iter().all(|&x| x == 0));
    }
}
