//! The agent's configuration: [`AgentSettings`] declares every setting once (flag,
//! `DPSYNC_*` variable, `--config` file key), [`AgentConfig`] is what they resolve to,
//! checked, at start.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::daemon::{Layered, LogFormat, MAX_DISK_RESERVE_MIB, Secret, TlsOptions, absolute, layer};

/// Settings of `dpsync agent`. Each field is a flag (`--disk-reserve-mib`), an
/// environment variable (`DPSYNC_DISK_RESERVE_MIB`) and a key of the `--config` TOML
/// file (`disk_reserve_mib = 512`); flags win over the environment, which wins over the
/// file. A field left `None` takes the default its documentation gives.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Data directory (required). Its flag is the global `--data-dir`.
    #[arg(skip)]
    pub data_dir: Option<PathBuf>,
    /// Address to receive content and serve clients on, e.g. 0.0.0.0:8443 (required; port 0
    /// picks one, and the bound address is written to DATA_DIR/listen.addr).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Token the site must present (default: none, any site that reaches the port may push).
    /// Prefer --token-file.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<Secret>,
    /// File holding the token, readable by its owner only (mode 0600); wins over --token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Free space to keep on the data directory's filesystem, in MiB [default: 256].
    #[arg(long, value_name = "MIB", allow_negative_numbers = true)]
    pub disk_reserve_mib: Option<i64>,
    /// PEM certificate chain for the listener (default: a self-signed one in DATA_DIR/tls).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP instead of TLS: loopback tests, or behind a TLS-terminating proxy
    /// [default: false].
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
    /// Most MiB per second a validation reads from this DP's disk, so that checking a
    /// large tree does not starve clients; 0 for no limit [default: 256].
    #[arg(long, value_name = "MIB_S", allow_negative_numbers = true)]
    pub validate_read_mib_s: Option<i64>,
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
    /// How log lines are written on stderr.
    pub log_format: LogFormat,
    /// Bytes per second a validation reads at most (`None`: no limit).
    pub validate_read_rate: Option<u64>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("disk_reserve", &self.disk_reserve)
            .field("tls", &self.tls)
            .field("trust", &self.trust)
            .field("strict_trust", &self.strict_trust)
            .field("log_format", &self.log_format)
            .field("validate_read_rate", &self.validate_read_rate)
            .finish()
    }
}

impl AgentConfig {
    /// Layers `flags` over the process environment over the file `config`, and resolves.
    pub fn load(config: Option<&Path>, flags: &AgentSettings) -> Result<Self> {
        Self::resolve(layer(config, std::env::vars_os(), flags)?)
    }

