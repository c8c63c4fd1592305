//! The admin protocol between the `dpsync` CLI and a running server: HTTP/1.1 with JSON
//! bodies over the server's Unix socket. Documented in `docs/admin-api.md`.
//!
//! These are the wire types; they are also what `--json` prints, so field names are
//! part of the command-line contract (add fields freely, never rename).

use serde::{Deserialize, Serialize};

pub mod client;

pub use client::{AdminClient, CallError};

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
    /// "dp" or "site".
    pub kind: String,
    pub url: String,
    pub token: Option<String>,
    pub group: Option<String>,
    pub rate_limit: Option<i64>,
    /// SHA-256 of the target's TLS certificate, pinned.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// A target as shown to administrators (never its token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub kind: String,
    pub url: String,
    pub group: Option<String>,
    pub rate_limit: Option<i64>,
    pub has_token: bool,
    pub fingerprint: Option<String>,
    pub created_at: i64,
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
    pub action: String,
    pub source_version: i64,
    pub targets: Vec<String>,
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
    pub targets: Vec<TargetStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub kind: String,
    pub state: String,
    pub action: String,
    pub installed_version: Option<i64>,
    pub desired_version: i64,
    pub bytes_sent_last: i64,
    pub bytes_sent_total: i64,
    pub last_error: Option<String>,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub updated_at: i64,
    /// Live progress while the target's job runs.
    pub progress: Option<Progress>,
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
    pub phase: String,
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
