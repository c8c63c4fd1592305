//! Source versions: committing a manifest as the next version (and re-targeting every
//! distribution of the package at it), reading versions back, pruning old ones.
//!
//! A manifest is stored once per (package, content root), in `manifests`, with the scan
//! cache that goes with it; versions name it by their content root. Versions with the same
//! content (unchanged refreshes, rollbacks) share one row, and pruning drops a manifest
//! once no version of its package names its root.

use dpsync_hash::ContentRoot;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::decode;
use crate::error::{Result, StoreError};
use crate::packages::{Lock, lock_package, normalize_id};
use crate::{NewVersion, Store, VersionRecord, VersionStats, VersionSummary, now_ms};

macro_rules! summary_columns {
    () => {
        "package_id, version, content_root, files, dirs, symlinks, total_bytes, files_added, \
         files_changed, files_removed, files_unchanged, bytes_hashed, origin, created_at, signature"
    };
}

/// The summary columns of `versions v` joined with the blobs of its manifest row `m` (a
/// version whose manifest row is missing comes out as a corrupt row, never as no version).
macro_rules! record_select {
    () => {
        "SELECT v.package_id, v.version, v.content_root, v.files, v.dirs, v.symlinks, v.total_bytes, \
           v.files_added, v.files_changed, v.files_removed, v.files_unchanged, v.bytes_hashed, v.origin, \
           v.created_at, v.signature, m.manifest, m.scan_cache \
         FROM versions v LEFT JOIN manifests m ON m.package_id = v.package_id AND m.content_root = v.content_root"
    };
}

fn summary_from_row(row: &AnyRow) -> Result<VersionSummary> {
    let package_id: String = row.try_get("package_id")?;
    let version: i64 = row.try_get("version")?;
    let root: String = row.try_get("content_root")?;
    let content_root = decode::content_root("versions", || format!("package {package_id} version {version}"), &root)?;
    Ok(VersionSummary {
        package_id,
        version,
        content_root,
        stats: VersionStats {
            files: row.try_get("files")?,
            dirs: row.try_get("dirs")?,
            symlinks: row.try_get("symlinks")?,
            total_bytes: row.try_get("total_bytes")?,
            files_added: row.try_get("files_added")?,
            files_changed: row.try_get("files_changed")?,
            files_removed: row.try_get("files_removed")?,
            files_unchanged: row.try_get("files_unchanged")?,
            bytes_hashed: row.try_get("bytes_hashed")?,
        },
        origin: row.try_get("origin")?,
        created_at: row.try_get("created_at")?,
        signature: row.try_get("signature")?,
    })
}

fn record_from_row(row: &AnyRow) -> Result<VersionRecord> {
    let summary = summary_from_row(row)?;
    let manifest: Option<Vec<u8>> = row.try_get("manifest")?;
    let scan_cache: Option<Vec<u8>> = row.try_get("scan_cache")?;
    match (manifest, scan_cache) {
        (Some(manifest), Some(scan_cache)) => Ok(VersionRecord { summary, manifest, scan_cache }),
        _ => Err(StoreError::CorruptRow {
            table: "manifests",
            key: format!("package {} content root {}", summary.package_id, summary.content_root.to_hex()),
            detail: format!("missing, although version {} names it", summary.version),
        }),
    }
}

