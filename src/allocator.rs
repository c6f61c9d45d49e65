//! How the process allocates memory: mimalloc for Rust's allocations, glibc's malloc, padded,
//! for the C libraries (docs/architecture.md, "mimalloc is the process's allocator").
//!
//! Each binary that runs the broker declares mimalloc itself (`#[global_allocator]` in
//! `src/main.rs` and the in-process benchmarks): declared here, it would also replace the
//! allocator of every test and fuzz target that links the library, hiding heap errors from a
//! sanitizer's malloc.

/// Keeps up to 4 MiB spare at the top of each of glibc's heaps. With Rust's allocations in
/// mimalloc, glibc's heaps hold only the C libraries' (SQLite's page cache, OpenSSL, libxml2)
/// and empty after each burst; glibc then hands their top back to the kernel only to fault it
/// in again: ~38 page faults per enrollment profile and 15% fewer profiles/s without this.
///
/// Call it first thing in `main`, before any other thread is started: glibc's `mallopt` is not
/// safe to call while other threads allocate.
pub fn pad_glibc_heaps() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const TOP_PAD: libc::c_int = 4 << 20;
        // SAFETY: mallopt sets one of glibc's tuning parameters and touches no memory of ours;
        // callers run it before any other thread exists (above).
        unsafe {
            libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
        }
    }
}
