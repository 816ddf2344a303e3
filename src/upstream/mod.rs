//! Connections to backends, as one pool's requests see them.
//!
//! Owns the one way a client request reaches a backend (`checkout`): pick
//! and lease a backend (through the admission queue, `queue`), reuse an
//! idle keep-alive connection (`idle`) or open one (`stream`: TCP, TLS),
//! send the request, retry on another backend when a connect fails before
//! anything was sent, count passive failures, and say who failed when it
//! goes wrong. The choice itself is `balance`'s; the counts are
//! `registry`'s.

mod checkout;
mod idle;
mod queue;
mod request_body;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use hyper::header::HeaderValue;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Semaphore;
use tracing::warn;

use crate::admission::TokenBucket;
use crate::balance::Balancer;
use crate::balance::sticky::Sticky;
use crate::config::PoolConfig;
use crate::registry::{Backend, PoolEntry};

/// Where `send` notes the backend each try goes to, when the request
/// carries one in its extensions (the access log's, which must name the
/// backend even when the client leaves before it answers).
#[derive(Debug, Clone, Default)]
pub struct TriedBackend(Arc<Mutex<Option<Arc<Backend>>>>);

impl TriedBackend {
    fn note(&self, backend: &Arc<Backend>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(backend.clone());
    }

    /// The name of the backend tried last.
    pub fn name(&self) -> Option<String> {
        let last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().map(|b| b.name.clone())
    }
}

pub use idle::IdlePool;
pub use request_body::{BodyStalled, RequestBody};
pub use stream::{BackendStream, BackendTlsConnector};

/// Who a failure is to be blamed on: it decides the answer to the client.
/// (Passive health is told in `Upstream::send`, where each failure
/// happens: connects, failures before an answer and 5xx to an upgrade
/// count, as does a 101 that is not the WebSocket asked for; a response
/// timeout does not.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client (its request body failed: 400, or stalled: 408).
    Client,
    /// One backend: 502, or 504 when it did not answer in time.
    Backend,
    /// The pool had nothing to offer: 503 with Retry-After.
    Pool,
}

/// Why a request got no answer from a backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to backend {addr}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend {addr} did not accept a connection within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS handshake with backend {addr}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP handshake with backend {addr}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("backend {addr} did not answer within {timeout:?}")]
    ResponseTimeout { addr: SocketAddr, timeout: Duration },
    #[error("backend {addr} failed before answering")]
    Failed {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("backend {addr} switched protocols wrongly: {reason}")]
    BadSwitch {
        addr: SocketAddr,
        reason: &'static str,
    },
    #[error("sending the client's request body")]
    ClientBody { source: hyper::Error },
    #[error("the client's request body stalled for {timeout:?}")]
    BodyStalled { timeout: Duration },
    #[error("pool {pool:?}: every backend failed to accept a connection")]
    AllFailed { pool: String },
    #[error("pool {pool:?}: no backend is available")]
    NoBackend { pool: String },
    #[error("pool {pool:?}: no backend could take a new connection in time (admission)")]
    Overloaded { pool: String },
}

impl UpstreamError {
    /// Who failed.
    pub fn blame(&self) -> Blame {
        match self {
            Self::ClientBody { .. } | Self::BodyStalled { .. } => Blame::Client,
            Self::AllFailed { .. } | Self::NoBackend { .. } | Self::Overloaded { .. } => {
                Blame::Pool
            }
            Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::Tls { .. }
            | Self::Handshake { .. }
            | Self::ResponseTimeout { .. }
            | Self::Failed { .. }
            | Self::BadSwitch { .. } => Blame::Backend,
        }
    }
}

/// What ties a request to a backend, besides load.
#[derive(Debug, Clone, Copy, Default)]
pub struct Affinity {
    /// The backend a sticky cookie pins the client to.
    pub pinned: Option<usize>,
    /// That pin's nonce (`None`: no pin, or a cookie of the earlier form).
    pub nonce: Option<u64>,
    /// The client's pin was moved (sluice closed its WebSocket): it is
    /// placed afresh, away from `avoid`.
    pub moved: bool,
    /// A backend not to place it on while another can take it.
    pub avoid: Option<usize>,
    /// The request's hash key, for `algorithm = "hash"`.
    pub key: Option<u64>,
    /// A plain HTTP request, which an idle kept-alive connection can carry
    /// without a new connection (and so without an admission token); false
    /// for a WebSocket upgrade, which needs a connection of its own.
    pub reusable: bool,
}

/// A pool seen from the data path: its settings, balancer and idle
/// connections.
#[derive(Debug)]
pub struct Upstream {
    pub cfg: PoolConfig,
    /// This pool's backends and counters in the registry (of the same
    /// config generation as `cfg`).
    pub pool: Arc<PoolEntry>,
    /// Where connect times are recorded.
    connect_seconds: Histogram,
    /// Connections refused by admission.
    rejected: Counter,
    /// Admission token buckets, one per backend, when a rate is set.
    buckets: Option<Mutex<Vec<TokenBucket>>>,
    /// Places in the admission queue.
    queue: Semaphore,
    /// Whose turn it is in the admission queue (tokio's mutex is fair).
    turn: tokio::sync::Mutex<()>,
    /// Sticky cookies, when configured.
    pub sticky: Option<Sticky>,
    /// The key of sticky cookies when none is configured: random at start,
    /// kept by reloads and upgrades so that pins survive them.
    sticky_key: [u8; 32],
    /// TLS towards each backend that wants it: connector and server name.
    connectors: Vec<Option<BackendTlsConnector>>,
    balancer: Balancer,
    idle: Vec<Arc<IdlePool>>,
}

