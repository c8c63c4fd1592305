//! The foundation: `dpsync server`, `package add`, `refresh` (with `--dry-run` and
//! `--verify`), refused source trees, the admin socket, site codes, `gc`, a crash in the
//! middle of a refresh, and the same flow on PostgreSQL.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A string list field of a report; absent means empty.
fn list(v: &Value, key: &str) -> Vec<String> {
    match &v[key] {
        Value::Null => Vec::new(),
        Value::Array(a) => a.iter().map(|x| x.as_str().expect("string").to_owned()).collect(),
        other => panic!("{key:?} is not a list: {other}"),
    }
}

/// Asserts the package's committed state: its current version and the list of versions.
fn assert_versions(server: &Server, pkg: &str, current: u64, versions: &[u64]) -> Value {
    let show = server.cli_json(&["package", "show", pkg]);
    assert_eq!(num(&show, "source_version"), current, "current version of {pkg}: {show:#}");
    assert_eq!(version_numbers(&show), versions, "versions of {pkg}: {show:#}");
    show
}

/// The first non-empty file of a tree (deterministic).
fn some_nonempty_file(tree: &Tree) -> (String, u64) {
    tree.files.iter().find(|(_, size)| **size > 0).map(|(p, s)| (p.clone(), *s)).expect("a non-empty file")
}

/// A server on `DIR/d` and a package `app` over a generated tree at `DIR/src`, refreshed
/// once (version 1).
struct Fixture {
    server: Server,
    src: PathBuf,
    tree: Tree,
    id: String,
    v1: Value,
    // Last, so that the server is stopped before its directory is removed.
    dir: TestDir,
}

fn fixture(files: usize, seed: u64, sizes: std::ops::Range<u64>) -> Fixture {
    let dir = TestDir::new();
    let src = dir.join("src");
    let tree = gen_tree(&src, files, seed, sizes);
    set_old_mtimes(&src);
    let server = Server::start(dir.join("d"), "PS1");
    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    let v1 = server.cli_json(&["refresh", &id]);
    assert_eq!(num(&v1, "source_version"), 1);
    assert_eq!(num(&v1, "files_added"), tree.file_count());
    Fixture { server, src, tree, id, v1, dir }
}

