//! What every dpsync daemon needs at start, whether a DP agent or a site server: its
//! configuration file, secrets read from owner-only files, the TLS material of a
//! receiving listener, and the exclusive lock on its data directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

pub fn load_toml<T: for<'de> Deserialize<'de> + Default>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))
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
    // Scripts, the quickstart and tests read the fingerprint from this file to pin it:
    // a failure to write it is a failure to start.
    let tls_dir = data_dir.join("tls");
    std::fs::create_dir_all(&tls_dir).with_context(|| format!("cannot create {}", tls_dir.display()))?;
    let fp_file = tls_dir.join("fingerprint");
    dpsync_library::write_atomic(&fp_file, format!("{fp}\n").as_bytes())
        .with_context(|| format!("cannot write the TLS fingerprint to {}", fp_file.display()))?;
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

/// Holds an exclusive lock on `DIR/dpsync.lock` for the life of the process.
pub fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("dpsync.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}: is the data directory writable?", path.display()))?;
    if f.try_lock().is_err() {
        bail!("another dpsync process is using the data directory {}; stop it first", dir.display());
    }
    Ok(f)
}

/// Creates a daemon's data directory, or tightens an existing one, to mode 0700: it
/// holds tokens, keys, databases and package content that no other local user may read,
/// whatever the umask. A looser existing directory is tightened with a warning.
pub fn secure_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    }
    let md = std::fs::metadata(dir).with_context(|| format!("cannot read the data directory {}", dir.display()))?;
    if !md.is_dir() {
        bail!("the data directory {} is not a directory", dir.display());
    }
    // DirBuilder's mode is filtered by the umask; set it explicitly either way.
    if md.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make the data directory {} private (chmod 700)", dir.display()))?;
        if md.permissions().mode() & 0o077 != 0 {
            tracing::warn!(data_dir = %dir.display(), "the data directory was open to other users; made it 0700");
        }
    }
    Ok(())
}
