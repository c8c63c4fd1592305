//! Store conformance suite.
//!
//! Every test is written once as `async fn(&Db)` (a [`Store`] plus the URL it was opened
//! with) and run twice by the `conformance!` macro: `sqlite::<name>` against a fresh file in
//! a temp dir, and `postgres::<name>` against a fresh schema on the server named by
//! `DPSYNC_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`), dropped
//! afterwards. Without a reachable server the PostgreSQL tests print why and pass, unless
//! `DPSYNC_REQUIRE_POSTGRES=1`, in which case they fail.
//!
//! The agent database (SQLite only) has its own section at the end.

use std::collections::HashSet;
use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dpsync_hash::{ChunkId, ContentRoot, FileHash};
use dpsync_store::agent::{AgentDb, ChunkLocation, PackRows, PackedChunk, Staged, StagedChunk};
use dpsync_store::{
    Action, Backend, ClusterKey, DistState, Lease, NewTarget, NewVersion, Outcome, PackageUpdate, PackageVersion,
    Priority, StateCount, Store, StoreError, TargetHealth, TargetKind, TargetUpdate, VersionStats,
};
use sqlx::Connection;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A store under test and the URL it was opened with (to open it again).
#[derive(Debug, Clone)]
struct Db {
    store: Store,
    url: String,
}

impl Deref for Db {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

async fn with_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sub").join("store.db");
    let url = format!("sqlite://{}", path.display());
    let store = Store::connect(&url).await.expect("connect sqlite");
    assert_eq!(store.backend(), Backend::Sqlite);
    assert!(path.exists(), "the SQLite file is created");
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
    assert_eq!(mode, "wal");
    conn.close().await.unwrap();
    test(Db { store: store.clone(), url }).await;
    store.close().await;
}

fn pg_admin_url() -> String {
    std::env::var("DPSYNC_TEST_POSTGRES_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

async fn pg_admin(url: &str) -> Result<sqlx::PgConnection, String> {
    match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(url)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connection timed out after 5 s".to_string()),
    }
}

async fn with_postgres<F, Fut>(test: F)
where
    F: FnOnce(Db) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url = pg_admin_url();
    let mut admin = match pg_admin(&admin_url).await {
        Ok(c) => c,
        Err(e) => {
            if std::env::var("DPSYNC_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!("PostgreSQL required (DPSYNC_REQUIRE_POSTGRES=1) but no server at {admin_url} ({e})");
            }
            // Written straight to stderr (not eprintln!, which the test harness captures)
            // and once per run, so the skip is visible without --nocapture.
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "skipping PostgreSQL conformance: no server at {admin_url} ({e}); \
                     set DPSYNC_TEST_POSTGRES_URL"
                );
            });
            return;
        }
    };
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let schema = format!("dpsync_test_{}_{}_{}", std::process::id(), nanos, N.fetch_add(1, Ordering::Relaxed));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut admin)
        .await
        .expect("create test schema");
    let sep = if admin_url.contains('?') { '&' } else { '?' };
    let url = format!("{admin_url}{sep}options=-c%20search_path%3D{schema}");

    let store = Store::connect(&url).await.expect("connect postgres");
    assert_eq!(store.backend(), Backend::Postgres);
    let db = Db { store: store.clone(), url };
    // Run the body as a task so a failed assertion still lets us drop the schema.
    let result = tokio::spawn(test(db)).await;
    store.close().await;
    let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&mut admin).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
    dropped.expect("drop test schema");
}

/// Generates `sqlite::<test>` and `postgres::<test>` for each listed test.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::with_sqlite(|db| async move { super::$name(&db).await }).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::with_postgres(|db| async move { super::$name(&db).await }).await;
                }
            )*
        }
    };
}

conformance!(
    id_allocation_format_and_sequence,
    package_name_conflict,
    foreign_packages,
    commit_numbers_versions_1_2_3,
    explicit_version_must_be_newer,
    concurrent_commits_never_duplicate_a_version,
    commit_resets_distributions_to_pending,
    assign_claim_finish_flow,
    retry_and_failure_flow,
    remove_flow,
    job_superseded_while_in_progress_is_requeued,
    concurrent_claimers_never_share_a_row,
    reset_in_progress_requeues_claimed_rows,
    leases_are_renewed_reclaimed_and_checked,
    nodes_heartbeat_and_identity_values,
    record_progress_accumulates_bytes,
    prune_versions_keeps_current_and_wanted,
    version_with_root_finds_the_newest,
    manifests_are_stored_once_per_content_root,
    inline_manifests_become_shared_rows,
    migrations_are_idempotent,
    newer_schema_is_refused,
    meta_get_set,
    targets_and_debug_redacts_token,
    update_and_delete_targets,
    retry_now_by_target,
    group_assignments,
    garbled_content_root_is_an_error_naming_the_table,
    aggregate_counts_for_metrics,
    waiting_for_a_send_window,
    package_settings_and_schedules,
    higher_priority_jobs_are_claimed_first,
    deleting_a_package_waits_for_every_target,
    validation_schedules,
    target_series_for_metrics,
    failing_targets_are_claimed_last_and_apart,
    assign_many_assigns_in_bulk,
);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Far enough ahead that everything due "now" is due.
fn soon() -> i64 {
    now() + 1_000
}

/// A content root made of `tag`'s bytes (at most 32), zero-padded.
fn root(tag: &str) -> ContentRoot {
    let hex: String = tag.bytes().map(|b| format!("{b:02x}")).collect();
    ContentRoot::from_hex(&format!("{hex:0>64}")).unwrap()
}

fn new_version(tag: &str) -> NewVersion {
    NewVersion {
        version: None,
        content_root: root(tag),
        manifest: Some(format!("manifest {tag}").into_bytes()),
        scan_cache: Some(format!("scan cache {tag}").into_bytes()),
        signature: Some(format!("signature {tag}")),
        stats: VersionStats {
            files: 10,
            dirs: 2,
            symlinks: 1,
            total_bytes: 12_345,
            files_added: 3,
            files_changed: 4,
            files_removed: 1,
            files_unchanged: 3,
            bytes_hashed: 999,
        },
        origin: "local".to_string(),
    }
}

async fn target(db: &Db, name: &str) -> i64 {
    db.add_target(NewTarget {
        name: name.to_string(),
        kind: TargetKind::Dp,
        url: format!("https://{name}.example:8443"),
        token: Some(format!("token-of-{name}")),
        group: None,
        rate_limit: None,
        fingerprint: None,
        windows: None,
        pull_sources: None,
    })
    .await
    .expect("add target")
    .id
}

