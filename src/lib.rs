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
pub mod reload;
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
use registry::Registry;

/// Close code sent to WebSockets when sluice itself stops (Going Away).
pub const SHUTDOWN_CLOSE_CODE: u16 = 1001;

/// Why sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Apply(#[from] reload::ApplyError),
    #[error("admin API: binding {addr}")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
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
    /// Each listener's name and bound address at start (the real port when
    /// 0 was configured); `addr` follows reloads.
    pub listeners: Vec<(String, SocketAddr)>,
    /// The admin API, when enabled.
    pub admin: Option<AdminInfo>,
    /// Live connections per backend.
    pub registry: Arc<Registry>,
    /// Reads the config file again and applies it (SIGHUP).
    pub reloader: Arc<reload::Reloader>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Address of the listener named `name`, as it is now.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.reloader
            .listeners()
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
    let drains = Arc::new(drain::Drains::new(registry.clone()));
    let rebalance_reports = Arc::new(rebalance::Reports::default());
    listener::raise_fd_limit(cfg.listeners.iter().map(|l| l.max_connections).sum());
    let tasks = TaskTracker::new();
    let reloader = reload::Reloader::new(
        registry.clone(),
        metrics.clone(),
        drains.clone(),
        rebalance_reports.clone(),
        tasks.clone(),
        shutdown.clone(),
    );
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
            let state = admin::AdminState {
                token: info.token.clone(),
                registry: registry.clone(),
                drains: drains.clone(),
                metrics: metrics.clone(),
                reports: rebalance_reports.clone(),
                reloader: reloader.clone(),
            };
            Some((info, socket, state, acfg.clone()))
        }
    };
    reloader.apply(cfg).await?;
    let admin = admin.map(|(info, socket, state, acfg)| {
        tokio::spawn(admin::serve(
            socket,
            Arc::new(state),
            acfg.header_read_timeout,
            acfg.max_connections,
            admin_stop.clone(),
        ));
        info
    });
    tokio::spawn(trim::run(registry.clone(), shutdown.clone()));
    let done = tokio::spawn(shut_down_on_cancel(
        registry.clone(),
        drains.clone(),
        reloader.clone(),
        tasks,
        shutdown,
        admin_stop,
    ));
    Ok(Running {
        listeners: reloader.listeners().to_vec(),
        admin,
        registry,
        reloader,
        done,
    })
}

async fn shut_down_on_cancel(
    registry: Arc<Registry>,
    drains: Arc<drain::Drains>,
    reloader: Arc<reload::Reloader>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    admin_stop: CancellationToken,
) {
    shutdown.cancelled().await;
    // The running config's windows: a reload may have changed them.
    let grace = match reloader.config().await {
        Some(cfg) => {
            cfg.pools
                .iter()
                .map(|p| p.drain.window)
                .max()
                .unwrap_or_default()
                + cfg.shutdown_timeout
        }
        None => Duration::ZERO,
    };
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
