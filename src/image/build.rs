//! Building lazyblob images: lay file contents out in data blobs (each file on a 4 KiB
//! boundary), write the EROFS metadata blob and the chunk digest table, push everything to a
//! registry under a manifest.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use bytes::Bytes;
use oci_client::Reference;
use serde_json::json;

use super::erofs::{self, DeviceSlot};
use super::format::{
    device_tag, BlobChunks, ChunkDigest, ChunkTable, Hashing, ANNOTATION_FORMAT, ANNOTATION_LAYER, FORMAT_VERSION,
    FORMAT_VERSION_NO_LEAVES, MEDIA_TYPE_CHUNKS, MEDIA_TYPE_DATA, MEDIA_TYPE_LEAVES, MEDIA_TYPE_META,
};
use super::spool::FileSink;
use super::tree::{encode_rdev, FileData, Kind, Meta, Node, Tree};
use crate::registry::{sha256_digest, Registry, RegistryError};

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file of the source tree could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The tree could not be built.
    #[error("{0}")]
    Tree(#[from] super::tree::TreeError),
    /// The EROFS image could not be written.
    #[error("{0}")]
    Write(#[from] erofs::WriteError),
    /// A file type the format cannot hold.
    #[error("{0}")]
    Unsupported(String),
}

/// Layout choices.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Verified chunk size of data blobs, also the EROFS chunk size of files.
    pub chunk_size: u64,
    /// Regular files up to this size are stored inline in the metadata blob.
    pub inline_max: u64,
    /// Number of data blobs files are spread over (round robin), like layers.
    pub blobs: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: super::format::DEFAULT_CHUNK_SIZE,
            inline_max: 2048,
            blobs: 1,
        }
    }
}

/// A built image, in memory. `table.blobs[i].digest` is the digest of `data[i]`.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The EROFS metadata blob.
    pub meta: Vec<u8>,
    /// The data blobs, in device order.
    pub data: Vec<Bytes>,
    /// The chunk digest table.
    pub table: ChunkTable,
}

impl BuiltImage {
    /// Write the image into directory `out` as `lazyblob mkfs` lays it out: `meta.erofs`,
    /// `chunks.json` and `data-N.blob` (N from 1, in device order).
    pub fn write_to(&self, out: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("meta.erofs"), &self.meta)?;
        std::fs::write(out.join("chunks.json"), self.table.to_json())?;
        for (i, d) in self.data.iter().enumerate() {
            std::fs::write(out.join(format!("data-{}.blob", i + 1)), d)?;
        }
        Ok(())
    }
}

/// Accumulates file contents into data blobs.
pub struct BlobWriter {
    blobs: Vec<Vec<u8>>,
}

impl BlobWriter {
    /// A writer of `n` data blobs.
    pub fn new(n: usize) -> BlobWriter {
        BlobWriter {
            blobs: vec![Vec::new(); n.max(1)],
        }
    }

    /// Append `content` to blob `b` (0-based) on a 4 KiB boundary.
    pub fn add(&mut self, b: usize, content: &[u8]) -> FileData {
        let b = b % self.blobs.len();
        let blob = &mut self.blobs[b];
        let offset = blob.len().div_ceil(4096) * 4096;
        blob.resize(offset, 0);
        blob.extend_from_slice(content);
        FileData::Blob {
            device: b as u16 + 1,
            offset: offset as u64,
            size: content.len() as u64,
        }
    }

