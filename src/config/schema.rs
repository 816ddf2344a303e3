//! The validated configuration: plain data with final types (socket
//! addresses, durations, pool indices) and the defaults of every key.
//! Every layer may read it; only `config::load` builds it from a file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::pem::CertSource;
pub use crate::proxy_protocol::{Accept as ProxyAccept, Version as ProxyVersion};

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
    /// The admin API; `None` when `[admin] enabled = false`.
    pub admin: Option<AdminConfig>,
    /// How long SIGTERM waits for connections to close before dropping them.
    pub shutdown_timeout: Duration,
    /// How long a binary upgrade waits for the new process to be ready.
    pub upgrade_timeout: Duration,
    /// Runtime worker threads; 0 means one per core.
    pub worker_threads: usize,
    /// The diagnostic log's format and the access log.
    pub log: LogConfig,
    /// Several instances sharing one view through Redis; `None`: a
    /// process on its own.
    pub cluster: Option<ClusterConfig>,
    /// The file it was read from, which a reload reads again; `None` for
    /// a config built in code (the demo).
    pub path: Option<PathBuf>,
}

/// One listening socket and the pool it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// Index into [`Config::pools`].
    pub pool: usize,
    /// Client connections served at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// Live connections per client address (0: no limit); past it every
    /// request is answered 429.
    pub max_connections_per_client: usize,
    /// Add X-Forwarded-For/-Proto and Forwarded to requests.
    pub forwarded_headers: bool,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes; past it
    /// the answer is 431.
    pub max_header_size: usize,
    /// Longest request target, in bytes; past it the answer is 414.
    pub max_uri_length: usize,
    /// A request body that stalls this long ends its request (408).
    pub body_timeout: Duration,
    /// TCP keepalive towards clients; `None`: off.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Ping a client that has sent nothing for this long; `None`: off.
    pub ws_ping_interval: Option<Duration>,
    /// A client that sends nothing this long after sluice's Ping is gone.
    pub ws_ping_timeout: Duration,
    /// TLS termination, when configured.
    pub tls: Option<TlsSettings>,
    /// The PROXY protocol from an L4 balancer in front, when configured.
    pub proxy_protocol: Option<ProxyProtocolIn>,
    /// HTTP/2 towards clients (see [`Http2Settings`]).
    pub http2: Http2Settings,
}

/// HTTP/2 towards clients: by ALPN on a TLS listener, with prior
/// knowledge (h2c) on a plain one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    /// `http2`; `None`: on for TLS listeners, off for plain ones.
    pub enabled: Option<bool>,
    /// `websocket_over_http2`: advertise `SETTINGS_ENABLE_CONNECT_PROTOCOL`
    /// and accept WebSockets by extended CONNECT (RFC 8441).
    pub websockets: bool,
    /// Streams a client may have open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Bytes a client may send on one stream before sluice has read them.
    pub stream_window: u32,
    /// Bytes a client may send on all streams of a connection before sluice
    /// has read them; larger than `stream_window`, so that a stream whose
    /// backend reads slowly does not hold up the others.
    pub connection_window: u32,
    /// A connection with no new stream for this long gets GOAWAY (its
    /// streams in flight finish).
    pub idle_timeout: Duration,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Self {
            enabled: None,
            websockets: false,
            max_concurrent_streams: 100,
            stream_window: 256 * 1024,
            connection_window: 4 * 1024 * 1024,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// TCP keepalive probes: after `idle` of silence, every `interval`; `count`
/// unanswered end the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl Default for TcpKeepalive {
    /// A vanished peer is found after 60 s + 6 × 10 s = 2 minutes.
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 6,
        }
    }
}

/// Which PROXY headers a listener reads, and from whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolIn {
    pub accept: ProxyAccept,
    /// Peers allowed to send it; a connection from anywhere else is closed.
    pub from: Vec<ipnet::IpNet>,
}

