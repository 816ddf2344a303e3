//! The admin API's contract: every document it sends and receives.
//!
//! One set of serde types, shared by the server (`admin::serve` builds
//! them), the client (`admin::client` decodes into them, `ctl` reads them)
//! and the tests. The JSON field names here are the wire format documented
//! in DESIGN.md and README.md; change them only together with those.
//!
//! Requests refuse unknown fields (`deny_unknown_fields`), so a typo is a
//! 400 naming the field instead of a silently ignored option. Responses do
//! not, so a client still reads a document that gained a field.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// `GET /api/v1/status`: every pool, in config order (pools a reload
/// removed that still drain last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pools: Vec<Pool>,
    /// The config generation in use (`null` from a sluice that predates it).
    #[serde(default)]
    pub config: Option<ConfigGeneration>,
    /// This process, and during a binary upgrade the previous one that
    /// still drains.
    #[serde(default)]
    pub processes: Vec<Process>,
    /// In cluster mode: the instances and their counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
}

/// The cluster as this instance last saw it in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// This instance's name.
    pub instance: String,
    /// Redis answered the last round.
    pub redis_up: bool,
    /// Every instance that published (this one included), by name.
    pub instances: Vec<Instance>,
}

/// One instance's published live connections, per pool and backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub backends: Vec<InstanceBackend>,
}

/// One backend's live connections through one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceBackend {
    pub pool: String,
    pub backend: String,
    pub connections: u64,
    /// Of them, WebSockets.
    #[serde(default)]
    pub websockets: u64,
}

impl Cluster {
    /// The other instances' connections and WebSockets on `backend` of
    /// `pool`, summed, as this instance last read them.
    pub fn others_on(&self, pool: &str, backend: &str) -> (u64, u64) {
        self.instances
            .iter()
            .filter(|i| i.name != self.instance)
            .flat_map(|i| &i.backends)
            .filter(|b| b.pool == pool && b.backend == backend)
            .fold((0, 0), |(c, w), b| (c + b.connections, w + b.websockets))
    }
}

/// A sluice process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    /// `serving` (this one), or `draining` (the previous one, after an
    /// upgrade).
    pub role: String,
    /// Its live WebSockets.
    pub websockets: u64,
}

/// `POST /api/v1/upgrade`: the new process is serving; this one drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub old_pid: u32,
    pub new_pid: u32,
}

/// Which config is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigGeneration {
    /// 1 at start, one more per applied reload.
    pub generation: u64,
    /// When it was loaded, in milliseconds since the Unix epoch.
    pub loaded_at_ms: u64,
    /// The file it was read from (`null` for the demo's built-in config).
    pub path: Option<String>,
}

/// `POST /api/v1/reload`: the config file was read again and applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The generation now in use (unchanged when nothing changed).
    pub generation: u64,
    /// What changed, one line each (`added backend app/b4`, ...); empty
    /// when nothing did.
    pub changes: Vec<String>,
}

impl Status {
    /// Every backend, pool by pool.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.pools.iter().flat_map(|p| &p.backends)
    }

    /// The backend `name` of pool `pool`.
    pub fn backend(&self, pool: &str, name: &str) -> Option<&Backend> {
        self.backends().find(|b| b.pool == pool && b.name == name)
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// One pool in the status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    /// `least_conn`, `round_robin`, `p2c` or `hash`, as in the config.
    pub algorithm: String,
    /// Live connections (WebSockets and HTTP requests) over all backends.
    pub connections: u64,
    pub backends: Vec<Backend>,
    /// Rebalancer settings and its last decision (`null` when unknown).
    pub rebalance: Option<Rebalance>,
}

/// One backend: the status document's entry, and the answer to drain and
/// undrain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    /// The pool it belongs to.
    pub pool: String,
    pub name: String,
    /// Where sluice connects to it, `ip:port`.
    pub address: String,
    pub weight: u32,
    pub state: BackendState,
    /// Passing its health checks and not ejected.
    pub healthy: bool,
    pub connections: Connections,
    /// Progress of the drain, while draining or drained (`null` otherwise).
    pub drain: Option<DrainProgress>,
    /// A reload removed it from the config: it drains, then is forgotten.
    #[serde(default)]
    pub removed: bool,
    /// The last active health check (`null` when the pool has none, or
    /// before the first).
    #[serde(default)]
    pub last_check: Option<LastCheck>,
}

/// One active health check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCheck {
    pub ok: bool,
    /// How long ago it finished.
    pub ago_ms: u64,
}