    /// Append exactly `size` bytes read from `r` to blob `b` on a 4 KiB boundary.
    pub fn add_reader<R: std::io::Read + ?Sized>(
        &mut self,
        b: usize,
        r: &mut R,
        size: u64,
    ) -> std::io::Result<FileData> {
        let b = b % self.blobs.len();
        let blob = &mut self.blobs[b];
        let offset = blob.len().div_ceil(4096) * 4096;
        blob.resize(offset, 0);
        let got = std::io::copy(&mut std::io::Read::take(r, size), blob)?;
        if got != size {
            blob.truncate(offset);
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("truncated: {got} of {size} bytes"),
            ));
        }
        Ok(FileData::Blob {
            device: b as u16 + 1,
            offset: offset as u64,
            size,
        })
    }

    /// Blob `b` (0-based) as a [`FileSink`] (a layer applied to it).
    pub fn slot(&mut self, b: usize) -> Slot<'_> {
        Slot { writer: self, blob: b }
    }

    /// The blobs, each padded to whole blocks.
    pub fn into_padded(self) -> Vec<Vec<u8>> {
        self.blobs
            .into_iter()
            .map(|mut b| {
                b.resize(b.len().div_ceil(4096) * 4096, 0);
                b
            })
            .collect()
    }

    /// Pad blobs to whole blocks, drop empty ones (renumbering devices in `tree`), write the
    /// metadata image and the chunk table.
    pub fn finish(self, tree: Tree, chunk_size: u64) -> Result<BuiltImage, BuildError> {
        self.finish_with(
            tree,
            chunk_size,
            Hashing::with_default_leaves(ChunkDigest::default(), chunk_size),
        )
    }

    /// [`BlobWriter::finish`] with explicit hashing (an algorithm alone: no leaves).
    pub fn finish_with(
        self,
        tree: Tree,
        chunk_size: u64,
        hashing: impl Into<Hashing>,
    ) -> Result<BuiltImage, BuildError> {
        let hashing = hashing.into();
        let padded = self.into_padded();
        let chunks = padded
            .iter()
            .map(|b| (!b.is_empty()).then(|| BlobChunks::of(b, chunk_size, hashing)))
            .collect();
        let (meta, table) = finish_tree(tree, chunks, chunk_size, hashing)?;
        let data = padded.into_iter().filter(|b| !b.is_empty()).map(Bytes::from).collect();
        Ok(BuiltImage { meta, data, table })
    }
}

/// One blob of a [`BlobWriter`] as a [`FileSink`].
pub struct Slot<'a> {
    writer: &'a mut BlobWriter,
    blob: usize,
}

impl FileSink for Slot<'_> {
    fn add_reader(&mut self, r: &mut dyn std::io::Read, size: u64) -> std::io::Result<FileData> {
        self.writer.add_reader(self.blob, r, size)
    }
}

/// The metadata image and chunk table of `tree`, whose files live in the data blobs described
/// by `blobs` (by device, from 1; `None` for a blob nothing was written to: it is dropped and
/// the devices after it are renumbered in `tree`).
pub fn finish_tree(
    mut tree: Tree,
    blobs: Vec<Option<BlobChunks>>,
    chunk_size: u64,
    hashing: Hashing,
) -> Result<(Vec<u8>, ChunkTable), BuildError> {
    let mut renumber = HashMap::new();
    let mut kept = Vec::new();
    for (i, b) in blobs.into_iter().enumerate() {
        if let Some(b) = b {
            renumber.insert(i as u16 + 1, kept.len() as u16 + 1);
            kept.push(b);
        }
    }
    for n in tree.nodes.iter_mut() {
        if let Kind::File(FileData::Blob { device, .. }) = &mut n.kind {
            *device = *renumber
                .get(device)
                .ok_or_else(|| BuildError::Unsupported(format!("file data in empty blob {device}")))?;
        }
    }
    let devices: Vec<DeviceSlot> = kept
        .iter()
        .map(|c| DeviceSlot {
            tag: device_tag(&c.digest),
            blocks: (c.size / 4096) as u32,
        })
        .collect();
    let meta = erofs::write(&tree, &devices, chunk_size.trailing_zeros() as u8)?;
    let table = ChunkTable {
        version: 1,
        chunk_size,
        chunk_digest: hashing.algorithm,
        leaf_size: hashing.leaf_size.filter(|_| !kept.is_empty()),
        blobs: kept,
    };
    Ok((meta, table))
}