impl ProxyProtocolIn {
    /// True when `peer` may send a PROXY header.
    pub fn allows(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.from.iter().any(|net| net.contains(&peer))
    }
}

/// A listener's TLS settings (loaded and served by `tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// For clients without SNI, or whose name no SNI entry covers.
    pub default: CertSource,
    /// Host names (exact, or `*.example.com`) and their certificates.
    pub sni: Vec<(Vec<String>, CertSource)>,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Certificates sluice gets from an ACME CA; each writes the files of
    /// its `CertSource::Managed` (the default's or an SNI entry's).
    pub acme: Vec<AcmeSettings>,
}

/// One certificate from an ACME CA (`acme = { ... }` in a listener's
/// `tls` or in an SNI entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// The names on the certificate (the first names its cache files).
    pub domains: Vec<String>,
    /// e.g. `mailto:ops@example.com`; may be empty.
    pub contact: Vec<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// A CA bundle to trust the directory with (a private CA such as
    /// Pebble or step-ca); `None`: the system's roots.
    pub directory_ca: Option<PathBuf>,
    /// Where the account key and the certificate are kept.
    pub cache: PathBuf,
    pub challenge: AcmeChallenge,
    /// Renew this long before the certificate expires; `None`: when a
    /// third of its lifetime is left.
    pub renew_before: Option<Duration>,
    /// Served for the domains until the CA's certificate is there
    /// (`CertSource::Files`); `None`: their handshakes fail until then.
    pub fallback: Option<CertSource>,
}

impl AcmeSettings {
    /// The files its certificate and key are kept in.
    pub fn files(&self) -> CertSource {
        let stem = self
            .domains
            .first()
            .map(|d| d.replace('*', "_"))
            .unwrap_or_default();
        CertSource::Managed {
            cert: self.cache.join(format!("{stem}.pem")),
            key: self.cache.join(format!("{stem}.key")),
            fallback: self.fallback.clone().map(Box::new),
        }
    }
}

/// How sluice proves to the CA that it serves a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// A TLS handshake with ALPN `acme-tls/1` on this listener (RFC 8737).
    TlsAlpn01,
    /// `GET /.well-known/acme-challenge/{token}` on a plain listener
    /// (RFC 8555 §8.3), answered by sluice itself.
    Http01,
}

/// `[cluster]`: the Redis that several instances share their view through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` URL.
    pub redis: String,
    /// From `password_file`, used instead of one in the URL.
    pub password: Option<String>,
    /// This instance's name, unique in the cluster.
    pub instance: String,
    /// How often this instance publishes its counts and reads the others'.
    pub publish_interval: Duration,
}

impl ClusterConfig {
    pub const DEFAULT_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

    /// How long published counts count: three publish intervals, so one
    /// late publication does not drop an instance out.
    pub fn ttl(&self) -> Duration {
        self.publish_interval * 3
    }
}

/// `[log]`: the format of both logs, and where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub access: AccessTarget,
    /// Access log lines waiting to be written at most; past it lines are
    /// dropped (and counted), so a slow disk never slows the proxy.
    pub access_queue: usize,
}

impl LogConfig {
    pub const DEFAULT_ACCESS_QUEUE: usize = 16_384;
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            access: AccessTarget::Off,
            access_queue: Self::DEFAULT_ACCESS_QUEUE,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One line of `key=value` fields per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessTarget {
    #[default]
    Off,
    Stdout,
    Stderr,
    /// A file, appended to and reopened on SIGUSR1.
    File(PathBuf),
}

/// The admin API listener.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Bearer token from `token_file`; `None`: generated and printed at start.
    pub token: Option<String>,
    /// Time a request head may take; an idle connection is closed then too.
    pub header_read_timeout: Duration,
    /// Admin connections at once; more wait in the accept backlog.
    pub max_connections: usize,
}

