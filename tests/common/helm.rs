//! Helm for the tests: the chart rendered by the real `helm` (npm package, installed by
//! `scripts/test.sh`), its YAML read as JSON with PyYAML from kubernetes-validate's venv.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub fn tool(var: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from);
    super::require(
        path.as_ref().is_some_and(|p| p.is_file()),
        &format!("{what} (${var}; scripts/test.sh installs it)"),
    );
    path.unwrap()
}

pub fn helm() -> PathBuf {
    tool("LAZYBLOB_HELM", "helm")
}

pub fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/lazyblob")
}

pub fn sets(values: &[&str]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| ["--set".to_string(), v.to_string()])
        .collect()
}

/// `helm template` of the chart with `values`: the YAML, or helm's error.
pub fn render(values: &[&str]) -> Result<String, String> {
    let out = Command::new(helm())
        .args(["template", "lazyblob"])
        .arg(chart())
        .args(["--namespace", "lazyblob"])
        .args(sets(values))
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8(out.stdout).unwrap()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// The documents of a YAML stream as JSON (PyYAML from kubernetes-validate's venv).
pub fn documents(yaml: &str) -> Vec<Value> {
    let python = tool("LAZYBLOB_KUBE_VALIDATE", "kubernetes-validate").with_file_name("python");
    let out = super::procs::run_ok_fed(
        Command::new(python).args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ]),
        yaml.as_bytes(),
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}
