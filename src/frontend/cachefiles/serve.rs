//! The cachefiles event loop: one task reads messages from `/dev/cachefiles`; every READ is
//! served on its own task, so a slow fetch never holds up another request.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::io;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tracing::Instrument;

use super::buffers::{self, WriteBuf, WriteBufs};
use super::device::{AnonFd, Device, DIO_ALIGN};
use super::failover;
use super::leaves::ByLeaves;
use super::protocol::{erofs_fsid, Command, Message, MSG_MAX_SIZE};
use crate::catalog::{Catalog, Target};
use crate::engine::Engine;
use crate::frontend::admission::Admission;
use crate::frontend::leaf_book::LeafBook;
use crate::frontend::readahead::ReadAhead;

/// Counters exported in `status`.
#[derive(Debug, Default, Serialize)]
pub struct CachefilesStats {
    /// OPENs answered.
    pub opens: AtomicU64,
    /// OPENs refused (unknown image or blob).
    pub opens_refused: AtomicU64,
    /// READs received.
    pub reads: AtomicU64,
    /// READs that failed.
    pub reads_failed: AtomicU64,
    /// CLOSEs received.
    pub closes: AtomicU64,
    /// Messages that did not parse.
    pub bad_messages: AtomicU64,
    /// Bytes written into the cache.
    pub bytes_written: AtomicU64,
    /// Units written ahead of sequential readers.
    pub units_ahead: AtomicU64,
    /// Units (or the rest of a chunk's leaves) written by the startup prefetch of images.
    pub units_startup: AtomicU64,
    /// Units (or the rest of a chunk's leaves) written by the background fill of objects.
    pub units_background: AtomicU64,
    /// Leaf reads: requests for some leaves of a chunk (format 3), each checked by its leaves.
    pub leaf_reads: AtomicU64,
    /// Read latencies for the metrics endpoint.
    #[serde(skip)]
    pub read_times: crate::metrics::ReadTimes,
}

/// One object the kernel opened: its anon fd and the blob behind it.
pub(super) struct Object {
    pub(super) fd: AnonFd,
    pub(super) target: Target,
    pub(super) name: String,
    /// Its volume and cookie keys, as kept with the guard (see `failover`).
    pub(super) keys: Vec<u8>,
    /// Read-ahead of its sequential readers (a data blob's, in table chunks).
    pub(super) ahead: Mutex<ReadAhead>,
    /// Table chunks being written ahead of readers.
    pub(super) writing: Mutex<HashSet<u64>>,
    /// When a reader last sent a READ for it (the background fill waits for quiet).
    pub(super) last_read: Mutex<Instant>,
    /// A background fill task runs for it.
    pub(super) filling: AtomicBool,
    /// Leaves its random READs wrote (format 3), and leaf reads under way.
    pub(super) leaves: LeafBook,
    /// Where its last READ ended (`u64::MAX`: none yet).
    pub(super) read_end: AtomicU64,
}

impl Object {
    /// The object of `target` behind `fd`, with read-ahead windows up to `read_ahead_max`
    /// bytes (data blobs only).
    pub(super) fn new(fd: AnonFd, target: Target, keys: Vec<u8>, read_ahead_max: Option<NonZeroU64>) -> Object {
        let ahead = match &target {
            Target::Data(_, blob) => ReadAhead::of_bytes(read_ahead_max, blob.table_chunk),
            Target::Meta(_) => ReadAhead::new(0),
        };
        Object {
            fd,
            name: Cachefiles::object_name(&target),
            target,
            keys,
            ahead: Mutex::new(ahead),
            writing: Mutex::new(HashSet::new()),
            last_read: Mutex::new(Instant::now()),
            filling: AtomicBool::new(false),
            leaves: LeafBook::default(),
            read_end: AtomicU64::new(u64::MAX),
        }
    }
}

