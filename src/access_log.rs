//! The access log: one line per HTTP request when its response ends, one
//! per WebSocket when it closes.
//!
//! Owns the log's writer thread and its bounded queue. The data path hands
//! over an [`Entry`] with `try_send` and never waits: when the queue is
//! full (a slow disk, a pipe nobody reads) the line is dropped and
//! counted. Lines are formatted and written on the writer thread, in
//! batches, flushed whenever the queue is empty. [`AccessLog::reopen`]
//! (SIGUSR1) makes it open its file anew, for log rotation.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::warn;

use crate::config::{AccessTarget, LogFormat};

/// One finished request or WebSocket.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When it began.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// `"http"` or `"ws"`.
    pub kind: &'static str,
    pub client: SocketAddr,
    pub listener: String,
    pub pool: String,
    /// The backend that answered; `None` when sluice answered itself.
    pub backend: Option<String>,
    pub method: String,
    /// Path and query, as the client sent them.
    pub path: String,
    /// `"HTTP/1.1"` or `"HTTP/2"`.
    pub proto: &'static str,
    pub status: u16,
    /// Body bytes from the client (for a WebSocket: every byte after the
    /// upgrade).
    pub bytes_in: u64,
    /// Body bytes to the client.
    pub bytes_out: u64,
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    /// What a WebSocket did; `None` for a plain request.
    #[serde(flatten)]
    pub ws: Option<WsEnd>,
}

/// How a WebSocket ended.
#[derive(Debug, Clone, Serialize)]
pub struct WsEnd {
    /// Messages from the client.
    pub messages_in: u64,
    /// Messages to the client.
    pub messages_out: u64,
    /// The first Close frame's code (sluice's own when sluice closed);
    /// `None` when the connection ended without one.
    pub close_code: Option<u16>,
    /// `"client"`, `"backend"` or `"sluice"`.
    pub closed_by: &'static str,
    /// Why sluice closed it: drain, rebalance, upgrade, shutdown, removed
    /// or ping_timeout.
    pub reason: Option<&'static str>,
    /// A message was cut (it outlived `max_message_wait` during a close).
    pub cut: bool,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round3(d.as_secs_f64() * 1000.0))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Entry {
    /// The entry as one line, without the newline.
    pub fn format(&self, format: LogFormat) -> String {
        let mut line = Vec::with_capacity(256);
        self.write_to(format, &mut line);
        String::from_utf8_lossy(&line).into_owned()
    }

    /// Appends the line (without the newline) to `out`, with no
    /// allocation of its own for plain values.
    pub fn write_to(&self, format: LogFormat, out: &mut Vec<u8>) {
        // Writing into a Vec does not fail.
        let _ = match format {
            LogFormat::Json => serde_json::to_writer(&mut *out, self).map_err(io::Error::from),
            LogFormat::Text => self.write_text(out),
        };
    }

    fn write_text(&self, out: &mut Vec<u8>) -> io::Result<()> {
        write!(
            out,
            "{} {} client={} listener={} pool={} backend={} method={} path={} proto={} status={} bytes_in={} bytes_out={} duration_ms={}",
            humantime::format_rfc3339_millis(self.time),
            self.kind,
            self.client,
            Quoted(&self.listener),
            Quoted(&self.pool),
            Dash(self.backend.as_deref().map(Quoted)),
            Quoted(&self.method),
            Quoted(&self.path),
            self.proto,
            self.status,
            self.bytes_in,
            self.bytes_out,
            round3(self.duration.as_secs_f64() * 1000.0),
        )?;
        if let Some(ws) = &self.ws {
            write!(
                out,
                " messages_in={} messages_out={} close_code={} closed_by={} reason={} cut={}",
                ws.messages_in,
                ws.messages_out,
                Dash(ws.close_code),
                ws.closed_by,
                Dash(ws.reason),
                ws.cut,
            )?;
        }
        Ok(())
    }
}

/// A value as it is when it is plain (letters, digits, `-_./:?=&%+,;~@`
/// and a few more), else quoted the JSON way, so that a line always
/// splits on spaces.
struct Quoted<'a>(&'a str);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./:?=&%+,;~@!*()[]".contains(&b));
        if plain {
            f.write_str(self.0)
        } else {
            f.write_str(&serde_json::to_string(self.0).unwrap_or_default())
        }
    }
}

