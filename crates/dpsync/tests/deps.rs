//! The dependency directions between the workspace's crates, checked from
//! `cargo metadata` (the rust-analyzer "tidy" idea): a rule that is only written down
//! drifts.
//!
//! | crate | may depend on (dpsync crates; normal and build dependencies) |
//! | --- | --- |
//! | `dpsync` (binary) | `site`, `agent`, `api`, `transfer`, `store`, `hash`, `testkit` |
//! | `site` | `agent`, `api`, `transfer`, `store`, `library`, `scan`, `hash` |
//! | `agent` | `transfer`, `store`, `library`, `hash` |
//! | `transfer`, `store`, `library` | `hash` |
//! | `scan` | `hash` |
//! | `api`, `hash`, `testkit` | none |
//! | `bench` (benchmarks) | any but `dpsync` |
//!
//! (the table of ARCHITECTURE.md, crate names without their `dpsync-` prefix).
//!
//! Besides: only `dpsync` and `dpsync-bench` may depend on `dpsync-testkit` outside their
//! tests; `dpsync-agent` never reaches `dpsync-site`, directly or through another crate,
//! not even in its tests; a test (dev-dependency) may use any other library crate that
//! does not depend back on the crate under test (`scan`'s tests use a `library`), never
//! the binary or the benchmarks. A new crate fails the test until it has a row.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// The table above: crate → the workspace crates it may depend on (`*`: any but those
/// listed after it, written `!name`).
const RULES: &[(&str, &[&str])] = &[
    (
        "dpsync",
        &[
            "dpsync-site",
            "dpsync-agent",
            "dpsync-api",
            "dpsync-transfer",
            "dpsync-store",
            "dpsync-hash",
            "dpsync-testkit",
        ],
    ),
    (
        "dpsync-site",
        &[
            "dpsync-agent",
            "dpsync-api",
            "dpsync-transfer",
            "dpsync-store",
            "dpsync-library",
            "dpsync-scan",
            "dpsync-hash",
        ],
    ),
    ("dpsync-agent", &["dpsync-transfer", "dpsync-store", "dpsync-library", "dpsync-hash"]),
    ("dpsync-transfer", &["dpsync-hash"]),
    ("dpsync-store", &["dpsync-hash"]),
    ("dpsync-library", &["dpsync-hash"]),
    ("dpsync-scan", &["dpsync-hash"]),
    ("dpsync-api", &[]),
    ("dpsync-hash", &[]),
    ("dpsync-testkit", &[]),
    ("dpsync-bench", &["*", "!dpsync"]),
];

/// Crates that may depend on the testkit outside their tests.
const TESTKIT_USERS: &[&str] = &["dpsync", "dpsync-bench"];
const TESTKIT: &str = "dpsync-testkit";

/// (from, to) pairs that must not exist even through other crates, nor in tests.
const NEVER_TRANSITIVELY: &[(&str, &str)] = &[("dpsync-agent", "dpsync-site")];

#[derive(Debug)]
struct Edge {
    from: String,
    to: String,
    /// `normal`, `build` or `dev`.
    kind: String,
}

/// Every dependency of a workspace crate on another workspace crate.
fn workspace_edges() -> (BTreeSet<String>, Vec<Edge>) {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cannot run cargo metadata");
    assert!(out.status.success(), "cargo metadata failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata printed JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> =
        packages.iter().map(|p| p["name"].as_str().expect("package name").to_owned()).collect();
    let mut edges = Vec::new();
    for p in packages {
        let from = p["name"].as_str().expect("package name");
        for d in p["dependencies"].as_array().expect("dependencies") {
            let to = d["name"].as_str().expect("dependency name");
            if names.contains(to) {
                let kind = d["kind"].as_str().unwrap_or("normal").to_owned();
                edges.push(Edge { from: from.to_owned(), to: to.to_owned(), kind });
            }
        }
    }
    (names, edges)
}

fn rule(name: &str) -> Option<&'static [&'static str]> {
    RULES.iter().find(|(n, _)| *n == name).map(|(_, allowed)| *allowed)
}

/// Whether the table lets `from` depend on `to` (normal and build dependencies).
fn allowed(from: &str, to: &str) -> bool {
    let Some(allowed) = rule(from) else { return false };
    if from == to || (to == TESTKIT && !TESTKIT_USERS.contains(&from)) {
        return false;
    }
    if allowed.contains(&"*") { !allowed.contains(&format!("!{to}").as_str()) } else { allowed.contains(&to) }
}

/// Whether a test of `from` may use `to`: what the table allows, or any library crate
/// that does not itself reach `from` (no cycle), except what must never be reached.
fn dev_allowed(from: &str, to: &str, edges: &[Edge]) -> bool {
    let never = NEVER_TRANSITIVELY.iter().any(|(f, t)| *f == from && *t == to);
    let not_a_library = to == "dpsync" || to == "dpsync-bench";
    allowed(from, to) || (!never && !not_a_library && from != to && !reachable(to, edges).contains_key(from))
}

