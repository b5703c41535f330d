//! The cachefiles on-demand frontend (kernels 5.19 - 7.1): EROFS mounted with `-o fsid=`
//! asks the kernel's cachefiles for blobs, and cachefiles asks us for missing ranges.
//!
//! `protocol` parses and encodes the messages, `device` holds the syscalls, `serve` is the
//! event loop that answers OPEN/READ/CLOSE concurrently, `ahead` writes ahead of sequential
//! readers (through recycled aligned `buffers`), `leaves` serves random READs by their leaves,
//! `failover` hands the cache over across restarts.

mod ahead;
mod buffers;
pub mod device;
mod failover;
mod fill;
mod leaves;
pub mod protocol;
pub mod serve;

pub use serve::{Cachefiles, CachefilesStats, Serving};
