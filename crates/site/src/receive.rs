//! A site as a target of its parent: the [`VersionSink`] of the receiving core shared
//! with the DP agent (`dpsync_agent`), called once a version from the parent is verified.
//!
//! The child keeps the parent's package id, name, source site and source version, so
//! versions mean the same thing at every tier; it never lets a parent overwrite a
//! package it owns, and it never lets its own administrators refresh one it does not.

use std::collections::HashMap;
use std::sync::Arc;

use dpsync_agent::{Arrived, Core, InstallError, Installed, Source, VersionSink};
use dpsync_hash::{ChunkId, ContentRoot, DecodeLimits, FileHash, Manifest, RelPath};
use dpsync_library::Library;
use dpsync_store::{Action, DistState, NewVersion, StoreError, VersionStats};
use dpsync_transfer::service::{OfferMeta, ReceiveError, ServedFile};
use dpsync_transfer::wire::ValidateResponse;

use super::Site;

/// A child site's sink: a verified version from the parent is committed to this site's
/// store (same package id and source version) and fanned out by its own jobs.
#[derive(Debug)]
pub struct ChildSite {
    site: Arc<Site>,
}

impl ChildSite {
    pub fn new(site: Arc<Site>) -> Self {
        Self { site }
    }
}

impl VersionSink for ChildSite {
    fn role(&self) -> &'static str {
        "site"
    }

    fn check_offer(&self, pkg: &str, meta: &OfferMeta) -> Result<(), ReceiveError> {
        if meta.name.is_none() {
            return Err(ReceiveError::BadRequest(
                "a site needs the package's name and source site with its manifest".into(),
            ));
        }
        let own = &self.site.cfg.site_code;
        if meta.source_site.as_deref().is_some_and(|s| s.eq_ignore_ascii_case(own)) {
            return Err(ReceiveError::Forbidden(format!(
                "package {pkg} names this site ({own}) as its owner; a parent cannot push it here"
            )));
        }
        Ok(())
    }

    async fn accept_package(&self, pkg: &str, meta: &OfferMeta) -> Result<(), ReceiveError> {
        self.site.accept_package(pkg, meta).await
    }

    async fn owner_changed(&self, _core: &Core, pkg: &str, owner: &str, chain: &str) -> Result<(), ReceiveError> {
        self.site.ownership_received(pkg, owner, chain).await.map_err(|e| ReceiveError::Internal(e.to_string()))
    }

    fn build(
        &self,
        lib: &Library,
        _pkg: &str,
        _version: i64,
        manifest: &Manifest,
        sources: &HashMap<ChunkId, Source>,
        force: bool,
    ) -> Result<Installed, InstallError> {
        dpsync_agent::assemble_missing(lib, manifest, sources, force)
    }

    async fn commit(&self, core: &Core, arrived: Arrived) -> Result<(), ReceiveError> {
        let (pkg, version) = (arrived.package.as_str(), arrived.version);
        self.site
            .accept_version(pkg, version, &arrived.content_root, arrived.encoded.clone(), arrived.signature.clone())
            .await?;
        core.record_install(&arrived, "").await?;
        tracing::info!(
            package = pkg,
            version,
            built = arrived.installed.files_built,
            "version received from the parent site"
        );
        Ok(())
    }

    async fn relabel(
        &self,
        core: &Core,
        pkg: &str,
        version: i64,
        root: &str,
        meta: &OfferMeta,
    ) -> Result<(), ReceiveError> {
        // A site records the version with its manifest, which the relabel does not carry.
        let p = core.db().package(pkg).await.map_err(|e| ReceiveError::Internal(format!("relabel: {e}")))?;
        let Some(manifest) = p.and_then(|p| p.installed_manifest) else {
            return Err(ReceiveError::Conflict {
                message: format!("{pkg}: this site holds no manifest of {root}; send the manifest"),
                missing: vec![],
            });
        };
        // The core matched `root` against the installed content root.
        let root = ContentRoot::from_hex(root).map_err(|e| ReceiveError::BadRequest(e.to_string()))?;
        self.site.accept_version(pkg, version, &root, manifest, meta.signature.clone()).await
    }

    async fn remove(&self, _core: &Core, pkg: &str, _written: Vec<FileHash>) -> Result<Vec<FileHash>, ReceiveError> {
        // The library is the site's own: its content goes with `gc`, not here.
        self.site.remove_everywhere(pkg).await?;
        Ok(vec![])
    }

    async fn status(&self, _core: &Core, pkg: &str) -> Result<serde_json::Value, ReceiveError> {
        let report = self.site.status(pkg).await.map_err(|e| ReceiveError::NotFound(e.to_string()))?;
        serde_json::to_value(report).map_err(|e| ReceiveError::Internal(e.to_string()))
    }

    /// A site holds no tree of its own: it validates its targets (its DPs, and its child
    /// sites through them in turn), queues their repairs itself, and answers what they
    /// found, each line prefixed with the target's name (`dp3: big/file.bin`). A target
    /// it could not validate is reported broken, with why.
    async fn validate(&self, _core: &Core, pkg: &str) -> Result<ValidateResponse, ReceiveError> {
        let report = self.site.validate(pkg, None).await.map_err(|e| match e {
            crate::SiteError::NotFound(m) => ReceiveError::NotFound(m),
            e => ReceiveError::Internal(e.to_string()),
        })?;
        let mut out = ValidateResponse {
            package: report.package,
            installed_version: (report.source_version > 0).then_some(report.source_version),
            ..Default::default()
        };
        for t in report.targets {
            out.files_checked += t.files_checked;
            out.broken.extend(t.broken.iter().map(|p| format!("{}: {p}", t.name)));
            if let Some(e) = t.error {
                out.broken.push(format!("{}: not validated: {e}", t.name));
            }
            out.repaired.extend(t.repaired.iter().map(|r| format!("{}: {r}", t.name)));
        }
        Ok(out)
    }

    fn open_file(&self, pkg: &str, _path: &RelPath) -> Result<ServedFile, ReceiveError> {
        Err(ReceiveError::NotFound(format!("a site serves no files of {pkg}; download them from its DPs")))
    }
}