/// A package with one committed version.
async fn package_v1(db: &Db, name: &str) -> String {
    let p = db.create_package("PS1", name, &format!("/src/{name}")).await.unwrap();
    db.commit_version(&p.id, new_version("a")).await.unwrap();
    p.id
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

async fn id_allocation_format_and_sequence(db: &Db) {
    let a = db.create_package("PS1", "Office", "/src/office").await.unwrap();
    let b = db.create_package("ps1", "Chrome", "/src/chrome").await.unwrap();
    let c = db.create_package("PS1", "Zoom", "/src/zoom").await.unwrap();
    let other = db.create_package("CAS", "7zip", "/src/7zip").await.unwrap();
    assert_eq!(a.id, "PS100001");
    assert_eq!(b.id, "PS100002");
    assert_eq!(c.id, "PS100003");
    assert_eq!(other.id, "CAS00001", "each site code has its own sequence");
    assert_eq!(a.source_site, "PS1");
    assert_eq!(a.source_path.as_deref(), Some("/src/office"));
    assert_eq!(a.current_version, 0);
    assert!(a.created_at > 0);

    // Ids are 5 uppercase hex digits: the 10th package is …0000A.
    for i in 4..=10 {
        let p = db.create_package("PS1", &format!("pkg{i}"), "/src/x").await.unwrap();
        assert_eq!(p.id, format!("PS1{i:05X}"));
    }
    assert!(db.package("PS1").await.unwrap().is_none(), "no package named PS1");
    assert_eq!(db.package("pkg10").await.unwrap().unwrap().id, "PS10000A");

    // Lookup: id (case-insensitive) first, then name.
    assert_eq!(db.package("ps100002").await.unwrap().unwrap(), b);
    assert_eq!(db.package("Zoom").await.unwrap().unwrap(), c);
    assert!(db.package("zoom").await.unwrap().is_none(), "names are exact");
    assert!(db.package("PS1FFFFF").await.unwrap().is_none());

    let ids: Vec<String> = db.packages().await.unwrap().into_iter().map(|p| p.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "packages() is ordered by id");
    assert_eq!(ids.len(), 11);
    assert_eq!(ids[0], "CAS00001");

    db.set_source_path("ps100001", "/new/office").await.unwrap();
    assert_eq!(db.package("PS100001").await.unwrap().unwrap().source_path.as_deref(), Some("/new/office"));
    assert!(db.set_source_path("PS1FFFFF", "/x").await.unwrap_err().is_not_found());

    for bad in ["", "P1", "PS12", "P-1"] {
        assert!(
            matches!(db.create_package(bad, &format!("bad{bad}"), "/x").await, Err(StoreError::InvalidInput(_))),
            "site code {bad:?} must be refused"
        );
    }
}

async fn package_name_conflict(db: &Db) {
    let a = db.create_package("PS1", "Office", "/src/a").await.unwrap();
    let err = db.create_package("PS1", "Office", "/src/b").await.unwrap_err();
    match &err {
        StoreError::Conflict(msg) => {
            assert!(msg.contains("Office"), "{msg}");
            assert!(msg.contains(&a.id), "{msg}");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    // The failed create consumed no id and left one package.
    let b = db.create_package("PS1", "Other", "/src/b").await.unwrap();
    assert_eq!(b.id, "PS100002");
    assert_eq!(db.packages().await.unwrap().len(), 2);
    assert!(matches!(db.create_package("PS1", "  ", "/x").await, Err(StoreError::InvalidInput(_))));
}

async fn foreign_packages(db: &Db) {
    let p = db.insert_foreign_package("cen0001a", "Runtime", "CEN").await.unwrap();
    assert_eq!(p.id, "CEN0001A");
    assert_eq!(p.source_site, "CEN");
    assert_eq!(p.source_path, None);
    assert_eq!(p.current_version, 0);

    // Idempotent.
    let again = db.insert_foreign_package("CEN0001A", "Runtime", "CEN").await.unwrap();
    assert_eq!(again, p);
    assert_eq!(db.packages().await.unwrap().len(), 1);

    // A rename at the parent follows.
    let renamed = db.insert_foreign_package("CEN0001A", "Runtime 2", "CEN").await.unwrap();
    assert_eq!(renamed.name, "Runtime 2");
    assert_eq!(db.package("Runtime 2").await.unwrap().unwrap().id, "CEN0001A");

    // Same id from another source site, or a local package's id: conflict.
    assert!(db.insert_foreign_package("CEN0001A", "Runtime 2", "XYZ").await.unwrap_err().is_conflict());
    let local = db.create_package("PS1", "Local", "/src/l").await.unwrap();
    assert!(db.insert_foreign_package(&local.id, "Local", "PS1").await.unwrap_err().is_conflict());
    // Name taken by another package.
    let err = db.insert_foreign_package("CEN00002", "Local", "CEN").await.unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    assert!(err.to_string().contains("CEN00002"), "{err}");
    assert!(matches!(db.insert_foreign_package("not-an-id", "X", "CEN").await, Err(StoreError::InvalidInput(_))));

    // Foreign packages take explicit versions from the parent.
    let v = db
        .commit_version("CEN0001A", NewVersion { version: Some(7), origin: "CEN".into(), ..new_version("f") })
        .await
        .unwrap();
    assert_eq!(v.version, 7);
    assert_eq!(db.package("CEN0001A").await.unwrap().unwrap().current_version, 7);
}

async fn commit_numbers_versions_1_2_3(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    assert!(db.latest_version(&p.id).await.unwrap().is_none());
    let mut got = Vec::new();
    for tag in ["a", "b", "c"] {
        let v = db.commit_version(&p.id, new_version(tag)).await.unwrap();
        assert_eq!(
            db.version_manifest(&p.id, v.version).await.unwrap().unwrap(),
            format!("manifest {tag}").into_bytes()
        );
        got.push(v.version);
    }
    assert_eq!(got, vec![1, 2, 3]);
    assert_eq!(db.package(&p.id).await.unwrap().unwrap().current_version, 3);

    let list = db.versions(&p.id).await.unwrap();
    assert_eq!(list.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(list[1].content_root, root("b"));
    assert_eq!(list[1].stats, new_version("b").stats);
    assert_eq!(list[1].origin, "local");

    let v2 = db.version(&p.id, 2).await.unwrap().unwrap();
    assert_eq!(v2.summary, list[1]);
    assert_eq!(v2.manifest, b"manifest b".to_vec());
    assert_eq!(v2.scan_cache, b"scan cache b".to_vec());
    assert!(db.version(&p.id, 4).await.unwrap().is_none());
    assert_eq!(db.version_summary(&p.id, 2).await.unwrap().unwrap(), list[1]);
    assert_eq!(db.version_manifest(&p.id, 2).await.unwrap().unwrap(), b"manifest b".to_vec());
    assert!(db.version_summary(&p.id, 4).await.unwrap().is_none());
    assert!(db.version_manifest(&p.id, 4).await.unwrap().is_none());

    let latest = db.latest_version(&p.id).await.unwrap().unwrap();
    assert_eq!(latest.summary.version, 3);
    assert_eq!(latest.manifest, b"manifest c".to_vec());

    // Lowercase id works too.
    assert_eq!(db.versions(&p.id.to_lowercase()).await.unwrap().len(), 3);

    let err = db.commit_version("PS1FFFFF", new_version("x")).await.unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains("PS1FFFFF"), "{err}");
}

async fn explicit_version_must_be_newer(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    let v = db.commit_version(&p.id, NewVersion { version: Some(5), ..new_version("a") }).await.unwrap();
    assert_eq!(v.version, 5);
    for offered in [5, 3, 0, -1] {
        let err =
            db.commit_version(&p.id, NewVersion { version: Some(offered), ..new_version("b") }).await.unwrap_err();
        match &err {
            StoreError::VersionNotNewer { package, current, offered: o } => {
                assert_eq!(package, &p.id);
                assert_eq!(*current, 5);
                assert_eq!(*o, offered);
            }
            other => panic!("expected VersionNotNewer, got {other:?}"),
        }
        assert!(err.to_string().contains(&p.id), "{err}");
    }
    // A failed commit leaves the current version and the version list untouched.
    assert_eq!(db.package(&p.id).await.unwrap().unwrap().current_version, 5);
    assert_eq!(db.versions(&p.id).await.unwrap().len(), 1);
    let next = db.commit_version(&p.id, new_version("c")).await.unwrap();
    assert_eq!(next.version, 6);
}

async fn concurrent_commits_never_duplicate_a_version(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = db.store.clone();
        let id = p.id.clone();
        tasks.push(tokio::spawn(async move {
            store.commit_version(&id, new_version(&format!("c{i}"))).await.map(|v| v.version)
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap().expect("concurrent commit"));
    }
    versions.sort();
    assert_eq!(versions, (1..=8).collect::<Vec<i64>>());
    assert_eq!(db.package(&p.id).await.unwrap().unwrap().current_version, 8);
    let stored: Vec<i64> = db.versions(&p.id).await.unwrap().into_iter().map(|v| v.version).collect();
    assert_eq!(stored, (1..=8).collect::<Vec<i64>>());
}

async fn commit_resets_distributions_to_pending(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t_ok = target(db, "dp-ok").await;
    let t_fail = target(db, "dp-fail").await;
    let t_gone = target(db, "dp-gone").await;
    for t in [t_ok, t_fail, t_gone] {
        assert_eq!(db.assign(&id, t).await.unwrap().desired_version, 1);
    }
    let claimed = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    db.finish(&id, t_ok, Outcome::Installed { version: 1 }).await.unwrap();
    db.finish(&id, t_fail, Outcome::Failed { error: "disk full".into(), next_attempt_at: now() + 3_600_000 })
        .await
        .unwrap();
    db.finish(&id, t_gone, Outcome::Installed { version: 1 }).await.unwrap();
    db.record_progress(&id, t_ok, 500).await.unwrap();
    db.request_action(&id, t_gone, Action::Remove, 0).await.unwrap();
    let c = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c.len(), 1);
    db.finish(&id, t_gone, Outcome::Removed).await.unwrap();

    let v2 = db.commit_version(&id, new_version("b")).await.unwrap();
    assert_eq!(v2.version, 2);
    for t in [t_ok, t_fail] {
        let d = db.distribution(&id, t).await.unwrap().unwrap();
        assert_eq!(d.state, DistState::Pending, "{d:?}");
        assert_eq!(d.action, Action::Install);
        assert_eq!(d.desired_version, 2);
        assert_eq!(d.attempts, 0);
        assert_eq!(d.last_error, None);
        assert_eq!(d.bytes_sent_last, 0);
        assert!(d.next_attempt_at <= now());
    }
    let ok = db.distribution(&id, t_ok).await.unwrap().unwrap();
    assert_eq!(ok.installed_version, Some(1), "installed version is kept");
    assert_eq!(ok.bytes_sent_total, 500, "total bytes are kept");
    let gone = db.distribution(&id, t_gone).await.unwrap().unwrap();
    assert_eq!(gone.state, DistState::Removed, "removed rows are left alone");
    assert_eq!(gone.desired_version, 0);

    // Another package's distributions are not touched.
    let other = package_v1(db, "Other").await;
    db.assign(&other, t_ok).await.unwrap();
    db.commit_version(&id, new_version("c")).await.unwrap();
    assert_eq!(db.distribution(&other, t_ok).await.unwrap().unwrap().desired_version, 1);
}

async fn assign_claim_finish_flow(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    let t1 = target(db, "dp1").await;
    let t2 = target(db, "dp2").await;

    // Before the first commit a row exists but is not claimable.
    let d = db.assign(&p.id, t1).await.unwrap();
    assert_eq!(d.state, DistState::Pending);
    assert_eq!(d.action, Action::Install);
    assert_eq!(d.desired_version, 0);
    assert_eq!(d.target_name, "dp1");
    assert_eq!(d.target_kind, TargetKind::Dp);
    assert_eq!(d.installed_version, None);
    assert!(db.claim_due(soon(), 10).await.unwrap().is_empty());
    assert_eq!(db.next_due_at().await.unwrap(), None);

    db.commit_version(&p.id, new_version("a")).await.unwrap();
    let d2 = db.assign(&p.id, t2).await.unwrap();
    assert_eq!(d2.desired_version, 1, "new rows want the current version");
    let due = db.next_due_at().await.unwrap().expect("something is due");
    assert!(due <= now());

    let dists = db.distributions(&p.id).await.unwrap();
    assert_eq!(dists.iter().map(|d| d.target_name.as_str()).collect::<Vec<_>>(), vec!["dp1", "dp2"]);

    // Nothing is due in the past.
    assert!(db.claim_due(due - 10_000, 10).await.unwrap().is_empty());
    assert!(db.claim_due(soon(), 0).await.unwrap().is_empty());

    let claimed = db.claim_due(soon(), 1).await.unwrap();
    assert_eq!(claimed.len(), 1, "limit is honoured");
    let c = &claimed[0];
    assert_eq!(c.state, DistState::InProgress);
    assert_eq!(c.attempts, 1);
    assert_eq!(c.action, Action::Install);
    assert_eq!(c.desired_version, 1);
    let rest = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_ne!(rest[0].target_id, c.target_id);
    assert!(db.claim_due(soon(), 10).await.unwrap().is_empty(), "all claimed");
    assert_eq!(db.next_due_at().await.unwrap(), None);

    let done = db.finish(&p.id, c.target_id, Outcome::Installed { version: 1 }).await.unwrap();
    assert_eq!(done.state, DistState::Installed);
    assert_eq!(done.installed_version, Some(1));
    assert_eq!(done.last_error, None);
    assert_eq!(done, db.distribution(&p.id, c.target_id).await.unwrap().unwrap());

    // Re-assigning an installed row changes nothing.
    let again = db.assign(&p.id, c.target_id).await.unwrap();
    assert_eq!(again.state, DistState::Installed);
    assert_eq!(again.attempts, 1);

    // Unknown package / target / pair.
    assert!(db.assign("PS1FFFFF", t1).await.unwrap_err().is_not_found());
    assert!(db.assign(&p.id, 999_999).await.unwrap_err().is_not_found());
    assert!(db.finish("PS1FFFFF", t1, Outcome::Removed).await.unwrap_err().is_not_found());
    assert!(db.distribution(&p.id, 999_999).await.unwrap().is_none());
}

async fn retry_and_failure_flow(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t = target(db, "dp1").await;
    db.assign(&id, t).await.unwrap();
    assert_eq!(db.claim_due(soon(), 10).await.unwrap().len(), 1);

    let later = now() + 60_000;
    let d = db
        .finish(&id, t, Outcome::Retry { error: "connection refused by dp1".into(), next_attempt_at: later })
        .await
        .unwrap();
    assert_eq!(d.state, DistState::Retrying);
    assert_eq!(d.next_attempt_at, later);
    assert_eq!(d.last_error.as_deref(), Some("connection refused by dp1"));
    assert_eq!(db.next_due_at().await.unwrap(), Some(later));
    assert!(db.claim_due(now(), 10).await.unwrap().is_empty(), "not due yet");

    let again = db.claim_due(later, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 2, "attempts count claims");
    assert_eq!(again[0].state, DistState::InProgress);

    let slow = later + 1_800_000;
    let failed = db.finish(&id, t, Outcome::Failed { error: "gave up".into(), next_attempt_at: slow }).await.unwrap();
    assert_eq!(failed.state, DistState::Failed);
    assert_eq!(failed.attempts, 2);
    assert_eq!(failed.last_error.as_deref(), Some("gave up"));
    assert!(failed.last_error_at.is_some_and(|at| at >= d.updated_at), "{failed:?}");
    assert_eq!(failed.next_attempt_at, slow);
    assert!(db.claim_due(later + 1, 10).await.unwrap().is_empty(), "failed rows wait for their slow retry");
    assert_eq!(db.next_due_at().await.unwrap(), Some(slow));

    // The slow retry: claimable when due, and failing again keeps it failed.
    let slow_try = db.claim_due(slow, 10).await.unwrap();
    assert_eq!(slow_try.len(), 1, "a failed row is claimed at its slow retry");
    assert_eq!(slow_try[0].attempts, 3);
    let failed =
        db.finish(&id, t, Outcome::Failed { error: "still down".into(), next_attempt_at: slow * 2 }).await.unwrap();
    assert_eq!((failed.state, failed.last_error.as_deref()), (DistState::Failed, Some("still down")));

    // `retry_now` makes it due at once, attempts 0, keeping the error until the next outcome.
    let revived = db.retry_now(Some(&id), Some(t)).await.unwrap();
    assert_eq!(revived.len(), 1, "{revived:?}");
    assert_eq!((revived[0].state, revived[0].attempts), (DistState::Pending, 0));
    assert_eq!(revived[0].last_error.as_deref(), Some("still down"));
    assert!(db.retry_now(Some(&id), None).await.unwrap().is_empty(), "nothing is failing any more");
    let c = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c.len(), 1);
    db.finish(&id, t, Outcome::Failed { error: "gave up".into(), next_attempt_at: slow }).await.unwrap();
    // `assign` (distribute again) revives a failed row too.
    let again = db.assign(&id, t).await.unwrap();
    assert_eq!((again.state, again.attempts), (DistState::Pending, 0));
    let c = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c.len(), 1);
    let ok = db.finish(&id, t, Outcome::Installed { version: 1 }).await.unwrap();
    assert_eq!((ok.last_error, ok.last_error_at), (None, None));
    db.finish(&id, t, Outcome::Failed { error: "gave up".into(), next_attempt_at: slow }).await.unwrap();

    // An explicit request revives it.
    let req = db.request_action(&id, t, Action::Redistribute, 1).await.unwrap();
    assert_eq!(req.state, DistState::Pending);
    assert_eq!(req.action, Action::Redistribute);
    assert_eq!(req.attempts, 0);
    assert_eq!(req.last_error, None);
    let c = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].action, Action::Redistribute);
    db.finish(&id, t, Outcome::Installed { version: 1 }).await.unwrap();

    // Validation.
    db.request_action(&id, t, Action::Validate, 1).await.unwrap();
    let c = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c[0].action, Action::Validate);
    let v = db.finish(&id, t, Outcome::ValidationFailed { error: "2 files differ".into() }).await.unwrap();
    assert_eq!(v.state, DistState::ValidationFailed);
    assert_eq!(v.installed_version, Some(1));
    assert_eq!(v.last_error.as_deref(), Some("2 files differ"));

    // Requests for versions that do not exist, or for unassigned pairs, are refused.
    let err = db.request_action(&id, t, Action::Install, 9).await.unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains(&id), "{err}");
    let t2 = target(db, "dp2").await;
    assert!(db.request_action(&id, t2, Action::Install, 1).await.unwrap_err().is_not_found());
}

