//! Targets: distribution points and child sites, with their URL, token, group and rate limit.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::error::{Result, StoreError, is_unique_violation};
use crate::packages::normalize_id;
use crate::{NewTarget, Store, Target, TargetUpdate, ValidationSchedule, now_ms};

macro_rules! target_columns {
    () => {
        "id, name, kind, url, token, grp, rate_limit, created_at, tls_fingerprint, windows, validate_every_ms, pull_sources"
    };
}

fn target_from_row(row: &AnyRow) -> Result<Target> {
    let kind: String = row.try_get("kind")?;
    Ok(Target {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        kind: kind.parse()?,
        url: row.try_get("url")?,
        token: row.try_get("token")?,
        group: row.try_get("grp")?,
        rate_limit: row.try_get("rate_limit")?,
        created_at: row.try_get("created_at")?,
        fingerprint: row.try_get("tls_fingerprint")?,
        windows: row.try_get("windows")?,
        validate_every_ms: row.try_get("validate_every_ms")?,
        pull_sources: row.try_get("pull_sources")?,
    })
}

impl Store {
    /// Adds a target. `Conflict` if the name is taken.
    pub async fn add_target(&self, new: NewTarget) -> Result<Target> {
        if new.name.trim().is_empty() {
            return Err(StoreError::InvalidInput("target name is empty".into()));
        }
        if new.url.trim().is_empty() {
            return Err(StoreError::InvalidInput(format!("target {}: URL is empty", new.name)));
        }
        let now = now_ms();
        let row = sqlx::query(
            "INSERT INTO targets (name, kind, url, token, grp, rate_limit, created_at, tls_fingerprint, windows, \
               pull_sources) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .bind(&new.name)
        .bind(new.kind.as_str())
        .bind(&new.url)
        .bind(&new.token)
        .bind(&new.group)
        .bind(new.rate_limit)
        .bind(now)
        .bind(&new.fingerprint)
        .bind(&new.windows)
        .bind(&new.pull_sources)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("target name {:?} is already taken", new.name))
            } else {
                e.into()
            }
        })?;
        Ok(Target {
            id: row.try_get("id")?,
            name: new.name,
            kind: new.kind,
            url: new.url,
            token: new.token,
            group: new.group,
            rate_limit: new.rate_limit,
            created_at: now,
            fingerprint: new.fingerprint,
            windows: new.windows,
            validate_every_ms: None,
            pull_sources: new.pull_sources,
        })
    }

    /// Replaces a target's send windows (`None`: always open). `NotFound` if no target
    /// has that id.
    pub async fn set_target_windows(&self, id: i64, windows: Option<&str>) -> Result<()> {
        let done = sqlx::query("UPDATE targets SET windows = $2 WHERE id = $1")
            .bind(id)
            .bind(windows)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no target with id {id}")));
        }
        Ok(())
    }

    /// All targets, ordered by name.
    pub async fn targets(&self) -> Result<Vec<Target>> {
        sqlx::query(concat!("SELECT ", target_columns!(), " FROM targets ORDER BY name"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(target_from_row)
            .collect()
    }

    /// One target by exact name.
    pub async fn target(&self, name: &str) -> Result<Option<Target>> {
        sqlx::query(concat!("SELECT ", target_columns!(), " FROM targets WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(target_from_row)
            .transpose()
    }

    /// One target by id.
    pub async fn target_by_id(&self, id: i64) -> Result<Option<Target>> {
        sqlx::query(concat!("SELECT ", target_columns!(), " FROM targets WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(target_from_row)
            .transpose()
    }

    /// The targets of a group, ordered by name.
    pub async fn targets_in_group(&self, group: &str) -> Result<Vec<Target>> {
        sqlx::query(concat!("SELECT ", target_columns!(), " FROM targets WHERE grp = $1 ORDER BY name"))
            .bind(group)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(target_from_row)
            .collect()
    }

    /// Changes a target's settings in one transaction; returns it before and after.
    /// `NotFound` if there is no target of that name.
    pub async fn update_target(&self, name: &str, update: &TargetUpdate) -> Result<(Target, Target)> {
        let mut tx = self.begin_write().await?;
        let before = sqlx::query(concat!("SELECT ", target_columns!(), " FROM targets WHERE name = $1"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(target_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("target {name:?}")))?;
        let after = update.apply(before.clone());
        if after.url.trim().is_empty() {
            return Err(StoreError::InvalidInput(format!("target {name}: URL is empty")));
        }
        sqlx::query(
            "UPDATE targets SET url = $2, token = $3, grp = $4, rate_limit = $5, tls_fingerprint = $6, \
               windows = $7, pull_sources = $8 \
             WHERE id = $1",
        )
        .bind(after.id)
        .bind(&after.url)
        .bind(&after.token)
        .bind(&after.group)
        .bind(after.rate_limit)
        .bind(&after.fingerprint)
        .bind(&after.windows)
        .bind(&after.pull_sources)
        .execute(&mut *tx)
        .await?;
        if after.windows != before.windows {
            // Jobs waiting for a window look at the new ones now.
            sqlx::query(
                "UPDATE distributions SET next_attempt_at = $2 \
                 WHERE target_id = $1 AND state = 'retrying' AND window_wait <> 0",
            )
            .bind(after.id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((before, after))
    }

    /// Forgets a target and its distribution rows (its name is free again; its id is never
    /// reused). `NotFound` if it does not exist.
    pub async fn delete_target(&self, id: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM distributions WHERE target_id = $1").bind(id).execute(&mut *tx).await?;
        let done = sqlx::query("DELETE FROM targets WHERE id = $1").bind(id).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("target id {id}")));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Assigns a package to a group itself (`distribute PKG --group G`): targets that join
    /// the group later receive it. Idempotent. `NotFound` if the package does not exist.
    pub async fn assign_group(&self, group: &str, package_id: &str) -> Result<()> {
        let id = normalize_id(package_id);
        if self.package(&id).await?.is_none() {
            return Err(StoreError::NotFound(format!("package {id}")));
        }
        sqlx::query(
            "INSERT INTO group_packages (grp, package_id, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (grp, package_id) DO NOTHING",
        )
        .bind(group)
        .bind(&id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The packages assigned to a group, ordered by id.
    pub async fn group_packages(&self, group: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT package_id FROM group_packages WHERE grp = $1 ORDER BY package_id")
            .bind(group)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("package_id")?)).collect()
    }

    /// The groups a package is assigned to, ordered by name.
    pub async fn package_groups(&self, package_id: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT grp FROM group_packages WHERE package_id = $1 ORDER BY grp")
            .bind(normalize_id(package_id))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("grp")?)).collect()
    }
}

impl Store {
    /// Sets (`Some((every, first))`: every `every` ms, first due at `first`) or removes
    /// (`None`) the scheduled validation of a target. `NotFound` if it does not exist.
    pub async fn set_validation_schedule(&self, target_id: i64, schedule: Option<(i64, i64)>) -> Result<()> {
        if schedule.is_some_and(|(every, _)| every <= 0) {
            return Err(StoreError::InvalidInput("a validation interval must be longer than 0".into()));
        }
        let done = sqlx::query("UPDATE targets SET validate_every_ms = $2, next_validate_at = $3 WHERE id = $1")
            .bind(target_id)
            .bind(schedule.map(|s| s.0))
            .bind(schedule.map(|s| s.1))
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("target id {target_id}")));
        }
        Ok(())
    }

    /// The scheduled validation of a target, if it has one.
    pub async fn validation_schedule(&self, target_id: i64) -> Result<Option<ValidationSchedule>> {
        sqlx::query(
            "SELECT id, name, validate_every_ms, next_validate_at FROM targets \
             WHERE id = $1 AND validate_every_ms IS NOT NULL",
        )
        .bind(target_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(schedule_from_row)
        .transpose()
    }

    /// Targets whose scheduled validation is due at `now`, by due time.
    pub async fn due_validations(&self, now: i64) -> Result<Vec<ValidationSchedule>> {
        sqlx::query(
            "SELECT id, name, validate_every_ms, next_validate_at FROM targets \
             WHERE validate_every_ms IS NOT NULL AND next_validate_at <= $1 ORDER BY next_validate_at, id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(schedule_from_row)
        .collect()
    }

    /// Takes a due validation: moves `next_validate_at` from `due` to `next` unless it was
    /// moved meanwhile; returns whether this caller runs it (see
    /// [`Store::take_scheduled_refresh`]).
    pub async fn take_scheduled_validation(&self, target_id: i64, due: i64, next: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE targets SET next_validate_at = $3 WHERE id = $1 AND next_validate_at = $2 \
               AND validate_every_ms IS NOT NULL",
        )
        .bind(target_id)
        .bind(due)
        .bind(next)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

fn schedule_from_row(row: &AnyRow) -> Result<ValidationSchedule> {
    Ok(ValidationSchedule {
        target_id: row.try_get("id")?,
        target_name: row.try_get("name")?,
        every_ms: row.try_get("validate_every_ms")?,
        next_at: row.try_get("next_validate_at")?,
    })
}
