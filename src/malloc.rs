//! Allocator tuning for a long-running daemon (the one libc call of its family lives here).
//!
//! Fetched units are 64 KiB to a few MiB and short-lived. glibc raises its mmap threshold
//! each time such a block is freed, after which they come from per-thread heaps that
//! fragment and never shrink: peak RSS under a burst of cold reads measured 55-66 MiB that
//! way against 43-45 MiB with the threshold pinned (`cargo bench --bench lazyblob -- --only
//! scale`). Pinning it keeps large buffers mmapped, so freeing one returns it to the kernel.

/// Serve allocations of at least `bytes` with their own mappings, always.
pub fn pin_mmap_threshold(bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only changes glibc's allocator parameters; it takes plain integers
        // and is safe to call at any time, from any thread.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) };
        if ok != 1 {
            tracing::debug!(bytes, "mallopt(M_MMAP_THRESHOLD) refused");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}
