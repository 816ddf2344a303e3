//! What a client connection holds against its listener's limits.
//!
//! Owns the per-client count behind `listener.max_connections_per_client`:
//! connections by client address (the one the PROXY header carries where
//! the listener reads one), so that one address cannot take a listener's
//! whole `max_connections`. A connection over the limit is still served,
//! but only to be told `429` (see `http`). The listener-wide limit itself is
//! a semaphore permit, carried here beside the client's slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OwnedSemaphorePermit;

/// Live connections per client address, bounded by `max`.
#[derive(Debug)]
pub struct ClientLimit {
    max: usize,
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
    /// on this connection is answered `429`.
    OverLimit,
}

/// What one client connection holds until it ends (an upgraded WebSocket
/// keeps it until its tunnel ends).
#[derive(Debug)]
pub struct ConnPermit {
    /// Its place under the listener's `max_connections`, held for its Drop.
    _listener: OwnedSemaphorePermit,
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
            Some(limit) => limit
                .try_take(ip)
                .map_or(ClientAdmit::OverLimit, ClientAdmit::Counted),
        };
        Self {
            _listener: listener,
            client,
        }
    }

    pub fn over_limit(&self) -> bool {
        matches!(self.client, ClientAdmit::OverLimit)
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
}
