//! Idle keep-alive HTTP/1.1 connections to one backend, for reuse by the
//! next request.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

use super::RequestBody;

/// How long a finished response's connection may take to become ready
/// (its request body still uploading) and still be kept for reuse.
const CHECKIN_WAIT: Duration = Duration::from_secs(5);

/// Idle HTTP/1.1 connections to one backend, most recent last.
#[derive(Debug)]
pub struct IdlePool {
    conns: Mutex<Vec<(SendRequest<RequestBody>, Instant)>>,
    max_idle: usize,
    timeout: Duration,
}

impl IdlePool {
    pub(super) fn new(max_idle: usize, timeout: Duration) -> Self {
        Self {
            conns: Mutex::new(Vec::new()),
            max_idle,
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(SendRequest<RequestBody>, Instant)>> {
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A live idle connection ready for a request, if one is kept.
    pub fn checkout(&self) -> Option<SendRequest<RequestBody>> {
        let mut conns = self.lock();
        let now = Instant::now();
        while let Some((sender, since)) = conns.pop() {
            if sender.is_ready() && now.saturating_duration_since(since) <= self.timeout {
                return Some(sender);
            }
        }
        None
    }

    /// True when a ready idle connection is kept.
    pub fn has_ready(&self) -> bool {
        let now = Instant::now();
        self.lock()
            .iter()
            .any(|(s, since)| s.is_ready() && now.saturating_duration_since(*since) <= self.timeout)
    }

    /// Keeps `sender` for reuse once it can take a request. A connection
    /// whose request body is still being sent (the backend answered before
    /// the upload ended) is kept only when the upload finishes in time.
    pub fn checkin(self: &Arc<Self>, mut sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            self.keep(sender);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(CHECKIN_WAIT, sender.ready()).await {
                pool.keep(sender);
            }
        });
    }

    fn keep(&self, sender: SendRequest<RequestBody>) {
        let mut conns = self.lock();
        let timeout = self.timeout;
        // One clock read for the lot: this runs at every request's end,
        // over as many idle connections as requests were in flight.
        let now = Instant::now();
        conns.retain(|(s, since)| {
            !s.is_closed() && now.saturating_duration_since(*since) <= timeout
        });
        if conns.len() < self.max_idle {
            conns.push((sender, now));
        }
    }
}