#[test]
fn refresh_counts_new_unchanged_and_changed_files() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let mut tree = gen_tree(&src, 300, 1, 0..64 * KIB);
    tree.add_file(&src, "big/eight.bin", 8 * MIB, 77);
    tree.add_symlink(&src, "d1/link-to-big", "../big/eight.bin");
    set_old_mtimes(&src);
    let files = tree.file_count();
    let total = tree.total_bytes();
    assert_eq!(files, 301);
    assert!(total > 8 * MIB);

    let server = Server::start(dir.join("d"), "PS1");
    let added = server.cli_json(&["package", "add", "app", s(&src)]);
    assert_eq!(text(&added, "id"), "PS100001", "{added:#}");
    assert_eq!(text(&added, "name"), "app");
    assert_eq!(text(&added, "source_path"), s(&src));
    assert_eq!(num(&added, "source_version"), 0);
    assert!(added["content_root"].is_null());
    // Without --json: just the id.
    let out = server.cli(&["package", "add", "other", s(&src)]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "PS100002");

    // 1: everything is new.
    let r1 = server.cli_json(&["refresh", "PS100001"]);
    assert_eq!(text(&r1, "package"), "PS100001");
    assert_eq!(r1["dry_run"], false);
    assert_eq!(num(&r1, "source_version"), 1);
    assert_eq!(num(&r1, "files"), files);
    assert_eq!(num(&r1, "dirs"), tree.dirs.len() as u64);
    assert_eq!(num(&r1, "symlinks"), 1);
    assert_eq!(num(&r1, "total_bytes"), total);
    assert_eq!(num(&r1, "files_added"), files);
    assert_eq!(num(&r1, "files_changed"), 0);
    assert_eq!(num(&r1, "files_removed"), 0);
    assert_eq!(num(&r1, "files_unchanged"), 0);
    assert_eq!(num(&r1, "files_read"), files);
    assert_eq!(num(&r1, "bytes_hashed"), total);
    assert_eq!(r1["content_changed"], true);
    assert!(r1["previous_content_root"].is_null());
    let root1 = text(&r1, "content_root").to_owned();
    assert_eq!(root1.len(), 64, "content root is 32 bytes of hex: {root1}");
    assert!(root1.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(r1["manifest_stored"], true);
    assert_eq!(manifest_rows(&server, "PS100001"), 1);

    // 2: nothing changed (refresh by name this time): nothing is read.
    let r2 = server.cli_json(&["refresh", "app"]);
    assert_eq!(num(&r2, "source_version"), 2);
    assert_eq!(text(&r2, "content_root"), root1);
    assert_eq!(text(&r2, "previous_content_root"), root1);
    assert_eq!(r2["content_changed"], false);
    assert_eq!(num(&r2, "bytes_hashed"), 0);
    assert_eq!(num(&r2, "files_read"), 0);
    assert_eq!(num(&r2, "bytes_stored"), 0);
    assert_eq!(num(&r2, "files_unchanged"), files);
    assert_eq!((num(&r2, "files_added"), num(&r2, "files_changed"), num(&r2, "files_removed")), (0, 0, 0));
    assert_eq!(num(&r2, "total_bytes"), total);
    assert_eq!((num(&r2, "files"), num(&r2, "dirs"), num(&r2, "symlinks")), (files, tree.dirs.len() as u64, 1));
    // Found unchanged from the scan alone, and committed as a version row sharing the
    // previous version's manifest: no manifest built, encoded or written.
    assert_eq!(r2["unchanged_fast"], true, "{r2:#}");
    assert_eq!(r2["manifest_stored"], false, "{r2:#}");
    assert_eq!(manifest_rows(&server, "PS100001"), 1, "the unchanged refresh wrote no manifest");

    // 3: one file grows: only it is read.
    let (changed, size) = some_nonempty_file(&tree);
    append(&src.join(&changed), &random_bytes(1000, 9));
    set_old_mtimes(&src);
    let r3 = server.cli_json(&["refresh", "PS100001"]);
    assert_eq!(num(&r3, "source_version"), 3);
    assert_eq!(num(&r3, "files_changed"), 1);
    assert_eq!(num(&r3, "files_added"), 0);
    assert_eq!(num(&r3, "files_removed"), 0);
    assert_eq!(num(&r3, "files_unchanged"), files - 1);
    assert_eq!(num(&r3, "files_read"), 1);
    assert_eq!(num(&r3, "bytes_hashed"), size + 1000, "only {changed} is read");
    assert_eq!(num(&r3, "total_bytes"), total + 1000);
    assert_ne!(text(&r3, "content_root"), root1);
    assert_eq!(r3["content_changed"], true);
    assert_eq!((&r3["unchanged_fast"], &r3["manifest_stored"]), (&false.into(), &true.into()), "{r3:#}");
    assert_eq!(manifest_rows(&server, "PS100001"), 2);

    // The store agrees.
    let show = assert_versions(&server, "PS100001", 3, &[1, 2, 3]);
    assert_eq!(text(&show, "content_root"), text(&r3, "content_root"));
    let vs = show["versions"].as_array().unwrap();
    assert_eq!(text(&vs[0], "content_root"), root1);
    assert_eq!(text(&vs[1], "content_root"), root1);
    assert_eq!(num(&vs[0], "bytes_hashed"), total);
    assert_eq!(num(&vs[1], "bytes_hashed"), 0);
    assert_eq!(num(&vs[2], "files_changed"), 1);
    assert_eq!(num(&vs[2], "files"), files);
    assert_eq!(num(&vs[2], "symlinks"), 1);
    assert_eq!(text(&vs[2], "origin"), "refresh");
    let listed = server.cli_json(&["package", "list"]);
    let ids: Vec<(&str, u64)> =
        listed.as_array().unwrap().iter().map(|p| (text(p, "id"), num(p, "source_version"))).collect();
    assert_eq!(ids, [("PS100001", 3), ("PS100002", 0)]);
}

