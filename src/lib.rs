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

pub mod access_log;
pub mod acme;
pub mod admin;
pub(crate) mod admission;
pub mod balance;
pub mod cluster;
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
pub(crate) mod notify;
pub(crate) mod pem;
pub(crate) mod proxy_protocol;
pub(crate) mod rebalance;
pub mod registry;
pub mod reload;
pub(crate) mod sockopt;
pub mod tls;
pub(crate) mod trim;
pub(crate) mod tunnel;
pub mod upgrade;
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
    /// Starts a binary upgrade (SIGUSR2).
    pub upgrader: Arc<upgrade::Upgrader>,
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

/// How `start_with` starts, besides the config.
#[derive(Debug, Default)]
pub struct Options {
    /// Sockets and keys from the process this one upgrades.
    pub inherited: Option<upgrade::Inherited>,
    /// The binary and arguments a binary upgrade starts (`None`: upgrades
    /// are refused, as for sluice started as a library).
    pub exec: Option<upgrade::Exec>,
}

/// Binds every listener of `cfg` and serves until `shutdown` is cancelled.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    start_with(cfg, shutdown, Options::default()).await
}

/// Like `start`, taking the listening sockets a predecessor handed over
/// (binary upgrade) and able to upgrade itself.
pub async fn start_with(
    cfg: Config,
    shutdown: CancellationToken,
    options: Options,
) -> Result<Running, StartError> {
    let Options { inherited, exec } = options;
    let (inheritance, mut inherited_admin, inherited_token, link) = match inherited {
        Some(i) => (
            reload::Inheritance {
                listeners: i.listeners,
                sticky_keys: i.sticky_keys,
            },
            i.admin,
            i.admin_token,
            Some((i.link, i.old_pid)),
        ),
        None => (reload::Inheritance::default(), None, None, None),
    };
    let registry = Arc::new(Registry::new(&cfg));
    let cluster = cfg.cluster.clone().map(cluster::Cluster::new);
    let metrics = Arc::new(metrics::Metrics::new(registry.clone(), cluster.clone()));
    let drains = Arc::new(drain::Drains::new(registry.clone()));
    let rebalance_reports = Arc::new(rebalance::Reports::default());
    listener::raise_fd_limit(cfg.listeners.iter().map(|l| l.max_connections).sum());
    let tasks = TaskTracker::new();
    let reloader = reload::Reloader::new(
        registry.clone(),
        metrics.clone(),
        drains.clone(),
        rebalance::Rebalancing {
            reports: rebalance_reports.clone(),
            cluster: cluster.clone(),
        },
        tasks.clone(),
        shutdown.clone(),
        inheritance,
    );
    let upgrader = Arc::new(upgrade::Upgrader::new(
        exec,
        reloader.clone(),
        registry.clone(),
    ));
    // The admin API outlives the listeners, so a drain at shutdown can be watched.
    let admin_stop = CancellationToken::new();
    let admin = match &cfg.admin {
        None => None,
        Some(acfg) => {
            let handed = inherited_admin
                .take()
                .filter(|(bind, _)| *bind == acfg.bind)
                .and_then(|(_, socket)| {
                    socket.set_nonblocking(true).ok()?;
                    tokio::net::TcpListener::from_std(socket).ok()
                });
            let socket = match handed {
                Some(socket) => socket,
                None => admin::bind(acfg.bind)
                    .await
                    .map_err(|source| StartError::AdminBind {
                        addr: acfg.bind,
                        source,
                    })?,
            };
            let fd = std::os::fd::AsFd::as_fd(&socket)
                .try_clone_to_owned()
                .map_err(|source| StartError::AdminBind {
                    addr: acfg.bind,
                    source,
                })?;
            let token = acfg.token.clone().or(inherited_token);
            let info = AdminInfo {
                addr: socket.local_addr().unwrap_or(acfg.bind),
                generated: token.is_none(),
                token: token.unwrap_or_else(admin::generate_token),
            };
            upgrader.set_admin(acfg.bind, fd, info.generated.then(|| info.token.clone()));
            let state = admin::AdminState {
                token: info.token.clone(),
                registry: registry.clone(),
                drains: drains.clone(),
                metrics: metrics.clone(),
                reports: rebalance_reports.clone(),
                reloader: reloader.clone(),
                upgrader: upgrader.clone(),
                timeline: Arc::default(),
                cluster: cluster.clone(),
            };
            Some((info, socket, state, acfg.clone()))
        }
    };
    reloader.apply(cfg).await?;
    let mut admin_done = None;
    let admin = admin.map(|(info, socket, state, acfg)| {
        admin_done = Some(tokio::spawn(admin::serve(
            socket,
            Arc::new(state),
            acfg.header_read_timeout,
            acfg.max_connections,
            admin_stop.clone(),
        )));
        info
    });
    tokio::spawn(trim::run(registry.clone(), shutdown.clone()));
    // The cluster outlives the shutdown's start: its counts stand for the
    // WebSockets still draining here, until they are gone.
    let cluster = cluster.map(|cluster| {
        let leave = CancellationToken::new();
        let done = tokio::spawn(cluster.run(
            registry.clone(),
            drains.clone(),
            shutdown.clone(),
            leave.clone(),
        ));
        ClusterTask { leave, done }
    });
    let done = tokio::spawn(shut_down_on_cancel(
        registry.clone(),
        drains.clone(),
        reloader.clone(),
        tasks,
        shutdown,
        LastTasks {
            admin_stop,
            admin_done,
            cluster,
        },
        upgrader.clone(),
    ));
    match link {
        // Serving: the previous process may stop accepting now.
        Some((link, old_pid)) => upgrader.ready(link, old_pid),
        None => notify::ready(),
    }
    Ok(Running {
        listeners: reloader.listeners().to_vec(),
        admin,
        registry,
        reloader,
        upgrader,
        done,
    })
}

