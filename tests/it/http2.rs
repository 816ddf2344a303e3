//! HTTP/2 from clients: h2 by ALPN on TLS listeners, h2c with prior
//! knowledge on plain ones; backends get HTTP/1.1.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice::config::{Algorithm, StickyConfig};
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

fn metric(metrics: &str, line: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0.0)
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
        cfg.pools[0].sticky = Some(StickyConfig {
            secret: Some(b"test secret, at least 16 bytes".to_vec()),
            ..StickyConfig::default()
        });
    })
    .await;
    let client = h2_over_tls(&sluice).await;
    let first = send(&client, get("https://app.test/poll")).await;
    let cookie = first
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("SLUICE_AFFINITY="))
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
        .expect("a sticky cookie over h2");
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
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
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
