//! `RefreshPkgSource`, first half: scan the source, read only what changed (hash, chunk
//! and copy into the library in one pass), and commit the next source version.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use dpsync_hash::path::escape_controls;
use dpsync_hash::{ChunkParams, DecodeLimits, Entry, EntryKind, FileDigest, FileHash, Manifest};
use dpsync_library::{ImportBatch, Imported, Library};
use dpsync_scan::{
    FilePlan, FileStat, RACY_WINDOW_NS, ScanCache, ScanEntry, ScanError, ScanKind, SourceChanged, SourceRoot,
};
use dpsync_store::ClusterKey;
use dpsync_store::{NewVersion, VersionStats};
use rayon::prelude::*;

use super::{Site, SiteError};
use dpsync_api::{RefreshReport, RefreshRequest};
use dpsync_store::now_ns;

/// How often a file that keeps changing under the reader is read before giving up.
const READ_ATTEMPTS: u32 = 3;
/// Dry-run path lists are cut at this many entries each.
const MAX_LISTED: usize = 1000;

impl Site {
    /// `RefreshPkgSource`. A refresh that fails takes back out of the library what it
    /// stored there and no committed version names ([`Site::take_back_imports`]).
    pub async fn refresh(&self, pkg: &str, req: RefreshRequest) -> Result<RefreshReport, SiteError> {
        self.refresh_taking_back(pkg, req, false).await
    }

    /// A scheduled refresh: the same, but a version is committed only when the content
    /// root changed (`committed` says which).
    pub(crate) async fn refresh_if_changed(&self, pkg: &str, req: RefreshRequest) -> Result<RefreshReport, SiteError> {
        self.refresh_taking_back(pkg, req, true).await
    }

    async fn refresh_taking_back(
        &self,
        pkg: &str,
        req: RefreshRequest,
        only_if_changed: bool,
    ) -> Result<RefreshReport, SiteError> {
        let stored_new = Arc::new(StoredNew::default());
        let result = self.refresh_storing(pkg, req, &stored_new, only_if_changed).await;
        if let Err(e) = &result {
            let stored = std::mem::take(&mut *stored_new.0.lock().unwrap());
            self.take_back_imports(pkg, stored, e).await;
        }
        // The scan, both manifests and their encodings are freed now: handed back off
        // the executor, without delaying the answer.
        drop(tokio::task::spawn_blocking(dpsync_agent::daemon::release_free_memory));
        result
    }

