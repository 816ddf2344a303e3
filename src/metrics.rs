//! Prometheus metrics.
//!
//! Owns the metric registry and its text encoding for `GET /metrics`. What
//! the data path counts as it goes (accepted connections, upstream connect
//! time) lives in prometheus-client metrics handed to it at start; what the
//! registry already counts (live connections, messages, bytes, drain
//! closes, backend states) is read at scrape time, so the data path pays
//! nothing extra for it.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use arc_swap::ArcSwap;

use crate::registry::Registry;
use crate::tls::Tls;

type ListenerLabels = [(&'static str, String); 1];
type PoolLabels = [(&'static str, String); 1];

/// The metrics sluice exports.
#[derive(Debug)]
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
    accepted: Family<ListenerLabels, Counter>,
    rejected: Family<PoolLabels, Counter>,
    handshake_errors: Family<ListenerLabels, Counter>,
    proxy_rejected: Family<ListenerLabels, Counter>,
    client_limited: Family<ListenerLabels, Counter>,
    h2_connections: Family<ListenerLabels, Counter>,
    h2_streams: Family<ListenerLabels, Counter>,
    h2_websockets: Family<ListenerLabels, Gauge>,
    /// Time to open a TCP connection to a backend.
    pub connect_seconds: Histogram,
    /// The config generation in use (1 at start, +1 per applied reload).
    pub config_generation: Gauge,
    /// The TLS listeners, as the last reload left them.
    tls: TlsListeners,
    acme_orders: Family<[(&'static str, &'static str); 1], Counter>,
    /// What became of the access log's lines.
    pub access_log: Arc<crate::access_log::Counts>,
}

/// Cluster mode's state, read at scrape time (not exported otherwise).
#[derive(Debug)]
struct ClusterCollector(Arc<crate::cluster::Cluster>);

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = encoder.encode_descriptor(
            "sluice_cluster_up",
            "1 while this instance reaches Redis and balances on the cluster's counts, 0 while it balances on its own view",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(self.0.is_up())).encode(m)?;
        let leases = self.0.leases();
        let mut m = encoder.encode_descriptor(
            "sluice_cluster_lease_held",
            "1 while this instance holds the pool's shed lease (only the holder plans sheds), by pool",
            None,
            MetricType::Gauge,
        )?;
        for (pool, held, _) in &leases {
            ConstGauge::new(i64::from(*held))
                .encode(m.encode_family(&[("pool", pool.as_str())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "sluice_cluster_plans",
            "Rebalance plans this instance made for the whole cluster while holding the pool's shed lease, by pool",
            None,
            MetricType::Counter,
        )?;
        for (pool, _, plans) in &leases {
            ConstCounter::new(*plans).encode(m.encode_family(&[("pool", pool.as_str())])?)?;
        }
        Ok(())
    }
}

/// The access log's counts, read at scrape time.
#[derive(Debug)]
struct AccessCollector(Arc<crate::access_log::Counts>);

impl Collector for AccessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut m = encoder.encode_descriptor(
            "sluice_access_log_lines",
            "Access log lines: written, dropped (its queue was full) or failed (writing failed)",
            None,
            MetricType::Counter,
        )?;
        let counts = &self.0;
        for (result, counter) in [
            ("written", &counts.written),
            ("dropped", &counts.dropped),
            ("failed", &counts.failed),
        ] {
            ConstCounter::new(counter.load(Relaxed))
                .encode(m.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

/// Each TLS listener's name and certificates, read at scrape time (so a
/// certificate file reloaded since shows at once).
#[derive(Clone, Default)]
struct TlsListeners(Arc<ArcSwap<Vec<(String, Tls)>>>);

impl std::fmt::Debug for TlsListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.0.load().iter().map(|(n, _)| n.clone()).collect();
        f.debug_tuple("TlsListeners").field(&names).finish()
    }
}

impl Collector for TlsListeners {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "sluice_tls_certificate_expiry_seconds",
            "When each served certificate expires (its notAfter, Unix seconds), by listener and name",
            None,
            MetricType::Gauge,
        )?;
        for (listener, tls) in self.0.load().iter() {
            for (name, not_after) in tls.certificates() {
                let labels = [("listener", listener.as_str()), ("name", name.as_str())];
                ConstGauge::new(not_after).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// The metrics; `cluster`: in cluster mode, this instance's part.
    pub fn new(live: Arc<Registry>, cluster: Option<Arc<crate::cluster::Cluster>>) -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        let accepted = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "sluice_connections_accepted",
            "Client connections accepted, by listener",
            accepted.clone(),
        );
        // 0.1 ms .. ~1.6 s
        let connect_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "sluice_upstream_connect_seconds",
            "Time to open a TCP connection to a backend",
            connect_seconds.clone(),
        );
        let rejected = Family::<PoolLabels, Counter>::default();
        registry.register(
            "sluice_admission_rejected",
            "New connections refused with 503 by admission (rate or full backends), by pool",
            rejected.clone(),
        );
        let handshake_errors = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "sluice_tls_handshake_errors",
            "TLS handshakes that failed or timed out, by listener",
            handshake_errors.clone(),
        );
        let proxy_rejected = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "sluice_proxy_protocol_rejected",
            "Connections closed for a missing, invalid or unallowed PROXY header, by listener",
            proxy_rejected.clone(),
        );
        let client_limited = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "sluice_client_limit_rejected",
            "Requests answered 429 because their client address had max_connections_per_client, by listener",
            client_limited.clone(),
        );
        let h2_connections = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "sluice_http2_connections",
            "Client connections served over HTTP/2 (h2 by ALPN, or h2c), by listener",
            h2_connections.clone(),
        );
        let h2_streams = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "sluice_http2_streams",
            "Requests (streams) received over HTTP/2, WebSockets by extended CONNECT included, by listener",
            h2_streams.clone(),
        );
        let h2_websockets = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "sluice_http2_websockets",
            "WebSockets open over HTTP/2 (RFC 8441 extended CONNECT), by listener; they count in sluice_connections like any other",
            h2_websockets.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "sluice_config_generation",
            "The config generation in use: 1 at start, one more per applied reload",
            config_generation.clone(),
        );
        registry.register_collector(Box::new(LiveCollector(live)));
        let acme_orders = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "sluice_acme_orders",
            "Certificate orders placed with an ACME CA, by result",
            acme_orders.clone(),
        );
        let tls = TlsListeners::default();
        registry.register_collector(Box::new(tls.clone()));
        let access_log = Arc::<crate::access_log::Counts>::default();
        registry.register_collector(Box::new(AccessCollector(access_log.clone())));
        if let Some(cluster) = cluster {
            registry.register_collector(Box::new(ClusterCollector(cluster)));
        }
        Self {
            access_log,
            registry,
            accepted,
            rejected,
            handshake_errors,
            proxy_rejected,
            client_limited,
            h2_connections,
            h2_streams,
            h2_websockets,
            connect_seconds,
            config_generation,
            tls,
            acme_orders,
        }
    }

    /// The counters of ACME orders.
    pub fn acme_orders(&self) -> crate::acme::OrderCounters {
        // One statement each: the family's read guard must be gone before
        // the next entry is created (a write lock).
        let ok = self.acme_orders.get_or_create(&[("result", "ok")]).clone();
        let failed = self
            .acme_orders
            .get_or_create(&[("result", "failed")])
            .clone();
        crate::acme::OrderCounters { ok, failed }
    }

    /// The TLS listeners whose certificates are exported (after each
    /// start or reload).
    pub fn set_tls_listeners(&self, listeners: Vec<(String, Tls)>) {
        self.tls.0.store(Arc::new(listeners));
    }

    /// The accepted-connections counter of `listener`, for its accept loop.
    pub fn accepted(&self, listener: &str) -> Counter {
        self.accepted
            .get_or_create(&[("listener", listener.to_string())])
            .clone()
    }

    /// The failed-TLS-handshake counter of `listener`.
    pub fn tls_handshake_errors(&self, listener: &str) -> Counter {
        self.handshake_errors
            .get_or_create(&[("listener", listener.to_string())])
            .clone()
    }

    /// The PROXY-header-rejected counter of `listener`.
    pub fn proxy_rejected(&self, listener: &str) -> Counter {
        self.proxy_rejected
            .get_or_create(&[("listener", listener.to_string())])
            .clone()
    }

    /// The per-client-limit counter of `listener`.
    pub fn client_limited(&self, listener: &str) -> Counter {
        self.client_limited
            .get_or_create(&[("listener", listener.to_string())])
            .clone()
    }

    /// The HTTP/2 connection and stream counters of `listener`, and its
    /// gauge of WebSockets over HTTP/2.
    pub fn http2(&self, listener: &str) -> (Counter, Counter, Gauge) {
        let labels = [("listener", listener.to_string())];
        let connections = self.h2_connections.get_or_create(&labels).clone();
        let streams = self.h2_streams.get_or_create(&labels).clone();
        let websockets = self.h2_websockets.get_or_create(&labels).clone();
        (connections, streams, websockets)
    }

    /// The admission-rejected counter of `pool`.
    pub fn admission_rejected(&self, pool: &str) -> Counter {
        self.rejected
            .get_or_create(&[("pool", pool.to_string())])
            .clone()
    }

    /// All metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the registry's counters at scrape time.