#[test]
fn verify_rereads_everything_and_keeps_the_root() {
    let f = fixture(150, 2, 0..32 * KIB);
    let total = f.tree.total_bytes();
    let files = f.tree.file_count();
    let root1 = text(&f.v1, "content_root").to_owned();

    let r2 = f.server.cli_json(&["refresh", &f.id, "--verify"]);
    assert_eq!(num(&r2, "source_version"), 2);
    assert_eq!(num(&r2, "bytes_hashed"), total);
    assert_eq!(num(&r2, "files_read"), files);
    assert_eq!(num(&r2, "bytes_stored"), 0, "the content is already in the library");
    assert_eq!((num(&r2, "files_added"), num(&r2, "files_changed"), num(&r2, "files_removed")), (0, 0, 0));
    assert_eq!(num(&r2, "files_unchanged"), files);
    assert_eq!(text(&r2, "content_root"), root1);
    assert_eq!(r2["content_changed"], false);
    assert_eq!((&r2["unchanged_fast"], &r2["manifest_stored"]), (&false.into(), &false.into()), "{r2:#}");
    assert_eq!(manifest_rows(&f.server, &f.id), 1);

    // The scan cache written by --verify is good: the next plain refresh reads nothing.
    let r3 = f.server.cli_json(&["refresh", &f.id]);
    assert_eq!(num(&r3, "source_version"), 3);
    assert_eq!(num(&r3, "bytes_hashed"), 0);
    assert_eq!(num(&r3, "files_read"), 0);
    assert_eq!(text(&r3, "content_root"), root1);
    assert_eq!(r3["unchanged_fast"], true, "{r3:#}");
}

#[test]
fn dry_run_reports_changes_and_commits_nothing() {
    let f = fixture(100, 3, 1..16 * KIB);
    let files = f.tree.file_count();
    let (changed, size) = some_nonempty_file(&f.tree);
    let removed = f.tree.files.keys().rev().find(|p| **p != changed).unwrap().clone();
    append(&f.src.join(&changed), &random_bytes(300, 10));
    fs::remove_file(f.src.join(&removed)).unwrap();
    write_random_file(&f.src.join("new/one.txt"), 500, 11);
    write_random_file(&f.src.join("new/two.txt"), 700, 12);
    set_old_mtimes(&f.src);
    let to_hash = size + 300 + 500 + 700;

    for _ in 0..2 {
        let d = f.server.cli_json(&["refresh", &f.id, "--dry-run"]);
        assert_eq!(d["dry_run"], true, "{d:#}");
        assert_eq!(num(&d, "source_version"), 2, "the version a refresh would create");
        assert!(d["content_root"].is_null(), "a dry run hashes nothing: {d:#}");
        assert_eq!(num(&d, "files_added"), 2);
        assert_eq!(num(&d, "files_changed"), 1);
        assert_eq!(num(&d, "files_removed"), 1);
        assert_eq!(num(&d, "files_unchanged"), files - 2);
        assert_eq!(num(&d, "files"), files + 1);
        assert_eq!(list(&d, "added"), ["new/one.txt", "new/two.txt"]);
        assert_eq!(list(&d, "changed"), std::slice::from_ref(&changed));
        assert_eq!(list(&d, "removed"), std::slice::from_ref(&removed));
        assert_eq!(num(&d, "bytes_to_hash"), to_hash);
        assert_eq!(num(&d, "bytes_hashed"), 0);
        // Nothing was committed.
        let show = assert_versions(&f.server, &f.id, 1, &[1]);
        assert_eq!(text(&show, "content_root"), text(&f.v1, "content_root"));
    }
    // The text form lists the paths too.
    let out = f.server.cli(&["refresh", &f.id, "--dry-run"]);
    assert!(out.status.success());
    let txt = String::from_utf8_lossy(&out.stdout);
    for line in ["+ new/one.txt".to_owned(), "+ new/two.txt".into(), format!("~ {changed}"), format!("- {removed}")] {
        assert!(txt.lines().any(|l| l.trim() == line), "dry-run text lacks {line:?}:\n{txt}");
    }

    // The real refresh takes the next number and does what the dry run said.
    let r2 = f.server.cli_json(&["refresh", &f.id]);
    assert_eq!(num(&r2, "source_version"), 2);
    assert_eq!(num(&r2, "files_added"), 2);
    assert_eq!(num(&r2, "files_changed"), 1);
    assert_eq!(num(&r2, "files_removed"), 1);
    assert_eq!(num(&r2, "bytes_hashed"), to_hash);
    assert_eq!(num(&r2, "files_read"), 3);

    // Nothing left to do: an empty dry run, then the next real version is 3.
    let d = f.server.cli_json(&["refresh", &f.id, "--dry-run"]);
    assert_eq!(num(&d, "source_version"), 3);
    assert_eq!((num(&d, "files_added"), num(&d, "files_changed"), num(&d, "files_removed")), (0, 0, 0));
    assert_eq!(num(&d, "bytes_to_hash"), 0);
    assert!(list(&d, "added").is_empty() && list(&d, "changed").is_empty() && list(&d, "removed").is_empty());
    assert_versions(&f.server, &f.id, 2, &[1, 2]);
    assert_eq!(num(&f.server.cli_json(&["refresh", &f.id]), "source_version"), 3);
}

