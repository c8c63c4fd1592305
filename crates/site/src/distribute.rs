//! Fan-out: the durable job runner and the per-target push.
//!
//! One job per (package, target) lives in the store. The runner claims due jobs and
//! runs each as a task in two stages: a *probe* (the target's state, answered whole
//! within `DistConfig::probe`, 5 s) under one of many cheap probe slots, then the push
//! itself under one of the `parallel` push slots, which only targets that answered get.
//! A dead or hung target therefore costs a probe slot for seconds and never holds a push
//! slot. Targets whose last job failed are claimed after the others and only into a
//! small pool of probe slots of their own (`failing_probes`), so thousands of failing
//! targets never queue a live one. A job that fails with a retryable
//! error is rescheduled with exponential backoff and jitter until its retries run out
//! (a removal: until it succeeds). Then it is `failed`, which is not the end: it is
//! tried again every `slow_retry` (30 min by default) until it works, or at once on
//! request (`retry`, `distribute`, a changed connection setting). Jobs that were running
//! when the server stopped are claimable again at start.
//!
//! A push: ask the target what it holds; if it already has this content, record the
//! new version number there (O(1)); otherwise offer the manifest, read the chunks it
//! lacks from the library on a blocking thread, batch and compress them, and send the
//! batches through a bounded channel (a slow target slows the reader, memory stays
//! bounded), then ask it to commit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use dpsync_hash::{ChunkId, ContentRoot, DecodeError, DecodeLimits, FileHash, Manifest};
use dpsync_library::LibraryError;
use dpsync_store::{Action, DistState, Distribution, Outcome, StoreError, Target, TargetHealth, TargetKind};
use dpsync_transfer::client::{RejectReason, Signed, TargetClient, TransferError};
use dpsync_transfer::trust::{Handover, Ownership};
use dpsync_transfer::wire::PackageState;
use dpsync_transfer::wire::{self, BatchBuilder, WireChunk};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::Site;
use crate::windows::{Gate, Windows};
use dpsync_api::{Phase, Progress};
use dpsync_store::now_ms;

/// Distribution settings.
#[derive(Debug, Clone)]
pub struct DistConfig {
    /// Targets pushed to at once.
    pub parallel: usize,
    /// Retries after the first attempt before a job is `failed`.
    pub retries: i64,
    /// First retry delay; doubles each attempt, with ±25 % jitter, up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// After the fast retries, a failing job is tried again this often (±10 %) instead of
    /// being given up: a DP that is down for a day is installed when it comes back.
    pub slow_retry: Duration,
    /// Chunk bytes per batch request.
    pub batch_bytes: usize,
    /// Bytes of batches (being read, queued, in flight) all pushes may hold at once: the
    /// server's memory stays bounded whatever the number of targets.
    pub batch_memory: usize,
    /// How long a call to a target may make no progress before it is given up (and
    /// retried); there is no limit on a call that moves.
    pub stall: Duration,
    /// How long a job's first call (connect, TLS handshake, the target's state) may take
    /// in all before the target is taken for unreachable and the job retried.
    pub probe: Duration,
    /// Jobs probing their targets at once (targets not known to be failing).
    pub probes: usize,
    /// Jobs probing targets whose last job failed, at once (a pool of their own).
    pub failing_probes: usize,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            parallel: 8,
            retries: 5,
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
            slow_retry: Duration::from_secs(30 * 60),
            batch_bytes: 4 << 20,
            batch_memory: 40 << 20,
            stall: dpsync_transfer::client::DEFAULT_STALL,
            probe: Duration::from_secs(5),
            probes: 256,
            failing_probes: 64,
        }
    }
}

/// Why a push failed. [`PushError::is_retryable`] decides between a retry with backoff
/// and `failed`: conditions that heal by themselves (a target that is down, its disk
/// full, the site's database busy) are retried; the others need an administrator, and
/// their message says what to do. Messages end up in `status`'s `last_error`, so each
/// names the target or package it concerns.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PushError {
    /// The target did not answer (connection refused or reset, no answer in time).
    #[error(transparent)]
    Unreachable(TransferError),
    /// The target answered and refused the call.
    #[error("{}", rejected_message(target, *kind, package, reason))]
    Rejected { target: String, kind: TargetKind, package: String, reason: RejectReason },
    /// The target's TLS certificate is not the pinned one (or not trusted).
    #[error("{}", certificate_message(*kind, source))]
    Certificate { kind: TargetKind, source: TransferError },
    /// Any other failure of the transfer (an answer this site does not understand, a
    /// client that cannot be set up).
    #[error(transparent)]
    Transfer(TransferError),
    /// The site's own database.
    #[error("site database: {0}")]
    Store(#[from] StoreError),
    /// A target holds a longer ownership chain of the package that this site cannot use.
    #[error("{package}: the ownership chain a target holds cannot be taken here: {message}")]
    Handover { package: String, message: String },
    /// The target's send windows closed during the transfer: it resumes in the next.
    #[error("{target}: its send window closed")]
    WindowClosed { target: String, opens_at: Option<i64> },
    /// The site's content library cannot give what a version names.
    #[error("site content library: {source}; run `dpsync refresh {package} --verify`")]
    Library { package: String, source: LibraryError },
    /// A chunk read back from the library does not match its id.
    #[error("site content library object {file} of {package} is damaged; run `dpsync refresh {package} --verify`")]
    Damaged { package: String, file: FileHash },
    #[error("the stored manifest of {package} version {version} is corrupt: {source}")]
    CorruptManifest { package: String, version: i64, source: DecodeError },
    /// The version to send was pruned or its package deleted since the job was queued.
    #[error("{package} version {version} is no longer stored on this site")]
    VersionGone { package: String, version: i64 },
    /// The version the target holds was pruned during the push: the next attempt sends
    /// the full manifest.
    #[error("{package} version {version}, the base of the manifest delta, was pruned during the push")]
    BaseGone { package: String, version: i64 },
    #[error("package {package} no longer exists on this site")]
    PackageGone { package: String },
    #[error("target {target} no longer exists")]
    TargetGone { target: String },
    /// A package from a parent site that came without its owner's signature.
    #[error(
        "{package} version {version} arrived here without its owner's signature and cannot be relayed; \
         refresh it at its source site"
    )]
    Unsigned { package: String, version: i64 },
    #[error("{target} asked for chunk {chunk}, which {package} version {version} does not have")]
    UnknownChunk { target: String, package: String, version: i64, chunk: ChunkId },
    /// A chunk batch whose framing the target could not read: damaged in transit.
    #[error("{target} refused a chunk batch of {package} ({message}); it may have been damaged in transit")]
    BatchRefused { target: String, package: String, message: String },
    #[error("{target} still lacks chunks of {package} version {version} after they were sent {rounds} times")]
    StillMissing { target: String, package: String, version: i64, rounds: u32 },
    #[error("{target} kept rejecting chunks of {package} version {version} (damaged in transit?)")]
    KeptRejecting { target: String, package: String, version: i64 },
    /// This node's lease on the job ran out (it could not renew it in time) and another
    /// node may run it now.
    #[error("{package} → {target}: this node's lease on the job ran out; another node finishes it")]
    LeaseLost { package: String, target: String },
    /// A task of the push was cancelled: the server is stopping.
    #[error("the push was cancelled (the server is stopping)")]
    Cancelled,
    /// A task of the push panicked.
    #[error("a task of the push failed: {0}")]
    Task(String),
}

impl PushError {
    /// Whether the job runner tries again (with backoff, until its retries run out).
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            PushError::Unreachable(e) | PushError::Certificate { source: e, .. } | PushError::Transfer(e) => {
                e.is_retryable()
            }
            PushError::Rejected { reason, .. } => reason.is_retryable(),
            PushError::Store(e) => e.is_retryable(),
            PushError::BaseGone { .. }
            | PushError::BatchRefused { .. }
            | PushError::StillMissing { .. }
            | PushError::KeptRejecting { .. }
            | PushError::Cancelled
            | PushError::LeaseLost { .. }
            | PushError::WindowClosed { .. }
            | PushError::Task(_) => true,
            PushError::Library { .. }
            | PushError::Damaged { .. }
            | PushError::CorruptManifest { .. }
            | PushError::VersionGone { .. }
            | PushError::PackageGone { .. }
            | PushError::TargetGone { .. }
            | PushError::Unsigned { .. }
            | PushError::UnknownChunk { .. }
            | PushError::Handover { .. } => false,
        }
    }

    /// A failed call to `target` while pushing `package`. There is deliberately no
    /// `From<TransferError>`: a refusal's message needs the target's kind and the package.
    fn transfer(e: TransferError, target: &Target, package: &str) -> Self {
        match e {
            TransferError::Unreachable { .. } | TransferError::Timeout { .. } => PushError::Unreachable(e),
            TransferError::Rejected { target: name, reason } => {
                PushError::Rejected { target: name, kind: target.kind, package: package.to_owned(), reason }
            }
            TransferError::Certificate { .. } => PushError::Certificate { kind: target.kind, source: e },
            e => PushError::Transfer(e),
        }
    }
}

impl From<tokio::task::JoinError> for PushError {
    fn from(e: tokio::task::JoinError) -> Self {
        if e.is_cancelled() { PushError::Cancelled } else { PushError::Task(e.to_string()) }
    }
}

