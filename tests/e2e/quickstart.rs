//! `dpsync quickstart`: the main job on one machine, with no set-up, cleaning up after
//! itself.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// The step named `name` of a quickstart report.
fn step<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in {v:#}"))
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name:?} in {v:#}"))
}

/// `bytes_sent_last` of each DP in a step, asserting both hold the step's version.
fn sent_last(step: &Value) -> Vec<u64> {
    let version = num(&step["refresh"], "source_version");
    let targets = step["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2, "two DPs: {step:#}");
    for t in targets {
        assert_eq!(text(t, "state"), "installed", "{step:#}");
        assert_eq!(num(t, "installed_version"), version, "{step:#}");
    }
    let verified = step["verified"].as_array().expect("verified");
    assert_eq!(verified.len(), 2, "both DPs' trees checked: {step:#}");
    targets.iter().map(|t| num(t, "bytes_sent_last")).collect()
}

#[test]
fn quickstart_runs_the_main_job_and_cleans_up() {
    let tmp = TestDir::new();
    let mut cmd = dpsync_command();
    cmd.args(["quickstart", "--json"]).env("TMPDIR", tmp.path());
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "quickstart failed ({}):\n{stderr}", out.status);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON on stdout ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["ok"], true, "{v:#}");

    let sample = &v["sample"];
    assert_eq!(num(sample, "files"), 300, "{v:#}");
    assert!((35 << 20..=45 << 20).contains(&num(sample, "bytes")), "about 40 MiB: {v:#}");

    let initial = step(&v, "initial");
    assert_eq!(num(&initial["refresh"], "source_version"), 1);
    assert_eq!(num(&initial["refresh"], "files_added"), 300);
    let first = sent_last(initial);

    let change = step(&v, "change");
    assert_eq!(num(&change["refresh"], "source_version"), 2);
    assert_eq!(num(&change["refresh"], "files_added"), 1, "{change:#}");
    assert_eq!(num(&change["refresh"], "files_removed"), 1, "{change:#}");
    assert_eq!(num(&change["refresh"], "files_changed"), 4, "{change:#}");
    let second = sent_last(change);
    for (a, b) in first.iter().zip(&second) {
        assert!(*a > 20 << 20, "the first push sends most of the package: {first:?}");
        assert!(*b > 0 && b * 20 < *a, "a 1 % change sends a small delta: first {first:?}, second {second:?}");
    }

    let none = step(&v, "no_change");
    assert_eq!(num(&none["refresh"], "source_version"), 3);
    assert_eq!(none["refresh"]["content_changed"], false, "{none:#}");
    assert_eq!(num(&none["refresh"], "bytes_hashed"), 0, "nothing is read again: {none:#}");
    assert_eq!(sent_last(none), vec![0, 0], "nothing is sent again: {none:#}");

    let stopped = v["stopped"].as_array().expect("stopped");
    assert_eq!(stopped.len(), 3, "{v:#}");
    assert!(stopped.iter().all(|s| s["clean"] == true), "daemons stop on SIGTERM: {v:#}");

    let dir = text(&v, "dir");
    assert!(dir.starts_with(tmp.path().to_str().expect("UTF-8")), "{dir} is under TMPDIR");
    assert!(!Path::new(dir).exists(), "{dir} was removed");
    assert_eq!(count_entries(tmp.path()), 0, "quickstart left nothing behind in TMPDIR");
}

#[test]
fn quickstart_works_in_the_data_dir_it_is_given_and_keeps_it() {
    let tmp = TestDir::new();
    // A folder with something in it is refused, and left alone.
    let busy = tmp.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("precious.txt"), "keep me").unwrap();
    let out = run_bounded(dpsync_command().arg("quickstart").arg("--data-dir").arg(&busy), CLI_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not empty"), "{stderr}");
    assert_eq!(count_entries(&busy), 1, "the folder was left alone");

    // A new folder is used and kept; DPSYNC_DATA_DIR alone (an administrator's setting
    // for admin commands) does not move the quickstart.
    let chosen = tmp.join("qs");
    let mut cmd = dpsync_command();
    cmd.args(["quickstart", "--json", "--data-dir"]).arg(&chosen).env("DPSYNC_DATA_DIR", &busy);
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "quickstart failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(text(&v, "dir"), chosen.to_str().unwrap(), "{v:#}");
    assert_eq!(v["kept"], true, "{v:#}");
    assert_eq!(v["removed"], false, "{v:#}");
    for kept in ["source", "server", "dp1", "dp2", "server.log"] {
        assert!(chosen.join(kept).exists(), "{kept} is kept in {}", chosen.display());
    }
    assert_eq!(count_entries(&busy), 1, "DPSYNC_DATA_DIR was not used");
}
