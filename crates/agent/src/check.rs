//! Validation of an installed version tree against its manifest (blocking code): every
//! difference is found, and what needs no content from the site is put right here.
//!
//! - **Extra entries** (a file dropped into `current/`, a folder, a link) are removed.
//! - **Modes and times** of files and folders are set back to the manifest's.
//! - **Symlinks** pointing elsewhere, missing or replaced by something else are made again;
//!   a missing folder is made again.
//! - **Missing or damaged files** are reported `broken`: they need content, which the
//!   site's repair (an install of the same version) sends. A damaged file whose inode is
//!   the library's object (a hard link) takes the object with it, so that the repair
//!   cannot link the damaged bytes again; a missing file's object is kept when it is
//!   whole, so its repair sends nothing.
//!
//! **Who owns an inode's metadata.** Trees hard-link library objects, so a `chmod` or
//! `touch` in `current/` also changes the library object and every other tree linking
//! it. The builder only ever links entries that need the same mode and time to one inode
//! (the object is linked when it carries that metadata or nothing links it yet; other
//! metadata gets a copy of its own), so every link of an inode wants the same metadata:
//! putting the manifest's mode and time back on it is right for all of them at once, and
//! trees keep sharing inodes (no copy per version) without one tree's damage outliving
//! its validation.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use dpsync_hash::{Entry, EntryKind, FileHash, Manifest};
use dpsync_library::Library;
use dpsync_transfer::service::ReceiveError;

use crate::install::{self, open_nofollow, system_time};

/// Paces the reads of a validation: after each block, sleeps as long as it takes for the
/// bytes read so far to stay under the rate (this runs on a blocking thread).
struct Pace {
    rate: Option<u64>,
    started: std::time::Instant,
    bytes: u64,
}

impl Pace {
    const BLOCK: usize = 1 << 20;

    fn new(rate: Option<u64>) -> Self {
        Self { rate, started: std::time::Instant::now(), bytes: 0 }
    }

    /// The BLAKE3 of what `f` holds, read in blocks at the pace.
    fn hash(&mut self, mut f: &File) -> std::io::Result<FileHash> {
        use std::io::Read;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; Self::BLOCK];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(FileHash::from(h.finalize()));
            }
            h.update(&buf[..n]);
            self.bytes += n as u64;
            if let Some(rate) = self.rate {
                let due = std::time::Duration::from_secs_f64(self.bytes as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
}

/// What a validation found and did.
#[derive(Debug, Default)]
pub(crate) struct TreeCheck {
    /// Files compared with their BLAKE3.
    pub checked: u64,
    /// Paths that need content from the site.
    pub broken: Vec<String>,
    /// Content whose library object was dropped (or is missing): its chunks are no longer
    /// known here.
    pub dropped: Vec<FileHash>,
    /// What was put right here, one line each.
    pub repaired: Vec<String>,
}

fn internal(what: String) -> impl FnOnce(std::io::Error) -> ReceiveError {
    move |e| ReceiveError::Internal(format!("{what}: {e}"))
}

/// Checks (and where it can, repairs) the tree at `dir` against `manifest`, reading at
/// most `read_rate` bytes per second.
pub(crate) fn check_tree(
    lib: &Library,
    dir: &Path,
    manifest: &Manifest,
    read_rate: Option<u64>,
) -> Result<TreeCheck, ReceiveError> {
    let mut out = TreeCheck::default();
    let mut pace = Pace::new(read_rate);
    // Folders' metadata as found, before removing extras moves their times.
    let found: HashMap<&str, fs::Metadata> = manifest
        .entries()
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Dir))
        .filter_map(|e| Some((e.path.as_str(), fs::symlink_metadata(dir.join(e.path.as_str())).ok()?)))
        .collect();
    remove_extras(dir, manifest, &mut out)?;
    for e in manifest.entries() {
        let path = dir.join(e.path.as_str());
        match &e.kind {
            EntryKind::Dir => check_dir(&path, e, &mut out)?,
            EntryKind::Symlink { target } => check_symlink(&path, e, target, &mut out)?,
            EntryKind::File { .. } => check_file(lib, &path, e, &mut pace, &mut out)?,
        }
    }
    // Folders last, deepest first: a folder's mode may forbid changes inside it, and
    // removing an extra entry moved its folder's time (put back without a report when
    // that was the only difference).
    for e in manifest.entries().iter().rev().filter(|e| matches!(e.kind, EntryKind::Dir)) {
        let path = dir.join(e.path.as_str());
        let Ok(md) = fs::symlink_metadata(&path) else { continue };
        if !md.is_dir() {
            continue;
        }
        let was = found.get(e.path.as_str()).filter(|m| m.is_dir());
        if let Some(was) = was
            && let Some(what) = metadata_difference(was, e)
        {
            out.repaired.push(format!("{}: {what}", e.path));
        }
        if metadata_difference(&md, e).is_some() {
            let f = File::open(&path).map_err(internal(format!("opening {}", path.display())))?;
            set_metadata(&f, e).map_err(internal(format!("setting the mode and time of {}", path.display())))?;
        }
    }
    Ok(out)
}

