//! Prestaged bundles: `dpsync export` on the site, `dpsync agent import` on a DP's data
//! directory, then distribution, which sends only what the bundles lacked. A tampered,
//! truncated or foreign-signed bundle installs nothing; an older version over a newer
//! one changes nothing and says so; a running agent is not imported into.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);
/// The package of the distribution test; 2 % of it is what may be sent after imports.
const PACKAGE_MIB: usize = 16;

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `dpsync agent import FILE --data-dir DIR [--json]`.
fn import(file: &Path, data_dir: &Path) -> Output {
    run_bounded(dpsync_command().args(["agent", "import", s(file), "--data-dir", s(data_dir), "--json"]), CLI_TIMEOUT)
}

fn import_ok(file: &Path, data_dir: &Path) -> Value {
    let out = import(file, data_dir);
    assert!(out.status.success(), "import of {} failed: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts the import fails with one line on stderr; returns it.
fn import_fails(file: &Path, data_dir: &Path) -> String {
    let out = import(file, data_dir);
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(out.status.code(), Some(1), "import of {} should fail; stderr: {stderr}", file.display());
    assert!(stderr.starts_with("dpsync: ") && !stderr.contains('\n'), "one line expected: {stderr}");
    stderr
}

/// A server with package `app` over `DIR/src` holding `mib` MiB of incompressible files.
fn site_with_package(dir: &TestDir, mib: usize) -> (Server, String, PathBuf) {
    let src = dir.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..4 {
        fs::write(src.join(format!("f{i}.bin")), random_bytes(mib * MIB / 4, 10 + i as u64)).unwrap();
    }
    fs::write(src.join("sub/readme.txt"), b"version one\n").unwrap();
    let server = Server::start(dir.join("d"), "PS1");
    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    server.cli_json(&["refresh", &id]);
    (server, id, src)
}

fn current(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("packages").join(id).join("current")
}

#[test]
fn exported_versions_imported_on_a_fresh_dp_leave_distribution_almost_nothing_to_send() {
    let dir = TestDir::new();
    let (server, id, src) = site_with_package(&dir, PACKAGE_MIB);
    // Version 2: a small change in one file.
    let mut f0 = fs::read(src.join("f0.bin")).unwrap();
    f0[1000..1000 + 4096].copy_from_slice(&random_bytes(4096, 99));
    fs::write(src.join("f0.bin"), &f0).unwrap();
    fs::write(src.join("sub/readme.txt"), b"version two\n").unwrap();
    server.cli_json(&["refresh", &id]);

    let full = dir.join("app-v1.bundle");
    let r1 = server.cli_json(&["export", &id, s(&full), "--version", "1"]);
    assert_eq!((r1["package"].as_str(), r1["version"].as_i64()), (Some(id.as_str()), Some(1)), "{r1:#}");
    assert!(r1["chunk_bytes"].as_u64().unwrap() >= (PACKAGE_MIB * MIB) as u64, "{r1:#}");
    assert_eq!(fs::metadata(&full).unwrap().permissions().mode() & 0o777, 0o600, "a bundle is owner-only");
    assert_eq!(fs::metadata(&full).unwrap().len(), r1["bytes"].as_u64().unwrap());
    let delta = dir.join("app-v2-over-v1.bundle");
    let r2 = server.cli_json(&["export", &id, s(&delta), "--base-version", "1"]);
    assert_eq!((r2["version"].as_i64(), r2["base_version"].as_i64()), (Some(2), Some(1)), "{r2:#}");
    let delta_bytes = r2["chunk_bytes"].as_u64().unwrap();
    assert!(delta_bytes > 0 && delta_bytes < (PACKAGE_MIB * MIB / 50) as u64, "only the change: {r2:#}");
    // No temporary file is left beside them.
    let names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");

    // The delta alone cannot install on an empty DP, and installs nothing.
    let dp = dir.join("dp");
    let e = import_fails(&delta, &dp);
    assert!(e.contains("nothing was installed") && e.contains("version 1"), "{e}");
    assert!(!current(&dp, &id).exists());
    // The full version 1, then the delta: version 2, whole.
    let i1 = import_ok(&full, &dp);
    assert_eq!((i1["installed"].as_bool(), i1["version"].as_i64()), (Some(true), Some(1)), "{i1:#}");
    let i2 = import_ok(&delta, &dp);
    assert_eq!((i2["installed"].as_bool(), i2["version"].as_i64()), (Some(true), Some(2)), "{i2:#}");
    assert_same_tree(&src, &current(&dp, &id));
    // Version 1 over version 2: nothing changes, and it says so.
    let again = import_ok(&full, &dp);
    assert_eq!(again["installed"].as_bool(), Some(false), "{again:#}");
    assert!(again["message"].as_str().unwrap().contains("newer"), "{again:#}");
    assert_same_tree(&src, &current(&dp, &id));

    // The DP joins the site: distribution finds the version there.
    let agent = Agent::start(&dp, Some("token-dp1"));
    // A running agent is not imported into behind its back.
    let e = import_fails(&full, &dp);
    assert!(e.contains("running") && e.contains("stop it"), "{e}");
    server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "token-dp1"]);
    server.cli_json(&["distribute", &id, "--dp", "dp1"]);
    let t = server.wait_installed(&id, "dp1", 2, WAIT, &[agent.daemon()]);
    let sent = t["bytes_sent_last"].as_u64().unwrap();
    assert!(sent <= (PACKAGE_MIB * MIB / 50) as u64, "distribution after the import sent {sent} bytes: {t:#}");
    assert_same_tree(&src, &agent.current(&id));
}

