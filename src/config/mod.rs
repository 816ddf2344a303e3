//! Configuration: the TOML schema, its defaults and its validation.
//!
//! Owns turning a file into a [`Config`] whose fields have their final types
//! (socket addresses, durations, pool indices). Nothing outside this module
//! sees raw TOML. Errors name the file, line, section and key:
//! `sluice.toml:14: pool "app": unknown key "algoritm"`.

mod reader;

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::pem::CertSource;
pub use reader::MAX_DURATION;
use reader::{Source, Table, Value};

use crate::error_chain::chain;

/// The shortest timeout a key accepts.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
    /// The admin API; `None` when `[admin] enabled = false`.
    pub admin: Option<AdminConfig>,
    /// How long SIGTERM waits for connections to close before dropping them.
    pub shutdown_timeout: Duration,
    /// Runtime worker threads; 0 means one per core.
    pub worker_threads: usize,
}

/// One listening socket and the pool it serves.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// Index into [`Config::pools`].
    pub pool: usize,
    /// Client connections served at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// Add X-Forwarded-For/-Proto and Forwarded to requests.
    pub forwarded_headers: bool,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// TLS termination, when configured.
    pub tls: Option<TlsSettings>,
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
}

/// The admin API listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Bearer token from `token_file`; `None`: generated and printed at start.
    pub token: Option<String>,
}

impl AdminConfig {
    pub const DEFAULT_BIND: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9901);
}

/// How a backend's WebSockets are closed when it is drained.
#[derive(Debug, Clone, Copy)]
pub struct DrainConfig {
    /// Closes are spread evenly over this window.
    pub window: Duration,
    /// Close code sent to both sides.
    pub close_code: u16,
    /// Time allowed for the close handshake after sluice sends a Close frame.
    pub close_timeout: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(120),
            close_code: 1012,
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// Automatic rebalancing of long-lived connections.
#[derive(Debug, Clone, Copy)]
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
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone, Copy)]
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
#[derive(Debug, Clone, Copy)]
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
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
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
    /// How long an idle upstream HTTP connection is kept for reuse.
    pub keepalive_timeout: Duration,
    /// Idle upstream HTTP connections kept per backend.
    pub keepalive_max_idle: usize,
    pub backends: Vec<BackendConfig>,
}

/// One application server.
#[derive(Debug, Clone)]
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
            keepalive_timeout: Duration::from_secs(60),
            keepalive_max_idle: 32,
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
            tls: None,
        }
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Validates config `text`; `path` is used in messages only.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let src = Source { path, text };
    let doc = toml::de::DeTable::parse(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        src.error(&span, "", e.message().trim().to_string())
    })?;
    let mut root = Table::root(src, doc);

    let shutdown_timeout = root.duration(
        "shutdown_timeout",
        Config::DEFAULT_SHUTDOWN_TIMEOUT,
        Duration::ZERO,
    )?;
    let admin = read_admin(&mut root, path)?;
    let worker_threads = root.integer("worker_threads", 0, 0, 1024)? as usize;

    let mut pools = Vec::new();
    let mut pool_names = HashSet::new();
    for table in root.tables("pool")? {
        let pool = read_pool(table)?;
        pools.push(pool);
    }
    for (pool, span) in &pools {
        if !pool_names.insert(pool.name.clone()) {
            return Err(src.error(span, "", format!("pool \"{}\" is defined twice", pool.name)));
        }
    }
    let mut listeners = Vec::new();
    for (i, mut t) in root.tables("listener")?.into_iter().enumerate() {
        let name = match t.string("name")? {
            Some(v) => {
                check_name(&t, "listener", &v)?;
                v.value
            }
            None => format!("listener{}", i + 1),
        };
        t.set_context(format!("listener \"{name}\""));
        let bind = t.required_string("bind")?;
        let bind = resolve(&bind.value).map_err(|m| t.error_at(&bind.span, "bind", m))?;
        let pool_name = t.required_string("pool")?;
        let pool = pools
            .iter()
            .position(|(p, _)| p.name == pool_name.value)
            .ok_or_else(|| {
                t.error_at(
                    &pool_name.span,
                    "pool",
                    format!("no pool named \"{}\"", pool_name.value),
                )
            })?;
        let defaults = ListenerConfig::new(&name, bind, pool);
        let listener = ListenerConfig {
            max_connections: t.integer(
                "max_connections",
                defaults.max_connections as u64,
                1,
                10_000_000,
            )? as usize,
            forwarded_headers: t.boolean("forwarded_headers", defaults.forwarded_headers)?,
            header_read_timeout: t.duration(
                "header_read_timeout",
                defaults.header_read_timeout,
                MIN_TIMEOUT,
            )?,
            tls: read_tls(&mut t)?,
            ..defaults
        };
        if listeners
            .iter()
            .any(|l: &ListenerConfig| l.name == listener.name)
        {
            return Err(t.error_here(format!("listener \"{name}\" is defined twice")));
        }
        t.finish()?;
        listeners.push(listener);
    }
    if pools.is_empty() {
        return Err(root.error_here("no [[pool]] is defined: at least one is needed".into()));
    }
    if listeners.is_empty() {
        return Err(root.error_here("no [[listener]] is defined: at least one is needed".into()));
    }
    root.finish()?;
    Ok(Config {
        listeners,
        admin,
        pools: pools.into_iter().map(|(p, _)| p).collect(),
        shutdown_timeout,
        worker_threads,
    })
}

