//! The registry client against registry-mock (auth flows, expiry, mirrors, redirects, TLS by
//! default, indexes) and against Debian's docker-registry (CNCF distribution) with htpasswd.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use lazyblob::config::HostConfig;
use lazyblob::registry::{parse_reference, sha256_digest, BlobSource, RegistryError};
use registry_mock::{AuthMode, Fault, FaultRule, MockConfig, MockRegistry, Store};

#[tokio::test]
async fn anonymous_token_flow_and_reauth_after_expiry() {
    let mock = token_registry(None).await;
    let data = bytes(1, 50_000);
    let d = mock.store().put_blob(data.clone());
    let reg = client(&insecure_config(&[&mock.host()]));
    let src = blob_at(&mock.host(), &d, data.len());
    assert_eq!(reg.fetch_range(&src, 100, 1000).await.unwrap(), data[100..1100]);
    let tokens = mock.counters().token_requests;
    assert!(tokens >= 1);
    mock.expire_tokens();
    assert_eq!(reg.fetch_blob(&src).await.unwrap(), data);
    let c = mock.counters();
    assert_eq!(c.token_requests, tokens + 1, "one new token fetched after expiry");
    assert!(c.unauthorized >= 1, "the expired token was refused once");
}

#[tokio::test]
async fn token_flow_with_credentials() {
    let mock = token_registry(Some(("alice", "wonder"))).await;
    let data = bytes(2, 9000);
    let d = mock.store().put_blob(data.clone());
    let src = blob_at(&mock.host(), &d, data.len());
    let good = client(&with_creds(&mock.host(), "alice", "wonder"));
    assert_eq!(good.fetch_range(&src, 0, 9000).await.unwrap(), data);
    let bad = client(&with_creds(&mock.host(), "alice", "nope"));
    let e = bad.fetch_range(&src, 0, 10).await.unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized(_)), "{e}");
    let anon = client(&insecure_config(&[&mock.host()]));
    assert!(anon.fetch_range(&src, 0, 10).await.is_err());
}

