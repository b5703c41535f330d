//! The daemon's allocator settings hold on a sequential read (this machine's kernel, fanotify,
//! registry-mock): hyper allocates a socket read buffer of ~412 KiB afresh for most reads of a
//! streamed body; below glibc's mmap threshold (`malloc::MMAP_THRESHOLD`) the heap reuses it,
//! above it each is a new mapping touched page by page (100 page faults, 20% of the daemon's
//! CPU on a sequential read). If hyper's buffers outgrow the threshold, this test says so.

mod common;

use common::daemon::fanotify_mounted;
use common::oci::serve_one;
use common::*;

const MIB: usize = 1 << 20;

/// Minor page faults of process `pid` so far.
fn minor_faults(pid: i32) -> u64 {
    common::procs::stat_field(pid, 7).expect("the daemon's /proc/<pid>/stat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_read_takes_few_page_faults_in_the_daemon() {
    require_root();
    let data = bytes(91, 384 * MIB);
    let (mock, _) = serve_one(&data, "alloc/seq:v1").await;
    let (_work, d, mnt) = fanotify_mounted(&mock.host(), "alloc/seq:v1", "fill_after_idle_ms = 0");
    // the first 128 MiB warm the daemon up (its unit buffers, its heap); the faults of the
    // next 256 MiB are counted
    let mut f = std::fs::File::open(mnt.join("f.bin")).unwrap();
    let mut buf = vec![0u8; MIB];
    let mut before = 0;
    for k in 0..384 {
        if k == 128 {
            before = minor_faults(d.pid());
        }
        std::io::Read::read_exact(&mut f, &mut buf).unwrap();
        assert!(buf[..] == data[k * MIB..(k + 1) * MIB], "f.bin differs in MiB {k}");
    }
    let per_mib = (minor_faults(d.pid()) - before) / 256;
    drop(f);
    // measured 12-05 (5 and 3 runs): 8-59 a MiB with the 512 KiB threshold, 131-147 at 256 KiB
    assert!(
        per_mib < 100,
        "{per_mib} page faults a MiB read in the daemon: its socket buffers are mappings again?"
    );
    d.umount(&mnt);
}