async fn waiting_for_a_send_window(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t = target(db, "dp1").await;
    db.set_target_windows(t, Some("mon-fri 22:00-06:00")).await.unwrap();
    assert_eq!(db.target_by_id(t).await.unwrap().unwrap().windows.as_deref(), Some("mon-fri 22:00-06:00"));
    assert!(db.set_target_windows(9999, None).await.unwrap_err().is_not_found());
    db.assign(&id, t).await.unwrap();
    db.claim_due(soon(), 10).await.unwrap();
    db.finish(&id, t, Outcome::Retry { error: "dp1 is unreachable".into(), next_attempt_at: now() }).await.unwrap();
    let c = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c[0].attempts, 2);

    // Waiting does not count as an attempt, keeps the last error, and shows as its own state.
    let opens = now() + 3_600_000;
    let d = db.finish(&id, t, Outcome::WaitWindow { next_window_at: opens }).await.unwrap();
    assert_eq!((d.state, d.attempts, d.next_attempt_at), (DistState::WaitingWindow, 1, opens));
    assert_eq!(d.last_error.as_deref(), Some("dp1 is unreachable"));
    assert_eq!(db.distribution(&id, t).await.unwrap().unwrap().state, DistState::WaitingWindow);
    let counts = db.distribution_state_counts().await.unwrap();
    assert!(counts.iter().any(|c| c.state == DistState::WaitingWindow && c.count == 1), "{counts:?}");
    assert!(db.claim_due(soon(), 10).await.unwrap().is_empty(), "not before the window opens");
    assert_eq!(db.next_due_at().await.unwrap(), Some(opens));

    // Claimed when it opens; any other outcome ends the wait.
    let c = db.claim_due(opens, 10).await.unwrap();
    assert_eq!((c.len(), c[0].state), (1, DistState::InProgress));
    let r = db.finish(&id, t, Outcome::Retry { error: "again".into(), next_attempt_at: opens }).await.unwrap();
    assert_eq!(r.state, DistState::Retrying);
}

async fn remove_flow(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t = target(db, "dp1").await;
    db.assign(&id, t).await.unwrap();
    db.claim_due(soon(), 10).await.unwrap();
    db.finish(&id, t, Outcome::Installed { version: 1 }).await.unwrap();

    let r = db.request_action(&id, t, Action::Remove, 0).await.unwrap();
    assert_eq!(r.state, DistState::Removing);
    assert_eq!(r.action, Action::Remove);
    assert!(db.next_due_at().await.unwrap().is_some(), "removals are due");
    let c = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].state, DistState::InProgress);
    assert_eq!(c[0].action, Action::Remove, "a claimed removal stays identifiable");

    // A commit while the removal runs does not turn it into an install.
    db.commit_version(&id, new_version("b")).await.unwrap();
    let mid = db.distribution(&id, t).await.unwrap().unwrap();
    assert_eq!(mid.action, Action::Remove);
    assert_eq!(mid.state, DistState::InProgress);

    let done = db.finish(&id, t, Outcome::Removed).await.unwrap();
    assert_eq!(done.state, DistState::Removed);
    assert_eq!(done.installed_version, None);
    assert!(db.claim_due(soon(), 10).await.unwrap().is_empty());

    // Assigning again brings it back as an install of the current version.
    let back = db.assign(&id, t).await.unwrap();
    assert_eq!(back.state, DistState::Pending);
    assert_eq!(back.action, Action::Install);
    assert_eq!(back.desired_version, 2);
    assert_eq!(back.attempts, 0);
}

async fn job_superseded_while_in_progress_is_requeued(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t = target(db, "dp1").await;
    db.assign(&id, t).await.unwrap();
    let c = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c[0].desired_version, 1);

    db.commit_version(&id, new_version("b")).await.unwrap();
    let mid = db.distribution(&id, t).await.unwrap().unwrap();
    assert_eq!(mid.state, DistState::InProgress, "never handed to a second worker");
    assert_eq!(mid.desired_version, 2);
    assert!(db.claim_due(soon(), 10).await.unwrap().is_empty());

    // The old job finishes: its result is recorded, and the row is queued for v2.
    let d = db.finish(&id, t, Outcome::Installed { version: 1 }).await.unwrap();
    assert_eq!(d.state, DistState::Pending);
    assert_eq!(d.installed_version, Some(1));
    assert_eq!(d.desired_version, 2);
    assert_eq!(d.attempts, 0);
    let c2 = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(c2.len(), 1);
    assert_eq!(c2[0].desired_version, 2);
    let d = db.finish(&id, t, Outcome::Installed { version: 2 }).await.unwrap();
    assert_eq!(d.state, DistState::Installed);

    // Same for a failure of a superseded job.
    db.commit_version(&id, new_version("c")).await.unwrap();
    db.claim_due(soon(), 10).await.unwrap();
    db.request_action(&id, t, Action::Redistribute, 3).await.unwrap();
    let d = db
        .finish(&id, t, Outcome::Retry { error: "timeout".into(), next_attempt_at: now() + 3_600_000 })
        .await
        .unwrap();
    assert_eq!(d.state, DistState::Pending);
    assert_eq!(d.action, Action::Redistribute);
    assert!(d.next_attempt_at <= now(), "the new request is due at once");
}

async fn concurrent_claimers_never_share_a_row(db: &Db) {
    let a = package_v1(db, "A").await;
    let b = package_v1(db, "B").await;
    let mut expected = HashSet::new();
    for i in 0..15 {
        let t = target(db, &format!("dp{i:02}")).await;
        for p in [&a, &b] {
            db.assign(p, t).await.unwrap();
            expected.insert((p.clone(), t));
        }
    }
    let at = soon();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store.claim_due(at, 3).await.expect("claim");
                if batch.is_empty() {
                    break;
                }
                assert!(batch.len() <= 3);
                for d in batch {
                    assert_eq!(d.state, DistState::InProgress);
                    assert_eq!(d.attempts, 1, "claimed once: {d:?}");
                    mine.push((d.package_id, d.target_id));
                }
                tokio::task::yield_now().await;
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(unique.len(), all.len(), "a row was claimed twice");
    assert_eq!(unique, expected, "every due row was claimed");
}

async fn reset_in_progress_requeues_claimed_rows(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t1 = target(db, "dp1").await;
    let t2 = target(db, "dp2").await;
    let t3 = target(db, "dp3").await;
    for t in [t1, t2, t3] {
        db.assign(&id, t).await.unwrap();
    }
    db.claim_due(soon(), 10).await.unwrap();
    db.finish(&id, t3, Outcome::Installed { version: 1 }).await.unwrap();
    db.request_action(&id, t3, Action::Remove, 0).await.unwrap();
    assert_eq!(db.claim_due(soon(), 10).await.unwrap().len(), 1);
    // Now: t1, t2 installing in progress; t3 removing in progress.

    assert_eq!(db.reset_in_progress().await.unwrap(), 3);
    assert_eq!(db.reset_in_progress().await.unwrap(), 0, "nothing left in progress");
    for t in [t1, t2] {
        let d = db.distribution(&id, t).await.unwrap().unwrap();
        assert_eq!(d.state, DistState::Pending);
        assert_eq!(d.attempts, 1, "attempts are kept");
    }
    let r = db.distribution(&id, t3).await.unwrap().unwrap();
    assert_eq!(r.state, DistState::Removing, "an interrupted removal stays a removal");
    assert_eq!(r.action, Action::Remove);

    let again = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(again.len(), 3);
    assert!(again.iter().filter(|d| d.target_id != t3).all(|d| d.attempts == 2));
}