/// What a cachefiles frontend serves with.
pub struct Serving {
    /// The images and blobs the kernel may open.
    pub catalog: Arc<Catalog>,
    /// The blob engine.
    pub engine: Arc<Engine>,
    /// Slots of READs being served.
    pub admission: Admission,
    /// Largest read-ahead window in bytes (None: no read-ahead).
    pub read_ahead_max: Option<NonZeroU64>,
    /// Where READs are reported while an image's startup is recorded.
    pub recorder: Arc<crate::prefetch::Recorder>,
    /// Quiet time after which an object's blob is fetched to the end (None: never).
    pub fill_after: Option<Duration>,
}

/// The bound cachefiles frontend.
pub struct Cachefiles {
    pub(super) dev: AsyncFd<Device>,
    catalog: Arc<Catalog>,
    pub(super) engine: Arc<Engine>,
    /// Largest read-ahead window in bytes (None: no read-ahead).
    read_ahead_max: Option<NonZeroU64>,
    pub(super) objects: Mutex<HashMap<u32, Arc<Object>>>,
    /// Idle aligned buffers for writes through the anonymous fds.
    pub(super) bufs: Arc<WriteBufs>,
    /// Slots of READs being served.
    admission: Admission,
    recorder: Arc<crate::prefetch::Recorder>,
    /// Quiet time after which an object's blob is fetched to the end (None: never).
    pub(super) fill_after: Option<Duration>,
    /// One background fill request at a time, daemon-wide: readers come first.
    pub(super) fill_slot: tokio::sync::Semaphore,
    /// The socket to this daemon's guard: each object's fd is kept there while it is open.
    pub(super) keeper: Mutex<Option<std::os::unix::net::UnixStream>>,
    /// Counters for `status`.
    pub stats: CachefilesStats,
}

