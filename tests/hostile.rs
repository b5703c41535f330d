//! A hostile registry against the real daemon on this machine's kernel (fanotify frontend):
//! images rewritten by registry-mock's hostile mode to name paths as digests, to claim
//! another image's blob, to announce absurd sizes; a cache left half written by a crash; and
//! the modes of what the daemon writes, read as an unprivileged user. Each scenario checks
//! the outcome: the registration refused with a clear error and nothing written outside the
//! daemon's directories, the victim image reading its own bytes, no zeros, RSS flat.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use common::daemon::DaemonProc;
use common::*;
use lazyblob::image::format::{MEDIA_TYPE_CHUNKS, MEDIA_TYPE_DATA, MEDIA_TYPE_META};
use registry_mock::{HostileImage, MockConfig, MockRegistry};

/// A registry-mock with `files` built into a one-blob image pushed as `repo:v1`, with table
/// chunks of `chunk` bytes.
async fn image_in(mock: &MockRegistry, repo: &str, files: &BTreeMap<String, Vec<u8>>, chunk: u64) -> String {
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    let img = lazyblob::image::build::from_dir(
        dir.path(),
        &lazyblob::image::build::BuildOptions {
            chunk_size: chunk,
            inline_max: 512,
            blobs: 1,
        },
    )
    .unwrap();
    push_image(&reg, &host, &format!("{repo}:v1"), &img).await;
    format!("{host}/{repo}:v1")
}

/// A work directory every user may traverse, so that only the modes lazyblob gives its own
/// directories decide who reads what (tempfile makes its directories 0700).
fn open_workdir() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    work
}

/// The real daemon in `work/d`, a directory every user may traverse (see [`open_workdir`]).
fn traversable_daemon(work: &Path, hosts: &[&str]) -> DaemonProc {
    let dir = work.join("d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    DaemonProc::start(&dir, hosts, "frontend = \"fanotify\"")
}

/// Run `program args...` as user and group `uid`, without supplementary groups.
fn run_as(uid: u32, program: impl AsRef<std::ffi::OsStr>, args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ])
        .arg(program)
        .args(args)
        .output()
        .unwrap()
}

/// Every path under `dir` (recursively), as strings.
fn all_paths(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(p.clone());
            }
            out.push(p.to_string_lossy().into_owned());
        }
    }
    out
}

