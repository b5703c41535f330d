//! Configuring a node's containerd on disk: the main config file and the files its `imports`
//! name are edited in place ([`super::containerd_edit`]), each keeping a backup of its
//! original bytes beside it on the first change, and restored from it on uninstall. A run
//! that finds everything in place writes nothing.

#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::containerd_edit::{self, EditError, Role, Settings, Version};

/// Suffix of the backup kept beside every edited file.
pub const BACKUP_SUFFIX: &str = ".lazyblob-backup";

/// A containerd configuration that could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file that is not a config lazyblob can edit.
    #[error("{path}: {source}")]
    Edit {
        /// The file.
        path: PathBuf,
        /// Why.
        source: EditError,
    },
    /// No config file: containerd runs on its built-in defaults, which cannot be edited.
    #[error(
        "{0}: no containerd config (containerd runs on its defaults); write them first with `containerd config default > {0}`"
    )]
    Missing(PathBuf),
    /// An `imports` entry that is not a valid pattern.
    #[error("{path}: import `{pattern}` is not a valid pattern: {reason}")]
    Import {
        /// The main file.
        path: PathBuf,
        /// The entry.
        pattern: String,
        /// Why.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOutcome {
    /// Already as it should be: not written.
    Unchanged(PathBuf),
    /// Written (install: settings added; uninstall: the backup restored).
    Changed(PathBuf),
    /// Uninstall: the file changed since lazyblob edited it, so it is left alone with its
    /// backup beside it for the operator.
    Diverged(PathBuf),
}

/// The outcome of an install or uninstall, file by file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Every file looked at: the main file first, then its imports.
    pub files: Vec<FileOutcome>,
}

impl Outcome {
    /// Whether any file was written (containerd needs a restart to read it).
    pub fn changed(&self) -> bool {
        self.files.iter().any(|f| matches!(f, FileOutcome::Changed(_)))
    }
}

/// Add lazyblob's settings to the containerd config `main` and to its imports that define the
/// tables lazyblob sets.
pub fn install(main: &Path, settings: &Settings) -> Result<Outcome, NodeError> {
    if !main.exists() {
        return Err(NodeError::Missing(main.to_path_buf()));
    }
    let text = read(main)?;
    let version = version_of(main, &text)?;
    let mut outcome = Outcome::default();
    for (path, role) in files_of(main, &text)? {
        let text = if role == Role::Main { text.clone() } else { read(&path)? };
        let edited = containerd_edit::edit(&text, version, role, settings).map_err(|source| NodeError::Edit {
            path: path.clone(),
            source,
        })?;
        if edited == text {
            outcome.files.push(FileOutcome::Unchanged(path));
            continue;
        }
        let backup = backup_of(&path);
        if !backup.exists() {
            // the first edit keeps the original; later ones keep that first original
            replace(&backup, text.as_bytes(), &path)?;
        }
        replace(&path, edited.as_bytes(), &path)?;
        outcome.files.push(FileOutcome::Changed(path));
    }
    Ok(outcome)
}

/// Restore the files lazyblob edited from their backups, where they still hold exactly what
/// lazyblob made of the backup (a file changed since is left alone, see [`FileOutcome`]).
pub fn uninstall(main: &Path, settings: &Settings) -> Result<Outcome, NodeError> {
    let text = read(main)?;
    let version = version_of(main, &text)?;
    let mut outcome = Outcome::default();
    for (path, role) in files_of(main, &text)? {
        let backup = backup_of(&path);
        let original = match fs::read_to_string(&backup) {
            Ok(original) => original,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                outcome.files.push(FileOutcome::Unchanged(path));
                continue;
            }
            Err(e) => return Err(io_err(&backup)(e)),
        };
        let ours = containerd_edit::edit(&original, version, role, settings).map_err(|source| NodeError::Edit {
            path: backup.clone(),
            source,
        })?;
        if read(&path)? != ours {
            outcome.files.push(FileOutcome::Diverged(path));
            continue;
        }
        replace(&path, original.as_bytes(), &path)?;
        fs::remove_file(&backup).map_err(io_err(&backup))?;
        outcome.files.push(FileOutcome::Changed(path));
    }
    Ok(outcome)
}

/// Where the backup of `path` lives.
pub fn backup_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(BACKUP_SUFFIX);
    PathBuf::from(name)
}

fn read(path: &Path) -> Result<String, NodeError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn version_of(path: &Path, text: &str) -> Result<Version, NodeError> {
    let edit_err = |source| NodeError::Edit {
        path: path.to_path_buf(),
        source,
    };
    containerd_edit::version(&containerd_edit::parse(text).map_err(edit_err)?).map_err(edit_err)
}

/// The main file, then every existing file its `imports` name (globs expanded as containerd
/// does, relative paths against the main file's directory; one level: imports of imports
/// are not followed).
fn files_of(main: &Path, text: &str) -> Result<Vec<(PathBuf, Role)>, NodeError> {
    let doc = containerd_edit::parse(text).map_err(|source| NodeError::Edit {
        path: main.to_path_buf(),
        source,
    })?;
    let mut files = vec![(main.to_path_buf(), Role::Main)];
    let patterns = doc.get("imports").and_then(|i| i.as_array());
    let dir = main.parent().unwrap_or(Path::new("/"));
    for pattern in patterns.into_iter().flatten().filter_map(|v| v.as_str()) {
        let full = dir.join(pattern);
        let bad = |reason: String| NodeError::Import {
            path: main.to_path_buf(),
            pattern: pattern.to_string(),
            reason,
        };
        let matches = glob::glob(&full.to_string_lossy()).map_err(|e| bad(e.to_string()))?;
        let mut found: Vec<PathBuf> = matches.collect::<Result<_, _>>().map_err(|e| bad(e.to_string()))?;
        found.sort();
        for path in found {
            if path.is_file() && !files.iter().any(|(p, _)| p == &path) {
                files.push((path, Role::Import));
            }
        }
    }
    Ok(files)
}

/// Replace `path` with `data` atomically, with the owner and mode of `like`.
fn replace(path: &Path, data: &[u8], like: &Path) -> Result<(), NodeError> {
    let meta = fs::metadata(like).map_err(io_err(like))?;
    crate::private_fs::replace_like(path, data, &meta).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            socket: "/run/lazyblob/snapshotter.sock".into(),
            root: "/var/lib/lazyblob/snapshotter".into(),
            platform: "linux/amd64".into(),
        }
    }

    #[test]
    fn a_missing_config_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = install(&dir.path().join("config.toml"), &settings()).unwrap_err();
        assert!(matches!(err, NodeError::Missing(_)));
        assert!(err.to_string().contains("containerd config default >"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_config_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "version = 1\n").unwrap();
        assert!(matches!(install(&path, &settings()), Err(NodeError::Edit { .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "version = 1\n");
        assert!(!backup_of(&path).exists());
    }

    #[test]
    fn the_backup_keeps_the_first_original_and_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "version = 2\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(install(&path, &settings()).unwrap().changed());
        assert_eq!(std::fs::read_to_string(backup_of(&path)).unwrap(), "version = 2\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        // a hand edit after the install: uninstall leaves the file and its backup alone
        let edited = std::fs::read_to_string(&path).unwrap() + "# by hand\n";
        std::fs::write(&path, &edited).unwrap();
        let out = uninstall(&path, &settings()).unwrap();
        assert_eq!(out.files, [FileOutcome::Diverged(path.clone())]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), edited);
        assert!(backup_of(&path).exists());
    }
}
