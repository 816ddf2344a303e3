//! Backend selection for new connections.
//!
//! Owns the algorithms: plain functions over each backend's load and weight
//! (least_conn, p2c), the little state round robin needs, the consistent
//! hash ring (`hash`) and sticky cookies (`sticky`). Reads counts only;
//! never connects and never changes a count (the caller leases the pick).

pub mod hash;
pub mod sticky;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::RngExt;

use crate::config::{Algorithm, PoolConfig};
use hash::Ring;

/// What the balancer knows of one backend at pick time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Live WebSockets + in-flight HTTP requests.
    pub active: usize,
    /// Effective weight: the configured one, lowered during slow start.
    pub weight: f64,
    /// Slow-start ramp, 0 to 1 (1 when not ramping).
    pub ramp: f64,
    /// False when the backend must not get this connection (already tried).
    pub eligible: bool,
}

/// Least connections relative to weight: the backend whose load after
/// taking one more connection, `(active + 1) / weight`, is smallest. Ties go
/// to the first in order starting at `start`, so equal backends take turns.
pub fn pick_least_conn(loads: &[Load], start: usize) -> Option<usize> {
    let n = loads.len();
    let mut best: Option<usize> = None;
    for step in 0..n {
        let i = (start + step) % n;
        let load = loads[i];
        if !load.eligible {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                let cur = loads[b];
                (load.active as f64 + 1.0) / load.weight < (cur.active as f64 + 1.0) / cur.weight
            }
        };
        if better {
            best = Some(i);
        }
    }
    best
}

/// Power of two random choices: of two distinct eligible backends drawn
/// at random, the one with less load relative to weight.
pub fn pick_p2c(loads: &[Load], rng: &mut impl rand::Rng) -> Option<usize> {
    let eligible: Vec<usize> = (0..loads.len()).filter(|&i| loads[i].eligible).collect();
    match eligible.len() {
        0 => None,
        1 => Some(eligible[0]),
        n => {
            let a = rng.random_range(0..n);
            let b = (a + 1 + rng.random_range(0..n - 1)) % n;
            let score = |i: usize| (loads[i].active as f64 + 1.0) / loads[i].weight;
            let (a, b) = (eligible[a], eligible[b]);
            Some(if score(b) < score(a) { b } else { a })
        }
    }
}

/// Whether backend `i` may take one more connection under bounded-load
/// hashing with `factor`: `(active + 1) ≤ factor × (total + 1) × weight /
/// total weight`, over the eligible backends (HAProxy's
/// `hash-balance-factor`, Envoy's bounded-load hashing). Without a factor
/// every backend may.
pub fn within_bound(loads: &[Load], factor: Option<f64>) -> impl Fn(usize) -> bool + '_ {
    let (total, weights) = loads
        .iter()
        .filter(|l| l.eligible)
        .fold((0usize, 0.0f64), |(n, w), l| (n + l.active, w + l.weight));
    move |i: usize| match (factor, loads.get(i)) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(f), Some(l)) => {
            weights > 0.0 && (l.active + 1) as f64 <= f * (total + 1) as f64 * l.weight / weights
        }
    }
}

/// A hash mapped onto [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Smooth weighted round robin (as in nginx): over a cycle of total weight
/// picks, each backend is picked `weight` times, interleaved.
#[derive(Debug, Default)]
pub struct SmoothRoundRobin {
    current: Vec<f64>,
}

impl SmoothRoundRobin {
    pub fn next(&mut self, loads: &[Load]) -> Option<usize> {
        self.current.resize(loads.len(), 0.0);
        let mut total = 0.0;
        let mut best: Option<usize> = None;
        for (i, load) in loads.iter().enumerate() {
            if !load.eligible {
                continue;
            }
            let w = load.weight;
            self.current[i] += w;
            total += w;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }
}

/// A pool's balancer: its algorithm and that algorithm's state.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    /// Bounded-load hashing, when set (`hash_balance_factor`).
    factor: Option<f64>,
    /// The ring, for `hash`.
    ring: Option<Ring>,
    /// Where least_conn starts looking, so that ties rotate.
    rotation: AtomicUsize,
    round_robin: Mutex<SmoothRoundRobin>,
}

impl Balancer {
    pub fn new(pool: &PoolConfig) -> Self {
        let ring = matches!(pool.algorithm, Algorithm::Hash(_)).then(|| {
            let names: Vec<(&str, u32)> = pool
                .backends
                .iter()
                .map(|b| (b.name.as_str(), b.weight))
                .collect();
            Ring::new(&names)
        });
        Self {
            algorithm: pool.algorithm.clone(),
            factor: pool.hash_balance_factor,
            ring,
            rotation: AtomicUsize::new(0),
            round_robin: Mutex::new(SmoothRoundRobin::default()),
        }
    }

