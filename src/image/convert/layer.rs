//! One OCI layer applied to the merged tree: decompression (gzip, zstd, plain tar), tar
//! entries to nodes, whiteouts and opaque directories, file contents into the layer's data
//! blob. Hostile entries are contained (see `paths`) or refused with the entry's name.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};

use super::expansion::Bounded;
use super::paths::{normalize, resolve_dir, PathError};
use crate::image::spool::FileSink;
use crate::image::tree::{encode_rdev, FileData, Kind, Meta, Node, Tree};

/// Limits that keep a hostile layer from exhausting the converter.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest regular file accepted.
    pub max_file: u64,
    /// Largest size a layer may expand to (its whole decompressed tar stream).
    pub max_layer: u64,
    /// Regular files up to this size are stored inline in the metadata blob.
    pub inline_max: u64,
    /// Most nodes the image may have (every entry of every layer adds at most one).
    pub max_entries: usize,
    /// Most bytes the image's metadata may hold in memory: names, inline file contents,
    /// symbolic link targets, extended attributes.
    pub max_metadata: u64,
    /// Most bytes of headers in front of one entry (PAX records, GNU long names).
    pub max_headers: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file: 64 << 30,
            max_layer: 256 << 30,
            inline_max: 2048,
            max_entries: 4_000_000,
            max_metadata: 1 << 30,
            max_headers: 1 << 20,
        }
    }
}

/// What went wrong in a layer, naming the entry.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A tar entry that cannot be applied.
    #[error("layer {layer}: entry {entry:?}: {what}")]
    Entry {
        /// The layer.
        layer: String,
        /// The entry's path.
        entry: String,
        /// What is wrong with it.
        what: String,
    },
    /// The layer is not a readable archive.
    #[error("layer {layer}: corrupt or truncated archive: {what}")]
    Archive {
        /// The layer.
        layer: String,
        /// What is wrong with it.
        what: String,
    },
}

/// Counters of one applied layer.
#[derive(Debug, Default, Clone, Copy)]
pub struct LayerStats {
    /// Tar entries read.
    pub entries: u64,
    /// Bytes of regular file data.
    pub file_bytes: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
    /// Bytes of metadata kept in memory (see [`Limits::max_metadata`]).
    pub metadata: u64,
}

/// Wrap a compressed or plain layer stream in the right decoder (by magic bytes).
pub fn decoder<'a, R: Read + 'a>(r: R) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(1 << 16, r);
    let head = br.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(br)?))
    } else {
        Ok(Box::new(br))
    }
}

/// Applies tar entries of one layer (`device` is its 1-based data blob) to `tree`.
pub struct Applier<'t> {
    /// The merged tree the layer is applied to.
    pub tree: &'t mut Tree,
    /// Where this layer's file contents go.
    pub sink: &'t mut dyn FileSink,
    /// The layer's name in errors.
    pub layer: String,
    /// Ceilings on entries and sizes.
    pub limits: Limits,
    /// Nodes created by this layer: whiteouts and opaque markers spare them.
    added: HashSet<usize>,
    stats: LayerStats,
}

const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT: &[u8] = b".wh.";

impl<'t> Applier<'t> {
    /// Apply layers to `tree` with `blobs`.
    pub fn new(tree: &'t mut Tree, sink: &'t mut dyn FileSink, layer: String, limits: Limits) -> Self {
        Applier {
            tree,
            sink,
            layer,
            limits,
            added: HashSet::new(),
            stats: LayerStats::default(),
        }
    }

    /// Apply a whole (decompressed) tar stream.
    pub fn apply<R: Read>(mut self, tar: R) -> Result<LayerStats, LayerError> {
        let (bounded, gate) = Bounded::new(tar, self.limits.max_layer, self.limits.max_headers);
        let mut archive = tar::Archive::new(bounded);
        let mut entries = archive.entries().map_err(|e| self.archive_err(e))?;
        loop {
            gate.headers();
            let Some(entry) = entries.next() else { break };
            gate.data();
            let mut entry = entry.map_err(|e| self.archive_err(e))?;
            self.stats.entries += 1;
            let raw_path = entry.path_bytes().into_owned();
            let result = self.entry(&mut entry, &raw_path).and_then(|()| {
                // what the entry did not consume is read here, as data, not as the next headers
                std::io::copy(&mut entry, &mut std::io::sink())
                    .map(drop)
                    .map_err(|e| format!("reading contents: {e}"))
            });
            result.map_err(|what| LayerError::Entry {
                layer: self.layer.clone(),
                entry: String::from_utf8_lossy(&raw_path).into_owned(),
                what,
            })?;
        }
        Ok(self.stats)
    }

    fn archive_err(&self, e: std::io::Error) -> LayerError {
        LayerError::Archive {
            layer: self.layer.clone(),
            what: e.to_string(),
        }
    }

