//! The receiver's `GET /`: a small read-only page of what it holds, for branch staff
//! (package, installed version, files and size, the previous version kept for rollback,
//! last validation). It needs no token: it shows nothing a client could not download
//! from the same listener already, and nothing secret (no tokens, keys or paths).

use maud::{DOCTYPE, html};

use crate::{Agent, VersionSink, daemon};

const STYLE: &str = "body{margin:0;font:14px/1.45 system-ui,'DejaVu Sans',sans-serif;color:#1d2433;background:#f5f7fa}\
header{background:#14213d;color:#fff;padding:10px 20px;font-weight:700;font-size:16px}\
header span{font-weight:400;color:#c9d3e6;margin-left:10px;font-size:14px}\
main{padding:16px 20px;max-width:1100px}\
table{width:100%;border-collapse:collapse;background:#fff;border:1px solid #d9dee6;font-variant-numeric:tabular-nums}\
th{text-align:left;color:#5f6b7c;font-size:12px;text-transform:uppercase;padding:6px 10px;border-bottom:1px solid #d9dee6}\
td{padding:6px 10px;border-bottom:1px solid #eef1f5}.mono{font-family:ui-monospace,'DejaVu Sans Mono',monospace}\
.pill{display:inline-block;padding:1px 9px;border-radius:999px;font-size:12.5px;font-weight:600}\
.ok{background:#dcf3e3;color:#1a7f37}.bad{background:#fde3e0;color:#b42318}.none{background:#e8ebef;color:#4b5563}\
p.muted{color:#5f6b7c}";

impl<S: VersionSink> Agent<S> {
    /// The page, as of now.
    pub(crate) async fn page(&self) -> String {
        let core = &self.core;
        let packages = core.db.package_summaries().await;
        let validations = core.db.validations().await.unwrap_or_default();
        let data_dir = core.data_dir.clone();
        let free = tokio::task::spawn_blocking(move || daemon::disk_free(&data_dir)).await.ok().flatten();
        let now = dpsync_store::now_ms();
        let markup = html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { "dpsync · what this distribution point holds" }
                    style { (STYLE) }
                }
                body {
                    header {
                        "dpsync distribution point"
                        span { "dpsync " (env!("CARGO_PKG_VERSION")) }
                        @if let Some(free) = free { span { (human(free)) " free on the data disk" } }
                    }
                    main {
                        @match &packages {
                            Err(e) => p.muted { "The package list cannot be read now: " (e) }
                            Ok(list) if list.iter().all(|p| p.installed_version.is_none()) => {
                                p.muted { "No package is installed here yet." }
                            }
                            Ok(list) => table {
                                thead { tr {
                                    th { "Package" } th { "Installed version" } th { "Files" } th { "Size" }
                                    th { "Previous version" } th { "Last validation" } th { "State" }
                                } }
                                tbody {
                                    @for p in list.iter().filter(|p| p.installed_version.is_some()) {
                                        @let version = p.installed_version.unwrap_or(0);
                                        @let manifest = self.sink.live_manifest(&p.id, version);
                                        @let validated = validations.get(&p.id);
                                        tr data-package=(p.id) {
                                            td.mono { (p.id) }
                                            td { "v" (version) }
                                            td { @if let Some(m) = &manifest { (m.files().count()) } @else { "–" } }
                                            td { @if let Some(m) = &manifest { (human(m.files().map(|e| e.size()).sum())) } @else { "–" } }
                                            td { @if let Some(v) = p.previous_version { "v" (v) } @else { "–" } }
                                            td {
                                                @match validated {
                                                    Some((at, true)) => { (ago(now, *at)) ", all files intact" }
                                                    Some((at, false)) => { (ago(now, *at)) ", damage found and reported" }
                                                    None => "never",
                                                }
                                            }
                                            td {
                                                @if p.broken { span.pill.bad { "damaged: repair pending" } }
                                                @else if validated.is_some_and(|(_, ok)| !ok) { span.pill.bad { "damaged" } }
                                                @else { span.pill.ok { "installed" } }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        p.muted { "Clients download files at /v1/packages/PACKAGE/files/PATH. This page is read-only." }
                    }
                }
            }
        };
        markup.into_string()
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn ago(now: i64, at: i64) -> String {
    let s = (now - at).max(0) / 1000;
    match s {
        0..60 => "just now".into(),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_for_people() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(ago(10_000, 9_000), "just now");
        assert_eq!(ago(7_200_000, 0), "2 h ago");
    }
}
