//! Packages: id allocation (site code + 5 hex digits from a per-site counter), foreign
//! packages received from a parent site, lookups.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::error::{Result, StoreError, is_unique_violation};
use crate::{Backend, Package, PackageUpdate, PackageVersion, Priority, Store, now_ms};

/// Highest package number that fits in 5 hex digits.
const MAX_PACKAGE_SEQ: i64 = 0xF_FFFF;

macro_rules! package_columns {
    () => {
        "id, name, source_path, source_site, current_version, created_at, priority, refresh_every_ms, \
         next_refresh_at, schedule_error, deleting_since, owner_chain"
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
        priority: Priority::from_rank(row.try_get("priority")?)?,
        refresh_every_ms: row.try_get("refresh_every_ms")?,
        next_refresh_at: row.try_get("next_refresh_at")?,
        schedule_error: row.try_get("schedule_error")?,
        deleting_since: row.try_get("deleting_since")?,
        owner_chain: row.try_get("owner_chain")?,
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
            priority: Priority::default(),
            refresh_every_ms: None,
            next_refresh_at: None,
            schedule_error: None,
            deleting_since: None,
            owner_chain: None,
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
            priority: Priority::default(),
            refresh_every_ms: None,
            next_refresh_at: None,
            schedule_error: None,
            deleting_since: None,
            owner_chain: None,
        };
        insert_package(&mut tx, &pkg).await?;
        tx.commit().await?;
        Ok(pkg)
    }

    /// Records that `package` now belongs to `owner`, with the ownership chain that says
    /// so (wire form). Unless it is `owned_here`, its source folder and refresh schedule
    /// go (a package this site relays has neither). `NotFound` if there is no such package.
    pub async fn set_package_owner(&self, package: &str, owner: &str, chain: &str, owned_here: bool) -> Result<()> {
        let owner = check_site_code(owner)?;
        let sql = if owned_here {
            "UPDATE packages SET source_site = $2, owner_chain = $3 WHERE id = $1"
        } else {
            "UPDATE packages SET source_site = $2, owner_chain = $3, source_path = NULL, refresh_every_ms = NULL, \
               next_refresh_at = NULL, schedule_error = NULL WHERE id = $1"
        };
        let done = sqlx::query(sql).bind(normalize_id(package)).bind(&owner).bind(chain).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("package {package}")));
        }
        Ok(())
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

