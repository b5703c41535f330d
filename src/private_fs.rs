//! Files and directories that hold image data, state or credentials: directories `0700`,
//! files `0600` (root only), and whole-file writes that a crash cannot leave half done
//! (a unique temporary file, fsync, rename, fsync of the directory).

#![forbid(unsafe_code)]

use std::fs::{self, DirBuilder, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of directories holding image data or state.
pub const DIR_MODE: u32 = 0o700;
/// Mode of files holding image data or state.
pub const FILE_MODE: u32 = 0o600;

/// Create `dir` (and missing parents, those `0700` too) and make sure `dir` itself is `0700`,
/// also when it existed with a wider mode (an older version, an operator's `mkdir`).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    let md = fs::metadata(dir)?;
    if md.permissions().mode() & 0o777 != DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Replace `path` with `data` atomically and durably: a unique `0600` temporary file in the
/// same directory (concurrent writers never share one), fsync, rename, fsync of the
/// directory. The directory is created `0700` if missing.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    private_dir(parent(path))?;
    // tempfile creates the file with O_EXCL and mode 0600
    replace(path, data, |_| Ok(()))
}

/// Replace `path` with `data` atomically and durably, as [`write_atomic`] does, but in a
/// directory that is left as it is and with the mode and owner of `like` (a file of
/// another program's, such as containerd's config).
pub fn replace_like(path: &Path, data: &[u8], like: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    replace(path, data, |tmp| {
        fs::set_permissions(tmp, like.permissions())?;
        std::os::unix::fs::chown(tmp, Some(like.uid()), Some(like.gid()))
    })
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A unique temporary file beside `path` (O_EXCL, `0600`), to be renamed over it with
/// `persist`: a reader or mapper of the file at `path` keeps its own inode whole.
pub fn temp_beside(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new().prefix(".tmp-").tempfile_in(parent(path))
}

/// Remove from `dir` and its direct subdirectories the temporary files [`temp_beside`] made
/// for a process that died before renaming them: `.tmp-*` regular files last modified more
/// than `min_age` ago. A live writer renames its own within microseconds, so an upgrade's
/// old daemon, which shares the directory, never has one that old. The files removed.
pub fn sweep_temps(dir: &Path, min_age: std::time::Duration) -> io::Result<usize> {
    let (mut removed, subdirs) = sweep_dir(dir, min_age)?;
    for d in subdirs {
        removed += sweep_dir(&d, min_age)?.0;
    }
    Ok(removed)
}

/// Remove the stale temporaries directly in `dir`: how many, and its subdirectories. A symlink
/// is never followed: neither a directory to enter nor a file to remove.
fn sweep_dir(dir: &Path, min_age: std::time::Duration) -> io::Result<(usize, Vec<std::path::PathBuf>)> {
    let (mut removed, mut subdirs) = (0, Vec::new());
    for entry in fs::read_dir(dir)?.flatten() {
        let Ok(md) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if md.is_dir() {
            subdirs.push(entry.path());
        }
        let stale = md
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > min_age);
        if md.is_file() && stale && entry.file_name().to_string_lossy().starts_with(".tmp-") {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok((removed, subdirs))
}

/// A unique temporary file beside `path` with `data`, adjusted by `finish`, fsynced and
/// renamed over `path`; then the directory fsynced.
fn replace(path: &Path, data: &[u8], finish: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let dir = parent(path);
    let mut tmp = temp_beside(path)?;
    tmp.write_all(data)?;
    finish(tmp.path())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn stale_temps_are_swept_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("prefetch");
        let deep = sub.join("deeper");
        fs::create_dir_all(&deep).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let make = |p: &Path, aged: bool| {
            let f = File::create(p).unwrap();
            if aged {
                f.set_modified(old).unwrap();
            }
        };
        make(&d.path().join(".tmp-a1"), true);
        make(&sub.join(".tmp-b2"), true);
        make(&d.path().join(".tmp-fresh"), false);
        make(&d.path().join("images.json"), true);
        make(&deep.join(".tmp-c3"), true);
        std::os::unix::fs::symlink(d.path().join("images.json"), d.path().join(".tmp-link")).unwrap();
        let n = sweep_temps(d.path(), std::time::Duration::from_secs(600)).unwrap();
        assert_eq!(n, 2);
        assert!(!d.path().join(".tmp-a1").exists() && !sub.join(".tmp-b2").exists());
        // a fresh one (a writer at work), another name, deeper down, a symlink: kept
        assert!(d.path().join(".tmp-fresh").exists() && d.path().join("images.json").exists());
        assert!(deep.join(".tmp-c3").exists() && d.path().join(".tmp-link").symlink_metadata().is_ok());
    }

    #[test]
    fn modes_and_atomic_writes() {
        let d = tempfile::tempdir().unwrap();
        let wide = d.path().join("wide");
        fs::create_dir(&wide).unwrap();
        fs::set_permissions(&wide, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&wide).unwrap();
        assert_eq!(fs::metadata(&wide).unwrap().mode() & 0o777, 0o700);

        let f = d.path().join("a/b/state.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(d.path().join("a/b")).unwrap().mode() & 0o777, 0o700);
        // no temporary file is left behind
        assert_eq!(fs::read_dir(d.path().join("a/b")).unwrap().count(), 1);
    }
}
