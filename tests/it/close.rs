//! Closes requested through the registry: at a message boundary, never
//! cutting a message.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const BIG: usize = 4 << 20;

/// A backend that, on any byte from the client, sends one 4 MiB binary
/// message slowly (64 KiB every 10 ms, ~650 ms in all), then echoes.
async fn slow_big_sender() -> RawBackend {
    RawBackend::start(
        "",
        Arc::new(|mut stream: TcpStream, seen, index| {
            Box::pin(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let Ok(n) = stream.read(&mut buf).await else {
                    return;
                };
                seen_push(&seen, index, &buf[..n]);
                let msg = frame(0x82, &vec![0x42; BIG], None);
                for chunk in msg.chunks(64 * 1024) {
                    if stream.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // Record everything else the client side sends, and answer
                // a Close (sluice's) as a server does.
                record_and_answer_close(&mut stream, &seen, index).await;
            })
        }),
    )
    .await
}

fn seen_push(seen: &std::sync::Mutex<Vec<RawSeen>>, index: usize, bytes: &[u8]) {
    seen.lock().expect("lock")[index]
        .bytes
        .extend_from_slice(bytes);
}

#[tokio::test]
async fn close_requested_mid_message_is_sent_after_the_message_ends() {
    let backend = slow_big_sender().await;
    let sluice = Sluice::with_config(config(&[backend.addr])).await;
    let (mut client, head) = raw_ws_client(sluice.addr, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let trigger = frame(0x81, b"go", Some([1, 2, 3, 4]));
    client.write_all(&trigger).await.expect("write");
    // Wait until the big message is partly through, then ask for the close.
    let first = read_exact(&mut client, 1024).await;
    assert_eq!(&first[..2], &[0x82, 127]);
    let conns = sluice.registry().pools()[0].backends[0].connections();
    assert_eq!(conns.len(), 1);
    conns[0].request_close(1012, sluice::registry::CloseReason::Drain);
    // The client gets the whole message, then Close 1012.
    let header_len = 10;
    let rest = read_exact(&mut client, header_len + BIG - 1024).await;
    assert!(rest.iter().all(|&b| b == 0x42), "payload intact");
    let close = read_exact(&mut client, 4).await;
    assert_eq!(
        close,
        [0x88, 0x02, 0x03, 0xf4],
        "unmasked Close 1012 to the client"
    );
    // The backend gets a masked Close 1012 right after the trigger.
    eventually(5, "backend got Close", || {
        backend.seen.lock().expect("lock")[0].bytes.len() >= trigger.len() + 8
    })
    .await;
    let got = backend.seen.lock().expect("lock")[0].bytes.clone();
    assert_eq!(&got[..trigger.len()], &trigger[..]);
    let close = &got[trigger.len()..trigger.len() + 8];
    assert_eq!(
        &close[..2],
        &[0x88, 0x82],
        "masked Close with 2 bytes of payload"
    );
    let code = u16::from_be_bytes([close[6] ^ close[2], close[7] ^ close[3]]);
    assert_eq!(code, 1012);
    // The client answers; the tunnel ends and leaves the registry.
    client
        .write_all(&frame(0x88, &1012u16.to_be_bytes(), Some([5, 6, 7, 8])))
        .await
        .expect("write");
    eventually(5, "tunnel gone", || sluice.registry().ws_total() == 0).await;
    let mut tail = Vec::new();
    within(5, "client sees EOF", client.read_to_end(&mut tail))
        .await
        .expect("read");
    assert!(tail.is_empty(), "nothing after the Close frame: {tail:?}");
}

#[tokio::test]
async fn a_close_without_an_answer_to_wait_for_goes_within_the_longest_wait() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let (mut ws, _) = sluice.ws_named("/ws").await;
    echo(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::text("before"),
    )
    .await;
    let started = std::time::Instant::now();
    sluice.registry().close_all(1012);
    use futures_util::StreamExt;
    match within(5, "close", ws.next()).await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1012);
        }
        other => panic!("expected Close 1012, got {other:?}"),
    }
    // No answer comes: the close goes at the longest wait for one (2 s),
    // no later.
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "took {:?}",
        started.elapsed()
    );
    // tungstenite answers the close; the tunnel then ends.
    while within(5, "close handshake", ws.next()).await.is_some() {}
    eventually(5, "tunnel gone", || sluice.registry().ws_total() == 0).await;
    eventually(5, "backend saw the close", || backends[0].ws_open() == 0).await;
}

