//! The admin protocol between the `dpsync` CLI and a running server: HTTP/1.1 with JSON
//! bodies over the server's Unix socket. Documented in `docs/admin-api.md`.
//!
//! These are the wire types; they are also what `--json` prints, so field names are
//! part of the command-line contract (add fields freely, never rename).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod client;

pub use client::{AdminClient, CallError};

/// Defines an enum of the admin protocol that travels as a snake_case string. A string
/// this build does not know is kept as `Other` (and sent on unchanged): a newer server,
/// or a child site whose status is nested in its parent's, may report states an older
/// reader has no name for, and that must not make the whole answer unreadable.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value this build does not know, as it was sent.
            Other(String),
        }

        impl $name {
            /// Every known value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The string it travels as.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $s,)+
                    $name::Other(s) => s,
                }
            }

            /// The value a string names; `Other` for one this build does not know.
            pub fn parse(s: &str) -> Self {
                match s {
                    $($s => $name::$variant,)+
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(Self::parse(&std::borrow::Cow::<str>::deserialize(d)?))
            }
        }
    };
}

wire_enum! {
    /// What a target is.
    TargetKind {
        /// A distribution point (`dpsync agent`).
        Dp => "dp",
        /// A child site (another `dpsync server`).
        Site => "site",
    }
}

wire_enum! {
    /// The state of one package on one target (`status`'s `state`).
    DistState {
        /// Waiting for the job runner.
        Pending => "pending",
        /// A job is running (`progress` says how far).
        InProgress => "in_progress",
        /// A validation job is running: the target checks its content.
        Validating => "validating",
        /// The target holds `installed_version`, the desired version.
        Installed => "installed",
        /// The last attempt failed for a reason that may heal; tried again at `next_attempt_at`.
        Retrying => "retrying",
        /// Outside the target's send windows: resumes when the next opens (`next_window_at`).
        WaitingWindow => "waiting_window",
        /// Still failing after the fast retries: `last_error` says why and what to do,
        /// `next_retry_at` when it is tried again (slowly, until it works).
        Failed => "failed",
        /// The target reported damaged content; a repair is queued.
        ValidationFailed => "validation_failed",
        /// Waiting to take the package off the target.
        Removing => "removing",
        /// The package is gone from the target.
        Removed => "removed",
    }
}

wire_enum! {
    /// What a target's job does (`status`'s `action`, an action's report).
    Action {
        /// Bring the target to the desired version, sending only what it lacks.
        Install => "install",
        /// Send the whole version again and re-verify everything.
        Redistribute => "redistribute",
        /// Take the package off the target.
        Remove => "remove",
        /// Ask the target to verify its content.
        Validate => "validate",
    }
}

wire_enum! {
    /// Where a running job is (`progress.phase`).
    Phase {
        /// Asking the target what it holds.
        Connecting => "connecting",
        /// Recording the new version number for content the target already holds.
        Relabel => "relabel",
        /// Sending the manifest (or its delta).
        Manifest => "manifest",
        /// Sending the chunks the target lacks.
        Sending => "sending",
        /// Asking the target to verify, build and switch.
        Committing => "committing",
        /// Taking the package off the target.
        Removing => "removing",
    }
}

impl Default for Phase {
    /// A job starts by connecting.
    fn default() -> Self {
        Phase::Connecting
    }
}

/// An error answer: `{"error": "...", "hint": "..."}` with a 4xx/5xx status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddPackage {
    pub name: String,
    pub source: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RefreshRequest {
    #[serde(default)]
    pub verify: bool,
    #[serde(default)]
    pub dry_run: bool,
}

