//! containerd's snapshots API (`containerd.services.snapshots.v1`) and mount type
//! (`containerd.types`), generated at build time from containerd's own protos in
//! `proto/containerd` (Apache-2.0, see its LICENSE) with tonic and prost.

#![allow(clippy::all, missing_docs, unreachable_pub)]

pub mod containerd {
    pub mod types {
        include!(concat!(env!("OUT_DIR"), "/containerd.types.rs"));
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/containerd.services.snapshots.v1.rs"));
            }
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