impl AdminConfig {
    pub const DEFAULT_BIND: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9901);

    /// The admin API on `bind` with `token`, the rest at its defaults.
    pub fn new(bind: SocketAddr, token: Option<String>) -> Self {
        Self {
            bind,
            token,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// How a backend's WebSockets are closed when it is drained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrainConfig {
    /// Closes are spread evenly over this window.
    pub window: Duration,
    /// Close code sent to both sides.
    pub close_code: u16,
    /// Time allowed for the close handshake after sluice sends a Close frame.
    pub close_timeout: Duration,
    /// Longest a message in flight may hold a close back before the
    /// connection is cut.
    pub max_message_wait: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(120),
            close_code: 1012,
            close_timeout: Duration::from_secs(5),
            max_message_wait: Duration::from_secs(30),
        }
    }
}

/// Automatic rebalancing of long-lived connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebalanceConfig {
    pub enabled: bool,
    /// How often the pool is looked at.
    pub interval: Duration,
    /// A backend is an outlier above `share × (1 + tolerance)`...
    pub tolerance: f64,
    /// ...and more than `min_excess` connections over its share.
    pub min_excess: usize,
    /// Connections one backend may shed in one interval.
    pub max_shed_per_interval: usize,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(15),
            tolerance: 0.2,
            min_excess: 10,
            max_shed_per_interval: 50,
        }
    }
}

/// Active health checks.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// HTTP path to GET; `None`: a TCP connect is the check.
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Successes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
    /// Status a healthy backend answers; `None`: any 2xx or 3xx.
    pub expect_status: Option<u16>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            expect_status: None,
        }
    }
}

/// Passive health: what the data path sees counts against a backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassiveConfig {
    /// Connect failures, resets before an answer, 5xx to an upgrade, in a
    /// row, that eject a backend; 0 turns passive health off.
    pub consecutive_failures: u32,
    /// How long an ejected backend stays out.
    pub ejection_time: Duration,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            ejection_time: Duration::from_secs(10),
        }
    }
}

/// Reconnect-storm admission: new upstream connections per backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// New connections per second per backend; 0: no rate limit.
    pub connect_rate: f64,
    /// Connections a backend may take at once above the rate.
    pub burst: f64,
    /// How long a new connection may wait for its turn (rate or a full
    /// backend) before it gets 503.
    pub queue_timeout: Duration,
    /// Connections that may wait at once per pool; more get 503 at once.
    pub queue_size: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            connect_rate: 0.0,
            burst: 0.0,
            queue_timeout: Duration::from_secs(2),
            queue_size: 10_000,
        }
    }
}

/// How a pool picks a backend for a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Algorithm {
    /// Fewest live WebSockets + in-flight HTTP requests, relative to weight.
    LeastConn,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Power of two random choices on live connection counts.
    P2c,
    /// Consistent hash of a request key; least_conn when the key is missing.
    Hash(HashKey),
}

/// What `algorithm = "hash"` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header (lower-case name).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A query-string parameter.
    Query(String),
    /// The client's IP address.
    Ip,
}

/// `SameSite` of the sticky cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

/// Sticky sessions: a cookie pins a client to a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct StickyConfig {
    pub cookie: String,
    pub ttl: Duration,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
    /// Key that signs cookie values; `None`: random at start (pins then do
    /// not survive a restart, nor hold across several sluice instances).
    pub secret: Option<Vec<u8>>,
}

impl Default for StickyConfig {
    fn default() -> Self {
        Self {
            cookie: "SLUICE_AFFINITY".into(),
            ttl: Duration::from_secs(3600),
            secure: false,
            http_only: true,
            same_site: SameSite::Lax,
            secret: None,
        }
    }
}

impl Algorithm {
    /// The name used in the config and the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::LeastConn => "least_conn",
            Self::RoundRobin => "round_robin",
            Self::P2c => "p2c",
            Self::Hash(_) => "hash",
        }
    }
}

