//! The containerd snapshotter over the cachefiles frontend, in the VM rig (6.12 kernel with
//! CACHEFILES_ONDEMAND): the daemon runs in the guest with its snapshotter socket, and this
//! test binary, started again inside the guest as a gRPC client, calls the snapshots API the
//! way containerd's CRI plugin does: Prepare of every layer of a converted image with the
//! labels containerd sends (each answered ALREADY_EXISTS), Prepare of a rootfs over them,
//! the returned overlay mounted over the fscache-mode EROFS mount and read through, a
//! `ctr commit`-style Commit and a View over it, then Remove down to nothing, which releases
//! the image's lazy mount. containerd itself stays on the host (tests/containerd.rs): a Go
//! daemon plus CRI under TCG emulation would take minutes to boot.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use common::*;
use lazyblob::registry::{parse_reference, sha256_digest};
use lazyblob::snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use lazyblob::snapshotter::api::snapshots::{
    CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest, ViewSnapshotRequest,
};
use lazyblob::snapshotter::api::Mount;
use lazyblob::snapshotter::remote::{LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_REF, LABEL_REMOTE};
use serde::{Deserialize, Serialize};
use tonic::Code;

/// What the guest client does: the Prepares containerd would send, and the files to check.
#[derive(Serialize, Deserialize)]
struct Plan {
    socket: PathBuf,
    snapshotter_root: PathBuf,
    /// One Prepare per layer, bottom first: (key, parent, labels).
    layers: Vec<(String, String, HashMap<String, String>)>,
    /// Path in the image -> sha256 of its content, read through the rootfs.
    files: BTreeMap<String, String>,
}

