//! Listening sockets and the accept loop.
//!
//! Owns binding, accepting and the per-listener connection limit: at
//! `max_connections` it stops accepting, so further clients wait in the
//! kernel's backlog (as HAProxy's maxconn does). Once the client's address
//! is known (after the PROXY header) the connection is counted against
//! `max_connections_per_client` (`conn_limit`). Each accepted connection is
//! handed to `http` on its own task.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, Span, debug, debug_span, field, info, warn};

use crate::config::ProxyVersion;
use crate::conn_limit::ConnPermit;
use crate::error_chain::chain;
use crate::http::{self, ListenerCell, ListenerCtx};
use crate::proxy_protocol::{self, Carried, Client, ProxyError};

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Binds `addr` with SO_REUSEADDR and a large backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Raises the soft file-descriptor limit to the hard one and warns when the
/// configured connection limits need more (each proxied connection holds two).
pub fn raise_fd_limit(max_connections: usize) {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            warn!(%error, "could not read the file descriptor limit");
            return;
        }
    };
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    if needed > limit {
        warn!(
            fd.limit = limit,
            fd.needed = needed,
            "file descriptor limit is below what max_connections needs; connections past it will fail"
        );
    }
}

/// The address the client connected to, as a backend's PROXY header
/// names it; asked of the socket only for pools that send one.
fn local_addr(stream: &TcpStream, ctx: &ListenerCtx) -> SocketAddr {
    if ctx.upstream.cfg.send_proxy_protocol.is_some() {
        stream.local_addr().unwrap_or(ctx.cfg.bind)
    } else {
        ctx.cfg.bind
    }
}

/// Counts the connection from `client` against its client's limit;
/// `None` (counted) when it is to be closed unanswered.
fn admit(
    listener_permit: OwnedSemaphorePermit,
    ctx: &ListenerCtx,
    client: SocketAddr,
) -> Option<ConnPermit> {
    let permit = ConnPermit::new(listener_permit, ctx.client_limit.as_ref(), client.ip());
    if permit.refused() {
        ctx.client_limited.inc();
        return None;
    }
    Some(permit)
}

/// Reads the PROXY header and runs the TLS handshake where the listener
/// has them, then serves the connection.
async fn accept_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    cell: ListenerCell,
    listener_permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let ctx = cell.load_full();
    let mut client = Client {
        addr: peer,
        local: local_addr(&stream, &ctx),
        tls: None,
    };
    if let Some(pp) = &ctx.cfg.proxy_protocol {
        let read = if pp.allows(peer.ip()) {
            proxy_protocol::read_header(&mut stream, pp.accept, ctx.cfg.header_read_timeout).await
        } else {
            Err(ProxyError::NotAllowed { peer })
        };
        match read {
            Ok(Carried::Proxied {
                source,
                destination,
            }) => {
                Span::current().record("client.addr", field::display(source));
                client.addr = source;
                client.local = destination;
            }
            // The L4 balancer's own check: the peer is the client.
            Ok(Carried::Local) => {
                Span::current().record("client.addr", field::display(peer));
            }
            Err(error) => {
                ctx.proxy_rejected.inc();
                debug!(error = %chain(&error), "PROXY header refused: closing");
                return;
            }
        }
    }
    // Counted before the TLS handshake, so one address cannot hold many
    // handshakes either; one over its limit is answered 429 after it.
    let Some(permit) = admit(listener_permit, &ctx, client.addr) else {
        return;
    };
    let tls = ctx.tls.clone();
    let send_proxy_v2 = ctx.upstream.cfg.send_proxy_protocol == Some(ProxyVersion::V2);
    // h2c with prior knowledge, on a plain listener that asks for it.
    let h2c = ctx.cfg.http2.enabled == Some(true);
    let head_timeout = ctx.cfg.header_read_timeout;
    // Not held while the connection lasts (see `http::serve_connection`).
    drop(ctx);
    let Some(tls) = tls else {
        let h2 = match h2c {
            true => http::h2::has_preface(&stream, head_timeout).await,
            false => Some(false),
        };
        match h2 {
            Some(true) => http::h2::serve(stream, client, cell, permit, shutdown).await,
            Some(false) => http::serve_connection(stream, client, cell, permit, shutdown).await,
            None => debug!("no request within the head timeout: closing"),
        }
        return;
    };
    match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)).await {
        Ok(Ok(stream)) if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ACME_TLS_ALPN) => {
            // A CA checking a TLS-ALPN-01 challenge: the handshake was
            // the answer; nothing is served on it (RFC 8737).
            debug!("answered an ACME TLS-ALPN-01 challenge");
        }
        Ok(Ok(stream)) => {
            // The SNI name is kept only for a v2 header towards backends.
            let sni = send_proxy_v2
                .then(|| stream.get_ref().1.server_name().map(Into::into))
                .flatten();
            client.tls = Some(sni);
            if stream.get_ref().1.alpn_protocol() == Some(crate::tls::H2_ALPN) {
                http::h2::serve(stream, client, cell, permit, shutdown).await;
            } else {
                http::serve_connection(stream, client, cell, permit, shutdown).await;
            }
        }
        // Port scanners and broken clients: counted, logged at debug.
        Ok(Err(error)) => {
            cell.load().handshake_errors.inc();
            debug!(%error, "TLS handshake failed");
        }
        Err(_) => {
            cell.load().handshake_errors.inc();
            debug!("TLS handshake timed out");
        }
    }
}

/// Accepts connections until `shutdown`, each served with the listener's
/// context as it is when it arrives (`cell`; a reload swaps it) and
/// holding a permit of `limit` (its `max_connections`).
pub async fn serve(
    listener: TcpListener,
    cell: ListenerCell,
    limit: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    info!(listener = %cell.load().cfg.name, addr = ?listener.local_addr().ok(), "listening");
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("the limit semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    warn!(listener = %cell.load().cfg.name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let ctx = cell.load_full();
        ctx.accepted.inc();
        // TCP_NODELAY and keepalive come from the listening socket
        // (`sockopt::listener`, set by `reload`).
        // Everything logged about this connection, down to the tunnel, is
        // inside this span (debug level: free unless enabled).
        let span = if ctx.cfg.proxy_protocol.is_some() {
            // The client's address comes with the PROXY header.
            debug_span!("conn", client.addr = field::Empty, l4.addr = %peer, listener = %ctx.cfg.name)
        } else {
            debug_span!("conn", client.addr = %peer, listener = %ctx.cfg.name)
        };
        if ctx.tls.is_none()
            && ctx.cfg.proxy_protocol.is_none()
            && ctx.cfg.http2.enabled != Some(true)
        {
            // The common case, without a wrapping future.
            let client = Client {
                addr: peer,
                local: local_addr(&stream, &ctx),
                tls: None,
            };
            let Some(permit) = admit(permit, &ctx, peer) else {
                continue;
            };
            tasks.spawn(
                http::serve_connection(stream, client, cell.clone(), permit, shutdown.clone())
                    .instrument(span),
            );
            continue;
        }
        tasks.spawn(
            accept_connection(stream, peer, cell.clone(), permit, shutdown.clone())
                .instrument(span),
        );
    }
    info!(listener = %cell.load().cfg.name, "stopped accepting");
}
