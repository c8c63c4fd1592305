//! Source reads stay beneath the source folder: no component of a path is ever a
//! followed symlink, for `openat2` and for the `openat` chain that replaces it on older
//! kernels, and a writer racing the reader cannot make it read or list anything outside.

use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dpsync_hash::{ChunkParams, RelPath};
use dpsync_library::Library;
use dpsync_scan::{FileStat, Resolver, ScanKind, SourceChanged, SourceKind, SourceRoot};

fn rel(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

/// The resolvers this kernel can run: `Openat2` is left out (with a note) where the
/// kernel lacks `openat2` or a seccomp filter refuses it.
fn resolvers(root: &Path) -> Vec<Resolver> {
    let mut out = vec![Resolver::Chain, Resolver::Auto];
    let probe = SourceRoot::open_with(root, Resolver::Openat2).unwrap();
    // A nested path, so that the parent is opened with openat2 (ENOSYS = 38, EPERM = 1).
    match probe.stat(&rel("no-such/entry")) {
        Err(e) if matches!(e.raw_os_error(), Some(38 | 1)) => {
            eprintln!("openat2 is unavailable here ({e}); testing the openat chain only");
        }
        _ => out.push(Resolver::Openat2),
    }
    out
}

fn assert_changed(r: std::io::Result<impl std::fmt::Debug>, path: &str, case: &str) {
    let e = r.expect_err(&format!("{case}: {path} must be refused"));
    let c = SourceChanged::of(&e).unwrap_or_else(|| panic!("{case}: {path}: not a SourceChanged error: {e:?}"));
    assert_eq!(c.path, path, "{case}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(path) && msg.contains("changed while it was read") && msg.contains("refresh again"),
        "{msg}"
    );
}

/// `src/` (the source folder) and `outside/` beside it, holding a secret.
struct Trees {
    _t: tempfile::TempDir,
    src: PathBuf,
    outside: PathBuf,
}

const OUTSIDE: &[u8] = b"OUTSIDE-FOLDER-SECRET-7f3a9c1e-never-publish";
const INSIDE: &[u8] = b"the package's own secret.txt, fine to publish";

fn trees() -> Trees {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let outside = t.path().join("outside");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(src.join("d/secret.txt"), INSIDE).unwrap();
    fs::write(src.join("a/b/file.txt"), b"inner").unwrap();
    fs::write(src.join("top.txt"), b"top").unwrap();
    fs::write(outside.join("secret.txt"), OUTSIDE).unwrap();
    fs::write(outside.join("sub/secret.txt"), OUTSIDE).unwrap();
    fs::write(outside.join("only-outside.txt"), OUTSIDE).unwrap();
    Trees { _t: t, src, outside }
}

#[test]
fn no_component_of_a_read_path_may_be_a_symlink() {
    let t = trees();
    for resolver in resolvers(&t.src) {
        let case = format!("{resolver:?}");
        let root = SourceRoot::open_with(&t.src, resolver).unwrap();
        assert_eq!(root.resolver(), resolver);
        // The tree as it should be: files read, entries stat'ed.
        let mut got = Vec::new();
        root.open_file(&rel("d/secret.txt")).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, INSIDE, "{case}");
        got.clear();
        root.open_file(&rel("a/b/file.txt")).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, b"inner", "{case}");
        assert_eq!(root.stat(&rel("a/b")).unwrap().kind, SourceKind::Dir, "{case}");
        assert_eq!(root.stat(&rel("a/b/file.txt")).unwrap().stat.size, 5, "{case}");

        // `d` swapped for a symlink to the outside folder: first component.
        fs::rename(t.src.join("d"), t.src.join("d.away")).unwrap();
        symlink(&t.outside, t.src.join("d")).unwrap();
        assert_changed(root.open_file(&rel("d/secret.txt")), "d/secret.txt", &case);
        assert_changed(root.open_file(&rel("d/sub/secret.txt")), "d/sub/secret.txt", &case);
        assert_changed(root.stat(&rel("d/secret.txt")), "d/secret.txt", &case);
        assert_changed(root.read_link(&rel("d/secret.txt")), "d/secret.txt", &case);
        // The link itself is an entry like any other: stat'ed and read as a link.
        assert_eq!(root.stat(&rel("d")).unwrap().kind, SourceKind::Symlink, "{case}");
        assert_eq!(root.read_link(&rel("d")).unwrap(), t.outside, "{case}");
        fs::remove_file(t.src.join("d")).unwrap();
        fs::rename(t.src.join("d.away"), t.src.join("d")).unwrap();

        // An intermediate component, outside and inside the tree alike.
        fs::rename(t.src.join("a/b"), t.src.join("a/b.away")).unwrap();
        symlink(&t.outside, t.src.join("a/b")).unwrap();
        assert_changed(root.open_file(&rel("a/b/secret.txt")), "a/b/secret.txt", &case);
        assert_changed(root.open_file(&rel("a/b/sub/secret.txt")), "a/b/sub/secret.txt", &case);
        assert_changed(root.stat(&rel("a/b/sub/secret.txt")), "a/b/sub/secret.txt", &case);
        fs::remove_file(t.src.join("a/b")).unwrap();
        symlink("b.away", t.src.join("a/b")).unwrap();
        assert_changed(root.open_file(&rel("a/b/file.txt")), "a/b/file.txt", &case);
        fs::remove_file(t.src.join("a/b")).unwrap();
        fs::rename(t.src.join("a/b.away"), t.src.join("a/b")).unwrap();

        // The file itself a symlink, out of the tree or in it: never followed for reading.
        symlink(t.outside.join("secret.txt"), t.src.join("top-link")).unwrap();
        symlink("a/b/file.txt", t.src.join("in-link")).unwrap();
        assert_changed(root.open_file(&rel("top-link")), "top-link", &case);
        assert_changed(root.open_file(&rel("in-link")), "in-link", &case);
        assert_eq!(root.read_link(&rel("in-link")).unwrap(), Path::new("a/b/file.txt"), "{case}");
        fs::remove_file(t.src.join("top-link")).unwrap();
        fs::remove_file(t.src.join("in-link")).unwrap();

        // Not a regular file: a folder, a FIFO (without waiting for a writer).
        let e = root.open_file(&rel("a")).unwrap_err();
        assert!(SourceChanged::of(&e).is_some_and(|c| c.what.contains("regular file")), "{case}: {e}");
        assert!(std::process::Command::new("mkfifo").arg(t.src.join("fifo")).status().unwrap().success());
        let e = root.open_file(&rel("fifo")).unwrap_err();
        assert!(SourceChanged::of(&e).is_some_and(|c| c.what.contains("regular file")), "{case}: {e}");
        assert_eq!(root.stat(&rel("fifo")).unwrap().kind, SourceKind::Special, "{case}");
        fs::remove_file(t.src.join("fifo")).unwrap();

        // Missing is still "not found", so a refresh can say the file vanished.
        assert_eq!(root.open_file(&rel("a/nope")).unwrap_err().kind(), std::io::ErrorKind::NotFound, "{case}");
    }
}

