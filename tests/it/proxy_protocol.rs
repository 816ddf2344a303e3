//! The PROXY protocol with real sockets: headers from an L4 balancer in
//! front of sluice, and headers sluice sends to backends.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ppp::v2;
use sluice::config::{Algorithm, Config, HashKey, ProxyAccept, ProxyProtocolIn, ProxyVersion};
use sluice::demo::EchoBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn v1(source: &str, destination: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (
        source.parse().expect("source"),
        destination.parse().expect("destination"),
    );
    ppp::v1::Addresses::from((s, d)).to_string().into_bytes()
}

fn v2(source: &str, destination: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (
        source.parse().expect("source"),
        destination.parse().expect("destination"),
    );
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (s, d),
    )
    .build()
    .expect("v2 header")
}

/// One listener reading `accept` headers from the loopback peers.
fn proxied(addrs: &[SocketAddr], accept: ProxyAccept, from: &[&str]) -> Config {
    let mut cfg = config(addrs);
    cfg.listeners[0].header_read_timeout = Duration::from_millis(500);
    cfg.listeners[0].proxy_protocol = Some(ProxyProtocolIn {
        accept,
        from: from
            .iter()
            .map(|n| {
                n.parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(Into::into))
                    .expect("an address or a network")
            })
            .collect(),
    });
    cfg
}

/// One echo backend behind a sluice whose listener reads `accept`
/// headers from the peers in `from`.
async fn proxied_echo(accept: ProxyAccept, from: &[&str]) -> (Vec<EchoBackend>, Sluice) {
    let backends = echo_backends(1).await;
    let sluice = Sluice::with_config(proxied(&[backends[0].addr], accept, from)).await;
    (backends, sluice)
}

/// Sends `header` and then a GET on one connection; what the echo
/// backend saw.
async fn get_after(sluice: &Sluice, header: &[u8]) -> HttpReply {
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    stream.write_all(header).await.expect("header");
    HttpClient::over(stream).await.get("/seen").await
}

/// Sends `bytes` (and then nothing) and reads until sluice closes:
/// what came back.
async fn closed_after(sluice: &Sluice, bytes: &[u8], then_close: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    if then_close {
        stream.shutdown().await.expect("shutdown");
    }
    let mut got = Vec::new();
    within(5, "sluice closes", stream.read_to_end(&mut got))
        .await
        .ok();
    got
}

