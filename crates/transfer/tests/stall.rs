//! Calls are given up when they stop making progress, never for taking long: a peer
//! that accepts and then says nothing, or stops reading a body, is given up after about
//! the stall time; a body that keeps moving, however slowly, is not cut. A probe (a
//! job's first call) has a deadline of its own, shorter than the stall time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dpsync_transfer::client::{TargetClient, TransferError};

const STALL: Duration = Duration::from_secs(1);

/// A peer on loopback that runs `each` on every connection it accepts (own thread).
fn peer(each: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || each(s));
        }
    });
    addr
}

fn client(addr: SocketAddr) -> TargetClient {
    TargetClient::new("dp1", &format!("http://{addr}"), None, None).unwrap().with_stall(STALL)
}

/// Reads a request head and `body` bytes of its body, `pause` between reads.
fn read_request(s: &mut TcpStream, body: usize, pause: Duration) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut b).is_ok() {
        head.push(b[0]);
    }
    let mut left = body;
    let mut buf = [0u8; 4096];
    while left > 0 {
        match s.read(&mut buf[..left.min(4096)]) {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n,
        }
        std::thread::sleep(pause);
    }
}

fn expect_timeout(r: Result<impl std::fmt::Debug, TransferError>, started: Instant, what: &str) -> String {
    let took = started.elapsed();
    match r {
        Err(TransferError::Timeout { message, .. }) => {
            assert!(took < STALL * 8, "{what}: given up only after {took:?}");
            message
        }
        other => panic!("{what}: {other:?} after {took:?}"),
    }
}

#[tokio::test]
async fn a_peer_that_says_nothing_is_given_up_after_the_stall_time() {
    let addr = peer(|mut s| {
        read_request(&mut s, 0, Duration::ZERO);
        std::thread::sleep(Duration::from_secs(30));
    });
    let started = Instant::now();
    let m = expect_timeout(client(addr).hello().await, started, "silent peer");
    assert!(m.contains("no answer"), "{m}");
}

#[tokio::test]
async fn a_peer_that_stops_reading_a_body_is_given_up() {
    let addr = peer(|mut s| {
        // Takes a little of the body, then neither reads nor answers.
        read_request(&mut s, 4096, Duration::ZERO);
        std::thread::sleep(Duration::from_secs(30));
    });
    let body = Bytes::from(vec![7u8; 64 << 20]);
    let started = Instant::now();
    let m = expect_timeout(client(addr).send_batch("PS100001", 1, body).await, started, "peer stopped reading");
    assert!(m.contains("no progress") && m.contains("bytes sent"), "{m}");
}

#[tokio::test]
async fn a_slow_body_that_keeps_moving_is_not_cut() {
    const LEN: usize = 96 << 10;
    let addr = peer(|mut s| {
        // About 4 s for the body at 24 KiB/s: four times the stall time.
        read_request(&mut s, LEN, Duration::from_millis(170));
        let answer = r#"{"accepted":0,"rejected":[]}"#;
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
    });
    let c = client(addr);
    let started = Instant::now();
    let r = c.send_batch("PS100001", 1, Bytes::from(vec![1u8; LEN])).await;
    assert!(r.is_ok(), "{r:?} after {:?}", started.elapsed());
    assert!(started.elapsed() > STALL * 2, "the body crossed in {:?}: not slow enough to test", started.elapsed());
    let rate = c.measured_rate().expect("a large request measures the link");
    assert!(rate < 200 << 10, "measured {rate} B/s on a link of about 24 KiB/s");
}

#[tokio::test]
async fn a_probe_is_given_up_after_its_own_deadline_however_long_the_stall_time() {
    let silent = peer(|s| {
        std::thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    // A stall time far beyond the probe's deadline: the deadline decides.
    let c = TargetClient::new("dp1", &format!("http://{silent}"), None, None).unwrap().with_stall(STALL * 60);
    let started = Instant::now();
    let r = c.probe_state("PS100001", Duration::from_millis(500)).await;
    let took = started.elapsed();
    match r {
        Err(e @ TransferError::Timeout { .. }) => {
            assert!(took < Duration::from_secs(3), "given up only after {took:?}");
            assert!(e.to_string().contains("no answer within 0.5 s"), "{e}");
            assert!(e.is_retryable(), "a target that hangs may come back: {e}");
        }
        other => panic!("{other:?} after {took:?}"),
    }
}
