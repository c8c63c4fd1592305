//! What the benchmark binaries share: errors as strings, spawned daemons that are
//! stopped on drop, waiting with a deadline, and GET on a server's admin socket.
#![allow(unsafe_code)] // libc::kill of a child daemon.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub type Res<T> = Result<T, String>;

/// Turns an error into a string naming its context.
pub fn err<E: std::fmt::Display>(ctx: impl std::fmt::Display) -> impl FnOnce(E) -> String {
    move |e| format!("{ctx}: {e}")
}

/// A daemon of the benchmark, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// `dpsync agent` on a loopback port of its own, plain HTTP, data in `dir`.
    pub fn spawn_agent(name: &str, prog: &Path, dir: &Path, log: &Path, env: &[(&str, &str)]) -> Res<Self> {
        let d = dir.to_str().ok_or("non-UTF-8 path")?;
        Self::spawn(name, prog, &["agent", "--data-dir", d, "--listen", "127.0.0.1:0", "--insecure-http"], log, env)
    }

    pub fn spawn(name: &str, prog: &Path, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Res<Self> {
        let out = File::create(log).map_err(err(log.display()))?;
        let out2 = out.try_clone().map_err(err(log.display()))?;
        let mut cmd = Command::new(prog);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(out2);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(err(format!("starting {name} ({})", prog.display())))?;
        Ok(Daemon { name: name.into(), child: Some(child), log: log.to_owned() })
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }
    pub fn alive(&mut self) -> Res<()> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            let tail = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            return Err(format!(
                "{} exited ({st}); log:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it says yes, or fails after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Res<bool>) -> Res<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` on the admin socket (HTTP/1.0, so the answer ends with the connection).
pub fn admin_get(sock: &Path, path: &str) -> Res<Value> {
    let mut s = UnixStream::connect(sock).map_err(err(sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(err("socket"))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\n\r\n").map_err(err("admin"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(err("admin"))?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("admin: no header end")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
    let mut body = buf[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        return Err(format!("admin GET {path}: {status} {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(err(format!("admin GET {path}")))
}

pub fn dechunk(mut b: &[u8]) -> Res<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunked body")?;
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).split(';').next().unwrap_or("").trim(), 16)
            .map_err(err("chunk size"))?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(eol + 2..eol + 2 + n).ok_or("truncated chunk")?);
        b = b.get(eol + 4 + n..).ok_or("truncated chunk")?;
    }
}