#[tokio::test]
async fn v1_and_v2_headers_carry_the_client_address() {
    let (_backends, sluice) = proxied_echo(ProxyAccept::Any, &["127.0.0.0/8"]).await;
    for header in [
        v1("203.0.113.7:40000", "198.51.100.1:443"),
        v2("203.0.113.7:40000", "198.51.100.1:443"),
    ] {
        let reply = get_after(&sluice, &header).await;
        assert_eq!(reply.status, 200);
        let seen = reply.text();
        assert!(seen.contains("x-forwarded-for: 203.0.113.7\n"), "{seen}");
        assert!(
            seen.contains("forwarded: for=203.0.113.7;proto=http"),
            "{seen}"
        );
    }
    // IPv6 clients are quoted in Forwarded.
    let reply = get_after(&sluice, &v2("[2001:db8::9]:5000", "[2001:db8::1]:443")).await;
    assert!(
        reply.text().contains("forwarded: for=\"[2001:db8::9]\""),
        "{}",
        reply.text()
    );
    // LOCAL (the L4 balancer's own check): the peer is the client.
    let local = v2::Builder::new(
        v2::Version::Two | v2::Command::Local,
        v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
    )
    .build()
    .expect("local");
    let reply = get_after(&sluice, &local).await;
    assert!(
        reply.text().contains("x-forwarded-for: 127.0.0.1\n"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn a_websocket_through_a_proxy_header_works() {
    let (_backends, sluice) = proxied_echo(ProxyAccept::V2, &["127.0.0.1"]).await;
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    stream
        .write_all(&v2("192.0.2.44:1234", "192.0.2.1:80"))
        .await
        .expect("header");
    let (mut ws, _) = tokio_tungstenite::client_async(sluice.url("/ws"), stream)
        .await
        .expect("upgrade");
    let greeting = ws.next().await.expect("greeting").expect("ok");
    assert_eq!(
        greeting.into_text().expect("text").as_str(),
        "connected to b1"
    );
    ws.send(Message::text("hi")).await.expect("send");
    assert_eq!(
        ws.next().await.expect("echo").expect("ok"),
        Message::text("hi")
    );
}

#[tokio::test]
async fn hashing_on_ip_uses_the_carried_address() {
    let backends = echo_backends(3).await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let mut cfg = proxied(&addrs, ProxyAccept::V1, &["127.0.0.1/32"]);
    cfg.pools[0].algorithm = Algorithm::Hash(HashKey::Ip);
    let sluice = Sluice::with_config(cfg).await;
    let mut used = std::collections::HashSet::new();
    for i in 1..=12 {
        let client = format!("198.51.100.{i}:1000");
        let first = get_after(&sluice, &v1(&client, "192.0.2.1:80"))
            .await
            .backend();
        for port in [2000, 3000] {
            let client = format!("198.51.100.{i}:{port}");
            let again = get_after(&sluice, &v1(&client, "192.0.2.1:80"))
                .await
                .backend();
            assert_eq!(again, first, "client 198.51.100.{i} moved");
        }
        used.insert(first);
    }
    // All from 127.0.0.1, yet spread by the carried addresses.
    assert!(used.len() >= 2, "{used:?}");
}

#[tokio::test]
async fn bad_headers_are_closed_and_reach_no_backend() {
    let (backends, sluice) = proxied_echo(ProxyAccept::Any, &["127.0.0.1"]).await;
    let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
    let good = v1("203.0.113.7:40000", "198.51.100.1:443");
    // No header at all, a malformed one, one cut off by the client, and
    // one that trickles slower than header_read_timeout (500 ms).
    assert!(closed_after(&sluice, get, false).await.is_empty());
    assert!(
        closed_after(
            &sluice,
            b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\nGET / HTTP/1.1\r\n\r\n",
            false
        )
        .await
        .is_empty()
    );
    let started = std::time::Instant::now();
    assert!(closed_after(&sluice, &good[..20], true).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "a header cut off by the client is seen at once"
    );
    let started = std::time::Instant::now();
    assert!(closed_after(&sluice, &good[..20], false).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "closed before the timeout"
    );
    assert_eq!(backends[0].stats.tcp_accepted.load(Ordering::SeqCst), 0);
    // The listener serves everyone else meanwhile.
    assert_eq!(get_after(&sluice, &good).await.status, 200);
    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains("sluice_proxy_protocol_rejected_total{listener=\"public\"} 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_peer_outside_proxy_protocol_from_is_refused() {
    let (backends, sluice) = proxied_echo(ProxyAccept::Any, &["10.0.0.0/8", "::1"]).await;
    let header = v1("203.0.113.7:40000", "198.51.100.1:443");
    let mut with_request = header.clone();
    with_request.extend_from_slice(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
    assert!(closed_after(&sluice, &with_request, false).await.is_empty());
    assert_eq!(backends[0].stats.tcp_accepted.load(Ordering::SeqCst), 0);
}

/// What a header-reading backend saw: each connection's header, in order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A keep-alive backend that reads a PROXY header from each connection,
/// then answers every HTTP request on it (or a WebSocket upgrade) with the
/// source address that header carried; counts its connections and keeps
/// each header it read.
async fn header_reading_backend() -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    Seen,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = conns.clone();
    let seen = Seen::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let seen_log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 512];
                let mut n = 0;
                let source = loop {
                    let got = stream.read(&mut buf[n..n + 1]).await.unwrap_or(0);
                    if got == 0 {
                        return;
                    }
                    n += 1;
                    match ppp::HeaderResult::parse(&buf[..n]) {
                        ppp::HeaderResult::V1(Ok(h)) => break h.addresses.to_string(),
                        ppp::HeaderResult::V2(Ok(h)) => {
                            let mut seen = format!("{:?}", h.addresses);
                            for tlv in h.tlvs().flatten() {
                                seen.push_str(&format!(
                                    " tlv {:#04x}={}",
                                    tlv.kind,
                                    String::from_utf8_lossy(&tlv.value).escape_default()
                                ));
                            }
                            break seen;
                        }
                        _ if n < 300 => continue,
                        _ => return,
                    }
                };
                seen_log.lock().expect("lock").push(source.clone());
                // Keep-alive: every request on this connection is answered
                // with the header it began with.
                loop {
                    let head = read_head(&mut stream).await;
                    if head.is_empty() {
                        return;
                    }
                    if head.to_ascii_lowercase().contains("upgrade: websocket") {
                        let key = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("sec-websocket-key: ")
                                    .or(l.strip_prefix("Sec-WebSocket-Key: "))
                            })
                            .unwrap_or("")
                            .trim()
                            .to_string();
                        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                            key.as_bytes(),
                        );
                        let resp = format!(
                            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
                        );
                        let _ = stream.write_all(resp.as_bytes()).await;
                        let _ = stream
                            .write_all(&frame(0x81, source.as_bytes(), None))
                            .await;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        return;
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{source}",
                        source.len()
                    );
                    if stream.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns, seen)
}

