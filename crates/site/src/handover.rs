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
    /// Hands `pkg`, owned by this site, to `new_site` (a child site, or the parent this
    /// site receives packages from); every target of the package learns it with a job
    /// queued now (a target that is down, when it is back). Afterwards only `new_site`
    /// can refresh or roll it back. Given this site's own code for a package another site
    /// owns, takes it back once that site has handed it here.
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
        if p.source_site != own && new_site == own {
            return self.take_back(&p).await;
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
        let Some(_everywhere) = self.store.try_cluster_lock(dpsync_store::ClusterKey::Refresh(&p.id)).await? else {
            return Err(SiteError::Conflict(format!(
                "package {} is being refreshed or rolled back on another node; try again when it is done",
                p.id
            )));
        };
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
        if !p.id.get(..3).is_some_and(|c| c.eq_ignore_ascii_case(&own)) {
            // A package this site received: its receiving side answers with the chain too.
            self.trust.record_ownership(&p.id, &text).map_err(|e| SiteError::Internal(e.into()))?;
        }
        self.store.set_package_owner(&p.id, &new_site, &text, false).await?;
        let told = self.tell_targets(&p.id, p.current_version).await?;
        tracing::info!(package = %p.id, to = %new_site, from_version, targets = told, "package handed over to another site");
        self.find_package(&p.id).await
    }

    /// `package set PKG --source-site <this site>` where another site owns `p`: asks the
    /// child sites for the chain they hold; when its owner has handed the package to this
    /// site, this site owns it from now on.
    async fn take_back(&self, p: &Package) -> Result<Package, SiteError> {
        let Some(chain) = p.owner_chain.clone() else {
            return Err(SiteError::Refused(format!(
                "package {} belongs to site {}; only it can hand it to this site (`dpsync package set {} \
                 --source-site {}` there)",
                p.id, p.source_site, p.id, self.cfg.site_code
            )));
        };
        for t in self.store.targets().await?.into_iter().filter(|t| t.kind == TargetKind::Site) {
            let Ok(client) = self.clients.get(&t) else { continue };
            let Ok(answer) = client.set_owner(&p.id, &chain).await else { continue };
            if answer.owner.eq_ignore_ascii_case(&self.cfg.site_code) {
                self.learn_ownership(&p.id, &answer.chain).await?;
                return self.find_package(&p.id).await;
            }
        }
        Err(SiteError::Refused(format!(
            "package {} belongs to site {}, which has not handed it to this site: run `dpsync package set {} \
             --source-site {}` there first",
            p.id, p.source_site, p.id, self.cfg.site_code
        )))
    }

    /// Verifies and keeps an ownership chain of `pkg` a target holds (longer than this
    /// site's), and records its owner.
    pub(crate) async fn learn_ownership(&self, pkg: &str, chain: &str) -> Result<(), SiteError> {
        let refused = |e: dpsync_transfer::trust::TrustError| SiteError::Refused(e.to_string());
        let own = Ownership::verify(pkg, Handover::decode_chain(chain).map_err(refused)?).map_err(refused)?;
        if own.first_site == self.cfg.site_code {
            // This site's own package: the first link must be its own signature.
            if own.first_key != self.site_key.public_hex() {
                return Err(SiteError::Refused(format!(
                    "the ownership chain of {pkg} does not start with this site's key"
                )));
            }
        } else {
            self.trust.record_ownership(pkg, chain).map_err(refused)?;
        }
        let text = Handover::encode_chain(&own.chain);
        self.ownership_received(pkg, own.owner(), &text).await
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
        // A site this one receives packages from (its parent): its pinned key.
        if let Some(key) = self.trust.key_of(code) {
            return Ok(key);
        }
        Err(SiteError::Refused(format!(
            "no child site of this site answers as {code} (asked: {}), and no site of that code sends packages here; \
             the new owner must be a child site added with `dpsync site add` and reachable now, or this site's parent",
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
        let here = owner.eq_ignore_ascii_case(&self.cfg.site_code);
        self.store.set_package_owner(&p.id, owner, chain, here).await?;
        if owner.eq_ignore_ascii_case(&self.cfg.site_code) {
            // Its targets learn it with its first version (they may hold newer versions
            // of the former owner than this site has).
            tracing::info!(package = %p.id, from = %p.source_site, "this site now owns the package: give it a source folder \
                 (`dpsync package set {} --source DIR`) if it has none, and refresh it here", p.id);
        } else {
            self.tell_targets(&p.id, p.current_version).await?;
        }
        Ok(())
    }
}
