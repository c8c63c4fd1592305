//! Targets: distribution points and child sites, with their URL, token, group and rate limit.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::error::{Result, StoreError, is_unique_violation};
use crate::{NewTarget, Store, Target, ValidationSchedule, now_ms};

macro_rules! target_columns {
    () => {
        "id, name, kind, url, token, grp, rate_limit, created_at, tls_fingerprint, validate_every_ms"
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
        validate_every_ms: row.try_get("validate_every_ms")?,
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
            "INSERT INTO targets (name, kind, url, token, grp, rate_limit, created_at, tls_fingerprint) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(&new.name)
        .bind(new.kind.as_str())
        .bind(&new.url)
        .bind(&new.token)
        .bind(&new.group)
        .bind(new.rate_limit)
        .bind(now)
        .bind(&new.fingerprint)
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
            validate_every_ms: None,
        })
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
