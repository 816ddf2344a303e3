//! sluice: a WebSocket-native load balancer.
//!
//! [`start`] binds the configured listeners and the admin API and serves
//! until its shutdown token is cancelled; then it stops accepting, drains
//! every backend (WebSockets close with 1001, Going Away, at message
//! boundaries, spread over each pool's drain window), lets in-flight HTTP
//! requests finish, and returns.
//!
//! Data path: `listener` → `tls` → `http` → `upstream` (+ `balance`,
//! `admission`) → `tunnel`. Meeting point: `registry`. Shared plain data
//! and pure rules: `config`, `pem`, `health_state`, `error_chain`. Control
//! plane: `health`, `drain`, `rebalance`, `admin`, `metrics`, `trim`, `ctl`,
//! `demo`. See docs/ARCHITECTURE.md (the layers are checked by
//! tests/it/layers.rs).

pub mod admin;
pub(crate) mod admission;
pub mod balance;
pub mod config;
pub(crate) mod conn_limit;
pub mod ctl;
pub mod demo;
pub(crate) mod drain;
mod error_chain;
pub(crate) mod health;
pub(crate) mod health_state;
pub(crate) mod http;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod pem;
pub(crate) mod proxy_protocol;
pub(crate) mod rebalance;
pub mod registry;
pub(crate) mod sockopt;
pub mod tls;
pub(crate) mod trim;
pub(crate) mod tunnel;
pub(crate) mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::Config;
use http::ListenerCtx;
use registry::Registry;
use upstream::Upstream;

/// Close code sent to WebSockets when sluice itself stops (Going Away).
pub const SHUTDOWN_CLOSE_CODE: u16 = 1001;

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {name:?}: binding {addr}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin API: binding {addr}")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {name:?}")]
    Tls { name: String, source: pem::PemError },
    #[error("pool {pool:?} backend {backend:?}: TLS towards the backend")]
    BackendTls {
        pool: String,
        backend: String,
        source: pem::PemError,
    },
}

/// Where the admin API listens and its token.
#[derive(Debug, Clone)]
pub struct AdminInfo {
    pub addr: SocketAddr,
    pub token: String,
    /// The token was generated at start (none was configured).
    pub generated: bool,
}