impl Upstream {
    /// The data path's view of `pool` (its entry in the registry).
    /// `connectors` holds, per backend, its TLS connector when it has
    /// `tls`; `sticky_key` signs sticky cookies when no secret is
    /// configured. With `previous`, the same pool's view before a reload,
    /// the backends that stay keep their idle connections and admission
    /// tokens (when those settings are unchanged).
    pub fn new(
        pool: Arc<PoolEntry>,
        connectors: Vec<Option<BackendTlsConnector>>,
        connect_seconds: Histogram,
        rejected: Counter,
        previous: Option<&Upstream>,
        sticky_key: [u8; 32],
    ) -> Self {
        let cfg = pool.cfg.clone();
        // The same backend in the previous view, by index there.
        let before = |b: &Arc<Backend>| {
            previous.and_then(|p| p.pool.backends.iter().position(|o| Arc::ptr_eq(o, b)))
        };
        let same_idle = previous.is_some_and(|p| {
            (p.cfg.keepalive_max_idle, p.cfg.keepalive_timeout)
                == (cfg.keepalive_max_idle, cfg.keepalive_timeout)
        });
        let idle = pool
            .backends
            .iter()
            .map(|b| match (previous, before(b)) {
                (Some(p), Some(i)) if same_idle => p.idle[i].clone(),
                _ => Arc::new(IdlePool::new(cfg.keepalive_max_idle, cfg.keepalive_timeout)),
            })
            .collect();
        let admission = cfg.admission;
        let old_buckets = previous
            .filter(|p| p.cfg.admission == admission)
            .and_then(|p| p.buckets.as_ref())
            .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let buckets = (admission.connect_rate > 0.0).then(|| {
            let now = Instant::now();
            Mutex::new(
                pool.backends
                    .iter()
                    .map(|b| match (&old_buckets, before(b)) {
                        (Some(old), Some(i)) => old[i].clone(),
                        _ => TokenBucket::new(admission.connect_rate, admission.burst, now),
                    })
                    .collect(),
            )
        });
        let sticky = cfg.sticky.clone().map(|sc| {
            let names: Vec<&str> = cfg.backends.iter().map(|b| b.name.as_str()).collect();
            Sticky::new(sc, &cfg.name, &names, &sticky_key)
        });
        Self {
            pool,
            sticky_key,
            connectors,
            sticky,
            balancer: Balancer::new(&cfg),
            queue: Semaphore::new(admission.queue_size),
            turn: tokio::sync::Mutex::new(()),
            buckets,
            rejected,
            cfg,
            connect_seconds,
            idle,
        }
    }

    /// The key of sticky cookies when no secret is configured.
    pub fn sticky_key(&self) -> [u8; 32] {
        self.sticky_key
    }

    /// True when connections are kept for the next request: not when each
    /// starts with the PROXY header of the client it was opened for.
    pub fn reuses_connections(&self) -> bool {
        self.cfg.send_proxy_protocol.is_none()
    }

    /// Idle connections of backend `backend` (an index in this pool).
    pub fn idle(&self, backend: usize) -> &Arc<IdlePool> {
        &self.idle[backend]
    }

    /// Counts a data-path failure against `backend`; ejects it after too
    /// many in a row.
    fn note_failure(&self, backend: &Backend, what: &str) {
        let passive = self.cfg.passive;
        if backend.note_failure(
            passive.consecutive_failures,
            passive.ejection_time,
            Instant::now(),
        ) {
            warn!(
                pool = %self.cfg.name,
                backend = %backend.name,
                failures = passive.consecutive_failures,
                ejection = ?passive.ejection_time,
                reason = what,
                "backend down: ejected after failures in a row"
            );
        }
    }

    /// The client's pin after this request, on `chosen`: its nonce (0:
    /// none) and the Set-Cookie to send, unless its cookie already pins it
    /// there. A client whose pinned backend could not take it is re-pinned,
    /// and counted; one with a cookie of the earlier form gets the same pin
    /// in the current form.
    pub fn pin(&self, affinity: Affinity, chosen: usize) -> (u64, Option<HeaderValue>) {
        let Some(sticky) = self.sticky.as_ref() else {
            return (0, None);
        };
        if affinity.pinned == Some(chosen)
            && let Some(nonce) = affinity.nonce
        {
            return (nonce, None);
        }
        let stats = &self.pool.stats;
        if affinity.moved {
            stats.sticky_moved.fetch_add(1, Ordering::Relaxed);
        } else if affinity.pinned.is_some_and(|p| p != chosen) {
            stats.sticky_repins.fetch_add(1, Ordering::Relaxed);
        }
        // Never 0, which means "no pin".
        let nonce = rand::random::<u64>().max(1);
        (nonce, sticky.set_cookie(chosen, nonce))
    }
}
