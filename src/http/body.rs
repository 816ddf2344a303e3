//! Response bodies sent to clients: a backend's body, passed through while
//! its lease and connection are held, or a short local one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::registry::Lease;
use crate::upstream::{IdlePool, RequestBody};

/// A backend connection to give back to its idle pool once the response
/// body has been read to its end.
pub struct Reuse {
    pub sender: SendRequest<RequestBody>,
    pub pool: Arc<IdlePool>,
}

/// The body of a response sluice sends to a client.
pub enum ProxyBody {
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
        Self::Local(None)
    }

    pub fn text(text: impl Into<Bytes>) -> Self {
        Self::Local(Some(text.into()))
    }

    pub fn upstream(inner: Incoming, lease: Lease, reuse: Option<Reuse>) -> Self {
        let mut body = Self::Upstream {
            inner,
            lease: Some(lease),
            reuse,
        };
        if body.is_end_stream() {
            body.finish();
        }
        body
    }

    /// The backend's body is complete: its connection may serve another request.
    fn finish(&mut self) {
        if let Self::Upstream { lease, reuse, .. } = self {
            if let Some(Reuse { sender, pool }) = reuse.take() {
                pool.checkin(sender);
            }
            lease.take();
        }
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
        match this {
            Self::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Upstream { inner, .. } => {
                let polled = Pin::new(inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => this.finish(),
                    Poll::Ready(Some(Err(_))) => {
                        if let Self::Upstream { reuse, .. } = this {
                            reuse.take();
                        }
                    }
                    _ => {
                        if this.is_end_stream() {
                            this.finish();
                        }
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Local(data) => data.is_none(),
            Self::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Local(None) => SizeHint::with_exact(0),
            Self::Local(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Self::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
