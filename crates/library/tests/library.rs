//! Content library behaviour on a real temp directory.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use dpsync_hash::{ChunkParams, FileHash};
use dpsync_library::{Library, LibraryError, hash_file};

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

#[test]
fn imports_once_per_content_and_reads_ranges() {
    let t = tempfile::tempdir().unwrap();
    let lib = Library::open(t.path()).unwrap();
    let bytes = data(1 << 20, 1);
    let a = lib.import(&bytes[..], &ChunkParams::default()).unwrap();
    assert!(a.stored_new);
    assert_eq!(a.digest.hash, FileHash::from(blake3::hash(&bytes)));
    let b = lib.import(&bytes[..], &ChunkParams::default()).unwrap();
    assert!(!b.stored_new, "same content is stored once");
    assert_eq!(lib.list().unwrap(), vec![a.digest.hash]);
    lib.sync().unwrap();
    let mut offset = 0u64;
    for c in &a.digest.chunks {
        let got = lib.read_range(&a.digest.hash, offset, c.len as usize).unwrap();
        assert_eq!(dpsync_hash::ChunkId::from(blake3::hash(&got)), c.id);
        offset += c.len as u64;
    }
    assert_eq!(std::fs::read_dir(t.path().join("tmp")).unwrap().count(), 0, "no temp left behind");
}

#[test]
fn open_clears_half_written_temp_files() {
    let t = tempfile::tempdir().unwrap();
    drop(Library::open(t.path()).unwrap());
    std::fs::write(t.path().join("tmp/partial"), b"half").unwrap();
    let lib = Library::open(t.path()).unwrap();
    assert!(!t.path().join("tmp/partial").exists());
    assert!(lib.list().unwrap().is_empty());
}

#[test]
fn verify_detects_corruption_and_missing_content() {
    let t = tempfile::tempdir().unwrap();
    let lib = Library::open(t.path()).unwrap();
    let h = lib.import(&b"payload"[..], &ChunkParams::default()).unwrap().digest.hash;
    lib.verify(&h).unwrap();
    let p = lib.object_path(&h);
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&p, b"PAYLOAD").unwrap();
    assert!(matches!(lib.verify(&h), Err(LibraryError::Corrupt { .. })));
    lib.remove(&h).unwrap();
    assert!(matches!(lib.verify(&h), Err(LibraryError::Missing { .. })));
    assert!(matches!(lib.read_range(&h, 0, 1), Err(LibraryError::Missing { .. })));
}

#[test]
fn adopt_verified_refuses_wrong_bytes() {
    let t = tempfile::tempdir().unwrap();
    let lib = Library::open(t.path()).unwrap();
    let tmp = lib.temp_path();
    std::fs::write(&tmp, b"actual").unwrap();
    let claimed = FileHash::from(blake3::hash(b"claimed"));
    assert!(matches!(lib.adopt_verified(&tmp, &claimed), Err(LibraryError::HashMismatch { .. })));
    assert!(!lib.contains(&claimed));
    assert!(!tmp.exists());
    let tmp = lib.temp_path();
    std::fs::write(&tmp, b"actual").unwrap();
    let right = hash_file(&tmp).unwrap();
    assert!(lib.adopt_verified(&tmp, &right).unwrap());
    assert!(lib.contains(&right));
}

#[test]
fn sweep_keeps_live_and_recent_content() {
    let t = tempfile::tempdir().unwrap();
    let lib = Library::open(t.path()).unwrap();
    let p = ChunkParams::default();
    let live = lib.import(&b"live"[..], &p).unwrap().digest.hash;
    let dead = lib.import(&b"dead"[..], &p).unwrap().digest.hash;
    std::thread::sleep(Duration::from_millis(20));
    let started = SystemTime::now();
    std::thread::sleep(Duration::from_millis(20));
    let fresh = lib.import(&b"imported during the sweep"[..], &p).unwrap().digest.hash;
    let stats = lib.sweep(&HashSet::from([live]), started).unwrap();
    assert_eq!(stats.objects_removed, 1);
    assert_eq!(stats.bytes_removed, 4);
    assert!(lib.contains(&live) && lib.contains(&fresh) && !lib.contains(&dead));
}

#[test]
fn an_import_batch_names_every_object_once_finished() {
    let t = tempfile::tempdir().unwrap();
    let lib = std::sync::Arc::new(Library::open(t.path()).unwrap());
    let batch = lib.import_batch();
    // Small objects (synced together at the end) and more large ones than the batch lets
    // wait at once (fsync'd one by one on the finisher threads; the importer is held back).
    let inputs: Vec<Vec<u8>> = (0..150)
        .map(|i| data(1000 + i * 37, i as u8))
        .chain((0..70).map(|i| data((1 << 20) + i * 4096, i as u8)))
        .collect();
    let hashes: Vec<FileHash> =
        inputs.iter().map(|b| batch.import(&b[..], &ChunkParams::default()).unwrap().digest.hash).collect();
    batch.finish().unwrap();
    for (h, b) in hashes.iter().zip(&inputs) {
        assert_eq!(*h, FileHash::from(blake3::hash(b)));
        lib.verify(h).unwrap();
        let mode = std::fs::metadata(lib.object_path(h)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, dpsync_library::OBJECT_MODE);
    }
    assert_eq!(lib.list().unwrap().len(), inputs.len());
    assert_eq!(std::fs::read_dir(t.path().join("tmp")).unwrap().count(), 0, "no temp left behind");
}

#[test]
fn an_import_batch_reports_an_object_it_could_not_store() {
    let t = tempfile::tempdir().unwrap();
    let lib = std::sync::Arc::new(Library::open(t.path()).unwrap());
    let bytes = data(4096, 9);
    let hash = FileHash::from(blake3::hash(&bytes));
    // A directory where the object's fan-out folder must go makes the rename fail.
    let hex = hash.to_hex();
    std::fs::write(t.path().join("objects").join(&hex[..2]), b"not a folder").unwrap();
    let batch = lib.import_batch();
    batch.import(&bytes[..], &ChunkParams::default()).unwrap();
    assert!(batch.finish().is_err(), "the deferred failure reaches finish");
    assert!(!lib.contains(&hash));
}