fn store_err(e: StoreError) -> ReceiveError {
    match e {
        StoreError::Conflict(m) | StoreError::InvalidInput(m) => ReceiveError::Conflict { message: m, missing: vec![] },
        StoreError::NotFound(m) => ReceiveError::NotFound(m),
        e => ReceiveError::Internal(e.to_string()),
    }
}

impl Site {
    /// Registers (or checks) a package offered by the parent site.
    pub async fn accept_package(&self, pkg: &str, meta: &OfferMeta) -> Result<(), ReceiveError> {
        let (Some(name), Some(source_site)) = (&meta.name, &meta.source_site) else {
            return Err(ReceiveError::BadRequest(
                "a site needs the package's name and source site with its manifest".into(),
            ));
        };
        if source_site.eq_ignore_ascii_case(&self.cfg.site_code) {
            return Err(ReceiveError::Forbidden(format!(
                "package {pkg} names this site ({}) as its owner; a parent cannot push it here",
                self.cfg.site_code
            )));
        }
        let existing = self.store.package(pkg).await.map_err(store_err)?;
        if let Some(p) = &existing
            && p.source_site == self.cfg.site_code
        {
            return Err(ReceiveError::Forbidden(format!(
                "package {pkg} is owned by this site ({})",
                self.cfg.site_code
            )));
        }
        self.store.insert_foreign_package(pkg, name, source_site).await.map_err(store_err)?;
        if let Some(p) = &existing {
            // The parent removed the package from this site and now sends it again: put
            // it back on the targets that removal took it off, and only on those (not on
            // targets this site's administrators had removed it from themselves).
            let key = parent_removed_key(&p.id);
            if let Some(ids) = self.store.meta_get(&key).await.map_err(store_err)?.filter(|v| !v.is_empty()) {
                let mut restored = 0;
                for id in ids.split(',').filter_map(|s| s.parse::<i64>().ok()) {
                    match self.store.assign(&p.id, id).await {
                        Ok(_) => restored += 1,
                        Err(StoreError::NotFound(_)) => {} // the target was deleted since
                        Err(e) => return Err(store_err(e)),
                    }
                }
                self.store.meta_set(&key, "").await.map_err(store_err)?;
                self.kick_jobs();
                tracing::info!(package = pkg, from = %source_site, targets = restored, "package sent again by the parent site");
            }
        }
        if existing.is_none() {
            // A package sent to a site goes to every DP and child site of that site;
            // its administrators may remove it from some of them afterwards.
            let targets = self.store.targets().await.map_err(store_err)?;
            for t in &targets {
                self.store.assign(pkg, t.id).await.map_err(store_err)?;
            }
            tracing::info!(package = pkg, from = %source_site, targets = targets.len(), "new package from the parent site");
        }
        Ok(())
    }

