//! One direction of a tunnel: bytes from a source to a destination, with
//! the frame tracker that knows where messages begin and end, and the
//! Close frame sluice may owe the destination.
//!
//! An idle flow holds no buffer: one is taken from a small shared pool when
//! the source becomes readable and given back when the data has been
//! written.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};

use bytes::Bytes;

use crate::registry::Traffic;

use super::TunnelIo;
use super::frame::{self, FrameTracker};

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

/// A control frame of sluice's (Close or Ping) waiting to be written.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingFrame {
    frame: [u8; 10],
    len: u8,
    written: u8,
}

impl PendingFrame {
    fn new(bytes: &[u8]) -> Self {
        let mut frame = [0u8; 10];
        frame[..bytes.len()].copy_from_slice(bytes);
        Self {
            frame,
            len: bytes.len() as u8,
            written: 0,
        }
    }

    /// Writes what is left of the frame to `dst`.
    fn poll_write(
        &mut self,
        dst: &mut impl TunnelIo,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.written < self.len {
            let rest = &self.frame[self.written as usize..self.len as usize];
            let n = ready!(Pin::new(&mut *dst).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n as u8;
        }
        Poll::Ready(Ok(()))
    }
}

/// One direction: bytes from `src` to `dst`.
#[derive(Debug)]
pub(super) struct Flow {
    pub(super) tracker: FrameTracker,
    /// Data read and not yet written, `buf[start..]`; `None` when idle.
    pub(super) buf: Option<Vec<u8>>,
    pub(super) start: u32,
    /// Frames towards the backend are masked.
    pub(super) masked: bool,
    /// Close code to send at this flow's next message boundary.
    pub(super) inject: Option<u16>,
    /// Close code to send in place of the source's own Close frame, when it
    /// comes (the source's data before it is still forwarded).
    pub(super) replace_close: Option<u16>,
    /// Our Close frame, still to be written.
    pub(super) close_out: Option<PendingFrame>,
    /// Our Ping (towards the client), to be written at the next frame
    /// boundary.
    pub(super) ping_out: Option<PendingFrame>,
    /// The token of our last Ping (on the client's flow): its Pong is not
    /// forwarded.
    pub(super) pong_token: Option<[u8; frame::PING_TOKEN_LEN]>,
    /// sluice sent its Close frame: bytes from the source are no longer forwarded.
    pub(super) closed_by_us: bool,
    /// The source reached end of stream.
    pub(super) eof: bool,
    /// The write side towards the destination is shut down.
    pub(super) shut: bool,
    /// Bytes were read during the last poll.
    pub(super) active: bool,
    /// Messages already added to the backend's traffic counters.
    pub(super) counted: u64,
    /// Bytes read from the source.
    pub(super) bytes: u64,
    /// Writing to the destination failed: nothing more moves this way.
    pub(super) failed: bool,
    /// Bytes were written since the last flush.
    pub(super) unflushed: bool,
}

impl Flow {
    pub(super) fn new(pending: Bytes, masked: bool) -> Self {
        let mut flow = Self {
            tracker: FrameTracker::default(),
            buf: None,
            start: 0,
            masked,
            inject: None,
            replace_close: None,
            close_out: None,
            ping_out: None,
            pong_token: None,
            closed_by_us: false,
            eof: false,
            shut: false,
            active: false,
            counted: 0,
            bytes: 0,
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
            flow.bytes = pending.len() as u64;
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

    /// Queues our Ping with `token`, sent at the next frame boundary.
    pub(super) fn queue_ping(&mut self, token: [u8; frame::PING_TOKEN_LEN]) {
        self.ping_out = Some(PendingFrame::new(&frame::ping_frame(token)));
    }

    fn queue_close(&mut self, code: u16) {
        let mask = self.masked.then(rand::random::<[u8; 4]>);
        let (frame, len) = frame::close_frame(code, mask);
        self.close_out = Some(PendingFrame::new(&frame[..len]));
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
        } else if let Some(token) = self.pong_token {
            match self.tracker.scan_to_control(data, frame::OPCODE_PONG) {
                Some(k) if frame::is_our_pong(&data[k..], &token) => {
                    // The answer to our own Ping: the backend never sent it
                    // and does not see it.
                    self.pong_token = None;
                    buf.drain(k..k + frame::OUR_PONG_LEN);
                    self.tracker.scan(&buf[k..], false);
                }
                // Another Pong (the backend's Ping's answer), or ours cut
                // across reads: forwarded, which RFC 6455 §5.5.3 allows.
                Some(k) => {
                    self.tracker.scan(&data[k..], false);
                }
                None => {}
            }
            buf.len()
        } else {
            self.tracker.scan(data, false);
            n
        };
        buf.truncate(keep);
        self.buf = Some(buf);
        let messages = self.tracker.messages();
        traffic.add(messages - self.counted, n as u64);
        self.counted = messages;
        self.bytes += n as u64;
    }

    pub(super) fn release_buffer(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_buffer(buf);
        }
        self.start = 0;
    }

    /// True when everything read has been written.
    pub(super) fn is_flushed(&self) -> bool {
        self.buf
            .as_ref()
            .is_none_or(|b| self.start as usize >= b.len())
    }

    /// Moves bytes until the source would block (Pending) or the flow is
    /// finished: source ended and destination shut down (Ready).
    pub(super) fn poll_move(
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
            // A Ping goes between frames (control frames may sit inside a
            // fragmented message), never after our Close.
            if self.closed_by_us {
                self.ping_out = None;
            }
            if let Some(ping) = self.ping_out.as_mut()
                && self.tracker.is_at_frame_boundary()
            {
                self.unflushed = true;
                ready!(ping.poll_write(dst, cx))?;
                self.ping_out = None;
            }
            if let Some(close) = self.close_out.as_mut() {
                self.unflushed = true;
                ready!(close.poll_write(dst, cx))?;
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
pub(super) fn finished_on_error(flow: &mut Flow, polled: Poll<io::Result<()>>) -> Poll<()> {
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
