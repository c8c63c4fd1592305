//! `dpsync export`: a version of a package as a prestaged bundle
//! ([`dpsync_transfer::bundle`]), for a DP that is reached with a disk. The bundle is
//! written on a blocking thread straight from the library into a bounded channel that
//! the admin route streams to the CLI: memory holds one chunk and a few buffers,
//! whatever the package's size.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use dpsync_hash::{ChunkId, DecodeLimits, FileHash, Manifest};
use dpsync_transfer::bundle::{BundleHeader, BundleWriter};

use crate::{Site, SiteError};

/// What an export will write: decided (and every error that can be known in advance
/// reported) before the first byte is streamed.
#[derive(Debug)]
pub struct ExportPlan {
    pub header: BundleHeader,
    manifest: Vec<u8>,
    /// Each chunk once, in manifest order: where it is in the library.
    chunks: Vec<(ChunkId, FileHash, u64, u32)>,
}

/// Bytes handed to the stream at a time.
const PIECE: usize = 1 << 20;

impl Site {
    /// Plans the export of `version` (default: the current one) of `pkg`, leaving out the
    /// chunks of `base` when given.
    pub async fn plan_export(
        &self,
        pkg: &str,
        version: Option<i64>,
        base: Option<i64>,
    ) -> Result<ExportPlan, SiteError> {
        let p = self.find_package(pkg).await?;
        let version = version.unwrap_or(p.current_version);
        if version <= 0 {
            return Err(SiteError::Invalid(format!(
                "{} has no version yet; run `dpsync refresh {}` first",
                p.id, p.id
            )));
        }
        let retained = |v: i64| {
            SiteError::NotFound(format!(
                "{} version {v} is not kept on this site; `dpsync package show {}` lists the versions it keeps",
                p.id, p.id
            ))
        };
        let summary = self.store.version_summary(&p.id, version).await?.ok_or_else(|| retained(version))?;
        let encoded = self.store.version_manifest(&p.id, version).await?.ok_or_else(|| retained(version))?;
        let base_encoded = match base {
            Some(b) if b >= version => {
                return Err(SiteError::Invalid(format!(
                    "--base-version {b} is not older than version {version}; give an older version the DP already has"
                )));
            }
            Some(b) => Some(self.store.version_manifest(&p.id, b).await?.ok_or_else(|| retained(b))?),
            None => None,
        };
        let root = summary.content_root.to_hex();
        let signed = self
            .signed(&p, version, &root, summary.signature.clone())
            .map_err(|e| SiteError::Refused(format!("{} version {version} cannot be exported: {e}", p.id)))?;
        let id = p.id.clone();
        let (manifest, chunks) = tokio::task::spawn_blocking(move || -> Result<_, SiteError> {
            let decode = |blob: &[u8]| {
                Manifest::decode(blob, &DecodeLimits::default())
                    .map_err(|e| SiteError::Internal(anyhow::anyhow!("the stored manifest of {id} is damaged: {e}")))
            };
            let m = decode(&encoded)?;
            let mut skip: HashSet<ChunkId> = HashSet::new();
            if let Some(b) = &base_encoded {
                skip.extend(decode(b)?.files().flat_map(|e| e.chunks().iter().map(|c| c.id)));
            }
            let mut chunks = Vec::new();
            for e in m.files() {
                let Some(hash) = e.file_hash() else { continue };
                let mut offset = 0u64;
                for c in e.chunks() {
                    if skip.insert(c.id) {
                        chunks.push((c.id, hash, offset, c.len));
                    }
                    offset += u64::from(c.len);
                }
            }
            Ok((encoded, chunks))
        })
        .await
        .map_err(|e| SiteError::Internal(anyhow::anyhow!("export worker: {e}")))??;
        let header = BundleHeader {
            package: p.id.clone(),
            name: p.name.clone(),
            source_site: signed.source_site,
            version,
            content_root: root,
            signature: signed.signature,
            site_key: signed.site_key,
            base_version: base,
            chunks: chunks.len() as u64,
            chunk_bytes: chunks.iter().map(|c| u64::from(c.3)).sum(),
        };
        Ok(ExportPlan { header, manifest, chunks })
    }

    /// Writes `plan` to `out` (blocking: call on a blocking thread). Every chunk is
    /// checked against its id as it is read, so a damaged library object fails the
    /// export naming it instead of producing a bundle every DP refuses. The library is
    /// held against `gc` meanwhile.
    pub fn write_export(&self, plan: ExportPlan, out: impl Write) -> Result<(), SiteError> {
        let _no_gc = self.gc_lock.blocking_read();
        let fail = |e: std::io::Error| SiteError::Internal(anyhow::anyhow!("writing the bundle: {e}"));
        let mut w = BundleWriter::new(out, &plan.header, &plan.manifest).map_err(fail)?;
        for (id, file, offset, len) in &plan.chunks {
            let data = self
                .library
                .read_range(file, *offset, *len as usize)
                .map_err(|e| SiteError::Internal(anyhow::anyhow!("{} chunk {id}: {e}", plan.header.package)))?;
            if ChunkId::from(blake3::hash(&data)) != *id {
                return Err(SiteError::Internal(anyhow::anyhow!(
                    "library object {file} is damaged (chunk {id} does not match); `dpsync refresh {} --verify` stores it again",
                    plan.header.package
                )));
            }
            w.chunk(id, &data).map_err(fail)?;
        }
        w.finish().map_err(fail)?;
        Ok(())
    }
}

/// A `Write` that hands its bytes in pieces to a bounded channel (the admin route's
/// response body): a slow reader slows the writer instead of filling memory.
#[derive(Debug)]
pub struct ChannelWriter {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl ChannelWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Self {
        Self { buf: Vec::with_capacity(PIECE), tx }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE)));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client stopped reading"))
    }

    /// Ends the stream with `error` (the client sees a broken body, not a short file).
    pub fn fail(self, error: String) {
        let _ = self.tx.blocking_send(Err(std::io::Error::other(error)));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Streams `plan` as a body: the receiving half of a bounded channel fed from a blocking
/// thread.
pub fn stream_export(site: Arc<Site>, plan: ExportPlan) -> tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let package = plan.header.package.clone();
        let version = plan.header.version;
        let mut out = ChannelWriter::new(tx);
        // `write_export` flushes through `finish`; a failure ends the body with an error.
        match site.write_export(plan, &mut out) {
            Ok(()) => tracing::info!(package = %package, version, "bundle exported"),
            Err(e) => {
                tracing::error!(package = %package, version, "export failed: {e}");
                ChannelWriter::new(err_tx).fail(e.to_string());
            }
        }
    });
    rx
}
