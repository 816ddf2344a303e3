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
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use futures_util::task::AtomicWaker;

use arc_swap::ArcSwap;

use crate::config::{BackendConfig, Config, PoolConfig};
use crate::health_state::slow_start_factor;

/// Close-request value meaning "drop both sockets now, without a Close frame".
const ABORT: u32 = u32::MAX;

/// Control handle of one live WebSocket, shared by its tunnel and the registry.
#[derive(Debug)]
pub struct ConnControl {
    /// Unique within the process.
    pub id: u64,
    /// When the tunnel started.
    pub started: Instant,
    /// The listener it came through (`ListenerCtx::id`), so the
    /// connections of a listener a reload removed can be drained.
    pub listener: u32,
    /// The sticky pin (cookie nonce) it was made under; 0: none.
    pub pin: u64,
    /// Requested close: 0 for none, a WebSocket close code with its
    /// `CloseReason` above it (bits 16 to 23), or `ABORT`.
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

/// Why sluice closed a WebSocket on purpose, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// A drain of its backend (an operator's, or a rollout's).
    Drain = 1,
    /// The rebalancer shed it.
    Rebalance = 2,
    /// A binary upgrade handed the listeners to a new process.
    Upgrade = 3,
    /// sluice is shutting down.
    Shutdown = 4,
    /// A reload removed its backend or its listener.
    Removed = 5,
    /// The client did not answer sluice's Ping (the tunnel's own close).
    PingTimeout = 6,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Rebalance => "rebalance",
            Self::Upgrade => "upgrade",
            Self::Shutdown => "shutdown",
            Self::Removed => "removed",
            Self::PingTimeout => "ping_timeout",
        }
    }

    fn from_bits(bits: u32) -> Option<Self> {
        Some(match (bits >> 16) & 0xff {
            1 => Self::Drain,
            2 => Self::Rebalance,
            3 => Self::Upgrade,
            4 => Self::Shutdown,
            5 => Self::Removed,
            6 => Self::PingTimeout,
            _ => return None,
        })
    }
}

impl ConnControl {
    fn new(id: u64, listener: u32, pin: u64) -> Self {
        Self {
            id,
            started: Instant::now(),
            listener,
            pin,
            close: AtomicU32::new(0),
            waker: AtomicWaker::new(),
        }
    }

