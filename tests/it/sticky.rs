//! Sticky sessions, consistent hashing and p2c with real sockets.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use sluice::config::{Algorithm, HashKey, StickyConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

async fn sticky_sluice(backends: &[sluice::demo::EchoBackend]) -> Sluice {
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.pools[0].sticky = Some(test_sticky());
    Sluice::with_config(cfg).await
}

/// The `NAME=value` part of the response's sticky Set-Cookie, if any.
fn pin_of(reply: &HttpReply) -> Option<String> {
    sticky_pin(&reply.headers)
}

async fn get_with_cookie(sluice: &Sluice, cookie: Option<&str>) -> HttpReply {
    let mut req = hyper::Request::get("/poll").header("host", "sluice.test");
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    sluice
        .http()
        .await
        .send(req.body(Full::new(Bytes::new())).expect("request"))
        .await
}

#[tokio::test]
async fn long_polling_then_upgrade_stays_on_one_backend() {
    let backends = echo_backends(3).await;
    let sluice = sticky_sluice(&backends).await;
    for _client in 0..3 {
        let first = get_with_cookie(&sluice, None).await;
        let pin = pin_of(&first).expect("a sticky cookie on the first response");
        let backend = first.backend();
        assert!(
            // A 64-bit nonce and a 128-bit MAC, in hex.
            // (hex: it may contain "b1" by chance, never an address)
            pin.len() == "SLUICE_AFFINITY=".len() + 48 && !pin.contains("127.0.0.1"),
            "{pin}"
        );
        for _ in 0..5 {
            let reply = get_with_cookie(&sluice, Some(&format!("theme=dark; {pin}"))).await;
            assert_eq!(reply.backend(), backend);
            assert_eq!(pin_of(&reply), None, "no new cookie while the pin holds");
        }
        let mut req = sluice.url("/ws").into_client_request().expect("request");
        req.headers_mut()
            .insert("cookie", pin.parse().expect("value"));
        let (mut ws, resp) = within(10, "upgrade", tokio_tungstenite::connect_async(req))
            .await
            .expect("upgrade");
        assert!(resp.headers().get("set-cookie").is_none());
        assert_eq!(
            greeting(&mut ws).await,
            backend,
            "the WebSocket lands on the same backend"
        );
    }
}

#[tokio::test]
async fn new_clients_spread_evenly() {
    let backends = echo_backends(3).await;
    let sluice = sticky_sluice(&backends).await;
    let mut per_backend = HashMap::<String, usize>::new();
    for _ in 0..300 {
        let reply = get_with_cookie(&sluice, None).await;
        assert!(pin_of(&reply).is_some());
        *per_backend.entry(reply.backend()).or_default() += 1;
    }
    assert!(
        per_backend.values().all(|&n| (90..=110).contains(&n)),
        "{per_backend:?}"
    );
}

#[tokio::test]
async fn a_dead_pinned_backend_means_a_new_pin_that_holds() {
    let backends = echo_backends(2).await;
    let sluice = sticky_sluice(&backends).await;
    let first = get_with_cookie(&sluice, None).await;
    let pin = pin_of(&first).expect("cookie");
    let dead = backends
        .iter()
        .find(|b| b.name == first.backend())
        .expect("pinned backend");
    dead.kill();
    let reply = get_with_cookie(&sluice, Some(&pin)).await;
    assert_eq!(reply.status, 200);
    assert_ne!(reply.backend(), first.backend());
    let new_pin = pin_of(&reply).expect("a fresh cookie");
    assert_ne!(new_pin, pin);
    for _ in 0..5 {
        let again = get_with_cookie(&sluice, Some(&new_pin)).await;
        assert_eq!(again.backend(), reply.backend());
        assert_eq!(pin_of(&again), None);
    }
    let repins = sluice.registry().pools()[0]
        .stats
        .sticky_repins
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(repins, 1);
}