    /// Picks among `loads`; `None` when no backend is eligible. `key` is
    /// the request's hash key, for `hash` (without one it falls back to
    /// least connections).
    pub fn pick(&self, loads: &[Load], key: Option<u64>) -> Option<usize> {
        if loads.is_empty() {
            return None;
        }
        match (&self.algorithm, &self.ring, key) {
            (Algorithm::Hash(_), Some(ring), Some(key)) => {
                let strict = |i: usize| loads.get(i).is_some_and(|l| l.eligible);
                let bounded = within_bound(loads, self.factor);
                let eligible = |i: usize| strict(i) && bounded(i);
                // During slow start a backend takes back only the share of
                // its keys the ramp allows, the same keys every time; when
                // every candidate is ramping, the ramp gives way.
                ring.pick(key, |i| {
                    eligible(i) && loads[i].ramp >= 1.0
                        || eligible(i)
                            && unit(hash::hash64(&(key ^ i as u64).to_le_bytes())) < loads[i].ramp
                })
                .or_else(|| ring.pick(key, eligible))
                // Nobody under the bound (a pool nearly empty): the ring alone.
                .or_else(|| ring.pick(key, strict))
            }
            (Algorithm::RoundRobin, _, _) => self
                .round_robin
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .next(loads),
            (Algorithm::P2c, _, _) => pick_p2c(loads, &mut rand::rng()),
            _ => {
                let start = self.rotation.fetch_add(1, Ordering::Relaxed) % loads.len();
                pick_least_conn(loads, start)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(active: &[usize], weights: &[f64]) -> Vec<Load> {
        active
            .iter()
            .zip(weights)
            .map(|(&active, &weight)| Load {
                active,
                weight,
                ramp: 1.0,
                eligible: true,
            })
            .collect()
    }

    #[test]
    fn least_conn_picks_the_emptiest() {
        assert_eq!(pick_least_conn(&loads(&[5, 2, 9], &[1.0; 3]), 0), Some(1));
    }

    #[test]
    fn least_conn_ties_rotate_with_start() {
        let l = loads(&[3, 3, 3], &[1.0; 3]);
        assert_eq!(pick_least_conn(&l, 0), Some(0));
        assert_eq!(pick_least_conn(&l, 1), Some(1));
        assert_eq!(pick_least_conn(&l, 2), Some(2));
    }

    #[test]
    fn least_conn_skips_ineligible_and_empty() {
        let mut l = loads(&[0, 4], &[1.0; 2]);
        l[0].eligible = false;
        assert_eq!(pick_least_conn(&l, 0), Some(1));
        l[1].eligible = false;
        assert_eq!(pick_least_conn(&l, 0), None);
        assert_eq!(pick_least_conn(&[], 0), None);
    }

    #[test]
    fn least_conn_honours_weight() {
        // Sequential picks with weights 1:2:3 fill backends 1:2:3.
        let weights = [1.0, 2.0, 3.0];
        let mut active = [0usize; 3];
        for round in 0..600 {
            let i = pick_least_conn(&loads(&active, &weights), round % 3).expect("eligible");
            active[i] += 1;
        }
        assert_eq!(active, [100, 200, 300]);
    }

    #[test]
    fn a_backend_in_slow_start_takes_a_fraction() {
        // Effective weight 0.1 against two full ones with 100 each: it
        // takes new connections until it holds about a tenth as many.
        let mut active = [100usize, 100, 0];
        for round in 0..30 {
            let l = [
                Load {
                    active: active[0],
                    weight: 1.0,
                    ramp: 1.0,
                    eligible: true,
                },
                Load {
                    active: active[1],
                    weight: 1.0,
                    ramp: 1.0,
                    eligible: true,
                },
                Load {
                    active: active[2],
                    weight: 0.1,
                    ramp: 0.1,
                    eligible: true,
                },
            ];
            active[pick_least_conn(&l, round % 3).expect("eligible")] += 1;
        }
        assert!((9..=12).contains(&active[2]), "{active:?}");
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let mut rr = SmoothRoundRobin::default();
        let l = loads(&[0, 0, 0], &[5.0, 1.0, 1.0]);
        let seq: Vec<usize> = (0..7).map(|_| rr.next(&l).expect("eligible")).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn p2c_prefers_the_lighter_of_two_and_skips_ineligible() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut l = loads(&[0, 1000, 1000], &[1.0; 3]);
        // Backend 0 is drawn in 2 of 3 pairs, and always wins them.
        let wins = (0..3000)
            .filter(|_| pick_p2c(&l, &mut rng) == Some(0))
            .count();
        assert!((1900..=2100).contains(&wins), "{wins}");
        l[0].eligible = false;
        assert!((0..100).all(|_| pick_p2c(&l, &mut rng) != Some(0)));
        l[1].eligible = false;
        assert_eq!(pick_p2c(&l, &mut rng), Some(2));
        l[2].eligible = false;
        assert_eq!(pick_p2c(&l, &mut rng), None);
    }

    #[test]
    fn p2c_spreads_evenly() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut active = [0usize; 3];
        for _ in 0..3000 {
            let i = pick_p2c(&loads(&active, &[1.0; 3]), &mut rng).expect("eligible");
            active[i] += 1;
        }
        assert!(
            active.iter().all(|&n| (980..=1020).contains(&n)),
            "{active:?}"
        );
    }

    /// A hash pool (on the client address) of `n` backends `b0`, `b1`, ...
    fn hash_pool(n: usize) -> crate::config::PoolConfig {
        use crate::config::{BackendConfig, HashKey, PoolConfig};
        let backends = (0..n)
            .map(|i| BackendConfig {
                name: format!("b{i}"),
                address: "127.0.0.1:1".parse().expect("addr"),
                weight: 1,
                tls: None,
            })
            .collect();
        let mut pool = PoolConfig::new("p", backends);
        pool.algorithm = Algorithm::Hash(HashKey::Ip);
        pool
    }

    #[test]
    fn hash_gives_a_ramping_backend_a_growing_part_of_its_keys() {
        let balancer = Balancer::new(&hash_pool(3));
        let mut l = loads(&[0, 0, 0], &[1.0; 3]);
        let owned = |l: &[Load]| {
            (0..3000u64)
                .filter(|k| balancer.pick(l, Some(hash::hash64(&k.to_le_bytes()))) == Some(0))
                .count()
        };
        let full = owned(&l);
        l[0].ramp = 0.25;
        let quarter = owned(&l);
        l[0].ramp = 0.75;
        let most = owned(&l);
        assert!(quarter < most && most < full, "{quarter} {most} {full}");
        assert!(
            (quarter as f64 - 0.25 * full as f64).abs() < 0.06 * full as f64,
            "{quarter} of {full}"
        );
    }

    #[test]
    fn bounded_hashing_spills_keys_of_a_full_backend_and_only_those() {
        let mut pool = hash_pool(3);
        let strict = Balancer::new(&pool);
        pool.hash_balance_factor = Some(1.25);
        let bounded = Balancer::new(&pool);
        let keys: Vec<u64> = (0..3000u64)
            .map(|k| hash::hash64(&k.to_le_bytes()))
            .collect();
        // b0 holds 60 of 90: above 1.25 × its share (37.5 after one more).
        let full = loads(&[60, 15, 15], &[1.0; 3]);
        let mut moved = 0;
        for &k in &keys {
            let (was, now) = (strict.pick(&full, Some(k)), bounded.pick(&full, Some(k)));
            if was != now {
                moved += 1;
                assert_eq!(was, Some(0), "only the full backend's keys move");
            } else {
                assert_ne!(now, Some(0));
            }
        }
        assert!(moved > 800, "about a third of the keys spill: {moved}");
        // Within the bound nothing moves.
        let level = loads(&[30, 30, 30], &[1.0; 3]);
        assert!(
            keys.iter()
                .all(|&k| strict.pick(&level, Some(k)) == bounded.pick(&level, Some(k)))
        );
        let bound = within_bound(&full, Some(1.25));
        assert!(!bound(0) && bound(1) && bound(2));
        assert!(within_bound(&full, None)(0));
    }

    #[test]
    fn hash_still_places_keys_when_every_backend_is_ramping() {
        let balancer = Balancer::new(&hash_pool(1));
        let mut l = loads(&[0], &[1.0]);
        l[0].ramp = 0.02;
        assert!(
            (0..1000u64)
                .all(|k| balancer.pick(&l, Some(hash::hash64(&k.to_le_bytes()))) == Some(0))
        );
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let mut rr = SmoothRoundRobin::default();
        let mut l = loads(&[0, 0], &[1.0; 2]);
        l[0].eligible = false;
        assert_eq!(rr.next(&l), Some(1));
        assert_eq!(rr.next(&l), Some(1));
    }
}
