//! The server's configuration: [`ServerSettings`] declares every setting once (flag,
//! `DPSYNC_*` variable, `--config` file key), [`ServerConfig`] is what they resolve to,
//! checked, at start. The layering (defaults < file < environment < flags) is
//! [`dpsync_agent::daemon::layer`], shared with the agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use dpsync_agent::daemon::{Layered, LogFormat, MAX_DISK_RESERVE_MIB, Secret, TlsOptions, absolute, layer};
use serde::{Deserialize, Serialize};

use crate::DistConfig;

/// Settings of `dpsync server`. Each field is a flag (`--retry-delay-ms`), an environment
/// variable (`DPSYNC_RETRY_DELAY_MS`) and a key of the `--config` TOML file
/// (`retry_delay_ms = 2000`); flags win over the environment, which wins over the file.
/// A field left `None` takes the default its documentation gives.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Data directory (required). Its flag is the global `--data-dir`.
    #[arg(skip)]
    pub data_dir: Option<PathBuf>,
    /// Admin socket [default: DATA_DIR/admin.sock]. Its flag is the global `--socket`.
    #[arg(skip)]
    pub socket: Option<PathBuf>,
    /// Three-character site code, letters and digits [default: PS1].
    #[arg(long, value_name = "CODE")]
    pub site_code: Option<String>,
    /// Receiving address for a parent site, e.g. 0.0.0.0:8443; makes this a child site
    /// [default: none].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// sqlite://PATH or postgres://USER@HOST/DB [default: sqlite://DATA_DIR/dpsync.db].
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Content library folder, which also holds the site's signing key (`site.key`);
    /// every node of a site on one PostgreSQL database uses the same one (a shared
    /// filesystem) [default: DATA_DIR/library, key in DATA_DIR/site.key].
    #[arg(long, value_name = "DIR")]
    pub library: Option<PathBuf>,
    /// Name of this server node, unique among the nodes sharing the database; shown by
    /// `dpsync info` and by `status` for the jobs it runs [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Seconds a node's claim on a running job holds without renewal, 2–3600 (it renews
    /// every third of it); a node that dies loses its jobs to the others this long after
    /// [default: 15].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub lease_secs: Option<i64>,
    /// Targets pushed to at once, 1–1024 [default: 8].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub parallel_targets: Option<i64>,
    /// Retries after a failed attempt before a target is marked failed, 0–100 [default: 5].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub retries: Option<i64>,
    /// First retry delay in milliseconds, 1–300000; doubles each retry (±25 % jitter), up
    /// to 5 minutes [default: 2000].
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub retry_delay_ms: Option<i64>,
    /// Seconds a transfer to a target may make no progress (no byte moving, no answer)
    /// before it is given up and retried, 1–3600; a transfer that moves is never cut,
    /// however slow its link [default: 60].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub stall_timeout_secs: Option<i64>,
    /// Seconds a job's first call to a target (connect, TLS handshake and its answer) may
    /// take in all, 1–600; a target that does not answer in time is retried later and
    /// holds no push slot meanwhile [default: 5].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub probe_timeout_secs: Option<i64>,
    /// Jobs that may be probing their targets at once, 1–4096; a quarter more (at least
    /// one) are kept for targets whose last job failed [default: 256].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub parallel_probes: Option<i64>,
    /// After the fast retries (--retries), how often a failing target is tried again, as
    /// a duration: 30s, 15m, 6h, 7d; from 1s to 7d [default: 30m].
    #[arg(long, value_name = "DUR")]
    pub slow_retry: Option<String>,
    /// Source versions kept per package, at least 2 (the current one and the one before,
    /// for rollback); older ones are pruned at each refresh and by `dpsync gc` (unless a
    /// target is still to be sent one), and `dpsync gc` collects their content [default: 5].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub keep_versions: Option<i64>,
    /// Free space the receiving side (--listen) keeps on the data disk, in MiB [default: 256].
    #[arg(long, value_name = "MIB", allow_negative_numbers = true)]
    pub disk_reserve_mib: Option<i64>,
    /// Token a parent site must present on --listen [default: none]. Prefer --token-file.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<Secret>,
    /// File holding that token, readable by its owner only (mode 0600); wins over --token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// TCP address serving /metrics for Prometheus, e.g. 127.0.0.1:9464 (the admin socket
    /// serves it too) [default: none].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// TCP address of the status web page (`/`), `/v1/status` and `/metrics`, e.g.
    /// 127.0.0.1:8080. Off loopback it needs --http-token-file and serves TLS (the
    /// certificate options of --listen) [default: none].
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// File holding the token the web page and its API require (mode 0600): a browser
    /// opens `/?token=…` once, scripts send `Authorization: Bearer …` [default: none;
    /// required off loopback].
    #[arg(long, value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,
    /// PEM certificate chain for --listen (default: a self-signed one in DATA_DIR/tls).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on --listen instead of TLS: loopback tests, or behind a
    /// TLS-terminating proxy [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_http: Option<bool>,
    /// Pin a source site's signing key: SITE=KEY (repeatable or comma-separated; KEY from
    /// `dpsync info` there) [default: none].
    #[arg(long, value_name = "SITE=KEY", value_delimiter = ',')]
    #[serde(default)]
    pub trust: Vec<String>,
    /// Refuse content from source sites not pinned with --trust, instead of trusting a
    /// site's key on first use [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub strict_trust: Option<bool>,
    /// Log line format on stderr: `text`, or `json` (one object per line, for journald or
    /// Loki) [default: text].
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
}