    fn default_dir_meta() -> Meta {
        Meta {
            perm: 0o755,
            ..Default::default()
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, raw_path: &[u8]) -> Result<(), String> {
        let mut comps = normalize(raw_path);
        let kind = entry.header().entry_type();
        let Some(name) = comps.pop() else {
            // the root itself: take a directory's metadata, ignore anything else
            if kind.is_dir() {
                self.tree.nodes[Tree::ROOT].meta = self.meta(entry)?;
            }
            return Ok(());
        };
        let parent = resolve_dir(self.tree, &comps, true, &Self::default_dir_meta())
            .map_err(|e: PathError| e.to_string())?
            .ok_or("parent directory missing")?;
        if name == OPAQUE {
            self.stats.whiteouts += 1;
            let lower: Vec<Vec<u8>> = self
                .tree
                .children(parent)
                .map(|c| {
                    c.iter()
                        .filter(|(_, i)| !self.added.contains(i))
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            for k in lower {
                self.tree.remove(parent, &k).map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
        if let Some(target) = name.strip_prefix(WHITEOUT) {
            self.stats.whiteouts += 1;
            let lower = self
                .tree
                .children(parent)
                .and_then(|c| c.get(target))
                .is_some_and(|i| !self.added.contains(i));
            if lower {
                self.tree.remove(parent, target).map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
        let meta = self.meta(entry)?;
        self.account(name.len() as u64 + meta.xattrs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>())?;
        if self.tree.nodes.len() >= self.limits.max_entries {
            return Err(format!("the image has more than {} entries", self.limits.max_entries));
        }
        let existing = self.tree.children(parent).and_then(|c| c.get(&name).copied());
        let node_kind = match kind {
            tar::EntryType::Directory => {
                if let Some(i) = existing.filter(|i| matches!(self.tree.nodes[*i].kind, Kind::Dir(_))) {
                    // merge: keep the children, take the new metadata
                    self.tree.nodes[i].meta = meta;
                    self.added.insert(i);
                    return Ok(());
                }
                Kind::Dir(BTreeMap::new())
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                if size > self.limits.max_file {
                    return Err(format!(
                        "file size {size} exceeds the limit of {} bytes",
                        self.limits.max_file
                    ));
                }
                if self.stats.file_bytes + size > self.limits.max_layer {
                    return Err(format!(
                        "layer data exceeds the limit of {} bytes",
                        self.limits.max_layer
                    ));
                }
                self.stats.file_bytes += size;
                Kind::File(self.file_data(entry, size)?)
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or("symlink without a target")?.into_owned();
                if target.is_empty() || target.len() >= 4096 {
                    return Err(format!("symlink target of {} bytes", target.len()));
                }
                self.account(target.len() as u64)?;
                Kind::Symlink(target)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or("hard link without a target")?
                    .into_owned();
                let mut tcomps = normalize(&target);
                let tname = tcomps.pop().ok_or("hard link to the root")?;
                let tdir = resolve_dir(self.tree, &tcomps, false, &Self::default_dir_meta())
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("hard link target {:?} not found", String::from_utf8_lossy(&target)))?;
                let tnode = self
                    .tree
                    .children(tdir)
                    .and_then(|c| c.get(&tname).copied())
                    .ok_or_else(|| format!("hard link target {:?} not found", String::from_utf8_lossy(&target)))?;
                if matches!(self.tree.nodes[tnode].kind, Kind::Dir(_)) {
                    return Err("hard link to a directory".into());
                }
                self.tree.link(parent, &name, tnode).map_err(|e| e.to_string())?;
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let rdev = encode_rdev(major, minor);
                if kind == tar::EntryType::Char {
                    Kind::CharDev(rdev)
                } else {
                    Kind::BlockDev(rdev)
                }
            }
            tar::EntryType::Fifo => Kind::Fifo,
            other => {
                tracing::warn!(layer = %self.layer, entry = %String::from_utf8_lossy(raw_path), kind = ?other, "tar entry type ignored");
                return Ok(());
            }
        };
        let idx = self
            .tree
            .insert(parent, &name, Node { meta, kind: node_kind })
            .map_err(|e| e.to_string())?;
        self.added.insert(idx);
        Ok(())
    }

    fn file_data<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, size: u64) -> Result<FileData, String> {
        if size <= self.limits.inline_max {
            self.account(size)?;
            let mut buf = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut buf)
                .map_err(|e| format!("reading contents: {e}"))?;
            if buf.len() as u64 != size {
                return Err(format!("truncated: {} of {size} bytes", buf.len()));
            }
            return Ok(FileData::Inline(buf));
        }
        self.sink
            .add_reader(entry, size)
            .map_err(|e| format!("reading contents: {e}"))
    }

    /// Count `bytes` of metadata held in memory against [`Limits::max_metadata`].
    fn account(&mut self, bytes: u64) -> Result<(), String> {
        self.stats.metadata += bytes;
        if self.stats.metadata > self.limits.max_metadata {
            return Err(format!(
                "the image's metadata passes the limit of {} bytes",
                self.limits.max_metadata
            ));
        }
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
        let h = entry.header();
        let mut meta = Meta {
            perm: h.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777,
            uid: h.uid().map_err(|e| format!("bad uid: {e}"))? as u32,
            gid: h.gid().map_err(|e| format!("bad gid: {e}"))? as u32,
            mtime: h.mtime().map_err(|e| format!("bad mtime: {e}"))? as i64,
            mtime_nsec: 0,
            xattrs: BTreeMap::new(),
        };
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let key = ext.key_bytes();
                if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                    meta.xattrs.insert(x.to_vec(), ext.value_bytes().to_vec());
                } else if key == b"mtime" {
                    if let Some((s, ns)) = std::str::from_utf8(ext.value_bytes()).ok().and_then(parse_pax_time) {
                        meta.mtime = s;
                        meta.mtime_nsec = ns;
                    }
                } else if key == b"uid" {
                    if let Some(v) = std::str::from_utf8(ext.value_bytes()).ok().and_then(|s| s.parse().ok()) {
                        meta.uid = v;
                    }
                } else if key == b"gid" {
                    if let Some(v) = std::str::from_utf8(ext.value_bytes()).ok().and_then(|s| s.parse().ok()) {
                        meta.gid = v;
                    }
                }
            }
        }
        Ok(meta)
    }
}

/// `1700000000.123456789` -> (seconds, nanoseconds).
fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    let mut ns = String::from(frac);
    ns.truncate(9);
    while ns.len() < 9 {
        ns.push('0');
    }
    Some((sec, ns.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