#[tokio::test]
async fn basic_auth() {
    let mock = MockRegistry::start(MockConfig {
        auth: AuthMode::Basic {
            user: "bob".into(),
            password: "builder".into(),
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let data = bytes(3, 5000);
    let d = mock.store().put_blob(data.clone());
    let src = blob_at(&mock.host(), &d, data.len());
    let good = client(&with_creds(&mock.host(), "bob", "builder"));
    assert_eq!(good.fetch_range(&src, 10, 20).await.unwrap(), data[10..30]);
    let bad = client(&with_creds(&mock.host(), "bob", "x"));
    assert!(matches!(
        bad.fetch_range(&src, 0, 10).await,
        Err(RegistryError::Unauthorized(_))
    ));
}

#[tokio::test]
async fn redirects_to_blob_storage_do_not_carry_authorization() {
    let store = Store::default();
    let storage = MockRegistry::start_on("127.0.0.1:0".parse().unwrap(), MockConfig::default(), store.clone())
        .await
        .unwrap();
    let origin = MockRegistry::start_on(
        "127.0.0.1:0".parse().unwrap(),
        MockConfig {
            auth: AuthMode::Basic {
                user: "u".into(),
                password: "p".into(),
            },
            redirect_blobs_to: Some(format!("http://{}", storage.host())),
            ..MockConfig::default()
        },
        store.clone(),
    )
    .await
    .unwrap();
    let data = bytes(4, 70_000);
    let d = store.put_blob(data.clone());
    let mut cfg = with_creds(&origin.host(), "u", "p");
    cfg.hosts.push(HostConfig {
        host: storage.host(),
        insecure: true,
        ..Default::default()
    });
    let reg = client(&cfg);
    let src = blob_at(&origin.host(), &d, data.len());
    assert_eq!(reg.fetch_range(&src, 5, 500).await.unwrap(), data[5..505]);
    let o = origin.counters();
    assert!(
        o.blob_hits.iter().any(|h| h.status == 307 && h.had_authorization),
        "origin got credentials"
    );
    let s = storage.counters();
    assert_eq!(s.blob_requests(&d), 1);
    assert!(
        s.blob_hits.iter().all(|h| !h.had_authorization),
        "Authorization leaked across the redirect"
    );
}

#[tokio::test]
async fn mirrors_first_then_origin() {
    let origin = MockRegistry::start(MockConfig::default()).await.unwrap();
    let mirror = MockRegistry::start(MockConfig::default()).await.unwrap();
    let data = bytes(5, 20_000);
    let d = origin.store().put_blob(data.clone());
    mirror.store().put_blob(data.clone());
    // a dead mirror (closed port) listed first, then a live one
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut cfg = insecure_config(&[&origin.host(), &mirror.host(), &dead]);
    cfg.hosts[0].mirrors = vec![dead.clone(), mirror.host()];
    cfg.max_attempts = 2;
    let reg = client(&cfg);
    let src = blob_at(&origin.host(), &d, data.len());
    assert_eq!(reg.fetch_range(&src, 0, 100).await.unwrap(), data[..100]);
    assert_eq!(mirror.counters().blob_requests(&d), 1);
    assert_eq!(origin.counters().blob_requests(&d), 0);
    let failures = |r: &lazyblob::registry::Registry| r.stats.failures.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failures(&reg), 1, "the dead mirror is a failure");
    // the mirror loses the blob: fall back to the origin
    let mut cfg2 = insecure_config(&[&origin.host(), &mirror.host()]);
    cfg2.hosts[0].mirrors = vec![mirror.host()];
    let empty_mirror = MockRegistry::start(MockConfig::default()).await.unwrap();
    cfg2.hosts[0].mirrors = vec![empty_mirror.host()];
    cfg2.hosts[1].host = empty_mirror.host();
    let reg2 = client(&cfg2);
    assert_eq!(reg2.fetch_range(&src, 0, 100).await.unwrap(), data[..100]);
    assert_eq!(origin.counters().blob_requests(&d), 1);
    assert_eq!(failures(&reg2), 0, "a mirror's 404 is an answer, not a failure");
    // nor is a missing object at the origin (a registry without a prefetch list)
    let missing = blob_at(&origin.host(), &sha256_digest(b"none"), 10);
    let e = reg2.fetch_range(&missing, 0, 10).await.unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    assert_eq!(failures(&reg2), 0);
}

/// `insecure` belongs to its host: a mirror of an insecure origin is spoken to over TLS
/// unless it is marked insecure itself (here it speaks plain HTTP, so TLS to it fails and
/// the origin serves).
#[tokio::test]
async fn a_mirror_of_an_insecure_host_is_not_plain_http() {
    let origin = MockRegistry::start(MockConfig::default()).await.unwrap();
    let mirror = MockRegistry::start(MockConfig::default()).await.unwrap();
    let data = bytes(6, 10_000);
    let d = origin.store().put_blob(data.clone());
    mirror.store().put_blob(data.clone());
    let mut cfg = insecure_config(&[&origin.host()]);
    cfg.hosts[0].mirrors = vec![mirror.host()];
    cfg.max_attempts = 1;
    let reg = client(&cfg);
    let src = blob_at(&origin.host(), &d, data.len());
    assert_eq!(reg.fetch_range(&src, 0, 100).await.unwrap(), data[..100]);
    assert_eq!(mirror.counters().requests, 0, "plain HTTP reached the mirror");
    assert_eq!(origin.counters().blob_requests(&d), 1);
}

#[tokio::test]
async fn large_transfers_get_time_in_proportion_to_their_size() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let data = bytes(9, 4 << 20);
    let d = mock.store().put_blob(data.clone());
    // 4 MiB at 2 MiB/s takes 2 s, four times the 500 ms request timeout.
    mock.set_faults(vec![FaultRule::always(Fault::Throttle(2 << 20))]);
    let mut cfg = insecure_config(&[&mock.host()]);
    cfg.request_timeout = Duration::from_millis(500);
    cfg.deadline = Duration::from_millis(1_500);
    cfg.max_attempts = 2;
    cfg.min_rate_kib_s = std::num::NonZeroU64::new(1024);
    let src = blob_at(&mock.host(), &d, data.len());
    let got = client(&cfg).fetch_blob(&src).await.unwrap();
    assert!(got == data, "throttled blob differs");
    assert_eq!(mock.counters().blob_requests(&d), 1, "one slow transfer, no retries");
    // Without the allowance the same transfer is cut off after each attempt's 500 ms.
    mock.reset_counters();
    cfg.min_rate_kib_s = None;
    let err = client(&cfg).fetch_blob(&src).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Exhausted { .. } | RegistryError::Timeout(_)),
        "expected a timeout, got {err}"
    );
    assert_eq!(mock.counters().blob_requests(&d), 2);
}

