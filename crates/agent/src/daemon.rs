//! What every dpsync daemon needs at start, whether a DP agent or a site server: its
//! settings merged from their sources, secrets read from owner-only files, the TLS
//! material of a receiving listener, and the exclusive lock on its data directory.
//!
//! **Configuration once.** Each daemon declares its settings in one struct (the agent's
//! `AgentSettings`, the site's `ServerSettings`): its fields are at once the flags
//! (clap), the keys of the `--config` TOML file and, upper-cased behind `DPSYNC_`, the
//! environment variables. [`layer`] merges them: defaults < file < environment < flags.
//! The environment is read here and nowhere else (those flags carry no clap `env`), each
//! variable parsed by its own flag's value parser, so `DPSYNC_TOKEN=00123` stays the
//! string it is.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of every setting's environment variable.
pub const ENV_PREFIX: &str = "DPSYNC_";

/// The environment variable of setting `key`: `retry_delay_ms` → `DPSYNC_RETRY_DELAY_MS`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// Largest `disk_reserve_mib` a daemon takes: 16 TiB.
pub const MAX_DISK_RESERVE_MIB: i64 = 16 << 20;

/// Where a setting's value came from, named in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the default"),
            Origin::File(p) => write!(f, "config file {}", p.display()),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// A daemon's settings merged from their layers, and where each value came from; the
/// helpers check a value and name the setting and its origin when they refuse it.
#[derive(Debug)]
pub struct Layered<T> {
    pub settings: T,
    origins: BTreeMap<String, Origin>,
}

impl<T> Layered<T> {
    /// Where setting `key` got its value ([`Origin::Default`] when no layer set it).
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    /// An error about setting `key`, e.g. `retries: -1 is out of range (0–100) (from
    /// environment variable DPSYNC_RETRIES)`.
    pub fn invalid(&self, key: &str, problem: impl fmt::Display) -> anyhow::Error {
        anyhow!("{key}: {problem} (from {})", self.origin(key))
    }

    /// Setting `key`: `value` when set, else `default`; refused outside `range` (never
    /// clamped).
    pub fn number(&self, key: &str, value: Option<i64>, default: i64, range: RangeInclusive<i64>) -> Result<i64> {
        let v = value.unwrap_or(default);
        if range.contains(&v) {
            Ok(v)
        } else {
            Err(self.invalid(key, format!("{v} is out of range ({}–{})", range.start(), range.end())))
        }
    }

    /// Setting `key`, a `HOST:PORT` listening address (an IP address or a host name; port
    /// 0 picks a free port), checked before anything is bound.
    pub fn address(&self, key: &str, value: Option<String>) -> Result<Option<String>> {
        let Some(addr) = value else { return Ok(None) };
        if addr.parse::<std::net::SocketAddr>().is_ok() {
            return Ok(Some(addr));
        }
        match addr.rsplit_once(':') {
            Some((host, port))
                if !host.is_empty()
                    && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                    && port.parse::<u16>().is_ok() =>
            {
                Ok(Some(addr))
            }
            _ => Err(self.invalid(key, format!("{addr:?} is not an address: use HOST:PORT, e.g. 0.0.0.0:8443"))),
        }
    }

    /// The secret of a `token` / `token_file` pair: read from the file (which must be
    /// owner-only, [`read_secret`]) when one is set, else the token itself.
    pub fn secret(&self, token: Option<Secret>, token_file: Option<&Path>) -> Result<Option<String>> {
        match token_file {
            Some(path) => read_secret(path).map(Some).map_err(|e| self.invalid("token_file", format!("{e:#}"))),
            None => Ok(token.map(Secret::into_inner)),
        }
    }

    /// Setting `log_format`: `text` (the default) or `json`.
    pub fn log_format(&self, value: Option<&str>) -> Result<LogFormat> {
        match value.unwrap_or("text") {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(self.invalid("log_format", format!("{other:?} is not a log format: use text or json"))),
        }
    }

    /// The settings of a receiving listener (agent, child site), shared by both daemons.
    pub fn receive(
        &self,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        insecure_http: Option<bool>,
        trust: &[String],
        strict_trust: Option<bool>,
    ) -> Result<Receive> {
        let trust = parse_trust(trust).map_err(|e| self.invalid("trust", format!("{e:#}")))?;
        Ok(Receive {
            tls: TlsOptions { cert: tls_cert, key: tls_key, insecure_http: insecure_http.unwrap_or(false) },
            trust,
            strict_trust: strict_trust.unwrap_or(false),
        })
    }
}

/// How a daemon writes its log lines on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (`tracing`'s default format).
    #[default]
    Text,
    /// One JSON object per line, for journald, Loki and other collectors.
    Json,
}

/// A receiving listener's resolved TLS and trust settings.
#[derive(Debug, Clone, Default)]
pub struct Receive {
    pub tls: TlsOptions,
    pub trust: Vec<(String, String)>,
    pub strict_trust: bool,
}

