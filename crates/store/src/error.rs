//! Errors of the store.
//!
//! # Error policy
//!
//! * Every fallible store call returns [`StoreError`]; nothing in this crate panics on bad
//!   input or on database trouble.
//! * Expected, caller-actionable outcomes get their own variant and a message that names the
//!   package, target or setting concerned: [`StoreError::NotFound`] (no such package, target,
//!   version or distribution), [`StoreError::Conflict`] (a unique name or id is taken),
//!   [`StoreError::VersionNotNewer`] (an explicit source version that would go back or repeat),
//!   [`StoreError::InvalidInput`] (a malformed site code, URL, empty name, …).
//! * Everything the database or the driver reports that is not one of the above stays a
//!   [`StoreError::Database`] wrapping the original [`sqlx::Error`], so no detail is lost.
//!   A unique violation is turned into `Conflict` where the store knows which name was taken.
//! * A stored row that does not decode into its type (an id of the wrong length, a negative
//!   offset, an unknown hash encoding) is [`StoreError::CorruptRow`], naming the table and the
//!   row's key: it is never skipped, since a shorter answer would look like a true one.
//! * Schema problems at [`Store::connect`](crate::Store::connect) (a migration failed, or the
//!   database was written by a newer dpsync) are [`StoreError::Migration`]: the server must
//!   not start.
//! * A SQLite file that fails `PRAGMA quick_check` when it is opened (or is not a database)
//!   is [`StoreError::Corrupt`], naming the file and what to do: the server or agent must
//!   not start on it.
//! * [`StoreError::is_retryable`] tells transient conditions (connection lost, pool timeout,
//!   SQLite busy/locked, PostgreSQL serialization failure or deadlock) from permanent ones
//!   (every variant but some [`StoreError::Database`] errors);
//!   a failed call never leaves a half-done change behind, so retrying a retryable error is
//!   always safe.

/// Errors returned by [`Store`](crate::Store) operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named package, target, version or distribution does not exist.
    #[error("not found: {0}")]
    NotFound(String),

    /// A unique name or id is already taken (package name, package id, target name).
    #[error("conflict: {0}")]
    Conflict(String),

    /// An explicit source version was not greater than the package's current version.
    #[error("package {package}: source version {offered} is not newer than the current version {current}")]
    VersionNotNewer {
        /// Package id.
        package: String,
        /// The package's current source version.
        current: i64,
        /// The version that was offered.
        offered: i64,
    },

    /// The caller passed a value the store cannot accept (bad site code, URL, empty name, …).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Any other error from the database or its driver.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// The schema could not be brought up to date, or is newer than this build knows.
    #[error("database migration: {0}")]
    Migration(String),

    /// A SQLite database file failed its integrity check when it was opened (or is not a
    /// database at all): nothing must run on it. The message names the file and says how
    /// to get going again.
    #[error("the database {} is damaged ({detail}); {remedy}", path.display())]
    Corrupt {
        /// The database file.
        path: std::path::PathBuf,
        /// What SQLite reported (the first problems `PRAGMA quick_check` found).
        detail: String,
        /// What the administrator can do about it.
        remedy: &'static str,
    },

    /// A stored row does not decode into its type: the database was damaged or written by
    /// something else. Reading it again gives the same answer.
    #[error("corrupt row in table {table} ({key}): {detail}")]
    CorruptRow {
        /// The table holding the row.
        table: &'static str,
        /// The row's key, e.g. `package PS100001 version 3` or `chunk_id x'0a0b0c'`.
        key: String,
        /// What does not decode.
        detail: String,
    },
}

impl StoreError {
    /// True for transient conditions where the same call may succeed later: the connection
    /// dropped or could not be made, the pool timed out, the database was busy or locked,
    /// or PostgreSQL aborted the transaction for a serialization failure or deadlock.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Database(e) => sqlx_is_retryable(e),
            StoreError::NotFound(_)
            | StoreError::Conflict(_)
            | StoreError::VersionNotNewer { .. }
            | StoreError::InvalidInput(_)
            | StoreError::Migration(_)
            | StoreError::Corrupt { .. }
            | StoreError::CorruptRow { .. } => false,
        }
    }

    /// True for [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound(_))
    }

    /// True for [`StoreError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }
}

fn sqlx_is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let Some(code) = db.code() else { return false };
            // SQLite reports (extended) numeric result codes; the primary code is the low byte.
            if let Ok(n) = code.parse::<i64>() {
                let primary = n & 0xff;
                return primary == 5 /* SQLITE_BUSY */ || primary == 6 /* SQLITE_LOCKED */;
            }
            // PostgreSQL SQLSTATE.
            matches!(
                code.as_ref(),
                "40001" // serialization_failure
                    | "40P01" // deadlock_detected
                    | "55P03" // lock_not_available
                    | "53300" // too_many_connections
                    | "57P01" // admin_shutdown
                    | "57P02" // crash_shutdown
                    | "57P03" // cannot_connect_now
            ) || code.starts_with("08") // connection exceptions
        }
        _ => false,
    }
}

/// Convenience alias used by every store call.
pub type Result<T> = std::result::Result<T, StoreError>;

/// True if SQLite reported `e` as a damaged file (`SQLITE_CORRUPT`) or as not a
/// database at all (`SQLITE_NOTADB`, e.g. a garbled header).
pub(crate) fn is_corruption(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else { return false };
    db.code().and_then(|c| c.parse::<i64>().ok()).is_some_and(|n| matches!(n & 0xff, 11 | 26))
}

/// True if `e` is a unique-constraint violation reported by either backend.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_retryable());
        assert!(!StoreError::NotFound("package PS100001".into()).is_retryable());
        assert!(!StoreError::Migration("x".into()).is_retryable());
        let corrupt =
            StoreError::CorruptRow { table: "chunk_index", key: "chunk_id x'0a0b0c'".into(), detail: "x".into() };
        assert!(!corrupt.is_retryable());
        assert!(corrupt.to_string().contains("chunk_index"), "{corrupt}");
    }

    #[test]
    fn messages_name_the_package() {
        let e = StoreError::VersionNotNewer { package: "PS100001".into(), current: 3, offered: 2 };
        let s = e.to_string();
        assert!(s.contains("PS100001") && s.contains('3') && s.contains('2'), "{s}");
    }
}