/// A certificate that is not the pinned one, said as such, with the command that re-pins
/// the one the target presents (after checking it is the target's own).
fn certificate_message(kind: TargetKind, source: &TransferError) -> String {
    let target = source.target();
    let TransferError::Certificate { message, .. } = source else { return source.to_string() };
    match dpsync_transfer::trust::presented_fingerprint(message) {
        Some(presented) => format!(
            "{target}'s TLS certificate fingerprint does not match the pinned one: it presents {presented}; if \
             {target} has a new certificate (check its DATA_DIR/tls/fingerprint), re-pin it with \
             `dpsync {kind} set {target} --fingerprint {presented}`"
        ),
        None => format!("{source}; then re-pin it with `dpsync {kind} set {target} --fingerprint FP`"),
    }
}

/// What a refusal means for an administrator, and what to do next where it will not heal
/// by itself.
fn rejected_message(target: &str, kind: TargetKind, package: &str, reason: &RejectReason) -> String {
    match reason {
        RejectReason::Unauthorized(m) => format!(
            "{target} refused this site's token ({m}); update the token with `dpsync {kind} set {target} --token …` \
             (or --token-file) to the one {target} was started with"
        ),
        RejectReason::Forbidden(m) => format!(
            "{target} refuses {package} from this site: {m}; check the site keys {target} trusts (its --trust) \
             and its log"
        ),
        RejectReason::NotFound(m) => format!(
            "{target} does not know this request ({m}); check that its URL is that of a dpsync {}",
            if kind == TargetKind::Site { "server's --listen address" } else { "agent" }
        ),
        RejectReason::TooLarge(m) => {
            format!("{target} refused {package} as too large ({m}); check for a proxy that limits request sizes")
        }
        RejectReason::BadRequest(m) => format!(
            "{target} refused a request for {package} as malformed ({m}); check that it runs the same dpsync \
             version as this site"
        ),
        RejectReason::Other { .. } => format!(
            "{target} answered the push of {package} unexpectedly ({reason}); check that its URL is that of a \
             dpsync {}",
            if kind == TargetKind::Site { "server's --listen address" } else { "agent" }
        ),
        RejectReason::InsufficientStorage(m) => {
            format!("{target} has no room for {package} ({m}); free space on its data disk")
        }
        RejectReason::BaseUnknown(_)
        | RejectReason::MissingChunks(_)
        | RejectReason::Conflict(_)
        | RejectReason::Busy(_)
        | RejectReason::Server { .. } => format!("{target} refused {package}: {reason}"),
    }
}

/// Backoff before retry number `attempt` (1-based): base × 2^(attempt-1), capped, ±25 %.
pub fn backoff(cfg: &DistConfig, attempt: i64) -> Duration {
    let exp = cfg.retry_base.saturating_mul(1u32 << (attempt.clamp(1, 20) - 1) as u32).min(cfg.retry_max);
    let jitter = 0.75 + rand::random::<f64>() * 0.5;
    exp.mul_f64(jitter)
}

/// Runs due jobs until `shutdown`.
/// How long a pull DP's job waits for a source that is installing its version.
const PULL_WAIT: Duration = Duration::from_secs(120);
/// How long one pull call may fetch before it reports back.
const PULL_BUDGET: Duration = Duration::from_secs(60);
/// How long a peer ticket is good for (a job asks again with a fresh one).
const TICKET_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Sources given to a pull DP at once.
const MAX_SOURCES: usize = 8;

/// Pull DPs' jobs in this server: those waiting for a source to have their version, and
/// those the site feeds because none had it. One pull DP per (package, version) is fed
/// at a time, so pull DPs distributed together do not all take the version from the site:
/// the others wait (at most [`PULL_WAIT`]) and then pull from it.
#[derive(Debug, Default)]
pub(crate) struct PullJobs {
    waiting: std::sync::Mutex<HashSet<(String, i64)>>,
    fed: std::sync::Mutex<HashMap<(String, i64), i64>>,
}

impl PullJobs {
    /// Makes `target` the DP the site feeds with `pkg` `version`, unless another pull DP
    /// is fed it now or (`busy`) a source is installing it.
    fn feed(&self, pkg: &str, version: i64, target: i64, busy: bool) -> Option<Feeding<'_>> {
        let mut fed = self.fed.lock().unwrap();
        let key = (pkg.to_owned(), version);
        if busy || fed.contains_key(&key) {
            return None;
        }
        fed.insert(key.clone(), target);
        Some(Feeding { jobs: self, key, target })
    }

    /// Feeds `target` whoever else is fed (it waited long enough).
    fn feed_anyway(&self, pkg: &str, version: i64, target: i64) -> Feeding<'_> {
        let key = (pkg.to_owned(), version);
        self.fed.lock().unwrap().entry(key.clone()).or_insert(target);
        Feeding { jobs: self, key, target }
    }

    fn wait(&self, pkg: &str, target: i64) -> Waiting<'_> {
        let key = (pkg.to_owned(), target);
        self.waiting.lock().unwrap().insert(key.clone());
        Waiting { jobs: self, key }
    }

    fn is_waiting(&self, pkg: &str, target: i64) -> bool {
        self.waiting.lock().unwrap().contains(&(pkg.to_owned(), target))
    }
}

/// A pull DP the site feeds; released when its job ends.
#[derive(Debug)]
struct Feeding<'a> {
    jobs: &'a PullJobs,
    key: (String, i64),
    target: i64,
}

impl Drop for Feeding<'_> {
    fn drop(&mut self) {
        let mut fed = self.jobs.fed.lock().unwrap();
        if fed.get(&self.key) == Some(&self.target) {
            fed.remove(&self.key);
        }
    }
}

/// A pull DP's job waiting for a source; released when it stops waiting.
#[derive(Debug)]
struct Waiting<'a> {
    jobs: &'a PullJobs,
    key: (String, i64),
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.jobs.waiting.lock().unwrap().remove(&self.key);
    }
}

