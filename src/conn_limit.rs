//! What a client connection holds against its listener's limits.
//!
//! Owns the per-client count behind `listener.max_connections_per_client`:
//! connections by client address (the one the PROXY header carries where
//! the listener reads one), so that one address cannot take a listener's
//! whole `max_connections`. A connection over the limit gives its place
//! under `max_connections` back at once and is served only to be told
//! `429` (see `http`); at most [`OVER_LIMIT_ANSWERS`] of those are served at
//! a time, and past that they are closed unanswered. The listener-wide
//! limit itself is a semaphore permit, carried here beside the client's
//! slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections over their client's limit that are answered 429 at once
/// (per listener); more are closed without an answer.
pub const OVER_LIMIT_ANSWERS: usize = 64;

/// Live connections per client address, bounded by `max`.
#[derive(Debug)]
pub struct ClientLimit {
    max: usize,
    /// Places for connections being answered 429.
    over: Arc<Semaphore>,
    /// Only addresses with a live connection have an entry.
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its client's address; given back on drop.
#[derive(Debug)]
pub struct ClientSlot {
    limit: Arc<ClientLimit>,
    ip: IpAddr,
}

impl ClientLimit {
    /// At most `max` (at least 1) live connections per address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            over: Arc::new(Semaphore::new(OVER_LIMIT_ANSWERS)),
            counts: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a new connection from `ip`, or `None` when `ip` is at the limit.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let ip = canonical(ip);
        let mut counts = self.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            limit: self.clone(),
            ip,
        })
    }

    /// Live connections from `ip`.
    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> usize {
        self.lock().get(&canonical(ip)).copied().unwrap_or(0)
    }

    /// Addresses with a live connection (bounded by the listener's
    /// `max_connections`).
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.limit.lock();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// An IPv4 client on a dual-stack socket is one address, however written.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// How a connection stands against its client's limit.
#[derive(Debug)]
pub enum ClientAdmit {
    /// The listener has no per-client limit.
    Unlimited,
    /// Counted; the slot is given back when the connection ends.
    Counted(#[allow(dead_code, reason = "held for its Drop")] ClientSlot),
    /// The client already has `max_connections_per_client`: every request
    /// on this connection is answered `429` (holding one of the
    /// [`OVER_LIMIT_ANSWERS`] places).
    OverLimit(#[allow(dead_code, reason = "held for its Drop")] OwnedSemaphorePermit),
    /// Over the limit, and too many such connections are being answered:
    /// closed at once.
    Refused,
}

/// What one client connection holds until it ends (an upgraded WebSocket
/// keeps it until its tunnel ends).
#[derive(Debug)]
pub struct ConnPermit {
    /// Its place under the listener's `max_connections`, held for its Drop
    /// (given back at once by a connection over its client's limit).
    _listener: Option<OwnedSemaphorePermit>,
    client: ClientAdmit,
}

impl ConnPermit {
    /// Takes `ip`'s place under `limit`, if there is one.
    pub fn new(
        listener: OwnedSemaphorePermit,
        limit: Option<&Arc<ClientLimit>>,
        ip: IpAddr,
    ) -> Self {
        let client = match limit {
            None => ClientAdmit::Unlimited,
            Some(limit) => match limit.try_take(ip) {
                Some(slot) => ClientAdmit::Counted(slot),
                None => match limit.over.clone().try_acquire_owned() {
                    Ok(place) => ClientAdmit::OverLimit(place),
                    Err(_) => ClientAdmit::Refused,
                },
            },
        };
        let listener = match client {
            ClientAdmit::Unlimited | ClientAdmit::Counted(_) => Some(listener),
            ClientAdmit::OverLimit(_) | ClientAdmit::Refused => None,
        };
        Self {
            _listener: listener,
            client,
        }
    }

    /// Every request on this connection gets 429.
    pub fn over_limit(&self) -> bool {
        matches!(self.client, ClientAdmit::OverLimit(_))
    }

    /// The connection is to be closed unanswered.
    pub fn refused(&self) -> bool {
        matches!(self.client, ClientAdmit::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_count_and_slots_give_back() {
        let limit = ClientLimit::new(2);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let a1 = limit.try_take(a).expect("first");
        let a2 = limit.try_take(a).expect("second");
        assert!(limit.try_take(a).is_none(), "third from a is over");
        let _b1 = limit.try_take(b).expect("b has its own count");
        assert_eq!((limit.count(a), limit.count(b)), (2, 1));
        drop(a1);
        assert_eq!(limit.count(a), 1);
        let _a3 = limit.try_take(a).expect("a place came free");
        drop(a2);
        drop(_a3);
        assert_eq!(limit.count(a), 0);
        assert_eq!(limit.addresses(), 1, "a's entry is gone");
    }

    #[test]
    fn a_mapped_ipv4_address_is_the_ipv4_address() {
        let limit = ClientLimit::new(1);
        let _v4 = limit
            .try_take("192.0.2.1".parse().expect("ip"))
            .expect("first");
        assert!(
            limit
                .try_take("::ffff:192.0.2.1".parse().expect("ip"))
                .is_none()
        );
    }

    #[tokio::test]
    async fn over_the_limit_gives_the_listener_place_back() {
        let places = Arc::new(Semaphore::new(10));
        let limit = ClientLimit::new(1);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let take = || places.clone().try_acquire_owned().expect("a place");
        let first = ConnPermit::new(take(), Some(&limit), ip);
        assert!(!first.over_limit() && !first.refused());
        assert_eq!(places.available_permits(), 9);
        let mut over = Vec::new();
        for _ in 0..OVER_LIMIT_ANSWERS {
            let p = ConnPermit::new(take(), Some(&limit), ip);
            assert!(p.over_limit());
            over.push(p);
        }
        assert_eq!(places.available_permits(), 9, "over-limit ones hold none");
        assert!(ConnPermit::new(take(), Some(&limit), ip).refused());
        drop(over.pop());
        assert!(ConnPermit::new(take(), Some(&limit), ip).over_limit());
    }
}
