//! A package's life after `package add`: `package set` (name, source, priority, refresh
//! schedule), `package delete` (off every target, then its rows), and the scheduler that
//! runs scheduled refreshes and validations.
//!
//! **Schedules** live in the store (`packages.next_refresh_at`, `targets.next_validate_at`),
//! so they survive restarts. A run is taken by moving its due time forward from the time
//! it runs (compare-and-set, so two server nodes never both take it), never by adding
//! intervals to the old due time: a server that was down for ten intervals runs each
//! missed schedule once, not ten times.

use std::sync::Arc;
use std::time::Duration;

use dpsync_api::{DeleteReport, RefreshRequest, SetPackage};
use dpsync_store::{DistState, Package, PackageUpdate, Priority, Target, now_ms};
use tokio_util::sync::CancellationToken;

use super::{Site, SiteError};

/// The shortest refresh or validation interval taken.
pub(crate) const MIN_INTERVAL_MS: i64 = 1_000;
/// How long the scheduler sleeps at most between two looks at the store (a schedule set
/// on another server node sharing the database is seen within this time).
const SCHEDULER_POLL: Duration = Duration::from_secs(5);

impl Site {
    /// Looks a package up for a change: `Conflict` while it is being deleted.
    pub(crate) async fn find_live_package(&self, pkg: &str) -> Result<Package, SiteError> {
        let p = self.find_package(pkg).await?;
        if p.deleting_since.is_some() {
            return Err(SiteError::Conflict(format!(
                "package {} is being deleted; `dpsync status {}` shows the targets that still hold it",
                p.id, p.id
            )));
        }
        Ok(p)
    }

    /// Checks a folder offered as a package source (`package add`, `package set --source`):
    /// an absolute path of an existing folder apart from the server's own state.
    pub(crate) fn check_source_folder(&self, source: &str) -> Result<(), SiteError> {
        let path = std::path::Path::new(source);
        if !path.is_absolute() {
            return Err(SiteError::Invalid(format!("source folder {source:?} must be an absolute path")));
        }
        match std::fs::metadata(path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(SiteError::Invalid(format!("source {} is not a folder", path.display()))),
            Err(e) => {
                return Err(SiteError::Invalid(format!(
                    "source folder {} cannot be used: {e}; create it or fix the path",
                    path.display()
                )));
            }
        }
        self.own_state().check_source(path)
    }

    /// `package set`.
    pub async fn set_package(&self, pkg: &str, mut req: SetPackage) -> Result<Package, SiteError> {
        let Some(new_owner) = req.source_site.take() else { return self.set_package_settings(pkg, req).await };
        let p = self.find_live_package(pkg).await?;
        let others = req.name.is_some()
            || req.source.is_some()
            || req.priority.is_some()
            || req.refresh_every_ms.is_some()
            || req.no_schedule;
        if others {
            self.set_package_settings(&p.id, req).await?;
        }
        self.hand_over(&p.id, &new_owner).await
    }

