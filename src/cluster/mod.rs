//! Cluster mode: several sluice instances share their view through Redis.
//!
//! Owns this instance's Redis connections (the `redis` crate's
//! `ConnectionManager`, which reconnects by itself, and a pub/sub
//! connection that wakes a round when another instance changed
//! something). Every `publish_interval`, or at once when woken, a round:
//! - pushes this instance's operators' drains and undrains to the shared
//!   drains hash (they are applied here at once, Redis or not);
//! - publishes this instance's live connections and WebSockets per
//!   backend under `sluice:counts:INSTANCE` (a JSON object with a TTL of
//!   three intervals, so an instance that vanished stops counting) and
//!   reads the other instances', whose sums go into each backend's
//!   `remote` count, which the balancer adds to its own;
//! - starts or ends local drains so that they match the shared ones,
//!   over what is left of each one's window;
//! - hands each pool's rebalance plan, made by the instance holding that
//!   pool's shed lease, to this instance's rebalancer.
//!
//! The shed lease (`lease`, `publish_plan`) is taken by the rebalancer:
//! set-if-absent with an expiry, renewed by its holder, with a fencing
//! token from a counter; a plan is written only while the writer still
//! holds the lease (checked inside Redis by a script), and a plan under an
//! older token than one already seen is never carried out.
//!
//! Nothing in the data path waits on Redis: while it is unreachable the
//! remote counts are 0 (each instance balances on its own view), no
//! instance sheds (no lease), and `sluice_cluster_up` is 0, said once in
//! the log per change.

mod state;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use redis::aio::ConnectionManager;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use state::{
    Counts, DrainAction, LocalBackend, Published, SharedDrain, SharedPlan, decode_moved,
    encode_moved, others, reconcile, split,
};

use crate::config::ClusterConfig;
use crate::drain::Drains;
use crate::registry::{PoolEntry, Registry};

/// Where each process's counts live (`sluice:counts:INSTANCE#PID`).
const COUNTS_PREFIX: &str = "sluice:counts:";
/// Who published (a set of `INSTANCE#PID`; one whose counts expired is
/// taken out by the next reader).
const INSTANCES: &str = "sluice:instances";
/// Operators' drains: a hash of `POOL/BACKEND` to a `SharedDrain`.
const DRAINS: &str = "sluice:drains";
/// Each pool's shed lease (`INSTANCE TOKEN`), its fencing counter and
/// its last plan.
const LEASE_PREFIX: &str = "sluice:lease:";
const FENCE_PREFIX: &str = "sluice:fence:";
const PLAN_PREFIX: &str = "sluice:plan:";
/// Each sticky pool's moved pins: a stream of batches, one per round.
const MOVED_PREFIX: &str = "sluice:moved:";
/// Any message here wakes every instance's round.
const EVENTS: &str = "sluice:events";

/// Takes or renews a lease. KEYS: lease, fence counter. ARGV: holder,
/// ttl ms. Answers {held (0/1), token, holder}. A new lease's token is
/// one more than the last one, and never less than Redis's clock in ms,
/// so tokens still grow after a Redis that kept no data restarts.
const LEASE_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local sp = string.find(cur, ' ', 1, true)
  local holder = string.sub(cur, 1, sp - 1)
  local token = tonumber(string.sub(cur, sp + 1))
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token, holder}
  end
  return {0, token, holder}
end
local now = redis.call('TIME')
local token = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1,
  tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
redis.call('SET', KEYS[2], string.format('%d', token))
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. string.format('%d', token), 'PX', ARGV[2])
return {1, token, ARGV[1]}
";

/// Writes a plan only under the lease it names. KEYS: lease, plan.
/// ARGV: `INSTANCE TOKEN`, plan, ttl ms, channel. Answers 1 or 0.
const PLAN_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], 'plan')
return 1
";

/// Gives a lease up, if still held. KEYS: lease. ARGV: `INSTANCE TOKEN`.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// A pool's shed lease, as the last attempt to take or renew it found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// This instance holds it.
    pub held: bool,
    pub token: u64,
    /// `INSTANCE#PID` of the holder.
    pub holder: String,
}