/// The resolved server configuration.
#[derive(Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub site_code: String,
    pub socket: PathBuf,
    pub listen: Option<String>,
    pub database_url: String,
    /// The content library folder.
    pub library_dir: PathBuf,
    /// The site's signing key: `site.key` in `--library` when given, else in the data
    /// directory.
    pub site_key_path: PathBuf,
    /// This node's name (`--node`, else the host name).
    pub node: String,
    /// How long a claim on a job holds without renewal.
    pub lease: Duration,
    pub keep_versions: i64,
    pub dist: DistConfig,
    pub listen_token: Option<String>,
    pub disk_reserve: u64,
    pub tls: TlsOptions,
    pub trust: Vec<(String, String)>,
    pub strict_trust: bool,
    /// How log lines are written on stderr.
    pub log_format: LogFormat,
    /// TCP address serving only `/metrics`.
    pub metrics_listen: Option<String>,
    /// TCP address of the status page, `/v1/status` and `/metrics`.
    pub http_listen: Option<String>,
    /// Token required on `http_listen` (always set when it is not loopback).
    pub http_token: Option<String>,
    /// The TOML file the server was started with (absolute), if any: `dpsync backup`
    /// copies it.
    pub config_file: Option<PathBuf>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("data_dir", &self.data_dir)
            .field("site_code", &self.site_code)
            .field("socket", &self.socket)
            .field("listen", &self.listen)
            .field("database_url", &crate::redact_url(&self.database_url))
            .field("library_dir", &self.library_dir)
            .field("node", &self.node)
            .field("lease", &self.lease)
            .field("keep_versions", &self.keep_versions)
            .field("dist", &self.dist)
            .field("listen_token", &self.listen_token.as_ref().map(|_| "<redacted>"))
            .field("disk_reserve", &self.disk_reserve)
            .field("tls", &self.tls)
            .field("trust", &self.trust)
            .field("strict_trust", &self.strict_trust)
            .field("log_format", &self.log_format)
            .field("metrics_listen", &self.metrics_listen)
            .field("http_listen", &self.http_listen)
            .field("http_token", &self.http_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ServerConfig {
    /// Layers `flags` over the process environment over the file `config`, and resolves.
    pub fn load(config: Option<&Path>, flags: &ServerSettings) -> Result<Self> {
        let mut resolved = Self::resolve(layer(config, std::env::vars_os(), flags)?)?;
        resolved.config_file = config.map(absolute).transpose()?;
        Ok(resolved)
    }

    /// Applies the defaults and checks every value, naming the setting (and where its
    /// value came from) when one is refused.
    pub fn resolve(l: Layered<ServerSettings>) -> Result<Self> {
        let s = l.settings.clone();
        let Some(data_dir) = s.data_dir else {
            bail!("no data directory: pass --data-dir DIR, set DPSYNC_DATA_DIR, or put data_dir in the --config file")
        };
        let data_dir = absolute(&data_dir)?;
        let site_code = s.site_code.unwrap_or_else(|| "PS1".into()).to_ascii_uppercase();
        if site_code.len() != 3 || !site_code.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(l.invalid(
                "site_code",
                format!("site code {site_code:?} is invalid: use three letters or digits, e.g. PS1"),
            ));
        }
        let socket = s.socket.unwrap_or_else(|| data_dir.join("admin.sock"));
        let database_url =
            s.database_url.unwrap_or_else(|| format!("sqlite://{}", data_dir.join("dpsync.db").display()));
        // The value is not repeated: it may hold a password.
        if !["sqlite:", "postgres://", "postgresql://"].iter().any(|p| database_url.starts_with(p)) {
            return Err(l.invalid("database_url", "use sqlite://PATH or postgres://USER@HOST/DB"));
        }
        let keep_versions = l.number("keep_versions", s.keep_versions, 5, 2..=1_000_000)?;
        let (library_dir, site_key_path) = match &s.library {
            Some(dir) => {
                let dir = absolute(dir)?;
                (dir.clone(), dir.join("site.key"))
            }
            None => (data_dir.join("library"), data_dir.join("site.key")),
        };
        let node = match s.node {
            Some(n) => n,
            None => host_name(),
        };
        if node.is_empty() || node.len() > 64 || !node.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(l.invalid(
                "node",
                format!("node name {node:?} is invalid: use up to 64 letters, digits, '-', '_' or '.'"),
            ));
        }
        let lease = Duration::from_secs(l.number("lease_secs", s.lease_secs, 15, 2..=3600)? as u64);
        let defaults = DistConfig::default();
        // A first delay above the backoff's cap would be cut to the cap without a word.
        let max_delay_ms = defaults.retry_max.as_millis() as i64;
        let probes = l.number("parallel_probes", s.parallel_probes, defaults.probes as i64, 1..=4096)?;
        let dist = DistConfig {
            parallel: l.number("parallel_targets", s.parallel_targets, defaults.parallel as i64, 1..=1024)? as usize,
            retries: l.number("retries", s.retries, defaults.retries, 0..=100)?,
            retry_base: Duration::from_millis(l.number(
                "retry_delay_ms",
                s.retry_delay_ms,
                defaults.retry_base.as_millis() as i64,
                1..=max_delay_ms,
            )? as u64),
            stall: Duration::from_secs(l.number(
                "stall_timeout_secs",
                s.stall_timeout_secs,
                defaults.stall.as_secs() as i64,
                1..=3600,
            )? as u64),
            probe: Duration::from_secs(l.number(
                "probe_timeout_secs",
                s.probe_timeout_secs,
                defaults.probe.as_secs() as i64,
                1..=600,
            )? as u64),
            probes: probes as usize,
            failing_probes: (probes as usize / 4).max(1),
            slow_retry: match s.slow_retry.as_deref() {
                None => defaults.slow_retry,
                Some(text) => match dpsync_api::parse_duration(text) {
                    Ok(ms) if (1_000..=7 * 86_400_000).contains(&ms) => Duration::from_millis(ms as u64),
                    Ok(_) => return Err(l.invalid("slow_retry", format!("{text} is out of range (1s–7d)"))),
                    Err(e) => return Err(l.invalid("slow_retry", e)),
                },
            },
            ..defaults
        };
        let disk_reserve_mib = l.number("disk_reserve_mib", s.disk_reserve_mib, 256, 0..=MAX_DISK_RESERVE_MIB)?;
        let listen = l.address("listen", s.listen)?;
        let metrics_listen = l.address("metrics_listen", s.metrics_listen)?;
        let listen_token = l.secret(s.token, s.token_file.as_deref())?;
        let log_format = l.log_format(s.log_format.as_deref())?;
        let http_listen = l.address("http_listen", s.http_listen)?;
        let http_token = match &s.http_token_file {
            Some(path) => Some(
                dpsync_agent::daemon::read_secret(path).map_err(|e| l.invalid("http_token_file", format!("{e:#}")))?,
            ),
            None => None,
        };
        if let Some(addr) = &http_listen
            && http_token.is_none()
            && !crate::web::is_loopback(addr)
        {
            return Err(l.invalid(
                "http_listen",
                format!(
                    "{addr} is not a loopback address, so the status page needs a token: pass \
                     --http-token-file FILE (mode 0600), or listen on 127.0.0.1"
                ),
            ));
        }
        let receive = l.receive(s.tls_cert, s.tls_key, s.insecure_http, &s.trust, s.strict_trust)?;
        Ok(Self {
            data_dir,
            site_code,
            socket,
            listen,
            database_url,
            library_dir,
            site_key_path,
            node,
            lease,
            keep_versions,
            dist,
            listen_token,
            disk_reserve: (disk_reserve_mib as u64) << 20,
            tls: receive.tls,
            trust: receive.trust,
            strict_trust: receive.strict_trust,
            log_format,
            metrics_listen,
            http_listen,
            http_token,
            config_file: None,
        })
    }
}