    async fn refresh_storing(
        &self,
        pkg: &str,
        req: RefreshRequest,
        stored_new: &Arc<StoredNew>,
        only_if_changed: bool,
    ) -> Result<RefreshReport, SiteError> {
        let started = Instant::now();
        let package = self.find_live_package(pkg).await?;
        if package.source_site != self.cfg.site_code {
            return Err(SiteError::Refused(format!(
                "package {} is owned by site {}; refresh it there (this site, {}, only relays it)",
                package.id, package.source_site, self.cfg.site_code
            )));
        }
        let Some(source) = package.source_path.clone() else {
            return Err(SiteError::Refused(format!("package {} has no source folder", package.id)));
        };
        let own_state = self.own_state();
        own_state.check_source(Path::new(&source))?;
        tracing::info!(package = %package.id, source = %source, verify = req.verify, dry_run = req.dry_run, "refresh started");
        let _gc_shared = self.gc_lock.read().await;
        let lock = self.package_lock(&package.id);
        let _exclusive = lock.lock().await;
        // The same across the site's nodes (no-op on SQLite, which has one).
        let _everywhere =
            self.store.cluster_lock(&[(ClusterKey::Library, true), (ClusterKey::Refresh(&package.id), false)]).await?;
        // The package as it is under the locks: a handover may have moved it meanwhile,
        // and the number of the version to commit follows its ownership chain.
        let package = self.find_live_package(&package.id).await?;
        if package.source_site != self.cfg.site_code {
            return Err(SiteError::Refused(format!(
                "package {} was handed to site {} while this refresh waited; refresh it there",
                package.id, package.source_site
            )));
        }
        let number = self.next_own_version(&package);

        let mut previous = self.store.latest_version(&package.id).await?;
        // The stored blobs are dropped once decoded: not held through the refresh.
        let (prev_manifest, prev_cache, prev_root) = match previous.as_mut() {
            Some(v) => (
                Some(
                    Manifest::decode(&std::mem::take(&mut v.manifest), &DecodeLimits::default())
                        .context("the stored manifest of the previous version is corrupt")?,
                ),
                ScanCache::decode(&std::mem::take(&mut v.scan_cache)).unwrap_or_default(),
                Some(v.summary.content_root.to_hex()),
            ),
            None => (None, ScanCache::default(), None),
        };
        let load_ms = started.elapsed().as_millis() as u64;
        let library = self.library.clone();
        let params = self.params;
        let id = package.id.clone();
        let stored = stored_new.clone();
        let (built, prev_cache) = tokio::task::spawn_blocking(move || {
            let source = Path::new(&source);
            let apart = |scan: &[ScanEntry]| own_state.check_scan(source, scan);
            let built = build(&library, &params, source, prev_manifest.as_ref(), &prev_cache, &req, &apart, &stored);
            built.map(|b| (b, prev_cache))
        })
        .await
        .context("refresh task")??;

        let mut report = built.report;
        report.phases.load_ms = load_ms;
        report.package = id.clone();
        report.previous_content_root = prev_root.clone();
        if req.dry_run {
            report.source_version = package.current_version + 1;
            report.duration_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
        let commit_started = Instant::now();
        // What to store: the manifest only when its content root is new to the package (a
        // manifest is stored once per content root); the scan cache only when it moved.
        let (root, manifest, scan_cache) = match built.version.expect("built unless dry run") {
            BuiltVersion::Same => {
                let prev = previous.as_ref().expect("only a previous version can be the same");
                (prev.summary.content_root, None, None)
            }
            BuiltVersion::New(manifest, cache) => {
                // Encoding and hashing several MB: off the executor, and the manifest once.
                let prev_root = previous.as_ref().map(|v| v.summary.content_root);
                tokio::task::spawn_blocking(move || {
                    let (encoded, root) = manifest.encode_with_root();
                    let cache = (prev_root != Some(root) || cache != prev_cache).then(|| cache.encode());
                    (root, (prev_root != Some(root)).then_some(encoded), cache)
                })
                .await
                .context("encoding task")?
            }
        };
        if only_if_changed && prev_root.as_deref() == Some(root.to_hex().as_str()) {
            // Same content: no version, but the stats read now describe it (the package
            // lock keeps the current version from moving meanwhile).
            let current = previous.as_ref().map_or(0, |v| v.summary.version);
            if let Some(scan_cache) = &scan_cache {
                self.store.set_scan_cache(&id, current, scan_cache).await?;
            }
            report.source_version = current;
            report.content_root = prev_root.clone();
            report.duration_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
        let stats = VersionStats {
            files: report.files as i64,
            dirs: report.dirs as i64,
            symlinks: report.symlinks as i64,
            total_bytes: report.total_bytes as i64,
            files_added: report.files_added as i64,
            files_changed: report.files_changed as i64,
            files_removed: report.files_removed as i64,
            files_unchanged: report.files_unchanged as i64,
            bytes_hashed: report.bytes_hashed as i64,
        };
        let stored_manifest = manifest.is_some();
        let record = self
            .store
            .commit_version(
                &id,
                NewVersion {
                    version: number,
                    content_root: root,
                    manifest,
                    scan_cache,
                    stats,
                    origin: "refresh".into(),
                    signature: None,
                },
            )
            .await?;
        self.store.prune_versions(&id, self.cfg.keep_versions).await?;
        report.source_version = record.version;
        let root = root.to_hex();
        report.content_changed = prev_root.as_deref() != Some(root.as_str());
        report.committed = true;
        report.manifest_stored = stored_manifest;
        report.content_root = Some(root);
        report.targets_queued = self.queued_targets(&id).await?;
        self.metrics.refreshes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.bytes_hashed.fetch_add(report.bytes_hashed, std::sync::atomic::Ordering::Relaxed);
        self.kick_jobs();
        report.phases.commit_ms = commit_started.elapsed().as_millis() as u64;
        report.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            package = %id,
            version = report.source_version,
            root = report.content_root.as_deref().unwrap_or(""),
            added = report.files_added,
            changed = report.files_changed,
            removed = report.files_removed,
            bytes_hashed = report.bytes_hashed,
            manifest_stored = stored_manifest,
            load_ms = report.phases.load_ms,
            scan_ms = report.phases.scan_ms,
            read_ms = report.phases.read_ms,
            commit_ms = report.phases.commit_ms,
            ms = report.duration_ms,
            "refresh committed"
        );
        Ok(report)
    }

    pub(super) async fn queued_targets(&self, package_id: &str) -> Result<u64, SiteError> {
        use dpsync_store::DistState;
        let d = self.store.distributions(package_id).await?;
        Ok(d.iter().filter(|d| !matches!(d.state, DistState::Removed | DistState::Removing)).count() as u64)
    }
}

struct Built {
    report: RefreshReport,
    version: Option<BuiltVersion>,
}

enum BuiltVersion {
    /// Every entry as in the previous version, every file vouched for by the scan cache:
    /// the previous content root, whose scan cache still holds: nothing to build, encode
    /// or store but the version row.
    Same,
    /// The scanned tree, and the stats its files' hashes were taken from.
    New(Manifest, ScanCache),
}

#[allow(clippy::too_many_arguments)]
fn build(
    library: &Arc<Library>,
    params: &ChunkParams,
    source: &Path,
    previous: Option<&Manifest>,
    prev_cache: &ScanCache,
    req: &RefreshRequest,
    apart: &dyn Fn(&[ScanEntry]) -> Result<(), SiteError>,
    stored: &StoredNew,
) -> Result<Built, SiteError> {
    let scan_started = now_ns();
    let clock = Instant::now();
    let (root, plan) = scan_source(source, previous, prev_cache, req.verify, apart)?;
    let mut report = RefreshReport { dry_run: req.dry_run, ..Default::default() };
    report.phases.scan_ms = clock.elapsed().as_millis() as u64;

    if req.dry_run {
        dry_run_report(&root, &plan, previous, &mut report);
        return Ok(Built { report, version: None });
    }
    if let Some(prev) = previous
        && !req.verify
        && same_as(&plan, prev)
    {
        for (entry, _) in &plan.items {
            count_kind(&mut report, entry);
        }
        report.files_unchanged = report.files;
        report.unchanged_fast = true;
        report.recent_window_ms = (RACY_WINDOW_NS / 1_000_000) as u64;
        report.phases.read_ms = clock.elapsed().as_millis() as u64 - report.phases.scan_ms;
        return Ok(Built { report, version: Some(BuiltVersion::Same) });
    }

    let bytes_read = AtomicU64::new(0);
    let bytes_stored = AtomicU64::new(0);
    let files_recent = AtomicU64::new(0);
    let batch = library.import_batch();
    // Each file comes back with the stat that describes the bytes its hash covers (the
    // scan's for a reused file, the pre-read fstat for a read one): the scan cache is
    // built from these, without touching the source again.
    let results: Vec<Result<(Entry, Option<FileStat>), String>> = plan
        .items
        .into_par_iter()
        .map(|(entry, decision)| -> Result<(Entry, Option<FileStat>), String> {
            Ok(match (&entry.kind, decision) {
                (ScanKind::Dir, _) => (entry_of(&entry, EntryKind::Dir), None),
                (ScanKind::Symlink { target }, _) => {
                    (entry_of(&entry, EntryKind::Symlink { target: target.clone() }), None)
                }
                (ScanKind::File, Some(FilePlan::Reuse { hash, size, chunks })) => {
                    (entry_of(&entry, EntryKind::File { size, hash, chunks }), Some(entry.stat))
                }
                (ScanKind::File, _) => {
                    let (digest, stat, mode, stored_new) = import_file(&batch, params, &root, &entry, stored)?;
                    bytes_read.fetch_add(digest.size, Ordering::Relaxed);
                    if stored_new {
                        bytes_stored.fetch_add(digest.size, Ordering::Relaxed);
                    }
                    if !req.verify && reread_unchanged(previous, prev_cache, &entry, &digest) {
                        files_recent.fetch_add(1, Ordering::Relaxed);
                    }
                    let kind = EntryKind::File { size: digest.size, hash: digest.hash, chunks: digest.chunks.into() };
                    (Entry { path: entry.path.clone(), mode, mtime_ns: stat.mtime_ns, kind }, Some(stat))
                }
            })
        })
        .collect();
    let mut entries = Vec::with_capacity(results.len());
    let mut cache = ScanCache::default();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok((e, stat)) => {
                if let Some(stat) = stat {
                    cache.record(e.path.as_str(), stat, scan_started);
                }
                entries.push(e);
            }
            Err(msg) => failures.push(msg),
        }
    }
    if !failures.is_empty() {
        let n = failures.len();
        let shown: Vec<_> = failures.into_iter().take(20).collect();
        return Err(SiteError::Refused(format!(
            "{n} file{} could not be read, nothing was committed: {}",
            if n == 1 { "" } else { "s" },
            shown.join("; ")
        )));
    }
    batch.finish().map_err(|e| {
        SiteError::Refused(if e.is_disk_full() {
            format!("the content library's disk is full ({e}); free space, then refresh again")
        } else {
            format!("the content library cannot store the content, nothing was committed: {e}")
        })
    })?;
    let manifest = Manifest::new(entries).map_err(|e| {
        SiteError::Refused(format!(
            "the source tree cannot be published, nothing was committed: {e}; fix it, then refresh again"
        ))
    })?;
    tally(&manifest, previous, &mut report);
    report.files_read = plan.files_to_read;
    report.bytes_hashed = bytes_read.into_inner();
    report.bytes_stored = bytes_stored.into_inner();
    report.files_recent = files_recent.into_inner();
    report.recent_window_ms = (RACY_WINDOW_NS / 1_000_000) as u64;
    report.phases.read_ms = clock.elapsed().as_millis() as u64 - report.phases.scan_ms;
    Ok(Built { report, version: Some(BuiltVersion::New(manifest, cache)) })
}