#[test]
fn the_scan_stats_what_the_refresh_fstats() {
    let t = trees();
    for resolver in resolvers(&t.src) {
        let root = SourceRoot::open_with(&t.src, resolver).unwrap();
        let scan = root.scan().unwrap();
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
        for e in scan.entries.iter().filter(|e| e.kind == ScanKind::File) {
            let opened = root.open_file(&e.path).unwrap();
            assert_eq!(e.stat, FileStat::of(&opened.metadata().unwrap()), "{resolver:?} {}", e.path);
            assert_eq!(root.stat(&e.path).unwrap().stat, e.stat, "{resolver:?} {}", e.path);
        }
    }
}

#[test]
fn both_resolvers_scan_alike_and_refuse_links_that_resolve_outside() {
    let t = trees();
    // Lexically inside, but `sub/up` is the root itself, so `up-and-out` leaves it.
    fs::create_dir(t.src.join("sub")).unwrap();
    symlink("..", t.src.join("sub/up")).unwrap();
    symlink("sub/up/..", t.src.join("up-and-out")).unwrap();
    symlink("d/secret.txt", t.src.join("fine")).unwrap();
    symlink(&t.outside, t.src.join("abs")).unwrap();
    let mut seen = Vec::new();
    for resolver in resolvers(&t.src) {
        let s = SourceRoot::open_with(&t.src, resolver).unwrap().scan().unwrap();
        let problems: Vec<_> = s.problems.iter().map(|p| p.path.clone()).collect();
        assert_eq!(problems, ["abs", "up-and-out"], "{resolver:?}: {:?}", s.problems);
        assert!(s.problems.iter().all(|p| p.reason.contains("outside")), "{resolver:?}: {:?}", s.problems);
        let paths: Vec<_> = s.entries.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, ["a", "a/b", "a/b/file.txt", "d", "d/secret.txt", "fine", "sub", "sub/up", "top.txt"]);
        seen.push(s.entries);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
}