/// What a refresh did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefreshReport {
    pub package: String,
    pub dry_run: bool,
    /// The committed version; for a dry run, the version a refresh would create.
    pub source_version: i64,
    /// Absent for a dry run (nothing is hashed).
    pub content_root: Option<String>,
    pub previous_content_root: Option<String>,
    pub content_changed: bool,
    /// Whether a version was committed: always for a manual refresh, only when the
    /// content changed for a scheduled one, never for a dry run.
    #[serde(default)]
    pub committed: bool,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub total_bytes: u64,
    pub files_added: u64,
    pub files_changed: u64,
    pub files_removed: u64,
    pub files_unchanged: u64,
    /// Files read (new, changed, or all with `--verify`).
    pub files_read: u64,
    /// Bytes read and hashed. 0 when nothing changed.
    pub bytes_hashed: u64,
    /// Dry run: bytes a refresh would read.
    pub bytes_to_hash: u64,
    /// Bytes newly stored in the content library.
    pub bytes_stored: u64,
    /// Of `files_read`: files read again only because the previous refresh saw them
    /// modified within `recent_window_ms` of its scan, too recently for their timestamps
    /// to prove a later change; their content turned out unchanged.
    #[serde(default)]
    pub files_recent: u64,
    /// The window behind `files_recent`, in milliseconds.
    #[serde(default)]
    pub recent_window_ms: u64,
    /// Whether the refresh stored a manifest: only for content the package does not hold
    /// yet (a manifest is stored once per content root; an unchanged refresh commits a
    /// version that shares the previous one's).
    #[serde(default)]
    pub manifest_stored: bool,
    /// Whether the scan found every entry as the previous version has it (every file's
    /// stat vouched for by the scan cache), so no manifest was built or encoded.
    #[serde(default)]
    pub unchanged_fast: bool,
    /// Targets the new version was queued for.
    pub targets_queued: u64,
    pub duration_ms: u64,
    /// Where `duration_ms` went.
    #[serde(default)]
    pub phases: RefreshPhases,
    /// Dry run: paths (at most 1000 of each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// Milliseconds a refresh spent in each phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefreshPhases {
    /// Loading the previous version's manifest and scan cache.
    pub load_ms: u64,
    /// Walking the source folder.
    pub scan_ms: u64,
    /// Reading, hashing and storing what changed, and building the manifest.
    pub read_ms: u64,
    /// Committing the version to the store.
    pub commit_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageInfo {
    pub id: String,
    pub name: String,
    pub source_path: Option<String>,
    pub source_site: String,
    pub source_version: i64,
    pub content_root: Option<String>,
    pub created_at: i64,
    /// `active`, or `deleting` from `package delete` until every target dropped it.
    #[serde(default = "active")]
    pub state: String,
    /// `high`, `medium` or `low`: jobs of higher priority are claimed first.
    #[serde(default = "medium")]
    pub priority: String,
    /// Scheduled refresh interval (`package set --refresh-every`), if any.
    #[serde(default)]
    pub refresh_every_ms: Option<i64>,
    /// When the next scheduled refresh is due (unix ms).
    #[serde(default)]
    pub next_refresh_at: Option<i64>,
    /// Why the last scheduled refresh failed; `null` once one succeeds.
    #[serde(default)]
    pub schedule_error: Option<String>,
}

fn active() -> String {
    "active".into()
}

fn medium() -> String {
    "medium".into()
}

/// `PATCH /v1/packages/{pkg}` (`package set`): each field left out is unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetPackage {
    #[serde(default)]
    pub name: Option<String>,
    /// Absolute path of the new source folder.
    #[serde(default)]
    pub source: Option<String>,
    /// `high`, `medium` or `low`.
    #[serde(default)]
    pub priority: Option<String>,
    /// Refresh on a schedule, every so many milliseconds.
    #[serde(default)]
    pub refresh_every_ms: Option<i64>,
    /// Remove the refresh schedule.
    #[serde(default)]
    pub no_schedule: bool,
    /// Hand the package to this site of the hierarchy (a child site of this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_site: Option<String>,
}

/// `DELETE /v1/packages/{pkg}` (`package delete`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteReport {
    pub package: String,
    /// `deleting` (targets still to drop it) or `deleted` (its rows are gone).
    pub state: String,
    /// Targets the package is still being removed from.
    pub targets: Vec<String>,
}

/// Parses a duration as the CLI takes it: a whole number and a unit, `30s`, `15m`, `6h`,
/// `7d` (also `500ms`). Returns milliseconds.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: i64 = digits.parse().map_err(|_| format!("{text:?} is not a duration: use e.g. 30s, 15m, 6h or 7d"))?;
    let unit_ms: i64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?} is not a duration: use e.g. 30s, 15m, 6h or 7d")),
    };
    match n.checked_mul(unit_ms) {
        Some(ms) if ms > 0 => Ok(ms),
        Some(_) => Err(format!("{text:?}: a duration must be longer than 0")),
        None => Err(format!("{text:?} is too long a duration")),
    }
}

