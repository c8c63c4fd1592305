//! A writer racing `refresh --verify` cannot make the site read or publish anything
//! outside the source folder (issue 11 item 0): a folder swapped for a symlink to an
//! outside folder, and back, over and over, never puts the outside content into the
//! site's library, so no committed version can list it.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::*;

const MARKER: &[u8] = b"OUTSIDE-SECRET-e2e-41c9d7b2-must-never-be-published";

/// Swaps `src/d` for a symlink to `outside` and back until dropped, holding each state a
/// random 0–3 ms (busy-waiting with yields, no fixed sleeps); leaves `d` in place.
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Swapper {
    fn start(src: &Path, outside: &Path) -> Self {
        let (stop, swaps) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (d, away, outside) = (src.join("d"), src.join("d.away"), outside.to_owned());
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                let mut seed = 0x2545_f491_4f6c_dd1du64;
                let mut hold = |max_us: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let until = Instant::now() + Duration::from_micros(seed % max_us);
                    while Instant::now() < until {
                        std::thread::yield_now();
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    fs::rename(&d, &away).unwrap();
                    symlink(&outside, &d).unwrap();
                    hold(3000);
                    fs::remove_file(&d).unwrap();
                    fs::rename(&away, &d).unwrap();
                    hold(3000);
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Self { stop, swaps, thread: Some(thread) }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the swapper failed");
        }
        self.swaps.load(Ordering::Relaxed)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every library object that contains `needle`.
fn objects_holding(library: &Path, needle: &[u8]) -> Vec<PathBuf> {
    walkdir::WalkDir::new(library.join("objects"))
        .into_iter()
        .map(|e| e.expect("library walk"))
        .filter(|e| e.file_type().is_file())
        .filter(|e| fs::read(e.path()).unwrap().windows(needle.len()).any(|w| w == needle))
        .map(|e| e.path().to_owned())
        .collect()
}

#[test]
fn refresh_never_publishes_what_a_racing_symlink_points_to() {
    let dir = TestDir::new();
    let (src, outside) = (dir.join("src"), dir.join("outside"));
    fs::create_dir_all(src.join("d")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    // `d` holds enough files that reading them spans several swaps; the outside folder
    // has a file of the same name for each, holding the marker.
    fs::write(src.join("d/secret.txt"), b"the package's own d/secret.txt").unwrap();
    fs::write(outside.join("secret.txt"), MARKER).unwrap();
    for i in 0..100 {
        fs::write(src.join(format!("d/f{i:03}.txt")), format!("inside file {i}")).unwrap();
        fs::write(outside.join(format!("f{i:03}.txt")), [MARKER, &[b'-', i as u8]].concat()).unwrap();
    }
    for i in 0..20 {
        fs::write(src.join(format!("top{i:02}.txt")), format!("top file {i}")).unwrap();
    }
    fs::write(outside.join("only-outside.txt"), MARKER).unwrap();
    set_old_mtimes(&src);

    let server = Server::start(dir.join("site"), "PS1");
    let id = text(&server.cli_json(&["package", "add", "app", src.to_str().unwrap()]), "id").to_owned();
    assert_eq!(num(&server.cli_json(&["refresh", &id]), "source_version"), 1);

    let mut swapper = Swapper::start(&src, &outside);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut committed, mut refused) = (0, Vec::new());
    for _ in 0..30 {
        if Instant::now() > deadline {
            break;
        }
        let out = server.cli(&["refresh", &id, "--verify", "--json"]);
        if out.status.success() {
            committed += 1;
            continue;
        }
        // Refusing is fine, if it says why: the scan met `d` as a symlink out of the
        // folder, or a read met a component that had become one, or a file vanished.
        let msg = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            ["changed while it was", "vanished during the", "source entr", "kept changing"]
                .iter()
                .any(|w| msg.contains(w)),
            "a refresh failed for another reason: {msg}"
        );
        assert!(msg.contains("nothing was committed"), "{msg}");
        refused.push(msg);
    }
    let swaps = swapper.stop();
    eprintln!("{swaps} swaps; {committed} refreshes committed, {} refused", refused.len());
    for m in refused.iter().take(5) {
        eprintln!("  {m}");
    }
    assert!(swaps > 0, "the swapper never ran");
    assert!(committed + refused.len() > 0);

    // Every file of every committed version is in the site's library (a version is
    // committed only after its files are): none holds the outside content.
    let library = server.library();
    assert!(!library_object(&library, &blake3_hex(MARKER)).exists(), "the outside secret is in the library");
    assert_eq!(objects_holding(&library, MARKER), Vec::<PathBuf>::new(), "outside content reached the library");

    // With the writer gone, the next refresh publishes exactly the folder.
    let last = server.cli_json(&["refresh", &id, "--verify"]);
    assert_eq!(num(&last, "files"), 121, "{last:#}");
    assert!(objects_holding(&library, MARKER).is_empty());
}
