//! Backends that fail: retries, 502 and 503.

use std::net::SocketAddr;

use crate::support::*;

/// An address on which nothing listens (connections are refused).
async fn refusing_addr() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("addr")
}

#[tokio::test]
async fn refused_connect_is_retried_on_another_backend() {
    let dead = refusing_addr().await;
    let backends = echo_backends(1).await;
    let sluice = Sluice::with_config(config(&[dead, backends[0].addr])).await;
    let mut client = sluice.http().await;
    for _ in 0..6 {
        let reply = client.get("/r").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.backend(), "b1");
    }
    for _ in 0..6 {
        let (_ws, name) = sluice.ws_named("/ws").await;
        assert_eq!(name, "b1");
    }
}

#[tokio::test]
async fn all_backends_down_gives_503_with_retry_after() {
    let cfg = config(&[refusing_addr().await, refusing_addr().await]);
    let sluice = Sluice::with_config(cfg).await;
    let mut client = sluice.http().await;
    let reply = client.get("/").await;
    assert_eq!(reply.status, 503);
    let retry: u32 = reply.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=3).contains(&retry));
    let err = tokio_tungstenite::connect_async(sluice.url("/ws"))
        .await
        .expect_err("no backend");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 503);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected 503, got {other:?}"),
    }
}

#[tokio::test]
async fn retries_are_bounded_then_502() {
    let backends = echo_backends(1).await;
    let mut cfg = config(&[refusing_addr().await, backends[0].addr]);
    cfg.pools[0].retries = 0;
    let sluice = Sluice::with_config(cfg).await;
    let mut client = sluice.http().await;
    // The first pick of a fresh pool is its first backend: refused, and no retry allowed.
    assert_eq!(client.get("/").await.status, 502);
}

#[tokio::test]
async fn backend_closing_before_answering_gives_502() {
    let addr = scripted_backend(std::time::Duration::ZERO, |_| None).await;
    let sluice = Sluice::with_config(config(&[addr])).await;
    let mut client = sluice.http().await;
    assert_eq!(client.get("/").await.status, 502);
    eventually(5, "lease given back", || {
        sluice.registry().pools()[0].backends[0].active() == 0
    })
    .await;
}

/// A backend whose accept queue is full: the kernel drops further SYNs, so
/// connecting to it hangs until the connect timeout.
struct Blackhole {
    addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _fillers: Vec<tokio::net::TcpStream>,
}

async fn blackhole() -> Blackhole {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    // Fill the accept queue (never accepted); stop once a connect hangs.
    for _ in 0..8 {
        match tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    Blackhole {
        addr,
        _listener: listener,
        _fillers: fillers,
    }
}

#[tokio::test]
async fn connect_timeout_moves_on_to_another_backend() {
    let hole = blackhole().await;
    let backends = echo_backends(1).await;
    let mut cfg = config(&[hole.addr, backends[0].addr]);
    cfg.pools[0].connect_timeout = std::time::Duration::from_millis(300);
    let sluice = Sluice::with_config(cfg).await;
    let mut client = sluice.http().await;
    let started = std::time::Instant::now();
    // The fresh pool picks its first backend first: the black hole.
    let reply = client.get("/t").await;
    assert_eq!((reply.status, reply.backend().as_str()), (200, "b1"));
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "waited for the timeout"
    );
    // With only the black hole: the connect times out and the pool has nothing: 503.
    let mut cfg = config(&[hole.addr]);
    cfg.pools[0].connect_timeout = std::time::Duration::from_millis(300);
    let sluice = Sluice::with_config(cfg).await;
    assert_eq!(sluice.http().await.get("/t").await.status, 503);
}

#[tokio::test]
async fn upgrades_that_fail_before_an_answer_eject_the_backend() {
    let broken = scripted_backend(std::time::Duration::ZERO, |_| None).await;
    let good = echo_backends(1).await;
    let mut cfg = config(&[broken, good[0].addr]);
    cfg.pools[0].passive.consecutive_failures = 3;
    let sluice = Sluice::with_config(cfg).await;
    let (mut refused, mut upgraded) = (0, 0);
    while sluice.registry().pools()[0].backends[0].is_healthy() {
        match tokio_tungstenite::connect_async(sluice.url("/ws")).await {
            Ok(_) => upgraded += 1,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 502);
                refused += 1;
            }
            Err(other) => panic!("upgrade failed: {other}"),
        }
        assert!(refused + upgraded < 20, "b1 never ejected");
    }
    assert_eq!(refused, 3, "each failed upgrade counted once");
    // Ejected: every upgrade now reaches the good backend.
    for _ in 0..4 {
        let (_ws, name) = sluice.ws_named("/ws").await;
        assert_eq!(name, good[0].name);
    }
}
