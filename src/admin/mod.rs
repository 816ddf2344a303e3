//! The admin API: status, drain and undrain, Prometheus metrics.
//!
//! Owns the admin listener and its JSON API; the documents it sends and
//! reads are the types in `api`, shared with `client`, `ctl` and the
//! tests. Everything under `/api/` needs `Authorization: Bearer TOKEN`;
//! `/metrics` does not, so a scraper needs no secret (it is on loopback
//! unless configured otherwise). Acts on the rest of sluice only through
//! `drain::Drains` and registry reads.

pub mod api;
pub mod client;
pub mod timeline;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::drain::{DrainError, Drains};
use crate::error_chain::chain;
use crate::metrics::Metrics;
use crate::registry::{Backend, PoolEntry, Registry};
use crate::reload::{ReloadError, Reloader};
use crate::upgrade::{UpgradeError, Upgrader};

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// What the admin API serves from.
pub struct AdminState {
    pub token: String,
    pub registry: Arc<Registry>,
    pub drains: Arc<Drains>,
    pub metrics: Arc<Metrics>,
    /// The rebalancer's last decisions.
    pub reports: Arc<crate::rebalance::Reports>,
    /// Reads the config again and applies it.
    pub reloader: Arc<Reloader>,
    /// Binary upgrades.
    pub upgrader: Arc<Upgrader>,
    /// The dashboard's history, sampled while the admin API serves.
    pub timeline: Arc<timeline::Timeline>,
    /// In cluster mode: this instance's name and what it last saw.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// A new random token, for when none is configured.
pub fn generate_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Largest request head the admin API reads (its requests are small).
const MAX_HEAD: usize = 16 * 1024;

/// Serves the admin API on `listener` until `shutdown` (then requests in
/// flight are answered, for up to `ANSWER_GRACE`): at most
/// `max_connections` at once (more wait in the backlog), each closed when
/// a request head takes longer than `header_read_timeout`, or when it
/// stays idle that long.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    header_read_timeout: Duration,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    info!(addr = ?listener.local_addr().ok(), "admin API listening");
    tokio::spawn(timeline::run(
        state.registry.clone(),
        state.timeline.clone(),
        shutdown.clone(),
    ));
    let limit = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("the limit semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let state = state.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state).await) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_header_size(MAX_HEAD)
                .max_buf_size(MAX_HEAD + 8192)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            // At the end, a request in flight (the upgrade that handed this
            // process over) still gets its answer.
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = result {
                debug!(client.addr = %peer, error = %crate::error_chain::chain(&error), "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(ANSWER_GRACE, connections.wait())
        .await
        .is_err()
    {
        debug!("admin requests still open at the end: dropped");
    }
}

/// How long the admin API, once stopped, lets requests in flight finish.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// The dashboard's files, built into the binary.
const DASHBOARD: [(&str, &str, &str); 3] = [
    (
        "",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "/dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/dashboard.js"),
    ),
    (
        "/dashboard.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/dashboard.css"),
    ),
];

/// One of the dashboard's files: no token needed (they hold no data),
/// nothing from elsewhere allowed, never framed (so no other site can
/// lure a click on its buttons).
fn asset(content_type: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// True when a request that changes something comes from a page of
/// another origin: its `Origin` (browsers send it with every POST) names
/// another host than the request's `Host` (by either scheme, so that an
/// HTTPS proxy in front still works). Requests without one (`sluice
/// ctl`, curl) are not from a browser page.
fn cross_origin<B>(req: &Request<B>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return false;
    };
    let origin = origin.as_bytes();
    let host = req.headers().get(header::HOST).map(HeaderValue::as_bytes);
    let origin_host = origin
        .strip_prefix(b"http://")
        .or_else(|| origin.strip_prefix(b"https://"));
    origin_host.is_none() || origin_host != host
}

async fn handle(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    if let Some((_, content_type, body)) = DASHBOARD.iter().find(|(p, _, _)| *p == path) {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        }
        return asset(content_type, body);
    }
    if path == "/metrics" {
        if req.method() != Method::GET {
            return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        }
        let mut resp = Response::new(Full::new(Bytes::from(state.metrics.encode())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return resp;
    }
    if !path.starts_with("/api/") {
        return error(
            StatusCode::NOT_FOUND,
            "no such endpoint; try /, /api/v1/status or /metrics",
        );
    }
    if req.method() != Method::GET && cross_origin(&req) {
        return error(
            StatusCode::FORBIDDEN,
            "refused: this request comes from a page of another origin",
        );
    }
    if !authorized(&req, &state.token) {
        let mut resp = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["api", "v1", "status"]) => ok(&status(state)),
        (Method::GET, ["api", "v1", "timeline"]) => match since(req.uri().query()) {
            Ok(since) => ok(&state.timeline.since(since)),
            Err(message) => error(StatusCode::BAD_REQUEST, &message),
        },
        (Method::POST, ["api", "v1", "reload"]) => reload(state).await,
        (Method::POST, ["api", "v1", "upgrade"]) => upgrade(state).await,
        (
            Method::POST,
            [
                "api",
                "v1",
                "pools",
                pool,
                "backends",
                backend,
                action @ ("drain" | "undrain"),
            ],
        ) => {
            let (pool, backend, action) = (pool.to_string(), backend.to_string(), *action);
            let body = match read_json(req).await {
                Ok(body) => body,
                Err(resp) => return resp,
            };
            backend_action(state, &pool, &backend, action, body)
        }
        (_, ["api", "v1", "status" | "timeline" | "reload" | "upgrade"])
        | (_, ["api", "v1", "pools", _, "backends", _, "drain" | "undrain"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "wrong method for this endpoint",
        ),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn authorized<B>(req: &Request<B>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compare in constant time, so timing does not reveal the token.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The `since` of a timeline query (`since=N`; none without a query).
fn since(query: Option<&str>) -> Result<Option<u64>, String> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    match query.strip_prefix("since=").map(str::parse::<u64>) {
        Some(Ok(n)) => Ok(Some(n)),
        _ => Err(format!(
            "query {query:?}: expected since=N, N a sample number"
        )),
    }
}

/// Reads a JSON object body; an empty body is `{}`.
async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large or unreadable",
            ));
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(serde_json::Map::new()));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(error(StatusCode::BAD_REQUEST, "body must be a JSON object")),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("body is not valid JSON: {e}"),
        )),
    }
}

