//! Handing a package to another site of the hierarchy (`dpsync package set PKG
//! --source-site CODE`, Configuration Manager's `SetSourceSite`).
//!
//! The owner signs a handover (package, itself and its key, the new owner and its key,
//! the first version the new owner signs) and appends it to the package's ownership
//! chain (`transfer::trust::Handover`). Every job to a target of the package gives the
//! target that chain before anything else; receivers verify each link from the key they
//! pinned for the site the package id names, keep it, and from then on take the
//! package's versions only from their owner at that version, with the key the chain
//! names: no re-pinning. A child site that finds itself the new owner takes the package
//! over (it may then be given a source folder and refreshed); versions keep growing from
//! the handover's version, and the package id stays the same.

use dpsync_store::{Action, DistState, Package, TargetKind};
use dpsync_transfer::trust::{Handover, Ownership};

use super::{Site, SiteError};

impl Site {
    /// Hands `pkg`, owned by this site, to the child site `new_site`; every target of
    /// the package learns it with a job queued now (a target that is down, when it is
    /// back). Afterwards only `new_site` can refresh or roll it back.
    pub async fn hand_over(&self, pkg: &str, new_site: &str) -> Result<Package, SiteError> {
        let p = self.find_package(pkg).await?;
        let new_site = new_site.trim().to_ascii_uppercase();
        let own = self.cfg.site_code.clone();
        if new_site.len() != 3 || !new_site.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(SiteError::Invalid(format!("site code {new_site:?} is invalid: three letters or digits")));
        }
        if p.source_site == new_site {
            return Err(SiteError::Conflict(format!("package {} is already owned by site {new_site}", p.id)));
        }
        if p.source_site != own {
            return Err(SiteError::Refused(format!(
                "package {} belongs to site {}; only its owner can hand it over: run `dpsync package set {} \
                 --source-site {new_site}` there",
                p.id, p.source_site, p.id
            )));
        }
        // Not while a refresh or rollback of it runs: the handover's version must follow
        // the last one this site signs.
        let lock = self.package_lock(&p.id);
        let _held = lock.try_lock().map_err(|_| {
            SiteError::Conflict(format!(
                "package {} is being refreshed or rolled back; try again when it is done",
                p.id
            ))
        })?;
        let p = self.find_package(&p.id).await?;
        let key = self.child_site_key(&new_site).await?;
        let mut chain = match p.owner_chain.as_deref() {
            Some(text) => Handover::decode_chain(text).map_err(|e| SiteError::Internal(e.into()))?,
            None => Vec::new(),
        };
        let from_version = p.current_version + 1;
        chain.push(self.site_key.hand_over(&p.id, &own, &new_site, &key, from_version));
        // What receivers will check, checked here first.
        Ownership::verify(&p.id, chain.clone()).map_err(|e| SiteError::Internal(e.into()))?;
        let text = Handover::encode_chain(&chain);
        self.store.set_package_owner(&p.id, &new_site, &text).await?;
        let told = self.tell_targets(&p.id, p.current_version).await?;
        tracing::info!(package = %p.id, to = %new_site, from_version, targets = told, "package handed over to another site");
        self.find_package(&p.id).await
    }

    /// Queues a job for every target that holds or is to hold `pkg`: the job gives it the
    /// package's ownership chain first. Returns how many.
    pub(crate) async fn tell_targets(&self, pkg: &str, version: i64) -> Result<usize, SiteError> {
        let mut told = 0;
        for d in self.store.distributions(pkg).await? {
            if matches!(d.state, DistState::Removed | DistState::Removing) || d.action == Action::Remove {
                continue;
            }
            self.store.request_action(pkg, d.target_id, Action::Install, version.max(1)).await?;
            told += 1;
        }
        if told > 0 {
            self.kick_jobs();
        }
        Ok(told)
    }

    /// The signing key of the child site `code` (a target of this site), as it says
    /// itself.
    async fn child_site_key(&self, code: &str) -> Result<String, SiteError> {
        let mut asked = Vec::new();
        for t in self.store.targets().await?.into_iter().filter(|t| t.kind == TargetKind::Site) {
            let Ok(client) = self.clients.get(&t) else { continue };
            match client.hello().await {
                Ok(h) if h.site_code.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(code)) => {
                    return h.site_key.ok_or_else(|| {
                        SiteError::Refused(format!("child site {} ({code}) does not tell its key; upgrade it", t.name))
                    });
                }
                Ok(_) => asked.push(t.name),
                Err(e) => asked.push(format!("{} ({e})", t.name)),
            }
        }
        Err(SiteError::Refused(format!(
            "no child site of this site answers as {code} (asked: {}); the new owner must be a child site added with \
             `dpsync site add` and reachable now",
            if asked.is_empty() { "none".to_owned() } else { asked.join(", ") }
        )))
    }

    /// The number the next version this site commits of `p` must have, when `p` was
    /// handed to it and it has not yet reached the handover's version (`None`: the next
    /// number).
    pub(crate) fn next_own_version(&self, p: &Package) -> Option<i64> {
        let own = Ownership::verify(&p.id, Handover::decode_chain(p.owner_chain.as_deref()?).ok()?).ok()?;
        let from = own.chain.last().filter(|h| h.to_site == self.cfg.site_code)?.from_version;
        (p.current_version + 1 < from).then_some(from)
    }

    /// A receiving child site was given the ownership chain of `pkg`: `owner` owns it now.
    /// Keeps the chain (and the owner) so that its own jobs pass it on; when `owner` is
    /// this site, the package is its own from now on.
    pub(crate) async fn ownership_received(&self, pkg: &str, owner: &str, chain: &str) -> Result<(), SiteError> {
        let Some(p) = self.store.package(pkg).await? else {
            // Not received yet: the chain is kept by the trust store and the package comes
            // with its versions.
            return Ok(());
        };
        if p.owner_chain.as_deref() == Some(chain) {
            return Ok(());
        }
        self.store.set_package_owner(&p.id, owner, chain).await?;
        if owner.eq_ignore_ascii_case(&self.cfg.site_code) {
            tracing::info!(package = %p.id, from = %p.source_site, "this site now owns the package: give it a source folder \
                 (`dpsync package set {} --source DIR`) and refresh it here", p.id);
        }
        self.tell_targets(&p.id, p.current_version).await?;
        Ok(())
    }
}
