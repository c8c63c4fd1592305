//! `dpsync backup` and `dpsync restore` end to end: a backup of a running server (with
//! and without the content library), the server killed and its data directory wiped, the
//! backup restored into a new one, and the restored server carrying on as the same site:
//! same packages, versions and target states, the same site key (the DPs accept its next
//! version without re-pinning), and a small change still sent as a small transfer. Also
//! the refusals (a non-empty folder, a tampered backup), and the PostgreSQL path with
//! `pg_dump` / `pg_restore`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// Longest a distribution step may take in these tests.
const WAIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A server on `DIR/d` with `dps` agents (`dp1`, `dp2`, … in group `all`, each with its
/// own token), and a package `app` over a generated tree in `DIR/src`, distributed and
/// installed everywhere at version 1.
struct Setup {
    server: Server,
    agents: Vec<Agent>,
    src: PathBuf,
    id: String,
    // Last, so that the daemons are stopped before their directories are removed.
    dir: TestDir,
}

impl Setup {
    fn new(dps: usize, opts: ServerOpts) -> Self {
        let dir = TestDir::new();
        let src = dir.join("src");
        // 80 files of 1–64 KiB and one of 1–3 MiB: a few MiB in all.
        gen_tree(&src, 80, 8, 1024..64 * 1024);
        set_old_mtimes(&src);
        let server = Server::start_with(dir.join("d"), opts);
        let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
        let mut agents = Vec::new();
        for i in 0..dps {
            let name = format!("dp{}", i + 1);
            let token = format!("token-{name}");
            let agent = Agent::start(dir.join(format!("a{}", i + 1)), Some(&token));
            server.cli_json(&["dp", "add", &name, &agent.url(), "--group", "all", "--token", &token]);
            agents.push(agent);
        }
        let setup = Self { server, agents, src, id, dir };
        if dps > 0 {
            setup.server.cli_json(&["distribute", &setup.id, "--group", "all"]);
        }
        let r = setup.refresh_wait();
        assert_eq!(num(&r, "source_version"), 1, "{r:#}");
        setup.assert_dps_match_source();
        setup
    }

    fn daemons(&self) -> Vec<&Daemon> {
        self.agents.iter().map(Agent::daemon).collect()
    }

    /// `refresh app --wait --json`, which must exit 0.
    fn refresh_wait(&self) -> Value {
        self.server.cli_json(&["refresh", &self.id, "--wait", "--timeout", "60"])
    }

    fn assert_dps_match_source(&self) {
        for a in &self.agents {
            assert_same_tree(&self.src, &a.current(&self.id));
        }
    }

    /// Total bytes of the package's files.
    fn package_bytes(&self) -> u64 {
        walkdir::WalkDir::new(&self.src)
            .into_iter()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().is_file())
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    /// Overwrites 4 KiB in the middle of the largest source file: a small change.
    fn small_change(&self, seed: u64) {
        let largest = walkdir::WalkDir::new(&self.src)
            .into_iter()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().is_file())
            .max_by_key(|e| e.metadata().unwrap().len())
            .unwrap()
            .into_path();
        let len = fs::metadata(&largest).unwrap().len();
        let mut data = fs::read(&largest).unwrap();
        let at = (len / 2) as usize;
        data[at..at + 4096].copy_from_slice(&random_bytes(4096, seed));
        fs::write(&largest, data).unwrap();
        set_old_mtimes(&self.src);
    }

    /// Kills the server (SIGKILL, as a crash) and removes its data directory.
    fn lose_the_server(&mut self) {
        self.server.kill9();
        fs::remove_dir_all(&self.server.data_dir).unwrap();
    }

    /// What must survive a backup and restore: the packages with their versions and
    /// content roots, every target's state and installed version, the site key.
    fn identity(&self) -> Value {
        let packages: Vec<Value> = self.server.cli_json(&["package", "list"]).as_array().unwrap().clone();
        let packages: Vec<Value> = packages
            .iter()
            .map(|p| {
                serde_json::json!({"id": p["id"], "name": p["name"], "source_version": p["source_version"],
                    "content_root": p["content_root"], "source_site": p["source_site"]})
            })
            .collect();
        let status = self.server.status(&self.id);
        let targets: Vec<Value> = status["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                serde_json::json!({"name": t["name"], "kind": t["kind"], "state": t["state"],
                    "installed_version": t["installed_version"], "desired_version": t["desired_version"]})
            })
            .collect();
        let site_key = self.server.cli_json(&["info"])["site_key"].clone();
        let dps: Vec<Value> = self
            .server
            .cli_json(&["dp", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|t| serde_json::json!({"name": t["name"], "url": t["url"], "has_token": t["has_token"]}))
            .collect();
        serde_json::json!({"packages": packages, "targets": targets, "site_key": site_key, "dps": dps})
    }
}

