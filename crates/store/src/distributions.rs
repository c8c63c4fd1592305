//! Distributions: the durable job queue, one row per (package, target).
//!
//! Life of a row: [`Store::assign`] or [`Store::commit_version`] make it `pending`;
//! [`Store::claim_due`] hands it to exactly one worker (`in_progress`, `attempts + 1`);
//! the worker reports with [`Store::finish`]. A request that arrives while a row is
//! `in_progress` (a new commit, `assign`, `request_action`) updates what the row asks for
//! but leaves it `in_progress`, so no second worker gets it; each such request bumps the
//! row's hidden `generation`, and `finish` compares it with the generation the worker
//! claimed: if they differ the job was superseded, its factual result (installed or removed
//! version) is recorded and the row goes back to `pending` (or `removing`) at once.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::error::{Result, StoreError};
use crate::packages::{Lock, lock_package, normalize_id};
use crate::{Action, Backend, DistState, Distribution, Lease, Outcome, StateCount, Store, TargetHealth, now_ms};

macro_rules! dist_select {
    () => {
        "SELECT d.package_id, d.target_id, t.name AS target_name, t.kind AS target_kind, \
         d.state, d.action, d.desired_version, d.installed_version, d.attempts, \
         d.next_attempt_at, d.last_error, d.last_error_at, d.bytes_sent_last, d.bytes_sent_total, d.bytes_from_peers_last, d.updated_at, \
         d.window_wait, d.last_validated_at, d.claim_token, d.claimed_by, d.lease_until \
         FROM distributions d JOIN targets t ON t.id = d.target_id "
    };
}

/// Rows a worker may claim (when due). A `failed` row is one whose fast retries are spent:
/// it is claimable again at its slow retry.
macro_rules! claimable {
    () => {
        "state IN ('pending', 'retrying', 'removing', 'failed') \
         AND (desired_version > 0 OR action = 'remove')"
    };
}

/// Due jobs of higher-priority packages first (`packages.priority`: 2 high … 0 low).
macro_rules! by_priority {
    () => {
        "(SELECT p.priority FROM packages p WHERE p.id = distributions.package_id) DESC"
    };
}

fn dist_from_row(row: &AnyRow) -> Result<Distribution> {
    let kind: String = row.try_get("target_kind")?;
    let state: String = row.try_get("state")?;
    let action: String = row.try_get("action")?;
    let window_wait: i64 = row.try_get("window_wait")?;
    let state = match state.parse()? {
        DistState::Retrying if window_wait != 0 => DistState::WaitingWindow,
        s => s,
    };
    Ok(Distribution {
        package_id: row.try_get("package_id")?,
        target_id: row.try_get("target_id")?,
        target_name: row.try_get("target_name")?,
        target_kind: kind.parse()?,
        state,
        action: action.parse()?,
        desired_version: row.try_get("desired_version")?,
        installed_version: row.try_get("installed_version")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        last_error_at: row.try_get("last_error_at")?,
        bytes_sent_last: row.try_get("bytes_sent_last")?,
        bytes_sent_total: row.try_get("bytes_sent_total")?,
        bytes_from_peers_last: row.try_get("bytes_from_peers_last")?,
        updated_at: row.try_get("updated_at")?,
        last_validated_at: row.try_get("last_validated_at")?,
        claim_token: row.try_get("claim_token")?,
        claimed_by: row.try_get("claimed_by")?,
        lease_until: row.try_get("lease_until")?,
    })
}

fn not_assigned(package_id: &str, target_id: i64) -> StoreError {
    StoreError::NotFound(format!("package {package_id} is not assigned to target id {target_id}"))
}

/// A random, process-unique token marking the rows of one `claim_due` call.
fn claim_token() -> i64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    (h.finish() >> 1) as i64
}

