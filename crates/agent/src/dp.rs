//! A distribution point's sink: verified versions become trees that clients read.
//!
//! A version is built under `packages/P/versions/` (files hard-linked from the library
//! where the object's inode can carry the entry's metadata) by recycling the previous
//! version's tree, which is not live (see [`install::install`]), or in a fresh folder,
//! and made live by one rename of the `current` symlink: readers see the old version
//! whole or the new one whole. A commit answers once `current` is switched and the
//! install recorded; a tree that fell out of (current, previous) without being recycled
//! and the library objects only dropped links used are removed afterwards by a task that
//! still holds the package's lock, so the package's next offer, commit or removal waits
//! for it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use dpsync_hash::path::resolve_symlink;
use dpsync_hash::{ChunkId, DecodeLimits, EntryKind, FileHash, Manifest, RelPath};
use dpsync_library::Library;
use dpsync_transfer::service::{CommitStage, OfferMeta, ReceiveError, ServedFile};
use dpsync_transfer::wire::ValidateResponse;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::install::{self, BuildProgress, InstallError, Installed, Source};
use crate::metrics::PackageLabels;
use crate::sink::{Arrived, VersionSink};
use crate::{Core, blocking, forget_objects, internal, manifest_hashes};

/// A package as served to clients.
#[derive(Debug)]
struct Live {
    version: i64,
    dir: PathBuf,
    manifest: Arc<Manifest>,
}

/// The DP's installed trees and what clients read from them.
#[derive(Debug)]
pub struct DpTrees {
    data_dir: PathBuf,
    live: RwLock<HashMap<String, Arc<Live>>>,
    /// The progress of each package's latest build (read while its commit runs).
    builds: Mutex<HashMap<String, Arc<BuildProgress>>>,
    files_served: AtomicU64,
    bytes_served: AtomicU64,
    /// Held while a tree is validated.
    validating: tokio::sync::Mutex<()>,
    /// Bytes per second a validation reads at most.
    validate_read_rate: Option<u64>,
    /// Per package, the previous version's tree and encoded manifest that the next
    /// build may recycle (set by `prepare_build`, taken by `build`).
    recyclable: Mutex<HashMap<String, (PathBuf, Vec<u8>)>>,
}

impl DpTrees {
    /// Loads the installed versions recorded in `core`'s database, putting `current`
    /// back where an interrupted install left it elsewhere and removing stray trees.
    pub async fn load(core: &Core, validate_read_rate: Option<u64>) -> Result<Self> {
        let trees = Self {
            data_dir: core.data_dir().to_owned(),
            live: RwLock::new(HashMap::new()),
            builds: Mutex::new(HashMap::new()),
            files_served: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            validating: tokio::sync::Mutex::new(()),
            validate_read_rate,
            recyclable: Mutex::new(HashMap::new()),
        };
        for p in core.db().packages().await? {
            if let (Some(v), Some(dir), Some(m)) = (p.installed_version, &p.installed_dir, &p.installed_manifest) {
                let manifest = Manifest::decode(m, &DecodeLimits::default())
                    .with_context(|| format!("stored manifest of {} is corrupt", p.id))?;
                trees.set_live(&p.id, Live { version: v, dir: dir.into(), manifest: Arc::new(manifest) });
                trees.restore_current(&p.id, dir);
                trees.remove_stray_trees(&p.id, &[p.installed_dir.clone(), p.previous_dir.clone()]);
            }
        }
        Ok(trees)
    }

    fn pkg_dir(&self, pkg: &str) -> PathBuf {
        self.data_dir.join("packages").join(pkg)
    }

    fn get_live(&self, pkg: &str) -> Option<Arc<Live>> {
        self.live.read().unwrap().get(pkg).cloned()
    }

    fn set_live(&self, pkg: &str, live: Live) {
        self.live.write().unwrap().insert(pkg.to_owned(), Arc::new(live));
    }

