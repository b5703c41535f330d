//! Writes a [`Tree`] as an EROFS metadata image: superblock, device table, extended inodes
//! (inline xattrs; small data inline; regular files in data blobs as chunk-based inodes
//! whose chunk indexes name the device and block), directory blocks.
//!
//! In three steps over typed structures: `collect` orders the inodes and describes each
//! (xattrs, data kept in the image, layout), `place` gives each its nid and the blocks of
//! its data, `encode` turns them into the on-disk structures of `layout`.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use zerocopy::IntoBytes;

use super::layout::{self, ft, ChunkIndex, DataLayout, Inode, SuperBlock, BLOCK};
use crate::image::tree::{FileData, Kind, Tree};

/// A data blob as the device table names it.
#[derive(Debug, Clone)]
pub struct DeviceSlot {
    /// 64-character tag: the blob digest's hex.
    pub tag: String,
    /// Blob size in 4 KiB blocks.
    pub blocks: u32,
}

/// Why a tree cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The tree or its devices cannot be written (with why).
    #[error("{0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> WriteError {
    WriteError::Invalid(what.into())
}

/// Write the metadata image. `chunk_bits` is log2 of the EROFS chunk size for data-blob
/// files (>= 12).
pub fn write(tree: &Tree, devices: &[DeviceSlot], chunk_bits: u8) -> Result<Vec<u8>, WriteError> {
    if !(12..=30).contains(&chunk_bits) {
        return Err(invalid(format!("chunk bits {chunk_bits} out of range")));
    }
    if devices.len() > 1024 {
        return Err(invalid(format!("{} data blobs: too many", devices.len())));
    }
    if let Some(d) = devices.iter().find(|d| d.tag.len() != 64) {
        return Err(invalid(format!("device tag {:?} is not 64 characters", d.tag)));
    }
    let order = Order::of(tree)?;
    let mut inodes = collect(tree, &order, chunk_bits)?;
    let geometry = place(&mut inodes, devices.len())?;
    encode(tree, &order, &inodes, devices, &geometry, chunk_bits)
}

/// The inodes breadth-first from the root, with each one's parent and link count.
struct Order {
    nodes: Vec<usize>,
    index_of: HashMap<usize, usize>,
    parent: HashMap<usize, usize>,
    links: HashMap<usize, u32>,
}

impl Order {
    fn of(tree: &Tree) -> Result<Order, WriteError> {
        let mut o = Order {
            nodes: vec![Tree::ROOT],
            index_of: HashMap::from([(Tree::ROOT, 0)]),
            parent: HashMap::from([(Tree::ROOT, Tree::ROOT)]),
            links: HashMap::new(),
        };
        let mut i = 0;
        while i < o.nodes.len() {
            let n = o.nodes[i];
            i += 1;
            for &c in tree.children(n).into_iter().flat_map(|c| c.values()) {
                *o.links.entry(c).or_default() += 1;
                if o.index_of.contains_key(&c) {
                    if tree.children(c).is_some() {
                        return Err(invalid("a directory is linked twice"));
                    }
                    continue;
                }
                o.index_of.insert(c, o.nodes.len());
                o.parent.insert(c, n);
                o.nodes.push(c);
            }
        }
        Ok(o)
    }
}

/// One inode as collected, then placed.
struct Described {
    node: usize,
    layout: DataLayout,
    xattrs: Option<Vec<u8>>,
    /// Data stored in the metadata image (symlink target, small file); directories get
    /// theirs at encoding, once every nid is known (its size is known here).
    data: Vec<u8>,
    /// Chunk indexes of a chunk-based file.
    chunks: u64,
    /// Set by `place`: the inode's nid and the first block of non-inline data.
    nid: u64,
    raw_blkaddr: u32,
}

impl Described {
    /// Bytes of the inode and its inline xattrs.
    fn header(&self) -> usize {
        layout::INODE_EXTENDED_SIZE + self.xattrs.as_ref().map_or(0, Vec::len)
    }
}

