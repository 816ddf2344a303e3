//! Clients: WebSocket (tungstenite and by hand), HTTP/1.1 (hyper).

use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::*;

pub fn big_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

pub async fn ws_connect(url: &str) -> Ws {
    let (ws, _) = within(
        10,
        "websocket connect",
        tokio_tungstenite::connect_async_with_config(url, Some(big_ws_config()), true),
    )
    .await
    .expect("websocket handshake through sluice");
    ws
}

/// The `NAME=value` part of a response's sticky Set-Cookie, if any.
pub fn sticky_pin(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("SLUICE_AFFINITY="))
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
}

/// Runs curl (a third-party client) with `args`; its standard output,
/// once it has succeeded.
pub async fn curl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("curl")
        .arg("-sS")
        .args(args)
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Reads the demo backend's first message, `connected to NAME`.
pub async fn greeting<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let msg = within(10, "greeting", ws.next())
        .await
        .expect("a message")
        .expect("no error");
    let text = msg.into_text().expect("text greeting").to_string();
    text.strip_prefix("connected to ")
        .expect("demo greeting")
        .to_string()
}

/// Sends `msg` and expects it back unchanged.
pub async fn echo(ws: &mut Ws, msg: Message) {
    ws.send(msg.clone()).await.expect("send");
    let back = within(30, "echo", ws.next())
        .await
        .expect("a message")
        .expect("no error");
    assert_eq!(back, msg, "echo differs");
}

/// An HTTP/1.1 client on one connection (keep-alive).
pub struct HttpClient {
    sender: SendRequest<Full<Bytes>>,
}

pub struct HttpReply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl HttpReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    /// The demo backend that answered.
    pub fn backend(&self) -> String {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to sluice");
        Self::over(stream).await
    }

    /// HTTP/1.1 on a connection the test opened (e.g. after writing a
    /// PROXY header on it).
    pub async fn over(stream: TcpStream) -> Self {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self { sender }
    }

    pub async fn send(&mut self, req: hyper::Request<Full<Bytes>>) -> HttpReply {
        within(10, "http ready", self.sender.ready())
            .await
            .expect("connection usable");
        let resp = within(10, "http response", self.sender.send_request(req))
            .await
            .expect("response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = within(10, "http body", resp.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        HttpReply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str) -> HttpReply {
        let req = hyper::Request::get(path)
            .header("host", "sluice.test")
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.send(req).await
    }
}

/// Opens a WebSocket by hand: returns the socket (after the 101 head) and
/// the response head.
pub async fn raw_ws_client(addr: SocketAddr, extra: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /raw HTTP/1.1\r\nHost: sluice.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let head = within(10, "101 head", read_head(&mut stream)).await;
    (stream, head)
}

/// What a client sends to see that frames pass byte for byte: a
/// fragmented text message with a ping and a pong between its fragments,
/// a "compressed" message (RSV1 set, as permessage-deflate does), a
/// 70,000-byte binary message (64-bit length), and a close with code 4001.
pub fn transparency_frames() -> Vec<u8> {
    let key = Some([9, 8, 7, 6]);
    let mut sent = Vec::new();
    sent.extend(frame(0x01, b"frag-one ", key));
    sent.extend(frame(0x89, b"ping!", key));
    sent.extend(frame(0x00, b"frag-two ", key));
    sent.extend(frame(0x8a, b"pong", key));
    sent.extend(frame(0x80, b"frag-three", key));
    sent.extend(frame(
        0xc2,
        &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
        key,
    ));
    sent.extend(frame(0x82, &vec![0xab; 70_000], key));
    sent.extend(frame(0x88, &[0x0f, 0xa1, b'b', b'y', b'e'], key));
    sent
}

/// One frame, as a client would send it (masked) or a server (unmasked).
pub fn frame(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![first_byte];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    if n < 126 {
        out.push(m | n as u8);
    } else if n <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Reads exactly `n` bytes.
pub async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    within(20, "read_exact", stream.read_exact(&mut buf))
        .await
        .expect("read");
    buf
}

/// A TCP connection to `addr` from the loopback address `from`, so that
/// the client address differs from 127.0.0.1 (every proxy's own, and every
/// other test client's).
pub async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source");
    socket.connect(addr).await.expect("connect")
}