pub async fn run_jobs(site: Arc<Site>, shutdown: CancellationToken) {
    // SQLite has one server (its lock file says so): every claim left is this server's.
    // On PostgreSQL other nodes' live claims are theirs.
    let reset = match site.store.backend() {
        dpsync_store::Backend::Sqlite => site.store.reset_in_progress().await,
        dpsync_store::Backend::Postgres => site.store.reset_node(&site.cfg.node).await,
    };
    // SQLite has one server: its claims need no expiry (nothing could take them over).
    let lease = match site.store.backend() {
        dpsync_store::Backend::Sqlite => dpsync_store::Lease { ms: 0, ..site.lease() },
        dpsync_store::Backend::Postgres => site.lease(),
    };
    match reset {
        Ok(n) if n > 0 => tracing::info!(jobs = n, "resuming distributions interrupted by a stop"),
        Ok(_) => {}
        Err(e) => tracing::error!("cannot reset interrupted jobs: {e}"),
    }
    let pools = Pools {
        push: Arc::new(PushGate::new(site.dist.parallel)),
        healthy: Arc::new(Semaphore::new(site.dist.probes.max(1))),
        failing: Arc::new(Semaphore::new(site.dist.failing_probes.max(1))),
    };
    loop {
        for (health, probes) in [(TargetHealth::Healthy, &pools.healthy), (TargetHealth::Failing, &pools.failing)] {
            let free = probes.available_permits();
            if free == 0 {
                continue;
            }
            match site.store.claim_leased(now_ms(), free as i64, Some(health), &lease).await {
                Ok(jobs) => {
                    for job in jobs {
                        let probe = probes.clone().acquire_owned().await.expect("semaphore open");
                        let push = pools.push.clone();
                        let ticket = push.ticket();
                        let site = site.clone();
                        tokio::spawn(async move {
                            site.run_job(job, Admission { probe: Some(probe), push, ticket }).await;
                            site.jobs.notify_one();
                        });
                    }
                }
                Err(e) => tracing::error!("cannot claim jobs: {e}"),
            }
        }
        // Sleep until a row a pool with a free slot could take falls due; a full pool is
        // woken by its jobs ending, not polled.
        let mut wait = Duration::from_secs(5);
        for (health, probes) in [(TargetHealth::Healthy, &pools.healthy), (TargetHealth::Failing, &pools.failing)] {
            if probes.available_permits() == 0 {
                continue;
            }
            if let Ok(Some(at)) = site.store.next_due_at_of(Some(health)).await {
                wait = wait.min(Duration::from_millis((at - now_ms()).clamp(10, 5_000) as u64));
            }
        }
        tokio::select! {
            // Jobs that end close together are replaced by one claim, not one each: a
            // claim's cost grows with the jobs waiting, which may be thousands.
            // New work (a refresh's version) is claimed at once: it waits for nothing.
            _ = site.jobs.notified() => {
                if !site.jobs_new_work.swap(false, Relaxed) {
                    tokio::time::sleep(CLAIM_COALESCE).await;
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
}

/// How long the runner lets finished jobs gather before it claims their successors.
const CLAIM_COALESCE: Duration = Duration::from_millis(20);

/// The job runner's slots: `push` for pushes (`DistConfig::parallel`), `healthy` and
/// `failing` for probes of targets not known to fail and of failing ones.
struct Pools {
    push: Arc<PushGate>,
    healthy: Arc<Semaphore>,
    failing: Arc<Semaphore>,
}

/// The push slots, handed out by package priority (then in the order the jobs were
/// claimed), not in the order their targets happened to answer the probe: many jobs wait
/// here at once, and a high-priority package must not queue behind them.
#[derive(Debug)]
struct PushGate {
    slots: Arc<Semaphore>,
    /// (higher priority first, then claim order) of the jobs waiting for a slot.
    waiting: std::sync::Mutex<std::collections::BTreeSet<(std::cmp::Reverse<i64>, u64)>>,
    /// Wakes the waiters when a slot frees or the head of the line changes.
    turn: tokio::sync::Notify,
    next: std::sync::atomic::AtomicU64,
}

/// A push slot; given back (and the next in line woken) when dropped.
struct PushSlot<'a> {
    _permit: OwnedSemaphorePermit,
    gate: &'a PushGate,
}

impl Drop for PushSlot<'_> {
    fn drop(&mut self) {
        // The permit is released after this body; waking first is harmless: a woken
        // waiter that finds no slot waits for the next wake-up, and this one follows.
        let gate = self.gate;
        gate.turn.notify_waiters();
    }
}

impl PushGate {
    fn new(slots: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            waiting: Default::default(),
            turn: tokio::sync::Notify::new(),
            next: Default::default(),
        }
    }

    /// A ticket in the line: taken when the job is claimed, so that claim order counts.
    fn ticket(&self) -> u64 {
        self.next.fetch_add(1, Relaxed)
    }

    /// Waits until this job (of a package of priority rank `rank`) is first in line and a
    /// slot is free.
    async fn enter(&self, rank: i64, ticket: u64) -> PushSlot<'_> {
        let key = (std::cmp::Reverse(rank), ticket);
        self.waiting.lock().unwrap().insert(key);
        // Out of the line however this ends (a job given up while waiting included).
        struct InLine<'a>(&'a PushGate, (std::cmp::Reverse<i64>, u64));
        impl Drop for InLine<'_> {
            fn drop(&mut self) {
                if self.0.waiting.lock().unwrap().remove(&self.1) {
                    self.0.turn.notify_waiters();
                }
            }
        }
        let _in_line = InLine(self, key);
        loop {
            let woken = self.turn.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let first = self.waiting.lock().unwrap().first() == Some(&key);
            if first && let Ok(permit) = self.slots.clone().try_acquire_owned() {
                // Leaving the line (`_in_line`) wakes the next, who may take another slot.
                return PushSlot { _permit: permit, gate: self };
            }
            // Released slots wake the line; so does a new head of it. A short tick
            // bounds the wait should a wake-up fall between a check and the wait.
            tokio::select! {
                _ = &mut woken => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// A claimed job's way through the pools: it holds its probe slot until its target has
/// answered, then waits for a push slot.
struct Admission {
    /// Given back once the target answered its probe.
    probe: Option<OwnedSemaphorePermit>,
    push: Arc<PushGate>,
    /// The job's place in the line for push slots.
    ticket: u64,
}

impl Site {
    /// Wakes the runner (new or changed jobs): it claims them at once.
    pub fn kick_jobs(&self) {
        self.jobs_new_work.store(true, Relaxed);
        self.jobs.notify_one();
    }

    async fn run_job(&self, job: Distribution, admission: Admission) {
        let key = (job.package_id.clone(), job.target_id);
        let started = std::time::Instant::now();
        self.set_progress(&key, |p| {
            p.phase = Phase::Connecting;
            p.started_ms = now_ms();
        });
        let result = match self.store.target_by_id(job.target_id).await {
            Ok(Some(target)) => {
                // A target with several addresses (a child site run by several nodes):
                // one that does not answer hands the job to the next, within this attempt.
                let mut admission = admission;
                let mut result = self.run_action(&job, &target, &mut admission).await;
                for _ in 1..target.url.split_whitespace().count() {
                    let Err(PushError::Unreachable(e)) = &result else { break };
                    let Some(next) = self.clients.fail_over(&target) else { break };
                    tracing::warn!(target = %target.name, "{e}; trying its next address {next}");
                    result = self.run_action(&job, &target, &mut admission).await;
                }
                result
            }
            Ok(None) => Err(PushError::TargetGone { target: job.target_name.clone() }),
            Err(e) => Err(e.into()),
        };
        let others_running = {
            let mut progress = self.progress.lock().unwrap();
            progress.remove(&key);
            progress.keys().any(|(p, _)| *p == job.package_id)
        };
        // The last job of a package running drops its decoded manifests: they serve the
        // pushes that run together, and a later push decodes again (tens of ms) rather
        // than the site holding every pushed version's manifest for good.
        // What the pushes read and planned is freed now: handed back off the executor,
        // without delaying the outcome.
        if !others_running {
            self.manifest_cache.lock().unwrap().retain(|(p, _), _| *p != job.package_id);
            self.delta_cache.lock().unwrap().retain(|(p, _, _), _| *p != job.package_id);
            drop(tokio::task::spawn_blocking(dpsync_agent::daemon::release_free_memory));
        }

        let outcome = match result {
            Ok(o) => {
                self.metrics.jobs_succeeded.fetch_add(1, Relaxed);
                o
            }
            // A removal is retried until it succeeds, not only `retries` times: a DP that
            // is down when it is asked must not keep the package for good once it is back.
            Err(e) if e.is_retryable() && (job.attempts <= self.dist.retries || job.action == Action::Remove) => {
                let delay = backoff(&self.dist, job.attempts);
                tracing::warn!(
                    package = %job.package_id,
                    target = %job.target_name,
                    attempt = job.attempts,
                    retry_in_ms = delay.as_millis() as u64,
                    "{e}"
                );
                self.metrics.jobs_retried.fetch_add(1, Relaxed);
                Outcome::Retry { error: e.to_string(), next_attempt_at: now_ms() + delay.as_millis() as i64 }
            }
            // Past the fast retries, or an error an administrator must fix: `failed`, and
            // tried again slowly, so a target that comes back (or is fixed without a word
            // to this site) gets the package without anyone asking.
            Err(e) => {
                let delay = self.dist.slow_retry.mul_f64(0.9 + rand::random::<f64>() * 0.2);
                tracing::error!(
                    package = %job.package_id,
                    target = %job.target_name,
                    attempts = job.attempts,
                    retryable = e.is_retryable(),
                    retry_in_ms = delay.as_millis() as u64,
                    "failed: {e}"
                );
                self.metrics.jobs_failed.fetch_add(1, Relaxed);
                Outcome::Failed { error: e.to_string(), next_attempt_at: now_ms() + delay.as_millis() as i64 }
            }
        };
        let ended = match &outcome {
            Outcome::Installed { .. } => "installed",
            Outcome::Removed => "removed",
            Outcome::Retry { .. } => "retry",
            Outcome::WaitWindow { .. } => "waiting_window",
            Outcome::Failed { .. } | Outcome::ValidationFailed { .. } => "failed",
        };
        self.metrics.record_job(job.target_kind, ended, started.elapsed());
        let claim = job.claim_token.unwrap_or_default();
        match self.store.finish_leased(&job.package_id, job.target_id, claim, outcome).await {
            Ok(None) => tracing::warn!(
                package = %job.package_id,
                target = %job.target_name,
                "this node's lease on the job ran out and another node took it over; its outcome is not recorded here"
            ),
            Ok(Some(d)) => {
                tracing::debug!(package = %d.package_id, target = %d.target_name, state = %d.state, "job finished");
                // The last target of a package being deleted dropped it: its rows go.
                if d.state == DistState::Removed
                    && let Err(e) = self.finish_deleting(&d.package_id).await
                {
                    tracing::warn!(package = %d.package_id, "cannot finish deleting the package: {e}");
                }
            }
            Err(e) => tracing::error!("cannot record the outcome of {} → {}: {e}", job.package_id, job.target_name),
        }
    }

    async fn run_action(
        &self,
        job: &Distribution,
        target: &Target,
        admission: &mut Admission,
    ) -> Result<Outcome, PushError> {
        let client = self.clients.get(target).map_err(|e| PushError::transfer(e, target, &job.package_id))?;
        // Content goes only within the target's send windows (a removal sends none).
        if job.action != Action::Remove {
            match self.window_gate(target, &client) {
                Gate::Open { .. } => {}
                Gate::Closed { opens_at } => return Ok(wait_for_window(job, target, opens_at)),
            }
        }
        // The probe: a target that does not answer at once gives its slot back in seconds.
        let probed = client
            .probe_state(&job.package_id, self.dist.probe)
            .await
            .map_err(|e| PushError::transfer(e, target, &job.package_id))?;
        let rank = match self.store.package(&job.package_id).await? {
            Some(p) => p.priority.rank(),
            None => 0,
        };
        // The probe slot is held while waiting in line, which bounds the line.
        let _push_slot = admission.push.enter(rank, admission.ticket).await;
        drop(admission.probe.take());
        let pushed = match job.action {
            Action::Install | Action::Validate => {
                self.push(job, target, &client, false, probed).await.map(|version| Outcome::Installed { version })
            }
            Action::Redistribute => {
                self.push(job, target, &client, true, probed).await.map(|version| Outcome::Installed { version })
            }
            Action::Remove => {
                self.set_progress(&(job.package_id.clone(), job.target_id), |p| p.phase = Phase::Removing);
                client.remove(&job.package_id).await.map_err(|e| PushError::transfer(e, target, &job.package_id))?;
                tracing::info!(package = %job.package_id, target = %target.name, "removed from target");
                Ok(Outcome::Removed)
            }
        };
        match pushed {
            Err(PushError::WindowClosed { opens_at, .. }) => Ok(wait_for_window(job, target, opens_at)),
            other => other,
        }
    }

    /// Whether content may go to `target` now; while open, sets its client's rate to
    /// the lower of its rate limit and the open window's rate. The one place a target's
    /// rate is set: every job that sends content asks here first.
    fn window_gate(&self, target: &Target, client: &TargetClient) -> Gate {
        let gate = Windows::from_stored(target.windows.as_deref()).at(now_ms());
        if let Gate::Open { rate } = gate {
            let limit = target.rate_limit.filter(|r| *r > 0).map(|r| r as u64);
            let rate = match (limit, rate) {
                (Some(l), Some(w)) => Some(l.min(w)),
                (l, w) => l.or(w),
            };
            client.set_rate_limit(rate);
        }
        gate
    }

    /// Between batches: `Err(WindowClosed)` when the target's windows (read again, they
    /// may have been changed) closed meanwhile. What was sent stays staged there.
    async fn check_window(&self, job: &Distribution, client: &TargetClient) -> Result<(), PushError> {
        let Some(target) = self.store.target_by_id(job.target_id).await? else { return Ok(()) };
        match self.window_gate(&target, client) {
            Gate::Open { .. } => Ok(()),
            Gate::Closed { opens_at } => Err(PushError::WindowClosed { target: target.name, opens_at }),
        }
    }

    fn set_progress(&self, key: &(String, i64), f: impl FnOnce(&mut Progress)) {
        f(self.progress.lock().unwrap().entry(key.clone()).or_default());
    }

    async fn count_sent(&self, job: &Distribution, bytes: u64) {
        self.metrics.bytes_sent.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.store.record_progress(&job.package_id, job.target_id, bytes as i64).await {
            tracing::warn!("cannot record bytes sent: {e}");
        }
    }

    /// Brings `target` to the job's version; returns the version installed.
    async fn push(
        &self,
        job: &Distribution,
        target: &Target,
        client: &TargetClient,
        force: bool,
        probed: PackageState,
    ) -> Result<i64, PushError> {
        let pkg = &job.package_id;
        let version = job.desired_version;
        let key = (pkg.clone(), job.target_id);
        let gone = || PushError::VersionGone { package: pkg.clone(), version };
        let refused = |e| PushError::transfer(e, target, pkg);
        let summary = self.store.version_summary(pkg, version).await?.ok_or_else(gone)?;
        let root = summary.content_root.to_hex();
        let package = self.store.package(pkg).await?.ok_or_else(|| PushError::PackageGone { package: pkg.clone() })?;
        let signed = self.signed(&package, version, &root, summary.signature.clone())?;
        if let Some(chain) = package.owner_chain.as_deref() {
            // A package handed to another site: the target learns (again) who owns it
            // before anything else; its new owner needs nothing more from here.
            let answer = client.set_owner(pkg, chain).await.map_err(refused)?;
            if answer.chain.len() > chain.len() {
                // Handed on since, on the target's side: this site learns it too, and sends
                // nothing of what it held before.
                self.learn_ownership(pkg, &answer.chain)
                    .await
                    .map_err(|e| PushError::Handover { package: pkg.clone(), message: e.to_string() })?;
                let state = client.package_state(pkg).await.map_err(refused)?;
                return Ok(state.installed_version.unwrap_or(version));
            }
            if target.kind == TargetKind::Site
                && package.source_site != self.cfg.site_code
                && client.hello().await.ok().and_then(|h| h.site_code).as_deref() == Some(package.source_site.as_str())
            {
                let state = client.package_state(pkg).await.map_err(refused)?;
                return Ok(state.installed_version.unwrap_or(version));
            }
        }
        // The probe's answer, unless a change of owner was announced since.
        let state = match package.owner_chain {
            None => probed,
            Some(_) => client.package_state(pkg).await.map_err(refused)?,
        };
        if !force && !state.broken && state.installed_root.as_deref() == Some(root.as_str()) {
            match state.installed_version {
                Some(v) if v == version => return Ok(version),
                Some(v) if v < version => {
                    self.set_progress(&key, |p| p.phase = Phase::Relabel);
                    let r = client.relabel(pkg, version, &root, &signed).await.map_err(refused)?;
                    return Ok(r.installed_version);
                }
                _ => {}
            }
        }
        self.set_progress(&key, |p| p.phase = Phase::Manifest);
        let (manifest, compressed) = self.wire_manifest(pkg, version).await?.ok_or_else(gone)?;
        // The content the target holds, when this site still has it: the manifest goes as
        // a delta against it, and changed chunks as deltas against its chunks.
        let mut base = None;
        let mut offered = None;
        if let Some(installed) = state.installed_root.as_deref().filter(|r| !force && !state.broken && *r != root)
            && let Ok(installed) = ContentRoot::from_hex(installed)
            && let Some(base_version) = self.store.version_with_root(pkg, &installed).await?
        {
            let (base_manifest, delta) = self.wire_delta(pkg, base_version, version, &manifest).await?;
            match client.offer_delta(pkg, version, delta.clone(), &root, &package.name, &signed).await {
                Ok(m) => {
                    offered = Some(m);
                    base = Some(base_manifest);
                }
                Err(TransferError::Rejected { reason: RejectReason::BaseUnknown(message), .. }) => {
                    tracing::info!(package = %pkg, target = %target.name, "{message}; sending the full manifest");
                }
                // A delta the target could not use must not wedge the package there: the
                // full manifest says for itself what is wrong, if anything.
                Err(TransferError::Rejected { reason: RejectReason::BadRequest(message), .. }) => {
                    tracing::warn!(package = %pkg, target = %target.name, "manifest delta refused ({message}); sending the full manifest");
                }
                Err(e) => {
                    self.count_sent(job, delta.len() as u64).await;
                    return Err(refused(e));
                }
            }
            self.count_sent(job, delta.len() as u64).await;
        }
        let mut missing = match offered {
            Some(m) => m,
            None => {
                let m = client
                    .offer(pkg, version, compressed.clone(), &root, force, &package.name, &signed)
                    .await
                    .map_err(refused)?;
                self.count_sent(job, compressed.len() as u64).await;
                m
            }
        };
        // Held until the job ends: the site is feeding this pull DP (no source had it).
        let mut _feeding = None;
        if !missing.is_empty() && target.pull_sources.is_some() {
            // A pull DP fetches what it lacks from other DPs; the site sends the rest.
            (missing, _feeding) = self.pull_from_peers(job, target, client, missing).await?;
        }
        for round in 0..4 {
            if !missing.is_empty() {
                // Chunks resent after a refused commit go without a base.
                let against = if round == 0 { base.as_ref() } else { None };
                self.send_chunks(job, target, client, &manifest, against, missing).await?;
            }
            // Another node took the job over when this one's lease ran out: only the
            // claim that holds the job tells the target to commit.
            if !self.store.holds_claim(pkg, job.target_id, job.claim_token.unwrap_or_default()).await? {
                return Err(PushError::LeaseLost { package: pkg.clone(), target: target.name.clone() });
            }
            self.set_progress(&key, |p| p.phase = Phase::Committing);
            let committing = |p: &wire::CommitProgress| {
                let phase = match p.files_total {
                    0 => format!("committing: {}", p.phase),
                    n => format!("committing: {} ({}/{n})", p.phase, p.files_done),
                };
                self.set_progress(&key, |x| x.phase = Phase::Other(phase));
            };
            match client.commit_reporting(pkg, version, committing).await {
                Ok(r) => {
                    tracing::info!(package = %pkg, target = %target.name, version, built = r.files_built, "installed on target");
                    return Ok(r.installed_version);
                }
                Err(TransferError::Rejected { reason: RejectReason::MissingChunks(m), .. }) if round < 3 => {
                    tracing::warn!(package = %pkg, target = %target.name, chunks = m.len(), "target lacks chunks at commit; sending them again");
                    missing = m;
                }
                Err(TransferError::Rejected { reason: RejectReason::MissingChunks(_), .. }) => break,
                Err(e) => return Err(refused(e)),
            }
        }
        Err(PushError::StillMissing { target: target.name.clone(), package: pkg.clone(), version, rounds: 4 })
    }

    /// Has a pull DP fetch `missing` from its sources, with a ticket signed by this site,
    /// for as long as they make progress; answers what is still missing (which the site
    /// sends) and, when no source had the version, the claim that makes this DP the one
    /// the site feeds (kept until the job ends). A source that failed or sent a bad chunk
    /// is not offered again in this job.
    async fn pull_from_peers(
        &self,
        job: &Distribution,
        target: &Target,
        client: &TargetClient,
        mut missing: Vec<ChunkId>,
    ) -> Result<(Vec<ChunkId>, Option<Feeding<'_>>), PushError> {
        let (pkg, version) = (&job.package_id, job.desired_version);
        let key = (pkg.clone(), job.target_id);
        let mut dropped: HashSet<String> = HashSet::new();
        let waiting_since = std::time::Instant::now();
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let (sources, busy) = self.pull_candidates(job, target, &dropped).await?;
            if sources.is_empty() {
                // Nobody has the version yet: one pull DP at a time takes it from the site
                // (the others wait for it, or for a pushed DP installing it now).
                let feeding = match waiting_since.elapsed() < PULL_WAIT {
                    true => self.pull_jobs.feed(pkg, version, job.target_id, busy),
                    false => Some(self.pull_jobs.feed_anyway(pkg, version, job.target_id)),
                };
                if let Some(f) = feeding {
                    tracing::info!(package = %pkg, target = %target.name, chunks = missing.len(), "no source has this version; the site sends it");
                    return Ok((missing, Some(f)));
                }
                waiting.get_or_insert_with(|| self.pull_jobs.wait(pkg, job.target_id));
                self.set_progress(&key, |p| p.phase = Phase::Other("waiting for a source".into()));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            waiting = None;
            let expires = now_ms() / 1000 + TICKET_LIFETIME.as_secs() as i64;
            let ticket = dpsync_transfer::trust::Ticket::issue(
                &self.site_key,
                &self.cfg.site_code,
                &target.name,
                pkg,
                version,
                expires,
            );
            let names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
            let req = wire::PullRequest {
                ticket: ticket.encode(),
                sources,
                chunks: missing.clone(),
                budget_secs: PULL_BUDGET.as_secs(),
            };
            self.set_progress(&key, |p| p.phase = Phase::Other(format!("pulling from {}", names.join(", "))));
            let sent = serde_json::to_vec(&req).map_or(0, |b| b.len() as u64);
            let answer = match client.pull(pkg, version, &req).await {
                Ok(a) => a,
                Err(TransferError::Rejected { reason: RejectReason::NotFound(m), .. }) => {
                    tracing::warn!(package = %pkg, target = %target.name, "the DP cannot pull ({m}); the site sends everything");
                    self.count_sent(job, sent).await;
                    return Ok((missing, None));
                }
                Err(e) => {
                    self.count_sent(job, sent).await;
                    return Err(PushError::transfer(e, target, pkg));
                }
            };
            self.count_sent(job, sent).await;
            if let Err(e) = self.store.record_peer_bytes(pkg, job.target_id, answer.bytes_from_peers as i64).await {
                tracing::warn!("cannot record bytes from peers: {e}");
            }
            self.metrics.bytes_from_peers.fetch_add(answer.bytes_from_peers, Relaxed);
            tracing::info!(
                package = %pkg,
                target = %target.name,
                fetched = answer.fetched,
                bytes = answer.bytes_from_peers,
                still_missing = answer.missing.len(),
                dropped = ?answer.dropped,
                "pulled from peers"
            );
            dropped.extend(answer.dropped);
            let progressed = answer.fetched > 0;
            missing = answer.missing;
            if missing.is_empty() || !progressed {
                return Ok((missing, None));
            }
        }
    }

    /// The sources a pull DP may fetch the job's version from now, in rank order (`auto`:
    /// a few DPs of its group at random), those that have it installed; and whether one
    /// of them is installing it right now (not waiting for a source itself).
    async fn pull_candidates(
        &self,
        job: &Distribution,
        target: &Target,
        dropped: &HashSet<String>,
    ) -> Result<(Vec<wire::PeerSource>, bool), PushError> {
        let names = target.sources();
        let mut candidates: Vec<Target> = Vec::new();
        if names == ["auto"] {
            if let Some(group) = &target.group {
                candidates = self.store.targets_in_group(group).await?;
                candidates.sort_by_cached_key(|_| rand::random::<u64>());
            }
        } else {
            for n in &names {
                if let Some(t) = self.store.target(n).await? {
                    candidates.push(t);
                }
            }
        }
        let rows: HashMap<i64, Distribution> =
            self.store.distributions(&job.package_id).await?.into_iter().map(|d| (d.target_id, d)).collect();
        let mut busy = false;
        let mut usable = Vec::new();
        for t in candidates {
            if t.id == target.id || t.kind != TargetKind::Dp || dropped.contains(&t.name) {
                continue;
            }
            let Some(row) = rows.get(&t.id) else { continue };
            if row.state == DistState::Installed && row.installed_version == Some(job.desired_version) {
                usable.push(wire::PeerSource { name: t.name, url: t.url, fingerprint: t.fingerprint });
            } else if row.state == DistState::InProgress
                && row.desired_version == job.desired_version
                && !self.pull_jobs.is_waiting(&job.package_id, t.id)
            {
                busy = true;
            }
        }
        usable.truncate(MAX_SOURCES);
        Ok((usable, busy))
    }

    /// The owner's signature to send with a version: made here for this site's own
    /// packages, relayed as received for the others.
    pub(crate) fn signed(
        &self,
        package: &dpsync_store::Package,
        version: i64,
        root: &str,
        stored: Option<String>,
    ) -> Result<Signed, PushError> {
        // The owner of the package at this version signed it (a handed-over package:
        // the owner then, by its chain).
        let (signer, handed_key) = match package
            .owner_chain
            .as_deref()
            .and_then(|t| Handover::decode_chain(t).ok())
            .and_then(|c| Ownership::verify(&package.id, c).ok())
        {
            Some(own) => own.owner_at(version),
            None => (package.source_site.clone(), None),
        };
        if signer == self.cfg.site_code {
            return Ok(Signed {
                source_site: signer.clone(),
                signature: Some(self.site_key.sign(&package.id, &signer, version, root)),
                site_key: Some(self.site_key.public_hex()),
            });
        }
        let Some(signature) = stored else {
            return Err(PushError::Unsigned { package: package.id.clone(), version });
        };
        Ok(Signed {
            site_key: handed_key.or_else(|| self.trust.key_of(&signer)),
            source_site: signer,
            signature: Some(signature),
        })
    }

    /// The decoded manifest and its compressed wire form, cached per version (a relabel
    /// never loads it). `None` when the version is no longer stored. Pushes of one
    /// version share one decoded copy: those that ask while it is being decoded wait for it.
    async fn wire_manifest(&self, pkg: &str, version: i64) -> Result<Option<(Arc<Manifest>, Bytes)>, PushError> {
        let slot = cache_slot(&self.manifest_cache, (pkg.to_owned(), version), 4);
        let filled = slot
            .get_or_try_init(|| async {
                let stored = self.store.version_manifest(pkg, version).await;
                let Some(encoded) = stored.map_err(|e| Some(PushError::from(e)))? else {
                    return Err(None);
                };
                tokio::task::spawn_blocking(move || -> Result<_, DecodeError> {
                    let m = Manifest::decode(&encoded, &DecodeLimits::default())?;
                    Ok((Arc::new(m), Bytes::from(wire::compress_manifest(&encoded))))
                })
                .await
                .map_err(|e| Some(PushError::from(e)))?
                .map_err(|source| Some(PushError::CorruptManifest { package: pkg.to_owned(), version, source }))
            })
            .await;
        match filled {
            Ok(hit) => Ok(Some(hit.clone())),
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e),
        }
    }

    /// The decoded manifest of a stored version (cached).
    async fn manifest_of(&self, pkg: &str, version: i64) -> Result<Arc<Manifest>, PushError> {
        Ok(self
            .wire_manifest(pkg, version)
            .await?
            .ok_or_else(|| PushError::BaseGone { package: pkg.to_owned(), version })?
            .0)
    }

    /// The decoded manifest of `base_version` and the compressed delta from it to
    /// `manifest` (version `version`), cached per (package, base, version) and computed
    /// once for the pushes that ask for it together.
    async fn wire_delta(
        &self,
        pkg: &str,
        base_version: i64,
        version: i64,
        manifest: &Arc<Manifest>,
    ) -> Result<(Arc<Manifest>, Bytes), PushError> {
        let slot = cache_slot(&self.delta_cache, (pkg.to_owned(), base_version, version), 8);
        let filled = slot
            .get_or_try_init(|| async {
                let base = self.manifest_of(pkg, base_version).await?;
                let (b, m) = (base.clone(), manifest.clone());
                let delta = tokio::task::spawn_blocking(move || {
                    Bytes::from(wire::compress_manifest(&dpsync_hash::ManifestDelta::between(&b, &m).encode()))
                })
                .await?;
                Ok::<_, PushError>((base, delta))
            })
            .await?;
        Ok(filled.clone())
    }

    /// Reads, compresses and sends `missing` in batches; resends chunks the target
    /// rejected (damaged in transit, or their base missing there) up to three times,
    /// without a base. With `base` (the manifest of the content the target holds), a
    /// chunk that replaces a chunk of the same file there is sent as a delta against it.
    async fn send_chunks(
        &self,
        job: &Distribution,
        target: &Target,
        client: &TargetClient,
        manifest: &Arc<Manifest>,
        base: Option<&Arc<Manifest>>,
        missing: Vec<ChunkId>,
    ) -> Result<(), PushError> {
        let key = (job.package_id.clone(), job.target_id);
        let (m, b) = (manifest.clone(), base.cloned());
        let pkg = &job.package_id;
        let refused = |e| PushError::transfer(e, target, pkg);
        let mut todo =
            tokio::task::spawn_blocking(move || plan_reads(&m, b.as_deref(), &missing)).await?.map_err(|chunk| {
                PushError::UnknownChunk {
                    target: target.name.clone(),
                    package: pkg.clone(),
                    version: job.desired_version,
                    chunk,
                }
            })?;
        let planned: u64 = todo.items.iter().map(|t| t.len as u64).sum();
        self.set_progress(&key, |p| {
            p.phase = Phase::Sending;
            p.bytes_planned += planned;
        });
        let rate = target.rate_limit.filter(|r| *r > 0).map(|r| r as u64);
        let size =
            |client: &TargetClient| batch_size(client.measured_rate(), rate, self.dist.stall, self.dist.batch_bytes);
        let batch_bytes = Arc::new(AtomicUsize::new(size(client)));
        // A rate limit holds across all packages to the target: the target's client
        // paces every body it sends (see `TargetClient::set_rate_limit`).
        for round in 0..4 {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Batch, PushError>>(1);
            let lib = self.library.clone();
            let package = pkg.clone();
            let budget = self.batch_memory.clone();
            let items = std::mem::take(&mut todo);
            let (sizing, most) = (batch_bytes.clone(), self.dist.batch_bytes);
            // The target checks every chunk against its id, so the first round does not
            // hash what it reads; chunks sent again are checked here first, so a damaged
            // library object fails the job naming it instead of being sent again.
            let verify = round > 0;
            let reader = tokio::task::spawn_blocking(move || {
                read_batches(&lib, &package, items, (&sizing, most), verify, &budget, tx)
            });
            let mut rejected_all = Vec::new();
            while let Some(batch) = rx.recv().await {
                // The batch's memory permit is held until the target has answered.
                let (body, raw, _permit) = batch?;
                self.check_window(job, client).await?;
                let len = body.len() as u64;
                let resp = match client.send_batch(pkg, job.desired_version, body).await {
                    Ok(r) => r,
                    // A batch damaged in transit can break its framing: send it again.
                    Err(TransferError::Rejected { reason: RejectReason::BadRequest(message), .. }) => {
                        return Err(PushError::BatchRefused {
                            target: target.name.clone(),
                            package: pkg.clone(),
                            message,
                        });
                    }
                    Err(e) => return Err(refused(e)),
                };
                batch_bytes.store(size(client), Relaxed);
                self.count_sent(job, len).await;
                self.set_progress(&key, |p| p.bytes_done += raw);
                rejected_all.extend(resp.rejected);
            }
            reader.await?;
            if rejected_all.is_empty() {
                return Ok(());
            }
            tracing::warn!(package = %job.package_id, target = %target.name, chunks = rejected_all.len(), "target rejected chunks (damaged in transit, or their base missing there); sending them again without a base");
            let rejected: Vec<ChunkId> = rejected_all.into_iter().collect::<HashSet<_>>().into_iter().collect();
            let m = manifest.clone();
            todo = tokio::task::spawn_blocking(move || plan_reads(&m, None, &rejected).unwrap_or_default()).await?;
        }
        Err(PushError::KeptRejecting {
            target: target.name.clone(),
            package: pkg.clone(),
            version: job.desired_version,
        })
    }
}

/// One chunk to read: where in the library, and the chunks of the target's version it
/// may be sent against. Kept small: a push holds one per chunk the target lacks.
#[derive(Debug, Clone, Copy)]
struct ReadItem {
    id: ChunkId,
    /// Index in [`ReadPlan::files`].
    file: u32,
    offset: u64,
    len: u32,
    /// Index in [`ReadPlan::bases`].
    base: Option<u32>,
}

/// What a push reads, in the order the target asked for it.
#[derive(Debug, Default)]
struct ReadPlan {
    items: Vec<ReadItem>,
    files: Vec<FileHash>,
    bases: Vec<BaseRun>,
}

/// Consecutive chunks of one file of the target's version that a new chunk overlaps:
/// it is compressed against their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseRun {
    ids: Vec<ChunkId>,
    /// The length of each chunk of `ids`.
    lens: Vec<u32>,
    file: FileHash,
    /// Where the run starts in `file`.
    offset: u64,
}