/// Whether the scanned tree is `previous` exactly: the same entries in the same order
/// (both sorted by path bytes) with the same kinds, modes, times and link targets, and
/// every file reused (its stat is the one its hash was taken with, so its hash, size and
/// chunks are the previous entry's). The manifest would then encode to the same bytes,
/// so its content root is the previous one, and the scan cache would come out the same
/// (each file's stat is the cached one, and a cache only names files of its manifest).
fn same_as(plan: &dpsync_scan::Plan, previous: &Manifest) -> bool {
    let prev = previous.entries();
    plan.items.len() == prev.len()
        && plan.items.iter().zip(prev).all(|((entry, decision), old)| {
            entry.path == old.path
                && entry.mode == old.mode
                && entry.stat.mtime_ns == old.mtime_ns
                && match (&entry.kind, &old.kind) {
                    (ScanKind::Dir, EntryKind::Dir) => true,
                    (ScanKind::Symlink { target }, EntryKind::Symlink { target: old }) => target == old,
                    (ScanKind::File, EntryKind::File { .. }) => matches!(decision, Some(FilePlan::Reuse { .. })),
                    _ => false,
                }
        })
}

/// Opens the source folder once and scans it through that descriptor (the scan and every
/// read after it never cross a symlink, so a writer racing the refresh cannot redirect
/// them outside), refusing a tree with entries it cannot publish; plans what to read.
fn scan_source(
    source: &Path,
    previous: Option<&Manifest>,
    prev_cache: &ScanCache,
    verify: bool,
    apart: &dyn Fn(&[ScanEntry]) -> Result<(), SiteError>,
) -> Result<(SourceRoot, dpsync_scan::Plan), SiteError> {
    let refused = |e: ScanError| match e {
        ScanError::Missing(_) | ScanError::NotADirectory(_) => {
            SiteError::Refused(format!("{e}; fix the source path or the folder, then refresh again"))
        }
        e => SiteError::Refused(e.to_string()),
    };
    let root = SourceRoot::open(source).map_err(refused)?;
    let scan = root.scan().map_err(refused)?;
    apart(&scan.entries)?;
    if !scan.problems.is_empty() {
        let n = scan.problems.len();
        let shown: Vec<String> = scan.problems.iter().take(20).map(|p| p.to_string()).collect();
        let more = if n > 20 { format!("; and {} more", n - 20) } else { String::new() };
        return Err(SiteError::Refused(format!(
            "{n} source entr{} refused, nothing was committed: {}{more}",
            if n == 1 { "y" } else { "ies" },
            shown.join("; ")
        )));
    }
    let plan = dpsync_scan::plan(scan.entries, previous, prev_cache, verify);
    Ok((root, plan))
}

