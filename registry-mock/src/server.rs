//! The HTTP side: OCI distribution routes, auth checks, faults, counters.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::auth::{basic_credentials, bearer, AuthMode};
use crate::faults::{self, Fault};
use crate::{lock, BlobHit, Shared};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .fallback(handle)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(shared)
}

fn error(status: StatusCode, code: &str, msg: &str) -> Response {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{msg}"}}]}}"#);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn handle(State(s): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    lock(&s.counters).requests += 1;
    let path = uri.path().to_string();
    let authz = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if path == "/token" {
        return token(&s, authz.as_deref(), &method, &body);
    }
    if path == "/-/clear-faults" {
        // Test control: lets a client (e.g. a VM guest) end an injected fault.
        lock(&s.faults).clear();
        return (StatusCode::OK, "faults cleared\n").into_response();
    }
    let Some(rest) = path.strip_prefix("/v2") else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not a registry path");
    };
    if !check_auth(&s, authz.as_deref()) {
        lock(&s.counters).unauthorized += 1;
        return challenge(&s);
    }
    if rest.is_empty() || rest == "/" {
        return (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response();
    }
    let query = uri.query().unwrap_or("");
    if let Some((name, reference)) = rest.trim_start_matches('/').rsplit_once("/manifests/") {
        return manifest(&s, &method, name, reference, &headers, body);
    }
    if let Some((name, digest)) = rest.trim_start_matches('/').rsplit_once("/referrers/") {
        match lock(&s.config).referrers_api {
            crate::ReferrersApi::Served => return crate::referrers::list(&s.store, name, digest, query),
            crate::ReferrersApi::Garbled => return (StatusCode::OK, "<html>referrers</html>").into_response(),
            crate::ReferrersApi::Absent => {}
        }
    }
    if let Some((name, upload)) = rest.trim_start_matches('/').split_once("/blobs/uploads") {
        let (delay, stall) = {
            let c = lock(&s.config);
            (c.upload_commit_delay, c.stall_streamed_uploads)
        };
        if let Some(d) = delay.filter(|_| method == Method::PUT) {
            tokio::time::sleep(d).await;
        }
        if stall && method == Method::PATCH && !headers.contains_key(header::CONTENT_RANGE) {
            std::future::pending::<()>().await;
        }
        return upload_route(&s, &method, name, upload.trim_start_matches('/'), query, body);
    }
    if let Some((name, digest)) = rest.trim_start_matches('/').rsplit_once("/blobs/") {
        return blob(&s, &method, name, digest, &headers, authz.is_some()).await;
    }
    error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown route")
}

fn check_auth(s: &Shared, authz: Option<&str>) -> bool {
    match &lock(&s.config).auth {
        AuthMode::Anonymous => true,
        AuthMode::Basic { user, password } => basic_credentials(authz) == Some((user.clone(), password.clone())),
        AuthMode::Token { .. } => bearer(authz).is_some_and(|t| s.tokens.valid(t)),
    }
}