/// A running sluice.
pub struct Running {
    /// Each listener's name and bound address (the real port when 0 was configured).
    pub listeners: Vec<(String, SocketAddr)>,
    /// The admin API, when enabled.
    pub admin: Option<AdminInfo>,
    /// Live connections per backend.
    pub registry: Arc<Registry>,
    /// Reloads TLS certificates when sent to (SIGHUP).
    pub reload_certificates: Arc<tokio::sync::watch::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Address of the listener named `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// During shutdown: stop spreading the closes, close every WebSocket now
    /// (still at message boundaries).
    pub fn close_now(&self) {
        self.registry.close_all(SHUTDOWN_CLOSE_CODE);
    }

    /// Waits until sluice has shut down.
    pub async fn wait(self) {
        if let Err(error) = self.done.await {
            warn!(%error, "shutdown task failed");
        }
    }
}

/// Binds every listener of `cfg` and serves until `shutdown` is cancelled.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    let registry = Arc::new(Registry::new(&cfg));
    let metrics = Arc::new(metrics::Metrics::new(registry.clone()));
    let drains = Arc::new(drain::Drains::new(
        registry.clone(),
        cfg.pools.iter().map(|p| p.drain).collect(),
    ));
    let rebalance_reports = Arc::new(rebalance::Reports::new(cfg.pools.len()));
    // TLS towards backends is set up once: a CA that does not load stops
    // the start, never a silent fallback to plain text.
    let mut connectors = Vec::new();
    for pool in &cfg.pools {
        let mut pool_connectors = Vec::new();
        for b in &pool.backends {
            let connector = b
                .tls
                .as_ref()
                .map(upstream::BackendTlsConnector::new)
                .transpose()
                .map_err(|source| StartError::BackendTls {
                    pool: pool.name.clone(),
                    backend: b.name.clone(),
                    source,
                })?;
            pool_connectors.push(connector);
        }
        connectors.push(pool_connectors);
    }
    let upstreams: Vec<Arc<Upstream>> = cfg
        .pools
        .iter()
        .zip(&connectors)
        .enumerate()
        .map(|(i, (pool, tls))| {
            Arc::new(Upstream::new(
                pool.clone(),
                i,
                tls.clone(),
                metrics.connect_seconds.clone(),
                metrics.admission_rejected(&pool.name),
            ))
        })
        .collect();
    listener::raise_fd_limit(cfg.listeners.iter().map(|l| l.max_connections).sum());
    let tasks = TaskTracker::new();
    let hup = Arc::new(tokio::sync::watch::Sender::new(()));
    let mut bound = Vec::new();
    let mut addrs = Vec::new();
    for lcfg in &cfg.listeners {
        let socket = listener::bind(lcfg.bind).map_err(|source| StartError::Bind {
            name: lcfg.name.clone(),
            addr: lcfg.bind,
            source,
        })?;
        let addr = socket.local_addr().unwrap_or(lcfg.bind);
        addrs.push((lcfg.name.clone(), addr));
        let tls = match &lcfg.tls {
            None => None,
            Some(settings) => {
                let tls = tls::Tls::new(settings).map_err(|source| StartError::Tls {
                    name: lcfg.name.clone(),
                    source,
                })?;
                tokio::spawn(tls.clone().watch(
                    lcfg.name.clone(),
                    hup.subscribe(),
                    shutdown.clone(),
                ));
                Some(tls)
            }
        };
        let ctx = Arc::new(ListenerCtx {
            tls,
            handshake_errors: metrics.tls_handshake_errors(&lcfg.name),
            proxy_rejected: metrics.proxy_rejected(&lcfg.name),
            client_limit: (lcfg.max_connections_per_client > 0)
                .then(|| conn_limit::ClientLimit::new(lcfg.max_connections_per_client)),
            client_limited: metrics.client_limited(&lcfg.name),
            cfg: lcfg.clone(),
            upstream: upstreams[lcfg.pool].clone(),
            registry: registry.clone(),
            tasks: tasks.clone(),
            accepted: metrics.accepted(&lcfg.name),
        });
        bound.push((socket, ctx));
    }
    // The admin API outlives the listeners, so a drain at shutdown can be watched.
    let admin_stop = CancellationToken::new();
    let admin = match &cfg.admin {
        None => None,
        Some(acfg) => {
            let socket = admin::bind(acfg.bind)
                .await
                .map_err(|source| StartError::AdminBind {
                    addr: acfg.bind,
                    source,
                })?;
            let info = AdminInfo {
                addr: socket.local_addr().unwrap_or(acfg.bind),
                token: acfg.token.clone().unwrap_or_else(admin::generate_token),
                generated: acfg.token.is_none(),
            };
            let state = admin::AdminState::new(
                &cfg,
                info.token.clone(),
                registry.clone(),
                drains.clone(),
                metrics.clone(),
                rebalance_reports.clone(),
            );
            tokio::spawn(admin::serve(
                socket,
                Arc::new(state),
                acfg.header_read_timeout,
                acfg.max_connections,
                admin_stop.clone(),
            ));
            Some(info)
        }
    };
    for (socket, ctx) in bound {
        tasks.spawn(listener::serve(
            socket,
            ctx,
            tasks.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(trim::run(registry.clone(), shutdown.clone()));
    for (p, (pool, tls)) in cfg.pools.iter().zip(connectors).enumerate() {
        tokio::spawn(health::run(
            p,
            registry.clone(),
            pool.clone(),
            tls,
            shutdown.clone(),
        ));
        // Clients of hash and sticky pools come back to the backend their
        // key or cookie names: shedding them would move nothing.
        let pinned = matches!(pool.algorithm, config::Algorithm::Hash(_)) || pool.sticky.is_some();
        if pool.rebalance.enabled && pinned {
            info!(pool = %pool.name, "rebalancing off: hash and sticky clients return to their backend");
        }
        if pool.rebalance.enabled && !pinned {
            tokio::spawn(rebalance::run(
                p,
                registry.clone(),
                pool.rebalance,
                pool.drain.close_code,
                rebalance_reports.clone(),
                shutdown.clone(),
            ));
        }
    }
    let longest_window = cfg
        .pools
        .iter()
        .map(|p| p.drain.window)
        .max()
        .unwrap_or_default();
    let done = tokio::spawn(shut_down_on_cancel(
        registry.clone(),
        drains.clone(),
        tasks,
        shutdown,
        admin_stop,
        longest_window + cfg.shutdown_timeout,
    ));
    Ok(Running {
        reload_certificates: hup,
        listeners: addrs,
        admin,
        registry,
        done,
    })
}

async fn shut_down_on_cancel(
    registry: Arc<Registry>,
    drains: Arc<drain::Drains>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    admin_stop: CancellationToken,
    grace: Duration,
) {
    shutdown.cancelled().await;
    info!(
        websockets = registry.ws_total(),
        "shutting down: draining every backend, closing WebSockets with 1001"
    );
    drains.drain_all(SHUTDOWN_CLOSE_CODE);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(
            websockets = registry.ws_total(),
            "connections still open at the shutdown deadline: dropping them"
        );
        registry.abort_all();
        let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    }
    admin_stop.cancel();
    info!("shut down");
}
