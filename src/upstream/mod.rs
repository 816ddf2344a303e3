//! Connections to backends.
//!
//! Owns picking and leasing a backend for one client request, opening TCP
//! connections with a timeout, retrying on another backend when a connect
//! fails before anything was sent, and keeping idle HTTP/1.1 connections for
//! reuse. The choice itself is `balance`'s; the counts are `registry`'s.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Semaphore;

use tracing::{debug, warn};

use crate::admission::TokenBucket;

use crate::balance::sticky::{self, Sticky};
use crate::balance::{Balancer, Load, hash};
use crate::config::PoolConfig;
use crate::config::{Algorithm, HashKey};
use crate::registry::{Backend, Lease, Registry};

mod stream;

pub use stream::{BackendStream, BackendTlsConnector, connect};

/// Why no upstream connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to backend {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("backend {addr} did not accept a connection within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS handshake with backend {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP handshake with backend {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("pool {pool:?}: every backend failed to accept a connection")]
    AllFailed { pool: String },
    #[error("pool {pool:?}: no backend is available")]
    NoBackend { pool: String },
    #[error("pool {pool:?}: no backend could take a new connection in time (admission)")]
    Overloaded { pool: String },
}

impl UpstreamError {
    /// True when the pool had nothing to offer (503), rather than a backend
    /// failing (502).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::AllFailed { .. } | Self::NoBackend { .. } | Self::Overloaded { .. }
        )
    }
}

