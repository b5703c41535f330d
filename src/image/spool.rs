//! A data blob written to an unnamed temporary file as files stream in. Each full buffer goes
//! to two threads side by side: one writes it to the file, the other passes it once through
//! the blob's SHA-256 and once through its chunk digest; the buffer is reused once both are
//! done with it, so never more than a few are held in memory. The converter's path, where a
//! layer may hold more data than the machine has memory. (The write into the page cache and
//! the two digests took one thread 83% of a conversion's CPU time when they shared it.)
//! While it is written the blob can be read as it grows (`growing`), to be pushed before the
//! layer is done.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use sha2::{Digest as _, Sha256};

use super::digest::Digest;
use super::format::{BlobChunks, Hashing};
use super::growing::{Growing, Written};
use super::tree::FileData;

/// Size of the buffers handed to the writing and hashing threads.
const BUF: usize = 1 << 20;
/// Buffers queued for each of the two threads. Memory: about `2 * BUFFERS` buffers at most
/// (one thread may lag the other by a whole queue), plus the one being filled and one in
/// each thread's hands.
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

/// `BUF` bytes, initialized once (a reused block is not zeroed again), of which the first
/// `len` are the blob's.
struct Block {
    bytes: Box<[u8]>,
    len: usize,
}

impl Block {
    fn new() -> Block {
        Block {
            bytes: vec![0; BUF].into_boxed_slice(),
            len: 0,
        }
    }

    /// The blob's bytes in this block.
    fn data(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A block shared by the writing and the hashing thread; the last one done hands it back.
type Shared = Arc<Block>;

/// The two threads a spool feeds, and where each one's queue starts.
struct Workers {
    to_writer: SyncSender<Shared>,
    to_hasher: SyncSender<Shared>,
    /// The file and where the blob's progress is told, once every buffer is written.
    writer: JoinHandle<std::io::Result<(File, tokio::sync::watch::Sender<Written>)>>,
    hasher: JoinHandle<BlobChunks>,
}

/// A data blob being written (see the module comment).
pub struct BlobSpool {
    device: u16,
    len: u64,
    buf: Block,
    /// `None` once finished.
    workers: Option<Workers>,
    empty: Receiver<Block>,
    /// The blob as it grows, for readers that follow it.
    growing: Growing,
}

impl BlobSpool {
    /// A spool for data blob `device` (1-based) in a temporary file under `dir`.
    pub fn new(dir: &Path, device: u16, chunk_size: u64, hashing: Hashing) -> std::io::Result<BlobSpool> {
        let file = tempfile::tempfile_in(dir)?;
        let (progress, written) = tokio::sync::watch::channel(Written::Growing(0));
        let growing = Growing::new(Arc::new(file.try_clone()?), written);
        let (to_writer, writer_rx) = sync_channel::<Shared>(BUFFERS);
        let (to_hasher, hasher_rx) = sync_channel::<Shared>(BUFFERS);
        let (empty_tx, empty_rx) = sync_channel::<Block>(BUFFERS + 1);
        let give_back = empty_tx.clone();
        let writer = std::thread::Builder::new()
            .name("lazyblob-write".into())
            .spawn(move || write(file, writer_rx, give_back, progress))?;
        let hasher = std::thread::Builder::new()
            .name("lazyblob-hash".into())
            .spawn(move || hash(hasher_rx, empty_tx, chunk_size, hashing))?;
        Ok(BlobSpool {
            device,
            len: 0,
            buf: Block::new(),
            workers: Some(Workers {
                to_writer,
                to_hasher,
                writer,
                hasher,
            }),
            empty: empty_rx,
            growing,
        })
    }

    /// The blob as it is written, for a reader that follows it (ends when it is finished,
    /// fails when the spool does or is dropped unfinished).
    pub fn growing(&self) -> Growing {
        self.growing.clone()
    }

    /// Queue the current buffer for the writing and hashing threads and take an empty one.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.len == 0 {
            return Ok(());
        }
        let mut next = self.empty.try_recv().unwrap_or_else(|_| Block::new());
        next.len = 0;
        let full = Arc::new(std::mem::replace(&mut self.buf, next));
        let sent = self
            .workers
            .as_ref()
            .is_some_and(|w| w.to_writer.send(Arc::clone(&full)).is_ok() && w.to_hasher.send(full).is_ok());
        if !sent {
            // a thread stopped: the writer's error says why
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| std::io::Error::other("spool thread stopped")));
        }
        Ok(())
    }

    fn write_zeros(&mut self, mut n: u64) -> std::io::Result<()> {
        while n > 0 {
            let at = self.buf.len;
            let room = (BUF - at).min(n as usize);
            self.buf.bytes[at..at + room].fill(0);
            self.buf.len += room;
            self.len += room as u64;
            n -= room as u64;
            if self.buf.len == BUF {
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
        let (blob, progress) = self.join()?;
        progress.send_replace(Written::Done(blob.chunks.size));
        Ok((blob.chunks.size > 0).then_some(blob))
    }

    /// Close both queues and wait for both threads; the blob, and where its progress is told.
    fn join(&mut self) -> std::io::Result<(SpooledBlob, tokio::sync::watch::Sender<Written>)> {
        let Some(Workers {
            to_writer,
            to_hasher,
            writer,
            hasher,
        }) = self.workers.take()
        else {
            return Err(std::io::Error::other("spool already finished"));
        };
        drop((to_writer, to_hasher));
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("spool writing thread panicked")));
        let chunks = hasher
            .join()
            .map_err(|_| std::io::Error::other("spool hashing thread panicked"));
        let (file, progress) = written?;
        Ok((SpooledBlob { file, chunks: chunks? }, progress))
    }
}

