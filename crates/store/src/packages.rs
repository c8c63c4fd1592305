//! Packages: id allocation (site code + 5 hex digits from a per-site counter), foreign
//! packages received from a parent site, lookups.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::error::{Result, StoreError, is_unique_violation};
use crate::{Backend, Package, PackageVersion, Store, now_ms};

/// Highest package number that fits in 5 hex digits.
const MAX_PACKAGE_SEQ: i64 = 0xF_FFFF;

macro_rules! package_columns {
    () => {
        "id, name, source_path, source_site, current_version, created_at"
    };
}

pub(crate) fn package_from_row(row: &AnyRow) -> Result<Package> {
    Ok(Package {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        source_path: row.try_get("source_path")?,
        source_site: row.try_get("source_site")?,
        current_version: row.try_get("current_version")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Package ids are stored uppercase; lookups by id are case-insensitive.
pub(crate) fn normalize_id(id: &str) -> String {
    id.trim().to_ascii_uppercase()
}

fn check_site_code(site_code: &str) -> Result<String> {
    let code = site_code.trim().to_ascii_uppercase();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(StoreError::InvalidInput(format!("site code {site_code:?} must be 3 letters or digits, e.g. PS1")));
    }
    Ok(code)
}

fn check_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(StoreError::InvalidInput("package name is empty".into()));
    }
    Ok(())
}

/// How [`lock_package`] locks the package row on PostgreSQL.
#[derive(Clone, Copy)]
pub(crate) enum Lock {
    /// `FOR UPDATE`: the caller changes `current_version`.
    Update,
    /// `FOR SHARE`: the caller reads `current_version` and must not race a commit.
    Share,
}

/// Reads `current_version` of a package inside `tx`, locking its row on PostgreSQL
/// (SQLite write transactions are already exclusive). `NotFound` if it does not exist.
pub(crate) async fn lock_package(
    store: &Store,
    tx: &mut Transaction<'static, Any>,
    id: &str,
    lock: Lock,
) -> Result<i64> {
    let sql = match (store.backend, lock) {
        (Backend::Sqlite, _) => "SELECT current_version FROM packages WHERE id = $1",
        (Backend::Postgres, Lock::Update) => "SELECT current_version FROM packages WHERE id = $1 FOR UPDATE",
        (Backend::Postgres, Lock::Share) => "SELECT current_version FROM packages WHERE id = $1 FOR SHARE",
    };
    let row = sqlx::query(sql)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("package {id}")))?;
    Ok(row.try_get("current_version")?)
}

impl Store {
    /// Creates a local package with the next id of `site_code` (e.g. `PS1` → `PS100001`,
    /// `PS100002`, …). `Conflict` if `name` is taken.
    pub async fn create_package(&self, site_code: &str, name: &str, source_path: &str) -> Result<Package> {
        let site = check_site_code(site_code)?;
        check_name(name)?;
        let mut tx = self.begin_write().await?;

        if let Some(row) =
            sqlx::query("SELECT id FROM packages WHERE name = $1").bind(name).fetch_optional(&mut *tx).await?
        {
            let id: String = row.try_get("id")?;
            return Err(StoreError::Conflict(format!("package name {name:?} is already taken by package {id}")));
        }

        let seq: i64 = sqlx::query(
            "INSERT INTO counters (name, value) VALUES ($1, 1) \
             ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 \
             RETURNING value",
        )
        .bind(format!("package_seq:{site}"))
        .fetch_one(&mut *tx)
        .await?
        .try_get("value")?;
        if seq > MAX_PACKAGE_SEQ {
            return Err(StoreError::InvalidInput(format!("site {site} has used all {MAX_PACKAGE_SEQ} package ids")));
        }
        let pkg = Package {
            id: format!("{site}{seq:05X}"),
            name: name.to_string(),
            source_path: Some(source_path.to_string()),
            source_site: site,
            current_version: 0,
            created_at: now_ms(),
        };
        insert_package(&mut tx, &pkg).await?;
        tx.commit().await?;
        Ok(pkg)
    }

