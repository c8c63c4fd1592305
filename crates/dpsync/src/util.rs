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

/// `1 target`, `3 targets`: a count and its noun, for output people read (the nouns
/// used take an `s`).
/// A moment (Unix milliseconds) relative to now, for people: `in 29 min`, `12 s ago`.
pub fn when(at_ms: i64) -> String {
    let now = dpsync_store::now_ms();
    let d = (at_ms - now).abs() / 1000;
    let span = match d {
        0..=119 => format!("{d} s"),
        120..=7199 => format!("{} min", d / 60),
        7200..=172_799 => format!("{} h", d / 3600),
        _ => format!("{} d", d / 86_400),
    };
    if at_ms >= now { format!("in {span}") } else { format!("{span} ago") }
}

pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// Writes command output to stdout. When the reader went away (`dpsync status | head -1`),
/// the command ends there, quietly and successfully, like a filter whose reader has all
/// it wanted; other write errors end it with a one-line reason. (SIGPIPE stays ignored:
/// with it the admin socket's errors would kill the client without a word.)
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "dpsync: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`write_out`].
macro_rules! outln {
    () => {
        $crate::util::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::util::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plural_takes_an_s_except_for_one() {
        assert_eq!(plural(0, "target"), "0 targets");
        assert_eq!(plural(1, "target"), "1 target");
        assert_eq!(plural(2, "file"), "2 files");
    }
}
