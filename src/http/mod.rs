//! The HTTP side of a client connection.
//!
//! Owns one client connection's HTTP/1.1 (hyper; HTTP/2 in `h2`): requests are forwarded to
//! a backend of the listener's pool over reused connections; a WebSocket
//! upgrade is forwarded on a fresh connection and, on 101, both sockets are
//! handed to a [`Tunnel`]. Adds forwarded headers, strips hop-by-hop ones,
//! and answers errors itself: 400 for a malformed request (hyper also sends
//! 400/414/431 for bad request heads), 502 when a backend fails, 503 with
//! `Retry-After` when the pool has no backend to offer.

mod access;
mod affinity;
pub mod body;
pub mod challenge;
pub mod h2;
mod headers;
mod ws_h2;

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, Span, debug, debug_span, field, warn};

use access::Started;
pub use body::ProxyBody;
use body::Reuse;

use crate::config::ListenerConfig;
use crate::conn_limit::{ClientLimit, ConnPermit};
use crate::error_chain::chain;
use crate::proxy_protocol::Client;
use crate::registry::Registry;
use crate::tunnel::{self, Tunnel, TunnelIo};
use crate::upstream::{BackendStream, Blame, RequestBody, Upstream, UpstreamError};

/// What every connection of one listener shares, in one config
/// generation: a reload makes a new one, which the listener's next
/// connections, and the next requests of its open connections, use.
pub struct ListenerCtx {
    /// The listener's id, the same across reloads (`ConnControl::listener`).
    pub id: u32,
    pub cfg: ListenerConfig,
    pub upstream: Arc<Upstream>,
    pub registry: Arc<Registry>,
    /// Tunnels are tracked here so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Client connections accepted by this listener.
    pub accepted: Counter,
    /// TLS termination, when the listener has it.
    pub tls: Option<crate::tls::Tls>,
    /// TLS handshakes that failed or timed out.
    pub handshake_errors: Counter,
    /// Connections closed for a missing, invalid or unallowed PROXY header.
    pub proxy_rejected: Counter,
    /// Live connections per client address, when the listener limits them.
    pub client_limit: Option<Arc<ClientLimit>>,
    /// Requests answered 429 for their client's connection count.
    pub client_limited: Counter,
    /// ACME HTTP-01 answers, on a plain listener of a process that has an
    /// `http-01` ACME section.
    pub http01: Option<challenge::Http01Answers>,
    /// Client connections served over HTTP/2.
    pub h2_connections: Counter,
    /// Requests (streams) received over HTTP/2.
    pub h2_streams: Counter,
    /// WebSockets open over HTTP/2 (RFC 8441).
    pub h2_websockets: prometheus_client::metrics::gauge::Gauge,
    /// The listener's places under `max_connections`: a WebSocket over
    /// HTTP/2 takes one of its own, as if it were a connection.
    pub limit: Arc<tokio::sync::Semaphore>,
    /// Where each request and WebSocket gets its line, when it is on.
    pub access: Option<crate::access_log::AccessLog>,
}

impl ListenerCtx {
    /// The scheme for forwarded headers, `None` when they are off.
    fn forwarded(&self) -> Option<&'static str> {
        self.cfg
            .forwarded_headers
            .then_some(if self.tls.is_some() { "https" } else { "http" })
    }
}

/// A listener's current context, swapped by a reload.
pub type ListenerCell = Arc<ArcSwap<ListenerCtx>>;

