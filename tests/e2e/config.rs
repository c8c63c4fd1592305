//! The daemons' settings from their three sources (config file < `DPSYNC_*` environment
//! < flags), and values refused at start with the setting and its source named.

use std::fs;
use std::path::Path;

use crate::harness::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The last line of a refused start: the one-line reason.
fn reason(stderr: &str) -> &str {
    stderr.lines().last().unwrap_or_default()
}

#[test]
fn a_negative_retries_in_the_environment_stops_the_server() {
    let dir = TestDir::new();
    let opts = ServerOpts { env: vec![("DPSYNC_RETRIES".into(), "-1".into())], ..ServerOpts::site("PS1") };
    let err = Server::refuse_to_start(dir.join("d"), &opts);
    assert_eq!(
        reason(&err),
        "dpsync: retries: -1 is out of range (0–100) (from environment variable DPSYNC_RETRIES)",
        "{err}"
    );
    assert!(!dir.join("d").join("admin.sock").exists(), "nothing was opened");
}

#[test]
fn keep_versions_below_two_in_the_config_file_is_refused() {
    let dir = TestDir::new();
    let config = dir.join("server.toml");
    fs::write(&config, "retries = 3\nkeep_versions = 1\n").unwrap();
    let opts = ServerOpts { config: Some(config.clone()), ..ServerOpts::site("PS1") };
    let err = Server::refuse_to_start(dir.join("d"), &opts);
    let last = reason(&err);
    assert!(last.starts_with("dpsync: keep_versions: 1 is out of range (2–"), "{err}");
    assert!(last.contains(&format!("(from config file {})", s(&config))), "{err}");
}

#[test]
fn an_unknown_key_in_a_config_file_is_refused_naming_it() {
    let dir = TestDir::new();
    let config = dir.join("agent.toml");
    fs::write(&config, "listen = \"127.0.0.1:0\"\nretries = 3\n").unwrap();
    let out = run_bounded(
        dpsync_command().arg("agent").arg("--data-dir").arg(dir.join("dp")).arg("--config").arg(&config),
        START_TIMEOUT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = reason(&err);
    assert!(last.contains(&format!("config file {} is invalid", s(&config))), "{err}");
    assert!(last.contains("unknown field `retries`"), "a server setting is no agent setting: {err}");
}

#[test]
fn the_environment_beats_the_file_and_a_flag_beats_both() {
    let dir = TestDir::new();
    let config = dir.join("server.toml");
    fs::write(&config, "site_code = \"AB1\"\n").unwrap();
    let env = vec![("DPSYNC_SITE_CODE".to_owned(), "cd2".to_owned())];
    let file_and_env = ServerOpts { config: Some(config.clone()), env: env.clone(), ..ServerOpts::default() };
    let server = Server::start_with(dir.join("d1"), file_and_env);
    assert_eq!(text(&server.cli_json(&["info"]), "site_code"), "CD2");
    drop(server);
    let all_three = ServerOpts { config: Some(config), env, ..ServerOpts::site("EF3") };
    let server = Server::start_with(dir.join("d2"), all_three);
    assert_eq!(text(&server.cli_json(&["info"]), "site_code"), "EF3");
}
