//! containerd's `hosts.toml` files (`[registry] containerd_hosts_dir`) apply to lazyblob's
//! registry access, against two real HTTPS `docker-registry` instances whose certificates a
//! private CA signed (`openssl`): an image named after a registry that does not exist
//! (`lazyblob-origin.invalid`) is resolved and read through the mirror its `hosts.toml`
//! names, trusting the CA file given there; a registry whose `hosts.toml` says
//! `skip_verify = true` is reachable, and the same registry without that file is refused at
//! the TLS handshake. The config is loaded by `Config::load`, as the daemon loads it.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::*;
use lazyblob::config::{Config, HostConfig};
use lazyblob::registry::{parse_reference, sha256_digest, Registry};

/// A registry client configured by a lazyblob.toml that points at `hosts_dir`.
fn configured(work: &Path, hosts_dir: Option<&Path>) -> Registry {
    let mut text = String::from("[registry]\nmax_attempts = 1\ndeadline_ms = 10000\n");
    if let Some(dir) = hosts_dir {
        text.push_str(&format!("containerd_hosts_dir = \"{}\"\n", dir.display()));
    }
    let path = work.join("lazyblob.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap();
    Registry::new(&cfg.registry, 4).unwrap()
}

fn hosts_toml(dir: &Path, host: &str, text: &str) {
    std::fs::create_dir_all(dir.join(host)).unwrap();
    std::fs::write(dir.join(host).join("hosts.toml"), text).unwrap();
}

#[tokio::test]
async fn mirrors_cas_and_skip_verify_from_hosts_toml() {
    let work = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls::private_ca(work.path());
    let mirror = DockerRegistry::start_with(None, Some((&cert, &key)));
    let unverified = DockerRegistry::start_with(None, Some((&cert, &key)));

    // an image and a blob on both, pushed by a client that trusts the CA
    let mut cfg = insecure_config(&[]);
    cfg.hosts = [&mirror.host, &unverified.host]
        .iter()
        .map(|h| HostConfig {
            host: h.to_string(),
            ca_file: Some(ca.clone()),
            ..Default::default()
        })
        .collect();
    let pusher = client(&cfg);
    let files = mixed_files(31, 20, &[1]);
    let img = build_files(&files, 1);
    let data = bytes(32, 70_000);
    let digest = sha256_digest(&data);
    let mut pushed = Vec::new();
    for host in [&mirror.host, &unverified.host] {
        pushed.push(push_image(&pusher, host, "lib/app:1", &img).await);
        let repo = parse_reference(&format!("{host}/lib/app:1")).unwrap();
        pusher.push_blob(&repo, Bytes::from(data.clone())).await.unwrap();
    }

    let dir = work.path().join("certs.d");
    hosts_toml(
        &dir,
        "lazyblob-origin.invalid",
        &format!(
            "server = \"https://lazyblob-origin.invalid\"\n\n[host.\"https://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            mirror.host,
            ca.display()
        ),
    );
    hosts_toml(
        &dir,
        &unverified.host,
        &format!("server = \"https://{}\"\nskip_verify = true\n", unverified.host),
    );
    let reg = configured(work.path(), Some(&dir));

    // through the mirror, with the CA of its hosts.toml
    let origin = parse_reference("lazyblob-origin.invalid/lib/app:1").unwrap();
    let resolved = reg.resolve(&origin).await.unwrap();
    assert_eq!(resolved.digest.to_string(), pushed[0]);
    let got = reg
        .fetch_range(&blob_at("lazyblob-origin.invalid", &digest, data.len()), 1000, 5000)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[1000..6000]);

    // skip_verify: reachable without the CA
    let got = reg
        .fetch_range(&blob_at(&unverified.host, &digest, data.len()), 0, 100)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..100]);

    // without the hosts directory: the unknown CA is refused, the origin does not exist
    let plain = configured(work.path(), None);
    let err = plain
        .fetch_range(&blob_at(&unverified.host, &digest, data.len()), 0, 100)
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    assert!(plain.resolve(&origin).await.is_err());
}
