//! EROFS on-disk structures (Linux `fs/erofs/erofs_fs.h`), encoded little-endian by hand.
//! Only what the writer produces: 4 KiB blocks, extended inodes, flat/inline/chunk-based
//! data layouts, inline xattrs, a device table.

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

/// The superblock fields the writer sets.
#[derive(Debug, Clone, Default)]
pub struct SuperBlock {
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    pub extra_devices: u16,
    pub devt_slotoff: u16,
}

impl SuperBlock {
    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put32(&mut b, 0, MAGIC);
        b[12] = BLKSZ_BITS;
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.build_time);
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(&mut b, 80, self.feature_incompat);
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        b
    }
}

/// One device table slot: the blob's tag (its digest hex) and size in blocks.
pub fn device_slot(tag: &[u8], blocks: u32) -> [u8; DEVT_SLOT_SIZE] {
    let mut b = [0u8; DEVT_SLOT_SIZE];
    let n = tag.len().min(64);
    b[..n].copy_from_slice(&tag[..n]);
    put32(&mut b, 64, blocks);
    b
}

/// The fields of a 64-byte extended inode.
#[derive(Debug, Clone, Default)]
pub struct Inode {
    pub layout_bits: u16,
    pub xattr_icount: u16,
    pub mode: u16,
    pub size: u64,
    /// raw_blkaddr, rdev or chunk format, by layout and type.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub nlink: u32,
}

impl Inode {
    pub fn set_layout(&mut self, l: DataLayout) {
        // bit 0: extended inode; bits 1-3: data layout
        self.layout_bits = 1 | ((l as u16) << 1);
    }

    pub fn encode(&self) -> [u8; INODE_EXTENDED_SIZE] {
        let mut b = [0u8; INODE_EXTENDED_SIZE];
        put16(&mut b, 0, self.layout_bits);
        put16(&mut b, 2, self.xattr_icount);
        put16(&mut b, 4, self.mode);
        put64(&mut b, 8, self.size);
        put32(&mut b, 16, self.i_u);
        put32(&mut b, 20, self.ino);
        put32(&mut b, 24, self.uid);
        put32(&mut b, 28, self.gid);
        put64(&mut b, 32, self.mtime);
        put32(&mut b, 40, self.mtime_nsec);
        put32(&mut b, 44, self.nlink);
        b
    }
}

/// One chunk index: which device and block a chunk of a file lives at.
pub fn chunk_index(device_id: u16, blkaddr: u32) -> [u8; CHUNK_INDEX_SIZE] {
    let mut b = [0u8; CHUNK_INDEX_SIZE];
    put16(&mut b, 2, device_id);
    put32(&mut b, 4, blkaddr);
    b
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
    let mut b = vec![0u8; XATTR_IBODY_HEADER];
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
        b.push(suffix.len() as u8);
        b.push(index);
        b.extend_from_slice(&(value.len() as u16).to_le_bytes());
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
            out.extend_from_slice(&nid.to_le_bytes());
            out.extend_from_slice(&(nameoff as u16).to_le_bytes());
            out.push(*ft);
            out.push(0);
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

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
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
    fn superblock_fields_at_uapi_offsets() {
        let sb = SuperBlock {
            root_nid: 3,
            extra_devices: 2,
            devt_slotoff: 9,
            ..Default::default()
        }
        .encode();
        assert_eq!(&sb[0..4], &MAGIC.to_le_bytes());
        assert_eq!(sb[12], 12);
        assert_eq!(u16::from_le_bytes([sb[86], sb[87]]), 2);
        assert_eq!(u16::from_le_bytes([sb[88], sb[89]]), 9);
    }
}
