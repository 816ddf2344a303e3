//! Real backends, a real sluice and real clients on loopback ports.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sluice::config::{AdminConfig, Algorithm, BackendConfig, Config, ListenerConfig, PoolConfig};

/// The admin token of test configs.
pub const ADMIN_TOKEN: &str = "test-token";
use sluice::demo::EchoBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

/// Fails a test that waits too long, instead of hanging CI.
pub async fn within<F: std::future::Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

/// Polls `cond` until it holds (or fails the test after `secs`).
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    within(secs, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Demo echo backends named `b1`, `b2`, ...
pub async fn echo_backends(n: usize) -> Vec<EchoBackend> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(
            EchoBackend::start(&format!("b{i}"), SocketAddr::from(LOOPBACK))
                .await
                .expect("backend starts"),
        );
    }
    out
}

/// A sluice in this process, with one listener and one pool.
pub struct Sluice {
    pub running: Option<sluice::Running>,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
}

/// A config with one listener on an ephemeral port and one pool of `addrs`.
pub fn config(addrs: &[SocketAddr]) -> Config {
    let backends = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| BackendConfig {
            name: format!("b{}", i + 1),
            address: *a,
            weight: 1,
            tls: None,
        })
        .collect();
    let mut pool = PoolConfig::new("app", backends);
    pool.algorithm = Algorithm::LeastConn;
    pool.connect_timeout = Duration::from_secs(2);
    pool.drain.close_timeout = Duration::from_secs(2);
    Config {
        listeners: vec![ListenerConfig::new("public", SocketAddr::from(LOOPBACK), 0)],
        pools: vec![pool],
        admin: Some(AdminConfig {
            bind: SocketAddr::from(LOOPBACK),
            token: Some(ADMIN_TOKEN.to_string()),
        }),
        shutdown_timeout: Duration::from_secs(5),
        worker_threads: 0,
    }
}

impl Sluice {
    pub async fn start(backends: &[&EchoBackend]) -> Self {
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        Self::with_config(config(&addrs)).await
    }

    pub async fn with_config(cfg: Config) -> Self {
        let shutdown = CancellationToken::new();
        let running = sluice::start(cfg, shutdown.clone())
            .await
            .expect("sluice starts");
        let addr = running.listeners[0].1;
        Self {
            running: Some(running),
            addr,
            shutdown,
        }
    }

    pub fn registry(&self) -> &Arc<sluice::registry::Registry> {
        &self.running.as_ref().expect("running").registry
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// A WebSocket client through sluice that accepts messages up to 64 MiB.
    pub async fn ws(&self, path: &str) -> Ws {
        ws_connect(&self.url(path)).await
    }

    /// Like `ws`, then reads the demo backend's greeting and returns its name.
    pub async fn ws_named(&self, path: &str) -> (Ws, String) {
        let mut ws = self.ws(path).await;
        let name = greeting(&mut ws).await;
        (ws, name)
    }

    /// Plain HTTP/1.1 client connection to sluice.
    pub async fn http(&self) -> HttpClient {
        HttpClient::connect(self.addr).await
    }

    /// Cancels and waits for sluice to finish.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            within(15, "sluice shutdown", running.wait()).await;
        }
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn big_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

pub async fn ws_connect(url: &str) -> Ws {
    let (ws, _) = within(
        10,
        "websocket connect",
        tokio_tungstenite::connect_async_with_config(url, Some(big_ws_config()), true),
    )
    .await
    .expect("websocket handshake through sluice");
    ws
}

/// Reads the demo backend's first message, `connected to NAME`.
pub async fn greeting(ws: &mut Ws) -> String {
    let msg = within(10, "greeting", ws.next())
        .await
        .expect("a message")
        .expect("no error");
    let text = msg.into_text().expect("text greeting").to_string();
    text.strip_prefix("connected to ")
        .expect("demo greeting")
        .to_string()
}

/// Sends `msg` and expects it back unchanged.
pub async fn echo(ws: &mut Ws, msg: Message) {
    ws.send(msg.clone()).await.expect("send");
    let back = within(30, "echo", ws.next())
        .await
        .expect("a message")
        .expect("no error");
    assert_eq!(back, msg, "echo differs");
}

/// An HTTP/1.1 client on one connection (keep-alive).
pub struct HttpClient {
    sender: SendRequest<Full<Bytes>>,
}

pub struct HttpReply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl HttpReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    /// The demo backend that answered.
    pub fn backend(&self) -> String {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to sluice");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self { sender }
    }