impl Store {
    /// Commits `new` as the package's next source version, in one transaction:
    ///
    /// 1. the version is `current_version + 1`, or `new.version` if given, which must be
    ///    greater than the current version (else [`StoreError::VersionNotNewer`]);
    /// 2. `packages.current_version` is set to it and the version row inserted;
    /// 3. every distribution of the package that is not being or has not been removed is
    ///    re-targeted: `desired_version` = the new version, action `install`, state `pending`,
    ///    attempts 0, due now, error cleared, `bytes_sent_last` 0. A row that is
    ///    `in_progress` stays `in_progress` (it is never handed to a second worker); its
    ///    [`finish`](Store::finish) then sees the job was superseded and puts it back to
    ///    `pending` for the new version.
    ///
    /// On PostgreSQL the package row is locked, so concurrent commits serialize and version
    /// numbers never repeat. If the call fails nothing changes.
    ///
    /// The manifest is stored once per (package, content root): given bytes are inserted
    /// unless that content root's row exists (same root, same bytes); `None` requires the
    /// row, so an unchanged refresh writes one version row and no manifest.
    pub async fn commit_version(&self, package_id: &str, new: NewVersion) -> Result<VersionSummary> {
        let id = normalize_id(package_id);
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let current = lock_package(self, &mut tx, &id, Lock::Update).await?;
        let version = match new.version {
            None => current + 1,
            Some(v) if v > current => v,
            Some(v) => {
                return Err(StoreError::VersionNotNewer { package: id, current, offered: v });
            }
        };

        let root = new.content_root.to_hex();
        match (&new.manifest, &new.scan_cache) {
            (Some(manifest), cache) => {
                sqlx::query(
                    "INSERT INTO manifests (package_id, content_root, manifest, scan_cache) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (package_id, content_root) DO NOTHING",
                )
                .bind(&id)
                .bind(&root)
                .bind(manifest)
                .bind(cache.as_deref().unwrap_or_default())
                .execute(&mut *tx)
                .await?;
                if let Some(cache) = cache {
                    set_cache(&mut tx, &id, &root, cache).await?;
                }
            }
            (None, Some(cache)) => {
                if !set_cache(&mut tx, &id, &root, cache).await? {
                    return Err(no_manifest(&id, &root));
                }
            }
            (None, None) => {
                let found = sqlx::query("SELECT 1 AS one FROM manifests WHERE package_id = $1 AND content_root = $2")
                    .bind(&id)
                    .bind(&root)
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_none() {
                    return Err(no_manifest(&id, &root));
                }
            }
        }
        sqlx::query("UPDATE packages SET current_version = $2 WHERE id = $1")
            .bind(&id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        let s = &new.stats;
        sqlx::query(concat!(
            "INSERT INTO versions (",
            summary_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        ))
        .bind(&id)
        .bind(version)
        .bind(&root)
        .bind(s.files)
        .bind(s.dirs)
        .bind(s.symlinks)
        .bind(s.total_bytes)
        .bind(s.files_added)
        .bind(s.files_changed)
        .bind(s.files_removed)
        .bind(s.files_unchanged)
        .bind(s.bytes_hashed)
        .bind(&new.origin)
        .bind(now)
        .bind(&new.signature)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE distributions SET desired_version = $2, action = 'install', \
               state = CASE WHEN state = 'in_progress' THEN 'in_progress' ELSE 'pending' END, \
               attempts = 0, next_attempt_at = $3, last_error = NULL, last_error_at = NULL, bytes_sent_last = 0, bytes_from_peers_last = 0, \
               generation = generation + 1, updated_at = $3 \
             WHERE package_id = $1 AND state NOT IN ('removing', 'removed') AND action <> 'remove'",
        )
        .bind(&id)
        .bind(version)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        Ok(VersionSummary {
            package_id: id,
            version,
            content_root: new.content_root,
            stats: new.stats,
            origin: new.origin,
            created_at: now,
            signature: new.signature,
        })
    }