/// What a refresh would change (`--dry-run`), reading only the files the scan cache
/// cannot vouch for although their size, time and mode still match the previous version
/// (files modified too recently at the last refresh to trust their stat, or versions
/// restored by `rollback` with the older version's cache): the real refresh reads them,
/// finds their content unchanged and commits them as unchanged, so the dry run hashes
/// them too instead of listing them as changed.
fn dry_run_report(
    root: &SourceRoot,
    plan: &dpsync_scan::Plan,
    previous: Option<&Manifest>,
    report: &mut RefreshReport,
) {
    let prev = previous.map(|m| m.entries()).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    for (entry, decision) in &plan.items {
        if entry.kind == ScanKind::File {
            seen.insert(entry.path.as_str());
        }
        count_kind(report, entry);
        // A path that was not a file before (a folder or a symlink) is a new file.
        let old_file = previous.and_then(|m| m.get(entry.path.as_str())).filter(|e| e.is_file());
        match (decision, old_file) {
            (Some(FilePlan::Read), None) => {
                report.files_added += 1;
                push_listed(&mut report.added, entry);
            }
            (Some(FilePlan::Read), Some(old)) if same_content(root, entry, old) => report.files_unchanged += 1,
            (Some(FilePlan::Read), Some(_)) => {
                report.files_changed += 1;
                push_listed(&mut report.changed, entry);
            }
            (Some(FilePlan::Reuse { .. }), _) => report.files_unchanged += 1,
            (None, _) => {}
        }
    }
    // A file that is now a folder or a symlink was removed.
    for e in prev.iter().filter(|e| e.is_file() && !seen.contains(e.path.as_str())) {
        report.files_removed += 1;
        if report.removed.len() < MAX_LISTED {
            report.removed.push(e.path.to_string());
        }
    }
    report.bytes_to_hash = plan.bytes_to_read;
}

