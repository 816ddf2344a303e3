//! Fault-cycle benchmark: sluice under backend faults with many live
//! WebSockets.
//!
//! Starts three echo backends, each in its own process (this binary run
//! again with `--backend NAME ADDR`, so a backend can really be SIGKILLed
//! and SIGSTOPped), and the release `sluice` binary in front of them: one
//! listener, one pool, `least_conn`, active health checks every 500 ms,
//! passive ejection for 2 s, rebalancing off (it would close unaffected
//! clients with 1012 on purpose), admin API on. N clients (5,000 by
//! default) each send a numbered binary message every second and check
//! every echo (sequence, length, last byte); a client whose connection ends
//! records how (Close code, or the error kind), how many messages went
//! unanswered, and reconnects through sluice at once (then backing off
//! 50 ms doubling to 1 s), recording the time until the new backend's
//! greeting.
//!
//! Each cycle applies three faults, each to one backend, rotating (cycle
//! `c`, fault `f` hits backend `(c + f) % 3`, so every fault finds a
//! loaded backend):
//!
//! - kill: SIGKILL the backend process; when its clients are back on the
//!   others, start it again on the same port and wait until sluice sees it
//!   healthy;
//! - stop: SIGSTOP it for the hold time (5 s) while its clients keep
//!   sending, and a few of them flood it (64 KiB messages, up to a budget)
//!   so that the buffers towards it fill; sluice's RSS is sampled every
//!   200 ms; then SIGCONT, and every message must still be echoed, in order;
//! - reset: SIGUSR1 makes the backend write a frame header and part of the
//!   payload on every connection, then close it with SO_LINGER 0 (RST).
//!
//! Between faults the bench waits until every client is connected, every
//! backend is up and healthy, and the admin API's live WebSocket count per
//! backend equals the clients' own view. Checked (exit 1 when broken):
//! sluice stays up; clients of the other backends see nothing during a
//! fault (no close, no error, no wrong echo, every message echoed by the
//! end of the phase); before the first fault and after the last (after a
//! settle period) sluice's open descriptors and the registry's live
//! WebSocket count are equal and its RSS is within `RSS_TOLERANCE`.
//! Reported: what the affected clients saw per fault, reconnect times, where
//! they landed, the echo delays, RSS during the stop.
//!
//! Run: `cargo bench --bench fault_bench` (`-- --quick`: 1,000 clients, 2
//! cycles, 3 s hold; `-- --clients N --cycles N --hold SECS`). Every process
//! it starts is stopped by PID at the end, also on failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use sluice::admin::api::{BackendState, Status};
use sluice::admin::client::AdminClient;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

// Shared with the tests; each bench is a crate of its own.
#[allow(clippy::duplicate_mod)]
#[path = "../tests/support/process.rs"]
mod process;

use process::{Proc, TempDir, free_ports, send_signal};