/// This machine's host name, the default node name.
fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "node".to_owned())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::{Args, FromArgMatches};
    use dpsync_agent::daemon::{layer, setting_keys};

    use super::{ServerConfig, ServerSettings};

    /// What `dpsync server ARGS` gives as its flag layer.
    fn flags(args: &[&str]) -> ServerSettings {
        let cmd = ServerSettings::augment_args(clap::Command::new("server"));
        let m = cmd.try_get_matches_from(std::iter::once("server").chain(args.iter().copied())).unwrap();
        ServerSettings::from_arg_matches(&m).unwrap()
    }

    /// A server configuration in `dir` from a config file (if `file` is given), `env`
    /// and command-line `args`; the data directory is `dir` unless a layer names one.
    fn resolve(dir: &Path, file: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<ServerConfig> {
        let path = dir.join("server.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        let mut f = flags(args);
        let data_dir_set =
            file.is_some_and(|t| t.contains("data_dir")) || env.iter().any(|(k, _)| *k == "DPSYNC_DATA_DIR");
        if !data_dir_set {
            f.data_dir = Some(dir.to_owned());
        }
        ServerConfig::resolve(layer(file.map(|_| path.as_path()), env.iter().copied(), &f)?)
    }

    fn err(r: anyhow::Result<ServerConfig>) -> String {
        format!("{:#}", r.expect_err("should be refused"))
    }

    #[test]
    fn defaults_need_no_layer() {
        let dir = tempfile::tempdir().unwrap();
        let c = resolve(dir.path(), None, &[], &[]).unwrap();
        assert_eq!(c.site_code, "PS1");
        assert_eq!(c.socket, dir.path().join("admin.sock"));
        assert_eq!(c.database_url, format!("sqlite://{}", dir.path().join("dpsync.db").display()));
        assert_eq!((c.keep_versions, c.disk_reserve), (5, 256 << 20));
        assert_eq!((c.dist.parallel, c.dist.retries, c.dist.retry_base.as_millis()), (8, 5, 2000));
        assert_eq!(c.dist.stall.as_secs(), 60);
        assert_eq!((c.dist.probe.as_secs(), c.dist.probes, c.dist.failing_probes), (5, 256, 64));
        let probing = resolve(dir.path(), Some("probe_timeout_secs = 2\n"), &[], &["--parallel-probes", "8"]).unwrap();
        assert_eq!((probing.dist.probe.as_secs(), probing.dist.probes, probing.dist.failing_probes), (2, 8, 2));
        let e = err(resolve(dir.path(), None, &[], &["--probe-timeout-secs", "0"]));
        assert!(e.starts_with("probe_timeout_secs: 0 is out of range (1–600)"), "{e}");
        let quick = resolve(dir.path(), Some("stall_timeout_secs = 5\n"), &[], &[]).unwrap();
        assert_eq!(quick.dist.stall.as_secs(), 5);
        let e = err(resolve(dir.path(), None, &[], &["--stall-timeout-secs", "0"]));
        assert!(e.starts_with("stall_timeout_secs: 0 is out of range (1–3600)"), "{e}");
        assert_eq!((c.listen, c.metrics_listen, c.listen_token), (None, None, None));
        assert!(!c.tls.insecure_http && !c.strict_trust && c.trust.is_empty());
    }

    #[test]
    fn a_string_setting_is_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = Some("site_code = \"AB1\"\n");
        assert_eq!(resolve(dir.path(), file, &[], &[]).unwrap().site_code, "AB1", "a flag not given keeps the file's");
        let env = [("DPSYNC_SITE_CODE", "cd2")];
        assert_eq!(resolve(dir.path(), file, &env, &[]).unwrap().site_code, "CD2");
        assert_eq!(resolve(dir.path(), file, &env, &["--site-code", "EF3"]).unwrap().site_code, "EF3");
        // A variable is read as its flag would be: digits stay a string.
        assert_eq!(resolve(dir.path(), file, &[("DPSYNC_SITE_CODE", "007")], &[]).unwrap().site_code, "007");
    }

    #[test]
    fn a_number_setting_is_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = Some("retries = 3\n");
        assert_eq!(resolve(dir.path(), file, &[], &[]).unwrap().dist.retries, 3);
        let env = [("DPSYNC_RETRIES", "4")];
        assert_eq!(resolve(dir.path(), file, &env, &[]).unwrap().dist.retries, 4);
        assert_eq!(resolve(dir.path(), file, &env, &["--retries", "6"]).unwrap().dist.retries, 6);
    }

    #[test]
    fn a_bool_setting_is_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let insecure =
            |file, env: &[(&str, &str)], args: &[&str]| resolve(dir.path(), file, env, args).unwrap().tls.insecure_http;
        let file = Some("insecure_http = true\n");
        assert!(insecure(file, &[], &[]), "a flag not given keeps the file's");
        assert!(!insecure(file, &[("DPSYNC_INSECURE_HTTP", "false")], &[]));
        assert!(insecure(file, &[("DPSYNC_INSECURE_HTTP", "0")], &["--insecure-http"]));
        assert!(!insecure(None, &[("DPSYNC_INSECURE_HTTP", "yes")], &["--insecure-http=false"]));
        assert!(!insecure(None, &[("DPSYNC_INSECURE_HTTP", "")], &[]), "an empty variable is unset");
    }

    #[test]
    fn a_path_setting_is_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let cert = |env: &[(&str, &str)], args: &[&str]| {
            resolve(dir.path(), Some("tls_cert = \"/f/cert.pem\"\n"), env, args).unwrap().tls.cert.unwrap()
        };
        assert_eq!(cert(&[], &[]), PathBuf::from("/f/cert.pem"));
        let env = [("DPSYNC_TLS_CERT", "/e/cert.pem")];
        assert_eq!(cert(&env, &[]), PathBuf::from("/e/cert.pem"));
        assert_eq!(cert(&env, &["--tls-cert", "/x/cert.pem"]), PathBuf::from("/x/cert.pem"));

        // The socket's flag is the global --socket, set by the binary.
        let socket = |env: &[(&str, &str)], flag: Option<&str>| {
            let path = dir.path().join("s.toml");
            std::fs::write(&path, "socket = \"/f/admin.sock\"\n").unwrap();
            let f = ServerSettings {
                data_dir: Some(dir.path().to_owned()),
                socket: flag.map(PathBuf::from),
                ..ServerSettings::default()
            };
            ServerConfig::resolve(layer(Some(&path), env.iter().copied(), &f).unwrap()).unwrap().socket
        };
        assert_eq!(socket(&[], None), PathBuf::from("/f/admin.sock"));
        let env = [("DPSYNC_SOCKET", "/e/admin.sock")];
        assert_eq!(socket(&env, None), PathBuf::from("/e/admin.sock"));
        assert_eq!(socket(&env, Some("/x/admin.sock")), PathBuf::from("/x/admin.sock"));
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_naming_it_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = err(resolve(dir.path(), Some("retries = 2\nretires = 3\n"), &[], &[]));
        assert!(e.contains("unknown field `retires`"), "{e}");
        assert!(e.contains(&dir.path().join("server.toml").display().to_string()), "{e}");
        let e = err(resolve(dir.path(), Some("retries = \"many\"\n"), &[], &[]));
        assert!(e.contains("retries") && e.contains("server.toml"), "{e}");
    }

    #[test]
    fn slow_retry_is_a_duration_from_one_second_to_a_week() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(resolve(d, None, &[], &[]).unwrap().dist.slow_retry.as_secs(), 30 * 60);
        assert_eq!(resolve(d, None, &[], &["--slow-retry", "2s"]).unwrap().dist.slow_retry.as_secs(), 2);
        assert_eq!(resolve(d, Some("slow_retry = \"6h\"\n"), &[], &[]).unwrap().dist.slow_retry.as_secs(), 6 * 3600);
        let e = err(resolve(d, None, &[("DPSYNC_SLOW_RETRY", "0s")], &[]));
        assert!(
            e.starts_with("slow_retry: \"0s\": a duration must be longer than 0") && e.contains("DPSYNC_SLOW_RETRY"),
            "{e}"
        );
        let e = err(resolve(d, None, &[], &["--slow-retry", "500ms"]));
        assert!(e.starts_with("slow_retry: 500ms is out of range (1s–7d)"), "{e}");
        let e = err(resolve(d, None, &[], &["--slow-retry", "8d"]));
        assert!(e.starts_with("slow_retry: 8d is out of range"), "{e}");
        let e = err(resolve(d, None, &[], &["--slow-retry", "soon"]));
        assert!(e.starts_with("slow_retry: \"soon\" is not a duration") && e.contains("--slow-retry"), "{e}");
    }

    #[test]
    fn variables_of_no_setting_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let env =
            [("DPSYNC_LOG", "debug"), ("DPSYNC_CONFIG", "/nowhere"), ("DPSYNC_KEEP_TEST_DIRS", "1"), ("HOME", "/")];
        assert_eq!(resolve(dir.path(), None, &env, &[]).unwrap().site_code, "PS1");
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_setting_and_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = err(resolve(d, None, &[("DPSYNC_RETRIES", "-1")], &[]));
        assert_eq!(e, "retries: -1 is out of range (0–100) (from environment variable DPSYNC_RETRIES)");
        let e = err(resolve(d, Some("keep_versions = 1\n"), &[], &[]));
        assert!(e.starts_with("keep_versions: 1 is out of range (2–") && e.contains("server.toml"), "{e}");
        let e = err(resolve(d, None, &[], &["--parallel-targets", "0"]));
        assert!(
            e.starts_with("parallel_targets: 0 is out of range (1–1024)") && e.contains("--parallel-targets"),
            "{e}"
        );
        let e = err(resolve(d, None, &[], &["--retry-delay-ms", "0"]));
        assert!(e.starts_with("retry_delay_ms: 0 is out of range (1–300000)"), "{e}");
        let e = err(resolve(d, None, &[], &["--disk-reserve-mib", "-5"]));
        assert!(e.starts_with("disk_reserve_mib: -5 is out of range"), "{e}");
        let e = err(resolve(d, None, &[("DPSYNC_SITE_CODE", "TOOLONG")], &[]));
        assert!(e.starts_with("site_code: site code \"TOOLONG\" is invalid") && e.contains("DPSYNC_SITE_CODE"), "{e}");
        let e = err(resolve(d, Some("listen = \"no port\"\n"), &[], &[]));
        assert!(e.starts_with("listen: \"no port\" is not an address"), "{e}");
        let e = err(resolve(d, None, &[], &["--metrics-listen", "127.0.0.1:99999"]));
        assert!(e.starts_with("metrics_listen:"), "{e}");
        let e = err(resolve(d, None, &[], &["--http-listen", "0.0.0.0:8080"]));
        assert_eq!(
            e,
            "http_listen: 0.0.0.0:8080 is not a loopback address, so the status page needs a token: pass \
             --http-token-file FILE (mode 0600), or listen on 127.0.0.1 (from flag --http-listen)"
        );
        assert!(resolve(d, None, &[], &["--http-listen", "127.0.0.1:8080"]).unwrap().http_token.is_none());
        let e = err(resolve(d, None, &[("DPSYNC_DATABASE_URL", "mysql://u:secret@h/db")], &[]));
        assert!(e.starts_with("database_url:") && !e.contains("secret"), "{e}");
        let e = err(resolve(d, None, &[("DPSYNC_RETRIES", "many")], &[]));
        assert!(e.starts_with("DPSYNC_RETRIES: invalid value 'many'"), "{e}");
        // The edges are in range.
        let c = resolve(d, Some("keep_versions = 2\nretries = 0\n"), &[], &["--retry-delay-ms", "300000"]).unwrap();
        assert_eq!((c.keep_versions, c.dist.retries, c.dist.retry_base.as_secs()), (2, 0, 300));
    }

    #[test]
    fn tokens_stay_strings_and_out_of_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let c = resolve(dir.path(), None, &[("DPSYNC_TOKEN", "00123")], &[]).unwrap();
        assert_eq!(c.listen_token.as_deref(), Some("00123"));
        assert!(!format!("{c:?}").contains("00123"), "{c:?}");
        let f = flags(&["--token", "s3cret"]);
        assert!(!format!("{f:?}").contains("s3cret"), "{f:?}");
        // A token file wins over a token, and must be owner-only.
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "from-file\n").unwrap();
        let tf = token_file.display().to_string();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = err(resolve(dir.path(), None, &[("DPSYNC_TOKEN_FILE", &tf)], &["--token", "t"]));
        assert!(e.starts_with("token_file: secret file") && e.contains("DPSYNC_TOKEN_FILE"), "{e}");
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = resolve(dir.path(), None, &[("DPSYNC_TOKEN_FILE", &tf)], &["--token", "t"]).unwrap();
        assert_eq!(c.listen_token.as_deref(), Some("from-file"));
    }

    /// One declaration: every setting but the global `data_dir` and `socket` has its own
    /// flag, every flag is a setting, and the README's table lists each variable.
    #[test]
    fn every_setting_is_a_flag_a_variable_and_a_file_key() {
        let cmd = ServerSettings::augment_args(clap::Command::new("server"));
        let mut flags: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
        flags.extend(["data_dir", "socket"]);
        flags.sort_unstable();
        let mut keys = setting_keys::<ServerSettings>().to_vec();
        keys.sort_unstable();
        assert_eq!(flags, keys);
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
        for key in keys {
            let var = dpsync_agent::daemon::env_name(key);
            assert!(readme.contains(&format!("`{var}`")), "README.md's configuration table lacks {var}");
        }
    }
}
