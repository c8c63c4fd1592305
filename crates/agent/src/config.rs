//! The agent's configuration, resolved once at start.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::Deserialize;

use crate::daemon::{TlsOptions, absolute, load_toml, read_secret};

/// Settings of `dpsync agent`, as written in its TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    /// Path of a file holding the token (preferred over `token`).
    pub token_file: Option<PathBuf>,
    pub token: Option<String>,
    /// Free space to keep on the data directory's filesystem, in MiB. Default 256.
    pub disk_reserve_mib: Option<u64>,
}

/// The resolved agent configuration.
#[derive(Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    pub token: Option<String>,
    pub disk_reserve: u64,
    pub tls: TlsOptions,
    /// Source sites' keys pinned by the operator.
    pub trust: Vec<(String, String)>,
    /// Refuse versions from source sites not pinned by the operator (no trust on first use).
    pub strict_trust: bool,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("disk_reserve", &self.disk_reserve)
            .finish()
    }
}

impl AgentConfig {
    #[allow(clippy::too_many_arguments)] // one per flag; called once, from the CLI
    pub fn resolve(
        config: Option<&Path>,
        data_dir: Option<PathBuf>,
        listen: Option<String>,
        token: Option<String>,
        token_file: Option<PathBuf>,
        tls: TlsOptions,
        trust: Vec<(String, String)>,
        strict_trust: bool,
    ) -> Result<Self> {
        let file: AgentFile = load_toml(config)?;
        let Some(data_dir) = data_dir.or(file.data_dir) else {
            bail!("no data directory: pass --data-dir DIR (or set DPSYNC_DATA_DIR)")
        };
        let Some(listen) = listen.or(file.listen) else {
            bail!("no listen address: pass --listen ADDR, e.g. --listen 0.0.0.0:8443")
        };
        let token = match token_file.or(file.token_file) {
            Some(path) => Some(read_secret(&path)?),
            None => token.or(file.token),
        };
        Ok(Self {
            data_dir: absolute(&data_dir)?,
            listen,
            token,
            disk_reserve: file.disk_reserve_mib.unwrap_or(256) << 20,
            tls,
            trust,
            strict_trust,
        })
    }
}
