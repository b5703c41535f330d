//! Startup prefetch: what an image's first start on a node reads is recorded (`record`) as a
//! list of chunk runs (`list`), kept beside the image's state (`store`) and pushed to its
//! registry as an artifact that refers to the image (`registry`); later mounts of the image,
//! on this node or any other, fetch that set first, in the order it was read, in large merged
//! pieces, while the workload runs (`replay`, with each frontend's own fetch).

#![forbid(unsafe_code)]

pub mod list;
pub mod record;
pub mod registry;
pub mod replay;
pub mod store;

pub use list::{Plan, PrefetchList};
pub use record::Recorder;
pub use replay::fetch_pieces;