#[tokio::test]
async fn tls_is_the_default() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let d = mock.store().put_blob(bytes(6, 10));
    let mut cfg = insecure_config(&[]);
    cfg.max_attempts = 1;
    let reg = client(&cfg);
    let e = reg
        .fetch_range(&blob_at(&mock.host(), &d, 10), 0, 10)
        .await
        .unwrap_err();
    assert!(
        mock.counters().blob_hits.is_empty(),
        "no plain HTTP request without `insecure`: {e}"
    );
}

#[tokio::test]
async fn index_resolves_to_the_platform_and_docker_manifests_parse() {
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let img = build_files(&mixed_files(9, 3, &[]), 1);
    let amd = push_image(&reg, &host, "multi/app:amd64", &img).await;
    let img2 = build_files(&mixed_files(10, 3, &[]), 1);
    let arm = push_image(&reg, &host, "multi/app:arm64", &img2).await;
    let entry = |d: &str, arch: &str| {
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": 1,
                           "platform": {"os": "linux", "architecture": arch}})
    };
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                   "manifests": [entry(&arm, "arm64"), entry(&amd, "amd64")]});
    let r = parse_reference(&format!("{host}/multi/app:latest")).unwrap();
    reg.push_manifest(
        &r,
        Bytes::from(serde_json::to_vec(&index).unwrap()),
        "application/vnd.oci.image.index.v1+json",
    )
    .await
    .unwrap();
    let resolved = reg.resolve(&r).await.unwrap();
    let want = if std::env::consts::ARCH == "aarch64" {
        &arm
    } else {
        &amd
    };
    assert_eq!(&resolved.digest, want);
    let mut cfg = insecure_config(&[&host]);
    cfg.platform = Some("linux/arm64".parse().unwrap());
    assert_eq!(client(&cfg).resolve(&r).await.unwrap().digest, arm);
    cfg.platform = Some("linux/s390x".parse().unwrap());
    assert!(matches!(
        client(&cfg).resolve(&r).await,
        Err(RegistryError::Manifest(_))
    ));
    // a Docker schema 2 manifest
    let raw = mock.store().manifest("multi/app", &amd).unwrap().1;
    let mut v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    v["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json".into();
    let body = serde_json::to_vec(&v).unwrap();
    let dr = parse_reference(&format!("{host}/multi/app:docker")).unwrap();
    reg.push_manifest(
        &dr,
        Bytes::from(body.clone()),
        "application/vnd.docker.distribution.manifest.v2+json",
    )
    .await
    .unwrap();
    let got = reg.resolve(&dr).await.unwrap();
    assert_eq!(got.digest, sha256_digest(&body));
    assert_eq!(got.manifest.layers.len(), v["layers"].as_array().unwrap().len());
    assert_eq!(got.manifest.layers.len(), 4, "meta, chunks, leaves, data");
    // a malformed manifest is an error, not a panic
    let br = parse_reference(&format!("{host}/multi/app:broken")).unwrap();
    reg.push_manifest(
        &br,
        Bytes::from_static(b"{\"schemaVersion\": 2, \"layers\": 7}"),
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await
    .unwrap();
    assert!(reg.resolve(&br).await.is_err());
}

#[tokio::test]
async fn docker_registry_with_htpasswd_basic_auth() {
    let dr = DockerRegistry::start(Some(("puller", "s3cret-pass")));
    let good = client(&with_creds(&dr.host, "puller", "s3cret-pass"));
    let files = mixed_files(11, 20, &[2]);
    let img = build_files(&files, 2);
    let digest = push_image(&good, &dr.host, "real/app:v1", &img).await;
    let r = parse_reference(&format!("{}/real/app:v1", dr.host)).unwrap();
    let resolved = good.resolve(&r).await.unwrap();
    assert_eq!(resolved.digest, digest);
    let data = &img.data[0];
    let src = BlobSource {
        repo: r.clone(),
        digest: sha256_digest(data).parse().unwrap(),
        size: data.len() as u64,
    };
    assert_eq!(good.fetch_range(&src, 4096, 10_000).await.unwrap(), data[4096..14_096]);
    let meta = BlobSource {
        repo: r.clone(),
        digest: sha256_digest(&img.meta).parse().unwrap(),
        size: img.meta.len() as u64,
    };
    assert_eq!(good.fetch_blob(&meta).await.unwrap(), img.meta);
    let bad = client(&with_creds(&dr.host, "puller", "wrong"));
    assert!(matches!(
        bad.fetch_range(&src, 0, 10).await,
        Err(RegistryError::Unauthorized(_))
    ));
    let anon = client(&insecure_config(&[&dr.host]));
    assert!(anon.resolve(&r).await.is_err());
}

/// A `ca_file` is trusted for its own host only: two HTTPS `docker-registry` instances with
/// certificates of one private CA, the CA configured for the first; the first serves, the
/// second is refused at the TLS handshake (one shared client used to trust it for both).
#[tokio::test]
async fn a_ca_file_is_trusted_for_its_host_only() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = common::tls::private_ca(dir.path());
    let (a, b) = (
        DockerRegistry::start_with(None, Some((&cert, &key))),
        DockerRegistry::start_with(None, Some((&cert, &key))),
    );
    let host = |h: &str, ca_file: Option<&std::path::Path>| HostConfig {
        host: h.to_string(),
        ca_file: ca_file.map(|p| p.to_path_buf()),
        ..Default::default()
    };
    let mut cfg = insecure_config(&[]);
    cfg.max_attempts = 1;
    cfg.hosts = vec![host(&a.host, Some(&ca)), host(&b.host, Some(&ca))];
    let both = client(&cfg);
    let data = bytes(8, 5000);
    let d = sha256_digest(&data);
    for h in [&a.host, &b.host] {
        let repo = parse_reference(&format!("{h}/lib/app:1")).unwrap();
        both.push_blob(&repo, Bytes::from(data.clone())).await.unwrap();
    }
    cfg.hosts = vec![host(&a.host, Some(&ca)), host(&b.host, None)];
    let scoped = client(&cfg);
    let got = scoped
        .fetch_range(&blob_at(&a.host, &d, data.len()), 0, 5000)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..], "the host whose CA is configured");
    let Err(err) = scoped.fetch_range(&blob_at(&b.host, &d, data.len()), 0, 5000).await else {
        panic!("a host without a ca_file trusted another host's CA");
    };
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
}

/// A manifest body is bounded while it streams: a registry that sends an endless manifest
/// gets a "too large" error naming the limit once 4 MiB have arrived, and the daemon stops
/// reading (the server manages to send little more than the limit plus socket buffers).
#[tokio::test]
async fn an_endless_manifest_is_cut_off_at_the_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&sent);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counter = std::sync::Arc::clone(&counter);
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if req.starts_with(b"GET /v2/ ") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let piece = [b' '; 1 << 16];
                let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), &piece[..], b"\r\n"].concat();
                while s.write_all(&chunk).await.is_ok() {
                    counter.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let mut cfg = insecure_config(&[&host]);
    cfg.max_attempts = 1;
    let reg = client(&cfg);
    let err = reg
        .resolve(&parse_reference(&format!("{host}/endless/app:v1")).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("max_manifest_bytes"),
        "expected the manifest limit to stop it: {err}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n < 64 << 20, "the client kept reading: {n} bytes sent");
}