fn read_pool(mut t: Table<'_>) -> Result<(PoolConfig, std::ops::Range<usize>), ConfigError> {
    let name = t.required_string("name")?;
    check_name(&t, "pool", &name)?;
    t.set_context(format!("pool \"{}\"", name.value));
    let defaults = PoolConfig::new(&name.value, Vec::new());
    let key = t.string("key")?;
    let algorithm = match t.string("algorithm")? {
        None => defaults.algorithm.clone(),
        Some(v) => match v.value.as_str() {
            "least_conn" => Algorithm::LeastConn,
            "round_robin" => Algorithm::RoundRobin,
            "p2c" => Algorithm::P2c,
            "hash" => {
                let Some(key) = &key else {
                    return Err(t.error_at(
                        &v.span,
                        "algorithm",
                        "\"hash\" needs a key, e.g. key = \"header:X-User\"".into(),
                    ));
                };
                Algorithm::Hash(
                    parse_hash_key(&key.value).map_err(|m| t.error_at(&key.span, "key", m))?,
                )
            }
            other => {
                return Err(t.error_at(
                    &v.span,
                    "algorithm",
                    format!("unknown algorithm \"{other}\"; expected \"least_conn\", \"round_robin\", \"p2c\" or \"hash\""),
                ));
            }
        },
    };
    if let Some(key) = &key
        && !matches!(algorithm, Algorithm::Hash(_))
    {
        return Err(t.error_at(
            &key.span,
            "key",
            "only used with algorithm = \"hash\"".into(),
        ));
    }
    let sticky = read_sticky(&mut t)?;
    let mut backends: Vec<BackendConfig> = Vec::new();
    for mut b in t.tables("backend")? {
        let bname = b.required_string("name")?;
        check_name(&b, "backend", &bname)?;
        b.set_context(format!("{} backend \"{}\"", t.context(), bname.value));
        let address = b.required_string("address")?;
        let address =
            resolve(&address.value).map_err(|m| b.error_at(&address.span, "address", m))?;
        let weight = b.integer("weight", 1, 1, 10_000)? as u32;
        let tls = read_backend_tls(&mut b)?;
        if backends.iter().any(|x| x.name == bname.value) {
            return Err(b.error_at(
                &bname.span,
                "name",
                format!("backend \"{}\" is defined twice", bname.value),
            ));
        }
        b.finish()?;
        backends.push(BackendConfig {
            name: bname.value,
            address,
            weight,
            tls,
        });
    }
    if backends.is_empty() {
        return Err(t.error_here("no [[pool.backend]]: a pool needs at least one backend".into()));
    }
    let pool = PoolConfig {
        algorithm,
        connect_timeout: t.duration("connect_timeout", defaults.connect_timeout, MIN_TIMEOUT)?,
        response_timeout: t.duration("response_timeout", defaults.response_timeout, MIN_TIMEOUT)?,
        retries: t.integer("retries", defaults.retries as u64, 0, 100)? as usize,
        drain: read_drain(&mut t)?,
        rebalance: read_rebalance(&mut t)?,
        health: read_health(&mut t)?,
        passive: read_passive(&mut t)?,
        slow_start: t.duration("slow_start", defaults.slow_start, Duration::ZERO)?,
        max_connections_per_backend: t.integer("max_connections_per_backend", 0, 0, 10_000_000)?
            as usize,
        admission: read_admission(&mut t)?,
        sticky,
        keepalive_timeout: t.duration(
            "keepalive_timeout",
            defaults.keepalive_timeout,
            Duration::ZERO,
        )?,
        keepalive_max_idle: t.integer(
            "keepalive_max_idle",
            defaults.keepalive_max_idle as u64,
            0,
            100_000,
        )? as usize,
        backends,
        ..defaults
    };
    t.finish()?;
    Ok((pool, name.span))
}