    /// Points `current` back at the recorded tree when a crash left it elsewhere: an
    /// install killed after switching `current` but before recording the install leaves
    /// it on a tree that [`DpTrees::remove_stray_trees`] then deletes.
    fn restore_current(&self, pkg: &str, installed_dir: &str) {
        let pkg_dir = self.pkg_dir(pkg);
        let Some(name) = Path::new(installed_dir).file_name() else { return };
        let rel = Path::new("versions").join(name);
        if std::fs::read_link(pkg_dir.join("current")).ok().as_deref() == Some(rel.as_path()) {
            return;
        }
        if !pkg_dir.join(&rel).is_dir() {
            tracing::error!(package = pkg, dir = installed_dir, "the installed version's tree is missing");
            return;
        }
        tracing::warn!(
            package = pkg,
            dir = installed_dir,
            "current did not point at the installed version (an install was interrupted); switching it back"
        );
        if let Err(e) = install::switch_current(&pkg_dir, &rel.to_string_lossy()) {
            tracing::error!(package = pkg, "cannot switch current back: {e}");
        }
    }

    /// Checks that `current` points at the installed tree, and points it back when it
    /// was deleted or moved (clients reading the folder see the version again at once;
    /// HTTP downloads never depended on it). A missing tree is left to the file checks,
    /// which then report every file damaged so that the site reinstalls the version.
    fn check_current(&self, pkg: &str, live: &Live) -> Result<Vec<String>, ReceiveError> {
        let pkg_dir = self.pkg_dir(pkg);
        let Some(name) = live.dir.file_name() else { return Ok(vec![]) };
        let rel = Path::new("versions").join(name);
        let link = pkg_dir.join("current");
        let found = std::fs::read_link(&link).ok();
        if found.as_deref() == Some(rel.as_path()) || !live.dir.is_dir() {
            return Ok(vec![]);
        }
        install::switch_current(&pkg_dir, &rel.to_string_lossy()).map_err(|e| {
            ReceiveError::Internal(format!("{}: cannot point current back at {}: {e}", pkg, rel.display()))
        })?;
        let what = match found {
            Some(old) => format!("current pointed at {}; pointed it back at {}", old.display(), rel.display()),
            None => format!("current was missing; pointed it back at {}", rel.display()),
        };
        tracing::warn!(package = pkg, "validation: {what}");
        Ok(vec![what])
    }

    /// Deletes version trees left by an install that died before it was recorded.
    fn remove_stray_trees(&self, pkg: &str, keep: &[Option<String>]) {
        let versions = self.pkg_dir(pkg).join("versions");
        let Ok(rd) = std::fs::read_dir(&versions) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if !keep.iter().flatten().any(|k| Path::new(k) == p) {
                tracing::info!(package = pkg, dir = %p.display(), "removing an unused version tree");
                if let Err(err) = install::remove_tree(&p) {
                    tracing::warn!(package = pkg, dir = %p.display(), "cannot remove an unused version tree: {err}");
                }
            }
        }
    }
}