impl BaseRun {
    fn len(&self) -> u64 {
        self.lens.iter().map(|l| u64::from(*l)).sum()
    }
}

impl ReadPlan {
    fn base_of(&self, item: &ReadItem) -> Option<&BaseRun> {
        item.base.map(|b| &self.bases[b as usize])
    }
}

/// The slot of `key` in a manifest cache, created empty when absent; a cache of `bound`
/// slots is emptied before another is added (a push holding a slot keeps it).
fn cache_slot<K: std::hash::Hash + Eq>(
    cache: &std::sync::Mutex<HashMap<K, crate::CacheSlot>>,
    key: K,
    bound: usize,
) -> crate::CacheSlot {
    let mut cache = cache.lock().unwrap();
    if !cache.contains_key(&key) && cache.len() >= bound {
        cache.clear();
    }
    cache.entry(key).or_default().clone()
}

/// Where to read each of `missing` (the first place it occurs in `manifest`), and, with
/// `base`, the chunks of the base entry at the same path that overlap the same range (up
/// to [`wire::MAX_BASES`]; for an append past the old end: the old last chunk), stopping
/// at one the target lacks too. `Err` when a chunk is not in `manifest`.
fn plan_reads(manifest: &Manifest, base: Option<&Manifest>, missing: &[ChunkId]) -> Result<ReadPlan, ChunkId> {
    let position: HashMap<ChunkId, u32> = missing.iter().enumerate().map(|(i, id)| (*id, i as u32)).collect();
    let mut slots: Vec<Option<ReadItem>> = vec![None; missing.len()];
    let mut plan = ReadPlan::default();
    for e in manifest.files() {
        let h = e.file_hash().expect("file");
        let mut off = 0u64;
        let mut file_index: Option<u32> = None;
        // The base entry's chunks with their offsets, built only if this file needs it.
        let mut old: Option<Vec<(u64, dpsync_hash::Chunk, FileHash)>> = None;
        for c in e.chunks() {
            if let Some(&pos) = position.get(&c.id)
                && slots[pos as usize].is_none()
            {
                let old = old.get_or_insert_with(|| {
                    let Some(b) = base.and_then(|b| b.get(e.path.as_str())) else { return vec![] };
                    let Some(bh) = b.file_hash() else { return vec![] };
                    let mut o = 0u64;
                    b.chunks()
                        .iter()
                        .map(|bc| {
                            let at = o;
                            o += bc.len as u64;
                            (at, *bc, bh)
                        })
                        .collect()
                });
                // From the old chunk covering this offset, the old chunks that overlap
                // this one; a base the target lacks itself (it asked for it) would only
                // be refused.
                let first = old.partition_point(|(at, _, _)| *at <= off).saturating_sub(1);
                let run: Vec<_> = old
                    .iter()
                    .skip(first)
                    .enumerate()
                    .take_while(|(i, (at, _, _))| *i == 0 || *at < off + u64::from(c.len))
                    .map(|(_, x)| x)
                    .take(wire::MAX_BASES)
                    .take_while(|(_, bc, _)| bc.id != c.id && !position.contains_key(&bc.id))
                    .collect();
                let base = run.first().map(|&&(at, _, bh)| {
                    plan.bases.push(BaseRun {
                        ids: run.iter().map(|(_, bc, _)| bc.id).collect(),
                        lens: run.iter().map(|(_, bc, _)| bc.len).collect(),
                        file: bh,
                        offset: at,
                    });
                    (plan.bases.len() - 1) as u32
                });
                let file = *file_index.get_or_insert_with(|| {
                    plan.files.push(h);
                    (plan.files.len() - 1) as u32
                });
                slots[pos as usize] = Some(ReadItem { id: c.id, file, offset: off, len: c.len, base });
            }
            off += c.len as u64;
        }
    }
    // An id asked for twice is read twice.
    for (i, id) in missing.iter().enumerate() {
        if slots[i].is_none()
            && let Some(&p) = position.get(id)
        {
            slots[i] = slots[p as usize];
        }
    }
    plan.items = slots.into_iter().zip(missing).map(|(s, id)| s.ok_or(*id)).collect::<Result<_, _>>()?;
    Ok(plan)
}

