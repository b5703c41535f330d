//! The journal of events in flight: which pre-content events this daemon has read and not
//! answered yet (the event's fd number, its file and range), in a small root-only file of
//! fixed slots that outlives the process. A daemon that dies leaves its unanswered events
//! pending in the kernel, which matches a response by fd number only; the next daemon reads
//! the journal, fills each range and answers each number, so the readers of a crashed
//! daemon wait instead of failing. Written through a shared mapping (a store per event and
//! one per answer, into the page cache; nothing is synced: a crash of the process, not of
//! the machine, is what it is for). Each daemon puts a fresh file in place by rename, so a
//! mapping of the previous one never shrinks under it.

#![forbid(unsafe_code)]

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::lock::lock;

/// The journal's file name in the state directory.
pub const FILE_NAME: &str = "fanotify.journal";
const MAGIC: &[u8; 8] = b"LBJRNL01";
/// Header: magic, then the largest event fd number seen (i32).
const HEADER: u64 = 16;
const SLOT: u64 = 40;
const PENDING: u32 = 0x5045_4e44;
/// Largest journal accepted when read back (hostile state files are bounded).
const MAX_SLOTS: u64 = 1 << 16;

/// An event the previous daemon read and never answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// The event's fd number in the dead daemon (what the kernel matches a response by).
    pub fd: i32,
    /// Device and inode of the cache file it names.
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
    /// The range it asks for (`None`: the whole file).
    pub range: Option<(u64, u64)>,
}

/// What a previous daemon left in its journal.
#[derive(Debug, Clone, Default)]
pub struct Left {
    /// Its events read and never answered.
    pub orphans: Vec<Orphan>,
    /// The highest event fd number it had (`-1`: none): every number up to it is answered.
    pub max_fd: i32,
}

/// The journal of this daemon's events in flight.
pub struct Journal {
    slots: Mutex<Slots>,
    max_fd: AtomicI32,
}

/// The mapped file and its free slots.
struct Slots {
    map: memmap2::MmapMut,
    free: Vec<u64>,
}