/// `dpsync restore BACKUP --data-dir NEW [extra…] --json`, whatever its outcome.
fn restore(backup: &Path, new: &Path, extra: &[&str]) -> Output {
    let mut cmd = dpsync_command();
    cmd.arg("restore").arg(backup).arg("--data-dir").arg(new).args(extra).arg("--json");
    run_bounded(&mut cmd, CLI_TIMEOUT)
}

/// [`restore`], which must succeed; returns its JSON.
fn restore_ok(backup: &Path, new: &Path, extra: &[&str]) -> Value {
    let out = restore(backup, new, extra);
    assert!(
        out.status.success(),
        "restore failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("restore printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// [`restore`], which must fail with exit 1 and a one-line reason; returns it.
fn restore_refused(backup: &Path, new: &Path) -> String {
    let out = restore(backup, new, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_owned();
    assert_eq!(out.status.code(), Some(1), "restore should have been refused; stderr: {stderr}");
    assert!(stderr.starts_with("dpsync: ") && !stderr.contains('\n'), "one-line reason expected: {stderr}");
    stderr
}

/// Every file under `root` is readable by its owner only, every folder 0700.
fn assert_private(root: &Path) {
    for e in walkdir::WalkDir::new(root) {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
        if e.file_type().is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", e.path().display());
        } else {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", e.path().display());
        }
    }
}

/// Objects in a content library.
fn library_objects(lib: &Path) -> usize {
    fs::read_dir(lib.join("objects")).map(|rd| rd.map(|d| count_entries(&d.unwrap().path())).sum()).unwrap_or(0)
}

/// After a small change, a refresh installs on every DP, sends far less than the package,
/// and the DPs hold the source exactly.
fn small_change_goes_through(setup: &Setup, seed: u64) -> Value {
    setup.small_change(seed);
    let r = setup.refresh_wait();
    let version = num(&r, "source_version");
    let size = setup.package_bytes();
    let daemons = setup.daemons();
    for i in 0..setup.agents.len() {
        let t = setup.server.wait_installed(&setup.id, &format!("dp{}", i + 1), version, WAIT, &daemons);
        let sent = num(&t, "bytes_sent_last");
        assert!(sent < size / 20, "dp{}: {sent} bytes sent for a 4 KiB change of a {size}-byte package", i + 1);
        assert!(t["last_error"].is_null(), "{t:#}");
    }
    setup.assert_dps_match_source();
    // Same key: pinned once, at the first version ever, and never refused since.
    for a in &setup.agents {
        let log = a.log();
        assert!(!log.contains("does not match the pinned key"), "a DP refused the site key:\n{log}");
        assert_eq!(log.matches("pinning the key of a source site on first use").count(), 1, "{log}");
    }
    r
}

#[test]
fn backup_with_library_of_a_running_server_restores_the_same_site() {
    let mut setup = Setup::new(2, ServerOpts::site("PS1"));
    let before = setup.identity();
    let bk = setup.dir.join("bk");

    let b = setup.server.cli_json(&["backup", s(&bk), "--with-library"]);
    assert_eq!(b["database"], "sqlite", "{b:#}");
    assert_eq!(b["database_included"], true, "{b:#}");
    assert_eq!(b["site_key"], true, "{b:#}");
    let lib = &b["library"];
    let objects = num(lib, "objects");
    assert!(objects >= 70, "{b:#}");
    assert_eq!(num(lib, "linked") + num(lib, "copied"), objects, "{b:#}");
    // /tmp is one filesystem: hard links.
    assert_eq!(lib["method"], "hardlink", "{b:#}");
    assert!(bk.join("backup.json").is_file() && bk.join("dpsync.db").is_file() && bk.join("site.key").is_file());
    assert_eq!(library_objects(&bk.join("library")), objects as usize);
    assert_private(&bk);
    let manifest: Value = serde_json::from_slice(&fs::read(bk.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 1, "{manifest:#}");
    assert_eq!(manifest["site_code"], "PS1", "{manifest:#}");
    for f in ["dpsync.db", "site.key"] {
        assert_eq!(manifest["files"][f]["blake3"].as_str().unwrap().len(), 64, "{manifest:#}");
    }

    setup.lose_the_server();
    let new = setup.dir.join("n");
    let r = restore_ok(&bk, &new, &[]);
    assert_eq!(r["site_code"], "PS1", "{r:#}");
    assert_eq!(r["database_restored"], true, "{r:#}");
    assert_eq!(num(&r["library"], "objects"), objects, "{r:#}");
    assert_eq!(r["scan_caches_cleared"], false, "{r:#}");
    assert!(text(&r, "start").contains("--site-code PS1"), "{r:#}");
    assert_eq!(fs::metadata(&new).unwrap().permissions().mode() & 0o777, 0o700);
    assert_private(&new);

    setup.server = Server::start(&new, "PS1");
    let after = setup.identity();
    assert_eq!(before, after, "the restored site differs");
    small_change_goes_through(&setup, 101);
}

#[test]
fn restore_refuses_a_non_empty_folder_and_a_tampered_backup() {
    let setup = Setup::new(0, ServerOpts::site("PS1"));
    let bk = setup.dir.join("bk");
    setup.server.cli_json(&["backup", s(&bk)]);

    // The backup side refuses too: a folder that is not empty, one in the data directory.
    let e = setup.server.cli_fail(&["backup", s(&bk)]);
    assert!(e.contains("not empty"), "{e}");
    let inside = setup.server.data_dir.join("backups");
    let e = setup.server.cli_fail(&["backup", s(&inside)]);
    assert!(e.contains("inside the data directory"), "{e}");
    assert!(!inside.exists());

    let busy = setup.dir.join("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("keep.txt"), b"someone else's").unwrap();
    let e = restore_refused(&bk, &busy);
    assert!(e.contains("not empty") && e.contains("keep.txt"), "{e}");
    assert_eq!(count_entries(&busy), 1, "restore wrote into a folder it refused");

    // A flipped byte in the database copy: refused, naming the file; nothing left behind.
    let db = bk.join("dpsync.db");
    let mut bytes = fs::read(&db).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::set_permissions(&db, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&db, &bytes).unwrap();
    let new = setup.dir.join("n");
    let e = restore_refused(&bk, &new);
    assert!(e.contains("dpsync.db") && e.contains("damaged"), "{e}");
    assert!(!new.exists(), "a refused restore left {} behind", new.display());

    // A folder without backup.json is not a backup (or an unfinished one).
    fs::remove_file(bk.join("backup.json")).unwrap();
    let e = restore_refused(&bk, &new);
    assert!(e.contains("backup.json"), "{e}");
}

#[test]
fn backup_without_library_then_restore_then_refresh_reimports() {
    // Started with a configuration file: the backup keeps a copy and where it was.
    let conf_dir = TestDir::new();
    let conf = conf_dir.join("server.conf");
    fs::write(&conf, "keep_versions = 4\n").unwrap();
    let mut setup = Setup::new(2, ServerOpts { config: Some(conf.clone()), ..ServerOpts::site("PS1") });
    let before = setup.identity();
    let bk = setup.dir.join("bk");
    let b = setup.server.cli_json(&["backup", s(&bk)]);
    assert!(b["library"].is_null(), "{b:#}");
    assert_eq!(b["config"], s(&conf), "{b:#}");
    assert_eq!(fs::read(bk.join("server.toml")).unwrap(), fs::read(&conf).unwrap());
    assert!(b["notes"].to_string().contains("library"), "{b:#}");
    assert!(!bk.join("library").exists());

    setup.lose_the_server();
    let new = setup.dir.join("n");
    let r = restore_ok(&bk, &new, &[]);
    assert!(r["library"].is_null(), "{r:#}");
    assert_eq!(r["scan_caches_cleared"], true, "{r:#}");
    let notes = r["notes"].to_string();
    assert!(notes.contains("library is empty") && notes.contains("redistribute"), "{r:#}");
    assert_eq!(r["config_original"], s(&conf), "{r:#}");
    assert_eq!(fs::read(text(&r, "config")).unwrap(), fs::read(&conf).unwrap());
    assert!(text(&r, "start").contains("--config"), "{r:#}");

    setup.server = Server::start(&new, "PS1");
    assert_eq!(before, setup.identity(), "the restored site differs");
    assert_eq!(library_objects(&setup.server.library()), 0);

    // The next refresh reads the whole source again (into the library), and the DPs
    // still receive only what changed.
    let r = small_change_goes_through(&setup, 202);
    assert_eq!(num(&r, "bytes_hashed"), setup.package_bytes(), "{r:#}");
    assert_eq!(num(&r, "files_changed"), 1, "{r:#}");
    assert!(library_objects(&setup.server.library()) >= 70);

    // The library is whole again: a redistribution (everything, whole) works.
    let out = setup.server.cli(&["redistribute", &setup.id, "--dp", "dp1", "--wait", "--timeout", "60", "--json"]);
    assert!(out.status.success(), "redistribute failed: {}", String::from_utf8_lossy(&out.stderr));
    setup.assert_dps_match_source();
}

/// Runs `program args…`; `Err` when it cannot be started.
fn tool(program: &str, args: &[&str]) -> std::io::Result<Output> {
    try_run_bounded(std::process::Command::new(program).args(args), Duration::from_secs(120))
}

#[test]
fn postgres_site_backup_with_pg_dump_and_restore_with_pg_restore() {
    let required = std::env::var("DPSYNC_REQUIRE_POSTGRES").as_deref() == Ok("1");
    for t in ["pg_dump", "pg_restore"] {
        if tool(t, &["--version"]).is_err() {
            assert!(!required, "{t} is not installed (DPSYNC_REQUIRE_POSTGRES=1)");
            eprintln!("skipping: {t} (PostgreSQL client tools) is not installed");
            return;
        }
    }
    let Some(db) = PgDatabase::create() else { return };
    // Where pg_restore puts the dump (declared before the servers: dropped after them).
    let restored = PgDatabase::create().expect("PostgreSQL answered a moment ago");
    let opts = ServerOpts { database_url: Some(db.url.clone()), ..ServerOpts::site("PS1") };
    let mut setup = Setup::new(2, opts);
    let before = setup.identity();

    // The documented order: the database dump first, then the backup with the library,
    // so the library holds every object the dump names.
    let dump = setup.dir.join("site.dump");
    let out = tool("pg_dump", &["-Fc", "-f", s(&dump), &db.url]).unwrap();
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    let bk = setup.dir.join("bk");
    let b = setup.server.cli_json(&["backup", s(&bk), "--with-library"]);
    assert_eq!(b["database"], "postgres", "{b:#}");
    assert_eq!(b["database_included"], false, "{b:#}");
    assert!(b["notes"].to_string().contains("pg_dump"), "{b:#}");
    assert!(!bk.join("dpsync.db").exists());
    let manifest: Value = serde_json::from_slice(&fs::read(bk.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["database"]["included"], false, "{manifest:#}");

    setup.lose_the_server();
    let out = tool("pg_restore", &["--no-owner", "-d", &restored.url, s(&dump)]).unwrap();
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    let new = setup.dir.join("n");
    let r = restore_ok(&bk, &new, &["--database-url", &restored.url]);
    assert_eq!(r["database_restored"], false, "{r:#}");
    assert_eq!(r["database_checked"], true, "{r:#}");
    assert!(text(&r, "start").contains("--database-url"), "{r:#}");

    let opts = ServerOpts { database_url: Some(restored.url.clone()), ..ServerOpts::site("PS1") };
    setup.server = Server::start_with(&new, opts);
    assert_eq!(before, setup.identity(), "the restored site differs");
    small_change_goes_through(&setup, 303);
}

/// A port that was free a moment ago, for a child site that must come back on the same
/// address (its parent has its URL).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

#[test]
fn a_restored_child_site_keeps_its_tls_identity_and_what_it_received() {
    let dir = TestDir::new();
    let src = dir.join("src");
    gen_tree(&src, 40, 9, 1024..64 * 1024);
    set_old_mtimes(&src);
    let dp2 = Agent::start(dir.join("a2"), Some("dp-secret"));
    let listen = format!("127.0.0.1:{}", free_port());
    let child = ServerOpts {
        args: ["--listen", &listen, "--token", "link-secret"].map(String::from).to_vec(),
        ..ServerOpts::site("CH1")
    };
    let mut ch1 = Server::start_with(dir.join("c"), child.clone());
    let fp_file = dir.join("c").join("tls").join("fingerprint");
    let fingerprint = wait_until("CH1's TLS fingerprint", START_TIMEOUT, &[ch1.daemon()], || {
        fs::read_to_string(&fp_file).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
    });
    ch1.cli_json(&["dp", "add", "dp2", &dp2.url(), "--token", "dp-secret"]);
    let ps1 = Server::start(dir.join("p"), "PS1");
    let url = format!("https://{listen}");
    ps1.cli_json(&["site", "add", "CH1", &url, "--token", "link-secret", "--fingerprint", &fingerprint]);
    let pkg = text(&ps1.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    ps1.cli_json(&["distribute", &pkg, "--site", "CH1"]);
    ps1.cli_json(&["refresh", &pkg, "--wait", "--timeout", "60"]);
    ch1.wait_installed(&pkg, "dp2", 1, WAIT, &[dp2.daemon()]);
    assert_same_tree(&src, &dp2.current(&pkg));

    let bk = dir.join("bk");
    let b = ch1.cli_json(&["backup", s(&bk), "--with-library"]);
    assert_eq!(b["receive_database"], true, "{b:#}");
    assert_eq!(b["tls"], true, "{b:#}");
    assert!(b["notes"].to_string().contains("token"), "the link token is not in a backup: {b:#}");
    let before = (ch1.cli_json(&["package", "list"]), ch1.target_status(&pkg, "dp2")["installed_version"].clone());

    ch1.kill9();
    fs::remove_dir_all(dir.join("c")).unwrap();
    let new = dir.join("c2");
    let r = restore_ok(&bk, &new, &[]);
    assert_eq!(r["receive_database"], true, "{r:#}");
    assert_eq!(fs::read_to_string(new.join("tls").join("fingerprint")).unwrap().trim(), fingerprint);
    let ch1 = Server::start_with(&new, child);
    assert_eq!(
        before,
        (ch1.cli_json(&["package", "list"]), ch1.target_status(&pkg, "dp2")["installed_version"].clone())
    );

    // The parent reaches the restored child on its pinned certificate, and sends only
    // what changed: the child still knows what it holds.
    let largest = walkdir::WalkDir::new(&src)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .into_path();
    append(&largest, &random_bytes(2048, 77));
    set_old_mtimes(&src);
    ps1.cli_json(&["refresh", &pkg, "--wait", "--timeout", "60"]);
    let t = ch1.wait_installed(&pkg, "dp2", 2, WAIT, &[dp2.daemon()]);
    assert!(t["last_error"].is_null(), "{t:#}");
    assert_same_tree(&src, &dp2.current(&pkg));
    let size: u64 = walkdir::WalkDir::new(&src)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let sent = num(&ps1.target_status(&pkg, "CH1"), "bytes_sent_last");
    assert!(sent < size / 20, "{sent} bytes sent to the restored child for a 2 KiB change of {size} bytes");
}

#[test]
fn a_backup_taken_during_a_refresh_is_consistent() {
    let setup = Setup::new(0, ServerOpts::site("PS1"));
    // Change every file, and refresh in the background while the backup runs.
    gen_tree(&setup.src, 80, 9, 1024..64 * 1024);
    set_old_mtimes(&setup.src);
    let mut refresh = setup.server.spawn_cli("refresh", &["refresh", &setup.id, "--json"]);
    let bk = setup.dir.join("bk");
    setup.server.cli_json(&["backup", s(&bk), "--with-library"]);
    assert!(refresh.wait_exit(WAIT).is_some_and(|s| s.success()), "the refresh failed or hung:\n{}", refresh.log());
    let committed = setup.server.cli_json(&["package", "show", &setup.id]);

    // Whichever versions the copy holds, the library holds their content (restore checks
    // it against the restored database and would refuse), and they are committed ones.
    let new = setup.dir.join("n");
    restore_ok(&bk, &new, &[]);
    let restored = Server::start(&new, "PS1");
    let show = restored.cli_json(&["package", "show", &setup.id]);
    let versions = show["versions"].as_array().unwrap();
    assert!(!versions.is_empty(), "{show:#}");
    for v in versions {
        let same =
            committed["versions"].as_array().unwrap().iter().find(|c| c["source_version"] == v["source_version"]);
        assert_eq!(same.map(|c| &c["content_root"]), Some(&v["content_root"]), "{show:#}\n{committed:#}");
    }
}
