//! Automatic, gentle rebalancing of long-lived connections.
//!
//! Owns the rebalance plan: every interval, which backend of a pool is
//! overloaded relative to its weighted share, and how many of its
//! WebSockets to close so that clients reconnect (by least connections) to
//! the emptier backends. One shedder per interval, bounded, spread over the
//! interval, never more than the excess and never more than the others can
//! take. Does not touch sockets: it asks registry handles to close, like a
//! drain does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::RebalanceConfig;
use crate::registry::{BackendState, CloseReason, PoolEntry};

/// One backend as the plan sees it.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Live WebSockets.
    pub count: usize,
    /// Current weight (later: lowered during slow start).
    pub weight: f64,
    /// In rotation: may give and receive connections.
    pub eligible: bool,
}

/// Close `count` of backend `backend`'s connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed {
    pub backend: usize,
    pub count: usize,
}

/// The decision of one interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Connections on eligible backends.
    pub total: usize,
    /// Each backend's weighted share of `total` (0 when not eligible).
    pub shares: Vec<f64>,
    /// Backends off their share by more than `tolerance × share` and more
    /// than `min_excess`, above or below.
    pub outliers: Vec<usize>,
    pub shed: Option<Shed>,
    /// Why nothing is shed, when nothing is.
    pub note: &'static str,
}

/// Decides what to shed this interval (pure).
pub fn plan(members: &[Member], cfg: &RebalanceConfig) -> Plan {
    let eligible: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].eligible)
        .collect();
    let total: usize = eligible.iter().map(|&i| members[i].count).sum();
    let weights: f64 = eligible.iter().map(|&i| members[i].weight).sum();
    let shares: Vec<f64> = members
        .iter()
        .map(|m| {
            if m.eligible && weights > 0.0 {
                total as f64 * m.weight / weights
            } else {
                0.0
            }
        })
        .collect();
    let mut out = Plan {
        total,
        shares,
        ..Plan::default()
    };
    if eligible.len() < 2 || total == 0 {
        out.note = "pool too small";
        return out;
    }
    // Outside the tolerated range, on either side, by more than min_excess.
    out.outliers = eligible
        .iter()
        .copied()
        .filter(|&i| {
            let (count, share) = (members[i].count as f64, out.shares[i]);
            let off = (count - share).abs();
            off > cfg.min_excess as f64 && off > share * cfg.tolerance
        })
        .collect();
    if out.outliers.is_empty() {
        out.note = "level";
        return out;
    }
    // Only the most overloaded backend, relative to its share, sheds: the
    // overloaded outlier, or, when the outlier is an underloaded backend,
    // whichever has the most over its share.
    let Some(&worst) = eligible
        .iter()
        .filter(|&&i| members[i].count as f64 - out.shares[i] > cfg.min_excess as f64)
        .max_by(|&&a, &&b| {
            let ratio = |i: usize| members[i].count as f64 / out.shares[i].max(f64::MIN_POSITIVE);
            ratio(a).total_cmp(&ratio(b))
        })
    else {
        out.note = "no backend far enough over its share";
        return out;
    };
    // Room below their share on the others: never send more than fits.
    let room: f64 = eligible
        .iter()
        .filter(|&&j| j != worst)
        .map(|&j| (out.shares[j] - members[j].count as f64).max(0.0))
        .sum();
    let excess = members[worst].count as f64 - out.shares[worst];
    let count = (excess.min(room).floor() as usize).min(cfg.max_shed_per_interval);
    if count == 0 {
        out.note = "no backend to receive";
        return out;
    }
    out.shed = Some(Shed {
        backend: worst,
        count,
    });
    out
}

/// Why the pool must not shed now, if it must not: a drain under way, or
/// admission holding clients back (some waiting now, or refused since the
/// last look, given as (refused so far, any waiting)).
pub fn hold(
    draining: bool,
    admission_now: (u64, bool),
    admission_before: (u64, bool),
) -> Option<&'static str> {
    if draining {
        Some("drain in progress")
    } else if admission_now.1 || admission_now.0 != admission_before.0 {
        // Moving more clients would only add to the queue.
        Some("admission is holding connections back")
    } else {
        None
    }
}

