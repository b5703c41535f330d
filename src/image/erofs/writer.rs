//! Writes a [`Tree`] as an EROFS metadata image: superblock, device table, extended inodes
//! (inline xattrs; small data inline; regular files in data blobs as chunk-based inodes
//! whose chunk indexes name the device and block), directory blocks.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::layout::{self, ft, DataLayout, Inode, SuperBlock, BLOCK};
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
    #[error("{0}")]
    Invalid(String),
}

struct Placed {
    node: usize,
    nid: u64,
    layout: DataLayout,
    xattrs: Option<Vec<u8>>,
    /// Data stored in the metadata image (dir blocks, symlink target, small file).
    data: Vec<u8>,
    chunks: u64,
    raw_blkaddr: u32,
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Write the metadata image. `chunk_bits` is log2 of the EROFS chunk size for data-blob
/// files (>= 12).
pub fn write(tree: &Tree, devices: &[DeviceSlot], chunk_bits: u8) -> Result<Vec<u8>, WriteError> {
    if !(12..=30).contains(&chunk_bits) {
        return Err(WriteError::Invalid(format!("chunk bits {chunk_bits} out of range")));
    }
    if devices.len() > 1024 {
        return Err(WriteError::Invalid(format!("{} data blobs: too many", devices.len())));
    }
    // 1. Order inodes breadth-first from the root; find parents and link counts.
    let mut order = vec![Tree::ROOT];
    let mut index_of: HashMap<usize, usize> = HashMap::from([(Tree::ROOT, 0)]);
    let mut parent: HashMap<usize, usize> = HashMap::from([(Tree::ROOT, Tree::ROOT)]);
    let mut links: HashMap<usize, u32> = HashMap::new();
    let mut i = 0;
    while i < order.len() {
        let n = order[i];
        i += 1;
        if let Some(children) = tree.children(n) {
            for &c in children.values() {
                *links.entry(c).or_default() += 1;
                if index_of.contains_key(&c) {
                    if tree.children(c).is_some() {
                        return Err(WriteError::Invalid("a directory is linked twice".into()));
                    }
                    continue;
                }
                index_of.insert(c, order.len());
                parent.insert(c, n);
                order.push(c);
            }
        }
    }

    // 2. Per inode: xattrs, in-image data, layout.
    let mut placed = Vec::with_capacity(order.len());
    for &n in &order {
        let node = &tree.nodes[n];
        let xa: Vec<(&[u8], &[u8])> = node
            .meta
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let xattrs = layout::xattr_body(&xa).map_err(WriteError::Invalid)?;
        let (data, chunks) = match &node.kind {
            Kind::Dir(children) => {
                let mut entries: Vec<(&[u8], u64, u8)> = vec![(b".", 0, ft::DIR), (b"..", 0, ft::DIR)];
                entries.extend(children.keys().map(|k| (k.as_slice(), 0u64, 0u8)));
                entries.sort_by(|a, b| a.0.cmp(b.0));
                (layout::dir_data(&entries), 0)
            }
            Kind::Symlink(t) => {
                if t.is_empty() || t.len() >= BLOCK as usize {
                    return Err(WriteError::Invalid(format!("symlink target of {} bytes", t.len())));
                }
                (t.clone(), 0)
            }
            Kind::File(FileData::Inline(d)) => (d.clone(), 0),
            Kind::File(FileData::Blob { size, .. }) => (Vec::new(), size.div_ceil(1 << chunk_bits)),
            _ => (Vec::new(), 0),
        };
        let header = layout::INODE_EXTENDED_SIZE + xattrs.as_ref().map_or(0, Vec::len);
        if header > BLOCK as usize {
            return Err(WriteError::Invalid("xattrs of one inode exceed a block".into()));
        }
        let layout = if chunks > 0 {
            DataLayout::ChunkBased
        } else if !data.is_empty() && header + data.len() <= BLOCK as usize {
            DataLayout::FlatInline
        } else {
            DataLayout::FlatPlain
        };
        placed.push(Placed {
            node: n,
            nid: 0,
            layout,
            xattrs,
            data,
            chunks,
            raw_blkaddr: 0,
        });
    }

    // 3. Place inodes after the superblock and device table.
    let devt_off = (layout::SUPER_OFFSET + layout::SUPER_SIZE) as u64;
    let meta_blkaddr = (devt_off + (devices.len() * layout::DEVT_SLOT_SIZE) as u64).div_ceil(BLOCK);
    let meta_start = meta_blkaddr * BLOCK;
    let mut rel = 0u64;
    for p in placed.iter_mut() {
        let header = (layout::INODE_EXTENDED_SIZE + p.xattrs.as_ref().map_or(0, Vec::len)) as u64;
        let inline = if p.layout == DataLayout::FlatInline {
            p.data.len() as u64
        } else {
            0
        };
        if rel % BLOCK + header + inline > BLOCK {
            rel = align(rel, BLOCK);
        }
        p.nid = rel / layout::INODE_SLOT;
        let end = if p.layout == DataLayout::ChunkBased {
            align(rel + header, layout::CHUNK_INDEX_SIZE as u64) + p.chunks * layout::CHUNK_INDEX_SIZE as u64
        } else {
            rel + header + inline
        };
        rel = align(end, layout::INODE_SLOT);
    }
    // 4. Blocks for data that is not inline.
    let mut blk = (meta_start + rel).div_ceil(BLOCK);
    for p in placed.iter_mut() {
        if p.layout == DataLayout::FlatPlain && !p.data.is_empty() {
            p.raw_blkaddr = u32::try_from(blk).map_err(|_| WriteError::Invalid("metadata image too large".into()))?;
            blk += (p.data.len() as u64).div_ceil(BLOCK);
        }
    }
    let total_blocks = u32::try_from(blk).map_err(|_| WriteError::Invalid("metadata image too large".into()))?;
    let mut img = vec![0u8; (blk * BLOCK) as usize];

    // 5. Encode.
    let nid_of = |n: usize| placed[index_of[&n]].nid;
    let mut has_chunked = false;
    for (k, p) in placed.iter().enumerate() {
        let node = &tree.nodes[p.node];
        let mut ino = Inode {
            ino: (k + 1) as u32,
            uid: node.meta.uid,
            gid: node.meta.gid,
            mtime: node.meta.mtime as u64,
            mtime_nsec: node.meta.mtime_nsec,
            nlink: links.get(&p.node).copied().unwrap_or(1),
            xattr_icount: layout::xattr_icount(p.xattrs.as_ref().map_or(0, Vec::len)),
            ..Default::default()
        };
        ino.set_layout(p.layout);
        let perm = (node.meta.perm & 0o7777) as u16;
        let mut data = p.data.clone();
        match &node.kind {
            Kind::Dir(children) => {
                ino.mode = 0o040000 | perm;
                let subdirs = children.values().filter(|c| tree.children(**c).is_some()).count() as u32;
                ino.nlink = 2 + subdirs;
                let mut entries: Vec<(&[u8], u64, u8)> =
                    vec![(b".", p.nid, ft::DIR), (b"..", nid_of(parent[&p.node]), ft::DIR)];
                for (name, &c) in children {
                    entries.push((name.as_slice(), nid_of(c), file_type(&tree.nodes[c].kind)));
                }
                entries.sort_by(|a, b| a.0.cmp(b.0));
                data = layout::dir_data(&entries);
                ino.size = data.len() as u64;
            }
            Kind::File(fd) => {
                ino.mode = 0o100000 | perm;
                ino.size = fd.size();
            }
            Kind::Symlink(t) => {
                ino.mode = 0o120000 | perm;
                ino.size = t.len() as u64;
            }
            Kind::CharDev(rdev) => {
                ino.mode = 0o020000 | perm;
                ino.i_u = *rdev;
            }
            Kind::BlockDev(rdev) => {
                ino.mode = 0o060000 | perm;
                ino.i_u = *rdev;
            }
            Kind::Fifo => ino.mode = 0o010000 | perm,
            Kind::Socket => ino.mode = 0o140000 | perm,
        }
        let at = (meta_start + p.nid * layout::INODE_SLOT) as usize;
        let header = layout::INODE_EXTENDED_SIZE + p.xattrs.as_ref().map_or(0, Vec::len);
        match p.layout {
            DataLayout::FlatPlain if !data.is_empty() => {
                ino.i_u = p.raw_blkaddr;
                let off = p.raw_blkaddr as usize * BLOCK as usize;
                img[off..off + data.len()].copy_from_slice(&data);
            }
            DataLayout::FlatPlain => {}
            DataLayout::FlatInline => {
                img[at + header..at + header + data.len()].copy_from_slice(&data);
            }
            DataLayout::ChunkBased => {
                has_chunked = true;
                ino.i_u = (chunk_bits as u32 - layout::BLKSZ_BITS as u32) | layout::CHUNK_FORMAT_INDEXES as u32;
                let Kind::File(FileData::Blob { device, offset, .. }) = &node.kind else {
                    return Err(WriteError::Invalid("chunk-based inode without blob data".into()));
                };
                if *device == 0 || *device as usize > devices.len() || offset % BLOCK != 0 {
                    return Err(WriteError::Invalid(format!(
                        "file data at device {device} offset {offset} is invalid"
                    )));
                }
                let mut pos = align((at + header) as u64, layout::CHUNK_INDEX_SIZE as u64) as usize;
                for c in 0..p.chunks {
                    let blkaddr = offset / BLOCK + (c << (chunk_bits - layout::BLKSZ_BITS));
                    let blkaddr =
                        u32::try_from(blkaddr).map_err(|_| WriteError::Invalid("data blob too large".into()))?;
                    img[pos..pos + layout::CHUNK_INDEX_SIZE].copy_from_slice(&layout::chunk_index(*device, blkaddr));
                    pos += layout::CHUNK_INDEX_SIZE;
                }
            }
        }
        img[at..at + layout::INODE_EXTENDED_SIZE].copy_from_slice(&ino.encode());
        if let Some(x) = &p.xattrs {
            img[at + layout::INODE_EXTENDED_SIZE..at + header].copy_from_slice(x);
        }
    }
    for (k, d) in devices.iter().enumerate() {
        if d.tag.len() != 64 {
            return Err(WriteError::Invalid(format!(
                "device tag {:?} is not 64 characters",
                d.tag
            )));
        }
        let off = devt_off as usize + k * layout::DEVT_SLOT_SIZE;
        img[off..off + layout::DEVT_SLOT_SIZE].copy_from_slice(&layout::device_slot(d.tag.as_bytes(), d.blocks));
    }
    let mut sb = SuperBlock {
        root_nid: 0,
        inos: placed.len() as u64,
        blocks: total_blocks,
        meta_blkaddr: meta_blkaddr as u32,
        extra_devices: devices.len() as u16,
        devt_slotoff: (devt_off / layout::DEVT_SLOT_SIZE as u64) as u16,
        feature_incompat: if devices.is_empty() {
            0
        } else {
            layout::INCOMPAT_DEVICE_TABLE
        } | if has_chunked { layout::INCOMPAT_CHUNKED_FILE } else { 0 },
        ..Default::default()
    };
    sb.volume_name[..8].copy_from_slice(b"lazyblob");
    let so = layout::SUPER_OFFSET;
    img[so..so + layout::SUPER_SIZE].copy_from_slice(&sb.encode());
    // A deterministic UUID: the hash of the image without one.
    let h = Sha256::digest(&img);
    sb.uuid.copy_from_slice(&h[..16]);
    img[so..so + layout::SUPER_SIZE].copy_from_slice(&sb.encode());
    Ok(img)
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
