//! What the instances of a cluster share through Redis, and the pure
//! rules on it: summing the others' counts, splitting a shed among the
//! instances, fencing plans, and bringing local drains in line with the
//! shared ones.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

/// Live connections per pool and backend, as one instance publishes them.
pub type Counts = HashMap<String, HashMap<String, usize>>;

/// What an instance publishes every round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    pub instance: String,
    /// The process (after a binary upgrade the old and the new process of
    /// an instance publish side by side until the old one is gone).
    #[serde(default)]
    pub pid: u32,
    /// Live connections (HTTP and WebSocket): the balancer's load.
    pub pools: Counts,
    /// Live WebSockets: what the rebalancer levels.
    #[serde(default)]
    pub websockets: Counts,
    /// Per pool, WebSockets asked to close that are still open: while
    /// there are any, nobody plans (their clients have not come back).
    #[serde(default)]
    pub closing: HashMap<String, usize>,
}

impl Published {
    /// `INSTANCE#PID`: who published it, and who may hold a lease.
    pub fn holder(&self) -> String {
        format!("{}#{}", self.instance, self.pid)
    }
}

/// The sums of the others' counts (`pick` chooses which), per pool and
/// backend: what holder `own` adds to its view. Entries of `own` itself
/// are skipped (its own counts are live).
pub fn others(own: &str, published: &[Published], pick: fn(&Published) -> &Counts) -> Counts {
    let mut sums: Counts = HashMap::new();
    for p in published.iter().filter(|p| p.holder() != own) {
        for (pool, backends) in pick(p) {
            let pool_sums = sums.entry(pool.clone()).or_default();
            for (backend, n) in backends {
                *pool_sums.entry(backend.clone()).or_default() += n;
            }
        }
    }
    sums
}

/// One rebalance decision for the whole cluster, made by the instance
/// that holds the pool's shed lease: close `shares[INSTANCE#PID]` of
/// `backend`'s WebSockets on each instance, spread over `spread_ms`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedPlan {
    /// The lease's fencing token: a plan under an older token than one
    /// already seen is refused.
    pub token: u64,
    /// Counts the holder's plans under one token.
    pub seq: u64,
    /// The instance that made it.
    pub by: String,
    pub backend: String,
    pub shares: BTreeMap<String, usize>,
    pub spread_ms: u64,
}

impl SharedPlan {
    /// Plans are carried out in this order; an older one never after a
    /// newer.
    pub fn order(&self) -> (u64, u64) {
        (self.token, self.seq)
    }

    /// Whether this plan comes after `seen` (the newest carried out or
    /// queued so far), so it is to be carried out.
    pub fn is_after(&self, seen: Option<(u64, u64)>) -> bool {
        seen.is_none_or(|seen| self.order() > seen)
    }

    /// The closes asked of `instance`.
    pub fn share_of(&self, instance: &str) -> usize {
        self.shares.get(instance).copied().unwrap_or(0)
    }
}

/// Splits `count` closes among instances in proportion to the WebSockets
/// each has on the backend (`have`), by largest remainder, never more
/// than one has. Instances with none get none.
pub fn split(count: usize, have: &[(String, usize)]) -> BTreeMap<String, usize> {
    let total: usize = have.iter().map(|(_, n)| n).sum();
    let count = count.min(total);
    let mut shares: BTreeMap<String, usize> = BTreeMap::new();
    if count == 0 {
        return shares;
    }
    let mut rest: Vec<(f64, &str, usize)> = Vec::new();
    let mut given = 0;
    for (instance, n) in have.iter().filter(|(_, n)| *n > 0) {
        let exact = count as f64 * *n as f64 / total as f64;
        let whole = (exact.floor() as usize).min(*n);
        given += whole;
        shares.insert(instance.clone(), whole);
        rest.push((exact - whole as f64, instance, *n));
    }
    // Largest remainders first; ties by name, so every instance agrees.
    rest.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    for (_, instance, n) in rest.iter().cycle().take(rest.len() * 2) {
        if given == count {
            break;
        }
        let share = shares.entry((*instance).to_string()).or_default();
        if *share < *n {
            *share += 1;
            given += 1;
        }
    }
    shares.retain(|_, n| *n > 0);
    shares
}

/// Moved pins as one stream entry holds them: `NONCE:BACKEND,...`
/// (names hold no ':' or ','; an empty backend is none).
pub fn encode_moved(pins: &[(u64, String)]) -> String {
    let parts: Vec<String> = pins.iter().map(|(n, b)| format!("{n}:{b}")).collect();
    parts.join(",")
}

