//! The lazyblob image built without Docker (`deploy/image/build-image.sh`: umoci, skopeo),
//! pushed to a real `docker-registry` and run by Debian's containerd and runc the way the Helm
//! chart's DaemonSet runs it (`ctr run --privileged` with the node's `/run/lazyblob`, the
//! ConfigMap and the node's `/` mounted; image, commands, environment and config as `helm
//! template` renders them): the printed digest is the registry's, the liveness probe's
//! `lazyblob status` answers from the daemon on the host, the init steps install the node
//! service and configure containerd on a scratch node root with nothing but what the image
//! holds, and the uninstall rendering's steps restore containerd's config byte for byte and
//! remove the service.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::containerd::{wait_for_socket, Containerd};
use common::daemon::{binary, DaemonProc};
use common::procs::run_ok;
use common::*;

fn build_and_push(reference: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/image/build-image.sh");
    let out = run_ok(
        Command::new("sh")
            .arg(script)
            .arg("--binary")
            .arg(binary())
            .arg("--plain-http")
            .arg(reference),
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The digest of the manifest the registry serves for `reference` (sha256 of its bytes).
async fn served_digest(host: &str, repo: &str, tag: &str) -> String {
    let url = format!("http://{host}/v2/{repo}/manifests/{tag}");
    let body = reqwest::Client::new()
        .get(url)
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    format!("sha256:{}", sha256_hex(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_under_containerd_and_reaches_the_host_daemon() {
    require_root();
    require_tool("umoci", "umoci");
    require_tool("skopeo", "skopeo");
    let dr = DockerRegistry::start(None);
    let reference = format!("{}/lazyblob:test", dr.host);
    let digest = build_and_push(&reference);
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(digest, served_digest(&dr.host, "lazyblob", "test").await);

    let tmp = tempfile::tempdir().unwrap();
    let snapshotter = tmp.path().join("node/run/snapshotter.sock");
    // the node's daemon: its admin socket in what the DaemonSet mounts as /run/lazyblob
    let d = DaemonProc::start(
        &tmp.path().join("node/run"),
        &[],
        &format!(
            "frontend = \"fanotify\"\n[snapshotter]\nsocket = \"{}\"",
            snapshotter.display()
        ),
    );
    wait_for_socket(&snapshotter, &d);
    let host_root = tmp.path().join("node/root");
    std::fs::create_dir_all(host_root.join("etc/containerd")).unwrap();
    let config = std::process::Command::new("containerd")
        .args(["config", "default"])
        .output()
        .unwrap()
        .stdout;
    std::fs::write(host_root.join("etc/containerd/config.toml"), &config).unwrap();

    let c = Containerd::start(&tmp.path().join("containerd"), &snapshotter, None);
    // the image as the chart names it: by digest
    let values = |extra: &[&str]| {
        let mut v = vec![
            format!("image.repository={}/lazyblob", dr.host),
            format!("image.digest={digest}"),
            // no systemd or containerd service here: the restart is recorded
            "containerd.restartCommand=echo restart containerd".to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let install = rendered(&values(&[]));
    c.ctr_ok(&["images", "pull", "--plain-http", &install.image]);
    let listed = c.ctr_ok(&["images", "ls"]);
    assert!(listed.contains(&digest), "{listed}");
    let configmap = tmp.path().join("configmap");
    std::fs::create_dir_all(&configmap).unwrap();
    std::fs::write(configmap.join("lazyblob.toml"), &install.config).unwrap();
    let mounts = Mounts {
        run: d.dir.clone(),
        config: configmap,
        host: host_root.clone(),
    };

    // the watcher's liveness probe: the image's binary talks to the host's daemon
    let status = run_in_image(&c, &install.image, "image-status", &install.probe, &[], &mounts);
    assert!(status.contains("frontend=fanotify"), "{status}");
    assert!(
        status.starts_with(&format!("lazyblob {}", env!("CARGO_PKG_VERSION"))),
        "{status}"
    );

    // the chart's init steps as rendered, with only the image's tools (busybox): the node
    // service installer (systemctl recorded, no systemd here) and the containerd config
    let original = std::fs::read(host_root.join("etc/containerd/config.toml")).unwrap();
    let said = run_init_steps(&c, &install, "init", &mounts);
    assert!(said.contains("systemctl restart lazyblob.service"), "{said}");
    assert!(said.contains("restart containerd"), "{said}");
    // the installed binary runs
    run_ok(Command::new(host_root.join("opt/lazyblob/bin/lazyblob")).arg("--version"));
    let node_config = host_root.join("etc/lazyblob/lazyblob.toml");
    assert_eq!(std::fs::read_to_string(&node_config).unwrap(), install.config);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&node_config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let edited = std::fs::read_to_string(host_root.join("etc/containerd/config.toml")).unwrap();
    assert!(edited.contains("/run/lazyblob/snapshotter.sock"), "{edited}");
    assert!(host_root.join("etc/containerd/config.toml.lazyblob-backup").exists());

    // the uninstall rendering undoes it: containerd's config byte for byte, the service gone
    let uninstall = rendered(&values(&["node.uninstall=true"]));
    let said = run_init_steps(&c, &uninstall, "uninit", &mounts);
    assert!(said.contains("systemctl disable --now lazyblob.service"), "{said}");
    assert_eq!(
        std::fs::read(host_root.join("etc/containerd/config.toml")).unwrap(),
        original
    );
    assert!(!host_root.join("etc/systemd/system/lazyblob.service").exists());
    assert!(!host_root.join("opt/lazyblob/bin/lazyblob").exists());
}

/// One step of the DaemonSet: its command and environment.
struct Step {
    command: Vec<String>,
    env: Vec<(String, String)>,
}

/// What the chart renders for one set of values, as the test runs it.
struct Rendered {
    image: String,
    config: String,
    init: Vec<Step>,
    probe: Vec<String>,
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn rendered(values: &[String]) -> Rendered {
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let yaml = helm::render(&values).unwrap();
    let docs = helm::documents(&yaml);
    let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap().clone();
    let spec = find("DaemonSet")["spec"]["template"]["spec"].clone();
    let init = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Step {
            command: strings(&c["command"]),
            env: c["env"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .map(|v| {
                            (
                                v["name"].as_str().unwrap().to_string(),
                                v["value"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    Rendered {
        image: spec["containers"][0]["image"].as_str().unwrap().to_string(),
        config: find("ConfigMap")["data"]["lazyblob.toml"].as_str().unwrap().to_string(),
        init,
        probe: strings(&spec["containers"][0]["livenessProbe"]["exec"]["command"]),
    }
}

/// The node's directories the DaemonSet mounts: `/run/lazyblob`, the ConfigMap at
/// `/etc/lazyblob`, the node's `/` at `/host`.
struct Mounts {
    run: PathBuf,
    config: PathBuf,
    host: PathBuf,
}

/// Every init step of `r` in turn, as containers `<prefix>-<n>`; what they printed.
fn run_init_steps(c: &Containerd, r: &Rendered, prefix: &str, m: &Mounts) -> String {
    let run =
        |(i, step): (usize, &Step)| run_in_image(c, &r.image, &format!("{prefix}-{i}"), &step.command, &step.env, m);
    r.init.iter().enumerate().map(run).collect()
}

/// Run `command` in the image as the DaemonSet would (privileged, the node's mounts); with
/// `SYSTEMCTL` recorded, as no systemd runs here.
fn run_in_image(
    c: &Containerd,
    image: &str,
    id: &str,
    command: &[String],
    env: &[(String, String)],
    m: &Mounts,
) -> String {
    let mount = |src: &Path, dst: &str| format!("type=bind,src={},dst={dst},options=rbind:rw", src.display());
    let mut args: Vec<String> = ["run", "--rm", "--privileged"].map(String::from).to_vec();
    for (src, dst) in [
        (&m.run, "/run/lazyblob"),
        (&m.config, "/etc/lazyblob"),
        (&m.host, "/host"),
    ] {
        args.extend(["--mount".to_string(), mount(src, dst)]);
    }
    for (k, v) in env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("SYSTEMCTL", "echo systemctl")])
    {
        args.extend(["--env".to_string(), format!("{k}={v}")]);
    }
    args.extend([image.to_string(), id.to_string()]);
    args.extend(command.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ctr_ok(&args)
}
