//! The WebSocket tunnel: bytes both ways after the upgrade, with message
//! boundaries tracked and Close frames injected on request.
//!
//! Owns the two sockets of one proxied WebSocket from the 101 response until
//! both are closed. Reads frame headers only (see [`frame`]), never payloads.
//! It watches its registry control handle: on a close request it waits for a
//! quiet point (both directions between messages and silent for
//! [`QUIET`]), or, after [`QUIET_MAX_WAIT`], for the next message boundary,
//! then sends a masked Close frame to the backend. What the backend still
//! sends before its Close reply (answers already on their way) goes on to
//! the client; the backend's reply is replaced by sluice's own Close with
//! the requested code. Should the backend not answer within
//! `close_timeout`, the client gets its Close at its next message boundary.
//! It never cuts a message: only an abort (the shutdown deadline) drops a
//! tunnel mid-message.
//!
//! An idle tunnel holds no buffer: one is taken from a small pool when a
//! socket becomes readable and given back when the data has been written.

pub mod frame;
mod stream;

pub use stream::TunnelIo;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::registry::{CloseRequest, ConnControl, Traffic, WsEntry};
use frame::FrameTracker;

/// Silence needed, with both directions between messages, before sluice
/// injects its Close frames.
pub const QUIET: Duration = Duration::from_millis(50);
/// After this long without a quiet point, each direction gets its Close
/// frame at its own next message boundary.
pub const QUIET_MAX_WAIT: Duration = Duration::from_secs(1);

const BUF_SIZE: usize = 16 * 1024;
/// Buffers kept for reuse; more than the reads in flight at once on a
/// small machine, and at most 256 KiB.
const MAX_POOLED_BUFFERS: usize = 16;

/// Buffers shared by all tunnels, so that an idle tunnel owns none.
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn take_buffer() -> Vec<u8> {
    let pooled = BUFFERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .pop();
    // Reads fill the spare capacity (`try_read_buf`): no zeroing needed.
    pooled.unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
}

fn give_buffer(mut buf: Vec<u8>) {
    if buf.capacity() != BUF_SIZE {
        return;
    }
    buf.clear();
    let mut pool = BUFFERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if pool.len() < MAX_POOLED_BUFFERS {
        pool.push(buf);
    }
}

/// What a finished tunnel reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct TunnelStats {
    /// The connection's registry id.
    pub id: u64,
    /// Messages from the client to the backend.
    pub messages_up: u64,
    /// Messages from the backend to the client.
    pub messages_down: u64,
    /// sluice sent Close frames because a close was requested.
    pub closed_by_sluice: bool,
}

/// A Close frame waiting to be written.
#[derive(Debug, Clone, Copy)]
struct PendingClose {
    frame: [u8; 8],
    len: u8,
    written: u8,
}

/// One direction: bytes from `src` to `dst`.
#[derive(Debug)]
struct Flow {
    tracker: FrameTracker,
    /// Data read and not yet written, `buf[start..]`; `None` when idle.
    buf: Option<Vec<u8>>,
    start: u32,
    /// Frames towards the backend are masked.
    masked: bool,
    /// Close code to send at this flow's next message boundary.
    inject: Option<u16>,
    /// Close code to send in place of the source's own Close frame, when it
    /// comes (the source's data before it is still forwarded).
    replace_close: Option<u16>,
    /// Our Close frame, still to be written.
    close_out: Option<PendingClose>,
    /// sluice sent its Close frame: bytes from the source are no longer forwarded.
    closed_by_us: bool,
    /// The source reached end of stream.
    eof: bool,
    /// The write side towards the destination is shut down.
    shut: bool,
    /// Bytes were read during the last poll.
    active: bool,
    /// Messages already added to the backend's traffic counters.
    counted: u64,
    /// Writing to the destination failed: nothing more moves this way.
    failed: bool,
    /// Bytes were written since the last flush.
    unflushed: bool,
}

