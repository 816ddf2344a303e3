//! What a reload changes: `diff(old, new)`, pure.
//!
//! Listeners and pools are matched by name, backends by pool and name. A
//! listener whose address changed, or a backend whose address changed, is
//! a different socket or server: it is removed and added. `reload` applies
//! the list; its `Display` is what the reload answers and logs.

use std::fmt;

use super::{Config, ListenerConfig, PoolConfig};

/// One difference between the running config and the one read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    ListenerAdded {
        listener: String,
    },
    /// Stops accepting; its connections drain.
    ListenerRemoved {
        listener: String,
    },
    /// Settings that apply to its next connections (and TLS handshakes).
    ListenerChanged {
        listener: String,
        keys: Vec<&'static str>,
    },
    PoolAdded {
        pool: String,
    },
    /// Its backends drain, then it is forgotten.
    PoolRemoved {
        pool: String,
    },
    /// Settings that apply to its next decisions.
    PoolChanged {
        pool: String,
        keys: Vec<&'static str>,
    },
    BackendAdded {
        pool: String,
        backend: String,
    },
    /// Drains over the pool's window, then is forgotten.
    BackendRemoved {
        pool: String,
        backend: String,
    },
    BackendChanged {
        pool: String,
        backend: String,
        keys: Vec<&'static str>,
    },
    /// A top-level setting a running process cannot change: it takes
    /// effect at the next start or binary upgrade.
    NeedsRestart {
        key: &'static str,
    },
    /// Applies at once.
    GlobalChanged {
        key: &'static str,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ListenerAdded { listener } => write!(f, "added listener {listener}"),
            Self::ListenerRemoved { listener } => write!(
                f,
                "removed listener {listener}: stopped accepting, draining its connections"
            ),
            Self::ListenerChanged { listener, keys } => {
                write!(f, "changed listener {listener}: {}", keys.join(", "))
            }
            Self::PoolAdded { pool } => write!(f, "added pool {pool}"),
            Self::PoolRemoved { pool } => {
                write!(f, "removed pool {pool}: draining its backends")
            }
            Self::PoolChanged { pool, keys } => {
                write!(f, "changed pool {pool}: {}", keys.join(", "))
            }
            Self::BackendAdded { pool, backend } => write!(f, "added backend {pool}/{backend}"),
            Self::BackendRemoved { pool, backend } => {
                write!(f, "draining removed backend {pool}/{backend}")
            }
            Self::BackendChanged {
                pool,
                backend,
                keys,
            } => {
                write!(f, "changed backend {pool}/{backend}: {}", keys.join(", "))
            }
            Self::NeedsRestart { key } => write!(
                f,
                "not applied: {key} takes effect at the next start or `sluice ctl upgrade`"
            ),
            Self::GlobalChanged { key } => write!(f, "changed {key}"),
        }
    }
}

/// Everything `new` changes in `old`, listeners first, then pools and
/// their backends, in the order of the files.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes = Vec::new();
    if old.worker_threads != new.worker_threads {
        changes.push(Change::NeedsRestart {
            key: "worker_threads",
        });
    }
    if old.admin != new.admin {
        changes.push(Change::NeedsRestart { key: "[admin]" });
    }
    if old.cluster != new.cluster {
        changes.push(Change::NeedsRestart { key: "[cluster]" });
    }
    if old.log.format != new.log.format {
        changes.push(Change::NeedsRestart {
            key: "[log] format",
        });
    }
    if (&old.log.access, old.log.access_queue) != (&new.log.access, new.log.access_queue) {
        changes.push(Change::GlobalChanged {
            key: "[log] access",
        });
    }
    if old.shutdown_timeout != new.shutdown_timeout {
        changes.push(Change::GlobalChanged {
            key: "shutdown_timeout",
        });
    }
    if old.upgrade_timeout != new.upgrade_timeout {
        changes.push(Change::GlobalChanged {
            key: "upgrade_timeout",
        });
    }
    for l in &old.listeners {
        match new.listeners.iter().find(|n| n.name == l.name) {
            Some(n) if n.bind == l.bind => {}
            _ => changes.push(Change::ListenerRemoved {
                listener: l.name.clone(),
            }),
        }
    }
    for n in &new.listeners {
        match old.listeners.iter().find(|l| l.name == n.name) {
            Some(l) if l.bind == n.bind => {
                let keys = listener_keys(old, l, new, n);
                if !keys.is_empty() {
                    changes.push(Change::ListenerChanged {
                        listener: n.name.clone(),
                        keys,
                    });
                }
            }
            _ => changes.push(Change::ListenerAdded {
                listener: n.name.clone(),
            }),
        }
    }
    for p in &old.pools {
        if !new.pools.iter().any(|n| n.name == p.name) {
            changes.push(Change::PoolRemoved {
                pool: p.name.clone(),
            });
        }
    }
    for n in &new.pools {
        let Some(p) = old.pools.iter().find(|p| p.name == n.name) else {
            changes.push(Change::PoolAdded {
                pool: n.name.clone(),
            });
            continue;
        };
        let keys = pool_keys(p, n);
        if !keys.is_empty() {
            changes.push(Change::PoolChanged {
                pool: n.name.clone(),
                keys,
            });
        }
        backend_changes(p, n, &mut changes);
    }
    changes
}

