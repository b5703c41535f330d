//! `--only slices`: what the kernel charges for an image whose data lies in many small backing
//! files (EROFS devices) instead of one file a blob: the layout that would let a partly cached
//! blob stop raising events for its complete parts, since fanotify marks whole files. No
//! daemon: lazyblob's EROFS writer makes the metadata image, `mount_file_backed` mounts it (one
//! `fsconfig` a device), a thread answers events at once (as the daemon's busy poll does).
//! Re-reads of 2,000 files of 32 KiB, page cache dropped before each pass, medians of
//! `PASSES` passes; layouts alternate `REPS` times.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use lazyblob::frontend::fanotify::{event, sys};
use lazyblob::frontend::mount::{self, MountPoint, SpecialFiles};
use lazyblob::image::erofs::{write, DeviceSlot};
use lazyblob::image::tree::{FileData, Kind, Meta, Node, Tree};
use serde_json::json;

use super::util::{drop_caches, percentile, Bench, Report};

const FILES: usize = 2000;
const FILE_BYTES: usize = 32 << 10;
const PASSES: usize = 5;
const REPS: usize = 2;

/// How the files' data is laid out and watched.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// One backing file, no marks: a local EROFS image.
    Local,
    /// A backing file per few files (a slice), no marks.
    Slices,
    /// Slices each marked `FAN_PRE_ACCESS`: every read an event.
    SlicesMarked,
    /// Slices marked for the mount, the marks then removed (as complete slices would be).
    SlicesUnmarked,
}

impl Layout {
    /// Files a backing file holds: all, or `LAZYBLOB_BENCH_SLICE_FILES` (default 32: 1 MiB).
    fn files_per_device(self) -> usize {
        if self == Layout::Local {
            return FILES;
        }
        std::env::var("LAZYBLOB_BENCH_SLICE_FILES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32)
    }
}

/// The metadata image and its device files under `dir`, each file's bytes its index mod 251.
fn build(dir: &Path, per_device: usize) -> (PathBuf, Vec<PathBuf>) {
    std::fs::create_dir_all(dir).unwrap();
    let meta = |perm| Meta {
        perm,
        ..Default::default()
    };
    let mut tree = Tree::new(meta(0o755));
    let kind = Kind::Dir(Default::default());
    let d = tree
        .insert(
            Tree::ROOT,
            b"d",
            Node {
                meta: meta(0o755),
                kind,
            },
        )
        .unwrap();
    let mut blobs: Vec<Vec<u8>> = vec![Vec::new(); FILES.div_ceil(per_device)];
    for i in 0..FILES {
        let blob = &mut blobs[i / per_device];
        let data = FileData::Blob {
            device: (i / per_device + 1) as u16,
            offset: blob.len() as u64,
            size: FILE_BYTES as u64,
        };
        blob.extend(std::iter::repeat_n((i % 251) as u8, FILE_BYTES));
        let node = Node {
            meta: meta(0o644),
            kind: Kind::File(data),
        };
        tree.insert(d, format!("f{i}").as_bytes(), node).unwrap();
    }
    let mut slots = Vec::new();
    let mut paths = Vec::new();
    for (k, b) in blobs.iter().enumerate() {
        let p = dir.join(format!("s{k}"));
        std::fs::write(&p, b).unwrap();
        slots.push(DeviceSlot {
            tag: format!("{k:064x}"),
            blocks: (b.len() / 4096) as u32,
        });
        paths.push(p);
    }
    let meta_path = dir.join("meta.erofs");
    std::fs::write(&meta_path, write(&tree, &slots, 12).unwrap()).unwrap();
    (meta_path, paths)
}

/// A mount point, detached when dropped (also when a pass fails).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = mount::unmount(&self.0, true);
    }
}

/// A thread answering every event of `fan` at once until `stop`; counts them.
fn listener(
    fan: Arc<nix::sys::fanotify::Fanotify>,
    stop: Arc<AtomicBool>,
    events: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let mut buf = vec![0u8; 4096];
        while !stop.load(Relaxed) {
            let Ok(n) = sys::read_events(&fan, &mut buf) else {
                std::hint::spin_loop();
                continue;
            };
            for e in event::parse(&buf[..n]).0 {
                let fd = sys::adopt_event_fd(e.fd).unwrap();
                sys::respond(fan.as_fd(), fd.as_fd(), sys::FAN_ALLOW).unwrap();
                events.fetch_add(1, Relaxed);
            }
        }
    })
}