const TOKEN: &str = "fault-bench";
const BACKENDS: usize = 3;
/// Message interval of every client.
const EVERY: Duration = Duration::from_secs(1);
/// A client's regular message, and a flood message, in bytes.
const SMALL_LEN: usize = 64;
const FLOOD_LEN: usize = 64 * 1024;
/// Clients opened at once.
const OPEN_BATCH: usize = 250;
/// This process holds one descriptor per client, sluice two, and 20,000
/// is the limit; leave room for reconnects that overlap closes.
const MAX_CLIENTS: usize = 8_000;
const MAX_CYCLES: usize = 50;
const MAX_HOLD_S: u64 = 60;
/// Limits on each step of a client's connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection attempts after one disconnect before a client gives up.
const MAX_ATTEMPTS: u32 = 120;
/// Failed connection attempts kept for the report.
const MAX_FAILURES: usize = 200_000;
/// Connections one client may open over the whole run.
const MAX_CONNECTIONS_PER_CLIENT: usize = 1_000;
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest wait for any awaited state (clients back, backend healthy).
const WAIT_LIMIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(100);
/// Pause after the fault's recovery before the phase is closed.
const PHASE_SETTLE: Duration = Duration::from_secs(1);
/// Pause before the before/after measurements: longer than sluice's trim
/// interval (2 s) and its `close_timeout` linger (5 s).
const SETTLE: Duration = Duration::from_secs(8);
/// sluice's RSS after the last fault may exceed the one before the first by
/// at most this fraction of it, or `RSS_TOLERANCE_MIN_KIB`, whichever is
/// larger.
const RSS_TOLERANCE: f64 = 0.10;
const RSS_TOLERANCE_MIN_KIB: u64 = 8 * 1024;
/// sluice's RSS sample interval during a stop.
const RSS_SAMPLE: Duration = Duration::from_millis(200);
/// Bytes of the partial frame a resetting backend writes: header of a
/// 256-byte binary frame, then 10 of its bytes.
const PARTIAL_FRAME: [u8; 14] = [
    0x82, 126, 0x01, 0x00, b'c', b'u', b't', b' ', b'h', b'e', b'r', b'e', b'.', b'.',
];
/// How long a resetting backend lets the partial frame travel before the RST.
const PARTIAL_DELAY: Duration = Duration::from_millis(50);
/// `backend` of a client that is not connected.
const NONE: u8 = u8::MAX;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--backend") {
        return backend::main(&args[1..]);
    }
    let opts = match Options::parse(args) {
        Ok(opts) => opts,
        Err(error) => {
            eprintln!("fault_bench: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let fd_limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("fault_bench: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(&opts, fd_limit));
    // Client tasks go with the runtime; every child process is already
    // stopped (dropped in `run`).
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            println!("\nRESULT: FAILED: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Command-line options (after `cargo bench --bench fault_bench --`).
struct Options {
    clients: usize,
    cycles: usize,
    hold: Duration,
    /// Clients of the stopped backend that flood it, and their budget each.
    flood_clients: usize,
    flood_bytes: u64,
}

impl Options {
    const USAGE: &str = "usage: cargo bench --bench fault_bench [-- [--quick] [--clients N] [--cycles N] [--hold SECS]]";

    fn parse(args: Vec<String>) -> Result<Self> {
        let mut opts = Self {
            clients: 5_000,
            cycles: 5,
            hold: Duration::from_secs(5),
            flood_clients: 8,
            flood_bytes: 32 << 20,
        };
        let (mut clients, mut cycles, mut hold) = (None, None, None);
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut number = |name: &str| -> Result<u64> {
                let value = args
                    .next()
                    .with_context(|| format!("{name} needs a number"))?;
                value
                    .parse()
                    .with_context(|| format!("{name} {value:?}: not a whole number"))
            };
            match arg.as_str() {
                "--bench" => {}
                "--quick" => {
                    opts = Self {
                        clients: 1_000,
                        cycles: 2,
                        hold: Duration::from_secs(3),
                        flood_clients: 4,
                        flood_bytes: 16 << 20,
                    }
                }
                "--clients" => clients = Some(number("--clients")? as usize),
                "--cycles" => cycles = Some(number("--cycles")? as usize),
                "--hold" => hold = Some(number("--hold")?),
                "-h" | "--help" => {
                    println!("{}", Self::USAGE);
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{}", Self::USAGE),
            }
        }
        opts.clients = clients.unwrap_or(opts.clients);
        opts.cycles = cycles.unwrap_or(opts.cycles);
        if let Some(secs) = hold {
            opts.hold = Duration::from_secs(secs);
        }
        ensure!(
            (BACKENDS..=MAX_CLIENTS).contains(&opts.clients),
            "--clients must be {BACKENDS}..={MAX_CLIENTS} (sluice holds two descriptors per WebSocket, 20,000 is the limit)"
        );
        ensure!(
            (1..=MAX_CYCLES).contains(&opts.cycles),
            "--cycles must be 1..={MAX_CYCLES}"
        );
        ensure!(
            (1..=MAX_HOLD_S).contains(&opts.hold.as_secs()),
            "--hold must be 1..={MAX_HOLD_S}"
        );
        Ok(opts)
    }
}

/// The echo backend, run in its own process: `fault_bench --backend NAME ADDR`.
///
/// Answers `GET /health` with 200 (and closes), upgrades WebSockets
/// (`connected to NAME` first, then every message back), and on SIGUSR1
/// resets every connection open at that moment mid-message: a frame header
/// and part of its payload, then close with SO_LINGER 0 (RST). Exits on
/// SIGTERM.
mod backend {
    use std::net::SocketAddr;
    use std::process::ExitCode;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::signal::unix::{SignalKind, signal};
    use tokio::sync::watch;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::{PARTIAL_DELAY, PARTIAL_FRAME};

    /// Largest request head read.
    const MAX_HEAD: usize = 16 * 1024;
    const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a restarted backend retries binding its port.
    const BIND_RETRY: Duration = Duration::from_secs(10);

    pub fn main(args: &[String]) -> ExitCode {
        let [name, addr] = args else {
            eprintln!("usage: fault_bench --backend NAME ADDR");
            return ExitCode::FAILURE;
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            eprintln!("fault_bench backend: bad address {addr:?}");
            return ExitCode::FAILURE;
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(error) => {
                eprintln!("fault_bench backend: {error}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(serve(name.clone(), addr)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("fault_bench backend {name}: {error}");
                ExitCode::FAILURE
            }
        }
    }

    async fn serve(name: String, addr: SocketAddr) -> std::io::Result<()> {
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut term = signal(SignalKind::terminate())?;
        let deadline = Instant::now() + BIND_RETRY;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("binding {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let name: Arc<str> = name.into();
        // The reset generation: each connection resets when it changes.
        let (reset_tx, reset_rx) = watch::channel(0u64);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        tokio::spawn(conn(tcp, name.clone(), reset_rx.clone()));
                    }
                    // E.g. out of descriptors: do not spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                _ = usr1.recv() => reset_tx.send_modify(|g| *g += 1),
                _ = term.recv() => return Ok(()),
            }
        }
    }

    /// Reads a request head; returns it and any bytes after it.
    async fn read_head(tcp: &mut TcpStream) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::with_capacity(1024);
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = buf.split_off(end + 4);
                return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
            }
            if buf.len() >= MAX_HEAD {
                return None;
            }
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn conn(mut tcp: TcpStream, name: Arc<str>, mut reset: watch::Receiver<u64>) {
        // Only resets signalled from now on concern this connection.
        reset.borrow_and_update();
        let _ = tcp.set_nodelay(true);
        let Ok(Some((head, rest))) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut tcp)).await
        else {
            return;
        };
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut upgrade = false;
        let mut key = None;
        for line in lines {
            if let Some((field, value)) = line.split_once(':') {
                let value = value.trim();
                match field.trim().to_ascii_lowercase().as_str() {
                    "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
                    "sec-websocket-key" => key = Some(value.to_string()),
                    _ => {}
                }
            }
        }
        let key = match (upgrade, key) {
            (true, Some(key)) => key,
            _ => {
                let answer = if request_line.starts_with("GET /health ") {
                    "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                };
                let _ = tcp.write_all(answer.as_bytes()).await;
                let _ = tcp.shutdown().await;
                return;
            }
        };
        let accept = derive_accept_key(key.as_bytes());
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
        );
        if tcp.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        let mut ws = WebSocketStream::from_partially_read(tcp, rest, Role::Server, None).await;
        if ws
            .send(Message::text(format!("connected to {name}")))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                biased;
                changed = reset.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                msg = ws.next() => match msg {
                    // The echo is written whole (this branch is not cut by
                    // a reset), so the partial frame below starts at a
                    // frame boundary.
                    Some(Ok(m @ (Message::Binary(_) | Message::Text(_)))) => {
                        if ws.send(m).await.is_err() {
                            return;
                        }
                    }
                    // A Close: reading on sends tungstenite's reply and ends.
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                },
            }
        }
        // Reset mid-message: a frame header and part of its payload, a
        // moment for it to reach sluice, then RST.
        let tcp = ws.get_mut();
        let _ = tcp.write_all(&PARTIAL_FRAME).await;
        tokio::time::sleep(PARTIAL_DELAY).await;
        let _ = tcp.set_zero_linger();
    }
}

/// What one client shares with the controller.
#[derive(Default)]
struct ClientState {
    /// Index of the backend it is connected to, `NONE` when not connected.
    backend: AtomicU8,
    /// Messages sent (the next sequence number).
    sent: AtomicU64,
    /// Messages echoed intact (the next sequence number expected).
    echoed: AtomicU64,
    /// Longest round trip of a regular message since the controller last
    /// reset it, in microseconds.
    max_rtt_us: AtomicU64,
    /// Send flood messages (while the budget lasts).
    flood: AtomicBool,
    flood_bytes: AtomicU64,
}

/// The end of one connection, as its client saw it.
#[derive(Debug, Clone)]
struct Event {
    client: usize,
    at: Instant,
    /// Backend of the connection that ended.
    backend: u8,
    /// `close CODE`, or the error kind.
    kind: String,
    /// Messages sent on it and never echoed.
    lost: u64,
    /// Until the next backend's greeting; `None` if it never came.
    reconnect: Option<Duration>,
    new_backend: Option<u8>,
    /// Failed connection attempts before that.
    failed_attempts: u32,
}

struct Shared {
    /// sluice's listener, and the WebSocket URL there.
    addr: SocketAddr,
    url: String,
    clients: Vec<ClientState>,
    events: Mutex<Vec<Event>>,
    /// Failed connection attempts: when, and why (at most `MAX_FAILURES`).
    failures: Mutex<Vec<(Instant, String)>>,
    connected: AtomicUsize,
    epoch: Instant,
    flood_budget: u64,
    stop: CancellationToken,
}