async fn leases_are_renewed_reclaimed_and_checked(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t1 = target(db, "dp1").await;
    let t2 = target(db, "dp2").await;
    for t in [t1, t2] {
        db.assign(&id, t).await.unwrap();
    }
    let a = Lease { node: "a".into(), ms: 60_000 };
    let b = Lease { node: "b".into(), ms: 60_000 };
    db.register_node("a", "ia").await.unwrap();
    db.register_node("b", "ib").await.unwrap();
    let by_a = db.claim_leased(soon(), 1, None, &a).await.unwrap();
    assert_eq!(by_a.len(), 1);
    let job = by_a[0].clone();
    assert_eq!(job.claimed_by.as_deref(), Some("a"));
    let token = job.claim_token.expect("a claim token");
    assert!(job.lease_until.unwrap() >= now() + 59_000, "leased for a minute: {:?}", job.lease_until);
    assert!(db.holds_claim(&id, job.target_id, token).await.unwrap());
    assert_eq!(db.jobs_by_node().await.unwrap(), vec![("a".to_owned(), 1)]);

    // Not expired: nothing to reclaim, and b's start leaves a's claim alone.
    assert_eq!(db.reclaim_expired(now()).await.unwrap(), 0);
    assert_eq!(db.reset_node("b").await.unwrap(), 0, "another node's live claim is not reset");
    // A heartbeat renews a's lease; with another instance it renews nothing.
    assert!(db.heartbeat(&a, "ia").await.unwrap());
    assert!(!db.heartbeat(&a, "someone else").await.unwrap());

    // a stops renewing: past its lease the row is claimable by b.
    let renewed = db.distribution(&id, job.target_id).await.unwrap().unwrap().lease_until.unwrap();
    assert!(renewed >= job.lease_until.unwrap(), "renewed");
    assert_eq!(db.reclaim_expired(renewed - 1).await.unwrap(), 0, "not before the renewed lease ends");
    let past = renewed + 1;
    assert_eq!(db.reclaim_expired(past).await.unwrap(), 1);
    assert!(!db.holds_claim(&id, job.target_id, token).await.unwrap(), "a's claim is gone");
    let by_b = db.claim_leased(past, 10, None, &b).await.unwrap();
    let again = by_b.iter().find(|d| d.target_id == job.target_id).expect("b claims a's job");
    assert_eq!(again.claimed_by.as_deref(), Some("b"));
    assert_eq!(again.attempts, 2, "attempts are kept across nodes");

    // a's late outcome is not recorded; b's is.
    let late = db.finish_leased(&id, job.target_id, token, Outcome::Installed { version: 1 }).await.unwrap();
    assert!(late.is_none(), "a lost its lease: {late:?}");
    let d = db.distribution(&id, job.target_id).await.unwrap().unwrap();
    assert_eq!((d.state, d.claimed_by.as_deref()), (DistState::InProgress, Some("b")));
    let done = db
        .finish_leased(&id, job.target_id, again.claim_token.unwrap(), Outcome::Installed { version: 1 })
        .await
        .unwrap()
        .expect("b holds the claim");
    assert_eq!(done.state, DistState::Installed);
    assert_eq!((done.claimed_by, done.lease_until, done.claim_token), (None, None, None));

    // b restarts: its own claims go back to the queue.
    assert_eq!(db.reset_node("b").await.unwrap(), 1);
    let other = if job.target_id == t1 { t2 } else { t1 };
    let d = db.distribution(&id, other).await.unwrap().unwrap();
    assert_eq!(d.state, DistState::Pending);

    // A claim without expiry (a single server): it names its node and is never reclaimed.
    let single = Lease { node: "solo".into(), ms: 0 };
    let c = db.claim_leased(soon(), 10, None, &single).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].claimed_by.as_deref(), c[0].lease_until), (Some("solo"), None));
    assert_eq!(db.reclaim_expired(now() + 86_400_000).await.unwrap(), 0);
    assert!(db.holds_claim(&id, other, c[0].claim_token.unwrap()).await.unwrap());
}

async fn nodes_heartbeat_and_identity_values(db: &Db) {
    assert_eq!(db.meta_set_once("site_key", "k1").await.unwrap(), "k1");
    assert_eq!(db.meta_set_once("site_key", "k2").await.unwrap(), "k1", "the first value stays");
    db.register_node("n2", "i1").await.unwrap();
    db.register_node("n1", "i1").await.unwrap();
    let before = db.node("n1").await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(db.heartbeat(&Lease { node: "n1".into(), ms: 1000 }, "i1").await.unwrap());
    let after = db.node("n1").await.unwrap().unwrap();
    assert!(after.heartbeat_at > before.heartbeat_at);
    let names: Vec<String> = db.nodes().await.unwrap().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["n1", "n2"]);
    assert_eq!(after.stopped_at, None);
    db.node_stopped("n1", "i1").await.unwrap();
    assert!(db.node("n1").await.unwrap().unwrap().stopped_at.is_some(), "a clean stop is recorded");
    db.register_node("n1", "i2").await.unwrap();
    assert_eq!(db.node("n1").await.unwrap().unwrap().stopped_at, None, "a start clears it");
    let _lock =
        db.cluster_lock(&[(ClusterKey::Library, true), (ClusterKey::Refresh("PS100001"), false)]).await.unwrap();
    // Another holder of a package's refresh lock: on PostgreSQL a try fails until it is
    // released; SQLite (one server) has nothing to hold.
    let held = db.cluster_lock(&[(ClusterKey::Refresh("PS100002"), false)]).await.unwrap();
    let tried = db.try_cluster_lock(ClusterKey::Refresh("PS100002")).await.unwrap();
    assert_eq!(tried.is_some(), db.backend() == Backend::Sqlite);
    drop(tried);
    drop(held);
    assert!(db.try_cluster_lock(ClusterKey::Refresh("PS100002")).await.unwrap().is_some(), "released");
}

async fn record_progress_accumulates_bytes(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t = target(db, "dp1").await;
    db.assign(&id, t).await.unwrap();
    db.claim_due(soon(), 10).await.unwrap();
    db.record_progress(&id, t, 100).await.unwrap();
    db.record_progress(&id, t, 250).await.unwrap();
    let d = db.distribution(&id, t).await.unwrap().unwrap();
    assert_eq!((d.bytes_sent_last, d.bytes_sent_total), (350, 350));
    db.finish(&id, t, Outcome::Installed { version: 1 }).await.unwrap();

    // A new version starts a new job: last resets, total keeps growing.
    db.commit_version(&id, new_version("b")).await.unwrap();
    let d = db.distribution(&id, t).await.unwrap().unwrap();
    assert_eq!((d.bytes_sent_last, d.bytes_sent_total), (0, 350));
    db.claim_due(soon(), 10).await.unwrap();
    db.record_progress(&id, t, 50).await.unwrap();
    let d = db.distribution(&id, t).await.unwrap().unwrap();
    assert_eq!((d.bytes_sent_last, d.bytes_sent_total), (50, 400));

    let t2 = target(db, "dp2").await;
    let err = db.record_progress(&id, t2, 1).await.unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains(&id), "{err}");
}

async fn prune_versions_keeps_current_and_wanted(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    for i in 1..=5 {
        db.commit_version(&p.id, new_version(&format!("v{i}"))).await.unwrap();
    }
    let other = package_v1(db, "Other").await;

    assert_eq!(db.prune_versions(&p.id, 2).await.unwrap(), 3);
    let left: Vec<i64> = db.versions(&p.id).await.unwrap().iter().map(|v| v.version).collect();
    assert_eq!(left, vec![4, 5]);
    assert_eq!(db.prune_versions(&p.id, 2).await.unwrap(), 0, "idempotent");

    // A version a distribution still wants is kept.
    let t = target(db, "dp1").await;
    db.assign(&p.id, t).await.unwrap();
    db.request_action(&p.id, t, Action::Install, 4).await.unwrap();
    assert_eq!(db.prune_versions(&p.id, 1).await.unwrap(), 0);
    // A removal (queued for a DP that is down) sends no content: it pins no version.
    db.request_action(&p.id, t, Action::Remove, 4).await.unwrap();
    assert_eq!(db.prune_versions(&p.id, 1).await.unwrap(), 1, "a queued removal does not keep version 4");
    db.commit_version(&p.id, new_version("v5 again")).await.unwrap();
    db.assign(&p.id, t).await.unwrap();
    db.request_action(&p.id, t, Action::Install, 6).await.unwrap();

    // keep_last 0 never deletes the current version.
    assert_eq!(db.prune_versions(&p.id, 0).await.unwrap(), 1);
    let left: Vec<i64> = db.versions(&p.id).await.unwrap().iter().map(|v| v.version).collect();
    assert_eq!(left, vec![6]);
    assert!(db.version(&p.id, 5).await.unwrap().is_none());

    // Pruning never makes numbers repeat.
    let v = db.commit_version(&p.id, new_version("v7")).await.unwrap();
    assert_eq!(v.version, 7);

    let mut live = db.live_file_hashes().await.unwrap();
    live.sort();
    let mut want = vec![b"manifest v5 again".to_vec(), b"manifest v7".to_vec(), b"manifest a".to_vec()];
    want.sort();
    assert_eq!(live, want);
    assert_eq!(db.versions(&other).await.unwrap().len(), 1, "other packages untouched");
    assert!(db.prune_versions("PS1FFFFF", 1).await.unwrap_err().is_not_found());
}

async fn manifests_are_stored_once_per_content_root(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    let other = package_v1(db, "Other").await;
    let same = |tag: &str| NewVersion { manifest: None, scan_cache: None, ..new_version(tag) };
    db.commit_version(&p.id, new_version("a")).await.unwrap();
    assert_eq!(db.manifest_count(&p.id).await.unwrap(), 1);
    // An unchanged refresh: a version row, no manifest.
    let v2 = db.commit_version(&p.id, same("a")).await.unwrap();
    assert_eq!((v2.version, v2.content_root), (2, root("a")));
    assert_eq!(db.manifest_count(&p.id).await.unwrap(), 1, "no manifest written");
    assert_eq!(db.version(&p.id, 2).await.unwrap().unwrap().manifest, b"manifest a");
    assert_eq!(db.version_manifest(&p.id, 2).await.unwrap().unwrap(), b"manifest a");
    // The same content committed with its bytes (a child site, a refresh back to it) is
    // not stored twice; a scan cache given replaces the shared one.
    db.commit_version(&p.id, NewVersion { scan_cache: Some(b"newer".to_vec()), ..new_version("a") }).await.unwrap();
    assert_eq!(db.manifest_count(&p.id).await.unwrap(), 1);
    assert_eq!(db.version(&p.id, 1).await.unwrap().unwrap().scan_cache, b"newer", "shared by the versions");
    // ... and so does one given without the manifest.
    db.commit_version(&p.id, NewVersion { scan_cache: Some(b"newest".to_vec()), ..same("a") }).await.unwrap();
    assert_eq!(db.latest_version(&p.id).await.unwrap().unwrap().scan_cache, b"newest");
    assert!(db.set_scan_cache(&p.id, 2, b"set").await.unwrap());
    assert_eq!(db.version(&p.id, 4).await.unwrap().unwrap().scan_cache, b"set");
    // Content the package does not store must come with its manifest; nothing changes.
    let err = db.commit_version(&p.id, same("b")).await.unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains(&root("b").to_hex()), "{err}");
    let err = db.commit_version(&p.id, NewVersion { scan_cache: Some(vec![1]), ..same("b") }).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(db.package(&p.id).await.unwrap().unwrap().current_version, 4);
    // Another package's manifest of that content is not this one's.
    db.commit_version(&other, new_version("b")).await.unwrap();
    assert!(db.commit_version(&p.id, same("b")).await.unwrap_err().is_not_found());

    db.commit_version(&p.id, new_version("b")).await.unwrap(); // 5
    db.commit_version(&p.id, same("a")).await.unwrap(); // 6
    assert_eq!(db.manifest_count(&p.id).await.unwrap(), 2);
    // A manifest shared by versions survives the pruning of some of them...
    assert_eq!(db.prune_versions(&p.id, 2).await.unwrap(), 4);
    assert_eq!(db.manifest_count(&p.id).await.unwrap(), 2);
    assert_eq!(db.version(&p.id, 6).await.unwrap().unwrap().manifest, b"manifest a");
    assert_eq!(db.version(&p.id, 5).await.unwrap().unwrap().manifest, b"manifest b");
    // ... and goes with the last one.
    db.commit_version(&p.id, new_version("c")).await.unwrap(); // 7
    assert_eq!(db.prune_versions(&p.id, 1).await.unwrap(), 2);
    assert_eq!(db.manifest_count(&p.id).await.unwrap(), 1);
    assert_eq!(db.version_manifest(&p.id, 7).await.unwrap().unwrap(), b"manifest c");
    let mut live = db.live_file_hashes().await.unwrap();
    live.sort();
    let want: Vec<Vec<u8>> = ["manifest a", "manifest b", "manifest c"].map(|m| m.into()).to_vec();
    assert_eq!(live, want, "this package's c, the other's a and b");
    assert_eq!(db.manifest_count(&other).await.unwrap(), 2, "other packages untouched");

    // A version whose manifest row is missing is a corrupt row, not a missing version.
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    sqlx::query("DELETE FROM manifests WHERE package_id = $1").bind(p.id.clone()).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let key = format!("package {} content root {}", p.id, root("c").to_hex());
    expect_corrupt(db.version(&p.id, 7).await.unwrap_err(), "manifests", &key);
    expect_corrupt(db.version_manifest(&p.id, 7).await.unwrap_err(), "manifests", &key);
    expect_corrupt(db.latest_version(&p.id).await.unwrap_err(), "manifests", &key);
}