/// Mount `layout` under `dir`: the mount's time, the passes' times, events a pass.
fn run(dir: &Path, layout: Layout) -> (f64, Vec<f64>, u64) {
    let (meta, devices) = build(dir, layout.files_per_device());
    let fan = Arc::new(sys::init().unwrap());
    let marked = matches!(layout, Layout::SlicesMarked | Layout::SlicesUnmarked);
    if marked {
        // before the mount: the kernel decides at open whether a file raises pre-content events
        devices.iter().for_each(|p| sys::mark_pre_access(&fan, p).unwrap());
    }
    let (stop, events) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let answering = marked.then(|| listener(Arc::clone(&fan), Arc::clone(&stop), Arc::clone(&events)));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    drop_caches();
    let t = Instant::now();
    mount::mount_file_backed(&meta, &devices, &MountPoint::open(&mnt).unwrap(), SpecialFiles::Ignored).unwrap();
    let mounted = Unmount(mnt.clone());
    let mount_s = t.elapsed().as_secs_f64();
    if layout == Layout::SlicesUnmarked {
        devices.iter().for_each(|p| sys::unmark(&fan, p).unwrap());
    }
    let mut passes = Vec::new();
    for _ in 0..PASSES {
        drop_caches();
        let t = Instant::now();
        for i in 0..FILES {
            let got = std::fs::read(mnt.join(format!("d/f{i}"))).unwrap();
            assert!(
                got.len() == FILE_BYTES && got.iter().all(|&b| b == (i % 251) as u8),
                "f{i} differs"
            );
        }
        passes.push(t.elapsed().as_secs_f64());
    }
    drop(mounted);
    stop.store(true, Relaxed);
    if let Some(h) = answering {
        h.join().unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
    (mount_s, passes, events.load(Relaxed) / PASSES as u64)
}

pub fn slices(b: &Bench<'_>, r: &mut Report) {
    let layouts = [
        Layout::Local,
        Layout::Slices,
        Layout::SlicesMarked,
        Layout::SlicesUnmarked,
    ];
    let (mut mounts, mut passes, mut events) = (vec![Vec::new(); 4], vec![Vec::new(); 4], [0; 4]);
    for rep in 0..REPS {
        for (k, &l) in layouts.iter().enumerate() {
            let (m, p, e) = run(&b.work.join(format!("slices-{rep}-{k}")), l);
            mounts[k].push(m);
            passes[k].extend(p);
            events[k] = e;
        }
    }
    let mount_ms: Vec<f64> = mounts.iter_mut().map(|m| 1e3 * percentile(m, 0.5)).collect();
    let pass_ms: Vec<f64> = passes.iter_mut().map(|p| 1e3 * percentile(p, 0.5)).collect();
    eprintln!("slices: mounts (ms) {mount_ms:.1?}; passes (ms) {pass_ms:.1?}; events a pass {events:?}");
    let per_slice = Layout::Slices.files_per_device();
    let slices = FILES.div_ceil(per_slice);
    let sliced = format!("{slices} backing files of {} KiB", (per_slice * FILE_BYTES) >> 10);
    r.rows.push((
        format!("mount of 2,000 files over {sliced} (EROFS devices)"),
        format!("{:.1} ms", mount_ms[1]),
        format!("1 backing file {:.1} ms", mount_ms[0]),
        format!("{:.1}x", mount_ms[1] / mount_ms[0]),
    ));
    let names = [
        sliced.clone(),
        format!("{sliced}, marked"),
        format!("{sliced}, marks removed after the mount"),
    ];
    for (k, name) in names.iter().enumerate() {
        r.rows.push((
            format!(
                "re-read of 2,000 files of 32 KiB, {name} ({} events a pass)",
                events[k + 1]
            ),
            format!("{:.1} ms", pass_ms[k + 1]),
            format!("1 backing file {:.1} ms", pass_ms[0]),
            format!("{:.2}x", pass_ms[k + 1] / pass_ms[0]),
        ));
    }
    r.json.insert(
        "slices".into(),
        json!({"mount_ms": mount_ms, "pass_ms": pass_ms, "events_a_pass": events,
            "files_per_slice": per_slice, "slices": slices,
            "layouts": ["one file", "slices", "slices marked", "slices, marks removed"]}),
    );
}
