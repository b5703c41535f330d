//! The containerd config edit on small files: what it adds, what it keeps, that its output
//! is a fixed point, and what it refuses.

use super::*;

fn settings() -> Settings {
    Settings {
        socket: "/run/lazyblob/snapshotter.sock".into(),
        root: "/var/lib/lazyblob/snapshotter".into(),
        platform: "linux/amd64".into(),
    }
}

fn value<'a>(doc: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = doc;
    for p in parents {
        t = t.get(*p)?.as_table()?;
    }
    t.get(*last)
}

fn apply(text: &str, version: Version, role: Role) -> (String, toml::Table) {
    let out = edit(text, version, role, &settings()).unwrap();
    let again = edit(&out, version, role, &settings()).unwrap();
    assert_eq!(again, out, "a second edit changed the file");
    let parsed: toml::Table = out.parse().unwrap();
    (out, parsed)
}

const V2: &str = r#"version = 2
root = "/var/lib/containerd"

# kept
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs" # the default
      disable_snapshot_annotations = true
      default_runtime_name = "runc"
"#;

#[test]
fn version_2_gets_the_proxy_plugin_and_cri_settings_and_keeps_the_rest() {
    let (out, doc) = apply(V2, Version::V2, Role::Main);
    let cri = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];
    let at = |k: &str| value(&doc, &[&cri[..], &[k]].concat()).cloned();
    assert_eq!(at("snapshotter"), Some("lazyblob".into()));
    assert_eq!(at("disable_snapshot_annotations"), Some(false.into()));
    assert_eq!(at("discard_unpacked_layers"), Some(false.into()));
    assert_eq!(at("default_runtime_name"), Some("runc".into()));
    assert_eq!(
        value(&doc, &["proxy_plugins", "lazyblob", "address"]),
        Some(&"/run/lazyblob/snapshotter.sock".into())
    );
    assert_eq!(
        value(&doc, &["proxy_plugins", "lazyblob", "type"]),
        Some(&"snapshot".into())
    );
    assert!(value(&doc, &["proxy_plugins", "lazyblob", "exports"]).is_none());
    assert!(out.contains("# kept") && out.contains("# the default"), "{out}");
    assert!(out.contains("sandbox_image = \"registry.k8s.io/pause:3.6\""), "{out}");
}

#[test]
fn version_3_gets_exports_and_both_unpack_configs() {
    let text = "version = 3\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n";
    let (_, doc) = apply(text, Version::V3, Role::Main);
    let images = ["plugins", "io.containerd.cri.v1.images", "snapshotter"];
    assert_eq!(value(&doc, &images), Some(&"lazyblob".into()));
    let exports = [
        "proxy_plugins",
        "lazyblob",
        "exports",
        "enable_remote_snapshot_annotations",
    ];
    assert_eq!(value(&doc, &exports), Some(&"true".into()));
    let unpack = value(&doc, &["plugins", "io.containerd.transfer.v1.local", "unpack_config"])
        .and_then(|v| v.as_array())
        .unwrap();
    let names: Vec<&str> = unpack.iter().filter_map(|e| e.get("snapshotter")?.as_str()).collect();
    assert_eq!(names, ["lazyblob", "overlayfs"]);
    assert_eq!(unpack[0].get("platform").and_then(|p| p.as_str()), Some("linux/amd64"));
}

#[test]
fn an_existing_unpack_config_gets_lazyblob_added_once() {
    let text = "version = 3\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  platform = 'linux/amd64'\n  snapshotter = 'native'\n";
    let (_, doc) = apply(text, Version::V3, Role::Main);
    let unpack = value(&doc, &["plugins", "io.containerd.transfer.v1.local", "unpack_config"])
        .and_then(|v| v.as_array())
        .unwrap();
    let names: Vec<&str> = unpack.iter().filter_map(|e| e.get("snapshotter")?.as_str()).collect();
    assert_eq!(names, ["native", "lazyblob"]);
}

#[test]
fn a_configured_file_is_returned_byte_for_byte() {
    let text = include_str!("../../deploy/containerd/config-v3.toml");
    let out = edit(text, Version::V3, Role::Main, &settings()).unwrap();
    assert_eq!(out, text);
    let text = include_str!("../../deploy/containerd/config-v2.toml");
    assert_eq!(edit(text, Version::V2, Role::Main, &settings()).unwrap(), text);
}

#[test]
fn an_import_is_edited_only_for_the_plugins_it_defines() {
    let unrelated = "version = 2\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"/opt/containerd\"\n";
    assert_eq!(
        edit(unrelated, Version::V2, Role::Import, &settings()).unwrap(),
        unrelated
    );
    // containerd 1.6 takes the CRI plugin's whole table from the last file defining it
    let registry =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
    let (_, doc) = apply(registry, Version::V2, Role::Import);
    let at = ["plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"];
    assert_eq!(value(&doc, &at), Some(&"lazyblob".into()));
    let overriding = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"native\"\n";
    let (_, doc) = apply(overriding, Version::V2, Role::Import);
    let at = ["plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"];
    assert_eq!(value(&doc, &at), Some(&"lazyblob".into()));
    assert!(doc.get("proxy_plugins").is_none());
}

#[test]
fn inline_tables_are_edited_inline() {
    let text = "version = 2\nproxy_plugins = { lazyblob = { type = \"snapshot\", address = \"/old.sock\" } }\n";
    let (_, doc) = apply(text, Version::V2, Role::Main);
    let at = ["proxy_plugins", "lazyblob", "address"];
    assert_eq!(value(&doc, &at), Some(&"/run/lazyblob/snapshotter.sock".into()));
}

#[test]
fn what_cannot_be_edited_safely_is_refused() {
    let no_version = parse("root = \"/var/lib/containerd\"\n").unwrap();
    assert!(matches!(version(&no_version), Err(EditError::Version(_))));
    let four = parse("version = 4\n").unwrap();
    assert!(matches!(version(&four), Err(EditError::Version(v)) if v == "4"));
    let bad = "version = 2\nproxy_plugins = \"lazyblob\"\n";
    assert!(matches!(
        edit(bad, Version::V2, Role::Main, &settings()),
        Err(EditError::NotATable(_))
    ));
    assert!(matches!(
        edit("version = [", Version::V2, Role::Main, &settings()),
        Err(EditError::Parse(_))
    ));
}
