//! Socket options on accepted and outgoing TCP connections.
//!
//! Owns TCP keepalive: a peer that vanished without a FIN (a phone that
//! lost its network, a NAT that dropped its state) is found by the kernel
//! after `idle + interval × count` of silence, and the connection then
//! fails like any other, freeing both of a tunnel's sockets. The `socket2`
//! crate sets the options; tokio's stream has no keepalive setter.

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
}
