//! Socket options on accepted and outgoing TCP connections.
//!
//! Owns TCP keepalive: a peer that vanished without a FIN (a phone that
//! lost its network, a NAT that dropped its state) is found by the kernel
//! after `idle + interval × count` of silence, and the connection then
//! fails like any other, freeing both of a tunnel's sockets. The `socket2`
//! crate sets the options; tokio's stream has no keepalive setter.
//! Accepted connections get theirs from the listening socket (`listener`):
//! Linux copies `TCP_NODELAY` and the keepalive options to each socket it
//! accepts, which saves five system calls per client connection.

use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Turns on keepalive probes after `idle` of silence, every `interval`,
/// `count` of them unanswered ending the connection. Best effort: a socket
/// that refuses the option works as before.
pub fn keepalive(stream: &TcpStream, idle: Duration, interval: Duration, count: u32) {
    let probes = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(count);
    if let Err(error) = SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!(%error, "could not set TCP keepalive");
    }
}

/// Sets on a listening socket what the connections it accepts inherit:
/// Nagle off, and keepalive probes as configured (`None`: off). Best
/// effort, as `keepalive`.
pub fn listener(socket: &impl AsFd, keepalive: Option<(Duration, Duration, u32)>) {
    let sock = SockRef::from(socket);
    if let Err(error) = sock.set_tcp_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY on a listening socket");
    }
    let result = match keepalive {
        Some((idle, interval, count)) => sock.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(count),
        ),
        None => sock.set_keepalive(false),
    };
    if let Err(error) = result {
        tracing::debug!(%error, "could not set TCP keepalive on a listening socket");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_kernel_reports_what_was_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = TcpStream::connect(addr).await.expect("connect");
        keepalive(&stream, Duration::from_secs(7), Duration::from_secs(3), 4);
        let sock = SockRef::from(&stream);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(7)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(3)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("count"), 4);
    }

    #[tokio::test]
    async fn accepted_connections_inherit_the_listening_sockets_options() {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener(
            &socket,
            Some((Duration::from_secs(9), Duration::from_secs(2), 5)),
        );
        let addr = socket.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = socket.accept().await.expect("accept");
        let sock = SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().expect("TCP_NODELAY"));
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(9)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("count"), 5);

        // Turned off on the listener, off on what it accepts next.
        listener(&socket, None);
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = socket.accept().await.expect("accept");
        assert!(!SockRef::from(&accepted).keepalive().expect("SO_KEEPALIVE"));
    }
}