/// A database at schema 10 (manifests and scan caches inline in `versions`) is upgraded:
/// one manifest row per (package, content root), with the scan cache of its newest version.
async fn inline_manifests_become_shared_rows(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    let blob = match db.backend() {
        Backend::Postgres => "BYTEA NOT NULL DEFAULT '\\x'",
        Backend::Sqlite => "BLOB NOT NULL DEFAULT x''",
    };
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    for sql in [
        "DROP TABLE manifests".to_string(),
        format!("ALTER TABLE versions ADD COLUMN manifest {blob}"),
        format!("ALTER TABLE versions ADD COLUMN scan_cache {blob}"),
        "DELETE FROM schema_migrations WHERE version = 11".to_string(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.unwrap();
    }
    for (version, tag, cache) in [(1, "a", "cache 1"), (2, "a", "cache 2"), (3, "b", "cache 3")] {
        sqlx::query(
            "INSERT INTO versions (package_id, version, content_root, manifest, scan_cache, files, dirs, \
               symlinks, total_bytes, files_added, files_changed, files_removed, files_unchanged, \
               bytes_hashed, origin, created_at) \
             VALUES ($1, $2, $3, $4, $5, 1, 0, 0, 1, 1, 0, 0, 0, 1, 'refresh', 0)",
        )
        .bind(p.id.clone())
        .bind(version as i64)
        .bind(root(tag).to_hex())
        .bind(format!("manifest {tag}").into_bytes())
        .bind(cache.as_bytes().to_vec())
        .execute(&mut conn)
        .await
        .unwrap();
    }
    sqlx::query("UPDATE packages SET current_version = 3 WHERE id = $1")
        .bind(p.id.clone())
        .execute(&mut conn)
        .await
        .unwrap();

    let store = Store::connect(&db.url).await.unwrap();
    assert_eq!(store.manifest_count(&p.id).await.unwrap(), 2);
    let v1 = store.version(&p.id, 1).await.unwrap().unwrap();
    assert_eq!((v1.manifest, v1.scan_cache), (b"manifest a".to_vec(), b"cache 2".to_vec()));
    assert_eq!(store.version(&p.id, 2).await.unwrap().unwrap().manifest, b"manifest a");
    let v3 = store.latest_version(&p.id).await.unwrap().unwrap();
    assert_eq!((v3.summary.version, v3.manifest, v3.scan_cache), (3, b"manifest b".to_vec(), b"cache 3".to_vec()));
    assert!(sqlx::query("SELECT manifest FROM versions").fetch_all(&mut conn).await.is_err(), "column dropped");
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied, dpsync_store::schema_versions());
    // And it works as any other: an unchanged refresh adds no manifest.
    store.commit_version(&p.id, NewVersion { manifest: None, scan_cache: None, ..new_version("b") }).await.unwrap();
    assert_eq!(store.manifest_count(&p.id).await.unwrap(), 2);
    conn.close().await.unwrap();
    store.close().await;
}

async fn version_with_root_finds_the_newest(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    for tag in ["a", "b", "a", "c"] {
        db.commit_version(&p.id, new_version(tag)).await.unwrap();
    }
    let other = db.create_package("PS1", "Other", "/src2").await.unwrap();
    db.commit_version(&other.id, new_version("d")).await.unwrap();
    assert_eq!(db.version_with_root(&p.id, &root("a")).await.unwrap(), Some(3));
    assert_eq!(db.version_with_root(&p.id, &root("b")).await.unwrap(), Some(2));
    assert_eq!(db.version_with_root(&p.id.to_lowercase(), &root("c")).await.unwrap(), Some(4));
    assert_eq!(db.version_with_root(&p.id, &root("d")).await.unwrap(), None, "another package's root");
    assert_eq!(db.version_with_root(&p.id, &root("e")).await.unwrap(), None);
    assert_eq!(db.version_with_root("PS1FFFFF", &root("a")).await.unwrap(), None);
    // Pruned versions are no longer a base.
    db.prune_versions(&p.id, 1).await.unwrap();
    assert_eq!(db.version_with_root(&p.id, &root("a")).await.unwrap(), None);
    assert_eq!(db.version_with_root(&p.id, &root("c")).await.unwrap(), Some(4));
}

async fn migrations_are_idempotent(db: &Db) {
    db.meta_set("site_code", "PS1").await.unwrap();
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    for _ in 0..2 {
        let second = Store::connect(&db.url).await.expect("reconnect");
        assert_eq!(second.meta_get("site_code").await.unwrap().as_deref(), Some("PS1"));
        assert_eq!(second.package(&p.id).await.unwrap().unwrap(), p);
        second.close().await;
    }
    // Concurrent connects apply each migration once.
    let (a, b) = tokio::join!(Store::connect(&db.url), Store::connect(&db.url));
    a.unwrap().close().await;
    b.unwrap().close().await;
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    let rows: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, dpsync_store::schema_versions());
    conn.close().await.unwrap();
}

async fn newer_schema_is_refused(db: &Db) {
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
        .bind(dpsync_store::SCHEMA_VERSION + 1)
        .bind(now())
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    match Store::connect(&db.url).await {
        Err(StoreError::Migration(msg)) => {
            assert!(msg.contains("newer"), "{msg}");
        }
        other => panic!("expected a Migration error, got {other:?}"),
    }
}

async fn meta_get_set(db: &Db) {
    assert_eq!(db.meta_get("site_code").await.unwrap(), None);
    db.meta_set("site_code", "PS1").await.unwrap();
    db.meta_set("site_name", "Primary").await.unwrap();
    assert_eq!(db.meta_get("site_code").await.unwrap().as_deref(), Some("PS1"));
    db.meta_set("site_code", "PS2").await.unwrap();
    assert_eq!(db.meta_get("site_code").await.unwrap().as_deref(), Some("PS2"));
    assert_eq!(db.meta_get("site_name").await.unwrap().as_deref(), Some("Primary"));
}

async fn targets_and_debug_redacts_token(db: &Db) {
    let new = NewTarget {
        name: "dp-zeta".into(),
        kind: TargetKind::Site,
        url: "https://zeta:8443".into(),
        token: Some("s3cr3t-t0ken".into()),
        group: Some("emea".into()),
        rate_limit: Some(1_000_000),
        fingerprint: None,
        windows: None,
        pull_sources: None,
    };
    assert!(!format!("{new:?}").contains("s3cr3t"));
    let t = db.add_target(new.clone()).await.unwrap();
    assert!(t.id > 0);
    assert_eq!(t.token.as_deref(), Some("s3cr3t-t0ken"));
    let dbg = format!("{t:?}");
    assert!(!dbg.contains("s3cr3t"), "token leaked: {dbg}");
    assert!(dbg.contains("<redacted>") && dbg.contains("dp-zeta"), "{dbg}");
    assert!(!format!("{:#?}", db.targets().await.unwrap()).contains("s3cr3t"));

    let err = db.add_target(new).await.unwrap_err();
    assert!(err.is_conflict() && err.to_string().contains("dp-zeta"), "{err}");

    let a = db
        .add_target(NewTarget {
            name: "dp-alpha".into(),
            kind: TargetKind::Dp,
            url: "https://alpha:8443".into(),
            token: None,
            group: Some("emea".into()),
            rate_limit: None,
            fingerprint: None,
            windows: None,
            pull_sources: None,
        })
        .await
        .unwrap();
    target(db, "dp-mid").await;
    assert_ne!(a.id, t.id);
    let names: Vec<String> = db.targets().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["dp-alpha", "dp-mid", "dp-zeta"]);
    assert_eq!(db.target("dp-zeta").await.unwrap().unwrap(), t);
    assert_eq!(db.target_by_id(a.id).await.unwrap().unwrap(), a);
    assert!(db.target("nope").await.unwrap().is_none());
    let emea: Vec<String> = db.targets_in_group("emea").await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(emea, vec!["dp-alpha", "dp-zeta"]);
    assert!(db.targets_in_group("apac").await.unwrap().is_empty());
}

async fn update_and_delete_targets(db: &Db) {
    let id = package_v1(db, "Office").await;
    let t = target(db, "dp1").await;
    db.assign(&id, t).await.unwrap();
    let update = TargetUpdate {
        url: Some("https://dp1.new:8443".into()),
        token: Some(None),
        group: Some(Some("east".into())),
        rate_limit: Some(Some(2048)),
        ..TargetUpdate::default()
    };
    let (before, after) = db.update_target("dp1", &update).await.unwrap();
    assert!(update.changes_connection(&before));
    assert_eq!(before.token.as_deref(), Some("token-of-dp1"));
    assert_eq!(
        (after.url.as_str(), after.token.as_deref(), after.group.as_deref(), after.rate_limit),
        ("https://dp1.new:8443", None, Some("east"), Some(2048))
    );
    assert_eq!(db.target("dp1").await.unwrap().unwrap(), after);
    // Nothing given: nothing changes, and no connection setting changed.
    let (_, same) = db.update_target("dp1", &TargetUpdate::default()).await.unwrap();
    assert_eq!(same, after);
    // A pull DP's sources, in rank order, and back to push.
    let pull = TargetUpdate { pull_sources: Some(Some("seed\nseed2".into())), ..TargetUpdate::default() };
    let (_, pulling) = db.update_target("dp1", &pull).await.unwrap();
    assert!(!pull.changes_connection(&after));
    assert_eq!(pulling.sources(), ["seed", "seed2"]);
    assert_eq!(db.target("dp1").await.unwrap().unwrap().sources(), ["seed", "seed2"]);
    db.record_peer_bytes(&id, t, 1000).await.unwrap();
    db.record_peer_bytes(&id, t, 24).await.unwrap();
    assert_eq!(db.distribution(&id, t).await.unwrap().unwrap().bytes_from_peers_last, 1024);
    let push = TargetUpdate { pull_sources: Some(None), ..TargetUpdate::default() };
    let (_, pushed) = db.update_target("dp1", &push).await.unwrap();
    assert!(pushed.sources().is_empty());
    assert!(!TargetUpdate { group: Some(None), ..TargetUpdate::default() }.changes_connection(&same));
    assert!(db.update_target("nope", &update).await.unwrap_err().is_not_found());

    // Deleting frees the name; the new target has a new id and no distributions.
    db.delete_target(t).await.unwrap();
    assert!(db.target("dp1").await.unwrap().is_none());
    assert!(db.distributions(&id).await.unwrap().is_empty());
    assert!(db.delete_target(t).await.unwrap_err().is_not_found());
    let again = target(db, "dp1").await;
    assert_ne!(again, t, "ids are never reused");
}

async fn retry_now_by_target(db: &Db) {
    let office = package_v1(db, "Office").await;
    let chrome = package_v1(db, "Chrome").await;
    let (dp1, dp2) = (target(db, "dp1").await, target(db, "dp2").await);
    for p in [&office, &chrome] {
        for t in [dp1, dp2] {
            db.assign(p, t).await.unwrap();
        }
    }
    assert_eq!(db.claim_due(soon(), 10).await.unwrap().len(), 4);
    let far = now() + 3_600_000;
    for p in [&office, &chrome] {
        db.finish(p, dp1, Outcome::Failed { error: "down".into(), next_attempt_at: far }).await.unwrap();
        db.finish(p, dp2, Outcome::Retry { error: "down".into(), next_attempt_at: far }).await.unwrap();
    }
    let revived = db.retry_now(None, Some(dp1)).await.unwrap();
    let got: Vec<(&str, &str)> = revived.iter().map(|d| (d.package_id.as_str(), d.target_name.as_str())).collect();
    let mut want = vec![(office.as_str(), "dp1"), (chrome.as_str(), "dp1")];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(db.claim_due(soon(), 10).await.unwrap().len(), 2, "only dp1's rows are due now");
    let all = db.retry_now(None, None).await.unwrap();
    assert_eq!(all.len(), 2, "dp2's retrying rows: {all:?}");
}