/// A group of interchangeable backends.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    /// Time allowed to open a TCP connection to a backend.
    pub connect_timeout: Duration,
    /// Time a backend has to start its answer (response head or 101).
    pub response_timeout: Duration,
    /// Further backends tried when connecting fails before anything was sent.
    pub retries: usize,
    /// Draining: window, close code, close handshake timeout.
    pub drain: DrainConfig,
    /// Automatic rebalancing.
    pub rebalance: RebalanceConfig,
    /// Active health checks, when configured.
    pub health: Option<HealthConfig>,
    /// Passive health (outlier ejection).
    pub passive: PassiveConfig,
    /// A returning backend's weight ramps up over this time; zero: off.
    pub slow_start: Duration,
    /// Live connections per backend above which it is skipped; 0: no limit.
    pub max_connections_per_backend: usize,
    /// Admission of new upstream connections.
    pub admission: AdmissionConfig,
    /// Sticky sessions, when configured.
    pub sticky: Option<StickyConfig>,
    /// With `algorithm = "hash"`: a backend above this many times its
    /// weighted share of the pool's connections is skipped for new keys
    /// (bounded-load consistent hashing); `None`: strict hashing.
    pub hash_balance_factor: Option<f64>,
    /// The PROXY header written on every new connection to a backend.
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// How long an idle upstream HTTP connection is kept for reuse.
    pub keepalive_timeout: Duration,
    /// Idle upstream HTTP connections kept per backend.
    pub keepalive_max_idle: usize,
    /// TCP keepalive towards backends; `None`: off.
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub backends: Vec<BackendConfig>,
}

/// One application server.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    /// TLS towards this backend, for backends that only speak TLS.
    pub tls: Option<BackendTls>,
}

/// TLS towards a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// PEM file of the certificate authorities to trust.
    pub ca: PathBuf,
    /// Name to send (SNI) and to find in the backend's certificate.
    pub server_name: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {}{message}", path.display(), if context.is_empty() { String::new() } else { format!("{context}: ") })]
    Invalid {
        path: PathBuf,
        line: usize,
        /// The section: `pool "app"`, `listener "public"`; empty at top level.
        context: String,
        message: String,
    },
}

impl Config {
    /// Defaults that do not depend on the file.
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);
}

impl PoolConfig {
    /// A pool with every setting at its default.
    pub fn new(name: &str, backends: Vec<BackendConfig>) -> Self {
        Self {
            name: name.to_string(),
            algorithm: Algorithm::LeastConn,
            connect_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(60),
            retries: 2,
            drain: DrainConfig::default(),
            rebalance: RebalanceConfig::default(),
            health: None,
            passive: PassiveConfig::default(),
            slow_start: Duration::ZERO,
            max_connections_per_backend: 0,
            admission: AdmissionConfig::default(),
            sticky: None,
            hash_balance_factor: None,
            keepalive_timeout: Duration::from_secs(60),
            keepalive_max_idle: 32,
            tcp_keepalive: Some(TcpKeepalive::default()),
            send_proxy_protocol: None,
            backends,
        }
    }
}

impl ListenerConfig {
    /// A listener with every setting at its default.
    pub fn new(name: &str, bind: SocketAddr, pool: usize) -> Self {
        Self {
            name: name.to_string(),
            bind,
            pool,
            max_connections: 8192,
            forwarded_headers: true,
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 32 * 1024,
            max_uri_length: 8 * 1024,
            body_timeout: Duration::from_secs(60),
            max_connections_per_client: 0,
            tcp_keepalive: Some(TcpKeepalive::default()),
            ws_ping_interval: None,
            ws_ping_timeout: Duration::from_secs(10),
            tls: None,
            proxy_protocol: None,
            http2: Http2Settings::default(),
        }
    }

    /// Whether clients may speak HTTP/2 to this listener.
    pub fn http2(&self) -> bool {
        self.http2.enabled.unwrap_or(self.tls.is_some())
    }
}
