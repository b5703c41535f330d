//! The Helm chart (`deploy/helm/lazyblob`) checked without a cluster: `helm lint --strict`
//! and `helm template` (the real helm, from npm) for each way it is installed, every
//! rendering validated by `kubernetes-validate --strict` (PyPI) against several Kubernetes
//! versions; the rendered `lazyblob.toml` is loaded by lazyblob's own config loader; the
//! DaemonSet's steps, mounts and privileges are what each mode needs; bad values are refused;
//! and the committed plain manifests are what `deploy/kubernetes/render.sh` renders now.

mod common;

use std::path::Path;
use std::process::Command;

use common::helm::{chart, documents, helm, render, sets, tool};
use serde_json::Value;

const KUBERNETES: [&str; 3] = ["1.29.0", "1.32.0", "1.35.0"];

fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

/// Lint, render and validate one installation; its documents and its lazyblob config.
fn installation(values: &[&str]) -> (Vec<Value>, lazyblob::config::Config) {
    let (ok, lint) = output(
        Command::new(helm())
            .args(["lint", "--strict"])
            .arg(chart())
            .args(sets(values)),
    );
    assert!(ok, "helm lint {values:?}:\n{lint}");
    let yaml = render(values).unwrap_or_else(|e| panic!("helm template {values:?}: {e}"));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rendered.yaml");
    std::fs::write(&file, &yaml).unwrap();
    for version in KUBERNETES {
        let (ok, text) = output(
            Command::new(tool("LAZYBLOB_KUBE_VALIDATE", "kubernetes-validate"))
                .args(["--strict", "-k", version])
                .arg(&file),
        );
        assert!(
            ok && !text.contains("ERROR"),
            "{values:?} on Kubernetes {version}:\n{text}"
        );
        assert!(text.contains("passed for resource daemonset/lazyblob"), "{text}");
    }
    let docs = documents(&yaml);
    let toml = kind(&docs, "ConfigMap")["data"]["lazyblob.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let path = tmp.path().join("lazyblob.toml");
    std::fs::write(&path, &toml).unwrap();
    let config = lazyblob::config::Config::load(&path).unwrap_or_else(|e| panic!("{values:?}: {e}\n{toml}"));
    (docs, config)
}

fn pod(docs: &[Value]) -> &Value {
    &kind(docs, "DaemonSet")["spec"]["template"]["spec"]
}

#[test]
fn host_mode_installs_the_node_service_and_configures_containerd() {
    let (docs, config) = installation(&[]);
    let spec = pod(&docs);
    assert_eq!(
        names(&spec["initContainers"]),
        ["install-node-service", "configure-containerd"]
    );
    assert_eq!(names(&spec["containers"]), ["watch"]);
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert!(spec["hostNetwork"].is_null(), "no host network without metrics");
    let configure = &spec["initContainers"][1];
    let args: Vec<&str> = configure["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(&args[..3], ["lazyblob", "containerd-config", "install"]);
    assert!(args
        .windows(2)
        .any(|w| w == ["--containerd-config", "/host/etc/containerd/config.toml"]));
    assert!(args.iter().any(|a| a.contains("systemctl restart containerd")));
    for c in spec["initContainers"].as_array().unwrap() {
        assert_eq!(c["securityContext"]["privileged"], true);
    }
    // the settings containerd gets point where the node service listens
    let settings = lazyblob::node::settings(&config).expect("a snapshotter socket");
    assert_eq!(settings.socket, Path::new("/run/lazyblob/snapshotter.sock"));
    assert!(config.metrics.address.is_none(), "metrics are off by default");
    assert!(config.cri.socket.is_none(), "the CRI proxy is off by default");
    assert_eq!(
        config.registry.containerd_hosts_dir.as_deref(),
        Some(Path::new("/etc/containerd/certs.d"))
    );
    assert!(config.daemon.cache_limit_bytes.is_some());
}

#[test]
fn pod_mode_runs_the_daemon_with_bidirectional_mounts() {
    let (docs, config) = installation(&["daemon.runIn=pod"]);
    let spec = pod(&docs);
    assert_eq!(names(&spec["initContainers"]), ["configure-containerd"]);
    assert_eq!(names(&spec["containers"]), ["daemon"]);
    let daemon = &spec["containers"][0];
    assert_eq!(daemon["securityContext"]["privileged"], true);
    let mounts = daemon["volumeMounts"].as_array().unwrap();
    for dir in ["/var/lib/lazyblob", "/run/lazyblob"] {
        let m = mounts.iter().find(|m| m["mountPath"] == dir).unwrap();
        assert_eq!(m["mountPropagation"], "Bidirectional", "{dir}");
    }
    assert_eq!(config.daemon.state_dir, Path::new("/var/lib/lazyblob"));
    // the node's registry hosts files are visible where the config says
    let hosts = mounts.iter().find(|m| m["name"] == "registry-hosts").unwrap();
    assert_eq!(hosts["mountPath"], "/etc/containerd/certs.d");
    assert_eq!(hosts["readOnly"], true);
}

#[test]
fn metrics_use_the_host_network_and_a_pod_monitor() {
    let (docs, config) = installation(&["metrics.enabled=true", "metrics.podMonitor.enabled=true"]);
    let spec = pod(&docs);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["containers"][0]["ports"][0]["containerPort"], 9464);
    assert_eq!(config.metrics.address.map(|a| a.port()), Some(9464));
    assert_eq!(
        kind(&docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"],
        "metrics"
    );
}

#[test]
fn the_cri_proxy_is_configured_for_pull_secrets() {
    let (_, config) = installation(&["criProxy.enabled=true"]);
    assert_eq!(config.cri.socket.as_deref(), Some(Path::new("/run/lazyblob/cri.sock")));
    assert_eq!(
        config.cri.containerd_socket,
        Path::new("/run/containerd/containerd.sock")
    );
    assert_eq!(
        config.cri.credentials_ttl,
        std::time::Duration::from_secs(7 * 24 * 3600)
    );
}

#[test]
fn uninstall_restores_containerd_and_removes_the_node_service() {
    let (docs, _) = installation(&["node.uninstall=true"]);
    let spec = pod(&docs);
    assert_eq!(
        names(&spec["initContainers"]),
        ["restore-containerd-config", "remove-node-service"]
    );
    assert_eq!(spec["initContainers"][0]["command"][2], "uninstall");
    assert_eq!(spec["initContainers"][1]["command"][1], "uninstall");
    assert_eq!(names(&spec["containers"]), ["uninstalled"]);
    let (docs, _) = installation(&["node.uninstall=true", "daemon.runIn=pod"]);
    assert_eq!(names(&pod(&docs)["initContainers"]), ["restore-containerd-config"]);
}

#[test]
fn image_digest_and_a_changed_config_roll_the_pods() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let (docs, _) = installation(&[&format!("image.digest={digest}"), "containerd.configure=false"]);
    let spec = pod(&docs);
    assert_eq!(names(&spec["initContainers"]), ["install-node-service"]);
    assert_eq!(
        spec["containers"][0]["image"],
        format!("registry.example.com/lazyblob@{digest}")
    );
    let checksum = |docs: &[Value]| {
        kind(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"].clone()
    };
    let (other, config) = installation(&[
        "daemon.cacheLimitBytes=1000",
        "registry.containerdHostsDir=",
        "extraConfig=[[registry.hosts]]\nhost = \"reg.example\"\nca_file = \"/etc/ssl/reg.pem\"\n",
    ]);
    assert!(config.registry.containerd_hosts_dir.is_none());
    assert_eq!(config.registry.hosts[0].host, "reg.example");
    assert_ne!(checksum(&docs), checksum(&other));
}

#[test]
fn bad_values_are_refused() {
    for bad in [
        "daemon.runIn=vm",
        "daemon.frontend=fuse",
        "image.digest=latest",
        "daemon.cacheLimitBytes=-1",
        "containerd.configPath=etc/containerd/config.toml",
    ] {
        assert!(render(&[bad]).is_err(), "{bad} was accepted");
    }
}

#[test]
fn the_plain_manifests_are_the_charts_rendering() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lazyblob.yaml");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/render.sh");
    let (ok, text) = output(Command::new("sh").arg(script).arg(&out).env("HELM", helm()));
    assert!(ok, "{text}");
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/lazyblob.yaml");
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&committed).unwrap(),
        "deploy/kubernetes/lazyblob.yaml is stale: run deploy/kubernetes/render.sh"
    );
    let docs = documents(&std::fs::read_to_string(&committed).unwrap());
    assert_eq!(docs[0]["kind"], "Namespace");
}
