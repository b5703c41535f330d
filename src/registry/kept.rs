//! The credential blob GETs carry, obtained once per repository and kept. `oci-client`
//! keeps a bearer token between requests, but a registry that asks for no token (anonymous
//! pulls from docker-registry, most mirrors and in-house registries) leaves it nothing to
//! keep: it probed `GET /v2/` again before every blob request, one more round trip per
//! range a reader waits for. Here the outcome of the auth step is kept, whatever it is
//! (no credential, basic, a bearer token), until the registry answers 401 or the
//! credential for the repository changes.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};

use super::manifest::Credential;
use super::RegistryError;
use crate::image::digest::Digest;
use crate::lock::lock;

/// Host and repository.
type Key = (String, String);

/// Kept credentials, by host and repository, each with the fingerprint of the
/// [`RegistryAuth`] it was obtained with.
#[derive(Default)]
pub(super) struct KeptCredentials {
    kept: Mutex<HashMap<Key, (String, Credential)>>,
    /// One auth step at a time per repository: the first range GETs of a mount, side by side,
    /// wait for one token instead of each asking the token server for its own.
    obtaining: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeptCredentials {
    /// The kept credential for pulls from `repo` with `auth`, or a new one from `client`'s
    /// auth step (kept).
    pub(super) async fn pull(
        &self,
        client: &oci_client::Client,
        repo: &Reference,
        auth: &RegistryAuth,
    ) -> Result<Credential, RegistryError> {
        let key = (repo.registry().to_string(), repo.repository().to_string());
        let print = fingerprint(auth);
        if let Some(c) = self.kept(&key, &print) {
            return Ok(c);
        }
        let one = Arc::clone(lock(&self.obtaining).entry(key.clone()).or_default());
        let _one = one.lock().await;
        // obtained by the step this one waited for
        if let Some(c) = self.kept(&key, &print) {
            return Ok(c);
        }
        let c = Credential::obtain(client, repo, auth, RegistryOperation::Pull).await?;
        lock(&self.kept).insert(key, (print, c.clone()));
        Ok(c)
    }

    /// What is kept for `key`, if it was obtained with the credential of fingerprint `print`.
    fn kept(&self, key: &Key, print: &str) -> Option<Credential> {
        lock(&self.kept)
            .get(key)
            .filter(|(p, _)| p == print)
            .map(|(_, c)| c.clone())
    }

    /// Drop what is kept for `repo` (the registry refused it).
    pub(super) fn forget(&self, repo: &Reference) {
        lock(&self.kept).remove(&(repo.registry().to_string(), repo.repository().to_string()));
    }
}

/// A digest of the secret in `auth`, to tell credentials apart without keeping them twice.
pub(super) fn fingerprint(auth: &RegistryAuth) -> String {
    match auth {
        RegistryAuth::Basic(u, p) => Digest::of(format!("basic\0{u}\0{p}").as_bytes()).to_string(),
        RegistryAuth::Bearer(t) => Digest::of(format!("bearer\0{t}").as_bytes()).to_string(),
        RegistryAuth::Anonymous => String::new(),
    }
}
