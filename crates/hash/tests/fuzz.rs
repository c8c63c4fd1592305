//! Fuzzing of the untrusted-input surface of `dpsync-hash`, on stable Rust, with proptest:
//! the path rules (`RelPath::new`, `RelPath::from_bytes`), symlink resolution
//! (`resolve_symlink`, and whole manifests checked against the real kernel), and the
//! manifest decoder (`Manifest::decode`) on arbitrary, structure-aware and mutated input,
//! and the manifest delta decoder (`ManifestDelta::decode`, `apply`).
//!
//! Each property is bounded to a few seconds in the default test profile. To fuzz longer
//! (failures are saved to `fuzz.proptest-regressions` beside this file and replayed
//! first on every later run):
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release -p dpsync-hash --test fuzz
//! ```
//!
//! Every property asserts more than "does not panic": accepted paths obey the rules
//! (checked against an independent statement of them), resolved symlinks never leave
//! the package, and an accepted manifest is canonical and internally consistent. The
//! decoder's heap use is measured and must stay proportional to its input.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dpsync_hash::manifest::{FORMAT_VERSION, MAX_CHUNK_LEN};
use dpsync_hash::path::{MAX_COMPONENT_BYTES, MAX_PATH_BYTES, resolve_symlink};
use dpsync_hash::{
    Chunk, ChunkId, DecodeError, DecodeLimits, Entry, EntryKind, FileHash, Manifest, ManifestDelta, PathError, RelPath,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

// ---------------------------------------------------------------------------------------
// Heap probe: live and peak bytes allocated by the current thread, so a property can show
// that a decoder never sizes memory from an untrusted count.
// ---------------------------------------------------------------------------------------

#[allow(unsafe_code)]
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(delta: isize) {
        let _ = LIVE.try_with(|l| {
            let now = l.get() + delta;
            l.set(now);
            let _ = PEAK.try_with(|p| {
                if now > p.get() {
                    p.set(now);
                }
            });
        });
    }

    #[derive(Debug)]
    pub struct Probe;

    // SAFETY: every call is forwarded unchanged to the system allocator; the probe only
    // updates const-initialised thread-locals that never allocate.
    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            add(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    /// Runs `f`; returns its result and the most heap it held at once above what was live
    /// when it started.
    pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        (out, (PEAK.with(Cell::get) - base).max(0) as usize)
    }
}

#[global_allocator]
static GLOBAL: heap::Probe = heap::Probe;

// ---------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------

/// `PROPTEST_CASES` when set, else `default` (chosen so each property takes ~1–3 s).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// The path rules, stated independently of `dpsync_hash::path`
// ---------------------------------------------------------------------------------------

fn spec_component_ok(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && c.len() <= MAX_COMPONENT_BYTES
}

/// The documented rules: UTF-8 (given), non-empty, at most 4096 bytes, relative, no
/// control character (NUL included), no backslash, no empty / `.` / `..` component,
/// components of at most 255 bytes.
fn spec_path_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PATH_BYTES
        && !s.starts_with('/')
        && !s.chars().any(|c| c.is_control())
        && !s.contains('\\')
        && s.split('/').all(spec_component_ok)
}

/// Pieces that sit on the rules' edges; paths are built by concatenating them.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z]{1,3}",
        2 => Just("/".to_owned()),
        1 => Just("//".to_owned()),
        2 => Just(".".to_owned()),
        2 => Just("..".to_owned()),
        1 => Just("...".to_owned()),
        1 => Just("\\".to_owned()),
        1 => Just("\0".to_owned()),
        1 => Just("\n".to_owned()),
        1 => Just("\u{7f}".to_owned()),
        1 => Just("\u{85}".to_owned()),   // C1 control (NEL)
        1 => Just("\u{202e}".to_owned()), // right-to-left override: not a control char
        1 => Just("é".to_owned()),
        1 => Just(" ".to_owned()),
        1 => Just("%2e%2e".to_owned()),
        1 => Just("a".repeat(MAX_COMPONENT_BYTES)),
        1 => Just("b".repeat(MAX_COMPONENT_BYTES + 1)),
        1 => Just("ü".repeat(128)), // 256 bytes in 128 chars
    ]
}

