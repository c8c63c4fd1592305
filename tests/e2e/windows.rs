//! Send windows: outside every window of a DP nothing is sent to it (state
//! `waiting_window` with `next_window_at`), a transfer in progress pauses at a batch
//! boundary when its window closes and resumes where it stopped when one opens, and a
//! changed window is looked at at once.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `date` in the local zone (the one the server uses), `offset` from now, as HH:MM.
fn local_hm(offset: &str) -> String {
    let out = Command::new("date").args(["-d", offset, "+%H:%M"]).output().expect("date runs");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A daily window that opens in two hours: closed now.
fn closed_window() -> String {
    format!("daily {}-{}", local_hm("+2 hours"), local_hm("+3 hours"))
}

fn num(v: &Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or_else(|| panic!("{key} missing in {v:#}"))
}

#[test]
fn nothing_is_sent_outside_a_window_and_a_new_window_is_used_at_once() {
    let dir = TestDir::new();
    let src = dir.join("src");
    gen_tree(&src, 10, 77, 1..30_000);
    set_old_mtimes(&src);
    let server = Server::start_with(dir.join("d"), ServerOpts::site("PS1"));
    let a1 = Agent::start(dir.join("a1"), Some("t1"));
    let a2 = Agent::start(dir.join("a2"), Some("t2"));
    let daemons = [server.daemon(), a1.daemon(), a2.daemon()];
    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    let window = closed_window();
    let added = server.cli_json(&["dp", "add", "dp1", &a1.url(), "--token", "t1", "--window", &window]);
    assert_eq!(added["windows"][0], window.as_str(), "{added:#}");
    server.cli_json(&["dp", "add", "dp2", &a2.url(), "--token", "t2"]);
    server.cli_json(&["distribute", &id, "--dp", "dp1", "--dp", "dp2"]);
    server.cli_json(&["refresh", &id]);

    server.wait_installed(&id, "dp2", 1, WAIT, &daemons);
    let st = server.wait_status(&id, "dp1 to wait for its window", WAIT, &daemons, |st| {
        target_of(st, "dp1")["state"] == "waiting_window"
    });
    let t = target_of(&st, "dp1");
    let now = dpsync_store_now_ms();
    let opens = num(t, "next_window_at");
    assert!(
        (now + 115 * 60_000..=now + 121 * 60_000).contains(&opens),
        "the window opens in about two hours, not at {opens} (now {now}): {t:#}"
    );
    assert_eq!(num(t, "bytes_sent_total"), 0, "nothing went outside the window: {t:#}");
    assert!(!a1.current(&id).exists(), "dp1 holds nothing yet");

    // A window open now: used at once, without waiting two hours.
    let set = server.cli_json(&["dp", "set", "dp1", "--window", "daily 00:00-00:00"]);
    assert!(set["changed"].as_array().unwrap().iter().any(|c| c == "windows"), "{set:#}");
    server.wait_installed(&id, "dp1", 1, WAIT, &daemons);
    assert_same_tree(&src, &a1.current(&id));
    let shown = server.cli_json(&["dp", "show", "dp1"]);
    assert_eq!(shown["windows"], serde_json::json!(["daily 00:00-00:00"]), "{shown:#}");

    // Bad specs are refused with the form to use.
    let out = server.cli(&["dp", "set", "dp1", "--window", "someday 25:00-26:00"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DAYS HH:MM-HH:MM"), "{err}");
}

#[test]
fn a_transfer_pauses_when_its_window_closes_and_resumes_without_resending() {
    const RATE: u64 = 200_000;
    let dir = TestDir::new();
    let src = dir.join("src");
    write_random_file(&src.join("big.bin"), 2_400_000, 91);
    set_old_mtimes(&src);
    // A short stall timeout keeps batches to about a second of the link.
    let opts = ServerOpts { args: vec!["--stall-timeout-secs".into(), "4".into()], ..ServerOpts::site("PS1") };
    let server = Server::start_with(dir.join("d"), opts);
    let a1 = Agent::start(dir.join("a1"), Some("t1"));
    let daemons = [server.daemon(), a1.daemon()];
    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    let rate = RATE.to_string();
    server.cli_json(&["dp", "add", "dp1", &a1.url(), "--token", "t1", "--rate-limit", &rate]);
    server.cli_json(&["distribute", &id, "--dp", "dp1"]);
    server.cli_json(&["refresh", &id]);
    server.wait_status(&id, "a third of the content to cross", WAIT, &daemons, |st| {
        target_of(st, "dp1")["bytes_sent_total"].as_i64().unwrap_or(0) > 800_000
    });

    // The window closes: the transfer stops at the next batch boundary.
    server.cli_json(&["dp", "set", "dp1", "--window", &closed_window()]);
    let st = server.wait_status(&id, "dp1 to pause for its window", WAIT, &daemons, |st| {
        target_of(st, "dp1")["state"] == "waiting_window"
    });
    let paused_at = num(target_of(&st, "dp1"), "bytes_sent_total");
    assert!(paused_at < 2_400_000, "the whole file went before the pause: {st:#}");
    std::thread::sleep(Duration::from_millis(1500)); // would carry 300 KB at the rate
    let still = num(target_of(&server.status(&id), "dp1"), "bytes_sent_total");
    assert_eq!(still, paused_at, "bytes went out while the window was closed");
    assert!(!a1.current(&id).exists());

    // Open again: it resumes with what the DP lacks.
    server.cli_json(&["dp", "set", "dp1", "--no-window"]);
    let t = server.wait_installed(&id, "dp1", 1, WAIT, &daemons);
    assert_same_tree(&src, &a1.current(&id));
    let total = num(&t, "bytes_sent_total");
    eprintln!("paused after {paused_at} bytes; {total} in all for 2,400,000 bytes of content");
    assert!(total <= 2_400_000 + 300_000, "{total} bytes sent: what had crossed was sent again");
}

fn dpsync_store_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A window's `@RATE` holds what goes to the DP while it is open, like a rate limit.
#[test]
fn an_open_windows_rate_paces_the_transfer() {
    const RATE: u64 = 300_000;
    const SIZE: u64 = 1_500_000;
    let dir = TestDir::new();
    let src = dir.join("src");
    write_random_file(&src.join("big.bin"), SIZE, 93);
    set_old_mtimes(&src);
    let server = Server::start_with(dir.join("d"), ServerOpts::site("PS1"));
    let a1 = Agent::start(dir.join("a1"), Some("t1"));
    let daemons = [server.daemon(), a1.daemon()];
    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    let window = format!("daily 00:00-00:00@{RATE}");
    server.cli_json(&["dp", "add", "dp1", &a1.url(), "--token", "t1", "--window", &window]);
    server.cli_json(&["distribute", &id, "--dp", "dp1"]);
    let started = std::time::Instant::now();
    server.cli_json(&["refresh", &id]);
    let t = server.wait_installed(&id, "dp1", 1, WAIT, &daemons);
    let took = started.elapsed().as_secs_f64();
    let sent = num(&t, "bytes_sent_total") as f64;
    eprintln!("{sent} bytes in {took:.2} s through a window of {RATE} B/s");
    assert!(sent >= SIZE as f64, "{t:#}");
    assert!(sent / took <= 1.1 * RATE as f64, "{:.0} B/s through a window of {RATE} B/s", sent / took);
    assert_same_tree(&src, &a1.current(&id));
}