async fn group_assignments(db: &Db) {
    let office = package_v1(db, "Office").await;
    let chrome = package_v1(db, "Chrome").await;
    db.assign_group("east", &office).await.unwrap();
    db.assign_group("east", &office).await.unwrap();
    db.assign_group("east", &chrome.to_ascii_lowercase()).await.unwrap();
    db.assign_group("west", &chrome).await.unwrap();
    let mut want = vec![office.clone(), chrome.clone()];
    want.sort();
    assert_eq!(db.group_packages("east").await.unwrap(), want);
    assert_eq!(db.group_packages("west").await.unwrap(), vec![chrome.clone()]);
    assert!(db.group_packages("north").await.unwrap().is_empty());
    assert_eq!(db.package_groups(&chrome).await.unwrap(), vec!["east", "west"]);
    assert!(db.assign_group("east", "PS1FFFFF").await.unwrap_err().is_not_found());
}

async fn garbled_content_root_is_an_error_naming_the_table(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    db.commit_version(&p.id, new_version("a")).await.unwrap();
    db.commit_version(&p.id, new_version("b")).await.unwrap();
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE versions SET content_root = 'abc' WHERE package_id = $1 AND version = 1")
        .bind(p.id.clone())
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let key = format!("package {} version 1", p.id);
    // Not a list of one version.
    expect_corrupt(db.versions(&p.id).await.unwrap_err(), "versions", &key);
    expect_corrupt(db.version_summary(&p.id, 1).await.unwrap_err(), "versions", &key);
    expect_corrupt(db.version(&p.id, 1).await.unwrap_err(), "versions", &key);
    assert_eq!(db.latest_version(&p.id).await.unwrap().unwrap().summary.content_root, root("b"));
}

// ---------------------------------------------------------------------------------------
// Backend-independent
// ---------------------------------------------------------------------------------------

async fn aggregate_counts_for_metrics(db: &Db) {
    assert!(db.distribution_state_counts().await.unwrap().is_empty());
    assert!(db.package_versions().await.unwrap().is_empty());

    let office = package_v1(db, "Office").await;
    let chrome = db.create_package("PS1", "Chrome", "/src/chrome").await.unwrap().id;
    let (dp1, dp2) = (target(db, "dp1").await, target(db, "dp2").await);
    let child = db
        .add_target(NewTarget {
            name: "child".into(),
            kind: TargetKind::Site,
            url: "https://child.example:8443".into(),
            token: None,
            group: None,
            rate_limit: None,
            fingerprint: None,
            windows: None,
            pull_sources: None,
        })
        .await
        .unwrap()
        .id;
    for t in [dp1, dp2, child] {
        db.assign(&office, t).await.unwrap();
    }
    db.assign(&chrome, dp1).await.unwrap();
    // office → dp1 installed, → dp2 failed, → child in progress; chrome → dp1 pending
    // (it has no version to send yet).
    let claimed = db.claim_due(soon(), 10).await.unwrap();
    assert_eq!(claimed.len(), 3, "only office's rows are claimable: {claimed:?}");
    db.finish(&office, dp1, Outcome::Installed { version: 1 }).await.unwrap();
    db.finish(&office, dp2, Outcome::Failed { error: "refused".into(), next_attempt_at: now() + 3_600_000 })
        .await
        .unwrap();

    let count = |kind, state, count| StateCount { kind, state, count };
    let counts = db.distribution_state_counts().await.unwrap();
    assert_eq!(
        counts,
        vec![
            count(TargetKind::Dp, DistState::Failed, 1),
            count(TargetKind::Dp, DistState::Installed, 1),
            count(TargetKind::Dp, DistState::Pending, 1),
            count(TargetKind::Site, DistState::InProgress, 1),
        ],
        "grouped by kind and state, in that order"
    );
    let rows = db.distributions(&office).await.unwrap().len() + db.distributions(&chrome).await.unwrap().len();
    assert_eq!(counts.iter().map(|c| c.count).sum::<u64>(), rows as u64, "every row is counted once");

    db.commit_version(&office, new_version("b")).await.unwrap();
    assert_eq!(
        db.package_versions().await.unwrap(),
        vec![
            PackageVersion { id: office.clone(), current_version: 2 },
            PackageVersion { id: chrome.clone(), current_version: 0 },
        ],
        "ordered by id"
    );
}

#[test]
fn enums_serialize_as_snake_case() {
    assert_eq!(serde_json::to_string(&DistState::InProgress).unwrap(), "\"in_progress\"");
    assert_eq!(serde_json::to_string(&DistState::ValidationFailed).unwrap(), "\"validation_failed\"");
    for s in DistState::ALL {
        assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        assert_eq!(s.as_str().parse::<DistState>().unwrap(), *s);
    }
    for a in Action::ALL {
        assert_eq!(serde_json::to_string(a).unwrap(), format!("\"{a}\""));
    }
    assert_eq!(serde_json::to_string(&TargetKind::Dp).unwrap(), "\"dp\"");
    assert_eq!(serde_json::to_string(&Backend::Postgres).unwrap(), "\"postgres\"");
}

#[tokio::test]
async fn bad_urls_are_refused() {
    let err = Store::connect("mysql://root:pw@localhost/x").await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    assert!(!err.to_string().contains("pw@"), "{err}");
}

#[tokio::test]
async fn relative_sqlite_url_creates_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // The relative form is resolved against the current directory; use a path that is
    // relative to it by going through the temp dir's absolute path components.
    let rel = pathdiff(dir.path());
    let url = format!("sqlite:{rel}/rel.db");
    let s = Store::connect(&url).await.unwrap();
    s.meta_set("k", "v").await.unwrap();
    s.close().await;
    assert!(dir.path().join("rel.db").exists());
}

/// `dir` relative to the current directory (via `..` components).
fn pathdiff(dir: &std::path::Path) -> String {
    let cwd = std::env::current_dir().unwrap();
    let up = cwd.components().count() - 1;
    let mut s = vec![".."; up].join("/");
    for c in dir.components().skip(1) {
        s.push('/');
        s.push_str(&c.as_os_str().to_string_lossy());
    }
    s
}

// ---------------------------------------------------------------------------------------
// Older site databases (SQLite)
// ---------------------------------------------------------------------------------------

/// A raw connection to a SQLite file, created if missing.
async fn raw_sqlite(path: &Path) -> sqlx::SqliteConnection {
    use sqlx::ConnectOptions;
    sqlx::sqlite::SqliteConnectOptions::new().filename(path).create_if_missing(true).connect().await.unwrap()
}

async fn raw_exec(conn: &mut sqlx::SqliteConnection, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(conn).await.unwrap();
}

#[tokio::test]
async fn site_database_at_an_older_schema_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.db");
    // What a build that knew only migration 1 left behind.
    let mut raw = raw_sqlite(&path).await;
    raw_exec(
        &mut raw,
        "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await;
    raw_exec(&mut raw, include_str!("../../../migrations/sqlite/0001_init.sql")).await;
    raw_exec(&mut raw, "INSERT INTO schema_migrations (version, applied_at) VALUES (1, 0)").await;
    raw_exec(
        &mut raw,
        "INSERT INTO packages (id, name, source_path, source_site, current_version, created_at) \
                        VALUES ('PS100001', 'Office', '/src', 'PS1', 1, 0)",
    )
    .await;
    raw_exec(
        &mut raw,
        &format!(
            "INSERT INTO versions (package_id, version, content_root, manifest, scan_cache, files, dirs, \
               symlinks, total_bytes, files_added, files_changed, files_removed, files_unchanged, \
               bytes_hashed, origin, created_at) \
             VALUES ('PS100001', 1, '{}', x'00', x'', 1, 0, 0, 1, 1, 0, 0, 0, 1, 'refresh', 0)",
            root("a")
        ),
    )
    .await;
    raw.close().await.unwrap();

    let url = format!("sqlite://{}", path.display());
    let store = Store::connect(&url).await.unwrap();
    let v = store.latest_version("PS100001").await.unwrap().unwrap();
    assert_eq!((v.summary.version, v.summary.content_root, v.summary.signature), (1, root("a"), None));
    let t = store
        .add_target(NewTarget {
            name: "dp1".into(),
            kind: TargetKind::Dp,
            url: "https://dp1:8443".into(),
            token: None,
            group: None,
            rate_limit: None,
            fingerprint: Some("ab".repeat(32)),
            windows: None,
            pull_sources: None,
        })
        .await
        .unwrap();
    assert_eq!(t.fingerprint, Some("ab".repeat(32)));
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all(&mut raw_sqlite(&path).await)
        .await
        .unwrap();
    assert_eq!(applied, dpsync_store::schema_versions());
    store.close().await;
}

// ---------------------------------------------------------------------------------------
// Agent database (SQLite only)
// ---------------------------------------------------------------------------------------

const PKG: &str = "PS100001";

fn cid(n: u8) -> ChunkId {
    ChunkId::from_bytes([n; 32])
}

fn fh(n: u8) -> FileHash {
    FileHash::from_bytes([n; 32])
}

fn expect_corrupt(e: StoreError, want_table: &str, want_key: &str) {
    assert!(!e.is_retryable(), "{e}");
    let message = e.to_string();
    match e {
        StoreError::CorruptRow { table, key, .. } => {
            assert_eq!(table, want_table, "{message}");
            assert!(key.contains(want_key), "{message}");
            assert!(message.contains(want_table), "{message}");
        }
        other => panic!("expected a CorruptRow error in {want_table}, got {other:?}"),
    }
}