/// A value, or `-` for none.
struct Dash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Dash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Lines handed to the writer, a nudge to look at its flags, or a
/// request to write out everything before it and say so.
enum Message {
    Line(Box<Entry>),
    Wake,
    Flush(std::sync::mpsc::Sender<()>),
}

/// Counters of the access log, for metrics.
#[derive(Debug, Default)]
pub struct Counts {
    /// Lines written.
    pub written: AtomicU64,
    /// Lines dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Lines lost because writing failed.
    pub failed: AtomicU64,
}

/// What senders and the writer share: not the sender itself, so that the
/// writer ends once the last `AccessLog` is gone.
struct Shared {
    counts: Arc<Counts>,
    reopen: AtomicBool,
}

struct Inner {
    tx: SyncSender<Message>,
    shared: Arc<Shared>,
}

/// The access log's sending side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct AccessLog(Arc<Inner>);

/// An access log that may have ended: a reload keeps these for the
/// logs that WebSockets opened before it still write to, so that a
/// rotation reaches them too.
#[derive(Clone)]
pub struct WeakAccessLog(std::sync::Weak<Inner>);

impl WeakAccessLog {
    /// The log, while something still writes to it.
    pub fn upgrade(&self) -> Option<AccessLog> {
        self.0.upgrade().map(AccessLog)
    }
}

/// Why the access log could not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("opening the access log {}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("starting the access log's thread")]
    Thread(#[source] io::Error),
}