/// Decodes a request object into its type; the error, for a 400, names a
/// field the type does not have or one of the wrong type.
fn parse_request<T: DeserializeOwned>(body: Value) -> Result<T, String> {
    // serde quotes field names in backticks (`unknown field `windw`,
    // expected `window``); the API's messages quote with double quotes.
    serde_json::from_value(body).map_err(|e| e.to_string().replace('`', "\""))
}

/// The drain window a request asks for, checked like a config duration.
fn parse_window(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d <= crate::config::MAX_DURATION => Ok(d),
        Ok(_) => Err(format!("window {text:?} is longer than 30 days")),
        Err(e) => Err(format!(
            "window {text:?}: {e}; write e.g. \"30s\" or \"5m\""
        )),
    }
}

fn backend_action(
    state: &AdminState,
    pool: &str,
    backend: &str,
    action: &str,
    body: Value,
) -> Response<Full<Bytes>> {
    let (pool, backend) = match state.drains.find(pool, backend) {
        Ok(found) => found,
        Err(e @ DrainError::ShuttingDown) => return error(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => return error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let cluster = state.cluster.as_deref();
    let done = if action == "undrain" {
        if let Err(message) = parse_request::<api::UndrainRequest>(body) {
            return error(StatusCode::BAD_REQUEST, &message);
        }
        let done = state.drains.undrain(&pool, &backend);
        if let (Ok(()), Some(cluster)) = (&done, cluster) {
            cluster.announce_undrain(&pool.name, &backend.name);
        }
        done
    } else {
        let window = parse_request::<api::DrainRequest>(body)
            .and_then(|request| request.window.as_deref().map(parse_window).transpose());
        match window {
            Ok(window) => {
                // A drain under way goes on, here and on the others.
                let new = state.drains.drain_kind(&backend).is_none();
                let done = state.drains.drain(&pool, &backend, window);
                if let (Ok(()), true, Some(cluster)) = (&done, new, cluster) {
                    let window = window.unwrap_or(pool.cfg.drain.window);
                    cluster.announce_drain(&pool.name, &backend.name, window);
                }
                done
            }
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        }
    };
    if let Err(e) = done {
        return error(StatusCode::CONFLICT, &e.to_string());
    }
    ok(&backend_status(state, &pool, &backend))
}

/// `POST /api/v1/upgrade`: answers once the new process serves (this one
/// then drains), or with why not: 409 when one is under way or cannot be
/// made, 500 when the new process failed.
async fn upgrade(state: &AdminState) -> Response<Full<Bytes>> {
    match state.upgrader.upgrade().await {
        Ok(done) => ok(&api::UpgradeReport {
            old_pid: done.old_pid,
            new_pid: done.new_pid,
        }),
        Err(
            e @ (UpgradeError::InProgress
            | UpgradeError::PredecessorRunning(_)
            | UpgradeError::NotAvailable
            | UpgradeError::ShuttingDown),
        ) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("{}; this process keeps serving", chain(&e)),
        ),
    }
}

/// `POST /api/v1/reload`: what changed, or 400 with why the file was refused.
async fn reload(state: &AdminState) -> Response<Full<Bytes>> {
    match state.reloader.reload().await {
        Ok(changes) => ok(&api::ReloadReport {
            generation: state.reloader.generation().number,
            changes: changes.iter().map(ToString::to_string).collect(),
        }),
        Err(e @ (ReloadError::Invalid(_) | ReloadError::Apply(_))) => {
            error(StatusCode::BAD_REQUEST, &chain(&e).to_string())
        }
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

fn status(state: &AdminState) -> api::Status {
    let pools = state
        .registry
        .pools()
        .iter()
        .map(|pool| {
            let all = pool.all_backends();
            api::Pool {
                name: pool.name.clone(),
                algorithm: pool.cfg.algorithm.as_str().to_string(),
                connections: all.iter().map(|b| b.active() as u64).sum(),
                backends: all.iter().map(|b| backend_status(state, pool, b)).collect(),
                rebalance: rebalance_status(state, pool),
            }
        })
        .collect();
    let generation = state.reloader.generation();
    let mut processes = vec![api::Process {
        pid: std::process::id(),
        role: "serving".into(),
        websockets: state.registry.ws_total() as u64,
    }];
    if let Some(old) = state.upgrader.predecessor() {
        processes.push(api::Process {
            pid: old.pid,
            role: "draining".into(),
            websockets: old.websockets,
        });
    }
    let cluster = state.cluster.as_ref().map(|cluster| {
        let (redis_up, published) = cluster.view();
        api::Cluster {
            instance: cluster.instance().to_string(),
            redis_up,
            instances: published
                .into_iter()
                .map(|p| {
                    let websockets = &p.websockets;
                    let mut backends: Vec<api::InstanceBackend> = p
                        .pools
                        .iter()
                        .flat_map(|(pool, counts)| {
                            counts.iter().map(move |(backend, n)| api::InstanceBackend {
                                pool: pool.clone(),
                                backend: backend.clone(),
                                connections: *n as u64,
                                websockets: websockets
                                    .get(pool)
                                    .and_then(|b| b.get(backend))
                                    .map_or(0, |n| *n as u64),
                            })
                        })
                        .collect();
                    backends.sort_by(|a, b| (&a.pool, &a.backend).cmp(&(&b.pool, &b.backend)));
                    api::Instance {
                        name: p.instance.clone(),
                        backends,
                    }
                })
                .collect(),
        }
    });
    api::Status {
        cluster,
        processes,
        pools,
        config: Some(api::ConfigGeneration {
            generation: generation.number,
            loaded_at_ms: generation
                .loaded_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            path: generation.path.map(|p| p.display().to_string()),
        }),
    }
}

fn rebalance_status(state: &AdminState, pool: &PoolEntry) -> Option<api::Rebalance> {
    let cfg = &pool.cfg.rebalance;
    let name = |i: usize| pool.backends.get(i).map(|b| b.name.clone());
    let last = state.reports.get(&pool.name).map(|r| api::RebalanceReport {
        ago_ms: r.at.elapsed().as_millis() as u64,
        total: r.plan.total as u64,
        shares: r.plan.shares.iter().map(|s| s.round() as u64).collect(),
        outliers: r.plan.outliers.iter().filter_map(|&i| name(i)).collect(),
        shed: r.plan.shed.map(|s| api::RebalanceShed {
            backend: name(s.backend),
            planned: s.count as u64,
            closing: r.shed as u64,
        }),
        note: r.plan.note.to_string(),
    });
    Some(api::Rebalance {
        enabled: cfg.enabled,
        interval_ms: cfg.interval.as_millis() as u64,
        tolerance: cfg.tolerance,
        last,
    })
}

fn backend_status(state: &AdminState, pool: &PoolEntry, backend: &Arc<Backend>) -> api::Backend {
    let drain = state.drains.progress(backend).map(|d| api::DrainProgress {
        window_ms: d.window.as_millis() as u64,
        elapsed_ms: d.elapsed.as_millis() as u64,
        planned: d.planned as u64,
        closed: d.closed as u64,
    });
    api::Backend {
        pool: pool.name.clone(),
        name: backend.name.clone(),
        address: backend.addr.to_string(),
        weight: backend.weight(),
        state: backend.condition().into(),
        healthy: backend.is_healthy(),
        connections: api::Connections {
            ws: backend.ws_count() as u64,
            http: backend.http_count() as u64,
        },
        drain,
        removed: !pool.backends.iter().any(|b| Arc::ptr_eq(b, backend)),
        last_check: pool
            .cfg
            .health
            .as_ref()
            .and(backend.last_check(std::time::Instant::now()))
            .map(|(ok, ago)| api::LastCheck {
                ok,
                ago_ms: ago.as_millis() as u64,
            }),
    }
}

fn ok(body: &impl Serialize) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, body)
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = api::ErrorBody {
        error: message.to_string(),
    };
    json_response(status, &body)
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_string(body).expect("admin API types always serialize");
    text.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_queries_and_origins() {
        assert_eq!(since(None), Ok(None));
        assert_eq!(since(Some("since=42")), Ok(Some(42)));
        assert!(since(Some("since=-1")).is_err());
        assert!(since(Some("from=1")).is_err());
        let req = |origin: Option<&str>| {
            let mut b = Request::builder()
                .method("POST")
                .header("host", "127.0.0.1:9901");
            if let Some(o) = origin {
                b = b.header("origin", o);
            }
            b.body(()).expect("request")
        };
        assert!(!cross_origin(&req(None)));
        assert!(!cross_origin(&req(Some("http://127.0.0.1:9901"))));
        assert!(cross_origin(&req(Some("http://evil.example"))));
        assert!(cross_origin(&req(Some("null"))));
        assert!(!cross_origin(&req(Some("https://127.0.0.1:9901"))));
        assert!(cross_origin(&req(Some("http://127.0.0.1:9902"))));
    }

    #[test]
    fn windows_are_checked_like_config_durations() {
        assert_eq!(parse_window("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(
            parse_window("31days"),
            Err("window \"31days\" is longer than 30 days".to_string())
        );
        let err = parse_window("soon").expect_err("not a duration");
        assert!(
            err.starts_with("window \"soon\": ") && err.ends_with("; write e.g. \"30s\" or \"5m\""),
            "{err}"
        );
    }
}