#[tokio::test]
async fn agent_rows_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let db = AgentDb::open(&dir.path().join("agent.db")).await.unwrap();
    let staged = Staged {
        package: PKG.into(),
        version: 3,
        content_root: root("c"),
        manifest: b"manifest".to_vec(),
        force: false,
        signature: Some("sig".into()),
    };
    db.stage(staged.clone()).await.unwrap();
    assert_eq!(db.staged(PKG, 3).await.unwrap().unwrap(), staged);
    assert_eq!(db.latest_staged_version(PKG).await.unwrap(), Some(3));

    let packed = PackRows {
        pack: "p1.pack".into(),
        chunks: vec![
            PackedChunk { chunk: cid(1), offset: 0, len: 10 },
            PackedChunk { chunk: cid(2), offset: 10, len: u32::MAX },
        ],
    };
    let index = vec![ChunkLocation { chunk: cid(3), file: fh(9), offset: 1 << 40, len: 7 }];
    db.record_arrivals(PKG, &[packed], &[], &index).await.unwrap();
    let mut got = db.staged_chunks(PKG).await.unwrap();
    got.sort_by_key(|c| c.chunk);
    let pack = || "p1.pack".to_string();
    assert_eq!(
        got,
        vec![
            StagedChunk { chunk: cid(1), pack: pack(), offset: 0, len: 10 },
            StagedChunk { chunk: cid(2), pack: pack(), offset: 10, len: u32::MAX },
        ]
    );
    let mut ids = db.staged_chunk_ids(PKG).await.unwrap();
    ids.sort();
    assert_eq!(ids, vec![cid(1), cid(2)]);
    assert_eq!(db.indexed_chunks(&[cid(3), cid(4)]).await.unwrap(), index);
    db.forget_staged_chunk(PKG, &cid(1)).await.unwrap();
    assert_eq!(db.staged_chunk_ids(PKG).await.unwrap(), vec![cid(2)]);

    db.record_install(PKG, 3, &root("c"), "/dp/packages/P/versions/v3", b"manifest").await.unwrap();
    let p = db.package(PKG).await.unwrap().unwrap();
    assert_eq!((p.installed_version, p.installed_root, p.broken), (Some(3), Some(root("c")), false));
    assert!(db.staged_chunks(PKG).await.unwrap().is_empty(), "an install forgets the staged chunks");
    assert!(db.validations().await.unwrap().is_empty(), "not validated yet");
    db.record_validation(PKG, 1_000, false).await.unwrap();
    db.record_validation(PKG, 2_000, true).await.unwrap();
    assert_eq!(db.validations().await.unwrap(), std::collections::HashMap::from([(PKG.to_owned(), (2_000, true))]));
    // A chunk held by two files is indexed in both: removing one leaves the other.
    let also = ChunkLocation { chunk: cid(3), file: fh(8), offset: 5, len: 7 };
    db.index_chunks(&[also, also]).await.unwrap();
    let mut both = db.indexed_chunks(&[cid(3)]).await.unwrap();
    both.sort_by_key(|l| l.file);
    assert_eq!(both, vec![also, index[0]]);
    db.unindex_file(&fh(9)).await.unwrap();
    assert_eq!(db.indexed_chunks(&[cid(3)]).await.unwrap(), vec![also]);
    db.unindex_file(&fh(8)).await.unwrap();
    assert!(db.indexed_chunks(&[cid(3)]).await.unwrap().is_empty());
    db.close().await;
}

#[tokio::test]
async fn agent_garbled_ids_are_errors_naming_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    let db = AgentDb::open(&path).await.unwrap();
    db.index_chunks(&[ChunkLocation { chunk: cid(1), file: fh(9), offset: 0, len: 4 }]).await.unwrap();
    let packed = PackRows { pack: "a.pack".into(), chunks: vec![PackedChunk { chunk: cid(2), offset: 0, len: 4 }] };
    db.record_arrivals(PKG, &[packed], &[], &[]).await.unwrap();
    db.record_install("PS100002", 1, &root("a"), "/d", b"m").await.unwrap();

    let mut raw = raw_sqlite(&path).await;
    // A 3-byte chunk id among the staged chunks; in the chunk index, a 3-byte file hash and a
    // negative offset; a content root that is not hex.
    raw_exec(
        &mut raw,
        &format!(
            "INSERT INTO staged_chunks (package, chunk_id, pack, offset, len) VALUES ('{PKG}', x'0a0b0c', 'a.pack', 4, 4);
             INSERT INTO chunk_index (chunk_id, file_hash, offset, len) VALUES (x'{}', x'0a0b0c', 0, 4);
             INSERT INTO chunk_index (chunk_id, file_hash, offset, len) VALUES (x'{}', x'{}', -1, 4);
             UPDATE packages SET installed_root = 'abc' WHERE id = 'PS100002';",
            cid(5).to_hex(),
            cid(6).to_hex(),
            fh(9).to_hex()
        ),
    )
    .await;
    raw.close().await.unwrap();

    expect_corrupt(db.staged_chunks(PKG).await.unwrap_err(), "staged_chunks", "x'0a0b0c'");
    expect_corrupt(db.staged_chunk_ids(PKG).await.unwrap_err(), "staged_chunks", "x'0a0b0c'");
    expect_corrupt(db.indexed_chunks(&[cid(1), cid(5)]).await.unwrap_err(), "chunk_index", &cid(5).to_hex());
    expect_corrupt(db.indexed_chunks(&[cid(6)]).await.unwrap_err(), "chunk_index", &cid(6).to_hex());
    assert_eq!(db.indexed_chunks(&[cid(1)]).await.unwrap().len(), 1, "intact rows still read");
    expect_corrupt(db.package_summary("PS100002").await.unwrap_err(), "packages", "PS100002");
    expect_corrupt(db.packages().await.unwrap_err(), "packages", "PS100002");
    db.close().await;
}

const AGENT_0001: &str = include_str!("../../../migrations/agent/0001_init.sql");
const AGENT_0002: &str = include_str!("../../../migrations/agent/0002_signature.sql");

/// An agent database as the former runner left it: migrations applied, and the schema
/// version only in `PRAGMA user_version`.
async fn legacy_agent_db(path: &Path, applied: &[&str], user_version: i64) -> sqlx::SqliteConnection {
    let mut raw = raw_sqlite(path).await;
    for sql in applied {
        raw_exec(&mut raw, sql).await;
    }
    raw_exec(&mut raw, &format!("PRAGMA user_version = {user_version}")).await;
    raw
}

async fn agent_bookkeeping(path: &Path) -> (Vec<i64>, i64) {
    let mut raw = raw_sqlite(path).await;
    let applied =
        sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version").fetch_all(&mut raw).await.unwrap();
    let user_version = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut raw).await.unwrap();
    raw.close().await.unwrap();
    (applied, user_version)
}

#[tokio::test]
async fn agent_database_of_the_former_runner_opens() {
    let dir = tempfile::tempdir().unwrap();
    let latest = dpsync_store::agent::SCHEMA_VERSION;

    let path = dir.path().join("at-2.db");
    let mut raw = legacy_agent_db(&path, &[AGENT_0001, AGENT_0002], 2).await;
    raw_exec(
        &mut raw,
        &format!(
            "INSERT INTO packages (id, installed_version, installed_root, installed_dir, installed_manifest, broken, updated_at)
             VALUES ('{PKG}', 4, '{}', '/d/v4', x'00', 0, 0);
             INSERT INTO chunk_index (chunk_id, file_hash, offset, len) VALUES (x'{}', x'{}', 8, 16);",
            root("d"),
            cid(1).to_hex(),
            fh(2).to_hex()
        ),
    )
    .await;
    raw.close().await.unwrap();
    for _ in 0..2 {
        let db = AgentDb::open(&path).await.unwrap();
        let p = db.package(PKG).await.unwrap().unwrap();
        assert_eq!((p.installed_version, p.installed_root), (Some(4), Some(root("d"))));
        assert_eq!(
            db.indexed_chunks(&[cid(1)]).await.unwrap(),
            vec![ChunkLocation { chunk: cid(1), file: fh(2), offset: 8, len: 16 }]
        );
        db.close().await;
        assert_eq!(agent_bookkeeping(&path).await, ((1..=latest).collect(), latest));
    }

    // At schema 1: brought up to date (0002 adds the staged signature).
    let path = dir.path().join("at-1.db");
    legacy_agent_db(&path, &[AGENT_0001], 1).await.close().await.unwrap();
    let db = AgentDb::open(&path).await.unwrap();
    let staged = Staged {
        package: PKG.into(),
        version: 1,
        content_root: root("e"),
        manifest: vec![],
        force: true,
        signature: Some("sig".into()),
    };
    db.stage(staged.clone()).await.unwrap();
    assert_eq!(db.staged(PKG, 1).await.unwrap().unwrap(), staged);
    db.close().await;
    assert_eq!(agent_bookkeeping(&path).await, ((1..=latest).collect(), latest));
}

#[tokio::test]
async fn agent_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let latest = dpsync_store::agent::SCHEMA_VERSION;
    let refused = |r: Result<AgentDb, StoreError>| match r {
        Err(StoreError::Migration(m)) => assert!(m.contains("newer") && m.contains("agent database"), "{m}"),
        other => panic!("expected a Migration error, got {other:?}"),
    };

    // Recorded by the former runner.
    let path = dir.path().join("legacy.db");
    legacy_agent_db(&path, &[AGENT_0001, AGENT_0002], latest + 1).await.close().await.unwrap();
    refused(AgentDb::open(&path).await);
    refused(AgentDb::open(&path).await);

    // Recorded in schema_migrations.
    let path = dir.path().join("agent.db");
    AgentDb::open(&path).await.unwrap().close().await;
    let mut raw = raw_sqlite(&path).await;
    raw_exec(&mut raw, &format!("INSERT INTO schema_migrations (version, applied_at) VALUES ({}, 0)", latest + 1))
        .await;
    raw.close().await.unwrap();
    refused(AgentDb::open(&path).await);
}

async fn package_settings_and_schedules(db: &Db) {
    let p = db.create_package("PS1", "Office", "/src").await.unwrap();
    assert_eq!((p.priority, p.refresh_every_ms, p.deleting_since), (Priority::Medium, None, None));
    db.create_package("PS1", "Taken", "/src2").await.unwrap();
    let before = now();
    let update = PackageUpdate {
        name: Some("Office 2".into()),
        source_path: Some("/new".into()),
        priority: Some(Priority::High),
        refresh_every_ms: Some(Some(60_000)),
    };
    let u = db.update_package(&p.id, &update).await.unwrap();
    assert_eq!((u.name.as_str(), u.source_path.as_deref(), u.priority), ("Office 2", Some("/new"), Priority::High));
    let due = u.next_refresh_at.unwrap();
    assert!(due >= before + 60_000 && u.refresh_every_ms == Some(60_000), "{u:?}");
    assert_eq!(db.package(&p.id).await.unwrap().unwrap(), u, "what update_package returns is what is stored");
    let taken = PackageUpdate { name: Some("Taken".into()), ..Default::default() };
    assert!(matches!(db.update_package(&p.id, &taken).await, Err(StoreError::Conflict(_))));
    assert!(db.update_package("PS1FFFFF", &taken).await.unwrap_err().is_not_found());

    // Due, taken once (compare-and-set on the due time), then due again an interval later.
    assert!(db.due_refreshes(due - 1).await.unwrap().is_empty());
    assert_eq!(db.due_refreshes(due).await.unwrap().len(), 1);
    assert_eq!(db.next_scheduled_at().await.unwrap(), Some(due));
    assert!(db.take_scheduled_refresh(&p.id, due, due + 500).await.unwrap());
    assert!(!db.take_scheduled_refresh(&p.id, due, due + 900).await.unwrap(), "taken twice");
    assert!(db.due_refreshes(due).await.unwrap().is_empty());
    db.set_schedule_error(&p.id, Some("source missing")).await.unwrap();
    assert_eq!(db.package(&p.id).await.unwrap().unwrap().schedule_error.as_deref(), Some("source missing"));

    // A scheduled refresh that found the same content keeps the stats it read.
    db.commit_version(&p.id, new_version("a")).await.unwrap();
    assert!(db.set_scan_cache(&p.id, 1, b"newer stats").await.unwrap());
    assert_eq!(db.version(&p.id, 1).await.unwrap().unwrap().scan_cache, b"newer stats");
    assert!(!db.set_scan_cache(&p.id, 2, b"x").await.unwrap(), "no version 2");

    let off =
        db.update_package(&p.id, &PackageUpdate { refresh_every_ms: Some(None), ..Default::default() }).await.unwrap();
    assert_eq!((off.refresh_every_ms, off.next_refresh_at, off.schedule_error), (None, None, None));
    assert_eq!(db.next_scheduled_at().await.unwrap(), None);
}

