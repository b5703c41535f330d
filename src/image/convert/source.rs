//! A source layer on its way to the decompressor. Its compressed bytes are spooled into an
//! unnamed temporary file as they arrive (from a registry, with retries that resume where a
//! dropped connection stopped, or from an OCI layout's blob file) while the decompressor reads
//! behind them: download and conversion overlap, and memory holds a few buffers whatever the
//! layer's size. The reader sees the end of the stream only once the whole layer matched its
//! digest; a mismatch, a failed download or one dropped midway is an error on the reader's next
//! read.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::image::digest::Digest;
use crate::lock::lock;
use crate::registry::range::RangeSink;
use crate::registry::RegistryError;

/// How far the download is.
#[derive(Debug, Clone)]
enum End {
    /// Bytes are still coming.
    Open,
    /// Every byte arrived and the digest matched.
    Verified,
    /// The download failed (why).
    Failed(String),
}

#[derive(Debug)]
struct Progress {
    written: u64,
    end: End,
}

/// The temporary file a layer is spooled into, shared by the downloader and the reader.
#[derive(Debug)]
pub struct Spool {
    file: File,
    progress: Mutex<Progress>,
    grown: Condvar,
}

impl Spool {
    /// A spool in an unnamed file under `dir`.
    pub fn new(dir: &Path) -> std::io::Result<Arc<Spool>> {
        Ok(Arc::new(Spool {
            file: tempfile::tempfile_in(dir)?,
            progress: Mutex::new(Progress {
                written: 0,
                end: End::Open,
            }),
            grown: Condvar::new(),
        }))
    }

    /// A spool over a complete local file (an OCI layout's blob): nothing is copied, and the
    /// reader sees its end once [`Spool::verify`] has checked its digest.
    pub fn of_file(file: File) -> std::io::Result<Arc<Spool>> {
        let written = file.metadata()?.len();
        Ok(Arc::new(Spool {
            file,
            progress: Mutex::new(Progress {
                written,
                end: End::Open,
            }),
            grown: Condvar::new(),
        }))
    }

    /// Check a spool made by [`Spool::of_file`] against `digest` and `size`; the reader is
    /// woken with the outcome.
    pub fn verify(&self, digest: &Digest, size: u64) -> Result<(), RegistryError> {
        let outcome = self.hash().and_then(|(len, got)| verdict(digest, size, len, &got));
        self.close(&outcome);
        outcome
    }

    fn hash(&self) -> Result<(u64, Digest), RegistryError> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            let n = self
                .file
                .read_at(&mut buf, at)
                .map_err(|e| RegistryError::Transport(format!("reading a layer: {e}")))?;
            if n == 0 {
                return Ok((at, Digest::from_raw(hasher.finalize().into())));
            }
            hasher.update(&buf[..n]);
            at += n as u64;
        }
    }

    /// The reading end, from the first byte.
    pub fn reader(self: &Arc<Self>) -> SpoolReader {
        SpoolReader {
            spool: self.clone(),
            at: 0,
        }
    }

    /// The download ended: wake the reader with the outcome.
    pub fn close(&self, outcome: &Result<(), RegistryError>) {
        lock(&self.progress).end = match outcome {
            Ok(()) => End::Verified,
            Err(e) => End::Failed(e.to_string()),
        };
        self.grown.notify_all();
    }
}

/// Whether a layer of `len` bytes hashing to `got` is the one expected.
fn verdict(digest: &Digest, size: u64, len: u64, got: &Digest) -> Result<(), RegistryError> {
    if len != size {
        return Err(RegistryError::Truncated {
            expected: size,
            got: len,
        });
    }
    if got != digest {
        return Err(RegistryError::DigestMismatch {
            what: format!("layer {digest}"),
            expected: digest.to_string(),
            got: got.to_string(),
        });
    }
    Ok(())
}

/// Receives a layer's bytes in order, writes them to the spool and checks the digest once the
/// last one arrived.
pub struct SpoolSink {
    spool: Arc<Spool>,
    hasher: Sha256,
    digest: Digest,
    size: u64,
}

impl SpoolSink {
    /// A sink for a blob of `size` bytes that must hash to `digest`.
    pub fn new(spool: Arc<Spool>, digest: Digest, size: u64) -> SpoolSink {
        SpoolSink {
            spool,
            hasher: Sha256::new(),
            digest,
            size,
        }
    }

    /// After the last byte: the outcome (the spool is closed with it).
    pub fn finish(&mut self, fetched: Result<(), RegistryError>) -> Result<(), RegistryError> {
        let written = self.resume_at();
        let outcome = fetched.and_then(|()| {
            let got = Digest::from_raw(std::mem::take(&mut self.hasher).finalize().into());
            verdict(&self.digest, self.size, written, &got)
        });
        self.spool.close(&outcome);
        outcome
    }
}

