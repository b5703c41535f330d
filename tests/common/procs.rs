//! Processes and mounts the tests started: running a command that must succeed, ending a
//! child (SIGTERM, then SIGKILL after a grace period), finding processes by command line,
//! detaching mounts under a directory, and reading a process's memory counters.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run `cmd` to its end (stdin empty, output captured): its output, or a panic naming the
/// command, its exit status and what it printed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output();
    succeeded(cmd, out)
}

/// [`run_ok`] with `input` on the command's stdin (written from a thread of its own, so a
/// command that prints while it reads cannot stall on a full pipe).
pub fn run_ok_fed(cmd: &mut Command, input: &[u8]) -> Output {
    let out = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            let input = input.to_vec();
            let writer = std::thread::spawn(move || stdin.write_all(&input));
            let out = child.wait_with_output();
            let _ = writer.join();
            out
        });
    succeeded(cmd, out)
}

fn succeeded(cmd: &Command, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// SIGTERM `child`, wait up to `grace` for it to exit, then SIGKILL it; true if it exited
/// within the grace period.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Processes whose command line (arguments joined by spaces) satisfies `matches`.
pub fn pids_with_cmdline(matches: impl Fn(&str) -> bool) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| matches(&String::from_utf8_lossy(&c).replace('\0', " ")))
                .unwrap_or(false)
        })
        .collect()
}

/// SIGKILL each of `pids`.
pub fn kill_all(pids: &[i32]) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Detach every mount under `root`, the most recent first (mounts over mounts go before
/// what they cover).
pub fn detach_mounts_under(root: &Path) {
    let root = root.to_string_lossy().into_owned();
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        let targets: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|t| t.starts_with(&root))
            .collect();
        for t in targets.into_iter().rev() {
            let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Field `i` of `/proc/<pid>/stat` counted after the command name (whose parentheses may hold
/// spaces): 0 is the state, 7 minor faults, 11 and 12 user and system ticks. None once the
/// process is gone.
pub fn stat_field(pid: i32, i: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.split_whitespace().nth(i)?.parse().ok()
}

/// A `/proc/<pid>/status` counter in KiB (`VmRSS:`, `VmHWM:`...).
pub fn vm_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing in /proc/{pid}/status"))
}

/// The fanotify groups process `pid` holds, in fd order, each as the set of inode numbers
/// it has marks on (from `/proc/<pid>/fdinfo`, as the kernel reports them).
pub fn fanotify_marks(pid: i32) -> Vec<std::collections::BTreeSet<u64>> {
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[fanotify]"))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds.iter()
        .map(|fd| {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            info.lines()
                .filter_map(|l| l.strip_prefix("fanotify ino:"))
                .filter_map(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
                .collect()
        })
        .collect()
}
