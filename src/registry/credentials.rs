//! Registry credentials: per-host config, docker `config.json` (`auths`, `credHelpers`,
//! `credsStore`) and credential helpers. Secrets are never logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::error::RegistryError;
use crate::config::HostConfig;
use crate::lock::lock;

/// How long a credential helper's answer is reused. Helpers are processes (cloud ones make a
/// network call); every chunk fetch asks for credentials, so each host's answer is kept this
/// long, or until the registry refuses it ([`Credentials::forget`]).
const HELPER_TTL: Duration = Duration::from_secs(300);

/// How long a credential helper may take to answer.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// The parts of docker's `config.json` that hold credentials.
#[derive(Debug, Default, Deserialize)]
pub struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Default, Deserialize)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
    #[serde(default, rename = "registrytoken")]
    registry_token: Option<String>,
}

impl std::fmt::Debug for DockerAuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DockerAuthEntry(<redacted>)")
    }
}

/// Answer of `docker-credential-<helper> get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Whom a credential is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every repository of the host (host config, docker config, helpers, anonymous).
    Host,
    /// One repository (captured from a pull of it): never used for another.
    Repository,
}

/// Where credentials come from, in order: captured for the repository, then host config, credential helper, `credsStore`,
/// `auths`; anonymous otherwise.
#[derive(Debug, Default)]
pub struct Credentials {
    hosts: Vec<HostConfig>,
    docker: DockerConfig,
    /// Directory searched first for `docker-credential-*` helpers (tests); then `$PATH`.
    helper_dir: Option<PathBuf>,
    /// Credentials captured from kubelet's pulls, per repository (the CRI proxy).
    captured: Option<std::sync::Arc<super::captured::Captured>>,
    /// Recent helper answers by host, with the time they were given.
    helper_answers: Mutex<HashMap<String, (Instant, RegistryAuth)>>,
    /// One helper run per host at a time: concurrent lookups wait for its answer.
    helper_runs: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl Credentials {
    /// Build from the per-host config and an optional docker config file.
    pub fn new(hosts: &[HostConfig], docker_config: Option<&Path>) -> Result<Credentials, RegistryError> {
        let docker = match docker_config {
            Some(p) => load_docker_config(p)?,
            None => match default_docker_config() {
                Some(p) if p.exists() => load_docker_config(&p)?,
                _ => DockerConfig::default(),
            },
        };
        Ok(Credentials {
            hosts: hosts.to_vec(),
            docker,
            helper_dir: None,
            captured: None,
            helper_answers: Mutex::new(HashMap::new()),
            helper_runs: Mutex::new(HashMap::new()),
        })
    }

    /// Look for credential helpers in `dir` before `$PATH`.
    pub fn with_helper_dir(mut self, dir: PathBuf) -> Self {
        self.helper_dir = Some(dir);
        self
    }

    /// Use the credentials captured from kubelet's pulls, before any other source.
    pub fn with_captured(mut self, captured: std::sync::Arc<super::captured::Captured>) -> Self {
        self.captured = Some(captured);
        self
    }

    /// The credentials for `repository` on `host`: one captured for that very repository
    /// first, then the host's ([`for_host`](Self::for_host)).
    pub async fn for_repository(&self, host: &str, repository: &str) -> Result<(RegistryAuth, Scope), RegistryError> {
        if let Some(auth) = self.captured.as_ref().and_then(|c| c.lookup(host, repository)) {
            return Ok((auth, Scope::Repository));
        }
        Ok((self.for_host(host).await?, Scope::Host))
    }

    /// The credentials to use for `host` (`host[:port]`).
    pub async fn for_host(&self, host: &str) -> Result<RegistryAuth, RegistryError> {
        if let Some(h) = self.hosts.iter().find(|h| h.host == host) {
            if let Some(t) = &h.token {
                return Ok(RegistryAuth::Bearer(t.clone()));
            }
            if let Some(user) = &h.username {
                let password = match (&h.password, &h.password_file) {
                    (Some(p), _) => p.clone(),
                    // read when needed (a mounted secret may rotate), off the async workers
                    (None, Some(f)) => tokio::fs::read_to_string(f)
                        .await
                        .map_err(|e| RegistryError::Credentials(format!("password_file {}: {e}", f.display())))?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                    (None, None) => String::new(),
                };
                return Ok(RegistryAuth::Basic(user.clone(), password));
            }
        }
        if let Some(helper) = self.docker.cred_helpers.get(host) {
            return self.ask_helper(helper, host).await;
        }
        if let Some(entry) = self.auth_entry(host) {
            return entry_auth(host, entry);
        }
        if let Some(store) = &self.docker.creds_store {
            return self.ask_helper(store, host).await;
        }
        Ok(RegistryAuth::Anonymous)
    }

    /// Drop what a helper said for `host` (the registry refused it): the next request asks
    /// the helper again.
    pub fn forget(&self, host: &str) {
        lock(&self.helper_answers).remove(host);
    }

    /// A helper's answer for `host`, reused for [`HELPER_TTL`]. Single flight: when the
    /// answer is missing or stale, one lookup runs the helper and the others wait for it.
    async fn ask_helper(&self, helper: &str, host: &str) -> Result<RegistryAuth, RegistryError> {
        if let Some(auth) = self.fresh_answer(host) {
            return Ok(auth);
        }
        let run = lock(&self.helper_runs).entry(host.to_string()).or_default().clone();
        let _one_run = run.lock().await;
        if let Some(auth) = self.fresh_answer(host) {
            return Ok(auth); // answered while this lookup waited
        }
        let auth = self.run_helper(helper, host).await?;
        lock(&self.helper_answers).insert(host.to_string(), (Instant::now(), auth.clone()));
        Ok(auth)
    }

    fn fresh_answer(&self, host: &str) -> Option<RegistryAuth> {
        lock(&self.helper_answers)
            .get(host)
            .filter(|(at, _)| at.elapsed() < HELPER_TTL)
            .map(|(_, auth)| auth.clone())
    }

    fn auth_entry(&self, host: &str) -> Option<&DockerAuthEntry> {
        self.docker
            .auths
            .iter()
            .find_map(|(k, v)| (normalize_host(k) == host).then_some(v))
    }

    /// Run `docker-credential-<helper> get` for `host` (without blocking the runtime).
    async fn run_helper(&self, helper: &str, host: &str) -> Result<RegistryAuth, RegistryError> {
        if helper.is_empty() || helper.contains('/') {
            return Err(RegistryError::Credentials(format!(
                "invalid credential helper name {helper:?}"
            )));
        }
        let prog = format!("docker-credential-{helper}");
        let path = self
            .helper_dir
            .as_ref()
            .map(|d| d.join(&prog))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(&prog));
        let mut attempt = 0;
        let mut child = loop {
            let spawned = tokio::process::Command::new(&path)
                .arg("get")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn();
            match spawned {
                // a helper just written (installed, updated) may still be open for writing
                // in a process forked meanwhile: ETXTBSY passes within milliseconds
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => break other.map_err(|e| RegistryError::Credentials(format!("cannot run {prog}: {e}")))?,
            }
        };
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(host.as_bytes())
                .await
                .map_err(|e| RegistryError::Credentials(format!("{prog}: {e}")))?;
        }
        let out = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| RegistryError::Credentials(format!("{prog} did not answer within {HELPER_TIMEOUT:?}")))?
            .map_err(|e| RegistryError::Credentials(format!("{prog}: {e}")))?;
        if !out.status.success() {
            // The helper's stderr may say "credentials not found"; it never holds the secret.
            let msg = String::from_utf8_lossy(&out.stderr);
            if msg.to_ascii_lowercase().contains("not found") {
                return Ok(RegistryAuth::Anonymous);
            }
            return Err(RegistryError::Credentials(format!(
                "{prog} get failed ({}): {}",
                out.status,
                msg.trim()
            )));
        }
        let a: HelperAnswer = serde_json::from_slice(&out.stdout)
            .map_err(|e| RegistryError::Credentials(format!("{prog} answered malformed JSON: {e}")))?;
        Ok(if a.username == "<token>" {
            RegistryAuth::Bearer(a.secret)
        } else {
            RegistryAuth::Basic(a.username, a.secret)
        })
    }
}