/// Build an image from a directory on this host (development and tests; the converter builds
/// from OCI layers).
pub fn from_dir(root: &Path, opts: &BuildOptions) -> Result<BuiltImage, BuildError> {
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| BuildError::Io { path, source }
    };
    let md = std::fs::symlink_metadata(root).map_err(io(root))?;
    let mut tree = Tree::new(meta_of(&md));
    let mut blobs = BlobWriter::new(opts.blobs);
    let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
    let mut counter = 0usize;
    let mut stack = vec![(root.to_path_buf(), Tree::ROOT)];
    while let Some((dir, node)) = stack.pop() {
        let mut entries: BTreeMap<Vec<u8>, std::path::PathBuf> = BTreeMap::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            use std::os::unix::ffi::OsStrExt;
            entries.insert(e.file_name().as_bytes().to_vec(), e.path());
        }
        for (name, path) in entries {
            let md = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            let ft = md.file_type();
            if !ft.is_dir() && md.nlink() > 1 {
                if let Some(&target) = seen.get(&(md.dev(), md.ino())) {
                    tree.link(node, &name, target)?;
                    continue;
                }
            }
            let kind = if ft.is_dir() {
                Kind::Dir(BTreeMap::new())
            } else if ft.is_file() {
                let content = std::fs::read(&path).map_err(io(&path))?;
                if content.len() as u64 <= opts.inline_max {
                    Kind::File(FileData::Inline(content))
                } else {
                    counter += 1;
                    Kind::File(blobs.add(counter - 1, &content))
                }
            } else if ft.is_symlink() {
                use std::os::unix::ffi::OsStrExt;
                Kind::Symlink(
                    std::fs::read_link(&path)
                        .map_err(io(&path))?
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else if ft.is_char_device() || ft.is_block_device() {
                let rdev = encode_rdev(
                    nix::sys::stat::major(md.rdev()) as u32,
                    nix::sys::stat::minor(md.rdev()) as u32,
                );
                if ft.is_char_device() {
                    Kind::CharDev(rdev)
                } else {
                    Kind::BlockDev(rdev)
                }
            } else if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_socket() {
                Kind::Socket
            } else {
                return Err(BuildError::Unsupported(format!(
                    "{}: unknown file type",
                    path.display()
                )));
            };
            let is_dir = matches!(kind, Kind::Dir(_));
            let idx = tree.insert(
                node,
                &name,
                Node {
                    meta: meta_of(&md),
                    kind,
                },
            )?;
            if is_dir {
                stack.push((path, idx));
            } else if md.nlink() > 1 {
                seen.insert((md.dev(), md.ino()), idx);
            }
        }
    }
    blobs.finish(tree, opts.chunk_size)
}

fn meta_of(md: &std::fs::Metadata) -> Meta {
    Meta {
        perm: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs: BTreeMap::new(),
    }
}

/// The manifest of a built image and the blobs it references, ready to upload.
pub struct Assembled {
    /// (digest, bytes) of data blobs, chunk table, metadata blob and config.
    pub blobs: Vec<(String, Bytes)>,
    /// The image manifest pushed.
    pub manifest: Bytes,
}

/// A minimal image config for images built from a directory.
pub fn minimal_config(platform: &crate::registry::platform::Platform) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": platform.arch,
        "os": platform.os,
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {}
    }))
    .unwrap_or_default()
}

/// Lay out the manifest of `img` with `config` (see [`assemble_parts`]); the data blobs are
/// among the blobs to upload.
pub fn assemble(img: &BuiltImage, config: &[u8]) -> Result<Assembled, serde_json::Error> {
    let mut a = assemble_parts(&img.meta, &img.table, config)?;
    let data = img
        .table
        .blobs
        .iter()
        .map(|c| c.digest.to_string())
        .zip(img.data.iter().cloned());
    a.blobs.splice(0..0, data);
    Ok(a)
}

