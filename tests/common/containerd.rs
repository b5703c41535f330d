//! A real `containerd` for the tests (Debian's 1.6, or 1.7 and 2.x unpacked by `scripts/test.sh`): a
//! private root, state and socket, the lazyblob proxy snapshotter, optionally the CRI plugin
//! (pulling with lazyblob and snapshot annotations, as a Kubernetes node would); a CRI
//! image-service client (`k8s-cri`, what kubelet calls). Stopped with its shims and mounts on
//! drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::containerd_config::{config_v2, config_v3};
use super::require_tool;

/// The CRI plugin's settings: plain HTTP registries, and basic credentials for them.
#[derive(Clone, Copy)]
pub struct Cri<'a> {
    pub hosts: &'a [&'a str],
    pub auth: Option<(&'a str, &'a str)>,
}

/// Which containerd runs, with which of the shipped configs.
#[derive(Clone, Debug)]
pub enum Release {
    /// Debian's installed `containerd` (1.6), `deploy/containerd/config-v2.toml`.
    Installed,
    /// containerd 1.7 binaries in this directory (Debian trixie's package unpacked by
    /// `scripts/test.sh`), `deploy/containerd/config-v2.toml`.
    V1_7(PathBuf),
    /// containerd 2.x binaries in this directory (Debian's package unpacked by
    /// `scripts/test.sh`), `deploy/containerd/config-v3.toml`.
    V2(PathBuf),
}

impl Release {
    /// containerd 1.7 as `scripts/test.sh` unpacks it (`$LAZYBLOB_CONTAINERD17` overrides).
    pub fn v1_7() -> Release {
        Release::V1_7(unpacked("LAZYBLOB_CONTAINERD17", "containerd-1.7", "1.7"))
    }

    /// containerd 2.x as `scripts/test.sh` unpacks it (`$LAZYBLOB_CONTAINERD2` overrides).
    pub fn v2() -> Release {
        Release::V2(unpacked("LAZYBLOB_CONTAINERD2", "containerd-2", "2.x"))
    }

    /// Whether this release reads config version 3 (`config-v3.toml`), where the CRI
    /// plugin's settings moved to `io.containerd.cri.v1.*`; 1.6 and 1.7 read version 2.
    pub fn reads_config_v3(&self) -> bool {
        matches!(self, Release::V2(_))
    }