    pub async fn send(&mut self, req: hyper::Request<Full<Bytes>>) -> HttpReply {
        within(10, "http ready", self.sender.ready())
            .await
            .expect("connection usable");
        let resp = within(10, "http response", self.sender.send_request(req))
            .await
            .expect("response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = within(10, "http body", resp.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        HttpReply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str) -> HttpReply {
        let req = hyper::Request::get(path)
            .header("host", "sluice.test")
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.send(req).await
    }
}

/// What a raw backend saw of one upgrade.
#[derive(Debug, Default, Clone)]
pub struct RawSeen {
    /// The request head, as bytes on the wire.
    pub head: String,
    /// Bytes after the head.
    pub bytes: Vec<u8>,
}

/// A WebSocket backend that speaks the handshake by hand, then hands the
/// socket to `session`. It records the request head and every byte it reads.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<RawSeen>>>,
}

pub type Session = Arc<
    dyn Fn(
            TcpStream,
            Arc<Mutex<Vec<RawSeen>>>,
            usize,
        ) -> futures_util::future::BoxFuture<'static, ()>
        + Send
        + Sync,
>;

impl RawBackend {
    /// Answers 101 with `extra` headers, then runs `session`.
    pub async fn start(extra: &'static str, session: Session) -> Self {
        let listener = TcpListener::bind(SocketAddr::from(LOOPBACK))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<RawSeen>>> = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen2.clone();
                let session = session.clone();
                tokio::spawn(async move {
                    let head = read_head(&mut stream).await;
                    let key = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .starts_with("sec-websocket-key:")
                                .then(|| l[18..].trim().to_string())
                        })
                        .unwrap_or_default();
                    let index = {
                        let mut s = seen.lock().expect("lock");
                        s.push(RawSeen {
                            head: head.clone(),
                            bytes: Vec::new(),
                        });
                        s.len() - 1
                    };
                    let resp = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{extra}\r\n",
                        derive_accept_key(key.as_bytes())
                    );
                    if stream.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    session(stream, seen, index).await;
                });
            }
        });
        Self { addr, seen }
    }

    /// Echoes every byte back and records it.
    pub async fn echo(extra: &'static str) -> Self {
        Self::start(
            extra,
            Arc::new(
                |mut stream: TcpStream, seen: Arc<Mutex<Vec<RawSeen>>>, index: usize| {
                    Box::pin(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            seen.lock().expect("lock")[index]
                                .bytes
                                .extend_from_slice(&buf[..n]);
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    })
                },
            ),
        )
        .await
    }
}

/// Reads an HTTP head (through the blank line) byte by byte.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).to_string()
}

/// Opens a WebSocket by hand: returns the socket (after the 101 head) and
/// the response head.
pub async fn raw_ws_client(addr: SocketAddr, extra: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /raw HTTP/1.1\r\nHost: sluice.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let head = within(10, "101 head", read_head(&mut stream)).await;
    (stream, head)
}

/// One frame, as a client would send it (masked) or a server (unmasked).
pub fn frame(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![first_byte];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    if n < 126 {
        out.push(m | n as u8);
    } else if n <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Reads exactly `n` bytes.
pub async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    within(20, "read_exact", stream.read_exact(&mut buf))
        .await
        .expect("read");
    buf
}

