//! The OCI 1.1 referrers API, when [`crate::MockConfig::referrers_api`] is served:
//! `GET /v2/<name>/referrers/<digest>` lists the repository's manifests whose `subject` is
//! that digest, as an image index of descriptors (with their `artifactType` and annotations),
//! filtered by the `artifactType` query; a manifest pushed with a subject is answered with the
//! `OCI-Subject` header.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::store::Store;

/// The subject digest a manifest names, if any.
pub fn subject_of(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v["subject"]["digest"].as_str().map(str::to_string)
}

/// The referrers index of `digest` in repository `name`, filtered by the query's
/// `artifactType`.
pub fn list(store: &Store, name: &str, digest: &str, query: &str) -> Response {
    let wanted = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("artifactType="))
        .map(|t| {
            t.replace("%2B", "+")
                .replace("%2b", "+")
                .replace("%2F", "/")
                .replace("%2f", "/")
        });
    let mut manifests: Vec<Value> = store
        .manifests_of(name)
        .into_iter()
        .filter(|(_, _, body)| subject_of(body).as_deref() == Some(digest))
        .filter_map(|(d, media_type, body)| {
            let v: Value = serde_json::from_slice(&body).ok()?;
            let artifact_type = v["artifactType"]
                .as_str()
                .or(v["config"]["mediaType"].as_str())
                .unwrap_or_default()
                .to_string();
            let mut entry = json!({"mediaType": media_type, "digest": d, "size": body.len(),
                "artifactType": artifact_type});
            if v["annotations"].is_object() {
                entry["annotations"] = v["annotations"].clone();
            }
            Some(entry)
        })
        .filter(|e| wanted.as_deref().is_none_or(|t| e["artifactType"] == t))
        .collect();
    manifests.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests});
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/vnd.oci.image.index.v1+json")],
        index.to_string(),
    )
        .into_response();
    if wanted.is_some() {
        r.headers_mut()
            .insert("OCI-Filters-Applied", header::HeaderValue::from_static("artifactType"));
    }
    r
}
