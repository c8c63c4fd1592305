//! Command-line parsing and the admin commands' output (`--json` or text for people).
//! The command-line contract is `shared/cli.md`; add to it, never break it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::util::human_bytes;
use dpsync_agent::daemon::{TlsOptions, parse_trust, read_secret, write_private};
use dpsync_api::AdminClient;
use dpsync_api::{
    ActionReport, AddPackage, AddTarget, DistributeReport, DistributeRequest, GcReport, PackageDetail, PackageInfo,
    RefreshReport, RefreshRequest, RollbackReport, StatusReport, TargetInfo, TargetRequest, ValidateReport,
};
use dpsync_api::{BackupProgress, BackupReport, BackupRequest};
use dpsync_site::{ServerConfig, ServerOverrides};

#[derive(Debug, Parser)]
#[command(
    name = "dpsync",
    version,
    about = "Content replication from a site server to distribution points and child sites"
)]
pub struct Cli {
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Admin socket of the server to talk to.
    #[arg(long, global = true, env = "DPSYNC_SOCKET")]
    socket: Option<PathBuf>,
    /// Data directory (of the daemon to run, or whose admin.sock to use).
    #[arg(long, global = true, env = "DPSYNC_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (daemons).
    #[arg(long, global = true, env = "DPSYNC_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a site server.
    Server(ServerArgs),
    /// Run a distribution point agent.
    Agent(AgentArgs),
    /// Manage packages.
    #[command(subcommand)]
    Package(PackageCmd),
    /// Re-read a package's source, commit the next source version, and distribute it.
    Refresh {
        package: String,
        /// Re-read every file, even those whose size and times did not change.
        #[arg(long)]
        verify: bool,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Follow distribution until every target is installed (exit 0) or failed (exit 1).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit 1).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Manage distribution points.
    #[command(subcommand)]
    Dp(TargetCmd),
    /// Manage child sites.
    #[command(subcommand)]
    Site(TargetCmd),
    /// Send a package to DPs, DP groups or child sites.
    Distribute {
        package: String,
        #[arg(long = "dp")]
        dps: Vec<String>,
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long = "site")]
        sites: Vec<String>,
        /// Wait until every target has the package.
        #[arg(long)]
        wait: bool,
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Per-target distribution state of one package, or of all.
    Status { package: Option<String> },
    /// Send the current version to a DP again, whole, ignoring what it reports.
    Redistribute {
        package: String,
        #[arg(long = "dp", alias = "site")]
        target: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Have DPs re-check their installed files; damaged files are repaired.
    Validate {
        package: String,
        #[arg(long = "dp")]
        target: Option<String>,
    },
    /// Make the previous version's content current again (as a new source version).
    Rollback {
        package: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Remove a package from a DP.
    Remove {
        package: String,
        #[arg(long = "dp", alias = "site")]
        target: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Prune old versions and remove content no retained version uses.
    Gc,
    /// TLS certificates for agents and child sites.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Show the server's identity.
    Info,
    /// Write a consistent snapshot of the running server into DIR (new or empty): its
    /// database, site key, TLS material, trust store, configuration, and with
    /// --with-library its content library.
    Backup {
        /// Folder to write the backup into (on the server's machine; created 0700).
        dir: PathBuf,
        /// Also copy the content library (hard links when DIR is on the same filesystem).
        #[arg(long)]
        with_library: bool,
    },
    /// Lay a backup out as the data directory of a new server (--data-dir NEW, new or
    /// empty); no server needs to run.
    Restore {
        /// The backup folder.
        dir: PathBuf,
        /// For a backup of a PostgreSQL site: the database restored with pg_restore, to
        /// check it and prepare it.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Try it on this machine: a site server, two DPs, a sample package, refreshes.
    Quickstart {
        /// Keep the temporary directory (source, data directories, logs) and print where it is.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// Three-character site code (default PS1).
    #[arg(long, env = "DPSYNC_SITE_CODE")]
    site_code: Option<String>,
    /// Receiving address for a parent site (makes this a child site).
    #[arg(long, env = "DPSYNC_LISTEN")]
    listen: Option<String>,
    /// sqlite://… or postgres://… (default: SQLite in the data directory).
    #[arg(long, env = "DPSYNC_DATABASE_URL")]
    database_url: Option<String>,
    /// Targets pushed to at once (default 8).
    #[arg(long, env = "DPSYNC_PARALLEL_TARGETS")]
    parallel_targets: Option<usize>,
    /// Retries before a target is marked failed (default 5).
    #[arg(long, env = "DPSYNC_RETRIES")]
    retries: Option<i64>,
    /// First retry delay in milliseconds; doubles each retry (default 2000).
    #[arg(long, env = "DPSYNC_RETRY_DELAY_MS")]
    retry_delay_ms: Option<u64>,
    /// Token a parent site must present on --listen.
    #[arg(long, env = "DPSYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding that token (mode 0600).
    #[arg(long, env = "DPSYNC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// TCP address serving /metrics for Prometheus (the admin socket serves it too).
    #[arg(long, env = "DPSYNC_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    receive: ReceiveArgs,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Address to receive content and serve clients on, e.g. 0.0.0.0:8443 (port 0 picks one;
    /// the bound address is written to DATA_DIR/listen.addr).
    #[arg(long, env = "DPSYNC_LISTEN")]
    listen: Option<String>,
    /// Token the site must present.
    #[arg(long, env = "DPSYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token (mode 0600).
    #[arg(long, env = "DPSYNC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    receive: ReceiveArgs,
}

#[derive(Debug, Subcommand)]
enum CertCmd {
    /// Create a self-signed certificate and key; prints the SHA-256 fingerprint to pin
    /// with `dp add … --fingerprint`.
    Create {
        /// Folder to write cert.pem and key.pem (mode 0600) into.
        #[arg(long)]
        out: PathBuf,
        /// Host names or IP addresses the certificate is for (repeatable).
        #[arg(long = "host", default_value = "localhost")]
        hosts: Vec<String>,
    },
    /// Print the SHA-256 fingerprint of a PEM certificate.
    Fingerprint { cert: PathBuf },
}

/// TLS and trust options of a receiving listener (agent, child site).
#[derive(Debug, Args)]
struct ReceiveArgs {
    /// PEM certificate chain for the listener (default: a self-signed one in DATA_DIR/tls).
    #[arg(long, env = "DPSYNC_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert (mode 0600).
    #[arg(long, env = "DPSYNC_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP instead of TLS (loopback tests, or behind a TLS-terminating proxy).
    #[arg(long, env = "DPSYNC_INSECURE_HTTP")]
    insecure_http: bool,
    /// Pin a source site's signing key: SITE=KEY (repeatable; KEY from `dpsync info` there).
    #[arg(long = "trust", value_name = "SITE=KEY")]
    trust: Vec<String>,
    /// Refuse content from source sites not pinned with --trust (no trust on first use).
    #[arg(long)]
    strict_trust: bool,
}

impl ReceiveArgs {
    fn tls(&self) -> TlsOptions {
        TlsOptions { cert: self.tls_cert.clone(), key: self.tls_key.clone(), insecure_http: self.insecure_http }
    }
}

#[derive(Debug, Subcommand)]
enum TargetCmd {
    /// Add a target.
    Add {
        name: String,
        /// Its receiving address, e.g. http://dp1.example:8443
        url: String,
        /// Token the target expects.
        #[arg(long, hide_env_values = true)]
        token: Option<String>,
        /// File holding the token (mode 0600).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// DP group (DPs only).
        #[arg(long)]
        group: Option<String>,
        /// Bandwidth limit in bytes per second.
        #[arg(long)]
        rate_limit: Option<i64>,
        /// Pin the target's TLS certificate by its SHA-256 (from `dpsync cert create` or
        /// the target's DATA_DIR/tls/fingerprint) instead of trusting certificate authorities.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// List targets.
    List,
}

#[derive(Debug, Subcommand)]
enum PackageCmd {
    /// Add a package; prints its id.
    Add { name: String, source_dir: PathBuf },
    /// List packages.
    List,
    /// Show a package and its versions.
    Show { package: String },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Server(_) | Command::Agent(_) | Command::Quickstart { .. }) {
        crate::util::tune_allocator();
    }
    dpsync_transfer::trust::install_crypto_provider();
    let json = cli.json;
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dpsync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            if json {
                println!("{}", serde_json::json!({ "error": msg }));
            }
            eprintln!("dpsync: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let Cli { json, socket, data_dir, config, command } = cli;
    let command_kind = match &command {
        Command::Dp(_) => "dp",
        _ => "site",
    };
    let client = || -> Result<AdminClient> {
        let socket = socket
            .clone()
            .or_else(|| data_dir.as_ref().map(|d| d.join("admin.sock")))
            .context("which server? pass --socket PATH or --data-dir DIR (or set DPSYNC_SOCKET)")?;
        Ok(AdminClient::new(socket))
    };
    match command {
        Command::Server(a) => {
            crate::logging::init();
            let cfg = ServerConfig::resolve(ServerOverrides {
                config,
                data_dir,
                site_code: a.site_code,
                socket,
                listen: a.listen,
                database_url: a.database_url,
                parallel_targets: a.parallel_targets,
                retries: a.retries,
                retry_delay_ms: a.retry_delay_ms,
                token: a.token,
                token_file: a.token_file,
                tls: a.receive.tls(),
                trust: parse_trust(&a.receive.trust)?,
                strict_trust: a.receive.strict_trust,
                metrics_listen: a.metrics_listen,
            })?;
            crate::daemon::server(cfg).await?;
        }
        Command::Agent(a) => {
            crate::logging::init();
            let cfg = dpsync_agent::AgentConfig::resolve(
                config.as_deref(),
                data_dir,
                a.listen,
                a.token,
                a.token_file,
                a.receive.tls(),
                parse_trust(&a.receive.trust)?,
                a.receive.strict_trust,
            )?;
            crate::daemon::agent(cfg).await?;
        }
        Command::Package(PackageCmd::Add { name, source_dir }) => {
            let source = std::path::absolute(&source_dir).context("invalid source path")?;
            let req = AddPackage { name, source: source.display().to_string() };
            let p: PackageInfo = client()?.post("/v1/packages", &req).await?;
            emit(json, &p, |p| println!("{}", p.id));
        }
        Command::Package(PackageCmd::List) => {
            let list: Vec<PackageInfo> = client()?.get("/v1/packages").await?;
            emit(json, &list, |list| {
                println!("{:<10} {:<24} {:>7}  {:<5} SOURCE", "ID", "NAME", "VERSION", "SITE");
                for p in list {
                    println!(
                        "{:<10} {:<24} {:>7}  {:<5} {}",
                        p.id,
                        p.name,
                        p.source_version,
                        p.source_site,
                        p.source_path.as_deref().unwrap_or("-")
                    );
                }
            });
        }
        Command::Package(PackageCmd::Show { package }) => {
            let d: PackageDetail = client()?.get(&format!("/v1/packages/{}", enc(&package))).await?;
            emit(json, &d, |d| {
                let p = &d.package;
                println!("package        {} ({})", p.id, p.name);
                println!("source         {}", p.source_path.as_deref().unwrap_or("-"));
                println!("source site    {}", p.source_site);
                println!("source version {}", p.source_version);
                println!("content root   {}", p.content_root.as_deref().unwrap_or("-"));
                println!();
                println!(
                    "{:>7}  {:<16} {:>7} {:>10} {:>6} {:>6} {:>6}  ORIGIN",
                    "VERSION", "ROOT", "FILES", "SIZE", "ADDED", "CHNGD", "REMVD"
                );
                for v in &d.versions {
                    println!(
                        "{:>7}  {:<16} {:>7} {:>10} {:>6} {:>6} {:>6}  {}",
                        v.source_version,
                        &v.content_root[..16.min(v.content_root.len())],
                        v.files,
                        human_bytes(v.total_bytes as u64),
                        v.files_added,
                        v.files_changed,
                        v.files_removed,
                        v.origin
                    );
                }
            });
        }
        Command::Refresh { package, verify, dry_run, wait, timeout } => {
            let req = RefreshRequest { verify, dry_run };
            let c = client()?;
            let r: RefreshReport = c.post(&format!("/v1/packages/{}/refresh", enc(&package)), &req).await?;
            if wait && !dry_run {
                return follow(&c, json, &r, print_refresh, timeout).await;
            }
            emit(json, &r, print_refresh);
        }
        Command::Cert(CertCmd::Create { out, hosts }) => {
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let pair = dpsync_transfer::trust::self_signed(&hosts)?;
            write_private(&out.join("key.pem"), pair.key_pem.as_bytes())?;
            std::fs::write(out.join("cert.pem"), &pair.cert_pem)?;
            let fp = dpsync_transfer::trust::pem_fingerprint(&pair.cert_pem)?;
            let v = serde_json::json!({"cert": out.join("cert.pem"), "key": out.join("key.pem"), "fingerprint": fp});
            emit(json, &v, |_| {
                println!("wrote {} and {}", out.join("cert.pem").display(), out.join("key.pem").display());
                println!("fingerprint {fp}");
            });
        }
        Command::Cert(CertCmd::Fingerprint { cert }) => {
            let pem = std::fs::read_to_string(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let fp = dpsync_transfer::trust::pem_fingerprint(&pem)?;
            emit(json, &serde_json::json!({ "fingerprint": fp }), |_| println!("{fp}"));
        }
        Command::Dp(TargetCmd::Add { name, url, token, token_file, group, rate_limit, fingerprint })
        | Command::Site(TargetCmd::Add { name, url, token, token_file, group, rate_limit, fingerprint }) => {
            let token = match token_file {
                Some(p) => Some(read_secret(&p)?),
                None => token,
            };
            let req = AddTarget { name, kind: command_kind.into(), url, token, group, rate_limit, fingerprint };
            let t: TargetInfo = client()?.post("/v1/targets", &req).await?;
            let what = if command_kind == "dp" { "DP" } else { "child site" };
            emit(json, &t, |t| println!("added {what} {} at {}", t.name, t.url));
        }
        Command::Dp(TargetCmd::List) | Command::Site(TargetCmd::List) => {
            let kind = if matches!(command_kind, "dp") { "dp" } else { "site" };
            let all: Vec<TargetInfo> = client()?.get("/v1/targets").await?;
            let list: Vec<TargetInfo> = all.into_iter().filter(|t| t.kind == kind).collect();
            emit(json, &list, |list| {
                println!("{:<16} {:<36} {:<10} {:>12}  TOKEN", "NAME", "URL", "GROUP", "RATE LIMIT");
                for t in list {
                    println!(
                        "{:<16} {:<36} {:<10} {:>12}  {}",
                        t.name,
                        t.url,
                        t.group.as_deref().unwrap_or("-"),
                        t.rate_limit.map(|r| format!("{}/s", human_bytes(r as u64))).unwrap_or_else(|| "-".into()),
                        if t.has_token { "yes" } else { "no" }
                    );
                }
            });
        }
        Command::Distribute { package, dps, groups, sites, wait, timeout } => {
            let c = client()?;
            let req = DistributeRequest { dps, groups, sites };
            let r: DistributeReport = c.post(&format!("/v1/packages/{}/distribute", enc(&package)), &req).await?;
            if wait {
                return follow(&c, json, &r, print_distribute, timeout).await;
            }
            emit(json, &r, print_distribute);
        }
        Command::Status { package } => {
            let c = client()?;
            match package {
                Some(p) => {
                    let s: StatusReport = c.get(&format!("/v1/packages/{}/status", enc(&p))).await?;
                    emit(json, &s, crate::wait::print_status);
                }
                None => {
                    let all: Vec<StatusReport> = c.get("/v1/status").await?;
                    emit(json, &all, |all| {
                        for s in all {
                            crate::wait::print_status(s);
                            println!();
                        }
                    });
                }
            }
        }
        Command::Redistribute { package, target, wait, timeout } => {
            return action(&client()?, json, &package, "redistribute", target, wait, timeout).await;
        }
        Command::Remove { package, target, wait, timeout } => {
            return action(&client()?, json, &package, "remove", target, wait, timeout).await;
        }
        Command::Rollback { package, wait, timeout } => {
            let c = client()?;
            let r: RollbackReport = c.post(&format!("/v1/packages/{}/rollback", enc(&package)), &()).await?;
            let text = |r: &RollbackReport| {
                println!(
                    "{} source version {} restores the content of version {} (root {}); queued for {} targets",
                    r.package, r.source_version, r.restored_version, r.content_root, r.targets_queued
                )
            };
            if wait {
                return follow(&c, json, &r, text, timeout).await;
            }
            emit(json, &r, text);
        }
        Command::Validate { package, target } => {
            let r: ValidateReport =
                client()?.post(&format!("/v1/packages/{}/validate", enc(&package)), &TargetRequest { target }).await?;
            let all_ok = r.targets.iter().all(|t| t.ok);
            emit(json, &r, |r| {
                for t in &r.targets {
                    match (&t.error, t.ok) {
                        (Some(e), _) => println!("{:<16} error: {e}", t.name),
                        (None, true) => println!("{:<16} ok ({} files checked)", t.name, t.files_checked),
                        (None, false) => {
                            println!("{:<16} {} damaged files; repair queued", t.name, t.broken.len());
                            for p in t.broken.iter().take(20) {
                                println!("    {p}");
                            }
                        }
                    }
                    for fixed in &t.repaired {
                        println!("    repaired: {fixed}");
                    }
                }
            });
            if !all_ok {
                let bad: Vec<&str> = r.targets.iter().filter(|t| !t.ok).map(|t| t.name.as_str()).collect();
                eprintln!("dpsync: validation found problems on {}", bad.join(", "));
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Gc => {
            let r: GcReport = client()?.post("/v1/gc", &()).await?;
            emit(json, &r, |r| {
                println!(
                    "pruned {} versions; removed {} objects ({}); kept {}",
                    r.versions_pruned,
                    r.objects_removed,
                    human_bytes(r.bytes_removed),
                    r.objects_kept
                )
            });
        }
        Command::Quickstart { keep } => return crate::quickstart::run(keep, json).await,
        Command::Backup { dir, with_library } => return backup(&client()?, dir, with_library, json).await,
        Command::Restore { dir, database_url } => return restore(dir, data_dir, database_url, json).await,
        Command::Info => {
            let r: dpsync_api::SiteInfo = client()?.get("/v1/site").await?;
            emit(json, &r, |r| {
                println!(
                    "site {} (dpsync {}), {} packages, {} at {}",
                    r.site_code, r.version, r.packages, r.database, r.data_dir
                )
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dpsync backup DIR [--with-library]`: the server writes the backup; on a terminal the
/// progress of a long one is shown while it runs.
async fn backup(c: &AdminClient, dir: PathBuf, with_library: bool, json: bool) -> Result<ExitCode> {
    let dir = std::path::absolute(&dir).with_context(|| format!("invalid path {}", dir.display()))?;
    let req = BackupRequest { dir: dir.display().to_string(), with_library };
    let call = {
        let c = c.clone();
        tokio::spawn(async move { c.post::<_, BackupReport>("/v1/backup", &req).await })
    };
    let poller = c.clone();
    let report = show_progress(call, json, move || {
        let c = poller.clone();
        async move { c.get::<BackupProgress>("/v1/backup").await.ok() }
    })
    .await??;
    emit(json, &report, |r| {
        println!("backup of site {} written to {} in {} ms", r.site_code, r.dir, r.duration_ms);
        if r.database_included {
            println!("  database     {} (copied while the server ran)", r.database);
        } else {
            println!("  database     {} — NOT in the backup: back it up with pg_dump -Fc", r.database);
        }
        let yes = |b: bool| if b { "yes" } else { "no (none)" };
        println!("  site key     {}", yes(r.site_key));
        println!("  TLS          {}", yes(r.tls));
        println!("  trust store  {}", yes(r.trust_store));
        if r.receive_database {
            println!("  receive.db   yes (child site)");
        }
        println!("  config       {}", r.config.as_deref().unwrap_or("none (started without --config)"));
        match &r.library {
            Some(l) => println!(
                "  library      {} objects, {} ({}: {} linked, {} copied)",
                l.objects,
                human_bytes(l.bytes),
                l.method,
                l.linked,
                l.copied
            ),
            None => println!("  library      not included (add --with-library)"),
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// `dpsync restore DIR --data-dir NEW [--database-url URL]`: offline, in this process.
async fn restore(
    dir: PathBuf,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    use dpsync_site::backup::{Progress, RestoreOptions};
    let data_dir = data_dir.context("where to? pass --data-dir NEW (a new or empty folder)")?;
    let progress = std::sync::Arc::new(Progress::new(&data_dir));
    let opts = RestoreOptions { backup_dir: dir, data_dir, database_url };
    let task = tokio::spawn(dpsync_site::backup::restore(opts, progress.clone()));
    let r = show_progress(task, json, move || {
        let p = progress.clone();
        async move { Some(p.snapshot()) }
    })
    .await??;
    emit(json, &r, |r| {
        println!("restored the backup of site {} ({}) into {}", r.site_code, r.backup_dir, r.data_dir);
        if r.database_restored {
            println!("  database     {} (dpsync.db)", r.database);
        } else if r.database_checked {
            println!("  database     {} (checked; restored by its administrator)", r.database);
        } else {
            println!("  database     {} — not in the backup: restore it with pg_restore", r.database);
        }
        match &r.library {
            Some(l) => println!("  library      {} objects, {} ({})", l.objects, human_bytes(l.bytes), l.method),
            None => println!("  library      EMPTY (the backup holds none)"),
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
        println!("start it with:\n  {}", r.start);
    });
    Ok(ExitCode::SUCCESS)
}

/// Awaits `task`; meanwhile, on a terminal, redraws one progress line on stderr from
/// what `poll` answers every 250 ms.
async fn show_progress<T, F, Fut>(mut task: tokio::task::JoinHandle<T>, json: bool, poll: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<BackupProgress>>,
{
    use std::io::{IsTerminal, Write};
    if json || !std::io::stderr().is_terminal() {
        return task.await.context("task");
    }
    let mut drawn = false;
    let out = loop {
        tokio::select! {
            done = &mut task => break done.context("task")?,
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {
                if let Some(p) = poll().await.filter(|p| p.running) {
                    let mut line = format!("  {}", p.phase);
                    if p.objects_total > 0 {
                        line.push_str(&format!(
                            ": {}/{} objects, {} of {}",
                            p.objects_done,
                            p.objects_total,
                            human_bytes(p.bytes_done),
                            human_bytes(p.bytes_total)
                        ));
                    }
                    eprint!("\r\x1b[2K{line}");
                    let _ = std::io::stderr().flush();
                    drawn = true;
                }
            }
        }
    };
    if drawn {
        eprint!("\r\x1b[2K");
    }
    Ok(out)
}

async fn action(
    c: &AdminClient,
    json: bool,
    package: &str,
    verb: &str,
    target: String,
    wait: bool,
    timeout: Option<u64>,
) -> Result<ExitCode> {
    let r: ActionReport =
        c.post(&format!("/v1/packages/{}/{verb}", enc(package)), &TargetRequest { target: Some(target) }).await?;
    let text = |r: &ActionReport| println!("{} {} queued for {}", r.package, r.action, r.targets.join(", "));
    if wait {
        return follow(c, json, &r, text, timeout).await;
    }
    emit(json, &r, text);
    Ok(ExitCode::SUCCESS)
}

/// Anything `--wait` can follow: a report that names the package and the version.
trait Followable: Serialize {
    /// `--json` prints the report with the final `status` in it (true: refresh,
    /// rollback), or the final status document alone (false: distribute and actions).
    const NESTS_STATUS: bool;
    fn package(&self) -> &str;
    fn version(&self) -> i64;
}

macro_rules! followable {
    ($($t:ty => $nests:expr),*) => {$(
        impl Followable for $t {
            const NESTS_STATUS: bool = $nests;
            fn package(&self) -> &str {
                &self.package
            }
            fn version(&self) -> i64 {
                self.source_version
            }
        }
    )*};
}
followable!(RefreshReport => true, RollbackReport => true, DistributeReport => false, ActionReport => false);

/// `--wait`: shows the report, follows the distribution to its end, and prints one JSON
/// document (the report with the final `status`) with `--json`.
async fn follow<T: Followable>(
    c: &AdminClient,
    json: bool,
    report: &T,
    text: impl FnOnce(&T),
    timeout: Option<u64>,
) -> Result<ExitCode> {
    if !json {
        text(report);
    }
    let outcome = crate::wait::wait(c, report.package(), report.version(), timeout, json).await?;
    if json && T::NESTS_STATUS {
        let mut v = serde_json::to_value(report)?;
        v["status"] = serde_json::to_value(&outcome.status)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if json {
        println!("{}", serde_json::to_string_pretty(&outcome.status)?);
    }
    Ok(outcome.exit_code())
}

fn print_distribute(r: &DistributeReport) {
    println!("{} version {} → {}", r.package, r.source_version, r.targets.join(", "));
}

fn print_refresh(r: &RefreshReport) {
    if r.dry_run {
        println!("dry run for {}: would commit source version {}", r.package, r.source_version);
        println!(
            "  files: {} added, {} changed, {} removed, {} unchanged; {} to hash",
            r.files_added,
            r.files_changed,
            r.files_removed,
            r.files_unchanged,
            human_bytes(r.bytes_to_hash)
        );
        for (label, list) in [("+", &r.added), ("~", &r.changed), ("-", &r.removed)] {
            for p in list {
                println!("  {label} {p}");
            }
        }
        return;
    }
    println!(
        "{} source version {}  root {}{}",
        r.package,
        r.source_version,
        r.content_root.as_deref().unwrap_or("-"),
        if r.content_changed { "" } else { " (content unchanged)" }
    );
    println!(
        "  files: {} added, {} changed, {} removed, {} unchanged ({} files, {} in all)",
        r.files_added,
        r.files_changed,
        r.files_removed,
        r.files_unchanged,
        r.files,
        human_bytes(r.total_bytes)
    );
    println!(
        "  hashed {} in {} files, stored {} new, {} ms; queued for {} targets",
        human_bytes(r.bytes_hashed),
        r.files_read,
        human_bytes(r.bytes_stored),
        r.duration_ms,
        r.targets_queued
    );
}

fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T)) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
    } else {
        text(value);
    }
}

/// Percent-encodes a path segment.
pub fn enc(s: &str) -> String {
    dpsync_transfer::client::percent_encode(s)
}
