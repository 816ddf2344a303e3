//! Live connections and counts per backend: the meeting point of the data
//! path and the control plane.
//!
//! Owns, per backend, the counters the balancer reads (lock-free atomics) and
//! the control handle of every live WebSocket. The data path leases a slot
//! before it connects and turns it into a WebSocket entry after the upgrade;
//! dropping the lease or the entry gives the slot back. The control plane
//! (shutdown today; drain and rebalance later) asks handles to close; it never
//! touches sockets: the tunnel that owns the handle does the closing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::task::AtomicWaker;

use crate::config::Config;

/// Close-request value meaning "drop both sockets now, without a Close frame".
const ABORT: u32 = u32::MAX;

/// Control handle of one live WebSocket, shared by its tunnel and the registry.
#[derive(Debug)]
pub struct ConnControl {
    /// Unique within the process.
    pub id: u64,
    /// When the tunnel started.
    pub started: Instant,
    /// Requested close: 0 for none, a WebSocket close code, or `ABORT`.
    close: AtomicU32,
    /// Wakes the tunnel when a close is requested.
    waker: AtomicWaker,
}

/// What the control plane asked a tunnel to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseRequest {
    /// Nothing: keep proxying.
    None,
    /// Send a Close frame with this code at the next message boundary.
    Close(u16),
    /// Drop both sockets now.
    Abort,
}

impl ConnControl {
    fn new(id: u64) -> Self {
        Self {
            id,
            started: Instant::now(),
            close: AtomicU32::new(0),
            waker: AtomicWaker::new(),
        }
    }

    /// Asks the tunnel to close with `code` at the next message boundary. The
    /// first request wins; a later abort still overrides it.
    pub fn request_close(&self, code: u16) {
        if self
            .close
            .compare_exchange(0, u32::from(code), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// Asks the tunnel to drop both sockets now.
    pub fn abort(&self) {
        self.close.store(ABORT, Ordering::Release);
        self.waker.wake();
    }

    /// Registers the tunnel's waker and returns the pending request.
    pub fn poll_request(&self, waker: &std::task::Waker) -> CloseRequest {
        self.waker.register(waker);
        match self.close.load(Ordering::Acquire) {
            0 => CloseRequest::None,
            ABORT => CloseRequest::Abort,
            code => CloseRequest::Close(code as u16),
        }
    }
}

/// Whether a backend takes new connections, as the control plane set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BackendState {
    /// In rotation.
    Up = 0,
    /// Takes no new connections; its WebSockets are being closed.
    Draining = 1,
    /// Drained: takes no new connections and has none left.
    Drained = 2,
}

impl BackendState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Draining,
            2 => Self::Drained,
            _ => Self::Up,
        }
    }

    /// The name users see in the API and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Drained => "drained",
        }
    }
}

/// Traffic through one backend's WebSockets, in one direction.
#[derive(Debug, Default)]
pub struct Traffic {
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
}