/// A secret setting (a token): `Debug` shows `<redacted>`, never the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Merges a daemon's settings `T`: `flags` (what the command line gave, `None` where a
/// flag was not given) over the `DPSYNC_*` variables of `env` over the TOML file
/// `config`. Defaults are the caller's: it sees `None` where no layer set a value.
///
/// The file is refused if it names a key `T` lacks (`deny_unknown_fields`) or gives a
/// value of the wrong type; a variable is parsed by its flag's value parser and refused,
/// named, if that fails. Variables that name no setting of `T` (`DPSYNC_LOG`, or
/// `DPSYNC_SOCKET` for an agent) are ignored, and an empty one counts as unset.
pub fn layer<T, K, V>(config: Option<&Path>, env: impl IntoIterator<Item = (K, V)>, flags: &T) -> Result<Layered<T>>
where
    T: clap::Args + clap::FromArgMatches + Serialize + DeserializeOwned,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let cmd = T::augment_args(clap::Command::new("dpsync"));
    let arg_of = |key: &str| cmd.get_arguments().find(|a| a.get_id() == key);
    let flag_of = |key: &str| match arg_of(key).and_then(|a| a.get_long()) {
        Some(long) => format!("--{long}"),
        None => format!("--{}", key.replace('_', "-")),
    };
    let mut merged = toml::Table::new();
    let mut origins = BTreeMap::new();

    if let Some(path) = config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        // Read as `T` for the errors (an unknown key or a wrong type, with its line), then
        // as a table for the keys the file sets.
        let invalid = || format!("config file {} is invalid", path.display());
        toml::from_str::<T>(&text).with_context(invalid)?;
        let table: toml::Table = toml::from_str(&text).with_context(invalid)?;
        for (key, value) in table {
            origins.insert(key.clone(), Origin::File(path.to_owned()));
            merged.insert(key, value);
        }
    }

    let wanted: HashMap<String, &'static str> = setting_keys::<T>().iter().map(|&k| (env_name(k), k)).collect();
    let mut vars = BTreeMap::new();
    for (name, value) in env {
        let Some(&key) = name.as_ref().to_str().and_then(|n| wanted.get(n)) else { continue };
        let name = env_name(key);
        let Some(value) = value.as_ref().to_str() else { bail!("{name} is not valid UTF-8") };
        if !value.is_empty() {
            vars.insert(key, (name, value.to_owned()));
        }
    }
    for (key, (name, value)) in vars {
        let parsed = match arg_of(key) {
            // Parsed as its flag would be: the same type, the same checks.
            Some(_) => {
                let m = cmd
                    .clone()
                    .try_get_matches_from([String::from("dpsync"), format!("{}={value}", flag_of(key))])
                    .map_err(|e| anyhow!("{name}: {}", clap_message(&e)))?;
                let one = T::from_arg_matches(&m).map_err(|e| anyhow!("{name}: {}", clap_message(&e)))?;
                toml::Table::try_from(&one)
                    .with_context(|| format!("cannot use {name}"))?
                    .remove(key)
                    .with_context(|| format!("cannot use {name}"))?
            }
            // A setting with no flag of its own here (`data_dir`, `socket`: global options).
            None => toml::Value::String(value),
        };
        merged.insert(key.to_owned(), parsed);
        origins.insert(key.to_owned(), Origin::Env(name));
    }

    let flags = toml::Table::try_from(flags).context("cannot use the command-line flags")?;
    for (key, value) in flags {
        if value.as_array().is_some_and(|a| a.is_empty()) {
            continue; // a repeatable flag not given
        }
        origins.insert(key.clone(), Origin::Flag(flag_of(&key)));
        merged.insert(key, value);
    }
    let settings = merged.try_into().context("cannot merge the settings")?;
    Ok(Layered { settings, origins })
}

/// The first line of a clap error without its `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// The settings of struct `T`: its field names as serde knows them, the keys
/// `deny_unknown_fields` accepts, read from the derived `Deserialize` itself so that no
/// list repeats them.
pub fn setting_keys<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("only the field names were wanted"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
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

/// Free bytes for an unprivileged writer on the filesystem holding `dir` (`None` if it
/// cannot be asked). A `statvfs`: call it off the async executor.
pub fn disk_free(dir: &Path) -> Option<u64> {
    rustix::fs::statvfs(dir).ok().map(|st| st.f_bavail.saturating_mul(st.f_frsize))
}

/// Hands the allocator's free pages back to the system. After a large operation (a
/// refresh, a push, an install of a version with 100,000 files) glibc keeps most of what
/// was freed inside its heaps, among live blocks the top-of-heap trim cannot reach, so
/// the process would stay at its peak size until the next one. Called when such an
/// operation ends; costs a walk of the free lists (milliseconds).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only returns free memory to the system; it takes the
    // allocator's own locks and touches no live block.
    unsafe {
        libc::malloc_trim(0);
    }
}