/// Whether a file the refresh must read would come out equal to its previous entry: same
/// size, modification time and mode, and (read now, beneath the source root) the same
/// BLAKE3. Any doubt (an unreadable file) counts as a change.
fn same_content(root: &SourceRoot, entry: &ScanEntry, old: &Entry) -> bool {
    let EntryKind::File { size, hash, .. } = &old.kind else { return false };
    if *size != entry.stat.size || old.mtime_ns != entry.stat.mtime_ns || old.mode != entry.mode {
        return false;
    }
    let Ok(file) = root.open_file(&entry.path) else { return false };
    let mut hasher = blake3::Hasher::new();
    match hasher.update_reader(&file) {
        Ok(_) => FileHash::from(hasher.finalize()) == *hash,
        Err(_) => false,
    }
}

/// Counts the new manifest's entries, and what changed against the previous version.
fn tally(manifest: &Manifest, previous: Option<&Manifest>, report: &mut RefreshReport) {
    for e in manifest.entries() {
        match e.kind {
            EntryKind::Dir => report.dirs += 1,
            EntryKind::Symlink { .. } => report.symlinks += 1,
            EntryKind::File { size, .. } => {
                report.files += 1;
                report.total_bytes += size;
            }
        }
    }
    let empty = Manifest::default();
    let diff = manifest.diff(previous.unwrap_or(&empty));
    let is_file = |m: &Manifest, p: &dpsync_hash::RelPath| m.get(p.as_str()).is_some_and(Entry::is_file);
    let was_file = |p: &dpsync_hash::RelPath| previous.is_some_and(|m| is_file(m, p));
    report.files_added = diff.added.iter().filter(|p| is_file(manifest, p)).count() as u64;
    report.files_removed = diff.removed.iter().filter(|p| was_file(p)).count() as u64;
    // A path whose kind changed counts as a removed file and/or an added one, not a change.
    for p in &diff.changed {
        match (was_file(p), is_file(manifest, p)) {
            (true, true) => report.files_changed += 1,
            (false, true) => report.files_added += 1,
            (true, false) => report.files_removed += 1,
            (false, false) => {}
        }
    }
    report.files_unchanged = report.files - report.files_added - report.files_changed;
}