/// Scans for `needle` in every object of a library.
fn library_holds(lib: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut dirs = vec![lib.join("objects")];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else if fs::read(e.path()).unwrap().windows(needle.len()).any(|w| w == needle) {
                hits.push(e.path());
            }
        }
    }
    hits
}

/// Swaps `src/d` for a symlink to `outside` and back until `stop`, holding each state
/// for a random 0–3 ms (busy-waiting with yields: no fixed sleeps). Returns the swaps made.
fn swapper(src: PathBuf, outside: PathBuf, stop: Arc<AtomicBool>) -> u64 {
    let (d, away) = (src.join("d"), src.join("d.away"));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut hold = |max_us: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let until = Instant::now() + Duration::from_micros(seed % max_us);
        while Instant::now() < until {
            std::thread::yield_now();
        }
    };
    let mut swaps = 0;
    while !stop.load(Ordering::Relaxed) {
        fs::rename(&d, &away).unwrap();
        symlink(&outside, &d).unwrap();
        hold(3000);
        fs::remove_file(&d).unwrap();
        fs::rename(&away, &d).unwrap();
        hold(1000);
        swaps += 1;
    }
    swaps
}

/// The bug report's attack, against the code path a refresh runs: open the root, scan,
/// open every file through the root and import it into a content library.
#[test]
fn a_writer_swapping_a_folder_for_a_symlink_never_leaks_what_is_outside() {
    let t = trees();
    for i in 0..40 {
        fs::write(t.src.join(format!("d/f{i}.txt")), format!("inside {i}")).unwrap();
    }
    let lib_dir = t._t.path().join("library");
    let lib = Arc::new(Library::open(&lib_dir).unwrap());
    let params = ChunkParams::default();
    // `Auto` is `openat2` on kernels that have it (the other tests cover `Openat2` alone).
    for resolver in [Resolver::Chain, Resolver::Auto] {
        let stop = Arc::new(AtomicBool::new(false));
        let swapping = {
            let (src, outside, stop) = (t.src.clone(), t.outside.clone(), stop.clone());
            std::thread::spawn(move || swapper(src, outside, stop))
        };
        let (refused, read) = (AtomicU64::new(0), AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut rounds = 0;
        while rounds < 300 && Instant::now() < deadline {
            rounds += 1;
            let root = SourceRoot::open_with(&t.src, resolver).unwrap();
            let scan = root.scan().unwrap();
            for e in &scan.entries {
                assert!(!e.path.as_str().contains("only-outside"), "{resolver:?}: the scan listed {}", e.path);
            }
            if !scan.problems.is_empty() {
                refused.fetch_add(1, Ordering::Relaxed);
            }
            let batch = lib.import_batch();
            let mut hashes = Vec::new();
            for e in scan.entries.iter().filter(|e| e.kind == ScanKind::File) {
                match root.open_file(&e.path) {
                    Ok(f) => {
                        hashes.push((e.path.clone(), batch.import(&f, &params).unwrap().digest.hash));
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) if SourceChanged::of(&err).is_some() => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => panic!("{resolver:?}: {}: {err}", e.path),
                }
            }
            batch.finish().unwrap();
            for (path, hash) in hashes {
                let stored = fs::read(lib.object_path(&hash)).unwrap();
                assert!(
                    !stored.windows(OUTSIDE.len()).any(|w| w == OUTSIDE),
                    "{resolver:?}, round {rounds}: {path} was read from outside the source folder"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapping.join().unwrap();
        let (refused, read) = (refused.into_inner(), read.into_inner());
        eprintln!("{resolver:?}: {rounds} rounds, {swaps} swaps, {read} files read, {refused} refusals");
        assert!(swaps > 0 && read > 0, "{resolver:?}: the race did not run");
        assert!(refused > 0, "{resolver:?}: the reader never met the swapped folder; the test proves nothing");
        assert_eq!(library_holds(&lib_dir, OUTSIDE), Vec::<PathBuf>::new(), "{resolver:?}");
    }
}
