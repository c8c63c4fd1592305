//! Targets and the administrator's actions on distributions: assign, redistribute,
//! remove, rollback, validate, status.

use dpsync_hash::{DecodeLimits, Manifest};
use dpsync_store::{Action, DistState, NewTarget, NewVersion, Target, TargetKind};

use super::{Site, SiteError};
use dpsync_api::{
    ActionReport, AddTarget, DistributeReport, DistributeRequest, RollbackReport, StatusReport, TargetInfo,
    TargetStatus, TargetValidation, ValidateReport,
};

// The admin API has its own enums (it depends on no other dpsync crate); these say which
// is which. The matches are exhaustive, so a new store state does not compile until it
// has its name in the API.

pub(crate) fn api_kind(k: TargetKind) -> dpsync_api::TargetKind {
    match k {
        TargetKind::Dp => dpsync_api::TargetKind::Dp,
        TargetKind::Site => dpsync_api::TargetKind::Site,
    }
}

pub(crate) fn api_state(s: DistState) -> dpsync_api::DistState {
    use dpsync_api::DistState as Api;
    match s {
        DistState::Pending => Api::Pending,
        DistState::InProgress => Api::InProgress,
        DistState::Installed => Api::Installed,
        DistState::Retrying => Api::Retrying,
        DistState::Failed => Api::Failed,
        DistState::ValidationFailed => Api::ValidationFailed,
        DistState::Removing => Api::Removing,
        DistState::Removed => Api::Removed,
    }
}

pub(crate) fn api_action(a: Action) -> dpsync_api::Action {
    match a {
        Action::Install => dpsync_api::Action::Install,
        Action::Redistribute => dpsync_api::Action::Redistribute,
        Action::Remove => dpsync_api::Action::Remove,
        Action::Validate => dpsync_api::Action::Validate,
    }
}

pub fn target_info(t: &Target) -> TargetInfo {
    TargetInfo {
        name: t.name.clone(),
        kind: api_kind(t.kind),
        url: t.url.clone(),
        group: t.group.clone(),
        rate_limit: t.rate_limit,
        has_token: t.token.is_some(),
        fingerprint: t.fingerprint.clone(),
        created_at: t.created_at,
    }
}