impl Traffic {
    /// Adds what a tunnel just moved.
    pub fn add(&self, messages: u64, bytes: u64) {
        if messages > 0 {
            self.messages.fetch_add(messages, Ordering::Relaxed);
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// One backend: its identity, counters and live WebSockets.
#[derive(Debug)]
pub struct Backend {
    /// Name from the config, unique in its pool.
    pub name: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of connections.
    pub weight: u32,
    /// A `BackendState`, set by the control plane, read by the balancer.
    state: AtomicU8,
    /// Client to backend.
    pub up: Traffic,
    /// Backend to client.
    pub down: Traffic,
    /// WebSockets closed by a drain.
    pub drain_closed: AtomicU64,
    /// WebSockets closed by the rebalancer.
    pub rebalance_shed: AtomicU64,
    /// Live proxied WebSockets.
    ws: AtomicUsize,
    /// HTTP requests in flight (including upgrade handshakes).
    http: AtomicUsize,
    /// Control handles of the live WebSockets, by id.
    conns: Mutex<HashMap<u64, Arc<ConnControl>>>,
}

impl Backend {
    fn new(name: String, addr: SocketAddr, weight: u32) -> Self {
        Self {
            name,
            addr,
            weight,
            state: AtomicU8::new(BackendState::Up as u8),
            up: Traffic::default(),
            down: Traffic::default(),
            drain_closed: AtomicU64::new(0),
            rebalance_shed: AtomicU64::new(0),
            ws: AtomicUsize::new(0),
            http: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// The state the control plane set.
    pub fn state(&self) -> BackendState {
        BackendState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the state (control plane only).
    pub fn set_state(&self, state: BackendState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// True when the backend may get new connections.
    pub fn is_accepting(&self) -> bool {
        self.state() == BackendState::Up
    }

    /// Live WebSockets plus HTTP requests in flight: what least_conn compares.
    pub fn active(&self) -> usize {
        self.ws.load(Ordering::Relaxed) + self.http.load(Ordering::Relaxed)
    }

    /// Live proxied WebSockets.
    pub fn ws_count(&self) -> usize {
        self.ws.load(Ordering::Relaxed)
    }

    /// HTTP requests in flight.
    pub fn http_count(&self) -> usize {
        self.http.load(Ordering::Relaxed)
    }

    /// Control handles of this backend's live WebSockets.
    pub fn connections(&self) -> Vec<Arc<ConnControl>> {
        self.lock_conns().values().cloned().collect()
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnControl>>> {
        // A panic while holding this lock leaves a plain map: still usable.
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The backends of one pool, in config order.
#[derive(Debug)]
pub struct PoolEntry {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
}

/// All pools' live state.
#[derive(Debug)]
pub struct Registry {
    pools: Vec<PoolEntry>,
    next_id: AtomicU64,
    /// Leases taken since start: every HTTP request and upgrade.
    leases_total: AtomicU64,
    /// Close code every new WebSocket gets at once (0: none, `ABORT`: drop
    /// it): set at shutdown.
    closing: AtomicU32,
}

impl Registry {
    /// Builds the registry for the pools of `cfg`.
    pub fn new(cfg: &Config) -> Self {
        let pools = cfg
            .pools
            .iter()
            .map(|pool| PoolEntry {
                name: pool.name.clone(),
                backends: pool
                    .backends
                    .iter()
                    .map(|b| Arc::new(Backend::new(b.name.clone(), b.address, b.weight)))
                    .collect(),
            })
            .collect();
        Self {
            pools,
            next_id: AtomicU64::new(1),
            leases_total: AtomicU64::new(0),
            closing: AtomicU32::new(0),
        }
    }

    /// Pool by index (indices come from the validated config).
    pub fn pool(&self, index: usize) -> &PoolEntry {
        &self.pools[index]
    }

    /// All pools.
    pub fn pools(&self) -> &[PoolEntry] {
        &self.pools
    }

    /// Live WebSockets over all backends.
    pub fn ws_total(&self) -> usize {
        self.backends().map(|b| b.ws_count()).sum()
    }

    fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.pools.iter().flat_map(|p| p.backends.iter())
    }

    /// Asks every live WebSocket, and every one that starts from now on, to
    /// close with `code` at its next message boundary.
    pub fn close_all(&self, code: u16) {
        self.closing.store(u32::from(code), Ordering::Release);
        for backend in self.backends() {
            for conn in backend.connections() {
                conn.request_close(code);
            }
        }
    }

    /// Drops every live WebSocket now, and every one that starts from now on.
    pub fn abort_all(&self) {
        self.closing.store(ABORT, Ordering::Release);
        for backend in self.backends() {
            for conn in backend.connections() {
                conn.abort();
            }
        }
    }

    /// A value that changes whenever connections come or go: leases taken
    /// and live WebSockets.
    pub fn churn_marker(&self) -> (u64, usize) {
        (self.leases_total.load(Ordering::Relaxed), self.ws_total())
    }

    /// Takes a slot on `backend` for an HTTP request or upgrade handshake.
    pub fn lease(self: &Arc<Self>, backend: &Arc<Backend>) -> Lease {
        backend.http.fetch_add(1, Ordering::Relaxed);
        self.leases_total.fetch_add(1, Ordering::Relaxed);
        Lease {
            registry: self.clone(),
            backend: backend.clone(),
        }
    }
}

/// A counted slot on a backend for one HTTP request; given back on drop.
#[derive(Debug)]
pub struct Lease {
    registry: Arc<Registry>,
    backend: Arc<Backend>,
}

impl Lease {
    /// The leased backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Turns the slot into a live WebSocket with a control handle.
    pub fn into_ws(self) -> WsEntry {
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(ConnControl::new(id));
        let backend = self.backend.clone();
        backend.ws.fetch_add(1, Ordering::Relaxed);
        backend.lock_conns().insert(id, control.clone());
        match self.registry.closing.load(Ordering::Acquire) {
            0 => {}
            ABORT => control.abort(),
            code => control.request_close(code as u16),
        }
        // Dropping self gives back the HTTP slot.
        WsEntry { backend, control }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.http.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A live WebSocket's place in the registry; removed on drop.
#[derive(Debug)]
pub struct WsEntry {
    backend: Arc<Backend>,
    control: Arc<ConnControl>,
}

impl WsEntry {
    /// The handle the tunnel polls for close requests.
    pub fn control(&self) -> &Arc<ConnControl> {
        &self.control
    }

    /// The backend this WebSocket is proxied to.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for WsEntry {
    fn drop(&mut self) {
        self.backend.lock_conns().remove(&self.control.id);
        self.backend.ws.fetch_sub(1, Ordering::Relaxed);
    }
}
