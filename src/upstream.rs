//! Connections to backends.
//!
//! Owns picking and leasing a backend for one client request, opening TCP
//! connections with a timeout, retrying on another backend when a connect
//! fails before anything was sent, and keeping idle HTTP/1.1 connections for
//! reuse. The choice itself is `balance`'s; the counts are `registry`'s.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::balance::{Balancer, Load};
use crate::config::PoolConfig;
use crate::registry::{Backend, Lease, Registry};

/// Why no upstream connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to backend {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("backend {addr} did not accept a connection within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with backend {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("pool {pool:?}: every backend failed to accept a connection")]
    AllFailed { pool: String },
    #[error("pool {pool:?}: no backend is available")]
    NoBackend { pool: String },
}

impl UpstreamError {
    /// True when the pool had nothing to offer (503), rather than a backend
    /// failing (502).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::AllFailed { .. } | Self::NoBackend { .. })
    }
}

/// Opens a TCP connection to `addr` within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Ok(Ok(stream)) => {
            // Small WebSocket frames must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// Starts HTTP/1.1 on `stream`; the connection is driven by a spawned task
/// that also lets an upgrade (101) hand the socket over.
pub async fn handshake(
    stream: TcpStream,
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
    balancer: Balancer,
    idle: Vec<Arc<IdlePool>>,
}

/// An open connection to a leased backend.
#[derive(Debug)]
pub struct Connected {
    pub lease: Lease,
    pub stream: TcpStream,
}

impl Upstream {
    pub fn new(cfg: PoolConfig, index: usize, connect_seconds: Histogram) -> Self {
        let idle = cfg
            .backends
            .iter()
            .map(|_| Arc::new(IdlePool::new(cfg.keepalive_max_idle, cfg.keepalive_timeout)))
            .collect();
        Self {
            balancer: Balancer::new(cfg.algorithm),
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

    /// Picks a backend not in `tried` and leases a slot on it.
    pub fn lease(&self, registry: &Arc<Registry>, tried: &[usize]) -> Option<(usize, Lease)> {
        let backends = &registry.pool(self.index).backends;
        let loads: Vec<Load> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| load_of(b, b.is_accepting() && !tried.contains(&i)))
            .collect();
        let i = self.balancer.pick(&loads)?;
        Some((i, registry.lease(&backends[i])))
    }

    /// Picks a backend and connects to it; on a failed connect, tries other
    /// backends, `retries` more at most.
    pub async fn connect(
        &self,
        registry: &Arc<Registry>,
    ) -> Result<(usize, Connected), UpstreamError> {
        let mut tried = Vec::new();
        loop {
            let (i, lease) = self.next_lease(registry, &tried)?;
            let addr = lease.backend().addr;
            match self.open(addr).await {
                Ok(stream) => return Ok((i, Connected { lease, stream })),
                Err(error) => {
                    warn!(pool = %self.cfg.name, backend = %lease.backend().name, %error, "upstream connect failed");
                    tried.push(i);
                    self.give_up_after(&tried, error)?;
                }
            }
        }
    }

    /// Opens a TCP connection to `addr` with the pool's timeout, recording
    /// how long it took.
    pub async fn open(&self, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let started = Instant::now();
        let result = connect(addr, self.cfg.connect_timeout).await;
        if result.is_ok() {
            self.connect_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// A lease on a backend not tried yet, or why there is none.
    pub fn next_lease(
        &self,
        registry: &Arc<Registry>,
        tried: &[usize],
    ) -> Result<(usize, Lease), UpstreamError> {
        self.lease(registry, tried).ok_or_else(|| {
            let pool = self.cfg.name.clone();
            if tried.is_empty() {
                UpstreamError::NoBackend { pool }
            } else {
                UpstreamError::AllFailed { pool }
            }
        })
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

fn load_of(backend: &Backend, eligible: bool) -> Load {
    Load {
        active: backend.active(),
        weight: backend.weight,
        eligible,
    }
}
