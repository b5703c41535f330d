//! The writer's output read back through the on-disk types: the superblock and device
//! table, a directory spanning blocks, a chunk-based inode's indexes.

use zerocopy::FromBytes;

use super::*;
use crate::image::tree::{Meta, Node};

fn meta(perm: u32) -> Meta {
    Meta {
        perm,
        ..Default::default()
    }
}

fn file(data: FileData) -> Node {
    Node {
        meta: meta(0o644),
        kind: Kind::File(data),
    }
}

fn slot(c: char, blocks: u32) -> DeviceSlot {
    DeviceSlot {
        tag: c.to_string().repeat(64),
        blocks,
    }
}

fn superblock(img: &[u8]) -> SuperBlock {
    SuperBlock::read_from_bytes(&img[layout::SUPER_OFFSET..layout::SUPER_OFFSET + layout::SUPER_SIZE]).unwrap()
}

fn inode(img: &[u8], nid: u64) -> Inode {
    let at = superblock(img).meta_blkaddr.get() as usize * BLOCK as usize + nid as usize * 32;
    Inode::read_from_bytes(&img[at..at + layout::INODE_EXTENDED_SIZE]).unwrap()
}

/// The data of inode `nid` kept in the image (inline after it, or in its own blocks); no
/// xattrs in these trees.
fn data_of(img: &[u8], nid: u64) -> &[u8] {
    let ino = inode(img, nid);
    let size = ino.size.get() as usize;
    let start = match ino.layout() {
        Some(DataLayout::FlatInline) => {
            superblock(img).meta_blkaddr.get() as usize * BLOCK as usize
                + nid as usize * 32
                + layout::INODE_EXTENDED_SIZE
        }
        _ => ino.i_u.get() as usize * BLOCK as usize,
    };
    &img[start..start + size]
}

#[test]
fn superblock_and_device_table_read_back() {
    let mut t = Tree::new(meta(0o755));
    t.insert(Tree::ROOT, b"a", file(FileData::Inline(b"hello".to_vec())))
        .unwrap();
    let devices = [slot('a', 10), slot('b', 20)];
    let img = write(&t, &devices, 20).unwrap();
    let sb = superblock(&img);
    assert_eq!(sb.magic.get(), layout::MAGIC);
    assert_eq!(sb.blkszbits, 12);
    assert_eq!(sb.inos.get(), 2);
    assert_eq!(sb.blocks.get() as usize * BLOCK as usize, img.len());
    assert_eq!(sb.extra_devices.get(), 2);
    assert_eq!(sb.feature_incompat.get(), layout::INCOMPAT_DEVICE_TABLE);
    assert_eq!(&sb.volume_name[..8], b"lazyblob");
    assert_ne!(sb.uuid, [0; 16]);
    for (k, d) in devices.iter().enumerate() {
        let off = sb.devt_slotoff.get() as usize * layout::DEVT_SLOT_SIZE + k * layout::DEVT_SLOT_SIZE;
        let s = layout::DeviceSlot::read_from_bytes(&img[off..off + layout::DEVT_SLOT_SIZE]).unwrap();
        assert_eq!(&s.tag[..], d.tag.as_bytes());
        assert_eq!(s.blocks.get(), d.blocks);
    }
    let root = inode(&img, sb.root_nid.get().into());
    assert_eq!(root.mode.get() & 0o170000, 0o040000);
    assert_eq!(root.nlink.get(), 2);
    // the same tree gives the same bytes (the UUID is derived, not random)
    assert_eq!(write(&t, &devices, 20).unwrap(), img);
}

#[test]
fn a_directory_spanning_blocks_lists_every_child() {
    let mut t = Tree::new(meta(0o755));
    let names: Vec<Vec<u8>> = (0..400)
        .map(|i| format!("a-rather-long-file-name-{i:04}").into_bytes())
        .collect();
    for (i, n) in names.iter().enumerate() {
        t.insert(Tree::ROOT, n, file(FileData::Inline(vec![i as u8; 10])))
            .unwrap();
    }
    let img = write(&t, &[], 20).unwrap();
    let root = inode(&img, 0);
    assert_eq!(root.layout(), Some(DataLayout::FlatPlain));
    let size = root.size.get() as usize;
    assert!(size > BLOCK as usize, "{size} bytes of entries fit one block");
    let entries: Vec<(Vec<u8>, u64, u8)> = data_of(&img, 0)
        .chunks(BLOCK as usize)
        .flat_map(layout::read_dir_block)
        .collect();
    assert_eq!(entries.len(), 402, ". and .. and every child");
    for (name, nid, t) in entries {
        match name.as_slice() {
            b"." | b".." => assert_eq!(nid, 0),
            n => {
                assert!(names.iter().any(|x| x == n));
                assert_eq!(t, ft::REG);
                let child = inode(&img, nid);
                assert_eq!(child.mode.get() & 0o170000, 0o100000);
                assert_eq!(child.size.get(), 10);
            }
        }
    }
}

