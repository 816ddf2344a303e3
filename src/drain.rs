//! Gradual draining of backends.
//!
//! Owns the drain plan: which of a draining backend's WebSockets to close,
//! and when, across the drain window. Does not touch sockets: it marks the
//! backend out of rotation in the registry and calls `request_close(code)`
//! on registry handles; the tunnel closes each at a message boundary.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::DrainConfig;
use crate::registry::{Backend, BackendState, CloseReason, PoolEntry, Registry};

/// A sticky pin (pool, cookie nonce) whose WebSocket this process closes
/// after a binary upgrade handed it over, so that the new process places
/// its client afresh; the sender fires once the new process has been told,
/// and only then is the WebSocket closed (its client cannot come back
/// before the new process knows).
pub type MovedPin = (String, u64, tokio::sync::oneshot::Sender<()>);

/// Why every backend drains: this process stops.
#[derive(Debug)]
pub enum Farewell {
    /// It shuts down: WebSockets close with this code, clients keep pins.
    Shutdown(u16),
    /// A new process took over: WebSockets close with each pool's code,
    /// and the pins they held go to the new process, if it listens.
    HandedOver(Option<tokio::sync::mpsc::UnboundedSender<MovedPin>>),
}

/// What a drain does with the sticky pin of a WebSocket it closes.
#[derive(Debug, Clone)]
enum Moving {
    /// Nothing: this process stops, and the pin stays good.
    Keep(CloseReason),
    /// Remembers it here: the next request with it is placed afresh.
    Here(Arc<PoolEntry>, CloseReason),
    /// Sends it to the process that took over, to place it afresh there.
    Away(String, tokio::sync::mpsc::UnboundedSender<MovedPin>),
}

impl Moving {
    /// Why the WebSockets close, as the access log says it.
    fn reason(&self) -> CloseReason {
        match self {
            Self::Keep(reason) | Self::Here(_, reason) => *reason,
            Self::Away(..) => CloseReason::Upgrade,
        }
    }
}

/// How often a drain looks for late WebSockets and for the backend to be empty.
const EMPTY_POLL: Duration = Duration::from_millis(100);

/// Offsets from the start of the drain at which to close `count`
/// connections, evenly over `window`: the i-th at `window × i / count`.
pub fn plan_drain(count: usize, window: Duration) -> Vec<Duration> {
    (0..count)
        .map(|i| window.mul_f64(i as f64 / count as f64))
        .collect()
}

/// Why a drain request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("no pool named {0:?}")]
    UnknownPool(String),
    #[error("pool {pool:?} has no backend named {backend:?}")]
    UnknownBackend { pool: String, backend: String },
    #[error("sluice is shutting down: every backend is being drained")]
    ShuttingDown,
    #[error("backend {pool}/{backend} was removed by a reload: it drains until it is empty")]
    Removed { pool: String, backend: String },
}

/// How far a drain has come.
#[derive(Debug, Clone, Copy)]
pub struct DrainProgress {
    pub window: Duration,
    pub elapsed: Duration,
    /// WebSockets the drain has planned to close so far.
    pub planned: usize,
    /// Close requests sent so far.
    pub closed: usize,
}

/// One drain in progress (or finished, until undrain).
#[derive(Debug)]
struct Drain {
    cancel: CancellationToken,
    started: Instant,
    window: Duration,
    planned: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    /// An operator's (through this instance or, in cluster mode, another):
    /// not a reload's or the shutdown's.
    operator: bool,
}

