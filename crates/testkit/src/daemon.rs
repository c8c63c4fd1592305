//! A daemon guard: a child process whose output goes to a log file, stopped and reaped
//! whatever happens to its owner (an error, a panic, an early return).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::wait::poll_until;

/// Lines of a daemon's log shown when its owner panics.
pub const LOG_TAIL_LINES: usize = 40;

/// A long-running child process whose stdout and stderr are appended to a log file.
/// Dropping it kills it (SIGKILL) and reaps it; if the thread is panicking, the tail of
/// its log is printed first.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

/// How [`Daemon::terminate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// It exited after SIGTERM.
    Exited(ExitStatus),
    /// It had exited before it was asked to.
    AlreadyExited(ExitStatus),
    /// It did not exit within the time given after SIGTERM (or could not be signalled),
    /// and was killed.
    Killed { after: Duration },
}

impl Stop {
    /// Exited with status 0 after SIGTERM.
    pub fn is_clean(&self) -> bool {
        matches!(self, Stop::Exited(s) if s.success())
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Exited(s) if s.success() => write!(f, "stopped"),
            Stop::Exited(s) => write!(f, "stopped with {s}"),
            Stop::AlreadyExited(s) => write!(f, "had already exited ({s})"),
            Stop::Killed { after } => write!(f, "did not stop within {after:?} of SIGTERM; killed"),
        }
    }
}

/// Why [`Daemon::wait_ready`] gave up.
#[derive(Debug, Clone)]
pub struct NotReady {
    /// The daemon's name.
    pub name: String,
    /// What was waited for.
    pub what: String,
    /// `Some` if the daemon exited; `None` if the time ran out.
    pub exited: Option<ExitStatus>,
    pub timeout: Duration,
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.exited {
            Some(s) => write!(f, "{} exited ({s}) before {}", self.name, self.what),
            None => write!(f, "timed out after {:?} waiting for {} ({})", self.timeout, self.what, self.name),
        }
    }
}

impl std::error::Error for NotReady {}

