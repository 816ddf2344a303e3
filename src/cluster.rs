//! Cluster mode: several sluice instances share their view through Redis.
//!
//! Owns this instance's Redis connection (the `redis` crate's
//! `ConnectionManager`, which reconnects by itself). Every
//! `publish_interval` it publishes this instance's live connections per
//! backend under `sluice:counts:INSTANCE` (a JSON object, with a TTL of
//! three intervals, so an instance that vanished stops counting), reads
//! the other instances' and stores their sums in each backend's `remote`
//! count, which the balancer adds to its own. Nothing in the data path
//! waits on Redis: while it is unreachable the remote counts are 0 (each
//! instance balances on its own view) and `sluice_cluster_up` is 0, said
//! once in the log per change.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ClusterConfig;
use crate::registry::Registry;

/// Where each instance's counts live.
const KEY_PREFIX: &str = "sluice:counts:";

/// Live connections per pool and backend, as one instance publishes them.
pub type Counts = HashMap<String, HashMap<String, usize>>;

/// What an instance publishes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    pub instance: String,
    pub pools: Counts,
}

/// The sums of the others' counts, per pool and backend: what `own` adds
/// to its view. Entries of `own` itself are skipped (its own counts are
/// live).
pub fn others(own: &str, published: &[Published]) -> Counts {
    let mut sums: Counts = HashMap::new();
    for p in published.iter().filter(|p| p.instance != own) {
        for (pool, backends) in &p.pools {
            let pool_sums = sums.entry(pool.clone()).or_default();
            for (backend, n) in backends {
                *pool_sums.entry(backend.clone()).or_default() += n;
            }
        }
    }
    sums
}

/// This instance's live connections.
fn own_counts(registry: &Registry) -> Counts {
    registry
        .pools()
        .iter()
        .map(|pool| {
            let backends = pool
                .all_backends()
                .iter()
                .map(|b| (b.name.clone(), b.active()))
                .collect();
            (pool.name.clone(), backends)
        })
        .collect()
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

/// What the last round saw, for the admin status.
#[derive(Debug, Default)]
pub struct ClusterView {
    seen: std::sync::Mutex<(bool, Vec<Published>)>,
}

impl ClusterView {
    fn store(&self, up: bool, published: Vec<Published>) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = (up, published);
    }

    /// Whether Redis answered the last round, and every instance that
    /// had published then (this one included), sorted by name.
    pub fn get(&self) -> (bool, Vec<Published>) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why a round with Redis failed.
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

/// Publishes and reads every `publish_interval` until `stop`.
pub async fn run(
    cfg: ClusterConfig,
    registry: Arc<Registry>,
    view: Arc<ClusterView>,
    up_gauge: Gauge,
    stop: CancellationToken,
) {
    let url = redacted(&cfg.redis);
    let limit = cfg.publish_interval.max(Duration::from_millis(500));
    let mut conn: Option<ConnectionManager> = None;
    let mut was_up: Option<bool> = None;
    let mut tick = tokio::time::interval(cfg.publish_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let round = async {
            if conn.is_none() {
                let client = client(&cfg).map_err(|source| ClusterError::Redis {
                    url: url.clone(),
                    source,
                })?;
                conn = Some(ConnectionManager::new(client).await.map_err(|source| {
                    ClusterError::Redis {
                        url: url.clone(),
                        source,
                    }
                })?);
            }
            let Some(c) = conn.as_mut() else {
                unreachable!("connected above");
            };
            exchange(c, &cfg, &registry)
                .await
                .map_err(|source| ClusterError::Redis {
                    url: url.clone(),
                    source,
                })
        };
        let result = match tokio::time::timeout(limit, round).await {
            Ok(result) => result,
            Err(_) => Err(ClusterError::Timeout {
                url: url.clone(),
                limit,
            }),
        };
        let up = match result {
            Ok(published) => {
                apply(&registry, &others(&cfg.instance, &published));
                view.store(true, published);
                true
            }
            Err(error) => {
                // Balance on this instance's own view until Redis is back.
                apply(&registry, &Counts::new());
                view.store(false, Vec::new());
                if was_up != Some(false) {
                    warn!(instance = %cfg.instance, error = %crate::error_chain::chain(&error), "cluster: Redis unreachable; balancing on this instance's own view");
                }
                false
            }
        };
        if up && was_up != Some(true) {
            info!(instance = %cfg.instance, redis = %url, "cluster: Redis reachable; balancing on the cluster's counts");
        }
        was_up = Some(up);
        up_gauge.set(i64::from(up));
    }
    // Leaving: the others stop counting this instance at once.
    if let Some(mut c) = conn {
        let key = format!("{KEY_PREFIX}{}", cfg.instance);
        let _ = tokio::time::timeout(limit, c.del::<_, ()>(key)).await;
    }
}

/// One round: publish this instance's counts and read every instance's
/// (this one's included), sorted by instance.
async fn exchange(
    conn: &mut ConnectionManager,
    cfg: &ClusterConfig,
    registry: &Registry,
) -> redis::RedisResult<Vec<Published>> {
    let mine = Published {
        instance: cfg.instance.clone(),
        pools: own_counts(registry),
    };
    let text = serde_json::to_string(&mine).unwrap_or_default();
    let ttl = cfg.ttl().as_millis() as u64;
    let key = format!("{KEY_PREFIX}{}", cfg.instance);
    conn.pset_ex::<_, _, ()>(&key, text, ttl).await?;
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter = conn
            .scan_match::<_, String>(format!("{KEY_PREFIX}*"))
            .await?;
        while let Some(k) = futures_util::StreamExt::next(&mut iter).await {
            keys.push(k?);
        }
    }
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
    let mut published: Vec<Published> = values
        .iter()
        .flatten()
        .filter_map(|v| serde_json::from_str(v).ok())
        .collect();
    published.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok(published)
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

    fn published(instance: &str, counts: &[(&str, &str, usize)]) -> Published {
        let mut pools: Counts = HashMap::new();
        for (pool, backend, n) in counts {
            pools
                .entry(pool.to_string())
                .or_default()
                .insert(backend.to_string(), *n);
        }
        Published {
            instance: instance.into(),
            pools,
        }
    }

    #[test]
    fn the_others_counts_are_summed_and_ones_own_skipped() {
        let all = [
            published("lb-1", &[("app", "b1", 100), ("app", "b2", 5)]),
            published("lb-2", &[("app", "b1", 7), ("app", "b3", 2)]),
            published("lb-3", &[("app", "b1", 1), ("other", "x", 4)]),
        ];
        let sums = others("lb-1", &all);
        assert_eq!(sums["app"]["b1"], 8);
        assert_eq!(sums["app"]["b3"], 2);
        assert!(!sums["app"].contains_key("b2"));
        assert_eq!(sums["other"]["x"], 4);
        assert!(others("lb-1", &all[..1]).is_empty());
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
