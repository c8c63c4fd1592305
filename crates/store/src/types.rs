//! Plain data types exchanged with the store: packages, versions, targets, distributions and
//! their state enums. Enums serialize (serde) and print as the same snake_case strings that
//! are stored in the database columns.

use std::fmt;
use std::str::FromStr;

use dpsync_hash::ContentRoot;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// Which database engine a [`Store`](crate::Store) talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// SQLite file (the default).
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

impl Backend {
    /// `"sqlite"` or `"postgres"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Defines a string-backed enum with `as_str`, `Display` and `FromStr`.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The snake_case name, as stored and serialized.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = StoreError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(StoreError::InvalidInput(format!(
                        concat!("unknown ", $what, " {:?} (expected one of: {})"),
                        other,
                        [$($s),+].join(", ")
                    ))),
                }
            }
        }
    };
}

string_enum! {
    /// State of one (package, target) distribution.
    DistState, "distribution state" {
        /// Waiting to be claimed by a worker.
        Pending => "pending",
        /// Claimed by a worker (see [`Distribution::action`] for what it is doing).
        InProgress => "in_progress",
        /// The target holds `installed_version`, which is the desired version.
        Installed => "installed",
        /// The last attempt failed transiently; claimable again at `next_attempt_at`.
        Retrying => "retrying",
        /// Nothing may be sent to the target now: claimable again when its next send
        /// window opens (`next_attempt_at`). Stored as `retrying` with `window_wait` set.
        WaitingWindow => "waiting_window",
        /// Still failing after the fast retries; tried again slowly, at `next_attempt_at`
        /// (or at once on request: `dpsync retry`, `distribute`, a changed connection setting).
        Failed => "failed",
        /// The target reported broken content.
        ValidationFailed => "validation_failed",
        /// Waiting for a worker to remove the package from the target.
        Removing => "removing",
        /// The package is gone from the target.
        Removed => "removed",
    }
}

string_enum! {
    /// What a distribution job has to do on its target.
    Action, "distribution action" {
        /// Bring the target to `desired_version`, sending only what it lacks.
        Install => "install",
        /// Like install, but re-send and re-verify everything.
        Redistribute => "redistribute",
        /// Delete the package from the target.
        Remove => "remove",
        /// Ask the target to verify its content.
        Validate => "validate",
    }
}

string_enum! {
    /// What kind of target a distribution goes to.
    TargetKind, "target kind" {
        /// A distribution point (`dpsync agent`).
        Dp => "dp",
        /// A child site (another `dpsync server`).
        Site => "site",
    }
}

/// A package: a named source folder owned by one site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Site code + 5 uppercase hex digits, e.g. `PS100012`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Source folder; `None` for a package received from a parent site.
    pub source_path: Option<String>,
    /// Site code of the owning site.
    pub source_site: String,
    /// Latest committed source version; 0 before the first commit.
    pub current_version: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Its jobs are claimed before those of lower priority.
    pub priority: Priority,
    /// Refreshed on a schedule every so many milliseconds (`None`: only by hand).
    pub refresh_every_ms: Option<i64>,
    /// When the next scheduled refresh is due (unix milliseconds).
    pub next_refresh_at: Option<i64>,
    /// Why the last scheduled refresh failed; `None` once one succeeds.
    pub schedule_error: Option<String>,
    /// Set by `package delete` (unix milliseconds): the package is being removed from
    /// its targets, and its rows go once every target dropped it.
    pub deleting_since: Option<i64>,
    /// When the package was handed to another site: its ownership chain (wire form of
    /// `transfer::trust::Handover`s), sent to every target before anything else.
    #[serde(default)]
    pub owner_chain: Option<String>,
}

/// Which targets' jobs a claim takes (`Store::claim_due_of`): the job runner gives
/// targets whose last job failed a small pool of slots of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetHealth {
    /// The target's last job succeeded, or it was never tried.
    Healthy,
    /// The target's last job failed (`targets.failing_since` is set).
    Failing,
}

/// How early a package's jobs are claimed among the jobs that are due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Medium,
    High,
}

