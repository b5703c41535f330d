//! Range bodies delivered piece by piece: a [`RangeSink`] receives the bytes of a range as they
//! arrive and says where a retry must resume, so a consumer can verify and hand out each
//! chunk as soon as it is complete, and a dropped connection costs only what was not accepted.

use bytes::{Bytes, BytesMut};

use super::RegistryError;

/// Receives the body of a range request (see [`super::Registry::fetch_range_into`]).
pub trait RangeSink {
    /// Blob offset the next request starts at: everything before it has been accepted.
    fn resume_at(&self) -> u64;
    /// `data` is body starting at blob offset `at` (always `resume_at()` plus what this
    /// attempt delivered so far). An error fails the attempt, which is then retried.
    fn accept(&mut self, at: u64, data: Bytes) -> Result<(), RegistryError>;
    /// The attempt failed: drop partial state so the next one starts at `resume_at()`.
    fn abort_attempt(&mut self);
    /// Before more of the body is read: a wait to finish first (back-pressure, see
    /// `engine::gate`), or `None` to read on at once.
    fn room(&self) -> Option<futures::future::BoxFuture<'static, ()>> {
        None
    }
    /// Who the range is for: a fetch ahead of readers leaves some of its host's slots to
    /// readers (`slots`).
    fn need(&self) -> super::slots::Need {
        super::slots::Need::Reader
    }
}

/// Collects a whole range into one buffer and runs `check` on it once complete; a failed
/// check discards it so the retry fetches the range again.
pub struct Collect<C> {
    offset: u64,
    len: usize,
    buf: BytesMut,
    check: C,
    done: Option<Bytes>,
}

impl<C: Fn(&[u8]) -> Result<(), RegistryError>> Collect<C> {
    pub fn new(offset: u64, len: u64, check: C) -> Self {
        Collect {
            offset,
            len: len as usize,
            buf: BytesMut::new(),
            check,
            done: None,
        }
    }

    /// The checked range; an error if the body never completed it. An empty range is
    /// checked here, as no body piece ever arrives for it.
    pub fn finish(self) -> Result<Bytes, RegistryError> {
        match self.done {
            Some(b) => Ok(b),
            None if self.len == 0 => (self.check)(&[]).map(|()| Bytes::new()),
            None => Err(RegistryError::Truncated {
                expected: self.len as u64,
                got: self.buf.len() as u64,
            }),
        }
    }
}

impl<C: Fn(&[u8]) -> Result<(), RegistryError>> RangeSink for Collect<C> {
    fn resume_at(&self) -> u64 {
        match self.done {
            Some(_) => self.offset + self.len as u64,
            None => self.offset + self.buf.len() as u64,
        }
    }

    fn accept(&mut self, _at: u64, data: Bytes) -> Result<(), RegistryError> {
        if self.buf.capacity() == 0 {
            self.buf.reserve(self.len);
        }
        self.buf.extend_from_slice(&data);
        if self.buf.len() == self.len {
            let full = std::mem::take(&mut self.buf).freeze();
            (self.check)(&full)?;
            self.done = Some(full);
        }
        Ok(())
    }

    fn abort_attempt(&mut self) {
        // bytes already received are kept: the next attempt asks for the rest only
    }
}