fn mount_fails(d: &DaemonProc, image: &str, dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let out = d.cli(&["mount", image, dir.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "mounting the hostile image {image} succeeded\n{}",
        d.log()
    );
    assert!(!lazyblob::frontend::mount::is_erofs_mount(dir));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Mount `image` on `mnt` and check that every file reads back as `files` says.
fn mount_and_check(d: &DaemonProc, image: &str, mnt: &Path, files: &BTreeMap<String, Vec<u8>>) {
    d.mount(image, mnt);
    for (p, data) in files {
        let got = std::fs::read(mnt.join(p)).unwrap_or_else(|e| panic!("{image}: {p}: {e}"));
        assert!(got == *data, "{image}: {p} differs");
    }
}

/// Digests that are paths (`/tmp/<random>`, `sha256:x/../../<random>`) in a data layer, the
/// metadata layer or a chunk table entry are refused at registration; no file appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_that_name_paths_are_refused_and_no_file_appears() {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let files = mixed_files(11, 10, &[1]);
    image_in(&mock, "good/app", &files, 1 << 20).await;
    let work = open_workdir();
    let d = DaemonProc::start(&work.path().join("d"), &[&host], "frontend = \"fanotify\"");
    let tag = format!("lazyblob-hostile-{}", std::process::id());
    let outside = format!("/tmp/{tag}-abs");
    let climbing = format!("sha256:x/../../{tag}-rel");
    let base = || HostileImage::from_store(mock.store(), "good/app", "v1");
    let scenarios = [
        // a data layer and its table entry both name an absolute path
        (
            "data-abs",
            base()
                .edit_json_blob(MEDIA_TYPE_CHUNKS, 0, |t| {
                    t["blobs"][0]["digest"] = outside.clone().into()
                })
                .layer_digest(MEDIA_TYPE_DATA, 0, &outside),
        ),
        // ... a path that climbs out of the cache directory
        (
            "data-climb",
            base()
                .edit_json_blob(MEDIA_TYPE_CHUNKS, 0, |t| {
                    t["blobs"][0]["digest"] = climbing.clone().into()
                })
                .layer_digest(MEDIA_TYPE_DATA, 0, &climbing),
        ),
        // the metadata blob, kept under the state directory, names a path
        ("meta-abs", base().layer_digest(MEDIA_TYPE_META, 0, &outside)),
        // only the table entry is hostile
        (
            "table-entry",
            base().edit_json_blob(MEDIA_TYPE_CHUNKS, 0, |t| {
                t["blobs"][0]["digest"] = climbing.clone().into()
            }),
        ),
        // a non-ASCII digest (sliced by byte index before)
        (
            "non-ascii",
            base().layer_digest(MEDIA_TYPE_DATA, 0, &format!("sha256:{}é", "0".repeat(62))),
        ),
    ];
    for (name, img) in scenarios {
        img.publish("evil/app", name);
        let err = mount_fails(
            &d,
            &format!("{host}/evil/app:{name}"),
            &work.path().join(format!("mnt-{name}")),
        );
        assert!(err.contains("invalid digest"), "{name}: unclear error: {err}");
    }
    assert!(!Path::new(&outside).exists(), "{outside} was created");
    let tmp_hits: Vec<String> = all_paths(Path::new("/tmp"))
        .into_iter()
        .chain(all_paths(work.path()))
        .filter(|p| p.contains(&tag))
        .collect();
    assert!(
        tmp_hits.is_empty(),
        "files named by the registry appeared: {tmp_hits:?}"
    );
    // the daemon still serves a good image
    let mnt = work.path().join("mnt-good");
    mount_and_check(&d, &format!("{host}/good/app:v1"), &mnt, &files);
    d.umount(&mnt);
}

/// Image A claims victim V's data blob digest, with its own chunk table, and its registry
/// serves A's bytes under that digest. A is mounted and read first; V, mounted after from
/// an honest registry, reads its own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_image_cannot_poison_another_images_cache() {
    require_root();
    let honest = MockRegistry::start(MockConfig::default()).await.unwrap();
    let evil = MockRegistry::start(MockConfig::default()).await.unwrap();
    // same names and sizes, different bytes: identical layouts, identical blob sizes
    let victim_files = mixed_files(21, 12, &[2]);
    let attacker_files = mixed_files(22, 12, &[2]);
    let victim = image_in(&honest, "lib/base", &victim_files, 1 << 20).await;
    image_in(&evil, "evil/base", &attacker_files, 1 << 20).await;
    let victim_digest = HostileImage::from_store(honest.store(), "lib/base", "v1").layer_digest_of(MEDIA_TYPE_DATA, 0);
    let mut a = HostileImage::from_store(evil.store(), "evil/base", "v1");
    let attacker_digest = a.layer_digest_of(MEDIA_TYPE_DATA, 0);
    let attacker_bytes = evil.store().blob(&attacker_digest).unwrap();
    assert_eq!(
        honest.store().blob(&victim_digest).unwrap().len(),
        attacker_bytes.len(),
        "the scenario needs blobs of one size"
    );
    let vd = victim_digest.clone();
    a.edit_json_blob(MEDIA_TYPE_CHUNKS, 0, move |t| t["blobs"][0]["digest"] = vd.into())
        .layer_digest(MEDIA_TYPE_DATA, 0, &victim_digest)
        .serve_blob_as(&victim_digest, attacker_bytes)
        .publish("evil/base", "claims-victim");
    let work = open_workdir();
    let d = DaemonProc::start(
        &work.path().join("d"),
        &[&honest.host(), &evil.host()],
        "frontend = \"fanotify\"",
    );
    let (ma, mv) = (work.path().join("mnt-a"), work.path().join("mnt-v"));
    mount_and_check(
        &d,
        &format!("{}/evil/base:claims-victim", evil.host()),
        &ma,
        &attacker_files,
    );
    // the victim reads its own bytes, not the attacker's
    mount_and_check(&d, &victim, &mv, &victim_files);
    assert!(
        honest.counters().blob_bytes(&victim_digest) > 0,
        "the victim's bytes came from its own registry"
    );
    d.umount(&ma);
    d.umount(&mv);
}