impl Priority {
    /// The stored rank: 2 high, 1 medium, 0 low (claimed in descending order).
    pub fn rank(self) -> i64 {
        match self {
            Priority::Low => 0,
            Priority::Medium => 1,
            Priority::High => 2,
        }
    }

    pub fn from_rank(rank: i64) -> Result<Self, StoreError> {
        match rank {
            0 => Ok(Priority::Low),
            1 => Ok(Priority::Medium),
            2 => Ok(Priority::High),
            other => Err(StoreError::InvalidInput(format!("unknown package priority rank {other}"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
        }
    }
}

impl FromStr for Priority {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Priority::Low),
            "medium" => Ok(Priority::Medium),
            "high" => Ok(Priority::High),
            other => {
                Err(StoreError::InvalidInput(format!("unknown priority {other:?} (expected high, medium or low)")))
            }
        }
    }
}

/// What `package set` changes (`None`: unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageUpdate {
    pub name: Option<String>,
    pub source_path: Option<String>,
    pub priority: Option<Priority>,
    /// `Some(Some(ms))` sets a refresh schedule (first run `ms` from now), `Some(None)`
    /// removes it.
    pub refresh_every_ms: Option<Option<i64>>,
}

/// A target's scheduled validation (see [`Store::set_validation_schedule`](crate::Store::set_validation_schedule)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationSchedule {
    pub target_id: i64,
    pub target_name: String,
    pub every_ms: i64,
    /// When the next run is due (unix milliseconds).
    pub next_at: i64,
}

/// Statistics of one source version, as measured by the scan and import.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionStats {
    /// Regular files in the version.
    pub files: i64,
    /// Directories in the version.
    pub dirs: i64,
    /// Symbolic links in the version.
    pub symlinks: i64,
    /// Sum of file sizes.
    pub total_bytes: i64,
    /// Files new since the previous version.
    pub files_added: i64,
    /// Files whose content changed.
    pub files_changed: i64,
    /// Files gone since the previous version.
    pub files_removed: i64,
    /// Files carried over unchanged.
    pub files_unchanged: i64,
    /// Bytes read and hashed to build this version.
    pub bytes_hashed: i64,
}

/// A source version to commit with [`Store::commit_version`](crate::Store::commit_version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewVersion {
    /// `None`: next number (current + 1). `Some(v)`: exactly `v`, which must be newer than the
    /// current version (used when a child site stores its parent's numbering).
    pub version: Option<i64>,
    /// BLAKE3 content root of the manifest (stored as lowercase hex).
    pub content_root: ContentRoot,
    /// Encoded manifest (opaque to the store), stored once per (package, content root).
    /// `None`: the package already stores the manifest of `content_root` (an unchanged
    /// refresh, a rollback), which the new version then shares; the commit fails with
    /// [`StoreError::NotFound`](crate::StoreError::NotFound) if it does not.
    pub manifest: Option<Vec<u8>>,
    /// Encoded scan cache (opaque to the store), kept with the manifest of `content_root`:
    /// `Some` replaces it, `None` keeps the stored one (empty for a new manifest).
    pub scan_cache: Option<Vec<u8>>,
    /// Scan statistics.
    pub stats: VersionStats,
    /// Where the version came from, e.g. `"local"` or the parent site code.
    pub origin: String,
    /// The owning site's signature (hex) over the package, version and content root.
    #[serde(default)]
    pub signature: Option<String>,
}

/// A stored source version without its blobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// Package id.
    pub package_id: String,
    /// Source version number.
    pub version: i64,
    /// BLAKE3 content root of the manifest (stored as lowercase hex).
    pub content_root: ContentRoot,
    /// Scan statistics.
    pub stats: VersionStats,
    /// Where the version came from.
    pub origin: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The owning site's signature (hex) over the package, version and content root.
    #[serde(default)]
    pub signature: Option<String>,
}

/// A stored source version with its manifest and scan cache (those of its content root,
/// shared by every version of the package with that content root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Everything but the blobs.
    pub summary: VersionSummary,
    /// Encoded manifest.
    pub manifest: Vec<u8>,
    /// Encoded scan cache.
    pub scan_cache: Vec<u8>,
}

