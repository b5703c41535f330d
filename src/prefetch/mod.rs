//! Startup prefetch: what an image's first start on a node reads is recorded (`record`) as a
//! list of chunk runs (`list`), kept beside the image's state (`store`) and pushed to its
//! registry as an artifact that refers to the image (`registry`); later mounts of the image,
//! on this node or any other, fetch that set first, in the order it was read, in large merged
//! pieces, while the workload runs (the frontends do the fetching, with the limits below).

#![forbid(unsafe_code)]

pub mod list;
pub mod record;
pub mod registry;
pub mod store;

pub use list::{Plan, PrefetchList};
pub use record::Recorder;

/// Pieces of a startup prefetch in flight at once (half of `max_concurrent_fetches`' default
/// 8: the readers keep the rest).
pub const FETCHES_AT_ONCE: usize = 4;

/// Largest piece of a run fetched as one request (and at most `merge_max`): a long run read
/// first (a large file's head) is fetched by several requests side by side. (Against
/// docker-registry, 4 MiB pieces made the whole prefetch slower than 8-32 MiB: each request
/// has its cost.)
pub const PIECE_BYTES: u64 = 8 << 20;
