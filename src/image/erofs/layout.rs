//! EROFS on-disk structures (Linux `fs/erofs/erofs_fs.h`) as `#[repr(C)]` types of
//! little-endian fields (`zerocopy`): their bytes are the on-disk bytes, and an image can be
//! read back into them. Only what the writer produces: 4 KiB blocks, extended inodes,
//! flat/inline/chunk-based data layouts, inline xattrs, a device table.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const BLOCK: u64 = 4096;
pub const BLKSZ_BITS: u8 = 12;
pub const SUPER_OFFSET: usize = 1024;
pub const SUPER_SIZE: usize = 128;
pub const MAGIC: u32 = 0xE0F5_E1E2;
pub const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
pub const INCOMPAT_DEVICE_TABLE: u32 = 0x8;
pub const DEVT_SLOT_SIZE: usize = 128;
pub const INODE_EXTENDED_SIZE: usize = 64;
pub const INODE_SLOT: u64 = 32;
pub const DIRENT_SIZE: usize = 12;
pub const CHUNK_INDEX_SIZE: usize = 8;
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
pub const XATTR_IBODY_HEADER: usize = 12;
pub const NAME_MAX: usize = 255;

/// `i_format` data layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    FlatPlain = 0,
    FlatInline = 2,
    ChunkBased = 4,
}

/// Directory entry file types.
pub mod ft {
    pub const REG: u8 = 1;
    pub const DIR: u8 = 2;
    pub const CHR: u8 = 3;
    pub const BLK: u8 = 4;
    pub const FIFO: u8 = 5;
    pub const SOCK: u8 = 6;
    pub const LNK: u8 = 7;
}

/// `struct erofs_super_block` (128 bytes at offset 1024).
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SuperBlock {
    pub magic: U32,
    pub checksum: U32,
    pub feature_compat: U32,
    pub blkszbits: u8,
    pub sb_extslots: u8,
    pub root_nid: U16,
    pub inos: U64,
    pub build_time: U64,
    pub build_time_nsec: U32,
    pub blocks: U32,
    pub meta_blkaddr: U32,
    pub xattr_blkaddr: U32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: U32,
    /// `available_compr_algs` / `lz4_max_distance` (no compression here).
    pub compr: U16,
    pub extra_devices: U16,
    pub devt_slotoff: U16,
    pub dirblkbits: u8,
    pub xattr_prefix_count: u8,
    pub xattr_prefix_start: U32,
    pub packed_nid: U64,
    pub xattr_filter_reserved: u8,
    pub reserved: [u8; 23],
}

impl SuperBlock {
    /// A superblock of 4 KiB blocks with the magic set.
    pub fn new() -> SuperBlock {
        SuperBlock {
            magic: MAGIC.into(),
            blkszbits: BLKSZ_BITS,
            ..Default::default()
        }
    }
}

/// `struct erofs_deviceslot` (128 bytes): a data blob's tag (its digest hex) and size.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DeviceSlot {
    pub tag: [u8; 64],
    pub blocks: U32,
    pub mapped_blkaddr: U32,
    pub reserved: [u8; 56],
}

impl DeviceSlot {
    /// The slot of a blob tagged `tag` (at most 64 bytes) of `blocks` 4 KiB blocks.
    pub fn new(tag: &[u8], blocks: u32) -> DeviceSlot {
        let mut slot = DeviceSlot {
            tag: [0; 64],
            blocks: blocks.into(),
            mapped_blkaddr: 0.into(),
            reserved: [0; 56],
        };
        let n = tag.len().min(64);
        slot.tag[..n].copy_from_slice(&tag[..n]);
        slot
    }
}

/// `struct erofs_inode_extended` (64 bytes).
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Inode {
    /// Bit 0: extended inode; bits 1-3: data layout.
    pub format: U16,
    pub xattr_icount: U16,
    pub mode: U16,
    pub nb: U16,
    pub size: U64,
    /// raw_blkaddr, rdev or chunk format, by layout and type.
    pub i_u: U32,
    pub ino: U32,
    pub uid: U32,
    pub gid: U32,
    pub mtime: U64,
    pub mtime_nsec: U32,
    pub nlink: U32,
    pub reserved: [u8; 16],
}

impl Inode {
    /// Mark it extended with data layout `l`.
    pub fn set_layout(&mut self, l: DataLayout) {
        self.format = (1 | ((l as u16) << 1)).into();
    }

