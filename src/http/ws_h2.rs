//! WebSockets over HTTP/2 (RFC 8441), on listeners with
//! `websocket_over_http2`.
//!
//! The client opens a stream with an extended CONNECT (`:protocol =
//! websocket`); sluice sends the backend an ordinary HTTP/1.1 upgrade for
//! it, with a `Sec-WebSocket-Key` of its own (`upstream` checks the
//! backend's `Sec-WebSocket-Accept` against it), and on the 101 answers
//! the client 200 with the backend's `Sec-WebSocket-Protocol` and
//! `-Extensions`. The frames then go through the same tunnel as any
//! WebSocket, the client side being the stream (`H2Io`): message
//! boundaries, drain and rebalance closes, registry counts and pins work
//! unchanged. Ending the tunnel ends only its stream.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE,
};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;

use super::{ListenerCtx, ProxyBody, TOO_MANY, headers, open_websocket, retry_after, status};
use crate::conn_limit::ConnPermit;
use crate::proxy_protocol::Client;
use crate::tunnel::TunnelIo;

/// An extended CONNECT (RFC 8441 §4); hyper shows `:protocol` only on
/// listeners that enabled it.
pub(super) fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT && req.extensions().get::<Protocol>().is_some()
}

/// Bridges one extended CONNECT to a backend's WebSocket; the answer for
/// the client's stream.
pub(super) async fn websocket(
    mut req: Request<Incoming>,
    client: Client,
    ctx: Arc<ListenerCtx>,
    permit: Arc<ConnPermit>,
    started: &mut Option<Box<super::Started>>,
) -> Response<ProxyBody> {
    let websocket = req
        .extensions()
        .get::<Protocol>()
        .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !websocket || !ctx.cfg.http2.websockets {
        return status(
            StatusCode::BAD_REQUEST,
            "only the websocket protocol is served by extended CONNECT\n",
        );
    }
    if !req
        .headers()
        .contains_key(hyper::header::SEC_WEBSOCKET_VERSION)
    {
        return status(
            StatusCode::BAD_REQUEST,
            "WebSocket over HTTP/2 without Sec-WebSocket-Version\n",
        );
    }
    // Each WebSocket counts under the listener's limits as a connection
    // would: it holds a backend connection of its own.
    let Ok(place) = ctx.limit.clone().try_acquire_owned() else {
        return retry_after(
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                "the listener is at max_connections\n",
            ),
            3,
        );
    };
    let own = ConnPermit::new(place, ctx.client_limit.as_ref(), client.addr.ip());
    if own.over_limit() || own.refused() {
        ctx.client_limited.inc();
        return retry_after(status(StatusCode::TOO_MANY_REQUESTS, TOO_MANY), 3);
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    // The backend's request: the GET of an HTTP/1.1 upgrade.
    *req.method_mut() = Method::GET;
    req.extensions_mut().remove::<Protocol>();
    if let Err((code, text)) = headers::check_request(&req, ctx.cfg.max_uri_length) {
        return status(code, text);
    }
    let key = generate_key();
    let h = req.headers_mut();
    if let Ok(key) = HeaderValue::from_str(&key) {
        h.insert(SEC_WEBSOCKET_KEY, key);
    }
    // From here on it is an HTTP/1.1 upgrade, for affinity and upstream too.
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    let switched = match open_websocket(req, &client, &ctx, started).await {
        Ok(switched) => switched,
        // A 2xx to an extended CONNECT opens the tunnel (RFC 8441 §5): a
        // backend that answered the upgrade with a page, not a 101, has
        // refused it.
        Err(answer) if answer.status().is_success() || answer.status().is_informational() => {
            return status(
                StatusCode::BAD_GATEWAY,
                "the backend answered the WebSocket upgrade without switching\n",
            );
        }
        Err(answer) => return answer,
    };
    let client_side = async move {
        let upgraded = client_upgrade.await.ok()?;
        Some((H2Io::new(upgraded), bytes::Bytes::new()))
    };
    let switch = switched.spawn_tunnel(
        &ctx,
        (permit, own),
        client_side,
        Some(ctx.h2_websockets.clone()),
        started.take(),
    );
    // 200 with what the backend chose (subprotocol, extensions, cookies).
    let mut headers = switch.headers().clone();
    headers::strip_hop_by_hop(&mut headers);
    headers.remove(SEC_WEBSOCKET_ACCEPT);
    headers.remove(CONTENT_LENGTH);
    let mut resp = Response::new(ProxyBody::empty());
    *resp.headers_mut() = headers;
    resp
}

/// The client side of a WebSocket over HTTP/2: one stream. The tunnel
/// waits for readiness without a buffer; a stream can only be read, so
/// what one read brings is held here until the tunnel takes it (then
/// freed: an idle WebSocket holds no buffer).
pub struct H2Io {
    io: TokioIo<Upgraded>,
    held: Held,
}

enum Held {
    Nothing,
    Data(Vec<u8>),
    End,
    Failed(io::Error),
}

impl H2Io {
    fn new(upgraded: Upgraded) -> Self {
        Self {
            io: TokioIo::new(upgraded),
            held: Held::Nothing,
        }
    }
}

/// The most a readiness check reads at once.
const READ_CHUNK: usize = 16 * 1024;

impl TunnelIo for H2Io {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !matches!(self.held, Held::Nothing) {
            return Poll::Ready(Ok(()));
        }
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut chunk);
        self.held = match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) if read.filled().is_empty() => Held::End,
            Poll::Ready(Ok(())) => Held::Data(read.filled().to_vec()),
            Poll::Ready(Err(error)) => Held::Failed(error),
        };
        Poll::Ready(Ok(()))
    }

    fn read_available(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Nothing => crate::tunnel::read_with_noop_waker(&mut self.io, buf),
            Held::End => Ok(0),
            Held::Failed(error) => Err(error),
            Held::Data(mut data) => {
                let n = data.len().min(buf.capacity() - buf.len());
                if n == 0 {
                    // Ok(0) would read as the end of the stream.
                    self.held = Held::Data(data);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                buf.extend_from_slice(&data[..n]);
                if n < data.len() {
                    data.drain(..n);
                    self.held = Held::Data(data);
                }
                Ok(n)
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