impl Flow {
    fn new(pending: Bytes, masked: bool) -> Self {
        let mut flow = Self {
            tracker: FrameTracker::default(),
            buf: None,
            start: 0,
            masked,
            inject: None,
            replace_close: None,
            close_out: None,
            closed_by_us: false,
            eof: false,
            shut: false,
            active: false,
            counted: 0,
            failed: false,
            unflushed: false,
        };
        if !pending.is_empty() {
            // Bytes that arrived with the upgrade response or request.
            let mut buf = if pending.len() <= BUF_SIZE {
                take_buffer()
            } else {
                Vec::with_capacity(pending.len())
            };
            buf.extend_from_slice(&pending);
            flow.tracker.scan(&pending, false);
            flow.buf = Some(buf);
        }
        flow
    }

    /// Queues our Close frame when the flow is at a message boundary.
    fn maybe_queue_close(&mut self) {
        if let Some(code) = self.inject
            && self.tracker.is_at_boundary()
        {
            self.queue_close(code);
        }
    }

    fn queue_close(&mut self, code: u16) {
        let mask = self.masked.then(rand::random::<[u8; 4]>);
        let (frame, len) = frame::close_frame(code, mask);
        self.close_out = Some(PendingClose {
            frame,
            len: len as u8,
            written: 0,
        });
        self.inject = None;
        self.closed_by_us = true;
    }

    /// Takes the bytes just read (all of `buf`): tracks them and keeps in
    /// `buf` those to forward.
    fn accept_read(&mut self, traffic: &Traffic) {
        let Some(mut buf) = self.buf.take() else {
            return;
        };
        let n = buf.len();
        let data = &buf[..];
        self.start = 0;
        let keep = if self.closed_by_us {
            self.tracker.scan(data, false);
            0
        } else if let Some(code) = self.replace_close {
            match self.tracker.scan_to_close(data) {
                Some(k) => {
                    self.replace_close = None;
                    self.queue_close(code);
                    self.tracker.scan(&data[k..], false);
                    k
                }
                None => n,
            }
        } else if let Some(code) = self.inject {
            match self.tracker.scan(data, true) {
                Some(k) => {
                    self.queue_close(code);
                    self.tracker.scan(&data[k..], false);
                    k
                }
                None => n,
            }
        } else {
            self.tracker.scan(data, false);
            n
        };
        buf.truncate(keep);
        self.buf = Some(buf);
        let messages = self.tracker.messages();
        traffic.add(messages - self.counted, n as u64);
        self.counted = messages;
    }