/// All drains, by backend id.
#[derive(Debug)]
pub struct Drains {
    registry: Arc<Registry>,
    drains: Mutex<HashMap<u64, Drain>>,
    /// Set at shutdown: the shutdown drains stand.
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Drains {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            drains: Mutex::new(HashMap::new()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Drain>> {
        self.drains
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Finds a backend by pool and backend name (a current one first,
    /// else one a reload removed that still drains).
    pub fn find(
        &self,
        pool: &str,
        backend: &str,
    ) -> Result<(Arc<PoolEntry>, Arc<Backend>), DrainError> {
        let entry = self
            .registry
            .pools()
            .iter()
            .find(|p| p.name == pool)
            .cloned()
            .ok_or_else(|| DrainError::UnknownPool(pool.to_string()))?;
        let found = entry
            .find(backend)
            .ok_or_else(|| DrainError::UnknownBackend {
                pool: pool.to_string(),
                backend: backend.to_string(),
            })?;
        Ok((entry, found))
    }

    /// Starts draining `backend` of `pool` over `window` (the pool's by
    /// default). Draining a backend that is already draining or drained
    /// changes nothing.
    pub fn drain(
        &self,
        pool: &Arc<PoolEntry>,
        backend: &Arc<Backend>,
        window: Option<Duration>,
    ) -> Result<(), DrainError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(DrainError::ShuttingDown);
        }
        let mut cfg = pool.cfg.drain;
        if let Some(window) = window {
            cfg.window = window;
        }
        let moving = Moving::Here(pool.clone(), CloseReason::Drain);
        self.start(pool, backend, cfg, moving, true, true);
        Ok(())
    }

    /// Drains a backend a reload removed, over its pool's window; a drain
    /// already under way (an operator's) goes on.
    pub fn retire(&self, pool: &Arc<PoolEntry>, backend: &Arc<Backend>) {
        if !self.shutting_down.load(Ordering::Acquire) {
            let moving = Moving::Here(pool.clone(), CloseReason::Removed);
            self.start(pool, backend, pool.cfg.drain, moving, true, false);
        }
    }

    /// Closes the WebSockets that came through listener `listener` (which
    /// a reload removed) evenly over `cfg.window`, with `cfg.close_code`.
    pub fn drain_listener(&self, name: &str, listener: u32, cfg: DrainConfig) {
        // Upgrades still under way through it close as soon as they open.
        self.registry.close_listener(listener, cfg.close_code);
        let mut conns = self.registry.connections_of_listener(listener);
        conns.shuffle(&mut rand::rng());
        info!(listener = %name, window = ?cfg.window, websockets = conns.len(), "draining a removed listener's WebSockets");
        let started = Instant::now();
        tokio::spawn(async move {
            for ((pool, backend, conn), offset) in
                conns.iter().zip(plan_drain(conns.len(), cfg.window))
            {
                tokio::time::sleep_until(started + offset).await;
                if Arc::strong_count(conn) > 1 {
                    let now = std::time::Instant::now();
                    pool.close_moving(backend, conn, cfg.close_code, CloseReason::Removed, now);
                    backend.drain_closed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    /// Drains every backend as `farewell` says, in place of any drain an
    /// operator started; no drain or undrain is taken after it. After an
    /// upgrade the backends stay in rotation: requests that still reach
    /// this process (a connection accepted just before the handover) are
    /// served, only the WebSockets move.
    pub fn drain_all(&self, farewell: Farewell) {
        self.shutting_down.store(true, Ordering::Release);
        for (_, drain) in self.lock().drain() {
            drain.cancel.cancel();
        }
        for pool in self.registry.pools().iter() {
            let mut cfg = pool.cfg.drain;
            let moving = match &farewell {
                Farewell::Shutdown(code) => {
                    cfg.close_code = *code;
                    Moving::Keep(CloseReason::Shutdown)
                }
                Farewell::HandedOver(Some(feed)) => Moving::Away(pool.name.clone(), feed.clone()),
                Farewell::HandedOver(None) => Moving::Keep(CloseReason::Upgrade),
            };
            let out_of_rotation = matches!(farewell, Farewell::Shutdown(_));
            for backend in pool.all_backends() {
                self.start(pool, &backend, cfg, moving.clone(), out_of_rotation, false);
            }
        }
    }

    /// Starts draining `backend` of `pool`; `out_of_rotation`: it takes
    /// no new connection meanwhile (else a new process has taken over);
    /// `operator`: an operator asked for it.
    fn start(
        &self,
        pool: &Arc<PoolEntry>,
        backend: &Arc<Backend>,
        cfg: DrainConfig,
        moving: Moving,
        out_of_rotation: bool,
        operator: bool,
    ) {
        let mut drains = self.lock();
        if drains.contains_key(&backend.id) {
            return;
        }
        if out_of_rotation {
            backend.set_state(BackendState::Draining);
        }
        let drain = Drain {
            cancel: CancellationToken::new(),
            started: Instant::now(),
            window: cfg.window,
            planned: Arc::default(),
            closed: Arc::default(),
            operator,
        };
        info!(pool = %pool.name, backend = %backend.name, window = ?cfg.window, websockets = backend.ws_count(), "drain started");
        tokio::spawn(run_drain(
            backend.clone(),
            moving,
            cfg,
            drain.started,
            drain.planned.clone(),
            drain.closed.clone(),
            drain.cancel.clone(),
        ));
        drains.insert(backend.id, drain);
    }

    /// Stops draining and puts the backend back in rotation. Close requests
    /// already sent stand; no further ones are sent. A backend a reload
    /// removed cannot be undrained (a reload that has it again can).
    pub fn undrain(&self, pool: &PoolEntry, backend: &Arc<Backend>) -> Result<(), DrainError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(DrainError::ShuttingDown);
        }
        if !pool.backends.iter().any(|b| Arc::ptr_eq(b, backend)) {
            return Err(DrainError::Removed {
                pool: pool.name.clone(),
                backend: backend.name.clone(),
            });
        }
        self.put_back(&pool.name, backend);
        Ok(())
    }

    /// Ends any drain of `backend` and puts it in rotation (slow start
    /// where configured).
    pub fn put_back(&self, pool: &str, backend: &Arc<Backend>) {
        // Under the lock, so a drain started meanwhile (a reload retiring
        // it) is not overwritten by this.
        let mut drains = self.lock();
        if let Some(drain) = drains.remove(&backend.id) {
            drain.cancel.cancel();
        }
        if backend.state() != BackendState::Up {
            info!(%pool, backend = %backend.name, "back in rotation");
            backend.mark_back(std::time::Instant::now());
        }
        backend.set_state(BackendState::Up);
        drop(drains);
    }

    /// Forgets the drains of backends the registry no longer has.
    pub fn forget(&self, backends: &[Arc<Backend>]) {
        let ids: HashSet<u64> = backends.iter().map(|b| b.id).collect();
        self.lock().retain(|id, _| ids.contains(id));
    }

    /// Whether this process is shutting down or handing over (every
    /// backend drains).
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Whether a drain holds `backend` (`None`: none), and whether it is
    /// an operator's.
    pub fn drain_kind(&self, backend: &Backend) -> Option<bool> {
        self.lock().get(&backend.id).map(|d| d.operator)
    }

    /// Progress of the drain of `backend`, if one is running.
    pub fn progress(&self, backend: &Backend) -> Option<DrainProgress> {
        self.lock().get(&backend.id).map(|d| DrainProgress {
            window: d.window,
            elapsed: d.started.elapsed(),
            planned: d.planned.load(Ordering::Relaxed),
            closed: d.closed.load(Ordering::Relaxed),
        })
    }
}

/// Closes `backend`'s WebSockets spread over the window, then any that
/// arrive late, and marks it drained once it has no connection left.
async fn run_drain(
    backend: Arc<Backend>,
    moving: Moving,
    cfg: DrainConfig,
    started: Instant,
    planned: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    cancel: CancellationToken,
) {
    let mut conns = backend.connections();
    // Random order, so that the oldest connections do not all go first.
    conns.shuffle(&mut rand::rng());
    planned.store(conns.len(), Ordering::Relaxed);
    let mut asked: HashSet<u64> = HashSet::with_capacity(conns.len());
    let reason = moving.reason();
    let close = |conn: &Arc<crate::registry::ConnControl>| {
        match &moving {
            // Its client is placed afresh when it comes back.
            Moving::Here(pool, _) => {
                let now = std::time::Instant::now();
                pool.close_moving(&backend, conn, cfg.close_code, reason, now);
            }
            Moving::Away(pool, feed) if conn.pin != 0 => {
                let (told, heard) = tokio::sync::oneshot::channel();
                let code = cfg.close_code;
                let conn = conn.clone();
                if feed.send((pool.clone(), conn.pin, told)).is_ok() {
                    // Closed once the new process knows, or at once when
                    // the link is gone (the pin then just stays good).
                    tokio::spawn(async move {
                        let _ = heard.await;
                        conn.request_close(code, reason);
                    });
                } else {
                    conn.request_close(code, reason);
                }
            }
            Moving::Away(..) | Moving::Keep(_) => {
                conn.request_close(cfg.close_code, reason);
            }
        }
        backend.drain_closed.fetch_add(1, Ordering::Relaxed);
        closed.fetch_add(1, Ordering::Relaxed);
    };
    for (conn, offset) in conns.iter().zip(plan_drain(conns.len(), cfg.window)) {
        if backend.active() == 0 {
            // Everything left on its own: nothing more to spread.
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(started + offset) => {}
            () = cancel.cancelled() => return,
        }
        asked.insert(conn.id);
        // Only our snapshot still holds a connection that has ended.
        if Arc::strong_count(conn) > 1 {
            close(conn);
        }
    }
    // Upgrades that were under way when the drain began close the same way;
    // then wait until the backend has no connection at all.
    loop {
        for conn in backend.connections() {
            if asked.insert(conn.id) {
                planned.fetch_add(1, Ordering::Relaxed);
                close(&conn);
            }
        }
        if backend.active() == 0 {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(EMPTY_POLL) => {}
            () = cancel.cancelled() => return,
        }
    }
    if backend.finish_drain() {
        info!(backend = %backend.name, closed = closed.load(Ordering::Relaxed), "drained");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_spreads_closes_over_window() {
        let offsets = plan_drain(4, Duration::from_secs(60));
        assert_eq!(offsets, [0, 15, 30, 45].map(Duration::from_secs));
        assert!(plan_drain(0, Duration::from_secs(1)).is_empty());
        assert_eq!(plan_drain(3, Duration::ZERO), [Duration::ZERO; 3]);
    }

    #[test]
    fn no_tenth_of_the_window_gets_more_than_its_share() {
        for count in [1usize, 7, 10, 99, 600, 6000] {
            let window = Duration::from_secs(30);
            let mut tenths = [0usize; 10];
            for offset in plan_drain(count, window) {
                tenths[(offset.as_secs_f64() / window.as_secs_f64() * 10.0) as usize] += 1;
            }
            let share = count as f64 / 10.0;
            assert!(
                tenths.iter().all(|&n| n as f64 <= (1.5 * share).ceil()),
                "{count}: {tenths:?}"
            );
            assert_eq!(tenths.iter().sum::<usize>(), count);
        }
    }
}