    async fn set_package_settings(&self, pkg: &str, req: SetPackage) -> Result<Package, SiteError> {
        let p = self.find_live_package(pkg).await?;
        if req.refresh_every_ms.is_some() && req.no_schedule {
            return Err(SiteError::Invalid("pass either --refresh-every or --no-schedule, not both".into()));
        }
        let schedule = match (req.refresh_every_ms, req.no_schedule) {
            (Some(ms), _) if ms < MIN_INTERVAL_MS => {
                return Err(SiteError::Invalid(format!(
                    "a refresh schedule of {} is too short: use at least 1s",
                    dpsync_api::format_duration(ms)
                )));
            }
            (Some(ms), _) => Some(Some(ms)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let update = PackageUpdate {
            name: req.name.as_deref().map(|n| check_package_name(n).map(str::to_owned)).transpose()?,
            source_path: req.source.clone(),
            priority: req.priority.as_deref().map(|p| p.parse::<Priority>()).transpose().map_err(|_| {
                SiteError::Invalid(format!(
                    "priority {:?} is not high, medium or low",
                    req.priority.as_deref().unwrap_or_default()
                ))
            })?,
            refresh_every_ms: schedule,
        };
        if update == PackageUpdate::default() {
            return Err(SiteError::Invalid(
                "nothing to change: pass --name, --source, --priority, --refresh-every or --no-schedule".into(),
            ));
        }
        let foreign = p.source_site != self.cfg.site_code;
        if foreign && (update.name.is_some() || update.source_path.is_some() || update.refresh_every_ms.is_some()) {
            return Err(SiteError::Refused(format!(
                "package {} is owned by site {}: change its name, source or schedule there \
                 (only --priority applies on this site)",
                p.id, p.source_site
            )));
        }
        if let Some(source) = &update.source_path {
            self.check_source_folder(source)?;
        }
        // A new source takes effect between refreshes, never in the middle of one.
        let lock = self.package_lock(&p.id);
        let _exclusive = match update.source_path {
            Some(_) => Some(lock.lock().await),
            None => None,
        };
        let updated = self.store.update_package(&p.id, &update).await?;
        tracing::info!(
            package = %updated.id,
            name = %updated.name,
            source = updated.source_path.as_deref().unwrap_or(""),
            priority = updated.priority.as_str(),
            refresh_every_ms = updated.refresh_every_ms,
            "package settings changed"
        );
        self.schedules.notify_one();
        Ok(updated)
    }

    /// `package delete`: the package is removed from every target (a target that is down
    /// keeps the removal queued and retried), then its rows go. Refused while a refresh
    /// or rollback of it runs.
    pub async fn delete_package(&self, pkg: &str) -> Result<DeleteReport, SiteError> {
        let p = self.find_package(pkg).await?;
        if p.source_site != self.cfg.site_code {
            return Err(SiteError::Refused(format!(
                "package {} is owned by site {}; delete it there (or `dpsync remove {} --dp NAME` for this \
                 site's DPs)",
                p.id, p.source_site, p.id
            )));
        }
        let lock = self.package_lock(&p.id);
        let Ok(_exclusive) = lock.try_lock() else {
            return Err(SiteError::Conflict(format!(
                "a refresh or rollback of {} is running; wait for it to end, then delete again",
                p.id
            )));
        };
        // The same on the site's other nodes.
        let Some(_everywhere) = self.store.try_cluster_lock(dpsync_store::ClusterKey::Refresh(&p.id)).await? else {
            return Err(SiteError::Conflict(format!(
                "a refresh or rollback of {} is running on another node; wait for it to end, then delete again",
                p.id
            )));
        };
        self.store.start_deleting(&p.id).await?;
        self.kick_jobs();
        let done = self.finish_deleting(&p.id).await?;
        let targets = if done {
            Vec::new()
        } else {
            self.store
                .distributions(&p.id)
                .await?
                .into_iter()
                .filter(|d| d.state != DistState::Removed)
                .map(|d| d.target_name)
                .collect()
        };
        tracing::info!(package = %p.id, name = %p.name, targets = targets.len(), "package deletion started");
        Ok(DeleteReport { package: p.id, state: if done { "deleted" } else { "deleting" }.into(), targets })
    }

    /// Deletes the rows of a package being deleted once no target holds it any more.
    /// Returns whether it is gone.
    pub(crate) async fn finish_deleting(&self, id: &str) -> Result<bool, SiteError> {
        if !self.store.finish_deleting(id).await? {
            return Ok(false);
        }
        self.manifest_cache.lock().unwrap().retain(|(p, _), _| p != id);
        self.delta_cache.lock().unwrap().retain(|(p, _, _), _| p != id);
        self.package_locks.lock().unwrap().remove(id);
        tracing::info!(package = id, "package deleted: every target dropped it; `dpsync gc` reclaims its content");
        Ok(true)
    }
}

/// Refuses an interval under [`MIN_INTERVAL_MS`], naming the schedule.
pub(crate) fn check_interval(what: &str, ms: Option<i64>) -> Result<(), SiteError> {
    match ms {
        Some(ms) if ms < MIN_INTERVAL_MS => Err(SiteError::Invalid(format!(
            "a {what} interval of {} is too short: use at least 1s",
            dpsync_api::format_duration(ms)
        ))),
        _ => Ok(()),
    }
}

/// `every` moved by up to ±10 % at random, so that targets given the same interval at
/// the same moment drift apart instead of validating together for ever.
fn jittered(every: i64) -> i64 {
    let spread = every / 10;
    if spread == 0 {
        return every;
    }
    every + rand::random_range(-spread..=spread)
}

impl Site {
    /// Sets (`Some(ms)`) or removes (`None`) a target's scheduled validation (`dp add
    /// --validate-every`, `dp set --validate-every` / `--no-validate`). The first run is
    /// due at a random point of the first interval, so that DPs given a schedule together
    /// do not all read their disks at once. Returns the target as it is now.
    pub async fn set_validate_every(&self, name: &str, every_ms: Option<i64>) -> Result<Target, SiteError> {
        check_interval("validation", every_ms)?;
        let t = self
            .store
            .target(name)
            .await?
            .ok_or_else(|| SiteError::NotFound(format!("no target named {name:?}; `dpsync dp list` shows them")))?;
        let schedule = every_ms.map(|every| (every, now_ms() + every / 2 + rand::random_range(0..=every / 2)));
        self.store.set_validation_schedule(t.id, schedule).await?;
        tracing::info!(target = %t.name, validate_every_ms = every_ms, "validation schedule set");
        self.schedules.notify_one();
        Ok(Target { validate_every_ms: every_ms, ..t })
    }

    /// A target's scheduled validation: every package installed there, one at a time (a
    /// DP checks one tree at a time anyway), and at most [`VALIDATIONS_AT_ONCE`] targets
    /// at once site-wide, so that validation never competes with clients for a DP's disk
    /// more than one tree read does. What is damaged is repaired as by `dpsync validate`.
    async fn scheduled_validation(&self, target_id: i64, name: &str) {
        let Ok(_slot) = self.validation_slots.acquire().await else { return };
        let dists = match self.store.distributions_to_target(target_id).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(target = name, "scheduled validation: {e}");
                return;
            }
        };
        for d in dists.into_iter().filter(|d| d.state == DistState::Installed) {
            let Ok(Some(p)) = self.store.package(&d.package_id).await else { continue };
            if p.deleting_since.is_some() {
                continue;
            }
            match self.validate_one(&p, d).await {
                Ok(v) if v.ok => tracing::debug!(package = %p.id, target = name, files = v.files_checked, "validated"),
                Ok(v) => tracing::warn!(
                    package = %p.id,
                    target = name,
                    broken = v.broken.len(),
                    repaired = v.repaired.len(),
                    repair_queued = v.repair_queued,
                    error = v.error.as_deref().unwrap_or(""),
                    "scheduled validation found damage"
                ),
                Err(e) => tracing::warn!(package = %p.id, target = name, "scheduled validation: {e}"),
            }
        }
        self.kick_jobs();
    }
}

