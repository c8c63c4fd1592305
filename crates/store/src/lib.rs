//! `dpsync-store`: the site's versioned manifest store.
//!
//! It holds packages, their source versions (each naming, by content root, one manifest row
//! holding the manifest and scan cache blobs, stored once per package and content root), targets (DPs and
//! child sites) and the durable distribution job queue, in SQLite (default) or PostgreSQL
//! through one `sqlx::AnyPool` code path. This crate owns all SQL of the project.
//!
//! * URLs: `sqlite:///abs/path.db`, `sqlite:relative.db` (the file and its directory are
//!   created if missing), `sqlite::memory:` (tests only), `postgres://user@host/db`.
//! * Timestamps are unix milliseconds (`i64`); manifests and scan caches are opaque byte
//!   blobs encoded by the caller; content roots are stored as lowercase hex text and handed
//!   out as [`ContentRoot`](dpsync_hash::ContentRoot). A stored value that does not decode is
//!   a [`StoreError::CorruptRow`] naming its table and row, never a row left out.
//! * Migrations (`migrations/{sqlite,postgres}/NNNN_*.sql`, embedded) run at [`Store::connect`]
//!   through the same runner as the agent database's; a database with a schema newer than this
//!   build is refused. A SQLite file is first checked with `PRAGMA quick_check`; a damaged
//!   one is refused ([`StoreError::Corrupt`]).
//! * Every multi-statement change is one transaction. On SQLite, write transactions start
//!   with `BEGIN IMMEDIATE` (writers queue on the 5 s busy timeout instead of failing on a lock
//!   upgrade); on PostgreSQL, rows are locked with `FOR UPDATE` / `FOR SHARE` /
//!   `SKIP LOCKED`, so concurrent callers never see a half-done change or share a job.

pub mod agent;
mod decode;
mod distributions;
mod error;
mod integrity;
mod migrate;
mod nodes;
mod observe;
mod packages;
mod snapshot;
mod targets;
mod types;
mod versions;

use std::time::Duration;

use sqlx::Executor;
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Row, Transaction};

use crate::migrate::{SITE_POSTGRES, SITE_SQLITE};

pub use error::{Result, StoreError};
pub use nodes::{ClusterKey, ClusterLock, Lease, NodeRecord};
pub use observe::TargetSeries;
pub use snapshot::snapshot_sqlite_file;
pub use types::{
    Action, Backend, DistState, Distribution, NewTarget, NewVersion, Outcome, Package, PackageUpdate, PackageVersion,
    Priority, StateCount, Target, TargetHealth, TargetKind, TargetUpdate, ValidationSchedule, VersionRecord,
    VersionStats, VersionSummary,
};

/// Newest schema version this build knows (the highest migration number).
pub const SCHEMA_VERSION: i64 = SITE_SQLITE.latest();

/// Every site-store schema version this build applies, in order (what
/// `schema_migrations` holds once a database is up to date).
pub fn schema_versions() -> Vec<i64> {
    SITE_SQLITE.migrations.iter().map(|m| m.version).collect()
}

