//! A data blob written to an unnamed temporary file as files stream in, hashed on a second
//! thread while it is written: every byte passes once through the blob's SHA-256 and once
//! through its chunk digest, and never more than a few buffers are held in memory. The
//! converter's path, where a layer may hold more data than the machine has memory.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest as _, Sha256};

use super::digest::Digest;
use super::format::{BlobChunks, Hashing};
use super::tree::FileData;

/// Size of the buffers handed from the writer to the hashing thread.
const BUF: usize = 1 << 20;
/// Buffers in flight between the two threads (memory: `BUFFERS * BUF`).
const BUFFERS: usize = 4;
/// File data is laid out on this boundary.
const ALIGN: u64 = 4096;

/// Where file contents go while a layer is applied: a data blob being built.
pub trait FileSink {
    /// Append exactly `size` bytes of `r` on a 4 KiB boundary; where they landed.
    fn add_reader(&mut self, r: &mut dyn Read, size: u64) -> std::io::Result<FileData>;
}

/// A finished spooled blob: its bytes (padded to whole blocks) and digests.
#[derive(Debug)]
pub struct SpooledBlob {
    /// The blob's bytes, from offset 0; the file has no name and goes when dropped.
    pub file: File,
    /// Its digest, size and chunk digests.
    pub chunks: BlobChunks,
}

/// A data blob being written (see the module comment).
pub struct BlobSpool {
    device: u16,
    len: u64,
    buf: Vec<u8>,
    full: Option<SyncSender<Vec<u8>>>,
    empty: Receiver<Vec<u8>>,
    worker: Option<JoinHandle<std::io::Result<SpooledBlob>>>,
}

impl BlobSpool {
    /// A spool for data blob `device` (1-based) in a temporary file under `dir`.
    pub fn new(dir: &Path, device: u16, chunk_size: u64, hashing: Hashing) -> std::io::Result<BlobSpool> {
        let file = tempfile::tempfile_in(dir)?;
        let (full_tx, full_rx) = sync_channel::<Vec<u8>>(BUFFERS);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(BUFFERS + 1);
        let worker = std::thread::Builder::new()
            .name("lazyblob-hash".into())
            .spawn(move || hash_and_write(file, full_rx, empty_tx, chunk_size, hashing))?;
        Ok(BlobSpool {
            device,
            len: 0,
            buf: Vec::with_capacity(BUF),
            full: Some(full_tx),
            empty: empty_rx,
            worker: Some(worker),
        })
    }

    /// Queue the current buffer for the hashing thread and take an empty one.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut next = self.empty.try_recv().unwrap_or_else(|_| Vec::with_capacity(BUF));
        next.clear();
        let full = std::mem::replace(&mut self.buf, next);
        let sent = self.full.as_ref().is_some_and(|tx| tx.send(full).is_ok());
        if !sent {
            // the worker stopped: its error says why
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| std::io::Error::other("hashing thread stopped")));
        }
        Ok(())
    }

    fn write_zeros(&mut self, mut n: u64) -> std::io::Result<()> {
        while n > 0 {
            let room = (BUF - self.buf.len()).min(n as usize);
            self.buf.resize(self.buf.len() + room, 0);
            self.len += room as u64;
            n -= room as u64;
            if self.buf.len() == BUF {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let pad = self.len.next_multiple_of(ALIGN) - self.len;
        self.write_zeros(pad)
    }

    /// Pad to a whole block and wait for the hashing thread; `None` when nothing was written.
    pub fn finish(mut self) -> std::io::Result<Option<SpooledBlob>> {
        self.pad()?;
        self.flush()?;
        let blob = self.join()?;
        Ok((blob.chunks.size > 0).then_some(blob))
    }

    fn join(&mut self) -> std::io::Result<SpooledBlob> {
        self.full = None;
        match self.worker.take() {
            Some(w) => w
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("hashing thread panicked"))),
            None => Err(std::io::Error::other("spool already finished")),
        }
    }
}