    /// `containerd config default` of this release.
    pub fn config_default(&self) -> String {
        let out = super::procs::run_ok(Command::new(self.binary("containerd")).args(["config", "default"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `containerd config dump` of `config`: the configuration this release would run with
    /// (imports merged, defaults filled in).
    pub fn config_dump(&self, config: &Path) -> String {
        let out = super::procs::run_ok(
            Command::new(self.binary("containerd"))
                .arg("--config")
                .arg(config)
                .args(["config", "dump"]),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn binary(&self, name: &str) -> PathBuf {
        match self.bin_dir() {
            None => PathBuf::from(name),
            Some(dir) => dir.join(name),
        }
    }

    /// Where an unpacked release's binaries (its shim among them) are.
    fn bin_dir(&self) -> Option<&Path> {
        match self {
            Release::Installed => None,
            Release::V1_7(dir) | Release::V2(dir) => Some(dir),
        }
    }

    /// What `ctr version` reports as the server's version, for an unpacked release.
    fn version_prefix(&self) -> Option<&'static str> {
        match self {
            Release::Installed => None,
            Release::V1_7(_) => Some("1.7."),
            Release::V2(_) => Some("2."),
        }
    }
}

/// The directory of containerd `what` unpacked by `scripts/test.sh` into `target/<subdir>`,
/// or the one `$<env>` names; the test fails if its `containerd` and `ctr` are not there.
fn unpacked(env: &str, subdir: &str, what: &str) -> PathBuf {
    let dir = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(subdir)
            .join("usr/bin")
    });
    super::require(
        dir.join("containerd").is_file() && dir.join("ctr").is_file(),
        &format!(
            "containerd {what} in {} (scripts/test.sh downloads Debian's package with apt-get)",
            dir.display()
        ),
    );
    dir
}

/// A real containerd with a private root, state and socket; stopped (with its shims and
/// mounts) on drop.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    release: Release,
    child: Option<Child>,
}

impl Containerd {
    /// Debian's containerd with the lazyblob proxy plugin at `snapshotter_socket`; `cri`: the
    /// CRI plugin on, pulling with the lazyblob snapshotter and snapshot annotations.
    pub fn start(dir: &Path, snapshotter_socket: &Path, cri: Option<Cri<'_>>) -> Containerd {
        Containerd::start_release(Release::Installed, dir, snapshotter_socket, cri)
    }

    /// `release` with the lazyblob proxy plugin at `snapshotter_socket` and, with `cri`, the
    /// CRI plugin on.
    pub fn start_release(release: Release, dir: &Path, snapshotter_socket: &Path, cri: Option<Cri<'_>>) -> Containerd {
        std::fs::create_dir_all(dir.join("cni-bin")).unwrap();
        std::fs::create_dir_all(dir.join("cni-conf")).unwrap();
        let socket = dir.join("containerd.sock");
        let config = if release.reads_config_v3() {
            config_v3(dir, &socket, snapshotter_socket, cri)
        } else {
            config_v2(dir, &socket, snapshotter_socket, cri)
        };
        std::fs::write(dir.join("config.toml"), config).unwrap();
        Containerd::start_with_config(release, dir, &dir.join("config.toml"))
    }

    /// `release` started with the config file `config` as it is, except for a private root,
    /// state and socket under `dir` (command-line flags override the file's).
    pub fn start_with_config(release: Release, dir: &Path, config: &Path) -> Containerd {
        require_tool("runc", "runc");
        if matches!(release, Release::Installed) {
            require_tool("containerd", "containerd");
        }
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let mut cmd = Command::new(release.binary("containerd"));
        if let Some(bin) = release.bin_dir() {
            // its own shim first
            let path = std::env::var_os("PATH").unwrap_or_default();
            let paths = std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path).collect::<Vec<_>>());
            cmd.env("PATH", std::env::join_paths(paths).unwrap());
        }
        let child = cmd
            .arg("--config")
            .arg(config)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(&socket)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            dir: dir.to_path_buf(),
            socket,
            release,
            child: Some(child),
        };
        let t0 = Instant::now();
        while !c.ctr(&["version"]).status.success() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "containerd did not start:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(prefix) = c.release.version_prefix() {
            let version = c.ctr_ok(&["version"]);
            let server = version.split("Server:").nth(1).unwrap_or_default();
            assert!(
                server.contains(&format!("Version:  {prefix}")),
                "not containerd {prefix}x:\n{version}"
            );
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
        Command::new(self.release.binary("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The arguments of `ctr run <how> --snapshotter <snapshotter> <image> <id> /bin/sh -c
    /// <script>`; `how` is `--rm` (wait for it) or `-d` (detached). Container ids must be
    /// unique across tests: runc's state is per namespace, not per containerd.
    fn run_args<'a>(how: &'a str, snapshotter: &'a str, image: &'a str, id: &'a str, script: &'a str) -> [&'a str; 9] {
        [
            "run",
            how,
            "--snapshotter",
            snapshotter,
            image,
            id,
            "/bin/sh",
            "-c",
            script,
        ]
    }

    /// `ctr run` of a shell `script` in namespace `ns` (see [`Containerd::run_args`]).
    pub fn run_sh(
        &self,
        ns: &str,
        how: &str,
        snapshotter: &str,
        image: &str,
        id: &str,
        script: &str,
    ) -> std::process::Output {
        self.ctr_in(ns, &Self::run_args(how, snapshotter, image, id, script))
    }

    /// [`Containerd::run_sh`] that must succeed; its stdout.
    pub fn run_sh_ok(&self, ns: &str, how: &str, snapshotter: &str, image: &str, id: &str, script: &str) -> String {
        self.ctr_ok_in(ns, &Self::run_args(how, snapshotter, image, id, script))
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
    cri_pull_with(socket, image, None).await
}

/// [`cri_pull`] with the pull secret kubelet sends (`auth`).
pub async fn cri_pull_with(
    socket: &Path,
    image: &str,
    auth: Option<k8s_cri::v1::AuthConfig>,
) -> Result<String, tonic::Status> {
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
            auth,
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
