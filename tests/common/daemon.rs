//! The real `lazyblob daemon` as a subprocess with its own state, cache and socket, stopped
//! (and its mounts and guard cleaned up) on drop even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct DaemonProc {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
}

pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lazyblob"))
}

impl DaemonProc {
    /// Write a config for `hosts` (plain HTTP, loopback) under `dir` and start the daemon.
    /// `extra` follows the `[daemon]` keys (and may open further tables).
    pub fn start(dir: &Path, hosts: &[&str], extra: &str) -> DaemonProc {
        DaemonProc::start_with(dir, hosts, extra, "")
    }

    /// Like [`start`](Self::start), with `[registry]` keys that replace the tests' defaults.
    pub fn start_with(dir: &Path, hosts: &[&str], extra: &str, registry: &str) -> DaemonProc {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("lazyblob.sock");
        let mut cfg = format!(
            "[daemon]\nstate_dir = \"{}\"\ncache_dir = \"{}\"\nsocket = \"{}\"\n{extra}\n[registry]\n{registry}\n",
            dir.join("state").display(),
            dir.join("cache").display(),
            socket.display()
        );
        let defaults = [
            ("request_timeout_ms", "10000"),
            ("max_attempts", "3"),
            ("backoff_initial_ms", "50"),
            ("backoff_max_ms", "200"),
            ("deadline_ms", "15000"),
        ];
        for (k, v) in defaults {
            if !registry.lines().any(|l| l.split('=').next().map(str::trim) == Some(k)) {
                cfg.push_str(&format!("{k} = {v}\n"));
            }
        }
        for h in hosts {
            cfg.push_str(&format!("[[registry.hosts]]\nhost = \"{h}\"\ninsecure = true\n"));
        }
        let config = dir.join("config.toml");
        std::fs::write(&config, cfg).unwrap();
        let mut d = DaemonProc {
            dir: dir.to_path_buf(),
            socket,
            config,
            child: None,
        };
        d.restart();
        d
    }

    /// Start (again) with the same config; waits for the admin socket. A daemon still
    /// running is stopped first (SIGTERM): an upgrade is [`upgrade`](Self::upgrade).
    pub fn restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.socket);
        self.spawn();
        let t0 = Instant::now();
        while !self.socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "daemon did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A planned upgrade: a second daemon started with the same config while this one runs;
    /// the old one hands over and exits, and the new one answers on the admin socket.
    pub fn upgrade(&mut self) {
        let mut old = self.child.take().expect("a running daemon");
        self.spawn();
        let t0 = Instant::now();
        loop {
            if old.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the old daemon did not hand over:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the new daemon does not answer:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        // as many open files as allowed, like the shipped systemd unit (1,048,576): the
        // guard's sweep after an expired hold covers that many fd numbers per group
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let child = Command::new("prlimit")
            .arg(format!("--nofile={}", hard.min(1 << 20)))
            .arg("--")
            .args(
                std::env::var("LAZYBLOB_TEST_WRAP")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .arg(binary())
            // LAZYBLOB_TEST_LOG: a log filter for the daemons of tests and benchmarks
            .args([
                "--log",
                &std::env::var("LAZYBLOB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            ])
            .args(["daemon", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// `kill -9` the daemon (its guard survives, by design).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::procs::terminate(&mut c, Duration::from_secs(20));
        }
    }

    /// The daemon's status through its admin API.
    #[allow(dead_code)]
    pub async fn status(&self) -> lazyblob::api::Status {
        lazyblob::api::client::ApiClient::new(&self.socket)
            .unwrap()
            .status()
            .await
            .unwrap()
    }

    /// Run a CLI verb against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    }

    pub fn mount(&self, image: &str, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let out = self.cli(&["mount", image, dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "lazyblob mount failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    pub fn umount(&self, dir: &Path) {
        let out = self.cli(&["umount", dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "lazyblob umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Guard processes started for this daemon's state directory.
    fn guards(&self) -> Vec<i32> {
        let needle = self.dir.join("state").to_string_lossy().into_owned();
        super::procs::pids_with_cmdline(|c| c.contains(" guard ") && c.contains(&needle))
    }
}

/// A fanotify daemon in a fresh directory (its `[engine]` lines `engine`) reading from `host`,
/// with `repo` of `host` mounted: the directory, the daemon and the mount point.
pub fn fanotify_mounted(host: &str, repo: &str, engine: &str) -> (tempfile::TempDir, DaemonProc, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(
        &work.path().join("d"),
        &[host],
        &format!("frontend = \"fanotify\"\n[engine]\n{engine}"),
    );
    let mnt = work.path().join("d/mnt");
    d.mount(&format!("{host}/{repo}"), &mnt);
    (work, d, mnt)
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.stop();
        // detach anything still mounted under our directory, then end our guards
        super::procs::detach_mounts_under(&self.dir);
        super::procs::kill_all(&self.guards());
    }
}