#[test]
fn missing_source_folder_is_refused_and_the_last_version_stays() {
    let f = fixture(10, 4, 0..4 * KIB);
    let away = f.dir.join("src.away");
    fs::rename(&f.src, &away).unwrap();
    let msg = f.server.cli_fail(&["refresh", &f.id]);
    assert!(msg.contains(s(&f.src)) && msg.contains("does not exist"), "{msg}");
    assert_versions(&f.server, &f.id, 1, &[1]);
    // A file where the folder was.
    fs::write(&f.src, b"not a folder").unwrap();
    let msg = f.server.cli_fail(&["refresh", &f.id]);
    assert!(msg.contains(s(&f.src)) && msg.contains("not a folder"), "{msg}");
    assert_versions(&f.server, &f.id, 1, &[1]);
    // Back in place: the next refresh is version 2, and nothing is read again.
    fs::remove_file(&f.src).unwrap();
    fs::rename(&away, &f.src).unwrap();
    let r = f.server.cli_json(&["refresh", &f.id]);
    assert_eq!(num(&r, "source_version"), 2);
    assert_eq!(num(&r, "bytes_hashed"), 0);
    assert_eq!(text(&r, "content_root"), text(&f.v1, "content_root"));
}

#[test]
fn bad_source_entries_are_refused_and_all_named() {
    let f = fixture(20, 5, 0..4 * KIB);
    let root1 = text(&f.v1, "content_root").to_owned();
    type Make = fn(&Path);
    let cases: [(&str, Make, &[&str]); 4] = [
        (
            "esc",
            |p| std::os::unix::fs::symlink("../../etc/passwd", p).unwrap(),
            &["esc", "../../etc/passwd", "outside"],
        ),
        ("abs", |p| std::os::unix::fs::symlink("/etc/passwd", p).unwrap(), &["abs", "/etc/passwd", "outside"]),
        ("pipe", |p| mkfifo(p), &["pipe", "FIFO"]),
        ("", |_| {}, &["bad-", "-name.txt", "UTF-8"]),
    ];
    let non_utf8 = f.src.join(non_utf8_name());
    let make = |name: &str, mk: Make| -> PathBuf {
        if name.is_empty() {
            fs::write(&non_utf8, b"x").unwrap();
            non_utf8.clone()
        } else {
            let p = f.src.join(name);
            mk(&p);
            p
        }
    };
    // One at a time.
    for (name, mk, words) in cases {
        let p = make(name, mk);
        let msg = f.server.cli_fail(&["refresh", &f.id]);
        assert!(msg.contains("1 source entry refused") && msg.contains("nothing was committed"), "{name}: {msg}");
        for w in words {
            assert!(msg.contains(w), "the message for {p:?} should mention {w:?}: {msg}");
        }
        assert_versions(&f.server, &f.id, 1, &[1]);
        fs::remove_file(&p).unwrap();
    }
    // All at once: every one is named.
    let made: Vec<PathBuf> = cases.iter().map(|(name, mk, _)| make(name, *mk)).collect();
    let msg = f.server.cli_fail(&["refresh", &f.id]);
    assert!(msg.contains("4 source entries refused"), "{msg}");
    for (_, _, words) in cases {
        for w in words {
            assert!(msg.contains(w), "the message should mention {w:?}: {msg}");
        }
    }
    assert_versions(&f.server, &f.id, 1, &[1]);
    // A dry run refuses them too.
    let msg = f.server.cli_fail(&["refresh", &f.id, "--dry-run"]);
    assert!(msg.contains("4 source entries refused"), "{msg}");
    // Cleaned up: version 2, the same content as version 1.
    for p in made {
        fs::remove_file(p).unwrap();
    }
    let r = f.server.cli_json(&["refresh", &f.id]);
    assert_eq!(num(&r, "source_version"), 2);
    assert_eq!(num(&r, "bytes_hashed"), 0);
    assert_eq!(text(&r, "content_root"), root1);
}

