//! A native EROFS writer for lazyblob metadata blobs (4 KiB blocks, uncompressed).

pub(crate) mod layout;
pub mod writer;

pub use writer::{write, DeviceSlot, WriteError};