/// Milliseconds in the largest unit that divides them: `7d`, `90m`, `2s`, `1500ms`.
pub fn format_duration(ms: i64) -> String {
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageDetail {
    #[serde(flatten)]
    pub package: PackageInfo,
    pub versions: Vec<VersionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    pub source_version: i64,
    pub content_root: String,
    pub origin: String,
    pub created_at: i64,
    pub files: i64,
    pub dirs: i64,
    pub symlinks: i64,
    pub total_bytes: i64,
    pub files_added: i64,
    pub files_changed: i64,
    pub files_removed: i64,
    pub bytes_hashed: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteInfo {
    pub site_code: String,
    pub version: String,
    pub data_dir: String,
    pub database: String,
    pub packages: u64,
    /// This site's public signing key: DPs and child sites pin it (`--trust CODE=KEY`).
    pub site_key: String,
    /// The node that answered (`--node`).
    #[serde(default)]
    pub node: String,
    /// The content library folder (`--library`; shared by every node of the site).
    #[serde(default)]
    pub library: String,
    /// Every server node that ran on this site's database, by name.
    #[serde(default)]
    pub nodes: Vec<NodeInfo>,
}

/// A server node of the site (a row of `dpsync info`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// When it started (Unix milliseconds).
    pub started_at: i64,
    /// Its last heartbeat (Unix milliseconds); it beats every third of its lease.
    pub last_heartbeat_at: i64,
    /// Whether it beat within the lease time: a node that did not is taken for dead, and
    /// its jobs are claimed by the others.
    pub alive: bool,
    /// Jobs it runs now.
    pub jobs_running: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub versions_pruned: u64,
    pub objects_removed: u64,
    pub bytes_removed: u64,
    pub objects_kept: u64,
}

/// `POST /v1/targets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddTarget {
    pub name: String,
    pub kind: TargetKind,
    pub url: String,
    pub token: Option<String>,
    pub group: Option<String>,
    pub rate_limit: Option<i64>,
    /// SHA-256 of the target's TLS certificate, pinned.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Send windows, `DAYS HH:MM-HH:MM[@RATE]` each (none: always open).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<String>,
    /// Validate the target's content on a schedule, every so many milliseconds.
    #[serde(default)]
    pub validate_every_ms: Option<i64>,
    /// A pull DP: the DPs it fetches chunks from, in rank order (`auto`: any DP of its
    /// group with the version installed). Empty: the site pushes everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_sources: Vec<String>,
}

/// A target as shown to administrators (never its token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub kind: TargetKind,
    pub url: String,
    pub group: Option<String>,
    pub rate_limit: Option<i64>,
    pub has_token: bool,
    pub fingerprint: Option<String>,
    pub created_at: i64,
    /// Send windows in canonical form (none: always open).
    #[serde(default)]
    pub windows: Vec<String>,
    /// Scheduled validation interval, if any.
    #[serde(default)]
    pub validate_every_ms: Option<i64>,
    /// A pull DP's sources in rank order (`auto`: any DP of its group); empty: pushed to.
    #[serde(default)]
    pub pull_sources: Vec<String>,
}

/// `POST /v1/targets/{name}` — `dpsync dp set` / `site set`. A field left out is left as
/// it is; `null` clears an optional setting (`--no-group`, `--no-rate-limit`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetTarget {
    /// The kind the caller means (`dp set` on a child site is refused); any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<TargetKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some")]
    pub token: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some")]
    pub fingerprint: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some")]
    pub group: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some")]
    pub rate_limit: Option<Option<i64>>,
    /// New send windows (`DAYS HH:MM-HH:MM[@RATE]` each); an empty list: always open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<String>>,
    /// Validate on a schedule, every so many milliseconds; `null`: no schedule.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some")]
    pub validate_every_ms: Option<Option<i64>>,
    /// Make it a pull DP with these sources in rank order (`auto` alone: any DP of its
    /// group); an empty list: the site pushes to it again (`--push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_sources: Option<Vec<String>>,
}

/// A field that is present is `Some`, even when it is `null` (which clears the setting).
fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// What `dp set` changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetTargetReport {
    #[serde(flatten)]
    pub target: TargetInfo,
    /// Names of the settings that changed (`url`, `token`, `fingerprint`, `group`, `rate_limit`).
    pub changed: Vec<String>,
    /// Packages whose failing jobs on it were retried at once (a connection setting changed).
    pub retried: Vec<String>,
    /// Packages it received by joining its new group.
    pub assigned: Vec<String>,
}

/// `GET /v1/targets/{name}` — `dpsync dp show` / `site show`: its settings and every
/// package's state on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetDetail {
    #[serde(flatten)]
    pub target: TargetInfo,
    pub packages: Vec<TargetPackage>,
    /// How many of `packages` are in each state.
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
}

