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

use super::ListenerCtx;

/// A request being served, for its access log line.
pub struct Started {
    log: AccessLog,
    at: Instant,
    entry: Entry,
    /// Body bytes read from the client so far.
    pub bytes_in: Arc<AtomicU64>,
}

impl Started {
    /// Notes `req` as it arrives, when the listener logs requests.
    pub fn new<B>(ctx: &ListenerCtx, req: &Request<B>, client: &Client) -> Option<Self> {
        let log = ctx.access.as_ref()?;
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), |p| p.as_str().to_string());
        Some(Self {
            log: log.clone(),
            at: Instant::now(),
            bytes_in: Arc::default(),
            entry: Entry {
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
                status: 0,
                bytes_in: 0,
                bytes_out: 0,
                duration: std::time::Duration::ZERO,
                ws: None,
            },
        })
    }

    /// The backend that answers.
    pub fn set_backend(&mut self, name: &str) {
        self.entry.backend = Some(name.to_string());
    }

    /// The line of a plain response with `status`, sent when the returned
    /// guard goes (its body has ended, or the client went away).
    pub fn response(mut self, status: u16) -> HttpLog {
        self.entry.status = status;
        HttpLog {
            started: Some(self),
            bytes_out: 0,
        }
    }

    /// Sends the line of a WebSocket that ended with `stats`.
    pub fn websocket(mut self, stats: &TunnelStats) {
        let (closed_by, reason) = match stats.closed_by {
            ClosedBy::Client => ("client", None),
            ClosedBy::Backend => ("backend", None),
            ClosedBy::Sluice(reason) => ("sluice", Some(reason.as_str())),
        };
        let entry = &mut self.entry;
        entry.kind = "ws";
        entry.status = 101;
        entry.bytes_in = stats.bytes_up;
        entry.bytes_out = stats.bytes_down;
        entry.duration = self.at.elapsed();
        entry.ws = Some(WsEnd {
            messages_in: stats.messages_up,
            messages_out: stats.messages_down,
            close_code: stats.close_code,
            closed_by,
            reason,
            cut: stats.cut,
        });
        self.log.send(self.entry);
    }
}

/// Sends a response's line when dropped; the body counts what it sends.
pub struct HttpLog {
    started: Option<Started>,
    pub bytes_out: u64,
}

impl Drop for HttpLog {
    fn drop(&mut self) {
        if let Some(started) = self.started.take() {
            let mut entry = started.entry;
            entry.bytes_in = started.bytes_in.load(Ordering::Relaxed);
            entry.bytes_out = self.bytes_out;
            entry.duration = started.at.elapsed();
            started.log.send(entry);
        }
    }
}
