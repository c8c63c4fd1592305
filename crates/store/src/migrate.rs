//! The schema migration runner, for every database dpsync keeps: the site store (SQLite or
//! PostgreSQL) and a receiver's agent database (SQLite).
//!
//! Migrations live in `migrations/{sqlite,postgres,agent}/` at the workspace root and are
//! embedded with `include_str!`. Applied versions are recorded in
//! `schema_migrations(version, applied_at)`. Each migration runs in its own transaction
//! (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: under a transaction-scoped advisory lock), and
//! re-checks inside that transaction whether it is already applied, so two processes
//! starting at once apply each migration exactly once. A database that records a version
//! newer than the newest one compiled in is refused: an older binary must not write to a
//! schema it does not know.
//!
//! The agent database used to record its schema version only in SQLite's
//! `PRAGMA user_version`: such a database has its versions adopted into
//! `schema_migrations` on first open, and `user_version` is still kept equal to the schema
//! version so that older agents keep refusing a schema newer than theirs.

use sqlx::{Connection, Database, Decode, Encode, Executor, FromRow, IntoArguments, Type};

use crate::error::{Result, StoreError};
use crate::{Backend, now_ms};

/// One embedded migration.
#[derive(Debug)]
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The migrations of one kind of database, in one SQL dialect.
#[derive(Debug)]
pub(crate) struct Schema {
    /// What the database is, for messages.
    pub what: &'static str,
    pub backend: Backend,
    /// In version order, numbered 1, 2, 3, … (a number is left free while the migration
    /// that takes it is still to be merged).
    pub migrations: &'static [Migration],
    /// Also track the version in SQLite's `PRAGMA user_version` (see the module docs).
    pub user_version: bool,
}

impl Schema {
    /// Newest schema version this build knows.
    pub const fn latest(&self) -> i64 {
        self.migrations[self.migrations.len() - 1].version
    }
}

macro_rules! migration {
    ($version:literal, $name:literal, $file:literal) => {
        Migration { version: $version, name: $name, sql: include_str!(concat!("../../../migrations/", $file)) }
    };
}

/// The site store on SQLite. Keep in step with [`SITE_POSTGRES`].
pub(crate) const SITE_SQLITE: Schema = Schema {
    what: "site store",
    backend: Backend::Sqlite,
    migrations: &[
        migration!(1, "init", "sqlite/0001_init.sql"),
        migration!(2, "trust", "sqlite/0002_trust.sql"),
        migration!(3, "operations", "sqlite/0003_operations.sql"),
        migration!(4, "windows", "sqlite/0004_windows.sql"),
        migration!(5, "package lifecycle", "sqlite/0005_package_lifecycle.sql"),
        migration!(6, "handover", "sqlite/0006_handover.sql"),
        migration!(7, "last success", "sqlite/0007_last_success.sql"),
        migration!(8, "nodes and leases", "sqlite/0008_nodes_and_leases.sql"),
        migration!(9, "target health", "sqlite/0009_target_health.sql"),
        migration!(10, "pull", "sqlite/0010_pull.sql"),
        migration!(11, "shared manifests", "sqlite/0011_shared_manifests.sql"),
    ],
    user_version: false,
};

/// The site store on PostgreSQL. Keep in step with [`SITE_SQLITE`].
pub(crate) const SITE_POSTGRES: Schema = Schema {
    what: "site store",
    backend: Backend::Postgres,
    migrations: &[
        migration!(1, "init", "postgres/0001_init.sql"),
        migration!(2, "trust", "postgres/0002_trust.sql"),
        migration!(3, "operations", "postgres/0003_operations.sql"),
        migration!(4, "windows", "postgres/0004_windows.sql"),
        migration!(5, "package lifecycle", "postgres/0005_package_lifecycle.sql"),
        migration!(6, "handover", "postgres/0006_handover.sql"),
        migration!(7, "last success", "postgres/0007_last_success.sql"),
        migration!(8, "nodes and leases", "postgres/0008_nodes_and_leases.sql"),
        migration!(9, "target health", "postgres/0009_target_health.sql"),
        migration!(10, "pull", "postgres/0010_pull.sql"),
        migration!(11, "shared manifests", "postgres/0011_shared_manifests.sql"),
    ],
    user_version: false,
};

/// A receiver's agent database (SQLite only).
pub(crate) const AGENT: Schema = Schema {
    what: "agent database",
    backend: Backend::Sqlite,
    migrations: &[
        migration!(1, "init", "agent/0001_init.sql"),
        migration!(2, "signature", "agent/0002_signature.sql"),
        migration!(3, "chunk locations", "agent/0003_chunk_locations.sql"),
        migration!(4, "validation", "agent/0004_validation.sql"),
    ],
    user_version: true,
};

