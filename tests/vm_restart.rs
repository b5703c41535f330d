//! Restarts and upgrades never fail a reader on the cachefiles frontend, in the VM rig (6.12
//! kernel with CACHEFILES_ONDEMAND): 8 readers stream whole files (busybox `sha256sum`) while
//! the daemon is `kill -9`ed and restarted three times, and, on a second image, while it is
//! upgraded three times (a new daemon started while the old one runs). registry-mock on the
//! host answers every request of these images 1 s late, so READs are in flight at each
//! disruption. Every reader must succeed with the right sum.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use lazyblob::registry::sha256_digest;
use registry_mock::{Fault, FaultRule};

fn files(seed: u64) -> BTreeMap<String, Vec<u8>> {
    (0..8)
        .map(|k| (format!("data/f{k}.bin"), bytes(seed + k, 3 << 20)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cachefiles_readers_survive_kill9_and_upgrades_in_vm() {
    let VmRegistry { mock, host, port, reg } = VmRegistry::start().await;
    let (a, b) = (files(500), files(600));
    let (img_a, img_b) = (build_files(&a, 8), build_files(&b, 8));
    push_image(&reg, &host, "restart/a:v1", &img_a).await;
    push_image(&reg, &host, "restart/b:v1", &img_b).await;
    // late enough that no reader (3 chunks, 2 requests at a time for all 8) is done at the
    // first disruption, 2 s after they start
    let slow: Vec<FaultRule> = img_a
        .data
        .iter()
        .chain(&img_b.data)
        .map(|d| FaultRule::always(Fault::Latency(Duration::from_millis(1000))).for_blob(&sha256_digest(d)))
        .collect();
    mock.set_faults(slow);

    let (share, payload) = vm_dirs();
    let p = payload.path();
    std::fs::write(
        p.join("cfg.toml"),
        guest_config(
            port,
            "restart_hold_ms = 120000\n[engine]\nmax_concurrent_fetches = 2\nmerge_max = 1048576",
            "request_timeout_ms = 20000\ndeadline_ms = 60000",
        ),
    )
    .unwrap();
    std::fs::write(p.join("a.sha256"), sha256sum_list(&a)).unwrap();
    std::fs::write(p.join("b.sha256"), sha256sum_list(&b)).unwrap();
    let prelude = common::guest::prelude(port);
    write_guest_script(
        p,
        &format!(
            r#"{prelude}
wait_socket() {{ i=0; while ! $LB status --socket $SOCK >/dev/null 2>&1 && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done; echo "daemon answers after $((i / 10)) s"; }}
start_daemon() {{ $LB daemon --config /cfg.toml 2>>/tmp/daemon.log & DPID=$!; wait_socket; }}
# 8 readers of image $1 on /mnt/$1, each writing its sum and exit status
readers() {{
  for k in 0 1 2 3 4 5 6 7; do
    ( sha256sum /mnt/$1/data/f$k.bin > /tmp/$1.s$k 2>/tmp/$1.e$k; echo $? > /tmp/$1.rc$k ) &
  done
}}
# all 8 readers of $1 done: exit status 0 and the right sum each
verify() {{
  bad=0
  for k in 0 1 2 3 4 5 6 7; do
    n=0; while [ ! -s /tmp/$1.rc$k ] && [ $n -lt 1800 ]; do sleep 0.1; n=$((n+1)); done
    [ "$(cat /tmp/$1.rc$k)" = 0 ] || {{ bad=$((bad+1)); echo "reader $1/$k: rc=$(cat /tmp/$1.rc$k) $(cat /tmp/$1.e$k)"; }}
  done
  (cd /mnt/$1 && sha256sum -c /$1.sha256 >/tmp/$1.c 2>&1) || bad=$((bad+100))
  return $bad
}}
mkdir -p /var/lib/lazyblob /mnt/a /mnt/b
start_daemon; check daemon-start $?
$LB mount --socket $SOCK $R/restart/a:v1 /mnt/a >/tmp/m 2>&1; check mount-a $? "$(cat /tmp/m)"
readers a
for round in 1 2 3; do
  sleep 2
  [ $round = 1 ] && {{ n=$(ls /tmp/a.rc* 2>/dev/null | wc -l); [ $n = 0 ]; check readers-in-flight-at-kill $? "done=$n"; }}
  kill -9 $DPID; wait $DPID 2>/dev/null
  t0=$(cut -d' ' -f1 /proc/uptime)
  start_daemon
  echo "kill -9 round $round: a new daemon after $t0 -> $(cut -d' ' -f1 /proc/uptime)"
done
verify a; check readers-across-kill9 $? "$(grep -v ': OK' /tmp/a.c | head -3)"
$LB mount --socket $SOCK $R/restart/b:v1 /mnt/b >/tmp/m 2>&1; check mount-b $? "$(cat /tmp/m)"
readers b
for round in 1 2 3; do
  sleep 2
  [ $round = 1 ] && {{ n=$(ls /tmp/b.rc* 2>/dev/null | wc -l); [ $n = 0 ]; check readers-in-flight-at-upgrade $? "done=$n"; }}
  OLD=$DPID
  $LB daemon --config /cfg.toml 2>>/tmp/daemon.log & DPID=$!
  n=0; while kill -0 $OLD 2>/dev/null && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
  wait $OLD 2>/dev/null
  wait_socket
  echo "upgrade round $round: the old daemon left after $((n / 10)) s"
done
verify b; check readers-across-upgrades $? "$(grep -v ': OK' /tmp/b.c | head -3)"
grep -c "took over the cachefiles cache" /tmp/daemon.log | grep -qx 6; check six-takeovers $? "$(grep -c 'took over the cachefiles cache' /tmp/daemon.log)"
$LB umount --socket $SOCK /mnt/a; $LB umount --socket $SOCK /mnt/b; check umount $?
kill $DPID; wait $DPID
echo "---- daemon log (takeovers, warnings) ----"; grep -E "took over|sent again|WARN|ERROR" /tmp/daemon.log | tail -40
exit 0
"#
        ),
    );
    let (code, console) = run_vm(p, share.path(), &[common::daemon::binary()], 900).await;
    println!("{console}");
    assert_eq!(code, 0, "VM run failed");
    assert_checks(
        &console,
        &[
            "daemon-start",
            "mount-a",
            "readers-in-flight-at-kill",
            "readers-across-kill9",
            "mount-b",
            "readers-in-flight-at-upgrade",
            "readers-across-upgrades",
            "six-takeovers",
            "umount",
        ],
    );
}