fn read_admin(
    root: &mut Table<'_>,
    config_path: &Path,
) -> Result<Option<AdminConfig>, ConfigError> {
    let Some(mut t) = root.table("admin", "admin".into())? else {
        return Ok(Some(AdminConfig {
            bind: AdminConfig::DEFAULT_BIND,
            token: None,
        }));
    };
    let enabled = t.boolean("enabled", true)?;
    let bind = match t.string("bind")? {
        None => (AdminConfig::DEFAULT_BIND, None),
        Some(v) => (
            resolve(&v.value).map_err(|m| t.error_at(&v.span, "bind", m))?,
            Some(v.span),
        ),
    };
    let token = match t.string("token_file")? {
        None => None,
        Some(v) => {
            // Relative to the config file's folder.
            let file = config_path
                .parent()
                .unwrap_or(Path::new("."))
                .join(&v.value);
            let text = std::fs::read_to_string(&file).map_err(|e| {
                t.error_at(
                    &v.span,
                    "token_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(t.error_at(
                    &v.span,
                    "token_file",
                    format!("{} is empty", file.display()),
                ));
            }
            Some(token)
        }
    };
    if enabled && token.is_none() && !bind.0.ip().is_loopback() {
        let span = bind.1.unwrap_or(0..0);
        return Err(t.error_at(
            &span,
            "bind",
            format!(
                "admin on non-loopback address {} needs a token_file",
                bind.0
            ),
        ));
    }
    t.finish()?;
    Ok(enabled.then_some(AdminConfig {
        bind: bind.0,
        token,
    }))
}

fn read_drain(pool: &mut Table<'_>) -> Result<DrainConfig, ConfigError> {
    let defaults = DrainConfig::default();
    let context = format!("{} drain", pool.context());
    let Some(mut t) = pool.table("drain", context)? else {
        return Ok(defaults);
    };
    let window = t.duration("window", defaults.window, Duration::ZERO)?;
    let close_code = t.integer("close_code", u64::from(defaults.close_code), 1000, 4999)? as u16;
    if matches!(close_code, 1004..=1006 | 1015) {
        return Err(t.error_here(format!(
            "close_code {close_code} is reserved and may not be sent (RFC 6455 §7.4.1)"
        )));
    }
    let close_timeout = t.duration("close_timeout", defaults.close_timeout, MIN_TIMEOUT)?;
    t.finish()?;
    Ok(DrainConfig {
        window,
        close_code,
        close_timeout,
    })
}