#[test]
fn bad_commands_are_refused_with_a_clear_message() {
    let f = fixture(5, 6, 0..KIB);
    let msg = f.server.cli_fail(&["refresh", "PS1FFFFF"]);
    assert!(msg.contains("no package \"PS1FFFFF\""), "{msg}");
    let msg = f.server.cli_fail(&["refresh", "nope", "--dry-run"]);
    assert!(msg.contains("no package \"nope\""), "{msg}");
    let msg = f.server.cli_fail(&["package", "show", "nope"]);
    assert!(msg.contains("no package \"nope\""), "{msg}");

    let missing = f.dir.join("no-such-folder");
    let msg = f.server.cli_fail(&["package", "add", "x", s(&missing)]);
    assert!(msg.contains(s(&missing)) && msg.contains("cannot be used"), "{msg}");
    let file = f.dir.join("a-file");
    fs::write(&file, b"x").unwrap();
    let msg = f.server.cli_fail(&["package", "add", "x", s(&file)]);
    assert!(msg.contains(s(&file)) && msg.contains("not a folder"), "{msg}");
    let msg = f.server.cli_fail(&["package", "add", "app", s(&f.src)]);
    assert!(msg.contains("\"app\"") && msg.contains("already taken") && msg.contains(&f.id), "{msg}");
    let msg = f.server.cli_fail(&["package", "add", " ", s(&f.src)]);
    assert!(msg.contains("package name"), "{msg}");

    // With --json the reason is also a JSON document on stdout.
    let out = f.server.cli(&["refresh", "nope", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).expect("a JSON error document");
    assert!(text(&v, "error").contains("no package \"nope\""), "{v}");

    // Nothing changed on the way.
    let list = f.server.cli_json(&["package", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:#}");
    assert_versions(&f.server, &f.id, 1, &[1]);
}

#[test]
fn a_second_server_on_the_same_data_dir_or_socket_refuses_to_start() {
    let dir = TestDir::new();
    let server = Server::start(dir.join("d"), "PS1");
    let err = Server::refuse_to_start(&server.data_dir, &ServerOpts::site("PS1"));
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("dpsync: another dpsync process is using the data directory")
            && last.contains(s(&server.data_dir)),
        "{err}"
    );
    // Another data directory, the same socket.
    let opts = ServerOpts { socket: Some(server.socket()), ..ServerOpts::site("PS1") };
    let err = Server::refuse_to_start(dir.join("d2"), &opts);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("dpsync: a server is already listening on") && last.contains(s(&server.socket())),
        "{err}"
    );
    // The first one is unharmed.
    assert_eq!(text(&server.cli_json(&["info"]), "site_code"), "PS1");
}

#[test]
fn admin_socket_is_0660_and_removed_on_sigterm() {
    let dir = TestDir::new();
    let mut server = Server::start(dir.join("d"), "PS1");
    let md = fs::symlink_metadata(server.socket()).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    let info = server.cli_json(&["info"]);
    assert_eq!(text(&info, "database"), "sqlite");
    assert_eq!(text(&info, "data_dir"), s(&server.data_dir));
    assert_eq!(num(&info, "packages"), 0);

    let status = server.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}\n{}", server.log());
    assert!(!server.socket().exists(), "the socket is removed on SIGTERM");
    assert!(server.log().contains("dpsync server stopped"));
    let msg = server.cli_fail(&["info"]);
    assert!(msg.contains("cannot reach the dpsync server") && msg.contains(s(&server.socket())), "{msg}");
}

#[test]
fn a_stale_socket_after_sigkill_is_handled_at_restart() {
    let f = fixture(5, 7, 0..KIB);
    let mut server = f.server;
    server.kill9();
    let sock = server.socket();
    assert!(fs::symlink_metadata(&sock).unwrap().file_type().is_socket(), "SIGKILL leaves the socket behind");
    let msg = server.cli_fail(&["info"]);
    assert!(msg.contains("cannot reach the dpsync server"), "{msg}");

    server.restart();
    assert!(server.log().contains("removed a stale admin socket"), "{}", server.log());
    assert_versions(&server, &f.id, 1, &[1]);
    let r = server.cli_json(&["refresh", &f.id]);
    assert_eq!(num(&r, "source_version"), 2);
    assert_eq!(num(&r, "bytes_hashed"), 0);
    drop(server);
}

