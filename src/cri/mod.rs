//! The CRI image-service proxy: kubelet (`--image-service-endpoint`) talks to lazyblob,
//! lazyblob forwards every call to containerd unchanged, and keeps each `PullImage`'s pull
//! secret for the image's repository ([`crate::registry::captured`]) so lazy reads of that
//! image carry it, also after a restart. Secrets are never logged.

#![forbid(unsafe_code)]

pub mod proxy;
pub mod pull_secret;
