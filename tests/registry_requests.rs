//! What blob GETs cost in requests, counted at registry-mock: the outcome of the auth step is
//! kept per repository (`registry/kept.rs`), so a range is one request once the first went
//! out, whatever the registry's auth (none, tokens, basic), and the first ranges of a fresh
//! client, side by side, share one auth step.

mod common;

use common::*;
use registry_mock::{AuthMode, MockConfig, MockRegistry};

/// Blob GETs keep the outcome of the auth step: once the first range is fetched, each
/// further range is one request, with no `GET /v2/` probe and no token request before it,
/// from a registry without auth, one with tokens and one with basic auth. (A registry that
/// asks for no token used to be probed before every range.)
#[tokio::test]
async fn each_range_after_the_first_is_one_request() {
    let modes = [
        (AuthMode::Anonymous, None),
        (token_auth(None), None),
        (
            AuthMode::Basic {
                user: "bob".into(),
                password: "builder".into(),
            },
            Some(("bob", "builder")),
        ),
    ];
    for (auth, creds) in modes {
        let name = format!("{auth:?}");
        let mock = MockRegistry::start(MockConfig {
            auth,
            ..Default::default()
        })
        .await
        .unwrap();
        let data = bytes(4, 64_000);
        let d = mock.store().put_blob(data.clone());
        let src = blob_at(&mock.host(), &d, data.len());
        let reg = match creds {
            Some((u, p)) => client(&with_creds(&mock.host(), u, p)),
            None => client(&insecure_config(&[&mock.host()])),
        };
        assert_eq!(reg.fetch_range(&src, 0, 1000).await.unwrap(), data[..1000]);
        let before = mock.counters();
        for k in 1..9 {
            let at = k * 7000;
            assert_eq!(
                reg.fetch_range(&src, at as u64, 4096).await.unwrap(),
                data[at..at + 4096]
            );
        }
        let after = mock.counters();
        assert_eq!(after.requests - before.requests, 8, "{name}: requests for 8 ranges");
        assert_eq!(
            after.token_requests, before.token_requests,
            "{name}: tokens fetched again"
        );
        assert_eq!(after.unauthorized, before.unauthorized, "{name}: ranges refused");
    }
}

/// The first range GETs of a fresh client, side by side, wait for one auth step: one token
/// for all of them, not one each from the token server.
#[tokio::test]
async fn concurrent_first_ranges_fetch_one_token() {
    let mock = token_registry(None).await;
    let data = bytes(5, 64_000);
    let d = mock.store().put_blob(data.clone());
    let src = blob_at(&mock.host(), &d, data.len());
    let reg = client(&insecure_config(&[&mock.host()]));
    let reads = (0..8usize).map(|k| reg.fetch_range(&src, (k * 7000) as u64, 4096));
    for (k, got) in futures::future::join_all(reads).await.into_iter().enumerate() {
        assert_eq!(got.unwrap(), data[k * 7000..k * 7000 + 4096]);
    }
    assert_eq!(
        mock.counters().token_requests,
        1,
        "tokens fetched for 8 concurrent first ranges"
    );
}