/// One package on one target (a row of [`TargetDetail`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetPackage {
    pub package: String,
    pub name: String,
    pub source_version: i64,
    pub state: DistState,
    pub action: Action,
    pub installed_version: Option<i64>,
    pub desired_version: i64,
    pub bytes_sent_last: i64,
    pub bytes_sent_total: i64,
    /// What a pull DP fetched from other DPs for its latest version.
    #[serde(default)]
    pub bytes_from_peers_last: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    pub attempts: i64,
    pub next_retry_at: Option<i64>,
    pub updated_at: i64,
    pub progress: Option<Progress>,
}

/// `POST /v1/targets/{name}/remove` — `dpsync dp remove` / `site remove`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoveTarget {
    /// The kind the caller means (`dp remove` on a child site is refused); any when absent.
    #[serde(default)]
    pub kind: Option<TargetKind>,
    /// Forget the target now, without asking it to delete this site's packages.
    #[serde(default)]
    pub forget: bool,
}

/// Where the removal of a target stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetRemoval {
    pub name: String,
    pub kind: TargetKind,
    /// The target is forgotten (its name is free again).
    pub forgotten: bool,
    /// Packages whose removal from it is still under way.
    pub removing: Vec<String>,
    /// Packages taken off it (by this call or earlier ones).
    pub removed: Vec<String>,
}

/// `POST /v1/packages/{pkg}/retry` — `dpsync retry`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RetryRequest {
    /// Only this target (default: every failing target of the package).
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetryReport {
    pub package: String,
    pub source_version: i64,
    /// The failing targets now tried again.
    pub targets: Vec<String>,
}

/// `POST /v1/packages/{pkg}/distribute`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DistributeRequest {
    #[serde(default)]
    pub dps: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub sites: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistributeReport {
    pub package: String,
    pub source_version: i64,
    pub targets: Vec<String>,
    /// Groups the package is now assigned to: their DPs that join later receive it too.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `POST /v1/packages/{pkg}/{redistribute,remove,validate}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetRequest {
    /// A DP or child site name; `None` (validate only): every target of the package.
    pub target: Option<String>,
}

/// What an action queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionReport {
    pub package: String,
    pub action: Action,
    pub source_version: i64,
    pub targets: Vec<String>,
}

/// `POST /v1/packages/{pkg}/export`: the body of the answer is the bundle.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportRequest {
    /// Default: the current version.
    pub version: Option<i64>,
    /// Leave out the chunks of this (older) version, which the DP already holds.
    pub base_version: Option<i64>,
}

/// What `dpsync export --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportReport {
    pub package: String,
    pub version: i64,
    pub base_version: Option<i64>,
    pub file: String,
    /// Bytes of the bundle file.
    pub bytes: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
}

/// `POST /v1/packages/{pkg}/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackReport {
    pub package: String,
    /// The new source version, whose content is that of `restored_version`.
    pub source_version: i64,
    pub restored_version: i64,
    pub content_root: String,
    pub targets_queued: u64,
}

/// `GET /v1/packages/{pkg}/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub package: String,
    pub name: String,
    pub source_site: String,
    pub source_version: i64,
    pub content_root: Option<String>,
    /// The package's last refresh on this site: the one this server ran last, else the
    /// commit of its current version (`null` before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<LastRefresh>,
    pub targets: Vec<TargetStatus>,
    /// How many of `targets` are in each state (the state names of `targets[].state`).
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
}

impl StatusReport {
    /// Counts `targets` by state into `counts`.
    pub fn count_states(&mut self) {
        self.counts.clear();
        for t in &self.targets {
            *self.counts.entry(t.state.as_str().to_owned()).or_default() += 1;
        }
    }
}

impl StatusReport {
    /// Keeps only the failing targets, and the child sites with failing targets of their
    /// own (with only those): what `status --failed` shows.
    pub fn retain_failing(&mut self) {
        fn keep(targets: Vec<TargetStatus>) -> Vec<TargetStatus> {
            targets
                .into_iter()
                .filter_map(|mut t| {
                    t.targets = keep(std::mem::take(&mut t.targets));
                    (t.is_failing() || !t.targets.is_empty()).then_some(t)
                })
                .collect()
        }
        self.targets = keep(std::mem::take(&mut self.targets));
    }
}

impl TargetStatus {
    /// Still failing: `failed`, `retrying` or `validation_failed`.
    pub fn is_failing(&self) -> bool {
        matches!(self.state, DistState::Failed | DistState::Retrying | DistState::ValidationFailed)
    }
}

