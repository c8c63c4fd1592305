//! The integrity check of a SQLite file when it is opened: `PRAGMA quick_check` (every
//! page of every b-tree and the free list, without cross-checking index contents; one
//! pass over the file), so that nothing starts, serves or commits on a damaged database.

use std::path::{Path, PathBuf};

use crate::StoreError;
use crate::error::is_corruption;

/// The check; it lists at most 10 problems.
pub(crate) const QUICK_CHECK: &str = "PRAGMA quick_check(10)";

/// What to do about a damaged site store.
pub(crate) const SITE_REMEDY: &str = "nothing may run on it: with the server stopped, restore the file from a \
     backup, or move it aside to start with an empty database (packages and targets must then be added \
     again; the DPs keep their content)";

/// What to do about a damaged agent (or child site's receiving) database.
pub(crate) const AGENT_REMEDY: &str = "nothing may run on it: move the file aside and start again with an empty \
     one, then `dpsync redistribute` on the sending site sends the packages again";

/// Maps an error met while opening or checking `path`: SQLite's "damaged" and "not a
/// database" become [`StoreError::Corrupt`], anything else stays a database error.
pub(crate) fn on_open<'a>(path: &'a Path, remedy: &'static str) -> impl Fn(sqlx::Error) -> StoreError + 'a {
    move |e| {
        if is_corruption(&e) {
            let detail = match &e {
                sqlx::Error::Database(db) => db.message().to_owned(),
                e => e.to_string(),
            };
            StoreError::Corrupt { path: absolute(path), detail, remedy }
        } else {
            StoreError::Database(e)
        }
    }
}

/// The verdict on the rows `PRAGMA quick_check` answered: a single `ok`, or the problems.
pub(crate) fn verdict(rows: Vec<String>, path: &Path, remedy: &'static str) -> Result<(), StoreError> {
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    let mut detail = if rows.is_empty() { "integrity check answered nothing".to_owned() } else { rows.join("; ") };
    if detail.len() > 400 {
        let cut = (0..=400).rev().find(|&i| detail.is_char_boundary(i)).unwrap_or(0);
        detail.truncate(cut);
        detail.push('…');
    }
    Err(StoreError::Corrupt { path: absolute(path), detail, remedy })
}

/// `path` as the administrator should look for it: canonical when it exists.
fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).or_else(|_| std::path::absolute(path)).unwrap_or_else(|_| path.to_owned())
}