/// `tls = { cert, key, handshake_timeout }` with `[[listener.tls.sni]]`
/// entries; every certificate is loaded and checked now, so `sluice check`
/// reports an unreadable, expired or mismatched one with its file.
fn read_tls(listener: &mut Table<'_>) -> Result<Option<TlsSettings>, ConfigError> {
    let context = format!("{} tls", listener.context());
    let Some(mut t) = listener.table("tls", context)? else {
        return Ok(None);
    };
    fn source(t: &mut Table<'_>) -> Result<CertSource, ConfigError> {
        let cert = t.required_string("cert")?;
        let key = t.required_string("key")?;
        let source = CertSource::Files {
            cert: t.path_near_config(&cert.value),
            key: t.path_near_config(&key.value),
        };
        crate::pem::load_certified_key(&source)
            .map_err(|e| t.error_at(&cert.span, "cert", chain(&e).to_string()))?;
        Ok(source)
    }
    let default = source(&mut t)?;
    let handshake_timeout =
        t.duration("handshake_timeout", Duration::from_secs(10), MIN_TIMEOUT)?;
    let mut sni = Vec::new();
    for mut entry in t.tables("sni")? {
        let hosts = entry
            .strings("hosts")?
            .ok_or_else(|| entry.error_here("missing key \"hosts\"".into()))?;
        if hosts.value.is_empty()
            || hosts
                .value
                .iter()
                .any(|h| h.is_empty() || h.strip_prefix("*.").unwrap_or(h).contains('*'))
        {
            return Err(entry.error_at(
                &hosts.span,
                "hosts",
                "host names, or *.domain wildcards, are needed".into(),
            ));
        }
        let src = source(&mut entry)?;
        entry.finish()?;
        sni.push((hosts.value, src));
    }
    t.finish()?;
    Ok(Some(TlsSettings {
        default,
        sni,
        handshake_timeout,
    }))
}

/// `tls = { ca, server_name }` on a backend; the CA file is loaded now.
fn read_backend_tls(b: &mut Table<'_>) -> Result<Option<BackendTls>, ConfigError> {
    let context = format!("{} tls", b.context());
    let Some(mut t) = b.table("tls", context)? else {
        return Ok(None);
    };
    let ca = t.required_string("ca")?;
    let path = t.path_near_config(&ca.value);
    crate::pem::client_config(&path)
        .map_err(|e| t.error_at(&ca.span, "ca", chain(&e).to_string()))?;
    // Required: a default (the address' IP) would need an IP in the
    // backend's certificate and send no SNI, which is easy to get wrong.
    let name = t.required_string("server_name")?;
    if rustls::pki_types::ServerName::try_from(name.value.clone()).is_err() {
        return Err(t.error_at(
            &name.span,
            "server_name",
            format!("\"{}\" is not a host name", name.value),
        ));
    }
    let server_name = name.value;
    t.finish()?;
    Ok(Some(BackendTls {
        ca: path,
        server_name,
    }))
}

fn parse_hash_key(text: &str) -> Result<HashKey, String> {
    let bad = || {
        format!("\"{text}\": expected \"header:NAME\", \"cookie:NAME\", \"query:NAME\" or \"ip\"")
    };
    if text == "ip" {
        return Ok(HashKey::Ip);
    }
    let (kind, name) = text.split_once(':').ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    match kind {
        "header" => hyper::header::HeaderName::from_bytes(name.as_bytes())
            .map(|h| HashKey::Header(h.as_str().to_string()))
            .map_err(|_| format!("\"{name}\" is not a valid header name")),
        "cookie" => Ok(HashKey::Cookie(name.to_string())),
        "query" => Ok(HashKey::Query(name.to_string())),
        _ => Err(bad()),
    }
}

