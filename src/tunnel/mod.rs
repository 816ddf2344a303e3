//! The WebSocket tunnel: bytes both ways after the upgrade, with message
//! boundaries tracked and Close frames injected on request.
//!
//! Owns the two sockets of one proxied WebSocket from the 101 response until
//! both are closed. Reads frame headers only (see [`frame`]), never payloads.
//! It watches its registry control handle; on a close request the pure
//! [`close`] machine decides when the Close frames go out (a quiet point,
//! else the next message boundary; the backend first, its reply replaced
//! by sluice's own Close to the client; the client's Close after
//! `close_timeout` should the backend not answer). It never cuts a
//! message on its own account, but a message that is still in flight
//! `max_message_wait` after the close began is cut (logged, counted in the
//! backend's `messages_cut`); an abort (the shutdown deadline) drops a
//! tunnel at once.
//!
//! - `mod.rs`: the `Tunnel` future, which polls both flows and applies
//!   what the close machine decides;
//! - `flow.rs`: one direction, with its buffer (none while idle), frame
//!   tracker and the Close frame it owes;
//! - `close.rs`: the close machine (pure, clock passed in);
//! - `frame.rs`: the frame header tracker (pure, proptested);
//! - `stream.rs`: the `TunnelIo` trait for TCP and TLS streams.

pub mod close;
mod flow;
pub mod frame;
mod stream;

pub use stream::{TunnelIo, read_with_noop_waker};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

use crate::registry::{CloseReason, CloseRequest, ConnControl, WsEntry};
use close::{Action, CloseMachine, Seen};
use flow::{Flow, finished_on_error};

/// What a finished tunnel reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct TunnelStats {
    /// The connection's registry id.
    pub id: u64,
    /// Messages from the client to the backend.
    pub messages_up: u64,
    /// Messages from the backend to the client.
    pub messages_down: u64,
    /// Bytes read from the client.
    pub bytes_up: u64,
    /// Bytes read from the backend.
    pub bytes_down: u64,
    /// The tunnel was cut mid-message after `max_message_wait`.
    pub cut: bool,
    /// Who began the end.
    pub closed_by: ClosedBy,
    /// The status code of the first Close frame (sluice's own when sluice
    /// closed); `None` when the connection ended without one.
    pub close_code: Option<u16>,
}

/// Who ended a WebSocket: the first to send a Close frame, or else the
/// first side whose connection ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    #[default]
    Client,
    Backend,
    /// sluice, for this reason (an abort, which sends no Close, is the
    /// shutdown's).
    Sluice(CloseReason),
}

/// How a tunnel closes.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Time for the close handshake once sluice's Close frame is out.
    pub close_timeout: Duration,
    /// Longest a message in flight may hold a close back.
    pub max_message_wait: Duration,
    /// Liveness checks of the client, when on.
    pub ping: Option<Ping>,
}

/// sluice's own liveness check of a client: after `interval` without a
/// frame from it, a Ping; then `timeout` for any frame (its Pong is not
/// forwarded). A client that stays silent is gone: the backend gets Close
/// 1001 and both sockets are freed.
#[derive(Debug, Clone, Copy)]
pub struct Ping {
    pub interval: Duration,
    pub timeout: Duration,
}

/// What a liveness step leaves the tunnel to do.
enum PingStep {
    /// Look again at this time (or on new data).
    Wait(Instant),
    /// A Ping was queued: let the flows send it.
    Sent,
    /// The client did not answer in time.
    Gone,
}