/// A backend's state as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// In rotation.
    Up,
    /// In rotation but failing its health checks or ejected: gets nothing.
    Down,
    /// Out of rotation; its WebSockets are being closed over the window.
    Draining,
    /// Out of rotation, with no WebSocket left.
    Drained,
    /// Back in rotation, its weight ramping up.
    SlowStart,
}

impl BackendState {
    /// The name on the wire and in `ctl status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::SlowStart => "slow_start",
        }
    }

    /// In rotation: may get new connections (once healthy).
    pub fn is_in_rotation(self) -> bool {
        matches!(self, Self::Up | Self::SlowStart)
    }
}

impl From<crate::registry::Condition> for BackendState {
    fn from(condition: crate::registry::Condition) -> Self {
        use crate::registry::Condition;
        match condition {
            Condition::Up => Self::Up,
            Condition::Down => Self::Down,
            Condition::SlowStart => Self::SlowStart,
            Condition::Draining => Self::Draining,
            Condition::Drained => Self::Drained,
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live connections of one backend, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Connections {
    /// Proxied WebSockets.
    pub ws: u64,
    /// HTTP requests in flight.
    pub http: u64,
}

impl Connections {
    /// Connections of any kind.
    pub fn total(self) -> u64 {
        self.ws + self.http
    }
}

/// How far a drain has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainProgress {
    /// The window the closes are spread over.
    pub window_ms: u64,
    /// Time since the drain started.
    pub elapsed_ms: u64,
    /// WebSockets the drain has planned to close so far.
    pub planned: u64,
    /// Close requests sent so far.
    pub closed: u64,
}

/// A pool's rebalancer: its settings and its last decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rebalance {
    pub enabled: bool,
    pub interval_ms: u64,
    pub tolerance: f64,
    /// The last decision (`null` before the first interval).
    pub last: Option<RebalanceReport>,
}

/// One decision of the rebalancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalanceReport {
    /// How long ago it was taken.
    pub ago_ms: u64,
    /// Connections on the backends it considered.
    pub total: u64,
    /// Each backend's weighted share of `total`, rounded, in config order.
    pub shares: Vec<u64>,
    /// Backends off their share by more than the tolerance.
    pub outliers: Vec<String>,
    /// What it shed (`null` when nothing).
    pub shed: Option<RebalanceShed>,
    /// Why nothing is shed, when nothing is (e.g. `level`).
    pub note: String,
}

/// The shedding part of a rebalance decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceShed {
    /// The backend that sheds.
    pub backend: Option<String>,
    /// Closes the plan asked for.
    pub planned: u64,
    /// Closes actually requested (fewer when too few connections were old
    /// enough).
    pub closing: u64,
}

/// `POST /api/v1/pools/{pool}/backends/{backend}/drain`. An empty body is
/// the same as `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Spread the closes over this window, e.g. `"5m"`; the pool's drain
    /// window when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "window_string"
    )]
    pub window: Option<String>,
}

/// `POST /api/v1/pools/{pool}/backends/{backend}/undrain`: no fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UndrainRequest {}