impl Cachefiles {
    /// Open `/dev/cachefiles`, set the cache directory and tag, `bind ondemand`.
    pub fn bind(dir: &Path, tag: &str, how: Serving) -> io::Result<Arc<Cachefiles>> {
        std::fs::create_dir_all(dir)?;
        let dev = Device::open().map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => io::Error::new(
                e.kind(),
                "/dev/cachefiles is busy: another cache daemon (cachefilesd?) holds it",
            ),
            _ => io::Error::new(e.kind(), format!("open /dev/cachefiles: {e}")),
        })?;
        let dir_s = dir
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "cache dir is not UTF-8"))?;
        dev.command(&Command::Dir(dir_s))
            .map_err(|e| io::Error::new(e.kind(), format!("cachefiles 'dir {dir_s}': {e}")))?;
        dev.command(&Command::Tag(tag))
            .map_err(|e| io::Error::new(e.kind(), format!("cachefiles 'tag {tag}': {e}")))?;
        dev.command(&Command::BindOndemand).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cachefiles 'bind ondemand' ({e}): needs CONFIG_CACHEFILES_ONDEMAND and a cache dir on ext4/xfs"
                ),
            )
        })?;
        Cachefiles::serving(dev, how)
    }

    pub(super) fn serving(dev: Device, how: Serving) -> io::Result<Arc<Cachefiles>> {
        let Serving {
            catalog,
            engine,
            admission,
            read_ahead_max,
            recorder,
            fill_after,
        } = how;
        Ok(Arc::new(Cachefiles {
            dev: dev.into_async()?,
            catalog,
            engine,
            read_ahead_max,
            objects: Mutex::new(HashMap::new()),
            bufs: WriteBufs::new(buffers::KEPT),
            admission,
            recorder,
            fill_after,
            fill_slot: tokio::sync::Semaphore::new(1),
            keeper: Mutex::new(None),
            stats: CachefilesStats::default(),
        }))
    }

    /// How an object is named in logs.
    pub(super) fn object_name(target: &Target) -> String {
        match target {
            Target::Meta(i) => format!("{}:meta", i.fsid),
            Target::Data(i, d) => format!("{}:{}", i.fsid, &d.source.digest.as_str()[..19]),
        }
    }

    /// Objects the kernel currently has open.
    pub fn open_objects(&self) -> usize {
        crate::lock::lock(&self.objects).len()
    }

    /// Serve requests until `shutdown` fires or the device fails.
    pub async fn run(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) -> io::Result<()> {
        let mut buf = [0u8; MSG_MAX_SIZE];
        let admission = self.admission.clone();
        crate::frontend::drain_loop(
            &self.dev,
            &mut buf,
            &admission,
            shutdown,
            // one message per read
            |dev, b, _room| {
                let b: &mut [u8; MSG_MAX_SIZE] = b.try_into().map_err(|_| io::Error::other("message buffer size"))?;
                dev.read_message(b)
            },
            |raw| self.dispatch(raw),
        )
        .await
    }

    fn dispatch(self: &Arc<Self>, raw: &[u8]) {
        let msg = match Message::parse(raw) {
            Ok(m) => m,
            Err(e) => {
                self.stats.bad_messages.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, len = raw.len(), "malformed cachefiles message ignored");
                return;
            }
        };
        match msg {
            Message::Open {
                header,
                volume_key,
                cookie_key,
                fd,
                ..
            } => self.open(header.msg_id, header.object_id, &volume_key, &cookie_key, fd),
            Message::Read { header, offset, len } => {
                self.stats.reads.fetch_add(1, Relaxed);
                let obj = crate::lock::lock(&self.objects).get(&header.object_id).cloned();
                match obj {
                    Some(obj) => {
                        let me = Arc::clone(self);
                        // debug: a span per read costs more than a cached read (the fields are formatted
                        // at once); a failure names the read itself
                        let span =
                            tracing::debug_span!("read", object = %obj.name, msg_id = header.msg_id, offset, len);
                        let ticket = self.admission.admit();
                        tokio::spawn(
                            async move {
                                let _slot = ticket.enter().await;
                                me.read(obj, header.msg_id, offset, len).await
                            }
                            .instrument(span),
                        );
                    }
                    None => {
                        self.stats.reads_failed.fetch_add(1, Relaxed);
                        tracing::warn!(object_id = header.object_id, "READ for an unknown object");
                    }
                }
            }
            Message::Close { header } => {
                self.stats.closes.fetch_add(1, Relaxed);
                let gone = crate::lock::lock(&self.objects).remove(&header.object_id);
                if gone.is_some() {
                    self.forget(header.object_id);
                }
                tracing::debug!(object_id = header.object_id, known = gone.is_some(), "CLOSE");
            }
        }
    }

    fn open(&self, msg_id: u32, object_id: u32, volume_key: &[u8], cookie_key: &[u8], fd: u32) {
        self.stats.opens.fetch_add(1, Relaxed);
        let vkey = String::from_utf8_lossy(volume_key);
        let ckey = String::from_utf8_lossy(cookie_key);
        let refuse = |errno: i32, why: &str| {
            self.stats.opens_refused.fetch_add(1, Relaxed);
            tracing::warn!(volume = %vkey, cookie = %ckey, errno, "OPEN refused: {why}");
            if let Err(e) = self.dev.get_ref().command(&Command::CopenError { msg_id, errno }) {
                tracing::error!(error = %e, "copen (refusal) failed");
            }
        };
        let anon = match AnonFd::from_open_message(fd) {
            Ok(a) => a,
            Err(e) => return refuse(libc::EBADF, &format!("anon fd {fd} unusable: {e}")),
        };
        let Some(fsid) = erofs_fsid(volume_key) else {
            return refuse(libc::ENOENT, "volume key is not erofs,<fsid>");
        };
        let Some(target) = self.catalog.lookup(fsid, cookie_key) else {
            return refuse(libc::ENOENT, "no registered image or blob for these keys");
        };
        let size = target.size();
        let keys = failover::keys(volume_key, cookie_key);
        let obj = Arc::new(Object::new(anon, target, keys, self.read_ahead_max));
        crate::lock::lock(&self.objects).insert(object_id, Arc::clone(&obj));
        match self.dev.get_ref().command(&Command::Copen { msg_id, size }) {
            Ok(()) => {
                self.keep(object_id, &obj);
                tracing::info!(object = %obj.name, object_id, size, "OPEN")
            }
            Err(e) => {
                crate::lock::lock(&self.objects).remove(&object_id);
                tracing::error!(error = %e, "copen failed");
            }
        }
    }

    async fn read(self: Arc<Self>, obj: Arc<Object>, msg_id: u32, offset: u64, len: u64) {
        let t0 = Instant::now();
        let chunks = match &obj.target {
            Target::Data(_, blob) => Some((blob.table_chunk, blob.source.size)),
            Target::Meta(_) => None,
        };
        let (start, end) = span(offset, len, chunks);
        let mut leaves = ByLeaves::Whole;
        if let (Some((chunk, _)), Target::Data(_, blob)) = (chunks, &obj.target) {
            // a READ right where the last one ended continues a sequential reader's run
            let follows = obj.read_end.swap(offset.saturating_add(len), Relaxed) == offset;
            leaves = self.leaf_read(&obj, blob, offset, len, follows);
            while let ByLeaves::Wait(ended) = leaves {
                ended.await;
                leaves = self.leaf_read(&obj, blob, offset, len, follows);
            }
            self.recorder.read(blob, offset, len);
            self.read_ahead(&obj, start / chunk, (end - 1) / chunk);
            self.start_fill(&obj);
        }
        // a random READ: its leaves; else (or if they fail) the chunks it touches
        let by_leaves = match (&leaves, &obj.target) {
            (ByLeaves::Here, _) => Some(Vec::new()),
            (ByLeaves::Leaves(plan), Target::Data(_, blob)) => match self.leaves_bufs(blob, plan).await {
                Ok(bufs) => Some(bufs),
                Err(e) => {
                    tracing::debug!(error = %e, "leaf read failed: fetching the whole chunk");
                    None
                }
            },
            _ => None,
        };
        let leaf_spans = match (&by_leaves, &leaves) {
            (Some(_), ByLeaves::Leaves(plan)) => plan.spans.clone(),
            _ => Vec::new(),
        };
        let filled = match by_leaves {
            Some(bufs) => Ok(bufs),
            None => self.fill(&obj, start, end - start).await.map(|buf| vec![(buf, start)]),
        };
        let ok = filled.is_ok();
        let writer = Arc::clone(&obj);
        let done = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let written = filled.and_then(|bufs| super::leaves::write_bufs(&writer, &bufs));
            // Always complete: an unwritten range gives the reader EIO instead of a hang.
            let complete = writer.fd.read_complete(msg_id);
            written.and_then(|n| complete.map(|()| n))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        if let (true, Target::Data(_, blob)) = (done.is_ok(), &obj.target) {
            for &s in &leaf_spans {
                obj.leaves.written(blob, s);
            }
        }
        drop(leaves);
        match done {
            Ok(n) => {
                self.stats.bytes_written.fetch_add(n, Relaxed);
                self.stats.read_times.cold(t0.elapsed());
                tracing::debug!(latency_us = t0.elapsed().as_micros() as u64, bytes = n, "READ served");
            }
            Err(e) => {
                self.stats.reads_failed.fetch_add(1, Relaxed);
                tracing::warn!(latency_us = t0.elapsed().as_micros() as u64, fetched = ok, error = %e, object = %obj.name, msg_id, offset, len, "READ failed: reader gets EIO");
            }
        }
    }

    /// The bytes of `[start, start + len)` of the object's blob in an aligned buffer (zeros
    /// past the end of the blob). The buffer is allocated once the bytes are here, so a READ
    /// waiting for a slow registry holds no memory of its own.
    async fn fill(&self, obj: &Object, start: u64, len: u64) -> io::Result<WriteBuf> {
        let len_usize = usize::try_from(len).map_err(|_| io::Error::other("READ too large"))?;
        if len_usize > 256 << 20 {
            return Err(io::Error::other(format!("READ of {len} bytes refused")));
        }
        match &obj.target {
            Target::Meta(img) => {
                let path = img.meta_path.clone();
                let size = img.meta.size;
                let bufs = Arc::clone(&self.bufs);
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = buffers::zeroed(&bufs, len_usize)?;
                    let f = std::fs::File::open(&path)?;
                    let avail = size.saturating_sub(start).min(len) as usize;
                    f.read_exact_at(&mut buf.as_mut_slice()[..avail], start)?;
                    Ok(buf)
                })
                .await
                .map_err(io::Error::other)?
            }
            Target::Data(_, blob) => {
                if start >= blob.source.size {
                    return buffers::zeroed(&self.bufs, len_usize);
                }
                let pieces = self.engine.read(blob, start, len).await.map_err(io::Error::other)?;
                let mut buf = buffers::zeroed(&self.bufs, len_usize)?;
                let out = buf.as_mut_slice();
                let end = start + len;
                for p in pieces {
                    let data = p.bytes().map_err(io::Error::other)?;
                    let p_end = p.offset + data.len() as u64;
                    let lo = p.offset.max(start);
                    let hi = p_end.min(end);
                    if lo < hi {
                        out[(lo - start) as usize..(hi - start) as usize]
                            .copy_from_slice(&data[(lo - p.offset) as usize..(hi - p.offset) as usize]);
                    }
                    p.let_go(); // copied: a share it holds (a unit fetched ahead) is free
                }
                Ok(buf)
            }
        }
    }
}

