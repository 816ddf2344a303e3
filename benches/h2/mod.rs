//! ws_bench's HTTP/2 part, over each proxy's TLS listener (ALPN h2):
//!
//! - requests/s and p99: [`H2_CONNS`] h2 connections with
//!   [`H2_STREAMS`] streams each in a closed loop (GET, small answer);
//! - WebSocket echo over h2 (RFC 8441; sluice and HAProxy: nginx does not
//!   do it) against the same over TLS HTTP/1.1: [`super::ECHO_CONNS`]
//!   WebSockets, 64 B messages, msg/s and p99;
//! - sluice's memory per idle WebSocket over h2 (100 per connection)
//!   against over TLS HTTP/1.1 (one connection each).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{ECHO_CONNS, ECHO_PAYLOAD, ECHO_TIMEOUT, OPEN_CONCURRENCY, OPEN_TIMEOUT};

/// h2 connections of the request load.
pub const H2_CONNS: usize = 4;
/// Streams in flight on each.
pub const H2_STREAMS: usize = 25;
/// WebSockets per h2 connection (sluice's default stream limit).
const WS_PER_H2_CONN: usize = 100;
/// Round-trip times kept for the p99, per task.
const MAX_SAMPLES_PER_TASK: usize = 200_000;

/// What a closed-loop run did.
pub struct Rate {
    pub per_s: f64,
    pub p99_ms: f64,
}

impl Rate {
    fn from(count: u64, duration: Duration, mut micros: Vec<u32>) -> Self {
        micros.sort_unstable();
        let p99 = micros
            .get((micros.len() * 99 / 100).min(micros.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0);
        Self {
            per_s: count as f64 / duration.as_secs_f64(),
            p99_ms: f64::from(p99) / 1000.0,
        }
    }
}

/// A client of ws_bench's own (trusting only `cert`, no resumption)
/// that offers `alpn`.
pub fn connector(cert: &CertificateDer<'static>, alpn: &[&[u8]]) -> Result<TlsConnector> {
    Ok(TlsConnector::from(super::tls_client_config(cert, alpn)?))
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls(addr: SocketAddr, connector: &TlsConnector) -> Result<Tls> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(super::TLS_SERVER_NAME).context("server name")?;
    connector
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS to {addr}"))
}

/// An HTTP/2 connection to `addr` (the proxy must pick h2 by ALPN).
async fn h2(addr: SocketAddr, connector: &TlsConnector) -> Result<SendRequest<Full<Bytes>>> {
    let tls = tls(addr, connector).await?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        bail!("{addr} did not choose h2 by ALPN");
    }
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .context("h2 handshake")?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Requests per second and p99 over HTTP/2 through `addr` for `duration`.
pub async fn requests(
    addr: SocketAddr,
    connector: &TlsConnector,
    duration: Duration,
) -> Result<Rate> {
    let mut senders = Vec::new();
    for _ in 0..H2_CONNS {
        senders.push(h2(addr, connector).await?);
    }
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    for sender in &senders {
        for _ in 0..H2_STREAMS {
            let mut sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0u64;
                let mut micros = Vec::new();
                while tokio::time::Instant::now() < deadline {
                    let started = Instant::now();
                    let req = hyper::Request::get("https://localhost/bench")
                        .body(Full::new(Bytes::new()))
                        .context("request")?;
                    let resp = tokio::time::timeout(ECHO_TIMEOUT, sender.send_request(req))
                        .await
                        .context("no answer in time")?
                        .context("request failed")?;
                    if !resp.status().is_success() {
                        bail!("answered {}", resp.status());
                    }
                    resp.into_body().collect().await.context("body")?;
                    if tokio::time::Instant::now() <= deadline {
                        done += 1;
                        if micros.len() < MAX_SAMPLES_PER_TASK {
                            micros.push(started.elapsed().as_micros() as u32);
                        }
                    }
                }
                Ok::<_, anyhow::Error>((done, micros))
            }));
        }
    }
    collect(tasks, duration).await
}

/// A load task: the round trips it finished and their times (µs).
type LoadTask = tokio::task::JoinHandle<Result<(u64, Vec<u32>)>>;

async fn collect(tasks: Vec<LoadTask>, duration: Duration) -> Result<Rate> {
    let mut count = 0;
    let mut micros = Vec::new();
    for task in tasks {
        let (done, m) = task.await.context("load task panicked")??;
        count += done;
        micros.extend(m);
    }
    Ok(Rate::from(count, duration, micros))
}

pub type H2Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;
pub type TlsWs = WebSocketStream<Tls>;