    /// Its data layout, if it is one the writer produces.
    #[cfg(test)]
    pub fn layout(&self) -> Option<DataLayout> {
        match (self.format.get() >> 1) & 0x7 {
            0 => Some(DataLayout::FlatPlain),
            2 => Some(DataLayout::FlatInline),
            4 => Some(DataLayout::ChunkBased),
            _ => None,
        }
    }
}

/// `struct erofs_inode_chunk_index` (8 bytes): which device and block a chunk of a file
/// lives at.
#[derive(Debug, Clone, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ChunkIndex {
    pub advise: U16,
    pub device_id: U16,
    pub blkaddr: U32,
}

/// `struct erofs_dirent` (12 bytes); names follow the dirents of a block.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Dirent {
    pub nid: U64,
    pub nameoff: U16,
    pub file_type: u8,
    pub reserved: u8,
}

/// `struct erofs_xattr_ibody_header` (12 bytes) before inline xattr entries.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct XattrIbodyHeader {
    name_filter: U32,
    shared_count: u8,
    reserved: [u8; 7],
}

/// `struct erofs_xattr_entry` (4 bytes), followed by the name suffix and the value.
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct XattrEntry {
    name_len: u8,
    name_index: u8,
    value_size: U16,
}

/// Known xattr name prefixes and their indexes.
const XATTR_PREFIXES: &[(&[u8], u8)] = &[
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"security.", 6),
];

/// Split an xattr name into (index, suffix); `None` for a prefix EROFS cannot store.
pub fn xattr_prefix(name: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES
        .iter()
        .find_map(|(p, i)| name.strip_prefix(*p).map(|rest| (*i, rest)))
}

/// Inline xattr body (header + entries) for sorted (name, value) pairs, or `None` if empty.
/// Names EROFS cannot represent are an error naming the attribute.
pub fn xattr_body(xattrs: &[(&[u8], &[u8])]) -> Result<Option<Vec<u8>>, String> {
    if xattrs.is_empty() {
        return Ok(None);
    }
    let mut b = XattrIbodyHeader::default().as_bytes().to_vec();
    for (name, value) in xattrs {
        let (index, suffix) = xattr_prefix(name).ok_or_else(|| {
            format!(
                "xattr {:?} has a prefix EROFS cannot store",
                String::from_utf8_lossy(name)
            )
        })?;
        if suffix.len() > NAME_MAX || value.len() > u16::MAX as usize {
            return Err(format!("xattr {:?} too large", String::from_utf8_lossy(name)));
        }
        let entry = XattrEntry {
            name_len: suffix.len() as u8,
            name_index: index,
            value_size: (value.len() as u16).into(),
        };
        b.extend_from_slice(entry.as_bytes());
        b.extend_from_slice(suffix);
        b.extend_from_slice(value);
        while b.len() % 4 != 0 {
            b.push(0);
        }
    }
    Ok(Some(b))
}

/// `i_xattr_icount` for an inline xattr body of `len` bytes.
pub fn xattr_icount(len: usize) -> u16 {
    if len == 0 {
        0
    } else {
        ((len - XATTR_IBODY_HEADER) / 4 + 1) as u16
    }
}

/// Directory data: entries sorted by name packed into 4 KiB blocks (dirents first, then
/// names; no entry crosses a block). The last block is trimmed to its used length.
pub fn dir_data(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        // how many entries fit in this block
        let mut used = 0;
        let mut j = i;
        while j < entries.len() && used + DIRENT_SIZE + entries[j].0.len() <= BLOCK as usize {
            used += DIRENT_SIZE + entries[j].0.len();
            j += 1;
        }
        let block_start = out.len();
        let mut nameoff = (j - i) * DIRENT_SIZE;
        for (name, nid, ft) in &entries[i..j] {
            let d = Dirent {
                nid: (*nid).into(),
                nameoff: (nameoff as u16).into(),
                file_type: *ft,
                reserved: 0,
            };
            out.extend_from_slice(d.as_bytes());
            nameoff += name.len();
        }
        for (name, _, _) in &entries[i..j] {
            out.extend_from_slice(name);
        }
        i = j;
        if i < entries.len() {
            out.resize(block_start + BLOCK as usize, 0);
        }
    }
    out
}

