//! Config reload: the running config becomes a new one without closing
//! anything that still fits.
//!
//! Owns what a config generation is made of: the listeners (sockets,
//! accept loops, the context their connections read), each pool's
//! data-path view (`Upstream`) and the pool tasks (health checks,
//! rebalancer). `apply` is used at start and for every reload: it
//! computes the change (`config::diff`), prepares everything that can fail
//! (binding new listeners, loading certificates and backend CAs) before
//! touching anything, then swaps: the registry takes the new pools
//! (backends that stay keep their state), listeners that stay get a new
//! context, new ones start accepting, removed backends and listeners
//! drain, and the previous generation's tasks end. A reload that fails
//! leaves the running config as it was.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access_log::{AccessLog, AccessLogError, WeakAccessLog};
use crate::config::{self, AcmeChallenge, Algorithm, Change, Config, ConfigError};
use crate::config::{AccessTarget, LogConfig, LogFormat};
use crate::conn_limit::ClientLimit;
use crate::drain::Drains;
use crate::error_chain::chain;
use crate::http::challenge::Http01Answers;
use crate::http::{ListenerCell, ListenerCtx};
use crate::metrics::Metrics;
use crate::pem::PemError;
use crate::registry::Registry;
use crate::tls::Tls;
use crate::upstream::{BackendTlsConnector, Upstream};
use crate::{health, listener, rebalance};

/// How often backends that a reload removed are looked at, to forget the
/// ones that have drained.
const FORGET_POLL: Duration = Duration::from_millis(250);

