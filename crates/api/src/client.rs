//! The admin client: HTTP/1.1 + JSON to a running server over its Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ErrorBody;

/// A failed admin call: the server's one-line reason, or why it could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    /// The server's status; `None` when no answer arrived.
    pub status: Option<StatusCode>,
    pub message: String,
}

impl CallError {
    fn local(message: String) -> Self {
        Self { status: None, message }
    }

    /// The server answered that what was asked for does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.status == Some(StatusCode::NOT_FOUND)
    }
}

/// A client of one server's admin socket. Each call opens its own connection.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, CallError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, CallError> {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CallError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CallError::local(format!("reading the server's answer: {e}")))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| CallError {
            status: Some(status),
            message: format!("the server's answer is not what this CLI expects ({e})"),
        })
    }

    /// POSTs `body` and copies the answer's body, as it arrives, into `out` (a large
    /// download such as a bundle; nothing is held in memory). Returns the bytes copied.
    pub async fn download<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<u64, CallError> {
        use tokio::io::AsyncWriteExt;
        let mut body_in = self.send(Method::POST, path, Some(body)).await?.into_body();
        let mut total = 0u64;
        while let Some(frame) = body_in.frame().await {
            let frame =
                frame.map_err(|e| CallError::local(format!("the server stopped sending ({e}); its log says why")))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).await.map_err(|e| CallError::local(format!("cannot write: {e}")))?;
                total += data.len() as u64;
            }
        }
        Ok(total)
    }

    /// Sends one request; an error answer becomes the server's one-line reason.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| {
            CallError::local(format!(
                "cannot reach the dpsync server at {} ({e}); is `dpsync server` running? \
                 Point at it with --socket PATH or --data-dir DIR (or DPSYNC_SOCKET / DPSYNC_DATA_DIR)",
                self.socket.display()
            ))
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| {
            CallError::local(format!("the dpsync server at {} did not answer: {e}", self.socket.display()))
        })?;
        tokio::spawn(conn);
        let body = match body {
            Some(b) => Bytes::from(
                serde_json::to_vec(b).map_err(|e| CallError::local(format!("cannot encode the request: {e}")))?,
            ),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| CallError::local(format!("invalid request {path}: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CallError::local(format!("the dpsync server closed the connection: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("server answered {status}: {}", String::from_utf8_lossy(&bytes)));
            return Err(CallError { status: Some(status), message });
        }
        Ok(resp)
    }
}
