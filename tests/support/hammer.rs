//! Clients that open connections over and over (connect, upgrade,
//! greeting, one echo, close), counting what failed, for reloads and
//! upgrades that must refuse none.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// What the hammering clients saw.
#[derive(Default)]
pub struct Hammered {
    pub ok: AtomicU64,
    /// Closed by sluice on purpose (1012: their backend was removed).
    pub moved: AtomicU64,
    pub failed: AtomicU64,
    /// The longest time between two successful connects, in µs.
    pub longest_gap_us: AtomicU64,
    /// Gaps of over 10 ms between successful connects, with when each ended.
    pub gaps: std::sync::Mutex<Vec<(Instant, Duration)>>,
}

impl Hammered {
    /// The longest gap between successful connects that overlaps
    /// `from..to`.
    pub fn longest_gap_within(&self, from: Instant, to: Instant) -> Duration {
        self.gaps
            .lock()
            .expect("lock")
            .iter()
            .filter(|(end, gap)| *end >= from && *end - *gap <= to)
            .map(|(_, gap)| *gap)
            .max()
            .unwrap_or_default()
    }
}

/// One connect, upgrade, greeting, echo and close.
async fn one_round(url: &str) -> Result<bool, String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match ws.next().await {
        Some(Ok(Message::Text(_))) => {}
        Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1012 => return Ok(false),
        other => return Err(format!("greeting: {other:?}")),
    }
    ws.send(Message::text("ping"))
        .await
        .map_err(|e| format!("send: {e}"))?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str() == "ping" => {}
        Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1012 => return Ok(false),
        other => return Err(format!("echo: {other:?}")),
    }
    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
    while ws.next().await.is_some() {}
    Ok(true)
}

/// `workers` clients connecting over and over through `url` until `stop`.
pub fn hammer(
    url: String,
    workers: usize,
    stop: &CancellationToken,
) -> (Arc<Hammered>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Hammered::default());
    let last_ok = Arc::new(std::sync::Mutex::new(Instant::now()));
    let tasks = (0..workers)
        .map(|_| {
            let (url, stop, seen, last_ok) =
                (url.clone(), stop.clone(), seen.clone(), last_ok.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    match tokio::time::timeout(Duration::from_secs(5), one_round(&url)).await {
                        Ok(Ok(true)) => {
                            seen.ok.fetch_add(1, Ordering::Relaxed);
                            let now = Instant::now();
                            let mut last = last_ok.lock().expect("lock");
                            let gap = now.duration_since(*last).as_micros() as u64;
                            seen.longest_gap_us.fetch_max(gap, Ordering::Relaxed);
                            if gap > 10_000 {
                                let gap = Duration::from_micros(gap);
                                seen.gaps.lock().expect("lock").push((now, gap));
                            }
                            *last = now;
                        }
                        Ok(Ok(false)) => {
                            seen.moved.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(error)) => {
                            eprintln!("hammer: {error}");
                            seen.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            eprintln!("hammer: a round took over 5 s");
                            seen.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    (seen, tasks)
}