/// What a close step leaves the tunnel to do.
enum Step {
    /// Go on; look again at this time, if any.
    Wake(Option<Instant>),
    /// End the tunnel now.
    Cut,
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
    close: CloseMachine,
    close_timeout: Duration,
    /// Wakes the tunnel for time-based steps; allocated only when needed.
    timer: Option<Pin<Box<Sleep>>>,
    /// When one side has ended and the other has not: the end of the wait.
    linger_deadline: Option<Instant>,
    /// Messages to the client when the close machine last looked.
    answers_seen: u64,
    /// When bytes last moved either way, so that a close requested on a
    /// tunnel idle for long goes out at once (one clock read per poll
    /// that moved data).
    last_activity: Instant,
    ping: Option<Ping>,
    /// When the client last sent anything.
    last_client: Instant,
    /// Our Ping is out since then, with no frame from the client yet.
    ping_sent: Option<Instant>,
    /// The client stopped answering: only the backend's side of the close
    /// handshake is awaited.
    client_gone: bool,
    /// Who began the end, once someone has.
    closed_by: Option<ClosedBy>,
    /// The code of sluice's Close, when sluice began.
    our_code: Option<u16>,
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
        settings: Settings,
    ) -> Self {
        Self {
            client,
            backend,
            up: Flow::new(client_pending, true),
            down: Flow::new(backend_pending, false),
            entry,
            close: CloseMachine::new(settings.close_timeout, settings.max_message_wait),
            close_timeout: settings.close_timeout,
            timer: None,
            linger_deadline: None,
            answers_seen: 0,
            last_activity: Instant::now(),
            ping: settings.ping,
            last_client: Instant::now(),
            ping_sent: None,
            client_gone: false,
            closed_by: None,
            our_code: None,
        }
    }

    fn control(&self) -> &Arc<ConnControl> {
        self.entry.control()
    }

    fn stats(&self, cut: bool) -> TunnelStats {
        let closed_by = self
            .closed_by
            .unwrap_or(if self.down.eof || self.up.failed {
                ClosedBy::Backend
            } else {
                ClosedBy::Client
            });
        let close_code = match closed_by {
            ClosedBy::Client => self.up.tracker.close_code(),
            ClosedBy::Backend => self.down.tracker.close_code(),
            ClosedBy::Sluice(_) => self.our_code,
        };
        TunnelStats {
            id: self.control().id,
            messages_up: self.up.tracker.messages(),
            messages_down: self.down.tracker.messages(),
            bytes_up: self.up.bytes,
            bytes_down: self.down.bytes,
            cut,
            closed_by,
            close_code,
        }
    }

    /// Notes that sluice begins the end with `code`, unless a side did.
    fn note_our_close(&mut self, code: Option<u16>, reason: CloseReason) {
        if self.closed_by.is_none() {
            self.closed_by = Some(ClosedBy::Sluice(reason));
            self.our_code = code;
        }
    }

    /// Notes who began the end, from what the flows have seen: the first
    /// Close frame, or else the first side to end (its bytes ended, or
    /// writing to it failed).
    fn note_closer(&mut self) {
        if self.closed_by.is_some() {
            return;
        }
        let client_ended = self.up.eof || self.down.failed;
        let backend_ended = self.down.eof || self.up.failed;
        if self.up.tracker.close_seen() {
            self.closed_by = Some(ClosedBy::Client);
        } else if self.down.tracker.close_seen() {
            self.closed_by = Some(ClosedBy::Backend);
        } else if client_ended {
            self.closed_by = Some(ClosedBy::Client);
        } else if backend_ended {
            self.closed_by = Some(ClosedBy::Backend);
        }
    }

    /// Advances the close machine with what the flows show and applies
    /// its decision; returns the next time it must be looked at, if any,
    /// or that the tunnel is cut.
    ///
    /// sluice closes towards the backend first and keeps forwarding what the
    /// backend still sends (answers already on their way), then gives the
    /// client its Close in place of the backend's reply. So an answer in
    /// flight is never cut, and the backend sees the close before the client
    /// can send anything more.
    fn step_close(&mut self, now: Instant) -> Step {
        let seen = Seen {
            active: self.up.active || self.down.active,
            // A direction sluice has closed forwards nothing more: what
            // its peer still sends cannot hold the close back.
            at_boundary: [&self.up, &self.down]
                .iter()
                .all(|f| f.closed_by_us || f.tracker.is_at_boundary()),
            peer_close: self.up.tracker.close_seen() || self.down.tracker.close_seen(),
            client_closed: self.down.closed_by_us,
            close_owed: self.up.inject.is_some() || self.down.inject.is_some(),
            answered: self.down.tracker.messages() != self.answers_seen,
        };
        self.answers_seen = self.down.tracker.messages();
        let (action, wake_at) = self.close.step(seen, now);
        match action {
            Action::None => {}
            Action::Cut => return Step::Cut,
            Action::CloseBackend(code) => {
                self.up.inject = Some(code);
                self.down.replace_close = Some(code);
            }
            Action::CloseClient(code) => {
                self.down.replace_close = None;
                self.down.inject = Some(code);
            }
        }
        Step::Wake(wake_at)
    }

    /// Checks the client's liveness at `now`: sends a Ping when it has
    /// been silent for the interval, and finds it gone when it has stayed
    /// silent for the timeout after.
    fn step_ping(&mut self, ping: Ping, now: Instant) -> PingStep {
        if let Some(sent) = self.ping_sent {
            return if now >= sent + ping.timeout {
                PingStep::Gone
            } else {
                PingStep::Wait(sent + ping.timeout)
            };
        }
        let due = self.last_client + ping.interval;
        if now < due {
            return PingStep::Wait(due);
        }
        let down = &self.down;
        if down.tracker.close_seen() || down.eof || self.up.eof {
            // A side is closing or gone: nothing more goes to the client.
            return PingStep::Wait(now + ping.interval);
        }
        if !down.is_flushed() {
            // The client reads nothing (a frame towards it is stuck
            // half-written) and sends nothing: no Ping can go out, but the
            // timeout runs as if one had.
            self.ping_sent = Some(now);
            return PingStep::Wait(now + ping.timeout);
        }
        if down.ping_out.is_some() || !down.tracker.is_at_frame_boundary() {
            // Mid-frame towards the client: the Ping waits for the frame's
            // end (new data wakes the tunnel).
            return PingStep::Wait(now + close::FRAME_WAIT);
        }
        let token = rand::random();
        self.down.queue_ping(token);
        self.up.pong_token = Some(token);
        self.ping_sent = Some(now);
        PingStep::Sent
    }

    /// True when the close handshake is complete on both sides.
    fn close_complete(&self) -> bool {
        if self.client_gone {
            // Our Close is out to the backend and the backend has answered
            // (or ended): nothing more can reach a client that is gone.
            let up = &self.up;
            return self.close.is_closing()
                && up.closed_by_us
                && up.close_out.is_none()
                && up.is_flushed()
                && !up.unflushed
                && (self.down.tracker.close_seen() || self.down.eof);
        }
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
        self.close.is_closing() && done(&self.up) && done(&self.down)
    }
}