/// When a package was last refreshed, and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRefresh {
    /// Unix milliseconds when it ended (or, known only from the store, when the version
    /// was committed).
    pub at: i64,
    pub ok: bool,
    /// `null` when known only from the store.
    pub duration_ms: Option<u64>,
    /// The version it committed (`null` for a failed refresh).
    pub source_version: Option<i64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub kind: TargetKind,
    pub state: DistState,
    pub action: Action,
    pub installed_version: Option<i64>,
    pub desired_version: i64,
    pub bytes_sent_last: i64,
    pub bytes_sent_total: i64,
    /// What a pull DP fetched from other DPs for its latest version (the site's own
    /// bytes are `bytes_sent_last`).
    #[serde(default)]
    pub bytes_from_peers_last: i64,
    pub last_error: Option<String>,
    /// Unix milliseconds of `last_error`.
    #[serde(default)]
    pub last_error_at: Option<i64>,
    pub attempts: i64,
    pub next_attempt_at: i64,
    /// While `retrying` or `failed`: when it is tried again (Unix milliseconds).
    #[serde(default)]
    pub next_retry_at: Option<i64>,
    pub updated_at: i64,
    /// While `waiting_window`: when the target's next send window opens (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window_at: Option<i64>,
    /// When a validation last checked this package's content there (unix ms).
    #[serde(default)]
    pub last_validated_at: Option<i64>,
    /// Live progress while the target's job runs (known to the node that runs it).
    pub progress: Option<Progress>,
    /// While `in_progress`: the server node that runs the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// For a child site: its own targets (when it could be asked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,
}

/// One target's validation result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetValidation {
    pub name: String,
    pub ok: bool,
    pub files_checked: u64,
    pub broken: Vec<String>,
    pub error: Option<String>,
    /// A repair (reinstall of the damaged files only) was queued.
    pub repair_queued: bool,
    /// What the target put right by itself (e.g. a deleted `current` link).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ValidateReport {
    pub package: String,
    pub source_version: i64,
    pub targets: Vec<TargetValidation>,
}

/// Live progress of a running job (not persisted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    /// Chunk bytes the target lacks (before compression).
    pub bytes_planned: u64,
    /// Of those, sent so far.
    pub bytes_done: u64,
    pub started_ms: i64,
}

/// `POST /v1/backup` — `dpsync backup DIR [--with-library]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupRequest {
    /// Absolute path of the folder to write the backup into, on the server's machine:
    /// created (mode 0700) if missing, refused if not empty.
    pub dir: String,
    /// Also copy the content library (hard links where `dir` is on the same filesystem).
    #[serde(default)]
    pub with_library: bool,
}

/// What a backup wrote (also the summary of its `backup.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupReport {
    pub dir: String,
    pub site_code: String,
    pub dpsync_version: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// `sqlite` or `postgres`.
    pub database: String,
    /// False for PostgreSQL: its administrator backs it up (`pg_dump -Fc`).
    pub database_included: bool,
    /// A child site's receiving database (`receive.db`) was copied.
    pub receive_database: bool,
    pub site_key: bool,
    /// The self-signed TLS certificate, key and fingerprint under `DATA_DIR/tls`.
    pub tls: bool,
    /// The pinned keys of other sites (`trusted-sites.json`).
    pub trust_store: bool,
    /// Where the server's configuration file was (it is copied as `server.toml`).
    pub config: Option<String>,
    /// `None` without `--with-library`.
    pub library: Option<LibraryCopy>,
    /// Files other than library objects, and their bytes.
    pub files: u64,
    pub bytes: u64,
    pub duration_ms: u64,
    /// What the administrator should know (what was left out and why).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Library objects copied by a backup or a restore.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LibraryCopy {
    pub objects: u64,
    pub bytes: u64,
    /// Objects hard-linked (same filesystem) and copied.
    pub linked: u64,
    pub copied: u64,
    /// `hardlink`, `copy` or `mixed`.
    pub method: String,
}

/// `GET /v1/backup`: the backup running now, if any.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupProgress {
    pub running: bool,
    pub dir: Option<String>,
    /// `database`, `files`, `library`, `manifest`.
    pub phase: String,
    pub objects_done: u64,
    pub objects_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub started_ms: i64,
}