impl Shared {
    fn note_failure(&self, why: String) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() < MAX_FAILURES {
            failures.push((Instant::now(), why));
        }
    }

    /// Failed connection attempts between two instants, by reason.
    fn failures_between(&self, from: Instant, to: Instant) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for (_, why) in failures.iter().filter(|(t, _)| *t >= from && *t < to) {
            *out.entry(why.clone()).or_default() += 1;
        }
        out
    }

    fn events(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connected clients per backend, as the clients see it.
    fn view(&self) -> [u64; BACKENDS] {
        let mut counts = [0; BACKENDS];
        for c in &self.clients {
            let b = c.backend.load(Ordering::SeqCst) as usize;
            if b < BACKENDS {
                counts[b] += 1;
            }
        }
        counts
    }

    fn on_backend(&self, backend: usize) -> Vec<usize> {
        (0..self.clients.len())
            .filter(|&i| self.clients[i].backend.load(Ordering::SeqCst) as usize == backend)
            .collect()
    }
}

fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// A message: sequence, send time (µs since the epoch), flood flag, filler
/// ending in the sequence's low byte.
fn message(seq: u64, epoch: Instant, flood: bool) -> Message {
    let len = if flood { FLOOD_LEN } else { SMALL_LEN };
    let mut payload = vec![seq as u8; len];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    payload[8..16].copy_from_slice(&micros_since(epoch).to_le_bytes());
    payload[16] = u8::from(flood);
    Message::binary(payload)
}

fn describe(error: &WsError) -> String {
    match error {
        WsError::ConnectionClosed => "closed (after close handshake)".into(),
        WsError::AlreadyClosed => "already closed".into(),
        WsError::Io(e) => format!("io error {:?}", e.kind()),
        WsError::Protocol(p) => format!("protocol error: {p}"),
        WsError::Capacity(c) => format!("capacity error: {c}"),
        WsError::Http(resp) => format!("http {}", resp.status()),
        other => other.to_string(),
    }
}

/// What a client's socket received after the upgrade response, so that
/// the end of a connection can be told byte for byte: a cut frame, then
/// FIN or RST.
#[derive(Default)]
struct Tap {
    /// Bytes read after the response head.
    read: AtomicU64,
    /// The last `TAIL` of them.
    tail: Mutex<Vec<u8>>,
    /// How reading ended: `FIN`, or the error kind (e.g. `ConnectionReset`).
    end: Mutex<Option<String>>,
}

const TAIL: usize = 32;

/// A client socket that tells its `Tap` what it reads.
struct Tapped {
    tcp: TcpStream,
    tap: Arc<Tap>,
    /// How much of `\r\n\r\n` (the end of the response head) was just seen; 4
    /// once past it.
    head: u8,
}

impl Tapped {
    fn record(&mut self, mut data: &[u8]) {
        while self.head < 4 {
            let Some((&b, rest)) = data.split_first() else {
                return;
            };
            data = rest;
            self.head = match (self.head, b) {
                (0 | 2, b'\r') => self.head + 1,
                (1 | 3, b'\n') => self.head + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
        }
        if data.is_empty() {
            return;
        }
        self.tap.read.fetch_add(data.len() as u64, Ordering::SeqCst);
        let mut tail = self.tap.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend_from_slice(&data[data.len().saturating_sub(TAIL)..]);
        let excess = tail.len().saturating_sub(TAIL);
        tail.drain(..excess);
    }
}

impl tokio::io::AsyncRead for Tapped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.tcp).poll_read(cx, buf);
        let end = match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() == before => Some("FIN".to_string()),
            Poll::Ready(Ok(())) => {
                this.record(&buf.filled()[before..]);
                None
            }
            Poll::Ready(Err(e)) => Some(format!("{:?}", e.kind())),
            Poll::Pending => None,
        };
        if let Some(end) = end {
            let mut slot = this.tap.end.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(end);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Tapped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Bytes of a server frame (unmasked) with a payload of `len`.
fn frame_bytes(len: usize) -> u64 {
    let header = match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    (header + len) as u64
}

type Ws = tokio_tungstenite::WebSocketStream<Tapped>;

/// Connects and reads the greeting; answers the backend's index, and the
/// tap with the bytes of the greeting frame.
async fn connect(addr: SocketAddr, url: &str) -> Result<(Ws, u8, Arc<Tap>, u64), String> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {:?}", e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let tap = Arc::new(Tap::default());
    let stream = Tapped {
        tcp,
        tap: tap.clone(),
        head: 0,
    };
    let (mut ws, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::client_async_with_config(url, stream, None),
    )
    .await
    .map_err(|_| "upgrade timed out".to_string())?
    .map_err(|e| describe(&e))?;
    let greeting = tokio::time::timeout(CONNECT_TIMEOUT, ws.next())
        .await
        .map_err(|_| "no greeting".to_string())?;
    let Some(Ok(Message::Text(text))) = &greeting else {
        return Err(format!("bad greeting {greeting:?}"));
    };
    let index = text
        .as_str()
        .strip_prefix("connected to b")
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|n| (1..=BACKENDS as u8).contains(n))
        .ok_or_else(|| format!("bad greeting {text:?}"))?;
    let framed = frame_bytes(text.len());
    Ok((ws, index - 1, tap, framed))
}

