//! The DP agent's local state (SQLite only: it describes one machine's disk): installed
//! versions per package, staged manifests and received chunks awaiting a commit, and
//! the chunk index that lets a new file be built from chunks of any installed file.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::{Result, StoreError, integrity};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/agent/0001_init.sql")),
    (2, include_str!("../../../migrations/agent/0002_signature.sql")),
];

/// One installed (or previously installed) package on this DP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstalledPackage {
    pub id: String,
    pub installed_version: Option<i64>,
    pub installed_root: Option<String>,
    pub installed_dir: Option<String>,
    pub installed_manifest: Option<Vec<u8>>,
    pub previous_version: Option<i64>,
    pub previous_dir: Option<String>,
    pub previous_manifest: Option<Vec<u8>>,
    pub broken: bool,
}

/// A manifest waiting for its chunks and a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub package: String,
    pub version: i64,
    pub content_root: String,
    pub manifest: Vec<u8>,
    pub force: bool,
    /// The owning site's signature (hex).
    pub signature: Option<String>,
}

/// Where a chunk can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkSource {
    /// In a pack file under the package's staging directory.
    Pack { pack: String, offset: i64, len: i64 },
    /// Inside a library object.
    Object { file_hash: Vec<u8>, offset: i64, len: i64 },
}

/// Chunks written to one pack: `(pack, [(chunk, offset, len)])`.
pub type PackRows = (String, Vec<(Vec<u8>, i64, i64)>);

/// Handle to the agent database.
#[derive(Debug, Clone)]
pub struct AgentDb {
    pool: SqlitePool,
}

use crate::now_ms;