/// Arbitrary constant key for `pg_advisory_xact_lock` ("dpsync" in ASCII).
const PG_LOCK_KEY: i64 = 0x6470_7379_6e63;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version BIGINT PRIMARY KEY NOT NULL, applied_at BIGINT NOT NULL)";

/// Brings the schema of the database behind `conn` up to `schema.latest()`.
pub(crate) async fn run<DB>(conn: &mut DB::Connection, schema: &Schema) -> Result<()>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    i64: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB>,
    (i64,): for<'r> FromRow<'r, DB::Row>,
    (Option<i64>,): for<'r> FromRow<'r, DB::Row>,
{
    let fail = |what: &str, e: sqlx::Error| StoreError::Migration(format!("{}: {what}: {e}", schema.what));
    let latest = schema.latest();

    let mut tx = begin::<DB>(conn, schema.backend).await?;
    sqlx::query(CREATE_TABLE).execute(&mut *tx).await.map_err(|e| fail("cannot create table schema_migrations", e))?;
    let mut newest: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations").fetch_one(&mut *tx).await?;
    if newest.is_none() && schema.user_version {
        let legacy: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *tx).await?;
        if legacy > 0 {
            // The former runner applied versions 1 to `legacy`. A schema newer than this
            // build is refused below, without recording anything.
            if legacy <= latest {
                for v in 1..=legacy {
                    record::<DB>(&mut tx, v).await?;
                }
            }
            newest = Some(legacy);
        }
    }
    tx.commit().await?;

    if let Some(v) = newest
        && v > latest
    {
        return Err(StoreError::Migration(format!(
            "the {} has schema version {v}, newer than this dpsync build knows \
             (up to {latest}); it was written by a newer dpsync: upgrade dpsync",
            schema.what
        )));
    }

    for m in schema.migrations {
        if newest.is_some_and(|v| v >= m.version) {
            continue;
        }
        let mut tx = begin::<DB>(conn, schema.backend).await?;
        let applied: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
            .bind(m.version)
            .fetch_optional(&mut *tx)
            .await?;
        if applied.is_some() {
            tx.commit().await?;
            continue;
        }
        let what = format!("migration {:04}_{} failed", m.version, m.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql)).execute(&mut *tx).await.map_err(|e| fail(&what, e))?;
        record::<DB>(&mut tx, m.version).await.map_err(|e| match e {
            StoreError::Database(e) => fail(&what, e),
            e => e,
        })?;
        if schema.user_version {
            // Only an integer literal is interpolated (PRAGMA takes no parameters).
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PRAGMA user_version = {}", m.version)))
                .execute(&mut *tx)
                .await
                .map_err(|e| fail(&what, e))?;
        }
        tx.commit().await.map_err(|e| fail(&what, e))?;
    }
    Ok(())
}

/// A write transaction that holds the migration lock: SQLite's `BEGIN IMMEDIATE` takes
/// the write lock at once; on PostgreSQL an advisory lock serializes concurrent runners.
async fn begin<DB>(conn: &mut DB::Connection, backend: Backend) -> Result<sqlx::Transaction<'_, DB>>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
{
    Ok(match backend {
        // Owned: a `&'static str` here makes the future's `Send` unprovable.
        Backend::Sqlite => conn.begin_with(sqlx::AssertSqlSafe(String::from("BEGIN IMMEDIATE"))).await?,
        Backend::Postgres => {
            let mut tx = conn.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_LOCK_KEY).execute(&mut *tx).await?;
            tx
        }
    })
}

async fn record<DB>(tx: &mut sqlx::Transaction<'_, DB>, version: i64) -> Result<()>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
{
    sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
        .bind(version)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_are_numbered_in_order_and_dialects_agree() {
        for s in [&SITE_SQLITE, &SITE_POSTGRES, &AGENT] {
            assert_eq!(s.migrations[0].version, 1, "{}", s.what);
            for w in s.migrations.windows(2) {
                assert!(w[0].version < w[1].version, "{} migration {} after {}", s.what, w[1].name, w[0].name);
            }
        }
        let names = |s: &Schema| s.migrations.iter().map(|m| (m.version, m.name)).collect::<Vec<_>>();
        assert_eq!(names(&SITE_SQLITE), names(&SITE_POSTGRES));
    }
}
