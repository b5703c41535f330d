//! The config files of the test containerds: private addresses and directories, the snippet
//! `deploy/containerd/` ships (as a user merges it), and the CRI plugin's registry settings in
//! the syntax of each config version.

use std::path::Path;

use super::containerd::Cri;

/// The addresses and directories every test containerd gets.
fn base(version: u32, dir: &Path, socket: &Path, disabled: &[&str]) -> String {
    format!(
        r#"version = {version}
root = "{root}"
state = "{state}"
disabled_plugins = {disabled:?}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{sock}.debug"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = socket.display(),
    )
}

/// The snippet the README and deploy/ ship (`config-v2.toml` or `config-v3.toml`), with this
/// test's socket.
fn shipped(file: &str, snapshotter_socket: &Path) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/containerd")
            .join(file),
    )
    .unwrap()
    .replace(
        "/run/lazyblob/snapshotter.sock",
        &snapshotter_socket.display().to_string(),
    );
    text.lines()
        .filter(|l| !l.starts_with("version"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// containerd 1.6/1.7 (config version 2).
pub fn config_v2(dir: &Path, socket: &Path, snapshotter_socket: &Path, cri: Option<Cri<'_>>) -> String {
    let disabled: &[&str] = if cri.is_some() {
        &[]
    } else {
        &["io.containerd.grpc.v1.cri"]
    };
    let mut config = base(2, dir, socket, disabled) + &shipped("config-v2.toml", snapshotter_socket);
    let Some(Cri { hosts, auth }) = cri else {
        return config;
    };
    let cri = r#"[plugins."io.containerd.grpc.v1.cri"]"#.trim_end_matches(']');
    config.push_str(&format!(
        "{cri}]\n  sandbox_image = \"registry.invalid/pause:3.6\"\n{cri}.cni]\n  bin_dir = \"{dir}/cni-bin\"\n  conf_dir = \"{dir}/cni-conf\"\n",
        dir = dir.display()
    ));
    for h in hosts {
        config.push_str(&format!(
            "{cri}.registry.mirrors.\"{h}\"]\n  endpoint = [\"http://{h}\"]\n"
        ));
        if let Some((u, p)) = auth {
            config.push_str(&format!(
                "{cri}.registry.configs.\"{h}\".auth]\n  username = \"{u}\"\n  password = \"{p}\"\n"
            ));
        }
    }
    config
}

/// containerd 2.x (config version 3): registries as `hosts.toml` files under `config_path`.
pub fn config_v3(dir: &Path, socket: &Path, snapshotter_socket: &Path, cri: Option<Cri<'_>>) -> String {
    let disabled: &[&str] = if cri.is_some() {
        &[]
    } else {
        &[
            "io.containerd.grpc.v1.cri",
            "io.containerd.cri.v1.images",
            "io.containerd.cri.v1.runtime",
        ]
    };
    let mut config = base(3, dir, socket, disabled) + &shipped("config-v3.toml", snapshotter_socket);
    let Some(Cri { hosts, auth }) = cri else {
        return config;
    };
    assert!(auth.is_none(), "the containerd 2.x harness has no registry credentials");
    let certs = dir.join("certs.d");
    for h in hosts {
        std::fs::create_dir_all(certs.join(h)).unwrap();
        std::fs::write(
            certs.join(h).join("hosts.toml"),
            format!("server = \"http://{h}\"\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
        )
        .unwrap();
    }
    config.push_str(&format!(
        r#"[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = "{certs}"
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "registry.invalid/pause:3.10"
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["{dir}/cni-bin"]
  conf_dir = "{dir}/cni-conf"
"#,
        certs = certs.display(),
        dir = dir.display()
    ));
    config
}
