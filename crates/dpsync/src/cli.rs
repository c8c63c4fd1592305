//! Command-line parsing and the admin commands' output (`--json` or text for people).
//! The command-line contract is `shared/cli.md`; add to it, never break it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Serialize;

use crate::util::{human_bytes, outln, plural, when};
use dpsync_agent::daemon::{read_secret, write_private};
use dpsync_agent::{AgentConfig, AgentSettings};
use dpsync_api::AdminClient;
use dpsync_api::{
    ActionReport, AddPackage, AddTarget, DeleteReport, DistributeReport, DistributeRequest, GcReport, PackageDetail,
    PackageInfo, RefreshReport, RefreshRequest, RetryReport, RetryRequest, RollbackReport, SetPackage, SetTarget,
    SetTargetReport, StatusReport, TargetDetail, TargetInfo, TargetRequest, ValidateReport,
};
use dpsync_api::{BackupProgress, BackupReport, BackupRequest, ExportReport, ExportRequest};
use dpsync_hash::path::escape_controls;
use dpsync_site::{ServerConfig, ServerSettings};
use dpsync_transfer::bundle::{BundleHeader, BundleReader};

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
            Command::Quickstart { data_dir: dir, .. } => *dir = data_dir,
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
    Server(Box<ServerArgs>),
    /// Run a distribution point agent.
    #[command(after_help = AGENT_SETTINGS_HELP)]
    Agent(AgentArgs),
    /// Manage packages.
    #[command(subcommand)]
    Package(PackageCmd),
    /// Re-read a package's source, commit the next source version, and distribute it.
    Refresh {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// Re-read every file, even those whose size and times did not change.
        #[arg(long)]
        verify: bool,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Manage distribution points.
    #[command(subcommand)]
    Dp(TargetCmd),
    /// Manage child sites.
    #[command(subcommand)]
    Site(TargetCmd),
    /// Send a package to DPs, DP groups or child sites.
    Distribute {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// A DP to send it to (repeatable).
        #[arg(long = "dp", value_name = "NAME")]
        dps: Vec<String>,
        /// A DP group: its DPs now and those that join it later (repeatable).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// A child site to send it to (repeatable).
        #[arg(long = "site", value_name = "NAME")]
        sites: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Per-target distribution state of one package, or one line per package.
    Status {
        /// Package id or name (default: every package, one line each).
        package: Option<String>,
        /// Only what is failing: every package's failing targets, with their error and
        /// next retry.
        #[arg(long)]
        failed: bool,
    },
    /// Try a package's failing targets again now (instead of at their next retry).
    Retry {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// Only this DP (or, as --site, child site); default: every failing target.
        #[arg(long = "dp", alias = "site", value_name = "NAME")]
        target: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Send the current version to a DP again, whole, ignoring what it reports.
    Redistribute {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// The DP (or, as --site, the child site) to send it to.
        #[arg(long = "dp", alias = "site", value_name = "NAME")]
        target: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Have DPs re-check their installed files; damaged files are repaired.
    Validate {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// Only this DP (default: every target of the package).
        #[arg(long = "dp", value_name = "NAME")]
        target: Option<String>,
    },
    /// Write a version of a package to a self-contained, signed bundle file, for a DP
    /// reached with a disk (`dpsync agent import` installs it there).
    Export {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// The bundle file to write (mode 0600; replaced whole once complete).
        file: PathBuf,
        /// Source version to export [default: the current one].
        #[arg(long, value_name = "N")]
        version: Option<i64>,
        /// Leave out the chunks of this older version, which the DP already holds.
        #[arg(long, value_name = "M")]
        base_version: Option<i64>,
    },
    /// Make the previous version's content current again (as a new source version).
    Rollback {
        /// Package id (e.g. PS100001) or name.
        package: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a package from a DP.
    Remove {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// The DP (or, as --site, the child site) to remove it from.
        #[arg(long = "dp", alias = "site", value_name = "NAME")]
        target: String,
        #[command(flatten)]
        wait: WaitArgs,
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
        /// The global --data-dir when given on the command line (not DPSYNC_DATA_DIR).
        #[arg(skip)]
        data_dir: Option<PathBuf>,
    },
    /// Print a completion script for SHELL, e.g. `dpsync completions bash >
    /// /usr/share/bash-completion/completions/dpsync`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (dpsync.1, dpsync-server.1, dpsync-refresh.1, …) into DIR.
    Man {
        /// Folder to write them into (created if missing), e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

/// `--wait` and its `--timeout`, for the commands that queue distribution work.
#[derive(Debug, Clone, Copy, Args)]
struct WaitArgs {
    /// Follow the distribution until every target is done (exit 0) or one failed (exit 1),
    /// with progress on a terminal.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds (exit 1).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
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
#[command(args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    action: Option<AgentCmd>,
    /// TOML configuration file; its keys are the options' names with underscores.
    #[arg(long, env = "DPSYNC_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: AgentSettings,
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// Install a bundle written by `dpsync export` on the DP of --data-dir (stop its
    /// agent first). Checks the owner's signature, every chunk and the whole file first;
    /// never replaces a newer installed version.
    Import {
        /// The bundle file.
        file: PathBuf,
        /// The agent's TOML configuration file (for its pinned site keys).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
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
    Fingerprint {
        /// The certificate file (PEM).
        cert: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TargetCmd {
    /// Add a target.
    Add {
        /// A name for it, unique on this site (used by --dp / --site NAME).
        name: String,
        /// Its receiving address, e.g. https://dp1.example:8443 (agents serve TLS unless
        /// started with --insecure-http). A child site run by several nodes may be given
        /// one address per node: when one does not answer, the next is used.
        #[arg(required = true, num_args = 1..)]
        url: Vec<String>,
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
        #[arg(long, value_name = "BYTES_PER_S")]
        rate_limit: Option<i64>,
        /// Pin the target's TLS certificate by its SHA-256 (from `dpsync cert create` or
        /// the target's DATA_DIR/tls/fingerprint) instead of trusting certificate authorities.
        #[arg(long)]
        fingerprint: Option<String>,
        /// A send window, "DAYS HH:MM-HH:MM[@RATE]" in the server's local time, e.g.
        /// "mon-fri 22:00-06:00@2MiB" (repeatable; none: always open).
        #[arg(long = "window", value_name = "SPEC")]
        windows: Vec<String>,
        /// Validate the target's content on a schedule, e.g. 6h or 7d (spread, one tree at
        /// a time; what broke is repaired).
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        validate_every: Option<i64>,
        /// A pull DP: it fetches the chunks it lacks from its --source DPs (the site sends
        /// the manifest, and what no source could give).
        #[arg(long, requires = "sources")]
        pull: bool,
        /// A DP a pull DP fetches from (repeatable, rank order), or `auto`: any DP of its
        /// group that has the version, several at once.
        #[arg(long = "source", value_name = "DP", requires = "pull")]
        sources: Vec<String>,
    },
    /// List targets.
    List,
    /// Change a target's settings; only those given change. A new URL, token or
    /// fingerprint retries its failing packages at once; joining a group sends it the
    /// group's packages (leaving one removes nothing).
    Set(SetArgs),
    /// Show a target's settings and the state of every package on it.
    Show {
        /// The target's name.
        name: String,
    },
    /// Remove this site's packages from a target, wait for it, then forget the target
    /// (its name can be added again).
    Remove {
        /// The target's name.
        name: String,
        /// Forget it now without asking it to delete anything (e.g. it is gone for good).
        #[arg(long)]
        forget: bool,
        /// Give up waiting for the removals after this many seconds (the target is kept).
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Debug, Args)]
struct SetArgs {
    /// The target's name.
    name: String,
    /// New receiving address, e.g. https://dp1.example:8443; repeat it for a child site
    /// run by several nodes (one address per node, tried in turn).
    #[arg(long)]
    url: Vec<String>,
    /// New token the target expects.
    #[arg(long, hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the new token (mode 0600).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Pin this SHA-256 of the target's TLS certificate (re-pin after it changed).
    #[arg(long)]
    fingerprint: Option<String>,
    /// Join this DP group (and receive its packages).
    #[arg(long, conflicts_with = "no_group")]
    group: Option<String>,
    /// Leave its group (content stays on it).
    #[arg(long)]
    no_group: bool,
    /// Bandwidth limit in bytes per second.
    #[arg(long, value_name = "BYTES_PER_S", conflicts_with = "no_rate_limit")]
    rate_limit: Option<i64>,
    /// No bandwidth limit.
    #[arg(long)]
    no_rate_limit: bool,
    /// A send window, "DAYS HH:MM-HH:MM[@RATE]" in the server's local time (repeatable;
    /// replaces the windows it had).
    #[arg(long = "window", value_name = "SPEC", conflicts_with = "no_window")]
    windows: Vec<String>,
    /// No send window: content may go at any time.
    #[arg(long)]
    no_window: bool,
    /// Validate its content on a schedule, e.g. 6h or 7d (spread; what broke is repaired).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, conflicts_with = "no_validate")]
    validate_every: Option<i64>,
    /// No scheduled validation.
    #[arg(long)]
    no_validate: bool,
    /// Make it a pull DP: it fetches what it lacks from its --source DPs.
    #[arg(long, requires = "sources", conflicts_with = "push")]
    pull: bool,
    /// A DP it pulls from (repeatable, rank order; replaces its sources), or `auto`.
    #[arg(long = "source", value_name = "DP", requires = "pull")]
    sources: Vec<String>,
    /// The site pushes everything to it again (no longer a pull DP).
    #[arg(long)]
    push: bool,
}

#[derive(Debug, Subcommand)]
enum PackageCmd {
    /// Add a package; prints its id.
    Add {
        /// A name for it, unique on this site.
        name: String,
        /// The folder whose content the package is (read at each refresh).
        source_dir: PathBuf,
    },
    /// List packages.
    List,
    /// Show a package and its versions.
    Show {
        /// Package id (e.g. PS100001) or name.
        package: String,
    },
    /// Change a package's name, source folder, priority or refresh schedule, or hand it
    /// to another site.
    Set {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// A new name, unique on this site.
        #[arg(long)]
        name: Option<String>,
        /// A new source folder (read from the next refresh on).
        #[arg(long, value_name = "DIR")]
        source: Option<PathBuf>,
        /// Jobs of higher priority are started first.
        #[arg(long, value_parser = ["high", "medium", "low"])]
        priority: Option<String>,
        /// Refresh on a schedule, e.g. 30s, 15m, 6h, 7d; a version is committed only when
        /// the content changed.
        #[arg(long, value_name = "DUR", value_parser = parse_duration, conflicts_with = "no_schedule")]
        refresh_every: Option<i64>,
        /// Stop refreshing on a schedule.
        #[arg(long)]
        no_schedule: bool,
        /// Hand the package to a child site of this one (its code, e.g. CH1): from then on
        /// only that site refreshes or rolls it back; versions keep growing, the id stays.
        #[arg(long, value_name = "CODE")]
        source_site: Option<String>,
    },
    /// Remove a package from every target, then forget it (`dpsync gc` reclaims its content).
    Delete {
        /// Package id (e.g. PS100001) or name.
        package: String,
        /// Wait until every target dropped it, showing progress.
        #[arg(long)]
        wait: bool,
    },
}

/// `DUR` of the command line, in milliseconds.
fn parse_duration(text: &str) -> Result<i64, String> {
    dpsync_api::parse_duration(text)
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
            // One line, whatever the names in it hold (a source file may be called "a\nb").
            let msg = escape_controls(&format!("{e:#}")).into_owned();
            if json {
                outln!("{}", serde_json::json!({ "error": msg }));
            }
            eprintln!("dpsync: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let Cli { json, socket, data_dir, command } = cli;
    let client = || -> Result<AdminClient> {
        let socket = socket
            .clone()
            .or_else(|| data_dir.as_ref().map(|d| d.join("admin.sock")))
            .context("which server? pass --socket PATH or --data-dir DIR (or set DPSYNC_SOCKET)")?;
        Ok(AdminClient::new(socket))
    };
    match command {
        Command::Server(a) => {
            let cfg = ServerConfig::load(a.config.as_deref(), &a.settings)?;
            crate::logging::init(cfg.log_format);
            crate::daemon::server(cfg).await?;
        }
        Command::Agent(AgentArgs { action: Some(AgentCmd::Import { file, config }), .. }) => {
            return import_cmd(json, data_dir, config, &file).await;
        }
        Command::Agent(a) => {
            let cfg = AgentConfig::load(a.config.as_deref(), &a.settings)?;
            crate::logging::init(cfg.log_format);
            crate::daemon::agent(cfg).await?;
        }
        Command::Package(cmd) => return package_cmd(&client()?, json, cmd).await,
        Command::Refresh { package, verify, dry_run, wait } => {
            return refresh_cmd(&client()?, json, &package, RefreshRequest { verify, dry_run }, wait).await;
        }
        Command::Cert(cmd) => cert_cmd(json, cmd)?,
        Command::Dp(cmd) => return target_cmd(&client()?, json, "dp", cmd).await,
        Command::Site(cmd) => return target_cmd(&client()?, json, "site", cmd).await,
        Command::Distribute { package, dps, groups, sites, wait } => {
            return distribute_cmd(&client()?, json, &package, DistributeRequest { dps, groups, sites }, wait).await;
        }
        Command::Status { package, failed } => status_cmd(&client()?, json, package, failed).await?,
        Command::Retry { package, target, wait } => return retry_cmd(&client()?, json, &package, target, wait).await,
        Command::Redistribute { package, target, wait } => {
            return action(&client()?, json, &package, "redistribute", target, wait).await;
        }
        Command::Remove { package, target, wait } => {
            return action(&client()?, json, &package, "remove", target, wait).await;
        }
        Command::Rollback { package, wait } => return rollback_cmd(&client()?, json, &package, wait).await,
        Command::Export { package, file, version, base_version } => {
            export_cmd(&client()?, json, &package, &file, ExportRequest { version, base_version }).await?
        }
        Command::Validate { package, target } => return validate_cmd(&client()?, json, &package, target).await,
        Command::Gc => gc_cmd(&client()?, json).await?,
        Command::Quickstart { keep, data_dir } => return crate::quickstart::run(keep, data_dir, json).await,
        Command::Completions { shell } => crate::docs::completions(Cli::command(), shell)?,
        Command::Man { dir } => crate::docs::man_pages(Cli::command(), &dir, json)?,
        Command::Info => info_cmd(&client()?, json).await?,
        Command::Backup { dir, with_library } => return backup(&client()?, dir, with_library, json).await,
        Command::Restore { dir, database_url } => return restore(dir, data_dir, database_url, json).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn package_cmd(c: &AdminClient, json: bool, cmd: PackageCmd) -> Result<ExitCode> {
    match cmd {
        PackageCmd::Add { name, source_dir } => {
            let source = std::path::absolute(&source_dir).context("invalid source path")?;
            let req = AddPackage { name, source: source.display().to_string() };
            let p: PackageInfo = c.post("/v1/packages", &req).await?;
            emit(json, &p, |p| outln!("{}", p.id));
        }
        PackageCmd::List => {
            let list: Vec<PackageInfo> = c.get("/v1/packages").await?;
            emit(json, &list, |list| {
                outln!(
                    "{:<10} {:<24} {:>7}  {:<5} {:<8} {:<8} {:<9} SOURCE",
                    "ID",
                    "NAME",
                    "VERSION",
                    "SITE",
                    "STATE",
                    "PRIORITY",
                    "SCHEDULE"
                );
                for p in list {
                    outln!(
                        "{:<10} {:<24} {:>7}  {:<5} {:<8} {:<8} {:<9} {}",
                        p.id,
                        p.name,
                        p.source_version,
                        p.source_site,
                        p.state,
                        p.priority,
                        p.refresh_every_ms.map(dpsync_api::format_duration).unwrap_or_else(|| "-".into()),
                        p.source_path.as_deref().unwrap_or("-")
                    );
                }
            });
        }
        PackageCmd::Show { package } => {
            let d: PackageDetail = c.get(&format!("/v1/packages/{}", enc(&package))).await?;
            emit(json, &d, print_package_detail);
        }
        PackageCmd::Set { package, name, source, priority, refresh_every, no_schedule, source_site } => {
            let source = source
                .map(|s| std::path::absolute(&s).context("invalid source path"))
                .transpose()?
                .map(|s| s.display().to_string());
            let req = SetPackage { name, source, priority, refresh_every_ms: refresh_every, no_schedule, source_site };
            let p: PackageInfo = c.patch(&format!("/v1/packages/{}", enc(&package)), &req).await?;
            emit(json, &p, |p| {
                let schedule = match p.refresh_every_ms {
                    Some(ms) => format!("refreshed every {}", dpsync_api::format_duration(ms)),
                    None => "no refresh schedule".into(),
                };
                outln!(
                    "{} ({}): owned by site {}, source {}, priority {}, {schedule}",
                    p.id,
                    p.name,
                    p.source_site,
                    p.source_path.as_deref().unwrap_or("-"),
                    p.priority
                );
            });
        }
        PackageCmd::Delete { package, wait } => return delete_package(c, json, &package, wait).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// `package delete [--wait]`: with `--wait`, follows the removals until the package is
/// gone (exit 0), or until every target still holding it refuses for good (exit 1,
/// naming them); a target that is down keeps being retried, so the wait goes on.
async fn delete_package(c: &AdminClient, json: bool, package: &str, wait: bool) -> Result<ExitCode> {
    let report: DeleteReport = c.delete(&format!("/v1/packages/{}", enc(package))).await?;
    if !wait || report.state == "deleted" {
        emit(json, &report, |r| {
            if r.state == "deleted" {
                outln!("deleted {}; `dpsync gc` reclaims its content", r.package);
            } else {
                outln!(
                    "deleting {}: removing it from {}; `dpsync package list` shows it as deleting until they \
                     dropped it",
                    r.package,
                    r.targets.join(", ")
                );
            }
        });
        return Ok(ExitCode::SUCCESS);
    }
    let id = report.package.clone();
    let mut shown: std::collections::HashMap<String, String> = Default::default();
    loop {
        let status: StatusReport = match c.get(&format!("/v1/packages/{}/status", enc(&id))).await {
            Ok(s) => s,
            Err(e) if e.is_not_found() => break,
            Err(e) => return Err(e.into()),
        };
        let holding: Vec<_> = status.targets.iter().filter(|t| t.state.as_str() != "removed").collect();
        if !json {
            for t in &status.targets {
                let line = match &t.last_error {
                    Some(e) if t.state.as_str() != "removed" => format!("{} (last error: {e})", t.state),
                    _ => t.state.to_string(),
                };
                if shown.get(&t.name) != Some(&line) {
                    outln!("{:<16} {line}", t.name);
                    shown.insert(t.name.clone(), line);
                }
            }
        }
        if !holding.is_empty() && holding.iter().all(|t| t.state.as_str() == "failed") {
            let names: Vec<&str> = holding.iter().map(|t| t.name.as_str()).collect();
            let msg = format!(
                "{id} is still on {}, which refused the removal; fix the target (`dpsync status {id}` shows \
                 the error), then run `dpsync package delete {id}` again",
                names.join(", ")
            );
            if json {
                outln!("{}", serde_json::json!({ "package": id, "state": "deleting", "error": msg }));
            }
            eprintln!("dpsync: {msg}");
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The rows went with the last removal: every target seen holding it dropped it.
    if !json {
        let mut left: Vec<_> = shown.iter().filter(|(_, line)| line.as_str() != "removed").collect();
        left.sort();
        for (name, _) in left {
            outln!("{name:<16} removed");
        }
    }
    let done = DeleteReport { package: id, state: "deleted".into(), targets: vec![] };
    emit(json, &done, |r| outln!("deleted {}; `dpsync gc` reclaims its content", r.package));
    Ok(ExitCode::SUCCESS)
}

fn print_package_detail(d: &PackageDetail) {
    let p = &d.package;
    outln!("package        {} ({})", p.id, p.name);
    outln!("source         {}", p.source_path.as_deref().unwrap_or("-"));
    outln!("source site    {}", p.source_site);
    outln!("state          {}", p.state);
    outln!("priority       {}", p.priority);
    match p.refresh_every_ms {
        Some(ms) => outln!("schedule       refresh every {}", dpsync_api::format_duration(ms)),
        None => outln!("schedule       none"),
    }
    if let Some(e) = &p.schedule_error {
        outln!("last scheduled refresh failed: {e}");
    }
    if p.source_version == 0 {
        outln!("source version none yet: `dpsync refresh {}` commits the first", p.id);
    } else {
        outln!("source version {}", p.source_version);
    }
    outln!("content root   {}", p.content_root.as_deref().unwrap_or("-"));
    outln!();
    outln!(
        "{:>7}  {:<16} {:>7} {:>10} {:>6} {:>6} {:>6}  ORIGIN",
        "VERSION",
        "ROOT",
        "FILES",
        "SIZE",
        "ADDED",
        "CHNGD",
        "REMVD"
    );
    for v in &d.versions {
        outln!(
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
}

async fn refresh_cmd(
    c: &AdminClient,
    json: bool,
    package: &str,
    req: RefreshRequest,
    wait: WaitArgs,
) -> Result<ExitCode> {
    let r: RefreshReport = c.post(&format!("/v1/packages/{}/refresh", enc(package)), &req).await?;
    if wait.wait && !req.dry_run {
        return follow(c, json, &r, print_refresh, wait.timeout).await;
    }
    emit(json, &r, print_refresh);
    Ok(ExitCode::SUCCESS)
}

fn cert_cmd(json: bool, cmd: CertCmd) -> Result<()> {
    match cmd {
        CertCmd::Create { out, hosts } => {
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let pair = dpsync_transfer::trust::self_signed(&hosts)?;
            write_private(&out.join("key.pem"), pair.key_pem.as_bytes())?;
            std::fs::write(out.join("cert.pem"), &pair.cert_pem)?;
            let fp = dpsync_transfer::trust::pem_fingerprint(&pair.cert_pem)?;
            let v = serde_json::json!({"cert": out.join("cert.pem"), "key": out.join("key.pem"), "fingerprint": fp});
            emit(json, &v, |_| {
                outln!("wrote {} and {}", out.join("cert.pem").display(), out.join("key.pem").display());
                outln!("fingerprint {fp}");
            });
        }
        CertCmd::Fingerprint { cert } => {
            let pem = std::fs::read_to_string(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let fp = dpsync_transfer::trust::pem_fingerprint(&pem)?;
            emit(json, &serde_json::json!({ "fingerprint": fp }), |_| outln!("{fp}"));
        }
    }
    Ok(())
}

/// `dp …` and `site …`: `kind` is "dp" or "site".
async fn target_cmd(c: &AdminClient, json: bool, kind: &str, cmd: TargetCmd) -> Result<ExitCode> {
    match cmd {
        TargetCmd::Add {
            name,
            url,
            token,
            token_file,
            group,
            rate_limit,
            fingerprint,
            windows,
            validate_every,
            pull: _,
            sources,
        } => {
            let token = match token_file {
                Some(p) => Some(read_secret(&p)?),
                None => token,
            };
            let req = AddTarget {
                name,
                kind: kind.into(),
                url: url.join(" "),
                token,
                group,
                rate_limit,
                fingerprint,
                windows,
                validate_every_ms: validate_every,
                pull_sources: sources,
            };
            let t: TargetInfo = c.post("/v1/targets", &req).await?;
            let what = if kind == "dp" { "DP" } else { "child site" };
            emit(json, &t, |t| outln!("added {what} {} at {}", t.name, t.url));
        }
        TargetCmd::List => {
            let all: Vec<TargetInfo> = c.get("/v1/targets").await?;
            let list: Vec<TargetInfo> = all.into_iter().filter(|t| t.kind == kind).collect();
            emit(json, &list, |list| {
                outln!("{:<16} {:<36} {:<10} {:>12}  TOKEN", "NAME", "URL", "GROUP", "RATE LIMIT");
                for t in list {
                    outln!(
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
        TargetCmd::Set(a) => {
            let token = match &a.token_file {
                Some(p) => Some(Some(read_secret(p)?)),
                None => a.token.clone().map(Some),
            };
            let req = SetTarget {
                kind: Some(kind.into()),
                url: (!a.url.is_empty()).then(|| a.url.join(" ")),
                token,
                fingerprint: a.fingerprint.clone().map(Some),
                group: if a.no_group { Some(None) } else { a.group.clone().map(Some) },
                rate_limit: if a.no_rate_limit { Some(None) } else { a.rate_limit.map(Some) },
                windows: if a.no_window { Some(vec![]) } else { Some(a.windows.clone()).filter(|w| !w.is_empty()) },
                validate_every_ms: if a.no_validate { Some(None) } else { a.validate_every.map(Some) },
                pull_sources: if a.push { Some(vec![]) } else { Some(a.sources.clone()).filter(|s| !s.is_empty()) },
            };
            if req.url.is_none()
                && req.token.is_none()
                && req.fingerprint.is_none()
                && req.group.is_none()
                && req.rate_limit.is_none()
                && req.windows.is_none()
                && req.validate_every_ms.is_none()
                && req.pull_sources.is_none()
            {
                anyhow::bail!(
                    "nothing to change: give --url, --token, --token-file, --fingerprint, --group, --no-group, \
                     --rate-limit, --no-rate-limit, --window, --no-window, --validate-every, --no-validate, \
                     --pull --source DP or --push"
                );
            }
            let r: SetTargetReport = c.post(&format!("/v1/targets/{}", enc(&a.name)), &req).await?;
            emit(json, &r, print_set_target);
        }
        TargetCmd::Show { name } => {
            let d: TargetDetail = c.get(&format!("/v1/targets/{}", enc(&name))).await?;
            emit(json, &d, print_target_detail);
        }
        TargetCmd::Remove { name, forget, timeout } => {
            return crate::wait::remove_target(c, json, kind, &name, forget, timeout).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_set_target(r: &SetTargetReport) {
    let t = &r.target;
    if r.changed.is_empty() {
        outln!("{}: nothing changed", t.name);
    } else {
        outln!("{}: changed {}", t.name, r.changed.join(", "));
    }
    if !r.retried.is_empty() {
        outln!("  retrying now: {}", r.retried.join(", "));
    }
    if !r.assigned.is_empty() {
        outln!("  joined group {}: receives {}", t.group.as_deref().unwrap_or("-"), r.assigned.join(", "));
    }
}

fn print_target_detail(d: &TargetDetail) {
    let t = &d.target;
    let what = if t.kind == dpsync_api::TargetKind::Site { "child site" } else { "DP" };
    outln!("{what} {}  {}", t.name, t.url);
    outln!("  group        {}", t.group.as_deref().unwrap_or("-"));
    outln!(
        "  rate limit   {}",
        t.rate_limit.map(|r| format!("{}/s", human_bytes(r as u64))).unwrap_or_else(|| "none".into())
    );
    outln!("  token        {}", if t.has_token { "set" } else { "none" });
    outln!("  fingerprint  {}", t.fingerprint.as_deref().unwrap_or("none (not pinned)"));
    if !t.pull_sources.is_empty() {
        outln!("  pulls from   {}", t.pull_sources.join(", "));
    }
    if d.packages.is_empty() {
        outln!("  no package is distributed to it");
        return;
    }
    let counts: Vec<String> = d.counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    outln!("  packages     {} ({})", d.packages.len(), counts.join(", "));
    outln!();
    outln!("  {:<10} {:<20} {:<17} {:>9} {:>11}  LAST ERROR", "PACKAGE", "NAME", "STATE", "INSTALLED", "SENT TOTAL");
    for p in &d.packages {
        let mut error = p.last_error.clone().unwrap_or_default();
        if let Some(at) = p.next_retry_at {
            error.push_str(&format!(" (next try {})", when(at)));
        }
        outln!(
            "  {:<10} {:<20} {:<17} {:>9} {:>11}  {}",
            p.package,
            p.name,
            p.state,
            p.installed_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            human_bytes(p.bytes_sent_total.max(0) as u64),
            error.trim()
        );
    }
}

async fn retry_cmd(
    c: &AdminClient,
    json: bool,
    package: &str,
    target: Option<String>,
    wait: WaitArgs,
) -> Result<ExitCode> {
    let r: RetryReport = c.post(&format!("/v1/packages/{}/retry", enc(package)), &RetryRequest { target }).await?;
    let text = |r: &RetryReport| {
        if r.targets.is_empty() {
            outln!("{}: nothing is failing", r.package);
        } else {
            outln!("{}: retrying {} now", r.package, r.targets.join(", "));
        }
    };
    if wait.wait && r.source_version > 0 {
        return follow(c, json, &r, text, wait.timeout).await;
    }
    emit(json, &r, text);
    Ok(ExitCode::SUCCESS)
}

async fn distribute_cmd(
    c: &AdminClient,
    json: bool,
    package: &str,
    req: DistributeRequest,
    wait: WaitArgs,
) -> Result<ExitCode> {
    let r: DistributeReport = c.post(&format!("/v1/packages/{}/distribute", enc(package)), &req).await?;
    // Before the first refresh there is nothing to send, so nothing to wait for.
    if wait.wait && r.source_version > 0 {
        return follow(c, json, &r, print_distribute, wait.timeout).await;
    }
    if wait.wait && json {
        let s: StatusReport = c.get(&format!("/v1/packages/{}/status", enc(package))).await?;
        outln!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        emit(json, &r, print_distribute);
    }
    Ok(ExitCode::SUCCESS)
}

async fn status_cmd(c: &AdminClient, json: bool, package: Option<String>, failed: bool) -> Result<()> {
    match (package, failed) {
        (Some(p), false) => {
            let s: StatusReport = c.get(&format!("/v1/packages/{}/status", enc(&p))).await?;
            emit(json, &s, crate::wait::print_status);
        }
        (Some(p), true) => {
            let mut s: StatusReport = c.get(&format!("/v1/packages/{}/status", enc(&p))).await?;
            s.retain_failing();
            let list = if s.targets.is_empty() { vec![] } else { vec![s] };
            emit(json, &list, |list| crate::wait::print_failing(list));
        }
        (None, true) => {
            let all: Vec<StatusReport> = c.get("/v1/status?failed=true").await?;
            emit(json, &all, |all| crate::wait::print_failing(all));
        }
        (None, false) => {
            let all: Vec<StatusReport> = c.get("/v1/status").await?;
            emit(json, &all, |all| crate::wait::print_rollup(all));
        }
    }
    Ok(())
}

/// Streams the bundle into a 0600 temporary file beside `file`, makes it durable, then
/// renames it: `file` is never seen half-written.
async fn export_cmd(c: &AdminClient, json: bool, package: &str, file: &Path, req: ExportRequest) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let name = file.file_name().with_context(|| format!("{} names no file", file.display()))?;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .with_context(|| format!("cannot create {}: is {} writable?", tmp.display(), dir.display()))?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, out);
    let written: Result<u64> = async {
        let n = c.download(&format!("/v1/packages/{}/export", enc(package)), &req, &mut out).await?;
        out.flush().await?;
        out.get_ref().sync_all().await?;
        Ok(n)
    }
    .await;
    let bytes = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.context(format!("export of {package} failed; {} was not written", file.display())));
        }
    };
    // What was written, from the file itself (its header and manifest check out).
    let check = tmp.clone();
    let header = tokio::task::spawn_blocking(move || -> Result<BundleHeader> {
        let f = std::fs::File::open(&check)?;
        Ok(BundleReader::open(std::io::BufReader::new(f))?.header().clone())
    })
    .await?;
    let header = match header {
        Ok(h) => h,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            bail!("the server sent a bundle that does not check out ({e:#}); {} was not written", file.display());
        }
    };
    tokio::fs::rename(&tmp, file)
        .await
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), file.display()))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    let r = ExportReport {
        package: header.package,
        version: header.version,
        base_version: header.base_version,
        file: file.display().to_string(),
        bytes,
        chunks: header.chunks,
        chunk_bytes: header.chunk_bytes,
    };
    emit(json, &r, |r| {
        let base = r.base_version.map_or(String::new(), |b| format!(" without what version {b} has"));
        outln!(
            "exported {} version {}{base} to {}: {}, {} of chunks, {} in all",
            r.package,
            r.version,
            r.file,
            plural(r.chunks, "chunk"),
            human_bytes(r.chunk_bytes),
            human_bytes(r.bytes)
        )
    });
    Ok(())
}

/// `dpsync agent import FILE --data-dir DIR`: opens the DP's state itself, holding the
/// data directory's lock, so it refuses while the agent runs.
async fn import_cmd(json: bool, data_dir: Option<PathBuf>, config: Option<PathBuf>, file: &Path) -> Result<ExitCode> {
    let settings = AgentSettings {
        data_dir,
        // Not used: the import serves nothing. A configured address is kept.
        listen: Some("127.0.0.1:0".into()),
        ..AgentSettings::default()
    };
    let cfg = AgentConfig::load(config.as_deref(), &settings)?;
    dpsync_agent::daemon::secure_data_dir(&cfg.data_dir)?;
    let _lock = dpsync_agent::daemon::lock_data_dir(&cfg.data_dir).map_err(|_| {
        anyhow!(
            "the agent of {} is running (it holds the data directory's lock); stop it (e.g. `systemctl stop dpsync-agent`), \
             import, and start it again",
            cfg.data_dir.display()
        )
    })?;
    let agent = dpsync_agent::open_dp(&cfg).await?;
    let result = agent.import_bundle(file).await;
    agent.close().await;
    let r = result?;
    emit(json, &r, |r| outln!("{}", r.message));
    Ok(ExitCode::SUCCESS)
}

async fn rollback_cmd(c: &AdminClient, json: bool, package: &str, wait: WaitArgs) -> Result<ExitCode> {
    let r: RollbackReport = c.post(&format!("/v1/packages/{}/rollback", enc(package)), &()).await?;
    let text = |r: &RollbackReport| {
        outln!(
            "{} source version {} restores the content of version {} (root {}); queued for {}",
            r.package,
            r.source_version,
            r.restored_version,
            r.content_root,
            plural(r.targets_queued, "target")
        )
    };
    if wait.wait {
        return follow(c, json, &r, text, wait.timeout).await;
    }
    emit(json, &r, text);
    Ok(ExitCode::SUCCESS)
}

async fn validate_cmd(c: &AdminClient, json: bool, package: &str, target: Option<String>) -> Result<ExitCode> {
    let r: ValidateReport =
        c.post(&format!("/v1/packages/{}/validate", enc(package)), &TargetRequest { target }).await?;
    emit(json, &r, |r| {
        for t in &r.targets {
            match (&t.error, t.ok) {
                (Some(e), _) => outln!("{:<16} error: {e}", t.name),
                (None, true) => outln!("{:<16} ok ({} checked)", t.name, plural(t.files_checked, "file")),
                (None, false) => {
                    outln!("{:<16} {}; repair queued", t.name, plural(t.broken.len() as u64, "damaged file"));
                    for p in t.broken.iter().take(20) {
                        outln!("    {p}");
                    }
                }
            }
            for fixed in &t.repaired {
                outln!("    repaired: {fixed}");
            }
        }
    });
    let bad: Vec<&str> = r.targets.iter().filter(|t| !t.ok).map(|t| t.name.as_str()).collect();
    if !bad.is_empty() {
        eprintln!("dpsync: validation found problems on {}", bad.join(", "));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn gc_cmd(c: &AdminClient, json: bool) -> Result<()> {
    let r: GcReport = c.post("/v1/gc", &()).await?;
    emit(json, &r, |r| {
        outln!(
            "pruned {}; removed {} ({}); kept {}",
            plural(r.versions_pruned, "version"),
            plural(r.objects_removed, "object"),
            human_bytes(r.bytes_removed),
            r.objects_kept
        )
    });
    Ok(())
}

async fn info_cmd(c: &AdminClient, json: bool) -> Result<()> {
    let r: dpsync_api::SiteInfo = c.get("/v1/site").await?;
    emit(json, &r, |r| {
        outln!(
            "site {} (dpsync {}), {}, {} at {}",
            r.site_code,
            r.version,
            plural(r.packages, "package"),
            r.database,
            r.data_dir
        );
        outln!("node {}, content library {}", r.node, r.library);
        for n in &r.nodes {
            outln!(
                "  node {:<20} {:<5} last heartbeat {}  started {}  {} running",
                n.name,
                if n.alive { "alive" } else { "down" },
                crate::util::when(n.last_heartbeat_at),
                crate::util::when(n.started_at),
                plural(n.jobs_running, "job")
            );
        }
    });
    Ok(())
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
        outln!("backup of site {} written to {} in {} ms", r.site_code, r.dir, r.duration_ms);
        if r.database_included {
            outln!("  database     {} (copied while the server ran)", r.database);
        } else {
            outln!("  database     {} — NOT in the backup: back it up with pg_dump -Fc", r.database);
        }
        let yes = |b: bool| if b { "yes" } else { "no (none)" };
        outln!("  site key     {}", yes(r.site_key));
        outln!("  TLS          {}", yes(r.tls));
        outln!("  trust store  {}", yes(r.trust_store));
        if r.receive_database {
            outln!("  receive.db   yes (child site)");
        }
        outln!("  config       {}", r.config.as_deref().unwrap_or("none (started without --config)"));
        match &r.library {
            Some(l) => outln!(
                "  library      {} objects, {} ({}: {} linked, {} copied)",
                l.objects,
                human_bytes(l.bytes),
                l.method,
                l.linked,
                l.copied
            ),
            None => outln!("  library      not included (add --with-library)"),
        }
        for n in &r.notes {
            outln!("  note: {n}");
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
        outln!("restored the backup of site {} ({}) into {}", r.site_code, r.backup_dir, r.data_dir);
        if r.database_restored {
            outln!("  database     {} (dpsync.db)", r.database);
        } else if r.database_checked {
            outln!("  database     {} (checked; restored by its administrator)", r.database);
        } else {
            outln!("  database     {} — not in the backup: restore it with pg_restore", r.database);
        }
        match &r.library {
            Some(l) => outln!("  library      {} objects, {} ({})", l.objects, human_bytes(l.bytes), l.method),
            None => outln!("  library      EMPTY (the backup holds none)"),
        }
        for n in &r.notes {
            outln!("  note: {n}");
        }
        outln!("start it with:\n  {}", r.start);
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
    wait: WaitArgs,
) -> Result<ExitCode> {
    let r: ActionReport =
        c.post(&format!("/v1/packages/{}/{verb}", enc(package)), &TargetRequest { target: Some(target) }).await?;
    let text = |r: &ActionReport| outln!("{} {} queued for {}", r.package, r.action, r.targets.join(", "));
    if wait.wait {
        return follow(c, json, &r, text, wait.timeout).await;
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
followable!(
    RefreshReport => true,
    RollbackReport => true,
    DistributeReport => false,
    ActionReport => false,
    RetryReport => false
);

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
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else if json {
        outln!("{}", serde_json::to_string_pretty(&outcome.status)?);
    }
    Ok(outcome.exit_code())
}

fn print_distribute(r: &DistributeReport) {
    if !r.groups.is_empty() {
        outln!("{} is assigned to group {}: DPs that join it later receive it too", r.package, r.groups.join(", "));
    }
    if r.targets.is_empty() {
        outln!("{}: no DP is in group {} yet", r.package, r.groups.join(", "));
    } else if r.source_version == 0 {
        outln!(
            "{} → {}: no version yet: run `dpsync refresh {}` to send the first one",
            r.package,
            r.targets.join(", "),
            r.package
        );
    } else {
        outln!("{} version {} → {}", r.package, r.source_version, r.targets.join(", "));
    }
}

fn print_refresh(r: &RefreshReport) {
    if r.dry_run {
        outln!("dry run for {}: would commit source version {}", r.package, r.source_version);
        outln!(
            "  files: {} added, {} changed, {} removed, {} unchanged; {} to hash",
            r.files_added,
            r.files_changed,
            r.files_removed,
            r.files_unchanged,
            human_bytes(r.bytes_to_hash)
        );
        for (label, list) in [("+", &r.added), ("~", &r.changed), ("-", &r.removed)] {
            for p in list {
                outln!("  {label} {p}");
            }
        }
        return;
    }
    outln!(
        "{} source version {}  root {}{}",
        r.package,
        r.source_version,
        r.content_root.as_deref().unwrap_or("-"),
        if r.content_changed { "" } else { " (content unchanged)" }
    );
    outln!(
        "  files: {} added, {} changed, {} removed, {} unchanged ({}, {} in all)",
        r.files_added,
        r.files_changed,
        r.files_removed,
        r.files_unchanged,
        plural(r.files, "file"),
        human_bytes(r.total_bytes)
    );
    outln!(
        "  hashed {} in {}, stored {} new, {} ms; queued for {}",
        human_bytes(r.bytes_hashed),
        plural(r.files_read, "file"),
        human_bytes(r.bytes_stored),
        r.duration_ms,
        plural(r.targets_queued, "target")
    );
    if r.files_recent > 0 {
        outln!(
            "  re-read {} modified within {} ms of the previous refresh (timestamps that recent can hide a change)",
            plural(r.files_recent, "file"),
            r.recent_window_ms
        );
    }
}

fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T)) {
    if json {
        outln!("{}", serde_json::to_string_pretty(value).expect("serializable"));
    } else {
        text(value);
    }
}

/// Percent-encodes a path segment.
pub fn enc(s: &str) -> String {
    dpsync_transfer::client::percent_encode(s)
}
