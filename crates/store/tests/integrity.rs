//! A damaged SQLite file is refused when it is opened, naming the file and what to do:
//! the site store ([`Store::connect`]) and the agent's database ([`AgentDb::open`]), with
//! a garbled page in the middle of the file and with a garbled header.

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use dpsync_hash::{ChunkId, FileHash};
use dpsync_store::agent::{AgentDb, ChunkLocation};
use dpsync_store::{Store, StoreError};

/// Deterministic garbage (xorshift).
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn be32(b: &[u8], at: usize) -> u64 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as u64
}

/// The page size and the pages (1-based) of a SQLite file that hold a b-tree node (table
/// or index, leaf or interior): not free, not overflow. The file must have no WAL left.
fn btree_pages(db: &[u8]) -> (u64, Vec<u64>) {
    assert_eq!(&db[..16], b"SQLite format 3\0");
    let page_size = match u16::from_be_bytes([db[16], db[17]]) {
        1 => 65536,
        n => n as u64,
    };
    let pages = db.len() as u64 / page_size;
    let mut free = std::collections::HashSet::new();
    let mut trunk = be32(db, 32);
    while trunk != 0 {
        free.insert(trunk);
        let at = ((trunk - 1) * page_size) as usize;
        let leaves = be32(db, at + 4) as usize;
        for i in 0..leaves {
            free.insert(be32(db, at + 8 + 4 * i));
        }
        trunk = be32(db, at);
    }
    let btree = (2..=pages)
        .filter(|p| !free.contains(p) && matches!(db[((p - 1) * page_size) as usize], 0x02 | 0x05 | 0x0a | 0x0d))
        .collect();
    (page_size, btree)
}

/// Overwrites the b-tree page nearest the middle of the file with garbage; returns its
/// number.
fn garble_middle_page(path: &Path) -> u64 {
    for side in ["-wal", "-journal"] {
        let p = PathBuf::from(format!("{}{side}", path.display()));
        assert!(
            fs::metadata(&p).map(|m| m.len() == 0).unwrap_or(true),
            "{} is left: close the database first",
            p.display()
        );
    }
    let db = fs::read(path).unwrap();
    let (page_size, btree) = btree_pages(&db);
    let pages = db.len() as u64 / page_size;
    assert!(pages >= 8, "only {pages} pages: not enough to have a middle");
    let middle = pages / 2;
    let victim = *btree.iter().min_by_key(|p| p.abs_diff(middle)).expect("a b-tree page");
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start((victim - 1) * page_size)).unwrap();
    f.write_all(&garbage(page_size as usize, victim)).unwrap();
    f.sync_all().unwrap();
    victim
}

/// Overwrites the 100-byte header (magic string, page size, …) with garbage.
fn garble_header(path: &Path) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(&garbage(100, 7)).unwrap();
    f.sync_all().unwrap();
}

fn assert_corrupt(e: StoreError, path: &Path, advice: &str) {
    let msg = e.to_string();
    match &e {
        StoreError::Corrupt { path: p, .. } => assert_eq!(p, path, "{msg}"),
        other => panic!("expected StoreError::Corrupt, got {other:?}"),
    }
    assert!(msg.contains(&path.display().to_string()), "the message names the file: {msg}");
    assert!(msg.contains("damaged"), "{msg}");
    assert!(msg.contains(advice), "the message says what to do ({advice}): {msg}");
    assert!(!e.is_retryable());
}

/// A site store on `DIR/site.db` with enough rows for a few hundred pages.
async fn filled_store(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("site.db");
    let url = format!("sqlite://{}", path.display());
    let store = Store::connect(&url).await.unwrap();
    store.meta_set("site_code", "PS1").await.unwrap();
    for i in 0..300 {
        store.meta_set(&format!("filler-{i:05}"), &format!("{i:01500}")).await.unwrap();
    }
    store.close().await;
    // Intact, it opens again (and the check passes).
    let store = Store::connect(&url).await.unwrap();
    assert_eq!(store.meta_get("filler-00299").await.unwrap().as_deref(), Some(format!("{:01500}", 299).as_str()));
    store.close().await;
    (path, url)
}

#[tokio::test]
async fn store_refuses_a_garbled_page_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = filled_store(dir.path()).await;
    let page = garble_middle_page(&path);
    let e = Store::connect(&url).await.expect_err(&format!("page {page} garbled: the store must refuse to open"));
    assert_corrupt(e, &path, "backup");
}

#[tokio::test]
async fn store_refuses_a_garbled_header() {
    let dir = tempfile::tempdir().unwrap();
    let (path, url) = filled_store(dir.path()).await;
    garble_header(&path);
    let e = Store::connect(&url).await.expect_err("header garbled: the store must refuse to open");
    assert_corrupt(e, &path, "backup");
}

#[tokio::test]
async fn store_names_a_relative_path_in_full() {
    // `sqlite:relative.db` URLs are resolved against the working directory; the message
    // names the file absolutely.
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = filled_store(dir.path()).await;
    let path = path.canonicalize().unwrap();
    garble_header(&path);
    let cwd = std::env::current_dir().unwrap();
    let rel = pathdiff(&cwd, &path);
    let e = Store::connect(&format!("sqlite:{rel}")).await.expect_err("header garbled");
    assert_corrupt(e, &path, "backup");
}

/// `to` relative to `from` (`../..` as needed).
fn pathdiff(from: &Path, to: &Path) -> String {
    let (from, to): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = from[common..].iter().map(|_| "..".to_owned()).collect();
    parts.extend(to[common..].iter().map(|c| c.as_os_str().to_string_lossy().into_owned()));
    parts.join("/")
}

/// An agent database on `DIR/agent.db` with enough chunk index rows for many pages.
async fn filled_agent_db(dir: &Path) -> PathBuf {
    let path = dir.join("agent.db");
    let db = AgentDb::open(&path).await.unwrap();
    let rows: Vec<ChunkLocation> = (0..4000u64)
        .map(|i| ChunkLocation {
            chunk: ChunkId::from_slice(&blake(i)).unwrap(),
            file: FileHash::from_slice(&blake(i / 16 + 1_000_000)).unwrap(),
            offset: (i % 16) * 65536,
            len: 65536,
        })
        .collect();
    db.index_chunks(&rows).await.unwrap();
    db.close().await;
    let db = AgentDb::open(&path).await.unwrap();
    assert_eq!(db.indexed_chunks(&[ChunkId::from_slice(&blake(17)).unwrap()]).await.unwrap().len(), 1);
    db.close().await;
    path
}

fn blake(i: u64) -> Vec<u8> {
    garbage(32, i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
}

#[tokio::test]
async fn agent_db_refuses_a_garbled_page_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled_agent_db(dir.path()).await;
    let page = garble_middle_page(&path);
    let e = AgentDb::open(&path).await.expect_err(&format!("page {page} garbled: the agent db must refuse to open"));
    assert_corrupt(e, &path, "redistribute");
}

#[tokio::test]
async fn agent_db_refuses_a_garbled_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled_agent_db(dir.path()).await;
    garble_header(&path);
    let e = AgentDb::open(&path).await.expect_err("header garbled: the agent db must refuse to open");
    assert_corrupt(e, &path, "redistribute");
}
