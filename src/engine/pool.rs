//! Recycled unit buffers. A fetched unit lives in a buffer from this pool; when the last
//! `Bytes` referring to it is dropped (the frontend wrote it, the LRU evicted it), the buffer
//! goes back to the pool instead of to the allocator, so a sequential reader does not pay a
//! fresh mapping and its page faults per unit. The pool keeps a bounded number of buffers.

use std::sync::Arc;

use bytes::Bytes;

use crate::recycle::Recycler;

/// Idle unit buffers.
pub type BufPool = Recycler<Vec<u8>>;

impl BufPool {
    /// An empty buffer with room for `cap` bytes (reused when one of a fitting size is idle).
    pub fn take(self: &Arc<Self>, cap: usize) -> PoolBuf {
        let reused = self.reuse(|b| b.capacity() >= cap && b.capacity() <= cap.saturating_mul(2));
        PoolBuf {
            buf: reused.unwrap_or_else(|| Vec::with_capacity(cap)),
            pool: Arc::clone(self),
        }
    }
}

/// A buffer on loan from a [`BufPool`]; it returns there when dropped.
pub struct PoolBuf {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl PoolBuf {
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// Shareable bytes that hand the buffer back to the pool when the last clone is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        self.pool.give_back(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_clone_is_dropped_and_are_reused() {
        let pool = BufPool::new(2);
        let mut b = pool.take(1000);
        b.extend_from_slice(&[7; 1000]);
        let frozen = b.freeze();
        let clone = frozen.clone();
        drop(frozen);
        assert_eq!(pool.idle(), 0, "a clone still refers to it");
        assert_eq!(&clone[..], &[7; 1000][..]);
        drop(clone);
        assert_eq!(pool.idle(), 1);
        let again = pool.take(900);
        assert!(again.is_empty() && again.buf.capacity() >= 1000, "reused, emptied");
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn the_pool_keeps_a_bounded_number() {
        let pool = BufPool::new(1);
        let bufs: Vec<_> = (0..3).map(|_| pool.take(10)).collect();
        drop(bufs);
        assert_eq!(pool.idle(), 1);
    }
}
