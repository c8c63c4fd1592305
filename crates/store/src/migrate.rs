//! The schema migration runner.
//!
//! Migrations live in `migrations/sqlite/` and `migrations/postgres/` at the workspace root
//! and are embedded with `include_str!`. Applied versions are recorded in
//! `schema_migrations(version, applied_at)`. Each migration runs in its own transaction
//! (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: under a transaction-scoped advisory lock), and
//! re-checks inside that transaction whether it is already applied, so two processes
//! starting at once apply each migration exactly once. A database that records a version
//! newer than the newest one compiled in is refused: an older binary must not write to a
//! schema it does not know.

use sqlx::Row;

use crate::error::{Result, StoreError};
use crate::{Backend, Store, now_ms};

/// One embedded migration, in both dialects.
struct Migration {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sqlite: include_str!("../../../migrations/sqlite/0001_init.sql"),
        postgres: include_str!("../../../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "trust",
        sqlite: include_str!("../../../migrations/sqlite/0002_trust.sql"),
        postgres: include_str!("../../../migrations/postgres/0002_trust.sql"),
    },
];

/// Newest schema version this build knows.
pub(crate) const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Arbitrary constant key for `pg_advisory_xact_lock` ("dpsync" in ASCII).
const PG_LOCK_KEY: i64 = 0x6470_7379_6e63;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version BIGINT PRIMARY KEY NOT NULL, applied_at BIGINT NOT NULL)";

/// Brings the schema up to [`LATEST_VERSION`].
pub(crate) async fn run(store: &Store) -> Result<()> {
    let fail = |what: &str, e: sqlx::Error| StoreError::Migration(format!("{what}: {e}"));

    let mut tx = store.begin_write().await?;
    lock(store, &mut tx).await?;
    sqlx::query(CREATE_TABLE).execute(&mut *tx).await.map_err(|e| fail("cannot create table schema_migrations", e))?;
    let newest: Option<i64> =
        sqlx::query("SELECT MAX(version) AS v FROM schema_migrations").fetch_one(&mut *tx).await?.try_get("v")?;
    tx.commit().await?;

    if let Some(v) = newest
        && v > LATEST_VERSION
    {
        return Err(StoreError::Migration(format!(
            "the database has schema version {v}, newer than this dpsync build knows \
             (up to {LATEST_VERSION}); it was written by a newer dpsync: upgrade dpsync"
        )));
    }

    for m in MIGRATIONS {
        if newest.is_some_and(|v| v >= m.version) {
            continue;
        }
        let mut tx = store.begin_write().await?;
        lock(store, &mut tx).await?;
        let applied = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
            .bind(m.version)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if applied {
            tx.commit().await?;
            continue;
        }
        let sql = match store.backend {
            Backend::Sqlite => m.sqlite,
            Backend::Postgres => m.postgres,
        };
        let what = format!("migration {:04}_{} failed", m.version, m.name);
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(|e| fail(&what, e))?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(m.version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(|e| fail(&what, e))?;
        tx.commit().await.map_err(|e| fail(&what, e))?;
    }
    Ok(())
}

/// Serializes concurrent migration runners on PostgreSQL (SQLite's `BEGIN IMMEDIATE`
/// already does).
async fn lock(store: &Store, tx: &mut sqlx::Transaction<'static, sqlx::Any>) -> Result<()> {
    if store.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_LOCK_KEY).execute(&mut **tx).await?;
    }
    Ok(())
}