/// The pins of an entry; malformed parts are skipped.
pub fn decode_moved(text: &str) -> Vec<(u64, String)> {
    text.split(',')
        .filter_map(|part| {
            let (nonce, backend) = part.split_once(':')?;
            Some((nonce.parse().ok()?, backend.to_string()))
        })
        .collect()
}

/// A drain an operator started through some instance, as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedDrain {
    pub pool: String,
    pub backend: String,
    pub window_ms: u64,
    /// Wall clock at the start, ms since the epoch, so that every
    /// instance closes over the same window.
    pub started_ms: u64,
    /// The instance it was started through.
    pub by: String,
}

impl SharedDrain {
    /// The field of the drains hash that holds it (names cannot hold '/').
    pub fn field(pool: &str, backend: &str) -> String {
        format!("{pool}/{backend}")
    }

    /// What is left of its window at `now_ms`.
    pub fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis((self.started_ms + self.window_ms).saturating_sub(now_ms))
    }
}

/// One backend as this instance has it: by pool and name, and whether an
/// operator's drain (here or through another instance) holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBackend {
    pub pool: String,
    pub backend: String,
    /// Some drain runs here (an operator's, or a reload's, or the shutdown's).
    pub draining: bool,
    /// That drain is an operator's, so it follows the shared state.
    pub operator: bool,
}

/// What this instance must do so that its drains match the shared ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainAction {
    /// Drain it over what is left of the shared drain's window.
    Start {
        pool: String,
        backend: String,
        window: Duration,
    },
    /// Put it back in rotation: its shared drain was undone.
    Stop { pool: String, backend: String },
}