/// The body of every answer that is not a success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// A present `window` must be a string (not a number, not `null`); the
/// message is the one the API has always given.
fn window_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d)
        .map(Some)
        .map_err(|_| de::Error::custom("window must be a string such as \"5m\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn backend(state: BackendState, drain: Option<DrainProgress>) -> Backend {
        Backend {
            pool: "app".into(),
            name: "b1".into(),
            address: "127.0.0.1:4000".into(),
            weight: 1,
            state,
            healthy: true,
            connections: Connections { ws: 3, http: 1 },
            drain,
            removed: false,
            last_check: None,
        }
    }

    #[test]
    fn backend_wire_format_is_the_documented_one() {
        let drain = DrainProgress {
            window_ms: 5000,
            elapsed_ms: 1200,
            planned: 2,
            closed: 1,
        };
        let v = serde_json::to_value(backend(BackendState::SlowStart, Some(drain)))
            .expect("serializes");
        assert_eq!(
            v,
            json!({
                "pool": "app", "name": "b1", "address": "127.0.0.1:4000", "weight": 1,
                "state": "slow_start", "healthy": true,
                "connections": { "ws": 3, "http": 1 },
                "drain": { "window_ms": 5000, "elapsed_ms": 1200, "planned": 2, "closed": 1 },
                "removed": false,
                "last_check": null,
            })
        );
        let v = serde_json::to_value(backend(BackendState::Up, None)).expect("serde");
        assert_eq!(v["drain"], json!(null), "absent drain is null, not missing");
    }

    #[test]
    fn states_have_their_snake_case_names() {
        for state in [
            BackendState::Up,
            BackendState::Down,
            BackendState::Draining,
            BackendState::Drained,
            BackendState::SlowStart,
        ] {
            let wire = serde_json::to_value(state).expect("serde");
            assert_eq!(wire, json!(state.as_str()));
            assert_eq!(
                serde_json::from_value::<BackendState>(wire).expect("serde"),
                state
            );
        }
        assert!(serde_json::from_value::<BackendState>(json!("sleepy")).is_err());
    }

    #[test]
    fn registry_conditions_keep_their_names_on_the_wire() {
        use crate::registry::Condition;
        for c in [
            Condition::Up,
            Condition::Down,
            Condition::SlowStart,
            Condition::Draining,
            Condition::Drained,
        ] {
            assert_eq!(BackendState::from(c).as_str(), c.as_str());
        }
    }

    #[test]
    fn status_round_trips_and_finds_backends() {
        let status = Status {
            pools: vec![Pool {
                name: "app".into(),
                algorithm: "least_conn".into(),
                connections: 4,
                backends: vec![backend(BackendState::Up, None)],
                rebalance: Some(Rebalance {
                    enabled: true,
                    interval_ms: 15000,
                    tolerance: 0.2,
                    last: Some(RebalanceReport {
                        ago_ms: 10,
                        total: 4,
                        shares: vec![4],
                        outliers: vec![],
                        shed: Some(RebalanceShed {
                            backend: Some("b1".into()),
                            planned: 1,
                            closing: 0,
                        }),
                        note: "level".into(),
                    }),
                }),
            }],
            config: Some(ConfigGeneration {
                generation: 2,
                loaded_at_ms: 1_700_000_000_000,
                path: Some("sluice.toml".into()),
            }),
            cluster: None,
            processes: vec![Process {
                pid: 42,
                role: "serving".into(),
                websockets: 4,
            }],
        };
        let text = serde_json::to_string(&status).expect("serde");
        assert_eq!(
            serde_json::from_str::<Status>(&text).expect("serde"),
            status
        );
        assert_eq!(
            status.backend("app", "b1").map(|b| b.connections.total()),
            Some(4)
        );
        assert!(status.backend("app", "b2").is_none());
        assert!(status.pool("app").is_some());
    }

    #[test]
    fn responses_tolerate_new_fields() {
        let mut v = serde_json::to_value(backend(BackendState::Up, None)).expect("serde");
        v["added_later"] = json!(1);
        assert!(serde_json::from_value::<Backend>(v).is_ok());
    }

    #[test]
    fn drain_request_window_is_optional_and_a_string() {
        let parse = |v| serde_json::from_value::<DrainRequest>(v).map_err(|e| e.to_string());
        assert_eq!(parse(json!({})), Ok(DrainRequest::default()));
        assert_eq!(
            parse(json!({ "window": "5m" })),
            Ok(DrainRequest {
                window: Some("5m".into())
            })
        );
        for bad in [json!({ "window": 5 }), json!({ "window": null })] {
            assert_eq!(
                parse(bad),
                Err("window must be a string such as \"5m\"".to_string())
            );
        }
        assert_eq!(
            parse(json!({ "windw": "5m" })),
            Err("unknown field `windw`, expected `window`".to_string())
        );
        assert_eq!(
            serde_json::to_value(DrainRequest::default()).expect("serde"),
            json!({})
        );
    }

    #[test]
    fn undrain_request_has_no_fields() {
        assert!(serde_json::from_value::<UndrainRequest>(json!({})).is_ok());
        let err = serde_json::from_value::<UndrainRequest>(json!({ "window": "5m" })).unwrap_err();
        assert!(err.to_string().contains("unknown field `window`"), "{err}");
        assert_eq!(
            serde_json::to_value(UndrainRequest {}).expect("serde"),
            json!({})
        );
    }
}

/// `GET /api/v1/timeline?since=N`: the samples taken after sample `N`
/// (all that are kept, the last few minutes, without `since`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Time between samples.
    pub interval_ms: u64,
    /// The number the next sample will have: ask `since` it next time.
    pub next: u64,
    pub samples: Vec<Sample>,
}

/// What the pools looked like at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub seq: u64,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub pools: Vec<PoolSample>,
}

/// One pool in a sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSample {
    pub name: String,
    /// New connections waiting for admission.
    pub admission_waiting: u64,
    /// New connections admission refused, since start.
    pub admission_rejected: u64,
    pub backends: Vec<BackendSample>,
}

/// One backend in a sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendSample {
    pub name: String,
    pub state: BackendState,
    pub connections: Connections,
    /// WebSockets closed by drains, since start.
    pub drain_closed: u64,
    /// WebSockets shed by the rebalancer, since start.
    pub rebalance_shed: u64,
}