/// Starts HTTP/1.1 on `stream`; the connection is driven by a spawned task
/// that also lets an upgrade (101) hand the socket over.
pub async fn handshake(
    stream: BackendStream,
    addr: SocketAddr,
) -> Result<SendRequest<Incoming>, UpstreamError> {
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            debug!(backend.addr = %addr, %error, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// How often a waiting connection looks for a full backend to free a slot.
const FULL_POLL: Duration = Duration::from_millis(20);

/// How long a finished response's connection may take to become ready
/// (its request body still uploading) and still be kept for reuse.
const CHECKIN_WAIT: Duration = Duration::from_secs(5);

/// Idle HTTP/1.1 connections to one backend, most recent last.
#[derive(Debug)]
pub struct IdlePool {
    conns: Mutex<Vec<(SendRequest<Incoming>, Instant)>>,
    max_idle: usize,
    timeout: Duration,
}

impl IdlePool {
    fn new(max_idle: usize, timeout: Duration) -> Self {
        Self {
            conns: Mutex::new(Vec::new()),
            max_idle,
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(SendRequest<Incoming>, Instant)>> {
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A live idle connection ready for a request, if one is kept.
    pub fn checkout(&self) -> Option<SendRequest<Incoming>> {
        let mut conns = self.lock();
        while let Some((sender, since)) = conns.pop() {
            if sender.is_ready() && since.elapsed() <= self.timeout {
                return Some(sender);
            }
        }
        None
    }

    /// True when a ready idle connection is kept.
    pub fn has_ready(&self) -> bool {
        self.lock()
            .iter()
            .any(|(s, since)| s.is_ready() && since.elapsed() <= self.timeout)
    }

    /// Keeps `sender` for reuse once it can take a request. A connection
    /// whose request body is still being sent (the backend answered before
    /// the upload ended) is kept only when the upload finishes in time.
    pub fn checkin(self: &Arc<Self>, mut sender: SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            self.keep(sender);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(CHECKIN_WAIT, sender.ready()).await {
                pool.keep(sender);
            }
        });
    }

    fn keep(&self, sender: SendRequest<Incoming>) {
        let mut conns = self.lock();
        let timeout = self.timeout;
        conns.retain(|(s, since)| !s.is_closed() && since.elapsed() <= timeout);
        if conns.len() < self.max_idle {
            conns.push((sender, Instant::now()));
        }
    }
}

/// A pool seen from the data path: its settings, balancer and idle
/// connections.
#[derive(Debug)]
pub struct Upstream {
    pub cfg: PoolConfig,
    /// Index of this pool in the config and registry.
    pub index: usize,
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
    /// TLS towards each backend that wants it: connector and server name.
    connectors: Vec<Option<BackendTlsConnector>>,
    balancer: Balancer,
    idle: Vec<Arc<IdlePool>>,
}

/// One connection counted as waiting for admission, until dropped.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What ties a request to a backend, besides load.
#[derive(Debug, Clone, Copy, Default)]
pub struct Affinity {
    /// The backend a sticky cookie pins the client to.
    pub pinned: Option<usize>,
    /// The request's hash key, for `algorithm = "hash"`.
    pub key: Option<u64>,
    /// A plain HTTP request, which an idle kept-alive connection can carry
    /// without a new connection (and so without an admission token).
    pub reusable: bool,
}

/// An open connection to a leased backend.
#[derive(Debug)]
pub struct Connected {
    pub lease: Lease,
    pub stream: BackendStream,
}

impl Upstream {
    /// `connectors` holds, per backend, its TLS connector when it has `tls`.
    pub fn new(
        cfg: PoolConfig,
        index: usize,
        connectors: Vec<Option<BackendTlsConnector>>,
        connect_seconds: Histogram,
        rejected: Counter,
    ) -> Self {
        let idle = cfg
            .backends
            .iter()
            .map(|_| Arc::new(IdlePool::new(cfg.keepalive_max_idle, cfg.keepalive_timeout)))
            .collect();
        let admission = cfg.admission;
        let buckets = (admission.connect_rate > 0.0).then(|| {
            let now = Instant::now();
            Mutex::new(
                cfg.backends
                    .iter()
                    .map(|_| TokenBucket::new(admission.connect_rate, admission.burst, now))
                    .collect(),
            )
        });
        let sticky = cfg.sticky.clone().map(|sc| {
            let names: Vec<&str> = cfg.backends.iter().map(|b| b.name.as_str()).collect();
            Sticky::new(sc, &cfg.name, &names)
        });
        Self {
            connectors,
            sticky,
            balancer: Balancer::new(&cfg),
            queue: Semaphore::new(admission.queue_size),
            turn: tokio::sync::Mutex::new(()),
            buckets,
            rejected,
            cfg,
            index,
            connect_seconds,
            idle,
        }
    }

    /// Idle connections of backend `backend` (an index in this pool).
    pub fn idle(&self, backend: usize) -> &Arc<IdlePool> {
        &self.idle[backend]
    }

    /// Picks a backend not in `tried` that may take a new connection now
    /// (in rotation, healthy, not full, an admission token to spare) and
    /// leases a slot on it. `Ok(None)`: backends accept, but none can take
    /// one right now.
    fn try_lease(
        &self,
        registry: &Arc<Registry>,
        tried: &[usize],
        affinity: Affinity,
    ) -> Result<Option<(usize, Lease)>, UpstreamError> {
        let backends = &registry.pool(self.index).backends;
        let now = Instant::now();
        let max = self.cfg.max_connections_per_backend;
        let mut buckets = self
            .buckets
            .as_ref()
            .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()));
        let mut any_accepting = false;
        let loads: Vec<Load> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let candidate = b.is_accepting() && !tried.contains(&i);
                any_accepting |= candidate;
                let room = max == 0 || b.active() < max;
                // Admission limits new connections only: a request that an
                // idle connection can carry needs no token.
                let token = buckets.as_mut().is_none_or(|bk| {
                    (affinity.reusable && self.idle[i].has_ready()) || bk[i].has_token(now)
                });
                load_of(b, candidate && room && token, now)
            })
            .collect();
        if !any_accepting {
            let pool = self.cfg.name.clone();
            return Err(if tried.is_empty() {
                UpstreamError::NoBackend { pool }
            } else {
                UpstreamError::AllFailed { pool }
            });
        }
        // A pinned client goes to its backend whenever that one can take it.
        let pinned = affinity
            .pinned
            .filter(|&p| loads.get(p).is_some_and(|l| l.eligible));
        let Some(i) = pinned.or_else(|| self.balancer.pick(&loads, affinity.key)) else {
            return Ok(None);
        };
        let Some(lease) = registry.lease_within(&backends[i], max) else {
            // Filled up since the loads were read: wait like for a full one.
            return Ok(None);
        };
        if let Some(bk) = buckets.as_mut()
            && !(affinity.reusable && self.idle[i].has_ready())
        {
            bk[i].try_take(now);
        }
        Ok(Some((i, lease)))
    }

    /// Time until some candidate backend has an admission token again.
    fn next_token(&self, tried: &[usize]) -> Option<Duration> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        buckets
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !tried.contains(i))
            .map(|(_, b)| b.wait(now))
            .min()
    }

    /// A lease on a backend not tried yet, or why there is none. When every
    /// backend that accepts is full or out of admission tokens, waits in
    /// the pool's bounded, first-come-first-served queue for up to
    /// `admission.queue_timeout`; then `Overloaded`.
    pub async fn next_lease(
        &self,
        registry: &Arc<Registry>,
        tried: &[usize],
        affinity: Affinity,
    ) -> Result<(usize, Lease), UpstreamError> {
        let nobody_waiting = self.queue.available_permits() == self.cfg.admission.queue_size;
        if nobody_waiting && let Some(lease) = self.try_lease(registry, tried, affinity)? {
            return Ok(lease);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.admission.queue_timeout;
        let pool = registry.pool(self.index);
        let Ok(_place) = self.queue.try_acquire() else {
            pool.admission_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(self.overloaded());
        };
        // Counted while waiting, also when the client goes away meanwhile
        // (the future is dropped): the guard gives the count back.
        let waiting = Waiting::new(&pool.admission_waiting);
        let result = self
            .wait_for_lease(registry, tried, affinity, deadline)
            .await;
        drop(waiting);
        if result
            .as_ref()
            .is_err_and(|e| matches!(e, UpstreamError::Overloaded { .. }))
        {
            pool.admission_rejected.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Waits, in turn, for a backend that can take the connection.
    async fn wait_for_lease(
        &self,
        registry: &Arc<Registry>,
        tried: &[usize],
        affinity: Affinity,
        deadline: tokio::time::Instant,
    ) -> Result<(usize, Lease), UpstreamError> {
        let Ok(_turn) = tokio::time::timeout_at(deadline, self.turn.lock()).await else {
            return Err(self.overloaded());
        };
        loop {
            if let Some(lease) = self.try_lease(registry, tried, affinity)? {
                return Ok(lease);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(self.overloaded());
            }
            // Wait for a token, or poll for a full backend to free a slot.
            let wait = self
                .next_token(tried)
                .unwrap_or(FULL_POLL)
                .clamp(Duration::from_millis(1), FULL_POLL);
            tokio::time::sleep_until((now + wait).min(deadline)).await;
        }
    }

    fn overloaded(&self) -> UpstreamError {
        self.rejected.inc();
        UpstreamError::Overloaded {
            pool: self.cfg.name.clone(),
        }
    }

    /// Counts a data-path failure against `backend`; ejects it after too
    /// many in a row.
    pub fn note_failure(&self, backend: &Backend, what: &str) {
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

    /// Picks a backend and connects to it; on a failed connect, tries other
    /// backends, `retries` more at most.
    pub async fn connect(
        &self,
        registry: &Arc<Registry>,
        affinity: Affinity,
    ) -> Result<(usize, Connected), UpstreamError> {
        let mut tried = Vec::new();
        loop {
            let (i, lease) = self.next_lease(registry, &tried, affinity).await?;
            match self.open(i).await {
                Ok(stream) => return Ok((i, Connected { lease, stream })),
                Err(error) => {
                    warn!(pool = %self.cfg.name, backend = %lease.backend().name, %error, "upstream connect failed");
                    self.note_failure(lease.backend(), "connect failed");
                    tried.push(i);
                    self.give_up_after(&tried, error)?;
                }
            }
        }
    }

    /// How `req` is tied to a backend: its sticky cookie and hash key.
    pub fn affinity<B>(&self, req: &hyper::Request<B>, peer: SocketAddr) -> Affinity {
        let pinned = self.sticky.as_ref().and_then(|s| s.pinned(req.headers()));
        let key = match &self.cfg.algorithm {
            Algorithm::Hash(key) => hash_key(key, req, peer),
            _ => None,
        };
        Affinity {
            pinned,
            key,
            reusable: !crate::http::is_upgrade(req),
        }
    }

    /// The Set-Cookie that pins the client to `chosen`, unless its cookie
    /// already does; a client whose pinned backend could not take it is
    /// re-pinned, and counted.
    pub fn pin(
        &self,
        registry: &Registry,
        affinity: Affinity,
        chosen: usize,
    ) -> Option<hyper::header::HeaderValue> {
        let sticky = self.sticky.as_ref()?;
        if affinity.pinned == Some(chosen) {
            return None;
        }
        if affinity.pinned.is_some() {
            registry
                .pool(self.index)
                .sticky_repins
                .fetch_add(1, Ordering::Relaxed);
        }
        sticky.set_cookie(chosen)
    }

    /// Opens a TCP connection to `addr` with the pool's timeout, recording
    /// how long it took.
    pub async fn open(&self, backend: usize) -> Result<BackendStream, UpstreamError> {
        let addr = self.cfg.backends[backend].address;
        let started = Instant::now();
        let tcp = connect(addr, self.cfg.connect_timeout).await?;
        self.connect_seconds
            .observe(started.elapsed().as_secs_f64());
        let Some(tls) = &self.connectors[backend] else {
            return Ok(BackendStream::Plain(tcp));
        };
        let handshake = tls.connector.connect(tls.server_name.clone(), tcp);
        match tokio::time::timeout(self.cfg.connect_timeout, handshake).await {
            Ok(Ok(tls)) => Ok(BackendStream::Tls(Box::new(tls))),
            Ok(Err(source)) => Err(UpstreamError::Tls { addr, source }),
            Err(_) => Err(UpstreamError::ConnectTimeout {
                addr,
                timeout: self.cfg.connect_timeout,
            }),
        }
    }

    /// After a failed attempt: `Err` when no further attempt may be made.
    pub fn give_up_after(
        &self,
        tried: &[usize],
        error: UpstreamError,
    ) -> Result<(), UpstreamError> {
        if tried.len() >= self.cfg.backends.len() {
            return Err(UpstreamError::AllFailed {
                pool: self.cfg.name.clone(),
            });
        }
        if tried.len() > self.cfg.retries {
            return Err(error);
        }
        Ok(())
    }
}

/// The hash of what `key` names in `req`, if the request has it.
fn hash_key<B>(key: &HashKey, req: &hyper::Request<B>, peer: SocketAddr) -> Option<u64> {
    let bytes: Vec<u8> = match key {
        HashKey::Ip => peer.ip().to_canonical().to_string().into_bytes(),
        HashKey::Header(name) => req.headers().get(name.as_str())?.as_bytes().to_vec(),
        HashKey::Cookie(name) => sticky::cookie(req.headers(), name)?.as_bytes().to_vec(),
        HashKey::Query(name) => percent_decode(
            req.uri()
                .query()?
                .split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                .find(|(k, _)| percent_decode(k) == name.as_bytes())?
                .1,
        ),
    };
    Some(hash::hash64(&bytes))
}

/// `%XX` escapes and `+` decoded, so that `a%40b` and `a@b` are one key.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    out
}

fn load_of(backend: &Backend, eligible: bool, now: Instant) -> Load {
    let ramp = backend.ramp(now);
    Load {
        active: backend.active(),
        weight: f64::from(backend.weight) * ramp,
        ramp,
        eligible,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_keys_are_percent_decoded() {
        assert_eq!(percent_decode("a%40b+c"), b"a@b c");
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%zz%4"), b"%zz%4");
    }
}