fn challenge(s: &Shared) -> Response {
    let value = match &lock(&s.config).auth {
        AuthMode::Token { .. } => format!(r#"Bearer realm="http://{}/token",service="registry-mock""#, s.addr),
        _ => r#"Basic realm="registry-mock""#.to_string(),
    };
    let mut r = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required");
    if let Ok(v) = value.parse() {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

fn token(s: &Shared, authz: Option<&str>, method: &Method, body: &[u8]) -> Response {
    lock(&s.counters).token_requests += 1;
    let (credentials, ttl) = match &lock(&s.config).auth {
        AuthMode::Token { credentials, ttl } => (credentials.clone(), *ttl),
        _ => return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no token service"),
    };
    if let Some(want) = credentials {
        let given = if method == Method::POST {
            // OAuth2 password grant (containerd): form fields username/password.
            let form = String::from_utf8_lossy(body);
            let field = |k: &str| {
                form.split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
            };
            field("username").zip(field("password"))
        } else {
            basic_credentials(authz)
        };
        if given != Some(want) {
            return error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "bad credentials");
        }
    }
    let t = s.tokens.issue(ttl);
    let body = format!(
        r#"{{"token":"{t}","access_token":"{t}","expires_in":{}}}"#,
        ttl.as_secs().max(1)
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn manifest(s: &Shared, method: &Method, name: &str, reference: &str, headers: &HeaderMap, body: Bytes) -> Response {
    lock(&s.counters).manifest_requests += 1;
    match *method {
        Method::GET | Method::HEAD => match s.store.manifest(name, reference) {
            Some((media_type, data)) => {
                let digest = crate::store::digest_of(&data);
                let len = data.len();
                let body = if method == Method::HEAD {
                    Body::empty()
                } else {
                    Body::from(data)
                };
                Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, media_type)
                    .header(header::CONTENT_LENGTH, len)
                    .header("Docker-Content-Digest", digest)
                    .body(body)
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
            }
            None => error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", "manifest unknown"),
        },
        Method::PUT => {
            let media_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/vnd.oci.image.manifest.v1+json")
                .to_string();
            let tag = (!reference.starts_with("sha256:")).then_some(reference);
            let served = lock(&s.config).referrers_api == crate::ReferrersApi::Served;
            let subject = crate::referrers::subject_of(&body).filter(|_| served);
            let digest = s.store.put_manifest(name, tag, &media_type, body);
            let r = Response::builder().status(StatusCode::CREATED);
            let r = match subject {
                Some(subject) => r.header("OCI-Subject", subject),
                None => r,
            };
            r.header(header::LOCATION, format!("/v2/{name}/manifests/{digest}"))
                .header("Docker-Content-Digest", digest)
                .body(Body::empty())
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

fn upload_route(s: &Shared, method: &Method, name: &str, id: &str, query: &str, body: Bytes) -> Response {
    if lock(&s.config).max_upload_body.is_some_and(|max| body.len() > max) {
        lock(&s.counters).uploads_too_large += 1;
        return error(StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID", "request body too large");
    }
    let digest = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("digest="))
        .map(|d| d.replace("%3A", ":").replace("%3a", ":"));
    let accepted = |id: &str| {
        Response::builder()
            .status(StatusCode::ACCEPTED)
            .header(header::LOCATION, format!("/v2/{name}/blobs/uploads/{id}"))
            .header("Docker-Upload-UUID", id)
            .header(header::RANGE, "0-0")
            .body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    };
    let created = |d: &str| {
        Response::builder()
            .status(StatusCode::CREATED)
            .header(header::LOCATION, format!("/v2/{name}/blobs/{d}"))
            .header("Docker-Content-Digest", d)
            .body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    };
    match (method.clone(), id.is_empty()) {
        (Method::POST, true) => {
            let id = s.store.start_upload();
            match digest {
                Some(d) => match s.store.finish_upload(&id, &body, &d) {
                    Ok(()) => created(&d),
                    Err(e) => error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", &e),
                },
                None => accepted(&id),
            }
        }
        (Method::PATCH, false) => match s.store.append_upload(id, &body) {
            Some(n) => {
                lock(&s.counters).upload_patches += 1;
                let mut r = accepted(id);
                if let Ok(v) = format!("0-{}", n.saturating_sub(1)).parse() {
                    r.headers_mut().insert(header::RANGE, v);
                }
                r
            }
            None => error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", "unknown upload"),
        },
        (Method::PUT, false) => match digest {
            Some(d) => match s.store.finish_upload(id, &body, &d) {
                Ok(()) => created(&d),
                Err(e) => error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", &e),
            },
            None => error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "digest missing"),
        },
        (Method::DELETE, false) => match s.store.cancel_upload(id) {
            true => StatusCode::NO_CONTENT.into_response(),
            false => error(StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN", "unknown upload"),
        },
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n` -> (start, end exclusive); `Err` when unsatisfiable.
fn parse_range(h: &str, size: u64) -> Result<(u64, u64), ()> {
    let spec = h.strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>().map_err(|_| ())?.saturating_add(1).min(size)
        };
        (start, end)
    };
    if start >= size || start >= end {
        return Err(());
    }
    Ok((start, end))
}

async fn blob(s: &Shared, method: &Method, name: &str, digest: &str, headers: &HeaderMap, had_auth: bool) -> Response {
    let Some(data) = s.store.blob(digest) else {
        record(s, digest, 0, 0, 404, had_auth);
        return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
    };
    let size = data.len() as u64;
    if method == Method::HEAD {
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, size)
            .header("Docker-Content-Digest", digest)
            .body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    if method != Method::GET {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if let Some(base) = lock(&s.config).redirect_blobs_to.clone() {
        record(s, digest, 0, 0, 307, had_auth);
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, format!("{base}/v2/{name}/blobs/{digest}"))
            .body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (start, end, partial) = match range {
        Some(r) => match parse_range(r, size) {
            Ok((a, b)) => (a, b, true),
            Err(()) => {
                record(s, digest, 0, 0, 416, had_auth);
                return Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .body(Body::empty())
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
            }
        },
        None => (0, size, false),
    };
    let applied = faults::take(&mut lock(&s.faults), digest);
    let mut body = data.slice(start as usize..end as usize);
    let mut drop_mid = false;
    let mut rate = None;
    for f in &applied {
        match f {
            Fault::Latency(d) => tokio::time::sleep(*d).await,
            Fault::Status(code) => {
                record(s, digest, start, 0, *code, had_auth);
                let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return error(status, "UNAVAILABLE", "injected fault");
            }
            Fault::Corrupt => {
                let mut v = body.to_vec();
                for b in v.iter_mut().step_by(997) {
                    *b ^= 0x5a;
                }
                body = Bytes::from(v);
            }
            Fault::DropMidBody => drop_mid = true,
            Fault::Throttle(bytes_per_s) => rate = Some((*bytes_per_s).max(1)),
        }
    }
    record(s, digest, start, end - start, if partial { 206 } else { 200 }, had_auth);
    let len = body.len();
    let out = if drop_mid {
        let half = body.slice(..len / 2);
        let parts: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(half),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected drop",
            )),
        ];
        Body::from_stream(futures::stream::iter(parts))
    } else if let Some(rate) = rate {
        Body::from_stream(throttled(body, rate))
    } else {
        Body::from(body)
    };
    let mut b = Response::builder()
        .status(if partial {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("Docker-Content-Digest", digest)
        .header(header::ACCEPT_RANGES, "bytes");
    if partial {
        b = b.header(header::CONTENT_RANGE, format!("bytes {start}-{}/{size}", end - 1));
    }
    b.body(out)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `body` in 64 KiB pieces, each sent when `rate` bytes per second allow it.
fn throttled(body: Bytes, rate: u64) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    const PIECE: usize = 64 << 10;
    let start = tokio::time::Instant::now();
    futures::stream::unfold(0usize, move |sent| {
        let body = body.clone();
        async move {
            if sent >= body.len() {
                return None;
            }
            let next = (sent + PIECE).min(body.len());
            let due = std::time::Duration::from_secs_f64(next as f64 / rate as f64);
            tokio::time::sleep_until(start + due).await;
            Some((Ok(body.slice(sent..next)), next))
        }
    })
}

fn record(s: &Shared, digest: &str, offset: u64, len: u64, status: u16, had_authorization: bool) {
    lock(&s.counters).blob_hits.push(BlobHit {
        digest: digest.to_string(),
        offset,
        len,
        status,
        had_authorization,
    });
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100), Ok((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100), Ok((90, 100)));
        assert_eq!(parse_range("bytes=95-200", 100), Ok((95, 100)));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("items=1-2", 100).is_err());
    }
}
