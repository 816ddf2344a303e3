//! The access log: one line per request and per WebSocket, in both
//! formats, and a log that cannot be written never holds the proxy back.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use sluice::config::{AccessTarget, LogFormat};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::process::TempDir;
use crate::support::*;

/// The lines of `path` once it has `n` (it may have more).
async fn lines_once(path: &std::path::Path, n: usize) -> Vec<String> {
    let read = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    eventually(10, &format!("{n} access log lines"), || read().len() >= n).await;
    read()
}

/// Reads until the server ends the stream; the Close code it sent.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    let mut code = None;
    while let Some(msg) = within(10, "the close", ws.next()).await {
        match msg {
            Ok(Message::Close(frame)) => code = frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    code
}

/// A scripted session: an HTTP POST, a WebSocket the client closes, one
/// sluice closes by a drain, and a request refused while the only
/// backend is drained. Returns the log's lines and the POST's response
/// size.
async fn scripted_session(format: LogFormat) -> (Vec<String>, usize) {
    let dir = TempDir::new("access-log").expect("temp dir");
    let path = dir.path().join("access.log");
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    cfg.log.access = AccessTarget::File(path.clone());
    cfg.log.format = format;
    cfg.pools[0].drain.window = Duration::ZERO;
    let mut sluice = Sluice::with_config(cfg).await;

    let body = curl(&["-d", "abc", &format!("http://{}/hello?x=1", sluice.addr)]).await;

    // Closed by the client: 2 messages each way after the greeting.
    let (mut ws, _) = sluice.ws_named("/chat").await;
    for text in ["one", "two"] {
        echo(&mut ws, Message::text(text)).await;
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .expect("close sent");
    assert_eq!(close_code(&mut ws).await, Some(1000));
    lines_once(&path, 2).await;

    // Closed by sluice: a drain.
    let (mut ws, _) = sluice.ws_named("/room").await;
    echo(&mut ws, Message::text("x")).await;
    sluice
        .admin()
        .drain("app", "b1", Some("0s"))
        .await
        .expect("drain accepted");
    assert_eq!(close_code(&mut ws).await, Some(1012));
    lines_once(&path, 3).await;

    // No backend left: sluice answers itself.
    let mut http = sluice.http().await;
    let refused = http.get("/after").await;
    assert_eq!(refused.status, 503);
    drop(http);
    lines_once(&path, 4).await;
    sluice.stop().await;
    // Nothing more was written: exactly these four.
    let lines = lines_once(&path, 4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    (lines, body.len())
}

#[tokio::test]
async fn a_session_gets_exactly_its_lines_as_text() {
    let (lines, body_len) = scripted_session(LogFormat::Text).await;
    // The fields after the time, with the duration blanked.
    let fields: Vec<String> = lines
        .iter()
        .map(|l| {
            let (time, rest) = l.split_once(' ').expect("a time first");
            assert!(
                time.len() == 24 && time.ends_with('Z'),
                "RFC 3339 time: {time}"
            );
            rest.split(' ')
                .map(|f| {
                    if f.starts_with("duration_ms=") {
                        "duration_ms=D".to_string()
                    } else if f.starts_with("client=127.0.0.1:") {
                        "client=C".to_string()
                    } else {
                        f.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert_eq!(
        fields,
        [
            format!(
                "http client=C listener=public pool=app backend=b1 method=POST path=/hello?x=1 proto=HTTP/1.1 status=200 bytes_in=3 bytes_out={body_len} duration_ms=D"
            ),
            "ws client=C listener=public pool=app backend=b1 method=GET path=/chat proto=HTTP/1.1 status=101 bytes_in=26 bytes_out=31 duration_ms=D messages_in=2 messages_out=3 close_code=1000 closed_by=client reason=- cut=false".to_string(),
            "ws client=C listener=public pool=app backend=b1 method=GET path=/room proto=HTTP/1.1 status=101 bytes_in=15 bytes_out=24 duration_ms=D messages_in=1 messages_out=2 close_code=1012 closed_by=sluice reason=drain cut=false".to_string(),
            "http client=C listener=public pool=app backend=- method=GET path=/after proto=HTTP/1.1 status=503 bytes_in=0 bytes_out=21 duration_ms=D".to_string(),
        ]
    );
}

#[tokio::test]
async fn a_session_gets_exactly_its_lines_as_json() {
    let (lines, body_len) = scripted_session(LogFormat::Json).await;
    let mut objects: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    for o in &mut objects {
        let o = o.as_object_mut().expect("an object");
        let time = o.remove("time").expect("time");
        assert!(time.as_str().is_some_and(|t| t.ends_with('Z')), "{time}");
        let duration = o.remove("duration_ms").expect("duration");
        assert!(duration.as_f64().is_some_and(|d| d >= 0.0), "{duration}");
        let client = o.remove("client").expect("client");
        assert!(
            client.as_str().is_some_and(|c| c.starts_with("127.0.0.1:")),
            "{client}"
        );
    }
    let common = |kind: &str, method: &str, path: &str| {
        serde_json::json!({
            "kind": kind, "listener": "public", "pool": "app", "backend": "b1",
            "method": method, "path": path, "proto": "HTTP/1.1",
        })
    };
    let merge = |mut a: Value, b: Value| {
        a.as_object_mut()
            .expect("object")
            .extend(b.as_object().expect("object").clone());
        a
    };
    let expected = [
        merge(
            common("http", "POST", "/hello?x=1"),
            serde_json::json!({"status": 200, "bytes_in": 3, "bytes_out": body_len}),
        ),
        merge(
            common("ws", "GET", "/chat"),
            serde_json::json!({"status": 101, "bytes_in": 26, "bytes_out": 31,
                "messages_in": 2, "messages_out": 3, "close_code": 1000,
                "closed_by": "client", "reason": null, "cut": false}),
        ),
        merge(
            common("ws", "GET", "/room"),
            serde_json::json!({"status": 101, "bytes_in": 15, "bytes_out": 24,
                "messages_in": 1, "messages_out": 2, "close_code": 1012,
                "closed_by": "sluice", "reason": "drain", "cut": false}),
        ),
        merge(
            common("http", "GET", "/after"),
            serde_json::json!({"status": 503, "backend": null, "bytes_in": 0, "bytes_out": 21}),
        ),
    ];
    assert_eq!(objects, expected);
}

/// `sluice run` with a `[log]` section `log`, one listener and its admin
/// API on free ports, one pool of `backend`; its stdout as `stdout` says.
struct Running {
    proc: crate::support::process::Proc,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    dir: TempDir,
}

impl Running {
    async fn start(log: &str, backend: std::net::SocketAddr, stdout: std::process::Stdio) -> Self {
        let dir = TempDir::new("access-log-run").expect("temp dir");
        let [port, admin_port] = crate::support::process::free_ports().expect("ports");
        dir.write("admin.token", ADMIN_TOKEN).expect("token file");
        let text = format!(
            "[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_file = \"admin.token\"\n\
             [log]\n{log}\n\
             [[listener]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\n\
             [[pool]]\nname = \"app\"\n\
             [[pool.backend]]\nname = \"b1\"\naddress = \"{backend}\"\n"
        );
        let path = dir.write("sluice.toml", &text).expect("config");
        let proc = crate::support::process::Proc(
            std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["run", "--config"])
                .arg(&path)
                .stdout(stdout)
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("sluice starts"),
        );
        let running = Self {
            proc,
            addr: format!("127.0.0.1:{port}").parse().expect("addr"),
            admin: format!("127.0.0.1:{admin_port}").parse().expect("addr"),
            dir,
        };
        wait_listening(running.addr).await;
        wait_listening(running.admin).await;
        running
    }

    async fn lines(&self, result: &str) -> f64 {
        let text = HttpClient::connect(self.admin)
            .await
            .get("/metrics")
            .await
            .text();
        metric(
            &text,
            &format!("sluice_access_log_lines_total{{result=\"{result}\"}}"),
        )
    }

    /// `n` requests on one keep-alive connection, each answered 200.
    async fn requests(&self, n: usize) {
        let mut http = HttpClient::connect(self.addr).await;
        for i in 0..n {
            let reply = within(10, "a request", http.get(&format!("/r{i}"))).await;
            assert_eq!(reply.status, 200);
        }
    }
}

#[tokio::test]
async fn a_pipe_nobody_reads_or_a_full_disk_loses_lines_never_requests() {
    let _load = LoadShare::take().await;
    let backends = echo_backends(1).await;
    // Nobody reads its stdout: the pipe fills, then the queue, then lines
    // are dropped while every request is served.
    let mut running = Running::start(
        "access = \"stdout\"\naccess_queue = 64",
        backends[0].addr,
        std::process::Stdio::piped(),
    )
    .await;
    within(60, "3,000 requests", running.requests(3000)).await;
    let dropped = running.lines("dropped").await;
    assert!(dropped > 1000.0, "{dropped} lines dropped");
    // The reading end closes: writes fail (EPIPE), requests go on.
    let stdout = running.proc.0.stdout.take().expect("piped stdout");
    drop(stdout);
    within(60, "1,000 requests", running.requests(1000)).await;
    let failed = within(10, "metrics", async {
        loop {
            let failed = running.lines("failed").await;
            if failed > 0.0 {
                return failed;
            }
            running.requests(10).await;
        }
    })
    .await;
    assert!(failed > 0.0);
    drop(running);

    // A full disk: every write fails with ENOSPC.
    let running = Running::start(
        "access = \"/dev/full\"",
        backends[0].addr,
        std::process::Stdio::null(),
    )
    .await;
    within(60, "2,000 requests", running.requests(2000)).await;
    let (written, failed) = within(10, "failures counted", async {
        loop {
            let counts = (
                running.lines("written").await,
                running.lines("failed").await,
            );
            if counts.1 >= 2000.0 {
                return counts;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(written, 0.0);
    assert_eq!(failed, 2000.0);
}

#[tokio::test]
async fn sigusr1_reopens_the_file_after_rotation() {
    let _load = LoadShare::take().await;
    let backends = echo_backends(1).await;
    let running = Running::start(
        "access = \"access.log\"\nformat = \"json\"",
        backends[0].addr,
        std::process::Stdio::null(),
    )
    .await;
    let log = running.dir.path().join("access.log");
    let rotated = running.dir.path().join("access.log.1");
    running.requests(1).await;
    lines_once(&log, 1).await;
    std::fs::rename(&log, &rotated).expect("rotate");
    // Until the signal, lines go on into the renamed file.
    running.requests(1).await;
    lines_once(&rotated, 2).await;
    crate::support::process::send_signal(running.proc.pid(), "USR1").expect("signal");
    eventually(10, "the file opened anew", || log.exists()).await;
    running.requests(1).await;
    let lines = lines_once(&log, 1).await;
    assert_eq!(lines.len(), 1);
    let line: Value = serde_json::from_str(&lines[0]).expect("JSON");
    assert_eq!(line["path"], "/r0");
    assert_eq!(lines_once(&rotated, 2).await.len(), 2);
}

#[tokio::test]
async fn a_client_that_leaves_early_and_a_backend_that_dies_are_logged() {
    use tokio::io::AsyncWriteExt as _;
    let dir = TempDir::new("access-log-early").expect("temp dir");
    // A backend that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let path = dir.path().join("silent.log");
    let mut cfg = config(&[silent_addr]);
    cfg.log.access = AccessTarget::File(path.clone());
    let sluice = Sluice::with_config(cfg).await;
    let mut client = tokio::net::TcpStream::connect(sluice.addr)
        .await
        .expect("connect");
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    eventually(10, "the request reached the backend", || {
        sluice.registry().backends()[0].http_count() == 1
    })
    .await;
    drop(client);
    let lines = lines_once(&path, 1).await;
    assert!(
        lines[0].contains(" backend=b1 method=GET path=/slow proto=HTTP/1.1 status=499 "),
        "{lines:?}"
    );
    held.abort();
    drop(sluice);

    // A backend that dies under a WebSocket: it ended it, with no Close.
    let backends = echo_backends(1).await;
    let path = dir.path().join("dies.log");
    let mut cfg = config(&[backends[0].addr]);
    cfg.log.access = AccessTarget::File(path.clone());
    let sluice = Sluice::with_config(cfg).await;
    let (mut ws, _) = sluice.ws_named("/ws").await;
    backends[0].kill();
    assert_eq!(close_code(&mut ws).await, None);
    let lines = lines_once(&path, 1).await;
    assert!(
        lines[0].contains(" status=101 ")
            && lines[0].ends_with(" close_code=- closed_by=backend reason=- cut=false"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn websockets_closed_by_the_shutdown_are_logged_before_the_end() {
    let dir = TempDir::new("access-log-shutdown").expect("temp dir");
    let backends = echo_backends(1).await;
    let path = dir.path().join("access.log");
    let mut cfg = config(&[backends[0].addr]);
    cfg.log.access = AccessTarget::File(path.clone());
    cfg.pools[0].drain.window = Duration::ZERO;
    let mut sluice = Sluice::with_config(cfg).await;
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(sluice.ws_named("/ws").await.0);
    }
    let closing = tokio::spawn(async move {
        for mut ws in sockets {
            assert_eq!(close_code(&mut ws).await, Some(1001));
        }
    });
    sluice.stop().await;
    closing.await.expect("clients");
    // Written by the time sluice has stopped.
    let text = std::fs::read_to_string(&path).expect("log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 20, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" close_code=1001 closed_by=sluice reason=shutdown ")),
        "{text}"
    );
}

#[tokio::test]
async fn http2_requests_are_logged_as_http2() {
    let dir = TempDir::new("access-log-h2").expect("temp dir");
    let backends = echo_backends(1).await;
    let path = dir.path().join("access.log");
    let mut cfg = config(&[backends[0].addr]);
    cfg.log.access = AccessTarget::File(path.clone());
    cfg.listeners[0].http2.enabled = Some(true);
    let sluice = Sluice::with_config(cfg).await;
    // curl over h2c, one request per connection (curl 7.88 fails a
    // second prior-knowledge request on a reused connection, whatever the
    // server: HAProxy too).
    let url = format!("http://{}/h2?n=", sluice.addr);
    for n in 1..=2 {
        curl(&["--http2-prior-knowledge", &format!("{url}{n}")]).await;
        lines_once(&path, n).await;
    }
    let lines = lines_once(&path, 2).await;
    for (line, n) in lines.iter().zip(1..) {
        assert!(
            line.contains(&format!(
                " backend=b1 method=GET path=/h2?n={n} proto=HTTP/2 status=200 bytes_in=0 "
            )),
            "{lines:?}"
        );
    }
}
