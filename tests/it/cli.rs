//! The `sluice` binary: check, run + SIGTERM, demo.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use sluice::admin::api::{BackendState, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::process::{self, Proc, TempDir};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A config file with `text` in a directory of its own, removed with the
/// returned guard.
fn temp_file(name: &str, text: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(&format!("sluice-cli-{name}")).expect("temp dir");
    let path = dir.write("sluice.toml", text).expect("write config");
    (dir, path)
}

fn free_port() -> u16 {
    process::free_port().expect("free port")
}

fn wait_exit(proc: &mut Proc, secs: u64) -> std::process::ExitStatus {
    proc.wait_exit(Duration::from_secs(secs))
        .expect("wait")
        .unwrap_or_else(|| panic!("sluice did not exit within {secs}s"))
}

/// Runs `sluice check` on `path`.
fn check(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("runs")
}

#[test]
fn check_names_file_line_and_key_and_fails() {
    let (_path_dir, path) = temp_file(
        "bad",
        "[[listener]]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\n\n[[pool]]\nname = \"app\"\nalgoritm = \"least_conn\"\n\n[[pool.backend]]\nname = \"a\"\naddress = \"127.0.0.1:4000\"\n",
    );
    let out = check(&path);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:7: pool \"app\": unknown key \"algoritm\"",
        path.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");

    let (_good_dir, good) = temp_file(
        "good",
        &std::fs::read_to_string(&path)
            .expect("read")
            .replace("algoritm", "algorithm"),
    );
    let out = check(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let missing = check(std::path::Path::new("/nonexistent/sluice.toml"));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/sluice.toml"));
}

/// Start-up errors as a user sees them: each cause once, after the step
/// that failed.
#[test]
fn start_up_errors_print_each_cause_once() {
    let missing = check(std::path::Path::new("/nonexistent/sluice.toml"));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "sluice: reading /nonexistent/sluice.toml: No such file or directory (os error 2)\n"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let (_path_dir, path) = temp_file(
        "busy",
        &format!(
            "[admin]\nenabled = false\n\n[[listener]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\n\n[[pool]]\nname = \"app\"\n\n[[pool.backend]]\nname = \"a\"\naddress = \"127.0.0.1:4000\"\n"
        ),
    );
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env("SLUICE_LOG", "off")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "sluice: listener \"public\": binding 127.0.0.1:{port}: Address already in use (os error 98)\n"
        )
    );

    let (_path_dir, path) = temp_file(
        "ca",
        "[[listener]]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n[[pool]]\nname = \"app\"\n\n[[pool.backend]]\nname = \"a\"\naddress = \"127.0.0.1:4000\"\ntls = { ca = \"no-such-ca.pem\", server_name = \"a.test\" }\n",
    );
    let dir = path.parent().expect("dir").display().to_string();
    assert_eq!(
        String::from_utf8_lossy(&check(&path).stderr),
        format!(
            "sluice: {}:11: pool \"app\" backend \"a\" tls: key \"ca\": reading {dir}/no-such-ca.pem: No such file or directory (os error 2)\n",
            path.display()
        )
    );
}

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_finishes_http_and_exits_0() {
    // sluice and its backends run as processes here: a share of the
    // machine all the same (see `heavy`).
    let _load = LoadShare::take().await;
    let echo = echo_backends(1).await;
    let arrived = Arc::new(AtomicBool::new(false));
    let seen = arrived.clone();
    let slow = scripted_backend(Duration::from_millis(800), move |_| {
        seen.store(true, Ordering::SeqCst);
        Some(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslow!"[..])
    })
    .await;
    let (ws_port, http_port) = (free_port(), free_port());
    let text = format!(
        "shutdown_timeout = \"5s\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"ws\"\nbind = \"127.0.0.1:{ws_port}\"\npool = \"ws\"\n\
         [[listener]]\nname = \"api\"\nbind = \"127.0.0.1:{http_port}\"\npool = \"api\"\n\
         [[pool]]\nname = \"ws\"\n[[pool.backend]]\nname = \"echo\"\naddress = \"{}\"\n\
         [[pool]]\nname = \"api\"\n[[pool.backend]]\nname = \"slow\"\naddress = \"{slow}\"\n",
        echo[0].addr
    );
    let (_path_dir, path) = temp_file("term", &text);
    let mut proc = Proc(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::null())
            .spawn()
            .expect("starts"),
    );
    let ws_addr: SocketAddr = format!("127.0.0.1:{ws_port}").parse().expect("addr");
    let http_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().expect("addr");
    wait_listening(ws_addr).await;
    wait_listening(http_addr).await;

    let mut ws = ws_connect(&format!("ws://{ws_addr}/ws")).await;
    assert_eq!(greeting(&mut ws).await, "b1");
    let in_flight =
        tokio::spawn(async move { HttpClient::connect(http_addr).await.get("/slow").await });
    eventually(5, "the slow request reached its backend", || {
        arrived.load(Ordering::SeqCst)
    })
    .await;
    proc.sigterm().expect("kill");

    match within(5, "close 1001", ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected Close 1001, got {other:?}"),
    }
    while within(5, "close handshake", ws.next()).await.is_some() {}
    let reply = within(5, "in-flight request", in_flight)
        .await
        .expect("task");
    assert_eq!((reply.status, reply.text().as_str()), (200, "slow!"));
    let status = wait_exit(&mut proc, 5);
    assert_eq!(status.code(), Some(0));
    assert!(
        tokio::net::TcpStream::connect(ws_addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn demo_serves_the_page_and_websockets_through_sluice() {
    // sluice and its backends run as processes here: a share of the
    // machine all the same (see `heavy`).
    let _load = LoadShare::take().await;
    let port = free_port();
    let mut proc = Proc(
        Command::new(BIN)
            .args([
                "demo",
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--tls-bind",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts"),
    );
    let stdout = proc.0.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        let last = line.starts_with("Press Ctrl-C");
        lines.push(line);
        if last {
            break;
        }
    }
    // The rest of stdout is dropped here: sluice must keep running anyway.
    assert!(lines.iter().any(|l| l.contains("admin API:")), "{lines:?}");
    assert!(
        lines.iter().any(|l| l
            .trim()
            .starts_with("secure websocket:         wss://127.0.0.1:")),
        "{lines:?}"
    );
    let ws_url = lines
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("websocket endpoint:")
                .map(|u| u.trim().to_string())
        })
        .expect("websocket URL printed");
    assert_eq!(ws_url, format!("ws://127.0.0.1:{port}/ws"));
    assert_eq!(
        lines.iter().filter(|l| l.contains("backend demo-")).count(),
        3
    );

    let mut names = std::collections::HashSet::new();
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let mut ws = ws_connect(&ws_url).await;
        names.insert(greeting(&mut ws).await);
        echo(&mut ws, Message::text("hi")).await;
        sockets.push(ws);
    }
    assert_eq!(
        names.len(),
        3,
        "three sockets reach the three demo backends: {names:?}"
    );

    let mut page = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    page.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    within(5, "page", page.read_to_end(&mut out))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("new WebSocket("), "the page opens a socket");
    proc.sigterm().expect("kill");

    // Clients that answer the Close let sluice exit at once.
    for mut ws in sockets {
        match within(5, "close 1001", ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("expected Close 1001, got {other:?}"),
        }
        while within(5, "close handshake", ws.next()).await.is_some() {}
    }
    assert_eq!(wait_exit(&mut proc, 10).code(), Some(0));
}