/// How an inode's mode and time differ from the entry's, if they do.
fn metadata_difference(md: &fs::Metadata, e: &Entry) -> Option<String> {
    let mode = md.mode() & 0o7777;
    let mtime_ns = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
    let mut what = Vec::new();
    if mode != e.mode {
        what.push(format!("mode {mode:04o} set back to {:04o}", e.mode));
    }
    if mtime_ns != e.mtime_ns as i128 {
        what.push("modification time set back".to_owned());
    }
    (!what.is_empty()).then(|| what.join(", "))
}

fn set_metadata(f: &File, e: &Entry) -> std::io::Result<()> {
    f.set_permissions(fs::Permissions::from_mode(e.mode))?;
    f.set_modified(system_time(e.mtime_ns))
}

/// Removes what the manifest does not name, anywhere in the tree.
fn remove_extras(dir: &Path, manifest: &Manifest, out: &mut TreeCheck) -> Result<(), ReceiveError> {
    let mut walk = walkdir::WalkDir::new(dir).min_depth(1).follow_links(false).into_iter();
    while let Some(next) = walk.next() {
        let Ok(entry) = next else { continue };
        let rel = entry.path().strip_prefix(dir).ok().and_then(Path::to_str);
        let expected = rel.and_then(|r| manifest.get(r));
        let is_dir = entry.file_type().is_dir();
        match expected {
            // A folder where the manifest has a file or a link: the entry's own check
            // replaces it; what is inside is not worth a line each.
            Some(e) if is_dir && !matches!(e.kind, EntryKind::Dir) => walk.skip_current_dir(),
            Some(_) => {}
            None => {
                if is_dir {
                    walk.skip_current_dir();
                }
                let shown = rel.map(str::to_owned).unwrap_or_else(|| entry.path().display().to_string());
                remove_any(entry.path()).map_err(internal(format!("removing {}", entry.path().display())))?;
                let what = if is_dir {
                    "folder"
                } else if entry.file_type().is_symlink() {
                    "link"
                } else {
                    "file"
                };
                out.repaired.push(format!("{shown}: extra {what} removed"));
            }
        }
    }
    Ok(())
}

/// Removes a file, link or folder, making its folder writable first if it must.
fn remove_any(path: &Path) -> std::io::Result<()> {
    let remove = || match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => install::remove_tree(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    match remove() {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // The folder's mode (from the manifest or not) forbids it; the folder pass
            // sets it back afterwards.
            if let Some(parent) = path.parent() {
                let mode = fs::metadata(parent)?.mode() & 0o7777;
                fs::set_permissions(parent, fs::Permissions::from_mode(mode | 0o700))?;
            }
            remove()
        }
        r => r,
    }
}