    fn release_buffer(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_buffer(buf);
        }
        self.start = 0;
    }

    /// True when everything read has been written.
    fn is_flushed(&self) -> bool {
        self.buf
            .as_ref()
            .is_none_or(|b| self.start as usize >= b.len())
    }

    /// Moves bytes until the source would block (Pending) or the flow is
    /// finished: source ended and destination shut down (Ready).
    fn poll_move(
        &mut self,
        src: &mut impl TunnelIo,
        dst: &mut impl TunnelIo,
        traffic: &Traffic,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        self.active = false;
        if self.failed {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(buf) = self.buf.as_ref() {
                while (self.start as usize) < buf.len() {
                    let n =
                        ready!(Pin::new(&mut *dst).poll_write(cx, &buf[self.start as usize..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += n as u32;
                    self.unflushed = true;
                }
            }
            if let Some(close) = self.close_out.as_mut() {
                while close.written < close.len {
                    let frame = &close.frame[close.written as usize..close.len as usize];
                    let n = ready!(Pin::new(&mut *dst).poll_write(cx, frame))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    close.written += n as u8;
                    self.unflushed = true;
                }
                self.close_out = None;
            }
            if self.unflushed {
                // A TLS stream may hold records back until flushed; for TCP
                // this costs nothing.
                ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.eof {
                self.release_buffer();
                // A Close this flow still owes its destination goes first.
                if let Some(code) = self.replace_close.take().or(self.inject) {
                    self.queue_close(code);
                    continue;
                }
                if !self.shut {
                    ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                    self.shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            self.maybe_queue_close();
            if self.close_out.is_some() {
                continue;
            }
            if self.buf.is_none() {
                ready!(src.poll_read_ready(cx))?;
                self.buf = Some(take_buffer());
            }
            let buf = self.buf.as_mut().expect("buffer taken above");
            buf.clear();
            match src.read_available(buf) {
                Ok(0) => {
                    self.eof = true;
                }
                Ok(_) => {
                    self.active = true;
                    self.accept_read(traffic);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Idle again: give the buffer back until data comes.
                    self.release_buffer();
                }
                Err(error) => {
                    // The source is gone (e.g. reset): for the destination
                    // that is the end of the stream.
                    tracing::debug!(%error, "tunnel read failed");
                    self.eof = true;
                }
            }
        }
    }
}

/// A flow whose destination failed cannot deliver anything more: it is
/// finished, and the other direction goes on (e.g. to give the client its
/// Close when the backend has reset).
fn finished_on_error(flow: &mut Flow, polled: Poll<io::Result<()>>) -> Poll<()> {
    match polled {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(())) => Poll::Ready(()),
        Poll::Ready(Err(error)) => {
            tracing::debug!(%error, "tunnel write failed");
            flow.failed = true;
            flow.release_buffer();
            Poll::Ready(())
        }
    }
}

/// Where the tunnel is in its life.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Proxying.
    Open,
    /// A close was requested; waiting for a quiet point.
    Requested {
        code: u16,
        since: Instant,
        last_activity: Instant,
    },
    /// Close frames are out (ours or the peers'); waiting for the peers.
    Closing {
        deadline: Instant,
        /// Our close code while the client still waits for our Close: if
        /// the backend has not answered by the deadline, the client gets it
        /// then.
        client_pending: Option<u16>,
    },
}

/// One proxied WebSocket. A future: await it to run the tunnel to its end.
pub struct Tunnel<C = TcpStream, B = TcpStream> {
    client: C,
    backend: B,
    /// Client to backend.
    up: Flow,
    /// Backend to client.
    down: Flow,
    entry: WsEntry,
    phase: Phase,
    close_timeout: Duration,
    /// Wakes the tunnel for time-based steps; allocated only when needed.
    timer: Option<Pin<Box<Sleep>>>,
    /// When one side has ended and the other has not: the end of the wait.
    linger_deadline: Option<Instant>,
}

impl<C: TunnelIo, B: TunnelIo> Tunnel<C, B> {
    /// A tunnel between `client` and `backend`. `client_pending` and
    /// `backend_pending` are bytes that arrived with the upgrade and are
    /// forwarded first.
    pub fn new(
        client: C,
        client_pending: Bytes,
        backend: B,
        backend_pending: Bytes,
        entry: WsEntry,
        close_timeout: Duration,
    ) -> Self {
        Self {
            client,
            backend,
            up: Flow::new(client_pending, true),
            down: Flow::new(backend_pending, false),
            entry,
            phase: Phase::Open,
            close_timeout,
            timer: None,
            linger_deadline: None,
        }
    }

    fn control(&self) -> &Arc<ConnControl> {
        self.entry.control()
    }

    fn stats(&self) -> TunnelStats {
        TunnelStats {
            id: self.control().id,
            messages_up: self.up.tracker.messages(),
            messages_down: self.down.tracker.messages(),
            closed_by_sluice: self.up.closed_by_us || self.down.closed_by_us,
        }
    }

    /// Advances the close state machine; returns the next time it must be
    /// looked at, if any.
    ///
    /// sluice closes towards the backend first and keeps forwarding what the
    /// backend still sends (answers already on their way), then gives the
    /// client its Close in place of the backend's reply. So an answer in
    /// flight is never cut, and the backend sees the close before the client
    /// can send anything more.
    fn step_phase(&mut self, now: Instant) -> Option<Instant> {
        match self.phase {
            Phase::Open => None,
            Phase::Requested {
                code,
                since,
                mut last_activity,
            } => {
                if self.up.active || self.down.active {
                    last_activity = now;
                }
                if self.up.tracker.close_seen() || self.down.tracker.close_seen() {
                    // A peer started the close handshake itself: let it finish.
                    self.phase = Phase::Closing {
                        deadline: now + self.close_timeout,
                        client_pending: None,
                    };
                    return self.step_phase(now);
                }
                let quiet = self.up.tracker.is_at_boundary()
                    && self.down.tracker.is_at_boundary()
                    && now >= last_activity + QUIET;
                if quiet || now >= since + QUIET_MAX_WAIT {
                    self.up.inject = Some(code);
                    self.down.replace_close = Some(code);
                    self.phase = Phase::Closing {
                        deadline: now + self.close_timeout,
                        client_pending: Some(code),
                    };
                    return None;
                }
                self.phase = Phase::Requested {
                    code,
                    since,
                    last_activity,
                };
                // Silent but mid-message: only new data (a readiness wake)
                // or the end of the wait can change anything.
                let quiet_at = last_activity + QUIET;
                if now >= quiet_at {
                    Some(since + QUIET_MAX_WAIT)
                } else {
                    Some(quiet_at.min(since + QUIET_MAX_WAIT))
                }
            }
            Phase::Closing {
                deadline,
                client_pending,
            } => {
                if now >= deadline
                    && let Some(code) = client_pending
                    && !self.down.closed_by_us
                {
                    // The backend did not answer: the client gets its Close
                    // at its next message boundary, and close_timeout more.
                    self.down.replace_close = None;
                    self.down.inject = Some(code);
                    self.phase = Phase::Closing {
                        deadline: now + self.close_timeout,
                        client_pending: None,
                    };
                    return None;
                }
                Some(deadline)
            }
        }
    }

    /// True when the close handshake is complete on both sides.
    fn close_complete(&self) -> bool {
        // Each side's Close has been read whole and everything owed to the
        // other side has been written.
        let done = |f: &Flow| {
            f.inject.is_none()
                && f.replace_close.is_none()
                && f.close_out.is_none()
                && f.is_flushed()
                && !f.unflushed
                && f.tracker.close_seen()
                && f.tracker.is_at_frame_boundary()
        };
        matches!(self.phase, Phase::Closing { .. }) && done(&self.up) && done(&self.down)
    }
}

impl<C: TunnelIo, B: TunnelIo> Future for Tunnel<C, B> {
    type Output = TunnelStats;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match this.control().poll_request(cx.waker()) {
                CloseRequest::Abort => return Poll::Ready(this.stats()),
                CloseRequest::Close(code) if matches!(this.phase, Phase::Open) => {
                    let now = Instant::now();
                    this.phase = Phase::Requested {
                        code,
                        since: now,
                        last_activity: now,
                    };
                }
                _ => {}
            }
            let target = this.entry.backend();
            let up = this
                .up
                .poll_move(&mut this.client, &mut this.backend, &target.up, cx);
            let down = this
                .down
                .poll_move(&mut this.backend, &mut this.client, &target.down, cx);
            let (up, down) = (
                finished_on_error(&mut this.up, up),
                finished_on_error(&mut this.down, down),
            );
            if up.is_ready() && down.is_ready() {
                return Poll::Ready(this.stats());
            }
            if matches!(this.phase, Phase::Open) && up.is_pending() && down.is_pending() {
                // The common case: proxying, nothing timed to wait for.
                return Poll::Pending;
            }
            let now = Instant::now();
            let injecting = this.up.inject.is_some() || this.down.inject.is_some();
            let mut wake_at = this.step_phase(now);
            if !injecting && (this.up.inject.is_some() || this.down.inject.is_some()) {
                // Close frames were just scheduled: let the flows send them.
                continue;
            }
            if this.close_complete() {
                // Both Close frames answered: end TCP on both sides.
                let _ = Pin::new(&mut this.client).poll_shutdown(cx);
                let _ = Pin::new(&mut this.backend).poll_shutdown(cx);
                return Poll::Ready(this.stats());
            }
            if up.is_ready() != down.is_ready() {
                let linger = *this.linger_deadline.get_or_insert(now + this.close_timeout);
                wake_at = Some(wake_at.map_or(linger, |w| w.min(linger)));
            }
            if let Phase::Closing { deadline, .. } = this.phase
                && now >= deadline
            {
                return Poll::Ready(this.stats());
            }
            if let Some(linger) = this.linger_deadline
                && now >= linger
            {
                return Poll::Ready(this.stats());
            }
            let Some(at) = wake_at else {
                this.timer = None;
                return Poll::Pending;
            };
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The timer fired: look at the time-based steps again.
        }
    }
}