async fn higher_priority_jobs_are_claimed_first(db: &Db) {
    let t = target(db, "dp1").await;
    let low = package_v1(db, "A low").await;
    let medium = package_v1(db, "B medium").await;
    let high = package_v1(db, "C high").await;
    for (id, p) in [(&low, Priority::Low), (&high, Priority::High)] {
        db.update_package(id, &PackageUpdate { priority: Some(p), ..Default::default() }).await.unwrap();
    }
    // Assigned oldest first: low, medium, high.
    for id in [&low, &medium, &high] {
        db.assign(id, t).await.unwrap();
    }
    let order: Vec<String> = {
        let mut out = Vec::new();
        for _ in 0..3 {
            out.extend(db.claim_due(soon(), 1).await.unwrap().into_iter().map(|d| d.package_id));
        }
        out
    };
    assert_eq!(order, [high.clone(), medium.clone(), low.clone()]);
    // Within one claim, the same order.
    for id in [&low, &medium, &high] {
        db.finish(id, t, Outcome::Installed { version: 1 }).await.unwrap();
        db.request_action(id, t, Action::Redistribute, 1).await.unwrap();
    }
    let all: Vec<String> = db.claim_due(soon(), 3).await.unwrap().into_iter().map(|d| d.package_id).collect();
    assert_eq!(all, [high, medium, low]);
}

async fn failing_targets_are_claimed_last_and_apart(db: &Db) {
    let id = package_v1(db, "Office").await;
    // `dead` registered first: among targets never tried, it would be claimed first.
    let dead = target(db, "dead").await;
    let live = target(db, "live").await;
    for t in [dead, live] {
        db.assign(&id, t).await.unwrap();
    }
    assert_eq!(db.target_failing_since(dead).await.unwrap(), None);
    let first = db.claim_due(soon(), 1).await.unwrap();
    assert_eq!(first[0].target_id, dead);
    db.finish(&id, dead, Outcome::Retry { error: "refused".into(), next_attempt_at: now() + 3_600_000 }).await.unwrap();
    let since = db.target_failing_since(dead).await.unwrap().expect("failing since its failure");
    let rest: Vec<i64> = db.claim_due(soon(), 10).await.unwrap().into_iter().map(|d| d.target_id).collect();
    assert_eq!(rest, [live]);
    db.finish(&id, live, Outcome::Installed { version: 1 }).await.unwrap();

    // A new version: both due again; the failing target comes after the other.
    db.commit_version(&id, new_version("b")).await.unwrap();
    assert_eq!(db.claim_due(soon(), 1).await.unwrap()[0].target_id, live);
    assert_eq!(db.claim_due(soon(), 1).await.unwrap()[0].target_id, dead);
    // Still failing: the first failure's time stays.
    db.finish(&id, dead, Outcome::Failed { error: "refused".into(), next_attempt_at: now() }).await.unwrap();
    assert_eq!(db.target_failing_since(dead).await.unwrap(), Some(since));
    db.finish(&id, live, Outcome::Installed { version: 2 }).await.unwrap();

    // Claims by health take only their own kind.
    db.commit_version(&id, new_version("c")).await.unwrap();
    assert!(db.next_due_at_of(Some(TargetHealth::Healthy)).await.unwrap().is_some());
    assert!(db.next_due_at_of(Some(TargetHealth::Failing)).await.unwrap().is_some());
    let healthy = db.claim_due_of(soon(), 10, Some(TargetHealth::Healthy)).await.unwrap();
    assert_eq!(healthy.iter().map(|d| d.target_id).collect::<Vec<_>>(), [live]);
    let failing = db.claim_due_of(soon(), 10, Some(TargetHealth::Failing)).await.unwrap();
    assert_eq!(failing.iter().map(|d| d.target_id).collect::<Vec<_>>(), [dead]);
    assert_eq!(db.next_due_at_of(Some(TargetHealth::Healthy)).await.unwrap(), None, "nothing left to claim");
    assert_eq!(db.next_due_at_of(Some(TargetHealth::Failing)).await.unwrap(), None);
    // A wait for a window says nothing of the target; a success makes it healthy.
    db.finish(&id, dead, Outcome::WaitWindow { next_window_at: now() }).await.unwrap();
    assert_eq!(db.target_failing_since(dead).await.unwrap(), Some(since));
    db.claim_due(soon(), 10).await.unwrap();
    db.finish(&id, dead, Outcome::Installed { version: 3 }).await.unwrap();
    assert_eq!(db.target_failing_since(dead).await.unwrap(), None);
}

async fn assign_many_assigns_in_bulk(db: &Db) {
    let id = package_v1(db, "Office").await;
    let mut ids = Vec::new();
    for i in 0..1_003 {
        ids.push(target(db, &format!("dp{i:04}")).await);
    }
    db.assign(&id, ids[0]).await.unwrap();
    db.claim_due(soon(), 1).await.unwrap();
    db.finish(&id, ids[0], Outcome::Installed { version: 1 }).await.unwrap();
    db.assign_many(&id, &ids).await.unwrap();
    let dists = db.distributions(&id).await.unwrap();
    assert_eq!(dists.len(), 1_003);
    assert_eq!(dists.iter().filter(|d| d.state == DistState::Pending && d.desired_version == 1).count(), 1_002);
    assert_eq!(db.distribution(&id, ids[0]).await.unwrap().unwrap().state, DistState::Installed, "left as it was");
    assert!(matches!(db.assign_many(&id, &[ids[1], 999_999]).await, Err(StoreError::NotFound(_))));
}

async fn deleting_a_package_waits_for_every_target(db: &Db) {
    let (t1, t2) = (target(db, "dp1").await, target(db, "dp2").await);
    let id = package_v1(db, "Office").await;
    let other = package_v1(db, "Other").await;
    db.assign(&id, t1).await.unwrap();
    db.assign(&id, t2).await.unwrap();
    db.update_package(&id, &PackageUpdate { refresh_every_ms: Some(Some(1000)), ..Default::default() }).await.unwrap();
    let claimed = db.claim_due(soon(), 1).await.unwrap();
    assert_eq!(claimed.len(), 1);

    let p = db.start_deleting(&id).await.unwrap();
    assert!(p.deleting_since.is_some() && p.refresh_every_ms.is_none() && p.next_refresh_at.is_none(), "{p:?}");
    let rows = db.distributions(&id).await.unwrap();
    assert!(rows.iter().all(|d| d.action == Action::Remove), "{rows:?}");
    assert!(rows.iter().any(|d| d.state == DistState::InProgress), "a running job keeps running: {rows:?}");
    assert!(matches!(db.assign(&id, t1).await, Err(StoreError::Conflict(_))), "no new assignment");
    assert!(!db.finish_deleting(&id).await.unwrap(), "targets still hold it");
    assert!(!db.finish_deleting(&other).await.unwrap(), "not being deleted");

    // The running install finishes, superseded: it becomes a removal.
    let d = db.finish(&id, claimed[0].target_id, Outcome::Installed { version: 1 }).await.unwrap();
    assert_eq!(d.state, DistState::Removing);
    for d in db.claim_due(soon(), 10).await.unwrap() {
        assert_eq!(d.action, Action::Remove);
        db.finish(&id, d.target_id, Outcome::Removed).await.unwrap();
        let gone = db.finish_deleting(&id).await.unwrap();
        assert_eq!(gone, db.distributions(&id).await.unwrap().is_empty(), "gone with the last removal");
    }
    assert!(db.package(&id).await.unwrap().is_none());
    assert!(db.versions(&id).await.unwrap().is_empty());
    assert!(db.distributions(&id).await.unwrap().is_empty());
    assert_eq!(db.deleting_packages().await.unwrap(), Vec::<String>::new());
    assert!(db.package(&other).await.unwrap().is_some(), "other packages untouched");
    assert!(!db.finish_deleting(&id).await.unwrap(), "deleting twice is no error");

    // A package on no target goes at once.
    let lone = package_v1(db, "Lone").await;
    db.start_deleting(&lone).await.unwrap();
    assert!(db.finish_deleting(&lone).await.unwrap());
}

async fn validation_schedules(db: &Db) {
    let t = target(db, "dp1").await;
    let id = package_v1(db, "Office").await;
    db.assign(&id, t).await.unwrap();
    assert_eq!(db.validation_schedule(t).await.unwrap(), None);
    let at = now() + 5_000;
    db.set_validation_schedule(t, Some((10_000, at))).await.unwrap();
    assert_eq!(db.target("dp1").await.unwrap().unwrap().validate_every_ms, Some(10_000));
    let s = db.validation_schedule(t).await.unwrap().unwrap();
    assert_eq!((s.target_name.as_str(), s.every_ms, s.next_at), ("dp1", 10_000, at));
    assert!(db.due_validations(at - 1).await.unwrap().is_empty());
    assert_eq!(db.due_validations(at).await.unwrap(), vec![s]);
    assert_eq!(db.next_scheduled_at().await.unwrap(), Some(at));
    assert!(db.take_scheduled_validation(t, at, at + 10_000).await.unwrap());
    assert!(!db.take_scheduled_validation(t, at, at + 10_000).await.unwrap());
    db.record_validated(&id, t, at).await.unwrap();
    assert_eq!(db.distribution(&id, t).await.unwrap().unwrap().last_validated_at, Some(at));
    db.set_validation_schedule(t, None).await.unwrap();
    assert_eq!(db.validation_schedule(t).await.unwrap(), None);
    assert!(db.set_validation_schedule(999_999, None).await.unwrap_err().is_not_found());
    assert!(db.set_validation_schedule(t, Some((0, at))).await.is_err());
}

async fn target_series_for_metrics(db: &Db) {
    assert!(db.target_series().await.unwrap().is_empty());
    let office = package_v1(db, "Office").await;
    let (dp1, dp2, dp3) = (target(db, "dp1").await, target(db, "dp2").await, target(db, "dp3").await);
    for t in [dp1, dp2, dp3] {
        db.assign(&office, t).await.unwrap();
    }
    assert_eq!(db.claim_due(soon(), 10).await.unwrap().len(), 3);
    let before = now();
    db.finish(&office, dp1, Outcome::Installed { version: 1 }).await.unwrap();
    db.finish(&office, dp2, Outcome::Retry { error: "down".into(), next_attempt_at: now() }).await.unwrap();
    // dp2: a second failed attempt; dp3 stays in progress on its first.
    assert_eq!(db.claim_due(soon(), 10).await.unwrap().len(), 1);
    db.finish(&office, dp2, Outcome::Failed { error: "down".into(), next_attempt_at: now() + 60_000 }).await.unwrap();

    let rows = db.target_series().await.unwrap();
    let names: Vec<_> = rows.iter().map(|r| (r.package_id.as_str(), r.target_name.as_str())).collect();
    assert_eq!(names, vec![(office.as_str(), "dp1"), (office.as_str(), "dp2"), (office.as_str(), "dp3")]);
    let (r1, r2, r3) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!((r1.state, r1.installed_version, r1.consecutive_failures), (DistState::Installed, Some(1), 0));
    assert!(r1.last_success_at.is_some_and(|t| t >= before && t <= now()), "{r1:?}");
    assert_eq!((r2.state, r2.consecutive_failures, r2.last_success_at), (DistState::Failed, 2, None));
    assert_eq!((r3.state, r3.consecutive_failures, r3.last_success_at), (DistState::InProgress, 0, None));
    assert_eq!(r1.target_kind, TargetKind::Dp);

    // A later failure keeps the time of the last success.
    db.commit_version(&office, new_version("b")).await.unwrap();
    db.claim_due(soon(), 10).await.unwrap();
    db.finish(&office, dp1, Outcome::Failed { error: "disk full".into(), next_attempt_at: now() + 60_000 })
        .await
        .unwrap();
    let again = db.target_series().await.unwrap();
    assert_eq!(again[0].last_success_at, r1.last_success_at);
    assert_eq!((again[0].state, again[0].consecutive_failures), (DistState::Failed, 1));
}
