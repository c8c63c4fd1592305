//! Accepting connections for the receiving service: an optional TLS handshake run off
//! the accept loop (so a slow client cannot stall it), a bound on the handshake time,
//! and a cap on concurrent connections (a permit travels with each connection).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Connections served at once; further clients wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 512;
/// A TLS handshake that takes longer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send a request's headers within this time (slowloris); idle
/// keep-alive connections are closed after it too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection holding its slot until dropped.
#[allow(missing_debug_implementations)]
pub struct Counted<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// An axum listener yielding ready connections of type `S`.
#[allow(missing_debug_implementations)]
pub struct BoundedListener<S> {
    rx: mpsc::Receiver<(Counted<S>, SocketAddr)>,
    local: SocketAddr,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> axum::serve::Listener for BoundedListener<S> {
    type Io = Counted<S>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended (shutdown): never yield again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

fn spawn_accept_loop<S, F, Fut>(tcp: TcpListener, prepare: F) -> io::Result<BoundedListener<S>>
where
    S: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<S>> + Send + 'static,
{
    let local = tcp.local_addr()?;
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let prepare = Arc::new(prepare);
    tokio::spawn(async move {
        // Ends (closing the socket) as soon as the server drops its end: a daemon run in
        // a process that goes on (a test) must not keep its port.
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = async {
                    let permit = slots.clone().acquire_owned().await.ok()?;
                    Some((permit, tcp.accept().await))
                } => accepted,
            };
            let Some((permit, accepted)) = accepted else { return };
            let (stream, addr) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (conn_tx, prepare) = (tx.clone(), prepare.clone());
            tokio::spawn(async move {
                if let Some(io) = prepare(stream).await {
                    let _ = conn_tx.send((Counted { inner: io, _permit: permit }, addr)).await;
                }
            });
        }
    });
    Ok(BoundedListener { rx, local })
}

/// Plain TCP (only with `--insecure-http`).
pub fn plain(tcp: TcpListener) -> io::Result<BoundedListener<TcpStream>> {
    spawn_accept_loop(tcp, |s| async move { Some(s) })
}

/// TLS with the given configuration.
pub fn tls(
    tcp: TcpListener,
    cfg: Arc<rustls::ServerConfig>,
) -> io::Result<BoundedListener<tokio_rustls::server::TlsStream<TcpStream>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    spawn_accept_loop(tcp, move |s| {
        let acceptor = acceptor.clone();
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(s)).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(e)) => {
                    tracing::debug!("TLS handshake failed: {e}");
                    None
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    None
                }
            }
        }
    })
}

/// Serves `app` on `tcp` (TLS when `tls_cfg` is given) until `shutdown` completes,
/// then lets requests in flight finish (at most 30 s).
pub async fn serve(
    tcp: TcpListener,
    app: axum::Router,
    tls_cfg: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    match tls_cfg {
        Some(cfg) => run(tls(tcp, cfg)?, app, shutdown).await,
        None => run(plain(tcp)?, app, shutdown).await,
    }
}

async fn run<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut listener: BoundedListener<S>,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use axum::serve::Listener;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            (io, _addr) = listener.accept() => {
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
    }
    Ok(())
}