/// Serves one client connection until it closes, or until `shutdown`, after
/// which in-flight requests (or the first one, on a connection that has not
/// sent one yet) finish and the connection closes. Each request
/// takes the listener's context as it is then (`cell`), so one that
/// arrives after a reload sees the new pool.
/// `permit` counts the connection against the listener's limits; an
/// upgraded WebSocket keeps it until the tunnel ends.
pub async fn serve_connection<S: TunnelIo + AsyncRead>(
    stream: S,
    client: Client,
    cell: ListenerCell,
    permit: ConnPermit,
    shutdown: CancellationToken,
) {
    let permit = Arc::new(permit);
    // Only these settings are read once; the context itself is not held,
    // so an old generation (its pool view, its idle connections) goes
    // once no request uses it.
    let (head_timeout, max_head) = {
        let ctx = cell.load();
        (ctx.cfg.header_read_timeout, ctx.cfg.max_header_size)
    };
    // What the shutdown below needs to know of the requests.
    let seen = Arc::new(Seen::default());
    let svc_seen = seen.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        if headers::is_websocket_upgrade(&req) {
            svc_seen
                .upgrade
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        svc_seen.first.cancel();
        let ctx = cell.load_full();
        let permit = permit.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(handle::<S>(req, client, ctx, permit).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        // 431 past the configured head; the read buffer is bounded too, so a
        // head that never ends holds at most this much.
        .max_header_size(max_head)
        .max_buf_size((max_head + 8192).max(8192))
        // Not `half_close(true)`: with it hyper stops reading while a
        // request is in flight, so a client that goes away during a long
        // poll would no longer cancel it; a client that shuts its write
        // side after its request is taken to have aborted it instead.
        .auto_date_header(false)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            // A connection accepted just before its listener stopped (a
            // binary upgrade hands the socket over at that moment) has its
            // first request on the way: serve it, waiting for its head as
            // long as any request's, before closing.
            let wait = tokio::time::timeout(head_timeout, seen.first.cancelled());
            tokio::select! {
                result = conn.as_mut() => result,
                _ = wait => {
                    // A graceful shutdown would answer an upgrade with
                    // `Connection: close`, which is no 101: let it switch
                    // (the connection then ends here; a refused upgrade
                    // leaves it to the head timeout).
                    if !seen.upgrade.load(std::sync::atomic::Ordering::Relaxed) {
                        conn.as_mut().graceful_shutdown();
                    }
                    conn.await
                }
            }
        }
    };
    if let Err(error) = result {
        debug!(error = %chain(&error), "client connection ended with an error");
    }
}

/// What a client connection's requests showed, for its shutdown.
#[derive(Default)]
struct Seen {
    /// Cancelled when the first request arrives.
    first: CancellationToken,
    /// A WebSocket upgrade was asked for.
    upgrade: std::sync::atomic::AtomicBool,
}

async fn handle<S: TunnelIo + AsyncRead>(
    req: Request<Incoming>,
    client: Client,
    ctx: Arc<ListenerCtx>,
    permit: Arc<ConnPermit>,
) -> Response<ProxyBody> {
    let mut started = Started::new(&ctx, &req, &client);
    let resp = route::<S>(req, client, ctx, permit, &mut started).await;
    // A WebSocket's line is the tunnel's, which took `started`.
    match started {
        Some(started) => {
            let log = started.response(resp.status().as_u16());
            resp.map(|body| body.logged(log))
        }
        None => resp,
    }
}

/// Where a request goes: refused, answered by sluice, forwarded, or
/// upgraded.
async fn route<S: TunnelIo + AsyncRead>(
    mut req: Request<Incoming>,
    client: Client,
    ctx: Arc<ListenerCtx>,
    permit: Arc<ConnPermit>,
    started: &mut Option<Box<Started>>,
) -> Response<ProxyBody> {
    if permit.over_limit() {
        ctx.client_limited.inc();
        return retry_after(refuse(StatusCode::TOO_MANY_REQUESTS, TOO_MANY), 3);
    }
    if req.version() == hyper::Version::HTTP_2 {
        // `:authority` is the Host of HTTP/2: shown as one from here on,
        // so that a `header:host` hash key finds it as for HTTP/1.1.
        headers::host_from_authority(&mut req);
    }
    if ws_h2::is_extended_connect(&req) {
        let span = debug_span!(
            "ws",
            pool = ctx.upstream.cfg.name.as_str(),
            backend = field::Empty,
            h2 = true
        );
        return ws_h2::websocket(req, client, ctx.clone(), permit, started)
            .instrument(span)
            .await;
    }
    if let Err((code, text)) = headers::check_request(&req, ctx.cfg.max_uri_length) {
        return refuse(code, text);
    }
    if let Some(answers) = &ctx.http01
        && let Some(resp) = challenge::answer(&req, answers)
    {
        return resp;
    }
    // One span per proxied request or WebSocket; `upstream` records the
    // backend once it has one.
    let pool = ctx.upstream.cfg.name.as_str();
    if headers::is_websocket_upgrade(&req) {
        let span = debug_span!("ws", pool, backend = field::Empty);
        upgrade::<S>(req, client, ctx.clone(), permit, started)
            .instrument(span)
            .await
    } else {
        let span = debug_span!("http", pool, backend = field::Empty);
        forward(req, client, &ctx, started).instrument(span).await
    }
}

/// `req` made ready for a backend: forwarded headers, its body's stall
/// timeout, and (when the access log follows it) what the line needs.
fn outgoing(
    mut req: Request<Incoming>,
    client: &Client,
    ctx: &ListenerCtx,
    upgrade: bool,
    started: Option<&Started>,
) -> Request<RequestBody> {
    headers::prepare_request(&mut req, client.addr, ctx.forwarded(), upgrade);
    let timeout = ctx.cfg.body_timeout;
    let mut req = req.map(|body| RequestBody::new(body, timeout));
    if let Some(started) = started {
        started.follow(&mut req);
    }
    req
}