impl Store {
    /// Changes a package's settings ([`PackageUpdate`]); returns the package as it is now.
    /// A new schedule is first due one interval from now; removing it clears the due time
    /// and the last schedule error. `NotFound` if the package does not exist, `Conflict`
    /// if the new name is taken.
    pub async fn update_package(&self, id: &str, update: &PackageUpdate) -> Result<Package> {
        let id = normalize_id(id);
        if let Some(name) = &update.name {
            check_name(name)?;
        }
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        lock_package(self, &mut tx, &id, Lock::Update).await?;
        if let Some(name) = &update.name {
            sqlx::query("UPDATE packages SET name = $2 WHERE id = $1")
                .bind(&id)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(|e| name_conflict(e, name, &id))?;
        }
        if let Some(path) = &update.source_path {
            sqlx::query("UPDATE packages SET source_path = $2 WHERE id = $1")
                .bind(&id)
                .bind(path)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(p) = update.priority {
            sqlx::query("UPDATE packages SET priority = $2 WHERE id = $1")
                .bind(&id)
                .bind(p.rank())
                .execute(&mut *tx)
                .await?;
        }
        if let Some(every) = update.refresh_every_ms {
            if every.is_some_and(|ms| ms <= 0) {
                return Err(StoreError::InvalidInput("a refresh schedule must be longer than 0".into()));
            }
            sqlx::query(
                "UPDATE packages SET refresh_every_ms = $2, next_refresh_at = $3, schedule_error = NULL WHERE id = $1",
            )
            .bind(&id)
            .bind(every)
            .bind(every.map(|ms| now.saturating_add(ms)))
            .execute(&mut *tx)
            .await?;
        }
        let pkg = package_in(&mut tx, &id).await?;
        tx.commit().await?;
        Ok(pkg)
    }

    /// Packages whose scheduled refresh is due at `now` (not those being deleted), by due time.
    pub async fn due_refreshes(&self, now: i64) -> Result<Vec<Package>> {
        sqlx::query(concat!(
            "SELECT ",
            package_columns!(),
            " FROM packages WHERE refresh_every_ms IS NOT NULL AND next_refresh_at <= $1 \
               AND deleting_since IS NULL ORDER BY next_refresh_at, id"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(package_from_row)
        .collect()
    }

    /// Takes a due scheduled refresh: moves `next_refresh_at` from `due` to `next`, unless
    /// someone else (another server node, a changed schedule) moved it first. Returns
    /// whether this caller runs it. Computing `next` from the time of the run, not from
    /// `due`, is what keeps missed runs from piling up: however many were missed, one runs.
    pub async fn take_scheduled_refresh(&self, id: &str, due: i64, next: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE packages SET next_refresh_at = $3 WHERE id = $1 AND next_refresh_at = $2 \
               AND refresh_every_ms IS NOT NULL AND deleting_since IS NULL",
        )
        .bind(normalize_id(id))
        .bind(due)
        .bind(next)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records why a scheduled refresh failed (`None`: it succeeded).
    pub async fn set_schedule_error(&self, id: &str, error: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE packages SET schedule_error = $2 WHERE id = $1")
            .bind(normalize_id(id))
            .bind(error)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The earliest due time of any schedule (package refreshes, target validations), or
    /// `None` when nothing is scheduled: how long the scheduler may sleep.
    pub async fn next_scheduled_at(&self) -> Result<Option<i64>> {
        let refresh: Option<i64> = sqlx::query(
            "SELECT MIN(next_refresh_at) AS due FROM packages \
             WHERE refresh_every_ms IS NOT NULL AND deleting_since IS NULL",
        )
        .fetch_one(&self.pool)
        .await?
        .try_get("due")?;
        let validate: Option<i64> =
            sqlx::query("SELECT MIN(next_validate_at) AS due FROM targets WHERE validate_every_ms IS NOT NULL")
                .fetch_one(&self.pool)
                .await?
                .try_get("due")?;
        Ok(match (refresh, validate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// `package delete`: marks the package as being deleted (its schedule stops) and asks
    /// every target that has not dropped it yet to remove it (action `remove`, state
    /// `removing`, due now; an `in_progress` job is re-queued as a removal when it
    /// finishes). Idempotent: asking again re-queues removals that failed. Returns the
    /// package as it is now. `NotFound` if it does not exist.
    pub async fn start_deleting(&self, id: &str) -> Result<Package> {
        let id = normalize_id(id);
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        lock_package(self, &mut tx, &id, Lock::Update).await?;
        sqlx::query(
            "UPDATE packages SET deleting_since = COALESCE(deleting_since, $2), refresh_every_ms = NULL, \
               next_refresh_at = NULL WHERE id = $1",
        )
        .bind(&id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE distributions SET action = 'remove', \
               state = CASE WHEN state = 'in_progress' THEN 'in_progress' ELSE 'removing' END, \
               attempts = 0, next_attempt_at = $2, last_error = NULL, bytes_sent_last = 0, bytes_from_peers_last = 0, \
               generation = generation + 1, updated_at = $2 \
             WHERE package_id = $1 AND state <> 'removed'",
        )
        .bind(&id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let pkg = package_in(&mut tx, &id).await?;
        tx.commit().await?;
        Ok(pkg)
    }

    /// Deletes a package being deleted once every target has dropped it (every
    /// distribution `removed`, or none): its distributions, versions and row, in one
    /// transaction. Returns whether it was deleted; `false` while a target still holds it
    /// or if the package is not being deleted (or is gone already).
    pub async fn finish_deleting(&self, id: &str) -> Result<bool> {
        let id = normalize_id(id);
        let mut tx = self.begin_write().await?;
        let since: Option<i64> = match lock_package(self, &mut tx, &id, Lock::Update).await {
            Ok(_) => sqlx::query("SELECT deleting_since FROM packages WHERE id = $1")
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("deleting_since")?,
            Err(StoreError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        if since.is_none() {
            return Ok(false);
        }
        let left: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM distributions WHERE package_id = $1 AND state <> 'removed'")
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
        if left > 0 {
            return Ok(false);
        }
        for sql in [
            "DELETE FROM distributions WHERE package_id = $1",
            "DELETE FROM versions WHERE package_id = $1",
            "DELETE FROM manifests WHERE package_id = $1",
            "DELETE FROM packages WHERE id = $1",
        ] {
            sqlx::query(sql).bind(&id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Ids of the packages being deleted.
    pub async fn deleting_packages(&self) -> Result<Vec<String>> {
        sqlx::query("SELECT id FROM packages WHERE deleting_since IS NOT NULL ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok(r.try_get("id")?))
            .collect()
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

/// The package `id` as the transaction `tx` sees it.
async fn package_in(tx: &mut sqlx::Transaction<'static, sqlx::Any>, id: &str) -> Result<Package> {
    let row = sqlx::query(concat!("SELECT ", package_columns!(), " FROM packages WHERE id = $1"))
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
    package_from_row(&row)
}
