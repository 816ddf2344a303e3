//! What a backend may not do to a client through sluice: switch it to a
//! protocol it did not ask for, or frame a body wrongly.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// The status line of what sluice answered, and whether the connection
/// then carried anything of the backend's.
async fn upgrade_through(answer: &'static [u8]) -> String {
    let backend = scripted_backend(std::time::Duration::ZERO, move |_| Some(answer)).await;
    let sluice = Sluice::with_config(config(&[backend])).await;
    let (_stream, head) = raw_ws_client(sluice.addr, "").await;
    head.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_101_without_the_right_accept_is_a_502() {
    // The right answer to raw_ws_client's key (RFC 6455's example).
    let good = upgrade_through(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    )
    .await;
    assert_eq!(good, "HTTP/1.1 101 Switching Protocols");
    for bad in [
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: d3JvbmcK\r\n\r\n"[..],
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    ] {
        assert_eq!(
            upgrade_through(bad).await,
            "HTTP/1.1 502 Bad Gateway",
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[tokio::test]
async fn a_101_to_a_plain_request_is_a_502() {
    let backend = scripted_backend(std::time::Duration::ZERO, |_| {
        Some(
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"[..],
        )
    })
    .await;
    let sluice = Sluice::with_config(config(&[backend])).await;
    assert_eq!(sluice.http().await.get("/").await.status, 502);
}

#[tokio::test]
async fn the_backend_is_asked_for_websocket_only() {
    let backend = RawBackend::echo("").await;
    let sluice = Sluice::with_config(config(&[backend.addr])).await;
    let (_stream, head) = raw_ws_client(sluice.addr, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    stream
        .write_all(b"GET /raw HTTP/1.1\r\nHost: sluice.test\r\nUpgrade: websocket, h2c\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .expect("write");
    let head = within(10, "101", read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let seen = backend.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let upgrade: Vec<&str> = s
            .head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("upgrade:"))
            .collect();
        assert_eq!(upgrade, ["upgrade: websocket"], "{}", s.head);
    }
}

#[tokio::test]
async fn a_chunked_body_is_not_cut_by_its_content_length() {
    let backend = scripted_backend(std::time::Duration::ZERO, |_| {
        Some(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n"[..])
    })
    .await;
    let sluice = Sluice::with_config(config(&[backend])).await;
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    within(10, "answer", stream.read_to_end(&mut got))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(!text.contains("content-length: 5"), "{text}");
    assert!(text.contains("hello world"), "the whole body: {text}");
}
