//! `dpsync agent import`: installs a prestaged bundle ([`dpsync_transfer::bundle`]) on
//! this receiver through the same path a push takes: the bundle's manifest is offered
//! with its owner's signature (checked against the pinned key, or pinned on first use,
//! like any offer; an older version than the installed one is refused there), the
//! chunks the receiver lacks are stored from the bundle in batches, and the version is
//! committed (built and switched like a pushed one). The bundle is read once, chunk by
//! chunk, on blocking threads; nothing is committed unless the whole file checked out,
//! trailer included, so a truncated or altered bundle installs nothing.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use dpsync_hash::ChunkId;
use dpsync_transfer::bundle::BundleReader;
use dpsync_transfer::service::{OfferMeta, ReceiveError, Receiver};
use serde::Serialize;

use crate::{Agent, VersionSink};

/// What `dpsync agent import --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub package: String,
    pub version: i64,
    /// Whether this import installed the version (false: nothing changed, see `message`).
    pub installed: bool,
    pub message: String,
    /// Chunks in the bundle, and how many of them this receiver lacked and took.
    pub chunks_in_bundle: u64,
    pub chunks_used: u64,
    pub bytes_used: u64,
}

/// Chunk bytes handed to the receiver per batch.
const BATCH: u64 = 4 << 20;

type Reader = BundleReader<BufReader<File>>;

impl<S: VersionSink> Agent<S> {
    /// Installs the version in the bundle at `path` (see the module docs).
    pub async fn import_bundle(&self, path: &Path) -> Result<ImportReport> {
        let shown = path.display().to_string();
        let file: PathBuf = path.to_owned();
        let f = File::open(&file).with_context(|| format!("cannot open the bundle {shown}"))?;
        let reader =
            blocking(move || -> Result<Reader> { Ok(BundleReader::open(BufReader::with_capacity(1 << 20, f))?) })
                .await
                .with_context(|| format!("{shown} is refused; nothing was installed"))?;
        let h = reader.header().clone();
        let (pkg, version) = (h.package.clone(), h.version);
        let report = |installed: bool, message: String, used: u64, bytes: u64| ImportReport {
            package: pkg.clone(),
            version,
            installed,
            message,
            chunks_in_bundle: h.chunks,
            chunks_used: used,
            bytes_used: bytes,
        };
        let state = self.package_state(&pkg).await.map_err(refused)?;
        match state.installed_version {
            Some(v) if v > version => {
                return Ok(report(
                    false,
                    format!(
                        "nothing changed: {pkg} version {v} is installed, newer than the bundle's version {version}"
                    ),
                    0,
                    0,
                ));
            }
            Some(v) if v == version && !state.broken && state.installed_root.as_deref() == Some(&h.content_root) => {
                return Ok(report(
                    false,
                    format!("nothing changed: {pkg} version {version} is already installed"),
                    0,
                    0,
                ));
            }
            _ => {}
        }
        let meta = OfferMeta {
            name: Some(h.name.clone()),
            source_site: Some(h.source_site.clone()),
            signature: h.signature.clone(),
            site_key: h.site_key.clone(),
        };
        let manifest = Arc::new(reader.manifest().clone());
        let missing = self.offer(&pkg, version, manifest, false, meta).await.map_err(refused)?;
        let mut lacking: HashSet<ChunkId> = missing.into_iter().collect();
        let (mut used, mut bytes) = (0u64, 0u64);
        let mut reader = reader;
        loop {
            let (r, still, batch, done) = blocking(move || next_batch(reader, lacking))
                .await
                .with_context(|| format!("{shown} is refused; nothing was installed"))?;
            (reader, lacking) = (r, still);
            used += batch.len() as u64;
            bytes += batch.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
            if !batch.is_empty() {
                self.store_chunks(&pkg, version, batch).await.map_err(refused)?;
            }
            if done {
                break;
            }
        }
        if !lacking.is_empty() {
            let base = h.base_version.map_or(String::new(), |b| format!(" (it leaves out what version {b} has)"));
            bail!(
                "nothing was installed: {shown} lacks {} chunks of {pkg} version {version} that this DP does not hold{base}; \
                 import a bundle of the base version first, or export one without --base-version",
                lacking.len()
            );
        }
        self.commit(&pkg, version).await.map_err(refused)?;
        // The commit's clean-up (old trees, unused objects) holds the package's lock.
        drop(self.core.lock(&pkg).lock_owned().await);
        Ok(report(true, format!("{pkg} version {version} installed from {shown}"), used, bytes))
    }
}

/// Reads chunks until about [`BATCH`] bytes of those still `lacking` (taken out of it;
/// the others are checked and skipped); `done` once the bundle's end checked out.
#[allow(clippy::type_complexity)]
fn next_batch(
    mut r: Reader,
    mut lacking: HashSet<ChunkId>,
) -> Result<(Reader, HashSet<ChunkId>, Vec<(ChunkId, Bytes)>, bool)> {
    let mut batch = Vec::new();
    let mut size = 0u64;
    while size < BATCH {
        match r.next_chunk()? {
            Some((id, data)) => {
                if lacking.remove(&id) {
                    size += data.len() as u64;
                    batch.push((id, data));
                }
            }
            None => return Ok((r, lacking, batch, true)),
        }
    }
    Ok((r, lacking, batch, false))
}

fn refused(e: ReceiveError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("import worker")?
}