/// What `dpsync restore DIR --data-dir NEW` laid out (it runs without a server).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestoreReport {
    pub backup_dir: String,
    pub data_dir: String,
    pub site_code: String,
    /// When the backup was taken (Unix milliseconds).
    pub backup_created_at: i64,
    /// `sqlite` or `postgres`.
    pub database: String,
    /// The SQLite database was laid out as `DATA_DIR/dpsync.db`.
    pub database_restored: bool,
    /// The PostgreSQL database given with `--database-url` was checked (and fixed up).
    pub database_checked: bool,
    pub receive_database: bool,
    pub site_key: bool,
    pub tls: bool,
    pub trust_store: bool,
    /// Where the configuration file was put, and where the original was.
    pub config: Option<String>,
    pub config_original: Option<String>,
    /// `None` when the backup holds no library: the library starts empty.
    pub library: Option<LibraryCopy>,
    /// Every version's scan cache was forgotten so the next refresh re-imports the sources.
    pub scan_caches_cleared: bool,
    /// The command that starts the restored site.
    pub start: String,
    pub duration_ms: u64,
    #[serde(default)]
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {

    #[test]
    fn durations_parse_as_the_cli_documents_them() {
        for (text, ms) in [("30s", 30_000), ("15m", 900_000), ("6h", 21_600_000), ("7d", 604_800_000), ("500ms", 500)] {
            assert_eq!(parse_duration(text), Ok(ms), "{text}");
            assert_eq!(format_duration(ms), text);
        }
        assert_eq!(format_duration(90_000), "90s");
        for bad in ["", "s", "10", "1.5h", "-1s", "0s", "3w", "99999999999999999d"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains(bad) || bad.is_empty(), "{e}");
        }
    }
    use super::*;

    /// The enums travel as the strings scripts rely on, and a string this build does not
    /// know survives a round trip.
    #[test]
    fn enums_travel_as_their_strings() {
        for (v, s) in DistState::ALL.iter().map(|v| (v, v.as_str())) {
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(s));
            assert_eq!(&serde_json::from_value::<DistState>(serde_json::json!(s)).unwrap(), v);
        }
        assert_eq!(serde_json::to_string(&DistState::ValidationFailed).unwrap(), r#""validation_failed""#);
        assert_eq!(serde_json::to_string(&DistState::InProgress).unwrap(), r#""in_progress""#);
        assert_eq!(serde_json::to_string(&TargetKind::Dp).unwrap(), r#""dp""#);
        assert_eq!(serde_json::to_string(&Action::Redistribute).unwrap(), r#""redistribute""#);
        assert_eq!(serde_json::to_string(&Phase::Committing).unwrap(), r#""committing""#);
        let newer: DistState = serde_json::from_str(r#""paused_by_admin""#).unwrap();
        assert_eq!(newer, DistState::Other("paused_by_admin".into()));
        assert_eq!(serde_json::to_string(&newer).unwrap(), r#""paused_by_admin""#);
        assert!(DistState::Failed == "failed" && TargetKind::Site == "site");
        assert_eq!(format!("[{:<8}]", DistState::Failed), "[failed  ]");
        assert_eq!(Progress::default().phase, Phase::Connecting);
    }

    /// A status answer keeps its JSON shape.
    #[test]
    fn a_target_status_reads_and_writes_the_same_json() {
        let json = serde_json::json!({
            "name": "dp1", "kind": "dp", "state": "installed", "action": "install",
            "installed_version": 3, "desired_version": 3, "bytes_sent_last": 10,
            "bytes_sent_total": 20, "bytes_from_peers_last": 0, "last_error": null, "last_error_at": null,
            "attempts": 1,
            "next_attempt_at": 0, "next_retry_at": null, "updated_at": 5, "last_validated_at": null,
            "progress": {"phase": "sending", "bytes_planned": 4, "bytes_done": 2, "started_ms": 1},
        });
        let t: TargetStatus = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(
            (t.kind.clone(), t.state.clone(), t.action.clone()),
            (TargetKind::Dp, DistState::Installed, Action::Install)
        );
        assert_eq!(t.progress.as_ref().unwrap().phase, Phase::Sending);
        assert_eq!(serde_json::to_value(&t).unwrap(), json);
    }

    /// `dp set`'s body tells "leave it" (absent) from "clear it" (null).
    #[test]
    fn set_target_tells_absent_from_null() {
        let s: SetTarget = serde_json::from_str(r#"{"group": null, "rate_limit": 2048}"#).unwrap();
        assert_eq!((s.group, s.rate_limit, s.token, s.url, s.kind), (Some(None), Some(Some(2048)), None, None, None));
        let back = serde_json::to_value(SetTarget { group: Some(None), ..SetTarget::default() }).unwrap();
        assert_eq!(back, serde_json::json!({"group": null}));
    }
}
