//! Listening sockets and the accept loop.
//!
//! Owns binding, accepting and the per-listener connection limit: at
//! `max_connections` it stops accepting, so further clients wait in the
//! kernel's backlog (as HAProxy's maxconn does). Each accepted connection is
//! handed to `http` on its own task.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, debug_span, info, warn};

use crate::http::{self, ListenerCtx};

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

/// Accepts connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    info!(listener = %ctx.cfg.name, addr = ?listener.local_addr().ok(), "listening");
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("the limit semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    warn!(listener = %ctx.cfg.name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        ctx.accepted.inc();
        let _ = stream.set_nodelay(true);
        // Everything logged about this connection, down to the tunnel, is
        // inside this span (debug level: free unless enabled).
        let span = debug_span!("conn", client.addr = %peer, listener = %ctx.cfg.name);
        let Some(tls) = ctx.tls.clone() else {
            tasks.spawn(
                http::serve_connection(stream, peer, ctx.clone(), permit, shutdown.clone())
                    .instrument(span),
            );
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let handshake = async move {
            match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)).await {
                Ok(Ok(stream)) => http::serve_connection(stream, peer, ctx, permit, shutdown).await,
                // Port scanners and broken clients: counted, logged at debug.
                Ok(Err(error)) => {
                    ctx.handshake_errors.inc();
                    debug!(%error, "TLS handshake failed");
                }
                Err(_) => {
                    ctx.handshake_errors.inc();
                    debug!("TLS handshake timed out");
                }
            }
        };
        tasks.spawn(handshake.instrument(span));
    }
    info!(listener = %ctx.cfg.name, "stopped accepting");
}