const SNAPSHOTTER: &str = "lazyblob";
const PLAN_ENV: &str = "LAZYBLOB_GUEST_PLAN";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshotter_over_cachefiles_in_vm() {
    let VmRegistry { mock, host, port, reg } = VmRegistry::start().await;

    // a two-layer OCI image, converted; a 6 MiB file in it is never read
    let (small, mid, unread, top) = (bytes(1, 7000), bytes(2, 1_500_000), bytes(3, 6 << 20), bytes(4, 300));
    let mut base = oci::Layer::new();
    base.dir("etc", 0o755)
        .file("etc/small.conf", 0o644, &small)
        .dir("lib", 0o755)
        .file("lib/mid.so", 0o755, &mid)
        .file("lib/unread.bin", 0o644, &unread);
    let mut upper = oci::Layer::new();
    upper.dir("etc", 0o755).file("etc/top.txt", 0o600, &top);
    let src = format!("{host}/src/app:v1");
    oci::push_source(
        &reg,
        &src,
        &[
            oci::compress(&base.tar(), oci::Compression::Gzip),
            oci::compress(&upper.tar(), oci::Compression::Gzip),
        ],
    )
    .await;
    oci::convert_ref(&reg, &src, &format!("{host}/lazy/app:v1")).await;
    let resolved = reg
        .resolve(&parse_reference(&format!("{host}/lazy/app:v1")).unwrap())
        .await
        .unwrap();
    let lazy = oci::lazy_manifest(&reg, &format!("{host}/lazy/app:v1")).await;

    // the labels containerd 1.6's CRI plugin puts on each layer's Prepare, with the image
    // named as the guest reaches the registry
    let guest_ref = format!("10.0.2.2:{port}/lazy/app:v1");
    let mut layers = Vec::new();
    let mut parent = String::new();
    for l in &resolved.manifest.layers {
        let chain = sha256_digest(format!("{parent} {}", l.digest).as_bytes());
        let mut labels: HashMap<String, String> = l
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_REF.into(), chain.clone());
        labels.insert(LABEL_IMAGE_REF.into(), guest_ref.clone());
        labels.insert(LABEL_MANIFEST.into(), resolved.digest.to_string());
        labels.insert(LABEL_LAYER.into(), l.digest.clone());
        layers.push((format!("extract-{} {chain}", layers.len()), parent.clone(), labels));
        parent = chain;
    }
    let plan = Plan {
        socket: "/run/lazyblob-snapshotter.sock".into(),
        snapshotter_root: "/var/cache/snapshotter".into(),
        layers,
        files: [("etc/small.conf", &small), ("lib/mid.so", &mid), ("etc/top.txt", &top)]
            .into_iter()
            .map(|(p, d)| (p.to_string(), sha256_hex(d)))
            .collect(),
    };

    let (share, payload) = vm_dirs();
    let me = std::env::current_exe().unwrap();
    std::fs::copy(&me, share.path().join("client")).unwrap();
    let p = payload.path();
    std::fs::write(p.join("plan.json"), serde_json::to_vec(&plan).unwrap()).unwrap();
    let snapshotter = format!(
        // background fill off: the test bounds what is fetched by what is read
        "[snapshotter]\nsocket = \"{}\"\nroot = \"{}\"\n[engine]\nfill_after_idle_ms = 0",
        plan.socket.display(),
        plan.snapshotter_root.display()
    );
    std::fs::write(
        p.join("cfg.toml"),
        guest_config(port, &snapshotter, "request_timeout_ms = 5000"),
    )
    .unwrap();
    write_guest_script(
        p,
        &format!(
            r#"#!/bin/sh
check() {{ if [ "$2" = 0 ]; then echo "CHECK $1 ok"; else echo "CHECK $1 FAIL"; fi; }}
mkdir -p /var/lib/lazyblob
/host/lazyblob daemon --config /cfg.toml 2>/tmp/daemon.log &
DPID=$!
i=0; while [ ! -S {sock} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -S {sock} ]; check snapshotter-socket $?
/host/lazyblob status --socket /run/lazyblob.sock | grep -q cachefiles; check frontend-cachefiles $?
{env}=/plan.json /host/client --exact guest_client --ignored --nocapture --test-threads=1; check guest-client $?
kill $DPID; wait $DPID; check daemon-stop $?
echo "---- daemon log (warnings) ----"; grep -E "WARN|ERROR" /tmp/daemon.log | tail -20
exit 0
"#,
            sock = plan.socket.display(),
            env = PLAN_ENV,
        ),
    );

    let (code, console) = run_vm(p, share.path(), &[common::daemon::binary(), &me], 600).await;
    println!("{console}");
    assert_eq!(code, 0, "VM run failed");
    assert_checks(
        &console,
        &[
            "snapshotter-socket",
            "frontend-cachefiles",
            "guest-client",
            "daemon-stop",
        ],
    );

    // lazy: the metadata and chunk table whole, of the data only what was read and one
    // read-ahead window: the 1.5 MB file spans two 1 MiB chunks read in turn, a sequential
    // reader, so the two chunks after them (of the 6 MiB file nobody reads) are fetched ahead,
    // and no more
    let c = mock.counters();
    let data_total: u64 = lazy.data.iter().map(|d| d.size).sum();
    let data_served: u64 = lazy.data.iter().map(|d| c.blob_bytes(&d.digest)).sum();
    println!("served {data_served} of {data_total} data bytes");
    assert!(data_served > 0, "the reads went through the registry");
    assert!(
        data_served <= 4 << 20 && data_served < data_total,
        "served {data_served} of {data_total} data bytes"
    );
}

