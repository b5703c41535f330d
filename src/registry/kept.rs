//! The credential blob GETs carry, obtained once per repository and kept. `oci-client`
//! keeps a bearer token between requests, but a registry that asks for no token (anonymous
//! pulls from docker-registry, most mirrors and in-house registries) leaves it nothing to
//! keep: it probed `GET /v2/` again before every blob request, one more round trip per
//! range a reader waits for. Here the outcome of the auth step is kept, whatever it is
//! (no credential, basic, a bearer token), until the registry answers 401 or the
//! credential for the repository changes.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;

use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};

use super::manifest::Credential;
use super::RegistryError;
use crate::image::digest::Digest;
use crate::lock::lock;

/// Kept credentials, by host and repository, each with the fingerprint of the
/// [`RegistryAuth`] it was obtained with.
#[derive(Default)]
pub(super) struct KeptCredentials(Mutex<HashMap<(String, String), (String, Credential)>>);

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
        if let Some((p, c)) = lock(&self.0).get(&key) {
            if *p == print {
                return Ok(c.clone());
            }
        }
        let c = Credential::obtain(client, repo, auth, RegistryOperation::Pull).await?;
        lock(&self.0).insert(key, (print, c.clone()));
        Ok(c)
    }

    /// Drop what is kept for `repo` (the registry refused it).
    pub(super) fn forget(&self, repo: &Reference) {
        lock(&self.0).remove(&(repo.registry().to_string(), repo.repository().to_string()));
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
