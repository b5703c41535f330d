//! Helpers shared by the integration tests: preconditions that fail loudly, deterministic
//! test trees, building and pushing images, and running the VM rig.
#![allow(dead_code)]

pub mod containerd;
pub mod containerd_config;
pub mod daemon;
pub mod guest;
pub mod helm;
pub mod oci;
pub mod procs;
pub mod tls;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Fail (never skip) when a precondition is missing: CI must see it.
pub fn require(cond: bool, what: &str) {
    assert!(
        cond,
        "PRECONDITION MISSING: {what}. This test cannot run here; install it (see README 'Tests')."
    );
}

pub fn require_root() {
    require(
        nix::unistd::geteuid().is_root(),
        "root privileges (mount, /dev/cachefiles, fanotify)",
    );
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
    require(
        dir.join("run-vm.sh").is_file() && dir.join("bzImage").is_file(),
        "the VM rig at ../shared/vm",
    );
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("cpio", "cpio");
    require(
        Path::new("/bin/busybox").is_file() || Path::new("/usr/bin/busybox").is_file(),
        "static busybox (busybox-static)",
    );
    dir
}

/// `count` once it has stayed the same for 300 ms (a registry counter after the fetches a
/// read started, read-ahead included, have landed).
pub async fn settled(count: impl Fn() -> u64) -> u64 {
    let mut before = count();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count();
        if now == before {
            return now;
        }
        before = now;
    }
}

/// `len` bytes at `off` of the file at `path`.
pub fn read_at(path: &std::path::Path, off: usize, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off as u64)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
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
    files
        .iter()
        .map(|(p, d)| format!("{}  ./{}\n", sha256_hex(d), p))
        .collect()
}

/// A mixed tree: many small files, some medium, a few multi-MiB ones, nested dirs.
pub fn mixed_files(seed: u64, small: usize, large_mib: &[usize]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..small {
        let len = 100 + (i * 7919) % 30_000;
        files.insert(
            format!("d{}/sub{}/f{i}.dat", i % 7, i % 3),
            bytes(seed * 1000 + i as u64, len),
        );
    }
    for (k, mib) in large_mib.iter().enumerate() {
        files.insert(format!("big/large{k}.bin"), bytes(seed * 7 + k as u64 + 99, mib << 20));
    }
    files
}

/// The two directories of a VM run: `share` (9p at /host in the guest) holding the lazyblob
/// binary, and `payload` (copied to the guest's root).
#[allow(dead_code)]
pub fn vm_dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    let share = tempfile::tempdir().unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_lazyblob"), share.path().join("lazyblob")).unwrap();
    (share, tempfile::tempdir().unwrap())
}

/// The daemon's config in the guest (`/cfg.toml`): state in `/var/lib/lazyblob`, the
/// cachefiles cache on the rig's ext4 disk, the host's registry at `10.0.2.2:port`, and
/// `extra` sections (`[registry]` settings go in `registry`).
pub fn guest_config(port: u16, extra: &str, registry: &str) -> String {
    format!(
        r#"[daemon]
state_dir = "/var/lib/lazyblob"
cache_dir = "/var/cache/lazyblob"
socket = "/run/lazyblob.sock"
frontend = "cachefiles"
{extra}
[registry]
{registry}
[[registry.hosts]]
host = "10.0.2.2:{port}"
insecure = true
"#
    )
}

/// What a VM test starts with: root and the rig checked, registry-mock on the host's
/// loopback (`10.0.2.2:port` from the guest) and a client of it.
pub struct VmRegistry {
    pub mock: registry_mock::MockRegistry,
    pub host: String,
    pub port: u16,
    pub reg: lazyblob::registry::Registry,
}

impl VmRegistry {
    pub async fn start() -> VmRegistry {
        require_root();
        vm_rig();
        let mock = registry_mock::MockRegistry::start(Default::default()).await.unwrap();
        let host = mock.host();
        let port = mock.addr().port();
        let reg = client(&insecure_config(&[&host]));
        VmRegistry { mock, host, port, reg }
    }
}

