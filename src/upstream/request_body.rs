//! A client's request body on its way to a backend, with a stall timeout:
//! when no part of it arrives for `body_timeout`, it ends with an error, so
//! the request ends and its upstream connection is freed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

/// The body stopped arriving.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for {0:?}")]
pub struct BodyStalled(pub Duration);

/// `Incoming` with a timeout between its frames.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    /// Runs while the body waits for its next frame; allocated only then.
    stall: Option<Pin<Box<Sleep>>>,
    /// Counts the body's bytes, for the access log.
    counted: Option<Arc<AtomicU64>>,
}

impl RequestBody {
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stall: None,
            counted: None,
        }
    }

    /// Adds the bytes it reads from now on to `counter`.
    pub fn count_into(&mut self, counter: Arc<AtomicU64>) {
        self.counted = Some(counter);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.stall = None;
            if let (Some(counter), Some(Ok(frame))) = (&this.counted, &frame)
                && let Some(data) = frame.data_ref()
            {
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let stall = this
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stall.as_mut().poll(cx).is_ready() {
            this.stall = None;
            return Poll::Ready(Some(Err(Box::new(BodyStalled(timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