/// Blocking: reads chunks from the library in order (with `verify`, checking each
/// against its id), compresses and packs them into batches, and hands each batch to the
/// sender. A chunk with a base is compressed against the base's bytes when they read back
/// intact and that is smaller.
/// A batch body, its raw chunk bytes, and its share of the push memory budget.
type Batch = (Bytes, u64, tokio::sync::OwnedSemaphorePermit);

/// The outcome of a job whose target's send windows are closed: it waits, without
/// counting an attempt, until the next opens (or a day, if none ever does, and is then
/// looked at again).
fn wait_for_window(job: &Distribution, target: &Target, opens_at: Option<i64>) -> Outcome {
    let next_window_at = opens_at.unwrap_or_else(|| now_ms() + 24 * 3600 * 1000);
    tracing::info!(
        package = %job.package_id,
        target = %target.name,
        next_window_at,
        "outside the target's send windows; waiting for the next"
    );
    Outcome::WaitWindow { next_window_at }
}

/// The memory all pushes' batches may hold at once, in KiB permits.
#[derive(Debug, Clone)]
pub(super) struct Budget {
    pub permits: Arc<tokio::sync::Semaphore>,
    pub kib: u32,
}

impl Budget {
    pub fn new(bytes: usize) -> Self {
        let kib = ((bytes >> 10) as u32).max(1);
        Self { permits: Arc::new(tokio::sync::Semaphore::new(kib as usize)), kib }
    }
}

