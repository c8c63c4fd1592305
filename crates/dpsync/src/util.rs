//! Small helpers shared by the daemons and the CLI.

/// Keeps the daemons' memory close to what they use at any moment.
///
/// glibc's allocator gives each thread that allocates under contention an arena of its
/// own (up to 8 per core) and keeps freed memory in them; with a blocking thread pool that
/// hashes, reads and decompresses 4 MiB batches, that held 100–250 MiB that no task was
/// using. Two arenas, and blocks of 1 MiB or more taken from and returned to the system
/// directly, keep a daemon's peak near its working set. An administrator's own
/// `GLIBC_TUNABLES` malloc settings win.
pub fn tune_allocator() {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc")) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread
    // is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

/// `1.5 MiB`-style sizes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[i]) }
}