#[test]
fn a_tampered_truncated_or_foreign_bundle_installs_nothing() {
    let dir = TestDir::new();
    let (server, id, _src) = site_with_package(&dir, 2);
    let good = dir.join("app.bundle");
    server.cli_json(&["export", &id, s(&good)]);
    let bytes = fs::read(&good).unwrap();
    let dp = dir.join("dp");

    // A byte flipped in the middle (chunk data).
    let tampered = dir.join("tampered.bundle");
    let mut t = bytes.clone();
    let mid = t.len() / 2;
    t[mid] ^= 0x40;
    fs::write(&tampered, &t).unwrap();
    let e = import_fails(&tampered, &dp);
    assert!(e.contains("refused") && (e.contains("altered") || e.contains("damaged")), "{e}");
    assert!(!current(&dp, &id).exists(), "a tampered bundle installed something");

    // Cut short, anywhere: before the end marker, and in the middle of a chunk.
    for keep in [bytes.len() - 10, bytes.len() / 3] {
        let truncated = dir.join("truncated.bundle");
        fs::write(&truncated, &bytes[..keep]).unwrap();
        let e = import_fails(&truncated, &dp);
        assert!(e.contains("truncated"), "{e}");
        assert!(!current(&dp, &id).exists(), "a truncated bundle installed something");
    }

    // Signed by another site with the same code: refused once the DP pinned the first.
    import_ok(&good, &dp);
    let other_dir = TestDir::new();
    let (other, other_id, other_src) = site_with_package(&other_dir, 1);
    assert_eq!(other_id, id, "both sites number their first package alike");
    fs::write(other_src.join("sub/readme.txt"), b"from elsewhere\n").unwrap();
    other.cli_json(&["refresh", &other_id]);
    let foreign = dir.join("foreign.bundle");
    other.cli_json(&["export", &other_id, s(&foreign)]);
    let before = fs::read(current(&dp, &id).join("sub/readme.txt")).unwrap();
    let e = import_fails(&foreign, &dp);
    assert!(e.contains("key") || e.contains("signature"), "{e}");
    assert_eq!(fs::read(current(&dp, &id).join("sub/readme.txt")).unwrap(), before, "a foreign bundle changed the DP");

    // Errors an export knows before it writes: one line, and no file.
    let none = dir.join("none.bundle");
    let e = server.cli_fail(&["export", &id, s(&none), "--version", "9"]);
    assert!(e.contains("version 9"), "{e}");
    let e = server.cli_fail(&["export", &id, s(&none), "--base-version", "1"]);
    assert!(e.contains("--base-version 1"), "{e}");
    assert!(!none.exists());
}