#[tokio::test]
async fn demo_with_clients_and_a_rollout_runs_to_its_end_and_cuts_nothing() {
    let _load = LoadShare::take().await;
    let out = within(
        240,
        "sluice demo --clients 50 --rollout",
        tokio::process::Command::new(BIN)
            .args([
                "demo",
                "--bind",
                &format!("127.0.0.1:{}", free_port()),
                "--tls-bind",
                "127.0.0.1:0",
                "--clients",
                "50",
                "--rollout",
                "--window",
                "2s",
            ])
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("demo runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("  dashboard:                http://127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains("#token="),
        "the dashboard URL holds the token: {text}"
    );
    for i in 1..=3 {
        assert!(
            text.contains(&format!("[{i}/3] demo/demo-{i}: back in rotation")),
            "{text}"
        );
    }
    assert!(
        text.contains("rollout of demo done: 3 backends restarted"),
        "{text}"
    );
    let tally = text
        .lines()
        .find(|l| l.starts_with("50 chat clients: "))
        .expect("the tally");
    let number_before = |line: &str, what: &str| -> u64 {
        let at = line
            .find(what)
            .unwrap_or_else(|| panic!("{what} in {line}"));
        line[..at]
            .split_whitespace()
            .last()
            .and_then(|n| n.trim_start_matches('(').parse().ok())
            .expect("a number")
    };
    let sent = number_before(tally, " messages sent");
    assert!(sent >= 50 * 10, "{tally}");
    assert_eq!(number_before(tally, " echoed"), sent, "{tally}");
    assert_eq!(number_before(tally, " lost"), 0, "{tally}");
    let moves = text
        .lines()
        .find(|l| l.contains(" reconnects ("))
        .expect("the reconnect line");
    assert!(number_before(moves, " after a Close 1012") >= 50, "{moves}");
    assert_eq!(
        number_before(moves, " connections ended without a Close frame"),
        0,
        "{moves}"
    );
    assert!(
        moves.ends_with("so no message was cut in the middle"),
        "{moves}"
    );
}

#[tokio::test]
async fn ctl_reads_the_config_and_a_second_sigterm_closes_at_once() {
    // sluice and its backends run as processes here: a share of the
    // machine all the same (see `heavy`).
    let _load = LoadShare::take().await;
    let echo = echo_backends(1).await;
    let (port, admin_port) = (free_port(), free_port());
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_file = \"admin.token\"\n\
         [[listener]]\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\n\
         [[pool]]\nname = \"app\"\ndrain = {{ window = \"60s\" }}\n\
         [[pool.backend]]\nname = \"b1\"\naddress = \"{}\"\n",
        echo[0].addr
    );
    let (_path_dir, path) = temp_file("ctl-config", &text);
    std::fs::write(path.with_file_name("admin.token"), "s3cret\n").expect("token file");
    let mut proc = Proc(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(addr).await;
    wait_listening(format!("127.0.0.1:{admin_port}").parse().expect("addr")).await;

    let mut sockets = Vec::new();
    for _ in 0..10 {
        let mut ws = ws_connect(&format!("ws://{addr}/ws")).await;
        greeting(&mut ws).await;
        sockets.push(ws);
    }
    let out = Command::new(BIN)
        .args(["ctl", "--config"])
        .arg(&path)
        .arg("status")
        .output()
        .expect("ctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("app   b1       "));

    // First SIGTERM: closes spread over 60 s, so only the first comes soon.
    proc.sigterm().expect("kill");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = Command::new(BIN)
        .args(["ctl", "--config"])
        .arg(&path)
        .args(["status", "--json"])
        .output()
        .expect("ctl runs");
    let status: Status = serde_json::from_slice(&out.stdout).expect("json");
    let backend = &status.pools[0].backends[0];
    assert_eq!(backend.state, BackendState::Draining);
    assert_eq!(backend.drain.map(|d| d.planned), Some(10));
    assert_eq!(
        backend.drain.map(|d| d.closed),
        Some(1),
        "one close in the first 1.5 s of 60: {backend:?}"
    );
    // Second SIGTERM: everything closes now, with 1001.
    proc.sigterm().expect("kill");
    let mut closed = 0;
    for mut ws in sockets {
        match within(5, "close", ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
                closed += 1;
            }
            Some(Err(_)) | None => {} // one of the first closes, handshake already done
            other => panic!("expected Close 1001, got {other:?}"),
        }
        while within(5, "close handshake", ws.next()).await.is_some() {}
    }
    assert!(closed >= 8, "{closed} closes after the second SIGTERM");
    assert_eq!(wait_exit(&mut proc, 10).code(), Some(0));
}

#[test]
fn admin_on_a_public_address_needs_a_token() {
    let (_path_dir, path) = temp_file(
        "public-admin",
        "[admin]\nbind = \"0.0.0.0:9901\"\n[[listener]]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\n[[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"a\"\naddress = \"127.0.0.1:4000\"\n",
    );
    let out = check(&path);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            ":2: admin: key \"bind\": admin on non-loopback address 0.0.0.0:9901 needs a token_file"
        ),
        "{stderr}"
    );
}
