//! Command-line parsing and the admin commands' output (`--json` or text for people).
//! The command-line contract is `shared/cli.md`; add to it, never break it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Serialize;

use crate::util::human_bytes;
use dpsync_agent::daemon::{read_secret, write_private};
use dpsync_agent::{AgentConfig, AgentSettings};
use dpsync_api::AdminClient;
use dpsync_api::{
    ActionReport, AddPackage, AddTarget, DistributeReport, DistributeRequest, GcReport, PackageDetail, PackageInfo,
    RefreshReport, RefreshRequest, RollbackReport, StatusReport, TargetInfo, TargetRequest, ValidateReport,
};
use dpsync_site::{ServerConfig, ServerSettings};

#[derive(Debug, Parser)]
#[command(
    name = "dpsync",
    version,
    about = "Content replication from a site server to distribution points and child sites"
)]
pub struct Cli {
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// Admin socket of the server to talk to (or, for `server`, to open).
    #[arg(long, global = true, env = "DPSYNC_SOCKET", value_name = "PATH", help_heading = "Global options")]
    socket: Option<PathBuf>,
    /// Data directory (of the daemon to run, or whose admin.sock to use).
    #[arg(long, global = true, env = "DPSYNC_DATA_DIR", value_name = "DIR", help_heading = "Global options")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Parses the command line (exits with clap's message if it is wrong). The global
    /// `--data-dir` and `--socket` read `DPSYNC_DATA_DIR` and `DPSYNC_SOCKET` for the admin
    /// commands; a daemon's flag layer takes from them only what the command line gave,
    /// since its settings read the environment themselves, beneath the flags.
    fn from_command_line() -> Self {
        let matches = Self::command().get_matches();
        let mut cli = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let data_dir = cli.data_dir.clone().filter(|_| given("data_dir"));
        let socket = cli.socket.clone().filter(|_| given("socket"));
        match &mut cli.command {
            Command::Server(a) => (a.settings.data_dir, a.settings.socket) = (data_dir, socket),
            Command::Agent(a) => a.settings.data_dir = data_dir,
            _ => {}
        }
        cli
    }
}

const SERVER_SETTINGS_HELP: &str = "Every option above is also an environment variable, DPSYNC_ and its name in \
capitals (--retry-delay-ms: DPSYNC_RETRY_DELAY_MS), and a key of the --config file (retry_delay_ms = 2000); so are \
--data-dir and --socket (data_dir, socket). A flag wins over the environment, which wins over the file.";

const AGENT_SETTINGS_HELP: &str = "Every option above is also an environment variable, DPSYNC_ and its name in \
capitals (--disk-reserve-mib: DPSYNC_DISK_RESERVE_MIB), and a key of the --config file (disk_reserve_mib = 512); \
so is --data-dir (data_dir). A flag wins over the environment, which wins over the file.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a site server.
    #[command(after_help = SERVER_SETTINGS_HELP)]
    Server(ServerArgs),
    /// Run a distribution point agent.
    #[command(after_help = AGENT_SETTINGS_HELP)]
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
    /// Try it on this machine: a site server, two DPs, a sample package, refreshes.
    Quickstart {
        /// Keep the temporary directory (source, data directories, logs) and print where it is.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// TOML configuration file; its keys are the options' names with underscores.
    #[arg(long, env = "DPSYNC_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: ServerSettings,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// TOML configuration file; its keys are the options' names with underscores.
    #[arg(long, env = "DPSYNC_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: AgentSettings,
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
    let cli = Cli::from_command_line();
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
    let Cli { json, socket, data_dir, command } = cli;
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
            let cfg = ServerConfig::load(a.config.as_deref(), &a.settings)?;
            crate::daemon::server(cfg).await?;
        }
        Command::Agent(a) => {
            crate::logging::init();
            let cfg = AgentConfig::load(a.config.as_deref(), &a.settings)?;
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