/// Table chunks of 64 KiB under 1 MiB engine units: a reader's 128 KiB written first, then a
/// crash before the rest of the unit reached the disk. A second reader of 1 MiB, in the
/// same run and after a restart, reads the file's bytes, never zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_partly_on_disk_are_completed_not_skipped() {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let big = bytes(31, 4 << 20);
    let files: BTreeMap<String, Vec<u8>> = [("big.bin".to_string(), big.clone())].into();
    let image = image_in(&mock, "small/chunks", &files, 64 << 10).await;
    let work = open_workdir();
    // no read-ahead of the daemon's own, no background fill: only what the kernel asks
    // for is written (the mount's kernel read-ahead stays raised: its requests span units)
    let mut d = DaemonProc::start(
        &work.path().join("d"),
        &[&host],
        "frontend = \"fanotify\"\n[engine]\nread_ahead_max = 0\nfill_after_idle_ms = 0",
    );
    let mnt = work.path().join("mnt");
    d.mount(&image, &mnt);
    let read_at = |len: usize| {
        let f = std::fs::File::open(mnt.join("big.bin")).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    };
    assert!(read_at(128 << 10) == big[..128 << 10], "first 128 KiB");
    assert!(read_at(1 << 20) == big[..1 << 20], "1 MiB from a second reader");
    d.stop();
    // the state a crash leaves between the reader's part and the rest of its unit: the
    // first 128 KiB on disk, the rest of the first MiB a hole
    let blobs = work.path().join("d/cache/blobs");
    let cache_files: Vec<_> = std::fs::read_dir(&blobs).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(cache_files.len(), 1, "one data blob: {cache_files:?}");
    let f = std::fs::OpenOptions::new().write(true).open(&cache_files[0]).unwrap();
    let mut head = vec![0u8; 128 << 10];
    std::fs::File::open(&cache_files[0])
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(
        head == big[..128 << 10],
        "the file starts the data blob (layout assumption)"
    );
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        128 << 10,
        (1 << 20) - (128 << 10),
    )
    .unwrap();
    drop(f);
    d.restart();
    std::fs::create_dir_all(&mnt).unwrap();
    d.mount(&image, &mnt);
    let got = read_at(big.len());
    let zeros: Vec<usize> = got
        .chunks(4096)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|&b| b == 0))
        .map(|(i, _)| i * 4096)
        .collect();
    assert!(zeros.is_empty(), "pages of zeros after the restart at {zeros:?}");
    assert!(got == big, "the file after the restart differs");
    d.umount(&mnt);
}

/// Sizes a registry announces are bounded before anything is allocated: a metadata layer of
/// 2^43 bytes, a chunk table declaring 1 GiB chunks, a 100 MB manifest. Each gets an error
/// naming the limit; the daemon's memory stays flat and it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_sizes_are_bounded_before_allocating() {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let files = mixed_files(41, 8, &[1]);
    image_in(&mock, "good/app", &files, 1 << 20).await;
    let base = || HostileImage::from_store(mock.store(), "good/app", "v1");
    base()
        .layer_size(MEDIA_TYPE_META, 0, 1 << 43)
        .publish("evil/app", "huge-meta");
    base()
        .edit_json_blob(MEDIA_TYPE_CHUNKS, 0, |t| {
            t["chunk_size"] = (1u64 << 30).into();
            let n = t["blobs"][0]["size"].as_u64().unwrap().div_ceil(1 << 30) as usize;
            t["blobs"][0]["chunks"] = "0".repeat(64 * n).into();
        })
        .publish("evil/app", "gib-chunks");
    base().pad_to(100_000_000).publish("evil/app", "huge-manifest");
    let work = open_workdir();
    let d = DaemonProc::start(&work.path().join("d"), &[&host], "frontend = \"fanotify\"");
    let rss_before = common::procs::vm_kib(d.pid(), "VmRSS:");
    for (tag, limit) in [
        ("huge-meta", "max_metadata_bytes"),
        ("gib-chunks", "max_chunk_size"),
        ("huge-manifest", "limits"),
    ] {
        let err = mount_fails(
            &d,
            &format!("{host}/evil/app:{tag}"),
            &work.path().join(format!("mnt-{tag}")),
        );
        assert!(
            err.contains(limit) && err.contains("exceeds"),
            "{tag}: error does not name the limit: {err}"
        );
    }
    let rss_after = common::procs::vm_kib(d.pid(), "VmRSS:");
    assert!(
        rss_after < rss_before + 48 * 1024,
        "daemon RSS grew from {rss_before} to {rss_after} KiB"
    );
    let mnt = work.path().join("mnt-good");
    mount_and_check(&d, &format!("{host}/good/app:v1"), &mnt, &files);
    d.umount(&mnt);
}

