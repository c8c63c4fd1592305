//! What the site's `/metrics` reads per distribution: one query over every (package,
//! target) row, so a scrape costs the same number of queries whatever the number of
//! packages and targets (the label sets are bounded by configuration, never per file).

use sqlx::Row;

use crate::error::Result;
use crate::{DistState, Store, TargetKind};

/// One (package, target) row as metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSeries {
    pub package_id: String,
    pub target_name: String,
    pub target_kind: TargetKind,
    pub state: DistState,
    pub installed_version: Option<i64>,
    pub bytes_sent_total: i64,
    /// Failed attempts since the last success or request: a row that is `retrying` or
    /// `failed` counts its attempts, one `in_progress` the attempts before this one, any
    /// other row none.
    pub consecutive_failures: i64,
    /// Unix milliseconds of the last finished install, if any since it was recorded.
    pub last_success_at: Option<i64>,
}

impl Store {
    /// Every distribution, ordered by package then target name.
    pub async fn target_series(&self) -> Result<Vec<TargetSeries>> {
        sqlx::query(
            "SELECT d.package_id, t.name AS target_name, t.kind AS target_kind, d.state, \
               d.installed_version, d.bytes_sent_total, d.attempts, d.last_success_at \
             FROM distributions d JOIN targets t ON t.id = d.target_id \
             ORDER BY d.package_id, t.name",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let kind: String = row.try_get("target_kind")?;
            let state: DistState = row.try_get::<String, _>("state")?.parse()?;
            let attempts: i64 = row.try_get("attempts")?;
            let consecutive_failures = match state {
                DistState::Retrying | DistState::Failed => attempts,
                DistState::InProgress => (attempts - 1).max(0),
                _ => 0,
            };
            Ok(TargetSeries {
                package_id: row.try_get("package_id")?,
                target_name: row.try_get("target_name")?,
                target_kind: kind.parse()?,
                state,
                installed_version: row.try_get("installed_version")?,
                bytes_sent_total: row.try_get("bytes_sent_total")?,
                consecutive_failures,
                last_success_at: row.try_get("last_success_at")?,
            })
        })
        .collect()
    }
}
