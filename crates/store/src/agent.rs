//! The DP agent's local state (SQLite only: it describes one machine's disk): installed
//! versions per package, staged manifests and received chunks awaiting a commit, and
//! the chunk index that lets a new file be built from chunks of any installed file.
//!
//! The schema (`migrations/agent/`) is brought up to date at [`AgentDb::open`] by the same
//! runner as the site store's.
//!
//! Ids are stored as raw 32-byte blobs (chunk ids, file hashes) or lowercase hex text
//! (content roots) and handed out typed; a row that does not decode is a
//! [`StoreError::CorruptRow`] naming its table and key.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use dpsync_hash::{ChunkId, ContentRoot, FileHash};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::decode::{self, blob_key};
use crate::migrate::{self, AGENT};
use crate::{Result, StoreError, integrity, now_ms};

/// Newest schema version of the agent database this build knows.
pub const SCHEMA_VERSION: i64 = AGENT.latest();

/// One installed (or previously installed) package on this DP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstalledPackage {
    pub id: String,
    pub installed_version: Option<i64>,
    pub installed_root: Option<ContentRoot>,
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
    pub content_root: ContentRoot,
    pub manifest: Vec<u8>,
    pub force: bool,
    /// The owning site's signature (hex).
    pub signature: Option<String>,
}

/// Where a chunk of installed content can be read: a row of the chunk index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    pub chunk: ChunkId,
    /// The library object (whole file) holding the chunk.
    pub file: FileHash,
    pub offset: u64,
    pub len: u32,
}

/// A verified chunk kept for a package in a staging pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedChunk {
    pub chunk: ChunkId,
    /// The pack's file name in the package's staging folder.
    pub pack: String,
    pub offset: u64,
    pub len: u32,
}

/// A chunk written to a pack, at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedChunk {
    pub chunk: ChunkId,
    pub offset: u64,
    pub len: u32,
}

/// The chunks written to one pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackRows {
    /// The pack's file name in the package's staging folder.
    pub pack: String,
    pub chunks: Vec<PackedChunk>,
}

