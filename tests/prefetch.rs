//! Startup prefetch on this machine's kernel (fanotify), counted at the registry
//! (registry-mock's byte counters):
//! - an image's first start on a node is recorded: unmounting it keeps a list (root only) of
//!   the chunks its readers read;
//! - a second node with that list fetches exactly those chunks as soon as it mounts, before
//!   any reader, and the same startup then fetches nothing more and reads the right bytes;
//! - a list that does not fit the image is refused (nothing fetched for it), and the start
//!   is recorded anew;
//! - through Debian's docker-registry, a pushed list reaches a node that never ran the image;
//! - through a registry with the referrers API (registry-mock's: Debian has no such registry),
//!   the push writes no referrers tag and a new node finds the newest list by the API.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::DaemonProc;
use common::*;
use lazyblob::image::digest::Digest;
use lazyblob::prefetch::PrefetchList;
use registry_mock::{MockConfig, MockRegistry, ReferrersApi};

const MIB: usize = 1 << 20;

/// Node one: mount `reference`, run `startup`, unmount (which ends the recording window);
/// the daemon (still running) and the list it kept.
fn record_first_start(work: &Path, host: &str, reference: &str, startup: impl Fn(&Path)) -> (DaemonProc, PathBuf) {
    let one = DaemonProc::start(&work.join("one"), &[host], CFG);
    let mnt1 = work.join("one/mnt");
    one.mount(reference, &mnt1);
    startup(&mnt1);
    one.umount(&mnt1);
    let lists = kept_lists(&one);
    assert_eq!(lists.len(), 1, "one list kept: {lists:?}\n{}", one.log());
    let list = lists[0].clone();
    (one, list)
}

/// Background fill off: every byte fetched is a reader's or the prefetch's doing.
const CFG: &str = "frontend = \"fanotify\"\n[engine]\nfill_after_idle_ms = 0\n[prefetch]\nrecord_window_ms = 60000";

/// The data bytes fetched so far, once the registry has been quiet for 300 ms.
async fn settled_data(mock: &MockRegistry, data: &[String]) -> u64 {
    settled(|| {
        let c = mock.counters();
        data.iter().map(|d| c.blob_bytes(d)).sum::<u64>()
    })
    .await
}

/// A large file `a-big.bin` of `big` bytes and `n` small ones of `len` bytes named
/// `{prefix}{i}`, all seeded from `seed`.
fn tree(seed: u64, big: usize, prefix: &str, n: u64, len: usize) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    files.insert("a-big.bin".to_string(), bytes(seed, big));
    for i in 0..n {
        files.insert(format!("{prefix}{i}"), bytes(seed + 1 + i, len));
    }
    files
}