/// Whether a file was read only because the previous refresh found it modified too
/// recently to record its stat (see [`dpsync_scan::ScanCache::record`]): it is in the
/// previous version with the same content, and the scan cache has nothing for it.
fn reread_unchanged(previous: Option<&Manifest>, cache: &ScanCache, entry: &ScanEntry, digest: &FileDigest) -> bool {
    cache.get(entry.path.as_str()).is_none()
        && previous.and_then(|m| m.get(entry.path.as_str())).and_then(Entry::file_hash) == Some(digest.hash)
}

fn push_listed(list: &mut Vec<String>, e: &ScanEntry) {
    if list.len() < MAX_LISTED {
        list.push(e.path.to_string());
    }
}

fn count_kind(report: &mut RefreshReport, e: &ScanEntry) {
    match e.kind {
        ScanKind::Dir => report.dirs += 1,
        ScanKind::Symlink { .. } => report.symlinks += 1,
        ScanKind::File => {
            report.files += 1;
            report.total_bytes += e.stat.size;
        }
    }
}

fn entry_of(e: &ScanEntry, kind: EntryKind) -> Entry {
    Entry { path: e.path.clone(), mode: e.mode, mtime_ns: e.stat.mtime_ns, kind }
}

/// Reads one source file into the library. The file is opened beneath the source root
/// without crossing a symlink in any component (it was a regular file when scanned) and
/// re-read when its size or times move while it is read.
fn import_file(
    batch: &ImportBatch,
    params: &ChunkParams,
    root: &SourceRoot,
    entry: &ScanEntry,
    stored: &StoredNew,
) -> Result<(FileDigest, FileStat, u32, bool), String> {
    // Path rules refuse control characters, but not every character that reorders text.
    let name = escape_controls(entry.path.as_str());
    for _ in 0..READ_ATTEMPTS {
        // A regular file, or a `SourceChanged` error that names the path.
        let file = root.open_file(&entry.path).map_err(|e| match e.kind() {
            _ if SourceChanged::of(&e).is_some() => e.to_string(),
            std::io::ErrorKind::NotFound => format!("{name}: vanished during the refresh; refresh again"),
            _ => format!("{name}: cannot be opened: {e}"),
        })?;
        let before = file.metadata().map_err(|e| format!("{name}: {e}"))?;
        let imported = batch.import(&file, params).map_err(|e| {
            if e.is_disk_full() {
                format!("{name}: the content library's disk is full ({e}); free space, then refresh again")
            } else {
                format!("{name}: {e}")
            }
        })?;
        // Every attempt's content counts, also the ones of a file that kept changing.
        stored.record(&imported);
        let after = file.metadata().map_err(|e| format!("{name}: {e}"))?;
        let (b, a) = (FileStat::of(&before), FileStat::of(&after));
        if b == a && imported.digest.size == b.size {
            return Ok((imported.digest, b, before.mode() & 0o7777, imported.stored_new));
        }
        tracing::debug!(path = %entry.path, "file changed while being read; reading it again");
    }
    Err(format!(
        "{name}: kept changing while it was read ({READ_ATTEMPTS} attempts); stop writing to it, then refresh again"
    ))
}

