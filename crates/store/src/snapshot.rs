//! Backups: consistent copies of a running SQLite database (`VACUUM INTO`, which reads one
//! snapshot of the database in a single read transaction, so writers keep going and the
//! copy is a state the database was in), and the fix-ups a restored copy may need.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use crate::{Backend, Result, Store, StoreError};

impl Store {
    /// Writes a consistent copy of this (SQLite) database to `dest`, while the site keeps
    /// using it. `dest` must not exist or be an empty file (create it first with the mode
    /// it should have). A PostgreSQL store is refused: its administrator backs it up
    /// (`pg_dump`).
    pub async fn snapshot_into(&self, dest: &Path) -> Result<()> {
        if self.backend != Backend::Sqlite {
            return Err(StoreError::InvalidInput(
                "a PostgreSQL database is not copied by dpsync; back it up with pg_dump".into(),
            ));
        }
        sqlx::query("VACUUM INTO $1").bind(path_text(dest)?).execute(&self.pool).await?;
        Ok(())
    }

    /// Forgets the scan cache of every version (replacing it with `empty`, the encoding of
    /// an empty cache), so that the next refresh of each package reads every source file
    /// again, and so imports it into the content library. Returns the manifests changed.
    pub async fn forget_scan_caches(&self, empty: &[u8]) -> Result<u64> {
        let done = sqlx::query("UPDATE manifests SET scan_cache = $1").bind(empty).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }
}

/// Writes a consistent copy of the SQLite database file `src` (in use by another
/// connection or process, e.g. a child site's receiving database) to `dest` (absent or
/// an empty file). The file is opened without creating it.
pub async fn snapshot_sqlite_file(src: &Path, dest: &Path) -> Result<()> {
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", src.display()))?
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(5));
    let mut conn = SqliteConnection::connect_with(&opts).await?;
    let done = sqlx::query("VACUUM INTO $1").bind(path_text(dest)?).execute(&mut conn).await;
    conn.close().await?;
    done?;
    Ok(())
}

fn path_text(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| StoreError::InvalidInput(format!("{} is not a UTF-8 path", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewVersion, VersionStats};

    fn version(tag: &str) -> NewVersion {
        NewVersion {
            version: None,
            content_root: dpsync_hash::ContentRoot::from_hex(&format!("{tag:0>64}")).unwrap(),
            manifest: Some(format!("manifest {tag}").into_bytes()),
            scan_cache: Some(format!("scan cache {tag}").into_bytes()),
            signature: None,
            stats: VersionStats::default(),
            origin: "refresh".into(),
        }
    }

    #[tokio::test]
    async fn a_snapshot_is_the_database_while_it_stays_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let live = Store::connect(&format!("sqlite://{}", dir.path().join("live.db").display())).await.unwrap();
        let p = live.create_package("PS1", "Office", "/src").await.unwrap();
        live.commit_version(&p.id, version("a")).await.unwrap();
        let copy = dir.path().join("copy.db");
        std::fs::write(&copy, b"").unwrap();
        live.snapshot_into(&copy).await.unwrap();
        // The live database goes on; the copy keeps the state it was taken in.
        live.commit_version(&p.id, version("b")).await.unwrap();
        let restored = Store::connect(&format!("sqlite://{}", copy.display())).await.unwrap();
        assert_eq!(restored.package(&p.id).await.unwrap().unwrap().current_version, 1);
        assert_eq!(restored.forget_scan_caches(b"").await.unwrap(), 1);
        assert_eq!(restored.latest_version(&p.id).await.unwrap().unwrap().scan_cache, b"");
        restored.close().await;

        let again = dir.path().join("again.db");
        std::fs::write(&again, b"").unwrap();
        snapshot_sqlite_file(&dir.path().join("live.db"), &again).await.unwrap();
        let restored = Store::connect(&format!("sqlite://{}", again.display())).await.unwrap();
        assert_eq!(restored.package(&p.id).await.unwrap().unwrap().current_version, 2);
        restored.close().await;
        live.close().await;
    }
}
