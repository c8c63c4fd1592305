//! The server's configuration, resolved once at start: defaults < TOML file < `DPSYNC_*`
//! environment variables < command-line flags (clap reads the environment for each
//! flag, so "flag or env" arrives here as one `Option`).

use std::path::PathBuf;

use anyhow::{Result, bail};
use dpsync_agent::daemon::{TlsOptions, absolute, load_toml, read_secret};
use serde::Deserialize;

use crate::DistConfig;

/// Settings of `dpsync server`, as written in its TOML file. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub data_dir: Option<PathBuf>,
    /// Three characters, A–Z and 0–9. Default `PS1`.
    pub site_code: Option<String>,
    /// Default `DATA_DIR/admin.sock`.
    pub socket: Option<PathBuf>,
    /// Receiving side for a parent site (child sites only).
    pub listen: Option<String>,
    /// File holding the token a parent must present on `listen` (mode 0600).
    pub token_file: Option<PathBuf>,
    /// Free space the receiving side keeps on the data disk, in MiB. Default 256.
    pub disk_reserve_mib: Option<u64>,
    /// TCP address serving only `/metrics` for Prometheus, e.g. 127.0.0.1:9464.
    pub metrics_listen: Option<String>,
    /// Default `sqlite://DATA_DIR/dpsync.db`.
    pub database_url: Option<String>,
    /// Source versions kept per package (older ones are pruned; their content is
    /// collected by `dpsync gc`). Default 5, minimum 2.
    pub keep_versions: Option<i64>,
    /// Targets pushed to at once. Default 8.
    pub parallel_targets: Option<usize>,
    /// Retries after a failed attempt before a target is `failed`. Default 5.
    pub retries: Option<i64>,
    /// First retry delay in milliseconds (doubles each retry, ±25 % jitter). Default 2000.
    pub retry_delay_ms: Option<u64>,
}

/// The resolved server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub site_code: String,
    pub socket: PathBuf,
    pub listen: Option<String>,
    pub database_url: String,
    pub keep_versions: i64,
    pub dist: DistConfig,
    pub listen_token: Option<String>,
    pub disk_reserve: u64,
    pub tls: TlsOptions,
    pub trust: Vec<(String, String)>,
    pub strict_trust: bool,
    /// TCP address serving only `/metrics`.
    pub metrics_listen: Option<String>,
    /// The TOML file the server was started with (absolute), if any: `dpsync backup`
    /// copies it.
    pub config_file: Option<PathBuf>,
}

/// What flags and environment gave.
#[derive(Debug, Default)]
pub struct ServerOverrides {
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub site_code: Option<String>,
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub parallel_targets: Option<usize>,
    pub retries: Option<i64>,
    pub retry_delay_ms: Option<u64>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tls: TlsOptions,
    pub trust: Vec<(String, String)>,
    pub strict_trust: bool,
    pub metrics_listen: Option<String>,
}

impl ServerConfig {
    pub fn resolve(o: ServerOverrides) -> Result<Self> {
        let file: ServerFile = load_toml(o.config.as_deref())?;
        let config_file = o.config.as_deref().map(absolute).transpose()?;
        let Some(data_dir) = o.data_dir.or(file.data_dir) else {
            bail!("no data directory: pass --data-dir DIR (or set DPSYNC_DATA_DIR, or data_dir in --config)")
        };
        let data_dir = absolute(&data_dir)?;
        let site_code = o.site_code.or(file.site_code).unwrap_or_else(|| "PS1".into()).to_ascii_uppercase();
        if site_code.len() != 3 || !site_code.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("site code {site_code:?} is invalid: use three letters or digits, e.g. PS1");
        }
        let socket = o.socket.or(file.socket).unwrap_or_else(|| data_dir.join("admin.sock"));
        let database_url = o
            .database_url
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("dpsync.db").display()));
        let keep_versions = file.keep_versions.unwrap_or(5);
        if keep_versions < 2 {
            bail!("keep_versions must be at least 2 (the current version and the one before it, for rollback)");
        }
        let mut dist = DistConfig::default();
        if let Some(n) = o.parallel_targets.or(file.parallel_targets) {
            if n == 0 {
                bail!("parallel_targets must be at least 1");
            }
            dist.parallel = n;
        }
        if let Some(r) = o.retries.or(file.retries) {
            dist.retries = r.max(0);
        }
        if let Some(ms) = o.retry_delay_ms.or(file.retry_delay_ms) {
            dist.retry_base = std::time::Duration::from_millis(ms.max(1));
        }
        let listen_token = match o.token_file.or(file.token_file) {
            Some(p) => Some(read_secret(&p)?),
            None => o.token,
        };
        Ok(Self {
            data_dir,
            site_code,
            socket,
            listen: o.listen.or(file.listen),
            database_url,
            keep_versions,
            dist,
            listen_token,
            disk_reserve: file.disk_reserve_mib.unwrap_or(256) << 20,
            tls: o.tls,
            trust: o.trust,
            strict_trust: o.strict_trust,
            metrics_listen: o.metrics_listen.or(file.metrics_listen),
            config_file,
        })
    }
}