#[tokio::test]
async fn send_proxy_protocol_tells_backends_the_client() {
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let (backend, conns, seen) = header_reading_backend().await;
        let mut cfg = proxied(&[backend], ProxyAccept::Any, &["127.0.0.1"]);
        cfg.pools[0].send_proxy_protocol = Some(version);
        let sluice = Sluice::with_config(cfg).await;
        // Two clients in turn, two requests each, to a keep-alive backend
        // that answers with the header its connection began with: a
        // connection reused across clients would name the wrong one.
        for (i, client_addr) in ["203.0.113.50:41000", "203.0.113.51:41000"]
            .into_iter()
            .enumerate()
        {
            let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
            stream
                .write_all(&v1(client_addr, "192.0.2.1:80"))
                .await
                .expect("header");
            let mut client = HttpClient::over(stream).await;
            let ip = client_addr.split(':').next().expect("ip");
            for _ in 0..2 {
                let reply = client.get("/").await;
                assert_eq!(reply.status, 200);
                assert!(reply.text().contains(ip), "{version:?}: {}", reply.text());
            }
            // Each request had a connection of its own.
            assert_eq!(conns.load(Ordering::SeqCst), 2 * (i + 1));
        }
        assert_eq!(seen.lock().expect("lock").len(), 4);

        let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
        stream
            .write_all(&v2("198.51.100.60:42000", "192.0.2.1:80"))
            .await
            .expect("header");
        let (mut ws, _) = tokio_tungstenite::client_async(sluice.url("/ws"), stream)
            .await
            .expect("upgrade");
        let first = ws.next().await.expect("message").expect("ok");
        assert!(
            first.to_text().expect("text").contains("198.51.100.60"),
            "{version:?}: {first:?}"
        );
    }
}