impl Store {
    /// Assigns a package to a target (upsert).
    ///
    /// * New row: `pending`, action `install`, `desired_version` = the package's current
    ///   version (0 before its first commit: the row is not claimable until a commit), due now.
    /// * Existing row being or already removed (state `removing`/`removed`, or action
    ///   `remove`): back to `install` of the current version, `pending` (an `in_progress`
    ///   removal stays `in_progress` and is re-queued when it finishes), attempts 0.
    /// * Existing row that is `failed` or `retrying`: tried again now (see
    ///   [`Store::retry_now`]).
    /// * Any other existing row: unchanged.
    ///
    /// `NotFound` if the package or target does not exist; `Conflict` if the package is
    /// being deleted.
    pub async fn assign(&self, package_id: &str, target_id: i64) -> Result<Distribution> {
        let id = normalize_id(package_id);
        let mut tx = self.begin_write().await?;
        let current = self.lock_for_assign(&mut tx, &id).await?;
        assign_row(&mut tx, &id, target_id, current, now_ms()).await?;
        let dist = select_one(&mut tx, &id, target_id).await?.ok_or_else(|| not_assigned(&id, target_id))?;
        tx.commit().await?;
        Ok(dist)
    }

    /// [`Store::assign`] for many targets, in transactions of up to 500 rows: assigning a
    /// package to thousands of targets costs a few commits, not one per target.
    pub async fn assign_many(&self, package_id: &str, target_ids: &[i64]) -> Result<()> {
        let id = normalize_id(package_id);
        for part in target_ids.chunks(500) {
            let mut tx = self.begin_write().await?;
            let current = self.lock_for_assign(&mut tx, &id).await?;
            let now = now_ms();
            for target_id in part {
                assign_row(&mut tx, &id, *target_id, current, now).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Locks package `id` (shared) for an assignment; its current version. `Conflict`
    /// while it is being deleted.
    async fn lock_for_assign(&self, tx: &mut sqlx::Transaction<'static, sqlx::Any>, id: &str) -> Result<i64> {
        let current = lock_package(self, tx, id, Lock::Share).await?;
        let deleting: Option<i64> = sqlx::query("SELECT deleting_since FROM packages WHERE id = $1")
            .bind(id)
            .fetch_one(&mut **tx)
            .await?
            .try_get("deleting_since")?;
        if deleting.is_some() {
            return Err(StoreError::Conflict(format!("package {id} is being deleted; it cannot be distributed")));
        }
        Ok(current)
    }

    /// Asks for `action` at `desired_version` on an assigned target: sets the action and
    /// version, state `pending` (`removing` for [`Action::Remove`]), attempts 0, due now,
    /// `bytes_sent_last` 0, error cleared. A row that is `in_progress` stays so and is
    /// re-queued when its job finishes.
    ///
    /// `NotFound` if the package is not assigned to the target, or if `desired_version` is
    /// not a retained version of the package (except for `Remove`, which ignores it).
    pub async fn request_action(
        &self,
        package_id: &str,
        target_id: i64,
        action: Action,
        desired_version: i64,
    ) -> Result<Distribution> {
        let id = normalize_id(package_id);
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        lock_package(self, &mut tx, &id, Lock::Share).await?;
        if action != Action::Remove
            && sqlx::query("SELECT version FROM versions WHERE package_id = $1 AND version = $2")
                .bind(&id)
                .bind(desired_version)
                .fetch_optional(&mut *tx)
                .await?
                .is_none()
        {
            return Err(StoreError::NotFound(format!("package {id} has no version {desired_version} to {action}")));
        }
        let state = if action == Action::Remove { DistState::Removing } else { DistState::Pending };
        let done = sqlx::query(
            "UPDATE distributions SET action = $3, desired_version = $4, \
               state = CASE WHEN state = 'in_progress' THEN 'in_progress' ELSE $5 END, \
               attempts = 0, next_attempt_at = $6, last_error = NULL, last_error_at = NULL, bytes_sent_last = 0, bytes_from_peers_last = 0, \
               generation = generation + 1, updated_at = $6 \
             WHERE package_id = $1 AND target_id = $2",
        )
        .bind(&id)
        .bind(target_id)
        .bind(action.as_str())
        .bind(desired_version)
        .bind(state.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(not_assigned(&id, target_id));
        }
        let dist = select_one(&mut tx, &id, target_id).await?.ok_or_else(|| not_assigned(&id, target_id))?;
        tx.commit().await?;
        Ok(dist)
    }

    /// Tries failing rows again now: every row that is `failed` or `retrying` (of
    /// `package_id`, of `target_id`, or of both) becomes `pending` (`removing` for a
    /// removal), due now, attempts 0, so the fast retries start over; the last error stays
    /// until the next outcome. Returns the rows it revived, ordered by package then target
    /// name.
    pub async fn retry_now(&self, package_id: Option<&str>, target_id: Option<i64>) -> Result<Vec<Distribution>> {
        let id = package_id.map(normalize_id);
        let mut tx = self.begin_write().await?;
        let mut filter = String::from("1 = 1");
        if id.is_some() {
            filter.push_str(" AND package_id = $2");
        }
        if target_id.is_some() {
            filter.push_str(if id.is_some() { " AND target_id = $3" } else { " AND target_id = $2" });
        }
        let sql = format!("{} RETURNING package_id, target_id", retry_sql(&filter));
        // Only literals of this function and `retry_sql` go into `sql`.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now_ms());
        if let Some(p) = &id {
            q = q.bind(p.clone());
        }
        if let Some(t) = target_id {
            q = q.bind(t);
        }
        let keys = q.fetch_all(&mut *tx).await?;
        let mut revived = Vec::new();
        for k in keys {
            let (p, t): (String, i64) = (k.try_get("package_id")?, k.try_get("target_id")?);
            revived.extend(select_one(&mut tx, &p, t).await?);
        }
        tx.commit().await?;
        revived.sort_by(|a, b| (&a.package_id, &a.target_name).cmp(&(&b.package_id, &b.target_name)));
        Ok(revived)
    }

    /// The distributions of a package with their target's name and kind, ordered by target
    /// name.
    pub async fn distributions(&self, package_id: &str) -> Result<Vec<Distribution>> {
        sqlx::query(concat!(dist_select!(), "WHERE d.package_id = $1 ORDER BY t.name"))
            .bind(normalize_id(package_id))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(dist_from_row)
            .collect()
    }

    /// How many distributions are in each state, per target kind, in one `GROUP BY` (for
    /// metrics: a scrape costs one query whatever the number of packages). Only the
    /// (kind, state) pairs that occur, ordered by kind then state.
    pub async fn distribution_state_counts(&self) -> Result<Vec<StateCount>> {
        sqlx::query(
            "SELECT t.kind AS target_kind, \
               CASE WHEN d.state = 'retrying' AND d.window_wait <> 0 THEN 'waiting_window' ELSE d.state END \
                 AS shown, COUNT(*) AS n \
             FROM distributions d JOIN targets t ON t.id = d.target_id \
             GROUP BY t.kind, shown ORDER BY t.kind, shown",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let kind: String = row.try_get("target_kind")?;
            let state: String = row.try_get("shown")?;
            let n: i64 = row.try_get("n")?;
            Ok(StateCount { kind: kind.parse()?, state: state.parse()?, count: n.max(0) as u64 })
        })
        .collect()
    }

    /// Every distribution to one target, ordered by package id.
    pub async fn distributions_to_target(&self, target_id: i64) -> Result<Vec<Distribution>> {
        sqlx::query(concat!(dist_select!(), "WHERE d.target_id = $1 ORDER BY d.package_id"))
            .bind(target_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(dist_from_row)
            .collect()
    }

    /// One distribution, or `None` if the package is not assigned to the target.
    pub async fn distribution(&self, package_id: &str, target_id: i64) -> Result<Option<Distribution>> {
        sqlx::query(concat!(dist_select!(), "WHERE d.package_id = $1 AND d.target_id = $2"))
            .bind(normalize_id(package_id))
            .bind(target_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(dist_from_row)
            .transpose()
    }

    /// Atomically takes up to `limit` due rows (state `pending`/`retrying`/`removing`,
    /// `next_attempt_at <= now_ms`, and a version to install or a removal to do), those of
    /// higher-priority packages first, then those of targets that are not failing, then
    /// oldest due first, marks them `in_progress`, increments `attempts` and returns them (with their
    /// action, so removals stay identifiable). A row is never returned to two claimers:
    /// PostgreSQL uses `FOR UPDATE SKIP LOCKED`, SQLite one `BEGIN IMMEDIATE` transaction.
    /// The rows carry no lease: a single server's claims (see [`Store::claim_leased`]).
    pub async fn claim_due(&self, now_ms: i64, limit: i64) -> Result<Vec<Distribution>> {
        self.claim(now_ms, limit, None, None).await
    }

    /// [`Store::claim_due`] restricted to the rows of targets whose jobs are failing
    /// (`Some(TargetHealth::Failing)`: their last job failed) or not (`Some(TargetHealth::Healthy)`:
    /// it succeeded, or they were never tried); `None` takes both.
    pub async fn claim_due_of(
        &self,
        now_ms: i64,
        limit: i64,
        health: Option<TargetHealth>,
    ) -> Result<Vec<Distribution>> {
        self.claim(now_ms, limit, health, None).await
    }

    /// [`Store::claim_due`] for one node of several sharing this database: each row
    /// claimed records the node and a lease until `now_ms + lease.ms`, which the node
    /// renews while it works ([`Store::heartbeat`]). A row whose lease ran out is made
    /// claimable again by [`Store::reclaim_expired`]; its outcome is then recorded only
    /// by the claim that holds it ([`Store::finish_leased`]). `health` as for
    /// [`Store::claim_due_of`].
    pub async fn claim_leased(
        &self,
        now_ms: i64,
        limit: i64,
        health: Option<TargetHealth>,
        lease: &Lease,
    ) -> Result<Vec<Distribution>> {
        self.claim(now_ms, limit, health, Some(lease)).await
    }

    async fn claim(
        &self,
        now_ms: i64,
        limit: i64,
        health: Option<TargetHealth>,
        lease: Option<&Lease>,
    ) -> Result<Vec<Distribution>> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let failing = "(SELECT t.failing_since FROM targets t WHERE t.id = distributions.target_id)";
        let only = match health {
            None => String::new(),
            Some(TargetHealth::Healthy) => format!(" AND {failing} IS NULL"),
            Some(TargetHealth::Failing) => format!(" AND {failing} IS NOT NULL"),
        };
        let order = format!(
            "{}, CASE WHEN {failing} IS NULL THEN 0 ELSE 1 END, next_attempt_at, package_id, target_id",
            by_priority!()
        );
        let token = claim_token();
        let mut tx = self.begin_write().await?;
        let sql = match self.backend {
            Backend::Sqlite => format!(
                "UPDATE distributions SET state = 'in_progress', attempts = attempts + 1, \
                   claim_token = $1, claimed_generation = generation, updated_at = $4, \
                   claimed_by = $5, lease_until = $6 \
                 WHERE rowid IN (SELECT rowid FROM distributions WHERE {} AND next_attempt_at <= $2{only} \
                   ORDER BY {order} LIMIT $3)",
                claimable!()
            ),
            Backend::Postgres => format!(
                "UPDATE distributions SET state = 'in_progress', attempts = attempts + 1, \
                   claim_token = $1, claimed_generation = generation, updated_at = $4, \
                   claimed_by = $5, lease_until = $6 \
                 WHERE (package_id, target_id) IN (SELECT package_id, target_id \
                   FROM distributions WHERE {} AND next_attempt_at <= $2{only} \
                   ORDER BY {order} LIMIT $3 \
                   FOR UPDATE SKIP LOCKED) \
                 AND {}",
                claimable!(),
                claimable!()
            ),
        };
        let now = crate::now_ms();
        // Built only from this function's constant fragments.
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(token)
            .bind(now_ms)
            .bind(limit)
            .bind(now)
            .bind(lease.map(|l| l.node.clone()))
            .bind(lease.filter(|l| l.ms > 0).map(|l| now + l.ms))
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(concat!(
            dist_select!(),
            "WHERE d.claim_token = $1 AND d.state = 'in_progress' \
             ORDER BY (SELECT p.priority FROM packages p WHERE p.id = d.package_id) DESC, \
               CASE WHEN (SELECT t.failing_since FROM targets t WHERE t.id = d.target_id) IS NULL THEN 0 ELSE 1 END, \
               d.next_attempt_at, d.package_id, d.target_id"
        ))
        .bind(token)
        .fetch_all(&mut *tx)
        .await?;
        let claimed = rows.iter().map(dist_from_row).collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        Ok(claimed)
    }

    /// Whether `target_id`'s jobs are failing, and since when (unix ms).
    pub async fn target_failing_since(&self, target_id: i64) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT failing_since FROM targets WHERE id = $1")
            .bind(target_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get("failing_since")?,
            None => None,
        })
    }

    /// Makes the `in_progress` rows whose lease ran out before `now_ms` claimable again
    /// (`pending`, `removing` for a removal; attempts kept): their node stopped renewing,
    /// so it died or lost the database. Returns how many rows were freed.
    pub async fn reclaim_expired(&self, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE distributions SET \
               state = CASE WHEN action = 'remove' THEN 'removing' ELSE 'pending' END, \
               claim_token = NULL, claimed_by = NULL, lease_until = NULL, next_attempt_at = $1, updated_at = $1 \
             WHERE state = 'in_progress' AND lease_until IS NOT NULL AND lease_until < $1",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Whether the claim `claim_token` still holds the row (it is `in_progress` under that
    /// claim, and its lease, if any, has not run out): asked before a target is told to
    /// commit, so two nodes never finish the same job.
    pub async fn holds_claim(&self, package_id: &str, target_id: i64, claim_token: i64) -> Result<bool> {
        let row = sqlx::query(
            "SELECT 1 AS held FROM distributions WHERE package_id = $1 AND target_id = $2 \
               AND state = 'in_progress' AND claim_token = $3 AND (lease_until IS NULL OR lease_until >= $4)",
        )
        .bind(normalize_id(package_id))
        .bind(target_id)
        .bind(claim_token)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// The earliest `next_attempt_at` among claimable rows (possibly in the past), or `None`
    /// if nothing is waiting: how long the scheduler may sleep.
    pub async fn next_due_at(&self) -> Result<Option<i64>> {
        self.next_due_at_of(None).await
    }

    /// [`Store::next_due_at`] among the rows [`Store::claim_due_of`] would take with `health`.
    pub async fn next_due_at_of(&self, health: Option<TargetHealth>) -> Result<Option<i64>> {
        let sql = match health {
            None => concat!("SELECT MIN(next_attempt_at) AS due FROM distributions WHERE ", claimable!()),
            Some(TargetHealth::Healthy) => concat!(
                "SELECT MIN(next_attempt_at) AS due FROM distributions WHERE ",
                claimable!(),
                " AND (SELECT t.failing_since FROM targets t WHERE t.id = distributions.target_id) IS NULL"
            ),
            Some(TargetHealth::Failing) => concat!(
                "SELECT MIN(next_attempt_at) AS due FROM distributions WHERE ",
                claimable!(),
                " AND (SELECT t.failing_since FROM targets t WHERE t.id = distributions.target_id) IS NOT NULL"
            ),
        };
        let row = sqlx::query(sql).fetch_one(&self.pool).await?;
        Ok(row.try_get("due")?)
    }

    /// At server start: every `in_progress` row goes back to `pending` (`removing` if its
    /// action is `remove`), attempts kept. Returns how many rows were reset. Call it only
    /// when no worker of any server sharing this database is running (a single server);
    /// a node of several calls [`Store::reset_node`].
    pub async fn reset_in_progress(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE distributions SET \
               state = CASE WHEN action = 'remove' THEN 'removing' ELSE 'pending' END, \
               claim_token = NULL, claimed_by = NULL, lease_until = NULL, updated_at = $1 \
             WHERE state = 'in_progress'",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Adds `bytes` to what a pull DP fetched from other DPs for its current job
    /// (`bytes_from_peers_last`). `NotFound` if not assigned.
    pub async fn record_peer_bytes(&self, package_id: &str, target_id: i64, bytes: i64) -> Result<()> {
        self.add_bytes(
            "UPDATE distributions SET bytes_from_peers_last = bytes_from_peers_last + $3, updated_at = $4 \
             WHERE package_id = $1 AND target_id = $2",
            package_id,
            target_id,
            bytes,
        )
        .await
    }

    /// At a node's start: its own `in_progress` rows (claimed before it stopped), those
    /// claimed without a lease (by a server without leases), and those whose lease ran
    /// out go back to `pending` (`removing` for a removal), attempts kept; other nodes'
    /// live claims are left alone. Returns how many rows were reset.
    pub async fn reset_node(&self, node: &str) -> Result<u64> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE distributions SET \
               state = CASE WHEN action = 'remove' THEN 'removing' ELSE 'pending' END, \
               claim_token = NULL, claimed_by = NULL, lease_until = NULL, updated_at = $1 \
             WHERE state = 'in_progress' \
               AND (claimed_by = $2 OR claimed_by IS NULL OR lease_until IS NULL OR lease_until < $1)",
        )
        .bind(now)
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Adds `bytes_sent_delta` to `bytes_sent_last` and `bytes_sent_total`. This is a write
    /// transaction: call it per batch, not per chunk. `NotFound` if not assigned.
    pub async fn record_progress(&self, package_id: &str, target_id: i64, bytes_sent_delta: i64) -> Result<()> {
        self.add_bytes(
            "UPDATE distributions SET bytes_sent_last = bytes_sent_last + $3, \
               bytes_sent_total = bytes_sent_total + $3, updated_at = $4 \
             WHERE package_id = $1 AND target_id = $2",
            package_id,
            target_id,
            bytes_sent_delta,
        )
        .await
    }

    /// Runs `sql`, a byte counter update binding (package, target, bytes, now), on one
    /// row. `NotFound` if not assigned.
    async fn add_bytes(&self, sql: &'static str, package_id: &str, target_id: i64, bytes: i64) -> Result<()> {
        let id = normalize_id(package_id);
        let done = sqlx::query(sql).bind(&id).bind(target_id).bind(bytes).bind(now_ms()).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(not_assigned(&id, target_id));
        }
        Ok(())
    }

    /// Records the outcome of a job and returns the updated row.
    ///
    /// * `Installed { version }` → `installed`, `installed_version = version`, error cleared.
    /// * `Retry { error, next_attempt_at }` → `retrying`, due at `next_attempt_at`.
    /// * `Failed { error }` → `failed`; `ValidationFailed { error }` → `validation_failed`.
    /// * `Removed` → `removed`, no installed version, error cleared.
    ///
    /// If the row was `in_progress` and a request changed it since it was claimed (a new
    /// commit, `assign`, `request_action`), the job was superseded: the installed/removed
    /// version is still recorded, but the row becomes `pending` (`removing` for a removal)
    /// with attempts 0 so the newer request runs next. `NotFound` if not assigned.
    pub async fn finish(&self, package_id: &str, target_id: i64, outcome: Outcome) -> Result<Distribution> {
        let dist = self.finish_claim(package_id, target_id, None, outcome).await?;
        dist.ok_or_else(|| not_assigned(package_id, target_id))
    }

    /// [`Store::finish`] for the claim `claim_token` (a row from [`Store::claim_leased`]):
    /// the outcome is recorded only while that claim still holds the row. `Ok(None)`
    /// when it does not any more — its lease ran out and another node reclaimed the row —
    /// and nothing is changed.
    pub async fn finish_leased(
        &self,
        package_id: &str,
        target_id: i64,
        claim_token: i64,
        outcome: Outcome,
    ) -> Result<Option<Distribution>> {
        self.finish_claim(package_id, target_id, Some(claim_token), outcome).await
    }

    async fn finish_claim(
        &self,
        package_id: &str,
        target_id: i64,
        claim: Option<i64>,
        outcome: Outcome,
    ) -> Result<Option<Distribution>> {
        let id = normalize_id(package_id);
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT state, action, installed_version, attempts, next_attempt_at, \
                   generation, claimed_generation, last_error, last_error_at, claim_token \
                 FROM distributions WHERE package_id = $1 AND target_id = $2"
            }
            Backend::Postgres => {
                "SELECT state, action, installed_version, attempts, next_attempt_at, \
                   generation, claimed_generation, last_error, last_error_at, claim_token \
                 FROM distributions WHERE package_id = $1 AND target_id = $2 FOR UPDATE"
            }
        };
        let row = sqlx::query(sql)
            .bind(&id)
            .bind(target_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| not_assigned(&id, target_id))?;
        let state: DistState = row.try_get::<String, _>("state")?.parse()?;
        if let Some(mine) = claim {
            let holder: Option<i64> = row.try_get("claim_token")?;
            if state != DistState::InProgress || holder != Some(mine) {
                return Ok(None);
            }
        }
        let action: Action = row.try_get::<String, _>("action")?.parse()?;
        let mut installed: Option<i64> = row.try_get("installed_version")?;
        let mut attempts: i64 = row.try_get("attempts")?;
        let mut next_attempt_at: i64 = row.try_get("next_attempt_at")?;
        let generation: i64 = row.try_get("generation")?;
        let claimed: i64 = row.try_get("claimed_generation")?;

        let previous_error: Option<String> = row.try_get("last_error")?;
        let previous_error_at: Option<i64> = row.try_get("last_error_at")?;
        let mut window_wait = 0i64;
        let succeeded = matches!(outcome, Outcome::Installed { .. });
        let reached = matches!(outcome, Outcome::Installed { .. } | Outcome::Removed);
        let failed = matches!(outcome, Outcome::Retry { .. } | Outcome::Failed { .. });
        let (mut new_state, last_error) = match outcome {
            Outcome::Installed { version } => {
                installed = Some(version);
                (DistState::Installed, None)
            }
            Outcome::WaitWindow { next_window_at } => {
                next_attempt_at = next_window_at;
                window_wait = 1;
                // Waiting is not an attempt.
                attempts = (attempts - 1).max(0);
                (DistState::Retrying, previous_error)
            }
            Outcome::Retry { error, next_attempt_at: at } => {
                next_attempt_at = at;
                (DistState::Retrying, Some(error))
            }
            Outcome::Failed { error, next_attempt_at: at } => {
                next_attempt_at = at;
                (DistState::Failed, Some(error))
            }
            Outcome::ValidationFailed { error } => (DistState::ValidationFailed, Some(error)),
            Outcome::Removed => {
                installed = None;
                (DistState::Removed, None)
            }
        };
        if state == DistState::InProgress && generation != claimed {
            new_state = if action == Action::Remove { DistState::Removing } else { DistState::Pending };
            attempts = 0;
            next_attempt_at = next_attempt_at.min(now);
            window_wait = 0;
        }

        // A wait for a window keeps the last error as it was, with its time.
        let last_error_at = if window_wait != 0 { previous_error_at } else { last_error.as_ref().map(|_| now) };
        sqlx::query(
            "UPDATE distributions SET state = $3, installed_version = $4, attempts = $5, \
               next_attempt_at = $6, last_error = $7, last_error_at = $9, claim_token = NULL, \
               claimed_by = NULL, lease_until = NULL, updated_at = $8, \
               window_wait = $10, last_success_at = CASE WHEN $11 = 1 THEN $8 ELSE last_success_at END \
             WHERE package_id = $1 AND target_id = $2",
        )
        .bind(&id)
        .bind(target_id)
        .bind(new_state.as_str())
        .bind(installed)
        .bind(attempts)
        .bind(next_attempt_at)
        .bind(last_error)
        .bind(now)
        .bind(last_error_at)
        .bind(window_wait)
        .bind(i64::from(succeeded))
        .execute(&mut *tx)
        .await?;
        // What the site learns of the target itself: failing since the first failure,
        // healthy again on any success (a wait for a window or a validation finding
        // damage says nothing about reaching it).
        let health = if reached {
            Some("UPDATE targets SET failing_since = NULL WHERE id = $1 AND $2 > 0")
        } else if failed {
            Some("UPDATE targets SET failing_since = COALESCE(failing_since, $2) WHERE id = $1")
        } else {
            None
        };
        if let Some(sql) = health {
            sqlx::query(sql).bind(target_id).bind(now).execute(&mut *tx).await?;
        }
        let dist = select_one(&mut tx, &id, target_id).await?.ok_or_else(|| not_assigned(&id, target_id))?;
        tx.commit().await?;
        Ok(Some(dist))
    }
}

