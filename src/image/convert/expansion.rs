//! Bounds on what a decompressed layer may make the converter read and hold: the bytes the
//! whole tar stream expands to (a compression bomb stops at the limit, not at the disk's or
//! memory's end) and the bytes read between two entries, which the `tar` crate keeps in memory
//! (PAX and GNU long-name headers precede their entry and are read whole).

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

/// The shared state of a [`Bounded`] reader, for the code that drives the tar parser.
#[derive(Debug, Default)]
struct State {
    /// Bytes read in total.
    total: Cell<u64>,
    /// `Some(bytes read)` while headers are being read.
    headers: Cell<Option<u64>>,
}

/// Switches a [`Bounded`] reader between reading headers and reading entry data.
#[derive(Debug, Clone)]
pub struct Gate(Rc<State>);

impl Gate {
    /// What follows is headers (the parser looks for the next entry).
    pub fn headers(&self) {
        self.0.headers.set(Some(0));
    }

    /// What follows is an entry's data.
    pub fn data(&self) {
        self.0.headers.set(None);
    }

    /// Bytes of the decompressed stream read so far.
    pub fn total(&self) -> u64 {
        self.0.total.get()
    }
}

/// A reader that fails once the stream passes `max_total` bytes, or once more than
/// `max_headers` bytes are read while the [`Gate`] says headers.
pub struct Bounded<R> {
    inner: R,
    state: Rc<State>,
    max_total: u64,
    max_headers: u64,
}

impl<R: Read> Bounded<R> {
    /// Wrap `inner`; the gate starts on headers.
    pub fn new(inner: R, max_total: u64, max_headers: u64) -> (Bounded<R>, Gate) {
        let state = Rc::new(State::default());
        state.headers.set(Some(0));
        let gate = Gate(state.clone());
        (
            Bounded {
                inner,
                state,
                max_total,
                max_headers,
            },
            gate,
        )
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let total = self.state.total.get();
        if total > self.max_total {
            return Err(std::io::Error::other(format!(
                "the layer expands past the limit of {} bytes",
                self.max_total
            )));
        }
        // ask for at most one byte past a limit: passing it is the signal
        let mut room = self.max_total + 1 - total;
        if let Some(h) = self.state.headers.get() {
            if h > self.max_headers {
                return Err(std::io::Error::other(format!(
                    "tar headers (PAX or GNU long names) of one entry pass the limit of {} bytes",
                    self.max_headers
                )));
            }
            room = room.min(self.max_headers + 1 - h);
        }
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.state.total.set(total + n as u64);
        if let Some(h) = self.state.headers.get() {
            self.state.headers.set(Some(h + n as u64));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_and_header_limits() {
        let data = vec![0u8; 10_000];
        let (mut r, gate) = Bounded::new(&data[..], 5_000, 1_000);
        let mut buf = vec![0u8; 600];
        r.read_exact(&mut buf).unwrap();
        let err = r.read_exact(&mut buf).unwrap_err();
        assert!(err.to_string().contains("limit of 1000"), "{err}");
        gate.data();
        let mut sink = Vec::new();
        let err = r.read_to_end(&mut sink).unwrap_err();
        assert!(err.to_string().contains("expands past the limit of 5000"), "{err}");
        assert_eq!(gate.total(), 5_001);
        let (mut ok, _) = Bounded::new(&data[..], 10_000, 10_000);
        assert_eq!(ok.read_to_end(&mut sink).unwrap(), 10_000);
    }
}