#[test]
fn site_code_names_packages_and_is_pinned_to_the_data_dir() {
    let dir = TestDir::new();
    let src = dir.join("src");
    gen_tree(&src, 3, 8, 0..KIB);
    let mut server = Server::start(dir.join("d"), "XY9");
    assert_eq!(text(&server.cli_json(&["info"]), "site_code"), "XY9");
    assert_eq!(text(&server.cli_json(&["package", "add", "one", s(&src)]), "id"), "XY900001");
    let two = server.cli_json(&["package", "add", "two", s(&src)]);
    assert_eq!(text(&two, "id"), "XY900002");
    assert_eq!(text(&two, "source_site"), "XY9");
    server.terminate();

    for opts in [ServerOpts::site("PS1"), ServerOpts::default()] {
        let err = Server::refuse_to_start(&server.data_dir, &opts);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("dpsync: this data directory belongs to site XY9, not PS1")
                && last.contains("--site-code XY9"),
            "{err}"
        );
    }
    // The right code (in any case) is accepted, and ids keep counting.
    server.opts.site_code = Some("xy9".into());
    server.restart();
    assert_eq!(text(&server.cli_json(&["package", "add", "three", s(&src)]), "id"), "XY900003");
    assert_eq!(server.cli_json(&["package", "list"]).as_array().unwrap().len(), 3);

    let err = Server::refuse_to_start(dir.join("d2"), &ServerOpts::site("TOOLONG"));
    assert!(err.contains("site code \"TOOLONG\" is invalid"), "{err}");
}

#[test]
fn gc_removes_pruned_content_and_keeps_the_current() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let tree = gen_tree(&src, 40, 9, 0..8 * KIB);
    let a = src.join("a.bin");
    let contents: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(100_000 + i * 1000, 100 + i as u64)).collect();
    let objects: Vec<String> = contents.iter().map(|c| blake3_hex(c)).collect();
    let config = dir.join("server.toml");
    fs::write(&config, "keep_versions = 2\n").unwrap();
    let server = Server::start_with(dir.join("d"), ServerOpts { config: Some(config), ..ServerOpts::site("PS1") });
    let lib = server.library();
    fs::write(&a, &contents[0]).unwrap();
    set_old_mtimes(&src);
    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    let mut roots = Vec::new();
    for (i, c) in contents.iter().enumerate() {
        if i > 0 {
            fs::write(&a, c).unwrap();
            set_old_mtimes(&src);
        }
        let r = server.cli_json(&["refresh", &id]);
        assert_eq!(num(&r, "source_version"), i as u64 + 1);
        assert_eq!(num(&r, "bytes_hashed"), if i == 0 { tree.total_bytes() + c.len() as u64 } else { c.len() as u64 });
        roots.push(text(&r, "content_root").to_owned());
    }
    // keep_versions = 2: the refresh itself pruned version 1; its content is still there.
    assert_versions(&server, &id, 3, &[2, 3]);
    for o in &objects {
        assert!(library_object(&lib, o).is_file(), "object {o} present before gc");
    }
    // What the retained versions (2 and 3) use: the tree, contents[1] and contents[2].
    let mut live: std::collections::BTreeSet<String> = tree_digest(&src)
        .0
        .into_values()
        .filter_map(|n| match n {
            Node::File { blake3, .. } => Some(blake3),
            _ => None,
        })
        .collect();
    live.insert(objects[1].clone());
    assert!(live.contains(&objects[2]));

    let g = server.cli_json(&["gc"]);
    assert_eq!(num(&g, "versions_pruned"), 0, "{g:#}");
    assert_eq!(num(&g, "objects_removed"), 1, "{g:#}");
    assert_eq!(num(&g, "bytes_removed"), contents[0].len() as u64, "{g:#}");
    assert_eq!(num(&g, "objects_kept"), live.len() as u64, "{g:#}");
    assert!(!library_object(&lib, &objects[0]).exists(), "pruned content is removed");
    for o in &live {
        assert!(library_object(&lib, o).is_file(), "live object {o} is kept");
    }

    // Unchanged: nothing read. Version 2 is pruned now, so contents[1] goes at the next gc.
    let r4 = server.cli_json(&["refresh", &id]);
    assert_eq!(num(&r4, "source_version"), 4);
    assert_eq!(num(&r4, "bytes_hashed"), 0);
    assert_eq!(text(&r4, "content_root"), roots[2]);
    let g = server.cli_json(&["gc"]);
    assert_eq!(num(&g, "objects_removed"), 1, "{g:#}");
    assert_eq!(num(&g, "bytes_removed"), contents[1].len() as u64, "{g:#}");
    assert!(!library_object(&lib, &objects[1]).exists());
    assert!(library_object(&lib, &objects[2]).is_file());

    // --verify after gc: everything is read, the content is all there, same root.
    let r5 = server.cli_json(&["refresh", &id, "--verify"]);
    assert_eq!(num(&r5, "source_version"), 5);
    assert_eq!(num(&r5, "bytes_hashed"), num(&r5, "total_bytes"));
    assert_eq!(num(&r5, "bytes_stored"), 0, "gc kept every object of the current version");
    assert_eq!(text(&r5, "content_root"), roots[2]);
    let g = server.cli_json(&["gc"]);
    assert_eq!((num(&g, "objects_removed"), num(&g, "bytes_removed")), (0, 0), "{g:#}");
    assert_versions(&server, &id, 5, &[4, 5]);
}