/// The size of the next batch to a target: what its link carries in a few seconds (at
/// most a quarter of the stall timeout, so that a batch always crosses well within it),
/// at its measured rate or its rate limit, whichever is lower; a first batch to a link
/// not measured yet is small. Within 64 KiB and `most`.
fn batch_size(measured: Option<u64>, limit: Option<u64>, stall: Duration, most: usize) -> usize {
    const FIRST: usize = 256 << 10;
    const LEAST: usize = 64 << 10;
    let secs = (stall.as_secs_f64() / 4.0).clamp(0.25, 10.0);
    let rate = match (measured, limit) {
        (Some(m), Some(l)) => Some(m.min(l)),
        (m, l) => m.or(l),
    };
    match rate {
        None => FIRST.min(most),
        Some(r) => ((r as f64 * secs) as usize).clamp(LEAST.min(most), most),
    }
}

/// `sizing`: the size of the next batch (read at each batch's start) and the largest.
fn read_batches(
    lib: &dpsync_library::Library,
    package: &str,
    plan: ReadPlan,
    sizing: (&AtomicUsize, usize),
    verify: bool,
    budget: &Budget,
    tx: tokio::sync::mpsc::Sender<Result<Batch, PushError>>,
) {
    use std::os::unix::fs::FileExt;
    let (next_size, most) = sizing;
    let mut batch_bytes = next_size.load(Relaxed);
    let capacity = most + (256 << 10);
    // The permit covers the batch's capacity (it may outgrow it by one chunk and its
    // base), capped at the whole budget so that one batch can always start.
    let kib = ((capacity >> 10) as u32).clamp(1, budget.kib);
    let handle = tokio::runtime::Handle::current();
    let Ok(mut permit) = handle.block_on(budget.permits.clone().acquire_many_owned(kib)) else { return };
    let mut batch = BatchBuilder::with_capacity(batch_bytes + (256 << 10));
    let mut open: Option<(FileHash, std::fs::File)> = None;
    let mut open_base: Option<(FileHash, std::fs::File)> = None;
    // Raw bytes the receiver holds in memory for this batch: chunks and their bases.
    let mut held = 0u64;
    let (mut buf, mut base_buf) = (Vec::new(), Vec::new());
    // Most package content is already compressed (installers, archives, media), and
    // trying zstd on it was the largest CPU cost of a push. After 8 chunks in a row that
    // did not compress, only every 16th chunk is tried (until one compresses again);
    // chunks that can go as a delta against a chunk the target holds are always tried.
    let mut misses = 0u32;
    for item in &plan.items {
        let ReadItem { id, offset, len, .. } = *item;
        let hash = plan.files[item.file as usize];
        let base = plan.base_of(item);
        if open.as_ref().map(|(h, _)| *h) != Some(hash) {
            match lib.open_object(&hash) {
                Ok(f) => open = Some((hash, f)),
                Err(source) => {
                    let _ = tx.blocking_send(Err(PushError::Library { package: package.to_owned(), source }));
                    return;
                }
            }
        }
        let f = &open.as_ref().expect("opened").1;
        let read = |dst: &mut [u8]| -> Result<(), PushError> {
            f.read_exact_at(dst, offset).map_err(|source| PushError::Library {
                package: package.to_owned(),
                source: LibraryError::Io { path: lib.object_path(&hash), source },
            })?;
            if verify && ChunkId::from(blake3::hash(dst)) != id {
                Err(PushError::Damaged { package: package.to_owned(), file: hash })
            } else {
                Ok(())
            }
        };
        let skip_zstd = misses >= 8 && !misses.is_multiple_of(16);
        let added = if base.is_none() && skip_zstd {
            misses += 1;
            batch.push_stored_with(&id, len, read)
        } else {
            buf.resize(len as usize, 0);
            read(&mut buf).map(|()| {
                let mut c = None;
                if let Some(run) = base {
                    if open_base.as_ref().map(|(h, _)| *h) != Some(run.file) {
                        open_base = lib.open_object(&run.file).ok().map(|f| (run.file, f));
                    }
                    if let Some((_, bf)) = &open_base
                        && read_base_run(bf, run, &mut base_buf)
                    {
                        c = Some(WireChunk::encode_against(id, &buf, &run.ids, &base_buf));
                    }
                }
                let c = c.unwrap_or_else(|| WireChunk::encode(id, &buf));
                if !c.bases.is_empty() {
                    held += base.map_or(0, BaseRun::len);
                } else if c.is_compressed() {
                    misses = 0;
                } else if len >= 4096 {
                    misses += 1;
                }
                batch.push(&c);
            })
        };
        if let Err(e) = added {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        held += u64::from(len);
        // Close the batch on its wire size, or on what the receiver must hold once it
        // decompressed it (very compressible chunks, or chunks sent against bases).
        if batch.wire_len() >= batch_bytes || held >= wire::TARGET_BATCH_RAW_BYTES {
            // The next batch's memory is taken only once this one is handed over: a
            // reader waiting for memory holds none that the sender cannot free, so
            // pushes share the budget without deadlock whatever their number.
            let raw = batch.raw_len();
            let full = std::mem::replace(&mut batch, BatchBuilder::with_capacity(0));
            if tx.blocking_send(Ok((full.finish(), raw, permit))).is_err() {
                return;
            }
            let Ok(next) = handle.block_on(budget.permits.clone().acquire_many_owned(kib)) else { return };
            batch_bytes = next_size.load(Relaxed);
            (batch, permit) = (BatchBuilder::with_capacity(batch_bytes + (256 << 10)), next);
            held = 0;
        }
    }
    if !batch.is_empty() {
        let raw = batch.raw_len();
        let _ = tx.blocking_send(Ok((batch.finish(), raw, permit)));
    }
}

/// Reads the bytes of a run of base chunks into `buf`; false unless every chunk of it
/// reads back intact (checked against its id).
fn read_base_run(f: &std::fs::File, run: &BaseRun, buf: &mut Vec<u8>) -> bool {
    use std::os::unix::fs::FileExt;
    buf.resize(run.len() as usize, 0);
    if f.read_exact_at(buf, run.offset).is_err() {
        return false;
    }
    let mut rest = &buf[..];
    run.ids.iter().zip(&run.lens).all(|(id, len)| {
        let (piece, tail) = rest.split_at(*len as usize);
        rest = tail;
        ChunkId::from(blake3::hash(piece)) == *id
    })
}

#[cfg(test)]
mod tests {
    use dpsync_hash::{Chunk, Entry, EntryKind, RelPath};

    use super::*;

    fn chunk(n: u8, len: u32) -> Chunk {
        Chunk { id: ChunkId::from_bytes([n; 32]), len }
    }

    fn manifest(files: &[(&str, u8, Vec<Chunk>)]) -> Manifest {
        Manifest::new(
            files
                .iter()
                .map(|(p, h, chunks)| Entry {
                    path: RelPath::new(*p).unwrap(),
                    mode: 0o644,
                    mtime_ns: 0,
                    kind: EntryKind::File {
                        size: chunks.iter().map(|c| u64::from(c.len)).sum(),
                        hash: FileHash::from_bytes([*h; 32]),
                        chunks: chunks.clone().into(),
                    },
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn the_site_feeds_one_pull_dp_per_version_at_a_time() {
        let jobs = PullJobs::default();
        assert!(jobs.feed("PS100001", 3, 1, true).is_none(), "a source installs it: wait");
        let first = jobs.feed("PS100001", 3, 1, false).expect("nobody is fed yet");
        assert!(jobs.feed("PS100001", 3, 2, false).is_none(), "one at a time");
        assert!(jobs.feed("PS100001", 4, 2, false).is_some(), "per version");
        let waiting = jobs.wait("PS100001", 2);
        assert!(jobs.is_waiting("PS100001", 2) && !jobs.is_waiting("PS100001", 1));
        drop(waiting);
        assert!(!jobs.is_waiting("PS100001", 2));
        let anyway = jobs.feed_anyway("PS100001", 3, 2);
        drop(anyway);
        assert!(jobs.feed("PS100001", 3, 2, false).is_none(), "the first is still fed");
        drop(first);
        assert!(jobs.feed("PS100001", 3, 2, false).is_some(), "released when its job ended");
    }

    #[tokio::test]
    async fn push_slots_go_by_priority_then_claim_order_and_a_job_given_up_leaves_the_line() {
        let gate = Arc::new(PushGate::new(1));
        let held = gate.enter(1, gate.ticket()).await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        // Claimed in this order: low, a job that is given up, high, medium.
        let tickets: Vec<(i64, u64)> = [0, 2, 2, 1].iter().map(|r| (*r, gate.ticket())).collect();
        let mut tasks = Vec::new();
        for (i, (rank, ticket)) in tickets.into_iter().enumerate() {
            let (gate, order) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = gate.enter(rank, ticket).await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tasks.remove(1).abort(); // the given-up job: first among the high ones
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![2, 3, 0]);
        assert!(gate.waiting.lock().unwrap().is_empty());
    }

    #[test]
    fn batches_are_sized_to_the_link() {
        let (minute, most) = (Duration::from_secs(60), 4 << 20);
        assert_eq!(batch_size(None, None, minute, most), 256 << 10, "not measured yet");
        assert_eq!(batch_size(Some(5_000), None, minute, most), 64 << 10, "at least 64 KiB");
        assert_eq!(batch_size(Some(100_000), None, minute, most), 1_000_000, "10 s of the link");
        assert_eq!(batch_size(Some(1 << 30), None, minute, most), most);
        assert_eq!(batch_size(Some(1 << 30), Some(200_000), minute, most), 2_000_000, "the rate limit");
        assert_eq!(batch_size(Some(100_000), None, Duration::from_secs(3), most), 75_000, "a quarter of the stall");
        assert_eq!(batch_size(Some(5_000), None, minute, 32 << 10), 32 << 10, "never above the largest");
    }

    #[test]
    fn a_new_chunk_is_paired_with_the_old_chunk_at_its_offset() {
        let base =
            manifest(&[("a", 1, vec![chunk(1, 100), chunk(2, 100), chunk(3, 50)]), ("b", 2, vec![chunk(9, 10)])]);
        let new = manifest(&[
            // The first chunk grew (an insert at the start), the last one too (an append).
            ("a", 3, vec![chunk(11, 120), chunk(2, 100), chunk(13, 60), chunk(14, 40)]),
            ("b", 2, vec![chunk(9, 10)]),
            ("c", 4, vec![chunk(21, 10)]),
        ]);
        let ids = |v: &[u8]| v.iter().map(|n| ChunkId::from_bytes([*n; 32])).collect::<Vec<_>>();
        let plan = plan_reads(&new, Some(&base), &ids(&[11, 13, 14, 21])).unwrap();
        let items = &plan.items;
        let bases: Vec<Option<(Vec<u8>, u64)>> = items
            .iter()
            .map(|i| plan.base_of(i).map(|r| (r.ids.iter().map(|id| id.as_bytes()[0]).collect(), r.offset)))
            .collect();
        // 11 at 0..120 → old 1 at 0..100 and old 2 at 100..200; 13 at 220 → old 3 at 200;
        // 14 at 280 (past the old end) → the old last chunk; a new file has no base.
        let run = |ids: &[u8], at| Some((ids.to_vec(), at));
        assert_eq!(bases, vec![run(&[1, 2], 0), run(&[3], 200), run(&[3], 200), None]);
        // A base chunk the target lacks too (2, asked for) is not used, nor any after it.
        let lacking = plan_reads(&new, Some(&base), &ids(&[11, 2])).unwrap();
        assert_eq!(lacking.base_of(&lacking.items[0]).map(|r| r.ids.len()), Some(1));
        assert_eq!(items.iter().map(|i| i.offset).collect::<Vec<_>>(), vec![0, 220, 280, 0]);
        // Without a base manifest, no chunk has a base; an unknown chunk is refused.
        assert!(plan_reads(&new, None, &ids(&[11, 13])).unwrap().items.iter().all(|i| i.base.is_none()));
        assert_eq!(plan_reads(&new, Some(&base), &ids(&[77])).unwrap_err(), ChunkId::from_bytes([77; 32]));
        // An id asked for twice is planned twice, from the same place.
        let twice = plan_reads(&new, None, &ids(&[21, 11, 21])).unwrap();
        assert_eq!(twice.items.iter().map(|i| i.id.as_bytes()[0]).collect::<Vec<_>>(), vec![21, 11, 21]);
        assert_eq!(twice.files[twice.items[0].file as usize], twice.files[twice.items[2].file as usize]);
    }

    fn target(kind: TargetKind) -> Target {
        Target {
            id: 1,
            name: "dp1".into(),
            kind,
            url: "https://dp1.example:8443".into(),
            token: Some("t".into()),
            group: None,
            rate_limit: None,
            created_at: 0,
            fingerprint: None,
            windows: None,
            validate_every_ms: None,
            pull_sources: None,
        }
    }

    fn refusal(reason: RejectReason) -> PushError {
        PushError::transfer(
            TransferError::Rejected { target: "dp1".into(), reason },
            &target(TargetKind::Dp),
            "PS100001",
        )
    }

    /// Each variant is retried or failed as its cause says, and its message names what
    /// it concerns.
    #[test]
    fn every_push_error_knows_whether_to_retry() {
        let dp = target(TargetKind::Dp);
        let net = |e| PushError::transfer(e, &dp, "PS100001");
        let t = || "dp1".to_owned();
        let p = || "PS100001".to_owned();
        let corrupt = Manifest::decode(b"not a manifest", &DecodeLimits::default()).unwrap_err();
        let cases: Vec<(PushError, bool)> = vec![
            (net(TransferError::Unreachable { target: t(), message: "connection refused".into() }), true),
            (net(TransferError::Timeout { target: t(), message: "timed out".into() }), true),
            (refusal(RejectReason::Unauthorized("wrong token".into())), false),
            (refusal(RejectReason::Forbidden("untrusted site key".into())), false),
            (refusal(RejectReason::NotFound("no such endpoint".into())), false),
            (refusal(RejectReason::TooLarge("over the limit".into())), false),
            (refusal(RejectReason::BadRequest("bad query".into())), false),
            (refusal(RejectReason::Other { status: 418, message: "teapot".into() }), false),
            (refusal(RejectReason::InsufficientStorage("only 3 MiB free".into())), true),
            (refusal(RejectReason::MissingChunks(vec![ChunkId::from_bytes([1; 32])])), true),
            (refusal(RejectReason::BaseUnknown("no base".into())), true),
            (refusal(RejectReason::Conflict("older".into())), true),
            (refusal(RejectReason::Busy("later".into())), true),
            (refusal(RejectReason::Server { status: 500, message: "boom".into() }), true),
            (net(TransferError::Certificate { target: t(), message: "fingerprint mismatch".into() }), false),
            (net(TransferError::Protocol { target: t(), message: "bad json".into() }), false),
            (net(TransferError::Client { target: t(), message: "bad pin".into() }), false),
            (
                PushError::Library {
                    package: p(),
                    source: LibraryError::Missing { hash: FileHash::from_bytes([2; 32]) },
                },
                false,
            ),
            (PushError::Damaged { package: p(), file: FileHash::from_bytes([2; 32]) }, false),
            (PushError::CorruptManifest { package: p(), version: 3, source: corrupt }, false),
            (PushError::VersionGone { package: p(), version: 3 }, false),
            (PushError::PackageGone { package: p() }, false),
            (PushError::TargetGone { target: t() }, false),
            (PushError::Unsigned { package: p(), version: 3 }, false),
            (
                PushError::UnknownChunk { target: t(), package: p(), version: 3, chunk: ChunkId::from_bytes([1; 32]) },
                false,
            ),
            (PushError::BaseGone { package: p(), version: 2 }, true),
            (PushError::BatchRefused { target: t(), package: p(), message: "bad framing".into() }, true),
            (PushError::StillMissing { target: t(), package: p(), version: 3, rounds: 4 }, true),
            (PushError::KeptRejecting { target: t(), package: p(), version: 3 }, true),
        ];
        for (e, retryable) in cases {
            assert_eq!(e.is_retryable(), retryable, "{e:?}: {e}");
            let msg = e.to_string();
            assert!(msg.contains("dp1") || msg.contains("PS100001"), "names the target or package: {msg}");
        }
        assert!(matches!(
            net(TransferError::Timeout { target: t(), message: String::new() }),
            PushError::Unreachable(_)
        ));
        assert!(PushError::Cancelled.is_retryable());
        assert!(PushError::Task("panicked".into()).is_retryable());
        // The site's database: as retryable as the store says.
        assert!(PushError::from(StoreError::Database(sqlx::Error::PoolTimedOut)).is_retryable());
        assert!(!PushError::from(StoreError::NotFound("package PS100001".into())).is_retryable());
    }

    /// Permanent refusals say what to do next.
    #[test]
    fn permanent_refusals_say_what_to_do() {
        let token = refusal(RejectReason::Unauthorized("wrong token".into())).to_string();
        assert!(token.contains("dp1") && token.contains("`dpsync dp set dp1 --token …`"), "{token}");
        let site = target(TargetKind::Site);
        let e = TransferError::Certificate { target: "dp1".into(), message: "certificate fingerprint mismatch".into() };
        let pin = PushError::transfer(e, &site, "PS100001").to_string();
        assert!(pin.contains("re-pin it with `dpsync site set dp1 --fingerprint FP`"), "{pin}");
        assert!(pin.contains("DATA_DIR/tls/fingerprint"), "{pin}");
        // A pin mismatch names the presented fingerprint and the exact command.
        let (presented, pinned) = ("ab".repeat(32), "cd".repeat(32));
        let message =
            format!("invalid peer certificate: certificate fingerprint {presented} is not the pinned {pinned}");
        let e = TransferError::Certificate { target: "dp1".into(), message };
        let pin = PushError::transfer(e, &target(TargetKind::Dp), "PS100001").to_string();
        assert!(pin.contains("does not match the pinned one"), "{pin}");
        assert!(pin.contains(&format!("`dpsync dp set dp1 --fingerprint {presented}`")), "{pin}");
        let damaged = PushError::Damaged { package: "PS100001".into(), file: FileHash::from_bytes([2; 32]) };
        assert!(damaged.to_string().contains("dpsync refresh PS100001 --verify"), "{damaged}");
    }

    #[tokio::test]
    async fn a_stopped_task_is_retried() {
        let panicked = tokio::spawn(async { panic!("a bug") }).await.unwrap_err();
        let e = PushError::from(panicked);
        assert!(matches!(e, PushError::Task(_)) && e.is_retryable(), "{e:?}");
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        let e = PushError::from(task.await.unwrap_err());
        assert!(matches!(e, PushError::Cancelled) && e.is_retryable(), "{e:?}");
    }

    /// Four pushes whose batches each need the whole budget: they take turns, none
    /// deadlocks, every byte is read, and the budget is whole again at the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pushes_share_the_batch_memory_budget_without_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Arc::new(dpsync_library::Library::open(dir.path()).unwrap());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..3 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let d = lib.import(&data[..], &dpsync_hash::ChunkParams::default()).unwrap().digest;
        let m = Arc::new(
            Manifest::new(vec![Entry {
                path: RelPath::new("f").unwrap(),
                mode: 0o644,
                mtime_ns: 0,
                kind: EntryKind::File { size: d.size, hash: d.hash, chunks: d.chunks.clone().into() },
            }])
            .unwrap(),
        );
        let missing: Vec<ChunkId> = d.chunks.iter().map(|c| c.id).collect();
        let budget = Budget::new(300 << 10);
        let mut pushes = Vec::new();
        for _ in 0..4 {
            let (lib, m, missing, budget) = (lib.clone(), m.clone(), missing.clone(), budget.clone());
            pushes.push(tokio::spawn(async move {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Batch, PushError>>(1);
                let plan = plan_reads(&m, None, &missing).unwrap();
                let b2 = budget.clone();
                let reader = tokio::task::spawn_blocking(move || {
                    read_batches(&lib, "PS100001", plan, (&AtomicUsize::new(64 << 10), 64 << 10), true, &b2, tx)
                });
                let mut raw = 0;
                while let Some(batch) = rx.recv().await {
                    let (_body, n, _permit) = batch.unwrap();
                    assert_eq!(budget.permits.available_permits(), 0, "a batch holds the whole budget");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    raw += n;
                }
                reader.await.unwrap();
                raw
            }));
        }
        let all = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(pushes))
            .await
            .expect("pushes sharing the budget finished");
        for r in all {
            assert_eq!(r.unwrap(), data.len() as u64);
        }
        assert_eq!(budget.permits.available_permits(), budget.kib as usize);
    }
}