/// The dirents and names of one directory block, as the kernel reads them.
#[cfg(test)]
pub fn read_dir_block(block: &[u8]) -> Vec<(Vec<u8>, u64, u8)> {
    let Ok((first, _)) = Dirent::read_from_prefix(block) else {
        return Vec::new();
    };
    let n = usize::from(first.nameoff.get()) / DIRENT_SIZE;
    let dirents: Vec<Dirent> = (0..n)
        .filter_map(|k| Dirent::read_from_prefix(&block[k * DIRENT_SIZE..]).ok().map(|(d, _)| d))
        .collect();
    dirents
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let start = usize::from(d.nameoff.get());
            let end = dirents.get(k + 1).map_or_else(
                || {
                    block[start..]
                        .iter()
                        .position(|&b| b == 0)
                        .map_or(block.len(), |p| start + p)
                },
                |n| usize::from(n.nameoff.get()),
            );
            (block[start..end].to_vec(), d.nid.get(), d.file_type)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_blocks_never_split_entries() {
        let names: Vec<Vec<u8>> = (0..600)
            .map(|i| format!("file-with-a-longish-name-{i:05}").into_bytes())
            .collect();
        let entries: Vec<(&[u8], u64, u8)> = names.iter().map(|n| (n.as_slice(), 7, ft::REG)).collect();
        let d = dir_data(&entries);
        let mut seen = 0;
        for block in d.chunks(BLOCK as usize) {
            let first_nameoff = u16::from_le_bytes([block[8], block[9]]) as usize;
            let n = first_nameoff / DIRENT_SIZE;
            seen += n;
            for k in 0..n {
                let off = u16::from_le_bytes([block[k * 12 + 8], block[k * 12 + 9]]) as usize;
                assert!(off < block.len());
            }
        }
        assert_eq!(seen, 600);
    }

    #[test]
    fn xattrs_encode_with_prefix_indexes() {
        let body = xattr_body(&[(b"security.capability", b"\x01\x02"), (b"user.k", b"v")])
            .unwrap()
            .unwrap();
        assert_eq!(body.len() % 4, 0);
        assert_eq!(body[12], b"capability".len() as u8);
        assert_eq!(body[13], 6);
        assert_eq!(xattr_icount(body.len()) as usize, (body.len() - 12) / 4 + 1);
        assert!(xattr_body(&[(b"weird.x", b"")]).is_err());
        assert_eq!(xattr_body(&[]).unwrap(), None);
    }

    #[test]
    fn structures_have_their_uapi_sizes() {
        assert_eq!(std::mem::size_of::<SuperBlock>(), SUPER_SIZE);
        assert_eq!(std::mem::size_of::<Inode>(), INODE_EXTENDED_SIZE);
        assert_eq!(std::mem::size_of::<DeviceSlot>(), DEVT_SLOT_SIZE);
        assert_eq!(std::mem::size_of::<ChunkIndex>(), CHUNK_INDEX_SIZE);
        assert_eq!(std::mem::size_of::<Dirent>(), DIRENT_SIZE);
        assert_eq!(std::mem::size_of::<XattrIbodyHeader>(), XATTR_IBODY_HEADER);
    }

    #[test]
    fn superblock_fields_at_uapi_offsets() {
        let mut sb = SuperBlock::new();
        sb.root_nid = 3.into();
        sb.extra_devices = 2.into();
        sb.devt_slotoff = 9.into();
        let b = sb.as_bytes();
        assert_eq!(&b[0..4], &MAGIC.to_le_bytes());
        assert_eq!(b[12], 12);
        assert_eq!(u16::from_le_bytes([b[14], b[15]]), 3);
        assert_eq!(u16::from_le_bytes([b[86], b[87]]), 2);
        assert_eq!(u16::from_le_bytes([b[88], b[89]]), 9);
        let back = SuperBlock::read_from_bytes(b).unwrap();
        assert_eq!(back.devt_slotoff.get(), 9);
    }

    #[test]
    fn dir_blocks_read_back() {
        let names: Vec<Vec<u8>> = (0..300).map(|i| format!("n{i:04}").into_bytes()).collect();
        let entries: Vec<(&[u8], u64, u8)> = names
            .iter()
            .enumerate()
            .map(|(k, n)| (n.as_slice(), k as u64 * 2, ft::REG))
            .collect();
        let d = dir_data(&entries);
        let back: Vec<(Vec<u8>, u64, u8)> = d.chunks(BLOCK as usize).flat_map(read_dir_block).collect();
        assert_eq!(back.len(), 300);
        for (k, (name, nid, t)) in back.iter().enumerate() {
            assert_eq!(name, &names[k]);
            assert_eq!(*nid, k as u64 * 2);
            assert_eq!(*t, ft::REG);
        }
    }
}
