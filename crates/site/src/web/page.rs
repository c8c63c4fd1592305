//! The status page's HTML (maud, checked at compile time). Rendered from the same JSON
//! the page's script polls, with the rules of [`super::view`], so the script's first
//! update changes only what changed.

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::view::{self, Counts, PAGE_SIZE, arr, int_of, str_of};

/// The whole page for `packages` (the JSON of `GET /v1/status`) at `now` (Unix ms).
pub fn render(site_code: &str, packages: &[Value], now: i64) -> String {
    let mut counts = Counts::default();
    for p in packages {
        counts.add(arr(p, "targets"));
    }
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "dpsync · site " (site_code) }
                link rel="stylesheet" href="/static/status.css";
                script src="/static/status.js" defer {}
            }
            body data-site=(site_code) data-page-size=(PAGE_SIZE) {
                header.top {
                    div.brand { "dpsync" span.site { "site " (site_code) } }
                    (summary(&counts))
                    input #filter type="search" placeholder="Filter targets: name or state" aria-label="Filter targets";
                    div #live .live { span.dot {} "updated " span #updated { "just now" } }
                }
                main #packages {
                    @if packages.is_empty() {
                        p.empty { "No packages yet: " code { "dpsync package add NAME SOURCE_DIR" } }
                    }
                    @for p in packages { (package(p, now)) }
                }
            }
        }
    };
    markup.into_string()
}