fn backend_changes(old: &PoolConfig, new: &PoolConfig, changes: &mut Vec<Change>) {
    let pool = || new.name.clone();
    for b in &old.backends {
        match new.backends.iter().find(|n| n.name == b.name) {
            Some(n) if n.address == b.address => {}
            _ => changes.push(Change::BackendRemoved {
                pool: pool(),
                backend: b.name.clone(),
            }),
        }
    }
    for n in &new.backends {
        match old.backends.iter().find(|b| b.name == n.name) {
            Some(b) if b.address == n.address => {
                let mut keys = Vec::new();
                if b.weight != n.weight {
                    keys.push("weight");
                }
                if b.tls != n.tls {
                    keys.push("tls");
                }
                if !keys.is_empty() {
                    changes.push(Change::BackendChanged {
                        pool: pool(),
                        backend: n.name.clone(),
                        keys,
                    });
                }
            }
            _ => changes.push(Change::BackendAdded {
                pool: pool(),
                backend: n.name.clone(),
            }),
        }
    }
}

/// The keys of a listener that differ (its pool compared by name).
fn listener_keys(
    old_cfg: &Config,
    old: &ListenerConfig,
    new_cfg: &Config,
    new: &ListenerConfig,
) -> Vec<&'static str> {
    let pool_name =
        |cfg: &Config, l: &ListenerConfig| cfg.pools.get(l.pool).map(|p| p.name.clone());
    let mut keys = Vec::new();
    let mut key = |changed: bool, name: &'static str| {
        if changed {
            keys.push(name);
        }
    };
    key(pool_name(old_cfg, old) != pool_name(new_cfg, new), "pool");
    key(
        old.max_connections != new.max_connections,
        "max_connections",
    );
    key(
        old.max_connections_per_client != new.max_connections_per_client,
        "max_connections_per_client",
    );
    key(
        old.forwarded_headers != new.forwarded_headers,
        "forwarded_headers",
    );
    key(
        old.header_read_timeout != new.header_read_timeout,
        "header_read_timeout",
    );
    key(
        old.max_header_size != new.max_header_size,
        "max_header_size",
    );
    key(old.max_uri_length != new.max_uri_length, "max_uri_length");
    key(old.body_timeout != new.body_timeout, "body_timeout");
    key(old.tcp_keepalive != new.tcp_keepalive, "tcp_keepalive");
    key(
        old.ws_ping_interval != new.ws_ping_interval,
        "ws_ping_interval",
    );
    key(
        old.ws_ping_timeout != new.ws_ping_timeout,
        "ws_ping_timeout",
    );
    key(old.tls != new.tls, "tls");
    key(old.proxy_protocol != new.proxy_protocol, "proxy_protocol");
    key(old.http2.enabled != new.http2.enabled, "http2");
    key(
        old.http2.websockets != new.http2.websockets,
        "websocket_over_http2",
    );
    key(
        old.http2.max_concurrent_streams != new.http2.max_concurrent_streams,
        "http2_max_concurrent_streams",
    );
    key(
        old.http2.stream_window != new.http2.stream_window,
        "http2_stream_window",
    );
    key(
        old.http2.connection_window != new.http2.connection_window,
        "http2_connection_window",
    );
    key(
        old.http2.idle_timeout != new.http2.idle_timeout,
        "http2_idle_timeout",
    );
    keys
}

/// The keys of a pool that differ, its backends aside.
fn pool_keys(old: &PoolConfig, new: &PoolConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut key = |changed: bool, name: &'static str| {
        if changed {
            keys.push(name);
        }
    };
    key(old.algorithm != new.algorithm, "algorithm");
    key(
        old.connect_timeout != new.connect_timeout,
        "connect_timeout",
    );
    key(
        old.response_timeout != new.response_timeout,
        "response_timeout",
    );
    key(old.retries != new.retries, "retries");
    key(old.drain != new.drain, "drain");
    key(old.rebalance != new.rebalance, "rebalance");
    key(old.health != new.health, "health");
    key(old.passive != new.passive, "passive");
    key(old.slow_start != new.slow_start, "slow_start");
    key(
        old.max_connections_per_backend != new.max_connections_per_backend,
        "max_connections_per_backend",
    );
    key(old.admission != new.admission, "admission");
    key(old.sticky != new.sticky, "sticky");
    key(
        old.hash_balance_factor != new.hash_balance_factor,
        "hash_balance_factor",
    );
    key(
        old.send_proxy_protocol != new.send_proxy_protocol,
        "send_proxy_protocol",
    );
    key(
        old.keepalive_timeout != new.keepalive_timeout,
        "keepalive_timeout",
    );
    key(
        old.keepalive_max_idle != new.keepalive_max_idle,
        "keepalive_max_idle",
    );
    key(old.tcp_keepalive != new.tcp_keepalive, "tcp_keepalive");
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(text: &str) -> Config {
        super::super::parse(text, Path::new("t.toml")).expect("valid config")
    }

    const BASE: &str = r#"
