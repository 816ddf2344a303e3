//! `sluice demo`: three echo backends and a balancer in one process.
//!
//! Owns the demo backends: each is a real HTTP/1.1 + WebSocket server on a
//! loopback port. A WebSocket gets `connected to NAME` as its first message,
//! then every message back. `GET /` is a small page to try it from a browser;
//! other paths answer with what the backend saw (request line, headers,
//! body), which shows the forwarded headers sluice adds. The integration
//! tests use the same backends. `clients` simulates chat clients and
//! `rolling_restart` restarts the demo backends through sluice's own
//! rollout, so that a newcomer can watch both on the dashboard.

pub mod clients;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::{AdminConfig, BackendConfig, Config, ListenerConfig, PoolConfig};

use crate::config::{CertSource, TlsSettings};

const PAGE: &str = include_str!("page.html");

/// Counters a demo backend keeps about what it served.
#[derive(Debug, Default)]
pub struct EchoStats {
    /// TCP connections accepted.
    pub tcp_accepted: AtomicUsize,
    /// HTTP requests answered (not counting upgrades).
    pub http_requests: AtomicUsize,
    /// WebSockets accepted.
    pub ws_accepted: AtomicUsize,
    /// WebSockets open now.
    pub ws_open: AtomicUsize,
    /// When each WebSocket was accepted (the first 100,000).
    pub accept_times: std::sync::Mutex<Vec<std::time::Instant>>,
    /// `/health` answers 503 when false.
    pub unhealthy: std::sync::atomic::AtomicBool,
    /// Each WebSocket echo waits a random time in this range, in ms (0, 0:
    /// none), like an app that takes time to answer a request.
    pub reply_delay_ms: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
}

/// A demo backend: HTTP echo and WebSocket echo on one port.
pub struct EchoBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub stats: Arc<EchoStats>,
    stop: CancellationToken,
}

impl EchoBackend {
    /// Starts a backend called `name` on `bind` (port 0 for any).
    pub async fn start(name: &str, bind: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(EchoStats::default());
        let stop = CancellationToken::new();
        let name = name.to_string();
        tokio::spawn(accept_loop(
            listener,
            name.clone(),
            stats.clone(),
            stop.clone(),
        ));
        Ok(Self {
            name,
            addr,
            stats,
            stop,
        })
    }

    /// WebSockets open now.
    pub fn ws_open(&self) -> usize {
        self.stats.ws_open.load(Ordering::SeqCst)
    }

    /// Makes each WebSocket echo wait between `min` and `max` (at random).
    pub fn set_reply_delay(&self, min: std::time::Duration, max: std::time::Duration) {
        let (lo, hi) = &self.stats.reply_delay_ms;
        lo.store(min.as_millis() as u64, Ordering::SeqCst);
        hi.store(
            max.as_millis().max(min.as_millis()) as u64,
            Ordering::SeqCst,
        );
    }

    /// Makes `/health` answer 503 (false) or 200 (true).
    pub fn set_healthy(&self, healthy: bool) {
        self.stats.unhealthy.store(!healthy, Ordering::SeqCst);
    }

    /// WebSockets accepted at or after `since`.
    pub fn accepted_since(&self, since: std::time::Instant) -> Vec<std::time::Instant> {
        let times = self
            .stats
            .accept_times
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        times.iter().copied().filter(|t| *t >= since).collect()
    }

    /// Stops accepting and drops every connection, as a crashed server would.
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    stats: Arc<EchoStats>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(_) => continue,
            },
        };
        if stop.is_cancelled() {
            // Killed meanwhile: a dead server answers nothing.
            return;
        }
        stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
        let name = name.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc_stop = stop.clone();
            let service = service_fn(move |req| {
                let name = name.clone();
                let stats = stats.clone();
                let stop = svc_stop.clone();
                async move { Ok::<_, Infallible>(serve_request(req, name, stats, stop).await) }
            });
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