/// A WebSocket over `sender`'s h2 connection, past its greeting.
async fn ws_over(sender: &SendRequest<Full<Bytes>>) -> Result<H2Ws> {
    let open = async {
        let mut req = hyper::Request::connect("https://localhost/ws")
            .header("sec-websocket-version", "13")
            .body(Full::new(Bytes::new()))
            .context("request")?;
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let resp = sender
            .clone()
            .send_request(req)
            .await
            .context("extended CONNECT")?;
        if resp.status() != 200 {
            bail!("extended CONNECT answered {}", resp.status());
        }
        let upgraded = hyper::upgrade::on(resp).await.context("upgrade")?;
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        greeting(&mut ws).await?;
        Ok(ws)
    };
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .context("no WebSocket over h2 in time")?
}

/// A WebSocket over TLS HTTP/1.1 to `addr`, past its greeting.
async fn wss(addr: SocketAddr, connector: &TlsConnector) -> Result<TlsWs> {
    let open = async {
        let tls = tls(addr, connector).await?;
        let (mut ws, _) = tokio_tungstenite::client_async(super::WSS_URL, tls)
            .await
            .context("upgrade")?;
        greeting(&mut ws).await?;
        Ok(ws)
    };
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .context("no wss in time")?
}

async fn greeting<S>(ws: &mut WebSocketStream<S>) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match ws.next().await.context("closed before the greeting")?? {
        Message::Text(t) if t.starts_with("connected to ") => Ok(()),
        other => bail!("unexpected greeting: {other:?}"),
    }
}

/// `n` WebSockets over h2 connections of [`WS_PER_H2_CONN`] each; the
/// connections must be kept too.
pub async fn open_h2_ws(
    addr: SocketAddr,
    connector: &TlsConnector,
    n: usize,
) -> Result<(Vec<SendRequest<Full<Bytes>>>, Vec<H2Ws>)> {
    let mut senders = Vec::new();
    let mut all = Vec::new();
    while all.len() < n {
        let sender = h2(addr, connector).await?;
        let k = WS_PER_H2_CONN.min(n - all.len());
        let more: Vec<H2Ws> = stream::iter(0..k)
            .map(|_| ws_over(&sender))
            .buffer_unordered(OPEN_CONCURRENCY)
            .try_collect()
            .await?;
        all.extend(more);
        senders.push(sender);
    }
    Ok((senders, all))
}

/// `n` WebSockets over TLS HTTP/1.1.
pub async fn open_wss(addr: SocketAddr, connector: &TlsConnector, n: usize) -> Result<Vec<TlsWs>> {
    stream::iter(0..n)
        .map(|_| wss(addr, connector))
        .buffer_unordered(OPEN_CONCURRENCY)
        .try_collect()
        .await
}

/// Echo msg/s and p99 over `conns`, each in a closed loop for `duration`.
pub async fn echo<S>(conns: Vec<WebSocketStream<S>>, duration: Duration) -> Result<Rate>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + duration;
    let payload = Bytes::from(vec![0x5a; ECHO_PAYLOAD]);
    let tasks = conns
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                let mut micros = Vec::new();
                while tokio::time::Instant::now() < deadline {
                    let started = Instant::now();
                    tokio::time::timeout(ECHO_TIMEOUT, super::round_trip(&mut ws, &payload))
                        .await
                        .context("no echo in time")??;
                    if tokio::time::Instant::now() <= deadline {
                        done += 1;
                        if micros.len() < MAX_SAMPLES_PER_TASK {
                            micros.push(started.elapsed().as_micros() as u32);
                        }
                    }
                }
                let _ = tokio::time::timeout(super::CLOSE_TIMEOUT, ws.close(None)).await;
                Ok::<_, anyhow::Error>((done, micros))
            })
        })
        .collect();
    collect(tasks, duration).await
}

/// Echo over [`ECHO_CONNS`] WebSockets over h2 (25 per connection).
pub async fn echo_h2(
    addr: SocketAddr,
    connector: &TlsConnector,
    duration: Duration,
) -> Result<Rate> {
    let mut senders = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..ECHO_CONNS / H2_STREAMS {
        let sender = h2(addr, connector).await?;
        for _ in 0..H2_STREAMS {
            conns.push(ws_over(&sender).await?);
        }
        senders.push(sender);
    }
    let rate = echo(conns, duration).await;
    drop(senders);
    rate
}

/// Echo over [`ECHO_CONNS`] WebSockets over TLS HTTP/1.1.
pub async fn echo_wss(
    addr: SocketAddr,
    connector: &TlsConnector,
    duration: Duration,
) -> Result<Rate> {
    let conns = open_wss(addr, connector, ECHO_CONNS).await?;
    echo(conns, duration).await
}
