//! What the benchmark scenarios share: scales, the context and report, timing and process
//! statistics, cache dropping, registries and daemons, image helpers.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lazyblob::registry::Registry;
use rand::{Rng, SeedableRng};

use crate::common;
use crate::common::daemon::DaemonProc;
use crate::common::oci::{compress, Compression, Layer};

/// What every scenario gets: the scale, a work directory, docker-registry and a client.
pub struct Bench<'a> {
    pub scale: Scale,
    pub work: &'a Path,
    pub registry: &'a common::DockerRegistry,
    pub host: String,
    pub reg: Registry,
}

/// The table rows (benchmark, lazyblob, baseline, ratio) and the JSON of every scenario.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<(String, String, String, String)>,
    pub json: serde_json::Map<String, serde_json::Value>,
}

/// The one-large-file image of the sequential and random scenarios.
pub struct SeqImages {
    pub data: Vec<u8>,
    /// Converted with 1 MiB chunks.
    pub lazy: String,
    /// Converted with 64 KiB chunks.
    pub lazy_64k: String,
    /// Digest of the (one) data blob of `lazy`.
    pub blob: String,
}

pub struct Scale {
    pub small_files: usize,
    pub large_mib: Vec<usize>,
    pub layers: usize,
    pub seq_mib: usize,
    pub random_reads: usize,
    pub images: usize,
    pub concurrent: usize,
    pub vm_mib: usize,
    /// Size divisor of the large conversion (1: a 4 GiB image with a 2 GiB file).
    pub convert_div: u64,
}

pub fn scale(quick: bool) -> Scale {
    if quick {
        Scale {
            small_files: 2000,
            large_mib: vec![48, 32],
            layers: 3,
            seq_mib: 128,
            random_reads: 50,
            images: 20,
            concurrent: 200,
            vm_mib: 64,
            convert_div: 8,
        }
    } else {
        Scale {
            small_files: 12_000,
            large_mib: vec![300, 200, 120],
            layers: 4,
            seq_mib: 1024,
            random_reads: 200,
            images: 100,
            concurrent: 1000,
            vm_mib: 256,
            convert_div: 1,
        }
    }
}

/// Repetitions of the throughput measurements (medians are reported: this machine is shared).
pub const REPS: usize = 3;

pub fn rng_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill_bytes(&mut v);
    v
}

pub fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// `sh -c cmd`, which must succeed.
pub fn sh_ok(cmd: &str) -> std::process::Output {
    crate::common::procs::run_ok(Command::new("sh").arg("-c").arg(cmd))
}

/// Flush dirty pages (so earlier writes do not compete with the next measurement) and drop
/// the page cache.
pub fn drop_caches() {
    nix::unistd::sync();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

pub fn registry(hosts: &[&str]) -> Registry {
    common::client(&common::insecure_config(hosts))
}

/// A gzip tar layer of regular files (mode 0644, owner 0:0), with its media type.
pub fn gzip_layer(entries: &[(String, Vec<u8>)]) -> (Vec<u8>, &'static str) {
    let mut l = Layer::new();
    for (p, d) in entries {
        l.file(p, 0o644, d);
    }
    compress(&l.tar(), Compression::Gzip)
}

/// CPU seconds of this process's finished children (curl, dd) so far.
pub fn self_cpu() -> f64 {
    let r = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    tv(r.user_time()) + tv(r.system_time())
}

/// Peak RSS (KiB) and CPU seconds of a process so far.
pub fn usage(pid: i32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let field = |i: usize| crate::common::procs::stat_field(pid, i).unwrap_or(0) as f64;
    (hwm, (field(11) + field(12)) / 100.0)
}

/// The RSS of process `pid` now, anonymous and file-backed, in MiB.
pub fn rss_split(pid: i32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> f64 {
        let v = status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1));
        v.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
    };
    (kib("RssAnon:"), kib("RssFile:"))
}

/// p50 latency of 4 KiB reads of `file` at `offsets` after dropping each page from the
/// mount's page cache (the daemon's cache file keeps it), and of the same reads of `local`,
/// with `idle` before each read; (mount, local) in microseconds.
pub fn cache_file_hits(file: &Path, offsets: &[u64], want: &[u8], local: &Path, idle: Option<Duration>) -> (f64, f64) {
    let local_len = std::fs::metadata(local).unwrap().len();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for off in offsets {
        let f = std::fs::File::open(file).unwrap();
        nix::fcntl::posix_fadvise(
            &f,
            *off as i64,
            4096,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        drop(f);
        for (path, at, out) in [(file, *off, &mut ours), (local, *off % local_len, &mut theirs)] {
            if let Some(d) = idle {
                std::thread::sleep(d);
            }
            let t = Instant::now();
            let got = read_range(path, at, 4096);
            out.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(got.len(), 4096);
        }
        assert!(read_range(file, *off, 4096)[..] == want[*off as usize..*off as usize + 4096]);
    }
    (percentile(&mut ours, 0.5), percentile(&mut theirs, 0.5))
}

/// Copy an image from the bench registry to registry-mock (same repository and tag);
/// returns its reference there.
pub async fn copy_image(reg: &Registry, reference: &str, mock: &registry_mock::MockRegistry) -> String {
    let r = lazyblob::registry::parse_reference(reference).unwrap();
    let (raw, _) = reg.fetch_manifest_raw(&r).await.unwrap();
    let m: oci_client::manifest::OciImageManifest = serde_json::from_slice(&raw).unwrap();
    for d in std::iter::once(&m.config).chain(&m.layers) {
        let src = lazyblob::registry::BlobSource {
            repo: r.clone(),
            digest: d.digest.parse().unwrap(),
            size: d.size as u64,
        };
        mock.store().put_blob(reg.fetch_blob(&src).await.unwrap());
    }
    let mt = m
        .media_type
        .clone()
        .unwrap_or_else(|| oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.into());
    mock.store().put_manifest(r.repository(), r.tag(), &mt, raw);
    format!("{}/{}:{}", mock.host(), r.repository(), r.tag().unwrap_or("latest"))
}

/// The daemon (the release binary), fanotify frontend, with `extra` config lines, and the
/// `[engine]` lines of `LAZYBLOB_BENCH_ENGINE` (e.g. "max_reads_in_flight = 1024", to compare
/// a setting across runs).
pub fn daemon(dir: &Path, hosts: &[&str], extra: &str) -> DaemonProc {
    let engine = std::env::var("LAZYBLOB_BENCH_ENGINE").unwrap_or_default();
    let extra = match extra.split_once("[engine]\n") {
        Some((before, after)) => format!("{before}[engine]\n{engine}\n{after}"),
        None if engine.is_empty() => extra.to_string(),
        None => format!("{extra}\n[engine]\n{engine}"),
    };
    DaemonProc::start(dir, hosts, &format!("frontend = \"fanotify\"\n{extra}"))
}

/// `LAZYBLOB_BENCH_PROFILE="perf record -a -g -o /tmp/p.data"`: a profiler around the
/// sequential read and the scale test's burst, stopped with SIGINT.
pub fn profile_start() -> Option<std::process::Child> {
    let cmd = std::env::var("LAZYBLOB_BENCH_PROFILE").ok()?;
    let child = Command::new("sh").arg("-c").arg(format!("exec {cmd}")).spawn().ok()?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    Some(child)
}

pub fn profile_stop(child: Option<std::process::Child>) {
    if let Some(mut c) = child {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = c.wait();
    }
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub fn read_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}