/// The tasks stopped last: the cluster's (its counts stand for what still
/// drains here), then the admin API (awaited so that its last answers go
/// out).
struct LastTasks {
    admin_stop: CancellationToken,
    admin_done: Option<tokio::task::JoinHandle<()>>,
    cluster: Option<ClusterTask>,
}

/// The cluster task: leaves the cluster when `leave` is cancelled.
struct ClusterTask {
    leave: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

async fn shut_down_on_cancel(
    registry: Arc<Registry>,
    drains: Arc<drain::Drains>,
    reloader: Arc<reload::Reloader>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    last: LastTasks,
    upgrader: Arc<upgrade::Upgrader>,
) {
    let LastTasks {
        admin_stop,
        admin_done,
        cluster,
    } = last;
    let handed_over = upgrader.handed_over.clone();
    let farewell = tokio::select! {
        () = shutdown.cancelled() => drain::Farewell::Shutdown(SHUTDOWN_CLOSE_CODE),
        () = handed_over.cancelled() => {
            // A new process serves now, admin API included: stop accepting
            // and move the WebSockets over as a drain does (1012).
            admin_stop.cancel();
            shutdown.cancel();
            reloader.release_sockets().await;
            upgrader.release_admin();
            drain::Farewell::HandedOver(upgrader.moved_feed())
        }
    };
    if let drain::Farewell::Shutdown(_) = farewell {
        // Not after a handover: the service manager follows the new process.
        notify::stopping();
    }
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
    match &farewell {
        drain::Farewell::Shutdown(code) => info!(
            websockets = registry.ws_total(),
            "shutting down: draining every backend, closing WebSockets with {code}"
        ),
        drain::Farewell::HandedOver(_) => info!(
            websockets = registry.ws_total(),
            "handed over: draining every backend with each pool's close code"
        ),
    }
    drains.drain_all(farewell);
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(
            websockets = registry.ws_total(),
            "connections still open at the shutdown deadline: dropping them"
        );
        registry.abort_all();
        let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    }
    if let Some(cluster) = cluster {
        // Nothing is left here to count: the others stop counting this
        // process at once (bounded: Redis may be away).
        cluster.leave.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), cluster.done).await;
    }
    // The last WebSockets' lines reach the access log before the end.
    reloader.flush_logs(Duration::from_secs(2)).await;
    admin_stop.cancel();
    // Its last answers (the upgrade that handed this process over) go out
    // before the process ends.
    if let Some(done) = admin_done {
        let _ = done.await;
    }
    info!("shut down");
}
