//! Metadata blobs kept resident: each mounted image's metadata blob (inodes, directories,
//! inline data) is mapped read-only and `mlock`ed, so directory walks and the inode lookup of
//! every file open never wait for the disk, even after the page cache was dropped or under
//! memory pressure. Data blobs are not pinned. (The `mmap`/`mlock` family lives here.)

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::path::Path;
use std::ptr::NonNull;

use nix::sys::mman::{mlock, mmap, munmap, MapFlags, ProtFlags};

/// A file's contents mapped and locked in memory until dropped.
pub struct Pinned {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is never read or written through this pointer (only handed back to
// munmap in Drop), so sharing or sending the handle across threads cannot race on memory.
unsafe impl Send for Pinned {}
// SAFETY: as above: `&Pinned` gives no access to the mapped memory.
unsafe impl Sync for Pinned {}

impl Pinned {
    /// Map `path` read-only and lock its pages in memory (reading them in now).
    pub fn new(path: &Path) -> io::Result<Option<Pinned>> {
        let file = File::open(path)?;
        let Some(len) = NonZeroUsize::new(file.metadata()?.len() as usize) else {
            return Ok(None);
        };
        // SAFETY: a fresh read-only shared mapping of a whole file, chosen by the kernel (no
        // fixed address, so nothing existing is replaced). It is never dereferenced by Rust
        // code, so a change of the file underneath could not produce an invalid read.
        let ptr = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, &file, 0) }?;
        let pinned = Pinned { ptr, len: len.get() };
        // SAFETY: `ptr..ptr + len` is exactly the mapping created above, still mapped.
        unsafe { mlock(pinned.ptr, pinned.len) }.map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!(
                    "mlock of {} ({} bytes): {e} (RLIMIT_MEMLOCK?)",
                    path.display(),
                    pinned.len
                ),
            )
        })?;
        Ok(Some(pinned))
    }

    /// Bytes locked.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is locked.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped exactly once (this handle owns it);
        // munmap also drops the lock.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_mapped_and_locked_then_released() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta");
        std::fs::write(&p, vec![7u8; 3 * 4096 + 5]).unwrap();
        let locked_kib = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find(|l| l.starts_with("VmLck:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
                .unwrap()
        };
        let before = locked_kib();
        match Pinned::new(&p) {
            Ok(Some(pin)) => {
                assert_eq!(pin.len(), 3 * 4096 + 5);
                assert!(locked_kib() >= before + 16, "four pages locked");
                drop(pin);
                assert_eq!(locked_kib(), before);
            }
            // without CAP_IPC_LOCK and a small RLIMIT_MEMLOCK the error must say so
            Err(e) => assert!(e.to_string().contains("RLIMIT_MEMLOCK"), "{e}"),
            Ok(None) => panic!("a non-empty file"),
        }
        std::fs::write(&p, b"").unwrap();
        assert!(Pinned::new(&p).unwrap().is_none(), "nothing to pin in an empty file");
    }
}