/// Library objects a refresh stored that were not there when it read them: what it takes
/// back out if it fails.
#[derive(Debug, Default)]
struct StoredNew(Mutex<Vec<FileHash>>);

impl StoredNew {
    fn record(&self, imported: &Imported) {
        if imported.stored_new {
            self.0.lock().unwrap().push(imported.digest.hash);
        }
    }
}

impl Site {
    /// After a failed refresh of `pkg`: removes from the library the objects it stored
    /// (`stored`) that no committed version names, so that a refused refresh leaves the
    /// library as it found it (a file that kept changing left one object per attempt).
    ///
    /// It runs with the gc lock held exclusively, so no refresh is importing meanwhile: a
    /// concurrent refresh that read the same content has committed it by then (and a
    /// committed version keeps it) or failed and taken back its own; and no `gc` runs.
    async fn take_back_imports(&self, pkg: &str, stored: Vec<FileHash>, why: &SiteError) {
        if stored.is_empty() {
            return;
        }
        let _exclusive = self.gc_lock.write().await;
        let _everywhere = match self.store.cluster_lock(&[(ClusterKey::Library, false)]).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    package = pkg,
                    "the failed refresh's content stays in the library until `dpsync gc`: {e}"
                );
                return;
            }
        };
        let manifests = match self.store.live_file_hashes().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(
                    package = pkg,
                    "the failed refresh's content stays in the library until `dpsync gc`: {e}"
                );
                return;
            }
        };
        let library = self.library.clone();
        let taken = tokio::task::spawn_blocking(move || -> Result<(u64, u64), String> {
            let mut live = HashSet::<FileHash>::new();
            for blob in manifests {
                let m = Manifest::decode(&blob, &DecodeLimits::default())
                    .map_err(|e| format!("a stored manifest is corrupt: {e}"))?;
                live.extend(m.files().filter_map(|e| e.file_hash()));
            }
            let (mut objects, mut bytes) = (0, 0);
            for h in stored.into_iter().collect::<HashSet<_>>() {
                if live.contains(&h) {
                    continue;
                }
                // Stored but never named (a batch that stopped before naming it): nothing to do.
                let Ok(md) = std::fs::symlink_metadata(library.object_path(&h)) else { continue };
                library.remove(&h).map_err(|e| e.to_string())?;
                objects += 1;
                bytes += md.len();
            }
            Ok((objects, bytes))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match taken {
            Ok((0, _)) => {}
            Ok((objects, bytes)) => tracing::info!(
                package = pkg,
                objects,
                bytes,
                "the failed refresh's content was removed from the library ({why})"
            ),
            Err(e) => {
                tracing::warn!(
                    package = pkg,
                    "the failed refresh's content stays in the library until `dpsync gc`: {e}"
                )
            }
        }
    }
}

