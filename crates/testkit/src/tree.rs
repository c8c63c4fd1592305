//! Seeded source trees, and digests that compare trees on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::{Rng, write_random_file};

/// What [`gen_tree`] and the builders wrote: relative paths (with `/`) of files with
/// their sizes, of folders, and of symlinks with their targets.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub files: BTreeMap<String, u64>,
    pub dirs: BTreeSet<String>,
    pub symlinks: BTreeMap<String, String>,
}

impl Tree {
    pub fn file_count(&self) -> u64 {
        self.files.len() as u64
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.values().sum()
    }

    /// Records a folder and its ancestors.
    pub fn add_dir(&mut self, rel: &str) {
        let mut cur = String::new();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            self.dirs.insert(cur.clone());
        }
    }

    /// Writes a pseudo-random file under `root` ([`write_random_file`]) and records it
    /// (and its folders).
    pub fn add_file(&mut self, root: &Path, rel: &str, size: u64, seed: u64) {
        if let Some((dir, _)) = rel.rsplit_once('/') {
            self.add_dir(dir);
        }
        write_random_file(&root.join(rel), size, seed);
        self.files.insert(rel.to_owned(), size);
    }

    /// Creates a symlink under `root` and records it.
    pub fn add_symlink(&mut self, root: &Path, rel: &str, target: &str) {
        let p = root.join(rel);
        if let Some((dir, _)) = rel.rsplit_once('/') {
            self.add_dir(dir);
            fs::create_dir_all(root.join(dir)).unwrap_or_else(|e| panic!("create {}: {e}", root.join(dir).display()));
        }
        std::os::unix::fs::symlink(target, &p).unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self.symlinks.insert(rel.to_owned(), target.to_owned());
    }
}

/// Mixed into [`gen_tree`]'s seed: the trees the tests were written against came from
/// this state.
const GEN_TREE_SALT: u64 = 0x5DEE_CE66_D1CE_4E5B;

/// Writes a deterministic pseudo-random tree of `files` files under `root`: nested
/// folders up to four deep, about one file in eleven empty, one in 128 of 1–3 MiB, the
/// others sized in `size_range`, plus one empty folder `empty/`. File `i` holds
/// [`random_bytes`](crate::random_bytes) of seed `seed * 1_000_003 + i` (incompressible).
/// Same seed, same tree, byte for byte. Panics naming the path on I/O errors.
pub fn gen_tree(root: &Path, files: usize, seed: u64, size_range: Range<u64>) -> Tree {
    const MIB: u64 = 1 << 20;
    let mut rng = Rng::new(seed ^ GEN_TREE_SALT);
    let mut tree = Tree::default();
    fs::create_dir_all(root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
    for i in 0..files {
        let depth = rng.range(0..5);
        let mut rel = String::new();
        for _ in 0..depth {
            rel.push_str(&format!("d{}/", rng.range(0..4)));
        }
        let ext = ["bin", "txt", "dat", "cab", "msi"][rng.range(0..5) as usize];
        rel.push_str(&format!("f{i:04}.{ext}"));
        let size = if i % 11 == 5 {
            0
        } else if i % 128 == 64 {
            rng.range(MIB..3 * MIB)
        } else {
            rng.range(size_range.clone())
        };
        tree.add_file(root, &rel, size, seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
    }
    let empty = root.join("empty");
    fs::create_dir_all(&empty).unwrap_or_else(|e| panic!("create {}: {e}", empty.display()));
    tree.add_dir("empty");
    tree
}

/// One entry of a [`TreeDigest`]. Modes are the permission bits (`& 0o7777`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir {
        mode: u32,
    },
    /// `blake3`: the hex BLAKE3 of the content (how the content library names it).
    File {
        mode: u32,
        len: u64,
        blake3: String,
    },
    Symlink {
        target: String,
    },
    /// A FIFO, socket or device.
    Special {
        kind: String,
    },
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Dir { mode } => write!(f, "dir {mode:o}"),
            Node::File { mode, len, blake3 } => write!(f, "file {mode:o} {len} {blake3}"),
            Node::Symlink { target } => write!(f, "symlink -> {target}"),
            Node::Special { kind } => write!(f, "special {kind}"),
        }
    }
}

/// A comparable description of a tree: relative path (with `/`) → [`Node`]. Non-UTF-8
/// names are shown lossily.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TreeDigest(pub BTreeMap<String, Node>);

/// [`try_tree_digest`], panicking naming the path.
pub fn tree_digest(root: &Path) -> TreeDigest {
    try_tree_digest(root).unwrap_or_else(|e| panic!("digest of {}: {e}", root.display()))
}

/// Describes every entry under `root` (which may be a symlink to a folder, like a DP's
/// `current`: it is followed, nothing below it is). The error names the path it concerns;
/// a tree changing during the walk gives an error, never a mix silently.
pub fn try_tree_digest(root: &Path) -> io::Result<TreeDigest> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) -> io::Result<()> {
        fn named(p: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
            move |e| io::Error::new(e.kind(), format!("{}: {e}", p.display()))
        }
        let mut entries: Vec<_> =
            fs::read_dir(dir).map_err(named(dir))?.map(|e| e.map(|e| e.path())).collect::<io::Result<_>>()?;
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
            let md = fs::symlink_metadata(&p).map_err(named(&p))?;
            let mode = md.mode() & 0o7777;
            let ft = md.file_type();
            let node = if ft.is_symlink() {
                Node::Symlink { target: fs::read_link(&p).map_err(named(&p))?.to_string_lossy().into_owned() }
            } else if ft.is_dir() {
                walk(root, &p, out)?;
                Node::Dir { mode }
            } else if ft.is_file() {
                let mut h = blake3::Hasher::new();
                h.update_reader(File::open(&p).map_err(named(&p))?).map_err(named(&p))?;
                Node::File { mode, len: md.len(), blake3: h.finalize().to_hex().to_string() }
            } else if ft.is_fifo() {
                Node::Special { kind: "fifo".into() }
            } else {
                Node::Special { kind: format!("{ft:?}") }
            };
            out.insert(rel, node);
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(TreeDigest(out))
}

impl TreeDigest {
    /// The entries that differ, one line each (`path: this vs other`, `-` for absent).
    pub fn differences(&self, other: &TreeDigest) -> Vec<String> {
        let keys: BTreeSet<&String> = self.0.keys().chain(other.0.keys()).collect();
        let show = |n: Option<&Node>| n.map_or_else(|| "-".to_owned(), Node::to_string);
        keys.into_iter()
            .filter_map(|k| {
                let (a, b) = (self.0.get(k), other.0.get(k));
                (a != b).then(|| format!("{k}: {} vs {}", show(a), show(b)))
            })
            .collect()
    }

    /// [`TreeDigest::differences`] as text, one per line (empty when equal).
    pub fn diff(&self, other: &TreeDigest) -> String {
        self.differences(other).iter().map(|l| format!("{l}\n")).collect()
    }

    /// (files, folders, bytes in files).
    pub fn totals(&self) -> (u64, u64, u64) {
        let (mut files, mut dirs, mut bytes) = (0, 0, 0);
        for n in self.0.values() {
            match n {
                Node::File { len, .. } => {
                    files += 1;
                    bytes += len;
                }
                Node::Dir { .. } => dirs += 1,
                _ => {}
            }
        }
        (files, dirs, bytes)
    }
}
