//! A site server and two DP agents in this one test process (as mini-redis tests its
//! server): each daemon is its library's `run` on listeners bound here (127.0.0.1:0 and a
//! Unix socket in a temporary folder, plain HTTP), stopped by completing the shutdown
//! future it was given. The site is driven through [`AdminClient`] on its admin socket,
//! as the CLI drives it.
//!
//! No process is started, so these tests need no built binary and show the daemons'
//! behaviour through their public API only.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use dpsync_agent::daemon::{Layered, Secret, layer, lock_data_dir};
use dpsync_agent::{AgentConfig, AgentSettings};
use dpsync_api::{
    AddPackage, AddTarget, AdminClient, DistributeReport, DistributeRequest, PackageInfo, RefreshReport,
    RefreshRequest, StatusReport, TargetInfo, TargetStatus,
};
use dpsync_site::{Listeners, ServerConfig, ServerSettings};
use dpsync_testkit::{gen_tree, http_get, poll_until_async, tree_digest, write_random_file};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest an admin call, a start or a stop may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest both DPs may take to install a version.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(60);
const DPS: [&str; 2] = ["dp1", "dp2"];
const BIG_FILE: &str = "big/payload.bin";
const BIG_FILE_BYTES: u64 = 3 << 20;

// ---------------------------------------------------------------------------------------
// Configurations: the only place that knows how they are built.

/// No configuration file and no environment: only the settings given here.
fn layered<T>(settings: T) -> Layered<T>
where
    T: clap::Args + clap::FromArgMatches + serde::Serialize + serde::de::DeserializeOwned,
{
    layer(None, std::iter::empty::<(String, String)>(), &settings).expect("settings")
}

fn server_config(data_dir: &Path) -> ServerConfig {
    ServerConfig::resolve(layered(ServerSettings {
        data_dir: Some(data_dir.to_owned()),
        site_code: Some("PS1".into()),
        // A DP that refuses content fails within a second instead of after minutes.
        retries: Some(2),
        retry_delay_ms: Some(250),
        ..ServerSettings::default()
    }))
    .expect("server configuration")
}

fn agent_config(data_dir: &Path, listen: SocketAddr, token: &str) -> AgentConfig {
    AgentConfig::resolve(layered(AgentSettings {
        data_dir: Some(data_dir.to_owned()),
        listen: Some(listen.to_string()),
        token: Some(Secret::from(token.to_owned())),
        insecure_http: Some(true),
        ..AgentSettings::default()
    }))
    .expect("agent configuration")
}

// ---------------------------------------------------------------------------------------
// Daemons in this process

/// A daemon's `run` future on a task, with the sender that completes its shutdown future.
#[derive(Debug)]
struct Running {
    name: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
    /// The data directory's lock, held as the binary holds it.
    _lock: std::fs::File,
}

impl Running {
    fn spawn<F>(name: &str, lock: std::fs::File, run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        let what = name.to_owned();
        let running = run(stopped);
        let task = tokio::spawn(async move {
            let r = running.await;
            if let Err(e) = &r {
                eprintln!("{what}: run ended with an error: {e:#}");
            }
            r
        });
        Self { name: name.to_owned(), stop, task, _lock: lock }
    }

    /// Completes its shutdown future; asserts that `run` then returns `Ok` in time.
    async fn shut_down(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(STEP_TIMEOUT, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("{}: run ended with an error: {e:#}", self.name),
            Ok(Err(e)) => panic!("{}: its task failed: {e}", self.name),
            Err(_) => panic!("{}: run did not return within {STEP_TIMEOUT:?} of its shutdown", self.name),
        }
    }
}

