//! HTTP/2 client connections (hyper's server, the `h2` crate beneath).
//!
//! A client that negotiated `h2` by ALPN (TLS listeners), or that opens
//! with the HTTP/2 preface on a plain listener with `http2 = true` (h2c
//! with prior knowledge), is served here. Each stream is one request,
//! handled exactly as an HTTP/1.1 request is (`super::handle`): the
//! backend gets HTTP/1.1 over the pool's connections. The limits are the
//! listener's `http2_*` settings; the crate's own protections against
//! rapid resets (20 pending resets, then GOAWAY), CONTINUATION floods (the
//! header list is bounded by `max_header_size`) and a peer that never
//! reads (`max_send_buf_size` per stream, a share of 1 MiB per
//! connection) stay on.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::ListenerCell;
use crate::conn_limit::ConnPermit;
use crate::error_chain::chain;
use crate::proxy_protocol::Client;
use crate::tunnel::TunnelIo;

/// What a client sends first on an HTTP/2 connection (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A PING every this long on a connection that is otherwise quiet; one
/// unanswered for as long again ends it (a client gone without a FIN).
const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Bytes queued towards the client on one connection, over all its
/// streams (each gets its share, at least [`MIN_SEND_BUF`]) before a
/// stream whose client does not read waits: bounds what a client that
/// opens many streams and reads none can make sluice hold.
const CONNECTION_SEND_BUF: usize = 1024 * 1024;
const MIN_SEND_BUF: usize = 16 * 1024;

/// Whether the client on `stream` opens with the HTTP/2 preface, looked
/// at without consuming it: `Some(false)` as soon as its first bytes
/// differ, `None` when it sends no whole preface within `timeout` (or
/// closes): a client that says nothing is closed, as HTTP/1.1's head
/// timeout would.
pub async fn has_preface(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let look = async {
        let mut buf = [0u8; PREFACE.len()];
        let mut wait = Duration::from_millis(2);
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            if buf[..n] != PREFACE[..n] {
                return Some(false);
            }
            if n == PREFACE.len() {
                return Some(true);
            }
            // A prefix of the preface: look again a little later (peek
            // leaves the socket readable, so waiting for readiness would
            // not wait).
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(100));
        }
    };
    tokio::time::timeout(timeout, look).await.ok().flatten()
}

/// Serves one HTTP/2 client connection until it closes, or until
/// `shutdown` (GOAWAY; streams in flight finish). A connection with no
/// new stream for `http2_idle_timeout` is closed the same way.
pub async fn serve<S: TunnelIo + AsyncRead>(
    stream: S,
    client: Client,
    cell: ListenerCell,
    permit: ConnPermit,
    shutdown: CancellationToken,
) {
    let permit = Arc::new(permit);
    let (settings, max_head, head_timeout) = {
        let ctx = cell.load();
        ctx.h2_connections.inc();
        (
            ctx.cfg.http2,
            ctx.cfg.max_header_size,
            ctx.cfg.header_read_timeout,
        )
    };
    // When the last stream began, in ms since `start` (0: none yet).
    let start = tokio::time::Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let seen = last.clone();
    // Cancelled once a connection over its client's limit has had its
    // 429: where HTTP/1.1 closes it (`Connection: close`), HTTP/2 sends
    // GOAWAY. (The other edge refusals close an HTTP/1.1 connection
    // because its framing is in doubt; an HTTP/2 stream's is not.)
    let close = CancellationToken::new();
    let closing = close.clone();
    // Fixed for the connection's life.
    let over_limit = permit.over_limit();
    let service = service_fn(move |req: Request<Incoming>| {
        seen.store(start.elapsed().as_millis().max(1) as u64, Ordering::Relaxed);
        if over_limit {
            // GOAWAY lets this stream (its 429) finish.
            closing.cancel();
        }
        let ctx = cell.load_full();
        ctx.h2_streams.inc();
        let permit = permit.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(super::handle::<S>(req, client, ctx, permit).await) }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
        .max_send_buf_size(
            (CONNECTION_SEND_BUF / settings.max_concurrent_streams.max(1) as usize)
                .max(MIN_SEND_BUF),
        )
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE)
        .auto_date_header(false);
    if settings.websockets {
        builder.enable_connect_protocol();
    }
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = loop {
        let mark = last.load(Ordering::Relaxed);
        // A client that has not opened a stream yet (not even sent the
        // preface: hyper's handshake has no timeout of its own) has the
        // head timeout to do so, as on HTTP/1.1; then the idle timeout
        // runs from each new stream.
        let deadline = if mark == 0 {
            start + head_timeout
        } else {
            start + Duration::from_millis(mark) + settings.idle_timeout
        };
        tokio::select! {
            result = conn.as_mut() => break result,
            () = tokio::time::sleep_until(deadline) => {
                if last.load(Ordering::Relaxed) != mark {
                    continue;
                }
                if mark == 0 {
                    debug!("no HTTP/2 stream within the head timeout: closing");
                    break Ok(());
                }
                debug!("HTTP/2 connection idle: GOAWAY");
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            () = close.cancelled() => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            () = shutdown.cancelled() => {
                if last.load(Ordering::Relaxed) == 0 {
                    // A GOAWAY would wait for a handshake that may never come.
                    break Ok(());
                }
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
        }
    };
    if let Err(error) = result {
        debug!(error = %chain(&error), "HTTP/2 client connection ended with an error");
    }
}