/// A target to add with [`Store::add_target`](crate::Store::add_target).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTarget {
    /// Unique name.
    pub name: String,
    /// DP or child site.
    pub kind: TargetKind,
    /// Base URL of the target's receiving service.
    pub url: String,
    /// Shared secret presented to the target, if any.
    pub token: Option<String>,
    /// Distribution point group, if any.
    pub group: Option<String>,
    /// Bandwidth limit in bytes per second, if any.
    pub rate_limit: Option<i64>,
    /// SHA-256 of the target's TLS certificate (hex), pinned instead of CA validation.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Send windows, one canonical spec per line (`None`: always open).
    #[serde(default)]
    pub windows: Option<String>,
    /// A pull DP's sources: DP names in rank order, one per line, or `auto` (`None`: the
    /// site pushes everything).
    #[serde(default)]
    pub pull_sources: Option<String>,
}

/// A distribution point or child site.
///
/// `Debug` redacts the token. `Serialize` includes it (it is needed to persist or
/// transfer a target); do not print a serialized `Target` to users.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Database id, never reused.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// DP or child site.
    pub kind: TargetKind,
    /// Base URL of the target's receiving service.
    pub url: String,
    /// Shared secret presented to the target, if any.
    pub token: Option<String>,
    /// Distribution point group, if any.
    pub group: Option<String>,
    /// Bandwidth limit in bytes per second, if any.
    pub rate_limit: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// SHA-256 of the target's TLS certificate (hex), pinned instead of CA validation.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Send windows, one canonical spec per line (`None`: always open).
    #[serde(default)]
    pub windows: Option<String>,
    /// Validate the target's content every so many milliseconds (`None`: not scheduled).
    #[serde(default)]
    pub validate_every_ms: Option<i64>,
    /// A pull DP's sources: DP names in rank order, one per line, or `auto` (`None`: the
    /// site pushes everything).
    #[serde(default)]
    pub pull_sources: Option<String>,
}

impl Target {
    /// The ranked sources of a pull DP (`["auto"]` for any DP of its group); empty for a
    /// DP the site pushes to.
    pub fn sources(&self) -> Vec<String> {
        self.pull_sources.as_deref().map_or_else(Vec::new, |s| s.lines().map(str::to_owned).collect())
    }
}

const REDACTED: &str = "<redacted>";

fn redact(token: &Option<String>) -> Option<&'static str> {
    token.as_ref().map(|_| REDACTED)
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("token", &redact(&self.token))
            .field("group", &self.group)
            .field("rate_limit", &self.rate_limit)
            .field("created_at", &self.created_at)
            .finish()
    }
}

impl fmt::Debug for NewTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewTarget")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("token", &redact(&self.token))
            .field("group", &self.group)
            .field("rate_limit", &self.rate_limit)
            .field("windows", &self.windows)
            .finish()
    }
}

/// Changes to a target ([`Store::update_target`](crate::Store::update_target)): `None`
/// leaves a setting as it is; for the optional settings `Some(None)` clears it. A new
/// setting is one field here and one line in [`TargetUpdate::apply`].
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetUpdate {
    pub url: Option<String>,
    pub token: Option<Option<String>>,
    pub fingerprint: Option<Option<String>>,
    pub group: Option<Option<String>>,
    pub rate_limit: Option<Option<i64>>,
    /// Send windows as stored (one canonical spec per line; `Some(None)`: none).
    pub windows: Option<Option<String>>,
    /// A pull DP's sources as stored (see [`Target::pull_sources`]; `Some(None)`: push).
    #[serde(default)]
    pub pull_sources: Option<Option<String>>,
}

impl TargetUpdate {
    /// The target with these changes made.
    pub fn apply(&self, mut t: Target) -> Target {
        fn set<T: Clone>(field: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *field = v.clone();
            }
        }
        set(&mut t.url, &self.url);
        set(&mut t.token, &self.token);
        set(&mut t.fingerprint, &self.fingerprint);
        set(&mut t.group, &self.group);
        set(&mut t.rate_limit, &self.rate_limit);
        set(&mut t.windows, &self.windows);
        set(&mut t.pull_sources, &self.pull_sources);
        t
    }

    /// Whether it changes how the target is reached (its failed jobs are then retried at once).
    pub fn changes_connection(&self, before: &Target) -> bool {
        let after = self.apply(before.clone());
        after.url != before.url || after.token != before.token || after.fingerprint != before.fingerprint
    }
}