/// One client: connects, chats, reconnects, until `stop`.
async fn client(shared: Arc<Shared>, id: usize) {
    let me = &shared.clients[id];
    // The connection that ended and is not yet replaced.
    let mut ended: Option<Event> = None;
    let mut failed = 0u32;
    let mut backoff = BACKOFF_START;
    let mut connections = 0;
    while connections < MAX_CONNECTIONS_PER_CLIENT && failed < MAX_ATTEMPTS {
        if shared.stop.is_cancelled() {
            break;
        }
        let connected = tokio::select! {
            () = shared.stop.cancelled() => break,
            c = connect(shared.addr, &shared.url) => c,
        };
        let (ws, backend, tap, framed) = match connected {
            Ok(c) => c,
            Err(why) => {
                shared.note_failure(why);
                failed += 1;
                let jitter = Duration::from_millis(rand::random::<u64>() % 50);
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        connections += 1;
        if let Some(mut event) = ended.take() {
            event.reconnect = Some(event.at.elapsed());
            event.new_backend = Some(backend);
            event.failed_attempts = failed;
            shared.events().push(event);
        }
        failed = 0;
        backoff = BACKOFF_START;
        me.backend.store(backend, Ordering::SeqCst);
        shared.connected.fetch_add(1, Ordering::SeqCst);
        let end = chat(&shared, me, ws, &tap, framed).await;
        me.backend.store(NONE, Ordering::SeqCst);
        shared.connected.fetch_sub(1, Ordering::SeqCst);
        match end {
            None => break,
            Some((kind, lost)) => {
                ended = Some(Event {
                    client: id,
                    at: Instant::now(),
                    backend,
                    kind,
                    lost,
                    reconnect: None,
                    new_backend: None,
                    failed_attempts: 0,
                })
            }
        }
    }
    if let Some(mut event) = ended {
        event.failed_attempts = failed;
        shared.events().push(event);
    }
}

/// Chats on one connection until it ends (its end and the messages lost)
/// or `stop` (None: closed cleanly).
async fn chat(
    shared: &Shared,
    me: &ClientState,
    ws: Ws,
    tap: &Tap,
    greeting: u64,
) -> Option<(String, u64)> {
    let (mut sink, mut stream) = ws.split();
    // Bytes of the whole frames received.
    let framed = AtomicU64::new(greeting);
    let first = me.sent.load(Ordering::SeqCst);
    me.echoed.store(first, Ordering::SeqCst);
    let epoch = shared.epoch;
    let reader = async {
        let mut expected = first;
        loop {
            let data = match stream.next().await {
                Some(Ok(Message::Binary(data))) => {
                    framed.fetch_add(frame_bytes(data.len()), Ordering::SeqCst);
                    data
                }
                Some(Ok(Message::Close(frame))) => {
                    let payload = frame.as_ref().map_or(0, |f| 2 + f.reason.len());
                    framed.fetch_add(frame_bytes(payload), Ordering::SeqCst);
                    return match frame {
                        Some(f) => format!("close {}", u16::from(f.code)),
                        None => "close (no code)".to_string(),
                    };
                }
                Some(Ok(Message::Text(_))) => return "unexpected text message".to_string(),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return describe(&e),
                None => return "stream ended".to_string(),
            };
            let ok = data.len() >= 17 && {
                let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                let flood = data[16] == 1;
                let len = if flood { FLOOD_LEN } else { SMALL_LEN };
                if seq == expected && data.len() == len && data[len - 1] == seq as u8 {
                    if !flood {
                        let sent = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
                        let rtt = micros_since(epoch).saturating_sub(sent);
                        me.max_rtt_us.fetch_max(rtt, Ordering::SeqCst);
                    }
                    true
                } else {
                    false
                }
            };
            if !ok {
                return format!("wrong echo (expected message {expected})");
            }
            expected += 1;
            me.echoed.store(expected, Ordering::SeqCst);
        }
    };
    let writer = async {
        let phase = Duration::from_millis(rand::random::<u64>() % EVERY.as_millis() as u64);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let flood = me.flood.load(Ordering::SeqCst)
                && me.flood_bytes.load(Ordering::SeqCst) < shared.flood_budget;
            if !flood {
                tick.tick().await;
            }
            let seq = me.sent.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = sink.send(message(seq, epoch, flood)).await {
                return format!("send failed: {}", describe(&e));
            }
            if flood {
                me.flood_bytes.fetch_add(FLOOD_LEN as u64, Ordering::SeqCst);
            }
        }
    };
    let kind = tokio::select! {
        kind = reader => kind,
        kind = writer => kind,
        () = shared.stop.cancelled() => {
            let mut ws = sink.reunite(stream).expect("halves of one stream");
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = ws.close(None).await;
                while ws.next().await.is_some() {}
            })
            .await;
            return None;
        }
    };
    // What the socket got after the last whole frame, and how it ended.
    let trailing = tap
        .read
        .load(Ordering::SeqCst)
        .saturating_sub(framed.load(Ordering::SeqCst));
    let tail = tap.tail.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let cut = match trailing {
        0 => "at a frame boundary".to_string(),
        n if n == PARTIAL_FRAME.len() as u64 && tail.ends_with(&PARTIAL_FRAME) => {
            format!("after the backend's {n}-byte cut frame")
        }
        n => format!("after {n} bytes of a cut frame"),
    };
    let end = tap
        .end
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| "socket still open".to_string());
    let kind = format!("{kind}; {cut}; then {end}");
    let lost = me
        .sent
        .load(Ordering::SeqCst)
        .saturating_sub(me.echoed.load(Ordering::SeqCst));
    Some((kind, lost))
}

/// The three faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
    Reset,
}

impl Fault {
    const ALL: [Fault; 3] = [Fault::Kill, Fault::Stop, Fault::Reset];

    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL",
            Fault::Stop => "SIGSTOP",
            Fault::Reset => "reset",
        }
    }
}

/// What one fault did.
struct PhaseReport {
    cycle: usize,
    fault: Fault,
    backend: usize,
    start: Instant,
    end: Instant,
    affected: usize,
    /// Ends of affected clients' connections, by kind.
    kinds: BTreeMap<String, usize>,
    /// Affected clients whose connection ended.
    disconnected: usize,
    lost: u64,
    /// Reconnect times of affected clients.
    reconnects: Vec<Duration>,
    failed_attempts: u64,
    /// Failed connection attempts of any client during the phase, by reason.
    failures: BTreeMap<String, usize>,
    /// sluice's open descriptors and RSS at the end of the phase.
    fds: usize,
    rss_kib: u64,
    /// Where they landed.
    landed: [usize; BACKENDS],
    /// Ends of unaffected clients' connections (must be none).
    disturbed: Vec<Event>,
    /// Unaffected clients whose messages were not all echoed by the end.
    stalled: usize,
    max_rtt_unaffected: Duration,
    max_rtt_affected: Duration,
    /// From the fault until every client was connected and every backend
    /// healthy again.
    recovered: Duration,
    stop: Option<StopReport>,
    /// Registry WebSockets per backend at the end of the phase.
    registry: [u64; BACKENDS],
}

struct StopReport {
    rss_before_kib: u64,
    rss_max_kib: u64,
    rss_samples: usize,
    flood_clients: usize,
    flood_written: u64,
    /// The backend's state in the admin API at the end of the hold.
    seen_as: String,
    /// From SIGCONT until every affected client had every echo.
    caught_up: Duration,
}

/// The child processes; dropping it stops them all (SIGKILL, by PID).
struct Procs {
    sluice: Proc,
    backends: Vec<Option<Proc>>,
}

struct Bench {
    shared: Arc<Shared>,
    procs: Procs,
    admin: AdminClient,
    dir: TempDir,
    addrs: Vec<SocketAddr>,
}

impl Bench {
    fn sluice_pid(&self) -> u32 {
        self.procs.sluice.pid()
    }

