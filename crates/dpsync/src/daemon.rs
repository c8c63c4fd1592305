//! Starting the daemons: the binary creates and locks the data directory, binds the
//! listeners, turns SIGINT/SIGTERM into the shutdown future, and hands them to the
//! library's `run`. Under systemd (`Type=notify`, `NOTIFY_SOCKET` set) it reports
//! `READY=1` once the daemon serves and `STOPPING=1` when a signal stops it; without
//! `NOTIFY_SOCKET` both are no-ops.

use anyhow::{Context, Result};
use dpsync_agent::AgentConfig;
use dpsync_agent::daemon::{lock_data_dir, secure_data_dir};
use dpsync_site::{Listeners, ServerConfig};

/// Runs `dpsync server` until SIGINT/SIGTERM.
pub async fn server(cfg: ServerConfig) -> Result<()> {
    secure_data_dir(&cfg.data_dir)?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let listeners = Listeners::bind(&cfg).await?;
    dpsync_site::run_with_ready(listeners, cfg, signalled(), ready).await
}

/// Runs `dpsync agent` until SIGINT/SIGTERM.
pub async fn agent(cfg: AgentConfig) -> Result<()> {
    secure_data_dir(&cfg.data_dir)?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}; is the port taken or the address wrong?", cfg.listen))?;
    dpsync_agent::run_with_ready(listener, cfg, signalled(), ready).await
}

/// Completes on the first SIGTERM or SIGINT.
fn signalled() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (Ok(mut term), Ok(mut int)) = (term, int) else {
            tracing::error!("cannot listen for SIGTERM/SIGINT; stop this process with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        notify(sd_notify::NotifyState::Stopping);
    }
}

/// Tells the service manager the daemon serves.
fn ready() {
    notify(sd_notify::NotifyState::Ready);
}

fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}