fn summary(c: &Counts) -> Markup {
    html! {
        div #summary .summary {
            span.chip.g-installed { b #n-installed { (c.installed) } " installed" }
            span.chip.g-active { b #n-active { (c.active) } " in progress" }
            span.chip.g-waiting { b #n-waiting { (c.waiting) } " waiting" }
            span.chip.g-failing { b #n-failing { (c.failing) } " failing" }
        }
    }
}

/// `2 installed · 1 failing`: the non-zero groups of one package.
pub fn counts_text(c: &Counts) -> String {
    let parts = [
        (c.failing, "failing"),
        (c.active, "in progress"),
        (c.waiting, "waiting"),
        (c.installed, "installed"),
        (c.other, "other"),
    ];
    let words: Vec<String> = parts.iter().filter(|(n, _)| *n > 0).map(|(n, w)| format!("{n} {w}")).collect();
    if words.is_empty() { "no targets".into() } else { words.join(" · ") }
}

fn refresh_text(p: &Value, now: i64) -> (String, &'static str) {
    let Some(r) = p.get("last_refresh").filter(|r| r.is_object()) else { return ("never".into(), "") };
    let at = int_of(r, "at").map(|at| view::ago(now, at)).unwrap_or_default();
    let took = int_of(r, "duration_ms").map(|ms| format!(" · took {}", view::took(ms))).unwrap_or_default();
    if r.get("ok").and_then(Value::as_bool).unwrap_or(false) {
        (format!("ok · {at}{took}"), "ok")
    } else {
        let why = str_of(r, "error");
        (format!("failed · {at}{took}: {why}"), "bad")
    }
}

fn schedule_text(p: &Value) -> String {
    ["schedule", "refresh_every"]
        .iter()
        .find_map(|k| p.get(*k).and_then(Value::as_str))
        .map(|s| format!("every {s}"))
        .unwrap_or_else(|| "manual".into())
}

fn package(p: &Value, now: i64) -> Markup {
    let id = str_of(p, "package");
    let targets = arr(p, "targets");
    let mut counts = Counts::default();
    counts.add(targets);
    let sorted = view::sorted(targets);
    let shown = &sorted[..sorted.len().min(PAGE_SIZE)];
    let (refresh, refresh_class) = refresh_text(p, now);
    let root = str_of(p, "content_root");
    html! {
        section.pkg #{"pkg-" (id)} data-package=(id) {
            div.pkg-head {
                h2 { span.pkg-id { (id) } " " span.pkg-name { (str_of(p, "name")) } }
                dl.facts {
                    div { dt { "source version" } dd.f-version { "v" (int_of(p, "source_version").unwrap_or(0)) } }
                    div { dt { "content root" } dd.f-root.mono title=(root) { (root.get(..12).unwrap_or(root)) } }
                    div { dt { "source site" } dd.f-site { (str_of(p, "source_site")) } }
                    div { dt { "last refresh" } dd.f-refresh.{(refresh_class)} title=(refresh) { (refresh) } }
                    div { dt { "schedule" } dd.f-schedule { (schedule_text(p)) } }
                    div { dt { "targets" } dd.f-counts { (counts_text(&counts)) } }
                }
            }
            table.targets {
                colgroup {
                    col.c-name; col.c-kind; col.c-state; col.c-ver; col.c-prog; col.c-err; col.c-next;
                }
                thead {
                    tr { th { "Target" } th { "Kind" } th { "State" } th { "Version" } th { "Progress" } th { "Last error" } th { "Next" } }
                }
                @for t in shown { (target_body(t, now)) }
            }
            div.pager hidden[targets.len() <= PAGE_SIZE] {
                button.prev type="button" disabled { "‹ Previous" }
                span.range { "1–" (shown.len()) " of " (targets.len()) }
                button.next type="button" disabled[targets.len() <= PAGE_SIZE] { "Next ›" }
            }
        }
    }
}

fn target_body(t: &Value, now: i64) -> Markup {
    html! {
        tbody.t data-name=(str_of(t, "name")) {
            (row(t, now, None))
            @for c in view::sorted(arr(t, "targets")) { (row(c, now, Some(str_of(t, "name")))) }
        }
    }
}

/// One target's row; `parent` is the child site a nested target belongs to.
fn row(t: &Value, now: i64, parent: Option<&str>) -> Markup {
    let state = str_of(t, "state");
    let name = str_of(t, "name");
    let progress = view::progress(t, now);
    let error = t.get("last_error").and_then(Value::as_str).filter(|e| !e.is_empty());
    html! {
        tr.row.nested[parent.is_some()] data-target=(name) data-state=(state) data-group=(view::group(state)) {
            td.name title=(name) {
                @if let Some(site) = parent { span.via { (site) " › " } }
                (name)
            }
            td.kind { (str_of(t, "kind")) }
            td.state { span.pill.{"g-" (view::group(state))} { (state.replace('_', " ")) } }
            td.ver { (view::versions(t)) }
            td.prog {
                @match &progress {
                    Some((Some(f), text)) => {
                        progress max="1" value=(format!("{f:.4}")) title=(format!("{:.0} %", f * 100.0)) {}
                        span.ptext { (text) }
                    }
                    Some((None, text)) => { progress max="1" hidden {} span.ptext { (text) } }
                    None => { progress max="1" hidden {} span.ptext {} }
                }
            }
            td.err title=[error] {
                div.ebox {
                    @if let Some(e) = error {
                        span.eage { (error_age(t, now)) }
                        span.etext { (e) }
                    } @else {
                        span.eage {} span.etext {}
                    }
                }
            }
            td.next { (view::next(t, now)) }
        }
    }
}

fn error_age(t: &Value, now: i64) -> String {
    view::error_at(t).map(|at| view::ago(now, at)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_page_names_every_target_with_its_state_and_escapes_what_it_shows() {
        let status = vec![json!({
            "package": "PS100001", "name": "Office <b>365</b>", "source_site": "PS1", "source_version": 3,
            "content_root": "9f3a1c2b4d5e6f708192a3b4c5d6e7f8",
            "last_refresh": {"at": 1_000, "ok": true, "duration_ms": 1500, "source_version": 3, "error": null},
            "targets": [
                {"name": "dp1", "kind": "dp", "state": "installed", "installed_version": 3, "desired_version": 3,
                 "last_error": null, "updated_at": 0},
                {"name": "dp9", "kind": "dp", "state": "retrying", "installed_version": null, "desired_version": 3,
                 "last_error": "cannot connect: <refused>", "updated_at": 0, "next_attempt_at": 70_000},
                {"name": "child", "kind": "site", "state": "installed", "installed_version": 3, "desired_version": 3,
                 "targets": [{"name": "cdp", "kind": "dp", "state": "failed", "last_error": "x"}]},
            ]
        })];
        let html = render("PS1", &status, 10_000);
        assert!(html.contains("Office &lt;b&gt;365&lt;/b&gt;"), "{html}");
        assert!(html.contains("cannot connect: &lt;refused&gt;"), "{html}");
        let dp9 = html.find("data-target=\"dp9\"").unwrap();
        let dp1 = html.find("data-target=\"dp1\"").unwrap();
        assert!(dp9 < dp1, "the failing target comes first");
        assert!(html.contains("data-target=\"cdp\" data-state=\"failed\""), "{html}");
        assert!(html.contains("<b id=\"n-failing\">2</b>"), "{html}");
        assert!(html.contains("<b id=\"n-installed\">2</b>"), "{html}");
        assert!(html.contains("retry in 1 min"), "{html}");
        assert!(html.contains("ok · 9 s ago · took 1.5 s"), "{html}");
        assert!(html.contains(">9f3a1c2b4d5e<"), "{html}");
    }

    #[test]
    fn a_large_package_renders_one_page_of_targets() {
        let targets: Vec<Value> =
            (0..5000).map(|i| json!({"name": format!("dp{i:04}"), "kind": "dp", "state": "installed"})).collect();
        let html = render("PS1", &[json!({"package": "PS100001", "name": "Big", "targets": targets})], 0);
        assert_eq!(html.matches("<tr class=\"row\"").count(), PAGE_SIZE);
        assert!(html.contains("1–50 of 5000"), "{}", &html[html.len() - 400..]);
        assert!(html.len() < 100_000, "{} bytes", html.len());
    }
}
