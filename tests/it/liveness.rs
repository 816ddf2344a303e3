//! Half-open connections: a client that vanished without a FIN is found
//! by sluice's Ping (`ws_ping_interval`) or by TCP keepalive, and both
//! sockets are freed; the backend sees a clean close.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sluice::config::TcpKeepalive;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::netns::Netns;
use crate::support::*;

/// The close code in the first masked Close frame of `bytes`.
fn masked_close_code(bytes: &[u8]) -> Option<u16> {
    let at = bytes.windows(2).position(|w| w == [0x88, 0x82])?;
    let f = bytes.get(at..at + 8)?;
    Some(u16::from_be_bytes([f[6] ^ f[2], f[7] ^ f[3]]))
}

fn ping_config(addr: std::net::SocketAddr) -> sluice::config::Config {
    let mut cfg = config(&[addr]);
    cfg.listeners[0].ws_ping_interval = Some(Duration::from_millis(200));
    cfg.listeners[0].ws_ping_timeout = Duration::from_millis(400);
    cfg
}

/// A client that answers Pings stays; it sees sluice's Pings, and its
/// Pongs never reach the backend.
#[tokio::test]
async fn ws_ping_keeps_live_clients_and_hides_their_pongs() {
    let (backend, ended) = recording_backend().await;
    let sluice = Sluice::with_config(ping_config(backend.addr)).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(sluice.url("/raw"))
        .await
        .expect("connect");
    // tungstenite answers each Ping with a Pong while it reads.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(msg) = tokio::time::timeout_at(until, ws.next()).await {
        match msg {
            Some(Ok(Message::Ping(payload))) => {
                assert_eq!(payload.len(), 8, "sluice's token");
                pings += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 2, "{pings} Pings in 1.5 s at a 200 ms interval");
    // The client is still there, and talks through as before.
    ws.send(Message::text("still here")).await.expect("send");
    eventually(5, "message reached the backend", || {
        backend.seen.lock().expect("lock")[0].bytes.len() >= 2 + 4 + 10
    })
    .await;
    let got = backend.seen.lock().expect("lock")[0].bytes.clone();
    // Exactly the one text frame (2 + 4 mask + 10 bytes): no Pong before
    // or after it.
    assert_eq!(got[0], 0x81, "the text frame comes first: {got:?}");
    assert_eq!(got.len(), 16, "more than the text frame: {got:?}");
    assert_eq!(sluice.registry().ws_total(), 1);
    assert!(!ended.load(Ordering::SeqCst));
    let b1 = sluice.registry().pools()[0].backends[0].clone();
    assert_eq!(b1.client_timeouts.load(Ordering::SeqCst), 0);
}

/// Frees a tunnel whose client is silent, by `ws_ping_timeout`, and checks
/// what the backend saw: Close 1001, then the end of its connection.
async fn assert_freed_by_ping(sluice: &Sluice, ended: &AtomicBool, backend: &RawBackend) {
    let started = Instant::now();
    eventually(10, "tunnel freed", || sluice.registry().ws_total() == 0).await;
    let took = started.elapsed();
    eventually(5, "backend connection ended", || {
        ended.load(Ordering::SeqCst)
    })
    .await;
    let got = backend.seen.lock().expect("lock")[0].bytes.clone();
    assert_eq!(masked_close_code(&got), Some(1001), "{got:?}");
    let b1 = sluice.registry().pools()[0].backends[0].clone();
    assert_eq!(b1.client_timeouts.load(Ordering::SeqCst), 1);
    println!("freed {took:?} after the client fell silent");
}

/// A client that reads nothing and answers nothing is gone after the
/// interval and the timeout.
#[tokio::test]
async fn ws_ping_frees_a_silent_client() {
    let (backend, ended) = recording_backend().await;
    let sluice = Sluice::with_config(ping_config(backend.addr)).await;
    let (_client, head) = raw_ws_client(sluice.addr, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_freed_by_ping(&sluice, &ended, &backend).await;
}

/// A sluice listening on the host's end of a veth pair, with `tune`
/// applied to its listener.
async fn sluice_for(
    ns: &Netns,
    backend: std::net::SocketAddr,
    tune: impl FnOnce(&mut sluice::config::ListenerConfig),
) -> Sluice {
    let mut cfg = config(&[backend]);
    cfg.listeners[0].bind = std::net::SocketAddr::new(ns.host_addr, 0);
    tune(&mut cfg.listeners[0]);
    Sluice::with_config(cfg).await
}

/// A WebSocket from inside `ns`, upgraded by hand on its socket.
async fn ws_from(ns: &Netns, sluice: &Sluice) -> TcpStream {
    let mut stream = ns.connect(sluice.addr).await;
    stream
        .write_all(b"GET /raw HTTP/1.1\r\nHost: sluice.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .expect("write");
    let head = within(10, "101", read_head(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// A client in a network namespace whose link goes down mid-connection
/// (no FIN, no RST): sluice's Ping finds it and frees both sockets.
#[tokio::test]
async fn a_client_whose_link_goes_down_is_found_by_ws_ping() {
    let Some(ns) = Netns::new() else { return };
    let (backend, ended) = recording_backend().await;
    let sluice = sluice_for(&ns, backend.addr, |l| {
        l.ws_ping_interval = Some(Duration::from_millis(300));
        l.ws_ping_timeout = Duration::from_millis(500);
        l.tcp_keepalive = None;
    })
    .await;
    let mut client = ws_from(&ns, &sluice).await;
    client
        .write_all(&frame(0x81, b"hello", Some([1, 2, 3, 4])))
        .await
        .expect("write");
    eventually(5, "backend got the message", || {
        !backend.seen.lock().expect("lock")[0].bytes.is_empty()
    })
    .await;
    ns.link_down();
    assert_freed_by_ping(&sluice, &ended, &backend).await;
    drop(client);
}

/// The same without Pings: TCP keepalive towards the client finds it.
#[tokio::test]
async fn a_client_whose_link_goes_down_is_found_by_tcp_keepalive() {
    let Some(ns) = Netns::new() else { return };
    let (backend, ended) = recording_backend().await;
    let sluice = sluice_for(&ns, backend.addr, |l| {
        l.tcp_keepalive = Some(TcpKeepalive {
            idle: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            count: 2,
        });
    })
    .await;
    let client = ws_from(&ns, &sluice).await;
    ns.link_down();
    let started = Instant::now();
    // idle 1 s + 2 probes 1 s apart: the kernel gives up after about 3 s.
    eventually(15, "tunnel freed", || sluice.registry().ws_total() == 0).await;
    let took = started.elapsed();
    eventually(5, "backend connection ended", || {
        ended.load(Ordering::SeqCst)
    })
    .await;
    assert!(took >= Duration::from_secs(2), "freed after {took:?}");
    println!("keepalive freed the tunnel after {took:?}");
    drop(client);
}

/// A client whose bytes wait for a backend that stopped reading is not
/// the silent one: it is not closed for a missing Pong.
#[tokio::test]
async fn ws_ping_does_not_blame_a_client_for_a_stalled_backend() {
    let backend = RawBackend::start(
        "",
        Arc::new(|stream: TcpStream, _seen, _index| {
            Box::pin(async move {
                // Reads nothing for a while; holds the connection.
                let _held = stream;
                tokio::time::sleep(Duration::from_secs(5)).await;
            })
        }),
    )
    .await;
    let sluice = Sluice::with_config(ping_config(backend.addr)).await;
    let (client, head) = raw_ws_client(sluice.addr, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_read, mut write) = client.into_split();
    let flood = tokio::spawn(async move {
        // 16 MiB in one message: far more than the socket buffers hold.
        let _ = write
            .write_all(&frame(0x82, &vec![7u8; 16 << 20], Some([1, 2, 3, 4])))
            .await;
    });
    // Well past ws_ping_interval + ws_ping_timeout (200 + 400 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sluice.registry().ws_total(), 1, "the tunnel was closed");
    let b1 = sluice.registry().pools()[0].backends[0].clone();
    assert_eq!(b1.client_timeouts.load(Ordering::SeqCst), 0);
    flood.abort();
}
