//! Fault-injecting TCP proxy for the end-to-end tests.
//!
//! A [`Proxy`] listens on `127.0.0.1:0` and forwards every accepted connection
//! to one upstream address (normally the site server), so an agent pointed at
//! [`Proxy::url`] talks to the server through it. Tests use it to measure
//! traffic ([`Proxy::bytes_up`], [`Proxy::bytes_down`]) and to inject faults
//! at run time: flip one byte of the client→upstream stream, corrupt a
//! `/chunks` request body, refuse connections (dead peer), cut all live
//! connections, or add latency to every read.
//!
//! "Up" is client→upstream, "down" is upstream→client. Plain std threads: one
//! accept thread plus two pump threads per connection. Workers never panic on
//! I/O errors, every pump ends when its connection ends, and dropping the
//! proxy stops the accept loop and closes all live connections.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// [`Proxy::corrupt_in_body_once`] only flips bytes at or beyond this offset
/// into a single connection's client→upstream stream.
pub const BODY_FAULT_MIN_OFFSET: u64 = 64 * 1024;
const BUF_SIZE: usize = 16 * 1024;
const MAX_LINE: usize = 16 * 1024;

#[derive(Debug)]
struct Shared {
    stopping: AtomicBool,
    refuse: AtomicBool,
    delay_ms: AtomicU64,
    /// Bytes per second each direction may carry, over all connections (0 = no limit).
    rate: AtomicU64,
    /// (Since when, bytes forwarded since) per direction, for `rate`.
    paced: [Mutex<(Instant, u64)>; 2],
    /// While set, nothing is forwarded (connections stay open): a peer that hangs.
    stalled: AtomicBool,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    faults: AtomicU64,
    /// Up-stream bytes still to pass before the byte `flip_byte_after` flips.
    flip_after: Mutex<Option<u64>>,
    /// Down-stream bytes still to pass before the byte `flip_down_byte_after` flips.
    flip_down_after: Mutex<Option<u64>>,
    body_fault_armed: AtomicBool,
    /// Live connections (id -> client, upstream clones), for `cut_all`.
    live: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    /// Pump threads still running.
    pumps: AtomicUsize,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            stopping: AtomicBool::default(),
            refuse: AtomicBool::default(),
            delay_ms: AtomicU64::default(),
            rate: AtomicU64::default(),
            paced: [Mutex::new((Instant::now(), 0)), Mutex::new((Instant::now(), 0))],
            stalled: AtomicBool::default(),
            bytes_up: AtomicU64::default(),
            bytes_down: AtomicU64::default(),
            faults: AtomicU64::default(),
            flip_after: Mutex::default(),
            flip_down_after: Mutex::default(),
            body_fault_armed: AtomicBool::default(),
            live: Mutex::default(),
            next_id: AtomicU64::default(),
            pumps: AtomicUsize::default(),
        }
    }
}

