//! `sluice demo --clients N`: simulated chat clients through sluice.
//!
//! Each client holds a WebSocket, sends a message every second and waits
//! for its echo before the next; when sluice (or anything) closes its
//! connection it reconnects at once and sends the unanswered message
//! again, as a chat app with acknowledgements does. The tally says how
//! many messages went out, came back, were sent again, were lost, and how
//! many connections ended without a Close frame (the only way a message
//! can be cut in the middle).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// What the clients saw, all together.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: AtomicU64,
    pub echoed: AtomicU64,
    /// Messages sent again on a new connection, their echo not yet seen
    /// when the old one closed.
    pub resent: AtomicU64,
    /// Connections opened after the first.
    pub reconnects: AtomicU64,
    /// Close frames received with code 1012 (Service Restart).
    pub closed_1012: AtomicU64,
    /// Connections that ended without a Close frame.
    pub cut: AtomicU64,
    /// Clients connected now.
    pub connected: AtomicU64,
}

/// Running chat clients.
pub struct Clients {
    pub tally: Arc<Tally>,
    count: usize,
    /// No new message after this.
    quiet: CancellationToken,
    tasks: JoinSet<()>,
}

impl Clients {
    /// Starts `count` clients of `url`, each sending a message every `every`.
    pub fn start(url: &str, count: usize, every: Duration) -> Self {
        let tally = Arc::new(Tally::default());
        let quiet = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for id in 0..count {
            tasks.spawn(client(
                url.to_string(),
                id,
                every,
                tally.clone(),
                quiet.clone(),
            ));
        }
        Self {
            tally,
            count,
            quiet,
            tasks,
        }
    }

    /// Clients connected now.
    pub fn connected(&self) -> usize {
        self.tally.connected.load(Ordering::Relaxed) as usize
    }

    /// Stops sending, waits up to `grace` for the last echoes (a message
    /// still unanswered then is lost), and says what happened.
    pub async fn finish(mut self, grace: Duration) -> Report {
        self.quiet.cancel();
        let all_done = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            self.tasks.abort_all();
        }
        let t = &self.tally;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Report {
            clients: self.count,
            sent: get(&t.sent),
            echoed: get(&t.echoed),
            resent: get(&t.resent),
            // A client waits for each echo before its next message.
            lost: get(&t.sent).saturating_sub(get(&t.echoed)),
            reconnects: get(&t.reconnects),
            closed_1012: get(&t.closed_1012),
            cut: get(&t.cut),
        }
    }
}

/// The clients' final tally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub clients: usize,
    pub sent: u64,
    pub echoed: u64,
    pub resent: u64,
    pub lost: u64,
    pub reconnects: u64,
    pub closed_1012: u64,
    pub cut: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} chat clients: {} messages sent, {} echoed, {} lost ({} sent again after a reconnect)",
            self.clients, self.sent, self.echoed, self.lost, self.resent
        )?;
        write!(
            f,
            "{} reconnects ({} after a Close 1012 from sluice); {} connections ended without a Close frame",
            self.reconnects, self.closed_1012, self.cut
        )?;
        if self.cut == 0 {
            // Only a connection that ends without a Close can cut a
            // message in the middle.
            write!(f, ", so no message was cut in the middle")
        } else {
            write!(f, " (a message may have been cut in the middle)")
        }
    }
}

/// One client: connects, sends, reconnects, until `quiet` and its last
/// message is answered.
async fn client(
    url: String,
    id: usize,
    every: Duration,
    tally: Arc<Tally>,
    quiet: CancellationToken,
) {
    let mut pending: Option<String> = None;
    let mut seq = 0u64;
    let mut first = true;
    // Spread the clients' sends over the interval.
    let offset = every.mul_f64(rand::random::<f64>());
    loop {
        if quiet.is_cancelled() && pending.is_none() {
            return;
        }
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            tokio::time::sleep(Duration::from_millis(100 + rand::random_range(0..200))).await;
            continue;
        };
        if !first {
            tally.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        tally.connected.fetch_add(1, Ordering::Relaxed);
        if let Some(text) = &pending
            && ws.send(Message::text(text.clone())).await.is_ok()
        {
            tally.resent.fetch_add(1, Ordering::Relaxed);
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
        let mut closed = false;
        loop {
            tokio::select! {
                _ = tick.tick(), if pending.is_none() && !quiet.is_cancelled() => {
                    seq += 1;
                    let text = format!("client {id} message {seq}");
                    // Counted once made: one that could not go out now
                    // goes on the next connection.
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    pending = Some(text.clone());
                    if ws.send(Message::text(text)).await.is_err() {
                        break;
                    }
                }
                () = quiet.cancelled(), if pending.is_none() => {
                    let _ = ws.close(None).await;
                    tally.connected.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        if pending.as_deref() == Some(text.as_str()) {
                            tally.echoed.fetch_add(1, Ordering::Relaxed);
                            pending = None;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        closed = true;
                        if frame.is_some_and(|f| u16::from(f.code) == 1012) {
                            tally.closed_1012.fetch_add(1, Ordering::Relaxed);
                        }
                        // Reading on sends tungstenite's reply and ends
                        // the stream once the handshake is done.
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
            }
        }
        tally.connected.fetch_sub(1, Ordering::Relaxed);
        if !closed {
            tally.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}
