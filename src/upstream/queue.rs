//! The admission queue: which backend may take a new connection now, and
//! waiting, first come first served and bounded, when none can.
//!
//! A backend can take one when it is in rotation, healthy, below
//! `max_connections_per_backend` and (with `admission`) has a token in its
//! bucket; a request that an idle kept-alive connection can carry needs no
//! token.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::balance::Load;
use crate::registry::{Backend, Lease, Registry};

use super::{Affinity, Upstream, UpstreamError};

/// How often a waiting connection looks for a full backend to free a slot.
const FULL_POLL: Duration = Duration::from_millis(20);

/// One connection counted as waiting for admission, until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstream {
    /// Picks a backend not in `tried` that may take a new connection now
    /// (in rotation, healthy, not full, an admission token to spare) and
    /// leases a slot on it. `Ok(None)`: backends accept, but none can take
    /// one right now.
    fn try_lease(
        &self,
        registry: &Arc<Registry>,
        tried: &[usize],
        affinity: Affinity,
    ) -> Result<Option<(usize, Lease)>, UpstreamError> {
        let backends = &self.pool.backends;
        let now = Instant::now();
        let max = self.cfg.max_connections_per_backend;
        let mut buckets = self
            .buckets
            .as_ref()
            .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()));
        let mut any_accepting = false;
        let loads: Vec<Load> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let candidate = b.is_accepting() && !tried.contains(&i);
                any_accepting |= candidate;
                let room = max == 0 || b.active() < max;
                // Admission limits new connections only: a request that an
                // idle connection can carry needs no token.
                let token = buckets.as_mut().is_none_or(|bk| {
                    (affinity.reusable && self.idle[i].has_ready()) || bk[i].has_token(now)
                });
                load_of(b, candidate && room && token, now)
            })
            .collect();
        let mut loads = loads;
        // Away from the backend a moved pin was on, while another can take it.
        if let Some(a) = affinity.avoid
            && loads.iter().enumerate().any(|(i, l)| i != a && l.eligible)
            && let Some(load) = loads.get_mut(a)
        {
            load.eligible = false;
        }
        if !any_accepting {
            let pool = self.cfg.name.clone();
            return Err(if tried.is_empty() {
                UpstreamError::NoBackend { pool }
            } else {
                UpstreamError::AllFailed { pool }
            });
        }
        // A pinned client goes to its backend whenever that one can take it.
        let pinned = affinity
            .pinned
            .filter(|&p| loads.get(p).is_some_and(|l| l.eligible));
        let Some(i) = pinned.or_else(|| self.balancer.pick(&loads, affinity.key)) else {
            return Ok(None);
        };
        let Some(lease) = registry.lease_within(&backends[i], max) else {
            // Filled up since the loads were read: wait like for a full one.
            return Ok(None);
        };
        if let Some(bk) = buckets.as_mut()
            && !(affinity.reusable && self.idle[i].has_ready())
        {
            bk[i].try_take(now);
        }
        Ok(Some((i, lease)))
    }

    /// Time until some candidate backend has an admission token again.
    fn next_token(&self, tried: &[usize]) -> Option<Duration> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        buckets
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !tried.contains(i))
            .map(|(_, b)| b.wait(now))
            .min()
    }

    /// A lease on a backend not tried yet, or why there is none. When every
    /// backend that accepts is full or out of admission tokens, waits in
    /// the pool's bounded, first-come-first-served queue for up to
    /// `admission.queue_timeout`; then `Overloaded`.
    pub(super) async fn next_lease(
        &self,
        registry: &Arc<Registry>,
        tried: &[usize],
        affinity: Affinity,
    ) -> Result<(usize, Lease), UpstreamError> {
        let nobody_waiting = self.queue.available_permits() == self.cfg.admission.queue_size;
        if nobody_waiting && let Some(lease) = self.try_lease(registry, tried, affinity)? {
            return Ok(lease);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.admission.queue_timeout;
        let pool = &self.pool.stats;
        let Ok(_place) = self.queue.try_acquire() else {
            pool.admission_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(self.overloaded());
        };
        // Counted while waiting, also when the client goes away meanwhile
        // (the future is dropped): the guard gives the count back.
        let waiting = Waiting::new(&pool.admission_waiting);
        let result = self
            .wait_for_lease(registry, tried, affinity, deadline)
            .await;
        drop(waiting);
        if result
            .as_ref()
            .is_err_and(|e| matches!(e, UpstreamError::Overloaded { .. }))
        {
            pool.admission_rejected.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Waits, in turn, for a backend that can take the connection.
    async fn wait_for_lease(
        &self,
        registry: &Arc<Registry>,
        tried: &[usize],
        affinity: Affinity,
        deadline: tokio::time::Instant,
    ) -> Result<(usize, Lease), UpstreamError> {
        let Ok(_turn) = tokio::time::timeout_at(deadline, self.turn.lock()).await else {
            return Err(self.overloaded());
        };
        loop {
            if let Some(lease) = self.try_lease(registry, tried, affinity)? {
                return Ok(lease);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(self.overloaded());
            }
            // Wait for a token, or poll for a full backend to free a slot.
            let wait = self
                .next_token(tried)
                .unwrap_or(FULL_POLL)
                .clamp(Duration::from_millis(1), FULL_POLL);
            tokio::time::sleep_until((now + wait).min(deadline)).await;
        }
    }

    pub(super) fn overloaded(&self) -> UpstreamError {
        self.rejected.inc();
        UpstreamError::Overloaded {
            pool: self.cfg.name.clone(),
        }
    }
}

fn load_of(backend: &Backend, eligible: bool, now: Instant) -> Load {
    let ramp = backend.ramp(now);
    Load {
        // In cluster mode, the other instances' connections count too.
        active: backend.cluster_active(),
        weight: f64::from(backend.weight()) * ramp,
        ramp,
        eligible,
    }
}