fn read_sticky(pool: &mut Table<'_>) -> Result<Option<StickyConfig>, ConfigError> {
    let context = format!("{} sticky", pool.context());
    let Some(mut t) = pool.table("sticky", context)? else {
        return Ok(None);
    };
    let d = StickyConfig::default();
    let cookie = t.string("cookie")?.map_or(d.cookie, |v| v.value);
    if cookie.is_empty()
        || !cookie
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(t.error_here(format!(
            "cookie name \"{cookie}\" may hold only letters, digits, _ - ."
        )));
    }
    let same_site = match t.string("same_site")? {
        None => d.same_site,
        Some(v) => match v.value.to_ascii_lowercase().as_str() {
            "lax" => SameSite::Lax,
            "strict" => SameSite::Strict,
            "none" => SameSite::None,
            other => {
                return Err(t.error_at(
                    &v.span,
                    "same_site",
                    format!("\"{other}\": expected \"lax\", \"strict\" or \"none\""),
                ));
            }
        },
    };
    let secure = t.boolean("secure", d.secure)?;
    let secret = match t.string("secret_file")? {
        None => None,
        Some(v) => {
            let file = t.path_near_config(&v.value);
            let text = std::fs::read(&file).map_err(|e| {
                t.error_at(
                    &v.span,
                    "secret_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            if text.trim_ascii().len() < 16 {
                return Err(t.error_at(
                    &v.span,
                    "secret_file",
                    format!("{} holds fewer than 16 bytes", file.display()),
                ));
            }
            Some(text.trim_ascii().to_vec())
        }
    };
    let cfg = StickyConfig {
        cookie,
        ttl: t.duration("ttl", d.ttl, Duration::from_secs(1))?,
        secure,
        http_only: t.boolean("http_only", d.http_only)?,
        same_site,
        secret,
    };
    if cfg.same_site == SameSite::None && !cfg.secure {
        return Err(t.error_here(
            "same_site = \"none\" needs secure = true (browsers drop it otherwise)".into(),
        ));
    }
    t.finish()?;
    Ok(Some(cfg))
}

fn read_health(pool: &mut Table<'_>) -> Result<Option<HealthConfig>, ConfigError> {
    let d = HealthConfig::default();
    let context = format!("{} health", pool.context());
    let Some(mut t) = pool.table("health", context)? else {
        return Ok(None);
    };
    let path = match t.string("path")? {
        Some(v)
            if !v.value.starts_with('/')
                || v.value.parse::<hyper::http::uri::PathAndQuery>().is_err() =>
        {
            return Err(t.error_at(
                &v.span,
                "path",
                format!("\"{}\" is not a request path such as /health", v.value),
            ));
        }
        v => v.map(|v| v.value),
    };
    let cfg = HealthConfig {
        path,
        interval: t.duration("interval", d.interval, MIN_TIMEOUT)?,
        timeout: t.duration("timeout", d.timeout, MIN_TIMEOUT)?,
        rise: t.integer("rise", u64::from(d.rise), 1, 1000)? as u32,
        fall: t.integer("fall", u64::from(d.fall), 1, 1000)? as u32,
        expect_status: match t.integer("expect_status", 0, 0, 599)? {
            0 => None,
            code if code >= 100 => Some(code as u16),
            code => return Err(t.error_here(format!("expect_status {code} is not an HTTP status"))),
        },
    };
    t.finish()?;
    Ok(Some(cfg))
}

fn read_passive(pool: &mut Table<'_>) -> Result<PassiveConfig, ConfigError> {
    let d = PassiveConfig::default();
    let context = format!("{} passive", pool.context());
    let Some(mut t) = pool.table("passive", context)? else {
        return Ok(d);
    };
    let cfg = PassiveConfig {
        consecutive_failures: t.integer(
            "consecutive_failures",
            u64::from(d.consecutive_failures),
            0,
            1000,
        )? as u32,
        ejection_time: t.duration("ejection_time", d.ejection_time, MIN_TIMEOUT)?,
    };
    t.finish()?;
    Ok(cfg)
}

fn read_admission(pool: &mut Table<'_>) -> Result<AdmissionConfig, ConfigError> {
    let d = AdmissionConfig::default();
    let context = format!("{} admission", pool.context());
    let Some(mut t) = pool.table("admission", context)? else {
        return Ok(d);
    };
    let connect_rate = t.number("connect_rate", d.connect_rate, 0.0, 1e9)?;
    let cfg = AdmissionConfig {
        connect_rate,
        // Without a burst, one connection at a time may go through.
        burst: t.number("burst", connect_rate.max(1.0), 1.0, 1e9)?,
        queue_timeout: t.duration("queue_timeout", d.queue_timeout, Duration::ZERO)?,
        queue_size: t.integer("queue_size", d.queue_size as u64, 0, 10_000_000)? as usize,
    };
    t.finish()?;
    Ok(cfg)
}

fn read_rebalance(pool: &mut Table<'_>) -> Result<RebalanceConfig, ConfigError> {
    let d = RebalanceConfig::default();
    let context = format!("{} rebalance", pool.context());
    let Some(mut t) = pool.table("rebalance", context)? else {
        return Ok(d);
    };
    let cfg = RebalanceConfig {
        enabled: t.boolean("enabled", d.enabled)?,
        interval: t.duration("interval", d.interval, Duration::from_millis(100))?,
        tolerance: t.number("tolerance", d.tolerance, 0.0, 10.0)?,
        min_excess: t.integer("min_excess", d.min_excess as u64, 0, 1_000_000)? as usize,
        max_shed_per_interval: t.integer(
            "max_shed_per_interval",
            d.max_shed_per_interval as u64,
            1,
            1_000_000,
        )? as usize,
    };
    t.finish()?;
    Ok(cfg)
}

/// Checks a pool, backend or listener name: it appears in URLs of the
/// admin API and in metric labels.
fn check_name(t: &Table<'_>, what: &str, name: &Value<String>) -> Result<(), ConfigError> {
    let ok = !name.value.is_empty()
        && name.value.len() <= 64
        && name
            .value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(t.error_at(
            &name.span,
            "name",
            format!(
                "{what} name \"{}\" may hold only letters, digits, . _ - (64 at most)",
                name.value
            ),
        ))
    }
}

