//! The fanotify frontend's persistent cache: one sparse file per data blob under
//! `<cache_dir>/blobs/`, named by the blob's key (its digest bound to the chunk digests its
//! bytes are verified against, never a name from the registry), root-only, holes where
//! chunks were never fetched. Presence is read back with
//! SEEK_DATA/SEEK_HOLE, so a restarted daemon never fetches a chunk twice; chunks found on
//! disk are verified against the chunk table before they are trusted.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{lseek, Whence};

use crate::engine::BlobKey;
use crate::private_fs;

/// Refuse `dir` (`what` names its setting) if EROFS cannot mount files kept there: file-backed
/// mounts read their metadata blob and cache files through the page cache's `read_folio`,
/// which tmpfs files lack, and the mount fails with a bare ENOTBLK. Its nearest existing
/// ancestor is what is looked at.
pub fn check_backing_dir(dir: &Path, what: &str) -> io::Result<()> {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let fs = nix::sys::statfs::statfs(existing).map_err(io::Error::from)?;
    if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{what} {} is on tmpfs, whose files EROFS cannot mount (the fanotify frontend \
                 needs a disk filesystem there: ext4, xfs, btrfs...)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Path of the cache file of a blob.
pub fn blob_path(cache_dir: &Path, key: &BlobKey) -> PathBuf {
    cache_dir.join("blobs").join(key.file_name())
}

/// Create (or reuse) the sparse cache file of a blob with the right size: `0600` in `0700`
/// directories, never through a symlink.
pub fn ensure_file(path: &Path, size: u64) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        if let Some(cache) = dir.parent() {
            private_fs::private_dir(cache)?;
        }
        private_fs::private_dir(dir)?;
    }
    let open = || {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(private_fs::FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    };
    let mut f = open()?;
    let md = f.metadata()?;
    if !md.is_file() {
        return Err(io::Error::other(format!("{} is not a regular file", path.display())));
    }
    if md.mode() & 0o077 != 0 {
        // a file of an older version, created world-readable
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(private_fs::FILE_MODE))?;
    }
    let len = md.len();
    if len != size {
        if len != 0 {
            // a stale or foreign file: replace the inode rather than truncate it (a file
            // marked for pre-content events would raise one to ourselves)
            drop(f);
            std::fs::remove_file(path)?;
            f = open()?;
        }
        f.set_len(size)?;
    }
    Ok(f)
}

/// Whether `[start, end)` of the file is all data (no hole). Uses the given fd; lseek does
/// not raise pre-content events.
pub fn is_data(f: impl AsFd, start: u64, end: u64) -> io::Result<bool> {
    if start >= end {
        return Ok(true);
    }
    match lseek(f.as_fd(), start as i64, Whence::SeekHole) {
        Ok(hole) => Ok(hole as u64 >= end),
        // ENXIO: start is at or past EOF
        Err(nix::errno::Errno::ENXIO) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Whether `[start, end)` of the file holds any data (not all hole).
pub fn has_data(f: impl AsFd, start: u64, end: u64) -> io::Result<bool> {
    match lseek(f.as_fd(), start as i64, Whence::SeekData) {
        Ok(d) => Ok((d as u64) < end),
        // ENXIO: no data at or past start
        Err(nix::errno::Errno::ENXIO) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Bytes actually allocated by a cache file.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// What an eviction removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Cache files deleted.
    pub blobs: u64,
    /// Bytes they held on disk.
    pub bytes: u64,
}

/// Delete cache files not in `keep`, least recently modified first, until the cache holds at
/// most `limit` bytes.
pub fn evict(cache_dir: &Path, limit: u64, keep: &[PathBuf]) -> io::Result<Evicted> {
    let dir = cache_dir.join("blobs");
    let mut files: Vec<(std::time::SystemTime, PathBuf, u64)> = Vec::new();
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(Evicted::default());
    };
    for e in rd.flatten() {
        let p = e.path();
        let size = allocated(&p);
        total += size;
        if !keep.contains(&p) {
            let mtime = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            files.push((mtime, p, size));
        }
    }
    files.sort();
    let mut freed = Evicted::default();
    for (_, p, size) in files {
        if total <= limit {
            break;
        }
        std::fs::remove_file(&p)?;
        total -= size;
        freed.blobs += 1;
        freed.bytes += size;
        tracing::info!(path = %p.display(), bytes = size, "evicted unused blob from the cache");
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn key(seed: u8) -> BlobKey {
        let data = vec![seed; 10];
        let b = crate::engine::DataBlob::new(
            crate::registry::BlobSource {
                repo: crate::registry::parse_reference("localhost:1/r:t").unwrap(),
                digest: crate::image::digest::Digest::of(&data),
                size: 10,
            },
            4096,
            vec![[seed; 32]],
            crate::image::format::ChunkDigest::Blake3,
        );
        b.key().clone()
    }

    #[test]
    fn holes_and_data() {
        let d = tempfile::tempdir().unwrap();
        let p = blob_path(d.path(), &key(1));
        assert_eq!(std::fs::metadata(&p).map(|m| m.mode() & 0o777).ok(), None);
        let f = ensure_file(&p, 8 << 20).unwrap();
        assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(d.path()).unwrap().mode() & 0o777, 0o700);
        assert!(!is_data(&f, 0, 4096).unwrap());
        f.write_all_at(&vec![1u8; 1 << 20], 1 << 20).unwrap();
        assert!(is_data(&f, 1 << 20, 2 << 20).unwrap());
        assert!(!is_data(&f, 0, 2 << 20).unwrap());
        assert!(!is_data(&f, 2 << 20, 3 << 20).unwrap());
        drop(f);
        // reopening keeps the data; a size change starts over
        let f = ensure_file(&p, 8 << 20).unwrap();
        assert!(is_data(&f, 1 << 20, 2 << 20).unwrap());
        let f = ensure_file(&p, 4 << 20).unwrap();
        assert!(!is_data(&f, 1 << 20, 2 << 20).unwrap());
    }

    #[test]
    fn eviction_spares_kept_files() {
        let d = tempfile::tempdir().unwrap();
        let a = blob_path(d.path(), &key(2));
        let b = blob_path(d.path(), &key(3));
        for p in [&a, &b] {
            let f = ensure_file(p, 1 << 20).unwrap();
            f.write_all_at(&vec![1u8; 1 << 20], 0).unwrap();
        }
        let freed = evict(d.path(), 1 << 20, std::slice::from_ref(&b)).unwrap();
        assert!(freed.bytes >= 1 << 20 && freed.blobs == 1);
        assert!(!a.exists() && b.exists());
    }
}
