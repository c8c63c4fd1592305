//! What differs between receivers: what happens once a version is verified.
//!
//! The receiving core ([`crate::Agent`]) is the same for a DP and a child site: it
//! authenticates offers, stages manifests, keeps verified chunks across restarts,
//! writes files as their chunks arrive, and assembles the rest into the library. A
//! [`VersionSink`] decides what a whole, verified version becomes: a DP lays it out as
//! a tree and switches `current` ([`crate::DpTrees`]); a child site commits it to its
//! own store and fans it out (in the site crate).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use dpsync_hash::{ChunkId, ContentRoot, FileHash, Manifest, RelPath};
use dpsync_library::Library;
use dpsync_transfer::service::{CommitStage, OfferMeta, ReceiveError, ServedFile};
use dpsync_transfer::wire::ValidateResponse;
use prometheus_client::registry::Registry;

use crate::Core;
use crate::install::{InstallError, Installed, Source};

/// A verified version whose files are all in the library, ready to be made live.
#[derive(Debug)]
pub struct Arrived {
    pub package: String,
    pub version: i64,
    pub content_root: ContentRoot,
    pub manifest: Arc<Manifest>,
    /// The canonical encoding of `manifest`, as signed.
    pub encoded: Vec<u8>,
    pub signature: Option<String>,
    /// What [`VersionSink::build`] did.
    pub installed: Installed,
    /// Files written on arrival since the package's last commit; those the version does
    /// not use belong to a version replaced mid-transfer.
    pub written_on_arrival: Vec<FileHash>,
    /// The package's lock, held until the sink lets it go: clean-up that must finish
    /// before the package's next offer keeps it.
    pub guard: tokio::sync::OwnedMutexGuard<()>,
}

/// What a receiver does with a verified version. Every method runs with the package's
/// lock held, except [`VersionSink::open_file`] and [`VersionSink::register_metrics`].
pub trait VersionSink: Send + Sync + std::fmt::Debug + 'static {
    /// The name of this kind of receiver in messages ("DP", "site").
    fn role(&self) -> &'static str;

    /// Checks an offer before its signature is checked (which pins a key on first use).
    fn check_offer(&self, _pkg: &str, _meta: &OfferMeta) -> Result<(), ReceiveError> {
        Ok(())
    }

    /// The ownership chain of `pkg` was verified and kept (`chain` in wire form):
    /// `owner` owns it now. A child site takes it over, or passes it on.
    fn owner_changed(
        &self,
        _core: &Core,
        _pkg: &str,
        _owner: &str,
        _chain: &str,
    ) -> impl Future<Output = Result<(), ReceiveError>> + Send {
        async { Ok(()) }
    }

    /// A signed offer of `pkg` was verified: the package may be registered.
    fn accept_package(&self, _pkg: &str, _meta: &OfferMeta) -> impl Future<Output = Result<(), ReceiveError>> + Send {
        async { Ok(()) }
    }

    /// Called with the package's lock held just before [`VersionSink::build`]: reads from
    /// the receiver's state what the build can start from (a DP: the previous version's
    /// tree and manifest, which the build recycles). `force`: the build must not trust
    /// what is installed.
    fn prepare_build(
        &self,
        _core: &Core,
        _pkg: &str,
        _force: bool,
    ) -> impl Future<Output = Result<(), ReceiveError>> + Send {
        async { Ok(()) }
    }

    /// On a blocking thread: puts every file of `manifest` into `lib` (assembling those
    /// it lacks, all of them with `force`, from `sources`) and lays out whatever this
    /// receiver serves. Nothing is visible to readers before [`VersionSink::commit`].
    fn build(
        &self,
        lib: &Library,
        pkg: &str,
        version: i64,
        manifest: &Manifest,
        sources: &HashMap<ChunkId, Source>,
        force: bool,
    ) -> Result<Installed, InstallError>;

    /// How far the running [`VersionSink::build`] of `pkg` has come, for a sender
    /// following a long commit (`None`: not counted). Called without the package's lock.
    fn build_progress(&self, _pkg: &str) -> Option<CommitStage> {
        None
    }

    /// Makes a built version live and records it with [`Core::record_install`].
    fn commit(&self, core: &Core, arrived: Arrived) -> impl Future<Output = Result<(), ReceiveError>> + Send;

    /// The installed content (root `root`) is now also version `version`: called before
    /// the core records the new number.
    fn relabel(
        &self,
        core: &Core,
        pkg: &str,
        version: i64,
        root: &str,
        meta: &OfferMeta,
    ) -> impl Future<Output = Result<(), ReceiveError>> + Send;

    /// Takes the package out of service and returns the library objects freed; the core
    /// then forgets the package.
    fn remove(
        &self,
        core: &Core,
        pkg: &str,
        written_on_arrival: Vec<FileHash>,
    ) -> impl Future<Output = Result<Vec<FileHash>, ReceiveError>> + Send;

    /// The receiver's own view of a package, for the site's status report.
    fn status(&self, core: &Core, pkg: &str) -> impl Future<Output = Result<serde_json::Value, ReceiveError>> + Send;

    /// Checks the served content of a package against its manifest.
    fn validate(&self, core: &Core, pkg: &str) -> impl Future<Output = Result<ValidateResponse, ReceiveError>> + Send;

    /// Opens a served file for a client download.
    fn open_file(&self, pkg: &str, path: &RelPath) -> Result<ServedFile, ReceiveError>;

    /// The decoded manifest of the version being served, when it is `version`.
    fn live_manifest(&self, _pkg: &str, _version: i64) -> Option<Arc<Manifest>> {
        None
    }

    /// Registers this receiver's own series for one `/metrics` scrape. `registry` prefixes
    /// their names with `dpsync_agent_`.
    fn register_metrics(&self, _registry: &mut Registry) {}
}