impl Slots {
    fn put(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        if let Some(dst) = self.map.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
}

/// A journaled event; its slot is cleared when this is dropped (after the answer).
pub struct Entry {
    journal: Arc<Journal>,
    slot: Option<u64>,
}

impl Journal {
    /// Start a fresh journal of `slots` entries at `path` (root-only), returning what a
    /// previous daemon left in it: its unanswered events and its highest event fd number.
    pub fn open(path: &Path, slots: usize) -> io::Result<(Arc<Journal>, Left)> {
        let left = match read_bounded(path) {
            Ok(bytes) => Left {
                orphans: parse(&bytes),
                max_fd: header_max_fd(&bytes),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Left {
                orphans: Vec::new(),
                max_fd: -1,
            },
            Err(e) => return Err(e),
        };
        let slots = (slots as u64).clamp(1, MAX_SLOTS);
        // a new inode in place of the old one, never a truncation: a previous daemon still
        // alive keeps its mapping whole
        let tmp = crate::private_fs::temp_beside(path)?;
        let file = tmp.as_file();
        file.set_len(HEADER + slots * SLOT)?;
        file.write_all_at(MAGIC, 0)?;
        file.write_all_at(&(-1i32).to_le_bytes(), 8)?;
        let map = super::sys::map_journal(file)?;
        tmp.persist(path).map_err(|e| e.error)?;
        let j = Journal {
            slots: Mutex::new(Slots {
                map,
                free: (0..slots).rev().collect(),
            }),
            max_fd: AtomicI32::new(-1),
        };
        Ok((Arc::new(j), left))
    }

    /// Record event `fd` for `(dev, ino)` and `range`. With every slot taken (more events
    /// than slots: never with the admission bound) the event is not journaled.
    pub fn record(self: &Arc<Self>, fd: i32, (dev, ino): (u64, u64), range: Option<(u64, u64)>) -> Entry {
        let mut slots = lock(&self.slots);
        if fd > self.max_fd.fetch_max(fd, Relaxed) {
            slots.put(8, &fd.to_le_bytes());
        }
        let slot = slots.free.pop();
        if let Some(s) = slot {
            let (off, count) = range.unwrap_or((0, u64::MAX));
            let mut rec = [0u8; SLOT as usize];
            rec[0..4].copy_from_slice(&PENDING.to_le_bytes());
            rec[4..8].copy_from_slice(&fd.to_le_bytes());
            rec[8..16].copy_from_slice(&dev.to_le_bytes());
            rec[16..24].copy_from_slice(&ino.to_le_bytes());
            rec[24..32].copy_from_slice(&off.to_le_bytes());
            rec[32..40].copy_from_slice(&count.to_le_bytes());
            slots.put(HEADER + s * SLOT, &rec);
        }
        Entry {
            journal: Arc::clone(self),
            slot,
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            let mut slots = lock(&self.journal.slots);
            slots.put(HEADER + s * SLOT, &[0u8; 4]);
            slots.free.push(s);
        }
    }
}

/// Mark a journal's pending events as answered (the guard denied them all): a daemon that
/// takes over later has nothing to resolve.
pub fn forget(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.write_all_at(&[0u8; 8], 0);
    }
}

/// A journal's bytes, at most as many as the largest journal has (a state file is read as
/// untrusted input: a huge one is not read into memory whole).
fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(HEADER + MAX_SLOTS * SLOT)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The largest event fd number a journal's bytes record (`-1`: none), bounded: every number
/// up to it is answered after a handover.
fn header_max_fd(b: &[u8]) -> i32 {
    if b.len() < HEADER as usize || &b[..8] != MAGIC {
        return -1;
    }
    i32::from_le_bytes([b[8], b[9], b[10], b[11]]).clamp(-1, 1 << 20)
}

/// The pending records of a journal's bytes (anything malformed is skipped: the file is
/// ours, but it is read as untrusted input all the same).
fn parse(bytes: &[u8]) -> Vec<Orphan> {
    if bytes.len() < HEADER as usize || &bytes[..8] != MAGIC {
        return Vec::new();
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
    bytes[HEADER as usize..]
        .chunks_exact(SLOT as usize)
        .take(MAX_SLOTS as usize)
        .filter(|r| r[0..4] == PENDING.to_le_bytes())
        .filter_map(|r| {
            let fd = i32::from_le_bytes([r[4], r[5], r[6], r[7]]);
            let (off, count) = (u64_at(r, 24), u64_at(r, 32));
            (fd >= 0).then(|| Orphan {
                fd,
                dev: u64_at(r, 8),
                ino: u64_at(r, 16),
                range: (count != u64::MAX).then_some((off, count)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_entries_survive_and_answered_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (j, Left { orphans, max_fd: max }) = Journal::open(&path, 8).unwrap();
        assert!(orphans.is_empty());
        assert_eq!(max, -1);
        let a = j.record(17, (1, 2), Some((4096, 8192)));
        let b = j.record(23, (1, 3), None);
        let c = j.record(5, (9, 9), Some((0, 1)));
        drop(b);
        std::mem::forget(a); // a daemon that dies with these in flight
        std::mem::forget(c);
        let (_j2, Left { orphans, max_fd: max }) = Journal::open(&path, 8).unwrap();
        // the first daemon, still alive, keeps writing its own (replaced) file: no SIGBUS,
        // and nothing of it reaches the new journal
        drop(j.record(99, (4, 4), None));
        std::mem::forget(j.record(98, (4, 4), None));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(max, 23);
        let mut fds: Vec<i32> = orphans.iter().map(|o| o.fd).collect();
        fds.sort();
        assert_eq!(fds, [5, 17]);
        let a = orphans.iter().find(|o| o.fd == 17).unwrap();
        assert_eq!((a.dev, a.ino, a.range), (1, 2, Some((4096, 8192))));
        // reopened: a fresh journal, the orphans handed out once
        let (_j3, Left { orphans, max_fd: max }) = Journal::open(&path, 8).unwrap();
        assert!(orphans.is_empty());
        assert_eq!(max, -1);
    }

    #[test]
    fn a_huge_journal_is_read_only_as_far_as_a_journal_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 30).unwrap(); // sparse: 64 GiB of zeros
        assert_eq!(read_bounded(&path).unwrap().len() as u64, HEADER + MAX_SLOTS * SLOT);
        let (_j, Left { orphans, max_fd }) = Journal::open(&path, 4).unwrap();
        assert!(orphans.is_empty());
        assert_eq!(max_fd, -1);
    }

    #[test]
    fn garbage_is_no_orphan() {
        assert!(parse(b"").is_empty());
        assert!(parse(&[0xff; 4096]).is_empty());
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&PENDING.to_le_bytes());
        b.extend_from_slice(&(-3i32).to_le_bytes());
        b.extend_from_slice(&[0; 32]);
        assert!(parse(&b).is_empty(), "a negative fd");
    }
}