/// Forwards a plain HTTP request, reusing idle backend connections.
async fn forward(
    req: Request<Incoming>,
    client: Client,
    ctx: &ListenerCtx,
    started: &mut Option<Box<Started>>,
) -> Response<ProxyBody> {
    let upstream = &ctx.upstream;
    let affinity = affinity::affinity(upstream, &req, client.addr);
    let req = outgoing(req, &client, ctx, false, started.as_deref());
    let answer = match upstream.send(&ctx.registry, affinity, req, &client).await {
        Ok(answer) => answer,
        Err(error) => return upstream_error(&error),
    };
    let mut resp = answer.resp;
    headers::drop_length_of_chunked(resp.headers_mut());
    headers::strip_hop_by_hop(resp.headers_mut());
    if let (_, Some(cookie)) = upstream.pin(affinity, answer.backend) {
        resp.headers_mut().append(hyper::header::SET_COOKIE, cookie);
    }
    // A connection that began with this client's PROXY header is not
    // reused for another client.
    let reuse = upstream.reuses_connections().then(|| Reuse {
        sender: answer.sender,
        pool: upstream.idle(answer.backend).clone(),
    });
    let lease = answer.lease;
    resp.map(|body| ProxyBody::upstream(body, lease, reuse))
}

/// Forwards a WebSocket upgrade; on 101, joins client and backend in a tunnel.
async fn upgrade<S: TunnelIo + AsyncRead>(
    mut req: Request<Incoming>,
    client: Client,
    ctx: Arc<ListenerCtx>,
    permit: Arc<ConnPermit>,
    started: &mut Option<Box<Started>>,
) -> Response<ProxyBody> {
    if let Err(reason) = headers::check_websocket_request(&req) {
        return refuse(StatusCode::BAD_REQUEST, reason);
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let switched = match open_websocket(req, &client, &ctx, started).await {
        Ok(switched) => switched,
        Err(answer) => return answer,
    };
    let client_side = async move {
        let upgraded = client_upgrade
            .await
            .map_err(|error| debug!(error = %chain(&error), "client upgrade did not complete"))
            .ok()?;
        let Ok(client) = upgraded.downcast::<TokioIo<S>>() else {
            warn!("upgraded connection is not a TCP stream");
            return None;
        };
        Some((client.io.into_inner(), client.read_buf))
    };
    let resp = switched.spawn_tunnel(&ctx, permit, client_side, None, started.take());
    // The backend's 101 goes to the client as it is.
    resp.map(|_| ProxyBody::empty())
}

/// A backend that switched to WebSocket: its 101, and what the tunnel
/// needs of it.
struct Switched {
    resp: Response<Incoming>,
    lease: crate::registry::Lease,
    pin: u64,
}

/// Sends the upgrade `req` (GET, with its `Sec-WebSocket-Key`) to a
/// backend of the pool; its 101, or the answer the client gets instead
/// (the backend's refusal as it is, or sluice's error).
async fn open_websocket(
    req: Request<Incoming>,
    client: &Client,
    ctx: &ListenerCtx,
    started: &mut Option<Box<Started>>,
) -> Result<Switched, Response<ProxyBody>> {
    let upstream = &ctx.upstream;
    let affinity = affinity::affinity(upstream, &req, client.addr);
    let req = outgoing(req, client, ctx, true, started.as_deref());
    let answer = match upstream.send(&ctx.registry, affinity, req, client).await {
        Ok(answer) => answer,
        Err(error) => return Err(upstream_error(&error)),
    };
    let (lease, mut resp) = (answer.lease, answer.resp);
    let (pin, cookie) = upstream.pin(affinity, answer.backend);
    if let Some(cookie) = cookie {
        resp.headers_mut().append(hyper::header::SET_COOKIE, cookie);
    }
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The backend declined the upgrade: pass its answer on as it is.
        headers::drop_length_of_chunked(resp.headers_mut());
        headers::strip_hop_by_hop(resp.headers_mut());
        return Err(resp.map(|body| ProxyBody::upstream(body, lease, None)));
    }
    Ok(Switched { resp, lease, pin })
}