impl Site {
    pub async fn add_target(&self, req: AddTarget) -> Result<TargetInfo, SiteError> {
        let kind = match &req.kind {
            dpsync_api::TargetKind::Dp => TargetKind::Dp,
            dpsync_api::TargetKind::Site => TargetKind::Site,
            dpsync_api::TargetKind::Other(k) => {
                return Err(SiteError::Invalid(format!("target kind {k:?} is neither dp nor site")));
            }
        };
        let name = req.name.trim().to_owned();
        if name.is_empty() || name.len() > 100 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(SiteError::Invalid(format!("target name {name:?}: use letters, digits, '-', '_' and '.'")));
        }
        let fingerprint = req
            .fingerprint
            .as_deref()
            .map(dpsync_transfer::trust::normalize_fingerprint)
            .transpose()
            .map_err(|e| SiteError::Invalid(e.to_string()))?;
        let url =
            dpsync_transfer::client::check_target_url(&req.url, fingerprint.is_some()).map_err(SiteError::Invalid)?;
        if req.rate_limit.is_some_and(|r| r < 1024) {
            return Err(SiteError::Invalid("rate limit must be at least 1024 bytes per second".into()));
        }
        let t = self
            .store
            .add_target(NewTarget {
                name,
                kind,
                url,
                token: req.token,
                group: req.group,
                rate_limit: req.rate_limit,
                fingerprint,
            })
            .await?;
        tracing::info!(target = %t.name, kind = %t.kind, url = %t.url, "target added");
        Ok(target_info(&t))
    }

    pub async fn distribute(&self, pkg: &str, req: DistributeRequest) -> Result<DistributeReport, SiteError> {
        let p = self.find_package(pkg).await?;
        let mut targets: Vec<Target> = Vec::new();
        for (names, kind) in [(&req.dps, TargetKind::Dp), (&req.sites, TargetKind::Site)] {
            for n in names {
                let t = self.store.target(n).await?.filter(|t| t.kind == kind).ok_or_else(|| {
                    SiteError::NotFound(format!(
                        "no {} named {n:?}; `dpsync {} list` shows them",
                        if kind == TargetKind::Dp { "DP" } else { "child site" },
                        kind.as_str()
                    ))
                })?;
                targets.push(t);
            }
        }
        for g in &req.groups {
            let members = self.store.targets_in_group(g).await?;
            if members.is_empty() {
                return Err(SiteError::NotFound(format!("no DP is in group {g:?}")));
            }
            targets.extend(members);
        }
        if targets.is_empty() {
            return Err(SiteError::Invalid("name at least one --dp, --group or --site".into()));
        }
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        targets.dedup_by(|a, b| a.id == b.id);
        for t in &targets {
            self.store.assign(&p.id, t.id).await?;
        }
        self.kick_jobs();
        tracing::info!(package = %p.id, targets = targets.len(), "distribution assigned");
        Ok(DistributeReport {
            package: p.id,
            source_version: p.current_version,
            targets: targets.into_iter().map(|t| t.name).collect(),
        })
    }

    async fn assigned_target(&self, pkg: &str, name: &str) -> Result<(dpsync_store::Package, Target), SiteError> {
        let p = self.find_package(pkg).await?;
        let t = self
            .store
            .target(name)
            .await?
            .ok_or_else(|| SiteError::NotFound(format!("no target named {name:?}; `dpsync dp list` shows them")))?;
        if self.store.distribution(&p.id, t.id).await?.is_none() {
            return Err(SiteError::NotFound(format!(
                "{} is not distributed to {name}; use `dpsync distribute` first",
                p.id
            )));
        }
        Ok((p, t))
    }

    pub async fn request(&self, pkg: &str, name: &str, action: Action) -> Result<ActionReport, SiteError> {
        let (p, t) = self.assigned_target(pkg, name).await?;
        if action != Action::Remove && p.current_version == 0 {
            return Err(SiteError::Refused(format!("{} has no version yet; refresh it first", p.id)));
        }
        self.store.request_action(&p.id, t.id, action, p.current_version).await?;
        self.kick_jobs();
        Ok(ActionReport {
            package: p.id,
            action: api_action(action),
            source_version: p.current_version,
            targets: vec![t.name],
        })
    }

    /// Republishes the previous version's content as a new source version: versions
    /// only grow, and every target switches back atomically (it still holds that content).
    pub async fn rollback(&self, pkg: &str) -> Result<RollbackReport, SiteError> {
        let p = self.find_package(pkg).await?;
        if p.source_site != self.cfg.site_code {
            return Err(SiteError::Refused(format!(
                "package {} is owned by site {}; roll it back there",
                p.id, p.source_site
            )));
        }
        let lock = self.package_lock(&p.id);
        let _g = lock.lock().await;
        let versions = self.store.versions(&p.id).await?;
        let Some(current) = versions.last() else {
            return Err(SiteError::Refused(format!("{} has no version to roll back", p.id)));
        };
        let Some(prev) = versions.iter().rev().find(|v| v.content_root != current.content_root) else {
            return Err(SiteError::Refused(format!(
                "{} has no earlier version with different content on this site (versions older than {} were pruned)",
                p.id,
                versions.first().map(|v| v.version).unwrap_or(0)
            )));
        };
        let rec = self
            .store
            .version(&p.id, prev.version)
            .await?
            .ok_or_else(|| SiteError::NotFound("version vanished".into()))?;
        Manifest::decode(&rec.manifest, &DecodeLimits::default())
            .map_err(|e| SiteError::Internal(anyhow::anyhow!("stored manifest of version {}: {e}", prev.version)))?;
        let mut stats = rec.summary.stats.clone();
        stats.bytes_hashed = 0;
        let committed = self
            .store
            .commit_version(
                &p.id,
                NewVersion {
                    version: None,
                    content_root: rec.summary.content_root,
                    manifest: rec.manifest,
                    scan_cache: rec.scan_cache,
                    stats,
                    origin: format!("rollback to {}", prev.version),
                    signature: None,
                },
            )
            .await?;
        let queued = self.queued_targets(&p.id).await?;
        self.kick_jobs();
        tracing::info!(package = %p.id, version = committed.summary.version, restored = prev.version, "rolled back");
        Ok(RollbackReport {
            package: p.id,
            source_version: committed.summary.version,
            restored_version: prev.version,
            content_root: committed.summary.content_root.to_hex(),
            targets_queued: queued,
        })
    }

    pub async fn status(&self, pkg: &str) -> Result<StatusReport, SiteError> {
        let p = self.find_package(pkg).await?;
        let last = self.store.versions(&p.id).await?.pop();
        let root = last.as_ref().map(|v| v.content_root.to_hex());
        // What this server saw last, else the commit of the current version.
        let last_refresh = self.metrics.last_refresh(&p.id).or_else(|| {
            last.as_ref().map(|v| dpsync_api::LastRefresh {
                at: v.created_at,
                ok: true,
                duration_ms: None,
                source_version: Some(v.version),
                error: None,
            })
        });
        let progress = self.progress.lock().unwrap().clone();
        let targets: Vec<TargetStatus> = self
            .store
            .distributions(&p.id)
            .await?
            .into_iter()
            .map(|d| TargetStatus {
                progress: progress.get(&(d.package_id.clone(), d.target_id)).cloned(),
                name: d.target_name,
                kind: api_kind(d.target_kind),
                state: api_state(d.state),
                action: api_action(d.action),
                installed_version: d.installed_version,
                desired_version: d.desired_version,
                bytes_sent_last: d.bytes_sent_last,
                bytes_sent_total: d.bytes_sent_total,
                last_error: d.last_error,
                attempts: d.attempts,
                next_attempt_at: d.next_attempt_at,
                updated_at: d.updated_at,
                targets: vec![],
            })
            .collect();
        let mut targets: Vec<TargetStatus> = targets;
        self.pull_child_status(&p.id, &mut targets).await;
        Ok(StatusReport {
            package: p.id,
            name: p.name,
            source_site: p.source_site,
            source_version: p.current_version,
            content_root: root,
            last_refresh,
            targets,
        })
    }

    /// The status of every package, in package id order (`GET /v1/status`).
    pub async fn status_all(&self) -> Result<Vec<StatusReport>, SiteError> {
        let mut out = Vec::new();
        for p in self.store.packages().await? {
            match self.status(&p.id).await {
                Ok(s) => out.push(s),
                // Deleted since it was listed.
                Err(SiteError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Fills in each child site's own targets, asked on demand (a child that cannot be
    /// reached in time shows none, with the reason in `last_error` if it had none).
    async fn pull_child_status(&self, pkg: &str, targets: &mut [TargetStatus]) {
        let mut asks = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            use dpsync_api::DistState::{Pending, Removed};
            if t.kind != dpsync_api::TargetKind::Site
                || matches!(t.state, Removed | Pending) && t.installed_version.is_none()
            {
                continue;
            }
            let Ok(Some(target)) = self.store.target(&t.name).await else { continue };
            let pkg = pkg.to_owned();
            let client = self.clients.get(&target);
            asks.push((
                i,
                tokio::spawn(async move {
                    let client = client.map_err(|e| e.to_string())?;
                    let v = tokio::time::timeout(std::time::Duration::from_secs(3), client.status(&pkg))
                        .await
                        .map_err(|_| "no answer within 3 s".to_owned())?
                        .map_err(|e| e.to_string())?;
                    serde_json::from_value::<StatusReport>(v).map_err(|e| format!("unreadable answer: {e}"))
                }),
            ));
        }
        for (i, task) in asks {
            let why = match task.await {
                Ok(Ok(child)) => {
                    targets[i].targets = child.targets;
                    continue;
                }
                Ok(Err(why)) => why,
                Err(e) => e.to_string(),
            };
            if targets[i].last_error.is_none() {
                targets[i].last_error = Some(format!("the status of its own targets is unknown: {why}"));
            }
        }
    }

    /// Asks targets to re-hash their installed files; queues a repair where some are damaged.
    pub async fn validate(&self, pkg: &str, only: Option<&str>) -> Result<ValidateReport, SiteError> {
        let p = self.find_package(pkg).await?;
        let mut dists = self.store.distributions(&p.id).await?;
        dists.retain(|d| !matches!(d.state, DistState::Removed | DistState::Removing));
        if let Some(name) = only {
            dists.retain(|d| d.target_name == name);
            if dists.is_empty() {
                return Err(SiteError::NotFound(format!("{} is not distributed to {name}", p.id)));
            }
        }
        let mut tasks = Vec::new();
        for d in dists {
            let client = match self.store.target_by_id(d.target_id).await? {
                Some(t) => self.clients.get(&t).map_err(|e| e.to_string()),
                None => Err("target no longer exists".to_owned()),
            };
            let pkg_id = p.id.clone();
            tasks.push(tokio::spawn(async move {
                let r = match client {
                    Ok(c) => c.validate(&pkg_id).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                (d, r)
            }));
        }
        let mut out = Vec::new();
        for task in tasks {
            let (d, r) = task.await.map_err(|e| SiteError::Internal(e.into()))?;
            let mut v = TargetValidation {
                name: d.target_name.clone(),
                ok: false,
                files_checked: 0,
                broken: vec![],
                error: None,
                repair_queued: false,
                repaired: vec![],
            };
            match r {
                Ok(resp) => {
                    v.files_checked = resp.files_checked;
                    v.repaired = resp.repaired;
                    v.ok = resp.broken.is_empty() && resp.installed_version.is_some();
                    if resp.installed_version.is_none() {
                        v.error = Some("nothing installed".into());
                    }
                    v.broken = resp.broken;
                    if !v.broken.is_empty() {
                        let msg = format!("validation: {} damaged files, e.g. {}", v.broken.len(), v.broken[0]);
                        self.store
                            .finish(&p.id, d.target_id, dpsync_store::Outcome::ValidationFailed { error: msg })
                            .await
                            .ok();
                        self.store.request_action(&p.id, d.target_id, Action::Install, p.current_version).await?;
                        v.repair_queued = true;
                    }
                }
                Err(e) => v.error = Some(e),
            }
            out.push(v);
        }
        self.kick_jobs();
        Ok(ValidateReport { package: p.id, source_version: p.current_version, targets: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API names every store state, kind and action by the string the store uses, so
    /// the JSON of `status` is what it always was.
    #[test]
    fn api_enums_carry_the_store_strings() {
        for s in DistState::ALL {
            assert_eq!(api_state(*s).as_str(), s.as_str());
            assert!(!matches!(api_state(*s), dpsync_api::DistState::Other(_)));
        }
        for k in TargetKind::ALL {
            assert_eq!(api_kind(*k).as_str(), k.as_str());
        }
        for a in Action::ALL {
            assert_eq!(api_action(*a).as_str(), a.as_str());
        }
    }
}
