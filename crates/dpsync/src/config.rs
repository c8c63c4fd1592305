//! Daemon configuration, resolved once at start: defaults < TOML file < `DPSYNC_*`
//! environment variables < command-line flags (clap reads the environment for each
//! flag, so "flag or env" arrives here as one `Option`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

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
    pub dist: crate::site::DistConfig,
    pub listen_token: Option<String>,
    pub disk_reserve: u64,
    pub tls: TlsOptions,
    pub trust: Vec<(String, String)>,
    pub strict_trust: bool,
    /// TCP address serving only `/metrics`.
    pub metrics_listen: Option<String>,
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

pub fn load_toml<T: for<'de> Deserialize<'de> + Default>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))
}

impl ServerConfig {
    pub fn resolve(o: ServerOverrides) -> Result<Self> {
        let file: ServerFile = load_toml(o.config.as_deref())?;
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
        let mut dist = crate::site::DistConfig::default();
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
        })
    }
}

pub fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("invalid path {}", p.display()))
}

/// Reads a secret from a file that only its owner can read.
pub fn read_secret(path: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).with_context(|| format!("cannot read the secret file {}", path.display()))?;
    if md.permissions().mode() & 0o077 != 0 {
        bail!("secret file {} is readable by others; run `chmod 600 {}`", path.display(), path.display());
    }
    let s = std::fs::read_to_string(path).with_context(|| format!("cannot read the secret file {}", path.display()))?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        bail!("secret file {} is empty", path.display());
    }
    Ok(s)
}

/// How a receiving listener (agent, child site) does TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Serve plain HTTP (loopback tests, or behind a TLS-terminating proxy).
    pub insecure_http: bool,
}

/// The TLS configuration for a listener: the operator's certificate, or a self-signed
/// one created on first start under `DATA/tls/` (its SHA-256 fingerprint is logged and
/// written to `DATA/tls/fingerprint`, to pin with `dp add --fingerprint`).
pub fn listener_tls(
    data_dir: &Path,
    listen: &str,
    opts: &TlsOptions,
) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
    use dpsync_transfer::trust;
    if opts.insecure_http {
        tracing::warn!("--insecure-http: content and tokens cross the network unencrypted");
        return Ok(None);
    }
    let pair = match (&opts.cert, &opts.key) {
        (Some(c), Some(k)) => trust::CertPair {
            cert_pem: std::fs::read_to_string(c)
                .with_context(|| format!("cannot read the certificate {}", c.display()))?,
            key_pem: read_secret(k)?,
        },
        (None, None) => {
            let dir = data_dir.join("tls");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            if !cert.exists() || !key.exists() {
                std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
                let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
                if let Ok(addr) = listen.parse::<std::net::SocketAddr>()
                    && !addr.ip().is_unspecified()
                {
                    hosts.push(addr.ip().to_string());
                }
                if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
                    let h = h.trim();
                    if !h.is_empty() {
                        hosts.push(h.to_owned());
                    }
                }
                let pair = trust::self_signed(&hosts)?;
                write_private(&key, pair.key_pem.as_bytes())?;
                std::fs::write(&cert, &pair.cert_pem).with_context(|| format!("cannot write {}", cert.display()))?;
                tracing::info!(cert = %cert.display(), "created a self-signed TLS certificate");
            }
            trust::CertPair {
                cert_pem: std::fs::read_to_string(&cert).with_context(|| format!("cannot read {}", cert.display()))?,
                key_pem: read_secret(&key)?,
            }
        }
        _ => bail!("pass both --tls-cert and --tls-key, or neither (a self-signed certificate is then created)"),
    };
    let fp = trust::pem_fingerprint(&pair.cert_pem)?;
    let _ = std::fs::create_dir_all(data_dir.join("tls"));
    let _ = std::fs::write(data_dir.join("tls").join("fingerprint"), format!("{fp}\n"));
    tracing::info!(fingerprint = %fp, "TLS certificate (pin it with `dpsync dp add … --fingerprint`)");
    Ok(Some(trust::server_config(&pair)?))
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data).and_then(|_| f.sync_all()).with_context(|| format!("cannot write {}", path.display()))
}

/// Parses `SITE=KEY` pins.
pub fn parse_trust(pins: &[String]) -> Result<Vec<(String, String)>> {
    pins.iter()
        .map(|p| match p.split_once('=') {
            Some((site, key)) if site.len() == 3 => Ok((site.to_ascii_uppercase(), key.to_owned())),
            _ => bail!("--trust takes SITE=KEY, e.g. --trust PS1=<64 hex digits from `dpsync info` on that site>"),
        })
        .collect()
}