fn edgy_path() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::collection::vec(piece(), 0..12).prop_map(|v| v.concat()),
        2 => any::<String>(),
        // Around the 4096-byte limit: n components "ab/" then a tail.
        2 => (2030usize..2060, prop::sample::select(vec!["c", "cd", "", "/", "..", "é"]))
            .prop_map(|(n, tail)| format!("{}{tail}", "ab/".repeat(n).trim_end_matches('/'))),
        1 => (4090usize..4100).prop_map(|n| "x".repeat(n)),
    ]
}

/// A valid path (components only from `[a-z]{1,3}`).
fn valid_path(max_depth: usize) -> impl Strategy<Value = RelPath> {
    prop::collection::vec("[a-z]{1,3}", 1..=max_depth).prop_map(|v| RelPath::new(v.join("/")).unwrap())
}

fn check_accepted(p: &RelPath, input: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(p.as_str(), input);
    prop_assert!(spec_path_ok(p.as_str()), "accepted a path that breaks the rules: {:?}", input);
    prop_assert_eq!(p.components().collect::<Vec<_>>().join("/"), input);
    prop_assert!(p.components().all(spec_component_ok));
    prop_assert_eq!(p.to_string(), input);
    if let Some(parent) = p.parent() {
        prop_assert!(RelPath::new(parent.as_str()).is_ok(), "parent {:?} of {:?} is invalid", parent, input);
        prop_assert!(input.starts_with(parent.as_str()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(20_000))]

    /// `RelPath::new` accepts exactly the paths the rules allow, never panics, and what it
    /// accepts round-trips.
    #[test]
    fn relpath_new_matches_the_rules(s in edgy_path()) {
        let spec = spec_path_ok(&s);
        match RelPath::new(s.clone()) {
            Ok(p) => check_accepted(&p, &s)?,
            Err(e) => {
                prop_assert!(!spec, "refused a valid path {:?}: {}", s, e);
                // The message names the problem without echoing unbounded input.
                let _ = e.to_string();
            }
        }
        prop_assert_eq!(RelPath::new(s.clone()).is_ok(), spec, "{:?}", s);
    }

    /// `RelPath::from_bytes` on arbitrary bytes: never panics; accepts only UTF-8 that
    /// `RelPath::new` accepts.
    #[test]
    fn relpath_from_bytes_matches_new(
        raw in prop_oneof![
            3 => prop::collection::vec(any::<u8>(), 0..64),
            3 => (edgy_path(), any::<usize>(), any::<u8>()).prop_map(|(s, i, b)| {
                let mut v = s.into_bytes();
                let at = i % (v.len() + 1);
                v.insert(at, b);
                v
            }),
            1 => Just(b"a\xffb".to_vec()),
            1 => Just(b"\xc0\xaf".to_vec()), // overlong '/'
            1 => Just(b"a/\xed\xa0\x80".to_vec()), // surrogate
        ]
    ) {
        let got = RelPath::from_bytes(&raw);
        match std::str::from_utf8(&raw) {
            Ok(s) => {
                prop_assert_eq!(got.is_ok(), spec_path_ok(s), "{:?}", s);
                if let Ok(p) = &got {
                    check_accepted(p, s)?;
                }
            }
            Err(_) => prop_assert!(matches!(got, Err(PathError::NotUtf8(_))), "non-UTF-8 accepted: {:?}", raw),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Symlinks
// ---------------------------------------------------------------------------------------

/// The lexical resolution the rules describe: `None` when the target climbs above the
/// package root (or is otherwise refused), `Some("")` for the root itself.
fn spec_resolve(link: &RelPath, target: &str) -> Option<String> {
    if target.is_empty()
        || target.starts_with('/')
        || target.contains('\\')
        || target.len() > MAX_PATH_BYTES
        || target.chars().any(|c| c.is_control())
    {
        return None;
    }
    let mut stack: Vec<&str> = link.components().collect();
    stack.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                stack.pop()?;
            }
            c => stack.push(c),
        }
    }
    let joined = stack.join("/");
    if joined.is_empty() || spec_path_ok(&joined) { Some(joined) } else { None }
}

fn symlink_target() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(
            prop_oneof![3 => Just(".."), 3 => Just("x"), 1 => Just("."), 1 => Just(""), 1 => Just("yy")],
            1..10
        ).prop_map(|v| v.join("/")),
        2 => edgy_path(),
    ]
}