    /// Asks the tunnel to close with `code` at the next message boundary,
    /// for `reason`. The first request wins (true for it); a later abort
    /// still overrides it.
    pub fn request_close(&self, code: u16, reason: CloseReason) -> bool {
        let value = u32::from(code) | (reason as u32) << 16;
        let first = self
            .close
            .compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.waker.wake();
        }
        first
    }

    /// Sluice has asked it to close (or to be dropped).
    pub fn is_closing(&self) -> bool {
        self.close.load(Ordering::Acquire) != 0
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

    /// Why sluice asked this WebSocket to close, if it did (an abort has
    /// no reason).
    pub fn reason(&self) -> Option<CloseReason> {
        match self.close.load(Ordering::Acquire) {
            ABORT => None,
            bits => CloseReason::from_bits(bits),
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

/// A backend's state as users see it (the admin API, logs, `ctl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// In rotation, healthy, at full weight.
    Up,
    /// In rotation but failing its health check or passively ejected.
    Down,
    /// In rotation, its weight still ramping up.
    SlowStart,
    /// Out of rotation, its WebSockets being closed.
    Draining,
    /// Out of rotation with no connection left.
    Drained,
}

impl Condition {
    /// The name users see.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::SlowStart => "slow_start",
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
    /// Unique within the process, also across reloads.
    pub id: u64,
    /// Name from the config, unique among its pool's current backends.
    pub name: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of connections (a reload may change it).
    weight: AtomicU32,
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
    /// WebSockets cut because a message outlived `max_message_wait`.
    pub messages_cut: AtomicU64,
    /// WebSockets closed because their client stopped answering Pings.
    pub client_timeouts: AtomicU64,
    /// Live connections of this backend through the other sluice
    /// instances, as they last published them (cluster mode; else 0).
    pub remote: AtomicUsize,
    /// Reference point of the time stamps below.
    epoch: Instant,
    /// Slow-start ramp of the pool in ns (zero: off); a reload may change it.
    slow_start: AtomicU64,
    /// The active health check says down.
    active_down: AtomicBool,
    /// Passively ejected until this time (ns after `epoch`); 0: not ejected.
    ejected_until: AtomicU64,
    /// Back in rotation since (ns after `epoch`, plus 1); 0: not ramping.
    back_since: AtomicU64,
    /// Passive failures in a row.
    failures: AtomicU32,
    /// When the active check last finished (ns after `epoch`, plus 1; 0:
    /// never), and whether it passed.
    last_check: AtomicU64,
    last_check_ok: AtomicBool,
    /// Live proxied WebSockets.
    ws: AtomicUsize,
    /// HTTP requests in flight (including upgrade handshakes).
    http: AtomicUsize,
    /// Control handles of the live WebSockets, by id.
    conns: Mutex<HashMap<u64, Arc<ConnControl>>>,
}

impl Backend {
    fn new(
        id: u64,
        name: String,
        addr: SocketAddr,
        weight: u32,
        slow_start: Duration,
        epoch: Instant,
    ) -> Self {
        Self {
            id,
            name,
            addr,
            weight: AtomicU32::new(weight),
            state: AtomicU8::new(BackendState::Up as u8),
            up: Traffic::default(),
            down: Traffic::default(),
            drain_closed: AtomicU64::new(0),
            rebalance_shed: AtomicU64::new(0),
            messages_cut: AtomicU64::new(0),
            client_timeouts: AtomicU64::new(0),
            remote: AtomicUsize::new(0),
            epoch,
            slow_start: AtomicU64::new(slow_start.as_nanos() as u64),
            active_down: AtomicBool::new(false),
            ejected_until: AtomicU64::new(0),
            back_since: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            last_check: AtomicU64::new(0),
            last_check_ok: AtomicBool::new(false),
            ws: AtomicUsize::new(0),
            http: AtomicUsize::new(0),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// The configured weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    fn slow_start(&self) -> Duration {
        Duration::from_nanos(self.slow_start.load(Ordering::Relaxed))
    }

    /// Takes a reloaded config's weight and slow-start ramp.
    fn reconfigure(&self, weight: u32, slow_start: Duration) {
        self.weight.store(weight, Ordering::Relaxed);
        self.slow_start
            .store(slow_start.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The state the control plane set.
    pub fn state(&self) -> BackendState {
        BackendState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// `Draining` becomes `Drained`, unless the state changed meanwhile
    /// (an undrain); true when it did.
    pub fn finish_drain(&self) -> bool {
        self.state
            .compare_exchange(
                BackendState::Draining as u8,
                BackendState::Drained as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Sets the state (control plane only).
    pub fn set_state(&self, state: BackendState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// True when the backend may get new connections: in rotation and healthy.
    pub fn is_accepting(&self) -> bool {
        self.state() == BackendState::Up && self.is_healthy()
    }

    /// Neither failing its active check nor passively ejected.
    pub fn is_healthy(&self) -> bool {
        !self.active_down.load(Ordering::Relaxed) && self.ejected_until.load(Ordering::Relaxed) == 0
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// The weight balancing uses at `now`: the configured one, ramping up
    /// during slow start.
    pub fn effective_weight(&self, now: Instant) -> f64 {
        f64::from(self.weight()) * self.ramp(now)
    }

    /// Where the slow-start ramp is at `now`: from near 0 to 1 (1 when not
    /// ramping).
    pub fn ramp(&self, now: Instant) -> f64 {
        match self.back_since.load(Ordering::Relaxed) {
            0 => 1.0,
            since => {
                let back = self.epoch + Duration::from_nanos(since - 1);
                slow_start_factor(now.saturating_duration_since(back), self.slow_start())
            }
        }
    }

    /// True while the slow-start ramp is running.
    pub fn is_ramping(&self) -> bool {
        self.back_since.load(Ordering::Relaxed) != 0
    }

    /// The backend is back in rotation at `now`: start its slow-start ramp.
    pub fn mark_back(&self, now: Instant) {
        if !self.slow_start().is_zero() {
            self.back_since.store(self.stamp(now), Ordering::Relaxed);
        }
    }

    /// Ends the ramp once it has run its course by `now`; true when it did.
    pub fn finish_ramp(&self, now: Instant) -> bool {
        let since = self.back_since.load(Ordering::Relaxed);
        if since != 0
            && now.saturating_duration_since(self.epoch + Duration::from_nanos(since - 1))
                >= self.slow_start()
        {
            self.back_since.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Records one active check's result at `now`.
    pub fn note_check(&self, ok: bool, now: Instant) {
        self.last_check_ok.store(ok, Ordering::Relaxed);
        self.last_check.store(self.stamp(now), Ordering::Relaxed);
    }

    /// The last active check: passed, and how long before `now`.
    pub fn last_check(&self, now: Instant) -> Option<(bool, Duration)> {
        match self.last_check.load(Ordering::Relaxed) {
            0 => None,
            at => {
                let at = self.epoch + Duration::from_nanos(at - 1);
                Some((
                    self.last_check_ok.load(Ordering::Relaxed),
                    now.saturating_duration_since(at),
                ))
            }
        }
    }

    /// What the active check last said: down.
    pub fn is_active_down(&self) -> bool {
        self.active_down.load(Ordering::Relaxed)
    }

    /// Sets what the active check says; true when that changed it.
    pub fn set_active_down(&self, down: bool) -> bool {
        self.active_down.swap(down, Ordering::Relaxed) != down
    }

    /// Counts a failure seen by the data path at `now` (connect failure,
    /// reset before an answer, 5xx to an upgrade). At `threshold` in a row
    /// the backend is ejected for `ejection`; returns true then.
    pub fn note_failure(&self, threshold: u32, ejection: Duration, now: Instant) -> bool {
        if threshold == 0 {
            return false;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold && self.ejected_until.load(Ordering::Relaxed) == 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until
                .store(self.stamp(now + ejection), Ordering::Relaxed);
            return true;
        }
        false
    }

    /// A request or connection went through: the failure streak ends.
    pub fn note_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Ends an ejection whose time is up at `now`; true when it did.
    pub fn end_ejection_if_due(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until != 0 && self.stamp(now) >= until {
            // Failures of requests that were in flight during the ejection
            // do not count against the fresh start.
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// The state users see: the admin state, refined by health and slow
    /// start while in rotation.
    pub fn condition(&self) -> Condition {
        match self.state() {
            BackendState::Up if !self.is_healthy() => Condition::Down,
            BackendState::Up if self.is_ramping() => Condition::SlowStart,
            BackendState::Up => Condition::Up,
            BackendState::Draining => Condition::Draining,
            BackendState::Drained => Condition::Drained,
        }
    }

    /// Live WebSockets plus HTTP requests in flight: what least_conn compares.
    pub fn active(&self) -> usize {
        self.ws.load(Ordering::Relaxed) + self.http.load(Ordering::Relaxed)
    }

    /// Live connections through every instance: this one's, and the
    /// others' as last published (the same as `active` without a cluster).
    pub fn cluster_active(&self) -> usize {
        self.active() + self.remote.load(Ordering::Relaxed)
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

    /// WebSockets that sluice has asked to close and that are still open
    /// (a close waits for a quiet moment, which may take seconds). One
    /// pass under the lock; for the control plane, not the data path.
    pub fn ws_closing(&self) -> usize {
        self.lock_conns()
            .values()
            .filter(|c| c.is_closing())
            .count()
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnControl>>> {
        lock(&self.conns)
    }
}

/// Counters of a pool that outlive reloads.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// New connections waiting for admission now.
    pub admission_waiting: AtomicUsize,
    /// New connections refused by admission since start.
    pub admission_rejected: AtomicU64,
    /// Sticky clients sent to a new backend because theirs could not take them.
    pub sticky_repins: AtomicU64,
    /// Sticky clients placed afresh because sluice closed their WebSocket.
    pub sticky_moved: AtomicU64,
    /// Sticky pins whose WebSocket sluice closed on purpose.
    pub moved: MovedPins,
}

/// Most pins a pool remembers as moved; past it (all unexpired) a closed
/// client keeps its pin, as before pins were remembered.
pub const MAX_MOVED_PINS: usize = 100_000;

/// The sticky pins whose WebSocket sluice closed on purpose (drain,
/// rebalance, a removed listener): the next request with such a pin is
/// placed afresh, away from the backend it was on. Bounded
/// (`MAX_MOVED_PINS`) and expiring. In cluster mode the pins recorded here
/// also wait in an outbox for the cluster task to share them.
#[derive(Debug, Default)]
pub struct MovedPins {
    pins: Mutex<HashMap<u64, (u64, Instant)>>,
    sharing: std::sync::atomic::AtomicBool,
    outbox: Mutex<Vec<(u64, u64)>>,
}

impl MovedPins {
    /// Remembers that pin `nonce` was moved off backend `backend` (its
    /// id), until `expires`; false when the record is full.
    pub fn record(&self, nonce: u64, backend: u64, now: Instant, expires: Instant) -> bool {
        // Shared once: a pin recorded before its close (for the other
        // instances to know first) is not sent again when it closes.
        let known = lock(&self.pins)
            .get(&nonce)
            .is_some_and(|(b, until)| *b == backend && *until > now);
        let recorded = self.import(nonce, backend, now, expires);
        if recorded && !known && self.sharing.load(Ordering::Relaxed) {
            let mut outbox = lock(&self.outbox);
            if outbox.len() < MAX_MOVED_PINS {
                outbox.push((nonce, backend));
            }
        }
        recorded
    }

    /// `record`, for a pin another instance moved: not shared again.
    pub fn import(&self, nonce: u64, backend: u64, now: Instant, expires: Instant) -> bool {
        if nonce == 0 {
            return false;
        }
        let mut pins = lock(&self.pins);
        if pins.len() >= MAX_MOVED_PINS {
            pins.retain(|_, (_, until)| *until > now);
            if pins.len() >= MAX_MOVED_PINS {
                return false;
            }
        }
        pins.insert(nonce, (backend, expires));
        true
    }

    /// From now on, pins recorded here wait to be shared (cluster mode).
    pub fn share(&self) {
        self.sharing.store(true, Ordering::Relaxed);
    }

    /// The pins (nonce, backend id) recorded since the last call.
    pub fn take_outbox(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *lock(&self.outbox))
    }

    /// Puts back pins `take_outbox` gave out that could not be shared (the
    /// round failed): the next round shares them.
    pub fn return_outbox(&self, mut pins: Vec<(u64, u64)>) {
        let mut outbox = lock(&self.outbox);
        pins.append(&mut outbox);
        pins.truncate(MAX_MOVED_PINS);
        *outbox = pins;
    }

    /// The backend (id) pin `nonce` was moved off, once: the pin is
    /// forgotten.
    pub fn take(&self, nonce: u64, now: Instant) -> Option<u64> {
        let mut pins = lock(&self.pins);
        if pins.is_empty() {
            return None;
        }
        match pins.remove(&nonce) {
            Some((backend, until)) if until > now => Some(backend),
            _ => None,
        }
    }

    /// Pins remembered now.
    pub fn len(&self) -> usize {
        lock(&self.pins).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PoolStats {
    /// A value that changes when admission refuses a connection, with
    /// whether any connection is waiting for admission now.
    pub fn admission_pressure(&self) -> (u64, bool) {
        (
            self.admission_rejected.load(Ordering::Relaxed),
            self.admission_waiting.load(Ordering::Relaxed) > 0,
        )
    }
}

/// One pool as one config generation sees it: its settings and backends,
/// in config order. A reload makes a new entry; backends that stay are
/// the same `Backend`s, with their counts and state.
#[derive(Debug)]
pub struct PoolEntry {
    pub name: String,
    /// This generation's settings of the pool.
    pub cfg: PoolConfig,
    pub backends: Vec<Arc<Backend>>,
    /// Backends a reload removed: draining until they have no connection,
    /// then forgotten.
    retiring: Mutex<Vec<Arc<Backend>>>,
    /// The pool itself was removed by a reload (it then has only retiring
    /// backends).
    pub removed: bool,
    pub stats: Arc<PoolStats>,
}

impl PoolEntry {
    /// How long a moved pin is remembered: the drain window (a drained
    /// client comes back within it) plus a minute.
    pub fn moved_pin_ttl(&self) -> Duration {
        self.cfg.drain.window.max(self.cfg.rebalance.interval * 2) + Duration::from_secs(60)
    }

    /// Asks `conn` of `backend` to close with `code`, remembering its
    /// sticky pin as moved so that its client is placed afresh; false when
    /// it was asked to close before.
    pub fn close_moving(
        &self,
        backend: &Backend,
        conn: &ConnControl,
        code: u16,
        reason: CloseReason,
        now: Instant,
    ) -> bool {
        if conn.pin != 0 {
            self.stats
                .moved
                .record(conn.pin, backend.id, now, now + self.moved_pin_ttl());
        }
        conn.request_close(code, reason)
    }

    /// Backends a reload removed that still drain.
    pub fn retiring(&self) -> Vec<Arc<Backend>> {
        lock(&self.retiring).clone()
    }

    /// The current backends, then the retiring ones.
    pub fn all_backends(&self) -> Vec<Arc<Backend>> {
        let mut all = self.backends.clone();
        all.extend(self.retiring());
        all
    }

    /// Finds a current backend by name, else a retiring one.
    pub fn find(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .or_else(|| self.retiring().into_iter().find(|b| b.name == name))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data: still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a reloaded config made of the pools (`Registry::reconfigure`).
#[derive(Debug, Default)]
pub struct Reconfigured {
    /// Backends new to a pool that existed before (slow start applies).
    pub added: Vec<Arc<Backend>>,
    /// Backends the config no longer has, with their pool's entry (for
    /// its drain settings): they are to be drained.
    pub removed: Vec<(Arc<PoolEntry>, Arc<Backend>)>,
    /// Retiring backends the config has again: back in rotation.
    pub revived: Vec<Arc<Backend>>,
}

/// All pools' live state.
#[derive(Debug)]
pub struct Registry {
    pools: ArcSwap<Vec<Arc<PoolEntry>>>,
    /// Reference point of the backends' time stamps.
    epoch: Instant,
    next_id: AtomicU64,
    next_backend: AtomicU64,
    /// Leases taken since start: every HTTP request and upgrade.
    leases_total: AtomicU64,
    /// Close code every new WebSocket gets at once (0: none, `ABORT`: drop
    /// it): set at shutdown.
    closing: AtomicU32,
    /// Listeners a reload removed, with the close code a WebSocket that
    /// still opens through one of them gets at once.
    closing_listeners: Mutex<Vec<(u32, u16)>>,
    /// `closing_listeners` is not empty (read without the lock).
    any_listener_closing: AtomicBool,
}

impl Registry {
    /// Builds the registry for the pools of `cfg`.
    pub fn new(cfg: &Config) -> Self {
        let registry = Self {
            pools: ArcSwap::from_pointee(Vec::new()),
            epoch: Instant::now(),
            next_id: AtomicU64::new(1),
            next_backend: AtomicU64::new(1),
            leases_total: AtomicU64::new(0),
            closing: AtomicU32::new(0),
            closing_listeners: Mutex::new(Vec::new()),
            any_listener_closing: AtomicBool::new(false),
        };
        registry.reconfigure(cfg, Instant::now());
        registry
    }

    fn new_backend(&self, b: &BackendConfig, pool: &PoolConfig) -> Arc<Backend> {
        Arc::new(Backend::new(
            self.next_backend.fetch_add(1, Ordering::Relaxed),
            b.name.clone(),
            b.address,
            b.weight,
            pool.slow_start,
            self.epoch,
        ))
    }

    /// Makes the pools of `cfg` the current ones. A backend that stays
    /// (same pool, name and address) keeps its `Backend`, taking the new
    /// weight and slow start; a retiring one that comes back is revived;
    /// backends and pools the config no longer has become retiring (the
    /// caller drains them: they are out of rotation at once). Added
    /// backends start their slow-start ramp at `now`. The control plane
    /// calls this one at a time.
    pub fn reconfigure(&self, cfg: &Config, now: Instant) -> Reconfigured {
        let old = self.pools.load_full();
        let mut done = Reconfigured::default();
        let mut pools = Vec::with_capacity(cfg.pools.len());
        for pcfg in &cfg.pools {
            let before = old.iter().find(|p| p.name == pcfg.name);
            let mut retiring = before.map(|p| p.retiring()).unwrap_or_default();
            let mut backends = Vec::with_capacity(pcfg.backends.len());
            for bcfg in &pcfg.backends {
                let same = |b: &&Arc<Backend>| b.name == bcfg.name && b.addr == bcfg.address;
                let kept = before.and_then(|p| p.backends.iter().find(same).cloned());
                let backend = match kept {
                    Some(b) => b,
                    None => match retiring.iter().position(|b| same(&b)) {
                        Some(i) => {
                            let b = retiring.remove(i);
                            done.revived.push(b.clone());
                            b
                        }
                        None => {
                            let b = self.new_backend(bcfg, pcfg);
                            if before.is_some_and(|p| !p.removed) {
                                // Not at start: a backend that joins ramps up.
                                b.mark_back(now);
                                done.added.push(b.clone());
                            }
                            b
                        }
                    },
                };
                backend.reconfigure(bcfg.weight, pcfg.slow_start);
                backends.push(backend);
            }
            let mut gone = Vec::new();
            if let Some(p) = before {
                for b in &p.backends {
                    if !backends.iter().any(|n| Arc::ptr_eq(n, b)) {
                        retiring.push(b.clone());
                        gone.push(b.clone());
                    }
                }
            }
            let entry = Arc::new(PoolEntry {
                name: pcfg.name.clone(),
                cfg: pcfg.clone(),
                backends,
                retiring: Mutex::new(retiring),
                removed: false,
                stats: before.map(|p| p.stats.clone()).unwrap_or_default(),
            });
            done.removed
                .extend(gone.into_iter().map(|b| (entry.clone(), b)));
            pools.push(entry);
        }
        for p in old.iter() {
            if cfg.pools.iter().any(|n| n.name == p.name) {
                continue;
            }
            let entry = Arc::new(PoolEntry {
                name: p.name.clone(),
                cfg: p.cfg.clone(),
                backends: Vec::new(),
                retiring: Mutex::new(p.all_backends()),
                removed: true,
                stats: p.stats.clone(),
            });
            done.removed
                .extend(p.backends.iter().map(|b| (entry.clone(), b.clone())));
            pools.push(entry);
        }
        for (_, b) in &done.removed {
            // Out of rotation before the new pools are seen; a drain an
            // operator started (or finished) stands.
            let _ = b.state.compare_exchange(
                BackendState::Up as u8,
                BackendState::Draining as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        self.pools.store(Arc::new(pools));
        done
    }

    /// Forgets retiring backends that are drained and have no connection
    /// left, and removed pools that have none left; returns who was
    /// forgotten (pool, backend).
    pub fn forget_drained(&self) -> Vec<(String, String)> {
        let pools = self.pools.load_full();
        let mut forgotten = Vec::new();
        for p in pools.iter() {
            lock(&p.retiring).retain(|b| {
                let done = b.state() == BackendState::Drained && b.active() == 0;
                if done {
                    forgotten.push((p.name.clone(), b.name.clone()));
                }
                !done
            });
        }
        if pools
            .iter()
            .any(|p| p.removed && lock(&p.retiring).is_empty())
        {
            let kept = pools
                .iter()
                .filter(|p| !(p.removed && lock(&p.retiring).is_empty()))
                .cloned()
                .collect();
            self.pools.store(Arc::new(kept));
        }
        forgotten
    }

    /// The current pools: a snapshot, in config order, removed pools that
    /// still drain last.
    pub fn pools(&self) -> Arc<Vec<Arc<PoolEntry>>> {
        self.pools.load_full()
    }

    /// The current pool named `name`.
    pub fn pool(&self, name: &str) -> Option<Arc<PoolEntry>> {
        self.pools
            .load()
            .iter()
            .find(|p| p.name == name && !p.removed)
            .cloned()
    }

    /// Live WebSockets over all backends.
    pub fn ws_total(&self) -> usize {
        self.backends().iter().map(|b| b.ws_count()).sum()
    }

    /// Every backend, retiring ones too.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.pools
            .load()
            .iter()
            .flat_map(|p| p.all_backends())
            .collect()
    }

    /// Asks every live WebSocket, and every one that starts from now on, to
    /// close with `code` at its next message boundary.
    pub fn close_all(&self, code: u16) {
        self.closing.store(u32::from(code), Ordering::Release);
        for backend in self.backends() {
            for conn in backend.connections() {
                conn.request_close(code, CloseReason::Shutdown);
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

    /// Marks listener `listener` removed: a WebSocket that opens through
    /// it from now on (its upgrade was under way) is asked to close with
    /// `code` at once.
    pub fn close_listener(&self, listener: u32, code: u16) {
        lock(&self.closing_listeners).push((listener, code));
        self.any_listener_closing.store(true, Ordering::Release);
    }

    fn listener_close_code(&self, listener: u32) -> Option<u16> {
        if !self.any_listener_closing.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.closing_listeners)
            .iter()
            .find(|(l, _)| *l == listener)
            .map(|(_, code)| *code)
    }

    /// Control handles of the live WebSockets that came through listener
    /// `listener`.
    #[allow(clippy::type_complexity)]
    pub fn connections_of_listener(
        &self,
        listener: u32,
    ) -> Vec<(Arc<PoolEntry>, Arc<Backend>, Arc<ConnControl>)> {
        let mut found = Vec::new();
        for pool in self.pools.load().iter() {
            for backend in pool.all_backends() {
                for conn in backend.connections() {
                    if conn.listener == listener {
                        found.push((pool.clone(), backend.clone(), conn));
                    }
                }
            }
        }
        found
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

    /// Like `lease`, but only while the backend holds fewer than `max`
    /// connections (0: no limit); the check and the count are one atomic
    /// step, so concurrent callers cannot overshoot.
    pub fn lease_within(self: &Arc<Self>, backend: &Arc<Backend>, max: usize) -> Option<Lease> {
        if max == 0 {
            return Some(self.lease(backend));
        }
        // Connections only ever become WebSockets through a lease, so the
        // total cannot grow behind this compare-and-swap.
        backend
            .http
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |http| {
                (http + backend.ws.load(Ordering::Acquire) < max).then_some(http + 1)
            })
            .ok()?;
        self.leases_total.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            registry: self.clone(),
            backend: backend.clone(),
        })
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

    /// Turns the slot into a live WebSocket with a control handle; it came
    /// through listener `listener` under sticky pin `pin` (0: none).
    pub fn into_ws(self, listener: u32, pin: u64) -> WsEntry {
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(ConnControl::new(id, listener, pin));
        let backend = self.backend.clone();
        backend.ws.fetch_add(1, Ordering::Relaxed);
        backend.lock_conns().insert(id, control.clone());
        match self.registry.closing.load(Ordering::Acquire) {
            0 => {
                if let Some(code) = self.registry.listener_close_code(listener) {
                    control.request_close(code, CloseReason::Removed);
                }
            }
            ABORT => control.abort(),
            code => {
                control.request_close(code as u16, CloseReason::Shutdown);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry with one pool of `backends` backends, slow start `ramp`.
    fn one_pool(backends: usize, ramp: &str) -> Arc<Registry> {
        let mut text = format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n[[pool]]\nname = \"app\"\nslow_start = \"{ramp}\"\n"
        );
        for i in 0..backends {
            text.push_str(&format!(
                "\n[[pool.backend]]\nname = \"b{i}\"\naddress = \"127.0.0.1:{}\"\n",
                4000 + i
            ));
        }
        let cfg = crate::config::parse(&text, std::path::Path::new("test.toml")).expect("config");
        Arc::new(Registry::new(&cfg))
    }

    #[test]
    fn moved_pins_put_back_are_shared_first_and_once() {
        let moved = MovedPins::default();
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        moved.record(1, 7, now, until);
        assert!(moved.take_outbox().is_empty(), "not sharing yet");
        moved.share();
        moved.record(2, 7, now, until);
        let first = moved.take_outbox();
        assert_eq!(first, vec![(2, 7)]);
        // A pin recorded while the round that took `first` failed.
        moved.record(3, 8, now, until);
        moved.return_outbox(first);
        assert_eq!(moved.take_outbox(), vec![(2, 7), (3, 8)]);
        assert!(moved.take_outbox().is_empty());
    }

    #[test]
    fn lease_within_never_overshoots_the_limit() {
        let registry = one_pool(1, "0s");
        let backend = registry.pools()[0].backends[0].clone();
        let first = registry.lease_within(&backend, 2).expect("room for 1");
        let ws = registry
            .lease_within(&backend, 2)
            .expect("room for 2")
            .into_ws(0, 0);
        assert!(registry.lease_within(&backend, 2).is_none(), "full at 2");
        assert_eq!((backend.http_count(), backend.ws_count()), (1, 1));
        drop(first);
        let again = registry
            .lease_within(&backend, 2)
            .expect("a slot came back");
        assert!(registry.lease_within(&backend, 2).is_none());
        drop((again, ws));
        assert_eq!(backend.active(), 0);
        assert_eq!(registry.churn_marker().0, 3, "every lease counted");
    }

    #[test]
    fn concurrent_leases_stop_exactly_at_the_limit() {
        let registry = one_pool(1, "0s");
        let backend = registry.pools()[0].backends[0].clone();
        let held = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Some(lease) = registry.lease_within(&backend, 37) {
                            held.lock().expect("lock").push(lease);
                        }
                    }
                });
            }
        });
        assert_eq!(held.lock().expect("lock").len(), 37);
        assert_eq!(backend.http_count(), 37);
    }

    #[test]
    fn a_close_request_reaches_the_handle_once_and_abort_overrides() {
        let registry = one_pool(1, "0s");
        let backend = registry.pools()[0].backends[0].clone();
        let entry = registry.lease(&backend).into_ws(0, 0);
        let waker = std::task::Waker::noop();
        let control = entry.control().clone();
        assert_eq!(control.poll_request(waker), CloseRequest::None);
        control.request_close(1012, CloseReason::Drain);
        control.request_close(1001, CloseReason::Shutdown);
        assert_eq!(
            control.poll_request(waker),
            CloseRequest::Close(1012),
            "the first request wins"
        );
        assert_eq!(control.reason(), Some(CloseReason::Drain));
        control.abort();
        assert_eq!(control.poll_request(waker), CloseRequest::Abort);
        assert_eq!(backend.connections().len(), 1);
        drop(entry);
        assert!(backend.connections().is_empty());
        assert_eq!(backend.ws_count(), 0);
    }

    #[test]
    fn close_all_marks_websockets_that_register_later() {
        let registry = one_pool(2, "0s");
        let b0 = registry.pools()[0].backends[0].clone();
        let b1 = registry.pools()[0].backends[1].clone();
        let early = registry.lease(&b0).into_ws(0, 0);
        let pending = registry.lease(&b1);
        registry.close_all(1001);
        let late = pending.into_ws(0, 0);
        let waker = std::task::Waker::noop();
        assert_eq!(
            early.control().poll_request(waker),
            CloseRequest::Close(1001)
        );
        assert_eq!(
            late.control().poll_request(waker),
            CloseRequest::Close(1001)
        );
        registry.abort_all();
        let later = registry.lease(&b0).into_ws(0, 0);
        assert_eq!(later.control().poll_request(waker), CloseRequest::Abort);
        assert_eq!(early.control().poll_request(waker), CloseRequest::Abort);
    }

    #[test]
    fn a_removed_listener_closes_websockets_that_open_through_it_later() {
        let registry = one_pool(1, "0s");
        let b0 = registry.pools()[0].backends[0].clone();
        let waker = std::task::Waker::noop();
        registry.close_listener(7, 1012);
        let late = registry.lease(&b0).into_ws(7, 0);
        let other = registry.lease(&b0).into_ws(8, 0);
        assert_eq!(
            late.control().poll_request(waker),
            CloseRequest::Close(1012)
        );
        assert_eq!(other.control().poll_request(waker), CloseRequest::None);
        assert_eq!(registry.connections_of_listener(7).len(), 1);
    }

    #[test]
    fn a_reload_keeps_backends_that_stay_and_retires_the_others() {
        let registry = one_pool(3, "30s");
        let before = registry.pools()[0].backends.clone();
        let held = registry.lease(&before[2]).into_ws(0, 0);
        // b2 goes, b1 and b0 stay (b0 with a new weight), b9 joins.
        let text = "[[listener]]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n[[pool]]\nname = \"app\"\nslow_start = \"30s\"\n\n[[pool.backend]]\nname = \"b0\"\naddress = \"127.0.0.1:4000\"\nweight = 5\n\n[[pool.backend]]\nname = \"b1\"\naddress = \"127.0.0.1:4001\"\n\n[[pool.backend]]\nname = \"b9\"\naddress = \"127.0.0.1:4009\"\n";
        let cfg = crate::config::parse(text, std::path::Path::new("t.toml")).expect("config");
        let t0 = Instant::now();
        let done = registry.reconfigure(&cfg, t0);
        let pool = registry.pools()[0].clone();
        assert!(Arc::ptr_eq(&pool.backends[0], &before[0]));
        assert!(Arc::ptr_eq(&pool.backends[1], &before[1]));
        assert_eq!(pool.backends[0].weight(), 5);
        assert_eq!(done.added.len(), 1);
        assert!(done.added[0].is_ramping(), "a joining backend ramps up");
        assert_eq!(done.removed.len(), 1);
        assert_eq!(before[2].state(), BackendState::Draining);
        assert_eq!(pool.retiring().len(), 1);
        assert!(Arc::ptr_eq(
            &pool.find("b2").expect("still found"),
            &before[2]
        ));
        // Not forgotten while it has a connection or is not drained.
        assert!(registry.forget_drained().is_empty());
        drop(held);
        assert!(before[2].finish_drain());
        assert_eq!(
            registry.forget_drained(),
            [("app".to_string(), "b2".to_string())]
        );
        assert!(registry.pools()[0].find("b2").is_none());
    }

    #[test]
    fn an_undrain_between_drain_and_its_end_wins() {
        let registry = one_pool(1, "0s");
        let backend = &registry.pools()[0].backends[0];
        backend.set_state(BackendState::Draining);
        assert!(!backend.is_accepting());
        // The operator undrains before the drain task sees the backend empty.
        backend.set_state(BackendState::Up);
        assert!(
            !backend.finish_drain(),
            "a finished drain must not undo the undrain"
        );
        assert_eq!(backend.state(), BackendState::Up);
        backend.set_state(BackendState::Draining);
        assert!(backend.finish_drain());
        assert_eq!(backend.state(), BackendState::Drained);
        assert!(!backend.finish_drain(), "only once");
    }

    #[test]
    fn passive_ejection_at_the_threshold_then_back_after_its_time() {
        let registry = one_pool(1, "0s");
        let backend = &registry.pools()[0].backends[0];
        let t0 = Instant::now();
        let ejection = Duration::from_secs(10);
        assert!(!backend.note_failure(3, ejection, t0));
        backend.note_success();
        assert!(!backend.note_failure(3, ejection, t0));
        assert!(
            !backend.note_failure(3, ejection, t0),
            "a success reset the streak"
        );
        assert!(
            backend.note_failure(3, ejection, t0),
            "third in a row ejects"
        );
        assert!(!backend.is_healthy());
        assert_eq!(backend.condition(), Condition::Down);
        assert!(
            !backend.note_failure(3, ejection, t0),
            "an ejected backend is not ejected again"
        );
        assert!(!backend.end_ejection_if_due(t0 + Duration::from_secs(9)));
        assert!(backend.end_ejection_if_due(t0 + ejection));
        assert!(backend.is_healthy());
        // Failures counted during the ejection do not carry over.
        assert!(!backend.note_failure(3, ejection, t0 + ejection));
        assert!(!backend.note_failure(3, ejection, t0 + ejection));
        assert!(!backend.note_failure(0, ejection, t0), "threshold 0: off");
    }

    #[test]
    fn slow_start_ramps_the_weight_then_ends() {
        let registry = one_pool(1, "30s");
        let backend = &registry.pools()[0].backends[0];
        let t0 = Instant::now();
        assert_eq!(backend.effective_weight(t0), 1.0, "not ramping");
        backend.mark_back(t0);
        assert!(backend.is_ramping());
        assert_eq!(backend.condition(), Condition::SlowStart);
        assert_eq!(backend.ramp(t0), 0.02);
        assert_eq!(backend.effective_weight(t0 + Duration::from_secs(15)), 0.5);
        assert!(!backend.finish_ramp(t0 + Duration::from_secs(29)));
        assert!(backend.finish_ramp(t0 + Duration::from_secs(30)));
        assert_eq!(backend.ramp(t0 + Duration::from_secs(31)), 1.0);
        assert_eq!(backend.condition(), Condition::Up);
        let off = one_pool(1, "0s");
        off.pools()[0].backends[0].mark_back(t0);
        assert!(!off.pools()[0].backends[0].is_ramping(), "slow start off");
    }
}
