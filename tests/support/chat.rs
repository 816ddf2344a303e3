//! Chat load: clients that send numbered messages, check every echo and
//! reconnect when sluice closes them.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::*;

/// What a chatting client saw.
#[derive(Debug, Default, Clone)]
pub struct ChatStats {
    /// Backends it was connected to, in order.
    pub backends: Vec<String>,
    /// Close frames it received: code and when.
    pub closes: Vec<(u16, std::time::Instant)>,
    /// When each connection ended, for any reason (Close frame, reset, EOF).
    pub disconnects: Vec<std::time::Instant>,
    /// Messages whose echo had not come when the connection closed, so they
    /// were sent again after reconnecting (a message sent while the close was
    /// on its way: a robust client resends what was not acknowledged).
    pub resent: u64,
    /// When each of those was sent again.
    pub resent_at: Vec<std::time::Instant>,
    /// Messages never echoed at all.
    pub lost: u64,
    /// Echoes received intact.
    pub echoed: u64,
    /// Echoes that did not match what was sent (cut or mixed up messages).
    pub wrong: u64,
}

/// A client that sends a numbered message every `every`, checks each echo,
/// and reconnects through `url` whenever the connection is closed, until
/// `stop`. A message not yet echoed when the connection closed is sent
/// again on the next connection.
pub async fn chat(url: String, every: Duration, stop: CancellationToken) -> ChatStats {
    let mut stats = ChatStats::default();
    let mut seq = 0u64;
    let mut unanswered: Option<String> = None;
    'connect: for _attempt in 0..1000 {
        if stop.is_cancelled() {
            break;
        }
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(big_ws_config()), true),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                stats
                    .backends
                    .push(t.as_str().trim_start_matches("connected to ").to_string());
            }
            _ => continue,
        }
        loop {
            let text = match unanswered.clone() {
                Some(text) => {
                    stats.resent += 1;
                    stats.resent_at.push(std::time::Instant::now());
                    text
                }
                None => {
                    tokio::select! {
                        () = stop.cancelled() => {
                            let _ = ws.close(None).await;
                            break 'connect;
                        }
                        () = tokio::time::sleep(every) => {}
                        msg = ws.next() => {
                            // Only a Close can come while no echo is awaited.
                            stats.disconnects.push(std::time::Instant::now());
                            if let Some(Ok(Message::Close(frame))) = msg {
                                stats.closes.push((frame.map_or(1005, |f| u16::from(f.code)), std::time::Instant::now()));
                                finish_close(&mut ws).await;
                            }
                            continue 'connect;
                        }
                    }
                    seq += 1;
                    format!("msg {seq}")
                }
            };
            unanswered = Some(text.clone());
            if ws.send(Message::text(text.clone())).await.is_err() {
                stats.disconnects.push(std::time::Instant::now());
                continue 'connect;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => {
                        stats.echoed += 1;
                        unanswered = None;
                        break;
                    }
                    Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) => {
                        stats.wrong += 1;
                        unanswered = None;
                        break;
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        stats.closes.push((
                            frame.map_or(1005, |f| u16::from(f.code)),
                            std::time::Instant::now(),
                        ));
                        finish_close(&mut ws).await;
                        continue 'connect;
                    }
                    Ok(Some(Ok(_))) => continue,
                    _ => continue 'connect,
                }
            }
        }
    }
    stats.lost = u64::from(unanswered.is_some());
    stats
}

/// Sums over chatting clients.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChatTotals {
    pub lost: u64,
    pub wrong: u64,
    pub resent: u64,
    pub echoed: u64,
    pub closes: usize,
}

/// Stops the clients and sums what they saw.
pub async fn finish_chat(
    stop: &CancellationToken,
    clients: Vec<tokio::task::JoinHandle<ChatStats>>,
) -> (Vec<ChatStats>, ChatTotals) {
    stop.cancel();
    let stats: Vec<ChatStats> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .map(|r| r.expect("client task"))
        .collect();
    let totals = stats.iter().fold(ChatTotals::default(), |t, s| ChatTotals {
        lost: t.lost + s.lost,
        wrong: t.wrong + s.wrong,
        resent: t.resent + s.resent,
        echoed: t.echoed + s.echoed,
        closes: t.closes + s.closes.len(),
    });
    (stats, totals)
}

/// `n` chatting clients through `sluice`, each sending every `every`.
pub fn chatters(
    sluice: &Sluice,
    n: usize,
    every: Duration,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<ChatStats>> {
    (0..n)
        .map(|_| tokio::spawn(chat(sluice.url("/ws"), every, stop.clone())))
        .collect()
}

/// Lets tungstenite answer a Close and see the end of the stream.
async fn finish_close(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while ws.next().await.is_some() {}
    })
    .await;
}