/// Handle to the agent database.
#[derive(Debug, Clone)]
pub struct AgentDb {
    pool: SqlitePool,
}

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
        let migrated = async {
            let mut conn = pool.acquire().await?;
            migrate::run::<sqlx::Sqlite>(&mut conn, &AGENT).await
        }
        .await;
        if let Err(e) = migrated {
            pool.close().await;
            return Err(match e {
                StoreError::Migration(m) => StoreError::Migration(format!("{}: {m}", path.display())),
                e => e,
            });
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
        row.map(|r| {
            let id: String = r.try_get(0)?;
            let installed_root = r
                .try_get::<Option<String>, _>(2)?
                .map(|hex| decode::content_root("packages", || format!("package {id}"), &hex))
                .transpose()?;
            Ok(InstalledPackage {
                installed_version: r.try_get(1)?,
                installed_root,
                installed_dir: r.try_get(3)?,
                previous_version: r.try_get(4)?,
                previous_dir: r.try_get(5)?,
                broken: r.try_get::<i64, _>(6)? != 0,
                installed_manifest: if manifests { r.try_get(7)? } else { None },
                previous_manifest: if manifests { r.try_get(8)? } else { None },
                id,
            })
        })
        .transpose()
    }

    /// The manifest blob of the previous version, if any.
    pub async fn previous_manifest(&self, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT previous_manifest FROM packages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .flatten())
    }

    /// Every package row, without the manifest blobs ([`AgentDb::package_summary`]).
    pub async fn package_summaries(&self) -> Result<Vec<InstalledPackage>> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM packages ORDER BY id").fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(p) = self.package_summary(&id).await? {
                out.push(p);
            }
        }
        Ok(out)
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
    pub async fn record_install(
        &self,
        id: &str,
        version: i64,
        root: &ContentRoot,
        dir: &str,
        manifest: &[u8],
    ) -> Result<()> {
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
        .bind(root.to_hex())
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

    /// Records the outcome of a validation of the installed version of `id`.
    pub async fn record_validation(&self, id: &str, at_ms: i64, ok: bool) -> Result<()> {
        sqlx::query("UPDATE packages SET validated_at = $2, validation_ok = $3 WHERE id = $1")
            .bind(id)
            .bind(at_ms)
            .bind(ok as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The last validation of every package validated since its row was created: (unix
    /// milliseconds, every file matched), by package id.
    pub async fn validations(&self) -> Result<std::collections::HashMap<String, (i64, bool)>> {
        let rows = sqlx::query(
            "SELECT id, validated_at, validation_ok FROM packages WHERE validated_at IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let ok: Option<i64> = row.try_get("validation_ok")?;
            out.insert(row.try_get("id")?, (row.try_get("validated_at")?, ok == Some(1)));
        }
        Ok(out)
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

    /// Stages a manifest (taken by value: its blob, several MB for a large tree, is
    /// handed to SQLite without a copy).
    pub async fn stage(&self, s: Staged) -> Result<()> {
        sqlx::query(
            "INSERT INTO staged (package, version, content_root, manifest, force, created_at, signature)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (package, version) DO UPDATE SET content_root = excluded.content_root,
               manifest = excluded.manifest, force = excluded.force, signature = excluded.signature",
        )
        .bind(&s.package)
        .bind(s.version)
        .bind(s.content_root.to_hex())
        .bind(s.manifest)
        .bind(s.force as i64)
        .bind(now_ms())
        .bind(s.signature)
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
        row.map(|r| {
            let root: String = r.try_get(0)?;
            Ok(Staged {
                package: package.to_owned(),
                version,
                content_root: decode::content_root("staged", || format!("package {package} version {version}"), &root)?,
                manifest: r.try_get(1)?,
                force: r.try_get::<i64, _>(2)? != 0,
                signature: r.try_get(3)?,
            })
        })
        .transpose()
    }

    pub async fn latest_staged_version(&self, package: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar("SELECT MAX(version) FROM staged WHERE package = $1")
            .bind(package)
            .fetch_one(&self.pool)
            .await?)
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
        index: &[ChunkLocation],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for rows in staged {
            insert_staged(&mut tx, package, &rows.pack, &rows.chunks).await?;
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
    pub async fn staged_chunk_ids(&self, package: &str) -> Result<Vec<ChunkId>> {
        let ids: Vec<Vec<u8>> = sqlx::query_scalar("SELECT chunk_id FROM staged_chunks WHERE package = $1")
            .bind(package)
            .fetch_all(&self.pool)
            .await?;
        ids.iter().map(|id| decode::chunk_id("staged_chunks", || staged_key(package, id), id)).collect()
    }

    /// Every chunk staged for a package.
    pub async fn staged_chunks(&self, package: &str) -> Result<Vec<StagedChunk>> {
        let rows = sqlx::query("SELECT chunk_id, pack, offset, len FROM staged_chunks WHERE package = $1")
            .bind(package)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let id: Vec<u8> = r.try_get(0)?;
                let key = || staged_key(package, &id);
                Ok(StagedChunk {
                    chunk: decode::chunk_id("staged_chunks", key, &id)?,
                    pack: r.try_get(1)?,
                    offset: decode::offset("staged_chunks", key, r.try_get(2)?)?,
                    len: decode::len("staged_chunks", key, r.try_get(3)?)?,
                })
            })
            .collect()
    }

    /// Of `ids`, those the chunk index knows, with every file they are in (in batches).
    pub async fn indexed_chunks(&self, ids: &[ChunkId]) -> Result<Vec<ChunkLocation>> {
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
                q = q.bind(id.as_bytes().as_slice());
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push(location_from_row(&r)?);
            }
        }
        Ok(out)
    }

    pub async fn forget_staged_chunk(&self, package: &str, id: &ChunkId) -> Result<()> {
        sqlx::query("DELETE FROM staged_chunks WHERE package = $1 AND chunk_id = $2")
            .bind(package)
            .bind(id.as_bytes().as_slice())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Indexes every chunk of installed files.
    pub async fn index_chunks(&self, rows: &[ChunkLocation]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_index(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Drops index entries that point into a removed or corrupt object.
    pub async fn unindex_file(&self, file_hash: &FileHash) -> Result<()> {
        sqlx::query("DELETE FROM chunk_index WHERE file_hash = $1")
            .bind(file_hash.as_bytes().as_slice())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn staged_key(package: &str, chunk_id: &[u8]) -> String {
    format!("package {package}, {}", blob_key("chunk_id", chunk_id))
}

fn location_from_row(r: &SqliteRow) -> Result<ChunkLocation> {
    let id: Vec<u8> = r.try_get(0)?;
    let key = || blob_key("chunk_id", &id);
    let file: Vec<u8> = r.try_get(1)?;
    Ok(ChunkLocation {
        chunk: decode::chunk_id("chunk_index", key, &id)?,
        file: decode::file_hash("chunk_index", key, &file)?,
        offset: decode::offset("chunk_index", key, r.try_get(2)?)?,
        len: decode::len("chunk_index", key, r.try_get(3)?)?,
    })
}

/// 150 rows (750 parameters) per statement: far fewer round trips than one each.
async fn insert_staged(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    package: &str,
    pack: &str,
    rows: &[PackedChunk],
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
        for c in batch {
            q = q.bind(c.chunk.as_bytes().as_slice()).bind(decode::offset_to_i64(c.offset)?).bind(i64::from(c.len));
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// 200 rows (800 parameters) per statement.
async fn insert_index(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, rows: &[ChunkLocation]) -> Result<()> {
    for batch in rows.chunks(200) {
        let values: Vec<String> = (0..batch.len())
            .map(|i| format!("(${}, ${}, ${}, ${})", 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4))
            .collect();
        let sql = format!(
            "INSERT INTO chunk_index (chunk_id, file_hash, offset, len) VALUES {} ON CONFLICT (chunk_id, file_hash) DO NOTHING",
            values.join(",")
        );
        // Only generated placeholders are interpolated; values are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for c in batch {
            q = q
                .bind(c.chunk.as_bytes().as_slice())
                .bind(c.file.as_bytes().as_slice())
                .bind(decode::offset_to_i64(c.offset)?)
                .bind(i64::from(c.len));
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}