/// Why a round or a request to Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis at {url}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis at {url} did not answer within {limit:?}")]
    Timeout { url: String, limit: Duration },
}

/// An operator's change here that Redis does not hold yet.
#[derive(Debug, Clone)]
enum Intent {
    Drain(SharedDrain),
    Undrain,
}

/// What the last round saw.
#[derive(Debug, Default)]
struct Seen {
    up: bool,
    published: Vec<Published>,
    /// The others' WebSockets, summed.
    remote_ws: Counts,
}

/// This instance's part in the cluster; one per process.
pub struct Cluster {
    cfg: ClusterConfig,
    /// Who holds a lease: the instance and this process (after a binary
    /// upgrade the new process takes the lease afresh, with a new token).
    holder: String,
    url: String,
    limit: Duration,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    seen: Mutex<Seen>,
    wake: Notify,
    /// Set by `publish_now`: the next round tells the others to read.
    announce: std::sync::atomic::AtomicBool,
    plans: Mutex<HashMap<String, watch::Sender<Option<SharedPlan>>>>,
    pending: Mutex<HashMap<(String, String), (u64, Intent)>>,
    versions: AtomicU64,
    /// Rounds begun, and rounds ended (a watch, for `share_moved`).
    rounds_begun: AtomicU64,
    rounds_ended: watch::Sender<u64>,
    /// Per sticky pool: the last moved-pins entry read.
    moved_seen: Mutex<HashMap<String, String>>,
    /// Per pool: the lease as last found, and the plans made under it.
    leases: Mutex<HashMap<String, (Option<Lease>, u64)>>,
    lease_script: redis::Script,
    plan_script: redis::Script,
    release_script: redis::Script,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("instance", &self.cfg.instance)
            .field("redis", &self.url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the epoch.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The client for `cfg`: its URL, with the password from its file.
fn client(cfg: &ClusterConfig) -> redis::RedisResult<redis::Client> {
    let mut info: redis::ConnectionInfo =
        redis::IntoConnectionInfo::into_connection_info(cfg.redis.as_str())?;
    if let Some(password) = &cfg.password {
        let redis_info = info.redis_settings().clone().set_password(password.clone());
        info = info.set_redis_settings(redis_info);
    }
    redis::Client::open(info)
}

/// This instance's live connections, its WebSockets, and per pool those
/// asked to close that are still open.
fn own_counts(registry: &Registry) -> (Counts, Counts, HashMap<String, usize>) {
    let mut pools = Counts::new();
    let mut websockets = Counts::new();
    let mut closing = HashMap::new();
    for pool in registry.pools().iter() {
        let all = pool.all_backends();
        closing.insert(
            pool.name.clone(),
            pool.backends.iter().map(|b| b.ws_closing()).sum(),
        );
        pools.insert(
            pool.name.clone(),
            all.iter().map(|b| (b.name.clone(), b.active())).collect(),
        );
        websockets.insert(
            pool.name.clone(),
            all.iter().map(|b| (b.name.clone(), b.ws_count())).collect(),
        );
    }
    (pools, websockets, closing)
}

/// Puts the others' sums (none: all 0) in each backend's `remote` count.
fn apply(registry: &Registry, sums: &Counts) {
    for pool in registry.pools().iter() {
        let pool_sums = sums.get(&pool.name);
        for backend in pool.all_backends() {
            let n = pool_sums
                .and_then(|p| p.get(&backend.name))
                .copied()
                .unwrap_or(0);
            backend.remote.store(n, Ordering::Relaxed);
        }
    }
}

impl Cluster {
    pub fn new(cfg: ClusterConfig) -> Arc<Self> {
        Arc::new(Self {
            holder: format!("{}#{}", cfg.instance, std::process::id()),
            url: redacted(&cfg.redis),
            limit: cfg.publish_interval.max(Duration::from_millis(500)),
            cfg,
            conn: tokio::sync::Mutex::new(None),
            seen: Mutex::default(),
            wake: Notify::new(),
            announce: std::sync::atomic::AtomicBool::new(false),
            plans: Mutex::default(),
            pending: Mutex::default(),
            versions: AtomicU64::new(0),
            leases: Mutex::default(),
            moved_seen: Mutex::default(),
            rounds_begun: AtomicU64::new(0),
            rounds_ended: watch::channel(0).0,
            lease_script: redis::Script::new(LEASE_SCRIPT),
            plan_script: redis::Script::new(PLAN_SCRIPT),
            release_script: redis::Script::new(RELEASE_SCRIPT),
        })
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.cfg.instance
    }

    /// `INSTANCE#PID`: this process, as leases and plans name it.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether Redis answered the last round, and every instance that had
    /// published then (this one included), sorted by name.
    pub fn view(&self) -> (bool, Vec<Published>) {
        let seen = lock(&self.seen);
        (seen.up, seen.published.clone())
    }

    /// How often counts are published and read.
    pub fn publish_interval(&self) -> Duration {
        self.cfg.publish_interval
    }

    /// Whether Redis answered the last round.
    pub fn is_up(&self) -> bool {
        lock(&self.seen).up
    }

    /// The other instances' WebSockets on `backend` of `pool`, summed, as
    /// last read (0 while Redis is unreachable).
    pub fn remote_websockets(&self, pool: &str, backend: &str) -> usize {
        lock(&self.seen)
            .remote_ws
            .get(pool)
            .and_then(|p| p.get(backend))
            .copied()
            .unwrap_or(0)
    }

    /// The other instances' WebSockets of `pool` asked to close and still
    /// open, as last read.
    pub fn remote_closing(&self, pool: &str) -> usize {
        let seen = lock(&self.seen);
        seen.published
            .iter()
            .filter(|p| p.holder() != self.holder)
            .filter_map(|p| p.closing.get(pool))
            .sum()
    }

    /// Each process's WebSockets on `backend` of `pool`, by holder
    /// (`INSTANCE#PID`): this one's `own` (live), the others' as last read.
    pub fn websockets_by_instance(
        &self,
        pool: &str,
        backend: &str,
        own: usize,
    ) -> Vec<(String, usize)> {
        let seen = lock(&self.seen);
        let mut out = vec![(self.holder.clone(), own)];
        for p in seen.published.iter().filter(|p| p.holder() != self.holder) {
            let n = p
                .websockets
                .get(pool)
                .and_then(|b| b.get(backend))
                .copied()
                .unwrap_or(0);
            out.push((p.holder(), n));
        }
        out
    }

    /// Per pool: whether this instance holds its shed lease, and the plans
    /// it made under a lease, for the metrics.
    pub fn leases(&self) -> Vec<(String, bool, u64)> {
        let mut out: Vec<_> = lock(&self.leases)
            .iter()
            .map(|(pool, (lease, plans))| {
                (pool.clone(), lease.as_ref().is_some_and(|l| l.held), *plans)
            })
            .collect();
        out.sort();
        out
    }

    /// The plans for `pool` that this instance is to carry out: each one
    /// newer (by fencing token, then sequence) than any before.
    pub fn plans(&self, pool: &str) -> watch::Receiver<Option<SharedPlan>> {
        lock(&self.plans)
            .entry(pool.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Queues `plan` for this instance's rebalancer unless one as new was
    /// already queued: the fence against a holder that lost its lease.
    fn deliver(&self, pool: &str, plan: SharedPlan) {
        let mut plans = lock(&self.plans);
        let sender = plans
            .entry(pool.to_string())
            .or_insert_with(|| watch::channel(None).0);
        sender.send_if_modified(|current| {
            if plan.is_after(current.as_ref().map(SharedPlan::order)) {
                *current = Some(plan);
                true
            } else {
                false
            }
        });
    }

    /// Makes every instance drain `backend` of `pool` over `window` from
    /// now (this one has started already): pushed at once, or when Redis
    /// is back.
    pub fn announce_drain(&self, pool: &str, backend: &str, window: Duration) {
        let drain = SharedDrain {
            pool: pool.into(),
            backend: backend.into(),
            window_ms: window.as_millis() as u64,
            started_ms: wall_ms(),
            by: self.cfg.instance.clone(),
        };
        self.intend(pool, backend, Intent::Drain(drain));
    }

    /// Makes every instance put `backend` of `pool` back in rotation.
    pub fn announce_undrain(&self, pool: &str, backend: &str) {
        self.intend(pool, backend, Intent::Undrain);
    }

    fn intend(&self, pool: &str, backend: &str, intent: Intent) {
        let version = self.versions.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending).insert((pool.into(), backend.into()), (version, intent));
        self.wake.notify_one();
    }

    /// The connection to Redis, made on first use.
    async fn connection(&self) -> Result<ConnectionManager, ClusterError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let client = client(&self.cfg).map_err(|source| self.error(source))?;
        let made = ConnectionManager::new(client)
            .await
            .map_err(|source| self.error(source))?;
        *conn = Some(made.clone());
        Ok(made)
    }

    fn error(&self, source: redis::RedisError) -> ClusterError {
        ClusterError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    /// `work` on the connection, within the time limit.
    async fn timed<T, F>(&self, work: F) -> Result<T, ClusterError>
    where
        F: std::future::Future<Output = Result<T, ClusterError>>,
    {
        match tokio::time::timeout(self.limit, work).await {
            Ok(result) => result,
            Err(_) => Err(ClusterError::Timeout {
                url: self.url.clone(),
                limit: self.limit,
            }),
        }
    }

    /// Takes or renews `pool`'s shed lease for `ttl`.
    pub async fn lease(&self, pool: &str, ttl: Duration) -> Result<Lease, ClusterError> {
        let found = self
            .timed(async {
                let mut c = self.connection().await?;
                let (held, token, holder): (i64, u64, String) = self
                    .lease_script
                    .key(format!("{LEASE_PREFIX}{pool}"))
                    .key(format!("{FENCE_PREFIX}{pool}"))
                    .arg(&self.holder)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await
                    .map_err(|source| self.error(source))?;
                Ok(Lease {
                    held: held == 1,
                    token,
                    holder,
                })
            })
            .await;
        let mut leases = lock(&self.leases);
        let entry = leases.entry(pool.to_string()).or_default();
        let was = entry.0.clone();
        entry.0 = found.as_ref().ok().cloned();
        drop(leases);
        if let Ok(lease) = &found {
            let had = was
                .as_ref()
                .is_some_and(|w| w.held && w.token == lease.token);
            if lease.held && !had {
                info!(pool, instance = %self.cfg.instance, token = lease.token, "cluster: this instance holds the shed lease");
            } else if !lease.held && was.as_ref().is_some_and(|w| w.held) {
                info!(pool, instance = %self.cfg.instance, holder = %lease.holder, "cluster: the shed lease went to another instance");
            }
        }
        found
    }

    /// Writes a plan for every instance (close `shares` of `backend`'s
    /// WebSockets, spread over `spread`), if this instance still holds the
    /// lease `token` names; then queues it here too. False: the lease was
    /// lost, nothing was written. The plan lasts `ttl` in Redis.
    pub async fn publish_plan(
        &self,
        pool: &str,
        token: u64,
        backend: &str,
        shares: std::collections::BTreeMap<String, usize>,
        spread: Duration,
        ttl: Duration,
    ) -> Result<bool, ClusterError> {
        let seq = lock(&self.leases).get(pool).map_or(0, |l| l.1) + 1;
        let plan = SharedPlan {
            token,
            seq,
            by: self.cfg.instance.clone(),
            backend: backend.into(),
            shares,
            spread_ms: spread.as_millis() as u64,
        };
        let text = serde_json::to_string(&plan).unwrap_or_default();
        let written: i64 = self
            .timed(async {
                let mut c = self.connection().await?;
                self.plan_script
                    .key(format!("{LEASE_PREFIX}{pool}"))
                    .key(format!("{PLAN_PREFIX}{pool}"))
                    .arg(format!("{} {token}", self.holder))
                    .arg(text)
                    .arg(ttl.as_millis() as u64)
                    .arg(EVENTS)
                    .invoke_async(&mut c)
                    .await
                    .map_err(|source| self.error(source))
            })
            .await?;
        if written != 1 {
            warn!(pool, instance = %self.cfg.instance, token, "cluster: the shed lease was lost before the plan was written; nothing shed");
            return Ok(false);
        }
        if let Some(entry) = lock(&self.leases).get_mut(pool) {
            entry.1 = seq;
        }
        self.deliver(pool, plan);
        Ok(true)
    }

    /// Before `conns` of `backend` close for a rebalance: records their
    /// sticky pins as moved, shares them at once, and waits until the
    /// other instances have surely read them (a round here, then one
    /// publish interval, so a lost pub/sub message is covered too), at
    /// most `limit`; a client coming back through another instance is
    /// then placed afresh there as well. Returns the time waited.
    pub async fn share_moved(
        &self,
        pool: &PoolEntry,
        backend: &crate::registry::Backend,
        conns: &[Arc<crate::registry::ConnControl>],
        limit: Duration,
    ) -> Duration {
        let started = std::time::Instant::now();
        let now = started;
        let until = now + pool.moved_pin_ttl();
        let mut any = false;
        for conn in conns.iter().filter(|c| c.pin != 0) {
            any |= pool.stats.moved.record(conn.pin, backend.id, now, until);
        }
        if !any {
            return Duration::ZERO;
        }
        let wait = async {
            let after = self.rounds_begun.load(Ordering::Acquire);
            let mut ended = self.rounds_ended.subscribe();
            self.wake.notify_one();
            let _ = ended.wait_for(|n| *n > after).await;
            tokio::time::sleep(self.cfg.publish_interval).await;
        };
        let _ = tokio::time::timeout(limit, wait).await;
        started.elapsed()
    }

    /// Publishes this instance's counts at once and wakes the others to
    /// read them (after its share of a plan is closed: the leader then
    /// plans again on fresh counts, not ones a publish interval old).
    pub fn publish_now(&self) {
        self.announce.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Gives up the leases this instance holds (a clean stop): another
    /// instance may shed at once.
    async fn release_leases(&self) {
        let held: Vec<(String, u64)> = lock(&self.leases)
            .iter()
            .filter_map(|(pool, (lease, _))| {
                lease
                    .as_ref()
                    .filter(|l| l.held)
                    .map(|l| (pool.clone(), l.token))
            })
            .collect();
        for (pool, token) in held {
            if let Some((Some(lease), _)) = lock(&self.leases).get_mut(&pool) {
                lease.held = false;
            }
            let _ = self
                .timed(async {
                    let mut c = self.connection().await?;
                    self.release_script
                        .key(format!("{LEASE_PREFIX}{pool}"))
                        .arg(format!("{} {token}", self.holder))
                        .invoke_async::<i64>(&mut c)
                        .await
                        .map_err(|source| self.error(source))
                })
                .await;
        }
    }

    /// Publishes and reads every `publish_interval`, or when woken, until
    /// `leave`. At `shutdown` (or a handover) it gives its leases up, and
    /// goes on publishing what still drains here until `leave`.
    pub async fn run(
        self: Arc<Self>,
        registry: Arc<Registry>,
        drains: Arc<Drains>,
        shutdown: CancellationToken,
        leave: CancellationToken,
    ) {
        tokio::spawn(self.clone().listen(leave.clone()));
        let mut was_up: Option<bool> = None;
        let mut tick = tokio::time::interval(self.cfg.publish_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leases_given_up = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.wake.notified() => {}
                () = shutdown.cancelled(), if !leases_given_up => {
                    // This process's rebalancers have stopped: another
                    // instance, or the new process, may shed at once.
                    leases_given_up = true;
                    self.release_leases().await;
                    continue;
                }
                () = leave.cancelled() => break,
            }
            let begun = self.rounds_begun.fetch_add(1, Ordering::AcqRel) + 1;
            let result = self.timed(self.round(&registry, &drains)).await;
            self.rounds_ended.send_replace(begun);
            let up = match result {
                Ok(()) => true,
                Err(error) => {
                    // Balance on this instance's own view until Redis is back.
                    apply(&registry, &Counts::new());
                    *lock(&self.seen) = Seen::default();
                    if was_up != Some(false) {
                        warn!(instance = %self.cfg.instance, error = %crate::error_chain::chain(&error), "cluster: Redis unreachable; balancing on this instance's own view, not shedding");
                    }
                    false
                }
            };
            if up && was_up != Some(true) {
                info!(instance = %self.cfg.instance, redis = %self.url, "cluster: Redis reachable; balancing on the cluster's counts");
            }
            was_up = Some(up);
        }
        // Leaving: the others stop counting this instance at once.
        self.release_leases().await;
        let _ = self
            .timed(async {
                let mut c = self.connection().await?;
                redis::pipe()
                    .del(format!("{COUNTS_PREFIX}{}", self.holder))
                    .ignore()
                    .srem(INSTANCES, &self.holder)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
                    .map_err(|source| self.error(source))
            })
            .await;
    }

    /// Wakes a round whenever another instance announces a change.
    async fn listen(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let subscribed = async {
                let client = client(&self.cfg)?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(EVENTS).await?;
                let mut messages = pubsub.on_message();
                while futures_util::StreamExt::next(&mut messages).await.is_some() {
                    self.wake.notify_one();
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                _ = subscribed => {}
                () = stop.cancelled() => return,
            }
            // Rounds go on meanwhile; only the push is lost until then.
            tokio::select! {
                () = tokio::time::sleep(self.cfg.publish_interval) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One round: push, publish, read, and act on what was read.
    async fn round(&self, registry: &Registry, drains: &Drains) -> Result<(), ClusterError> {
        let mut c = self.connection().await?;
        self.push_pending(&mut c).await?;
        let (pools, websockets, closing) = own_counts(registry);
        let mine = Published {
            instance: self.cfg.instance.clone(),
            pid: std::process::id(),
            pools,
            websockets,
            closing,
        };
        let text = serde_json::to_string(&mine).unwrap_or_default();
        let pools = registry.pools();
        let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
        let mut plan_keys = redis::cmd("MGET");
        for name in &names {
            plan_keys.arg(format!("{PLAN_PREFIX}{name}"));
        }
        let mut pipe = redis::pipe();
        pipe.pset_ex(
            format!("{COUNTS_PREFIX}{}", self.holder),
            text,
            self.cfg.ttl().as_millis() as u64,
        )
        .ignore()
        .sadd(INSTANCES, &self.holder)
        .ignore()
        .smembers(INSTANCES)
        .hgetall(DRAINS);
        if !names.is_empty() {
            pipe.add_command(plan_keys);
        }
        // Sticky pools: the pins moved here go out, the others' come in.
        let sticky: Vec<&Arc<PoolEntry>> =
            pools.iter().filter(|p| p.cfg.sticky.is_some()).collect();
        let mut shared_any = false;
        // Taken out of the outboxes; put back if the round fails or
        // times out.
        let mut taken = Unshared(Vec::new());
        for pool in &sticky {
            pool.stats.moved.share();
            let key = format!("{MOVED_PREFIX}{}", pool.name);
            let all = pool.all_backends();
            let outbox = pool.stats.moved.take_outbox();
            let out: Vec<(u64, String)> = outbox
                .iter()
                .map(|&(nonce, id)| {
                    let name = all.iter().find(|b| b.id == id).map(|b| b.name.clone());
                    (nonce, name.unwrap_or_default())
                })
                .collect();
            if !outbox.is_empty() {
                taken.0.push((*pool, outbox));
            }
            if !out.is_empty() {
                shared_any = true;
                pipe.cmd("XADD")
                    .arg(&key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(10_000)
                    .arg("*")
                    .arg("i")
                    .arg(&self.holder)
                    .arg("p")
                    .arg(encode_moved(&out))
                    .ignore()
                    .pexpire(&key, pool.moved_pin_ttl().as_millis() as i64)
                    .ignore();
            }
        }
        if shared_any {
            pipe.publish(EVENTS, "moved").ignore();
        }
        if self.announce.swap(false, Ordering::AcqRel) {
            pipe.publish(EVENTS, "counts").ignore();
        }
        let since: Vec<String> = {
            let mut seen = lock(&self.moved_seen);
            sticky
                .iter()
                .map(|pool| {
                    seen.entry(pool.name.clone())
                        .or_insert_with(|| {
                            let ttl = pool.moved_pin_ttl().as_millis() as u64;
                            format!("{}-0", wall_ms().saturating_sub(ttl))
                        })
                        .clone()
                })
                .collect()
        };
        for (pool, since) in sticky.iter().zip(&since) {
            pipe.cmd("XRANGE")
                .arg(format!("{MOVED_PREFIX}{}", pool.name))
                .arg(format!("({since}"))
                .arg("+");
        }
        let read: Vec<redis::Value> = pipe
            .query_async(&mut c)
            .await
            .map_err(|source| self.error(source))?;
        taken.0.clear();
        let mut read = read.into_iter();
        let mut next = || read.next().unwrap_or(redis::Value::Nil);
        let decode = |e: redis::ParsingError| self.error(e.into());
        let instances: Vec<String> = redis::from_redis_value(next()).map_err(decode)?;
        let shared: HashMap<String, String> = redis::from_redis_value(next()).map_err(decode)?;
        let plans: Vec<Option<String>> = if names.is_empty() {
            Vec::new()
        } else {
            redis::from_redis_value(next()).map_err(decode)?
        };
        for pool in &sticky {
            type Entries = Vec<(String, HashMap<String, String>)>;
            let entries: Entries = redis::from_redis_value(next()).map_err(decode)?;
            self.import_moved(pool, entries);
        }
        let published = self.read_counts(&mut c, instances).await?;
        apply(registry, &others(&self.holder, &published, |p| &p.pools));
        *lock(&self.seen) = Seen {
            up: true,
            remote_ws: others(&self.holder, &published, |p| &p.websockets),
            published,
        };
        let shared: Vec<SharedDrain> = shared
            .values()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        self.follow_drains(registry, drains, &shared);
        for (pool, plan) in names.iter().zip(plans) {
            if let Some(plan) = plan.and_then(|p| serde_json::from_str::<SharedPlan>(&p).ok()) {
                self.deliver(pool, plan);
            }
        }
        Ok(())
    }

    /// Takes the pins another instance moved into `pool`'s record, so
    /// that their clients are placed afresh here too.
    fn import_moved(&self, pool: &PoolEntry, entries: Vec<(String, HashMap<String, String>)>) {
        let Some((last, _)) = entries.last() else {
            return;
        };
        lock(&self.moved_seen).insert(pool.name.clone(), last.clone());
        let now = std::time::Instant::now();
        let wall = wall_ms();
        let ttl = pool.moved_pin_ttl();
        let all = pool.all_backends();
        for (id, fields) in &entries {
            if fields.get("i").is_some_and(|i| *i == self.holder) {
                continue;
            }
            // The entry's id starts with Redis's clock at the time, in ms.
            let at: u64 = id
                .split('-')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(wall);
            let Some(left) = ttl.checked_sub(Duration::from_millis(wall.saturating_sub(at))) else {
                continue;
            };
            for (nonce, backend) in decode_moved(fields.get("p").map_or("", String::as_str)) {
                // Id 0 is no backend: a pin moved by an upgrade.
                let id = all.iter().find(|b| b.name == backend).map_or(0, |b| b.id);
                pool.stats.moved.import(nonce, id, now, now + left);
            }
        }
    }

    /// Writes the operators' changes made here that Redis does not hold
    /// yet, and tells the others.
    async fn push_pending(&self, c: &mut ConnectionManager) -> Result<(), ClusterError> {
        let pending: Vec<((String, String), (u64, Intent))> = lock(&self.pending)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for ((pool, backend), (_, intent)) in &pending {
            let field = SharedDrain::field(pool, backend);
            match intent {
                Intent::Drain(d) => {
                    pipe.hset(DRAINS, field, serde_json::to_string(d).unwrap_or_default())
                        .ignore();
                }
                Intent::Undrain => {
                    pipe.hdel(DRAINS, field).ignore();
                }
            }
        }
        pipe.publish(EVENTS, "drain").ignore();
        pipe.query_async::<()>(c)
            .await
            .map_err(|source| self.error(source))?;
        // What changed again meanwhile goes with the next round.
        let mut left = lock(&self.pending);
        for (key, (version, _)) in pending {
            if left.get(&key).is_some_and(|(v, _)| *v == version) {
                left.remove(&key);
            }
        }
        Ok(())
    }

    /// The counts of the instances named in the set, sorted by name;
    /// names whose counts expired are taken out of it.
    async fn read_counts(
        &self,
        c: &mut ConnectionManager,
        instances: Vec<String>,
    ) -> Result<Vec<Published>, ClusterError> {
        if instances.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = instances
            .iter()
            .map(|i| format!("{COUNTS_PREFIX}{i}"))
            .collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(c)
            .await
            .map_err(|source| self.error(source))?;
        let gone: Vec<&String> = instances
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(i, _)| i)
            .collect();
        if !gone.is_empty() {
            redis::cmd("SREM")
                .arg(INSTANCES)
                .arg(&gone)
                .query_async::<()>(c)
                .await
                .map_err(|source| self.error(source))?;
        }
        let mut published: Vec<Published> = values
            .iter()
            .flatten()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        published.sort_by(|a, b| a.instance.cmp(&b.instance));
        Ok(published)
    }

    /// Starts and ends local drains so that they match `shared`.
    fn follow_drains(&self, registry: &Registry, drains: &Drains, shared: &[SharedDrain]) {
        // A process on its way out (after a binary upgrade) drains every
        // backend already; the new process follows the shared drains.
        if drains.shutting_down() {
            return;
        }
        let local: Vec<LocalBackend> = registry
            .pools()
            .iter()
            .filter(|p| !p.removed)
            .flat_map(|pool| {
                pool.backends.iter().map(|b| {
                    let kind = drains.drain_kind(b);
                    LocalBackend {
                        pool: pool.name.clone(),
                        backend: b.name.clone(),
                        draining: kind.is_some(),
                        operator: kind == Some(true),
                    }
                })
            })
            .collect();
        let pending: HashSet<(String, String)> = lock(&self.pending).keys().cloned().collect();
        for action in reconcile(shared, &local, &pending, wall_ms()) {
            let (pool, backend) = match &action {
                DrainAction::Start { pool, backend, .. } | DrainAction::Stop { pool, backend } => {
                    (pool, backend)
                }
            };
            let Ok((entry, found)) = drains.find(pool, backend) else {
                continue;
            };
            let done = match action {
                DrainAction::Start { window, .. } => {
                    info!(%pool, %backend, ?window, instance = %self.cfg.instance, "cluster: draining, as asked through another instance");
                    drains.drain(&entry, &found, Some(window))
                }
                DrainAction::Stop { .. } => {
                    info!(%pool, %backend, instance = %self.cfg.instance, "cluster: undrained through another instance");
                    drains.undrain(&entry, &found)
                }
            };
            if let Err(error) = done {
                warn!(%pool, %backend, %error, "cluster: could not follow the shared drain");
            }
        }
    }
}

/// Moved pins taken out of their pools' outboxes for a round: back into
/// them when dropped unshared.
struct Unshared<'a>(Vec<(&'a PoolEntry, Vec<(u64, u64)>)>);

impl Drop for Unshared<'_> {
    fn drop(&mut self) {
        for (pool, pins) in self.0.drain(..) {
            pool.stats.moved.return_outbox(pins);
        }
    }
}

/// `url` without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
