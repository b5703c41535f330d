//! containerd's registry hosts configuration (`config_path`, e.g.
//! `/etc/containerd/certs.d/<host>/hosts.toml`) read as lazyblob host settings, so that a
//! node's mirrors and CAs apply to lazy reads without a second config:
//! - `server`'s scheme (`http://` = plain HTTP), `ca`, `skip_verify` of the registry itself;
//! - each `[host."<url>"]` whose `capabilities` include `pull` becomes a mirror, tried in file
//!   order before the origin, with its own scheme, `ca` and `skip_verify`.
//!
//! Not carried over (a warning says so): mirrors below a path other than `/v2`, `header`
//! tables, client certificates; the `_default` directory. A host lazyblob's own
//! `[[registry.hosts]]` configures keeps lazyblob's settings.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, TableLike};

use super::{ConfigError, HostConfig};

/// The largest `hosts.toml` read.
const MAX_FILE: u64 = 1 << 20;

/// Host settings from every `<dir>/<host>/hosts.toml`: the registries first, each followed by
/// its mirrors (mirrors named by several registries once). A missing `dir` has none.
pub fn read(dir: &Path) -> Result<Vec<HostConfig>, ConfigError> {
    let invalid = |what: String| ConfigError::Invalid(format!("containerd hosts {}: {what}", dir.display()));
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(invalid(e.to_string())),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("hosts.toml").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut hosts: Vec<HostConfig> = Vec::new();
    for name in names {
        if name == "_default" {
            tracing::warn!(dir = %dir.display(), "containerd's _default hosts.toml is not used by lazyblob");
            continue;
        }
        let file = dir.join(&name).join("hosts.toml");
        let len = std::fs::metadata(&file).map_err(|e| invalid(e.to_string()))?.len();
        if len > MAX_FILE {
            return Err(invalid(format!("{} is over {MAX_FILE} bytes", file.display())));
        }
        let text = std::fs::read_to_string(&file).map_err(|e| invalid(format!("{}: {e}", file.display())))?;
        let doc: DocumentMut = text.parse().map_err(|e| invalid(format!("{}: {e}", file.display())))?;
        for h in
            host_settings(&name, &dir.join(&name), &doc).map_err(|e| invalid(format!("{}: {e}", file.display())))?
        {
            if !hosts.iter().any(|known| known.host == h.host) {
                hosts.push(h);
            }
        }
    }
    Ok(hosts)
}

/// The settings of registry `name` and of its mirrors from one parsed `hosts.toml` (relative
/// `ca` paths are against `base`, the file's directory).
pub fn host_settings(name: &str, base: &Path, doc: &DocumentMut) -> Result<Vec<HostConfig>, String> {
    let root = doc.as_table();
    let server = root.get("server").and_then(Item::as_str);
    let mut origin = HostConfig {
        host: name.to_string(),
        insecure: server.is_some_and(|s| s.starts_with("http://")),
        ..Default::default()
    };
    tls_settings(&mut origin, root, base)?;
    let mut hosts = vec![];
    let mut mirrors = vec![];
    if let Some(table) = root.get("host").and_then(Item::as_table_like) {
        for (url, entry) in table.iter() {
            let Some(entry) = entry.as_table_like() else {
                return Err(format!("host.{url:?} is not a table"));
            };
            if !pulls(entry)? {
                continue;
            }
            let Some((scheme, host, path)) = split_url(url) else {
                return Err(format!("host {url:?} is not a URL"));
            };
            if !matches!(path, "" | "/" | "/v2" | "/v2/") {
                tracing::warn!(
                    host = name,
                    mirror = url,
                    "a mirror below a path is not used by lazyblob"
                );
                continue;
            }
            if entry.contains_key("header") {
                tracing::warn!(
                    host = name,
                    mirror = url,
                    "headers of hosts.toml are not sent by lazyblob"
                );
            }
            if host == name {
                // the origin listed as a host: its settings are the origin's
                origin.insecure = scheme == "http";
                tls_settings(&mut origin, entry, base)?;
                continue;
            }
            let mut mirror = HostConfig {
                host: host.to_string(),
                insecure: scheme == "http",
                ..Default::default()
            };
            tls_settings(&mut mirror, entry, base)?;
            mirrors.push(host.to_string());
            hosts.push(mirror);
        }
    }
    origin.mirrors = mirrors;
    hosts.insert(0, origin);
    Ok(hosts)
}