    /// Applies the defaults and checks every value, naming the setting (and where its
    /// value came from) when one is refused.
    pub fn resolve(l: Layered<AgentSettings>) -> Result<Self> {
        let s = l.settings.clone();
        let Some(data_dir) = s.data_dir else {
            bail!("no data directory: pass --data-dir DIR, set DPSYNC_DATA_DIR, or put data_dir in the --config file")
        };
        let Some(listen) = l.address("listen", s.listen)? else {
            bail!(
                "no listen address: pass --listen ADDR, e.g. --listen 0.0.0.0:8443 (or DPSYNC_LISTEN, or listen in --config)"
            )
        };
        let disk_reserve_mib = l.number("disk_reserve_mib", s.disk_reserve_mib, 256, 0..=MAX_DISK_RESERVE_MIB)?;
        let token = l.secret(s.token, s.token_file.as_deref())?;
        let log_format = l.log_format(s.log_format.as_deref())?;
        let validate_read_mib_s = l.number("validate_read_mib_s", s.validate_read_mib_s, 256, 0..=1_000_000)?;
        let receive = l.receive(s.tls_cert, s.tls_key, s.insecure_http, &s.trust, s.strict_trust)?;
        Ok(Self {
            data_dir: absolute(&data_dir)?,
            listen,
            token,
            disk_reserve: (disk_reserve_mib as u64) << 20,
            tls: receive.tls,
            trust: receive.trust,
            strict_trust: receive.strict_trust,
            log_format,
            validate_read_rate: (validate_read_mib_s > 0).then_some((validate_read_mib_s as u64) << 20),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    use clap::{Args, FromArgMatches};

    use super::{AgentConfig, AgentSettings};
    use crate::daemon::{env_name, layer, setting_keys};

    /// What `dpsync agent ARGS` gives as its flag layer.
    fn flags(args: &[&str]) -> AgentSettings {
        let cmd = AgentSettings::augment_args(clap::Command::new("agent"));
        let m = cmd.try_get_matches_from(std::iter::once("agent").chain(args.iter().copied())).unwrap();
        AgentSettings::from_arg_matches(&m).unwrap()
    }

    /// An agent configuration in `dir` (its data directory) from a config file (if `file`
    /// is given), `env` and `args`; `--listen 127.0.0.1:0` unless a layer sets one.
    fn resolve(dir: &Path, file: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<AgentConfig> {
        let path = dir.join("agent.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        let mut f = flags(args);
        f.data_dir = Some(dir.to_owned());
        let listen_set = file.is_some_and(|t| t.contains("listen")) || env.iter().any(|(k, _)| *k == "DPSYNC_LISTEN");
        if !listen_set && f.listen.is_none() {
            f.listen = Some("127.0.0.1:0".into());
        }
        AgentConfig::resolve(layer(file.map(|_| path.as_path()), env.iter().copied(), &f)?)
    }

    fn err(r: anyhow::Result<AgentConfig>) -> String {
        format!("{:#}", r.expect_err("should be refused"))
    }

    fn secret_file(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    }

    #[test]
    fn a_string_setting_is_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = Some("listen = \"127.0.0.1:1001\"\n");
        assert_eq!(resolve(dir.path(), file, &[], &[]).unwrap().listen, "127.0.0.1:1001");
        let env = [("DPSYNC_LISTEN", "127.0.0.1:1002")];
        assert_eq!(resolve(dir.path(), file, &env, &[]).unwrap().listen, "127.0.0.1:1002");
        assert_eq!(resolve(dir.path(), file, &env, &["--listen", "localhost:1003"]).unwrap().listen, "localhost:1003");
    }

    #[test]
    fn a_number_setting_is_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = |env: &[(&str, &str)], args: &[&str]| {
            resolve(dir.path(), Some("disk_reserve_mib = 10\n"), env, args).unwrap().disk_reserve >> 20
        };
        assert_eq!(reserve(&[], &[]), 10);
        assert_eq!(reserve(&[("DPSYNC_DISK_RESERVE_MIB", "20")], &[]), 20);
        assert_eq!(reserve(&[("DPSYNC_DISK_RESERVE_MIB", "20")], &["--disk-reserve-mib", "0"]), 0);
        assert_eq!(resolve(dir.path(), None, &[], &[]).unwrap().disk_reserve, 256 << 20, "the default");
    }

    #[test]
    fn a_bool_setting_is_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let strict =
            |file, env: &[(&str, &str)], args: &[&str]| resolve(dir.path(), file, env, args).unwrap().strict_trust;
        assert!(!strict(None, &[], &[]), "the default");
        let file = Some("strict_trust = true\n");
        assert!(strict(file, &[], &[]));
        assert!(!strict(file, &[("DPSYNC_STRICT_TRUST", "off")], &[]));
        assert!(strict(file, &[("DPSYNC_STRICT_TRUST", "off")], &["--strict-trust"]));
    }

    #[test]
    fn a_path_setting_is_file_then_env_then_flag() {
        let dir = tempfile::tempdir().unwrap();
        let (f, e, x) = (
            secret_file(dir.path(), "f", "from-file"),
            secret_file(dir.path(), "e", "from-env"),
            secret_file(dir.path(), "x", "from-flag"),
        );
        let token = |env: &[(&str, &str)], args: &[&str]| {
            resolve(dir.path(), Some(&format!("token_file = {f:?}\n")), env, args).unwrap().token.unwrap()
        };
        assert_eq!(token(&[], &[]), "from-file");
        assert_eq!(token(&[("DPSYNC_TOKEN_FILE", &e)], &[]), "from-env");
        assert_eq!(token(&[("DPSYNC_TOKEN_FILE", &e)], &["--token-file", &x]), "from-flag");
        let key = |env: &[(&str, &str)], args: &[&str]| {
            resolve(dir.path(), Some("tls_key = \"/f/key.pem\"\n"), env, args).unwrap().tls.key.unwrap()
        };
        assert_eq!(key(&[("DPSYNC_TLS_KEY", "/e/key.pem")], &[]), PathBuf::from("/e/key.pem"));
        assert_eq!(key(&[("DPSYNC_TLS_KEY", "/e/key.pem")], &["--tls-key", "/x/key.pem"]), PathBuf::from("/x/key.pem"));
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_naming_it_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A server setting is no agent setting.
        let e = err(resolve(dir.path(), Some("site_code = \"PS1\"\n"), &[], &[]));
        assert!(e.contains("unknown field `site_code`"), "{e}");
        assert!(e.contains(&dir.path().join("agent.toml").display().to_string()), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_setting_and_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let e = err(resolve(dir.path(), None, &[("DPSYNC_DISK_RESERVE_MIB", "-1")], &[]));
        assert_eq!(
            e,
            "disk_reserve_mib: -1 is out of range (0–16777216) (from environment variable DPSYNC_DISK_RESERVE_MIB)"
        );
        let e = err(resolve(dir.path(), Some("listen = \"8443\"\n"), &[], &[]));
        assert!(e.starts_with("listen: \"8443\" is not an address") && e.contains("agent.toml"), "{e}");
        let e = err(resolve(dir.path(), None, &[], &["--trust", "PS1"]));
        assert!(e.starts_with("trust: --trust takes SITE=KEY") && e.contains("flag --trust"), "{e}");
    }

    #[test]
    fn trust_pins_come_as_a_list_from_every_layer() {
        let dir = tempfile::tempdir().unwrap();
        let trust = |file, env: &[(&str, &str)], args: &[&str]| resolve(dir.path(), file, env, args).unwrap().trust;
        let pin = |s: &str, k: &str| (s.to_owned(), k.to_owned());
        let file = Some("trust = [\"PS1=a\"]\n");
        assert_eq!(trust(file, &[], &[]), [pin("PS1", "a")]);
        assert_eq!(trust(file, &[("DPSYNC_TRUST", "ps2=b,PS3=c")], &[]), [pin("PS2", "b"), pin("PS3", "c")]);
        assert_eq!(
            trust(file, &[("DPSYNC_TRUST", "PS2=b")], &["--trust", "PS4=d", "--trust", "PS5=e"]),
            [pin("PS4", "d"), pin("PS5", "e")]
        );
    }

    #[test]
    fn tokens_stay_strings_and_out_of_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        for t in ["00123", "true", "'x'", "1.50"] {
            let c = resolve(dir.path(), None, &[("DPSYNC_TOKEN", t)], &[]).unwrap();
            assert_eq!(c.token.as_deref(), Some(t));
            assert!(!format!("{c:?}").contains(t), "{c:?}");
        }
        let f = flags(&["--token", "s3cret"]);
        assert!(!format!("{f:?}").contains("s3cret"), "{f:?}");
    }

    #[test]
    fn every_setting_is_a_flag_a_variable_and_a_file_key() {
        let cmd = AgentSettings::augment_args(clap::Command::new("agent"));
        let mut flags: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
        flags.push("data_dir");
        flags.sort_unstable();
        let mut keys = setting_keys::<AgentSettings>().to_vec();
        keys.sort_unstable();
        assert_eq!(flags, keys);
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
        for key in keys {
            let var = env_name(key);
            assert!(readme.contains(&format!("`{var}`")), "README.md's configuration table lacks {var}");
        }
    }
}
