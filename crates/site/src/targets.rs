//! Targets and the administrator's actions on distributions: add, change, show and remove
//! targets; assign (to targets and to groups), redistribute, remove, retry, rollback,
//! validate, status.

use dpsync_hash::{DecodeLimits, Manifest};
use dpsync_store::{Action, DistState, Distribution, NewTarget, NewVersion, Target, TargetKind, TargetUpdate};

use super::{Site, SiteError};
use dpsync_api::{
    ActionReport, AddTarget, DistributeReport, DistributeRequest, RemoveTarget, RetryReport, RollbackReport, SetTarget,
    SetTargetReport, StatusReport, TargetDetail, TargetInfo, TargetPackage, TargetRemoval, TargetStatus,
    TargetValidation, ValidateReport,
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

/// The state a distribution is shown in: a running validation job reads `validating`.
fn shown_state(d: &Distribution) -> dpsync_api::DistState {
    match (d.state, d.action) {
        (DistState::InProgress, Action::Validate) => dpsync_api::DistState::Validating,
        (s, _) => api_state(s),
    }
}

pub(crate) fn api_state(s: DistState) -> dpsync_api::DistState {
    use dpsync_api::DistState as Api;
    match s {
        DistState::Pending => Api::Pending,
        DistState::InProgress => Api::InProgress,
        DistState::Installed => Api::Installed,
        DistState::Retrying => Api::Retrying,
        DistState::WaitingWindow => Api::WaitingWindow,
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
        windows: crate::windows::Windows::from_stored(t.windows.as_deref()).specs(),
        validate_every_ms: t.validate_every_ms,
        pull_sources: t.sources(),
    }
}

/// Checks a pull DP's sources and gives their stored form (`None`: pushed to): DP names
/// in rank order, or `auto` alone, which needs a group.
fn pull_sources_of(
    me: &str,
    kind: TargetKind,
    group: Option<&str>,
    sources: &[String],
) -> Result<Option<String>, SiteError> {
    if sources.is_empty() {
        return Ok(None);
    }
    if kind != TargetKind::Dp {
        return Err(SiteError::Invalid("only a DP pulls from other DPs; a child site is always pushed to".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for s in sources {
        let s = s.trim();
        if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(SiteError::Invalid(format!("pull source {s:?}: give a DP name or `auto`")));
        }
        if s == me {
            return Err(SiteError::Invalid(format!("{me} cannot pull from itself; name other DPs with --source")));
        }
        if !seen.insert(s) {
            return Err(SiteError::Invalid(format!("pull source {s} is given twice")));
        }
    }
    if sources.iter().any(|s| s.trim() == "auto") {
        if sources.len() > 1 {
            return Err(SiteError::Invalid("--source auto takes no other source".into()));
        }
        if group.is_none() {
            return Err(SiteError::Invalid(format!(
                "--source auto pulls from {me}'s group, and it has none; add --group G"
            )));
        }
    }
    Ok(Some(sources.iter().map(|s| s.trim()).collect::<Vec<_>>().join("\n")))
}

fn store_kind(k: &dpsync_api::TargetKind) -> Result<TargetKind, SiteError> {
    match k {
        dpsync_api::TargetKind::Dp => Ok(TargetKind::Dp),
        dpsync_api::TargetKind::Site => Ok(TargetKind::Site),
        dpsync_api::TargetKind::Other(k) => {
            Err(SiteError::Invalid(format!("target kind {k:?} is neither dp nor site")))
        }
    }
}

/// "DP" or "child site", for messages.
fn kind_noun(k: TargetKind) -> &'static str {
    match k {
        TargetKind::Dp => "DP",
        TargetKind::Site => "child site",
    }
}

/// The `next_retry_at` of a row: when a failing row is tried again.
fn next_retry_at(d: &Distribution) -> Option<i64> {
    matches!(d.state, DistState::Retrying | DistState::Failed).then_some(d.next_attempt_at)
}

/// A pinned fingerprint as stored (lower-case hex) or a clear error.
fn fingerprint_of(fp: &str) -> Result<String, SiteError> {
    dpsync_transfer::trust::normalize_fingerprint(fp).map_err(|e| SiteError::Invalid(e.to_string()))
}

fn check_rate_limit(rate: Option<i64>) -> Result<(), SiteError> {
    if rate.is_some_and(|r| r < 1024) {
        return Err(SiteError::Invalid("rate limit must be at least 1024 bytes per second".into()));
    }
    Ok(())
}

/// Checks a target's address, or its addresses separated by spaces (a child site run by
/// several nodes, tried in turn), and returns them normalized, space-separated.
fn check_urls(text: &str, pinned: bool) -> Result<String, SiteError> {
    let urls = text
        .split_whitespace()
        .map(|u| dpsync_transfer::client::check_target_url(u, pinned).map_err(SiteError::Invalid))
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(SiteError::Invalid("no URL given; give the target's receiving address".into()));
    }
    Ok(urls.join(" "))
}

impl Site {
    pub async fn add_target(&self, req: AddTarget) -> Result<TargetInfo, SiteError> {
        let kind = store_kind(&req.kind)?;
        let name = req.name.trim().to_owned();
        if name.is_empty() || name.len() > 100 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(SiteError::Invalid(format!("target name {name:?}: use letters, digits, '-', '_' and '.'")));
        }
        let fingerprint = req.fingerprint.as_deref().map(fingerprint_of).transpose()?;
        let url = check_urls(&req.url, fingerprint.is_some())?;
        check_rate_limit(req.rate_limit)?;
        let windows = crate::windows::Windows::parse_all(&req.windows).map_err(SiteError::Invalid)?;
        crate::lifecycle::check_interval("validation", req.validate_every_ms)?;
        let pull_sources = pull_sources_of(&name, kind, req.group.as_deref(), &req.pull_sources)?;
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
                windows: windows.to_stored(),
                pull_sources,
            })
            .await?;
        tracing::info!(target = %t.name, kind = %t.kind, url = %t.url, "target added");
        let mut assigned = self.join_group(&t).await?;
        assigned.extend(self.relay_received_to(&t).await?);
        if !assigned.is_empty() {
            self.kick_jobs();
        }
        let t = match req.validate_every_ms {
            Some(ms) => self.set_validate_every(&t.name, Some(ms)).await?,
            None => t,
        };
        Ok(target_info(&t))
    }

    /// A target by name, of the kind the caller means (if it says).
    async fn named_target(&self, name: &str, kind: Option<&dpsync_api::TargetKind>) -> Result<Target, SiteError> {
        let want = kind.map(store_kind).transpose()?;
        let noun = want.map(kind_noun).unwrap_or("target");
        let list = want.map(TargetKind::as_str).unwrap_or("dp");
        let t =
            self.store.target(name).await?.ok_or_else(|| {
                SiteError::NotFound(format!("no {noun} named {name:?}; `dpsync {list} list` shows them"))
            })?;
        if let Some(want) = want
            && t.kind != want
        {
            return Err(SiteError::Invalid(format!(
                "{name} is a {}, not a {}; use `dpsync {} …`",
                kind_noun(t.kind),
                kind_noun(want),
                t.kind.as_str()
            )));
        }
        Ok(t)
    }

    /// Assigns the packages of the target's group to it (a target that joins a group gets
    /// every package assigned to the group). Returns the packages assigned.
    async fn join_group(&self, t: &Target) -> Result<Vec<String>, SiteError> {
        let Some(group) = &t.group else { return Ok(vec![]) };
        let packages = self.store.group_packages(group).await?;
        for p in &packages {
            self.store.assign(p, t.id).await?;
        }
        if !packages.is_empty() {
            tracing::info!(target = %t.name, group = %group, packages = packages.len(), "joined a group: its packages assigned");
        }
        Ok(packages)
    }

    /// On a child site: packages received from the parent go to every target of this site,
    /// including targets added after they arrived (but not packages the parent took off
    /// this site). Returns the packages assigned.
    async fn relay_received_to(&self, t: &Target) -> Result<Vec<String>, SiteError> {
        let mut assigned = Vec::new();
        for p in self.store.packages().await? {
            if p.source_site == self.cfg.site_code
                || self.store.meta_get(&super::receive::parent_removed_key(&p.id)).await?.is_some_and(|v| !v.is_empty())
            {
                continue;
            }
            self.store.assign(&p.id, t.id).await?;
            assigned.push(p.id);
        }
        if !assigned.is_empty() {
            tracing::info!(target = %t.name, packages = assigned.len(), "packages from the parent site assigned");
        }
        Ok(assigned)
    }

    /// `dp set` / `site set`: changes the settings given. A changed URL, token or
    /// fingerprint retries the target's failing jobs at once; joining a group assigns the
    /// group's packages. Leaving a group takes nothing off the target.
    pub async fn set_target(&self, name: &str, req: SetTarget) -> Result<SetTargetReport, SiteError> {
        let before = self.named_target(name, req.kind.as_ref()).await?;
        let token = match req.token {
            Some(Some(t)) if t.trim().is_empty() => {
                return Err(SiteError::Invalid("the token is empty; give the one the target was started with".into()));
            }
            other => other,
        };
        let group = match req.group {
            Some(Some(g)) if g.trim().is_empty() => {
                return Err(SiteError::Invalid("the group name is empty; use --no-group to leave a group".into()));
            }
            other => other,
        };
        let fingerprint = match req.fingerprint {
            Some(Some(fp)) => Some(Some(fingerprint_of(&fp)?)),
            other => other,
        };
        if let Some(rate) = req.rate_limit {
            check_rate_limit(rate)?;
        }
        let windows = match &req.windows {
            Some(specs) => Some(crate::windows::Windows::parse_all(specs).map_err(SiteError::Invalid)?.to_stored()),
            None => None,
        };
        let mut update = TargetUpdate {
            url: None,
            token,
            fingerprint,
            group,
            rate_limit: req.rate_limit,
            windows,
            pull_sources: None,
        };
        if let Some(sources) = &req.pull_sources {
            let group = update.apply(before.clone()).group;
            update.pull_sources = Some(pull_sources_of(&before.name, before.kind, group.as_deref(), sources)?);
        } else if before.sources() == ["auto"] && update.apply(before.clone()).group.is_none() {
            return Err(SiteError::Invalid(format!(
                "{} pulls from its group (--source auto); give it --push or other sources before --no-group",
                before.name
            )));
        }
        let pinned = update.apply(before.clone()).fingerprint.is_some();
        if let Some(url) = &req.url {
            update.url = Some(check_urls(url, pinned)?);
        } else if update.fingerprint.is_some() {
            check_urls(&before.url, pinned)?;
        }
        if let Some(every) = req.validate_every_ms {
            crate::lifecycle::check_interval("validation", every)?;
        }
        let (before, mut after) = self.store.update_target(&before.name, &update).await?;
        if let Some(every) = req.validate_every_ms
            && every != before.validate_every_ms
        {
            after = self.set_validate_every(&after.name, every).await?;
        }
        let mut changed = Vec::new();
        for (field, differs) in [
            ("url", before.url != after.url),
            ("token", before.token != after.token),
            ("fingerprint", before.fingerprint != after.fingerprint),
            ("group", before.group != after.group),
            ("rate_limit", before.rate_limit != after.rate_limit),
            ("windows", before.windows != after.windows),
            ("validate_every", before.validate_every_ms != after.validate_every_ms),
            ("pull_sources", before.pull_sources != after.pull_sources),
        ] {
            if differs {
                changed.push(field.to_owned());
            }
        }
        let mut retried = Vec::new();
        if update.changes_connection(&before) {
            retried = self.store.retry_now(None, Some(after.id)).await?.into_iter().map(|d| d.package_id).collect();
        }
        let assigned = if before.group != after.group { self.join_group(&after).await? } else { vec![] };
        if !retried.is_empty() || !assigned.is_empty() || before.windows != after.windows {
            self.kick_jobs();
        }
        tracing::info!(target = %after.name, changed = ?changed, retried = retried.len(), assigned = assigned.len(), "target changed");
        Ok(SetTargetReport { target: target_info(&after), changed, retried, assigned })
    }

    /// `dp show` / `site show`: the target's settings and every package's state on it.
    pub async fn show_target(&self, name: &str) -> Result<TargetDetail, SiteError> {
        let t = self.named_target(name, None).await?;
        let progress = self.progress.lock().unwrap().clone();
        let mut packages = Vec::new();
        for d in self.store.distributions_to_target(t.id).await? {
            let Some(p) = self.store.package(&d.package_id).await? else { continue };
            packages.push(TargetPackage {
                progress: progress.get(&(d.package_id.clone(), d.target_id)).cloned(),
                next_retry_at: next_retry_at(&d),
                state: shown_state(&d),
                package: d.package_id,
                name: p.name,
                source_version: p.current_version,
                action: api_action(d.action),
                installed_version: d.installed_version,
                desired_version: d.desired_version,
                bytes_sent_last: d.bytes_sent_last,
                bytes_sent_total: d.bytes_sent_total,
                bytes_from_peers_last: d.bytes_from_peers_last,
                last_error: d.last_error,
                last_error_at: d.last_error_at,
                attempts: d.attempts,
                updated_at: d.updated_at,
            });
        }
        let mut counts = std::collections::BTreeMap::new();
        for p in &packages {
            *counts.entry(p.state.as_str().to_owned()).or_default() += 1;
        }
        Ok(TargetDetail { target: target_info(&t), packages, counts })
    }

    /// `dp remove` / `site remove`: queues the removal of every package from the target and
    /// forgets it once they are all removed (call again to see how far it is); with
    /// `forget`, forgets it at once without asking it.
    pub async fn remove_target(&self, name: &str, req: RemoveTarget) -> Result<TargetRemoval, SiteError> {
        let t = self.named_target(name, req.kind.as_ref()).await?;
        let mut removing = Vec::new();
        let mut removed = Vec::new();
        if !req.forget {
            for d in self.store.distributions_to_target(t.id).await? {
                match (d.state, d.action) {
                    (DistState::Removed, _) => removed.push(d.package_id),
                    // A failed removal is tried again now.
                    (DistState::Failed | DistState::Retrying, Action::Remove) => {
                        self.store.retry_now(Some(&d.package_id), Some(t.id)).await?;
                        removing.push(d.package_id);
                    }
                    (_, Action::Remove) => removing.push(d.package_id),
                    _ => {
                        self.store.request_action(&d.package_id, t.id, Action::Remove, d.desired_version).await?;
                        removing.push(d.package_id);
                    }
                }
            }
        }
        let forgotten = removing.is_empty();
        if forgotten {
            self.store.delete_target(t.id).await?;
            self.clients.forget(t.id);
            tracing::info!(target = %t.name, kind = %t.kind, forced = req.forget, "target forgotten");
        } else {
            self.kick_jobs();
            tracing::info!(target = %t.name, packages = removing.len(), "removing every package from the target");
        }
        Ok(TargetRemoval { name: t.name, kind: api_kind(t.kind), forgotten, removing, removed })
    }

    /// `retry PKG [--dp NAME]`: tries the package's failing targets again now.
    pub async fn retry(&self, pkg: &str, only: Option<&str>) -> Result<RetryReport, SiteError> {
        let p = self.find_package(pkg).await?;
        let target = match only {
            Some(name) => {
                let (_, t) = self.assigned_target(&p.id, name).await?;
                Some(t.id)
            }
            None => None,
        };
        let revived = self.store.retry_now(Some(&p.id), target).await?;
        if !revived.is_empty() {
            self.kick_jobs();
        }
        tracing::info!(package = %p.id, targets = revived.len(), "failing targets retried on request");
        Ok(RetryReport {
            package: p.id,
            source_version: p.current_version,
            targets: revived.into_iter().map(|d| d.target_name).collect(),
        })
    }

    pub async fn distribute(&self, pkg: &str, req: DistributeRequest) -> Result<DistributeReport, SiteError> {
        let p = self.find_live_package(pkg).await?;
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
        let mut groups = req.groups.clone();
        groups.sort();
        groups.dedup();
        for g in &groups {
            if g.trim().is_empty() {
                return Err(SiteError::Invalid("a group name is empty".into()));
            }
            targets.extend(self.store.targets_in_group(g).await?);
        }
        if targets.is_empty() && groups.is_empty() {
            return Err(SiteError::Invalid("name at least one --dp, --group or --site".into()));
        }
        // The package belongs to the groups themselves: DPs that join them later get it.
        for g in &groups {
            self.store.assign_group(g, &p.id).await?;
        }
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        targets.dedup_by(|a, b| a.id == b.id);
        let ids: Vec<i64> = targets.iter().map(|t| t.id).collect();
        self.store.assign_many(&p.id, &ids).await?;
        self.kick_jobs();
        tracing::info!(package = %p.id, targets = targets.len(), "distribution assigned");
        Ok(DistributeReport {
            package: p.id,
            source_version: p.current_version,
            targets: targets.into_iter().map(|t| t.name).collect(),
            groups,
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
        if action != Action::Remove {
            self.find_live_package(pkg).await?;
        }
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
        let p = self.find_live_package(pkg).await?;
        if p.source_site != self.cfg.site_code {
            return Err(SiteError::Refused(format!(
                "package {} is owned by site {}; roll it back there",
                p.id, p.source_site
            )));
        }
        let lock = self.package_lock(&p.id);
        let _g = lock.lock().await;
        let _everywhere = self.store.cluster_lock(&[(dpsync_store::ClusterKey::Refresh(&p.id), false)]).await?;
        // As it is under the locks (a handover may have moved it while this waited).
        let p = self.find_live_package(&p.id).await?;
        if p.source_site != self.cfg.site_code {
            return Err(SiteError::Refused(format!(
                "package {} was handed to site {} while this rollback waited; roll it back there",
                p.id, p.source_site
            )));
        }
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
                    version: self.next_own_version(&p),
                    content_root: rec.summary.content_root,
                    // Shared with the version restored (and its scan cache with it).
                    manifest: None,
                    scan_cache: None,
                    stats,
                    origin: format!("rollback to {}", prev.version),
                    signature: None,
                },
            )
            .await?;
        let queued = self.queued_targets(&p.id).await?;
        self.kick_jobs();
        tracing::info!(package = %p.id, version = committed.version, restored = prev.version, "rolled back");
        Ok(RollbackReport {
            package: p.id,
            source_version: committed.version,
            restored_version: prev.version,
            content_root: committed.content_root.to_hex(),
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
                node: d.claimed_by.clone().filter(|_| d.state == DistState::InProgress),
                next_retry_at: next_retry_at(&d),
                state: shown_state(&d),
                name: d.target_name,
                kind: api_kind(d.target_kind),
                action: api_action(d.action),
                installed_version: d.installed_version,
                desired_version: d.desired_version,
                bytes_sent_last: d.bytes_sent_last,
                bytes_sent_total: d.bytes_sent_total,
                bytes_from_peers_last: d.bytes_from_peers_last,
                last_error: d.last_error,
                last_error_at: d.last_error_at,
                attempts: d.attempts,
                next_attempt_at: d.next_attempt_at,
                next_window_at: (d.state == DistState::WaitingWindow).then_some(d.next_attempt_at),
                updated_at: d.updated_at,
                last_validated_at: d.last_validated_at,
                targets: vec![],
            })
            .collect();
        let mut targets: Vec<TargetStatus> = targets;
        self.pull_child_status(&p.id, &mut targets).await;
        let mut report = StatusReport {
            package: p.id,
            name: p.name,
            source_site: p.source_site,
            source_version: p.current_version,
            content_root: root,
            last_refresh,
            targets,
            counts: Default::default(),
        };
        report.count_states();
        Ok(report)
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
        let p = self.find_live_package(pkg).await?;
        let mut dists = self.store.distributions(&p.id).await?;
        dists.retain(|d| !matches!(d.state, DistState::Removed | DistState::Removing));
        if let Some(name) = only {
            dists.retain(|d| d.target_name == name);
            if dists.is_empty() {
                return Err(SiteError::NotFound(format!("{} is not distributed to {name}", p.id)));
            }
        }
        let checks = dists.into_iter().map(|d| self.validate_one(&p, d));
        let out = futures::future::join_all(checks).await.into_iter().collect::<Result<Vec<_>, _>>()?;
        self.kick_jobs();
        Ok(ValidateReport { package: p.id, source_version: p.current_version, targets: out })
    }

    /// Asks one target to check its content of `p` (a DP checks its tree and puts right
    /// what it can by itself; a child site validates its own DPs) and queues the repair
    /// of what is damaged: an install of the current version, which sends only the
    /// content the target dropped. Records when the target was validated.
    pub(crate) async fn validate_one(
        &self,
        p: &dpsync_store::Package,
        d: dpsync_store::Distribution,
    ) -> Result<TargetValidation, SiteError> {
        let target = self.store.target_by_id(d.target_id).await?;
        let kind = target.as_ref().map(|t| t.kind);
        let r = match target {
            Some(t) => match self.clients.get(&t) {
                Ok(c) => c.validate(&p.id).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            None => Err("target no longer exists".to_owned()),
        };
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
                self.store.record_validated(&p.id, d.target_id, dpsync_store::now_ms()).await?;
                if !v.broken.is_empty() && kind == Some(TargetKind::Site) {
                    // The child site queued the repair of its own DPs.
                    v.repair_queued = true;
                } else if !v.broken.is_empty() {
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
        Ok(v)
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