fn entry_auth(host: &str, e: &DockerAuthEntry) -> Result<RegistryAuth, RegistryError> {
    if let Some(t) = e.registry_token.as_ref().or(e.identity_token.as_ref()) {
        return Ok(RegistryAuth::Bearer(t.clone()));
    }
    if let Some(a) = &e.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| RegistryError::Credentials(format!("config.json auths[{host}].auth is not base64")))?;
        let text = String::from_utf8(raw)
            .map_err(|_| RegistryError::Credentials(format!("config.json auths[{host}].auth is not UTF-8")))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| RegistryError::Credentials(format!("config.json auths[{host}].auth lacks ':'")))?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

/// `https://index.docker.io/v1/` -> `index.docker.io`; `host:5000` stays.
fn normalize_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn default_docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

fn load_docker_config(path: &Path) -> Result<DockerConfig, RegistryError> {
    let text =
        std::fs::read(path).map_err(|e| RegistryError::Credentials(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&text)
        .map_err(|e| RegistryError::Credentials(format!("{} is not a docker config: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn basic(a: &RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u.clone(), p.clone()),
            other => panic!("expected basic auth, got {other:?}"),
        }
    }

    /// Install `docker-credential-<name>` in `dir` as a shell script reading the host on stdin.
    fn helper_script(dir: &Path, name: &str, body: &str) {
        let helper = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&helper, format!("#!/bin/sh\nread host\n{body}\n")).unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn docker_config_auths_and_helpers() {
        let dir = tempfile::tempdir().unwrap();
        helper_script(
            dir.path(),
            "fake",
            "if [ \"$host\" = helped.example ]; then echo '{\"ServerURL\":\"x\",\"Username\":\"hu\",\"Secret\":\"hs\"}'; else echo 'credentials not found' >&2; exit 1; fi",
        );
        let cfg = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &cfg,
            format!(
                r#"{{"auths":{{"https://plain.example/v1/":{{"auth":"{auth}"}},"tok.example":{{"identitytoken":"idt"}}}},
                   "credHelpers":{{"helped.example":"fake"}},"credsStore":"fake"}}"#
            ),
        )
        .unwrap();
        let c = Credentials::new(&[], Some(&cfg))
            .unwrap()
            .with_helper_dir(dir.path().into());
        assert_eq!(
            basic(&c.for_host("plain.example").await.unwrap()),
            ("alice".into(), "s3cret".into())
        );
        assert_eq!(
            basic(&c.for_host("helped.example").await.unwrap()),
            ("hu".into(), "hs".into())
        );
        assert!(matches!(c.for_host("tok.example").await.unwrap(), RegistryAuth::Bearer(t) if t == "idt"));
        // credsStore answers "not found" for other hosts: anonymous
        assert!(matches!(
            c.for_host("other.example").await.unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[tokio::test]
    async fn helper_answers_are_reused_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let calls = dir.path().join("calls");
        helper_script(
            dir.path(),
            "count",
            &format!(
                "echo \"$host\" >> {}\necho '{{\"Username\":\"u\",\"Secret\":\"s\"}}'",
                calls.display()
            ),
        );
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, r#"{"credHelpers":{"a.example":"count","b.example":"count"}}"#).unwrap();
        let c = Credentials::new(&[], Some(&cfg))
            .unwrap()
            .with_helper_dir(dir.path().into());
        let n_calls = || std::fs::read_to_string(&calls).unwrap_or_default().lines().count();
        for _ in 0..5 {
            assert_eq!(basic(&c.for_host("a.example").await.unwrap()), ("u".into(), "s".into()));
        }
        assert_eq!(n_calls(), 1, "one helper run for five lookups of one host");
        c.for_host("b.example").await.unwrap();
        assert_eq!(n_calls(), 2, "each host has its own answer");
        c.forget("a.example");
        c.for_host("a.example").await.unwrap();
        assert_eq!(n_calls(), 3, "a refused answer is asked for again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_lookups_run_a_slow_helper_once() {
        let dir = tempfile::tempdir().unwrap();
        let calls = dir.path().join("calls");
        helper_script(
            dir.path(),
            "slow",
            &format!(
                "echo \"$host\" >> {}\nsleep 0.5\necho '{{\"Username\":\"u\",\"Secret\":\"s\"}}'",
                calls.display()
            ),
        );
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, r#"{"credHelpers":{"a.example":"slow"}}"#).unwrap();
        let c = std::sync::Arc::new(
            Credentials::new(&[], Some(&cfg))
                .unwrap()
                .with_helper_dir(dir.path().into()),
        );
        let n_calls = || std::fs::read_to_string(&calls).unwrap_or_default().lines().count();
        for round in 1..=2 {
            let lookups: Vec<_> = (0..500)
                .map(|_| {
                    let c = std::sync::Arc::clone(&c);
                    tokio::spawn(async move { c.for_host("a.example").await })
                })
                .collect();
            for l in lookups {
                assert_eq!(basic(&l.await.unwrap().unwrap()), ("u".into(), "s".into()));
            }
            assert_eq!(n_calls(), round, "500 concurrent lookups, one helper run");
            // a 401 makes every fetch forget the answer at once: still one run
            c.forget("a.example");
        }
    }

    #[tokio::test]
    async fn host_config_wins_and_reads_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "p4ss\n").unwrap();
        let host = HostConfig {
            host: "r.example".into(),
            username: Some("bob".into()),
            password_file: Some(pw),
            ..Default::default()
        };
        let c = Credentials::new(&[host], Some(Path::new("/nonexistent/config.json")));
        assert!(c.is_err(), "an explicit docker config that is missing is an error");
        let empty = dir.path().join("empty.json");
        std::fs::write(&empty, "{}").unwrap();
        let host = HostConfig {
            host: "r.example".into(),
            username: Some("bob".into()),
            password_file: Some(dir.path().join("pw")),
            ..Default::default()
        };
        let c = Credentials::new(&[host], Some(&empty)).unwrap();
        assert_eq!(
            basic(&c.for_host("r.example").await.unwrap()),
            ("bob".into(), "p4ss".into())
        );
        assert!(matches!(
            c.for_host("x.example").await.unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[tokio::test]
    async fn malformed_auth_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, r#"{"auths":{"h.example":{"auth":"%%%"}}}"#).unwrap();
        let c = Credentials::new(&[], Some(&cfg)).unwrap();
        let e = c.for_host("h.example").await.unwrap_err().to_string();
        assert!(e.contains("not base64"), "{e}");
    }
}