/// The server's own state, which a package source must stay apart from: a source that
/// is, contains or lies inside it would publish the site's signing key, its database
/// (target tokens) and its content library to every target.
#[derive(Debug, Default)]
pub(super) struct OwnState {
    /// Folders a source may not be, contain or lie inside: (what, path, canonical path).
    dirs: Vec<(&'static str, PathBuf, PathBuf)>,
    /// Files a source may not contain.
    files: Vec<(&'static str, PathBuf, PathBuf)>,
    /// The (device, inode) of each of them that exists, for the scan: a source that
    /// reaches one through a bind mount or a rename still contains it.
    ids: HashMap<(u64, u64), (&'static str, PathBuf)>,
}

impl Site {
    /// The data directory, the content library and the TLS folder; the SQLite database
    /// and the TLS key wherever they are.
    pub(super) fn own_state(&self) -> OwnState {
        let data = &self.cfg.data_dir;
        let mut out = OwnState::default();
        let mut add = |dir: bool, what: &'static str, path: PathBuf| {
            // A path that does not exist (yet) is compared as written, under its
            // canonical parent (the TLS folder is created on first use).
            let canonical = std::fs::canonicalize(&path).ok().or_else(|| {
                let parent = std::fs::canonicalize(path.parent()?).ok()?;
                Some(parent.join(path.file_name()?))
            });
            let Some(canonical) = canonical else { return };
            if let Ok(md) = std::fs::metadata(&canonical) {
                out.ids.entry((md.dev(), md.ino())).or_insert((what, path.clone()));
            }
            let list = if dir { &mut out.dirs } else { &mut out.files };
            list.push((what, path, canonical));
        };
        add(true, "the server's data directory", data.clone());
        add(true, "the content library", self.library.root().to_owned());
        add(true, "the TLS folder", data.join("tls"));
        if let Some(db) = sqlite_file(&self.cfg.database_url) {
            add(false, "the database", db);
        }
        if let Some(key) = &self.cfg.tls.key {
            add(false, "the TLS key", key.clone());
        }
        out
    }
}

impl OwnState {
    /// Refuses a source folder that is, contains or lies inside one of these folders, or
    /// contains one of these files (symlinks resolved on both sides). A source that does
    /// not resolve is left to the caller, which names it.
    pub(super) fn check_source(&self, source: &Path) -> Result<(), SiteError> {
        let Ok(src) = std::fs::canonicalize(source) else { return Ok(()) };
        let found = self
            .dirs
            .iter()
            .find_map(|(what, path, dir)| {
                let relation = if src == *dir {
                    "is"
                } else if dir.starts_with(&src) {
                    "contains"
                } else if src.starts_with(dir) {
                    "lies inside"
                } else {
                    return None;
                };
                Some((relation, *what, path))
            })
            .or_else(|| {
                self.files
                    .iter()
                    .find(|(_, _, file)| file.starts_with(&src))
                    .map(|(what, path, _)| ("contains", *what, path))
            });
        match found {
            Some((relation, what, path)) => Err(refuse_source(source, &src, relation, what, path)),
            None => Ok(()),
        }
    }

    /// Refuses a scanned tree holding one of these folders or files itself (reached
    /// without a symlink, e.g. through a bind mount, or moved in since the path check).
    fn check_scan(&self, source: &Path, entries: &[ScanEntry]) -> Result<(), SiteError> {
        for e in entries {
            if let Some((what, path)) = self.ids.get(&(e.stat.dev, e.stat.ino)) {
                return Err(SiteError::Refused(format!(
                    "source {} holds {what} {} (as {}); a refresh would publish the server's own \
                     state to every target; nothing was committed: use a folder apart from it",
                    source.display(),
                    path.display(),
                    e.path
                )));
            }
        }
        // The path again: it may have been pointed at the server's state since it was
        // checked (a folder inside the library holds nothing the scan could recognize).
        self.check_source(source)
    }
}

fn refuse_source(source: &Path, canonical: &Path, relation: &str, what: &str, path: &Path) -> SiteError {
    let resolved = if canonical == source { String::new() } else { format!(" (resolved to {})", canonical.display()) };
    SiteError::Refused(format!(
        "source {}{resolved} {relation} {what} {}; a refresh would publish the server's own state \
         (keys, tokens, content library) to every target: use a folder apart from it",
        source.display(),
        path.display()
    ))
}

/// The file of a `sqlite:` database URL.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}
