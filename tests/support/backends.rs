//! Raw scripted backends that speak HTTP or the WebSocket handshake by
//! hand and record exactly what they receive.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::*;

/// What a raw backend saw of one upgrade.
#[derive(Debug, Default, Clone)]
pub struct RawSeen {
    /// The request head, as bytes on the wire.
    pub head: String,
    /// Bytes after the head.
    pub bytes: Vec<u8>,
}

/// A WebSocket backend that speaks the handshake by hand, then hands the
/// socket to `session`. It records the request head and every byte it reads.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<RawSeen>>>,
}

pub type Session = Arc<
    dyn Fn(
            TcpStream,
            Arc<Mutex<Vec<RawSeen>>>,
            usize,
        ) -> futures_util::future::BoxFuture<'static, ()>
        + Send
        + Sync,
>;

impl RawBackend {
    /// Answers 101 with `extra` headers, then runs `session`.
    pub async fn start(extra: &'static str, session: Session) -> Self {
        let listener = TcpListener::bind(SocketAddr::from(LOOPBACK))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<RawSeen>>> = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen2.clone();
                let session = session.clone();
                tokio::spawn(async move {
                    let head = read_head(&mut stream).await;
                    let key = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .starts_with("sec-websocket-key:")
                                .then(|| l[18..].trim().to_string())
                        })
                        .unwrap_or_default();
                    let index = {
                        let mut s = seen.lock().expect("lock");
                        s.push(RawSeen {
                            head: head.clone(),
                            bytes: Vec::new(),
                        });
                        s.len() - 1
                    };
                    let resp = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{extra}\r\n",
                        derive_accept_key(key.as_bytes())
                    );
                    if stream.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    session(stream, seen, index).await;
                });
            }
        });
        Self { addr, seen }
    }

    /// Echoes every byte back and records it.
    pub async fn echo(extra: &'static str) -> Self {
        Self::start(
            extra,
            Arc::new(
                |mut stream: TcpStream, seen: Arc<Mutex<Vec<RawSeen>>>, index: usize| {
                    Box::pin(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            seen.lock().expect("lock")[index]
                                .bytes
                                .extend_from_slice(&buf[..n]);
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    })
                },
            ),
        )
        .await
    }
}

/// Records what the client side sends until the connection ends, and
/// answers the first masked Close frame with a Close 1000, as a server
/// does.
pub async fn record_and_answer_close(
    stream: &mut TcpStream,
    seen: &Mutex<Vec<RawSeen>>,
    index: usize,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut answered = false;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.lock().expect("lock")[index]
                .bytes
                .extend_from_slice(&buf[..n]),
        }
        let got_close = seen.lock().expect("lock")[index]
            .bytes
            .windows(2)
            .any(|w| w == [0x88, 0x82]);
        if got_close && !answered {
            answered = true;
            let mut close = vec![0x88, 2];
            close.extend_from_slice(&1000u16.to_be_bytes());
            let _ = stream.write_all(&close).await;
        }
    }
}

/// A WebSocket backend that records what it reads and answers a Close
/// (see [`record_and_answer_close`]); the flag turns true when its
/// connection has ended.
pub async fn recording_backend() -> (RawBackend, Arc<std::sync::atomic::AtomicBool>) {
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended2 = ended.clone();
    let backend = RawBackend::start(
        "",
        Arc::new(move |mut stream: TcpStream, seen, index| {
            let ended = ended2.clone();
            Box::pin(async move {
                record_and_answer_close(&mut stream, &seen, index).await;
                ended.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        }),
    )
    .await;
    (backend, ended)
}

/// Reads an HTTP head (through the blank line) byte by byte.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).to_string()
}

/// A backend that reads each request head (never a body) and answers with
/// what `answer` returns for it (called as the head arrives), after
/// `delay`; `None` closes the connection without answering.
pub async fn scripted_backend(
    delay: Duration,
    answer: impl Fn(&str) -> Option<&'static [u8]> + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from(LOOPBACK))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                loop {
                    let head = read_head(&mut s).await;
                    if head.is_empty() {
                        return;
                    }
                    let answer = answer(&head);
                    tokio::time::sleep(delay).await;
                    let Some(bytes) = answer else {
                        let _ = s.shutdown().await;
                        return;
                    };
                    if s.write_all(bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