#[test]
fn sigkill_during_a_refresh_leaves_no_partial_version() {
    let f = fixture(4, 10, 1..KIB);
    let mut server = f.server;
    let before = assert_versions(&server, &f.id, 1, &[1]);
    // 60 × 4 MiB, so that the refresh is still importing when the server is killed.
    let mut tree = f.tree.clone();
    for i in 0..60 {
        tree.add_file(&f.src, &format!("big/{i:02}.bin"), 4 * MIB, 1000 + i);
    }
    set_old_mtimes(&f.src);
    let tmp = server.library().join("tmp");

    let mut cli = server.spawn_cli("killed-refresh", &["refresh", &f.id, "--json"]);
    // The fixture's refresh logged the first "refresh started".
    server.daemon_mut().expect_log_count("refresh started", 2, Duration::from_secs(20));
    // Wait until content is being written into the library (or briefly, at most).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while count_entries(&tmp) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(cli.is_running(), "the refresh ended before the server was killed; make the tree bigger\n{}", cli.log());
    server.kill9();
    let status = cli.expect_exit(Duration::from_secs(10));
    assert!(!status.success(), "the interrupted refresh must fail: {status}\n{}", cli.log());
    assert!(cli.log().contains("dpsync: "), "with a reason: {}", cli.log());

    server.restart();
    let after = assert_versions(&server, &f.id, 1, &[1]);
    assert_eq!(after["versions"], before["versions"], "no partial version after the crash");
    assert_eq!(count_entries(&tmp), 0, "the library's tmp is emptied at start");

    let r = server.cli_json(&["refresh", &f.id]);
    assert_eq!(num(&r, "source_version"), 2);
    assert_eq!(num(&r, "files_added"), 60);
    assert_eq!(num(&r, "files_changed"), 0);
    assert_eq!(num(&r, "files_read"), 60);
    assert_eq!(num(&r, "bytes_hashed"), 240 * MIB);
    assert_eq!(num(&r, "files"), tree.file_count());
    assert_eq!(num(&r, "total_bytes"), tree.total_bytes());
    assert_versions(&server, &f.id, 2, &[1, 2]);
    drop(server);
}

