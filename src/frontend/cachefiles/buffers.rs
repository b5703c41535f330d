//! Write buffers for the anonymous fds, recycled. Writes through an object's anonymous fd are
//! direct I/O into its cache file, so they come from [`AlignedBuf`]s; a new one per unit
//! cost a fresh mapping, a page fault per 4 KiB and an unmapping (each costly in a VM), so
//! buffers go back to a [`Recycler`] once written.

#![forbid(unsafe_code)]

use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use super::device::{AlignedBuf, DIO_ALIGN};
use crate::recycle::Recycler;

/// Idle write buffers.
pub type WriteBufs = Recycler<AlignedBuf>;

/// Idle buffers kept: enough for the writes of a read-ahead window in flight (freed once idle).
pub const KEPT: usize = 8;

/// A write buffer on loan; it goes back when dropped.
pub struct WriteBuf {
    buf: Option<AlignedBuf>,
    bufs: Arc<WriteBufs>,
}

/// A buffer of `len` bytes rounded up to the alignment, all zeros.
pub fn zeroed(bufs: &Arc<WriteBufs>, len: usize) -> io::Result<WriteBuf> {
    let mut b = take(bufs, len)?;
    b.as_mut_slice().fill(0);
    Ok(b)
}

/// A buffer holding `data`, zeros after it up to the alignment.
pub fn holding(bufs: &Arc<WriteBufs>, data: &[u8]) -> io::Result<WriteBuf> {
    let mut b = take(bufs, data.len())?;
    let out = b.as_mut_slice();
    out[..data.len()].copy_from_slice(data);
    out[data.len()..].fill(0);
    Ok(b)
}

/// A buffer of `len` bytes rounded up to the alignment, holding whatever it held last.
fn take(bufs: &Arc<WriteBufs>, len: usize) -> io::Result<WriteBuf> {
    let want = len.max(1).div_ceil(DIO_ALIGN) * DIO_ALIGN;
    let mut buf = match bufs.reuse(|b| b.capacity() >= want && b.capacity() <= want.saturating_mul(2)) {
        Some(b) => b,
        None => AlignedBuf::zeroed(want)?,
    };
    buf.set_len(want);
    Ok(WriteBuf {
        buf: Some(buf),
        bufs: Arc::clone(bufs),
    })
}

impl Deref for WriteBuf {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("a WriteBuf holds its buffer until dropped")
    }
}

impl DerefMut for WriteBuf {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("a WriteBuf holds its buffer until dropped")
    }
}

impl Drop for WriteBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.bufs.give_back(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_buffer_holds_exactly_the_new_bytes_and_zeros() {
        let bufs = WriteBufs::new(KEPT);
        let first = holding(&bufs, &[9; 10_000]).unwrap();
        let addr = first.as_slice().as_ptr();
        drop(first);
        assert_eq!(bufs.idle(), 1);
        let b = holding(&bufs, &[5; 5_000]).unwrap();
        assert_eq!(b.as_slice().as_ptr(), addr, "reused");
        assert_eq!(b.as_slice().len(), 8192);
        assert!(b.as_slice()[..5_000].iter().all(|&x| x == 5));
        assert!(
            b.as_slice()[5_000..].iter().all(|&x| x == 0),
            "no old bytes after the data"
        );
        drop(b);
        let z = zeroed(&bufs, 12_000).unwrap();
        assert!(z.as_slice().iter().all(|&x| x == 0));
        assert_eq!(z.as_slice().as_ptr() as usize % DIO_ALIGN, 0);
    }
}