impl Sluice {
    /// The admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.running
            .as_ref()
            .expect("running")
            .admin
            .as_ref()
            .expect("admin enabled")
            .addr
    }

    /// A client of the admin API with the test token.
    pub fn admin(&self) -> sluice::admin::client::AdminClient {
        sluice::admin::client::AdminClient {
            addr: self.admin_addr(),
            token: Some(ADMIN_TOKEN.to_string()),
        }
    }

    /// The admin API's status document.
    pub async fn status(&self) -> sluice::admin::api::Status {
        within(10, "admin status", self.admin().status())
            .await
            .expect("admin status")
    }

    /// One backend of pool `app` as the status document shows it.
    pub async fn backend_status(&self, name: &str) -> sluice::admin::api::Backend {
        self.status()
            .await
            .backend("app", name)
            .unwrap_or_else(|| panic!("no backend app/{name} in the status"))
            .clone()
    }

    /// Polls the status until backend `name` of pool `app` is in `state`
    /// (or fails the test after `secs`); returns it as then shown.
    pub async fn wait_backend_state(
        &self,
        secs: u64,
        name: &str,
        state: sluice::admin::api::BackendState,
    ) -> sluice::admin::api::Backend {
        within(secs, &format!("app/{name} {state}"), async {
            loop {
                let backend = self.backend_status(name).await;
                if backend.state == state {
                    return backend;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

/// What a chatting client saw.
#[derive(Debug, Default, Clone)]
pub struct ChatStats {
    /// Backends it was connected to, in order.
    pub backends: Vec<String>,
    /// Close frames it received: code and when.
    pub closes: Vec<(u16, std::time::Instant)>,
    /// When each connection ended, for any reason (Close frame, reset, EOF).
    pub disconnects: Vec<std::time::Instant>,
    /// Messages whose echo had not come when the connection closed, so they
    /// were sent again after reconnecting (a message sent while the close was
    /// on its way: a robust client resends what was not acknowledged).
    pub resent: u64,
    /// When each of those was sent again.
    pub resent_at: Vec<std::time::Instant>,
    /// Messages never echoed at all.
    pub lost: u64,
    /// Echoes received intact.
    pub echoed: u64,
    /// Echoes that did not match what was sent (cut or mixed up messages).
    pub wrong: u64,
}

/// A client that sends a numbered message every `every`, checks each echo,
/// and reconnects through `url` whenever the connection is closed, until
/// `stop`. A message not yet echoed when the connection closed is sent
/// again on the next connection.
pub async fn chat(url: String, every: Duration, stop: CancellationToken) -> ChatStats {
    let mut stats = ChatStats::default();
    let mut seq = 0u64;
    let mut unanswered: Option<String> = None;
    'connect: for _attempt in 0..1000 {
        if stop.is_cancelled() {
            break;
        }
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(big_ws_config()), true),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                stats
                    .backends
                    .push(t.as_str().trim_start_matches("connected to ").to_string());
            }
            _ => continue,
        }
        loop {
            let text = match unanswered.clone() {
                Some(text) => {
                    stats.resent += 1;
                    stats.resent_at.push(std::time::Instant::now());
                    text
                }
                None => {
                    tokio::select! {
                        () = stop.cancelled() => {
                            let _ = ws.close(None).await;
                            break 'connect;
                        }
                        () = tokio::time::sleep(every) => {}
                        msg = ws.next() => {
                            // Only a Close can come while no echo is awaited.
                            stats.disconnects.push(std::time::Instant::now());
                            if let Some(Ok(Message::Close(frame))) = msg {
                                stats.closes.push((frame.map_or(1005, |f| u16::from(f.code)), std::time::Instant::now()));
                                finish_close(&mut ws).await;
                            }
                            continue 'connect;
                        }
                    }
                    seq += 1;
                    format!("msg {seq}")
                }
            };
            unanswered = Some(text.clone());
            if ws.send(Message::text(text.clone())).await.is_err() {
                stats.disconnects.push(std::time::Instant::now());
                continue 'connect;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => {
                        stats.echoed += 1;
                        unanswered = None;
                        break;
                    }
                    Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) => {
                        stats.wrong += 1;
                        unanswered = None;
                        break;
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        stats.closes.push((
                            frame.map_or(1005, |f| u16::from(f.code)),
                            std::time::Instant::now(),
                        ));
                        finish_close(&mut ws).await;
                        continue 'connect;
                    }
                    Ok(Some(Ok(_))) => continue,
                    _ => continue 'connect,
                }
            }
        }
    }
    stats.lost = u64::from(unanswered.is_some());
    stats
}

/// Sums over chatting clients.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChatTotals {
    pub lost: u64,
    pub wrong: u64,
    pub resent: u64,
    pub echoed: u64,
    pub closes: usize,
}

/// Stops the clients and sums what they saw.
pub async fn finish_chat(
    stop: &CancellationToken,
    clients: Vec<tokio::task::JoinHandle<ChatStats>>,
) -> (Vec<ChatStats>, ChatTotals) {
    stop.cancel();
    let stats: Vec<ChatStats> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .map(|r| r.expect("client task"))
        .collect();
    let totals = stats.iter().fold(ChatTotals::default(), |t, s| ChatTotals {
        lost: t.lost + s.lost,
        wrong: t.wrong + s.wrong,
        resent: t.resent + s.resent,
        echoed: t.echoed + s.echoed,
        closes: t.closes + s.closes.len(),
    });
    (stats, totals)
}

/// `n` chatting clients through `sluice`, each sending every `every`.
pub fn chatters(
    sluice: &Sluice,
    n: usize,
    every: Duration,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<ChatStats>> {
    (0..n)
        .map(|_| tokio::spawn(chat(sluice.url("/ws"), every, stop.clone())))
        .collect()
}

/// Lets tungstenite answer a Close and see the end of the stream.
async fn finish_close(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while ws.next().await.is_some() {}
    })
    .await;
}

/// A backend that reads each request head (never a body) and answers with
/// what `answer` returns for it (called as the head arrives), after
/// `delay`; `None` closes the connection without answering.
pub async fn scripted_backend(
    delay: Duration,
    answer: impl Fn(&str) -> Option<&'static [u8]> + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from(LOOPBACK))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                loop {
                    let head = read_head(&mut s).await;
                    if head.is_empty() {
                        return;
                    }
                    let answer = answer(&head);
                    tokio::time::sleep(delay).await;
                    let Some(bytes) = answer else {
                        let _ = s.shutdown().await;
                        return;
                    };
                    if s.write_all(bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
