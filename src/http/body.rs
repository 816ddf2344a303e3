//! Response bodies sent to clients: a backend's body, passed through while
//! its lease and connection are held, or a short local one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::registry::Lease;

use super::access::HttpLog;
use crate::upstream::{IdlePool, RequestBody};

/// A backend connection to give back to its idle pool once the response
/// body has been read to its end.
pub struct Reuse {
    pub sender: SendRequest<RequestBody>,
    pub pool: Arc<IdlePool>,
}

/// The body of a response sluice sends to a client.
pub struct ProxyBody {
    kind: Kind,
    /// Its access log line, when the listener logs: sent once the body
    /// is done (or dropped), with the bytes sent.
    log: Option<Box<HttpLog>>,
}

enum Kind {
    /// From a backend. The lease keeps the request counted in flight until
    /// the body ends or the client goes away.
    Upstream {
        inner: Incoming,
        lease: Option<Lease>,
        reuse: Option<Reuse>,
    },
    /// Made by sluice (errors, demo pages).
    Local(Option<Bytes>),
}

impl ProxyBody {
    pub fn empty() -> Self {
        Self::local(None)
    }

    pub fn text(text: impl Into<Bytes>) -> Self {
        Self::local(Some(text.into()))
    }

    fn local(data: Option<Bytes>) -> Self {
        Self {
            kind: Kind::Local(data),
            log: None,
        }
    }

    pub fn upstream(inner: Incoming, lease: Lease, reuse: Option<Reuse>) -> Self {
        let mut body = Self {
            kind: Kind::Upstream {
                inner,
                lease: Some(lease),
                reuse,
            },
            log: None,
        };
        if body.is_end_stream() {
            body.finish();
        }
        body
    }

    /// The body, with the access log line it sends when it is done.
    pub fn logged(mut self, log: HttpLog) -> Self {
        if self.is_end_stream() {
            // Nothing to send: the line goes now.
            drop(log);
        } else {
            self.log = Some(Box::new(log));
        }
        self
    }

    /// The backend's body is complete: its connection may serve another request.
    fn finish(&mut self) {
        if let Kind::Upstream { lease, reuse, .. } = &mut self.kind {
            if let Some(Reuse { sender, pool }) = reuse.take() {
                pool.checkin(sender);
            }
            lease.take();
        }
        self.log.take();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream { inner, .. } => Pin::new(inner).poll_frame(cx),
        };
        if let (Some(log), Poll::Ready(Some(Ok(frame)))) = (&mut this.log, &polled)
            && let Some(data) = frame.data_ref()
        {
            log.bytes_out += data.len() as u64;
        }
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                if let Kind::Upstream { reuse, .. } = &mut this.kind {
                    reuse.take();
                }
                this.log.take();
            }
            _ => {
                if this.is_end_stream() {
                    this.finish();
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Local(data) => data.is_none(),
            Kind::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Local(None) => SizeHint::with_exact(0),
            Kind::Local(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