    /// Fails when sluice has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.procs.sluice.0.try_wait()? {
            bail!(
                "sluice exited ({status}); last log lines:\n{}",
                log_tail(&self.dir.join("sluice.log"), 20)
            );
        }
        Ok(())
    }

    fn start_backend(&mut self, i: usize) -> Result<()> {
        self.procs.backends[i] = Some(spawn_backend(i, self.addrs[i], &self.dir)?);
        Ok(())
    }

    fn backend_pid(&self, i: usize) -> Result<u32> {
        Ok(self.procs.backends[i]
            .as_ref()
            .context("backend not running")?
            .pid())
    }

    async fn status(&self) -> Result<Status> {
        Ok(self.admin.status().await?)
    }

    /// Registry WebSockets per backend, and whether every backend is up
    /// and healthy.
    async fn registry(&self) -> Result<([u64; BACKENDS], bool)> {
        let status = self.status().await?;
        let mut counts = [0; BACKENDS];
        let mut healthy = true;
        for (i, count) in counts.iter_mut().enumerate() {
            let b = status
                .backend("app", &format!("b{}", i + 1))
                .context("backend missing from status")?;
            *count = b.connections.ws;
            healthy &= b.healthy && b.state == BackendState::Up;
        }
        Ok((counts, healthy))
    }

    /// Waits until every client is connected, every backend is up and
    /// healthy, and the registry's counts are the clients' own; answers the
    /// registry counts, or an error naming what did not happen.
    async fn wait_steady(&mut self, n: usize) -> Result<[u64; BACKENDS]> {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            self.check_alive()?;
            let (registry, healthy) = self.registry().await?;
            let view = self.shared.view();
            let connected = self.shared.connected.load(Ordering::SeqCst);
            if connected == n && healthy && registry == view {
                return Ok(registry);
            }
            if Instant::now() > deadline {
                bail!(
                    "not steady after {WAIT_LIMIT:?}: {connected} of {n} clients connected (per backend {view:?}), registry {registry:?}, all healthy: {healthy}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `cond` holds, checking sluice is alive.
    async fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&Shared) -> bool) -> Result<()> {
        let deadline = Instant::now() + WAIT_LIMIT;
        while !cond(&self.shared) {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("timed out after {WAIT_LIMIT:?} waiting for {what}");
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    async fn wait_healthy(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            self.check_alive()?;
            let status = self.status().await?;
            let b = status
                .backend("app", &format!("b{}", i + 1))
                .context("backend missing from status")?;
            if b.healthy && b.state == BackendState::Up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "b{} not healthy after {WAIT_LIMIT:?} (state {}, healthy {})",
                    i + 1,
                    b.state,
                    b.healthy
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// sluice's open descriptors, RSS (KiB) and registry counts, at rest:
    /// descriptors are the fewest of 10 counts 100 ms apart (a health check
    /// holds one for a moment).
    async fn measure(&mut self, n: usize) -> Result<Snapshot> {
        let registry = self.wait_steady(n).await?;
        let pid = self.sluice_pid();
        let mut fds = usize::MAX;
        for _ in 0..10 {
            fds = fds.min(count_fds(pid)?);
            tokio::time::sleep(POLL).await;
        }
        Ok(Snapshot {
            fds,
            rss_kib: rss_kib(pid)?,
            registry,
            clients: self.shared.view(),
        })
    }

    async fn phase(
        &mut self,
        cycle: usize,
        fault: Fault,
        x: usize,
        opts: &Options,
    ) -> Result<PhaseReport> {
        let n = self.shared.clients.len();
        self.wait_steady(n).await?;
        for c in &self.shared.clients {
            c.max_rtt_us.store(0, Ordering::SeqCst);
        }
        let affected = self.shared.on_backend(x);
        let is_affected = {
            let mut v = vec![false; n];
            for &i in &affected {
                v[i] = true;
            }
            v
        };
        let start = Instant::now();
        let mut stop = None;
        // Affected clients that have had a connection end and then got
        // through again (or gave up), since the fault.
        let back = |shared: &Shared| {
            shared
                .events()
                .iter()
                .filter(|e| e.at >= start && is_affected[e.client])
                .map(|e| e.client)
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        match fault {
            Fault::Kill => {
                if let Some(mut proc) = self.procs.backends[x].take() {
                    let _ = proc.0.kill();
                    let _ = proc.0.wait();
                }
                let want = affected.len();
                self.wait_for("the killed backend's clients to reconnect", |s| {
                    back(s) >= want
                })
                .await?;
                self.start_backend(x)?;
                wait_listening(self.addrs[x]).await?;
                self.wait_healthy(x).await?;
            }
            Fault::Stop => {
                let pid = self.backend_pid(x)?;
                let sluice = self.sluice_pid();
                let rss_before = rss_kib(sluice)?;
                let flooders: Vec<usize> =
                    affected.iter().copied().take(opts.flood_clients).collect();
                send_signal(pid, "STOP")?;
                for &i in &flooders {
                    self.shared.clients[i]
                        .flood_bytes
                        .store(0, Ordering::SeqCst);
                    self.shared.clients[i].flood.store(true, Ordering::SeqCst);
                }
                let hold_end = Instant::now() + opts.hold;
                let (mut rss_max, mut samples) = (rss_before, 0);
                while Instant::now() < hold_end {
                    self.check_alive()?;
                    rss_max = rss_max.max(rss_kib(sluice)?);
                    samples += 1;
                    tokio::time::sleep(RSS_SAMPLE).await;
                }
                let seen = self.status().await?;
                let seen = seen
                    .backend("app", &format!("b{}", x + 1))
                    .map_or("?".to_string(), |b| {
                        format!("{}, healthy {}", b.state, b.healthy)
                    });
                for &i in &flooders {
                    self.shared.clients[i].flood.store(false, Ordering::SeqCst);
                }
                let flood_written = flooders
                    .iter()
                    .map(|&i| self.shared.clients[i].flood_bytes.load(Ordering::SeqCst))
                    .sum();
                send_signal(pid, "CONT")?;
                let cont = Instant::now();
                // Let the flood writes blocked at SIGCONT finish, then every
                // message sent so far must come back.
                let targets: Vec<(usize, u64)> = affected
                    .iter()
                    .map(|&i| (i, self.shared.clients[i].sent.load(Ordering::SeqCst)))
                    .collect();
                self.wait_for("the stopped backend's clients to get every echo", |s| {
                    targets.iter().all(|&(i, sent)| {
                        s.clients[i].echoed.load(Ordering::SeqCst) >= sent
                            || s.clients[i].backend.load(Ordering::SeqCst) as usize != x
                    })
                })
                .await?;
                let caught_up = cont.elapsed();
                self.wait_healthy(x).await?;
                stop = Some(StopReport {
                    rss_before_kib: rss_before,
                    rss_max_kib: rss_max,
                    rss_samples: samples,
                    flood_clients: flooders.len(),
                    flood_written,
                    seen_as: seen,
                    caught_up,
                });
            }
            Fault::Reset => {
                send_signal(self.backend_pid(x)?, "USR1")?;
                let want = affected.len();
                self.wait_for("the reset backend's clients to reconnect", |s| {
                    back(s) >= want
                })
                .await?;
            }
        }
        let registry = self.wait_steady(n).await?;
        let recovered = start.elapsed();
        tokio::time::sleep(PHASE_SETTLE).await;
        // Every message an unaffected client has sent by now is echoed soon.
        let targets: Vec<(usize, u64)> = (0..n)
            .filter(|&i| !is_affected[i])
            .map(|i| (i, self.shared.clients[i].sent.load(Ordering::SeqCst)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let lagging = |s: &Shared| {
            targets
                .iter()
                .filter(|&&(i, sent)| s.clients[i].echoed.load(Ordering::SeqCst) < sent)
                .count()
        };
        while lagging(&self.shared) > 0 && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        let stalled = lagging(&self.shared);
        self.check_alive()?;
        let pid = self.sluice_pid();
        let (fds, rss_kib) = (count_fds(pid)?, rss_kib(pid)?);
        let end = Instant::now();

        let events: Vec<Event> = self
            .shared
            .events()
            .iter()
            .filter(|e| e.at >= start && e.at < end)
            .cloned()
            .collect();
        let mut report = PhaseReport {
            cycle,
            fault,
            backend: x,
            start,
            end,
            affected: affected.len(),
            kinds: BTreeMap::new(),
            disconnected: 0,
            lost: 0,
            reconnects: Vec::new(),
            failed_attempts: 0,
            failures: self.shared.failures_between(start, end),
            fds,
            rss_kib,
            landed: [0; BACKENDS],
            disturbed: Vec::new(),
            stalled,
            max_rtt_unaffected: Duration::ZERO,
            max_rtt_affected: Duration::ZERO,
            recovered,
            stop,
            registry,
        };
        let mut seen = std::collections::HashSet::new();
        for e in events {
            if !(is_affected[e.client] && e.backend as usize == x) {
                report.disturbed.push(e);
                continue;
            }
            if seen.insert(e.client) {
                report.disconnected += 1;
            }
            *report.kinds.entry(e.kind.clone()).or_default() += 1;
            report.lost += e.lost;
            report.failed_attempts += u64::from(e.failed_attempts);
            if let (Some(t), Some(b)) = (e.reconnect, e.new_backend) {
                report.reconnects.push(t);
                report.landed[b as usize] += 1;
            }
        }
        report.reconnects.sort();
        for (i, c) in self.shared.clients.iter().enumerate() {
            let rtt = Duration::from_micros(c.max_rtt_us.load(Ordering::SeqCst));
            let max = if is_affected[i] {
                &mut report.max_rtt_affected
            } else {
                &mut report.max_rtt_unaffected
            };
            *max = (*max).max(rtt);
        }
        Ok(report)
    }
}

/// sluice at rest.
#[derive(Debug, Clone)]
struct Snapshot {
    fds: usize,
    rss_kib: u64,
    registry: [u64; BACKENDS],
    clients: [u64; BACKENDS],
}

fn count_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .count())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spawn_backend(i: usize, addr: SocketAddr, dir: &std::path::Path) -> Result<Proc> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("b{}.log", i + 1)))?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--backend")
        .arg(format!("b{}", i + 1))
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting backend b{}", i + 1))?;
    Ok(Proc(child))
}

async fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listening on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn config(port: u16, admin_port: u16, addrs: &[SocketAddr], clients: usize) -> String {
    // sluice checks 2 descriptors per connection + 64 against its limit.
    let max_connections = (clients + 1_000).min(9_000);
    let mut config = format!(
        "[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_file = \"token\"\n\n\
         [[listener]]\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\nmax_connections = {max_connections}\n\n\
         [[pool]]\nname = \"app\"\nalgorithm = \"least_conn\"\n\
         health = {{ path = \"/health\", interval = \"500ms\", timeout = \"300ms\", rise = 2, fall = 2 }}\n\
         passive = {{ consecutive_failures = 3, ejection_time = \"2s\" }}\n\
         rebalance = {{ enabled = false }}\n"
    );
    for (i, addr) in addrs.iter().enumerate() {
        config += &format!(
            "\n[[pool.backend]]\nname = \"b{}\"\naddress = \"{addr}\"\n",
            i + 1
        );
    }
    config
}

async fn run(opts: &Options, fd_limit: u64) -> Result<bool> {
    println!(
        "fault_bench: {} clients (a {SMALL_LEN} B message each per {EVERY:?}), {} cycles of kill/stop/reset, hold {:?}, flood {} clients x {} MiB, {} cores, fd limit {fd_limit}",
        opts.clients,
        opts.cycles,
        opts.hold,
        opts.flood_clients,
        opts.flood_bytes >> 20,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let dir = TempDir::new("sluice-fault-bench")?;
    let [port, admin_port, p1, p2, p3] = free_ports()?;
    let addrs: Vec<SocketAddr> = [p1, p2, p3]
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    dir.write("token", TOKEN)?;
    let config_path = dir.write(
        "sluice.toml",
        &config(port, admin_port, &addrs, opts.clients),
    )?;
    let mut backends = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        backends.push(Some(spawn_backend(i, *addr, &dir)?));
    }
    let sluice = Proc(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sluice.log"))?)
            .spawn()
            .context("starting sluice")?,
    );
    let shared = Arc::new(Shared {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        url: format!("ws://127.0.0.1:{port}/ws"),
        clients: (0..opts.clients).map(|_| ClientState::default()).collect(),
        events: Mutex::new(Vec::new()),
        failures: Mutex::new(Vec::new()),
        connected: AtomicUsize::new(0),
        epoch: Instant::now(),
        flood_budget: opts.flood_bytes,
        stop: CancellationToken::new(),
    });
    for c in &shared.clients {
        c.backend.store(NONE, Ordering::SeqCst);
    }
    let mut bench = Bench {
        shared: shared.clone(),
        procs: Procs { sluice, backends },
        admin: AdminClient {
            addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            token: Some(TOKEN.to_string()),
        },
        dir,
        addrs,
    };
    for addr in bench.addrs.clone() {
        wait_listening(addr).await?;
    }
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!(
        "sluice pid {}, backends b1..b3 pids {:?} on {:?}",
        bench.sluice_pid(),
        (0..BACKENDS)
            .map(|i| bench.backend_pid(i).unwrap_or(0))
            .collect::<Vec<_>>(),
        bench.addrs
    );
    for i in 0..BACKENDS {
        bench.wait_healthy(i).await?;
    }

    let opened = Instant::now();
    let mut tasks = Vec::with_capacity(opts.clients);
    while tasks.len() < opts.clients {
        for _ in 0..OPEN_BATCH.min(opts.clients - tasks.len()) {
            tasks.push(tokio::spawn(client(shared.clone(), tasks.len())));
        }
        let want = tasks.len();
        bench
            .wait_for("clients to connect", |s| {
                s.connected.load(Ordering::SeqCst) >= want
            })
            .await?;
    }
    println!(
        "{} clients connected in {:.1} s: {:?}",
        opts.clients,
        opened.elapsed().as_secs_f64(),
        shared.view()
    );
    tokio::time::sleep(SETTLE).await;
    let before = bench.measure(opts.clients).await?;
    let first_fault = Instant::now();
    println!(
        "before: sluice fds {}, RSS {:.1} MiB, registry {:?}",
        before.fds,
        mib(before.rss_kib),
        before.registry
    );

    let mut phases = Vec::new();
    for cycle in 0..opts.cycles {
        for (f, fault) in Fault::ALL.into_iter().enumerate() {
            let x = (cycle + f) % BACKENDS;
            let report = bench.phase(cycle, fault, x, opts).await?;
            print_live(&report);
            phases.push(report);
        }
    }
    tokio::time::sleep(SETTLE).await;
    let after = bench.measure(opts.clients).await?;
    let last = Instant::now();

    // Ends of connections outside any fault (must be none).
    let outside: Vec<Event> = shared
        .events()
        .iter()
        .filter(|e| !phases.iter().any(|p| e.at >= p.start && e.at < p.end))
        .cloned()
        .collect();
    let warnings = log_warnings(&bench.dir.join("sluice.log"));

    // Stop: clients close cleanly, then sluice gets SIGTERM.
    shared.stop.cancel();
    let closing = Instant::now();
    let _ = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(tasks),
    )
    .await;
    let clients_closed = closing.elapsed();
    bench.procs.sluice.sigterm()?;
    let exit = bench.procs.sluice.wait_exit(Duration::from_secs(15))?;

    let ok = print_report(
        opts,
        &phases,
        &before,
        &after,
        &outside,
        &warnings,
        last - first_fault,
    );
    println!(
        "clients closed in {:.1} s; sluice on SIGTERM: {}",
        clients_closed.as_secs_f64(),
        exit.map_or("still running after 15 s (killed)".to_string(), |s| s
            .to_string())
    );
    // `bench` (with every child process) is dropped here.
    drop(bench);
    Ok(ok)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn print_live(p: &PhaseReport) {
    println!(
        "cycle {} {} b{}: {} affected, {} disconnected, {} unaffected disturbed, recovered in {:.1} s",
        p.cycle + 1,
        p.fault.name(),
        p.backend + 1,
        p.affected,
        p.disconnected,
        p.disturbed.len(),
        p.recovered.as_secs_f64()
    );
}

/// sluice's warn/error log lines, by message (timestamps cut off).
fn log_warnings(path: &std::path::Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(pos) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let msg: String = line[pos..].chars().take(160).collect();
        *out.entry(msg).or_default() += 1;
    }
    out
}

fn print_report(
    opts: &Options,
    phases: &[PhaseReport],
    before: &Snapshot,
    after: &Snapshot,
    outside: &[Event],
    warnings: &BTreeMap<String, usize>,
    faults_took: Duration,
) -> bool {
    let mut broken: Vec<String> = Vec::new();
    for cycle in 0..opts.cycles {
        println!();
        println!("cycle {}", cycle + 1);
        println!(
            "fault   | on | affected | closed | lost | reconnect p50/p99/max ms | failed tries | landed b1/b2/b3 | max echo ms affected | unaffected: closed | stalled | max echo ms | recovered s"
        );
        for p in phases.iter().filter(|p| p.cycle == cycle) {
            println!(
                "{:<7} | b{} | {:>8} | {:>6} | {:>4} | {:>24} | {:>12} | {:>15} | {:>20} | {:>18} | {:>7} | {:>11} | {:>11.1}",
                p.fault.name(),
                p.backend + 1,
                p.affected,
                p.disconnected,
                p.lost,
                format!(
                    "{}/{}/{}",
                    ms(percentile(&p.reconnects, 0.5)),
                    ms(percentile(&p.reconnects, 0.99)),
                    ms(p.reconnects.last().copied().unwrap_or_default())
                ),
                p.failed_attempts,
                format!("{}/{}/{}", p.landed[0], p.landed[1], p.landed[2]),
                ms(p.max_rtt_affected),
                p.disturbed.len(),
                p.stalled,
                ms(p.max_rtt_unaffected),
                p.recovered.as_secs_f64()
            );
        }
        for p in phases.iter().filter(|p| p.cycle == cycle) {
            let kinds: Vec<String> = p.kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            println!(
                "  {} b{}: affected saw {}; registry after {:?}; sluice at the end: {} fds, RSS {:.1} MiB",
                p.fault.name(),
                p.backend + 1,
                if kinds.is_empty() {
                    "no close".to_string()
                } else {
                    kinds.join(", ")
                },
                p.registry,
                p.fds,
                mib(p.rss_kib)
            );
            if !p.failures.is_empty() {
                let failures: Vec<String> = p
                    .failures
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect();
                println!(
                    "  {} b{}: failed connection attempts: {}",
                    p.fault.name(),
                    p.backend + 1,
                    failures.join(", ")
                );
            }
            if let Some(s) = &p.stop {
                println!(
                    "  {} b{}: held {:.1} s, admin saw it as {}; {} flood clients wrote {:.1} MiB; sluice RSS {:.1} MiB before, max {:.1} MiB during the hold ({} samples, +{:.1} MiB); every echo back {:.2} s after SIGCONT",
                    p.fault.name(),
                    p.backend + 1,
                    opts.hold.as_secs_f64(),
                    s.seen_as,
                    s.flood_clients,
                    s.flood_written as f64 / (1 << 20) as f64,
                    mib(s.rss_before_kib),
                    mib(s.rss_max_kib),
                    s.rss_samples,
                    mib(s.rss_max_kib.saturating_sub(s.rss_before_kib)),
                    s.caught_up.as_secs_f64()
                );
            }
            for e in p.disturbed.iter().take(5) {
                println!(
                    "  !! unaffected client {} on b{} ended: {} ({} lost)",
                    e.client,
                    e.backend + 1,
                    e.kind,
                    e.lost
                );
            }
            let who = format!(
                "cycle {} {} b{}",
                p.cycle + 1,
                p.fault.name(),
                p.backend + 1
            );
            if !p.disturbed.is_empty() {
                broken.push(format!(
                    "{who}: {} unaffected connections ended",
                    p.disturbed.len()
                ));
            }
            if p.stalled > 0 {
                broken.push(format!(
                    "{who}: {} unaffected clients missing echoes",
                    p.stalled
                ));
            }
            if p.fault == Fault::Stop && (p.disconnected > 0 || p.lost > 0) {
                println!("  note: the stopped backend's clients were closed or lost messages");
            }
        }
    }
    for e in outside.iter().take(5) {
        println!(
            "  !! client {} on b{} ended outside a fault: {}",
            e.client,
            e.backend + 1,
            e.kind
        );
    }
    if !outside.is_empty() {
        broken.push(format!(
            "{} connections ended outside any fault",
            outside.len()
        ));
    }

    let rss_allowed = ((before.rss_kib as f64 * RSS_TOLERANCE) as u64).max(RSS_TOLERANCE_MIN_KIB);
    let rss_ok = after.rss_kib <= before.rss_kib + rss_allowed;
    let fds_ok = after.fds == before.fds;
    let total = |c: &[u64; BACKENDS]| c.iter().sum::<u64>();
    let registry_ok = total(&after.registry) == total(&before.registry)
        && after.registry == after.clients
        && before.registry == before.clients;
    if !fds_ok {
        broken.push(format!(
            "sluice fds {} after, {} before",
            after.fds, before.fds
        ));
    }
    if !registry_ok {
        broken.push(format!(
            "registry {:?} after (clients {:?}), {:?} before (clients {:?})",
            after.registry, after.clients, before.registry, before.clients
        ));
    }
    // RSS is reported against its tolerance but does not fail the run:
    // the allocator's high-water mark is not a leak by itself (the per-phase
    // figures show whether it keeps climbing).
    let mut warnings_out = Vec::new();
    if !rss_ok {
        warnings_out.push(format!(
            "sluice RSS {:.1} MiB after, {:.1} MiB before: over the tolerance of +{:.1} MiB",
            mib(after.rss_kib),
            mib(before.rss_kib),
            mib(rss_allowed)
        ));
    }

    let all = |f: Fault| phases.iter().filter(move |p| p.fault == f);
    println!();
    println!(
        "summary: {} faults over {:.0} s, {} clients",
        phases.len(),
        faults_took.as_secs_f64(),
        opts.clients
    );
    println!(
        "fault   | faults | affected | closed | lost msgs | reconnect p50/p99/max ms | unaffected closed | stalled | max echo ms unaffected | max echo ms affected"
    );
    for f in Fault::ALL {
        let mut reconnects: Vec<Duration> = all(f).flat_map(|p| p.reconnects.clone()).collect();
        reconnects.sort();
        println!(
            "{:<7} | {:>6} | {:>8} | {:>6} | {:>9} | {:>24} | {:>17} | {:>7} | {:>22} | {:>20}",
            f.name(),
            all(f).count(),
            all(f).map(|p| p.affected).sum::<usize>(),
            all(f).map(|p| p.disconnected).sum::<usize>(),
            all(f).map(|p| p.lost).sum::<u64>(),
            format!(
                "{}/{}/{}",
                ms(percentile(&reconnects, 0.5)),
                ms(percentile(&reconnects, 0.99)),
                ms(reconnects.last().copied().unwrap_or_default())
            ),
            all(f).map(|p| p.disturbed.len()).sum::<usize>(),
            all(f).map(|p| p.stalled).sum::<usize>(),
            ms(all(f)
                .map(|p| p.max_rtt_unaffected)
                .max()
                .unwrap_or_default()),
            ms(all(f).map(|p| p.max_rtt_affected).max().unwrap_or_default()),
        );
        let mut kinds = BTreeMap::<&str, usize>::new();
        for p in all(f) {
            for (k, n) in &p.kinds {
                *kinds.entry(k).or_default() += n;
            }
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!(
            "        affected saw: {}",
            if kinds.is_empty() {
                "no close".into()
            } else {
                kinds.join(", ")
            }
        );
    }
    let stop_growth = all(Fault::Stop)
        .filter_map(|p| p.stop.as_ref())
        .map(|s| s.rss_max_kib.saturating_sub(s.rss_before_kib))
        .max()
        .unwrap_or(0);
    let flood = all(Fault::Stop)
        .filter_map(|p| p.stop.as_ref())
        .map(|s| s.flood_written)
        .max()
        .unwrap_or(0);
    println!();
    println!(
        "                 | before first fault | after last (+{} s) | check",
        SETTLE.as_secs()
    );
    println!(
        "sluice fds       | {:>18} | {:>17} | {}",
        before.fds,
        after.fds,
        if fds_ok { "equal" } else { "DIFFERENT" }
    );
    println!(
        "sluice RSS MiB   | {:>18.1} | {:>17.1} | {:+.1} MiB, tolerance +{:.1} MiB (max(+{:.0} %, +{} MiB)): {}",
        mib(before.rss_kib),
        mib(after.rss_kib),
        (after.rss_kib as f64 - before.rss_kib as f64) / 1024.0,
        mib(rss_allowed),
        RSS_TOLERANCE * 100.0,
        RSS_TOLERANCE_MIN_KIB / 1024,
        if rss_ok { "ok" } else { "OVER" }
    );
    println!(
        "registry ws      | {:>18} | {:>17} | {}",
        format!("{} {:?}", total(&before.registry), before.registry),
        format!("{} {:?}", total(&after.registry), after.registry),
        if registry_ok {
            "equal totals, = clients' view"
        } else {
            "DIFFERENT"
        }
    );
    println!(
        "clients' view    | {:>18} | {:>17} |",
        format!("{} {:?}", total(&before.clients), before.clients),
        format!("{} {:?}", total(&after.clients), after.clients),
    );
    println!(
        "sluice RSS during SIGSTOP: at most +{:.1} MiB while up to {:.1} MiB were flooded towards the stopped backend",
        mib(stop_growth),
        flood as f64 / (1 << 20) as f64
    );
    if !warnings.is_empty() {
        println!("sluice warnings/errors in its log:");
        for (msg, n) in warnings {
            println!("  {n} x {msg}");
        }
    }
    println!();
    println!("fault.fds_before = {}", before.fds);
    println!("fault.fds_after = {}", after.fds);
    println!("fault.rss_before_kib = {}", before.rss_kib);
    println!("fault.rss_after_kib = {}", after.rss_kib);
    println!("fault.registry_before = {}", total(&before.registry));
    println!("fault.registry_after = {}", total(&after.registry));
    println!(
        "fault.unaffected_disturbed = {}",
        phases.iter().map(|p| p.disturbed.len()).sum::<usize>() + outside.len()
    );
    println!("fault.stop_rss_growth_kib = {stop_growth}");
    println!();
    for w in &warnings_out {
        println!("WARNING: {w}");
    }
    if broken.is_empty() {
        println!(
            "RESULT: ok (sluice stayed up; no unaffected client disturbed; fds and registry back)"
        );
        true
    } else {
        println!("RESULT: FAILED");
        for b in &broken {
            println!("  - {b}");
        }
        false
    }
}
