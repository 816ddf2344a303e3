//! HTTP/2 from clients: h2 by ALPN on TLS listeners, h2c with prior
//! knowledge on plain ones; backends get HTTP/1.1.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice::config::Algorithm;
use tokio::net::TcpStream;

use crate::support::*;
use crate::tls::{one_cert, temp_dir, tls_over_alpn, write_cert};

const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

/// An HTTP/2 client connection over `io`.
async fn h2<I>(io: I) -> SendRequest<Full<Bytes>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

async fn send(sender: &SendRequest<Full<Bytes>>, req: hyper::Request<Full<Bytes>>) -> Reply {
    let mut sender = sender.clone();
    let resp = within(20, "h2 response", sender.send_request(req))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = within(20, "h2 body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

fn get(uri: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// A sluice with one TLS listener (certificate for `app.test`), HTTP/2 at
/// its default (on), over `backends`.
async fn tls_sluice(
    backends: &[sluice::demo::EchoBackend],
    edit: impl FnOnce(&mut sluice::config::Config),
) -> (Sluice, crate::support::process::TempDir) {
    let dir = temp_dir("h2");
    write_cert(&dir, "site", &["app.test"]);
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.listeners[0].tls = Some(one_cert(&dir, "site", Duration::from_secs(5)));
    edit(&mut cfg);
    (Sluice::with_config(cfg).await, dir)
}

async fn h2_over_tls(sluice: &Sluice) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(sluice.addr).await.expect("connect");
    let (tls, _) = tls_over_alpn(tcp, "app.test", BOTH).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    h2(tls).await
}

#[tokio::test]
async fn requests_over_h2_reach_http_1_1_backends_with_bodies_and_concurrent_streams() {
    let backends = echo_backends(2).await;
    let (sluice, _dir) = tls_sluice(&backends, |_| {}).await;
    let client = h2_over_tls(&sluice).await;

    // The backend (hyper, HTTP/1.1 only) sees an origin-form request with
    // the :authority as Host and the forwarded headers.
    let page = send(&client, get("https://app.test/page?x=1")).await;
    assert_eq!(page.status, 200);
    let seen = page.text();
    assert!(seen.contains(": GET /page?x=1\n"), "{seen}");
    assert!(seen.contains("host: app.test\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");

    // Bodies both ways, up to 8 MiB, on streams of one connection at once.
    let body = |n: usize| Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut streams = Vec::new();
    for i in 0..24usize {
        let client = client.clone();
        let size = [0, 1, 1000, 70_000, 1 << 20, 8 << 20][i % 6];
        streams.push(tokio::spawn(async move {
            let sent = body(size);
            let req = hyper::Request::post(format!("https://app.test/echo/{i}"))
                .body(Full::new(sent.clone()))
                .expect("request");
            let reply = send(&client, req).await;
            assert_eq!(reply.status, 200);
            let text = &reply.body;
            let head_end = text
                .windows(2)
                .position(|w| w == b"\n\n")
                .expect("head then body")
                + 2;
            let head = String::from_utf8_lossy(&text[..head_end]).to_string();
            assert!(head.contains(&format!("POST /echo/{i}\n")), "{head}");
            assert!(
                head.contains(&format!("content-length: {size}\n")),
                "{head}"
            );
            assert_eq!(text.len() - head_end, size, "{head}");
            assert!(text[head_end..] == sent[..], "stream {i}: body differs");
            reply.headers["x-backend"]
                .to_str()
                .expect("name")
                .to_string()
        }));
    }
    let mut served = std::collections::HashSet::new();
    for s in streams {
        served.insert(within(60, "stream", s).await.expect("stream task"));
    }
    assert_eq!(served.len(), 2, "streams are balanced over the pool");

    let metrics = sluice.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "sluice_http2_connections_total{listener=\"public\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "sluice_http2_streams_total{listener=\"public\"}"),
        25.0
    );
}

#[tokio::test]
async fn h2_requests_get_the_same_stickiness_and_error_answers() {
    let backends = echo_backends(3).await;
    let (sluice, _dir) = tls_sluice(&backends, |cfg| {
        cfg.pools[0].algorithm = Algorithm::RoundRobin;
        cfg.pools[0].sticky = Some(test_sticky());
    })
    .await;
    let client = h2_over_tls(&sluice).await;
    let first = send(&client, get("https://app.test/poll")).await;
    let cookie = sticky_pin(&first.headers).expect("a sticky cookie over h2");
    let pinned = first.headers["x-backend"].clone();
    for _ in 0..6 {
        // HTTP/2 clients send each cookie in a field of its own.
        let req = hyper::Request::get("https://app.test/poll")
            .header("cookie", "theme=dark")
            .header("cookie", &cookie)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let reply = send(&client, req).await;
        assert_eq!(reply.headers["x-backend"], pinned);
        assert!(
            reply
                .text()
                .contains(&format!("cookie: theme=dark; {cookie}\n")),
            "one Cookie line for the backend: {}",
            reply.text()
        );
    }

    // A request sluice refuses is refused on its stream only.
    let long = format!("https://app.test/{}", "a".repeat(9000));
    assert_eq!(send(&client, get(&long)).await.status, 414);
    assert_eq!(send(&client, get("https://app.test/ok")).await.status, 200);
    // No backend: 503 with Retry-After, and the connection still serves.
    drop(backends);
    let down = send(&client, get("https://app.test/x")).await;
    assert!(
        matches!(down.status, 502 | 503),
        "{} {}",
        down.status,
        down.text()
    );
}

#[tokio::test]
async fn http2_false_offers_http_1_1_only() {
    let backends = echo_backends(1).await;
    let (sluice, _dir) = tls_sluice(&backends, |cfg| {
        cfg.listeners[0].http2.enabled = Some(false);
    })
    .await;
    let tcp = TcpStream::connect(sluice.addr).await.expect("connect");
    let (tls, _) = tls_over_alpn(tcp, "app.test", BOTH).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn a_plain_listener_with_http2_takes_h2c_and_http_1_1() {
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    cfg.listeners[0].http2.enabled = Some(true);
    let sluice = Sluice::with_config(cfg).await;
    let tcp = TcpStream::connect(sluice.addr).await.expect("connect");
    let client = h2(tcp).await;
    let reply = send(&client, get("http://app.test/h2c")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("x-forwarded-proto: http\n"));
    // The same listener still speaks HTTP/1.1, and WebSockets over it.
    let mut http = sluice.http().await;
    assert_eq!(http.get("/h1").await.status, 200);
    let (_ws, name) = sluice.ws_named("/ws").await;
    assert_eq!(name, "b1");

    // Without `http2 = true` a plain listener does not take h2c.
    let backends = echo_backends(1).await;
    let plain = Sluice::start(&[&backends[0]]).await;
    let tcp = TcpStream::connect(plain.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
        .await
        .expect("the client side of the handshake");
    tokio::spawn(conn);
    let refused = within(10, "refused", sender.send_request(get("http://app.test/"))).await;
    assert!(refused.is_err(), "{refused:?}");
}

/// What curl (a third-party HTTP/2 client) says it spoke through `url`.
async fn curl_version(args: &[&str], url: &str) -> String {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_version} %{http_code}"];
    all.extend_from_slice(args);
    all.push(url);
    curl(&all).await
}

#[tokio::test]
async fn curl_speaks_h2_over_tls_and_h2c_with_prior_knowledge() {
    let backends = echo_backends(1).await;
    let (sluice, _dir) = tls_sluice(&backends, |_| {}).await;
    let port = sluice.addr.port();
    let resolve = format!("app.test:{port}:127.0.0.1");
    let url = format!("https://app.test:{port}/curl");
    assert_eq!(
        curl_version(&["-k", "--http2", "--resolve", &resolve], &url).await,
        "2 200"
    );
    assert_eq!(
        curl_version(&["-k", "--http1.1", "--resolve", &resolve], &url).await,
        "1.1 200"
    );

    let mut cfg = config(&[backends[0].addr]);
    cfg.listeners[0].http2.enabled = Some(true);
    let plain = Sluice::with_config(cfg).await;
    let url = format!("http://{}/curl", plain.addr);
    assert_eq!(
        curl_version(&["--http2-prior-knowledge"], &url).await,
        "2 200"
    );
    assert_eq!(curl_version(&[], &url).await, "1.1 200");
}

type H2Ws = tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A WebSocket over the HTTP/2 connection of `client` (RFC 8441), past
/// the demo backend's greeting; with the 200's headers and the backend's
/// name.
async fn ws_over_h2(
    client: &SendRequest<Full<Bytes>>,
    path: &str,
    extra: &[(&str, &str)],
) -> (H2Ws, hyper::HeaderMap, String) {
    let (headers, upgraded) = connect_h2(client, path, extra).await;
    let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.max_message_size = Some(64 << 20);
    config.max_frame_size = Some(64 << 20);
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        Some(config),
    )
    .await;
    let name = greeting(&mut ws).await;
    (ws, headers, name)
}

/// The answer to an extended CONNECT (RFC 8441) for a WebSocket at `path`.
async fn extended_connect(
    client: &SendRequest<Full<Bytes>>,
    path: &str,
    extra: &[(&str, &str)],
) -> hyper::Response<hyper::body::Incoming> {
    let mut req = hyper::Request::connect(format!("https://app.test{path}"))
        .header("sec-websocket-version", "13");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let mut req = req.body(Full::new(Bytes::new())).expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    within(10, "extended CONNECT", client.clone().send_request(req))
        .await
        .expect("response")
}

/// An extended CONNECT for a WebSocket at `path`: the 200's headers and
/// the stream.
async fn connect_h2(
    client: &SendRequest<Full<Bytes>>,
    path: &str,
    extra: &[(&str, &str)],
) -> (hyper::HeaderMap, hyper::upgrade::Upgraded) {
    let resp = extended_connect(client, path, extra).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    let headers = resp.headers().clone();
    let upgraded = within(10, "upgrade", hyper::upgrade::on(resp))
        .await
        .expect("upgraded");
    (headers, upgraded)
}

async fn ws_h2_sluice(
    backends: &[sluice::demo::EchoBackend],
) -> (Sluice, crate::support::process::TempDir) {
    tls_sluice(backends, |cfg| {
        cfg.listeners[0].http2.websockets = true;
        cfg.pools[0].drain.window = Duration::ZERO;
    })
    .await
}

#[tokio::test]
async fn websockets_over_h2_carry_messages_from_1_byte_to_16_mib() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let backends = echo_backends(1).await;
    let (sluice, _dir) = ws_h2_sluice(&backends).await;
    let client = h2_over_tls(&sluice).await;
    // The page first, on the same connection, as a browser does.
    assert_eq!(send(&client, get("https://app.test/")).await.status, 200);
    let (mut ws, headers, name) =
        ws_over_h2(&client, "/ws", &[("sec-websocket-protocol", "chat, other")]).await;
    assert_eq!(name, "b1");
    assert_eq!(headers["sec-websocket-protocol"], "chat");
    assert!(!headers.contains_key("sec-websocket-accept"));
    for size in [1usize, 125, 126, 65_535, 65_536, 1 << 20, 16 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        ws.send(Message::binary(payload.clone()))
            .await
            .expect("send");
        let back = within(30, "echo", ws.next()).await;
        match back {
            Some(Ok(Message::Binary(b))) => assert!(b[..] == payload[..], "{size} B differ"),
            other => panic!("{size} B: {other:?}"),
        }
    }
    let metrics = sluice.metrics().await;
    assert_eq!(
        metric(&metrics, "sluice_http2_websockets{listener=\"public\"}"),
        1.0,
        "{metrics}"
    );
    ws.close(None).await.expect("close");
    while let Some(Ok(_)) = ws.next().await {}
    eventually(10, "the WebSocket is gone from the count", || {
        backends[0].ws_open() == 0
    })
    .await;
    // The connection still serves.
    assert_eq!(
        send(&client, get("https://app.test/after")).await.status,
        200
    );
}

/// The code of the Close the WebSocket gets next (messages before it
/// skipped).
async fn close_code(ws: &mut H2Ws) -> Option<u16> {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    within(10, "close", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_drain_closes_each_h2_websocket_with_1012_and_leaves_the_rest_of_the_connection() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let backends = echo_backends(2).await;
    let (sluice, _dir) = ws_h2_sluice(&backends).await;
    let client = h2_over_tls(&sluice).await;
    let mut on = std::collections::HashMap::<String, Vec<H2Ws>>::new();
    for _ in 0..6 {
        let (ws, _, name) = ws_over_h2(&client, "/ws", &[]).await;
        on.entry(name).or_default().push(ws);
    }
    assert_eq!(
        on["b1"].len(),
        3,
        "least connections over one h2 connection"
    );
    let status = sluice.backend_status("b1").await;
    assert_eq!(status.connections.ws, 3, "{status:?}");

    within(10, "drain", sluice.admin().drain("app", "b1", Some("0s")))
        .await
        .expect("drain");
    for ws in on.get_mut("b1").expect("b1") {
        assert_eq!(close_code(ws).await, Some(1012));
    }
    // The others, and page requests on the same connection, go on.
    for ws in on.get_mut("b2").expect("b2") {
        ws.send(Message::text("still here")).await.expect("send");
        let back = within(10, "echo", ws.next()).await;
        assert!(
            matches!(&back, Some(Ok(Message::Text(t))) if t.as_str() == "still here"),
            "{back:?}"
        );
    }
    let page = send(&client, get("https://app.test/page")).await;
    assert_eq!(
        (page.status, page.headers["x-backend"].to_str().ok()),
        (200, Some("b2"))
    );
}

#[tokio::test]
async fn shutdown_closes_each_h2_websocket_with_1001_then_the_connection() {
    let backends = echo_backends(1).await;
    let (mut sluice, _dir) = ws_h2_sluice(&backends).await;
    let client = h2_over_tls(&sluice).await;
    let (mut a, _, _) = ws_over_h2(&client, "/ws", &[]).await;
    let (mut b, _, _) = ws_over_h2(&client, "/ws", &[]).await;
    let stop = tokio::spawn(async move { sluice.stop().await });
    for ws in [&mut a, &mut b] {
        assert_eq!(close_code(ws).await, Some(1001));
    }
    drop((a, b));
    within(15, "sluice stops", stop).await.expect("stopped");
    eventually(10, "the connection ends", || client.is_closed()).await;
}

#[tokio::test]
async fn frames_pass_byte_for_byte_over_h2_fragments_pings_compressed_and_close() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let backend = RawBackend::echo("Sec-WebSocket-Extensions: permessage-deflate\r\n").await;
    let dir = temp_dir("h2-raw");
    write_cert(&dir, "site", &["app.test"]);
    let mut cfg = config(&[backend.addr]);
    cfg.listeners[0].tls = Some(one_cert(&dir, "site", Duration::from_secs(5)));
    cfg.listeners[0].http2.websockets = true;
    let sluice = Sluice::with_config(cfg).await;
    let client = h2_over_tls(&sluice).await;
    let (headers, upgraded) = connect_h2(
        &client,
        "/raw",
        &[
            ("sec-websocket-extensions", "permessage-deflate"),
            ("sec-websocket-protocol", "chat"),
            ("origin", "https://app.test"),
        ],
    )
    .await;
    assert_eq!(headers["sec-websocket-extensions"], "permessage-deflate");
    // The backend got an ordinary HTTP/1.1 upgrade with the client's headers.
    let head = backend.seen.lock().expect("lock")[0].head.clone();
    let lower = head.to_ascii_lowercase();
    assert!(lower.starts_with("get /raw http/1.1\r\n"), "{head}");
    for line in [
        "host: app.test\r\n",
        "upgrade: websocket\r\n",
        "connection: upgrade\r\n",
        "sec-websocket-version: 13\r\n",
        "sec-websocket-extensions: permessage-deflate\r\n",
        "sec-websocket-protocol: chat\r\n",
        "origin: https://app.test\r\n",
    ] {
        assert!(lower.contains(line), "{line:?} in {head}");
    }
    assert!(lower.contains("sec-websocket-key: "), "{head}");

    let mut stream = TokioIo::new(upgraded);
    let sent = transparency_frames();
    for chunk in sent.chunks(777) {
        stream.write_all(chunk).await.expect("write");
    }
    let mut back = vec![0u8; sent.len()];
    within(10, "echo", stream.read_exact(&mut back))
        .await
        .expect("read");
    assert_eq!(back, sent, "the client got back exactly what it sent");
    assert_eq!(backend.seen.lock().expect("lock")[0].bytes, sent);
}

/// Headless Chromium showing `url` (app.test resolves to 127.0.0.1), until
/// dropped.
fn chromium(url: &str, profile: &std::path::Path) -> crate::support::process::Proc {
    crate::support::process::Proc(
        crate::support::browser::chromium(profile)
            .args([
                "--ignore-certificate-errors",
                "--host-resolver-rules=MAP app.test 127.0.0.1",
            ])
            .arg(url)
            .spawn()
            .expect("chromium starts"),
    )
}

#[tokio::test]
async fn chromium_loads_the_demo_page_over_h2_and_opens_its_websocket_inside() {
    if !crate::support::browser::chromium_here() {
        return;
    }
    for over_h2 in [true, false] {
        let backends = echo_backends(1).await;
        let (sluice, dir) = tls_sluice(&backends, |cfg| {
            cfg.listeners[0].http2.websockets = over_h2;
        })
        .await;
        let url = format!("https://app.test:{}/", sluice.addr.port());
        let _browser = chromium(&url, &dir.path().join("profile"));
        // The demo page opens its WebSocket as soon as it has loaded.
        within(60, "the page's WebSocket is open", async {
            while backends[0].ws_open() == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let metrics = sluice.metrics().await;
        let streams = metric(&metrics, "sluice_http2_streams_total{listener=\"public\"}");
        assert!(streams >= 1.0, "the page came over h2: {metrics}");
        assert_eq!(
            metric(&metrics, "sluice_http2_websockets{listener=\"public\"}"),
            if over_h2 { 1.0 } else { 0.0 },
            "websocket_over_http2 = {over_h2}: {metrics}"
        );
        let status = sluice.backend_status("b1").await;
        assert_eq!(status.connections.ws, 1, "{status:?}");
    }
}

/// HTTP/2 frames written by hand, for what no well-behaved client sends.
mod raw {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// `GET http://a.test/` in HPACK: indexed :method, :scheme, :path; a
    /// literal :authority.
    pub fn get_block() -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x84, 0x01, 0x06];
        block.extend_from_slice(b"a.test");
        block
    }

    /// An h2c connection after the preface and an empty SETTINGS.
    pub async fn connect(addr: std::net::SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(super::sluice_h2::PREFACE)
            .await
            .expect("preface");
        s.write_all(&frame(SETTINGS, 0, 0, &[]))
            .await
            .expect("settings");
        s
    }

    /// Reads frames until the connection ends or `secs` pass: the kinds
    /// seen, in order, with the GOAWAY error code if one came.
    pub async fn frames_until_closed(s: &mut TcpStream, secs: u64) -> (Vec<u8>, Option<u32>) {
        let mut kinds = Vec::new();
        let mut goaway = None;
        let read = async {
            loop {
                let mut head = [0u8; 9];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                if s.read_exact(&mut payload).await.is_err() {
                    return;
                }
                kinds.push(head[3]);
                if head[3] == GOAWAY && payload.len() >= 8 {
                    goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(secs), read).await;
        (kinds, goaway)
    }
}

mod sluice_h2 {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
}

async fn h2c_sluice(backends: &[sluice::demo::EchoBackend]) -> Sluice {
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.listeners[0].http2.enabled = Some(true);
    Sluice::with_config(cfg).await
}

#[tokio::test]
async fn rapid_reset_is_bounded() {
    use tokio::io::AsyncWriteExt as _;
    let backends = echo_backends(1).await;
    let sluice = h2c_sluice(&backends).await;
    let mut s = raw::connect(sluice.addr).await;
    let block = raw::get_block();
    let attempts = 5_000u32;
    let mut burst = Vec::new();
    for i in 0..attempts {
        let id = 2 * i + 1;
        burst.extend(raw::frame(raw::HEADERS, 0x5, id, &block));
        burst.extend(raw::frame(raw::RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    // The server may stop reading (GOAWAY, close) before all of it is in.
    let _ = within(20, "burst", s.write_all(&burst)).await;
    let (kinds, goaway) = raw::frames_until_closed(&mut s, 10).await;
    let forwarded = backends[0]
        .stats
        .http_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "rapid reset: {attempts} opened and reset, {forwarded} reached the backend, goaway {goaway:?}, {} frames back",
        kinds.len()
    );
    assert!(
        goaway.is_some() || (forwarded as u32) < attempts / 10,
        "{forwarded} forwarded, {kinds:?}"
    );
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    use tokio::io::AsyncWriteExt as _;
    let backends = echo_backends(1).await;
    let sluice = h2c_sluice(&backends).await;
    let mut s = raw::connect(sluice.addr).await;
    s.write_all(&raw::frame(raw::HEADERS, 0x1, 1, &raw::get_block()))
        .await
        .expect("headers");
    // Header after header (literal, not indexed, 100-byte values), never
    // END_HEADERS.
    let mut field = vec![0x00, 0x05];
    field.extend_from_slice(b"x-pad");
    field.push(100);
    field.extend(std::iter::repeat_n(b'a', 100));
    let chunk: Vec<u8> = field
        .iter()
        .copied()
        .cycle()
        .take(field.len() * 150)
        .collect();
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        // Frames until an answer to the flood (or the end): the kinds seen.
        let mut kinds = Vec::new();
        loop {
            let mut head = [0u8; 9];
            if tokio::io::AsyncReadExt::read_exact(&mut rd, &mut head)
                .await
                .is_err()
            {
                return kinds;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if tokio::io::AsyncReadExt::read_exact(&mut rd, &mut payload)
                .await
                .is_err()
            {
                return kinds;
            }
            kinds.push(head[3]);
            if [raw::GOAWAY, raw::RST_STREAM, raw::HEADERS].contains(&head[3]) {
                return kinds;
            }
        }
    });
    let mut sent = 0usize;
    within(30, "the flood is refused", async {
        while sent < 64 << 20 && !reader.is_finished() {
            if wr
                .write_all(&raw::frame(raw::CONTINUATION, 0, 1, &chunk))
                .await
                .is_err()
            {
                return;
            }
            sent += chunk.len();
        }
    })
    .await;
    let kinds = within(10, "an answer", reader).await.expect("reader");
    eprintln!(
        "continuation flood: answered after {} KiB: frames {kinds:?}",
        sent / 1024
    );
    // What was written includes what the kernel's socket buffers hold
    // (a few MiB on loopback); sluice stopped long before 64 MiB.
    assert!(sent < 8 << 20, "sluice read {sent} B of one header block");
    assert!(
        kinds
            .iter()
            .any(|k| [raw::GOAWAY, raw::RST_STREAM, raw::HEADERS].contains(k)),
        "{kinds:?}"
    );
    assert_eq!(
        backends[0]
            .stats
            .http_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_settings_flood_from_a_client_that_does_not_read_is_bounded() {
    use tokio::io::AsyncWriteExt as _;
    let backends = echo_backends(1).await;
    let sluice = h2c_sluice(&backends).await;
    let mut s = raw::connect(sluice.addr).await;
    // SETTINGS_MAX_CONCURRENT_STREAMS = 100, again and again; each asks
    // for an ACK, which this client never reads.
    let one = raw::frame(raw::SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
    let batch: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * 10_000)
        .collect();
    let mut sent = 0usize;
    let stalled = tokio::time::timeout(Duration::from_secs(2), async {
        while sent < 256 << 20 {
            if s.write_all(&batch).await.is_err() {
                return;
            }
            sent += batch.len();
        }
    })
    .await
    .is_err();
    eprintln!(
        "settings flood: {} frames written before sluice stopped reading (stalled: {stalled})",
        sent / one.len()
    );
    assert!(
        sent < 256 << 20,
        "sluice kept reading SETTINGS it could not ACK"
    );
    // Other clients are served meanwhile.
    let mut http = sluice.http().await;
    assert_eq!(http.get("/other").await.status, 200);
}

#[tokio::test]
async fn a_stream_whose_client_never_reads_holds_up_only_itself() {
    let backends = echo_backends(1).await;
    let (sluice, _dir) = tls_sluice(&backends, |_| {}).await;
    let client = h2_over_tls(&sluice).await;
    // An 8 MiB answer the client does not read: the client's window and
    // sluice's 256 KiB send buffer fill, the backend's side waits.
    let big = Bytes::from(vec![b'x'; 8 << 20]);
    let req = hyper::Request::post("https://app.test/big")
        .body(Full::new(big))
        .expect("request");
    let mut sender = client.clone();
    let stuck = within(20, "the big answer's head", sender.send_request(req))
        .await
        .expect("head");
    assert_eq!(stuck.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Other streams of the same connection are served meanwhile.
    for i in 0..10 {
        let reply = send(&client, get(&format!("https://app.test/small/{i}"))).await;
        assert_eq!(reply.status, 200);
    }
    // And the stuck one still comes whole once read.
    let body = within(30, "the big body", stuck.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert!(body.len() > 8 << 20, "{}", body.len());
}

#[tokio::test]
async fn a_malformed_h2_request_gets_a_stream_error_and_the_connection_goes_on() {
    use tokio::io::AsyncWriteExt as _;
    let backends = echo_backends(1).await;
    let sluice = h2c_sluice(&backends).await;
    let mut s = raw::connect(sluice.addr).await;
    // Connection-specific fields make a request malformed (RFC 9113
    // §8.2.2): a stream error. (An upper-case field name, also malformed,
    // gets the h2 crate's GOAWAY PROTOCOL_ERROR instead.)
    for (id, name, value) in [
        (1u32, &b"connection"[..], &b"close"[..]),
        (3, b"te", b"gzip"),
    ] {
        let mut block = raw::get_block();
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name);
        block.push(value.len() as u8);
        block.extend_from_slice(value);
        s.write_all(&raw::frame(raw::HEADERS, 0x5, id, &block))
            .await
            .expect("write");
    }
    s.write_all(&raw::frame(raw::HEADERS, 0x5, 5, &raw::get_block()))
        .await
        .expect("write");
    let (kinds, goaway) = raw::frames_until_closed(&mut s, 2).await;
    // Two RST_STREAMs, then the good request's HEADERS; no GOAWAY.
    assert_eq!(
        kinds.iter().filter(|k| **k == raw::RST_STREAM).count(),
        2,
        "{kinds:?}"
    );
    assert!(kinds.contains(&raw::HEADERS), "{kinds:?}");
    assert_eq!(goaway, None);
    assert_eq!(
        backends[0]
            .stats
            .http_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn an_h2_websocket_follows_the_sticky_cookie_of_the_page() {
    let backends = echo_backends(3).await;
    let (sluice, _dir) = tls_sluice(&backends, |cfg| {
        cfg.listeners[0].http2.websockets = true;
        cfg.pools[0].algorithm = Algorithm::RoundRobin;
        cfg.pools[0].sticky = Some(test_sticky());
    })
    .await;
    let client = h2_over_tls(&sluice).await;
    let page = send(&client, get("https://app.test/")).await;
    let cookie = sticky_pin(&page.headers).expect("a sticky cookie");
    let pinned = page.headers["x-backend"]
        .to_str()
        .expect("name")
        .to_string();
    // Round robin would spread them; the pin holds every one.
    for _ in 0..4 {
        let (_ws, _, name) = ws_over_h2(&client, "/ws", &[("cookie", &cookie)]).await;
        assert_eq!(name, pinned);
    }
    // Without the cookie, a WebSocket gets a pin of its own in the 200.
    let (_ws, headers, _) = ws_over_h2(&client, "/ws", &[]).await;
    assert!(sticky_pin(&headers).is_some(), "{headers:?}");
}

#[tokio::test]
async fn an_h2_client_that_never_sends_its_preface_is_closed_after_the_head_timeout() {
    use tokio::io::AsyncReadExt as _;
    let backends = echo_backends(1).await;
    let (sluice, _dir) = tls_sluice(&backends, |cfg| {
        cfg.listeners[0].header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let tcp = TcpStream::connect(sluice.addr).await.expect("connect");
    let (mut tls, _) = tls_over_alpn(tcp, "app.test", BOTH).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // Nothing sent: sluice's SETTINGS, then the end.
    let mut buf = vec![0u8; 1024];
    within(10, "closed by sluice", async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_backend_answering_an_h2_websocket_with_a_page_gets_the_client_a_502() {
    use tokio::io::AsyncWriteExt as _;
    // A backend that ignores the upgrade and serves a page.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\npage\n")
                    .await;
            });
        }
    });
    let dir = temp_dir("h2-page");
    write_cert(&dir, "site", &["app.test"]);
    let mut cfg = config(&[addr]);
    cfg.listeners[0].tls = Some(one_cert(&dir, "site", Duration::from_secs(5)));
    cfg.listeners[0].http2.websockets = true;
    let sluice = Sluice::with_config(cfg).await;
    let client = h2_over_tls(&sluice).await;
    let resp = extended_connect(&client, "/ws", &[]).await;
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn each_h2_websocket_counts_under_the_per_client_limit() {
    let backends = echo_backends(1).await;
    let (sluice, _dir) = tls_sluice(&backends, |cfg| {
        cfg.listeners[0].http2.websockets = true;
        // The h2 connection, and one WebSocket in it.
        cfg.listeners[0].max_connections_per_client = 2;
    })
    .await;
    let client = h2_over_tls(&sluice).await;
    let (_first, _, _) = ws_over_h2(&client, "/ws", &[]).await;
    let second = extended_connect(&client, "/ws", &[]).await;
    assert_eq!(second.status(), 429);
    assert_eq!(backends[0].ws_open(), 1);
    // Page requests still go through.
    assert_eq!(
        send(&client, get("https://app.test/page")).await.status,
        200
    );
}

#[tokio::test]
async fn an_h2_connection_over_the_per_client_limit_gets_its_429_then_goaway() {
    let backends = echo_backends(1).await;
    let (sluice, _dir) = tls_sluice(&backends, |cfg| {
        cfg.listeners[0].max_connections_per_client = 1;
    })
    .await;
    let first = h2_over_tls(&sluice).await;
    assert_eq!(send(&first, get("https://app.test/a")).await.status, 200);
    let over = h2_over_tls(&sluice).await;
    let refused = send(&over, get("https://app.test/b")).await;
    assert_eq!(refused.status, 429);
    assert!(refused.headers.contains_key("retry-after"));
    eventually(10, "the over-limit connection is closed", || {
        over.is_closed()
    })
    .await;
    assert_eq!(send(&first, get("https://app.test/c")).await.status, 200);
}