impl FileSink for BlobSpool {
    fn add_reader(&mut self, r: &mut dyn Read, size: u64) -> std::io::Result<FileData> {
        self.pad()?;
        let offset = self.len;
        let mut left = size;
        while left > 0 {
            let at = self.buf.len();
            let want = (BUF - at).min(left as usize);
            self.buf.resize(at + want, 0);
            let n = match r.read(&mut self.buf[at..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    self.buf.truncate(at);
                    return Err(e);
                }
            };
            self.buf.truncate(at + n);
            if n == 0 && want > 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("truncated: {} of {size} bytes", size - left),
                ));
            }
            self.len += n as u64;
            left -= n as u64;
            if self.buf.len() == BUF {
                self.flush()?;
            }
        }
        Ok(FileData::Blob {
            device: self.device,
            offset,
            size,
        })
    }
}

/// The hashing thread: write each buffer to the file, feed the blob digest and the chunk
/// digests, hand the buffer back.
fn hash_and_write(
    file: File,
    full: Receiver<Vec<u8>>,
    empty: SyncSender<Vec<u8>>,
    chunk_size: u64,
    hashing: Hashing,
) -> std::io::Result<SpooledBlob> {
    let mut whole = Sha256::new();
    let layout = hashing.layout(chunk_size);
    let mut leaves = Vec::new();
    let mut chunk = hashing.chunk();
    let mut in_chunk = 0u64;
    let mut hex = String::new();
    let mut size = 0u64;
    // buffers arrive whole (1 MiB, the last one shorter): written as they are
    for buf in full {
        (&file).write_all(&buf)?;
        whole.update(&buf);
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let take = ((chunk_size - in_chunk) as usize).min(rest.len());
            chunk.update(&rest[..take]);
            in_chunk += take as u64;
            rest = &rest[take..];
            if in_chunk == chunk_size {
                let done = std::mem::replace(&mut chunk, hashing.chunk());
                hex.push_str(&hex::encode(done.finish(layout, &mut leaves)));
                in_chunk = 0;
            }
        }
        size += buf.len() as u64;
        let _ = empty.try_send(buf);
    }
    if in_chunk > 0 {
        hex.push_str(&hex::encode(chunk.finish(layout, &mut leaves)));
    }
    Ok(SpooledBlob {
        file,
        chunks: BlobChunks {
            digest: Digest::from_raw(whole.finalize().into()),
            size,
            chunks: hex,
            leaves,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::format::ChunkDigest;

    fn leaves() -> Hashing {
        Hashing::with_default_leaves(ChunkDigest::Blake3, 65536)
    }

    fn spool(files: &[&[u8]], chunk: u64) -> (Vec<u8>, BlobChunks) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = BlobSpool::new(dir.path(), 1, chunk, leaves()).unwrap();
        for f in files {
            s.add_reader(&mut &f[..], f.len() as u64).unwrap();
        }
        let b = s.finish().unwrap().unwrap();
        let mut data = vec![0u8; b.chunks.size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&b.file, &mut data, 0).unwrap();
        (data, b.chunks)
    }

    #[test]
    fn same_bytes_and_digests_as_the_in_memory_writer() {
        let a: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let b = vec![9u8; 5000];
        // several megabytes: buffers go round between the two threads
        let (data, chunks) = spool(&[&a, &b, &a[..10], &a, &a], 65536);
        let mut w = super::super::build::BlobWriter::new(1);
        for f in [&a[..], &b[..], &a[..10], &a, &a] {
            w.add(0, f);
        }
        let mem = w.into_padded();
        assert!(data == mem[0], "spooled bytes differ");
        assert_eq!(chunks, BlobChunks::of(&mem[0], 65536, leaves()));
        // one slot of 4 leaf values per 64 KiB chunk
        assert_eq!(chunks.leaves.len() as u64, chunks.size.div_ceil(65536) * 4 * 32);
        assert_eq!(
            chunks.chunks,
            BlobChunks::of(&mem[0], 65536, ChunkDigest::Blake3).chunks
        );
    }

    #[test]
    fn truncated_input_is_an_error_and_nothing_written_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = BlobSpool::new(dir.path(), 1, 65536, ChunkDigest::Sha256.into()).unwrap();
        let err = s.add_reader(&mut &[1u8; 10][..], 20).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let s = BlobSpool::new(dir.path(), 1, 65536, ChunkDigest::Sha256.into()).unwrap();
        assert!(s.finish().unwrap().is_none());
    }
}
