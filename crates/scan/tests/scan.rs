//! Scanner behaviour on real trees in a temp folder.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;

use dpsync_scan::{FilePlan, ScanCache, ScanError, ScanKind, plan, scan};

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}

#[test]
fn lists_files_dirs_and_inner_symlinks_sorted() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("b/c")).unwrap();
    std::fs::write(t.path().join("a.txt"), b"hello").unwrap();
    std::fs::write(t.path().join("b/c/d.bin"), vec![1u8; 1000]).unwrap();
    symlink("c/d.bin", t.path().join("b/link")).unwrap();
    let s = scan(t.path()).unwrap();
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    let paths: Vec<_> = s.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["a.txt", "b", "b/c", "b/c/d.bin", "b/link"]);
    assert_eq!(s.entries[3].stat.size, 1000);
    assert_eq!(s.entries[4].kind, ScanKind::Symlink { target: "c/d.bin".into() });
}

#[test]
fn reports_every_bad_entry_and_keeps_the_good_ones() {
    let t = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("good"), b"x").unwrap();
    symlink("../../etc/passwd", t.path().join("escape")).unwrap();
    symlink("/etc/passwd", t.path().join("absolute")).unwrap();
    symlink(outside.path(), t.path().join("abs-dir")).unwrap();
    let bad_name = std::ffi::OsStr::from_bytes(b"bad\xffname");
    std::fs::write(t.path().join(bad_name), b"x").unwrap();
    std::fs::create_dir(t.path().join(std::ffi::OsStr::from_bytes(b"dir\xfe"))).unwrap();
    std::fs::write(t.path().join(std::ffi::OsStr::from_bytes(b"dir\xfe")).join("inner"), b"x").unwrap();
    let fifo = t.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let s = scan(t.path()).unwrap();
    let paths: Vec<_> = s.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["good"]);
    let problems: Vec<String> = s.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 6, "{problems:#?}");
    assert!(problems.iter().any(|p| p.starts_with("escape:") && p.contains("outside")), "{problems:#?}");
    assert!(problems.iter().any(|p| p.starts_with("absolute:")), "{problems:#?}");
    assert!(problems.iter().any(|p| p.starts_with("abs-dir:")), "{problems:#?}");
    assert!(problems.iter().any(|p| p.contains("not valid UTF-8")), "{problems:#?}");
    assert!(problems.iter().any(|p| p.starts_with("fifo:") && p.contains("special file")), "{problems:#?}");
}

#[test]
fn problems_name_hostile_entries_on_one_line() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("a\nb.txt"), b"x").unwrap();
    let fifo = t.path().join("tab\there");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let s = scan(t.path()).unwrap();
    let problems: Vec<String> = s.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    for p in &problems {
        assert!(!p.chars().any(char::is_control), "a control character in {p:?}");
    }
    assert!(problems[0].starts_with("a\\nb.txt: "), "{problems:#?}");
    assert!(problems[1].starts_with("tab\\there: "), "{problems:#?}");
    let missing = scan(&t.path().join("new\nline")).unwrap_err().to_string();
    assert!(missing.contains("new\\nline") && !missing.contains('\n'), "{missing}");
}

#[test]
fn missing_and_non_directory_roots_are_errors() {
    let t = tempfile::tempdir().unwrap();
    assert!(matches!(scan(&t.path().join("nope")), Err(ScanError::Missing(_))));
    std::fs::write(t.path().join("f"), b"").unwrap();
    assert!(matches!(scan(&t.path().join("f")), Err(ScanError::NotADirectory(_))));
}

#[test]
fn plan_reuses_only_files_whose_stat_matches() {
    use dpsync_hash::{ChunkParams, Entry, EntryKind, Manifest, digest_stream};
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("same"), b"same").unwrap();
    std::fs::write(t.path().join("edited"), b"old").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(120));
    let first = scan(t.path()).unwrap().entries;
    let mut cache = ScanCache::default();
    let started = now_ns();
    let mut entries = Vec::new();
    for e in &first {
        let data = std::fs::read(t.path().join(e.path.as_str())).unwrap();
        let d = digest_stream(&data[..], &mut std::io::sink(), &ChunkParams::default()).unwrap();
        cache.record(e.path.as_str(), e.stat, started);
        entries.push(Entry {
            path: e.path.clone(),
            mode: e.mode,
            mtime_ns: e.stat.mtime_ns,
            kind: EntryKind::File { size: d.size, hash: d.hash, chunks: d.chunks.into() },
        });
    }
    let manifest = Manifest::new(entries).unwrap();
    let cache = ScanCache::decode(&cache.encode()).unwrap();
    assert_eq!(cache.len(), 2);

    std::fs::write(t.path().join("edited"), b"new").unwrap();
    std::fs::write(t.path().join("added"), b"added").unwrap();
    let p = plan(scan(t.path()).unwrap().entries, Some(&manifest), &cache, false);
    let decisions: Vec<_> =
        p.items.iter().map(|(e, d)| (e.path.as_str(), matches!(d, Some(FilePlan::Reuse { .. })))).collect();
    assert_eq!(decisions, [("added", false), ("edited", false), ("same", true)]);
    assert_eq!(p.bytes_to_read, 8);
    let all = plan(scan(t.path()).unwrap().entries, Some(&manifest), &cache, true);
    assert_eq!(all.files_to_read, 3);
}

#[test]
fn files_changed_within_the_racy_window_are_never_cached() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("fresh"), b"x").unwrap();
    let e = &scan(t.path()).unwrap().entries[0];
    let mut cache = ScanCache::default();
    cache.record("fresh", e.stat, now_ns());
    assert!(cache.get("fresh").is_none());
    cache.record("fresh", e.stat, now_ns() + 10_000_000_000);
    assert!(cache.get("fresh").is_some());
    assert!(ScanCache::decode(b"DPSC\x01\x00\x05\x00\x00\x00\x00\x00\x00\x00").is_err());
}