/// A download dropped before its end (the conversion failed elsewhere, say an upload) closes
/// the spool as failed: the decoder must not wait for bytes that never come.
impl Drop for SpoolSink {
    fn drop(&mut self) {
        if matches!(lock(&self.spool.progress).end, End::Open) {
            let why = format!("the download of layer {} stopped", self.digest);
            self.spool.close(&Err(RegistryError::Transport(why)));
        }
    }
}

impl RangeSink for SpoolSink {
    fn resume_at(&self) -> u64 {
        lock(&self.spool.progress).written
    }

    fn accept(&mut self, at: u64, data: Bytes) -> Result<(), RegistryError> {
        if at + data.len() as u64 > self.size {
            return Err(RegistryError::Truncated {
                expected: self.size,
                got: at + data.len() as u64,
            });
        }
        self.spool
            .file
            .write_all_at(&data, at)
            .map_err(|e| RegistryError::Transport(format!("spooling layer {}: {e}", self.digest)))?;
        self.hasher.update(&data);
        lock(&self.spool.progress).written = at + data.len() as u64;
        self.spool.grown.notify_all();
        Ok(())
    }

    fn abort_attempt(&mut self) {
        // every accepted byte is in the file: the next attempt asks for the rest
    }
}

/// Reads a spool as it grows (see the module comment).
pub struct SpoolReader {
    spool: Arc<Spool>,
    at: u64,
}

impl Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut progress = lock(&self.spool.progress);
        loop {
            if self.at < progress.written {
                let n = buf
                    .len()
                    .min(usize::try_from(progress.written - self.at).unwrap_or(usize::MAX));
                drop(progress);
                let n = self.spool.file.read_at(&mut buf[..n], self.at)?;
                self.at += n as u64;
                return Ok(n);
            }
            match &progress.end {
                End::Open => {
                    progress = self
                        .spool
                        .grown
                        .wait(progress)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                End::Verified => return Ok(0),
                End::Failed(why) => return Err(std::io::Error::other(why.clone())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_follows_the_download_and_sees_the_end_only_when_verified() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let spool = Spool::new(dir.path()).unwrap();
        let mut sink = SpoolSink::new(spool.clone(), Digest::of(&data), data.len() as u64);
        let mut reader = spool.reader();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).map(|_| got)
        });
        for (i, piece) in data.chunks(70_000).enumerate() {
            sink.accept(i as u64 * 70_000, Bytes::copy_from_slice(piece)).unwrap();
        }
        sink.finish(Ok(())).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), data);

        let spool = Spool::new(dir.path()).unwrap();
        let mut sink = SpoolSink::new(spool.clone(), Digest::of(b"other"), 3);
        let mut reader = spool.reader();
        sink.accept(0, Bytes::from_static(b"abc")).unwrap();
        assert!(sink.finish(Ok(())).is_err());
        let mut got = Vec::new();
        let err = reader.read_to_end(&mut got).unwrap_err();
        assert!(err.to_string().contains("mismatch"), "{err}");
        assert_eq!(got, b"abc");
    }

    #[test]
    fn a_download_dropped_midway_ends_the_reader_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path()).unwrap();
        let mut sink = SpoolSink::new(spool.clone(), Digest::of(b"abcdef"), 6);
        let mut reader = spool.reader();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = tx.send((reader.read_to_end(&mut got), got));
        });
        sink.accept(0, Bytes::from_static(b"abc")).unwrap();
        drop(sink);
        let (read, got) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the reader still waits for bytes after its download stopped");
        assert!(read.unwrap_err().to_string().contains("stopped"));
        assert_eq!(got, b"abc");
    }

    #[test]
    fn a_local_file_is_read_in_place_and_ends_only_when_its_digest_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"layer bytes").unwrap();
        for (digest, ok) in [(Digest::of(b"layer bytes"), true), (Digest::of(b"other"), false)] {
            let spool = Spool::of_file(File::open(&path).unwrap()).unwrap();
            let mut reader = spool.reader();
            let t = std::thread::spawn(move || {
                let mut got = Vec::new();
                reader.read_to_end(&mut got).map(|_| got)
            });
            assert_eq!(spool.verify(&digest, 11).is_ok(), ok);
            let read = t.join().unwrap();
            assert_eq!(read.is_ok(), ok, "{read:?}");
        }
        let spool = Spool::of_file(File::open(&path).unwrap()).unwrap();
        assert!(spool.verify(&Digest::of(b"layer bytes"), 12).is_err());
    }
}