/// Describe every inode: xattrs, in-image data and layout.
fn collect(tree: &Tree, order: &Order, chunk_bits: u8) -> Result<Vec<Described>, WriteError> {
    let mut out = Vec::with_capacity(order.nodes.len());
    for &n in &order.nodes {
        let node = &tree.nodes[n];
        let xa: Vec<(&[u8], &[u8])> = node
            .meta
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let xattrs = layout::xattr_body(&xa).map_err(WriteError::Invalid)?;
        let (data, chunks) = match &node.kind {
            // nids are placeholders: the size is what matters here
            Kind::Dir(children) => (layout::dir_data(&dir_entries(children.keys(), |_| (0, 0))), 0),
            Kind::Symlink(t) if t.is_empty() || t.len() >= BLOCK as usize => {
                return Err(invalid(format!("symlink target of {} bytes", t.len())));
            }
            Kind::Symlink(t) => (t.clone(), 0),
            Kind::File(FileData::Inline(d)) => (d.clone(), 0),
            Kind::File(FileData::Blob { size, .. }) => (Vec::new(), size.div_ceil(1 << chunk_bits)),
            _ => (Vec::new(), 0),
        };
        let mut d = Described {
            node: n,
            layout: DataLayout::FlatPlain,
            xattrs,
            data,
            chunks,
            nid: 0,
            raw_blkaddr: 0,
        };
        if d.header() > BLOCK as usize {
            return Err(invalid("xattrs of one inode exceed a block"));
        }
        d.layout = if d.chunks > 0 {
            DataLayout::ChunkBased
        } else if !d.data.is_empty() && d.header() + d.data.len() <= BLOCK as usize {
            DataLayout::FlatInline
        } else {
            DataLayout::FlatPlain
        };
        out.push(d);
    }
    Ok(out)
}

