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
    let text = exchange(
        &sluice,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(!text.contains("content-length: 5"), "{text}");
    assert!(text.contains("hello world"), "the whole body: {text}");
}

/// Sends `request` as raw bytes and returns all sluice answered, until it
/// closed the connection.
async fn exchange(sluice: &Sluice, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    // sluice may answer and close before it has read everything.
    let _ = stream.write_all(request).await;
    let mut got = Vec::new();
    let _ = within(10, "answer", stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// Requests an echo backend has answered.
fn requests(backend: &sluice::demo::EchoBackend) -> usize {
    backend
        .stats
        .http_requests
        .load(std::sync::atomic::Ordering::SeqCst)
}

/// Sends `request` as raw bytes and returns sluice's status line.
async fn status_of(sluice: &Sluice, request: &[u8]) -> String {
    exchange(sluice, request)
        .await
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn oversized_heads_and_host_errors_are_answered_and_never_forwarded() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::with_config(config(&[backends[0].addr])).await;
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(9000));
    assert_eq!(
        status_of(&sluice, long_target.as_bytes()).await,
        "HTTP/1.1 414 URI Too Long"
    );
    let one_huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "y".repeat(40_000)
    );
    assert_eq!(
        status_of(&sluice, one_huge.as_bytes()).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-H{i}: {}\r\n", "z".repeat(2000)));
    }
    many.push_str("\r\n");
    assert_eq!(
        status_of(&sluice, many.as_bytes()).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(
        status_of(&sluice, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await,
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(
        status_of(&sluice, b"GET / HTTP/1.1\r\n\r\n").await,
        "HTTP/1.1 400 Bad Request"
    );
    assert_eq!(requests(&backends[0]), 0, "nothing reached the backend");
    // HTTP/1.0 may leave Host out; a head within the limits goes through.
    assert_eq!(
        status_of(&sluice, b"GET / HTTP/1.0\r\n\r\n").await,
        "HTTP/1.0 200 OK"
    );
}

#[tokio::test]
async fn connection_cannot_name_host_away() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::with_config(config(&[backends[0].addr])).await;
    let text = exchange(
        &sluice,
        b"GET /seen HTTP/1.1\r\nHost: app.test\r\nConnection: close, host, x-drop\r\nX-Drop: 1\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(text.contains("host: app.test\n"), "{text}");
    assert!(
        !text.contains("x-drop"),
        "named hop-by-hop headers still go: {text}"
    );
}

#[tokio::test]
async fn a_stalled_request_body_ends_with_408_and_frees_the_backend() {
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    cfg.listeners[0].body_timeout = std::time::Duration::from_millis(300);
    let sluice = Sluice::with_config(cfg).await;
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    // 10 of the 100 bytes announced, then silence.
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let head = within(5, "an answer", read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    eventually(5, "the backend's slot given back", || {
        sluice.registry().pools()[0].backends[0].active() == 0
    })
    .await;
    // A body that keeps coming, slower than nothing but faster than the
    // timeout, goes through.
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
    for part in [b"ab", b"cd", b"ef"] {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        stream.write_all(part).await.expect("part");
    }
    let mut got = Vec::new();
    within(5, "answer", stream.read_to_end(&mut got))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("abcdef"), "{text}");
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::with_config(config(&[backends[0].addr])).await;
    let post = |te: &str| {
        format!(
            "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
    };
    for (te, expected) in [
        ("gzip, chunked", "HTTP/1.1 501 Not Implemented"),
        ("chunked, chunked", "HTTP/1.1 400 Bad Request"),
        ("identity", "HTTP/1.1 400 Bad Request"),
        ("gzip", "HTTP/1.1 400 Bad Request"),
    ] {
        assert_eq!(
            status_of(&sluice, post(te).as_bytes()).await,
            expected,
            "{te}"
        );
    }
    assert_eq!(requests(&backends[0]), 0, "nothing reached the backend");
    // A plain chunked body goes through.
    let ok = exchange(
        &sluice,
        post("chunked")
            .replace("Host: a", "Host: a\r\nConnection: close")
            .as_bytes(),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("hello"), "{ok}");
}

/// An upgrade request with a body is refused: its bytes would otherwise
/// reach the backend as body or as WebSocket frames depending on who reads
/// them.
#[tokio::test]
async fn an_upgrade_request_with_a_body_is_refused() {
    let backend = RawBackend::echo("").await;
    let sluice = Sluice::with_config(config(&[backend.addr])).await;
    let head = "GET /ws HTTP/1.1\r\nHost: sluice.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let frame = frame(0x81, b"hi", Some([1, 2, 3, 4]));
    for framing in [
        "Content-Length: 8\r\n\r\n".to_string(),
        "Transfer-Encoding: chunked\r\n\r\n8\r\n".to_string(),
    ] {
        let mut request = format!("{head}{framing}").into_bytes();
        request.extend_from_slice(&frame);
        let answer = exchange(&sluice, &request).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request"),
            "{framing:?}: {answer}"
        );
        assert!(answer.contains("WebSocket upgrade with a request body"));
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    assert!(
        backend.seen.lock().expect("lock").is_empty(),
        "nothing reached the backend"
    );
    // Content-Length: 0 is no body.
    let ok = within(5, "101", async {
        let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
        stream
            .write_all(format!("{head}Content-Length: 0\r\n\r\n").as_bytes())
            .await
            .expect("write");
        read_head(&mut stream).await
    })
    .await;
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
}

/// One address cannot take a listener's places: past
/// `max_connections_per_client` it gets 429 with Retry-After, and nothing
/// reaches a backend; other addresses are not affected, and a place that
/// comes free can be taken again.
#[tokio::test]
async fn max_connections_per_client_answers_429_past_the_limit() {
    use futures_util::StreamExt;
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    cfg.listeners[0].max_connections_per_client = 2;
    let sluice = Sluice::with_config(cfg).await;
    let from = [127, 0, 0, 7];
    let ws = |stream: TcpStream| {
        let url = sluice.url("/ws");
        async move {
            tokio_tungstenite::client_async(url, stream)
                .await
                .map(|(ws, _)| ws)
        }
    };
    let mut first = ws(connect_from(from, sluice.addr).await)
        .await
        .expect("first");
    let _second = ws(connect_from(from, sluice.addr).await)
        .await
        .expect("second");
    let requests = || {
        backends[0]
            .stats
            .ws_accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = requests();
    // A third connection from the same address: 429, for a WebSocket...
    match ws(connect_from(from, sluice.addr).await).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            let retry: u32 = resp.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!((1..=3).contains(&retry), "{retry}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // ...and for plain HTTP.
    let mut http = HttpClient::over(connect_from(from, sluice.addr).await).await;
    assert_eq!(http.get("/").await.status, 429);
    assert_eq!(requests(), before, "nothing reached the backend");
    // Another address is not affected.
    let mut other = HttpClient::over(connect_from([127, 0, 0, 8], sluice.addr).await).await;
    assert_eq!(other.get("/").await.status, 200);
    // A place that comes free is there again.
    first.close(None).await.expect("close");
    while first.next().await.is_some() {}
    drop(first);
    let mut again = None;
    for _ in 0..50 {
        if let Ok(ws) = ws(connect_from(from, sluice.addr).await).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the freed place was not given back");
}

/// Targets and Host values outside RFC 9112/3986, and CONNECT, are refused
/// with their status and never forwarded (found by the request-path fuzz
/// target, which forwarded them before).
#[tokio::test]
async fn malformed_targets_hosts_and_connect_are_refused() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::with_config(config(&[backends[0].addr])).await;
    for (request, status) in [
        (
            &b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            "HTTP/1.1 400 Bad Request",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: ' sluice.test\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: user@evil.test\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
        (
            b"PATCH * HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
        (
            b"GET http://user@evil.test/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
        (
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
    ] {
        assert_eq!(
            status_of(&sluice, request).await,
            status,
            "{}",
            request.escape_ascii()
        );
    }
    assert_eq!(requests(&backends[0]), 0, "nothing reached the backend");
    assert_eq!(
        status_of(
            &sluice,
            b"OPTIONS * HTTP/1.1\r\nHost: a:80\r\nConnection: close\r\n\r\n"
        )
        .await,
        "HTTP/1.1 200 OK"
    );
}