#[test]
fn postgres_add_refresh_and_unchanged() {
    let Some(db) = PgDatabase::create() else { return };
    let dir = TestDir::new();
    let src = dir.join("src");
    let tree = gen_tree(&src, 60, 11, 0..16 * KIB);
    set_old_mtimes(&src);
    let opts = ServerOpts { database_url: Some(db.url.clone()), ..ServerOpts::site("PG1") };
    let mut server = Server::start_with(dir.join("d"), opts);
    let info = server.cli_json(&["info"]);
    assert_eq!(text(&info, "database"), "postgres", "{info:#}");
    assert!(!server.data_dir.join("dpsync.db").exists(), "no SQLite database with --database-url postgres://");

    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    assert_eq!(id, "PG100001");
    let r1 = server.cli_json(&["refresh", &id]);
    assert_eq!(num(&r1, "source_version"), 1);
    assert_eq!(num(&r1, "files_added"), tree.file_count());
    assert_eq!(num(&r1, "bytes_hashed"), tree.total_bytes());
    let r2 = server.cli_json(&["refresh", &id]);
    assert_eq!(num(&r2, "source_version"), 2);
    assert_eq!(num(&r2, "bytes_hashed"), 0);
    assert_eq!(num(&r2, "files_read"), 0);
    assert_eq!(text(&r2, "content_root"), text(&r1, "content_root"));

    // It is all in PostgreSQL: it survives a restart.
    server.restart();
    assert_versions(&server, &id, 2, &[1, 2]);
    let r3 = server.cli_json(&["refresh", &id]);
    assert_eq!(num(&r3, "source_version"), 3);
    assert_eq!(num(&r3, "bytes_hashed"), 0);
    server.terminate();
    drop(server);
    drop(db);
}

#[test]
fn a_path_that_changes_kind_counts_as_removed_and_added() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let mut tree = gen_tree(&src, 10, 12, 1..KIB);
    tree.add_file(&src, "x.bin", 100, 1);
    tree.add_symlink(&src, "l", "x.bin");
    set_old_mtimes(&src);
    let files = tree.file_count();
    let server = Server::start(dir.join("d"), "PS1");
    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    let r1 = server.cli_json(&["refresh", &id]);
    assert_eq!((num(&r1, "files"), num(&r1, "symlinks")), (files, 1));

    // The file x.bin becomes a folder holding a file; the symlink l becomes a file.
    fs::remove_file(src.join("x.bin")).unwrap();
    write_random_file(&src.join("x.bin/inner"), 200, 2);
    fs::remove_file(src.join("l")).unwrap();
    write_random_file(&src.join("l"), 300, 3);
    set_old_mtimes(&src);

    let d = server.cli_json(&["refresh", &id, "--dry-run"]);
    assert_eq!(list(&d, "added"), ["l", "x.bin/inner"], "{d:#}");
    assert_eq!(list(&d, "removed"), ["x.bin"], "{d:#}");
    assert!(list(&d, "changed").is_empty(), "{d:#}");
    assert_eq!((num(&d, "files_added"), num(&d, "files_changed"), num(&d, "files_removed")), (2, 0, 1), "{d:#}");
    assert_eq!(num(&d, "files_unchanged"), files - 1, "{d:#}");
    assert_eq!(num(&d, "bytes_to_hash"), 500);

    let r2 = server.cli_json(&["refresh", &id]);
    assert_eq!(num(&r2, "source_version"), 2);
    assert_eq!((num(&r2, "files_added"), num(&r2, "files_changed"), num(&r2, "files_removed")), (2, 0, 1), "{r2:#}");
    assert_eq!(num(&r2, "files_unchanged"), files - 1, "{r2:#}");
    assert_eq!((num(&r2, "files"), num(&r2, "symlinks")), (files + 1, 0));
    assert_eq!(num(&r2, "bytes_hashed"), 500);
}

#[test]
fn dp_add_refuses_urls_no_site_can_connect_to() {
    let dir = TestDir::new();
    let server = Server::start(dir.join("d"), "PS1");
    for (url, why) in [
        ("https://127.0.0.1:0", "port 0"),
        ("https://0.0.0.0:8443", "no host"),
        ("https://[::]:8443", "no host"),
        ("ftp://dp.example:21", "must be https://"),
        ("not a url", "invalid"),
    ] {
        let err = server.cli_fail(&["dp", "add", "dp1", url]);
        assert!(err.contains(why), "dp add {url}: {err}");
    }
    assert!(server.cli_json(&["dp", "list"]).as_array().unwrap().is_empty(), "nothing was added");
    server.cli_json(&["dp", "add", "dp1", "https://127.0.0.1:8443"]);
}

/// How many manifests the server's SQLite store holds for `pkg` (read beside the server).
fn manifest_rows(server: &Server, pkg: &str) -> i64 {
    let url = format!("sqlite://{}", server.data_dir.join("dpsync.db").display());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = dpsync_store::Store::connect(&url).await.unwrap();
        let n = store.manifest_count(pkg).await.unwrap();
        store.close().await;
        n
    })
}