impl FileSink for BlobSpool {
    fn add_reader(&mut self, r: &mut dyn Read, size: u64) -> std::io::Result<FileData> {
        self.pad()?;
        let offset = self.len;
        let mut left = size;
        while left > 0 {
            let at = self.buf.len;
            let want = (BUF - at).min(left as usize);
            let n = match r.read(&mut self.buf.bytes[at..at + want]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            };
            self.buf.len += n;
            if n == 0 && want > 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("truncated: {} of {size} bytes", size - left),
                ));
            }
            self.len += n as u64;
            left -= n as u64;
            if self.buf.len == BUF {
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

/// Hand a buffer back for reuse when the other thread is done with it too.
fn release(buf: Shared, empty: &SyncSender<Block>) {
    if let Some(v) = Arc::into_inner(buf) {
        let _ = empty.try_send(v);
    }
}

/// The writing thread: append each buffer to the file and tell how much is written. On an
/// error it stops (dropping `progress`: followers fail), and the spool's next send fails.
fn write(
    file: File,
    full: Receiver<Shared>,
    empty: SyncSender<Block>,
    progress: tokio::sync::watch::Sender<Written>,
) -> std::io::Result<(File, tokio::sync::watch::Sender<Written>)> {
    let mut written = 0u64;
    for buf in full {
        (&file).write_all(buf.data())?;
        written += buf.len as u64;
        progress.send_replace(Written::Growing(written));
        release(buf, &empty);
    }
    Ok((file, progress))
}

/// The hashing thread: feed the blob digest and the chunk digests with each buffer.
fn hash(full: Receiver<Shared>, empty: SyncSender<Block>, chunk_size: u64, hashing: Hashing) -> BlobChunks {
    let mut whole = Sha256::new();
    let layout = hashing.layout(chunk_size);
    let mut leaves = Vec::new();
    let mut chunk = hashing.chunk();
    let mut in_chunk = 0u64;
    let mut hex = String::new();
    let mut size = 0u64;
    // buffers arrive whole (1 MiB, the last one shorter)
    for buf in full {
        whole.update(buf.data());
        let mut rest = buf.data();
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
        size += buf.len as u64;
        release(buf, &empty);
    }
    if in_chunk > 0 {
        hex.push_str(&hex::encode(chunk.finish(layout, &mut leaves)));
    }
    BlobChunks {
        digest: Digest::from_raw(whole.finalize().into()),
        size,
        chunks: hex,
        leaves,
    }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_reads_the_blob_as_written_and_an_abandoned_spool_fails_it() {
        use futures::TryStreamExt;
        let follow = |g: Growing| tokio::spawn(g.stream(100_000).map_ok(|b| b.to_vec()).try_concat());
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..3_000_001u32).map(|i| (i * 13 % 253) as u8).collect();
        let mut s = BlobSpool::new(dir.path(), 1, 65536, leaves()).unwrap();
        let follower = follow(s.growing());
        s.add_reader(&mut &a[..], a.len() as u64).unwrap();
        let b = s.finish().unwrap().unwrap();
        let followed = follower.await.unwrap().unwrap();
        let mut data = vec![0u8; b.chunks.size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&b.file, &mut data, 0).unwrap();
        assert_eq!(followed.len() as u64, b.chunks.size, "padding included");
        assert!(followed == data, "the follower read the finished blob");

        let mut s = BlobSpool::new(dir.path(), 1, 65536, leaves()).unwrap();
        let follower = follow(s.growing());
        s.add_reader(&mut &a[..], a.len() as u64).unwrap();
        drop(s);
        assert!(follower.await.unwrap().is_err(), "a spool dropped unfinished");
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