    /// Replaces the scan cache kept with a retained version's manifest (shared by every
    /// version with its content root: a refresh that found the same content keeps the
    /// stats it read, so the next one need not read those files again). Returns whether
    /// the version was there.
    pub async fn set_scan_cache(&self, package_id: &str, version: i64, scan_cache: &[u8]) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE manifests SET scan_cache = $3 WHERE package_id = $1 AND content_root = \
               (SELECT v.content_root FROM versions v WHERE v.package_id = $1 AND v.version = $2)",
        )
        .bind(normalize_id(package_id))
        .bind(version)
        .bind(scan_cache)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// How many manifests the package stores (one per distinct content root of its
    /// retained versions).
    pub async fn manifest_count(&self, package_id: &str) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM manifests WHERE package_id = $1")
            .bind(normalize_id(package_id))
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// One version with its blobs, or `None` (also if pruned).
    pub async fn version(&self, package_id: &str, version: i64) -> Result<Option<VersionRecord>> {
        sqlx::query(concat!(record_select!(), " WHERE v.package_id = $1 AND v.version = $2"))
            .bind(normalize_id(package_id))
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(record_from_row)
            .transpose()
    }

    /// One version without its blobs, or `None` (also if pruned).
    pub async fn version_summary(&self, package_id: &str, version: i64) -> Result<Option<VersionSummary>> {
        sqlx::query(concat!("SELECT ", summary_columns!(), " FROM versions WHERE package_id = $1 AND version = $2"))
            .bind(normalize_id(package_id))
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(summary_from_row)
            .transpose()
    }

    /// The manifest blob of one version, or `None` (also if pruned).
    pub async fn version_manifest(&self, package_id: &str, version: i64) -> Result<Option<Vec<u8>>> {
        let id = normalize_id(package_id);
        let row = sqlx::query(
            "SELECT v.content_root, m.manifest FROM versions v LEFT JOIN manifests m \
               ON m.package_id = v.package_id AND m.content_root = v.content_root \
             WHERE v.package_id = $1 AND v.version = $2",
        )
        .bind(&id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        match row.try_get::<Option<Vec<u8>>, _>("manifest")? {
            Some(m) => Ok(Some(m)),
            None => Err(StoreError::CorruptRow {
                table: "manifests",
                key: format!("package {id} content root {}", row.try_get::<String, _>("content_root")?),
                detail: format!("missing, although version {version} names it"),
            }),
        }
    }

    /// The newest retained version of a package whose content root is `root`, if any: the
    /// base a manifest delta for a target holding that content can be computed from.
    pub async fn version_with_root(&self, package_id: &str, root: &ContentRoot) -> Result<Option<i64>> {
        let row = sqlx::query(
            "SELECT version FROM versions WHERE package_id = $1 AND content_root = $2 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(normalize_id(package_id))
        .bind(root.to_hex())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok(r.try_get("version")?)).transpose()
    }

    /// The retained versions of a package, ascending, without blobs. Empty if the package
    /// has no versions or does not exist.
    pub async fn versions(&self, package_id: &str) -> Result<Vec<VersionSummary>> {
        sqlx::query(concat!("SELECT ", summary_columns!(), " FROM versions WHERE package_id = $1 ORDER BY version"))
            .bind(normalize_id(package_id))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(summary_from_row)
            .collect()
    }

    /// The package's current version with its blobs, or `None` before the first commit.
    pub async fn latest_version(&self, package_id: &str) -> Result<Option<VersionRecord>> {
        sqlx::query(concat!(
            record_select!(),
            " WHERE v.package_id = $1 AND v.version = (SELECT current_version FROM packages WHERE id = $1)"
        ))
        .bind(normalize_id(package_id))
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(record_from_row)
        .transpose()
    }

    /// Deletes old version rows of a package, keeping the newest `keep_last` (at least 1),
    /// the current version, and any version a distribution is still to install (the
    /// `desired_version` of a row that is neither `removed` nor a removal: a removal sends
    /// no content, so a removal queued for a DP that is down does not pin the version the
    /// row named when it was asked). Returns how many rows were deleted. `NotFound` if the
    /// package does not exist.
    pub async fn prune_versions(&self, package_id: &str, keep_last: i64) -> Result<u64> {
        let id = normalize_id(package_id);
        let keep = keep_last.max(1);
        let mut tx = self.begin_write().await?;
        let current = lock_package(self, &mut tx, &id, Lock::Update).await?;
        let done = sqlx::query(
            "DELETE FROM versions WHERE package_id = $1 AND version <> $2 \
               AND version NOT IN (SELECT v.version FROM versions v WHERE v.package_id = $1 \
                                   ORDER BY v.version DESC LIMIT $3) \
               AND version NOT IN (SELECT d.desired_version FROM distributions d \
                                   WHERE d.package_id = $1 AND d.state NOT IN ('removing', 'removed') \
                                     AND d.action <> 'remove')",
        )
        .bind(&id)
        .bind(current)
        .bind(keep)
        .execute(&mut *tx)
        .await?;
        // The manifests no retained version names any more.
        sqlx::query(
            "DELETE FROM manifests WHERE package_id = $1 \
               AND content_root NOT IN (SELECT v.content_root FROM versions v WHERE v.package_id = $1)",
        )
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// The manifest blobs of every retained version of every package (each stored manifest
    /// once, ordered by package and content root), for the content library's
    /// mark-and-sweep: a file is live if any of these manifests names it.
    pub async fn live_file_hashes(&self) -> Result<Vec<Vec<u8>>> {
        sqlx::query("SELECT manifest FROM manifests ORDER BY package_id, content_root")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok(r.try_get("manifest")?))
            .collect()
    }
}

/// Replaces the scan cache of one manifest row; whether the row was there.
async fn set_cache(tx: &mut Transaction<'static, Any>, id: &str, root: &str, cache: &[u8]) -> Result<bool> {
    let done = sqlx::query("UPDATE manifests SET scan_cache = $3 WHERE package_id = $1 AND content_root = $2")
        .bind(id)
        .bind(root)
        .bind(cache)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() == 1)
}

fn no_manifest(id: &str, root: &str) -> StoreError {
    StoreError::NotFound(format!("the manifest of content root {root} in package {id} (commit it with its manifest)"))
}