/// Why a config could not be put in place (at start or by a reload).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("listener {name:?}: binding {addr}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {name:?}")]
    Tls { name: String, source: PemError },
    #[error("pool {pool:?} backend {backend:?}: TLS towards the backend")]
    BackendTls {
        pool: String,
        backend: String,
        source: PemError,
    },
    #[error("[log] access")]
    AccessLog(#[source] AccessLogError),
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("sluice was started without a config file: there is nothing to read again")]
    NoFile,
    #[error("the config file is invalid; the running config is kept")]
    Invalid(#[source] ConfigError),
    #[error("the new config could not be applied; the running config is kept")]
    Apply(#[source] ApplyError),
    #[error("sluice is shutting down")]
    ShuttingDown,
}

/// The config generation in use.
#[derive(Debug, Clone)]
pub struct Generation {
    /// 1 at start, one more per applied reload.
    pub number: u64,
    pub loaded_at: SystemTime,
    /// The file it was read from.
    pub path: Option<PathBuf>,
}

/// One listener across generations.
struct Slot {
    name: String,
    /// As configured (a port 0 stays 0 here).
    bind: SocketAddr,
    /// As bound.
    addr: SocketAddr,
    id: u32,
    cell: ListenerCell,
    limit: Arc<Semaphore>,
    max: usize,
    /// Stops its accept loop and its connections' keep-alive.
    stop: CancellationToken,
    /// Stops its certificate watcher.
    tls_watch: Option<CancellationToken>,
    /// A duplicate of the listening socket, for a binary upgrade (none
    /// once handed over).
    fd: Option<OwnedFd>,
}

struct State {
    cfg: Option<Config>,
    listeners: Vec<Slot>,
    upstreams: HashMap<String, Arc<Upstream>>,
    /// Ends this generation's pool tasks.
    stop: CancellationToken,
    next_listener: u32,
}

/// What a new listener needs, made before anything is swapped.
struct Prepared {
    /// The slot it keeps (same name and address), else its new socket
    /// and a duplicate of it.
    kept: Option<usize>,
    socket: Option<(TcpListener, OwnedFd)>,
    tls: Option<Tls>,
}

/// Listening sockets and sticky keys a new process got from its
/// predecessor (binary upgrade), for the first config it applies.
#[derive(Debug, Default)]
pub struct Inheritance {
    /// Name, configured address, socket.
    pub listeners: Vec<(String, SocketAddr, std::net::TcpListener)>,
    /// Sticky-cookie keys by pool.
    pub sticky_keys: HashMap<String, [u8; 32]>,
}

/// What `Reloader::handover` gathers.
pub struct HandedOver {
    pub listeners: Vec<(String, SocketAddr, OwnedFd)>,
    pub sticky_keys: Vec<(String, [u8; 32])>,
}

/// Puts configs in place: at start, and at every reload.
pub struct Reloader {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    drains: Arc<Drains>,
    rebalancing: rebalance::Rebalancing,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    state: tokio::sync::Mutex<State>,
    generation: Mutex<Generation>,
    /// Each listener's name and bound address, for `Running::addr`.
    bound: ArcSwap<Vec<(String, SocketAddr)>>,
    /// What a predecessor handed over, used by the first `apply`.
    inherited: Mutex<Inheritance>,
    /// ACME HTTP-01 answers, served by the plain listeners.
    http01: Http01Answers,
    /// The access log in use, with the settings it was started with.
    access: Mutex<Option<(AccessTarget, usize, AccessLog)>>,
    /// Every access log started, while WebSockets opened before a reload
    /// still write to one: SIGUSR1 reopens them all.
    access_logs: Mutex<Vec<WeakAccessLog>>,
    /// The format of both logs, fixed by the first config.
    log_format: Mutex<Option<LogFormat>>,
}

impl Reloader {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        drains: Arc<Drains>,
        rebalancing: rebalance::Rebalancing,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        inherited: Inheritance,
    ) -> Arc<Self> {
        let reloader = Arc::new(Self {
            registry,
            metrics,
            drains,
            rebalancing,
            tasks,
            state: tokio::sync::Mutex::new(State {
                cfg: None,
                listeners: Vec::new(),
                upstreams: HashMap::new(),
                stop: shutdown.child_token(),
                next_listener: 1,
            }),
            shutdown,
            generation: Mutex::new(Generation {
                number: 0,
                loaded_at: SystemTime::now(),
                path: None,
            }),
            bound: ArcSwap::from_pointee(Vec::new()),
            inherited: Mutex::new(inherited),
            http01: Http01Answers::default(),
            access: Mutex::new(None),
            access_logs: Mutex::new(Vec::new()),
            log_format: Mutex::new(None),
        });
        tokio::spawn(reloader.clone().forget_drained());
        reloader
    }

    /// Makes the access log open its file anew (after log rotation).
    pub fn reopen_logs(&self) {
        let mut logs = lock(&self.access_logs);
        logs.retain(|weak| match weak.upgrade() {
            Some(log) => {
                log.reopen();
                true
            }
            None => false,
        });
    }

    /// Waits (up to `limit`) until the access log has written what it was
    /// given: at the end, so that the last lines are not lost.
    pub async fn flush_logs(&self, limit: Duration) {
        let live: Vec<AccessLog> = lock(&self.access_logs)
            .iter()
            .filter_map(WeakAccessLog::upgrade)
            .collect();
        if live.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for log in live {
                log.flush(limit);
            }
        })
        .await;
    }

    /// The access log `cfg` asks for: the one in use when its settings
    /// stay, else a new one (in the format of the first config).
    fn prepare_access(&self, cfg: &LogConfig) -> Result<Option<AccessLog>, ApplyError> {
        if cfg.access == AccessTarget::Off {
            return Ok(None);
        }
        if let Some((target, queue, log)) = &*lock(&self.access)
            && (target, *queue) == (&cfg.access, cfg.access_queue)
        {
            return Ok(Some(log.clone()));
        }
        let format = *lock(&self.log_format).get_or_insert(cfg.format);
        let log = AccessLog::start(
            &cfg.access,
            format,
            cfg.access_queue,
            self.metrics.access_log.clone(),
        )
        .map_err(ApplyError::AccessLog)?;
        lock(&self.access_logs).push(log.downgrade());
        Ok(Some(log))
    }

    /// The generation in use.
    pub fn generation(&self) -> Generation {
        lock(&self.generation).clone()
    }

    /// Each listener's name and bound address (the real port when 0 was
    /// configured).
    pub fn listeners(&self) -> Arc<Vec<(String, SocketAddr)>> {
        self.bound.load_full()
    }

    /// The running config.
    pub async fn config(&self) -> Option<Config> {
        self.state.lock().await.cfg.clone()
    }

    /// After a handover: closes this process's duplicates of the listening
    /// sockets (its accept loops have stopped), so that only the new
    /// process holds them.
    pub async fn release_sockets(&self) {
        for slot in &mut self.state.lock().await.listeners {
            slot.fd = None;
        }
    }

    /// What a binary upgrade hands over: each listener's name and
    /// configured address with a duplicate of its socket, and each pool's
    /// sticky key.
    pub async fn handover(&self) -> io::Result<HandedOver> {
        let st = self.state.lock().await;
        let mut listeners = Vec::with_capacity(st.listeners.len());
        for slot in &st.listeners {
            let Some(fd) = &slot.fd else {
                return Err(io::Error::other(
                    "the listening sockets were handed over already",
                ));
            };
            listeners.push((slot.name.clone(), slot.bind, fd.try_clone()?));
        }
        let sticky_keys = st
            .upstreams
            .iter()
            .map(|(pool, u)| (pool.clone(), u.sticky_key()))
            .collect();
        Ok(HandedOver {
            listeners,
            sticky_keys,
        })
    }

    /// Reads the config file again and applies it; returns what changed
    /// (empty: nothing did).
    pub async fn reload(&self) -> Result<Vec<Change>, ReloadError> {
        if self.shutdown.is_cancelled() {
            return Err(ReloadError::ShuttingDown);
        }
        let path = lock(&self.generation).path.clone();
        let Some(path) = path else {
            return Err(ReloadError::NoFile);
        };
        crate::notify::reloading();
        let result = self.reload_from(&path).await;
        crate::notify::ready();
        result
    }

    async fn reload_from(&self, path: &std::path::Path) -> Result<Vec<Change>, ReloadError> {
        let new = match config::load(path) {
            Ok(cfg) => cfg,
            Err(error) => {
                warn!(error = %chain(&error), "reload refused: the config file is invalid; the running config is kept");
                return Err(ReloadError::Invalid(error));
            }
        };
        match self.apply(new).await {
            Ok(changes) => {
                if changes.is_empty() {
                    info!(path = %path.display(), "reload: nothing changed");
                }
                Ok(changes)
            }
            Err(error) => {
                warn!(error = %chain(&error), "reload refused; the running config is kept");
                Err(ReloadError::Apply(error))
            }
        }
    }

    /// Puts `new` in place of the running config (at start: the first).
    pub async fn apply(&self, new: Config) -> Result<Vec<Change>, ApplyError> {
        let mut st = self.state.lock().await;
        let changes = st
            .cfg
            .as_ref()
            .map(|old| config::diff(old, &new))
            .unwrap_or_default();
        let mut connectors = backend_connectors(&new)?;
        let prepared = self.prepare_listeners(&st, &new)?;
        // Both logs keep the first config's format.
        lock(&self.log_format).get_or_insert(new.log.format);
        let access = self.prepare_access(&new.log)?;
        // Everything that can fail has been made: certificate files whose
        // paths did not change are read again now (SIGHUP always did; a
        // file that no longer loads keeps the ones in use).
        for (l, prep) in new.listeners.iter().zip(&prepared) {
            if let (Some(_), Some(tls)) = (prep.kept, &prep.tls) {
                tls.reload(&l.name);
            }
        }

        // Nothing below fails: the swap.
        let now = Instant::now();
        let reconfigured = self.registry.reconfigure(&new, now);
        let stop = self.shutdown.child_token();
        let mut upstreams = HashMap::new();
        let mut inherited_keys = std::mem::take(&mut lock(&self.inherited).sticky_keys);
        for pool in self.registry.pools().iter().filter(|p| !p.removed) {
            let tls = connectors.remove(&pool.name).unwrap_or_default();
            let previous = st.upstreams.get(&pool.name);
            let sticky_key = previous
                .map(|u| u.sticky_key())
                .or_else(|| inherited_keys.remove(&pool.name))
                .unwrap_or_else(rand::random);
            let upstream = Arc::new(Upstream::new(
                pool.clone(),
                tls.clone(),
                self.metrics.connect_seconds.clone(),
                self.metrics.admission_rejected(&pool.name),
                previous.map(|u| &**u),
                sticky_key,
            ));
            tokio::spawn(health::run(pool.clone(), tls, stop.clone()));
            // Clients of strict hash pools come back to the backend their
            // key names: shedding them would move nothing. (Sticky clients
            // whose WebSocket the rebalancer closes are placed afresh; with
            // hash_balance_factor, keys spill over from a full backend.)
            let pinned = matches!(pool.cfg.algorithm, Algorithm::Hash(_))
                && pool.cfg.hash_balance_factor.is_none();
            let was = st.upstreams.get(&pool.name).map(|u| &u.cfg);
            if pool.cfg.rebalance.enabled && pinned && was != Some(&pool.cfg) {
                info!(pool = %pool.name, "rebalancing off: hash clients return to the backend their key names (set hash_balance_factor to let them spill over)");
            }
            if pool.cfg.rebalance.enabled && !pinned {
                tokio::spawn(rebalance::run(
                    pool.clone(),
                    self.rebalancing.clone(),
                    stop.clone(),
                ));
            }
            upstreams.insert(pool.name.clone(), upstream);
        }
        self.swap_listeners(&mut st, &new, prepared, &upstreams, access.as_ref());
        *lock(&self.access) = access.map(|log| (new.log.access.clone(), new.log.access_queue, log));
        // Reports name backends by their place in the pool, which may have
        // changed: the rebalancer makes new ones.
        self.rebalancing.reports.clear();
        for (pool, backend) in &reconfigured.removed {
            self.drains.retire(pool, backend);
        }
        for backend in &reconfigured.revived {
            if let Some(pool) = self
                .registry
                .pools()
                .iter()
                .find(|p| p.backends.iter().any(|b| Arc::ptr_eq(b, backend)))
            {
                self.drains.put_back(&pool.name, backend);
            }
        }
        std::mem::replace(&mut st.stop, stop).cancel();
        st.upstreams = upstreams;
        // Sockets handed over for listeners the config no longer has close.
        lock(&self.inherited).listeners.clear();
        // The same config again is the same generation (its backend CAs
        // and certificates were read anew all the same).
        let number = {
            let mut generation = lock(&self.generation);
            if generation.number == 0 || !changes.is_empty() {
                generation.number += 1;
                generation.loaded_at = SystemTime::now();
                generation.path = new.path.clone();
            }
            generation.number
        };
        self.metrics.config_generation.set(number as i64);
        st.cfg = Some(new);
        for change in &changes {
            info!(generation = number, "reload: {change}");
        }
        Ok(changes)
    }

    /// Binds the listeners that are new and loads every listener's
    /// certificates; `Err` before anything was changed.
    fn prepare_listeners(&self, st: &State, new: &Config) -> Result<Vec<Prepared>, ApplyError> {
        let mut prepared = Vec::with_capacity(new.listeners.len());
        for l in &new.listeners {
            let kept = st
                .listeners
                .iter()
                .position(|s| s.name == l.name && s.bind == l.bind);
            let socket = match kept {
                Some(_) => None,
                None => {
                    let bind_error = |source| ApplyError::Bind {
                        name: l.name.clone(),
                        addr: l.bind,
                        source,
                    };
                    let socket = match self.take_inherited(&l.name, l.bind) {
                        Some(socket) => socket,
                        None => listener::bind(l.bind).map_err(bind_error)?,
                    };
                    let fd = socket.as_fd().try_clone_to_owned().map_err(bind_error)?;
                    Some((socket, fd))
                }
            };
            let tls = match &l.tls {
                None => None,
                Some(settings) => {
                    let same = kept
                        .and_then(|i| st.listeners[i].cell.load().tls.clone())
                        .filter(|t| t.settings() == settings && t.h2 == l.http2());
                    match same {
                        // The same files: read again once nothing can fail.
                        Some(tls) => Some(tls),
                        None => Some(Tls::new(settings, l.http2()).map_err(|source| {
                            ApplyError::Tls {
                                name: l.name.clone(),
                                source,
                            }
                        })?),
                    }
                }
            };
            prepared.push(Prepared { kept, socket, tls });
        }
        Ok(prepared)
    }

    /// The socket a predecessor handed over for listener `name` on `bind`.
    fn take_inherited(&self, name: &str, bind: SocketAddr) -> Option<TcpListener> {
        let mut inherited = lock(&self.inherited);
        let i = inherited
            .listeners
            .iter()
            .position(|(n, b, _)| n == name && *b == bind)?;
        let (_, _, socket) = inherited.listeners.remove(i);
        match socket
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(socket))
        {
            Ok(socket) => {
                info!(listener = name, addr = %bind, "listening socket taken over from the previous process");
                Some(socket)
            }
            Err(error) => {
                warn!(listener = name, %error, "an inherited socket is unusable: binding anew");
                None
            }
        }
    }

    /// Gives listeners that stay their new context, starts the new ones
    /// and stops the removed ones (their WebSockets drain over their
    /// pool's window).
    fn swap_listeners(
        &self,
        st: &mut State,
        new: &Config,
        prepared: Vec<Prepared>,
        upstreams: &HashMap<String, Arc<Upstream>>,
        access: Option<&AccessLog>,
    ) {
        let mut old: Vec<Option<Slot>> = std::mem::take(&mut st.listeners)
            .into_iter()
            .map(Some)
            .collect();
        let mut slots = Vec::with_capacity(new.listeners.len());
        // Plain listeners answer HTTP-01 challenges only when some ACME
        // section uses them; otherwise those paths go to the backends.
        let http01 = new
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .flat_map(|t| &t.acme)
            .any(|a| a.challenge == AcmeChallenge::Http01);
        for (l, prep) in new.listeners.iter().zip(prepared) {
            let kept = prep.kept.and_then(|i| old[i].take());
            let id = kept.as_ref().map_or_else(
                || {
                    st.next_listener += 1;
                    st.next_listener
                },
                |s| s.id,
            );
            let pool = &new.pools[l.pool].name;
            let previous = kept.as_ref().map(|s| s.cell.load_full());
            let client_limit = match &previous {
                // Counts of live connections carry over while the limit stays.
                Some(p) if p.cfg.max_connections_per_client == l.max_connections_per_client => {
                    p.client_limit.clone()
                }
                _ => (l.max_connections_per_client > 0)
                    .then(|| ClientLimit::new(l.max_connections_per_client)),
            };
            let same_tls = match (&previous, &prep.tls) {
                (Some(p), Some(t)) => p.tls.as_ref().is_some_and(|o| o.same(t)),
                _ => false,
            };
            let (h2_connections, h2_streams, h2_websockets) = self.metrics.http2(&l.name);
            let limit = kept.as_ref().map_or_else(
                || Arc::new(Semaphore::new(l.max_connections)),
                |slot| slot.limit.clone(),
            );
            let ctx = Arc::new(ListenerCtx {
                id,
                access: access.cloned(),
                limit: limit.clone(),
                h2_connections,
                h2_streams,
                h2_websockets,
                tls: prep.tls,
                handshake_errors: self.metrics.tls_handshake_errors(&l.name),
                proxy_rejected: self.metrics.proxy_rejected(&l.name),
                client_limit,
                client_limited: self.metrics.client_limited(&l.name),
                http01: (l.tls.is_none() && http01).then(|| self.http01.clone()),
                cfg: l.clone(),
                upstream: upstreams[pool].clone(),
                registry: self.registry.clone(),
                tasks: self.tasks.clone(),
                accepted: self.metrics.accepted(&l.name),
            });
            let mut slot = match kept {
                Some(mut slot) => {
                    slot.cell.store(ctx.clone());
                    resize(&slot.limit, slot.max, l.max_connections);
                    slot.max = l.max_connections;
                    slot
                }
                None => {
                    let (socket, fd) = prep.socket.expect("a listener that is not kept was bound");
                    let addr = socket.local_addr().unwrap_or(l.bind);
                    let cell: ListenerCell = Arc::new(ArcSwap::new(ctx.clone()));
                    let stop = self.shutdown.child_token();
                    self.tasks.spawn(listener::serve(
                        socket,
                        cell.clone(),
                        limit.clone(),
                        self.tasks.clone(),
                        stop.clone(),
                    ));
                    Slot {
                        name: l.name.clone(),
                        bind: l.bind,
                        addr,
                        id,
                        cell,
                        limit,
                        max: l.max_connections,
                        stop,
                        tls_watch: None,
                        fd: Some(fd),
                    }
                }
            };
            // What its accepted connections inherit, as this config says.
            if let Some(fd) = &slot.fd {
                crate::sockopt::listener(
                    fd,
                    l.tcp_keepalive.map(|k| (k.idle, k.interval, k.count)),
                );
            }
            if !same_tls {
                if let Some(watch) = slot.tls_watch.take() {
                    watch.cancel();
                }
                if let Some(tls) = &ctx.tls {
                    let watch = slot.stop.child_token();
                    tokio::spawn(tls.clone().watch(l.name.clone(), watch.clone()));
                    // Its ACME certificates are kept while this TLS serves.
                    for acme in &tls.settings().acme {
                        tokio::spawn(crate::acme::run(
                            acme.clone(),
                            tls.clone(),
                            self.http01.clone(),
                            l.name.clone(),
                            self.metrics.acme_orders(),
                            watch.clone(),
                        ));
                    }
                    slot.tls_watch = Some(watch);
                }
            }
            slots.push(slot);
        }
        let old_cfg = st.cfg.as_ref();
        for slot in old.into_iter().flatten() {
            slot.stop.cancel();
            let drain = old_cfg
                .and_then(|c| {
                    let l = c.listeners.iter().find(|l| l.name == slot.name)?;
                    c.pools.get(l.pool).map(|p| p.drain)
                })
                .unwrap_or_default();
            self.drains.drain_listener(&slot.name, slot.id, drain);
        }
        self.bound.store(Arc::new(
            slots.iter().map(|s| (s.name.clone(), s.addr)).collect(),
        ));
        self.metrics.set_tls_listeners(
            slots
                .iter()
                .filter_map(|s| Some((s.name.clone(), s.cell.load().tls.clone()?)))
                .collect(),
        );
        st.listeners = slots;
    }

    /// Forgets backends a reload removed once they have drained, until
    /// shutdown.
    async fn forget_drained(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(FORGET_POLL) => {}
                () = self.shutdown.cancelled() => return,
            }
            let _st = self.state.lock().await;
            let forgotten = self.registry.forget_drained();
            if forgotten.is_empty() {
                continue;
            }
            self.drains.forget(&self.registry.backends());
            for (pool, backend) in forgotten {
                info!("removed backend {pool}/{backend} drained: forgotten");
            }
        }
    }
}