/// What a READ of `[offset, offset + len)` writes: for a data blob, every chunk the range
/// touches, since the engine fetched and verified them whole anyway; once written, the kernel
/// reads the rest of those chunks from the cache file without asking again (a sequential
/// reader then costs one READ per chunk, not one per kernel read-ahead window). Aligned for
/// the anon fd's direct I/O; never less than the range asked for. `chunks`: the blob's
/// chunk size and size (None for the metadata blob, read from its local copy).
fn span(offset: u64, len: u64, chunks: Option<(u64, u64)>) -> (u64, u64) {
    let align = DIO_ALIGN as u64;
    let (start, end) = (
        offset / align * align,
        offset.saturating_add(len).div_ceil(align) * align,
    );
    match chunks {
        Some((chunk, size)) if chunk % align == 0 && offset < size => {
            let blob_end = size.div_ceil(align) * align;
            let wide_end = offset
                .saturating_add(len)
                .div_ceil(chunk)
                .saturating_mul(chunk)
                .min(blob_end);
            ((offset / chunk * chunk).min(start), wide_end.max(end))
        }
        _ => (start, end),
    }
}

#[cfg(test)]
mod tests {
    use super::span;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_read_writes_the_chunks_it_touches() {
        let blob = Some((MIB, 10 * MIB + 1000));
        // one kernel read-ahead window inside chunk 2: all of chunk 2
        assert_eq!(span(2 * MIB + 4096, 128 << 10, blob), (2 * MIB, 3 * MIB));
        // across a chunk boundary: both chunks
        assert_eq!(span(3 * MIB - 4096, 8192, blob), (2 * MIB, 4 * MIB));
        // the last, partial chunk: up to the blob's end, rounded up for direct I/O
        assert_eq!(span(10 * MIB + 10, 100, blob), (10 * MIB, 10 * MIB + 4096));
        // the metadata blob, and reads past the blob, keep the aligned range asked for
        assert_eq!(span(5000, 100, None), (4096, 8192));
        assert_eq!(span(11 * MIB, 4096, blob), (11 * MIB, 11 * MIB + 4096));
        // a range larger than its chunks is never cut
        assert_eq!(span(0, 3 * MIB, Some((MIB, 2 * MIB))), (0, 3 * MIB));
    }
}