/// Whether a host entry may serve pulls (`capabilities`, default: every capability).
fn pulls(entry: &dyn TableLike) -> Result<bool, String> {
    let Some(caps) = entry.get("capabilities") else {
        return Ok(true);
    };
    let caps = caps.as_array().ok_or("capabilities is not a list")?;
    Ok(caps.iter().any(|c| c.as_str() == Some("pull")))
}

/// `ca` (a path or a list: the first is used) and `skip_verify` of a host.
fn tls_settings(h: &mut HostConfig, t: &dyn TableLike, base: &Path) -> Result<(), String> {
    let ca = match t.get("ca") {
        None => None,
        Some(item) => match (item.as_str(), item.as_array()) {
            (Some(path), _) => Some(path.to_string()),
            (None, Some(list)) => {
                if list.len() > 1 {
                    tracing::warn!(host = h.host, "several CA files in hosts.toml: lazyblob uses the first");
                }
                list.iter().next().and_then(|v| v.as_str()).map(str::to_string)
            }
            _ => return Err("ca is neither a path nor a list of paths".into()),
        },
    };
    if let Some(ca) = ca {
        let path = PathBuf::from(&ca);
        h.ca_file = Some(if path.is_absolute() { path } else { base.join(path) });
    }
    if let Some(skip) = t.get("skip_verify") {
        h.skip_verify = skip.as_bool().ok_or("skip_verify is not true or false")?;
    }
    if h.insecure && (h.ca_file.take().is_some() || std::mem::take(&mut h.skip_verify)) {
        tracing::warn!(
            host = h.host,
            "plain HTTP host: its TLS settings in hosts.toml are ignored"
        );
    }
    if t.contains_key("client") {
        tracing::warn!(
            host = h.host,
            "client certificates of hosts.toml are not used by lazyblob"
        );
    }
    Ok(())
}

/// `scheme://host[:port][/path]` as its parts.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "http" | "https") {
        return None;
    }
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    (!host.is_empty()).then_some((scheme, host, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> Vec<HostConfig> {
        host_settings(
            name,
            Path::new("/etc/containerd/certs.d").join(name).as_path(),
            &text.parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn mirrors_in_file_order_with_their_own_tls() {
        let hosts = parse(
            "docker.io",
            r#"
server = "https://registry-1.docker.io"
[host."https://mirror-b.example"]
  capabilities = ["pull", "resolve"]
  ca = "mirror-ca.pem"
[host."http://10.0.0.1:5000"]
  capabilities = ["pull"]
[host."https://push-only.example"]
  capabilities = ["push"]
[host."https://a.example/some/prefix"]
  capabilities = ["pull"]
[host."https://self-signed.example"]
  skip_verify = true
"#,
        );
        let origin = &hosts[0];
        assert_eq!(origin.host, "docker.io");
        assert!(!origin.insecure);
        assert_eq!(
            origin.mirrors,
            ["mirror-b.example", "10.0.0.1:5000", "self-signed.example"]
        );
        assert_eq!(
            hosts[1].ca_file.as_deref(),
            Some(Path::new("/etc/containerd/certs.d/docker.io/mirror-ca.pem"))
        );
        assert!(hosts[2].insecure);
        assert!(hosts[3].skip_verify);
        assert_eq!(hosts.len(), 4, "push-only and path mirrors are not used");
    }

    #[test]
    fn the_origins_own_settings() {
        let hosts = parse(
            "reg.local:5000",
            "server = \"http://reg.local:5000\"\n[host.\"http://reg.local:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        );
        assert_eq!(hosts.len(), 1);
        assert!(hosts[0].insecure && hosts[0].mirrors.is_empty());
        let hosts = parse(
            "tls.local",
            "server = \"https://tls.local\"\nca = [\"/ca/one.pem\", \"/ca/two.pem\"]\nskip_verify = false\n",
        );
        assert_eq!(hosts[0].ca_file.as_deref(), Some(Path::new("/ca/one.pem")));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let bad = |text: &str| host_settings("h", Path::new("/x"), &text.parse().unwrap()).unwrap_err();
        assert!(bad("ca = 3\n").contains("ca"));
        assert!(bad("skip_verify = \"yes\"\n").contains("skip_verify"));
        assert!(bad("[host.\"ftp://x\"]\n").contains("not a URL"));
        assert!(bad("[host.\"https://x\"]\ncapabilities = \"pull\"\n").contains("capabilities"));
    }
}