#[tokio::test]
async fn a_forged_cookie_is_ignored() {
    let backends = echo_backends(2).await;
    let sluice = sticky_sluice(&backends).await;
    for forged in [
        "SLUICE_AFFINITY=b1",
        "SLUICE_AFFINITY=00000000000000000000000000000000",
        "SLUICE_AFFINITY=127.0.0.1:1",
    ] {
        let reply = get_with_cookie(&sluice, Some(forged)).await;
        assert_eq!(reply.status, 200);
        let pin = pin_of(&reply).expect("treated as no cookie: a fresh one is set");
        assert_ne!(pin, forged);
    }
    assert_eq!(
        sluice.registry().pools()[0]
            .stats
            .sticky_repins
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn the_apps_own_cookies_survive() {
    let addr = scripted_backend(Duration::ZERO, |_| {
        Some(&b"HTTP/1.1 200 OK\r\nSet-Cookie: app_session=xyz; Path=/\r\nSet-Cookie: theme=dark\r\nContent-Length: 2\r\n\r\nok"[..])
    })
    .await;
    let mut cfg = config(&[addr]);
    cfg.pools[0].sticky = Some(test_sticky());
    let sluice = Sluice::with_config(cfg).await;
    let reply = get_with_cookie(&sluice, None).await;
    let cookies: Vec<&str> = reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(cookies.len(), 3, "{cookies:?}");
    assert_eq!(cookies[0], "app_session=xyz; Path=/");
    assert_eq!(cookies[1], "theme=dark");
    assert!(cookies[2].starts_with("SLUICE_AFFINITY="));
}

#[tokio::test]
async fn hash_on_a_header_is_consistent_and_falls_back_without_it() {
    let backends = echo_backends(3).await;
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.pools[0].algorithm = Algorithm::Hash(HashKey::Header("x-user".into()));
    let sluice = Sluice::with_config(cfg).await;
    let mut seen = HashMap::<String, String>::new();
    for round in 0..3 {
        for user in 0..30 {
            let req = hyper::Request::get("/h")
                .header("host", "x")
                .header("x-user", format!("user-{user}"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let backend = sluice.http().await.send(req).await.backend();
            if round == 0 {
                seen.insert(format!("user-{user}"), backend);
            } else {
                assert_eq!(seen[&format!("user-{user}")], backend, "user-{user} moved");
            }
        }
    }
    let used: std::collections::HashSet<_> = seen.values().collect();
    assert_eq!(used.len(), 3, "30 users use all three backends");
    // Without the header: least connections, so all three take turns.
    let mut no_key = std::collections::HashSet::new();
    for _ in 0..3 {
        no_key.insert(sluice.http().await.get("/h").await.backend());
    }
    assert_eq!(no_key.len(), 3);
}

#[tokio::test]
async fn p2c_spreads_connections() {
    let backends = echo_backends(3).await;
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.pools[0].algorithm = Algorithm::P2c;
    let sluice = Sluice::with_config(cfg).await;
    let mut held = Vec::new();
    for _ in 0..300 {
        held.push(sluice.ws_named("/ws").await);
    }
    for b in &backends {
        assert!(
            (85..=115).contains(&b.ws_open()),
            "{}: {}",
            b.name,
            b.ws_open()
        );
    }
}

/// Backend b3 of pool `app` drained at once, so it starts empty.
async fn drained_while_clients_arrive(sluice: &Sluice) {
    within(
        10,
        "drain b3",
        sluice.admin().drain("app", "b3", Some("0s")),
    )
    .await
    .expect("drain");
}

/// Reads `ws` until sluice closes it (true) or `stop` (false).
async fn held_until_closed<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    stop: &tokio_util::sync::CancellationToken,
) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    tokio::select! {
        () = stop.cancelled() => false,
        _ = async { while let Some(Ok(_)) = ws.next().await {} } => true,
    }
}

/// What a sticky client with a cookie jar saw.
#[derive(Debug, Default)]
struct JarStats {
    /// The backend of each WebSocket, in order.
    backends: Vec<String>,
    /// HTTP requests (with the jar's cookie) that reached another backend
    /// than the client's WebSocket at that moment.
    mismatches: usize,
    /// Set-Cookie headers received.
    cookies: usize,
}

/// A client that keeps its cookie jar: a WebSocket with its cookie, an
/// HTTP request with it after each (re)connect, reconnecting whenever
/// sluice closes the WebSocket, until `stop`.
async fn jar_client(
    sluice_url: String,
    http: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> JarStats {
    let mut stats = JarStats::default();
    let mut jar: Option<String> = None;
    for _ in 0..100 {
        if stop.is_cancelled() {
            break;
        }
        let mut req = sluice_url.as_str().into_client_request().expect("request");
        if let Some(c) = &jar {
            req.headers_mut()
                .insert("cookie", c.parse().expect("value"));
        }
        let Ok(Ok((mut ws, resp))) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(req),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if let Some(pin) = sticky_pin(resp.headers()) {
            stats.cookies += 1;
            jar = Some(pin);
        }
        let backend = greeting(&mut ws).await;
        let mut client = HttpClient::connect(http).await;
        let mut get = hyper::Request::get("/poll").header("host", "sluice.test");
        if let Some(c) = &jar {
            get = get.header("cookie", c);
        }
        let reply = client
            .send(get.body(Full::new(Bytes::new())).expect("request"))
            .await;
        if reply.backend() != backend {
            stats.mismatches += 1;
        }
        if pin_of(&reply).is_some() {
            stats.cookies += 1;
        }
        stats.backends.push(backend);
        if !held_until_closed(&mut ws, &stop).await {
            break;
        }
    }
    stats
}

#[tokio::test]
async fn a_sticky_pool_levels_and_every_client_keeps_one_pin() {
    let _heavy = heavy().await;
    const CLIENTS: usize = 300;
    let backends = echo_backends(3).await;
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.pools[0].sticky = Some(StickyConfig::default());
    cfg.pools[0].rebalance.interval = Duration::from_millis(500);
    cfg.pools[0].rebalance.min_excess = 5;
    cfg.pools[0].rebalance.max_shed_per_interval = 25;
    let sluice = Sluice::with_config(cfg).await;
    // b3 starts empty: drained while the clients arrive.
    drained_while_clients_arrive(&sluice).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(jar_client(sluice.url("/ws"), sluice.addr, stop.clone())))
        .collect();
    eventually(60, "every client connected", || {
        backends[0].ws_open() + backends[1].ws_open() == CLIENTS
    })
    .await;
    // A long-polling client mid-session: its pin is never moved, however
    // overloaded its backend is, since sluice closed nothing of it.
    let first = get_with_cookie(&sluice, None).await;
    let poll_pin = pin_of(&first).expect("a pin");
    let poll_backend = first.backend();
    let poll_stop = stop.clone();
    let addr = sluice.addr;
    let poller = tokio::spawn(async move {
        let mut seen = Vec::new();
        while !poll_stop.is_cancelled() {
            let mut client = HttpClient::connect(addr).await;
            let req = hyper::Request::get("/poll")
                .header("host", "sluice.test")
                .header("cookie", &poll_pin)
                .body(Full::new(Bytes::new()))
                .expect("request");
            let reply = client.send(req).await;
            seen.push((reply.backend(), pin_of(&reply)));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    });
    let started = std::time::Instant::now();
    within(10, "undrain b3", sluice.admin().undrain("app", "b3"))
        .await
        .expect("undrain");
    eventually(60, "the pool levels within tolerance", || {
        backends.iter().all(|b| (80..=120).contains(&b.ws_open()))
            && backends.iter().map(|b| b.ws_open()).sum::<usize>() == CLIENTS
    })
    .await;
    let level_after = started.elapsed();
    // It stays level: a few more intervals without moves.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts: Vec<usize> = backends.iter().map(|b| b.ws_open()).collect();
    stop.cancel();
    let mut stats = Vec::new();
    for c in clients {
        stats.push(within(30, "client", c).await.expect("client"));
    }
    let polls = within(10, "poller", poller).await.expect("poller");
    assert!(polls.len() > 20, "{} polls", polls.len());
    assert!(
        polls
            .iter()
            .all(|(b, pin)| *b == poll_backend && pin.is_none()),
        "the long-poller stayed on {poll_backend}: {polls:?}"
    );
    let moves: usize = stats.iter().map(|s| s.backends.len() - 1).sum();
    eprintln!(
        "sticky rebalance: within tolerance after {level_after:?}, {moves} moves (at least 80 needed: b3 from 0 to share x (1 - tolerance)), counts {counts:?}"
    );
    for s in &stats {
        assert_eq!(s.mismatches, 0, "HTTP and WebSocket on one backend: {s:?}");
        assert!(s.backends.len() <= 2, "no client moved twice: {s:?}");
        if s.backends.len() == 2 {
            assert_ne!(
                s.backends[0], s.backends[1],
                "a moved client goes elsewhere"
            );
            assert_eq!(s.cookies, 2, "one new pin per move: {s:?}");
        } else {
            assert_eq!(s.cookies, 1, "{s:?}");
        }
    }
    let moved = sluice.registry().pools()[0]
        .stats
        .sticky_moved
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(moved as usize, moves);
}

/// A WebSocket client whose requests carry `x-user: user`, reconnecting
/// whenever sluice closes it; the backend of each connection.
async fn keyed_client(
    url: String,
    user: String,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<String> {
    let mut backends = Vec::new();
    for _ in 0..100 {
        if stop.is_cancelled() {
            break;
        }
        let mut req = url.as_str().into_client_request().expect("request");
        req.headers_mut()
            .insert("x-user", user.parse().expect("value"));
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(req),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        backends.push(greeting(&mut ws).await);
        if !held_until_closed(&mut ws, &stop).await {
            break;
        }
    }
    backends
}

#[tokio::test]
async fn a_hash_pool_with_a_balance_factor_levels_within_the_bound() {
    const CLIENTS: usize = 60;
    let backends = echo_backends(3).await;
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.pools[0].algorithm = Algorithm::Hash(HashKey::Header("x-user".into()));
    cfg.pools[0].hash_balance_factor = Some(1.25);
    cfg.pools[0].rebalance.interval = Duration::from_millis(300);
    cfg.pools[0].rebalance.min_excess = 2;
    let sluice = Sluice::with_config(cfg).await;
    drained_while_clients_arrive(&sluice).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|u| {
            tokio::spawn(keyed_client(
                sluice.url("/ws"),
                format!("user-{u}"),
                stop.clone(),
            ))
        })
        .collect();
    eventually(30, "every client connected", || {
        backends[0].ws_open() + backends[1].ws_open() == CLIENTS
    })
    .await;
    within(10, "undrain b3", sluice.admin().undrain("app", "b3"))
        .await
        .expect("undrain");
    // Share 20 each; the bound lets a backend hold up to 1.25 × 20.
    eventually(30, "the pool levels within the bound", || {
        let counts: Vec<usize> = backends.iter().map(|b| b.ws_open()).collect();
        counts.iter().sum::<usize>() == CLIENTS
            && counts.iter().all(|&n| n <= 25)
            && counts[2] >= 10
    })
    .await;
    stop.cancel();
    for c in clients {
        let seen = within(30, "client", c).await.expect("client");
        assert!(seen.len() <= 3, "moved at most twice: {seen:?}");
    }
}