fn check_dir(path: &Path, e: &Entry, out: &mut TreeCheck) -> Result<(), ReceiveError> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => return Ok(()),
        Ok(_) => remove_any(path).map_err(internal(format!("removing {}", path.display())))?,
        Err(_) => {}
    }
    fs::create_dir(path).map_err(internal(format!("creating {}", path.display())))?;
    out.repaired.push(format!("{}: missing folder made again", e.path));
    Ok(())
}

fn check_symlink(path: &Path, e: &Entry, target: &str, out: &mut TreeCheck) -> Result<(), ReceiveError> {
    let what = match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_symlink() => match fs::read_link(path) {
            Ok(found) if found.as_os_str() == target => return Ok(()),
            Ok(found) => format!("link pointed at {}; pointed back at {target}", found.display()),
            Err(err) => format!("unreadable link ({err}) made again"),
        },
        Ok(md) if md.is_dir() => "a folder stood in place of the link; link made again".to_owned(),
        Ok(_) => "a file stood in place of the link; link made again".to_owned(),
        Err(_) => "missing link made again".to_owned(),
    };
    // Made aside and renamed over whatever is there (a folder is removed first).
    if fs::symlink_metadata(path).is_ok_and(|md| md.is_dir()) {
        remove_any(path).map_err(internal(format!("removing {}", path.display())))?;
    }
    let tmp = aside(path);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(internal(format!("creating {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(internal(format!("replacing {}", path.display())))?;
    out.repaired.push(format!("{}: {what}", e.path));
    Ok(())
}

/// A name beside `path` for a replacement made aside.
fn aside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".dpsync-repair");
    path.with_file_name(name)
}