/// A scheduled run in progress, by key; forgotten when dropped.
struct Running {
    site: Arc<Site>,
    key: String,
}

impl Running {
    /// `None` if a run with this key is in progress.
    fn start(site: &Arc<Site>, key: String) -> Option<Self> {
        site.scheduled_running.lock().unwrap().insert(key.clone()).then(|| Self { site: site.clone(), key })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.site.scheduled_running.lock().unwrap().remove(&self.key);
    }
}

/// Targets validated at once by the scheduler, site-wide.
pub(crate) const VALIDATIONS_AT_ONCE: usize = 2;

/// A package name as `package add` takes it.
pub(crate) fn check_package_name(name: &str) -> Result<&str, SiteError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(SiteError::Invalid("package name must be 1–200 printable characters".into()));
    }
    Ok(name)
}

/// Runs scheduled refreshes and validations, and finishes deletions, until `shutdown`.
pub(crate) async fn run_schedules(site: Arc<Site>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = site.run_due_schedules(&shutdown).await {
            tracing::error!("scheduler: {e}");
        }
        let wait = match site.store.next_scheduled_at().await {
            Ok(Some(at)) => Duration::from_millis((at - now_ms()).clamp(10, SCHEDULER_POLL.as_millis() as i64) as u64),
            _ => SCHEDULER_POLL,
        };
        tokio::select! {
            _ = site.schedules.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
}

impl Site {
    async fn run_due_schedules(self: &Arc<Self>, shutdown: &CancellationToken) -> Result<(), SiteError> {
        // Deletions whose last removal finished while no job could record it (a restart).
        for id in self.store.deleting_packages().await? {
            self.finish_deleting(&id).await?;
        }
        let now = now_ms();
        for p in self.store.due_refreshes(now).await? {
            let (Some(due), Some(every)) = (p.next_refresh_at, p.refresh_every_ms) else { continue };
            if shutdown.is_cancelled() || !self.store.take_scheduled_refresh(&p.id, due, now + every).await? {
                continue;
            }
            // A run still going when the next falls due: that one is skipped, so runs
            // longer than the interval never queue up behind each other.
            let Some(running) = Running::start(self, format!("refresh {}", p.id)) else {
                tracing::info!(package = %p.id, "the previous scheduled refresh still runs; skipping this one");
                continue;
            };
            let site = self.clone();
            tokio::spawn(async move {
                site.scheduled_refresh(&p.id).await;
                drop(running);
            });
        }
        for s in self.store.due_validations(now).await? {
            if shutdown.is_cancelled()
                || !self.store.take_scheduled_validation(s.target_id, s.next_at, now + jittered(s.every_ms)).await?
            {
                continue;
            }
            let Some(running) = Running::start(self, format!("validate {}", s.target_id)) else {
                tracing::info!(target = %s.target_name, "the previous scheduled validation still runs; skipping this one");
                continue;
            };
            let site = self.clone();
            tokio::spawn(async move {
                site.scheduled_validation(s.target_id, &s.target_name).await;
                drop(running);
            });
        }
        Ok(())
    }

    /// A scheduled refresh commits a version only when the content changed.
    async fn scheduled_refresh(&self, id: &str) {
        let result = self.refresh_if_changed(id, RefreshRequest::default()).await;
        let error = match &result {
            Ok(r) if r.committed => {
                tracing::info!(package = id, version = r.source_version, "scheduled refresh committed a new version");
                None
            }
            Ok(_) => {
                tracing::debug!(package = id, "scheduled refresh: content unchanged, nothing committed");
                None
            }
            Err(e) => {
                tracing::warn!(package = id, "scheduled refresh failed: {e}");
                Some(e.to_string())
            }
        };
        if let Err(e) = self.store.set_schedule_error(id, error.as_deref()).await {
            tracing::warn!(package = id, "cannot record the scheduled refresh's outcome: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use dpsync_agent::daemon::layer;

    use super::*;
    use crate::ServerSettings;

    async fn site(dir: &std::path::Path) -> Site {
        let settings = ServerSettings { data_dir: Some(dir.join("data")), ..Default::default() };
        let cfg =
            crate::ServerConfig::resolve(layer(None, std::iter::empty::<(&str, &str)>(), &settings).unwrap()).unwrap();
        Site::open(cfg).await.unwrap()
    }

    /// `package delete` does not wait behind a refresh or rollback of the package (they
    /// hold its lock): it refuses at once and says what to do.
    #[tokio::test]
    async fn delete_refuses_while_a_refresh_holds_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let site = site(dir.path()).await;
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let p = site.store.create_package("PS1", "app", src.to_str().unwrap()).await.unwrap();

        let lock = site.package_lock(&p.id);
        let refreshing = lock.lock().await;
        let e = site.delete_package(&p.id).await.unwrap_err();
        assert!(matches!(e, SiteError::Conflict(_)), "{e}");
        assert!(e.to_string().contains("refresh or rollback") && e.to_string().contains("delete again"), "{e}");
        assert!(site.store.package(&p.id).await.unwrap().unwrap().deleting_since.is_none(), "nothing changed");

        drop(refreshing);
        let r = site.delete_package(&p.id).await.unwrap();
        assert_eq!(r.state, "deleted", "a package on no target goes at once");
        assert!(site.store.package(&p.id).await.unwrap().is_none());
        site.store.close().await;
    }
}
