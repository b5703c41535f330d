//! `lazyblob containerd-config`, the DaemonSet's init step, against real containerd config
//! files and real containerds: Debian containerd 1.6's and 1.7's own `containerd config default`, a
//! version-3 file as containerd's CRI docs show one (run by containerd 2.x), the shipped
//! snippets (already configured), and a version-2 file whose `imports` override the CRI
//! plugin's table. For each: the install changes the files and runs the restart command once; the
//! containerd then starts with the result, lists the `lazyblob` proxy snapshotter (`ctr
//! plugins ls`), reaches the running lazyblob through it (`ctr snapshots ls`), and its merged
//! config (`containerd config dump`) uses lazyblob for CRI; a second install leaves every file
//! byte-identical and restarts nothing; the uninstall restores the original bytes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::containerd::{wait_for_socket, Containerd, Release};
use common::daemon::{binary, DaemonProc};
use common::procs::run_ok;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/containerd")
        .join(name)
}

/// `lazyblob containerd-config <action>`, with a restart command that counts its runs in
/// `restarts`; its stdout.
fn run(action: &str, lazyblob_config: &Path, config: &Path, restarts: &Path) -> String {
    let out = run_ok(
        Command::new(binary())
            .args(["containerd-config", action, "--config"])
            .arg(lazyblob_config)
            .arg("--containerd-config")
            .arg(config)
            .arg("--on-change")
            .arg(format!("echo restart >> {}", restarts.display())),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a run's output says it wrote a file.
fn wrote(out: &str) -> bool {
    out.lines().any(|l| l.starts_with("changed "))
}

fn restarts(file: &Path) -> usize {
    std::fs::read_to_string(file).map(|s| s.lines().count()).unwrap_or(0)
}

/// Every file of the case (name, bytes), to compare runs byte for byte.
fn snapshot(files: &[PathBuf]) -> Vec<(PathBuf, Vec<u8>)> {
    files.iter().map(|f| (f.clone(), std::fs::read(f).unwrap())).collect()
}

/// The CRI snapshotter in a `containerd config dump`.
fn cri_snapshotter(dump: &str, release: &Release) -> String {
    let doc: toml::Table = dump.parse().unwrap();
    let path: &[&str] = if release.reads_config_v3() {
        &["plugins", "io.containerd.cri.v1.images", "snapshotter"]
    } else {
        &["plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"]
    };
    let (last, tables) = path.split_last().unwrap();
    let mut t = &doc;
    for p in tables {
        t = t
            .get(*p)
            .and_then(|v| v.as_table())
            .unwrap_or_else(|| panic!("no {p} in\n{dump}"));
    }
    t.get(*last).and_then(|v| v.as_str()).unwrap_or_default().to_string()
}

/// One case: the files `texts` (name relative to a fresh directory, contents; the first is
/// the main file) configured, used, re-run and restored. `@DIR@` in them names that
/// directory, and the shipped socket and root paths are this test's. `configured`: the files
/// already hold lazyblob's settings. Returns what the first install printed.
fn case(name: &str, release: Release, texts: &[(&str, String)], configured: bool) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let snapshotter = tmp.path().join("snapshotter.sock");
    let root = tmp.path().join("snapshotter-root");
    let d = DaemonProc::start(
        &tmp.path().join("lazyblob"),
        &[],
        &format!(
            "frontend = \"fanotify\"\n[snapshotter]\nsocket = \"{}\"\nroot = \"{}\"",
            snapshotter.display(),
            root.display()
        ),
    );
    wait_for_socket(&snapshotter, &d);
    let files: Vec<PathBuf> = texts
        .iter()
        .map(|(file, text)| {
            let text = text
                .replace("@DIR@", &tmp.path().display().to_string())
                .replace("/run/lazyblob/snapshotter.sock", &snapshotter.display().to_string())
                .replace("/var/lib/lazyblob/snapshotter", &root.display().to_string());
            let path = tmp.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect();
    let main = &files[0];
    let original = snapshot(&files);
    let counter = tmp.path().join("restarts");

    let first = run("install", &d.config, main, &counter);
    assert_eq!(restarts(&counter), usize::from(!configured), "{name}: {first}");
    assert_eq!(wrote(&first), !configured, "{name}: {first}");
    let installed = snapshot(&files);

    let dump = release.config_dump(main);
    assert_eq!(
        cri_snapshotter(&dump, &release),
        "lazyblob",
        "{name}: merged config\n{dump}"
    );
    let c = Containerd::start_with_config(release, &tmp.path().join("containerd"), main);
    let plugins = c.ctr_ok(&["plugins", "ls"]);
    let listed = |l: &str| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.first() == Some(&"io.containerd.snapshotter.v1")
            && cols.get(1) == Some(&"lazyblob")
            && cols.last() == Some(&"ok")
    };
    assert!(
        plugins.lines().any(listed),
        "{name}: no lazyblob snapshotter in\n{plugins}"
    );
    // containerd reaches the daemon through the socket the install wrote
    c.ctr_ok(&["snapshots", "--snapshotter", "lazyblob", "ls"]);
    drop(c);

    let second = run("install", &d.config, main, &counter);
    assert_eq!(snapshot(&files), installed, "{name}: a second install changed a file");
    assert_eq!(restarts(&counter), usize::from(!configured), "{name}: {second}");
    assert!(!wrote(&second), "{name}: {second}");

    let removed = run("uninstall", &d.config, main, &counter);
    assert_eq!(
        snapshot(&files),
        original,
        "{name}: the uninstall did not restore\n{removed}"
    );
    for f in &files {
        assert!(!Path::new(&format!("{}.lazyblob-backup", f.display())).exists());
    }
    assert_eq!(restarts(&counter), 2 * usize::from(!configured), "{name}: {removed}");
    first
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn containerd_1_6_default_config() {
    common::require_root();
    common::require_tool("containerd", "containerd");
    let text = Release::Installed.config_default();
    case("1.6 default", Release::Installed, &[("config.toml", text)], false);
}

#[test]
fn containerd_1_7_default_config() {
    common::require_root();
    let release = Release::v1_7();
    let text = release.config_default();
    case("1.7 default", release, &[("config.toml", text)], false);
}

#[test]
fn containerd_2_config_from_the_docs() {
    common::require_root();
    let text = read(&data("v3-docs.toml"));
    case("v3 docs", Release::v2(), &[("config.toml", text)], false);
}

#[test]
fn already_configured_files_are_left_alone() {
    common::require_root();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/containerd");
    for (file, release) in [
        ("config-v2.toml", Release::Installed),
        ("config-v3.toml", Release::v2()),
    ] {
        case(file, release, &[("config.toml", read(&deploy.join(file)))], true);
    }
}

#[test]
fn imports_that_override_the_cri_table_are_edited_too() {
    common::require_root();
    let names = [
        "v2-imports.toml",
        "conf.d/10-snapshotter.toml",
        "conf.d/20-registry.toml",
        "conf.d/30-opt.toml",
    ];
    let texts: Vec<(&str, String)> = names.iter().map(|n| (*n, read(&data(n)))).collect();
    let texts: Vec<(&str, String)> = texts
        .into_iter()
        .enumerate()
        .map(|(i, (n, t))| (if i == 0 { "config.toml" } else { n }, t))
        .collect();
    let first = case("v2 with imports", Release::Installed, &texts, false);
    let outcome = |file: &str| {
        let line = first.lines().find(|l| l.ends_with(file));
        line.and_then(|l| l.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(outcome("/config.toml"), "changed", "{first}");
    assert_eq!(outcome("/10-snapshotter.toml"), "changed", "{first}");
    // containerd 1.6 takes the CRI plugin's table whole from the last file that has one
    assert_eq!(outcome("/20-registry.toml"), "changed", "{first}");
    assert_eq!(outcome("/30-opt.toml"), "unchanged", "{first}");
}