proptest! {
    #![proptest_config(config(20_000))]

    /// `resolve_symlink` never panics, never returns a path outside the package, and
    /// agrees with the lexical rule.
    #[test]
    fn resolve_symlink_never_escapes(link in valid_path(6), target in symlink_target()) {
        let got = resolve_symlink(&link, &target);
        let expected = spec_resolve(&link, &target);
        match (&got, &expected) {
            (Ok(None), Some(e)) => prop_assert_eq!(e.as_str(), ""),
            (Ok(Some(p)), Some(e)) => {
                prop_assert_eq!(p.as_str(), e.as_str());
                prop_assert!(spec_path_ok(p.as_str()));
            }
            (Err(PathError::SymlinkEscapes { .. }), None) => {}
            _ => prop_assert!(false, "{} -> {:?}: got {:?}, the rules say {:?}", link, target, got, expected),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Symlink chains, checked against the kernel: an accepted manifest is materialised (its
// folders and symlinks) under a deep jail, and every `..` step of every symlink target is
// resolved by the kernel (`canonicalize`), which follows the other symlinks on the way.
// Whatever the kernel reaches must be inside the package.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Node {
    Dir,
    Link(String),
}

fn tree_strategy() -> impl Strategy<Value = Vec<(String, Node)>> {
    let names = prop::sample::select(vec!["a", "b", "c", "s", "t"]);
    let step = prop::sample::select(vec!["a", "b", "c", "s", "t", "..", "..", "."]);
    let node = prop_oneof![
        2 => Just(None),
        3 => prop::collection::vec(step, 1..7).prop_map(|v| Some(v.join("/"))),
    ];
    prop::collection::vec((any::<usize>(), names, node), 1..14).prop_map(|specs| {
        let mut dirs: Vec<String> = Vec::new();
        let mut out: Vec<(String, Node)> = Vec::new();
        for (parent, name, node) in specs {
            let parent = match parent % (dirs.len() + 1) {
                0 => String::new(),
                i => format!("{}/", dirs[i - 1]),
            };
            let path = format!("{parent}{name}");
            if out.iter().any(|(p, _)| *p == path) {
                continue;
            }
            match node {
                None => {
                    dirs.push(path.clone());
                    out.push((path, Node::Dir));
                }
                Some(t) => out.push((path, Node::Link(t))),
            }
        }
        out
    })
}

fn entries_of(tree: &[(String, Node)]) -> Vec<Entry> {
    tree.iter()
        .map(|(p, n)| Entry {
            path: RelPath::new(p.clone()).unwrap(),
            mode: 0o755,
            mtime_ns: 0,
            kind: match n {
                Node::Dir => EntryKind::Dir,
                Node::Link(t) => EntryKind::Symlink { target: t.clone() },
            },
        })
        .collect()
}

/// A fresh directory five levels below a scratch directory, so that climbing out of the
/// package lands in folders that exist (and `canonicalize` can report where).
struct Jail {
    top: PathBuf,
    root: PathBuf,
}

impl Jail {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let top = std::env::temp_dir().join(format!(
            "dpsync-hash-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let root = top.join("j1/j2/j3/j4/pkg");
        std::fs::create_dir_all(&root).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        Self { top, root }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

/// Where the kernel leads each `..` step of each symlink of `m` materialised at `root`:
/// the first step that lands outside `root`, if any.
fn kernel_escape(m: &Manifest, root: &Path) -> Option<String> {
    for e in m.entries() {
        let dest = root.join(e.path.as_str());
        match &e.kind {
            EntryKind::Dir => std::fs::create_dir(&dest).unwrap(),
            EntryKind::Symlink { target } => std::os::unix::fs::symlink(target, &dest).unwrap(),
            EntryKind::File { .. } => std::fs::write(&dest, b"").unwrap(),
        }
    }
    for e in m.entries() {
        let EntryKind::Symlink { target } = &e.kind else { continue };
        let base = match e.path.parent() {
            Some(p) => root.join(p.as_str()),
            None => root.to_owned(),
        };
        let parts: Vec<&str> = target.split('/').collect();
        for k in 0..parts.len() {
            if parts[k] != ".." {
                continue;
            }
            let probe = base.join(parts[..=k].join("/"));
            if let Ok(real) = std::fs::canonicalize(&probe)
                && !real.starts_with(root)
            {
                return Some(format!(
                    "{} -> {target}: step {:?} reaches {}",
                    e.path,
                    parts[..=k].join("/"),
                    real.display()
                ));
            }
        }
    }
    None
}

proptest! {
    #![proptest_config(config(1_500))]

    /// No manifest that `Manifest::new` (and so the decoder) accepts holds a symlink whose
    /// target, as the kernel resolves it through the other symlinks, leaves the package.
    #[test]
    fn accepted_symlinks_never_escape_through_the_kernel(tree in tree_strategy()) {
        let Ok(m) = Manifest::new(entries_of(&tree)) else { return Ok(()) };
        // The decoder accepts exactly the same manifest.
        let again = Manifest::decode(&m.encode(), &DecodeLimits::default());
        prop_assert_eq!(again.as_ref(), Ok(&m));
        let jail = Jail::new();
        if let Some(escape) = kernel_escape(&m, &jail.root) {
            prop_assert!(false, "accepted manifest escapes the package: {}", escape);
        }
    }
}

/// Regression: each link is lexically inside the package, but `s` points at the package
/// root, so the kernel resolves `s/..` above it. Before the chain check, the decoder
/// accepted this and a DP installed `t`, a working link to a file outside its data.
#[test]
fn symlink_chain_through_a_root_link_is_refused() {
    let link = |p: &str, t: &str| Entry {
        path: RelPath::new(p).unwrap(),
        mode: 0o777,
        mtime_ns: 0,
        kind: EntryKind::Symlink { target: t.into() },
    };
    let dir = |p: &str| Entry { path: RelPath::new(p).unwrap(), mode: 0o755, mtime_ns: 0, kind: EntryKind::Dir };
    // In each case the kernel's `s/..` is the parent of the package root (or above it),
    // while the lexical reading of `s/..` stays inside.
    let cases: Vec<Vec<Entry>> = vec![
        vec![link("s", "."), link("t", "s/../etc/passwd")],
        vec![dir("a"), dir("a/b"), link("a/b/s", "../.."), link("a/b/t", "s/../../x")],
        vec![dir("a"), link("a/r", ".."), link("a/s", "r"), link("a/t", "s/../y")],
    ];
    for entries in cases {
        for e in &entries {
            if let EntryKind::Symlink { target } = &e.kind {
                assert!(resolve_symlink(&e.path, target).is_ok(), "each link alone is lexically inside");
            }
        }
        let desc = format!("{entries:?}");
        let new = Manifest::new(entries.clone());
        assert!(
            matches!(new, Err(DecodeError::Path { source: PathError::SymlinkEscapes { .. }, .. })),
            "{desc}: {new:?}"
        );
        // The same bytes on the wire are refused by the decoder.
        let mut raw = b"DPSM".to_vec();
        raw.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        raw.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| a.path.as_str().cmp(b.path.as_str()));
        for e in &sorted {
            let p = e.path.as_str().as_bytes();
            raw.extend_from_slice(&(p.len() as u16).to_le_bytes());
            raw.extend_from_slice(p);
            match &e.kind {
                EntryKind::Dir => raw.push(0),
                _ => raw.push(2),
            }
            raw.extend_from_slice(&e.mode.to_le_bytes());
            raw.extend_from_slice(&e.mtime_ns.to_le_bytes());
            if let EntryKind::Symlink { target } = &e.kind {
                raw.extend_from_slice(&(target.len() as u16).to_le_bytes());
                raw.extend_from_slice(target.as_bytes());
            }
        }
        let decoded = Manifest::decode(&raw, &DecodeLimits::default());
        assert!(
            matches!(decoded, Err(DecodeError::Path { source: PathError::SymlinkEscapes { .. }, .. })),
            "{desc}: {decoded:?}"
        );
    }
    // Links through links that stay inside are still fine, and so are loops (the kernel
    // refuses those itself).
    let ok: Vec<Vec<Entry>> = vec![
        vec![dir("a"), dir("a/b"), link("a/b/s", ".."), link("a/b/t", "s/../x")],
        vec![dir("d"), link("cur", "d"), link("t", "cur/../d/f")],
        vec![link("l1", "l2/x"), link("l2", "l1/x")],
        vec![link("s", "."), link("t", "s/s/s/x")],
    ];
    for entries in ok {
        let desc = format!("{entries:?}");
        assert!(Manifest::new(entries).is_ok(), "{desc}");
    }
}

/// A long chain of links, each used as a folder by the next, is checked in linear time and
/// without deep recursion.
#[test]
fn long_symlink_chains_are_checked_quickly() {
    let n = 20_000;
    let mut entries = vec![Entry { path: RelPath::new("d").unwrap(), mode: 0o755, mtime_ns: 0, kind: EntryKind::Dir }];
    for i in 0..n {
        let target = if i == 0 { "d".to_owned() } else { format!("l{:05}/../d", i - 1) };
        entries.push(Entry {
            path: RelPath::new(format!("l{i:05}")).unwrap(),
            mode: 0o777,
            mtime_ns: 0,
            kind: EntryKind::Symlink { target },
        });
    }
    let started = Instant::now();
    let _ = Manifest::new(entries);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// Manifest::decode
// ---------------------------------------------------------------------------------------

/// Builds raw manifest bytes entry by entry, any field any value.
#[derive(Debug, Clone)]
enum RawEntry {
    Dir { path: Vec<u8>, mode: u32 },
    File { path: Vec<u8>, size: u64, chunk_count: u32, chunks: Vec<u32> },
    Link { path: Vec<u8>, target: Vec<u8> },
    Unknown { path: Vec<u8>, kind: u8 },
}

fn raw_path() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::sample::select(vec!["a", "b", "a/b", "a/c", "b/a", "a/b/c", "c"]).prop_map(|s| s.as_bytes().to_vec()),
        2 => edgy_path().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ]
}

fn raw_entry() -> impl Strategy<Value = RawEntry> {
    let chunk_len = prop_oneof![4 => 1u32..5000, 1 => Just(0u32), 1 => Just(MAX_CHUNK_LEN), 1 => Just(MAX_CHUNK_LEN + 1), 1 => any::<u32>()];
    prop_oneof![
        3 => (raw_path(), prop_oneof![4 => Just(0o755u32), 1 => any::<u32>()]).prop_map(|(path, mode)| RawEntry::Dir { path, mode }),
        3 => (raw_path(), prop::collection::vec(chunk_len, 0..4), prop_oneof![4 => Just(None), 1 => Just(Some(u32::MAX)), 1 => any::<u32>().prop_map(Some)], prop_oneof![4 => Just(None), 1 => any::<u64>().prop_map(Some)])
            .prop_map(|(path, chunks, count, size)| RawEntry::File {
                path,
                size: size.unwrap_or_else(|| chunks.iter().map(|&c| u64::from(c)).sum()),
                chunk_count: count.unwrap_or(chunks.len() as u32),
                chunks,
            }),
        2 => (raw_path(), prop_oneof![3 => symlink_target().prop_map(String::into_bytes), 1 => prop::collection::vec(any::<u8>(), 0..6)])
            .prop_map(|(path, target)| RawEntry::Link { path, target }),
        1 => (raw_path(), 3u8..=255).prop_map(|(path, kind)| RawEntry::Unknown { path, kind }),
    ]
}

fn encode_raw(entries: &[RawEntry], count: Option<u64>) -> Vec<u8> {
    let mut out = b"DPSM".to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&count.unwrap_or(entries.len() as u64).to_le_bytes());
    let head = |out: &mut Vec<u8>, path: &[u8], kind: u8, mode: u32| {
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(path);
        out.push(kind);
        out.extend_from_slice(&mode.to_le_bytes());
        out.extend_from_slice(&7i64.to_le_bytes());
    };
    for e in entries {
        match e {
            RawEntry::Dir { path, mode } => head(&mut out, path, 0, *mode),
            RawEntry::File { path, size, chunk_count, chunks } => {
                head(&mut out, path, 1, 0o644);
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&[0x11; 32]);
                out.extend_from_slice(&chunk_count.to_le_bytes());
                for (i, len) in chunks.iter().enumerate() {
                    out.extend_from_slice(&[i as u8; 32]);
                    out.extend_from_slice(&len.to_le_bytes());
                }
            }
            RawEntry::Link { path, target } => {
                head(&mut out, path, 2, 0o777);
                out.extend_from_slice(&(target.len() as u16).to_le_bytes());
                out.extend_from_slice(target);
            }
            RawEntry::Unknown { path, kind } => head(&mut out, path, *kind, 0),
        }
    }
    out
}

/// A valid manifest to mutate: a few folders, files and symlinks.
fn valid_manifest() -> impl Strategy<Value = Manifest> {
    (0usize..4, 0usize..6, any::<u64>()).prop_map(|(dirs, files, seed)| {
        let mut entries = Vec::new();
        let mut parents = vec![String::new()];
        for i in 0..dirs {
            let p = format!("{}d{i}", parents[(seed as usize + i) % parents.len()]);
            entries.push(Entry {
                path: RelPath::new(p.clone()).unwrap(),
                mode: 0o755,
                mtime_ns: 1,
                kind: EntryKind::Dir,
            });
            parents.push(format!("{p}/"));
        }
        for i in 0..files {
            let p = format!("{}f{i}", parents[(seed as usize >> 3).wrapping_add(i) % parents.len()]);
            let chunks: Vec<Chunk> = (0..(i % 3))
                .map(|k| Chunk { id: ChunkId::from_bytes([(i * 7 + k) as u8; 32]), len: 100 + k as u32 })
                .collect();
            let size = chunks.iter().map(|c| u64::from(c.len)).sum();
            entries.push(Entry {
                path: RelPath::new(p).unwrap(),
                mode: 0o644,
                mtime_ns: seed as i64,
                kind: EntryKind::File { size, hash: FileHash::from_bytes([i as u8; 32]), chunks: chunks.into() },
            });
        }
        entries.push(Entry {
            path: RelPath::new("zlink").unwrap(),
            mode: 0o777,
            mtime_ns: 0,
            kind: EntryKind::Symlink { target: if dirs > 0 { "d0".into() } else { ".".into() } },
        });
        Manifest::new(entries).expect("valid by construction")
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    /// Copies a slice of the input over another place (duplicates entries or fields).
    Splice(usize, usize, usize),
    /// Overwrites 8 bytes with an extreme little-endian integer (counts, lengths, sizes).
    Extreme(usize, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..6)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), any::<usize>(), 1usize..64).prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
        2 => (any::<usize>(), prop::sample::select(vec![0u64, 1, 0xffff, 0xffff_ffff, 1 << 32, u64::MAX, i64::MAX as u64, 4_999_999]))
            .prop_map(|(i, v)| Mutation::Extreme(i, v)),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let len = b.len();
    match m {
        Mutation::Flip(i, x) if len > 0 => b[i % len] ^= x,
        Mutation::Set(i, v) if len > 0 => b[i % len] = *v,
        Mutation::Insert(i, v) => {
            let at = i % (len + 1);
            b.splice(at..at, v.iter().copied());
        }
        Mutation::Delete(i, n) if len > 0 => {
            let at = i % len;
            b.drain(at..(at + n).min(len));
        }
        Mutation::Truncate(i) => b.truncate(i % (len + 1)),
        Mutation::Splice(from, to, n) if len > 0 => {
            let from = from % len;
            let piece: Vec<u8> = b[from..(from + n).min(len)].to_vec();
            let to = to % (len + 1);
            b.splice(to..to, piece);
        }
        Mutation::Extreme(i, v) if len >= 8 => {
            let at = i % (len - 7);
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        _ => {}
    }
}

/// Decodes untrusted bytes and checks everything that must hold either way.
fn check_decode(bytes: &[u8]) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let (result, peak) = heap::peak_during(|| Manifest::decode(bytes, &DecodeLimits::default()));
    prop_assert!(
        started.elapsed() < Duration::from_secs(2),
        "decoding {} bytes took {:?}",
        bytes.len(),
        started.elapsed()
    );
    // Entries are ~100 bytes in memory for >= 15 on the wire, chunks 36 for 36, plus the
    // validator's folder set: a small multiple of the input, never a declared count.
    let bound = 64 * bytes.len() + (64 << 10);
    prop_assert!(peak <= bound, "decoding {} bytes held {} bytes of heap (bound {})", bytes.len(), peak, bound);
    match result {
        Ok(m) => {
            // Canonical: the decoder accepts only what the encoder produces.
            prop_assert!(m.encode() == bytes, "accepted a non-canonical encoding");
            let rebuilt = Manifest::new(m.entries().to_vec());
            prop_assert_eq!(rebuilt.as_ref(), Ok(&m));
            let mut prev: Option<&str> = None;
            for e in m.entries() {
                let p = e.path.as_str();
                prop_assert!(spec_path_ok(p), "accepted path {:?}", p);
                if let Some(q) = prev {
                    prop_assert!(q.as_bytes() < p.as_bytes(), "not sorted/unique: {:?} then {:?}", q, p);
                }
                prev = Some(p);
                if let Some(parent) = e.path.parent() {
                    prop_assert!(matches!(m.get(parent.as_str()).map(|x| &x.kind), Some(EntryKind::Dir)));
                }
                prop_assert!(e.mode <= 0o7777);
                match &e.kind {
                    EntryKind::File { size, chunks, .. } => {
                        prop_assert!(chunks.iter().all(|c| c.len >= 1 && c.len <= MAX_CHUNK_LEN));
                        prop_assert_eq!(chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(), *size);
                    }
                    EntryKind::Symlink { target } => {
                        prop_assert!(resolve_symlink(&e.path, target).is_ok());
                    }
                    EntryKind::Dir => {}
                }
            }
            let _ = m.content_root();
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(!msg.is_empty() && msg.len() < 16 << 10, "error message of {} bytes", msg.len());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(15_000))]

    #[test]
    fn decode_survives_arbitrary_bytes(
        header in prop_oneof![Just(None), any::<u64>().prop_map(Some), (0u64..6).prop_map(Some)],
        tail in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = Vec::new();
        if let Some(count) = header {
            bytes.extend_from_slice(b"DPSM");
            bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&count.to_le_bytes());
        }
        bytes.extend_from_slice(&tail);
        check_decode(&bytes)?;
    }

    #[test]
    fn decode_survives_structured_garbage(
        entries in prop::collection::vec(raw_entry(), 0..10),
        count in prop_oneof![6 => Just(None), 1 => any::<u64>().prop_map(Some), 1 => (0u64..12).prop_map(Some)],
    ) {
        check_decode(&encode_raw(&entries, count))?;
    }

    #[test]
    fn decode_survives_mutated_manifests(m in valid_manifest(), muts in prop::collection::vec(mutation(), 1..5)) {
        let mut bytes = m.encode();
        check_decode(&bytes)?;
        for mu in &muts {
            apply(&mut bytes, mu);
        }
        check_decode(&bytes)?;
    }
}

/// The same path 10,000 times (the hostile suite sends this over HTTP too): refused as
/// out of order, quickly, without holding much memory.
#[test]
fn ten_thousand_copies_of_one_path_are_refused() {
    let entries: Vec<RawEntry> = (0..10_000)
        .map(|_| RawEntry::File { path: b"same".to_vec(), size: 0, chunk_count: 0, chunks: vec![] })
        .collect();
    let bytes = encode_raw(&entries, None);
    let (r, peak) = heap::peak_during(|| Manifest::decode(&bytes, &DecodeLimits::default()));
    assert_eq!(r, Err(DecodeError::NotSorted { path: "same".into() }));
    assert!(peak < 64 * bytes.len(), "{peak}");
}

/// Declared counts and lengths that promise far more than the input holds are refused
/// without sizing anything from them.
#[test]
fn huge_declarations_do_not_allocate() {
    let cases: Vec<Vec<u8>> = vec![
        encode_raw(&[], Some(u64::MAX)),
        encode_raw(&[RawEntry::Dir { path: b"a".to_vec(), mode: 0o755 }], Some(4_999_999)),
        encode_raw(
            &[RawEntry::File { path: b"f".to_vec(), size: u64::MAX, chunk_count: u32::MAX, chunks: vec![] }],
            None,
        ),
        encode_raw(&[RawEntry::File { path: b"f".to_vec(), size: 3, chunk_count: 1 << 27, chunks: vec![1, 2] }], None),
    ];
    for bytes in cases {
        let (r, peak) = heap::peak_during(|| Manifest::decode(&bytes, &DecodeLimits { max_entries: u64::MAX }));
        assert!(r.is_err());
        assert!(peak < 64 << 10, "{} bytes of input held {peak} bytes", bytes.len());
    }
}

/// The decoder's checks report paths via `Debug`, which escapes control characters: a
/// hostile path cannot inject lines into a log.
#[test]
fn error_messages_escape_hostile_paths() {
    let bytes = encode_raw(&[RawEntry::Dir { path: b"a\nFAKE LOG LINE".to_vec(), mode: 0o755 }], None);
    let msg = Manifest::decode(&bytes, &DecodeLimits::default()).unwrap_err().to_string();
    assert!(!msg.contains('\n'), "{msg}");
}

// ---------------------------------------------------------------------------------------
// Manifest deltas: arbitrary bytes, and declarations that promise more than the input.
// ---------------------------------------------------------------------------------------

fn delta_header(removed: u64) -> Vec<u8> {
    let mut b = b"DPSD".to_vec();
    b.extend_from_slice(&dpsync_hash::delta::DELTA_FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&[7; 32]);
    b.extend_from_slice(&removed.to_le_bytes());
    b
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn delta_decode_survives_arbitrary_bytes(
        with_header in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut bytes = if with_header { delta_header(0) } else { Vec::new() };
        bytes.extend_from_slice(&tail);
        let (r, peak) = heap::peak_during(|| ManifestDelta::decode(&bytes, &DecodeLimits::default()));
        prop_assert!(peak < 64 * bytes.len() + (4 << 10), "{} bytes of input held {} bytes", bytes.len(), peak);
        if let Ok(d) = r {
            prop_assert!(d.encode() == bytes);
            let base = Manifest::default();
            // Applying to an empty base must not panic either.
            let _ = d.apply(&base);
        }
    }
}

#[test]
fn huge_delta_declarations_do_not_allocate() {
    let mut file_ops = delta_header(0);
    file_ops.extend_from_slice(&1u64.to_le_bytes());
    file_ops.extend_from_slice(&1u16.to_le_bytes());
    file_ops.push(b'f');
    file_ops.push(1);
    file_ops.extend_from_slice(&0o644u32.to_le_bytes());
    file_ops.extend_from_slice(&0i64.to_le_bytes());
    file_ops.extend_from_slice(&u64::MAX.to_le_bytes());
    file_ops.extend_from_slice(&[1; 32]);
    file_ops.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut literal = file_ops.clone();
    let n = literal.len();
    literal[n - 4..].copy_from_slice(&1u32.to_le_bytes());
    literal.push(1);
    literal.extend_from_slice(&u32::MAX.to_le_bytes());
    let cases = vec![delta_header(u64::MAX), delta_header(4_999_999), file_ops, literal];
    for bytes in cases {
        let (r, peak) = heap::peak_during(|| ManifestDelta::decode(&bytes, &DecodeLimits { max_entries: u64::MAX }));
        assert!(r.is_err());
        assert!(peak < 64 << 10, "{} bytes of input held {peak} bytes", bytes.len());
    }
}

/// Copy ops repeating a base range cannot make a small delta expand without bound.
#[test]
fn repeated_copies_are_bounded() {
    let chunks: Vec<Chunk> =
        (0..1000u32).map(|i| Chunk { id: ChunkId::from(blake3::hash(&i.to_le_bytes())), len: 1 }).collect();
    let base = Manifest::new(vec![Entry {
        path: RelPath::new("f").unwrap(),
        mode: 0o644,
        mtime_ns: 0,
        kind: EntryKind::File { size: 1000, hash: FileHash::from_bytes([1; 32]), chunks: chunks.into() },
    }])
    .unwrap();
    let d = dpsync_hash::ManifestDelta {
        base: base.content_root(),
        removed: vec![],
        upserts: vec![dpsync_hash::DeltaEntry {
            path: RelPath::new("f").unwrap(),
            mode: 0o644,
            mtime_ns: 0,
            kind: dpsync_hash::DeltaKind::File {
                size: u64::MAX,
                hash: FileHash::from_bytes([1; 32]),
                ops: vec![dpsync_hash::ChunkOp::Copy { start: 0, count: 1000 }; 40_000],
            },
        }],
    };
    let bytes = d.encode();
    assert!(bytes.len() < 400_000);
    let decoded = ManifestDelta::decode(&bytes, &DecodeLimits::default()).unwrap();
    let (r, peak) = heap::peak_during(|| decoded.apply(&base));
    assert_eq!(r, Err(dpsync_hash::DeltaError::TooManyChunks));
    // Refused from the op counts, before a single chunk is copied.
    assert!(peak < 1 << 20, "{peak}");
}