impl AccessLog {
    /// Starts writing to `target` (not `Off`) in `format`, with at most
    /// `queue` lines waiting; `counts` (shared across reloads) counts
    /// what happened to the lines.
    pub fn start(
        target: &AccessTarget,
        format: LogFormat,
        queue: usize,
        counts: Arc<Counts>,
    ) -> Result<Self, AccessLogError> {
        let out = open(target)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(1));
        let shared = Arc::new(Shared {
            counts,
            reopen: AtomicBool::new(false),
        });
        let writer = Writer {
            rx,
            out,
            target: target.clone(),
            format,
            shared: shared.clone(),
            buf: Vec::with_capacity(BUFFER),
            lines: 0,
            failing: false,
        };
        std::thread::Builder::new()
            .name("sluice-access-log".into())
            .spawn(move || writer.run())
            .map_err(AccessLogError::Thread)?;
        Ok(Self(Arc::new(Inner { tx, shared })))
    }

    /// Queues `entry`; drops it (counted) when the queue is full.
    pub fn send(&self, entry: Entry) {
        match self.0.tx.try_send(Message::Line(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.0.shared.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Opens the file anew before the next line (log rotation).
    pub fn reopen(&self) {
        self.0.shared.reopen.store(true, Ordering::Release);
        let _ = self.0.tx.try_send(Message::Wake);
    }

    /// Waits (blocking, up to `limit`) until the lines queued so far are
    /// written; false when they were not in time or the queue is full.
    pub fn flush(&self, limit: Duration) -> bool {
        let (done, written) = std::sync::mpsc::channel();
        self.0.tx.try_send(Message::Flush(done)).is_ok() && written.recv_timeout(limit).is_ok()
    }

    pub fn downgrade(&self) -> WeakAccessLog {
        WeakAccessLog(Arc::downgrade(&self.0))
    }
}

/// Most bytes of lines gathered before they are written.
const BUFFER: usize = 64 * 1024;

/// After writing a batch of more than one line, the writer waits this
/// long before it looks at the queue again: under load a line then costs
/// the data path no wake-up of the writer (a system call each), only a
/// place in the queue; an idle log still writes its first line at once.
const BATCH_PAUSE: Duration = Duration::from_millis(10);

/// Opens where the lines go.
fn open(target: &AccessTarget) -> Result<Box<dyn Write + Send>, AccessLogError> {
    Ok(match target {
        AccessTarget::Off | AccessTarget::Stdout => Box::new(io::stdout()),
        AccessTarget::Stderr => Box::new(io::stderr()),
        AccessTarget::File(path) => Box::new(
            OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(path)
                .map_err(|source| AccessLogError::Open {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

struct Writer {
    rx: Receiver<Message>,
    out: Box<dyn Write + Send>,
    target: AccessTarget,
    format: LogFormat,
    shared: Arc<Shared>,
    /// Lines gathered and not yet written.
    buf: Vec<u8>,
    /// How many lines `buf` holds.
    lines: u64,
    /// Writing failed last time: said once, until it works again.
    failing: bool,
}

impl Writer {
    /// Writes lines until every sender is gone: what the queue holds is
    /// gathered and written at once, so a busy log costs one write per
    /// batch.
    fn run(mut self) {
        while let Ok(first) = self.rx.recv() {
            self.reopen_if_asked();
            let mut next = Some(first);
            let mut batch = 0usize;
            while let Some(message) = next {
                batch += 1;
                match message {
                    Message::Line(entry) => {
                        entry.write_to(self.format, &mut self.buf);
                        self.buf.push(b'\n');
                        self.lines += 1;
                        if self.buf.len() >= BUFFER {
                            self.write_out();
                        }
                    }
                    Message::Wake => {}
                    Message::Flush(done) => {
                        self.write_out();
                        let _ = done.send(());
                    }
                }
                next = self.rx.try_recv().ok();
            }
            self.write_out();
            if batch > 1 {
                std::thread::sleep(BATCH_PAUSE);
            }
        }
    }

    /// Writes the gathered lines; on failure they are lost, counted, and
    /// said once per failing spell.
    fn write_out(&mut self) {
        // A rotation is not put off by a long batch.
        self.reopen_if_asked();
        if self.buf.is_empty() {
            return;
        }
        let result = self
            .out
            .write_all(&self.buf)
            .and_then(|()| self.out.flush());
        let counts = &self.shared.counts;
        match result {
            Ok(()) => {
                counts.written.fetch_add(self.lines, Ordering::Relaxed);
                if self.failing {
                    self.failing = false;
                    warn!("the access log is written again");
                }
            }
            Err(error) => {
                counts.failed.fetch_add(self.lines, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    warn!(%error, "writing the access log failed: its lines are lost until it works again");
                }
            }
        }
        self.buf.clear();
        self.lines = 0;
    }

    fn reopen_if_asked(&mut self) {
        if !self.shared.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        match open(&self.target) {
            Ok(out) => self.out = out,
            Err(error) => warn!(
                error = %crate::error_chain::chain(&error),
                "reopening the access log failed: writing on to the file open before"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_780_000_000_123),
            kind: "http",
            client: SocketAddr::from(([127, 0, 0, 1], 4000)),
            listener: "public".into(),
            pool: "app".into(),
            backend: None,
            method: "GET".into(),
            path: "/a b\"c".into(),
            proto: "HTTP/1.1",
            status: 503,
            bytes_in: 0,
            bytes_out: 21,
            duration: Duration::from_micros(1500),
            ws: None,
        }
    }

    #[test]
    fn text_lines_split_on_spaces_whatever_the_path() {
        assert_eq!(
            entry().format(LogFormat::Text),
            "2026-05-28T20:26:40.123Z http client=127.0.0.1:4000 listener=public pool=app backend=- method=GET path=\"/a b\\\"c\" proto=HTTP/1.1 status=503 bytes_in=0 bytes_out=21 duration_ms=1.5"
        );
        assert_eq!(Quoted("").to_string(), "\"\"");
        assert_eq!(
            Quoted("/chat?room=1&x=%20").to_string(),
            "/chat?room=1&x=%20"
        );
    }

    #[test]
    fn json_lines_have_websocket_fields_only_for_websockets() {
        let plain: serde_json::Value =
            serde_json::from_str(&entry().format(LogFormat::Json)).expect("JSON");
        assert_eq!(plain["path"], "/a b\"c");
        assert_eq!(plain["duration_ms"], 1.5);
        assert!(plain.get("closed_by").is_none());
        let mut ws = entry();
        ws.ws = Some(WsEnd {
            messages_in: 1,
            messages_out: 2,
            close_code: None,
            closed_by: "backend",
            reason: None,
            cut: false,
        });
        let ws: serde_json::Value =
            serde_json::from_str(&ws.format(LogFormat::Json)).expect("JSON");
        assert_eq!(ws["closed_by"], "backend");
        assert_eq!(ws["close_code"], serde_json::Value::Null);
    }
}
