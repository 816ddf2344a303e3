//! WebSockets through sluice: transparent in both directions.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

#[tokio::test]
async fn echo_text_and_binary_and_backend_greets_first() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let (mut ws, name) = sluice.ws_named("/ws").await;
    assert_eq!(name, "b1");
    echo(&mut ws, Message::text("hello")).await;
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 255])).await;
    assert_eq!(sluice.registry().ws_total(), 1);
    ws.close(None).await.expect("close");
    eventually(5, "registry empties", || sluice.registry().ws_total() == 0).await;
}

#[tokio::test]
async fn one_and_sixteen_mib_messages_pass_whole() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let (mut ws, _) = sluice.ws_named("/ws").await;
    for size in [1 << 20, 16 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        echo(&mut ws, Message::binary(payload)).await;
    }
}

#[tokio::test]
async fn subprotocol_is_negotiated_with_the_backend() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let mut req = sluice.url("/ws").into_client_request().expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "chat.v2, chat.v1".parse().expect("value"),
    );
    let (mut ws, resp) = within(10, "connect", tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat.v2");
    assert_eq!(greeting(&mut ws).await, "b1");
}

#[tokio::test]
async fn upgrade_headers_are_forwarded_and_101_comes_back_unchanged() {
    let backend = RawBackend::echo("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\nX-App: yes\r\nSet-Cookie: sid=1\r\n").await;
    let sluice = Sluice::with_config(config(&[backend.addr])).await;
    let (_stream, head) = raw_ws_client(
        sluice.addr,
        "Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nCookie: session=abc\r\nOrigin: https://app.example\r\n",
    )
    .await;
    let expected_101 = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nsec-websocket-extensions: permessage-deflate; server_no_context_takeover\r\nx-app: yes\r\nset-cookie: sid=1\r\n\r\n";
    assert_eq!(head, expected_101);
    let seen = backend.seen.lock().expect("lock")[0]
        .head
        .to_ascii_lowercase();
    for line in [
        "get /raw http/1.1\r\n",
        "upgrade: websocket\r\n",
        "connection: upgrade\r\n",
        "sec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n",
        "sec-websocket-version: 13\r\n",
        "sec-websocket-protocol: chat\r\n",
        "sec-websocket-extensions: permessage-deflate; client_max_window_bits\r\n",
        "cookie: session=abc\r\n",
        "origin: https://app.example\r\n",
        "x-forwarded-for: 127.0.0.1\r\n",
    ] {
        assert!(
            seen.contains(line),
            "backend did not see {line:?} in {seen}"
        );
    }
}

#[tokio::test]
async fn frames_pass_byte_for_byte_fragments_pings_compressed_and_close() {
    let backend = RawBackend::echo("").await;
    let sluice = Sluice::with_config(config(&[backend.addr])).await;
    let (mut stream, head) = raw_ws_client(
        sluice.addr,
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let sent = transparency_frames();
    for chunk in sent.chunks(777) {
        stream.write_all(chunk).await.expect("write");
    }
    let back = read_exact(&mut stream, sent.len()).await;
    assert_eq!(back, sent, "client got back exactly what it sent");
    eventually(5, "backend saw every byte", || {
        backend.seen.lock().expect("lock")[0].bytes.len() == sent.len()
    })
    .await;
    assert_eq!(backend.seen.lock().expect("lock")[0].bytes, sent);
}

#[tokio::test]
async fn close_codes_pass_in_both_directions() {
    // Client-initiated: the demo backend answers the close with the same code.
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let (mut ws, _) = sluice.ws_named("/ws").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    let reply = within(5, "close reply", ws.next()).await;
    match reply {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4001),
        other => panic!("expected the backend's close 4001, got {other:?}"),
    }
    // Backend-initiated: a raw backend closes with 4002 "done".
    let raw = RawBackend::start(
        "",
        Arc::new(|mut stream: TcpStream, _seen, _i| {
            Box::pin(async move {
                let _ = stream
                    .write_all(&frame(0x88, &[0x0f, 0xa2, b'd', b'o', b'n', b'e'], None))
                    .await;
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut [0u8; 64]).await;
            })
        }),
    )
    .await;
    let sluice = Sluice::with_config(config(&[raw.addr])).await;
    let mut ws = sluice.ws("/ws").await;
    match within(5, "server close", ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 4002);
            assert_eq!(frame.reason.as_str(), "done");
        }
        other => panic!("expected close 4002, got {other:?}"),
    }
}

#[tokio::test]
async fn backend_refusing_the_upgrade_is_answered_as_is() {
    // A backend that answers the upgrade with 403 and a body.
    let addr = scripted_backend(std::time::Duration::ZERO, |_| {
        Some(&b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\nX-Why: origin\r\n\r\nnope!\r\n"[..])
    })
    .await;
    let sluice = Sluice::with_config(config(&[addr])).await;
    let err = tokio_tungstenite::connect_async(sluice.url("/ws"))
        .await
        .expect_err("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.headers()["x-why"], "origin");
        }
        other => panic!("expected HTTP 403, got {other:?}"),
    }
    eventually(5, "lease given back", || {
        sluice.registry().pools()[0].backends[0].active() == 0
    })
    .await;
}