    /// Records a package owned by a parent site (no source path here). Idempotent: if `id`
    /// exists with the same source site it is returned (renamed to `name` if the parent
    /// renamed it). `Conflict` if the id belongs to another source site or the name is taken.
    pub async fn insert_foreign_package(&self, id: &str, name: &str, source_site: &str) -> Result<Package> {
        let id = normalize_id(id);
        let source_site = check_site_code(source_site)?;
        check_name(name)?;
        if id.len() != 8
            || !id.is_ascii()
            || !id[..3].bytes().all(|b| b.is_ascii_alphanumeric())
            || !id[3..].bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(StoreError::InvalidInput(format!(
                "package id {id:?} is not a site code followed by 5 hex digits"
            )));
        }
        let mut tx = self.begin_write().await?;

        let existing = sqlx::query(concat!("SELECT ", package_columns!(), " FROM packages WHERE id = $1"))
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = existing {
            let mut pkg = package_from_row(&row)?;
            if pkg.source_site != source_site || pkg.source_path.is_some() {
                return Err(StoreError::Conflict(format!(
                    "package {id} already exists here as a package of site {}{}, \
                     not as a package received from site {source_site}",
                    pkg.source_site,
                    if pkg.source_path.is_some() { " with a local source path" } else { "" }
                )));
            }
            if pkg.name != name {
                sqlx::query("UPDATE packages SET name = $2 WHERE id = $1")
                    .bind(&id)
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| name_conflict(e, name, &id))?;
                pkg.name = name.to_string();
            }
            tx.commit().await?;
            return Ok(pkg);
        }

        if let Some(row) =
            sqlx::query("SELECT id FROM packages WHERE name = $1").bind(name).fetch_optional(&mut *tx).await?
        {
            let other: String = row.try_get("id")?;
            return Err(StoreError::Conflict(format!(
                "cannot add package {id} from site {source_site}: \
                 package name {name:?} is already taken by package {other}"
            )));
        }
        let pkg = Package {
            id,
            name: name.to_string(),
            source_path: None,
            source_site,
            current_version: 0,
            created_at: now_ms(),
        };
        insert_package(&mut tx, &pkg).await?;
        tx.commit().await?;
        Ok(pkg)
    }

    /// Looks a package up by id (case-insensitive) first, then by exact name.
    pub async fn package(&self, id_or_name: &str) -> Result<Option<Package>> {
        let by_id = sqlx::query(concat!("SELECT ", package_columns!(), " FROM packages WHERE id = $1"))
            .bind(normalize_id(id_or_name))
            .fetch_optional(&self.pool)
            .await?;
        let row = match by_id {
            Some(r) => Some(r),
            None => {
                sqlx::query(concat!("SELECT ", package_columns!(), " FROM packages WHERE name = $1"))
                    .bind(id_or_name)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        row.as_ref().map(package_from_row).transpose()
    }

    /// All packages, ordered by id.
    pub async fn packages(&self) -> Result<Vec<Package>> {
        sqlx::query(concat!("SELECT ", package_columns!(), " FROM packages ORDER BY id"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(package_from_row)
            .collect()
    }

    /// Every package's id and current source version, ordered by id: what metrics need,
    /// without the rest of each row.
    pub async fn package_versions(&self) -> Result<Vec<PackageVersion>> {
        sqlx::query("SELECT id, current_version FROM packages ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| Ok(PackageVersion { id: row.try_get("id")?, current_version: row.try_get("current_version")? }))
            .collect()
    }

    /// Changes the source folder of a package. `NotFound` if it does not exist.
    pub async fn set_source_path(&self, id: &str, path: &str) -> Result<()> {
        let id = normalize_id(id);
        let done = sqlx::query("UPDATE packages SET source_path = $2 WHERE id = $1")
            .bind(&id)
            .bind(path)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("package {id}")));
        }
        Ok(())
    }
}

async fn insert_package(tx: &mut Transaction<'static, Any>, pkg: &Package) -> Result<()> {
    sqlx::query(
        "INSERT INTO packages (id, name, source_path, source_site, current_version, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&pkg.id)
    .bind(&pkg.name)
    .bind(&pkg.source_path)
    .bind(&pkg.source_site)
    .bind(pkg.current_version)
    .bind(pkg.created_at)
    .execute(&mut **tx)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(format!("package id {} or package name {:?} is already taken", pkg.id, pkg.name))
        } else {
            e.into()
        }
    })?;
    Ok(())
}

fn name_conflict(e: sqlx::Error, name: &str, id: &str) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict(format!("cannot rename package {id}: package name {name:?} is already taken"))
    } else {
        e.into()
    }
}