fn check_file(lib: &Library, path: &Path, e: &Entry, pace: &mut Pace, out: &mut TreeCheck) -> Result<(), ReceiveError> {
    out.checked += 1;
    let expected = e.file_hash().expect("a file entry");
    let opened = open_nofollow(path).ok().and_then(|f| {
        let md = f.metadata().ok().filter(|md| md.is_file())?;
        let hash = pace.hash(&f).ok()?;
        Some((f, md.clone(), hash == expected && md.len() == e.size()))
    });
    if let Some((f, md, true)) = &opened {
        if let Some(what) = metadata_difference(md, e) {
            set_metadata(f, e).map_err(internal(format!("setting the mode and time of {}", path.display())))?;
            let shared = if md.nlink() > 1 { " (on every link of its inode)" } else { "" };
            out.repaired.push(format!("{}: {what}{shared}", e.path));
        }
        return Ok(());
    }
    out.broken.push(e.path.to_string());
    // Drop the library's copy if it is the damaged inode, or itself not whole.
    let object = lib.object_path(&expected);
    let Ok(obj_md) = fs::metadata(&object) else {
        out.dropped.push(expected);
        return Ok(());
    };
    let same_inode = opened.as_ref().is_some_and(|(_, md, _)| md.ino() == obj_md.ino() && md.dev() == obj_md.dev());
    if (same_inode || lib.verify(&expected).is_err()) && !out.dropped.contains(&expected) {
        lib.remove(&expected).map_err(|err| {
            ReceiveError::Internal(format!(
                "{} is damaged, and its library copy {} cannot be removed ({err}); \
                 fix the DP's data directory permissions and validate again",
                e.path,
                object.display()
            ))
        })?;
        out.dropped.push(expected);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use dpsync_hash::{ChunkParams, RelPath};

    use super::*;
    use crate::install::{BuildProgress, build_tree};

    fn entry(path: &str, mode: u32, mtime_ns: i64, kind: EntryKind) -> Entry {
        Entry { path: RelPath::new(path).unwrap(), mode, mtime_ns, kind }
    }

    /// A read-only folder with an extra file in it, a file where a folder should be, a
    /// folder where a link should be, a missing link, and a folder's mode and time: all
    /// put right in place, each reported once; nothing is `broken`, and a second check
    /// finds nothing.
    #[test]
    fn what_needs_no_content_is_put_right_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(&dir.path().join("library")).unwrap();
        let d = lib.import(&b"hello"[..], &ChunkParams::default()).unwrap().digest;
        let file = EntryKind::File { size: d.size, hash: d.hash, chunks: d.chunks.clone().into() };
        let manifest = Manifest::new(vec![
            entry("locked", 0o555, 1_000_000_000, EntryKind::Dir),
            entry("locked/f", 0o444, 2_000_000_000, file.clone()),
            entry("sub", 0o755, 3_000_000_000, EntryKind::Dir),
            entry("sub/g", 0o644, 4_000_000_000, file),
            entry("to-f", 0o777, 0, EntryKind::Symlink { target: "locked/f".into() }),
            entry("to-g", 0o777, 0, EntryKind::Symlink { target: "sub/g".into() }),
        ])
        .unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        build_tree(&lib, &tree, &manifest, &BuildProgress::default(), u64::MAX).unwrap();
        assert!(check_tree(&lib, &tree, &manifest, None).unwrap().repaired.is_empty(), "a fresh tree is whole");

        let writable = |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        writable(&tree.join("locked"));
        fs::write(tree.join("locked/extra"), b"x").unwrap();
        fs::set_permissions(tree.join("locked"), fs::Permissions::from_mode(0o555)).unwrap();
        install::remove_tree(&tree.join("sub")).unwrap();
        fs::write(tree.join("sub"), b"not a folder").unwrap();
        fs::remove_file(tree.join("to-f")).unwrap();
        fs::create_dir(tree.join("to-f")).unwrap();
        fs::remove_file(tree.join("to-g")).unwrap();

        let found = check_tree(&lib, &tree, &manifest, None).unwrap();
        assert_eq!(found.broken, ["sub/g"], "the file inside the lost folder needs its content: {found:?}");
        assert!(found.dropped.is_empty(), "its library object is whole and kept: {found:?}");
        for (path, what) in [
            ("locked/extra:", "extra file removed"),
            ("sub:", "missing folder made again"),
            ("to-f:", "a folder stood in place of the link"),
            ("to-g:", "missing link made again"),
        ] {
            let n = found.repaired.iter().filter(|r| r.starts_with(path) && r.contains(what)).count();
            assert_eq!(n, 1, "{path} {what}: {:#?}", found.repaired);
        }
        // Writing the extra moved the folder's time (damage, reported once; removing it
        // moves it again, which is not reported twice).
        let locked: Vec<_> = found.repaired.iter().filter(|r| r.starts_with("locked:")).collect();
        assert_eq!(locked, ["locked: modification time set back"], "{:#?}", found.repaired);
        let md = fs::metadata(tree.join("locked")).unwrap();
        assert_eq!((md.mode() & 0o7777, md.mtime()), (0o555, 1), "the folder's own metadata is back");
        assert_eq!(fs::read_link(tree.join("to-f")).unwrap(), Path::new("locked/f"));
        assert_eq!(fs::read_link(tree.join("to-g")).unwrap(), Path::new("sub/g"));
        let md = fs::metadata(tree.join("sub")).unwrap();
        assert_eq!((md.mode() & 0o7777, md.mtime()), (0o755, 3), "the folder made again has its metadata");

        // The folder's mode and time changed by hand are reported.
        fs::set_permissions(tree.join("sub"), fs::Permissions::from_mode(0o700)).unwrap();
        let again = check_tree(&lib, &tree, &manifest, None).unwrap();
        assert_eq!(again.broken, ["sub/g"]);
        assert_eq!(again.repaired, ["sub: mode 0700 set back to 0755"], "{again:?}");
        install::remove_tree(&tree).unwrap();
    }
}