/// The TLS connectors of every backend that has `tls`, by pool: a CA that
/// does not load refuses the config, never a silent fallback to plain text.
fn backend_connectors(
    cfg: &Config,
) -> Result<HashMap<String, Vec<Option<BackendTlsConnector>>>, ApplyError> {
    let mut all = HashMap::new();
    for pool in &cfg.pools {
        let mut connectors = Vec::with_capacity(pool.backends.len());
        for b in &pool.backends {
            let connector = b
                .tls
                .as_ref()
                .map(BackendTlsConnector::new)
                .transpose()
                .map_err(|source| ApplyError::BackendTls {
                    pool: pool.name.clone(),
                    backend: b.name.clone(),
                    source,
                })?;
            connectors.push(connector);
        }
        all.insert(pool.name.clone(), connectors);
    }
    Ok(all)
}

/// Moves a listener's connection limit from `old` to `new` permits: more
/// at once; fewer as connections end (permits in use are not taken back).
fn resize(limit: &Arc<Semaphore>, old: usize, new: usize) {
    if new > old {
        limit.add_permits(new - old);
    } else if new < old {
        let limit = limit.clone();
        let fewer = (old - new) as u32;
        tokio::spawn(async move {
            if let Ok(permits) = limit.acquire_many_owned(fewer).await {
                permits.forget();
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
