//! Several server nodes of one site on one database: the nodes' heartbeats, the
//! insert-once identity values that tie the database to one signing key and one content
//! library, and locks that hold across nodes.
//!
//! A node renews its heartbeat and the leases of the jobs it runs in one statement
//! pair ([`Store::heartbeat`]); a job whose lease ran out is claimable by any node
//! ([`Store::reclaim_expired`](crate::Store::reclaim_expired)).

use std::hash::{Hash, Hasher};

use sqlx::{Any, Row, Transaction};

use crate::error::Result;
use crate::{Backend, Store, now_ms};

/// Who holds the jobs a node claims, and for how long without renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node's name (`--node`).
    pub node: String,
    /// How long a claim holds without renewal, in milliseconds; 0: for good (a single
    /// server, whose claims nothing else could take over).
    pub ms: i64,
}

/// A row of the `nodes` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    /// Random per start: tells a restarted node from another process using its name.
    pub instance: String,
    /// Unix ms.
    pub started_at: i64,
    /// Unix ms of the last heartbeat.
    pub heartbeat_at: i64,
    /// Unix ms of its last clean stop, if it stopped after its last start.
    pub stopped_at: Option<i64>,
}

/// Locks held across every node until dropped (a transaction on PostgreSQL, whose
/// advisory locks end with it, even when the node dies). On SQLite, which one server
/// uses at a time, it holds nothing.
#[derive(Debug)]
pub struct ClusterLock {
    _tx: Option<Transaction<'static, Any>>,
}

/// What a cluster lock is for: refreshes hold [`ClusterKey::Library`] shared and `gc`
/// (and a failed refresh taking its imports back) exclusively; [`ClusterKey::Refresh`]
/// serializes the refreshes of one package.
#[derive(Debug, Clone, Copy)]
pub enum ClusterKey<'a> {
    Library,
    Refresh(&'a str),
}

impl ClusterKey<'_> {
    fn key(&self) -> i64 {
        // A stable hash (not RandomState): every node must compute the same key.
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        match self {
            ClusterKey::Library => "dpsync library".hash(&mut h),
            ClusterKey::Refresh(pkg) => ("dpsync refresh", pkg).hash(&mut h),
        }
        h.0 as i64
    }
}

/// FNV-1a: stable across processes and builds.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn node_from_row(row: &sqlx::any::AnyRow) -> Result<NodeRecord> {
    Ok(NodeRecord {
        name: row.try_get("name")?,
        instance: row.try_get("instance")?,
        started_at: row.try_get("started_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        stopped_at: row.try_get("stopped_at")?,
    })
}

impl Store {
    /// Sets `key` of the site's settings to `value` unless it is set already, and returns
    /// the value it holds then: two nodes starting at once agree on the first one.
    pub async fn meta_set_once(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(self.meta_get(key).await?.unwrap_or_else(|| value.to_owned()))
    }

    /// The node named `name`, if it ever ran.
    pub async fn node(&self, name: &str) -> Result<Option<NodeRecord>> {
        sqlx::query("SELECT name, instance, started_at, heartbeat_at, stopped_at FROM nodes WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(node_from_row)
            .transpose()
    }

    /// Every node that ever ran on this database, by name.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        sqlx::query("SELECT name, instance, started_at, heartbeat_at, stopped_at FROM nodes ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(node_from_row)
            .collect()
    }

    /// How many jobs each node runs now (`in_progress` rows it claimed), by node name.
    pub async fn jobs_by_node(&self) -> Result<Vec<(String, u64)>> {
        sqlx::query(
            "SELECT claimed_by, COUNT(*) AS n FROM distributions \
             WHERE state = 'in_progress' AND claimed_by IS NOT NULL GROUP BY claimed_by ORDER BY claimed_by",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let n: i64 = r.try_get("n")?;
            Ok((r.try_get("claimed_by")?, n.max(0) as u64))
        })
        .collect()
    }

    /// Records that node `name` (this start of it: `instance`) runs, from now.
    pub async fn register_node(&self, name: &str, instance: &str) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO nodes (name, instance, started_at, heartbeat_at) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (name) DO UPDATE SET instance = excluded.instance, started_at = excluded.started_at, \
               heartbeat_at = excluded.heartbeat_at, stopped_at = NULL",
        )
        .bind(name)
        .bind(instance)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a clean stop of node `name` (this start of it): it is not alive any more,
    /// and its `in_progress` jobs go back to the queue at once for the other nodes (see
    /// [`Store::reset_node`](crate::Store::reset_node)). Returns how many jobs it gave up.
    pub async fn node_stopped(&self, name: &str, instance: &str) -> Result<u64> {
        sqlx::query("UPDATE nodes SET stopped_at = $3 WHERE name = $1 AND instance = $2")
            .bind(name)
            .bind(instance)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        self.reset_node(name).await
    }

    /// The node's heartbeat, and the renewal of the leases of every job it runs (until
    /// now + `lease.ms`). Returns `false` when another process took the node's name over
    /// (its `instance` is not ours): the caller must stop claiming.
    pub async fn heartbeat(&self, lease: &Lease, instance: &str) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let beat = sqlx::query("UPDATE nodes SET heartbeat_at = $3 WHERE name = $1 AND instance = $2")
            .bind(&lease.node)
            .bind(instance)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if beat == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "UPDATE distributions SET lease_until = $2 \
             WHERE claimed_by = $1 AND state = 'in_progress' AND lease_until IS NOT NULL",
        )
        .bind(&lease.node)
        .bind(now + lease.ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Takes `keys` in order (shared or exclusive each), waiting for other nodes' holders,
    /// and holds them until the returned guard is dropped. Take them after any in-process
    /// lock that guards the same thing, and always in the same order.
    pub async fn cluster_lock(&self, keys: &[(ClusterKey<'_>, bool)]) -> Result<ClusterLock> {
        if self.backend == Backend::Sqlite {
            return Ok(ClusterLock { _tx: None });
        }
        let mut tx = self.pool.begin().await?;
        for (key, shared) in keys {
            let sql =
                if *shared { "SELECT pg_advisory_xact_lock_shared($1)" } else { "SELECT pg_advisory_xact_lock($1)" };
            sqlx::query(sql).bind(key.key()).execute(&mut *tx).await?;
        }
        Ok(ClusterLock { _tx: Some(tx) })
    }

    /// [`Store::cluster_lock`] of one key, exclusively, without waiting: `None` while
    /// another node holds it.
    pub async fn try_cluster_lock(&self, key: ClusterKey<'_>) -> Result<Option<ClusterLock>> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(ClusterLock { _tx: None }));
        }
        let mut tx = self.pool.begin().await?;
        let row =
            sqlx::query("SELECT pg_try_advisory_xact_lock($1) AS taken").bind(key.key()).fetch_one(&mut *tx).await?;
        let taken: bool = row.try_get("taken")?;
        Ok(taken.then_some(ClusterLock { _tx: Some(tx) }))
    }
}