/// The shutdown future `run` gets: completes when the test sends (or drops the sender).
async fn shutdown_on(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

async fn start_site(data_dir: &Path) -> (Running, AdminClient) {
    let cfg = server_config(data_dir);
    std::fs::create_dir_all(&cfg.data_dir).expect("create the site's data directory");
    let lock = lock_data_dir(&cfg.data_dir).expect("lock the site's data directory");
    let listeners = Listeners::bind(&cfg).await.expect("bind the admin socket");
    let client = AdminClient::new(cfg.socket.clone());
    let site = Running::spawn("site", lock, |stopped| dpsync_site::run(listeners, cfg, shutdown_on(stopped)));
    (site, client)
}

/// A DP agent of this test: where it lives and listens, and its `run` while it runs.
#[derive(Debug)]
struct Dp {
    name: &'static str,
    data_dir: PathBuf,
    token: String,
    addr: SocketAddr,
    running: Option<Running>,
}

impl Dp {
    /// Starts on 127.0.0.1, on port 0 at first, then on the same address again.
    async fn start(name: &'static str, data_dir: PathBuf, addr: Option<SocketAddr>) -> Self {
        let token = format!("token-of-{name}");
        let listener = TcpListener::bind(addr.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()))
            .await
            .unwrap_or_else(|e| panic!("{name}: cannot bind {addr:?}: {e}"));
        let addr = listener.local_addr().expect("bound address");
        let cfg = agent_config(&data_dir, addr, &token);
        std::fs::create_dir_all(&data_dir).expect("create the agent's data directory");
        let lock = lock_data_dir(&data_dir).expect("lock the agent's data directory");
        let running = Running::spawn(name, lock, |stopped| dpsync_agent::run(listener, cfg, shutdown_on(stopped)));
        Self { name, data_dir, token, addr, running: Some(running) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The live tree of `pkg`.
    fn current(&self, pkg: &str) -> PathBuf {
        self.data_dir.join("packages").join(pkg).join("current")
    }

    async fn shut_down(&mut self) {
        self.running.take().expect("running").shut_down().await;
    }

    /// Starts it again (after [`Dp::shut_down`]) on the same data directory and address.
    async fn restart(&mut self) {
        assert!(self.running.is_none(), "{} is still running", self.name);
        *self = Dp::start(self.name, self.data_dir.clone(), Some(self.addr)).await;
    }
}

// ---------------------------------------------------------------------------------------
// A site with two DPs and one package

/// A temporary folder holding a source tree, a site's and two DPs' data directories, all
/// running in this process, with the package added and distributed to both DPs.
struct Cluster {
    site: Option<Running>,
    client: AdminClient,
    dps: Vec<Dp>,
    pkg: String,
    src: PathBuf,
    /// Last, so that it is removed after everything above is dropped.
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(seed: u64) -> Self {
        dpsync_transfer::trust::install_crypto_provider();
        // Under /tmp: the admin socket's path must stay within 107 bytes.
        let dir = tempfile::Builder::new().prefix("dps").tempdir_in("/tmp").expect("temporary folder");
        let src = dir.path().join("src");
        gen_tree(&src, 40, seed, 0..64 << 10);
        write_random_file(&src.join(BIG_FILE), BIG_FILE_BYTES, seed + 1);

        let (site, client) = start_site(&dir.path().join("site")).await;
        let mut dps = Vec::new();
        for name in DPS {
            dps.push(Dp::start(name, dir.path().join(name), None).await);
        }
        let mut c = Self { site: Some(site), client, dps, pkg: String::new(), src, dir };
        let add = AddPackage { name: "sample".into(), source: c.src.display().to_string() };
        let p: PackageInfo = c.call("package add", c.client.post("/v1/packages", &add)).await;
        c.pkg = p.id;
        for dp in &c.dps {
            let add = AddTarget {
                name: dp.name.into(),
                kind: "dp".into(),
                url: dp.url(),
                token: Some(dp.token.clone()),
                group: None,
                rate_limit: None,
                fingerprint: None,
                windows: vec![],
                validate_every_ms: None,
                pull_sources: vec![],
            };
            let _: TargetInfo = c.call("dp add", c.client.post("/v1/targets", &add)).await;
        }
        let req = DistributeRequest { dps: DPS.iter().map(|d| d.to_string()).collect(), ..Default::default() };
        let path = format!("/v1/packages/{}/distribute", c.pkg);
        let d: DistributeReport = c.call("distribute", c.client.post(&path, &req)).await;
        assert_eq!(d.targets.len(), 2, "{d:?}");
        c
    }

    /// An admin call, bounded, panicking with its error.
    async fn call<T, E: std::fmt::Display>(&self, what: &str, fut: impl Future<Output = Result<T, E>>) -> T {
        match tokio::time::timeout(STEP_TIMEOUT, fut).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("`{what}` failed: {e}"),
            Err(_) => panic!("`{what}` got no answer within {STEP_TIMEOUT:?}"),
        }
    }

    async fn refresh(&self) -> RefreshReport {
        let path = format!("/v1/packages/{}/refresh", self.pkg);
        self.call("refresh", self.client.post(&path, &RefreshRequest::default())).await
    }

    async fn status(&self) -> StatusReport {
        self.call("status", self.client.get(&format!("/v1/packages/{}/status", self.pkg))).await
    }

    /// Polls the status until both DPs have installed `version`; fails at once if a
    /// target fails.
    async fn wait_installed(&self, version: i64) -> StatusReport {
        let installed = |t: &TargetStatus| t.state == "installed" && t.installed_version == Some(version);
        let found = poll_until_async(INSTALL_TIMEOUT, || async {
            let s = self.status().await;
            if let Some(t) = s.targets.iter().find(|t| t.state == "failed") {
                panic!("{} failed to install version {version}: {:?}", t.name, t.last_error);
            }
            (s.targets.len() == DPS.len() && s.targets.iter().all(installed)).then_some(s)
        })
        .await;
        match found {
            Some(s) => s,
            None => panic!(
                "both DPs did not install version {version} within {INSTALL_TIMEOUT:?}: {:#?}",
                self.status().await
            ),
        }
    }

    /// Refreshes and waits until both DPs hold the new version.
    async fn refresh_and_install(&self) -> (RefreshReport, StatusReport) {
        let r = self.refresh().await;
        let s = self.wait_installed(r.source_version).await;
        (r, s)
    }

    fn assert_dps_hold_the_source(&self) {
        let source = tree_digest(&self.src);
        for dp in &self.dps {
            let d = tree_digest(&dp.current(&self.pkg)).diff(&source);
            assert!(d.is_empty(), "{}'s live tree differs from the source:\n{d}", dp.name);
        }
    }

    /// Shuts every daemon down through its shutdown future, asserting each `run` returns
    /// `Ok`.
    async fn shut_down(&mut self) {
        for dp in &mut self.dps {
            if dp.running.is_some() {
                dp.shut_down().await;
            }
        }
        if let Some(site) = self.site.take() {
            site.shut_down().await;
        }
    }
}

fn sent_last(s: &StatusReport) -> Vec<(String, i64)> {
    s.targets.iter().map(|t| (t.name.clone(), t.bytes_sent_last)).collect()
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_agents_install_a_tree_identical_to_the_source() {
    let mut c = Cluster::start(1).await;
    let (r, status) = c.refresh_and_install().await;
    assert_eq!(r.source_version, 1);
    assert_eq!(r.files_added, 41, "{r:?}");
    c.assert_dps_hold_the_source();
    for (name, sent) in sent_last(&status) {
        assert!(sent > 0, "{name} was sent the package: {status:#?}");
    }

    // A change reaches both, and the trees follow it.
    write_random_file(&c.src.join("new/added.bin"), 70_000, 99);
    std::fs::remove_file(c.src.join(BIG_FILE)).expect("remove a file");
    let (r, _) = c.refresh_and_install().await;
    assert_eq!((r.source_version, r.files_added, r.files_removed), (2, 1, 1), "{r:?}");
    c.assert_dps_hold_the_source();
    c.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_refresh_sends_almost_nothing() {
    let mut c = Cluster::start(2).await;
    let (_, first) = c.refresh_and_install().await;
    for (name, sent) in sent_last(&first) {
        assert!(sent > (BIG_FILE_BYTES / 2) as i64, "{name} was sent the package ({sent} bytes)");
    }
    let (r, again) = c.refresh_and_install().await;
    assert_eq!(r.source_version, 2);
    assert!(!r.content_changed, "nothing changed: {r:?}");
    for (name, sent) in sent_last(&again) {
        assert!((0..16 << 10).contains(&sent), "an unchanged refresh sent {sent} bytes to {name}");
    }
    c.assert_dps_hold_the_source();
    c.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_stop_on_their_shutdown_future_and_a_restarted_agent_still_serves() {
    let mut c = Cluster::start(3).await;
    c.refresh_and_install().await;
    let socket = c.client.socket().to_owned();
    // Each `run` returns Ok once its shutdown future completes.
    c.shut_down().await;
    assert!(!socket.exists(), "the site removed its admin socket at shutdown");

    // dp1 again, on the same data directory and address (`run` released its port when it
    // returned): it serves the package at once.
    c.dps[0].restart().await;
    let (addr, pkg, want) =
        (c.dps[0].addr, c.pkg.clone(), std::fs::read(c.src.join(BIG_FILE)).expect("read the source"));
    // Its listener is bound before `run` opens anything: the request waits, it is not refused.
    let get = move || http_get(addr, &format!("/v1/packages/{pkg}/files/{BIG_FILE}"), &[]);
    let got = tokio::task::spawn_blocking(get).await.expect("download task");
    assert_eq!(got.status, 200, "the restarted agent serves the package: {}", got.body_text());
    assert!(got.body == want, "the restarted agent served other bytes for {BIG_FILE}");

    // And it still takes new versions: the site again, a change, both DPs (dp2 restarted
    // too) install it.
    let (site, client) = start_site(&c.dir.path().join("site")).await;
    c.site = Some(site);
    c.client = client;
    c.dps[1].restart().await;
    write_random_file(&c.src.join("after-restart.bin"), 50_000, 7);
    let (r, _) = c.refresh_and_install().await;
    assert_eq!(r.source_version, 2);
    c.assert_dps_hold_the_source();
    c.shut_down().await;
}