/// `lazyblob prefetch push reference` with `d`'s config: what it printed.
fn push_list(d: &DaemonProc, reference: &str) -> String {
    let out = common::procs::run_ok(
        std::process::Command::new(common::daemon::binary())
            .args(["prefetch", "push", reference, "--config"])
            .arg(&d.config),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Wait (20 s at most) until `d` says its startup prefetch is done.
async fn prefetch_done(d: &DaemonProc) {
    let t0 = std::time::Instant::now();
    while !d.log().contains("startup prefetch done") {
        assert!(t0.elapsed() < Duration::from_secs(20), "no prefetch:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kept_lists(d: &DaemonProc) -> Vec<PathBuf> {
    std::fs::read_dir(d.dir.join("state/prefetch"))
        .map(|r| r.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_startup_is_fetched_first_on_the_next_node() {
    require_root();
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let files = tree(7, 40 * MIB, "lib/mod", 10, 150_000);
    let img = build_files(&files, 2);
    let data: Vec<String> = img.data.iter().map(|b| Digest::of(b).to_string()).collect();
    push_image(&reg, &host, "startup/app:v1", &img).await;
    let reference = format!("{host}/startup/app:v1");
    // the startup: half the libraries and 3 MiB in the middle of the large file
    let big = &files["a-big.bin"];
    let startup = |mnt: &Path| {
        for i in (0..10).step_by(2) {
            let p = format!("lib/mod{i}");
            assert!(std::fs::read(mnt.join(&p)).unwrap() == files[&p], "{p}");
        }
        for off in (17 * MIB..20 * MIB).step_by(MIB) {
            assert!(read_at(&mnt.join("a-big.bin"), off, MIB) == big[off..off + MIB]);
        }
    };
    let work = tempfile::tempdir().unwrap();
    let cfg = CFG;

    // node 1: the first start is recorded; the unmount ends the window and keeps the list
    let (_one, kept) = record_first_start(work.path(), &host, &reference, startup);
    let first = settled_data(&mock, &data).await;
    let lists = [kept];
    let mode = std::fs::metadata(&lists[0]).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the list is root's only: {mode:o}");
    let list = PrefetchList::from_slice(&std::fs::read(&lists[0]).unwrap()).unwrap();
    let listed: u64 = list
        .blobs
        .iter()
        .flat_map(|b| b.runs.iter().map(|r| (r[1] - r[0]) * b.chunk_size))
        .sum();
    println!(
        "first start fetched {first} bytes; the list names {listed} bytes in {} blobs",
        list.blobs.len()
    );
    assert!(listed >= 3 * MIB as u64, "the list misses what was read: {list:?}");
    // every listed chunk was fetched, whole or some of its leaves, by the first start
    let hits = mock.counters().blob_hits;
    for b in &list.blobs {
        let fetched = |c: u64| {
            let (s, e) = (c * b.chunk_size, (c + 1) * b.chunk_size);
            hits.iter()
                .any(|h| h.digest == b.digest.as_str() && h.status < 300 && h.offset < e && s < h.offset + h.len)
        };
        for r in &b.runs {
            assert!(
                (r[0]..r[1]).all(fetched),
                "{}: run {r:?} lists chunks never fetched",
                b.digest
            );
        }
    }

    // node 2 (its own state and cache), with the list: it is fetched right after the mount,
    // before any reader, and the startup then fetches nothing
    let two_dir = work.path().join("two");
    std::fs::create_dir_all(two_dir.join("state/prefetch")).unwrap();
    std::fs::copy(
        &lists[0],
        two_dir.join("state/prefetch").join(lists[0].file_name().unwrap()),
    )
    .unwrap();
    let before = settled_data(&mock, &data).await;
    let two = DaemonProc::start(&two_dir, &[&host], cfg);
    let mnt2 = two_dir.join("mnt");
    two.mount(&reference, &mnt2);
    let prefetched = settled_data(&mock, &data).await - before;
    println!("node 2 prefetched {prefetched} bytes before any read");
    assert!(
        prefetched >= listed.min(first) / 2 && prefetched <= listed,
        "prefetched {prefetched} of {listed} listed bytes\n{}",
        two.log()
    );
    drop_page_cache();
    startup(&mnt2);
    let during = settled_data(&mock, &data).await - before - prefetched;
    assert_eq!(during, 0, "the startup fetched {during} bytes after the prefetch");
    assert!(two.log().contains("startup prefetch done"), "{}", two.log());
    assert!(
        !two.log().contains("recording the image's startup"),
        "a node with a list records none"
    );
    two.umount(&mnt2);

    // node 3 with a list that names chunks past the blob's end: refused, nothing prefetched
    let mut bad = list.clone();
    bad.blobs[0].runs = vec![[0, 1], [1 << 40, (1 << 40) + 1]];
    let three_dir = work.path().join("three");
    std::fs::create_dir_all(three_dir.join("state/prefetch")).unwrap();
    std::fs::write(
        three_dir.join("state/prefetch").join(lists[0].file_name().unwrap()),
        bad.to_vec(),
    )
    .unwrap();
    let before = settled_data(&mock, &data).await;
    let three = DaemonProc::start(&three_dir, &[&host], cfg);
    let mnt3 = three_dir.join("mnt");
    three.mount(&reference, &mnt3);
    assert_eq!(settled_data(&mock, &data).await, before, "a refused list fetched data");
    assert!(three.log().contains("prefetch list ignored"), "{}", three.log());
    startup(&mnt3);
    three.umount(&mnt3);
    // ... and recorded anew: the kept list is a good one again
    let again = PrefetchList::from_slice(&std::fs::read(&kept_lists(&three)[0]).unwrap()).unwrap();
    assert!(
        again.blobs.iter().all(|b| b.runs.iter().all(|r| r[1] < 1 << 20)),
        "{again:?}"
    );
}

fn startup_chunks(d: &DaemonProc) -> u64 {
    let out = d.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["frontend_counters"]["chunks_startup"].as_u64().unwrap_or(0)
}

/// Through Debian's docker-registry (no referrers API): `lazyblob prefetch push` puts the
/// list beside the image, listed in its referrers tag; a node that never ran the image
/// finds it on mount, fetches it first and keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_list_reaches_a_new_node_through_docker_registry() {
    require_root();
    let dr = DockerRegistry::start(None);
    let host = dr.host.clone();
    let reg = client(&insecure_config(&[&host]));
    let files = tree(9, 24 * MIB, "bin/tool", 6, 300_000);
    let img = build_files(&files, 1);
    let image_digest = push_image(&reg, &host, "pushed/app:v1", &img).await;
    let reference = format!("{host}/pushed/app:v1");
    let startup = |mnt: &Path| {
        for i in 0..3 {
            let p = format!("bin/tool{i}");
            assert!(std::fs::read(mnt.join(&p)).unwrap() == files[&p], "{p}");
        }
        let big = &files["a-big.bin"];
        assert!(read_at(&mnt.join("a-big.bin"), 9 * MIB, 2 * MIB) == big[9 * MIB..11 * MIB]);
    };
    let work = tempfile::tempdir().unwrap();
    let (one, kept) = record_first_start(work.path(), &host, &reference, startup);
    let kept = std::fs::read(kept).unwrap();

    // pushed twice: the referrers tag lists the artifact once
    for _ in 0..2 {
        let said = push_list(&one, &reference);
        assert!(
            said.contains("pushed the prefetch list") && said.contains("referrers tag"),
            "{said}"
        );
    }
    let hex = image_digest.trim_start_matches("sha256:");
    let tag = lazyblob::registry::parse_reference(&format!("{host}/pushed/app:sha256-{hex}")).unwrap();
    let (index, _) = reg.fetch_manifest_raw(&tag).await.unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(entries[0]["artifactType"], lazyblob::prefetch::list::MEDIA_TYPE);

    // a new node: the list comes from the registry, is fetched at once and kept
    let four = DaemonProc::start(&work.path().join("four"), &[&host], CFG);
    let mnt4 = work.path().join("four/mnt");
    four.mount(&reference, &mnt4);
    prefetch_done(&four).await;
    assert!(startup_chunks(&four) >= 2, "{}", four.log());
    assert_eq!(
        std::fs::read(&kept_lists(&four)[0]).unwrap(),
        kept,
        "the registry's list is kept"
    );
    drop_page_cache();
    startup(&mnt4);
    four.umount(&mnt4);
    // the recording the mount started ended unkept: the kept list is still the registry's
    assert_eq!(std::fs::read(&kept_lists(&four)[0]).unwrap(), kept);
}

/// A registry with the OCI 1.1 referrers API (registry-mock's; Debian packages none): the
/// push leaves the referrers tag alone, the API lists the artifact, and a node that never ran
/// the image takes the newest of the lists there (an older one, pushed by hand with a run
/// past its blob's end, would be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_is_found_by_the_referrers_api_where_the_registry_has_it() {
    require_root();
    let mock = MockRegistry::start(MockConfig {
        referrers_api: ReferrersApi::Served,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let files = tree(11, 8 * MIB, "bin/tool", 4, 200_000);
    let img = build_files(&files, 1);
    let image_digest = push_image(&reg, &host, "api/app:v1", &img).await;
    let image = Digest::parse(&image_digest).unwrap();
    let reference = format!("{host}/api/app:v1");
    let startup = |mnt: &Path| {
        for i in 0..2 {
            let p = format!("bin/tool{i}");
            assert!(std::fs::read(mnt.join(&p)).unwrap() == files[&p], "{p}");
        }
    };
    let work = tempfile::tempdir().unwrap();
    let (one, kept) = record_first_start(work.path(), &host, &reference, startup);
    let kept = std::fs::read(kept).unwrap();

    // an older list, pushed by hand: it names a chunk past its blob's end
    let mut old = PrefetchList::from_slice(&kept).unwrap();
    old.blobs[0].runs = vec![[0, 1], [1 << 40, (1 << 40) + 1]];
    let old = old.to_vec();
    let old_digest = mock.store().put_blob(old.clone());
    let empty = mock.store().put_blob(&b"{}"[..]);
    let artifact = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": lazyblob::prefetch::list::MEDIA_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": lazyblob::prefetch::list::MEDIA_TYPE, "digest": old_digest, "size": old.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": image_digest, "size": 1},
        "annotations": {"org.opencontainers.image.created": "2020-01-01T00:00:00Z"}});
    mock.store().put_manifest(
        "api/app",
        None,
        "application/vnd.oci.image.manifest.v1+json",
        serde_json::to_vec(&artifact).unwrap(),
    );

    let said = push_list(&one, &reference);
    assert!(said.contains("listed by the registry's referrers API"), "{said}");
    let tag = format!("sha256-{}", image.hex());
    assert!(
        mock.store().manifest("api/app", &tag).is_none(),
        "a referrers tag was written"
    );
    let repo = lazyblob::registry::parse_reference(&reference).unwrap();
    let index = reg
        .referrers(&repo, &image, lazyblob::prefetch::list::MEDIA_TYPE)
        .await
        .unwrap()
        .expect("the API answers");
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{index}");

    // a new node: the newest list, by the API, fetched at once and kept
    let two = DaemonProc::start(&work.path().join("two"), &[&host], CFG);
    let mnt2 = work.path().join("two/mnt");
    two.mount(&reference, &mnt2);
    prefetch_done(&two).await;
    assert!(two.log().contains("ReferrersApi"), "{}", two.log());
    assert!(!two.log().contains("prefetch list ignored"), "{}", two.log());
    assert_eq!(
        std::fs::read(&kept_lists(&two)[0]).unwrap(),
        kept,
        "the newest list is kept"
    );
    startup(&mnt2);
    two.umount(&mnt2);

    // the API garbled: the push writes the tag, and a node reads the list from there
    mock.set_config(MockConfig {
        referrers_api: ReferrersApi::Garbled,
        ..MockConfig::default()
    });
    let said = push_list(&one, &reference);
    assert!(said.contains("referrers tag"), "{said}");
    let three = DaemonProc::start(&work.path().join("three"), &[&host], CFG);
    let mnt3 = work.path().join("three/mnt");
    three.mount(&reference, &mnt3);
    prefetch_done(&three).await;
    assert!(three.log().contains("ReferrersTag"), "{}", three.log());
    assert_eq!(std::fs::read(&kept_lists(&three)[0]).unwrap(), kept);
    three.umount(&mnt3);
}