/// The last decision for a pool, for the admin API.
#[derive(Debug, Clone)]
pub struct Report {
    pub at: Instant,
    pub plan: Plan,
    /// Closes actually asked for (fewer than planned when too few
    /// connections were old enough).
    pub shed: usize,
}

/// Last reports, by pool name.
#[derive(Debug, Default)]
pub struct Reports(Mutex<HashMap<String, Report>>);

impl Reports {
    fn set(&self, pool: &str, report: Report) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pool.to_string(), report);
    }

    /// Forgets every report (after a reload).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The last report of `pool`.
    pub fn get(&self, pool: &str) -> Option<Report> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pool)
            .cloned()
    }
}

/// The pool's backends as the plan sees them at `at`.
fn members_at(pool: &PoolEntry, at: Instant) -> Vec<Member> {
    pool.backends
        .iter()
        .map(|b| Member {
            count: b.ws_count(),
            weight: b.effective_weight(at),
            eligible: b.is_accepting(),
        })
        .collect()
}

/// Rebalances `pool` every interval until `shutdown` (a reload ends it
/// and starts another with the new settings).
pub async fn run(pool: Arc<PoolEntry>, reports: Arc<Reports>, shutdown: CancellationToken) {
    let mut cfg = pool.cfg.rebalance;
    if let Some(factor) = pool.cfg.hash_balance_factor {
        // Keys may sit up to the factor over their share: within that the
        // balancer and the rebalancer agree, so nothing flaps.
        cfg.tolerance = cfg.tolerance.max(factor - 1.0);
    }
    let close_code = pool.cfg.drain.close_code;
    let p = pool.name.as_str();
    // Connections younger than this are not shed: nobody is bounced twice
    // in a row.
    let min_age = cfg.interval * 2;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_pressure = pool.stats.admission_pressure();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let at = Instant::now();
        let pressure = pool.stats.admission_pressure();
        // Backends a reload removed count too: their clients are moving.
        let draining = pool
            .all_backends()
            .iter()
            .any(|b| b.state() == BackendState::Draining);
        let busy = hold(draining, pressure, last_pressure);
        last_pressure = pressure;
        if let Some(note) = busy {
            let plan = Plan {
                note,
                ..Plan::default()
            };
            reports.set(p, Report { at, plan, shed: 0 });
            continue;
        }
        let members = members_at(&pool, at);
        let decided = plan(&members, &cfg);
        let Some(shed) = decided.shed else {
            debug!(pool = %pool.name, note = decided.note, "rebalance: nothing to shed");
            reports.set(
                p,
                Report {
                    at,
                    plan: decided,
                    shed: 0,
                },
            );
            continue;
        };
        let backend = pool.backends[shed.backend].clone();
        let mut victims: Vec<_> = backend
            .connections()
            .into_iter()
            .filter(|c| c.started.elapsed() >= min_age)
            .collect();
        victims.shuffle(&mut rand::rng());
        victims.truncate(shed.count);
        let counts: Vec<usize> = members.iter().map(|m| m.count).collect();
        info!(
            pool = %pool.name,
            backend = %backend.name,
            shed = victims.len(),
            share = decided.shares[shed.backend].round(),
            ?counts,
            "rebalancing: closing connections of an overloaded backend"
        );
        reports.set(
            p,
            Report {
                at,
                plan: decided,
                shed: victims.len(),
            },
        );
        // Spread the closes over most of the interval, so they are all out
        // before the next look.
        let spread = cfg.interval.mul_f64(0.8);
        let n = victims.len();
        for (i, conn) in victims.iter().enumerate() {
            let offset = spread.mul_f64(i as f64 / n as f64);
            tokio::select! {
                () = tokio::time::sleep_until((at + offset).into()) => {}
                () = shutdown.cancelled() => return,
            }
            if !backend.is_accepting()
                || pool
                    .all_backends()
                    .iter()
                    .any(|b| b.state() == BackendState::Draining)
            {
                break; // a drain began, or the backend went down: stop
            }
            // The pool may be within tolerance already (clients left, or
            // came back elsewhere): then the rest of the plan is not needed.
            let now = members_at(&pool, Instant::now());
            if plan(&now, &cfg).shed.is_none() {
                debug!(pool = %pool.name, backend = %backend.name, "rebalance: level before the planned closes were done");
                break;
            }
            // A sticky client is placed afresh when it comes back.
            pool.close_moving(
                &backend,
                conn,
                close_code,
                CloseReason::Rebalance,
                Instant::now(),
            );
            backend
                .rebalance_shed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn members(counts: &[usize], weights: &[f64]) -> Vec<Member> {
        counts
            .iter()
            .zip(weights)
            .map(|(&count, &weight)| Member {
                count,
                weight,
                eligible: true,
            })
            .collect()
    }

    #[test]
    fn level_pool_sheds_nothing() {
        let cfg = RebalanceConfig::default();
        let p = plan(&members(&[100, 110, 95], &[1.0; 3]), &cfg);
        assert_eq!((p.shed, p.note), (None, "level"));
        assert!(p.outliers.is_empty());
    }

    #[test]
    fn only_the_worst_sheds_at_most_its_excess_and_the_cap() {
        let cfg = RebalanceConfig::default();
        let p = plan(&members(&[0, 4500, 4600], &[1.0; 3]), &cfg);
        assert_eq!(p.outliers, [0, 1, 2]);
        assert_eq!(
            p.shed,
            Some(Shed {
                backend: 2,
                count: 50
            })
        );
        let cfg = RebalanceConfig {
            max_shed_per_interval: 10_000,
            ..cfg
        };
        // Excess of b3 over its share of 3033.3: 1566.
        assert_eq!(
            plan(&members(&[0, 4500, 4600], &[1.0; 3]), &cfg).shed,
            Some(Shed {
                backend: 2,
                count: 1566
            })
        );
    }

    #[test]
    fn small_or_unreceptive_pools_shed_nothing() {
        let cfg = RebalanceConfig::default();
        assert_eq!(plan(&members(&[500], &[1.0]), &cfg).note, "pool too small");
        let mut m = members(&[0, 500], &[1.0, 1.0]);
        m[0].eligible = false; // the only other backend is out of rotation
        assert_eq!(plan(&m, &cfg).note, "pool too small");
        // Beyond tolerance but not min_excess off the share.
        assert_eq!(plan(&members(&[10, 16], &[1.0, 1.0]), &cfg).note, "level");
        // An underloaded backend is filled from the most loaded one.
        let p = plan(&members(&[60, 118, 122], &[1.0; 3]), &cfg);
        assert_eq!(p.outliers, [0, 2]);
        assert_eq!(
            p.shed,
            Some(Shed {
                backend: 2,
                count: 22
            })
        );
        let p = plan(&members(&[70, 115, 115], &[1.0; 3]), &cfg);
        assert_eq!(p.outliers, [0], "only the underloaded one is out of range");
        assert_eq!(p.shed.map(|s| s.count), Some(15));
    }

    #[test]
    fn no_shedding_during_a_drain_or_while_admission_holds_back() {
        assert_eq!(
            hold(true, (0, false), (0, false)),
            Some("drain in progress")
        );
        assert_eq!(
            hold(false, (0, true), (0, false)),
            Some("admission is holding connections back")
        );
        assert_eq!(
            hold(false, (5, false), (3, false)),
            Some("admission is holding connections back")
        );
        assert_eq!(hold(false, (5, false), (5, false)), None);
    }

    #[test]
    fn weights_set_the_shares() {
        let cfg = RebalanceConfig::default();
        let p = plan(&members(&[100, 200, 300], &[1.0, 2.0, 3.0]), &cfg);
        assert_eq!(p.shares, [100.0, 200.0, 300.0]);
        assert_eq!(p.shed, None);
        let p = plan(&members(&[300, 200, 100], &[1.0, 2.0, 3.0]), &cfg);
        assert_eq!(
            p.shed,
            Some(Shed {
                backend: 0,
                count: 50
            })
        );
    }

    /// Clients that reconnect, by least connections, after a random delay
    /// when closed; the rebalancer looks every interval (fake clock).
    struct Sim {
        cfg: RebalanceConfig,
        weights: Vec<f64>,
        up: Vec<bool>,
        /// Per client: backend (None while reconnecting), connect time, reconnect time.
        clients: Vec<(Option<usize>, f64, f64)>,
        shed_count: Vec<u32>,
        total_shed: usize,
        rng: StdRng,
        now: f64,
    }

    impl Sim {
        fn new(cfg: RebalanceConfig, weights: &[f64], start: &[usize]) -> Self {
            let mut clients = Vec::new();
            for (b, &n) in start.iter().enumerate() {
                clients.extend((0..n).map(|_| (Some(b), -1000.0, 0.0)));
            }
            Self {
                cfg,
                weights: weights.to_vec(),
                up: vec![true; weights.len()],
                shed_count: vec![0; clients.len()],
                clients,
                total_shed: 0,
                rng: StdRng::seed_from_u64(7),
                now: 0.0,
            }
        }

        fn counts(&self) -> Vec<usize> {
            let mut c = vec![0; self.weights.len()];
            for (b, _, _) in &self.clients {
                if let Some(b) = b {
                    c[*b] += 1;
                }
            }
            c
        }

        fn members(&self) -> Vec<Member> {
            self.counts()
                .iter()
                .enumerate()
                .map(|(i, &count)| Member {
                    count,
                    weight: self.weights[i],
                    eligible: self.up[i],
                })
                .collect()
        }

        /// Reconnects due before `until`, in time order, by least connections.
        fn reconnect_until(&mut self, until: f64) {
            let mut due: Vec<usize> = (0..self.clients.len())
                .filter(|&i| self.clients[i].0.is_none() && self.clients[i].2 <= until)
                .collect();
            due.sort_by(|&a, &b| self.clients[a].2.total_cmp(&self.clients[b].2));
            for i in due {
                let counts = self.counts();
                let pick = (0..counts.len())
                    .filter(|&b| self.up[b])
                    .min_by(|&a, &b| {
                        ((counts[a] + 1) as f64 / self.weights[a])
                            .total_cmp(&((counts[b] + 1) as f64 / self.weights[b]))
                    })
                    .expect("a backend is up");
                self.clients[i] = (Some(pick), self.clients[i].2, 0.0);
            }
        }

        fn disconnect(&mut self, i: usize) {
            let delay = self.rng.random_range(0.0..self.cfg.interval.as_secs_f64());
            self.clients[i] = (None, 0.0, self.now + delay);
        }

        /// One interval: look, shed, let the clients come back.
        fn step(&mut self) -> Plan {
            let p = plan(&self.members(), &self.cfg);
            if let Some(shed) = p.shed {
                let min_age = self.cfg.interval.as_secs_f64() * 2.0;
                let mut old: Vec<usize> = (0..self.clients.len())
                    .filter(|&i| {
                        self.clients[i].0 == Some(shed.backend)
                            && self.now - self.clients[i].1 >= min_age
                    })
                    .collect();
                old.shuffle(&mut self.rng);
                for &i in old.iter().take(shed.count) {
                    self.shed_count[i] += 1;
                    self.total_shed += 1;
                    self.disconnect(i);
                }
            }
            self.now += self.cfg.interval.as_secs_f64();
            self.reconnect_until(self.now);
            p
        }

        fn within_tolerance(&self) -> bool {
            plan(&self.members(), &self.cfg).outliers.is_empty()
        }
    }

    fn sim_cfg() -> RebalanceConfig {
        // 150 a look: a restarted backend of 3 (2,400 moves to come within
        // tolerance) in 16 looks, 4 minutes at the default 15 s interval.
        // The default of 50 is gentler still: 12 minutes.
        RebalanceConfig {
            max_shed_per_interval: 150,
            ..RebalanceConfig::default()
        }
    }

    #[test]
    fn restarted_backend_is_refilled_within_20_intervals_and_cheaply() {
        let mut sim = Sim::new(sim_cfg(), &[1.0; 3], &[0, 4500, 4500]);
        let mut curve = vec![sim.counts()];
        let mut level_at = None;
        for interval in 1..=40 {
            sim.step();
            curve.push(sim.counts());
            if level_at.is_none() && sim.within_tolerance() {
                level_at = Some(interval);
            }
        }
        let level_at = level_at.unwrap_or_else(|| panic!("never level: {curve:?}"));
        assert!(
            level_at <= 20,
            "level after {level_at} intervals: {curve:?}"
        );
        assert!(
            sim.total_shed as f64 <= 1.25 * 3000.0,
            "{} closed",
            sim.total_shed
        );
        assert!(
            sim.shed_count.iter().all(|&n| n <= 1),
            "a client was closed twice"
        );
        println!("convergence (counts per interval): {curve:?}");
        println!(
            "level after {level_at} intervals, {} closed (minimum to level fully: 3000)",
            sim.total_shed
        );
    }

    #[test]
    fn level_pool_stays_untouched() {
        let mut sim = Sim::new(sim_cfg(), &[1.0; 3], &[3000, 3050, 2950]);
        for _ in 0..20 {
            assert_eq!(sim.step().shed, None);
        }
        assert_eq!(sim.total_shed, 0);
    }

    #[test]
    fn weights_one_two_three() {
        let mut sim = Sim::new(sim_cfg(), &[1.0, 2.0, 3.0], &[2000, 2000, 2000]);
        for _ in 0..30 {
            sim.step();
        }
        assert!(sim.within_tolerance(), "{:?}", sim.counts());
        // Minimum moves: b1 has 1,000 too many.
        assert!(sim.total_shed as f64 <= 1.25 * 1000.0, "{}", sim.total_shed);
    }

    #[test]
    fn pool_of_two() {
        let mut sim = Sim::new(sim_cfg(), &[1.0, 1.0], &[0, 1000]);
        for _ in 0..20 {
            sim.step();
        }
        assert!(sim.within_tolerance(), "{:?}", sim.counts());
        assert!(sim.total_shed as f64 <= 1.25 * 500.0, "{}", sim.total_shed);
        assert!(sim.shed_count.iter().all(|&n| n <= 1));
    }

    #[test]
    fn flapping_backend_does_not_cause_a_storm() {
        // b1 is down for 2 intervals out of every 6; its clients are
        // dropped (not by the rebalancer) and come back elsewhere.
        let mut sim = Sim::new(sim_cfg(), &[1.0; 3], &[1000, 1000, 1000]);
        let mut needed = 0.0;
        for interval in 0..36 {
            let down = interval % 6 < 2;
            if down && sim.up[0] {
                sim.up[0] = false;
                for i in 0..sim.clients.len() {
                    if sim.clients[i].0 == Some(0) {
                        sim.disconnect(i);
                    }
                }
            } else if !down && !sim.up[0] {
                sim.up[0] = true;
                // Refilling it takes at least its share.
                needed += sim.clients.len() as f64 / 3.0;
            }
            let p = sim.step();
            if let Some(shed) = p.shed {
                assert!(shed.count <= sim.cfg.max_shed_per_interval);
                assert!(sim.up[shed.backend]);
            }
        }
        assert!(
            sim.total_shed as f64 <= 1.25 * needed,
            "{} shed for {needed} needed",
            sim.total_shed
        );
    }
}