impl<C: TunnelIo, B: TunnelIo> Future for Tunnel<C, B> {
    type Output = TunnelStats;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match this.control().poll_request(cx.waker()) {
                CloseRequest::Abort => {
                    this.note_our_close(None, CloseReason::Shutdown);
                    return Poll::Ready(this.stats(false));
                }
                CloseRequest::Close(code) if this.close.is_open() => {
                    // Every request of the control plane has a reason.
                    let reason = this.control().reason().unwrap_or(CloseReason::Shutdown);
                    this.note_our_close(Some(code), reason);
                    this.close.request(code, Instant::now(), this.last_activity);
                    this.answers_seen = this.down.tracker.messages();
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
            if this.closed_by.is_none()
                && (up.is_ready()
                    || down.is_ready()
                    || this.up.tracker.close_seen()
                    || this.down.tracker.close_seen())
            {
                this.note_closer();
            }
            if up.is_ready() && down.is_ready() {
                return Poll::Ready(this.stats(false));
            }
            if this.up.active || this.down.active {
                this.last_activity = Instant::now();
            }
            if this.up.active {
                // Any frame from the client shows it is there.
                this.last_client = this.last_activity;
                this.ping_sent = None;
            }
            let mut ping_wake = None;
            if let Some(ping) = this.ping
                && this.close.is_open()
            {
                let now = Instant::now();
                if !this.up.is_flushed() {
                    // The client's bytes wait for the backend to read them:
                    // the client is not the one that is silent.
                    this.last_client = now;
                    this.ping_sent = None;
                }
                match this.step_ping(ping, now) {
                    PingStep::Wait(at) => ping_wake = Some(at),
                    PingStep::Sent => continue,
                    PingStep::Gone => {
                        let backend = this.entry.backend();
                        backend.client_timeouts.fetch_add(1, Ordering::Relaxed);
                        debug!(
                            conn.id = this.control().id,
                            "client did not answer sluice's Ping: closing"
                        );
                        this.client_gone = true;
                        this.note_our_close(Some(1001), CloseReason::PingTimeout);
                        this.close.request(1001, now, this.last_client);
                        this.answers_seen = this.down.tracker.messages();
                    }
                }
            }
            if this.close.is_open() && up.is_pending() && down.is_pending() && ping_wake.is_none() {
                // The common case: proxying, nothing timed to wait for.
                return Poll::Pending;
            }
            let now = Instant::now();
            let injecting = this.up.inject.is_some() || this.down.inject.is_some();
            let mut wake_at = match this.step_close(now) {
                Step::Wake(at) => match (at, ping_wake) {
                    (Some(a), Some(p)) => Some(a.min(p)),
                    (a, p) => a.or(p),
                },
                Step::Cut => {
                    let backend = this.entry.backend();
                    backend.messages_cut.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        conn.id = this.control().id,
                        backend = %backend.name,
                        "cut a WebSocket whose message outlived max_message_wait"
                    );
                    return Poll::Ready(this.stats(true));
                }
            };
            if !injecting && (this.up.inject.is_some() || this.down.inject.is_some()) {
                // Close frames were just scheduled: let the flows send them.
                continue;
            }
            if this.close_complete() {
                // Both Close frames answered: end TCP on both sides.
                let _ = Pin::new(&mut this.client).poll_shutdown(cx);
                let _ = Pin::new(&mut this.backend).poll_shutdown(cx);
                return Poll::Ready(this.stats(false));
            }
            if up.is_ready() != down.is_ready() {
                let linger = *this.linger_deadline.get_or_insert(now + this.close_timeout);
                wake_at = Some(wake_at.map_or(linger, |w| w.min(linger)));
            }
            if this.close.is_expired(now) {
                return Poll::Ready(this.stats(false));
            }
            if let Some(linger) = this.linger_deadline
                && now >= linger
            {
                return Poll::Ready(this.stats(false));
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
