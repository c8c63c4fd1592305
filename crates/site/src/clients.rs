//! One client per target, reused by every job and admin call to it: its connections
//! (and TLS sessions) outlive a job, and a pinned certificate is configured once. Targets
//! without a pin share one HTTP client underneath (connections pooled by address), so
//! thousands of targets do not each read the system's certificate authorities or keep a
//! pool. A client is replaced when the target's connection settings change.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dpsync_store::Target;
use dpsync_transfer::client::{HttpClient, TargetClient, TransferError};

/// A digest of what a client is built from: name, URL, token and pinned fingerprint.
type Settings = [u8; 32];

/// The clients of the targets, by target id.
pub(crate) struct Clients {
    by_target: Mutex<HashMap<i64, (Settings, TargetClient)>>,
    /// For a target with several addresses (a child site run by several nodes): which
    /// one is used now, by target id.
    address: Mutex<HashMap<i64, usize>>,
    /// Clients built so far (a cache miss or changed settings).
    built: AtomicU64,
    /// How long a call may make no progress (see [`TargetClient`]).
    stall: Duration,
    /// The HTTP client of the targets without a pinned certificate (one connection pool
    /// by address, so the site's memory does not grow a client per target).
    shared: Mutex<Option<HttpClient>>,
}

impl Default for Clients {
    fn default() -> Self {
        Self::new(dpsync_transfer::client::DEFAULT_STALL)
    }
}

impl std::fmt::Debug for Clients {
    // A client holds its target's token: show the ids only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<i64> = self.by_target.lock().unwrap().keys().copied().collect();
        f.debug_struct("Clients").field("targets", &ids).finish()
    }
}

impl Clients {
    pub(crate) fn new(stall: Duration) -> Self {
        Self {
            by_target: Mutex::default(),
            address: Mutex::default(),
            built: AtomicU64::new(0),
            stall,
            shared: Mutex::default(),
        }
    }

    /// The HTTP client every target without a pinned certificate shares, built once.
    fn shared(&self) -> Result<HttpClient, TransferError> {
        let mut shared = self.shared.lock().unwrap();
        if let Some(http) = shared.as_ref() {
            return Ok(http.clone());
        }
        let http = HttpClient::new(None)
            .map_err(|message| TransferError::Client { target: "(every target)".into(), message })?;
        *shared = Some(http.clone());
        Ok(http)
    }

    /// The client of `target` as it is configured now (the caller has just read it from
    /// the store): the cached one while its settings are unchanged, else a new one.
    pub(crate) fn get(&self, target: &Target) -> Result<TargetClient, TransferError> {
        let urls: Vec<&str> = target.url.split_whitespace().collect();
        let index = self.address.lock().unwrap().get(&target.id).copied().unwrap_or(0) % urls.len().max(1);
        let url = urls.get(index).copied().unwrap_or(target.url.as_str());
        let mut settings = settings_of(target);
        settings[0] ^= index as u8;
        // The rate is set by the job that sends, when it asks whether a window is open
        // (`Site::window_gate`): the target's limit, or a window's own rate.
        if let Some((s, client)) = self.by_target.lock().unwrap().get(&target.id)
            && *s == settings
        {
            return Ok(client.clone());
        }
        // Built outside the lock (it reads the system's root certificates). Two jobs that
        // race here each build one, but only the first is kept and both use it: a target
        // has one client, so one pacer for its rate limit and one measured rate.
        let built = match target.fingerprint.as_deref() {
            Some(fp) => TargetClient::new(&target.name, url, target.token.clone(), Some(fp))?,
            None => TargetClient::with_http(&self.shared()?, &target.name, url, target.token.clone()),
        }
        .with_stall(self.stall);
        let mut by_target = self.by_target.lock().unwrap();
        if let Some((s, client)) = by_target.get(&target.id)
            && *s == settings
        {
            return Ok(client.clone());
        }
        self.built.fetch_add(1, Ordering::Relaxed);
        by_target.insert(target.id, (settings, built.clone()));
        Ok(built)
    }
}

impl Clients {
    /// After `target` did not answer at its current address: uses its next one from now
    /// on and returns it, or `None` when it has one address only.
    pub(crate) fn fail_over(&self, target: &Target) -> Option<String> {
        let urls: Vec<&str> = target.url.split_whitespace().collect();
        if urls.len() < 2 {
            return None;
        }
        let mut address = self.address.lock().unwrap();
        let next = (address.get(&target.id).copied().unwrap_or(0) + 1) % urls.len();
        address.insert(target.id, next);
        Some(urls[next].to_owned())
    }

    /// Drops the client of a target that was removed.
    pub(crate) fn forget(&self, target_id: i64) {
        self.by_target.lock().unwrap().remove(&target_id);
    }
}

fn settings_of(t: &Target) -> Settings {
    let mut h = blake3::Hasher::new();
    for field in [Some(t.name.as_str()), Some(t.url.as_str()), t.token.as_deref(), t.fingerprint.as_deref()] {
        match field {
            Some(v) => {
                h.update(&[1]);
                h.update(&(v.len() as u64).to_le_bytes());
                h.update(v.as_bytes());
            }
            None => {
                h.update(&[0]);
            }
        }
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use dpsync_store::TargetKind;

    use super::*;

    fn dp(id: i64) -> Target {
        Target {
            id,
            name: format!("dp{id}"),
            kind: TargetKind::Dp,
            url: "http://127.0.0.1:8080".into(),
            token: Some("secret".into()),
            group: None,
            rate_limit: None,
            created_at: 0,
            fingerprint: None,
            windows: None,
            validate_every_ms: None,
            pull_sources: None,
        }
    }

    #[test]
    fn a_client_is_reused_until_its_connection_settings_change() {
        let clients = Clients::default();
        let built = || clients.built.load(Ordering::Relaxed);
        let mut t = dp(1);
        clients.get(&t).unwrap();
        clients.get(&t).unwrap();
        assert_eq!(built(), 1, "same settings, same client");
        clients.get(&dp(2)).unwrap();
        assert_eq!(built(), 2, "one client per target");
        // Settings that are not about the connection keep the client.
        t.rate_limit = Some(1 << 20);
        t.group = Some("north".into());
        clients.get(&t).unwrap();
        assert_eq!(built(), 2);
        let changes: [fn(&mut Target); 5] = [
            |t| t.token = Some("rotated".into()),
            |t| t.token = None,
            |t| t.url = "http://127.0.0.1:9090".into(),
            |t| t.fingerprint = Some("ab".repeat(32)),
            |t| t.name = "renamed".into(),
        ];
        for (i, change) in changes.iter().enumerate() {
            change(&mut t);
            clients.get(&t).unwrap();
            clients.get(&t).unwrap();
            assert_eq!(built(), 3 + i as u64, "change {i} builds one new client");
        }
        assert!(!format!("{clients:?}").contains("secret"), "{clients:?}");
    }

    #[test]
    fn fields_do_not_run_into_each_other() {
        let mut a = dp(1);
        let mut b = dp(1);
        (a.token, a.fingerprint) = (Some("x".into()), None);
        (b.token, b.fingerprint) = (None, Some("x".into()));
        assert_ne!(settings_of(&a), settings_of(&b));
    }
}