fn describe_dev_rule(from: &str) -> String {
    format!(
        "a test of {from} may use any library crate that does not depend back on it, never the binary, the benches{}",
        NEVER_TRANSITIVELY.iter().filter(|(f, _)| *f == from).map(|(_, t)| format!(" or {t}")).collect::<String>()
    )
}

fn describe_rule(from: &str) -> String {
    let allowed = rule(from).unwrap_or(&[]);
    let list = if allowed.is_empty() { "nothing of dpsync".to_owned() } else { allowed.join(", ") };
    let testkit = if TESTKIT_USERS.contains(&from) || from == TESTKIT { "" } else { "; dpsync-testkit only in tests" };
    format!("{from} may depend on: {list}{testkit}")
}

/// Crates `from` reaches through normal and build dependencies, with the path to each.
fn reachable(from: &str, edges: &[Edge]) -> BTreeMap<String, Vec<String>> {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut stack = vec![(from.to_owned(), vec![from.to_owned()])];
    while let Some((at, path)) = stack.pop() {
        for e in edges.iter().filter(|e| e.from == at && e.kind != "dev") {
            if !seen.contains_key(&e.to) {
                let mut p = path.clone();
                p.push(e.to.clone());
                seen.insert(e.to.clone(), p.clone());
                stack.push((e.to.clone(), p));
            }
        }
    }
    seen
}

#[test]
fn every_workspace_crate_has_a_rule() {
    let (names, _) = workspace_edges();
    let missing: Vec<&String> = names.iter().filter(|n| rule(n).is_none()).collect();
    assert!(missing.is_empty(), "no dependency rule for {missing:?}: add a row to RULES in {}", file!());
    let stale: Vec<&str> = RULES.iter().map(|(n, _)| *n).filter(|n| !names.contains(*n)).collect();
    assert!(stale.is_empty(), "RULES names crates that are not in the workspace: {stale:?}");
}

#[test]
fn dependencies_point_one_way() {
    let (_, edges) = workspace_edges();
    let mut broken = Vec::new();
    for e in &edges {
        let ok = match e.kind.as_str() {
            "dev" => dev_allowed(&e.from, &e.to, &edges),
            _ => allowed(&e.from, &e.to),
        };
        if !ok {
            let rule = if e.kind == "dev" { describe_dev_rule(&e.from) } else { describe_rule(&e.from) };
            broken.push(format!("{} → {} ({} dependency) breaks the rule \"{rule}\"", e.from, e.to, e.kind));
        }
    }
    assert!(broken.is_empty(), "dependency directions broken:\n  {}", broken.join("\n  "));
}

#[test]
fn forbidden_paths_do_not_exist_even_indirectly() {
    let (_, edges) = workspace_edges();
    for (from, to) in NEVER_TRANSITIVELY {
        if let Some(path) = reachable(from, &edges).get(*to) {
            panic!("{from} reaches {to} through {}: the rule is \"{from} never depends on {to}\"", path.join(" → "));
        }
    }
}

#[test]
fn the_rules_catch_what_they_should() {
    // The checker itself, on edges that must fail.
    assert!(!allowed("dpsync-agent", "dpsync-site"));
    assert!(!allowed("dpsync-hash", "dpsync-scan"));
    assert!(!allowed("dpsync-api", "dpsync-hash"));
    assert!(!allowed("dpsync-site", TESTKIT), "the testkit only in the site's tests");
    assert!(!allowed("dpsync", "dpsync-bench"));
    assert!(!allowed("dpsync-agent", "dpsync-scan"), "not in the table");
    assert!(!allowed("dpsync-testkit", "dpsync-hash"));
    assert!(allowed("dpsync", TESTKIT));
    assert!(allowed("dpsync-site", "dpsync-agent"));
    let edges = vec![
        Edge { from: "dpsync-agent".into(), to: "dpsync-store".into(), kind: "normal".into() },
        Edge { from: "dpsync-store".into(), to: "dpsync-site".into(), kind: "normal".into() },
    ];
    let path = &reachable("dpsync-agent", &edges)["dpsync-site"];
    assert_eq!(path, &["dpsync-agent", "dpsync-store", "dpsync-site"]);
    // Tests: a peer is fine, a cycle, the binary and the site from the agent are not.
    let edges = vec![Edge { from: "dpsync-library".into(), to: "dpsync-hash".into(), kind: "normal".into() }];
    assert!(dev_allowed("dpsync-scan", "dpsync-library", &edges));
    assert!(dev_allowed("dpsync-site", TESTKIT, &edges));
    assert!(!dev_allowed("dpsync-hash", "dpsync-library", &edges), "library depends on hash");
    assert!(!dev_allowed("dpsync-agent", "dpsync-site", &[]));
    assert!(!dev_allowed("dpsync-store", "dpsync", &[]));
}