impl Switched {
    /// Spawns the tunnel between the client's side, once `client_side`
    /// has it (the stream and bytes that came with it), and the backend's;
    /// returns the 101 (for the client to get, as it is or translated).
    /// `permit` (the places it counts in) is held until the tunnel ends;
    /// `h2` counts the WebSocket while it lasts; `started` gets its
    /// access log line at the end.
    fn spawn_tunnel<C, F>(
        mut self,
        ctx: &Arc<ListenerCtx>,
        permit: impl Send + 'static,
        client_side: F,
        h2: Option<prometheus_client::metrics::gauge::Gauge>,
        started: Option<Box<Started>>,
    ) -> Response<Incoming>
    where
        C: TunnelIo,
        F: std::future::Future<Output = Option<(C, bytes::Bytes)>> + Send + 'static,
    {
        let backend_upgrade = hyper::upgrade::on(&mut self.resp);
        let upstream = &ctx.upstream;
        let settings = tunnel::Settings {
            close_timeout: upstream.cfg.drain.close_timeout,
            max_message_wait: upstream.cfg.drain.max_message_wait,
            ping: ctx.cfg.ws_ping_interval.map(|interval| tunnel::Ping {
                interval,
                timeout: ctx.cfg.ws_ping_timeout,
            }),
        };
        let listener = ctx.id;
        let (lease, pin) = (self.lease, self.pin);
        let mut started = started;
        if let Some(started) = &mut started {
            started.switched();
        }
        let tunnel = async move {
            let _permit = permit;
            let (client, backend) = tokio::join!(client_side, backend_upgrade);
            let (Some((client, client_pending)), Ok(backend)) = (client, backend) else {
                debug!("upgrade did not complete");
                return;
            };
            let Ok(backend) = backend.downcast::<TokioIo<BackendStream>>() else {
                warn!("upgraded backend connection is not a TCP stream");
                return;
            };
            let _live = h2.map(LiveGauge::new);
            let entry = lease.into_ws(listener, pin);
            debug!(conn.id = entry.control().id, "tunnel opened");
            let tunnel = Tunnel::new(
                client,
                client_pending,
                backend.io.into_inner(),
                backend.read_buf,
                entry,
                settings,
            );
            let stats = tunnel.await;
            debug!(
                conn.id = stats.id,
                messages.up = stats.messages_up,
                messages.down = stats.messages_down,
                cut = stats.cut,
                "tunnel closed"
            );
            if let Some(started) = started {
                started.websocket(&stats);
            }
        };
        // The tunnel logs inside this request's span, and so its connection's.
        ctx.tasks.spawn(tunnel.instrument(Span::current()));
        self.resp
    }
}

/// A gauge raised while this lives.
struct LiveGauge(prometheus_client::metrics::gauge::Gauge);

impl LiveGauge {
    fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for LiveGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The answer to a request that got none from a backend, by who failed.
fn upstream_error(error: &UpstreamError) -> Response<ProxyBody> {
    match (error.blame(), error) {
        (Blame::Pool, _) => {
            let spread = if matches!(error, UpstreamError::Overloaded { .. }) {
                5
            } else {
                3
            };
            retry_after(
                status(StatusCode::SERVICE_UNAVAILABLE, "no backend available\n"),
                spread,
            )
        }
        (Blame::Client, UpstreamError::BodyStalled { .. }) => {
            status(StatusCode::REQUEST_TIMEOUT, "request body stalled\n")
        }
        (Blame::Client, _) => status(StatusCode::BAD_REQUEST, "request body failed\n"),
        (Blame::Backend, UpstreamError::ResponseTimeout { .. }) => status(
            StatusCode::GATEWAY_TIMEOUT,
            "backend did not answer in time\n",
        ),
        (Blame::Backend, UpstreamError::BadSwitch { .. }) => status(
            StatusCode::BAD_GATEWAY,
            "backend answered the upgrade with an invalid 101\n",
        ),
        (Blame::Backend, UpstreamError::Failed { .. }) => {
            status(StatusCode::BAD_GATEWAY, "backend failed before answering\n")
        }
        (Blame::Backend, _) => status(StatusCode::BAD_GATEWAY, "backend unavailable\n"),
    }
}

/// The answer to a client over `max_connections_per_client`.
const TOO_MANY: &str = "too many connections from this address\n";

/// `resp` with a Retry-After of 1 to `spread` seconds, at random, so that
/// refused clients do not come back together.
fn retry_after(mut resp: Response<ProxyBody>, spread: u32) -> Response<ProxyBody> {
    let secs = 1 + rand::random_range(0..spread);
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// A request refused at the edge: answered, and its connection ends (as
/// with the head errors hyper answers itself), so nothing it still sends
/// is read as another request.
fn refuse(code: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = status(code, text);
    resp.headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A short plain-text response made by sluice.
pub fn status(code: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::text(text));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
