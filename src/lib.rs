//! sluice: a WebSocket-native load balancer.
//!
//! [`start`] binds the configured listeners and serves until its shutdown
//! token is cancelled; then it stops accepting, asks every WebSocket to close
//! with 1001 (Going Away) at a message boundary, lets in-flight HTTP requests
//! finish, and returns within the shutdown timeout.
//!
//! Data path: `listener` → `http` → `upstream` (+ `balance`) → `tunnel`.
//! Meeting point: `registry`. Control plane: `config` (and, later, health,
//! drain, rebalance, admin). See docs/ARCHITECTURE.md.

pub mod balance;
pub mod config;
pub mod demo;
pub mod http;
pub mod listener;
pub mod registry;
pub mod trim;
pub mod tunnel;
pub mod upstream;

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
    #[error("listener {name:?}: binding {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running sluice.
pub struct Running {
    /// Each listener's name and bound address (the real port when 0 was configured).
    pub listeners: Vec<(String, SocketAddr)>,
    /// Live connections per backend.
    pub registry: Arc<Registry>,
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
    let upstreams: Vec<Arc<Upstream>> = cfg
        .pools
        .iter()
        .enumerate()
        .map(|(i, pool)| Arc::new(Upstream::new(pool.clone(), i)))
        .collect();
    listener::raise_fd_limit(cfg.listeners.iter().map(|l| l.max_connections).sum());
    let tasks = TaskTracker::new();
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
        let ctx = Arc::new(ListenerCtx {
            cfg: lcfg.clone(),
            upstream: upstreams[lcfg.pool].clone(),
            registry: registry.clone(),
            tasks: tasks.clone(),
        });
        bound.push((socket, ctx));
    }
    for (socket, ctx) in bound {
        tasks.spawn(listener::serve(
            socket,
            ctx,
            tasks.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(trim::run(registry.clone(), shutdown.clone()));
    let done = tokio::spawn(shut_down_on_cancel(
        registry.clone(),
        tasks,
        shutdown,
        cfg.shutdown_timeout,
    ));
    Ok(Running {
        listeners: addrs,
        registry,
        done,
    })
}

async fn shut_down_on_cancel(
    registry: Arc<Registry>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    grace: Duration,
) {
    shutdown.cancelled().await;
    info!(
        websockets = registry.ws_total(),
        "shutting down: closing WebSockets with 1001"
    );
    registry.close_all(SHUTDOWN_CLOSE_CODE);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(
            websockets = registry.ws_total(),
            "connections still open at the shutdown deadline: dropping them"
        );
        registry.abort_all();
        let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    }
    info!("shut down");
}