impl fmt::Debug for TargetUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetUpdate")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(redact))
            .field("fingerprint", &self.fingerprint)
            .field("group", &self.group)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

/// One durable job row per (package, target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distribution {
    /// Package id.
    pub package_id: String,
    /// Target id.
    pub target_id: i64,
    /// Target name (joined).
    pub target_name: String,
    /// Target kind (joined).
    pub target_kind: TargetKind,
    /// Current state.
    pub state: DistState,
    /// What the job does; kept while the row is `in_progress`.
    pub action: Action,
    /// Source version the target should end up with (0 before the package's first commit).
    pub desired_version: i64,
    /// Source version the target last reported installed.
    pub installed_version: Option<i64>,
    /// Claims since the last request (reset by commit/assign/request_action).
    pub attempts: i64,
    /// Unix milliseconds when the row becomes claimable.
    pub next_attempt_at: i64,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// Unix milliseconds of `last_error`.
    pub last_error_at: Option<i64>,
    /// Bytes sent by the current/last job.
    pub bytes_sent_last: i64,
    /// Bytes sent to this target for this package, ever.
    pub bytes_sent_total: i64,
    /// Bytes a pull DP fetched from other DPs for the current/last job.
    pub bytes_from_peers_last: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
    /// When a validation last checked this package's content on the target (unix ms).
    pub last_validated_at: Option<i64>,
    /// The claim that holds the row while it is `in_progress` (see
    /// [`Store::claim_leased`](crate::Store::claim_leased)).
    pub claim_token: Option<i64>,
    /// The server node that claimed the row, while it is `in_progress`.
    pub claimed_by: Option<String>,
    /// Until when (unix ms) that node's lease on the row holds, unless renewed.
    pub lease_until: Option<i64>,
}

/// How many distributions to one kind of target are in one state (a row of
/// [`Store::distribution_state_counts`](crate::Store::distribution_state_counts)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCount {
    pub kind: TargetKind,
    pub state: DistState,
    pub count: u64,
}

/// A package's id and current source version (a row of
/// [`Store::package_versions`](crate::Store::package_versions)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersion {
    pub id: String,
    /// 0 before the first commit.
    pub current_version: i64,
}

/// Result of one distribution job, passed to [`Store::finish`](crate::Store::finish).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The target now holds `version`: state `installed`, error cleared.
    Installed {
        /// The version the target installed.
        version: i64,
    },
    /// Transient failure: state `retrying`, claimable again at `next_attempt_at`.
    Retry {
        /// What went wrong.
        error: String,
        /// Unix milliseconds of the next attempt.
        next_attempt_at: i64,
    },
    /// Nothing may be sent now: shown `waiting_window`, claimable at `next_window_at`
    /// (the attempt does not count, the last error is kept).
    WaitWindow {
        /// Unix milliseconds when the target's next window opens.
        next_window_at: i64,
    },
    /// The fast retries are spent (or the error needs an administrator): state `failed`,
    /// tried again slowly at `next_attempt_at`.
    Failed {
        /// What went wrong.
        error: String,
        /// Unix milliseconds of the slow retry.
        next_attempt_at: i64,
    },
    /// The target found broken content: state `validation_failed`.
    ValidationFailed {
        /// What is broken.
        error: String,
    },
    /// The package is gone from the target: state `removed`, no installed version.
    Removed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_strings() {
        for s in DistState::ALL {
            assert_eq!(s.as_str().parse::<DistState>().unwrap(), *s);
        }
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>().unwrap(), *a);
        }
        for k in TargetKind::ALL {
            assert_eq!(k.as_str().parse::<TargetKind>().unwrap(), *k);
        }
        assert_eq!(DistState::ValidationFailed.as_str(), "validation_failed");
        assert!("bogus".parse::<Action>().is_err());
    }
}
