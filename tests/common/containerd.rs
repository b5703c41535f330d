//! Debian's real `containerd` for the tests: a private root, state and socket, the lazyblob
//! proxy snapshotter, optionally the CRI plugin (pulling with lazyblob and snapshot
//! annotations, as a Kubernetes node would); a CRI image-service client (`k8s-cri`, what
//! kubelet calls). Stopped with its shims and mounts on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::require_tool;

/// Debian's containerd with a private root, state and socket; stopped (with its shims and
/// mounts) on drop.
/// The CRI plugin's settings: plain HTTP registries, and basic credentials for them.
#[derive(Clone, Copy)]
pub struct Cri<'a> {
    pub hosts: &'a [&'a str],
    pub auth: Option<(&'a str, &'a str)>,
}

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Start with the lazyblob proxy plugin at `snapshotter_socket`; `cri`: the CRI plugin
    /// on, pulling with the lazyblob snapshotter and snapshot annotations.
    pub fn start(dir: &Path, snapshotter_socket: &Path, cri: Option<Cri<'_>>) -> Containerd {
        require_tool("containerd", "containerd");
        require_tool("runc", "runc");
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{disabled}
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
            disabled = if cri.is_some() {
                ""
            } else {
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"
            },
        );
        let mut config = config;
        // the snippet the README and deploy/ ship, with this test's socket
        let shipped =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/containerd/config-v2.toml"))
                .unwrap()
                .replace(
                    "/run/lazyblob/snapshotter.sock",
                    &snapshotter_socket.display().to_string(),
                );
        config.extend(
            shipped
                .lines()
                .filter(|l| !l.starts_with("version"))
                .map(|l| format!("{l}\n")),
        );
        if let Some(Cri { hosts, auth }) = cri {
            config.push_str(&format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.invalid/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{dir}/cni-bin"
    conf_dir = "{dir}/cni-conf"
"#,
                dir = dir.display()
            ));
            for h in hosts {
                config.push_str(&format!(
                    "  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{h}\"]\n    endpoint = [\"http://{h}\"]\n"
                ));
                if let Some((u, p)) = auth {
                    config.push_str(&format!(
                        "  [plugins.\"io.containerd.grpc.v1.cri\".registry.configs.\"{h}\".auth]\n    username = \"{u}\"\n    password = \"{p}\"\n"
                    ));
                }
            }
        }
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            dir: dir.to_path_buf(),
            socket,
            child: Some(child),
        };
        let t0 = Instant::now();
        std::fs::create_dir_all(dir.join("cni-bin")).unwrap();
        std::fs::create_dir_all(dir.join("cni-conf")).unwrap();
        while !c.ctr(&["version"]).status.success() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "containerd did not start:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this containerd, namespace `test`.
    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        self.ctr_in("test", args)
    }

    /// `ctr` in namespace `ns` (`k8s.io` is the CRI plugin's).
    pub fn ctr_in(&self, ns: &str, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ctr` that must succeed; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        self.ctr_ok_in("test", args)
    }

    /// `ctr` in namespace `ns` that must succeed; its stdout.
    pub fn ctr_ok_in(&self, ns: &str, args: &[&str]) -> String {
        let out = self.ctr_in(ns, args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\n--- containerd log (tail)\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::procs::terminate(&mut c, Duration::from_secs(10));
        }
        // shims started for our containerd (their command line names our state dir)
        let state = self.dir.join("state").to_string_lossy().into_owned();
        super::procs::kill_all(&super::procs::pids_with_cmdline(|c| c.contains(&state)));
        super::procs::detach_mounts_under(&self.dir);
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// CRI `ImageService/PullImage` of `image` through containerd's socket (what kubelet does);
/// returns the image reference containerd answers.
pub async fn cri_pull(socket: &Path, image: &str) -> Result<String, tonic::Status> {
    use k8s_cri::v1::image_service_client::ImageServiceClient;
    use k8s_cri::v1::{ImageSpec, PullImageRequest};
    let channel = unix_channel(socket)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = ImageServiceClient::new(channel);
    let r = client
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().image_ref)
}

/// A gRPC channel over the unix socket `socket`.
pub async fn unix_channel(socket: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::1]:1")
        .expect("a static URI")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

/// Wait until the daemon `d` accepts connections on its snapshotter socket `socket` (a
/// stale socket file of a previous daemon does not count).
pub fn wait_for_socket(socket: &Path, d: &super::daemon::DaemonProc) {
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no snapshotter socket:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