/// The actions that bring `local` in line with `shared` at `now_ms`.
/// Backends in `pending` (an operator's change here that Redis does not
/// hold yet) are left alone; so are drains that are not an operator's.
pub fn reconcile(
    shared: &[SharedDrain],
    local: &[LocalBackend],
    pending: &HashSet<(String, String)>,
    now_ms: u64,
) -> Vec<DrainAction> {
    let wanted: HashMap<(&str, &str), &SharedDrain> = shared
        .iter()
        .map(|d| ((d.pool.as_str(), d.backend.as_str()), d))
        .collect();
    let mut actions = Vec::new();
    for b in local {
        if pending.contains(&(b.pool.clone(), b.backend.clone())) {
            continue;
        }
        match wanted.get(&(b.pool.as_str(), b.backend.as_str())) {
            Some(d) if !b.draining => actions.push(DrainAction::Start {
                pool: b.pool.clone(),
                backend: b.backend.clone(),
                window: d.remaining(now_ms),
            }),
            None if b.draining && b.operator => actions.push(DrainAction::Stop {
                pool: b.pool.clone(),
                backend: b.backend.clone(),
            }),
            _ => {}
        }
    }
    actions
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
            pid: 1,
            websockets: pools.clone(),
            pools,
            closing: HashMap::new(),
        }
    }

    #[test]
    fn the_others_counts_are_summed_and_ones_own_skipped() {
        let all = [
            published("lb-1", &[("app", "b1", 100), ("app", "b2", 5)]),
            published("lb-2", &[("app", "b1", 7), ("app", "b3", 2)]),
            published("lb-3", &[("app", "b1", 1), ("other", "x", 4)]),
        ];
        let sums = others("lb-1#1", &all, |p| &p.pools);
        assert_eq!(sums["app"]["b1"], 8);
        assert_eq!(sums["app"]["b3"], 2);
        assert!(!sums["app"].contains_key("b2"));
        assert_eq!(sums["other"]["x"], 4);
        assert!(others("lb-1#1", &all[..1], |p| &p.websockets).is_empty());
        // The same instance's other process (an upgrade) counts.
        let mut old = all[0].clone();
        old.pid = 2;
        assert_eq!(
            others("lb-1#1", &[all[0].clone(), old], |p| &p.pools)["app"]["b1"],
            100
        );
        // Published by an older version: no WebSocket counts.
        let old: Published =
            serde_json::from_str(r#"{"instance":"lb-9","pools":{"app":{"b1":3}}}"#).expect("old");
        assert!(old.websockets.is_empty());
    }

    fn have(list: &[(&str, usize)]) -> Vec<(String, usize)> {
        list.iter().map(|(i, n)| (i.to_string(), *n)).collect()
    }

    #[test]
    fn a_shed_is_split_by_what_each_instance_has() {
        let shares = split(50, &have(&[("lb-1", 300), ("lb-2", 100)]));
        assert_eq!(shares["lb-1"], 38);
        assert_eq!(shares["lb-2"], 12);
        // Never more than one has, nor more than all have.
        let shares = split(50, &have(&[("lb-1", 3), ("lb-2", 0), ("lb-3", 10)]));
        assert_eq!(shares.values().sum::<usize>(), 13);
        assert!(!shares.contains_key("lb-2"));
        assert!(split(0, &have(&[("lb-1", 3)])).is_empty());
        assert!(split(5, &[]).is_empty());
        // Remainders: three equal instances, 10 closes.
        let shares = split(10, &have(&[("a", 5), ("b", 5), ("c", 5)]));
        assert_eq!(shares.values().sum::<usize>(), 10);
        assert!(shares.values().all(|&n| (3..=4).contains(&n)), "{shares:?}");
    }

    #[test]
    fn split_never_loses_or_invents_a_close() {
        let mut rng = 7u64;
        let mut next = |m: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % m
        };
        for _ in 0..2000 {
            let n = 1 + next(5) as usize;
            let list: Vec<(String, usize)> = (0..n)
                .map(|i| (format!("lb-{i}"), next(200) as usize))
                .collect();
            let count = next(300) as usize;
            let shares = split(count, &list);
            let total: usize = list.iter().map(|(_, n)| n).sum();
            assert_eq!(
                shares.values().sum::<usize>(),
                count.min(total),
                "{list:?} {count}"
            );
            for (instance, n) in &list {
                let share = shares.get(instance).copied().unwrap_or(0);
                assert!(share <= *n);
                // Within one of its proportional share.
                if total > 0 {
                    let exact = count.min(total) as f64 * *n as f64 / total as f64;
                    assert!(
                        (share as f64 - exact).abs() < 1.0 + 1e-9,
                        "{list:?} {count}"
                    );
                }
            }
        }
    }

    #[test]
    fn plans_under_an_older_token_are_fenced_off() {
        let plan = |token, seq| SharedPlan {
            token,
            seq,
            by: "lb-1".into(),
            backend: "b1".into(),
            shares: BTreeMap::from([("lb-1".to_string(), 3)]),
            spread_ms: 100,
        };
        assert!(plan(1, 1).is_after(None));
        assert!(plan(1, 2).is_after(Some((1, 1))));
        assert!(plan(2, 1).is_after(Some((1, 9))));
        assert!(!plan(1, 9).is_after(Some((2, 1))), "a paused holder's plan");
        assert!(!plan(2, 1).is_after(Some((2, 1))), "once only");
        assert_eq!(plan(1, 1).share_of("lb-1"), 3);
        assert_eq!(plan(1, 1).share_of("lb-2"), 0);
    }

    #[test]
    fn moved_pins_round_trip_and_bad_parts_are_skipped() {
        let pins = vec![(7u64, "b1".to_string()), (u64::MAX, String::new())];
        assert_eq!(decode_moved(&encode_moved(&pins)), pins);
        assert_eq!(
            decode_moved("1:b1,x:b2,,3,4:b4"),
            [(1, "b1".to_string()), (4, "b4".to_string())]
        );
        assert!(decode_moved("").is_empty());
    }

    fn local(pool: &str, backend: &str, draining: bool, operator: bool) -> LocalBackend {
        LocalBackend {
            pool: pool.into(),
            backend: backend.into(),
            draining,
            operator,
        }
    }

    #[test]
    fn local_drains_follow_the_shared_ones() {
        let shared = [SharedDrain {
            pool: "app".into(),
            backend: "b1".into(),
            window_ms: 10_000,
            started_ms: 1_000,
            by: "lb-2".into(),
        }];
        let here = [
            local("app", "b1", false, false),
            local("app", "b2", true, true),
            local("app", "b3", true, false),
        ];
        let actions = reconcile(&shared, &here, &HashSet::new(), 4_000);
        assert_eq!(
            actions,
            [
                DrainAction::Start {
                    pool: "app".into(),
                    backend: "b1".into(),
                    window: Duration::from_secs(7),
                },
                // An operator's drain that no instance holds any more.
                DrainAction::Stop {
                    pool: "app".into(),
                    backend: "b2".into(),
                },
            ]
        );
        // b3 drains for a reload or the shutdown: not the cluster's.
        // A change here not yet in Redis is left alone.
        let pending = HashSet::from([("app".to_string(), "b2".to_string())]);
        assert_eq!(reconcile(&shared, &here, &pending, 4_000).len(), 1);
        // Late: the window is over, the drain closes at once.
        let late = reconcile(&shared, &here[..1], &HashSet::new(), 20_000);
        assert_eq!(
            late,
            [DrainAction::Start {
                pool: "app".into(),
                backend: "b1".into(),
                window: Duration::ZERO,
            }]
        );
        // Already draining: nothing to do.
        assert!(
            reconcile(
                &shared,
                &[local("app", "b1", true, true)],
                &HashSet::new(),
                0
            )
            .is_empty()
        );
    }
}