/// The client half, run inside the guest by the test above (it reads the plan it was given;
/// on its own it has nothing to do and fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside the VM guest, started by snapshotter_over_cachefiles_in_vm"]
async fn guest_client() {
    let plan = std::env::var_os(PLAN_ENV).expect("runs inside the VM guest only (no plan given)");
    let plan: Plan = serde_json::from_slice(&std::fs::read(plan).unwrap()).unwrap();
    let mut c = SnapshotsClient::new(common::containerd::unix_channel(&plan.socket).await.unwrap());

    // every layer is committed remotely: ALREADY_EXISTS, nothing to unpack
    for (key, parent, labels) in &plan.layers {
        let e = c
            .prepare(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.clone(),
                parent: parent.clone(),
                labels: labels.clone(),
            })
            .await
            .expect_err("a lazyblob layer is committed remotely");
        assert_eq!(e.code(), Code::AlreadyExists, "{key}: {e:?}");
        let info = c
            .stat(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: labels[LABEL_REF].clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.parent, *parent);
        assert!(info.labels.contains_key(LABEL_REMOTE), "{:?}", info.labels);
    }
    let top_chain = plan.layers.last().unwrap().2[LABEL_REF].clone();

    // the container's rootfs: an overlay over the image's fscache-mode EROFS mount
    let mounts = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "rootfs".into(),
            parent: top_chain.clone(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let lower = lower_dirs(&mounts);
    assert_eq!(lower.len(), 1, "{mounts:?}");
    assert!(lower[0].starts_with(plan.snapshotter_root.join("images")), "{lower:?}");
    assert_eq!(fs_type(&lower[0]).as_deref(), Some("erofs"), "the image mount");
    let root = Path::new("/mnt/rootfs");
    mount_all(&mounts, root);
    for (path, sum) in &plan.files {
        assert_eq!(&sha256_hex(&std::fs::read(root.join(path)).unwrap()), sum, "{path}");
    }
    std::fs::write(root.join("etc/written"), b"by the container").unwrap();
    std::fs::remove_file(root.join("etc/small.conf")).unwrap();
    let again = c
        .mounts(MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "rootfs".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, mounts, "Mounts answers what Prepare did");
    umount(root);

    // `ctr commit` style: the container's changes committed over the remote layers, and a
    // view of that reads both
    c.commit(CommitSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        name: "committed".into(),
        key: "rootfs".into(),
        labels: HashMap::new(),
        parent: String::new(),
    })
    .await
    .unwrap();
    let view = c
        .view(ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "view".into(),
            parent: "committed".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(lower_dirs(&view).len(), 2, "{view:?}");
    mount_all(&view, root);
    assert_eq!(std::fs::read(root.join("etc/written")).unwrap(), b"by the container");
    assert!(!root.join("etc/small.conf").exists(), "the whiteout of the commit");
    assert_eq!(
        sha256_hex(&std::fs::read(root.join("lib/mid.so")).unwrap()),
        plan.files["lib/mid.so"]
    );
    umount(root);

    // removed top down, as containerd's GC does: the lazy mount goes with the last user
    for key in ["view", "committed"]
        .into_iter()
        .map(String::from)
        .chain(plan.layers.iter().rev().map(|l| l.2[LABEL_REF].clone()))
    {
        c.remove(RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("remove {key}: {e:?}"));
    }
    let mut listed = c
        .list(ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.message().await.unwrap().is_none_or(|m| m.info.is_empty()));
    assert_eq!(fs_type(&lower[0]), None, "the image mount was released");
}

/// The `lowerdir=` directories of an overlay mount (a bind mount has one).
fn lower_dirs(mounts: &[Mount]) -> Vec<PathBuf> {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    match m.r#type.as_str() {
        "bind" => vec![PathBuf::from(&m.source)],
        "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .map(|l| l.split(':').map(PathBuf::from).collect())
            .unwrap_or_default(),
        t => panic!("mount type {t}"),
    }
}

/// The filesystem type mounted exactly at `dir`, from /proc/self/mounts.
fn fs_type(dir: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&dir.to_str().unwrap())).then(|| f[2].to_string())
    })
}

/// Perform `mounts` on `target` with busybox `mount`, as containerd would.
fn mount_all(mounts: &[Mount], target: &Path) {
    std::fs::create_dir_all(target).unwrap();
    for m in mounts {
        let mut cmd = std::process::Command::new("mount");
        if m.r#type == "bind" {
            cmd.args(["--bind", &m.source]);
        } else {
            cmd.args(["-t", &m.r#type, &m.source, "-o", &m.options.join(",")]);
        }
        common::procs::run_ok(cmd.arg(target));
    }
}

fn umount(target: &Path) {
    common::procs::run_ok(std::process::Command::new("umount").arg(target));
}