/// `header`, then TLS for chat.test, then one GET /seen: the body.
async fn get_over_tls(sluice: &Sluice, header: &[u8]) -> String {
    let mut tcp = TcpStream::connect(sluice.addr).await.expect("connect");
    tcp.write_all(header).await.expect("header");
    let (tls, _) = crate::tls::tls_over(tcp, "chat.test").await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("http over tls");
    tokio::spawn(conn);
    let req = hyper::Request::get("/seen")
        .header("host", "chat.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn tls_listeners_read_the_header_before_tls_and_send_sni_on() {
    let dir = crate::tls::temp_dir("proxy");
    crate::tls::write_cert(&dir, "site", &["chat.test"]);
    // In: a v2 header, then TLS. Out: v2 with the SNI name and the TLS flag.
    let (backend, _, _) = header_reading_backend().await;
    let mut cfg = proxied(&[backend], ProxyAccept::V2, &["127.0.0.1"]);
    cfg.listeners[0].tls = Some(crate::tls::one_cert(&dir, "site", Duration::from_secs(5)));
    cfg.pools[0].send_proxy_protocol = Some(ProxyVersion::V2);
    let sluice = Sluice::with_config(cfg).await;
    let seen = get_over_tls(&sluice, &v2("203.0.113.77:44000", "192.0.2.1:443")).await;
    assert!(seen.contains("203.0.113.77"), "{seen}");
    assert!(
        seen.contains("tlv 0x02=chat.test"),
        "authority (SNI): {seen}"
    );
    assert!(
        seen.contains("tlv 0x20=\\u{1}\\u{0}\\u{0}\\u{0}\\u{1}"),
        "PP2_TYPE_SSL, client over TLS: {seen}"
    );

    // The same listener with an echo backend, v1 and v2: forwarded headers
    // name the carried client, over https.
    let echo = echo_backends(1).await;
    let mut cfg = proxied(&[echo[0].addr], ProxyAccept::Any, &["127.0.0.1"]);
    cfg.listeners[0].tls = Some(crate::tls::one_cert(&dir, "site", Duration::from_secs(5)));
    let sluice = Sluice::with_config(cfg).await;
    for header in [
        v1("203.0.113.78:44000", "192.0.2.1:443"),
        v2("203.0.113.78:44000", "192.0.2.1:443"),
    ] {
        let seen = get_over_tls(&sluice, &header).await;
        assert!(seen.contains("x-forwarded-for: 203.0.113.78\n"), "{seen}");
        assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
        assert!(
            seen.contains("forwarded: for=203.0.113.78;proto=https"),
            "{seen}"
        );
    }
    let mut tcp = TcpStream::connect(sluice.addr).await.expect("connect");
    tcp.write_all(&v2("203.0.113.79:44000", "192.0.2.1:443"))
        .await
        .expect("header");
    let (tls, _) = crate::tls::tls_over(tcp, "chat.test").await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://chat.test/ws", tls)
        .await
        .expect("upgrade over TLS after a PROXY header");
    assert_eq!(
        ws.next().await.expect("greeting").expect("ok"),
        Message::text("connected to b1")
    );
}

/// HAProxy (the Debian package) in TCP mode with `send-proxy-v2` in front
/// of sluice: the original client address reaches the backends. `.ci/run`
/// installs haproxy and sets SLUICE_REQUIRE_HAPROXY, so there this test
/// cannot be skipped.
#[tokio::test]
async fn haproxy_send_proxy_v2_in_front_carries_the_client() {
    let installed = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !tool_present(
        installed,
        "SLUICE_REQUIRE_HAPROXY",
        "haproxy is not installed (apt-get install haproxy)",
    ) {
        return;
    }
    let echo = echo_backends(1).await;
    let (reader, _, _) = header_reading_backend().await;
    let mut cfg = proxied(&[echo[0].addr], ProxyAccept::V2, &["127.0.0.1"]);
    let mut ws_pool = cfg.pools[0].clone();
    ws_pool.name = "ws".into();
    ws_pool.backends[0].address = reader;
    ws_pool.send_proxy_protocol = Some(ProxyVersion::V1);
    cfg.pools.push(ws_pool);
    let mut second = cfg.listeners[0].clone();
    second.name = "ws".into();
    second.pool = 1;
    cfg.listeners.push(second);
    let sluice = Sluice::with_config(cfg).await;
    let ws_listener = sluice
        .running
        .as_ref()
        .and_then(|r| r.addr("ws"))
        .expect("second listener");

    let dir = crate::support::process::TempDir::new("sluice-haproxy").expect("temp dir");
    let [http_port, ws_port] = crate::support::process::free_ports().expect("ports");
    let config = format!(
        "global\n  maxconn 100\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\n\
         listen http\n  bind 127.0.0.1:{http_port}\n  server sluice {} send-proxy-v2\n\n\
         listen ws\n  bind 127.0.0.1:{ws_port}\n  server sluice {ws_listener} send-proxy-v2\n",
        sluice.addr
    );
    let path = dir.write("haproxy.cfg", &config).expect("config");
    let _haproxy = crate::support::process::Proc(
        std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("haproxy starts"),
    );
    let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    let ws_addr = SocketAddr::from(([127, 0, 0, 1], ws_port));
    for addr in [http_addr, ws_addr] {
        eventually(10, "haproxy listening", || {
            std::net::TcpStream::connect(addr).is_ok()
        })
        .await;
    }

    // HTTP from 127.0.0.2: sluice forwards that, not HAProxy's 127.0.0.1.
    let reply = HttpClient::over(connect_from([127, 0, 0, 2], http_addr).await)
        .await
        .get("/seen")
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.text().contains("x-forwarded-for: 127.0.0.2\n"),
        "{}",
        reply.text()
    );

    // A WebSocket from 127.0.0.3, through HAProxy and sluice, to a
    // backend that reads sluice's own PROXY header.
    let stream = connect_from([127, 0, 0, 3], ws_addr).await;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{ws_addr}/ws"), stream)
        .await
        .expect("upgrade through haproxy and sluice");
    let first = ws.next().await.expect("message").expect("ok");
    assert!(
        first.to_text().expect("text").contains("127.0.0.3"),
        "{first:?}"
    );
}