/// The guest's `/run-test`.
#[allow(dead_code)]
pub fn write_guest_script(payload: &Path, script: &str) {
    let p = payload.join("run-test");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Run the VM rig on `payload` (and `share` at /host), returning (exit code, console).
/// TCG emulation: nested KVM is not available on the machines this runs on.
pub async fn run_vm(payload: &Path, share: &Path, libs_for: &[&Path], timeout_s: u64) -> (i32, String) {
    let rig = vm_rig();
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(rig.join("run-vm.sh"))
        .args(["-n", "-t", &timeout_s.to_string(), "-m", "1G", "-d", "768"])
        .arg("-s")
        .arg(share);
    for b in libs_for {
        cmd.arg("-L").arg(b);
    }
    let out = cmd.arg(payload).kill_on_drop(true).output();
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

/// registry-mock's auth asking for bearer tokens that live 5 minutes, from its token endpoint
/// with `credentials` (anonymous tokens without).
pub fn token_auth(credentials: Option<(&str, &str)>) -> registry_mock::AuthMode {
    registry_mock::AuthMode::Token {
        credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
        ttl: Duration::from_secs(300),
    }
}

/// registry-mock with [`token_auth`].
pub async fn token_registry(credentials: Option<(&str, &str)>) -> registry_mock::MockRegistry {
    registry_mock::MockRegistry::start(registry_mock::MockConfig {
        auth: token_auth(credentials),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// [`insecure_config`] for `host` with basic credentials.
pub fn with_creds(host: &str, user: &str, pass: &str) -> lazyblob::config::RegistryConfig {
    let mut cfg = insecure_config(&[host]);
    cfg.hosts[0].username = Some(user.into());
    cfg.hosts[0].password = Some(pass.into());
    cfg
}

/// Blob `digest` of `size` bytes in repository `lib/app` of `host`.
pub fn blob_at(host: &str, digest: &str, size: usize) -> lazyblob::registry::BlobSource {
    lazyblob::registry::BlobSource {
        repo: lazyblob::registry::parse_reference(&format!("{host}/lib/app:1")).unwrap(),
        digest: digest.parse().unwrap(),
        size: size as u64,
    }
}

/// A registry config trusting `hosts` over plain HTTP (loopback test registries).
pub fn insecure_config(hosts: &[&str]) -> lazyblob::config::RegistryConfig {
    lazyblob::config::RegistryConfig {
        hosts: hosts
            .iter()
            .map(|h| lazyblob::config::HostConfig {
                host: h.to_string(),
                insecure: true,
                ..Default::default()
            })
            .collect(),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        request_timeout: Duration::from_secs(2),
        deadline: Duration::from_secs(5),
        ..Default::default()
    }
}

/// A registry client with explicit credentials (no docker config lookup).
pub fn client(cfg: &lazyblob::config::RegistryConfig) -> lazyblob::registry::Registry {
    let creds = lazyblob::registry::credentials::Credentials::new(&cfg.hosts, Some(&empty_docker_config())).unwrap();
    lazyblob::registry::Registry::with_credentials(cfg, 16, creds).unwrap()
}

fn empty_docker_config() -> PathBuf {
    // in cargo's directory for test files (under target/, not /tmp: nothing left behind), written
    // whole under a unique name, then renamed: tests running at once never read it half written
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let p = dir.join("empty-docker-config.json");
    let tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
    std::fs::write(tmp.path(), "{}").unwrap();
    tmp.persist(&p).unwrap();
    p
}

/// Build an image from `files` spread over `blobs` data blobs.
pub fn build_files(files: &BTreeMap<String, Vec<u8>>, blobs: usize) -> lazyblob::image::build::BuiltImage {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    lazyblob::image::build::from_dir(
        dir.path(),
        &lazyblob::image::build::BuildOptions {
            blobs,
            inline_max: 512,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Push `img` as `host/name` and return the manifest digest.
pub async fn push_image(
    reg: &lazyblob::registry::Registry,
    host: &str,
    name: &str,
    img: &lazyblob::image::build::BuiltImage,
) -> String {
    let r = lazyblob::registry::parse_reference(&format!("{host}/{name}")).unwrap();
    lazyblob::image::build::push(reg, &r, img, None).await.unwrap()
}

/// Debian's `docker-registry` (CNCF distribution) on a free loopback port, optionally with
/// htpasswd basic auth; killed and cleaned up on drop.
pub struct DockerRegistry {
    pub host: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl DockerRegistry {
    /// Process id of the registry (benchmarks read its CPU time).
    #[allow(dead_code)]
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn start(basic: Option<(&str, &str)>) -> DockerRegistry {
        DockerRegistry::start_with(basic, None)
    }

    /// Like [`start`](Self::start), serving HTTPS with `tls` (certificate and key, PEM).
    pub fn start_with(basic: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> DockerRegistry {
        require_tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut auth = String::new();
        if let Some((u, p)) = basic {
            require_tool("htpasswd", "apache2-utils");
            let out = procs::run_ok(std::process::Command::new("htpasswd").args(["-Bbn", u, p]));
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: lazyblob-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        let tls = tls.map_or(String::new(), |(cert, key)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            )
        });
        let cfg = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{auth}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let host = format!("127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(&host).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        DockerRegistry { host, child, _dir: dir }
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A busybox shell script that lists a tree (path, type, mode, owner, size, sha256, link
/// target, device numbers) the same way on the host and in the guest.
pub const LIST_TREE_SH: &str = r#"cd "$1" && find . -mindepth 1 | sort | while IFS= read -r p; do
  t=$(stat -c %F "$p")
  line="$p|$t|$(stat -c '%a|%u|%g' "$p")"
  case "$t" in
    "regular file"|"regular empty file") line="$line|$(stat -c %s "$p")|$(sha256sum "$p" | cut -d' ' -f1)";;
    "symbolic link") line="$line|$(readlink "$p")";;
    "character special file"|"block special file") line="$line|$(stat -c '%t,%T' "$p")";;
  esac
  echo "$line"
done
"#;

/// Run [`LIST_TREE_SH`] on `dir` with the host's busybox.
pub fn list_tree(dir: &Path) -> String {
    let bb = if Path::new("/bin/busybox").exists() {
        "/bin/busybox"
    } else {
        "/usr/bin/busybox"
    };
    let out = procs::run_ok(
        std::process::Command::new(bb)
            .args(["sh", "-c", LIST_TREE_SH, "list"])
            .arg(dir),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The static busybox of Debian's `busybox-static`, for images that run a shell.
pub fn busybox() -> Vec<u8> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| std::fs::read(p).unwrap())
        .expect("busybox-static")
}

/// Peak RSS (MiB) from the summary line `lazyblob convert` prints on stderr.
pub fn convert_peak_rss(stderr: &str) -> f64 {
    stderr
        .split("peak RSS ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {stderr:?}"))
}

/// Drop the page cache (and dentries, inodes): the next reads go to the filesystems.
pub fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// `len` bytes repeating `period` from offset `skew` (large, incompressible-looking files that
/// compress well with a long-window compressor, built without holding them in memory).
pub struct Pattern<'a> {
    period: &'a [u8],
    at: usize,
    left: u64,
}

impl<'a> Pattern<'a> {
    pub fn new(period: &'a [u8], skew: usize, len: u64) -> Pattern<'a> {
        Pattern {
            period,
            at: skew % period.len(),
            left: len,
        }
    }
}

impl std::io::Read for Pattern<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.period.len() - self.at).min(self.left as usize);
        buf[..n].copy_from_slice(&self.period[self.at..self.at + n]);
        self.at = (self.at + n) % self.period.len();
        self.left -= n as u64;
        Ok(n)
    }
}