impl AgentDb {
    /// Opens (creating) the database file, checks its integrity (`PRAGMA quick_check`: a
    /// damaged file is [`StoreError::Corrupt`]) and applies migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        crate::secure_sqlite_files(path)?;
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let damaged = integrity::on_open(path, integrity::AGENT_REMEDY);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await.map_err(&damaged)?;
        let checked = match sqlx::query(integrity::QUICK_CHECK).fetch_all(&pool).await {
            Ok(rows) => rows
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(StoreError::from)
                .and_then(|rows| integrity::verdict(rows, path, integrity::AGENT_REMEDY)),
            Err(e) => Err(damaged(e)),
        };
        if let Err(e) = checked {
            pool.close().await;
            return Err(e);
        }
        let current: i64 = sqlx::query("PRAGMA user_version").fetch_one(&pool).await?.get(0);
        let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > latest {
            return Err(StoreError::Migration(format!(
                "agent database {} is at schema {current}, newer than this build ({latest}); upgrade dpsync",
                path.display()
            )));
        }
        for (v, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            let mut tx = pool.begin().await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql)).execute(&mut *tx).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PRAGMA user_version = {v}"))).execute(&mut *tx).await?;
            tx.commit().await?;
        }
        Ok(Self { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn package(&self, id: &str) -> Result<Option<InstalledPackage>> {
        self.package_row(id, true).await
    }

    /// Like [`AgentDb::package`] without the two manifest blobs (several MB each for
    /// large trees): what most calls need.
    pub async fn package_summary(&self, id: &str) -> Result<Option<InstalledPackage>> {
        self.package_row(id, false).await
    }

    async fn package_row(&self, id: &str, manifests: bool) -> Result<Option<InstalledPackage>> {
        let sql = if manifests {
            "SELECT id, installed_version, installed_root, installed_dir, previous_version, previous_dir, broken,
                    installed_manifest, previous_manifest
             FROM packages WHERE id = $1"
        } else {
            "SELECT id, installed_version, installed_root, installed_dir, previous_version, previous_dir, broken
             FROM packages WHERE id = $1"
        };
        let row = sqlx::query(sql).bind(id).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| InstalledPackage {
            id: r.get(0),
            installed_version: r.get(1),
            installed_root: r.get(2),
            installed_dir: r.get(3),
            previous_version: r.get(4),
            previous_dir: r.get(5),
            broken: r.get::<i64, _>(6) != 0,
            installed_manifest: if manifests { r.get(7) } else { None },
            previous_manifest: if manifests { r.get(8) } else { None },
        }))
    }

    /// The manifest blob of the previous version, if any.
    pub async fn previous_manifest(&self, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT previous_manifest FROM packages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .flatten())
    }

    /// Every package with an installed version.
    pub async fn packages(&self) -> Result<Vec<InstalledPackage>> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM packages ORDER BY id").fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(p) = self.package(&id).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Records a new installed version; the old one becomes the previous one.
    pub async fn record_install(&self, id: &str, version: i64, root: &str, dir: &str, manifest: &[u8]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO packages (id, installed_version, installed_root, installed_dir, installed_manifest, broken, updated_at)
             VALUES ($1, $2, $3, $4, $5, 0, $6)
             ON CONFLICT (id) DO UPDATE SET
               previous_version = CASE WHEN packages.installed_dir = excluded.installed_dir THEN packages.previous_version ELSE packages.installed_version END,
               previous_dir = CASE WHEN packages.installed_dir = excluded.installed_dir THEN packages.previous_dir ELSE packages.installed_dir END,
               previous_manifest = CASE WHEN packages.installed_dir = excluded.installed_dir THEN packages.previous_manifest ELSE packages.installed_manifest END,
               installed_version = excluded.installed_version,
               installed_root = excluded.installed_root,
               installed_dir = excluded.installed_dir,
               installed_manifest = excluded.installed_manifest,
               broken = 0,
               updated_at = excluded.updated_at",
        )
        .bind(id)
        .bind(version)
        .bind(root)
        .bind(dir)
        .bind(manifest)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM staged WHERE package = $1 AND version <= $2")
            .bind(id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM staged_chunks WHERE package = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Gives the installed tree a new version number (same content root).
    pub async fn relabel(&self, id: &str, version: i64) -> Result<()> {
        sqlx::query("UPDATE packages SET installed_version = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(version)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_broken(&self, id: &str, broken: bool) -> Result<()> {
        sqlx::query("UPDATE packages SET broken = $2 WHERE id = $1")
            .bind(id)
            .bind(broken as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_package(&self, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM packages WHERE id = $1",
            "DELETE FROM staged WHERE package = $1",
            "DELETE FROM staged_chunks WHERE package = $1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets every staged manifest and chunk (a restored backup has no pack files);
    /// the sender offers those versions again. Installed versions and the chunk index stay.
    pub async fn forget_staged(&self) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for sql in ["DELETE FROM staged_chunks", "DELETE FROM staged"] {
            n += sqlx::query(sql).execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    pub async fn stage(&self, s: &Staged) -> Result<()> {
        sqlx::query(
            "INSERT INTO staged (package, version, content_root, manifest, force, created_at, signature)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (package, version) DO UPDATE SET content_root = excluded.content_root,
               manifest = excluded.manifest, force = excluded.force, signature = excluded.signature",
        )
        .bind(&s.package)
        .bind(s.version)
        .bind(&s.content_root)
        .bind(&s.manifest)
        .bind(s.force as i64)
        .bind(now_ms())
        .bind(&s.signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn staged(&self, package: &str, version: i64) -> Result<Option<Staged>> {
        let row = sqlx::query(
            "SELECT content_root, manifest, force, signature FROM staged WHERE package = $1 AND version = $2",
        )
        .bind(package)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Staged {
            package: package.to_owned(),
            version,
            content_root: r.get(0),
            manifest: r.get(1),
            force: r.get::<i64, _>(2) != 0,
            signature: r.get(3),
        }))
    }

    pub async fn latest_staged_version(&self, package: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar("SELECT MAX(version) FROM staged WHERE package = $1")
            .bind(package)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Records chunks written to `pack` (after the pack is durable).
    pub async fn add_staged_chunks(&self, package: &str, pack: &str, chunks: &[(Vec<u8>, i64, i64)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_staged(&mut tx, package, pack, chunks).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records one batch that was partly written into files as it arrived, in one
    /// transaction: chunks appended to packs (durable already), the packs of files
    /// adopted into the library (whose staged rows are forgotten), and the chunk index
    /// rows of those files.
    pub async fn record_arrivals(
        &self,
        package: &str,
        staged: &[PackRows],
        adopted_packs: &[String],
        index: &[(Vec<u8>, Vec<u8>, i64, i64)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (pack, rows) in staged {
            insert_staged(&mut tx, package, pack, rows).await?;
        }
        for pack in adopted_packs {
            sqlx::query("DELETE FROM staged_chunks WHERE package = $1 AND pack = $2")
                .bind(package)
                .bind(pack)
                .execute(&mut *tx)
                .await?;
        }
        insert_index(&mut tx, index).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ids of every chunk staged for a package.
    pub async fn staged_chunk_ids(&self, package: &str) -> Result<Vec<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT chunk_id FROM staged_chunks WHERE package = $1")
            .bind(package)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Every chunk staged for a package: `(chunk, pack, offset, len)`.
    pub async fn staged_chunks(&self, package: &str) -> Result<Vec<(Vec<u8>, String, i64, i64)>> {
        let rows = sqlx::query("SELECT chunk_id, pack, offset, len FROM staged_chunks WHERE package = $1")
            .bind(package)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
    }

    /// Of `ids`, those the chunk index knows: `(chunk, object, offset, len)`, in batches.
    pub async fn indexed_chunks(&self, ids: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>, i64, i64)>> {
        let mut out = Vec::new();
        for batch in ids.chunks(500) {
            let placeholders: Vec<String> = (1..=batch.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT chunk_id, file_hash, offset, len FROM chunk_index WHERE chunk_id IN ({})",
                placeholders.join(",")
            );
            // Only generated placeholders are interpolated; values are bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in batch {
                q = q.bind(id);
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push((r.get(0), r.get(1), r.get(2), r.get(3)));
            }
        }
        Ok(out)
    }

    /// Where to read a chunk for `package`: its staged pack first, then the index.
    pub async fn chunk_source(&self, package: &str, id: &[u8]) -> Result<Option<ChunkSource>> {
        if let Some(r) = sqlx::query("SELECT pack, offset, len FROM staged_chunks WHERE package = $1 AND chunk_id = $2")
            .bind(package)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        {
            return Ok(Some(ChunkSource::Pack { pack: r.get(0), offset: r.get(1), len: r.get(2) }));
        }
        let r = sqlx::query("SELECT file_hash, offset, len FROM chunk_index WHERE chunk_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.map(|r| ChunkSource::Object { file_hash: r.get(0), offset: r.get(1), len: r.get(2) }))
    }

    pub async fn forget_staged_chunk(&self, package: &str, id: &[u8]) -> Result<()> {
        sqlx::query("DELETE FROM staged_chunks WHERE package = $1 AND chunk_id = $2")
            .bind(package)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Indexes every chunk of installed files: `(chunk, file, offset, len)`.
    pub async fn index_chunks(&self, rows: &[(Vec<u8>, Vec<u8>, i64, i64)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_index(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Drops index entries that point into a removed or corrupt object.
    pub async fn unindex_file(&self, file_hash: &[u8]) -> Result<()> {
        sqlx::query("DELETE FROM chunk_index WHERE file_hash = $1").bind(file_hash).execute(&self.pool).await?;
        Ok(())
    }
}

/// 150 rows (750 parameters) per statement: far fewer round trips than one each.
async fn insert_staged(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    package: &str,
    pack: &str,
    rows: &[(Vec<u8>, i64, i64)],
) -> Result<()> {
    for batch in rows.chunks(150) {
        let values: Vec<String> =
            (0..batch.len()).map(|i| format!("($1, $2, ${}, ${}, ${})", 3 * i + 3, 3 * i + 4, 3 * i + 5)).collect();
        let sql = format!(
            "INSERT INTO staged_chunks (package, pack, chunk_id, offset, len) VALUES {}
             ON CONFLICT (package, chunk_id) DO UPDATE SET pack = excluded.pack, offset = excluded.offset, len = excluded.len",
            values.join(",")
        );
        // Only generated placeholders are interpolated; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(package).bind(pack);
        for (id, offset, len) in batch {
            q = q.bind(id).bind(offset).bind(len);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// 200 rows (800 parameters) per statement.
async fn insert_index(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    rows: &[(Vec<u8>, Vec<u8>, i64, i64)],
) -> Result<()> {
    for batch in rows.chunks(200) {
        let values: Vec<String> = (0..batch.len())
            .map(|i| format!("(${}, ${}, ${}, ${})", 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4))
            .collect();
        let sql = format!(
            "INSERT INTO chunk_index (chunk_id, file_hash, offset, len) VALUES {} ON CONFLICT (chunk_id) DO NOTHING",
            values.join(",")
        );
        // Only generated placeholders are interpolated; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, file, offset, len) in batch {
            q = q.bind(id).bind(file).bind(offset).bind(len);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}
