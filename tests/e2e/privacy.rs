//! What a site and a DP keep on disk is private to their user: another local user can
//! read no database (tokens), key or library object, whatever the umask the data
//! directories were created with.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

/// The user every other local account stands for (`nobody` on Debian).
const OTHER_UID: u32 = 65534;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

/// Whether `OTHER_UID` can read `path` (runs `cat` as that user).
fn other_user_can_read(path: &Path) -> bool {
    Command::new("cat")
        .arg(path)
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run cat as uid {OTHER_UID}: {e}"))
        .success()
}

/// Every regular file below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn another_local_user_reads_no_database_key_or_content() {
    use std::os::unix::fs::MetadataExt;
    if fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        if std::env::var_os("CI").is_some() {
            panic!("this test runs as root in CI: it reads the daemons' files as another user (uid {OTHER_UID})");
        }
        eprintln!("skipped: needs root to read files as another user (uid {OTHER_UID})");
        return;
    }
    let dir = TestDir::new();
    // What a careless install gives: folders anyone may enter, created under umask 000,
    // and a database file left readable by all.
    chmod(dir.path(), 0o755);
    let (data, agent_dir, src) = (dir.join("d"), dir.join("a1"), dir.join("src"));
    for d in [&data, &agent_dir, &src] {
        fs::create_dir_all(d).unwrap();
        chmod(d, 0o777);
    }
    fs::write(data.join("dpsync.db"), b"").unwrap();
    chmod(&data.join("dpsync.db"), 0o666);
    fs::create_dir_all(src.join("conf")).unwrap();
    fs::write(src.join("conf/secret.txt"), b"the confidential part of the package\n").unwrap();
    chmod(&src.join("conf/secret.txt"), 0o600);
    chmod(&src.join("conf"), 0o700);
    fs::write(src.join("readme.txt"), b"public\n").unwrap();

    let server = Server::start(&data, "PS1");
    let agent = Agent::start(&agent_dir, Some("token-dp1"));
    let id = server.cli_json(&["package", "add", "app", src.to_str().unwrap()])["id"].as_str().unwrap().to_owned();
    server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "token-dp1"]);
    server.cli_json(&["distribute", &id, "--dp", "dp1"]);
    server.cli_json(&["refresh", &id]);
    server.wait_status(&id, "dp1 installed", Duration::from_secs(60), &[agent.daemon()], |s| {
        target_of(s, "dp1")["state"] == "installed"
    });

    assert_eq!(mode(&data), 0o700, "the server's data directory is tightened");
    assert_eq!(mode(&agent_dir), 0o700, "the agent's data directory is tightened");
    for db in [data.join("dpsync.db"), data.join("dpsync.db-wal"), agent_dir.join("agent.db")] {
        assert_eq!(mode(&db), 0o600, "{} is the owner's only", db.display());
    }
    let objects = files_below(&data.join("library/objects"));
    assert!(objects.len() >= 2, "the site's library holds the package's files");
    for o in &objects {
        assert_eq!(mode(o) & 0o077, 0, "library object {} is not readable by others", o.display());
    }

    // Even with the folders opened again (an administrator's chmod, a backup tool), the
    // files themselves keep other users out.
    chmod(&data, 0o755);
    chmod(&data.join("library"), 0o755);
    let mut secrets = vec![data.join("dpsync.db"), data.join("dpsync.db-wal"), data.join("site.key")];
    secrets.extend(objects);
    for f in secrets.iter().filter(|f| f.exists()) {
        let mut p = f.parent();
        while let Some(d) = p.filter(|d| d.starts_with(&data)) {
            chmod(d, 0o755);
            p = d.parent();
        }
        assert!(!other_user_can_read(f), "another user read {}", f.display());
    }
    chmod(&agent_dir, 0o755);
    assert!(!other_user_can_read(&agent_dir.join("agent.db")), "another user read the agent's database");
    // And the data directories themselves are closed again at the next start.
    let mut server = server;
    server.restart();
    assert_eq!(mode(&data), 0o700, "a restart closes the data directory again");
}