/// The update that makes failing rows (`failed`, `retrying`) matching `filter` due now
/// (`$1`) with attempts 0: pending, or removing for a removal.
fn retry_sql(filter: &str) -> String {
    format!(
        "UPDATE distributions SET \
           state = CASE WHEN action = 'remove' THEN 'removing' ELSE 'pending' END, \
           attempts = 0, next_attempt_at = $1, generation = generation + 1, updated_at = $1 \
         WHERE ({filter}) AND state IN ('failed', 'retrying')"
    )
}

/// One row of [`Store::assign`], in the caller's transaction.
async fn assign_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: &str,
    target_id: i64,
    current: i64,
    now: i64,
) -> Result<()> {
    if sqlx::query("SELECT id FROM targets WHERE id = $1").bind(target_id).fetch_optional(&mut **tx).await?.is_none() {
        return Err(StoreError::NotFound(format!("target id {target_id}")));
    }
    let inserted = sqlx::query(
        "INSERT INTO distributions (package_id, target_id, state, action, desired_version, \
           attempts, next_attempt_at, bytes_sent_last, bytes_sent_total, generation, \
           claimed_generation, updated_at) \
         VALUES ($1, $2, 'pending', 'install', $3, 0, $4, 0, 0, 1, 0, $4) \
         ON CONFLICT (package_id, target_id) DO NOTHING",
    )
    .bind(id)
    .bind(target_id)
    .bind(current)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        sqlx::query(
            "UPDATE distributions SET action = 'install', desired_version = $3, \
               state = CASE WHEN state = 'in_progress' THEN 'in_progress' ELSE 'pending' END, \
               attempts = 0, next_attempt_at = $4, last_error = NULL, last_error_at = NULL, bytes_sent_last = 0, bytes_from_peers_last = 0, \
               generation = generation + 1, updated_at = $4 \
             WHERE package_id = $1 AND target_id = $2 \
               AND (state IN ('removing', 'removed') OR action = 'remove')",
        )
        .bind(id)
        .bind(target_id)
        .bind(current)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        // The filter is a literal of this file.
        sqlx::query(sqlx::AssertSqlSafe(retry_sql("package_id = $2 AND target_id = $3")))
            .bind(now)
            .bind(id)
            .bind(target_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn select_one(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    package_id: &str,
    target_id: i64,
) -> Result<Option<Distribution>> {
    sqlx::query(concat!(dist_select!(), "WHERE d.package_id = $1 AND d.target_id = $2"))
        .bind(package_id)
        .bind(target_id)
        .fetch_optional(&mut **tx)
        .await?
        .as_ref()
        .map(dist_from_row)
        .transpose()
}

impl Store {
    /// Records that a validation checked the package's content on the target at `at`.
    /// `NotFound` if not assigned.
    pub async fn record_validated(&self, package_id: &str, target_id: i64, at: i64) -> Result<()> {
        let id = normalize_id(package_id);
        let done =
            sqlx::query("UPDATE distributions SET last_validated_at = $3 WHERE package_id = $1 AND target_id = $2")
                .bind(&id)
                .bind(target_id)
                .bind(at)
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(not_assigned(&id, target_id));
        }
        Ok(())
    }
}
