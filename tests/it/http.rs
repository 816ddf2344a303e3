//! Plain HTTP/1.1 through sluice.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn get_and_post_are_proxied_over_keep_alive() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let mut client = sluice.http().await;
    for i in 0..5 {
        let reply = client.get(&format!("/item/{i}?q=1")).await;
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .text()
                .starts_with(&format!("b1: GET /item/{i}?q=1\n")),
            "{}",
            reply.text()
        );
    }
    let req = hyper::Request::post("/submit")
        .header("host", "sluice.test")
        .body(Full::new(Bytes::from_static(b"name=sluice&x=1")))
        .expect("request");
    let reply = client.send(req).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.text().ends_with("\n\nname=sluice&x=1"),
        "{}",
        reply.text()
    );
    // Six requests, one client connection, one upstream connection reused.
    assert_eq!(backends[0].stats.tcp_accepted.load(Ordering::SeqCst), 1);
    assert_eq!(backends[0].stats.http_requests.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn upstream_connections_are_reused_across_clients() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    for _ in 0..5 {
        let mut client = sluice.http().await;
        assert_eq!(client.get("/").await.status, 200);
    }
    assert_eq!(backends[0].stats.tcp_accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn chunked_request_body_arrives_whole() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    within(10, "response", stream.read_to_end(&mut out))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("hello world"), "{text}");
}

#[tokio::test]
async fn forwarded_headers_reach_the_backend() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let mut client = sluice.http().await;
    let req = hyper::Request::get("/who")
        .header("host", "sluice.test")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let seen = client.send(req).await.text();
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(
        seen.contains("forwarded: for=127.0.0.1;proto=http\n"),
        "{seen}"
    );
    assert!(seen.contains("host: sluice.test\n"), "{seen}");
}

#[tokio::test]
async fn malformed_request_gets_400_and_is_not_forwarded() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    for garbage in [
        &b"THIS IS NOT HTTP\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
        stream.write_all(garbage).await.expect("write");
        let mut out = Vec::new();
        within(10, "response", stream.read_to_end(&mut out))
            .await
            .expect("read");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    }
    assert_eq!(backends[0].stats.tcp_accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn malformed_websocket_upgrade_gets_400() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .expect("write");
    let head = within(10, "response", read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(backends[0].stats.tcp_accepted.load(Ordering::SeqCst), 0);
}

/// Regression (review of the core): a backend connection whose request
/// body was still uploading went back to the idle pool, and the next
/// request waited on it for as long as the upload stalled.
#[tokio::test]
async fn stalled_upload_does_not_hold_up_the_next_request() {
    // A backend that answers from the request line alone, without reading bodies.
    let addr = scripted_backend(std::time::Duration::ZERO, |head| {
        Some(if head.starts_with("POST") {
            &b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"[..]
        } else {
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..]
        })
    })
    .await;
    let sluice = Sluice::with_config(config(&[addr])).await;
    let mut uploader = TcpStream::connect(sluice.addr).await.expect("connect");
    uploader
        .write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n0123456789")
        .await
        .expect("write");
    let head = within(5, "early answer", read_head(&mut uploader)).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let reply = within(3, "the next request", async {
        sluice.http().await.get("/next").await
    })
    .await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
}
