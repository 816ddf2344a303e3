//! Reading a config file into a [`Config`]: every section and key
//! validated, every error naming file, line, section and key.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use super::reader::{Source, Table, Value};
use super::*;
use crate::error_chain::chain;

/// The shortest timeout a key accepts.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

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
    let upgrade_timeout = root.duration(
        "upgrade_timeout",
        Config::DEFAULT_UPGRADE_TIMEOUT,
        MIN_TIMEOUT,
    )?;
    let admin = read_admin(&mut root, path)?;
    let log = read_log(&mut root)?;
    let cluster = read_cluster(&mut root)?;
    let worker_threads = root.integer("worker_threads", 0, 0, 1024)? as usize;

    let mut pools = Vec::new();
    let mut pool_names = HashSet::new();
    for table in root.tables("pool")? {
        let pool = read_pool(table)?;
        pools.push(pool);
    }
    for (pool, span) in &pools {
        if cluster.is_some() && pool.sticky.as_ref().is_some_and(|s| s.secret.is_none()) {
            return Err(src.error(
                span,
                &format!("pool \"{}\" sticky", pool.name),
                "cluster mode needs secret_file: every instance must sign pins with the same key"
                    .into(),
            ));
        }
        if !pool_names.insert(pool.name.clone()) {
            return Err(src.error(span, "", format!("pool \"{}\" is defined twice", pool.name)));
        }
    }
    let mut listeners = Vec::new();
    // The first `challenge = "http-01"`, refused unless a plain listener
    // is there to answer it.
    let mut http01 = None;
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
            max_connections_per_client: t.integer("max_connections_per_client", 0, 0, 10_000_000)?
                as usize,
            forwarded_headers: t.boolean("forwarded_headers", defaults.forwarded_headers)?,
            header_read_timeout: t.duration(
                "header_read_timeout",
                defaults.header_read_timeout,
                MIN_TIMEOUT,
            )?,
            max_header_size: t.integer(
                "max_header_size",
                defaults.max_header_size as u64,
                4096,
                1024 * 1024,
            )? as usize,
            max_uri_length: t.integer(
                "max_uri_length",
                defaults.max_uri_length as u64,
                256,
                64 * 1024,
            )? as usize,
            body_timeout: t.duration("body_timeout", defaults.body_timeout, MIN_TIMEOUT)?,
            tcp_keepalive: read_tcp_keepalive(&mut t)?,
            ws_ping_interval: Some(t.duration(
                "ws_ping_interval",
                Duration::ZERO,
                Duration::ZERO,
            )?)
            .filter(|d| !d.is_zero()),
            ws_ping_timeout: t.duration(
                "ws_ping_timeout",
                defaults.ws_ping_timeout,
                MIN_TIMEOUT,
            )?,
            tls: read_tls(&mut t, &mut http01)?,
            proxy_protocol: read_proxy_protocol(&mut t)?,
            http2: read_http2(&mut t)?,
            ..defaults
        };
        if listener.http2.websockets && !listener.http2() {
            return Err(t.error_here(
                "websocket_over_http2 needs HTTP/2 on the listener (http2 = true)".into(),
            ));
        }

        if listeners
            .iter()
            .any(|l: &ListenerConfig| l.name == listener.name)
        {
            return Err(t.error_here(format!("listener \"{name}\" is defined twice")));
        }
        t.finish()?;
        listeners.push(listener);
    }
    if let Some(error) = http01
        && !listeners
            .iter()
            .any(|l| l.tls.is_none() && l.proxy_protocol.is_none())
    {
        return Err(error);
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
        upgrade_timeout,
        worker_threads,
        log,
        cluster,
        path: Some(path.to_path_buf()),
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
    let factor = t.number("hash_balance_factor", 0.0, 1.0, 100.0)?;
    let hash_balance_factor = (factor > 0.0).then_some(factor);
    if hash_balance_factor.is_some() && !matches!(algorithm, Algorithm::Hash(_)) {
        return Err(t.error_here(
            "key \"hash_balance_factor\": only used with algorithm = \"hash\"".into(),
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
        hash_balance_factor,
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
        send_proxy_protocol: match t.string("send_proxy_protocol")? {
            None => None,
            Some(v) => match v.value.to_ascii_lowercase().as_str() {
                "off" => None,
                "v1" => Some(ProxyVersion::V1),
                "v2" => Some(ProxyVersion::V2),
                other => {
                    return Err(t.error_at(
                        &v.span,
                        "send_proxy_protocol",
                        format!("\"{other}\": expected \"off\", \"v1\" or \"v2\""),
                    ));
                }
            },
        },
        tcp_keepalive: read_tcp_keepalive(&mut t)?,
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

fn read_cluster(root: &mut Table<'_>) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(mut t) = root.table("cluster", "cluster".into())? else {
        return Ok(None);
    };
    let redis = t.required_string("redis")?;
    let url_ok = ["redis://", "rediss://"]
        .iter()
        .any(|scheme| redis.value.starts_with(scheme));
    if !url_ok || redis::Client::open(redis.value.as_str()).is_err() {
        return Err(t.error_at(
            &redis.span,
            "redis",
            format!(
                "\"{}\": expected a redis:// or rediss:// URL, e.g. \"redis://127.0.0.1:6379\"",
                redis.value
            ),
        ));
    }
    let password = match t.string("password_file")? {
        None => None,
        Some(v) => {
            let file = t.path_near_config(&v.value);
            let text = std::fs::read_to_string(&file).map_err(|e| {
                t.error_at(
                    &v.span,
                    "password_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            Some(text.trim().to_string())
        }
    };
    let instance = match t.string("instance")? {
        Some(v) => {
            check_name_at(&t, "instance", "instance", &v)?;
            v.value
        }
        None => host_name(),
    };
    let publish_interval = t.duration(
        "publish_interval",
        ClusterConfig::DEFAULT_PUBLISH_INTERVAL,
        Duration::from_millis(100),
    )?;
    t.finish()?;
    Ok(Some(ClusterConfig {
        redis: redis.value,
        password,
        instance,
        publish_interval,
    }))
}

/// This machine's host name, for the default instance name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sluice".to_string())
}

fn read_log(root: &mut Table<'_>) -> Result<LogConfig, ConfigError> {
    let Some(mut t) = root.table("log", "log".into())? else {
        return Ok(LogConfig::default());
    };
    let format = match t.string("format")? {
        None => LogFormat::Text,
        Some(v) => match v.value.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(t.error_at(
                    &v.span,
                    "format",
                    format!("\"{other}\": expected \"text\" or \"json\""),
                ));
            }
        },
    };
    let access = match t.string("access")? {
        None => AccessTarget::Off,
        Some(v) => match v.value.as_str() {
            "off" => AccessTarget::Off,
            "stdout" => AccessTarget::Stdout,
            "stderr" => AccessTarget::Stderr,
            "" => {
                return Err(t.error_at(
                    &v.span,
                    "access",
                    "expected \"stdout\", \"stderr\", \"off\" or a file path".into(),
                ));
            }
            path => {
                let file = t.path_near_config(path);
                let folder = file.parent().unwrap_or(Path::new("."));
                if !folder.as_os_str().is_empty() && !folder.is_dir() {
                    return Err(t.error_at(
                        &v.span,
                        "access",
                        format!("folder {} does not exist", folder.display()),
                    ));
                }
                if file.is_dir() {
                    return Err(t.error_at(
                        &v.span,
                        "access",
                        format!("{} is a folder; name a file", file.display()),
                    ));
                }
                AccessTarget::File(file)
            }
        },
    };
    let access_queue = t.integer(
        "access_queue",
        LogConfig::DEFAULT_ACCESS_QUEUE as u64,
        1,
        1_000_000,
    )? as usize;
    t.finish()?;
    Ok(LogConfig {
        format,
        access,
        access_queue,
    })
}

fn read_admin(
    root: &mut Table<'_>,
    config_path: &Path,
) -> Result<Option<AdminConfig>, ConfigError> {
    let Some(mut t) = root.table("admin", "admin".into())? else {
        return Ok(Some(AdminConfig::new(AdminConfig::DEFAULT_BIND, None)));
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
    let defaults = AdminConfig::new(bind.0, token);
    let header_read_timeout = t.duration(
        "header_read_timeout",
        defaults.header_read_timeout,
        MIN_TIMEOUT,
    )?;
    let max_connections = t.integer(
        "max_connections",
        defaults.max_connections as u64,
        1,
        10_000,
    )? as usize;
    t.finish()?;
    Ok(enabled.then_some(AdminConfig {
        header_read_timeout,
        max_connections,
        ..defaults
    }))
}

/// `tcp_keepalive = { enabled = true, idle = "60s", interval = "10s", count = 6 }`
/// (a listener's, towards clients, or a pool's, towards backends).
fn read_tcp_keepalive(t: &mut Table<'_>) -> Result<Option<TcpKeepalive>, ConfigError> {
    let defaults = TcpKeepalive::default();
    let context = format!("{} tcp_keepalive", t.context());
    let Some(mut k) = t.table("tcp_keepalive", context)? else {
        return Ok(Some(defaults));
    };
    let enabled = k.boolean("enabled", true)?;
    // The kernel takes whole seconds.
    let second = Duration::from_secs(1);
    let keepalive = TcpKeepalive {
        idle: k.duration("idle", defaults.idle, second)?,
        interval: k.duration("interval", defaults.interval, second)?,
        count: k.integer("count", u64::from(defaults.count), 1, 127)? as u32,
    };
    k.finish()?;
    Ok(enabled.then_some(keepalive))
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
    let max_message_wait =
        t.duration("max_message_wait", defaults.max_message_wait, MIN_TIMEOUT)?;
    t.finish()?;
    Ok(DrainConfig {
        window,
        close_code,
        close_timeout,
        max_message_wait,
    })
}

/// `http2`, `websocket_over_http2` and the `http2_*` limits of a listener.
fn read_http2(t: &mut Table<'_>) -> Result<Http2Settings, ConfigError> {
    let d = Http2Settings::default();
    let enabled = if t.has("http2") {
        Some(t.boolean("http2", true)?)
    } else {
        None
    };
    let stream_window = t.integer(
        "http2_stream_window",
        d.stream_window.into(),
        65_535,
        1 << 30,
    )? as u32;
    let connection_window = t.integer(
        "http2_connection_window",
        d.connection_window.into(),
        65_535,
        1 << 30,
    )? as u32;
    if connection_window < stream_window {
        return Err(t.error_here(format!(
            "http2_connection_window ({connection_window}) is below http2_stream_window \
             ({stream_window}): one stream could stall the others"
        )));
    }
    Ok(Http2Settings {
        enabled,
        websockets: t.boolean("websocket_over_http2", d.websockets)?,
        max_concurrent_streams: t.integer(
            "http2_max_concurrent_streams",
            d.max_concurrent_streams.into(),
            1,
            10_000,
        )? as u32,
        stream_window,
        connection_window,
        idle_timeout: t.duration("http2_idle_timeout", d.idle_timeout, MIN_TIMEOUT)?,
    })
}

/// `tls = { cert, key, handshake_timeout }` (or `acme = { ... }` in place
/// of `cert` and `key`) with `[[listener.tls.sni]]` entries; every
/// certificate file is loaded and checked now, so `sluice check` reports
/// an unreadable, expired or mismatched one with its file.
/// `http01` gets the error for the first `challenge = "http-01"`, refused
/// when no listener is plain.
fn read_tls(
    listener: &mut Table<'_>,
    http01: &mut Option<ConfigError>,
) -> Result<Option<TlsSettings>, ConfigError> {
    let context = format!("{} tls", listener.context());
    let Some(mut t) = listener.table("tls", context)? else {
        return Ok(None);
    };
    let mut acme = Vec::new();
    let default = cert_source(&mut t, &mut acme, http01)?;
    let handshake_timeout =
        t.duration("handshake_timeout", Duration::from_secs(10), MIN_TIMEOUT)?;
    let mut sni = Vec::new();
    for mut entry in t.tables("sni")? {
        let hosts = match entry.strings("hosts")? {
            Some(hosts) => Some(hosts),
            // An ACME entry is for its domains.
            None if entry.has("acme") => None,
            None => return Err(entry.error_here("missing key \"hosts\"".into())),
        };
        if let Some(hosts) = &hosts
            && (hosts.value.is_empty()
                || hosts
                    .value
                    .iter()
                    .any(|h| h.is_empty() || h.strip_prefix("*.").unwrap_or(h).contains('*')))
        {
            return Err(entry.error_at(
                &hosts.span,
                "hosts",
                "host names, or *.domain wildcards, are needed".into(),
            ));
        }
        let src = cert_source(&mut entry, &mut acme, http01)?;
        entry.finish()?;
        let hosts = match hosts {
            Some(hosts) => hosts.value,
            None => acme.last().map(|a| a.domains.clone()).unwrap_or_default(),
        };
        sni.push((hosts, src));
    }
    t.finish()?;
    Ok(Some(TlsSettings {
        default,
        sni,
        handshake_timeout,
        acme,
    }))
}

/// `cert` and `key` files (loaded and checked now), or `acme = { ... }`
/// (added to `acme`).
fn cert_source(
    t: &mut Table<'_>,
    acme: &mut Vec<AcmeSettings>,
    http01: &mut Option<ConfigError>,
) -> Result<CertSource, ConfigError> {
    if let Some(a) = t.table("acme", format!("{} acme", t.context()))? {
        if t.has("cert") || t.has("key") {
            return Err(t.error_here("either cert and key, or acme, not both".into()));
        }
        let settings = read_acme(a, http01)?;
        let files = settings.files();
        acme.push(settings);
        return Ok(files);
    }
    let cert = t.required_string("cert")?;
    let key = t.required_string("key")?;
    cert_files(t, &cert, &key, "cert", true)
}

/// The files `cert` and `key` name, loaded and checked now (an error names
/// `cert_key`; an expired certificate is one when `refuse_expired`).
fn cert_files(
    t: &Table<'_>,
    cert: &Value<String>,
    key: &Value<String>,
    cert_key: &str,
    refuse_expired: bool,
) -> Result<CertSource, ConfigError> {
    let source = CertSource::Files {
        cert: t.path_near_config(&cert.value),
        key: t.path_near_config(&key.value),
    };
    crate::pem::load_key(&source, refuse_expired)
        .map_err(|e| t.error_at(&cert.span, cert_key, chain(&e).to_string()))?;
    Ok(source)
}

/// `acme = { domains, contact, directory, directory_ca, cache, challenge,
/// renew_before, fallback_cert, fallback_key }`: checked without
/// contacting the CA.
fn read_acme(
    mut a: Table<'_>,
    http01: &mut Option<ConfigError>,
) -> Result<AcmeSettings, ConfigError> {
    let domains = a
        .strings("domains")?
        .ok_or_else(|| a.error_here("missing key \"domains\"".into()))?;
    if domains.value.is_empty()
        || domains.value.iter().any(|d| {
            d.contains('*')
                || rustls::pki_types::ServerName::try_from(d.as_str()).map_or(true, |n| {
                    !matches!(n, rustls::pki_types::ServerName::DnsName(_))
                })
        })
    {
        return Err(a.error_at(
            &domains.span,
            "domains",
            "DNS names are needed (no wildcards: they need dns-01, which sluice does not do)"
                .into(),
        ));
    }
    let contact = match a.strings("contact")? {
        Some(c) => {
            if let Some(bad) = c.value.iter().find(|c| !c.starts_with("mailto:")) {
                return Err(a.error_at(
                    &c.span,
                    "contact",
                    format!("{bad:?}: a mailto: URL is needed"),
                ));
            }
            c.value
        }
        None => Vec::new(),
    };
    let directory = a.required_string("directory")?;
    if !directory.value.starts_with("https://") || directory.value.len() <= "https://".len() {
        return Err(a.error_at(
            &directory.span,
            "directory",
            "an https:// URL is needed".into(),
        ));
    }
    let directory_ca = match a.string("directory_ca")? {
        Some(ca) => {
            let path = a.path_near_config(&ca.value);
            crate::pem::client_config(&path)
                .map_err(|e| a.error_at(&ca.span, "directory_ca", chain(&e).to_string()))?;
            Some(path)
        }
        None => None,
    };
    let cache = a.required_string("cache")?;
    let cache_path = a.path_near_config(&cache.value);
    if let Err(e) = writable_dir(&cache_path) {
        return Err(a.error_at(&cache.span, "cache", e));
    }
    let challenge = match a.string("challenge")? {
        None => AcmeChallenge::TlsAlpn01,
        Some(c) => match c.value.as_str() {
            "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
            "http-01" => {
                http01.get_or_insert_with(|| {
                    a.error_at(
                        &c.span,
                        "challenge",
                        "\"http-01\" is answered on a plain (non-TLS) listener without \
                         proxy_protocol, and there is none (the CA fetches port 80)"
                            .into(),
                    )
                });
                AcmeChallenge::Http01
            }
            other => {
                return Err(a.error_at(
                    &c.span,
                    "challenge",
                    format!("{other:?}: expected \"tls-alpn-01\" or \"http-01\""),
                ));
            }
        },
    };
    let fallback = match (a.string("fallback_cert")?, a.string("fallback_key")?) {
        (None, None) => None,
        // Only served until the CA's certificate is there: one that has
        // expired since is warned about, not refused.
        (Some(cert), Some(key)) => Some(cert_files(&a, &cert, &key, "fallback_cert", false)?),
        (Some(v), None) | (None, Some(v)) => {
            return Err(a.error_at(
                &v.span,
                "fallback_cert",
                "fallback_cert and fallback_key go together".into(),
            ));
        }
    };
    let renew_before = a
        .has("renew_before")
        .then(|| a.duration("renew_before", Duration::ZERO, Duration::from_secs(1)))
        .transpose()?;
    a.finish()?;
    Ok(AcmeSettings {
        domains: domains.value,
        contact,
        directory: directory.value,
        directory_ca,
        cache: cache_path,
        challenge,
        renew_before,
        fallback,
    })
}

/// Whether sluice could create and write `dir` (it creates it when it
/// first needs it): the nearest folder that exists must be writable.
fn writable_dir(dir: &std::path::Path) -> Result<(), String> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(std::path::Path::new("."));
    if !existing.is_dir() {
        return Err(format!("{} is not a folder", existing.display()));
    }
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
        .map_err(|_| "a path with a NUL byte".to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path; access(2) only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(format!("{} is not writable", existing.display()));
    }
    Ok(())
}

/// `proxy_protocol` and `proxy_protocol_from` on a listener.
fn read_proxy_protocol(t: &mut Table<'_>) -> Result<Option<ProxyProtocolIn>, ConfigError> {
    let mode = t.string("proxy_protocol")?;
    let from = t.strings("proxy_protocol_from")?;
    let accept = match &mode {
        None => None,
        Some(v) => match v.value.to_ascii_lowercase().as_str() {
            "off" => None,
            "v1" => Some(ProxyAccept::V1),
            "v2" => Some(ProxyAccept::V2),
            "any" => Some(ProxyAccept::Any),
            other => {
                return Err(t.error_at(
                    &v.span,
                    "proxy_protocol",
                    format!("\"{other}\": expected \"off\", \"v1\", \"v2\" or \"any\""),
                ));
            }
        },
    };
    let Some(accept) = accept else {
        if let Some(from) = from {
            return Err(t.error_at(
                &from.span,
                "proxy_protocol_from",
                "set without proxy_protocol = \"v1\", \"v2\" or \"any\"".into(),
            ));
        }
        return Ok(None);
    };
    // Required: trusting every peer would let any client name its own
    // address.
    let Some(from) = from else {
        return Err(t.error_here(
            "proxy_protocol needs proxy_protocol_from: the addresses of the L4 balancers \
             allowed to send it, e.g. [\"10.0.0.0/8\"] ([\"0.0.0.0/0\", \"::/0\"] trusts every peer)"
                .into(),
        ));
    };
    if from.value.is_empty() {
        return Err(t.error_at(
            &from.span,
            "proxy_protocol_from",
            "is empty: every connection would be refused".into(),
        ));
    }
    let mut nets = Vec::new();
    for text in &from.value {
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                t.error_at(
                    &from.span,
                    "proxy_protocol_from",
                    format!("\"{text}\" is not an address or a network (e.g. \"10.0.0.0/8\")"),
                )
            })?;
        nets.push(net);
    }
    Ok(Some(ProxyProtocolIn { accept, from: nets }))
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
    check_name_at(t, what, "name", name)
}

/// `check_name` for a name under another key.
fn check_name_at(
    t: &Table<'_>,
    what: &str,
    key: &str,
    name: &Value<String>,
) -> Result<(), ConfigError> {
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
            key,
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
