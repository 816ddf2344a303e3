//! The dashboard's history: a sample of every pool each second, the last
//! few minutes of them kept in a ring.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

use super::api;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept: ten minutes.
pub const KEPT: usize = 600;

/// The samples kept, oldest first.
#[derive(Debug, Default)]
pub struct Timeline {
    inner: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    samples: VecDeque<api::Sample>,
    next: u64,
}

impl Timeline {
    /// Adds a sample of `pools` taken at `at`, dropping the oldest past
    /// `KEPT`.
    pub fn push(&self, at: SystemTime, pools: Vec<api::PoolSample>) {
        let mut ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let seq = ring.next;
        ring.next += 1;
        if ring.samples.len() == KEPT {
            ring.samples.pop_front();
        }
        ring.samples.push_back(api::Sample {
            seq,
            at_ms: at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            pools,
        });
    }

    /// The samples numbered `since` and after (all kept for `None`).
    pub fn since(&self, since: Option<u64>) -> api::Timeline {
        let ring = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let from = since.unwrap_or(0);
        api::Timeline {
            interval_ms: INTERVAL.as_millis() as u64,
            next: ring.next,
            samples: ring
                .samples
                .iter()
                .filter(|s| s.seq >= from)
                .cloned()
                .collect(),
        }
    }
}

/// Every pool as the registry shows it now.
pub fn sample(registry: &Registry) -> Vec<api::PoolSample> {
    registry
        .pools()
        .iter()
        .map(|pool| api::PoolSample {
            name: pool.name.clone(),
            admission_waiting: pool.stats.admission_waiting.load(Ordering::Relaxed) as u64,
            admission_rejected: pool.stats.admission_rejected.load(Ordering::Relaxed),
            backends: pool
                .all_backends()
                .iter()
                .map(|b| api::BackendSample {
                    name: b.name.clone(),
                    state: b.condition().into(),
                    connections: api::Connections {
                        ws: b.ws_count() as u64,
                        http: b.http_count() as u64,
                    },
                    drain_closed: b.drain_closed.load(Ordering::Relaxed),
                    rebalance_shed: b.rebalance_shed.load(Ordering::Relaxed),
                })
                .collect(),
        })
        .collect()
}

/// Samples the registry every `INTERVAL` until `stop`.
pub async fn run(registry: Arc<Registry>, timeline: Arc<Timeline>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => timeline.push(SystemTime::now(), sample(&registry)),
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_samples_and_answers_from_a_number() {
        let timeline = Timeline::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        for i in 0..(KEPT as u64 + 5) {
            timeline.push(t0 + Duration::from_secs(i), Vec::new());
        }
        let all = timeline.since(None);
        assert_eq!(all.samples.len(), KEPT);
        assert_eq!(all.samples[0].seq, 5);
        assert_eq!(all.next, KEPT as u64 + 5);
        assert_eq!(all.samples[0].at_ms, 1_005_000);
        let tail = timeline.since(Some(all.next - 2));
        let seqs: Vec<u64> = tail.samples.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, [KEPT as u64 + 3, KEPT as u64 + 4]);
        assert!(timeline.since(Some(all.next)).samples.is_empty());
    }
}