/// Lock ignoring poisoning: a panicking test thread must not wedge the proxy.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running proxy; see the module docs. Stops on drop.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Bind `127.0.0.1:0` and start forwarding connections to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy: local_addr");
        let shared = Arc::new(Shared::default());
        let worker_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("proxy-accept-{}", addr.port()))
            .spawn(move || accept_loop(listener, upstream, worker_shared))
            .expect("proxy: spawn accept thread");
        Proxy { addr, upstream, shared, accept_thread: Some(accept_thread) }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` of the proxy (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes forwarded client→upstream, over all connections, since start/reset.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(SeqCst)
    }

    /// Bytes forwarded upstream→client, over all connections, since start/reset.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(SeqCst)
    }

    /// Zero both byte counters.
    pub fn reset_counters(&self) {
        self.shared.bytes_up.store(0, SeqCst);
        self.shared.bytes_down.store(0, SeqCst);
    }

    /// Flip (XOR 0x01) the client→upstream byte at offset `n` counted from now
    /// over all connections (`n == 0`: the next byte), once, then disarm.
    /// Re-arming replaces a pending flip.
    pub fn flip_byte_after(&self, n: u64) {
        *lock(&self.shared.flip_after) = Some(n);
    }

    /// Flip, once, the first client→upstream byte that is at least
    /// [`BODY_FAULT_MIN_OFFSET`] into its connection and lies in the body
    /// (per `Content-Length`) of a request whose request line contains
    /// `/chunks`.
    pub fn corrupt_in_body_once(&self) {
        self.shared.body_fault_armed.store(true, SeqCst);
    }

    /// Flip (XOR 0x01) the upstream→client byte at offset `n` counted from now (over
    /// all connections): an upstream that answers with one damaged byte.
    pub fn flip_down_byte_after(&self, n: u64) {
        *lock(&self.shared.flip_down_after) = Some(n);
    }

    /// Number of bytes flipped so far by either fault.
    pub fn faults_injected(&self) -> u64 {
        self.shared.faults.load(SeqCst)
    }

    /// When true, new connections are accepted and closed immediately
    /// (without contacting upstream). Live connections are unaffected.
    pub fn set_refuse(&self, refuse: bool) {
        self.shared.refuse.store(refuse, SeqCst);
    }

    /// Shut down both sides of every live connection now.
    pub fn cut_all(&self) {
        for (client, upstream) in lock(&self.shared.live).values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }

    /// Sleep this long after every read, in both directions (0 = no delay).
    pub fn set_delay_ms(&self, ms: u64) {
        self.shared.delay_ms.store(ms, SeqCst);
    }

    /// Limits each direction to `bytes_per_s` over all connections, like a slow link
    /// (0 = no limit).
    pub fn set_rate(&self, bytes_per_s: u64) {
        for p in &self.shared.paced {
            *lock(p) = (Instant::now(), 0);
        }
        self.shared.rate.store(bytes_per_s, SeqCst);
    }

    /// While `true`, nothing is forwarded in either direction and connections stay
    /// open: the peer looks alive and says nothing.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, SeqCst);
    }

    /// Number of connections currently being forwarded.
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.live).len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, SeqCst);
        // Wake the blocking accept() so the loop sees `stopping`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        self.cut_all();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.shared.pumps.load(SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stopping.load(SeqCst) {
            break;
        }
        let Ok(client) = incoming else {
            thread::sleep(Duration::from_millis(10)); // e.g. EMFILE; retry
            continue;
        };
        if shared.refuse.load(SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let _ = serve(client, upstream, &shared);
    }
}

/// Connect upstream, register the connection and start its two pumps.
fn serve(client: TcpStream, upstream: SocketAddr, shared: &Arc<Shared>) -> std::io::Result<()> {
    let server = match TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            let _ = client.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let registered = (client.try_clone()?, server.try_clone()?);
    let up = (client.try_clone()?, server.try_clone()?);
    let down = (server, client);
    let id = shared.next_id.fetch_add(1, SeqCst);
    lock(&shared.live).insert(id, registered);
    let pumps_left = Arc::new(AtomicUsize::new(2));
    for (is_up, (src, dst)) in [(true, up), (false, down)] {
        let shared = Arc::clone(shared);
        let pumps_left = Arc::clone(&pumps_left);
        shared.pumps.fetch_add(1, SeqCst);
        thread::spawn(move || {
            pump(is_up, src, dst, &shared);
            if pumps_left.fetch_sub(1, SeqCst) == 1 {
                lock(&shared.live).remove(&id);
            }
            shared.pumps.fetch_sub(1, SeqCst);
        });
    }
    Ok(())
}

/// Copy `src` to `dst` until EOF (propagated as a half-close) or an error
/// (which closes both sockets, ending the other pump too).
fn pump(is_up: bool, mut src: TcpStream, mut dst: TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut http = HttpTracker::default();
    loop {
        // A slow link takes little at a time, so that pacing is smooth.
        let want = if shared.rate.load(SeqCst) > 0 { 1024 } else { BUF_SIZE };
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let delay = shared.delay_ms.load(SeqCst);
        if delay > 0 {
            thread::sleep(Duration::from_millis(delay));
        }
        while shared.stalled.load(SeqCst) && !shared.stopping.load(SeqCst) {
            thread::sleep(Duration::from_millis(5));
        }
        let rate = shared.rate.load(SeqCst);
        if rate > 0 {
            let due = {
                let mut p = lock(&shared.paced[usize::from(is_up)]);
                p.1 += n as u64;
                p.0 + Duration::from_secs_f64(p.1 as f64 / rate as f64)
            };
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        let chunk = &mut buf[..n];
        // Count before writing, so a peer that has received the bytes always
        // sees them counted.
        if is_up {
            inject_faults(shared, &mut http, chunk);
            shared.bytes_up.fetch_add(n as u64, SeqCst);
        } else {
            flip_armed(shared, &shared.flip_down_after, chunk);
            shared.bytes_down.fetch_add(n as u64, SeqCst);
        }
        if dst.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = src.shutdown(Shutdown::Both);
    let _ = dst.shutdown(Shutdown::Both);
}

/// Apply armed faults to one client→upstream chunk (before it is forwarded).
fn inject_faults(shared: &Shared, http: &mut HttpTracker, chunk: &mut [u8]) {
    if let Some(i) = http.advance(chunk)
        && shared.body_fault_armed.compare_exchange(true, false, SeqCst, SeqCst).is_ok()
    {
        chunk[i] ^= 0x01;
        shared.faults.fetch_add(1, SeqCst);
    }
    flip_armed(shared, &shared.flip_after, chunk);
}

/// Flips the byte of `chunk` that an armed `flip` counts down to, if it is in it.
fn flip_armed(shared: &Shared, flip: &Mutex<Option<u64>>, chunk: &mut [u8]) {
    let mut flip_after = lock(flip);
    if let Some(left) = *flip_after {
        if left < chunk.len() as u64 {
            chunk[left as usize] ^= 0x01;
            *flip_after = None;
            shared.faults.fetch_add(1, SeqCst);
        } else {
            *flip_after = Some(left - chunk.len() as u64);
        }
    }
}

/// Minimal HTTP/1.1 request framing on one connection's client→upstream
/// stream: request line, `Content-Length`, body. No chunked encoding.
#[derive(Debug, Default)]
struct HttpTracker {
    /// Bytes of this connection seen before the current chunk.
    offset: u64,
    /// Head line being accumulated (capped at `MAX_LINE`).
    line: Vec<u8>,
    /// Request line seen, head not finished yet.
    in_head: bool,
    /// Current request line contains "/chunks".
    is_chunks: bool,
    content_length: u64,
    /// Body bytes still to come (0 while reading a head).
    body_left: u64,
}

impl HttpTracker {
    /// Advance over `data`; return the index of the first byte in it that is
    /// a `/chunks` body byte at least `BODY_FAULT_MIN_OFFSET` into the stream.
    fn advance(&mut self, data: &[u8]) -> Option<usize> {
        let mut target = None;
        let mut i = 0;
        while i < data.len() {
            if self.body_left > 0 {
                let take = self.body_left.min((data.len() - i) as u64) as usize;
                let start = self.offset + i as u64;
                if self.is_chunks && target.is_none() && start + take as u64 > BODY_FAULT_MIN_OFFSET {
                    target = Some(i + BODY_FAULT_MIN_OFFSET.saturating_sub(start) as usize);
                }
                self.body_left -= take as u64;
                i += take;
                continue;
            }
            let byte = data[i];
            i += 1;
            if byte == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(byte);
            }
        }
        self.offset += data.len() as u64;
        target
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line).trim_end_matches('\r').to_owned();
        self.line.clear();
        if !self.in_head {
            if !text.is_empty() {
                // Request line (blank lines between requests are skipped).
                self.in_head = true;
                self.is_chunks = text.contains("/chunks");
                self.content_length = 0;
            }
        } else if text.is_empty() {
            self.in_head = false;
            self.body_left = self.content_length;
        } else if let Some((name, value)) = text.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            self.content_length = value.trim().parse().unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{self, Receiver};

    const WAIT: Duration = Duration::from_secs(2);

    /// Upstream echoing each connection back until EOF.
    fn echo_upstream() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        addr
    }

    /// Upstream reading each connection to EOF and reporting what it got.
    fn collecting_upstream() -> (SocketAddr, Receiver<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let tx = tx.clone();
                thread::spawn(move || {
                    let mut got = Vec::new();
                    let _ = s.read_to_end(&mut got);
                    let _ = tx.send(got);
                });
            }
        });
        (addr, rx)
    }

    fn connect(p: &Proxy) -> TcpStream {
        let s = TcpStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    /// Send `parts` through the proxy on one connection; return what upstream got.
    fn send_via(p: &Proxy, rx: &Receiver<Vec<u8>>, parts: &[&[u8]]) -> Vec<u8> {
        let mut s = connect(p);
        for part in parts {
            s.write_all(part).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        rx.recv_timeout(WAIT).expect("upstream got nothing")
    }

    fn round_trip(s: &mut TcpStream, data: &[u8]) {
        s.write_all(data).unwrap();
        let mut back = vec![0; data.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
    }

    fn diff(a: &[u8], b: &[u8]) -> Vec<usize> {
        assert_eq!(a.len(), b.len());
        (0..a.len()).filter(|&i| a[i] != b[i]).collect()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn assert_closed(s: &mut TcpStream) {
        match s.read(&mut [0u8; 64]) {
            Ok(0) => {}
            Ok(n) => panic!("read {n} bytes from a closed connection"),
            Err(e) => assert!(!matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{e}"),
        }
    }

    fn wait_until(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "condition not reached in time");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn counts_bytes_over_all_connections() {
        let p = Proxy::start(echo_upstream());
        assert!(p.url().starts_with("http://127.0.0.1:"));
        round_trip(&mut connect(&p), &pattern(1000));
        round_trip(&mut connect(&p), &pattern(500));
        assert_eq!((p.bytes_up(), p.bytes_down()), (1500, 1500));
        p.reset_counters();
        assert_eq!((p.bytes_up(), p.bytes_down()), (0, 0));
        assert_eq!(p.faults_injected(), 0);
    }

    #[test]
    fn flips_exactly_one_byte_at_offset_counted_from_arming() {
        let (addr, rx) = collecting_upstream();
        let p = Proxy::start(addr);
        let before = pattern(300);
        assert_eq!(send_via(&p, &rx, &[&before]), before);
        p.flip_byte_after(1234);
        let data = pattern(5000);
        let got = send_via(&p, &rx, &[&data[..1000], &data[1000..]]);
        assert_eq!(diff(&got, &data), vec![1234]);
        assert_eq!(got[1234], data[1234] ^ 0x01);
        assert_eq!(p.faults_injected(), 1);
        assert_eq!(send_via(&p, &rx, &[&data]), data, "fault must disarm");
    }

    #[test]
    fn corrupts_only_a_chunks_body_past_64k() {
        let (addr, rx) = collecting_upstream();
        let p = Proxy::start(addr);
        let req = |line: &str, body_len: usize| {
            let mut r = format!("{line} HTTP/1.1\r\nHost: x\r\ncontent-length: {body_len}\r\n\r\n").into_bytes();
            r.extend(pattern(body_len));
            r
        };
        // Small /chunks body (< 64 KiB), big non-chunks body crossing 64 KiB,
        // body-less /chunks head past 64 KiB, then the target body.
        let parts = [
            req("POST /chunks/a", 1000),
            req("PUT /objects/x", 100_000),
            b"GET /chunks/y HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            req("POST /chunks/b", 100_000),
        ];
        let sent = parts.concat();
        let first_target_body = sent.len() - 100_000;
        p.corrupt_in_body_once();
        let parts: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
        assert_eq!(diff(&send_via(&p, &rx, &parts), &sent), vec![first_target_body]);
        assert_eq!(p.faults_injected(), 1);
        assert_eq!(send_via(&p, &rx, &parts), sent, "fault must disarm");

        // A single /chunks body straddling 64 KiB is hit exactly there.
        p.corrupt_in_body_once();
        let big = req("PUT /chunks/c", 200_000);
        let got = send_via(&p, &rx, &[&big[..7], &big[7..70_000], &big[70_000..]]);
        assert_eq!(diff(&got, &big), vec![BODY_FAULT_MIN_OFFSET as usize]);
        assert_eq!(p.faults_injected(), 2);
    }

    #[test]
    fn refuse_closes_new_connections_only_while_set() {
        let p = Proxy::start(echo_upstream());
        let mut live = connect(&p);
        round_trip(&mut live, b"hello");
        p.set_refuse(true);
        assert_closed(&mut connect(&p));
        round_trip(&mut live, b"still up");
        p.set_refuse(false);
        round_trip(&mut connect(&p), b"back");
    }

    #[test]
    fn cut_all_closes_live_connections() {
        let p = Proxy::start(echo_upstream());
        let mut a = connect(&p);
        let mut b = connect(&p);
        round_trip(&mut a, b"a");
        round_trip(&mut b, b"b");
        assert_eq!(p.live_connections(), 2);
        p.cut_all();
        assert_closed(&mut a);
        assert_closed(&mut b);
        wait_until(|| p.live_connections() == 0);
        round_trip(&mut connect(&p), b"new connections still work");
    }

    #[test]
    fn delay_applies_per_read() {
        let p = Proxy::start(echo_upstream());
        p.set_delay_ms(100);
        let started = Instant::now();
        round_trip(&mut connect(&p), b"slow");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn drop_stops_listening_and_closes_connections() {
        let p = Proxy::start(echo_upstream());
        let addr = p.addr();
        let mut live = connect(&p);
        round_trip(&mut live, b"x");
        let started = Instant::now();
        drop(p);
        assert!(started.elapsed() < WAIT);
        assert_closed(&mut live);
        assert!(TcpStream::connect(addr).is_err());
    }
}