[[listener]]
name = "public"
bind = "127.0.0.1:8080"
pool = "app"

[[pool]]
name = "app"

[[pool.backend]]
name = "b1"
address = "127.0.0.1:9001"

[[pool.backend]]
name = "b2"
address = "127.0.0.1:9002"
"#;

    fn lines(old: &str, new: &str) -> Vec<String> {
        diff(&cfg(old), &cfg(new))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_same_config_changes_nothing() {
        assert!(diff(&cfg(BASE), &cfg(BASE)).is_empty());
    }

    #[test]
    fn backends_join_leave_and_change_weight() {
        let new = BASE
            .replace(
                "name = \"b2\"\naddress = \"127.0.0.1:9002\"",
                "name = \"b2\"\naddress = \"127.0.0.1:9002\"\nweight = 3",
            )
            .replace(
                "name = \"b1\"\naddress = \"127.0.0.1:9001\"",
                "name = \"b4\"\naddress = \"127.0.0.1:9004\"",
            );
        assert_eq!(
            lines(BASE, &new),
            [
                "draining removed backend app/b1",
                "added backend app/b4",
                "changed backend app/b2: weight",
            ]
        );
    }

    #[test]
    fn a_backend_that_moved_is_removed_and_added() {
        let new = BASE.replace("127.0.0.1:9002", "127.0.0.1:9012");
        assert_eq!(
            lines(BASE, &new),
            ["draining removed backend app/b2", "added backend app/b2"]
        );
    }

    #[test]
    fn a_listener_that_moved_is_removed_and_added() {
        let new = BASE.replace("127.0.0.1:8080", "127.0.0.1:8081");
        assert_eq!(
            lines(BASE, &new),
            [
                "removed listener public: stopped accepting, draining its connections",
                "added listener public",
            ]
        );
    }

    #[test]
    fn pool_and_listener_settings_are_named() {
        let new = BASE
            .replace(
                "name = \"app\"\n",
                "name = \"app\"\nalgorithm = \"p2c\"\nslow_start = \"30s\"\n",
            )
            .replace("pool = \"app\"\n", "pool = \"app\"\nmax_connections = 10\n");
        assert_eq!(
            lines(BASE, &new),
            [
                "changed listener public: max_connections",
                "changed pool app: algorithm, slow_start",
            ]
        );
    }

    #[test]
    fn pools_come_and_go_and_a_listener_may_switch_pool() {
        let new = format!(
            "{}\n[[pool]]\nname = \"beta\"\n[[pool.backend]]\nname = \"x\"\naddress = \"127.0.0.1:9100\"\n",
            BASE.replace("pool = \"app\"", "pool = \"beta\"")
        );
        assert_eq!(
            lines(BASE, &new),
            ["changed listener public: pool", "added pool beta"]
        );
        // Reordering pools moves their indices, not their names: no change.
        let reordered = format!(
            "[[pool]]\nname = \"beta\"\n[[pool.backend]]\nname = \"x\"\naddress = \"127.0.0.1:9100\"\n{BASE}"
        );
        let with_beta = format!(
            "{BASE}\n[[pool]]\nname = \"beta\"\n[[pool.backend]]\nname = \"x\"\naddress = \"127.0.0.1:9100\"\n"
        );
        assert!(diff(&cfg(&with_beta), &cfg(&reordered)).is_empty());
        assert_eq!(
            lines(&with_beta, BASE),
            ["removed pool beta: draining its backends"]
        );
    }

    #[test]
    fn settings_a_process_cannot_change_are_named() {
        let new = format!(
            "worker_threads = 2\nshutdown_timeout = \"3s\"\n[log]\nformat = \"json\"\naccess = \"stderr\"\n{BASE}"
        );
        assert_eq!(
            lines(BASE, &new),
            [
                "not applied: worker_threads takes effect at the next start or `sluice ctl upgrade`",
                "not applied: [log] format takes effect at the next start or `sluice ctl upgrade`",
                "changed [log] access",
                "changed shutdown_timeout",
            ]
        );
    }
}
