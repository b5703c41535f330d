//! An image of 120 data blobs (as many layers; Docker allows 127) on the cachefiles
//! on-demand frontend in the VM rig (6.12 kernel): one fscache cookie a blob, all opened at
//! the mount; every file reads back with its sha256, each blob fetched once.

mod common;

use std::collections::BTreeMap;

use common::*;
use lazyblob::registry::sha256_digest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_of_120_data_blobs_mounts_and_reads_back_in_vm() {
    let VmRegistry { mock, host, port, reg } = VmRegistry::start().await;
    let files: BTreeMap<String, Vec<u8>> = (0..120)
        .map(|i| (format!("l{i:03}/f.bin"), bytes(700 + i, 5_000 + i as usize * 97)))
        .collect();
    let img = build_files(&files, 120);
    assert_eq!(img.data.len(), 120, "one data blob a file");
    push_image(&reg, &host, "many/blobs:v1", &img).await;
    let (share, payload) = vm_dirs();
    let p = payload.path();
    std::fs::write(p.join("cfg.toml"), guest_config(port, "", "")).unwrap();
    std::fs::write(p.join("all.sha256"), sha256sum_list(&files)).unwrap();
    let prelude = common::guest::prelude(port);
    write_guest_script(
        p,
        &format!(
            r#"{prelude}
mkdir -p /var/lib/lazyblob /mnt/m
$LB daemon --config /cfg.toml 2>/tmp/daemon.log & DPID=$!
i=0; while ! $LB status --socket $SOCK >/dev/null 2>&1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
$LB mount --socket $SOCK $R/many/blobs:v1 /mnt/m >/tmp/m 2>&1; check mount $? "$(cat /tmp/m)"
(cd /mnt/m && sha256sum -c /all.sha256 >/tmp/c 2>&1); check all-files $? "$(grep -v ': OK' /tmp/c | head -3)"
$LB umount --socket $SOCK /mnt/m; check umount $?
kill $DPID; wait $DPID
grep -E "WARN|ERROR" /tmp/daemon.log | tail -20
exit 0
"#
        ),
    );
    let (code, console) = run_vm(p, share.path(), &[common::daemon::binary()], 600).await;
    println!("{console}");
    assert_eq!(code, 0, "VM run failed");
    assert_checks(&console, &["mount", "all-files", "umount"]);
    // every blob read, none twice (its file fills it but for block padding)
    let c = mock.counters();
    for (k, d) in img.data.iter().enumerate() {
        let (fetched, size) = (c.blob_bytes(sha256_digest(d)), d.len() as u64);
        assert!(
            fetched > 0 && fetched <= size,
            "blob {k}: {fetched} bytes fetched of {size}"
        );
    }
}
