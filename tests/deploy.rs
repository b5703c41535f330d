//! `deploy/kubernetes/install-host-service.sh`, the DaemonSet's installer of the node
//! service, run against a scratch root: the first run installs binary, config (root-only)
//! and unit and restarts the service; a second run with the same inputs leaves every file
//! byte-identical and only makes sure the service runs; a changed config restarts it. (No
//! systemd runs in CI: `systemctl` is replaced by a recorder of its arguments; the unit file
//! itself is checked with `systemd-analyze verify` when that is installed.) The uninstall
//! stops and disables the service and removes what the install wrote.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn run(root: &Path, bin: &Path, config: &Path, calls: &Path) -> String {
    run_action("install", root, bin, config, calls)
}

fn run_action(action: &str, root: &Path, bin: &Path, config: &Path, calls: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/install-host-service.sh");
    let recorder = calls.with_extension("sh");
    std::fs::write(&recorder, format!("#!/bin/sh\necho \"$@\" >>{}\n", calls.display())).unwrap();
    std::fs::set_permissions(&recorder, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("sh")
        .arg(&script)
        .arg(action)
        .env("HOST_ROOT", root)
        .env("LAZYBLOB_BIN", bin)
        .env("LAZYBLOB_CONFIG", config)
        .env("SYSTEMCTL", &recorder)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn snapshot(root: &Path) -> Vec<(String, Vec<u8>, u32)> {
    [
        "opt/lazyblob/bin/lazyblob",
        "etc/lazyblob/lazyblob.toml",
        "etc/systemd/system/lazyblob.service",
    ]
    .iter()
    .map(|p| {
        let f = root.join(p);
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        (p.to_string(), std::fs::read(&f).unwrap(), mode)
    })
    .collect()
}

#[test]
fn the_node_installer_is_idempotent_and_restarts_only_on_change() {
    let work = tempfile::tempdir().unwrap();
    let (root, calls) = (work.path().join("host"), work.path().join("calls"));
    let (bin, config) = (work.path().join("lazyblob"), work.path().join("lazyblob.toml"));
    std::fs::write(&bin, b"#!/bin/sh\necho lazyblob\n").unwrap();
    std::fs::write(&config, b"[daemon]\nrestart_hold_ms = 30000\n").unwrap();

    let out = run(&root, &bin, &config, &calls);
    assert!(out.contains("(re)started"), "{out}");
    let first = snapshot(&root);
    assert_eq!(first[0].2, 0o755, "the binary");
    assert_eq!(first[1].2, 0o600, "the config is root-only");
    let unit = String::from_utf8(first[2].1.clone()).unwrap();
    assert!(unit.contains("KillMode=process"), "{unit}");
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "daemon-reload\nenable lazyblob.service\nrestart lazyblob.service\n"
    );

    let out = run(&root, &bin, &config, &calls);
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(snapshot(&root), first, "a second run changes no byte");
    assert!(std::fs::read_to_string(&calls)
        .unwrap()
        .ends_with("restart lazyblob.service\nstart lazyblob.service\n"));

    std::fs::write(&config, b"[daemon]\nrestart_hold_ms = 60000\n").unwrap();
    let out = run(&root, &bin, &config, &calls);
    assert!(out.contains("updated") && out.contains("(re)started"), "{out}");
    assert!(std::fs::read_to_string(&calls)
        .unwrap()
        .ends_with("restart lazyblob.service\n"));

    let unit = root.join("etc/systemd/system/lazyblob.service");
    if Command::new("systemd-analyze").arg("--version").output().is_ok() {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // the binary path is the node's, absent here; anything else is a unit error
        assert!(
            err.lines()
                .all(|l| l.contains("/opt/lazyblob/bin/lazyblob") || l.trim().is_empty()),
            "{err}"
        );
    }

    // uninstall: the service stopped and disabled, what the install wrote removed
    let calls_before = std::fs::read_to_string(&calls).unwrap();
    let out = run_action("uninstall", &root, &bin, &config, &calls);
    assert!(out.contains("removed"), "{out}");
    let new_calls = std::fs::read_to_string(&calls).unwrap()[calls_before.len()..].to_string();
    assert_eq!(new_calls, "disable --now lazyblob.service\ndaemon-reload\n");
    for p in [
        "opt/lazyblob/bin/lazyblob",
        "etc/lazyblob/lazyblob.toml",
        "etc/systemd/system/lazyblob.service",
    ] {
        assert!(!root.join(p).exists(), "{p} left behind");
    }
    let out = run_action("uninstall", &root, &bin, &config, &calls);
    assert!(out.contains("not installed"), "{out}");
}
