//! Image format types, the EROFS writer and building/pushing lazyblob images.

#![forbid(unsafe_code)]

pub mod build;
pub mod chunk_hash;
pub mod convert;
pub mod digest;
pub mod erofs;
pub mod format;
pub mod growing;
pub mod leaves;
pub mod spool;
pub mod tree;