async fn serve_request(
    mut req: Request<Incoming>,
    name: String,
    stats: Arc<EchoStats>,
    stop: CancellationToken,
) -> Response<Full<Bytes>> {
    let wants_ws = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if wants_ws {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
            return text(
                StatusCode::BAD_REQUEST,
                "missing Sec-WebSocket-Key\n".into(),
            );
        };
        let accept = derive_accept_key(key.as_bytes());
        // Take the first subprotocol the client offers.
        let protocol = req
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|p| p.trim().to_string());
        let upgrade = hyper::upgrade::on(&mut req);
        let ws_name = name.clone();
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            stats.ws_accepted.fetch_add(1, Ordering::SeqCst);
            {
                let mut times = stats.accept_times.lock().unwrap_or_else(|p| p.into_inner());
                if times.len() < 100_000 {
                    times.push(std::time::Instant::now());
                }
            }
            stats.ws_open.fetch_add(1, Ordering::SeqCst);
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = echo(ws, &ws_name, &stats) => {}
            }
            stats.ws_open.fetch_sub(1, Ordering::SeqCst);
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(v) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
        h.insert(
            "x-backend",
            HeaderValue::from_str(&name).unwrap_or(HeaderValue::from_static("demo")),
        );
        return resp;
    }
    stats.http_requests.fetch_add(1, Ordering::SeqCst);
    let mut resp = match req.uri().path() {
        "/" => {
            let mut resp = text(StatusCode::OK, PAGE.to_string());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        "/health" if stats.unhealthy.load(Ordering::SeqCst) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n".into())
        }
        "/health" => text(StatusCode::OK, "ok\n".into()),
        _ => {
            // Say what this backend saw: request line, headers, then the body.
            let mut seen = format!("{name}: {} {}\n", req.method(), req.uri());
            for (k, v) in req.headers() {
                seen.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            seen.push('\n');
            let body = match req.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => return text(StatusCode::BAD_REQUEST, "unreadable body\n".into()),
            };
            let mut out = seen.into_bytes();
            out.extend_from_slice(&body);
            let mut resp = Response::new(Full::new(Bytes::from(out)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        }
    };
    if let Ok(v) = HeaderValue::from_str(&name) {
        resp.headers_mut().insert("x-backend", v);
    }
    resp
}

async fn echo<S>(mut ws: WebSocketStream<S>, name: &str, stats: &EchoStats)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if ws
        .send(Message::text(format!("connected to {name}")))
        .await
        .is_err()
    {
        return;
    }
    while let Some(msg) = ws.next().await {
        let reply = match msg {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => m,
            // After a Close, keep reading: that sends tungstenite's reply and
            // ends the stream once the handshake is done.
            Ok(_) => continue,
            Err(_) => break,
        };
        let (lo, hi) = (
            stats.reply_delay_ms.0.load(Ordering::Relaxed),
            stats.reply_delay_ms.1.load(Ordering::Relaxed),
        );
        if hi > 0 {
            let ms = rand::random_range(lo..=hi);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if let Err(error) = ws.send(reply).await {
            debug!(%error, "demo echo send failed");
            break;
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// The demo's config: one listener on `bind` and, with `tls`, a TLS
/// listener there with that certificate; one pool of `backends`.
/// `window` is the pool's drain window.
pub fn config(
    bind: SocketAddr,
    tls: Option<(SocketAddr, CertSource)>,
    backends: &[EchoBackend],
    window: std::time::Duration,
) -> Config {
    let backends = backends
        .iter()
        .map(|b| BackendConfig {
            name: b.name.clone(),
            address: b.addr,
            weight: 1,
            tls: None,
        })
        .collect();
    // 4,096 connections per listener: the two stay within a 20,000
    // file-descriptor limit, so the demo starts without a warning.
    let mut plain = ListenerConfig::new("demo", bind, 0);
    plain.max_connections = 4096;
    let mut listeners = vec![plain];
    if let Some((tls_bind, cert)) = tls {
        let mut listener = ListenerConfig::new("demo-tls", tls_bind, 0);
        listener.max_connections = 4096;
        listener.tls = Some(TlsSettings {
            default: cert,
            sni: Vec::new(),
            handshake_timeout: std::time::Duration::from_secs(10),
            acme: Vec::new(),
        });
        listeners.push(listener);
    }
    Config {
        listeners,
        // The admin API on any free loopback port; the token is generated.
        admin: Some(AdminConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            None,
        )),
        pools: vec![demo_pool(backends, window)],
        shutdown_timeout: Config::DEFAULT_SHUTDOWN_TIMEOUT,
        worker_threads: 0,
        upgrade_timeout: Config::DEFAULT_UPGRADE_TIMEOUT,
        log: crate::config::LogConfig::default(),
        cluster: None,
        path: None,
    }
}

/// The demo pool: paced so that a drain, a rollout and the rebalancing
/// after it can be watched on the dashboard within a minute or so (health
/// checks every second, a short drain window, a rebalance every 5 s).
fn demo_pool(backends: Vec<BackendConfig>, window: std::time::Duration) -> PoolConfig {
    use std::time::Duration;
    let mut pool = PoolConfig::new("demo", backends);
    pool.health = Some(crate::config::HealthConfig {
        path: Some("/health".into()),
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        rise: 1,
        fall: 2,
        expect_status: None,
    });
    pool.drain.window = window;
    pool.rebalance.interval = Duration::from_secs(5);
    pool.rebalance.min_excess = 2;
    pool.rebalance.max_shed_per_interval = 25;
    pool
}

/// Restarts the demo backends one at a time through sluice's rollout
/// (`ctl::rollout_with`, the steps of `sluice ctl rollout`): each is
/// drained, stopped, started again on its address a second later, waited
/// for until healthy, put back, and the pool waited for until level.
pub async fn rolling_restart(
    admin: &crate::admin::client::AdminClient,
    backends: &std::sync::Mutex<Vec<EchoBackend>>,
    pacing: &crate::ctl::Pacing,
) -> Result<(), crate::ctl::CtlError> {
    crate::ctl::rollout_with(admin, "demo", pacing, |step, b| {
        let name = b.name.clone();
        let killed = {
            let list = backends.lock().unwrap_or_else(|p| p.into_inner());
            list.iter().find(|e| e.name == name).map(|e| {
                e.kill();
                e.addr
            })
        };
        println!("{step}: stopped; starting it again");
        async move {
            let addr = killed.ok_or_else(|| format!("no demo backend {name}"))?;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let fresh = restart_on(&name, addr).await?;
            let mut list = backends.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = list.iter_mut().find(|e| e.name == name) {
                *slot = fresh;
            }
            Ok(())
        }
    })
    .await
}

/// A new demo backend on `addr`, once the old one's socket is gone.
async fn restart_on(name: &str, addr: SocketAddr) -> Result<EchoBackend, String> {
    let mut tries = 0;
    loop {
        match EchoBackend::start(name, addr).await {
            Ok(backend) => return Ok(backend),
            Err(e) if tries < 50 => {
                tries += 1;
                debug!(error = %e, "demo backend {name}: its address is not free yet");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("cannot start it again on {addr}: {e}")),
        }
    }
}

/// A self-signed certificate for localhost and 127.0.0.1, made now.
pub fn self_signed() -> Result<CertSource, DemoError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| DemoError::Certificate(e.to_string()))?;
    Ok(CertSource::Pem {
        cert: made.cert.pem(),
        key: made.signing_key.serialize_pem(),
    })
}

/// Starts three demo backends and sluice in front of them on `bind` (and
/// with TLS on `tls_bind`, with a self-signed certificate).
pub async fn start(
    bind: SocketAddr,
    tls_bind: Option<SocketAddr>,
    window: std::time::Duration,
    shutdown: CancellationToken,
) -> Result<(Vec<EchoBackend>, crate::Running), DemoError> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut backends = Vec::new();
    for i in 1..=3 {
        let name = format!("demo-{i}");
        let backend = EchoBackend::start(&name, loopback)
            .await
            .map_err(|source| DemoError::Backend { name, source })?;
        backends.push(backend);
    }
    let tls = match tls_bind {
        Some(addr) => Some((addr, self_signed()?)),
        None => None,
    };
    let running = crate::start(config(bind, tls, &backends, window), shutdown).await?;
    Ok((backends, running))
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("starting demo backend {name}")]
    Backend { name: String, source: io::Error },
    #[error("making the demo certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    Start(#[from] crate::StartError),
}
