//! Blob URLs kept parsed: a range GET's URL is formatted and parsed once per endpoint and
//! blob, not once per request (the parse alone cost ~10 us of a ~350 us leaf read).

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use oci_client::Reference;
use reqwest::Url;

use super::RegistryError;
use crate::image::digest::Digest;
use crate::lock::lock;

/// Blob URLs kept (a few hundred bytes each).
const KEPT: usize = 256;

/// Recently used blob URLs, by a keyed hash of endpoint and digest (checked on a hit).
pub(super) struct BlobUrls {
    hasher: RandomState,
    kept: Mutex<LruCache<u64, Kept>>,
}

struct Kept {
    registry: String,
    repository: String,
    digest: Digest,
    url: Url,
}

impl Default for BlobUrls {
    fn default() -> Self {
        BlobUrls {
            hasher: RandomState::new(),
            kept: Mutex::new(LruCache::new(NonZeroUsize::MIN.saturating_add(KEPT - 1))),
        }
    }
}

impl BlobUrls {
    /// The URL of blob `digest` on endpoint `ep`: kept, or `make` formats it and it is parsed.
    pub(super) fn get(
        &self,
        ep: &Reference,
        digest: &Digest,
        make: impl FnOnce() -> String,
    ) -> Result<Url, RegistryError> {
        let (registry, repository) = (ep.resolve_registry(), ep.repository());
        let key = self.hasher.hash_one((registry, repository, digest.as_str()));
        if let Some(k) = lock(&self.kept).get(&key) {
            if k.registry == registry && k.repository == repository && k.digest == *digest {
                return Ok(k.url.clone());
            }
        }
        let text = make();
        let url = Url::parse(&text).map_err(|e| RegistryError::Transport(format!("blob URL {text}: {e}")))?;
        let kept = Kept {
            registry: registry.to_string(),
            repository: repository.to_string(),
            digest: digest.clone(),
            url: url.clone(),
        };
        lock(&self.kept).put(key, kept);
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_kept_per_endpoint_and_blob() {
        let urls = BlobUrls::default();
        let (a, b): (Reference, Reference) = ("r.test/x/y:1".parse().unwrap(), "m.test/x/y:1".parse().unwrap());
        let d = Digest::of(b"blob");
        let made = std::cell::Cell::new(0);
        let make = |host: &str| {
            made.set(made.get() + 1);
            format!("https://{host}/v2/x/y/blobs/{d}")
        };
        let u1 = urls.get(&a, &d, || make("r.test")).unwrap();
        let u2 = urls.get(&a, &d, || make("r.test")).unwrap();
        assert_eq!((u1.as_str(), made.get()), (u2.as_str(), 1), "the second is kept");
        // another endpoint (a mirror) or another blob is another URL
        let u3 = urls.get(&b, &d, || make("m.test")).unwrap();
        assert_eq!((u3.host_str(), made.get()), (Some("m.test"), 2));
        let e = Digest::of(b"other");
        assert!(urls
            .get(&a, &e, || format!("https://r.test/v2/x/y/blobs/{e}"))
            .unwrap()
            .as_str()
            .ends_with(e.as_str()));
        assert!(urls.get(&a, &Digest::of(b"z"), || "not a url".into()).is_err());
    }
}