/// What the daemon keeps (state, kept manifests and metadata, cache files) is root's only:
/// an unprivileged user (uid 65534) can neither list nor read any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_and_state_are_unreadable_to_other_users() {
    require_root();
    require_tool("setpriv", "util-linux");
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let files = mixed_files(51, 8, &[1]);
    let image = image_in(&mock, "private/app", &files, 1 << 20).await;
    let work = open_workdir();
    let d = traversable_daemon(work.path(), &[&host]);
    let dir = d.dir.clone();
    let mnt = work.path().join("mnt");
    mount_and_check(&d, &image, &mnt, &files);
    let mut targets = vec![dir.join("state"), dir.join("cache"), dir.join("cache/blobs")];
    for sub in ["state", "cache"] {
        targets.extend(all_paths(&dir.join(sub)).into_iter().map(Into::into));
    }
    assert!(targets.len() > 6, "nothing to check: {targets:?}");
    let as_nobody = |program: &str, path: &Path| run_as(65534, program, &[path.as_os_str()]);
    // the check can fail: the same command reads a world-readable file
    let control = dir.join("control");
    std::fs::write(&control, b"x").unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        as_nobody("cat", &control).status.success(),
        "setpriv does not work here"
    );
    for t in &targets {
        let verb = if t.is_dir() { "ls" } else { "cat" };
        let out = as_nobody(verb, t);
        assert!(!out.status.success(), "uid 65534 can read {}", t.display());
    }
    d.umount(&mnt);
}

/// Host mounts are `nosuid,nodev` unless the user opts in; the admin socket is `0600` and
/// refuses a peer that is not root even when its mode has been widened by mistake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_mounts_ignore_setuid_and_the_admin_socket_checks_its_peers() {
    use nix::sys::statvfs::{statvfs, FsFlags};
    require_root();
    require_tool("setpriv", "util-linux");
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let files = mixed_files(61, 4, &[]);
    let image = image_in(&mock, "suid/app", &files, 1 << 20).await;
    let work = open_workdir();
    let d = traversable_daemon(work.path(), &[&host]);
    let (plain, trusted) = (work.path().join("plain"), work.path().join("trusted"));
    d.mount(&image, &plain);
    std::fs::create_dir_all(&trusted).unwrap();
    let out = d.cli(&["mount", &image, trusted.to_str().unwrap(), "--allow-suid-dev"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let flags = |p: &Path| statvfs(p).unwrap().flags();
    assert!(flags(&plain).contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_RDONLY));
    assert!(!flags(&trusted).contains(FsFlags::ST_NOSUID), "opt-out ignored");
    assert!(!flags(&trusted).contains(FsFlags::ST_NODEV), "opt-out ignored");
    d.umount(&plain);
    d.umount(&trusted);

    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let status_as = |uid| {
        run_as(
            uid,
            common::daemon::binary(),
            &["status".as_ref(), "--socket".as_ref(), d.socket.as_os_str()],
        )
    };
    assert!(status_as(0).status.success(), "root is refused");
    let nobody = status_as(65534);
    assert!(
        !nobody.status.success(),
        "uid 65534 got an answer from the admin socket"
    );
    assert!(d.log().contains("refused a peer"), "the refusal is logged");
}

/// The mount point is opened when the mount is asked for: a user who swaps a component of
/// its path for a symlink while the registration waits for the registry does not move the
/// mount onto the symlink's target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_point_swapped_during_registration_is_not_followed() {
    use registry_mock::{Fault, FaultRule};
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let files = mixed_files(71, 4, &[]);
    image_in(&mock, "swap/app", &files, 1 << 20).await;
    let work = open_workdir();
    let d = DaemonProc::start(&work.path().join("d"), &[&host], "frontend = \"fanotify\"");
    let (user_dir, victim) = (work.path().join("user"), work.path().join("victim"));
    std::fs::create_dir_all(user_dir.join("mnt")).unwrap();
    std::fs::create_dir_all(victim.join("mnt")).unwrap();
    // registration fetches the metadata blob and the chunk table: make it slow
    mock.set_faults(vec![FaultRule::always(Fault::Latency(
        std::time::Duration::from_millis(1500),
    ))]);
    let mount = std::process::Command::new(common::daemon::binary())
        .args(["mount", &format!("{host}/swap/app:v1")])
        .arg(user_dir.join("mnt"))
        .arg("--socket")
        .arg(&d.socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let moved = work.path().join("user.old");
    std::fs::rename(&user_dir, &moved).unwrap();
    std::os::unix::fs::symlink(&victim, &user_dir).unwrap();
    let out = mount.wait_with_output().unwrap();
    mock.clear_faults();
    let on_victim = lazyblob::frontend::mount::is_erofs_mount(&victim.join("mnt"));
    let on_asked = lazyblob::frontend::mount::is_erofs_mount(&moved.join("mnt"));
    let reads_back = on_asked
        && files
            .iter()
            .all(|(p, data)| std::fs::read(moved.join("mnt").join(p)).is_ok_and(|got| got == *data));
    // clean up before judging: these mounts are outside the daemon's directory
    for m in [victim.join("mnt"), moved.join("mnt")] {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    assert!(!on_victim, "the mount followed the swapped-in symlink");
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(on_asked, "the mount is not on the directory that was asked for");
    assert!(reads_back, "the files do not read back through the mount");
}