/// Lay out the manifest of an image made of the metadata blob `meta` and the data blobs that
/// `table` describes, with `config` (its `rootfs.diff_ids` are set to the new layers' digests
/// and its `history`, which described the old layers, is dropped). Data blob digests come from
/// the chunk table: no data is hashed or copied again, and the data blobs are not among the
/// blobs returned (the caller uploads them from wherever they are).
pub fn assemble_parts(meta: &[u8], table: &ChunkTable, config: &[u8]) -> Result<Assembled, serde_json::Error> {
    let with_digest = |b: Bytes| (sha256_digest(&b), b);
    let table_blob = with_digest(Bytes::from(table.to_json()));
    let meta = with_digest(Bytes::copy_from_slice(meta));
    let data: Vec<(String, u64)> = table.blobs.iter().map(|c| (c.digest.to_string(), c.size)).collect();
    let desc =
        |media_type: &str, digest: &str, size: u64| json!({"mediaType": media_type, "digest": digest, "size": size});
    let mut layers = vec![
        (
            MEDIA_TYPE_META,
            "meta",
            desc(MEDIA_TYPE_META, &meta.0, meta.1.len() as u64),
        ),
        (
            MEDIA_TYPE_CHUNKS,
            "chunks",
            desc(MEDIA_TYPE_CHUNKS, &table_blob.0, table_blob.1.len() as u64),
        ),
    ];
    let leaves = leaves_blob(table)?.map(with_digest);
    if let Some((digest, b)) = &leaves {
        layers.push((
            MEDIA_TYPE_LEAVES,
            "leaves",
            desc(MEDIA_TYPE_LEAVES, digest, b.len() as u64),
        ));
    }
    layers.extend(
        data.iter()
            .map(|(d, size)| (MEDIA_TYPE_DATA, "data", desc(MEDIA_TYPE_DATA, d, *size))),
    );
    let mut cfg: serde_json::Value = serde_json::from_slice(config)?;
    if let Some(obj) = cfg.as_object_mut() {
        obj.remove("history");
        // one diff id per layer, as containerd counts them; lazyblob layers are never
        // unpacked, so their digests stand in
        let diff_ids: Vec<&serde_json::Value> = layers.iter().map(|(_, _, d)| &d["digest"]).collect();
        obj.insert("rootfs".into(), json!({"type": "layers", "diff_ids": diff_ids}));
    }
    let config = with_digest(Bytes::from(serde_json::to_vec(&cfg)?));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
        "config": desc(oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE, &config.0, config.1.len() as u64),
        "layers": layers
            .into_iter()
            .map(|(_, role, mut l)| {
                l["annotations"] = json!({ ANNOTATION_LAYER: role });
                l
            })
            .collect::<Vec<_>>(),
        "annotations": {ANNOTATION_FORMAT: if leaves.is_some() { FORMAT_VERSION } else { FORMAT_VERSION_NO_LEAVES }},
    });
    Ok(Assembled {
        blobs: [table_blob, meta, config].into_iter().chain(leaves).collect(),
        manifest: Bytes::from(serde_json::to_vec(&manifest)?),
    })
}

/// The leaves layer of a table built with leaves: every blob's slots, in table order.
fn leaves_blob(table: &ChunkTable) -> Result<Option<Bytes>, serde_json::Error> {
    let Some(len) = table.leaves_len() else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(len as usize);
    for b in &table.blobs {
        out.extend_from_slice(&b.leaves);
    }
    if out.len() as u64 != len {
        use serde::ser::Error;
        return Err(serde_json::Error::custom(format!(
            "leaves of {} bytes where the table needs {len}",
            out.len()
        )));
    }
    Ok(Some(Bytes::from(out)))
}

/// Push a built image (data blobs, chunk table, metadata blob, config, manifest) and tag it;
/// returns the manifest digest. `config` is the image config JSON (a minimal one if `None`).
pub async fn push(
    registry: &Registry,
    reference: &Reference,
    img: &BuiltImage,
    config: Option<Vec<u8>>,
) -> Result<String, RegistryError> {
    let config = config.unwrap_or_else(|| minimal_config(registry.platform()));
    let a = assemble(img, &config).map_err(|e| RegistryError::Manifest(e.to_string()))?;
    for (digest, b) in a.blobs {
        registry.push_blob_with_digest(reference, b, digest).await?;
    }
    registry
        .push_manifest(reference, a.manifest, oci_client::manifest::OCI_IMAGE_MEDIA_TYPE)
        .await
}