#[tokio::test]
async fn websocket_opened_during_shutdown_is_closed_too() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    // close_all also marks WebSockets that start afterwards.
    sluice.registry().close_all(1001);
    let (mut ws, _) = sluice.ws_named("/ws").await;
    use futures_util::StreamExt;
    match within(5, "close", ws.next()).await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001)
        }
        other => panic!("expected Close 1001, got {other:?}"),
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the buffer we own.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// Regression (review of the core): a close requested while a message was
/// stalled half-way made the tunnel spin until the quiet-point wait ended.
#[tokio::test]
async fn close_request_on_a_stalled_message_does_not_spin() {
    let backend = RawBackend::start(
        "",
        Arc::new(|mut stream: TcpStream, _seen, _index| {
            Box::pin(async move {
                // Half of a 1,000-byte message, then silence.
                let msg = frame(0x82, &[7u8; 1000], None);
                let _ = stream.write_all(&msg[..500]).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            })
        }),
    )
    .await;
    let sluice = Sluice::with_config(config(&[backend.addr])).await;
    let (mut client, _) = raw_ws_client(sluice.addr, "").await;
    let _ = read_exact(&mut client, 500).await;
    let before = thread_cpu();
    sluice.registry().close_all(1012);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let spent = thread_cpu() - before;
    assert!(
        spent < Duration::from_millis(200),
        "tunnel used {spent:?} of CPU in 800 ms"
    );
}

/// A client that announces a message of 2^63 − 1 bytes and trickles it
/// would hold a drain forever: after `max_message_wait` it is cut, counted,
/// and the backend sees its connection end.
#[tokio::test]
async fn a_message_that_outlives_max_message_wait_is_cut() {
    let (backend, ended) = recording_backend().await;
    let wait = Duration::from_millis(1500);
    let mut cfg = config(&[backend.addr]);
    cfg.pools[0].drain.max_message_wait = wait;
    let sluice = Sluice::with_config(cfg).await;
    let (mut client, head) = raw_ws_client(sluice.addr, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    client.write_all(&header).await.expect("write");
    let (mut read_half, mut write_half) = client.into_split();
    let trickle = tokio::spawn(async move {
        // One byte every 100 ms, for at most 20 s.
        for _ in 0..200 {
            if write_half.write_all(&[0x55]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    eventually(5, "backend got the header", || {
        backend.seen.lock().expect("lock")[0].bytes.len() > header.len()
    })
    .await;
    let started = std::time::Instant::now();
    sluice
        .admin()
        .drain("app", "b1", Some("0s"))
        .await
        .expect("drain accepted");
    eventually(10, "the stuck WebSocket is gone", || {
        sluice.registry().ws_total() == 0
    })
    .await;
    let took = started.elapsed();
    assert!(took >= wait, "cut after {took:?}, before max_message_wait");
    eventually(5, "backend sees its connection end", || {
        ended.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let b1 = sluice.registry().pools()[0].backends[0].clone();
    assert_eq!(b1.messages_cut.load(std::sync::atomic::Ordering::SeqCst), 1);
    // No Close frame was slipped into the message towards the backend.
    let got = backend.seen.lock().expect("lock")[0].bytes.clone();
    assert!(got[header.len()..].iter().all(|&b| b == 0x55));
    let mut rest = Vec::new();
    let _ = within(
        5,
        "client sees its connection end",
        read_half.read_to_end(&mut rest),
    )
    .await;
    trickle.abort();
}