/// Parses `host:port` (a literal address or a name resolved now).
fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("\"{text}\" resolves to no address")),
        Err(e) => Err(format!(
            "invalid address \"{text}\" ({e}); write host:port, e.g. \"127.0.0.1:4000\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, String> {
        parse(text, Path::new("sluice.toml")).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = r#"
[[listener]]
bind = "127.0.0.1:8080"
pool = "app"

[[pool]]
name = "app"

[[pool.backend]]
name = "app-1"
address = "127.0.0.1:4000"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = check(MINIMAL).expect("valid");
        assert_eq!(cfg.listeners[0].name, "listener1");
        assert_eq!(cfg.pools[0].algorithm, Algorithm::LeastConn);
        assert_eq!(cfg.pools[0].backends[0].weight, 1);
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    fn unknown_key_names_file_line_pool_and_key() {
        let text = MINIMAL.replace("name = \"app\"\n", "name = \"app\"\nalgoritm = \"x\"\n");
        assert_eq!(
            check(&text).unwrap_err(),
            "sluice.toml:8: pool \"app\": unknown key \"algoritm\""
        );
    }

    #[test]
    fn bad_values_are_reported_with_their_line() {
        let text = MINIMAL.replace("\"127.0.0.1:4000\"", "\"nowhere\"");
        let err = check(&text).unwrap_err();
        assert!(err.starts_with("sluice.toml:11: pool \"app\" backend \"app-1\": key \"address\": invalid address \"nowhere\""), "{err}");
        let text = MINIMAL.replace(
            "name = \"app\"\n",
            "name = \"app\"\nconnect_timeout = \"0s\"\n",
        );
        assert!(
            check(&text)
                .unwrap_err()
                .contains("key \"connect_timeout\": 0s is out of range 1ms..=30days"),
            "{}",
            check(&text).unwrap_err()
        );
        let text = MINIMAL.replace(
            "name = \"app\"\n",
            "name = \"app\"\ndrain = { close_timeout = \"295000000000y\" }\n",
        );
        assert!(
            check(&text).unwrap_err().contains(
                "pool \"app\" drain: key \"close_timeout\": 295000000000y is out of range"
            ),
            "{}",
            check(&text).unwrap_err()
        );
        let text = format!("shutdown_timeout = \"soon\"\n{MINIMAL}");
        assert!(
            check(&text)
                .unwrap_err()
                .starts_with("sluice.toml:1: key \"shutdown_timeout\": invalid duration")
        );
        let text = MINIMAL.replace("pool = \"app\"", "pool = \"api\"");
        assert_eq!(
            check(&text).unwrap_err(),
            "sluice.toml:4: listener \"listener1\": key \"pool\": no pool named \"api\""
        );
        let text = MINIMAL.replace("address", "weight = 0\naddress");
        assert!(check(&text).unwrap_err().starts_with(
            "sluice.toml:11: pool \"app\" backend \"app-1\": key \"weight\": 0 is out of range"
        ));
        let text = MINIMAL.replace("bind = \"127.0.0.1:8080\"", "bind = 8080");
        assert_eq!(
            check(&text).unwrap_err(),
            "sluice.toml:3: listener \"listener1\": key \"bind\": expected a string, found an integer"
        );
    }

    #[test]
    fn names_must_be_url_and_label_safe() {
        let text = MINIMAL.replace("name = \"app-1\"", "name = \"app 1/x\"");
        assert!(
            check(&text)
                .unwrap_err()
                .contains("backend name \"app 1/x\" may hold only"),
            "{}",
            check(&text).unwrap_err()
        );
        let text = MINIMAL.replace(
            "name = \"app\"\n",
            "name = \"app\"\nhealth = { path = \"/health check\" }\n",
        );
        assert!(check(&text).unwrap_err().contains("is not a request path"));
    }

    #[test]
    fn tls_certificates_are_checked_at_load() {
        let dir = std::env::temp_dir().join(format!("sluice-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).expect("rcgen");
        let b = rcgen::generate_simple_self_signed(vec!["b.test".to_string()]).expect("rcgen");
        std::fs::write(dir.join("a.pem"), a.cert.pem()).expect("write");
        std::fs::write(dir.join("a.key"), a.signing_key.serialize_pem()).expect("write");
        std::fs::write(dir.join("b.key"), b.signing_key.serialize_pem()).expect("write");
        let mut params =
            rcgen::CertificateParams::new(vec!["old.test".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let old_key = rcgen::KeyPair::generate().expect("key");
        std::fs::write(
            dir.join("old.pem"),
            params.self_signed(&old_key).expect("cert").pem(),
        )
        .expect("write");
        std::fs::write(dir.join("old.key"), old_key.serialize_pem()).expect("write");
        let path = dir.join("sluice.toml");
        let with = |cert: &str, key: &str| {
            MINIMAL.replace(
                "pool = \"app\"\n",
                &format!("pool = \"app\"\ntls = {{ cert = \"{cert}\", key = \"{key}\" }}\n"),
            )
        };
        let err = |text: String| parse(&text, &path).map(|_| ()).unwrap_err().to_string();
        assert!(parse(&with("a.pem", "a.key"), &path).is_ok());
        let e = err(with("a.pem", "b.key"));
        assert!(
            e.contains("key \"cert\"")
                && e.contains("b.key")
                && e.contains("does the key belong to"),
            "{e}"
        );
        let e = err(with("missing.pem", "a.key"));
        assert!(e.contains("missing.pem"), "{e}");
        let e = err(with("old.pem", "old.key"));
        assert!(e.contains("old.pem: certificate expired on"), "{e}");
        // TLS towards a backend needs its name.
        let backend_tls = MINIMAL.replace(
            "address = \"127.0.0.1:4000\"",
            "address = \"127.0.0.1:4000\"\ntls = { ca = \"a.pem\" }",
        );
        let e = err(backend_tls);
        assert!(
            e.contains("backend \"app-1\" tls: missing key \"server_name\""),
            "{e}"
        );
    }

    #[test]
    fn structure_errors() {
        assert!(check("").unwrap_err().contains("no [[pool]]"));
        assert!(
            check("[[pool]]\nname = \"a\"\n")
                .unwrap_err()
                .contains("pool \"a\": no [[pool.backend]]")
        );
        assert!(check("x = [").unwrap_err().starts_with("sluice.toml:1: "));
        let twice = format!(
            "{MINIMAL}\n[[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n"
        );
        assert!(
            check(&twice)
                .unwrap_err()
                .contains("pool \"app\" is defined twice")
        );
    }

    #[test]
    fn shipped_examples_are_valid() {
        for (name, text) in [
            (
                "examples/sluice.toml",
                include_str!("../../examples/sluice.toml"),
            ),
            (
                "examples/minimal.toml",
                include_str!("../../examples/minimal.toml"),
            ),
        ] {
            if let Err(e) = parse(text, Path::new(name)) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn sticky_hash_and_p2c_settings() {
        let with = |extra: &str| {
            MINIMAL.replace("name = \"app\"\n", &format!("name = \"app\"\n{extra}\n"))
        };
        let cfg = check(&with("algorithm = \"hash\"\nkey = \"header:X-User\"")).expect("valid");
        assert_eq!(
            cfg.pools[0].algorithm,
            Algorithm::Hash(HashKey::Header("x-user".into()))
        );
        let cfg = check(&with("algorithm = \"hash\"\nkey = \"ip\"")).expect("valid");
        assert_eq!(cfg.pools[0].algorithm, Algorithm::Hash(HashKey::Ip));
        assert_eq!(
            check(&with("algorithm = \"p2c\"")).expect("valid").pools[0].algorithm,
            Algorithm::P2c
        );
        assert!(
            check(&with("algorithm = \"hash\""))
                .unwrap_err()
                .contains("\"hash\" needs a key")
        );
        assert!(
            check(&with("key = \"ip\""))
                .unwrap_err()
                .contains("only used with algorithm = \"hash\"")
        );
        assert!(
            check(&with("algorithm = \"hash\"\nkey = \"body:x\""))
                .unwrap_err()
                .contains("expected \"header:NAME\"")
        );
        let cfg = check(&with(
            "sticky = { cookie = \"S\", ttl = \"30m\", secure = true, same_site = \"strict\" }",
        ))
        .expect("valid");
        let s = cfg.pools[0].sticky.clone().expect("sticky");
        assert_eq!(
            (s.cookie.as_str(), s.ttl, s.secure, s.http_only, s.same_site),
            ("S", Duration::from_secs(1800), true, true, SameSite::Strict)
        );
        assert!(
            check(&with("sticky = { same_site = \"none\" }"))
                .unwrap_err()
                .contains("needs secure = true")
        );
        assert!(
            check(&with("sticky = { cookie = \"a b\" }"))
                .unwrap_err()
                .contains("may hold only")
        );
    }

    #[test]
    fn rebalance_settings() {
        let text = MINIMAL.replace(
            "name = \"app\"\n",
            "name = \"app\"\nrebalance = { interval = \"500ms\", tolerance = 0.3, min_excess = 5, max_shed_per_interval = 20 }\n",
        );
        let r = check(&text).expect("valid").pools[0].rebalance;
        assert_eq!(
            (
                r.interval,
                r.tolerance,
                r.min_excess,
                r.max_shed_per_interval,
                r.enabled
            ),
            (Duration::from_millis(500), 0.3, 5, 20, true)
        );
        let text = MINIMAL.replace(
            "name = \"app\"\n",
            "name = \"app\"\nrebalance = { tolerance = \"lots\" }\n",
        );
        assert!(
            check(&text)
                .unwrap_err()
                .contains("pool \"app\" rebalance: key \"tolerance\": expected a number")
        );
        let text = MINIMAL.replace(
            "name = \"app\"\n",
            "name = \"app\"\nrebalance = { enabled = false, tolerance = 1 }\n",
        );
        assert!(!check(&text).expect("valid").pools[0].rebalance.enabled);
    }

    #[test]
    fn algorithms_and_weights() {
        let text = MINIMAL.replace(
            "name = \"app\"\n",
            "name = \"app\"\nalgorithm = \"round_robin\"\nretries = 0\n",
        );
        let cfg = check(&text).expect("valid");
        assert_eq!(cfg.pools[0].algorithm, Algorithm::RoundRobin);
        assert_eq!(cfg.pools[0].retries, 0);
        let text = MINIMAL.replace(
            "name = \"app\"\n",
            "name = \"app\"\nalgorithm = \"fastest\"\n",
        );
        assert!(
            check(&text)
                .unwrap_err()
                .contains("unknown algorithm \"fastest\"")
        );
    }
}