#[tokio::test]
async fn health_checks_send_a_local_header_to_pools_that_send_one() {
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let (backend, conns, seen) = header_reading_backend().await;
        let mut cfg = config(&[backend]);
        cfg.pools[0].send_proxy_protocol = Some(version);
        cfg.pools[0].health = Some(sluice::config::HealthConfig {
            path: Some("/health".into()),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
            rise: 1,
            fall: 1,
            expect_status: None,
        });
        let sluice = Sluice::with_config(cfg).await;
        // Without the header this backend never answers a check: one
        // failure would take it down.
        eventually(5, "three checks", || conns.load(Ordering::SeqCst) >= 3).await;
        assert_eq!(
            sluice.registry().pools()[0].backends[0]
                .condition()
                .as_str(),
            "up",
            "{version:?}"
        );
        // Each check said it is sluice's own connection.
        let headers = seen.lock().expect("lock").clone();
        let own = if version == ProxyVersion::V1 {
            "PROXY UNKNOWN\r\n"
        } else {
            "Unspecified"
        };
        assert!(headers.iter().all(|h| h == own), "{version:?}: {headers:?}");
    }
}

#[tokio::test]
async fn headers_that_come_in_parts_or_run_long_are_read_whole() {
    let (_backends, sluice) = proxied_echo(ProxyAccept::Any, &["127.0.0.1"]).await;
    // A v2 header with 1,000 bytes of TLVs (past the first peek), sent in
    // three parts with pauses, then the request.
    let (s, d): (SocketAddr, SocketAddr) = (
        "203.0.113.90:1000".parse().expect("source"),
        "192.0.2.1:80".parse().expect("destination"),
    );
    let long = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (s, d),
    )
    .write_tlv(v2::Type::NoOp, &[0u8; 1000])
    .expect("tlv")
    .build()
    .expect("header");
    let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
    for part in [&long[..10], &long[10..300], &long[300..]] {
        stream.write_all(part).await.expect("part");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let reply = HttpClient::over(stream).await.get("/seen").await;
    assert!(
        reply.text().contains("x-forwarded-for: 203.0.113.90\n"),
        "{}",
        reply.text()
    );
    // A v1 line past 107 bytes is refused, not read on.
    let mut too_long = b"PROXY TCP4 203.0.113.91 192.0.2.1 1000 80".to_vec();
    too_long.extend_from_slice(&[b' '; 80]);
    too_long.extend_from_slice(b"\r\nGET / HTTP/1.1\r\n\r\n");
    assert!(closed_after(&sluice, &too_long, false).await.is_empty());
}

/// With a per-client limit, the address the PROXY header carries is the
/// one counted, not the L4 balancer's.
#[tokio::test]
async fn max_connections_per_client_counts_the_carried_address() {
    let backends = echo_backends(1).await;
    let mut cfg = proxied(&[backends[0].addr], ProxyAccept::Any, &["127.0.0.1"]);
    cfg.listeners[0].max_connections_per_client = 1;
    let sluice = Sluice::with_config(cfg).await;
    // Two clients behind the one balancer address: each has its place.
    let mut held = Vec::new();
    for client in ["192.0.2.1:1000", "192.0.2.2:1000"] {
        let mut stream = TcpStream::connect(sluice.addr).await.expect("connect");
        stream
            .write_all(&v1(client, "192.0.2.100:80"))
            .await
            .expect("header");
        let mut http = HttpClient::over(stream).await;
        assert_eq!(http.get("/").await.status, 200, "{client}");
        held.push(http);
    }
    // A second connection of the first client is over its limit.
    let reply = get_after(&sluice, &v1("192.0.2.1:1001", "192.0.2.100:80")).await;
    assert_eq!(reply.status, 429);
    assert!(reply.headers.contains_key("retry-after"));
}
