//! What the access log is told of a request: taken when it arrives, sent
//! when its response body ends (or the client went away) or, for a
//! WebSocket, when the tunnel ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use hyper::Request;
use tokio::time::Instant;

use crate::access_log::{AccessLog, Entry, WsEnd};
use crate::proxy_protocol::Client;
use crate::tunnel::{ClosedBy, TunnelStats};
use crate::upstream::{RequestBody, TriedBackend};

use super::ListenerCtx;

/// A request being served, for its access log line. Dropped before its
/// answer (the client went away while the backend was thinking, or an
/// upgrade did not complete), it sends the line all the same, with the
/// status it got so far: 499 when none was sent, as nginx logs it.
pub struct Started {
    log: AccessLog,
    at: Instant,
    /// Taken by the line's sending.
    entry: Option<Entry>,
    /// Body bytes read from the client so far.
    bytes_in: Arc<AtomicU64>,
    /// The backend `upstream` tried last.
    tried: TriedBackend,
}

/// The status of a request whose client went away before its answer.
const CLIENT_GONE: u16 = 499;

impl Started {
    /// Notes `req` as it arrives, when the listener logs requests.
    /// Boxed: a tunnel's task holds it for the WebSocket's life, and
    /// with the log off that costs one pointer.
    pub fn new<B>(ctx: &ListenerCtx, req: &Request<B>, client: &Client) -> Option<Box<Self>> {
        let log = ctx.access.as_ref()?;
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), |p| p.as_str().to_string());
        Some(Box::new(Self {
            log: log.clone(),
            at: Instant::now(),
            bytes_in: Arc::default(),
            tried: TriedBackend::default(),
            entry: Some(Entry {
                time: SystemTime::now(),
                kind: "http",
                client: client.addr,
                listener: ctx.cfg.name.clone(),
                pool: ctx.upstream.cfg.name.clone(),
                backend: None,
                method: req.method().as_str().to_string(),
                path,
                proto: if req.version() == hyper::Version::HTTP_2 {
                    "HTTP/2"
                } else {
                    "HTTP/1.1"
                },
                status: CLIENT_GONE,
                bytes_in: 0,
                bytes_out: 0,
                duration: std::time::Duration::ZERO,
                ws: None,
            }),
        }))
    }

    /// Marks `req` (on its way to `upstream`) so that the backend it is
    /// sent to is noted here and its body's bytes are counted.
    pub fn follow(&self, req: &mut Request<RequestBody>) {
        req.extensions_mut().insert(self.tried.clone());
        req.body_mut().count_into(self.bytes_in.clone());
    }

    /// The backend switched to WebSocket: the line, from now on, is a
    /// WebSocket's (with nothing moved, should the tunnel never start).
    pub fn switched(&mut self) {
        if let Some(entry) = &mut self.entry {
            entry.kind = "ws";
            entry.status = 101;
        }
    }

    /// The line of a plain response with `status`, sent when the returned
    /// guard goes (its body has ended, or the client went away).
    pub fn response(mut self: Box<Self>, status: u16) -> HttpLog {
        if let Some(entry) = &mut self.entry {
            entry.status = status;
        }
        HttpLog {
            started: Some(self),
            bytes_out: 0,
        }
    }

    /// Sends the line of a WebSocket that ended with `stats`.
    pub fn websocket(mut self: Box<Self>, stats: &TunnelStats) {
        let (closed_by, reason) = match stats.closed_by {
            ClosedBy::Client => ("client", None),
            ClosedBy::Backend => ("backend", None),
            ClosedBy::Sluice(reason) => ("sluice", Some(reason.as_str())),
        };
        if let Some(entry) = &mut self.entry {
            entry.bytes_in = stats.bytes_up;
            entry.bytes_out = stats.bytes_down;
            entry.ws = Some(WsEnd {
                messages_in: stats.messages_up,
                messages_out: stats.messages_down,
                close_code: stats.close_code,
                closed_by,
                reason,
                cut: stats.cut,
            });
        }
        // Dropping sends it.
    }

    /// Sends the line, once.
    fn send(&mut self, bytes_out: Option<u64>) {
        if let Some(mut entry) = self.entry.take() {
            if entry.ws.is_none() {
                entry.bytes_in = self.bytes_in.load(Ordering::Relaxed);
                entry.bytes_out = bytes_out.unwrap_or(0);
            }
            entry.duration = self.at.elapsed();
            entry.backend = self.tried.name();
            self.log.send(entry);
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.send(None);
    }
}

/// Sends a response's line when dropped; the body counts what it sends.
pub struct HttpLog {
    started: Option<Box<Started>>,
    pub bytes_out: u64,
}

impl Drop for HttpLog {
    fn drop(&mut self) {
        if let Some(mut started) = self.started.take() {
            started.send(Some(self.bytes_out));
        }
    }
}
