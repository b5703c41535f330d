//! Helpers shared by the integration tests: preconditions that fail loudly, deterministic
//! test trees, building and pushing images, and running the VM rig.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Fail (never skip) when a precondition is missing: CI must see it.
pub fn require(cond: bool, what: &str) {
    assert!(cond, "PRECONDITION MISSING: {what}. This test cannot run here; install it (see README 'Tests').");
}

pub fn require_root() {
    require(nix::unistd::geteuid().is_root(), "root privileges (mount, /dev/cachefiles, fanotify)");
}

pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
        || Path::new("/sbin").join(tool).is_file();
    require(found, &format!("{tool} (Debian package {package})"));
}

/// The VM rig shipped beside the project (`../shared/vm`), or `$LAZYBLOB_VM_RIG`.
pub fn vm_rig() -> PathBuf {
    let dir = std::env::var_os("LAZYBLOB_VM_RIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vm"));
    require(dir.join("run-vm.sh").is_file() && dir.join("bzImage").is_file(), "the VM rig at ../shared/vm");
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("cpio", "cpio");
    require(Path::new("/bin/busybox").is_file() || Path::new("/usr/bin/busybox").is_file(), "static busybox (busybox-static)");
    dir
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Write a tree of `files` (relative path -> contents) under `root`.
pub fn write_tree(root: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (p, data) in files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
    }
}

/// `sha256sum -c` input for `files`.
pub fn sha256sum_list(files: &BTreeMap<String, Vec<u8>>) -> String {
    files.iter().map(|(p, d)| format!("{}  ./{}\n", sha256_hex(d), p)).collect()
}

/// A mixed tree: many small files, some medium, a few multi-MiB ones, nested dirs.
pub fn mixed_files(seed: u64, small: usize, large_mib: &[usize]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..small {
        let len = 100 + (i * 7919) % 30_000;
        files.insert(format!("d{}/sub{}/f{i}.dat", i % 7, i % 3), bytes(seed * 1000 + i as u64, len));
    }
    for (k, mib) in large_mib.iter().enumerate() {
        files.insert(format!("big/large{k}.bin"), bytes(seed * 7 + k as u64 + 99, mib << 20));
    }
    files
}

/// Run the VM rig on `payload` (and `share` at /host), returning (exit code, console).
pub async fn run_vm(payload: &Path, share: &Path, libs_for: &Path, timeout_s: u64) -> (i32, String) {
    let rig = vm_rig();
    let out = tokio::process::Command::new("bash")
        .arg(rig.join("run-vm.sh"))
        .args(["-n", "-t", &timeout_s.to_string(), "-m", "1G", "-d", "512"])
        .arg("-s")
        .arg(share)
        .arg("-L")
        .arg(libs_for)
        .arg(payload)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(timeout_s + 60), out)
        .await
        .expect("VM run did not end")
        .expect("run-vm.sh could not start");
    let console = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), console)
}

/// Lines `CHECK <name> ok|FAIL ...` printed by guest scripts.
pub fn checks(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CHECK "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect()
}

/// Assert every named check ran and passed; print the console otherwise.
pub fn assert_checks(console: &str, names: &[&str]) {
    let got = checks(console);
    let mut bad = Vec::new();
    for n in names {
        match got.get(*n) {
            Some(r) if r == "ok" => {}
            Some(r) => bad.push(format!("{n}: {r}")),
            None => bad.push(format!("{n}: did not run")),
        }
    }
    if !bad.is_empty() {
        panic!("guest checks failed: {bad:#?}\n---- console ----\n{console}");
    }
}