/// The directory entries of `names` (plus `.` and `..`), sorted by name; `nid_type` gives
/// a child's nid and file type.
fn dir_entries<'a>(
    names: impl Iterator<Item = &'a Vec<u8>>,
    nid_type: impl Fn(&[u8]) -> (u64, u8),
) -> Vec<(&'a [u8], u64, u8)> {
    let mut entries: Vec<(&[u8], u64, u8)> = vec![(b".", 0, ft::DIR), (b"..", 0, ft::DIR)];
    entries.extend(names.map(|k| {
        let (nid, t) = nid_type(k);
        (k.as_slice(), nid, t)
    }));
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

/// Where the parts of the image are.
struct Geometry {
    /// Byte offset of the device table.
    devt_off: u64,
    /// Block where inodes start (nid 0).
    meta_blkaddr: u32,
    blocks: u32,
}

/// Give each inode its nid (inodes never cross a block with their inline part) and the
/// blocks of data that is not inline.
fn place(inodes: &mut [Described], devices: usize) -> Result<Geometry, WriteError> {
    let devt_off = (layout::SUPER_OFFSET + layout::SUPER_SIZE) as u64;
    let meta_blkaddr = (devt_off + (devices * layout::DEVT_SLOT_SIZE) as u64).div_ceil(BLOCK);
    let mut rel = 0u64;
    for d in inodes.iter_mut() {
        let header = d.header() as u64;
        let inline = if d.layout == DataLayout::FlatInline {
            d.data.len() as u64
        } else {
            0
        };
        if rel % BLOCK + header + inline > BLOCK {
            rel = rel.next_multiple_of(BLOCK);
        }
        d.nid = rel / layout::INODE_SLOT;
        let end = match d.layout {
            DataLayout::ChunkBased => {
                (rel + header).next_multiple_of(layout::CHUNK_INDEX_SIZE as u64)
                    + d.chunks * layout::CHUNK_INDEX_SIZE as u64
            }
            _ => rel + header + inline,
        };
        rel = end.next_multiple_of(layout::INODE_SLOT);
    }
    let too_large = || invalid("metadata image too large");
    let mut blk = (meta_blkaddr * BLOCK + rel).div_ceil(BLOCK);
    for d in inodes.iter_mut() {
        if d.layout == DataLayout::FlatPlain && !d.data.is_empty() {
            d.raw_blkaddr = u32::try_from(blk).map_err(|_| too_large())?;
            blk += (d.data.len() as u64).div_ceil(BLOCK);
        }
    }
    // erofs-utils' fsck (1.5) reads an xattr header after every inode, xattrs or not: an
    // image whose last inode ends at its last byte fails there, so such an image gets one
    // more (zero) block. The kernel never reads it.
    if blk * BLOCK < meta_blkaddr * BLOCK + rel + layout::XATTR_IBODY_HEADER as u64 {
        blk += 1;
    }
    Ok(Geometry {
        devt_off,
        meta_blkaddr: u32::try_from(meta_blkaddr).map_err(|_| too_large())?,
        blocks: u32::try_from(blk).map_err(|_| too_large())?,
    })
}

/// The image: superblock, device table, inodes with their inline parts, data blocks.
fn encode(
    tree: &Tree,
    order: &Order,
    inodes: &[Described],
    devices: &[DeviceSlot],
    g: &Geometry,
    chunk_bits: u8,
) -> Result<Vec<u8>, WriteError> {
    let mut img = vec![0u8; g.blocks as usize * BLOCK as usize];
    let meta_start = g.meta_blkaddr as usize * BLOCK as usize;
    let nid_of = |n: usize| inodes[order.index_of[&n]].nid;
    let mut has_chunked = false;
    for (k, d) in inodes.iter().enumerate() {
        let node = &tree.nodes[d.node];
        let mut ino = Inode {
            ino: (k as u32 + 1).into(),
            uid: node.meta.uid.into(),
            gid: node.meta.gid.into(),
            mtime: (node.meta.mtime as u64).into(),
            mtime_nsec: node.meta.mtime_nsec.into(),
            nlink: order.links.get(&d.node).copied().unwrap_or(1).into(),
            xattr_icount: layout::xattr_icount(d.xattrs.as_ref().map_or(0, Vec::len)).into(),
            ..Default::default()
        };
        ino.set_layout(d.layout);
        let (mode, size, data) = type_and_data(tree, order, d, &nid_of);
        ino.mode = (mode | (node.meta.perm & 0o7777) as u16).into();
        if let Kind::Dir(children) = &node.kind {
            let subdirs = children.values().filter(|c| tree.children(**c).is_some()).count() as u32;
            ino.nlink = (2 + subdirs).into();
        }
        if let Kind::CharDev(rdev) | Kind::BlockDev(rdev) = &node.kind {
            ino.i_u = (*rdev).into();
        }
        ino.size = size.into();
        let at = meta_start + d.nid as usize * layout::INODE_SLOT as usize;
        let header = d.header();
        match d.layout {
            DataLayout::FlatPlain if !data.is_empty() => {
                ino.i_u = d.raw_blkaddr.into();
                let off = d.raw_blkaddr as usize * BLOCK as usize;
                img[off..off + data.len()].copy_from_slice(&data);
            }
            DataLayout::FlatPlain => {}
            DataLayout::FlatInline => img[at + header..at + header + data.len()].copy_from_slice(&data),
            DataLayout::ChunkBased => {
                has_chunked = true;
                ino.i_u = ((chunk_bits - layout::BLKSZ_BITS) as u32 | layout::CHUNK_FORMAT_INDEXES as u32).into();
                let from = (at + header).next_multiple_of(layout::CHUNK_INDEX_SIZE);
                for (c, index) in chunk_indexes(&node.kind, d.chunks, devices.len(), chunk_bits)?
                    .iter()
                    .enumerate()
                {
                    let pos = from + c * layout::CHUNK_INDEX_SIZE;
                    img[pos..pos + layout::CHUNK_INDEX_SIZE].copy_from_slice(index.as_bytes());
                }
            }
        }
        img[at..at + layout::INODE_EXTENDED_SIZE].copy_from_slice(ino.as_bytes());
        if let Some(x) = &d.xattrs {
            img[at + layout::INODE_EXTENDED_SIZE..at + header].copy_from_slice(x);
        }
    }
    for (k, d) in devices.iter().enumerate() {
        let off = g.devt_off as usize + k * layout::DEVT_SLOT_SIZE;
        img[off..off + layout::DEVT_SLOT_SIZE]
            .copy_from_slice(layout::DeviceSlot::new(d.tag.as_bytes(), d.blocks).as_bytes());
    }
    let mut sb = SuperBlock::new();
    sb.inos = (inodes.len() as u64).into();
    sb.blocks = g.blocks.into();
    sb.meta_blkaddr = g.meta_blkaddr.into();
    sb.extra_devices = (devices.len() as u16).into();
    sb.devt_slotoff = ((g.devt_off / layout::DEVT_SLOT_SIZE as u64) as u16).into();
    let mut incompat = 0;
    if !devices.is_empty() {
        incompat |= layout::INCOMPAT_DEVICE_TABLE;
    }
    if has_chunked {
        incompat |= layout::INCOMPAT_CHUNKED_FILE;
    }
    sb.feature_incompat = incompat.into();
    sb.volume_name[..8].copy_from_slice(b"lazyblob");
    let so = layout::SUPER_OFFSET;
    img[so..so + layout::SUPER_SIZE].copy_from_slice(sb.as_bytes());
    // A deterministic UUID: the hash of the image without one.
    let h = Sha256::digest(&img);
    sb.uuid.copy_from_slice(&h[..16]);
    img[so..so + layout::SUPER_SIZE].copy_from_slice(sb.as_bytes());
    Ok(img)
}

/// An inode's file type bits, its size and the data the image holds for it (a directory's
/// blocks with the real nids).
fn type_and_data(tree: &Tree, order: &Order, d: &Described, nid_of: &dyn Fn(usize) -> u64) -> (u16, u64, Vec<u8>) {
    match &tree.nodes[d.node].kind {
        Kind::Dir(children) => {
            let mut entries = dir_entries(children.keys(), |name| {
                let c = children[name];
                (nid_of(c), file_type(&tree.nodes[c].kind))
            });
            for e in entries.iter_mut() {
                match e.0 {
                    b"." => e.1 = d.nid,
                    b".." => e.1 = nid_of(order.parent[&d.node]),
                    _ => {}
                }
            }
            let data = layout::dir_data(&entries);
            (0o040000, data.len() as u64, data)
        }
        Kind::File(fd) => (0o100000, fd.size(), d.data.clone()),
        Kind::Symlink(t) => (0o120000, t.len() as u64, d.data.clone()),
        Kind::CharDev(_) => (0o020000, 0, Vec::new()),
        Kind::BlockDev(_) => (0o060000, 0, Vec::new()),
        Kind::Fifo => (0o010000, 0, Vec::new()),
        Kind::Socket => (0o140000, 0, Vec::new()),
    }
}

/// The chunk indexes of a file whose data lives in a data blob.
fn chunk_indexes(kind: &Kind, chunks: u64, devices: usize, chunk_bits: u8) -> Result<Vec<ChunkIndex>, WriteError> {
    let Kind::File(FileData::Blob { device, offset, .. }) = kind else {
        return Err(invalid("chunk-based inode without blob data"));
    };
    if *device == 0 || *device as usize > devices || offset % BLOCK != 0 {
        return Err(invalid(format!(
            "file data at device {device} offset {offset} is invalid"
        )));
    }
    (0..chunks)
        .map(|c| {
            let blkaddr = offset / BLOCK + (c << (chunk_bits - layout::BLKSZ_BITS));
            Ok(ChunkIndex {
                advise: 0.into(),
                device_id: (*device).into(),
                blkaddr: u32::try_from(blkaddr)
                    .map_err(|_| invalid("data blob too large"))?
                    .into(),
            })
        })
        .collect()
}

fn file_type(k: &Kind) -> u8 {
    match k {
        Kind::Dir(_) => ft::DIR,
        Kind::File(_) => ft::REG,
        Kind::Symlink(_) => ft::LNK,
        Kind::CharDev(_) => ft::CHR,
        Kind::BlockDev(_) => ft::BLK,
        Kind::Fifo => ft::FIFO,
        Kind::Socket => ft::SOCK,
    }
}

#[cfg(test)]
mod tests;
