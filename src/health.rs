//! Health: active checks, passive ejection's return, slow start.
//!
//! Owns one task per pool that checks each backend every interval (an HTTP
//! GET of `path`, or a TCP connect when no path is set) on its own tasks,
//! moves backends down after `fall` failures and up after `rise` successes,
//! brings passively ejected backends back when their time is up, and ends
//! slow-start ramps. It only sets registry flags; the data path reads them
//! (and counts its own failures through `Backend::note_failure`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use tokio::io::AsyncWriteExt;

use crate::config::{HealthConfig, ProxyVersion};
use crate::health_state::CheckState;
use crate::proxy_protocol;
use crate::registry::PoolEntry;
use crate::upstream::{BackendStream, BackendTlsConnector};

/// How often ejections and ramps are looked at when no active check runs
/// more often.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// One check of `addr`: true when healthy. A backend with `tls` is
/// checked over TLS, as the data path talks to it.
pub async fn check(
    addr: SocketAddr,
    cfg: &HealthConfig,
    tls: Option<&BackendTlsConnector>,
    proxy: Option<ProxyVersion>,
) -> bool {
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        if let Some(version) = proxy {
            // A backend that expects the PROXY header gets one: sluice's
            // own connection (LOCAL), as the data path would send it.
            tcp.write_all(&proxy_protocol::local_header(version))
                .await
                .ok()?;
        }
        let (stream, host) = match tls {
            None => (BackendStream::Plain(tcp), addr.to_string()),
            Some(t) => {
                let stream = t.connector.connect(t.server_name.clone(), tcp).await.ok()?;
                (BackendStream::Tls(Box::new(stream)), t.host())
            }
        };
        let Some(path) = &cfg.path else {
            return Some(true);
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = Request::get(path.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "sluice-health-check")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let status = sender.send_request(req).await.ok()?.status().as_u16();
        Some(match cfg.expect_status {
            Some(expected) => status == expected,
            None => (200..400).contains(&status),
        })
    };
    matches!(
        tokio::time::timeout(cfg.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// Watches the health of `pool` until `shutdown` (a reload ends it and
/// starts another with the new settings; a backend that stays keeps what
/// its check said). `connectors` are the backends' TLS connectors, as the
/// data path uses them.
pub async fn run(
    pool: Arc<PoolEntry>,
    connectors: Vec<Option<BackendTlsConnector>>,
    shutdown: CancellationToken,
) {
    let cfg = &pool.cfg;
    if cfg.health.is_none() {
        // Active checks switched off by a reload: what they said is void.
        for b in &pool.backends {
            if b.set_active_down(false) {
                info!(pool = %pool.name, backend = %b.name, reason = "health checks off", "backend up");
            }
        }
    }
    let mut states: Vec<CheckState> = pool
        .backends
        .iter()
        .map(|b| CheckState::starting(!b.is_active_down()))
        .collect();
    let period = cfg
        .health
        .as_ref()
        .map_or(HOUSEKEEPING, |h| h.interval.min(HOUSEKEEPING));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_check = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = std::time::Instant::now();
        for b in &pool.backends {
            if b.end_ejection_if_due(now) {
                info!(pool = %pool.name, backend = %b.name, reason = "ejection time over", "backend back in rotation");
                b.mark_back(now);
            }
            if b.finish_ramp(now) {
                debug!(pool = %pool.name, backend = %b.name, "slow start done");
            }
        }
        let Some(health) = &cfg.health else { continue };
        if tokio::time::Instant::now() < next_check {
            continue;
        }
        next_check = tokio::time::Instant::now() + health.interval;
        let results = join_all(
            pool.backends
                .iter()
                .zip(&connectors)
                .map(|(b, tls)| check(b.addr, health, tls.as_ref(), cfg.send_proxy_protocol)),
        )
        .await;
        let checked = std::time::Instant::now();
        for ((b, state), ok) in pool.backends.iter().zip(states.iter_mut()).zip(results) {
            b.note_check(ok, checked);
            match state.record(ok, health.rise, health.fall) {
                Some(false) => {
                    b.set_active_down(true);
                    warn!(pool = %pool.name, backend = %b.name, fall = health.fall, reason = "health check failed", "backend down");
                }
                Some(true) => {
                    b.set_active_down(false);
                    b.mark_back(std::time::Instant::now());
                    info!(pool = %pool.name, backend = %b.name, rise = health.rise, reason = "health check passed", "backend up");
                }
                None => {}
            }
        }
    }
}