/// erofs-utils' fsck reads 12 bytes (an xattr header) after every inode: the image must
/// hold them even when the last inode ends at a block's end.
#[test]
fn every_inode_is_followed_by_room_for_an_xattr_header() {
    let mut ended_at_a_block = false;
    for n in 1..=130 {
        let mut t = Tree::new(meta(0o755));
        for i in 0..n {
            t.insert(
                Tree::ROOT,
                format!("{i:03}").as_bytes(),
                file(FileData::Inline(Vec::new())),
            )
            .unwrap();
        }
        let img = write(&t, &[], 20).unwrap();
        let meta_start = superblock(&img).meta_blkaddr.get() as usize * BLOCK as usize;
        for (_, nid, _) in data_of(&img, 0).chunks(BLOCK as usize).flat_map(layout::read_dir_block) {
            let end = meta_start + nid as usize * 32 + layout::INODE_EXTENDED_SIZE;
            ended_at_a_block |= end % BLOCK as usize == 0;
            assert!(
                end + layout::XATTR_IBODY_HEADER <= img.len(),
                "{n} files: inode {nid} ends the image"
            );
        }
    }
    assert!(ended_at_a_block, "no tree put an inode at a block's end");
}

#[test]
fn a_chunk_based_inode_names_device_and_blocks() {
    let mut t = Tree::new(meta(0o755));
    // 2.5 chunks of 64 KiB on device 2, from 8 KiB into the blob
    let size = 160 << 10;
    t.insert(
        Tree::ROOT,
        b"big",
        file(FileData::Blob {
            device: 2,
            offset: 8192,
            size,
        }),
    )
    .unwrap();
    let img = write(&t, &[slot('a', 1), slot('b', 64)], 16).unwrap();
    assert_ne!(
        superblock(&img).feature_incompat.get() & layout::INCOMPAT_CHUNKED_FILE,
        0
    );
    let entries = layout::read_dir_block(data_of(&img, 0));
    let nid = entries.iter().find(|e| e.0 == b"big").unwrap().1;
    let ino = inode(&img, nid);
    assert_eq!(ino.layout(), Some(DataLayout::ChunkBased));
    assert_eq!(ino.size.get(), size);
    assert_eq!(ino.i_u.get(), (16 - 12) | layout::CHUNK_FORMAT_INDEXES as u32);
    let at = superblock(&img).meta_blkaddr.get() as usize * BLOCK as usize + nid as usize * 32;
    let first = (at + layout::INODE_EXTENDED_SIZE).next_multiple_of(layout::CHUNK_INDEX_SIZE);
    let indexes: Vec<ChunkIndex> = (0..3)
        .map(|c| {
            let p = first + c * layout::CHUNK_INDEX_SIZE;
            ChunkIndex::read_from_bytes(&img[p..p + layout::CHUNK_INDEX_SIZE]).unwrap()
        })
        .collect();
    for (c, index) in indexes.iter().enumerate() {
        assert_eq!(index.device_id.get(), 2);
        assert_eq!(index.blkaddr.get(), 2 + 16 * c as u32, "chunk {c}");
    }
}

#[test]
fn bad_input_is_refused() {
    let t = Tree::new(meta(0o755));
    assert!(write(&t, &[], 11).is_err(), "chunks under a block");
    assert!(write(&t, &vec![slot('a', 1); 1025], 20).is_err(), "too many devices");
    let short = DeviceSlot {
        tag: "abc".into(),
        blocks: 1,
    };
    assert!(write(&t, &[short], 20).is_err(), "a short tag");
    let mut t = Tree::new(meta(0o755));
    t.insert(
        Tree::ROOT,
        b"f",
        file(FileData::Blob {
            device: 3,
            offset: 0,
            size: 1,
        }),
    )
    .unwrap();
    assert!(
        write(&t, &[slot('a', 1)], 20).is_err(),
        "a device that is not in the table"
    );
}