#[derive(Debug)]
struct LiveCollector(Arc<Registry>);

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pools = self.0.pools();
        // Retiring backends too, so counters do not step back after a
        // reload removed one; but not one whose name a current backend of
        // its pool has again (moved to a new address): one series per name.
        let listed: Vec<(&str, Arc<crate::registry::Backend>)> = pools
            .iter()
            .flat_map(|p| {
                let retiring = p
                    .retiring()
                    .into_iter()
                    .filter(|r| !p.backends.iter().any(|b| b.name == r.name));
                p.backends
                    .iter()
                    .cloned()
                    .chain(retiring)
                    .map(move |b| (p.name.as_str(), b))
                    .collect::<Vec<_>>()
            })
            .collect();
        let backends = || listed.iter().map(|(p, b)| (*p, b));
        {
            let mut m = encoder.encode_descriptor(
                "sluice_connections",
                "Live connections per backend: WebSockets and in-flight HTTP requests",
                None,
                MetricType::Gauge,
            )?;
            for (pool, b) in backends() {
                for (kind, n) in [("ws", b.ws_count()), ("http", b.http_count())] {
                    let labels = [("pool", pool), ("backend", b.name.as_str()), ("kind", kind)];
                    ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        for (name, help, pick_bytes) in [
            (
                "sluice_ws_messages",
                "WebSocket messages proxied, by direction",
                false,
            ),
            (
                "sluice_bytes",
                "WebSocket bytes proxied, by direction",
                true,
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (pool, b) in backends() {
                for (direction, traffic) in [("up", &b.up), ("down", &b.down)] {
                    let value = if pick_bytes {
                        &traffic.bytes
                    } else {
                        &traffic.messages
                    };
                    let labels = [
                        ("pool", pool),
                        ("backend", b.name.as_str()),
                        ("direction", direction),
                    ];
                    ConstCounter::new(value.load(std::sync::atomic::Ordering::Relaxed))
                        .encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "sluice_backend_up",
                "1 when the backend is healthy (active check and passive ejection), else 0",
                None,
                MetricType::Gauge,
            )?;
            for (pool, b) in backends() {
                let labels = [("pool", pool), ("backend", b.name.as_str())];
                let up = i64::from(b.is_healthy());
                ConstGauge::new(up).encode(m.encode_family(&labels)?)?;
            }
        }
        type PerPool = fn(&crate::registry::PoolStats) -> &std::sync::atomic::AtomicU64;
        let per_pool: [(&str, &str, PerPool); 2] = [
            (
                "sluice_sticky_repins",
                "Sticky clients sent to a new backend because theirs could not take them",
                |s| &s.sticky_repins,
            ),
            (
                "sluice_sticky_moved",
                "Sticky clients placed afresh because sluice closed their WebSocket (rebalance, drain)",
                |s| &s.sticky_moved,
            ),
        ];
        for (name, help, counter) in per_pool {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for pool in pools.iter() {
                let labels = [("pool", pool.name.as_str())];
                ConstCounter::new(counter(&pool.stats).load(std::sync::atomic::Ordering::Relaxed))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        type PerBackend = fn(&crate::registry::Backend) -> &std::sync::atomic::AtomicU64;
        let per_backend: [(&str, &str, PerBackend); 4] = [
            (
                "sluice_drain_closed",
                "WebSockets asked to close by a drain",
                |b| &b.drain_closed,
            ),
            (
                "sluice_rebalance_shed",
                "WebSockets closed by the rebalancer",
                |b| &b.rebalance_shed,
            ),
            (
                "sluice_ws_messages_cut",
                "WebSockets cut because a message outlived max_message_wait during a close",
                |b| &b.messages_cut,
            ),
            (
                "sluice_ws_client_timeouts",
                "WebSockets closed because the client did not answer sluice's Ping (ws_ping_interval)",
                |b| &b.client_timeouts,
            ),
        ];
        for (name, help, counter) in per_backend {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (pool, b) in backends() {
                let labels = [("pool", pool), ("backend", b.name.as_str())];
                let value = counter(b);
                ConstCounter::new(value.load(std::sync::atomic::Ordering::Relaxed))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