impl VersionSink for DpTrees {
    fn role(&self) -> &'static str {
        "DP"
    }

    fn build(
        &self,
        lib: &Library,
        pkg: &str,
        version: i64,
        manifest: &Manifest,
        sources: &HashMap<ChunkId, Source>,
        force: bool,
    ) -> Result<Installed, InstallError> {
        let pkg_dir = self.pkg_dir(pkg);
        std::fs::create_dir_all(&pkg_dir)
            .map_err(|source| InstallError::Io { context: format!("creating {}", pkg_dir.display()), source })?;
        let progress = Arc::new(BuildProgress::default());
        self.builds.lock().unwrap().insert(pkg.to_owned(), progress.clone());
        let recyclable = self.recyclable.lock().unwrap().remove(pkg).filter(|_| !force);
        let previous = recyclable.and_then(|(dir, blob)| match Manifest::decode(&blob, &DecodeLimits::default()) {
            Ok(manifest) => Some(install::Previous { dir, manifest }),
            Err(e) => {
                tracing::warn!(package = pkg, "the previous version's stored manifest does not decode: {e}");
                None
            }
        });
        let built = install::install(lib, &pkg_dir, version, manifest, sources, force, previous, &progress);
        if built.is_err() {
            self.builds.lock().unwrap().remove(pkg);
        }
        built
    }

    /// The tree the next build may recycle: the previous version's, when it is not
    /// the installed one, not what `current` points at, lies in this package's
    /// `versions/`, and nothing asks for a build that trusts nothing installed (`force`, or
    /// a package a validation found broken: the previous tree may share a damaged inode).
    async fn prepare_build(&self, core: &Core, pkg: &str, force: bool) -> Result<(), ReceiveError> {
        self.recyclable.lock().unwrap().remove(pkg);
        let p = core.db().package_summary(pkg).await.map_err(internal("commit"))?.unwrap_or_default();
        if force || p.broken {
            return Ok(());
        }
        let Some(prev) = p.previous_dir.filter(|d| Some(d) != p.installed_dir.as_ref()).map(PathBuf::from) else {
            return Ok(());
        };
        let pkg_dir = self.pkg_dir(pkg);
        let current = std::fs::read_link(pkg_dir.join("current")).ok();
        if prev.parent() != Some(pkg_dir.join("versions").as_path())
            || current.as_deref().and_then(Path::file_name) == prev.file_name()
        {
            return Ok(());
        }
        if let Some(blob) = core.db().previous_manifest(pkg).await.map_err(internal("commit"))? {
            self.recyclable.lock().unwrap().insert(pkg.to_owned(), (prev, blob));
        }
        Ok(())
    }

    fn build_progress(&self, pkg: &str) -> Option<CommitStage> {
        self.builds.lock().unwrap().get(pkg).map(|p| p.stage())
    }

    async fn commit(&self, core: &Core, arrived: Arrived) -> Result<(), ReceiveError> {
        let pkg = arrived.package.clone();
        let p = core.db().package_summary(&pkg).await.map_err(internal("commit"))?.unwrap_or_default();
        // The version that falls out of (current, previous): its tree and the content
        // only it used go after the answer. Its manifest is read before the install
        // record replaces it.
        let dir = arrived.installed.dir.display().to_string();
        // A recycled tree was that version's: what its links dropped is known already.
        let dropped = arrived.installed.released.is_none()
            && p.previous_dir.as_ref().is_some_and(|d| Some(d) != p.installed_dir.as_ref() && *d != dir);
        let dropped_manifest =
            if dropped { core.db().previous_manifest(&pkg).await.map_err(internal("commit"))? } else { None };
        let recorded = core.record_install(&arrived, &dir).await;
        self.builds.lock().unwrap().remove(&pkg);
        recorded?;
        let Arrived { version, manifest, installed, written_on_arrival, guard, .. } = arrived;
        let before = self.get_live(&pkg);
        self.set_live(&pkg, Live { version, dir: installed.dir.clone(), manifest: manifest.clone() });
        tracing::info!(
            package = pkg,
            version,
            built = installed.files_built,
            written_on_arrival = written_on_arrival.len(),
            linked = installed.files_linked,
            kept = installed.files_kept,
            recycled = installed.recycled,
            bytes_built = installed.bytes_built,
            assemble_ms = installed.assemble_ms,
            place_ms = installed.place_ms,
            sync_ms = installed.sync_ms,
            "version installed"
        );
        let (db, lib, pkg_dir) = (core.db().clone(), core.library().clone(), self.pkg_dir(&pkg));
        let keep = [Some(dir), p.installed_dir.clone()];
        tokio::spawn(async move {
            let _guard = guard;
            let removed = tokio::task::spawn_blocking(move || {
                if let Ok(rd) = std::fs::read_dir(pkg_dir.join("versions")) {
                    for e in rd.flatten() {
                        if !keep.iter().flatten().any(|k| Path::new(k) == e.path())
                            && let Err(err) = install::remove_tree(&e.path())
                        {
                            tracing::warn!(dir = %e.path().display(), "cannot remove an old version tree: {err}");
                        }
                    }
                }
                // Every object the new tree uses has a second link now: of the files
                // written on arrival, only those of a replaced version have none.
                let mut candidates = manifest_hashes(dropped_manifest.as_ref());
                candidates.extend(installed.released.iter().flatten().copied());
                candidates.extend(written_on_arrival);
                let mut kept = vec![(installed.dir.as_path(), &*manifest)];
                if let Some(b) = before.as_deref().filter(|b| b.dir != installed.dir) {
                    kept.push((b.dir.as_path(), &*b.manifest));
                }
                install::collect_unlinked(&lib, candidates, &kept)
            })
            .await;
            match removed {
                Ok(removed) => forget_objects(&db, removed).await,
                Err(e) => tracing::warn!(package = pkg, "cleaning up after the install: {e}"),
            }
            // The replaced version's manifests and the install's own tables are freed.
            let _ = tokio::task::spawn_blocking(crate::daemon::release_free_memory).await;
        });
        Ok(())
    }

    async fn relabel(
        &self,
        _core: &Core,
        pkg: &str,
        version: i64,
        _root: &str,
        _meta: &OfferMeta,
    ) -> Result<(), ReceiveError> {
        if let Some(live) = self.get_live(pkg) {
            self.set_live(pkg, Live { version, dir: live.dir.clone(), manifest: live.manifest.clone() });
        }
        Ok(())
    }

    async fn remove(
        &self,
        core: &Core,
        pkg: &str,
        written_on_arrival: Vec<FileHash>,
    ) -> Result<Vec<FileHash>, ReceiveError> {
        let p = core.db().package(pkg).await.map_err(internal("remove"))?.unwrap_or_default();
        self.live.write().unwrap().remove(pkg);
        let mut candidates = manifest_hashes(p.installed_manifest.as_ref());
        candidates.extend(manifest_hashes(p.previous_manifest.as_ref()));
        candidates.extend(written_on_arrival);
        let (lib, pkg_dir) = (core.library().clone(), self.pkg_dir(pkg));
        blocking(move || -> std::io::Result<Vec<FileHash>> {
            match std::fs::remove_file(pkg_dir.join("current")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            install::remove_tree(&pkg_dir)?;
            Ok(install::collect_unlinked(&lib, candidates, &[]))
        })
        .await?
        .map_err(|e| ReceiveError::Internal(format!("removing {pkg}: {e}")))
    }

    async fn status(&self, core: &Core, pkg: &str) -> Result<serde_json::Value, ReceiveError> {
        let state = core.package_state(pkg).await?;
        serde_json::to_value(state).map_err(|e| ReceiveError::Internal(e.to_string()))
    }

    async fn validate(&self, core: &Core, pkg: &str) -> Result<ValidateResponse, ReceiveError> {
        let Some(live) = self.get_live(pkg) else {
            return Ok(ValidateResponse { package: pkg.to_owned(), ..Default::default() });
        };
        // One tree read at a time on a DP, whoever asks: validations never add up to more
        // disk load than one.
        let _one_at_a_time = self.validating.lock().await;
        let mut repaired = self.check_current(pkg, &live)?;
        let lib = core.library().clone();
        let l2 = live.clone();
        let rate = self.validate_read_rate;
        let found = blocking(move || crate::check::check_tree(&lib, &l2.dir, &l2.manifest, rate)).await??;
        if !found.broken.is_empty() {
            core.db().set_broken(pkg, true).await.map_err(internal("validate"))?;
            tracing::warn!(package = pkg, broken = found.broken.len(), "validation found damaged files");
        }
        for h in &found.dropped {
            if !core.library().contains(h) {
                core.db().unindex_file(h).await.map_err(internal("validate"))?;
            }
        }
        if !found.repaired.is_empty() {
            tracing::warn!(package = pkg, repaired = found.repaired.len(), first = %found.repaired[0], "validation repaired the tree");
        }
        repaired.extend(found.repaired);
        Ok(ValidateResponse {
            package: pkg.to_owned(),
            installed_version: Some(live.version),
            files_checked: found.checked,
            broken: found.broken,
            repaired,
        })
    }

    fn open_file(&self, pkg: &str, path: &RelPath) -> Result<ServedFile, ReceiveError> {
        let not_found = || ReceiveError::NotFound(format!("{pkg} has no file {path}"));
        let Some(live) = self.get_live(pkg) else {
            return Err(ReceiveError::NotFound(format!("package {pkg} is not installed on this DP")));
        };
        let mut current = path.clone();
        for _ in 0..16 {
            let entry = live.manifest.get(current.as_str()).ok_or_else(not_found)?;
            match &entry.kind {
                EntryKind::File { size, hash, .. } => {
                    let full = live.dir.join(current.as_str());
                    let file = install::open_nofollow(&full).map_err(|_| not_found())?;
                    let modified = file.metadata().ok().and_then(|m| m.modified().ok());
                    self.files_served.fetch_add(1, Ordering::Relaxed);
                    self.bytes_served.fetch_add(*size, Ordering::Relaxed);
                    return Ok(ServedFile { file, len: *size, hash: *hash, modified });
                }
                EntryKind::Symlink { target } => {
                    current = resolve_symlink(&current, target).ok().flatten().ok_or_else(not_found)?;
                }
                EntryKind::Dir => return Err(not_found()),
            }
        }
        Err(not_found())
    }

    fn live_manifest(&self, pkg: &str, version: i64) -> Option<Arc<Manifest>> {
        self.get_live(pkg).filter(|l| l.version == version).map(|l| l.manifest.clone())
    }

    fn register_metrics(&self, registry: &mut Registry) {
        crate::metrics::register_counters(
            registry,
            [
                ("files_served", "Client downloads started", &self.files_served),
                ("bytes_served", "Bytes of files opened for clients", &self.bytes_served),
            ],
        );
        let version = Family::<PackageLabels, Gauge>::default();
        for (id, l) in self.live.read().unwrap().iter() {
            version.get_or_create(&PackageLabels { package: id.clone() }).set(l.version);
        }
        registry.register("package_version", "Installed source version per package", version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_parse::{Scrape, Value};

    #[test]
    fn metrics_parse_with_the_names_scripts_scrape() {
        let live = |version| Arc::new(Live { version, dir: PathBuf::new(), manifest: Arc::new(Manifest::default()) });
        let trees = DpTrees {
            data_dir: PathBuf::new(),
            live: RwLock::new(HashMap::from([("PS100001".to_owned(), live(3)), ("PS100002".to_owned(), live(1))])),
            files_served: AtomicU64::new(2),
            bytes_served: AtomicU64::new(4096),
            builds: Mutex::new(HashMap::new()),
            validating: tokio::sync::Mutex::new(()),
            validate_read_rate: None,
            recyclable: Mutex::new(HashMap::new()),
        };
        let core = crate::Metrics::default();
        core.chunks_received.store(7, Ordering::Relaxed);
        let mut registry = crate::metrics::registry();
        core.register(&mut registry);
        trees.register_metrics(&mut registry);
        let text = crate::metrics::encode(&registry);

        let s = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("a valid exposition");
        let value = |name: &str, package: Option<&str>| {
            s.samples
                .iter()
                .find(|x| x.metric == name && package.is_none_or(|p| x.labels.get("package") == Some(p)))
                .map(|x| x.value.clone())
                .unwrap_or_else(|| panic!("no {name} {package:?} in\n{text}"))
        };
        assert_eq!(value("dpsync_agent_chunks_received_total", None), Value::Counter(7.0));
        assert_eq!(value("dpsync_agent_files_written_on_arrival_total", None), Value::Counter(0.0));
        assert_eq!(value("dpsync_agent_files_served_total", None), Value::Counter(2.0));
        assert_eq!(value("dpsync_agent_bytes_served_total", None), Value::Counter(4096.0));
        assert_eq!(value("dpsync_agent_package_version", Some("PS100001")), Value::Gauge(3.0));
        assert_eq!(value("dpsync_agent_package_version", Some("PS100002")), Value::Gauge(1.0));
        // What the end-to-end tests and line-oriented scripts look for.
        assert!(text.contains("\ndpsync_agent_package_version{package=\"PS100001\"} 3\n"), "{text}");
        assert!(text.lines().any(|l| l == "dpsync_agent_files_written_on_arrival_total 0"), "{text}");
    }
}
