//! Several server nodes of one site: identity, heartbeats and leases.
//!
//! What ties a node to its site: the database records the site's signing key (its public
//! half) and the id of its content library, and each node checks, before it serves, that
//! the key and the library it was given are those. Two servers started on one database
//! with their own key or library would sign versions DPs refuse and name content the
//! other cannot read; this makes that a refusal at start instead.
//!
//! While it runs, a node beats every third of its lease: the beat renews the leases of
//! the jobs it runs, and frees the jobs of nodes whose leases ran out (they died) for
//! any node to claim.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dpsync_store::{Backend, Store, now_ms};
use dpsync_transfer::trust::SiteKey;

use crate::{ServerConfig, Site, SiteError};

/// The file in a content library that names it.
const LIBRARY_ID: &str = "library-id";

/// A random id for this start of the node.
pub(crate) fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    for b in &mut bytes {
        *b = rand::random();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that the database, the signing key and the library belong together, recording
/// the key and the library id on the first start; a mismatch is refused naming what
/// differs and what to do.
pub(crate) async fn check(store: &Store, cfg: &ServerConfig, key: &SiteKey) -> Result<()> {
    let public = key.public_hex();
    let recorded = store.meta_set_once("site_key", &public).await?;
    if recorded != public {
        bail!(
            "the signing key {} (public {}…) is not the key of site {} in this database (public {}…): another \
             server of this site uses the database with its own key; start every node with the same --library \
             (it holds site.key), or give this server its own database",
            cfg.site_key_path.display(),
            &public[..16],
            cfg.site_code,
            &recorded[..recorded.len().min(16)]
        );
    }
    let in_db = store.meta_get("library_id").await?;
    let dir = cfg.library_dir.clone();
    // A library without an id (made before ids, or restored from a backup) takes the
    // database's when no other node of the site runs: on SQLite, which has one server,
    // always; on PostgreSQL, a folder without an id while another node serves is another
    // library, and is refused.
    let others_alive = match store.backend() {
        Backend::Sqlite => false,
        Backend::Postgres => {
            let lease = cfg.lease.as_millis() as i64;
            store
                .nodes()
                .await?
                .iter()
                .any(|n| n.name != cfg.node && n.stopped_at.is_none() && now_ms() - n.heartbeat_at <= lease)
        }
    };
    let adopt = in_db.clone().filter(|_| !others_alive);
    let id = tokio::task::spawn_blocking(move || library_id(&dir, adopt.as_deref())).await.context("library id")??;
    let recorded = store.meta_set_once("library_id", &id).await?;
    if recorded != id {
        bail!(
            "the content library {} (id {id}) is not the library of site {} in this database (id {recorded}): \
             another server of this site uses the database with another library; start every node with the same \
             --library (a shared folder), or give this server its own database",
            cfg.library_dir.display(),
            cfg.site_code
        );
    }
    if store.backend() == Backend::Postgres {
        wait_for_same_name(store, cfg).await?;
    }
    Ok(())
}

/// The id in `dir/library-id`, created (with `adopt` if given, else a random one) when
/// the library has none. Of two nodes creating it at once, the first one's stays.
fn library_id(dir: &Path, adopt: Option<&str>) -> Result<String> {
    let path = dir.join(LIBRARY_ID);
    let read = |path: &Path| -> Result<String> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(text.trim().to_owned())
    };
    if path.exists() {
        return read(&path);
    }
    let id = adopt.map_or_else(|| format!("{}{}", instance_id(), instance_id()), str::to_owned);
    let tmp = dir.join(format!(".{LIBRARY_ID}.tmp-{}", std::process::id()));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(format!("{id}\n").as_bytes()).and_then(|_| f.sync_all()))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(id),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(&path),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

/// A node whose name another live process uses would reset that one's jobs: when the
/// name's last heartbeat is recent, wait until its lease would have run out; a heartbeat
/// meanwhile means it runs, and this start is refused.
async fn wait_for_same_name(store: &Store, cfg: &ServerConfig) -> Result<()> {
    let lease = cfg.lease.as_millis() as i64;
    if let Some(prev) = store.node(&cfg.node).await?
        && prev.stopped_at.is_none()
        && now_ms() - prev.heartbeat_at < lease
    {
        tracing::info!(node = %cfg.node, "node {} beat recently; waiting for its lease to run out", cfg.node);
        let wait = (prev.heartbeat_at + lease - now_ms()).clamp(0, lease) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if let Some(now) = store.node(&cfg.node).await?
            && now.heartbeat_at > prev.heartbeat_at
        {
            bail!(
                "node {} is running already (it beat {} ms ago); give this server another --node NAME",
                cfg.node,
                now_ms() - now.heartbeat_at
            );
        }
    }
    Ok(())
}

/// Beats until `stop`: renews this node's heartbeat and job leases, and frees the jobs of
/// nodes that stopped beating (waking the job runner when it freed some).
pub(crate) async fn heartbeat(site: std::sync::Arc<Site>, stop: tokio_util::sync::CancellationToken) {
    let every = site.cfg.lease / 3;
    let lease = site.lease();
    loop {
        match site.store.heartbeat(&lease, &site.instance).await {
            Ok(true) => {}
            Ok(false) => tracing::error!(
                node = %lease.node,
                "another server took this node's name ({}); give each node its own --node",
                lease.node
            ),
            Err(e) => tracing::warn!("cannot renew this node's leases: {e}"),
        }
        match site.store.reclaim_expired(now_ms()).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(jobs = n, "took over jobs whose node stopped renewing its lease");
                site.kick_jobs();
            }
            Err(e) => tracing::warn!("cannot look for expired leases: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => break,
        }
    }
}

impl Site {
    /// This node's claim on the jobs it runs.
    pub(crate) fn lease(&self) -> dpsync_store::Lease {
        dpsync_store::Lease { node: self.cfg.node.clone(), ms: self.cfg.lease.as_millis() as i64 }
    }

    /// The nodes of this site, for `dpsync info`.
    pub(crate) async fn node_infos(&self) -> Result<Vec<dpsync_api::NodeInfo>, SiteError> {
        let running = self.store.jobs_by_node().await?;
        let lease = self.cfg.lease.as_millis() as i64;
        let now = now_ms();
        Ok(self
            .store
            .nodes()
            .await?
            .into_iter()
            .map(|n| dpsync_api::NodeInfo {
                jobs_running: running.iter().find(|(name, _)| *name == n.name).map_or(0, |(_, c)| *c),
                alive: n.stopped_at.is_none() && now - n.heartbeat_at <= lease,
                name: n.name,
                started_at: n.started_at,
                last_heartbeat_at: n.heartbeat_at,
            })
            .collect())
    }
}