impl Daemon {
    /// Spawns `cmd` (stdin from `/dev/null`) with its output appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> io::Result<Self> {
        let named = |what: &str| {
            let what = what.to_owned();
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(named(&format!("cannot open the log {}", log_path.display())))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(named(&format!("cannot start {name} ({})", cmd.get_program().to_string_lossy())))?;
        Ok(Self { name: name.to_owned(), child, log_path: log_path.to_owned(), status: None })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The log's last line, or a note that it is empty: for one-line errors.
    pub fn last_line(&self) -> String {
        let line = self.log_tail(1);
        if line.is_empty() { "(its log is empty)".into() } else { line }
    }

    /// The exit status, once it has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`); nothing if it has already exited.
    pub fn signal(&mut self, sig: i32) -> io::Result<()> {
        if self.try_wait().is_some() {
            return Ok(());
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory effects. The child has not been reaped (checked
        // just above), so its pid still names it and cannot have been reused.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// SIGKILL, then reap; its exit status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// Waits for the process to exit by itself, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.try_wait())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Stop {
        if let Some(s) = self.try_wait() {
            return Stop::AlreadyExited(s);
        }
        if self.signal(libc::SIGTERM).is_ok()
            && let Some(s) = self.wait_exit(timeout)
        {
            return Stop::Exited(s);
        }
        self.kill();
        Stop::Killed { after: timeout }
    }

    /// Polls `probe` until it returns `Some` (a daemon answering, a file it writes when
    /// ready); gives up when the daemon exits or after `timeout`. `what` names the wait
    /// in the error ("it was ready", "logging \"refresh started\"").
    pub fn wait_ready<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> Result<T, NotReady> {
        let mut exited = None;
        let found = poll_until(timeout, || {
            if let Some(v) = probe() {
                return Some(Some(v));
            }
            exited = self.try_wait();
            exited.map(|_| None)
        });
        match found {
            Some(Some(v)) => Ok(v),
            _ => Err(NotReady { name: self.name.clone(), what: what.to_owned(), exited, timeout }),
        }
    }

    /// Waits until the log holds `needle` at least `n` times.
    pub fn wait_for_log_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<(), NotReady> {
        let log_path = self.log_path.clone();
        let what = if n == 1 { format!("logging {needle:?}") } else { format!("logging {needle:?} {n} times") };
        self.wait_ready(&what, timeout, || {
            let log = fs::read(&log_path).unwrap_or_default();
            (String::from_utf8_lossy(&log).matches(needle).count() >= n).then_some(())
        })
    }

    /// [`Daemon::wait_ready`] with an async probe, sleeping on the tokio timer.
    #[cfg(feature = "tokio")]
    pub async fn wait_ready_async<T, F>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> F,
    ) -> Result<T, NotReady>
    where
        F: std::future::Future<Output = Option<T>>,
    {
        let found = crate::wait::poll_until_async(timeout, || {
            let status = self.try_wait();
            let ready = probe();
            async move {
                if let Some(v) = ready.await {
                    return Some(Ok(v));
                }
                status.map(Err)
            }
        })
        .await;
        match found {
            Some(Ok(v)) => Ok(v),
            other => {
                let exited = other.and_then(Result::err);
                Err(NotReady { name: self.name.clone(), what: what.to_owned(), exited, timeout })
            }
        }
    }

    /// [`Daemon::terminate`] sleeping on the tokio timer instead of blocking a thread.
    #[cfg(feature = "tokio")]
    pub async fn terminate_async(&mut self, timeout: Duration) -> Stop {
        if let Some(s) = self.try_wait() {
            return Stop::AlreadyExited(s);
        }
        if self.signal(libc::SIGTERM).is_ok()
            && let Some(s) = crate::wait::poll_until_async(timeout, || std::future::ready(self.try_wait())).await
        {
            return Stop::Exited(s);
        }
        self.kill();
        Stop::Killed { after: timeout }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last {LOG_TAIL_LINES} lines of {} ({})\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dpsync-testkit-{name}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_daemon_is_stopped_by_sigterm_and_logs_to_its_file() {
        let d = dir("term");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.01; done"]);
        let mut daemon = Daemon::spawn("shell", cmd, &d.join("shell.log")).unwrap();
        daemon.wait_for_log_count("ready", 1, Duration::from_secs(10)).unwrap();
        assert!(daemon.is_running());
        let stop = daemon.terminate(Duration::from_secs(10));
        assert!(stop.is_clean(), "{stop}");
        assert!(daemon.log().contains("bye"), "{}", daemon.log());
        assert_eq!(daemon.terminate(Duration::from_secs(1)), Stop::AlreadyExited(stop_status(stop)));
        fs::remove_dir_all(&d).unwrap();
    }

    fn stop_status(s: Stop) -> ExitStatus {
        match s {
            Stop::Exited(s) | Stop::AlreadyExited(s) => s,
            Stop::Killed { .. } => panic!("killed"),
        }
    }

    #[test]
    fn waiting_for_a_daemon_that_exits_says_so() {
        let d = dir("exit");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo failing; exit 3"]);
        let mut daemon = Daemon::spawn("quitter", cmd, &d.join("q.log")).unwrap();
        let e = daemon.wait_ready("it was ready", Duration::from_secs(10), || None::<()>).unwrap_err();
        assert_eq!(e.exited.and_then(|s| s.code()), Some(3), "{e}");
        assert!(e.to_string().starts_with("quitter exited"), "{e}");
        assert_eq!(daemon.last_line(), "failing");
        fs::remove_dir_all(&d).unwrap();
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_waits_see_readiness_exits_and_stops() {
        let d = dir("async");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap 'exit 0' TERM; echo 42 > ready; while :; do sleep 0.01; done"]);
        cmd.current_dir(&d);
        let mut daemon = Daemon::spawn("async shell", cmd, &d.join("a.log")).unwrap();
        let ready = d.join("ready");
        let probe = || std::future::ready(crate::file_text(&ready));
        assert_eq!(daemon.wait_ready_async("ready", Duration::from_secs(10), probe).await.unwrap(), "42");
        assert!(daemon.terminate_async(Duration::from_secs(10)).await.is_clean());
        let never = || std::future::ready(None::<()>);
        let e = daemon.wait_ready_async("anything", Duration::from_secs(10), never).await.unwrap_err();
        assert!(e.exited.is_some(), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dropping_a_daemon_kills_it() {
        let d = dir("drop");
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let daemon = Daemon::spawn("sleeper", cmd, &d.join("s.log")).unwrap();
        let pid = daemon.pid() as libc::pid_t;
        drop(daemon);
        // Reaped, so the pid no longer names a process of ours.
        #[allow(unsafe_code)]
        // SAFETY: kill(2) with signal 0 only checks the pid.
        let rc = unsafe { libc::kill(pid, 0) };
        assert_eq!(rc, -1);
        fs::remove_dir_all(&d).unwrap();
    }
}