const SQLITE_POOL_SIZE: u32 = 4;
// Refreshes hold one connection for their cluster locks.
const POSTGRES_POOL_SIZE: u32 = 10;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Handle to the store: a connection pool. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens the database at `url`, creating a SQLite file if missing, and applies pending
    /// migrations.
    ///
    /// Accepted: `sqlite:///abs/path.db`, `sqlite:relative/path.db`, `sqlite::memory:`,
    /// `postgres://…` / `postgresql://…` (any libpq-style query parameters sqlx accepts,
    /// e.g. `?options=-c%20search_path%3Dmyschema`).
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = backend_of(url)?;
        let pool = match backend {
            Backend::Sqlite => connect_sqlite(url).await?,
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(POSTGRES_POOL_SIZE)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect(url)
                    .await?
            }
        };
        let schema = match backend {
            Backend::Sqlite => &SITE_SQLITE,
            Backend::Postgres => &SITE_POSTGRES,
        };
        let migrated = async {
            let mut conn = pool.acquire().await?;
            migrate::run::<Any>(&mut conn, schema).await
        }
        .await;
        if let Err(e) = migrated {
            pool.close().await;
            return Err(e);
        }
        Ok(Store { pool, backend })
    }

    /// Which engine this store uses.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool, waiting for checked-out connections to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Reads a value of the site's key/value settings (site code, site name, …).
    pub async fn meta_get(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1").bind(key).fetch_optional(&self.pool).await?;
        Ok(match row {
            Some(r) => Some(r.try_get("value")?),
            None => None,
        })
    }

    /// Sets (inserts or replaces) a value of the site's key/value settings.
    pub async fn meta_set(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`) so that a read-then-write transaction cannot fail on lock upgrade
    /// and concurrent writers wait on the busy timeout instead.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }
}

/// Current time in unix milliseconds.
/// Unix milliseconds now: the unit of every timestamp dpsync stores.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Unix nanoseconds now (scan caches compare file times at this precision).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn backend_of(url: &str) -> Result<Backend> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(StoreError::InvalidInput(format!(
            "unsupported database URL {:?}: expected sqlite:///abs/path.db, sqlite:relative.db \
             or postgres://user@host/db",
            redact_url(url)
        )))
    }
}

/// The URL without a password, for error messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Makes a SQLite database and its companion files (`-wal`, `-shm`, `-journal`) readable
/// by their owner only, whatever the umask: the database is created here with mode 0600
/// before SQLite opens it (SQLite gives its companion files the database's mode), and
/// files an older version left looser are tightened (logged by the caller's tracing).
pub fn secure_sqlite_files(db: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |what: &std::path::Path, e: std::io::Error| {
        StoreError::InvalidInput(format!("cannot make {} private (mode 0600): {e}", what.display()))
    };
    if let Err(e) = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(db)
        && e.kind() != std::io::ErrorKind::AlreadyExists
    {
        return Err(err(db, e));
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let file = std::path::PathBuf::from(name);
        match std::fs::symlink_metadata(&file) {
            Ok(md) if md.is_file() && md.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(|e| err(&file, e))?;
                tracing::warn!(file = %file.display(), "the database file was readable by others; made it 0600");
            }
            _ => {}
        }
    }
    Ok(())
}

async fn connect_sqlite(url: &str) -> Result<AnyPool> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let (path, params) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(StoreError::InvalidInput(format!("SQLite URL {url:?} names no file")));
    }
    let memory = path == ":memory:" || params.is_some_and(|q| q.contains("mode=memory"));
    let mut url = url.to_string();
    if !memory {
        if !params.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("mode="))) {
            url.push(if params.is_some() { '&' } else { '?' });
            url.push_str("mode=rwc");
        }
        if let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::InvalidInput(format!(
                    "cannot create the directory {} for SQLite database {path}: {e}",
                    dir.display()
                ))
            })?;
        }
        secure_sqlite_files(std::path::Path::new(path))?;
        // Switch the file to WAL once, alone, before the pool opens connections concurrently
        // (changing the journal mode needs an exclusive lock that the busy handler does not
        // wait for). The mode is persistent in the file.
        // Check the file before anything runs on it.
        let file = std::path::Path::new(path);
        let damaged = integrity::on_open(file, integrity::SITE_REMEDY);
        let mut conn = AnyConnection::connect(&url).await.map_err(&damaged)?;
        conn.execute("PRAGMA journal_mode = WAL").await.map_err(&damaged)?;
        let rows = sqlx::query(integrity::QUICK_CHECK).fetch_all(&mut conn).await.map_err(&damaged)?;
        let rows = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<std::result::Result<Vec<_>, _>>()?;
        conn.close().await?;
        integrity::verdict(rows, file, integrity::SITE_REMEDY)?;
    }

    let mut opts = AnyPoolOptions::new()
        .max_connections(if memory { 1 } else { SQLITE_POOL_SIZE })
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                conn.execute("PRAGMA busy_timeout = 5000").await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                if !memory {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                }
                Ok(())
            })
        });
    if memory {
        // An in-memory database lives as long as its last connection.
        opts = opts.min_connections(1).idle_timeout(None).max_lifetime(None);
    }
    Ok(opts.connect(&url).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_detection() {
        assert_eq!(backend_of("sqlite:///a/b.db").unwrap(), Backend::Sqlite);
        assert_eq!(backend_of("sqlite:b.db").unwrap(), Backend::Sqlite);
        assert_eq!(backend_of("postgres://u@h/db").unwrap(), Backend::Postgres);
        let e = backend_of("mysql://u:secret@h/db").unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
