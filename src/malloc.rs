//! Allocator tuning for a long-running daemon (the libc calls of its family live here).
//!
//! Fetched units are 64 KiB to a few MiB and short-lived. glibc raises its mmap threshold
//! each time such a block is freed, after which they come from per-thread heaps that
//! fragment and never shrink: peak RSS under a burst of cold reads measured 55-66 MiB that
//! way against 43-45 MiB with the threshold pinned (`cargo bench --bench lazyblob -- --only
//! scale`). Pinning it keeps large buffers mmapped, so freeing one returns it to the kernel.
//!
//! glibc also gives threads that contend for the allocator heaps of their own, up to 8 per
//! core; the runtime's workers and the blocking pool's threads (cache writes) each end up
//! with one, which keeps its high-water mark resident. Two heaps are plenty for a daemon
//! whose allocations are few and small besides its buffers: the side-by-side run with
//! nydusd measured a peak of 19.4 MiB against 21.0-21.8 MiB, 16.2 MiB at rest against
//! 18.1-18.4 (`cargo bench --bench lazyblob -- --only start`, 12-05 evening).

/// Allocations of this many bytes and more get mappings of their own (1 MiB units, 2 MiB
/// buffers); smaller ones come from the heaps. It lies above hyper's largest socket read
/// buffer (408 KiB + 4 KiB), which is allocated afresh for most reads of a streamed body
/// (the chunk before still referenced): at 256 KiB each was a new mapping, 100 page faults
/// and an unmapping, 2,388 mappings a GiB and 20% of the daemon's CPU on a sequential read
/// (`perf record --call-graph dwarf`); at 512 KiB the daemon spent 0.73-0.91 CPU s a GiB
/// against 0.95-1.14 (5 alternating runs of `--only seq`). The heap keeps what it frees for
/// reuse until [`release_free`]. `tests/allocator.rs` counts the daemon's page faults on a
/// sequential read: it fails if hyper's buffers outgrow this threshold.
pub const MMAP_THRESHOLD: usize = 512 * 1024;

/// Serve allocations of at least `bytes` with their own mappings, always.
pub fn pin_mmap_threshold(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    set(libc::M_MMAP_THRESHOLD, bytes, "M_MMAP_THRESHOLD");
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// Let glibc keep at most `heaps` heaps (arenas) for all threads.
pub fn limit_arenas(heaps: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    set(libc::M_ARENA_MAX, heaps, "M_ARENA_MAX");
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = heaps;
}

/// Give the heaps' free memory back to the kernel (`malloc_trim`): called once the daemon's
/// buffers have gone idle, so a daemon at rest does not keep the high-water mark of a burst.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; glibc takes its own
    // locks, and it is safe to call at any time, from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `mallopt(param, value)`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(param: libc::c_int, value: usize, name: &str) {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes glibc's allocator parameters; it takes plain integers
    // and is safe to call at any time, from any thread.
    let ok = unsafe { libc::mallopt(param, value) };
    if ok != 1 {
        tracing::debug!(value, "mallopt({name}) refused");
    }
}
