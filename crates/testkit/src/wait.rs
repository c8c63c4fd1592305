//! Bounded waits: poll a condition until it holds or a deadline passes. Never a fixed
//! sleep: a wait ends as soon as its condition holds.

use std::path::Path;
use std::time::{Duration, Instant};

/// How often [`poll_until`] probes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Calls `probe` every [`POLL_INTERVAL`] until it returns `Some` (its value), at most
/// `timeout` (`None`). `probe` runs at least once, even with a zero timeout.
pub fn poll_until<T>(timeout: Duration, probe: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every(POLL_INTERVAL, timeout, probe)
}

/// [`poll_until`] with another interval, for probes that cost something (a CLI run).
pub fn poll_every<T>(interval: Duration, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// [`poll_until`] for async probes (an admin call), sleeping on the tokio timer.
#[cfg(feature = "tokio")]
pub async fn poll_until_async<T, F>(timeout: Duration, mut probe: impl FnMut() -> F) -> Option<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

/// The trimmed text of a file a daemon writes when it is ready (`listen.addr`,
/// `tls/fingerprint`), or `None` while it is missing, empty or unreadable: a probe for
/// [`poll_until`] or [`Daemon::wait_ready`](crate::Daemon::wait_ready).
pub fn file_text(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_until_the_probe_holds_or_the_deadline() {
        let mut n = 0;
        assert_eq!(
            poll_until(Duration::from_secs(10), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
        let started = Instant::now();
        assert_eq!(poll_until(Duration::from_millis(30), || None::<()>), None);
        assert!(started.elapsed() >= Duration::from_millis(30));
        let mut probed = false;
        assert_eq!(
            poll_until(Duration::ZERO, || {
                probed = true;
                None::<()>
            }),
            None
        );
        assert!(probed, "probed once even with no time");
    }

    #[test]
    fn file_text_waits_for_content() {
        let dir = std::env::temp_dir().join(format!("dpsync-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("listen.addr");
        assert_eq!(file_text(&f), None);
        std::fs::write(&f, "  \n").unwrap();
        assert_eq!(file_text(&f), None);
        std::fs::write(&f, "127.0.0.1:1234\n").unwrap();
        assert_eq!(file_text(&f).as_deref(), Some("127.0.0.1:1234"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