    /// Commits a version received from the parent (same number, same content root) and
    /// lets this site's jobs fan it out.
    pub async fn accept_version(
        &self,
        pkg: &str,
        version: i64,
        root: &ContentRoot,
        manifest: Vec<u8>,
        signature: Option<String>,
    ) -> Result<(), ReceiveError> {
        let p = self
            .store
            .package(pkg)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ReceiveError::NotFound(format!("package {pkg} was not offered to this site")))?;
        if p.current_version >= version {
            let latest = self.store.latest_version(pkg).await.map_err(store_err)?;
            if p.current_version == version && latest.is_some_and(|v| v.summary.content_root == *root) {
                return Ok(());
            }
            return Err(ReceiveError::Conflict {
                message: format!("{pkg}: this site already has version {}, newer than {version}", p.current_version),
                missing: vec![],
            });
        }
        let previous = self.store.latest_version(pkg).await.map_err(store_err)?;
        let m =
            Manifest::decode(&manifest, &DecodeLimits::default()).map_err(|e| ReceiveError::Internal(e.to_string()))?;
        let mut stats = VersionStats::default();
        for e in m.entries() {
            match e.kind {
                dpsync_hash::EntryKind::Dir => stats.dirs += 1,
                dpsync_hash::EntryKind::Symlink { .. } => stats.symlinks += 1,
                dpsync_hash::EntryKind::File { size, .. } => {
                    stats.files += 1;
                    stats.total_bytes += size as i64;
                }
            }
        }
        if let Some(prev) = previous.and_then(|v| Manifest::decode(&v.manifest, &DecodeLimits::default()).ok()) {
            let d = m.diff(&prev);
            let file = |mm: &Manifest, path: &dpsync_hash::RelPath| mm.get(path.as_str()).is_some_and(|e| e.is_file());
            stats.files_added = d.added.iter().filter(|x| file(&m, x)).count() as i64;
            stats.files_changed = d.changed.iter().filter(|x| file(&m, x)).count() as i64;
            stats.files_removed = d.removed.iter().filter(|x| file(&prev, x)).count() as i64;
        } else {
            stats.files_added = stats.files;
        }
        stats.files_unchanged = stats.files - stats.files_added - stats.files_changed;
        self.store
            .commit_version(
                pkg,
                NewVersion {
                    version: Some(version),
                    content_root: *root,
                    manifest: Some(manifest),
                    scan_cache: None,
                    stats,
                    origin: format!("site {}", p.source_site),
                    signature,
                },
            )
            .await
            .map_err(store_err)?;
        let _ = self.store.prune_versions(pkg, self.cfg.keep_versions).await;
        self.kick_jobs();
        tracing::info!(package = pkg, version, from = %p.source_site, "version committed from the parent site");
        Ok(())
    }

    /// The parent removed the package from this site: remove it from every target here.
    pub async fn remove_everywhere(&self, pkg: &str) -> Result<(), ReceiveError> {
        let Some(p) = self.store.package(pkg).await.map_err(store_err)? else { return Ok(()) };
        if p.source_site == self.cfg.site_code {
            return Err(ReceiveError::Forbidden(format!("package {pkg} is owned by this site")));
        }
        let active: Vec<i64> = self
            .store
            .distributions(pkg)
            .await
            .map_err(store_err)?
            .into_iter()
            .filter(|d| !matches!(d.state, DistState::Removed | DistState::Removing))
            .map(|d| d.target_id)
            .collect();
        // Remember where the parent's removal takes the package off (added to what an
        // earlier, repeated removal recorded), so that sending it again restores it there.
        let key = parent_removed_key(&p.id);
        let mut ids: std::collections::BTreeSet<i64> = self
            .store
            .meta_get(&key)
            .await
            .map_err(store_err)?
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.parse().ok())
            .collect();
        ids.extend(&active);
        let joined = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        self.store.meta_set(&key, &joined).await.map_err(store_err)?;
        for id in active {
            self.store.request_action(pkg, id, Action::Remove, p.current_version).await.map_err(store_err)?;
        }
        self.kick_jobs();
        Ok(())
    }
}

/// Store meta key: the targets (ids, comma-separated) the parent's removal of `pkg` took
/// it off.
pub(crate) fn parent_removed_key(pkg: &str) -> String {
    format!("parent_removed:{pkg}")
}
