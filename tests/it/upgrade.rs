//! Binary upgrade with the real binary: the new process takes the
//! listening sockets over, the old one drains with 1012 and exits; a new
//! binary that fails leaves the old one serving.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use sluice::admin::api::Status;
use sluice::admin::client::{AdminClient, ClientError};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::process::{self, Proc, TempDir};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A sluice process started from `DIR/sluice`, a link to the test build
/// that a test may replace (an upgrade starts whatever is at that path).
struct Deployed {
    dir: TempDir,
    proc: Proc,
    port: u16,
    admin: AdminClient,
    /// Processes started by upgrades (children of the first), stopped on drop.
    later: Vec<u32>,
}

impl Deployed {
    /// Starts sluice with pool `app` of `backends`, `pool_settings`, and
    /// `top` at the top of the file; with `token` the admin token comes
    /// from a file, else it is generated (and read from the output).
    fn start(
        name: &str,
        backends: &[SocketAddr],
        pool_settings: &str,
        top: &str,
        token: bool,
    ) -> Self {
        Self::start_notifying(name, backends, pool_settings, top, token, None)
    }

    /// Like `start`, with `NOTIFY_SOCKET` set to `notify` (as systemd
    /// does for `Type=notify`).
    fn start_notifying(
        name: &str,
        backends: &[SocketAddr],
        pool_settings: &str,
        top: &str,
        token: bool,
        notify: Option<&Path>,
    ) -> Self {
        let dir = TempDir::new(&format!("sluice-upgrade-{name}")).expect("temp dir");
        std::os::unix::fs::symlink(BIN, dir.path().join("sluice")).expect("link");
        let [port, admin_port] = process::free_ports().expect("ports");
        let mut text = format!(
            "{top}\n[admin]\nbind = \"127.0.0.1:{admin_port}\"\n{}\n\
             [[listener]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\n\
             [[pool]]\nname = \"app\"\n{pool_settings}\n",
            if token {
                "token_file = \"admin.token\""
            } else {
                ""
            }
        );
        for (i, addr) in backends.iter().enumerate() {
            text.push_str(&format!(
                "[[pool.backend]]\nname = \"b{}\"\naddress = \"{addr}\"\n",
                i + 1
            ));
        }
        dir.write("admin.token", ADMIN_TOKEN).expect("token");
        let config = dir.write("sluice.toml", &text).expect("config");
        let mut cmd = Command::new(dir.path().join("sluice"));
        cmd.args(["run", "--config"])
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(socket) = notify {
            cmd.env("NOTIFY_SOCKET", socket);
        }
        let mut child = cmd.spawn().expect("starts");
        let stdout = child.stdout.take().expect("stdout");
        let proc = Proc(child);
        let token = if token {
            ADMIN_TOKEN.to_string()
        } else {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                let line = lines.next().expect("a token line").expect("stdout");
                if let Some(token) = line.trim().strip_prefix("admin token (generated):") {
                    break token.trim().to_string();
                }
            }
        };
        let admin = AdminClient {
            addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            token: Some(token),
        };
        Self {
            dir,
            proc,
            port,
            admin,
            later: Vec::new(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("sluice")
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    async fn status(&self) -> Status {
        within(10, "status", self.admin.status())
            .await
            .expect("status")
    }

    async fn wait_up(&self) {
        within(10, "sluice up", async {
            while self.admin.status().await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// `sluice ctl upgrade` against it.
    async fn ctl_upgrade(&mut self) -> std::process::Output {
        let out = within(
            60,
            "ctl upgrade",
            tokio::process::Command::new(BIN)
                .env_remove("SLUICE_ADMIN")
                .env_remove("SLUICE_TOKEN")
                .args(["ctl", "--admin", &self.admin.addr.to_string()])
                .args([
                    "--token",
                    self.admin.token.as_deref().unwrap_or_default(),
                    "upgrade",
                ])
                .output(),
        )
        .await
        .expect("ctl runs");
        if let Some(pid) = new_pid(&String::from_utf8_lossy(&out.stdout)) {
            self.later.push(pid);
        }
        out
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        for pid in &self.later {
            let _ = process::send_signal(*pid, "KILL");
        }
    }
}

/// The new process's pid in `ctl upgrade`'s output.
fn new_pid(stdout: &str) -> Option<u32> {
    stdout
        .strip_prefix("upgraded: process ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
}

#[tokio::test]
async fn an_upgrade_moves_every_websocket_over_gradually_and_refuses_no_connection() {
    let _heavy = heavy().await;
    const CLIENTS: usize = 500;
    let window = Duration::from_secs(4);
    let backends = echo_backends(3).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut sluice = Deployed::start(
        "move",
        &addrs,
        "drain = { window = \"4s\" }\nrebalance = { enabled = false }\n",
        "",
        true,
    );
    sluice.wait_up().await;
    let old_pid = sluice.proc.pid();
    let stop = CancellationToken::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(chat(sluice.url(), Duration::from_millis(500), stop.clone())))
        .collect();
    eventually(60, "every client connected", || {
        backends.iter().map(|b| b.ws_open()).sum::<usize>() == CLIENTS
    })
    .await;
    let hammer_stop = CancellationToken::new();
    let (seen, workers) = hammer(sluice.url(), 4, &hammer_stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let asked = Instant::now();
    let out = sluice.ctl_upgrade().await;
    let upgraded = Instant::now();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = new_pid(&stdout).expect("new pid");
    assert_ne!(new, old_pid);
    // Both processes while the old one drains, seen from the new one.
    let status = sluice.status().await;
    let pids: Vec<(u32, &str)> = status
        .processes
        .iter()
        .map(|p| (p.pid, p.role.as_str()))
        .collect();
    assert_eq!(
        pids,
        [(new, "serving"), (old_pid, "draining")],
        "{status:?}"
    );
    let out = within(
        30,
        "ctl status",
        tokio::process::Command::new(BIN)
            .env_remove("SLUICE_ADMIN")
            .env_remove("SLUICE_TOKEN")
            .args(["ctl", "--admin", &sluice.admin.addr.to_string()])
            .args(["--token", ADMIN_TOKEN, "status"])
            .output(),
    )
    .await
    .expect("ctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("process {new} serving: ")), "{text}");
    assert!(
        text.contains(&format!("process {old_pid} draining: ")),
        "{text}"
    );

    // The old process exits by itself once its window is over.
    let exit = within(30, "the old process exits", async {
        loop {
            if let Some(status) = sluice.proc.0.try_wait().expect("wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let lifetime = upgraded.elapsed();
    assert!(exit.success(), "{exit}");
    assert!(
        lifetime >= window * 3 / 4,
        "the old process lived {lifetime:?}"
    );
    eventually(30, "every client on the new process", || {
        backends.iter().map(|b| b.ws_open()).sum::<usize>() == CLIENTS
    })
    .await;
    within(10, "the new process sees them all", async {
        loop {
            let status = sluice.status().await;
            let ws: u64 = status.backends().map(|b| b.connections.ws).sum();
            if ws >= CLIENTS as u64 && status.processes.len() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    hammer_stop.cancel();
    for w in workers {
        within(10, "hammer worker", w).await.expect("worker");
    }
    let (stats, totals) = finish_chat(&stop, clients).await;
    let closes: Vec<(u16, Instant)> = stats.iter().flat_map(|s| s.closes.clone()).collect();
    eprintln!(
        "upgrade: {} clients, {} closes, lost {}, wrong {}, resent {}; old process lived {lifetime:?} for a {window:?} window; hammer {} ok, {} failed, longest gap between connects {} ms, {:?} during the handover ({:?})",
        CLIENTS,
        closes.len(),
        totals.lost,
        totals.wrong,
        totals.resent,
        seen.ok.load(Ordering::Relaxed),
        seen.failed.load(Ordering::Relaxed),
        seen.longest_gap_us.load(Ordering::Relaxed) / 1000,
        seen.longest_gap_within(asked, upgraded),
        upgraded - asked,
    );
    assert_eq!(
        seen.failed.load(Ordering::Relaxed),
        0,
        "refused or failed connections"
    );
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");
    assert_eq!(
        closes.len(),
        CLIENTS,
        "every old connection was closed once"
    );
    assert!(closes.iter().all(|c| c.0 == 1012), "all with 1012");
    // Spread over the window: no tenth holds more than 1.5 × its share.
    // As the clients saw them: each close waits for its quiet moment (up
    // to a second), so the spread is measured over what the closes took,
    // at least the window.
    let first = closes.iter().map(|c| c.1).min().expect("closes");
    let last = closes.iter().map(|c| c.1).max().expect("closes");
    let span = (last - first).max(window).as_secs_f64();
    let mut tenths = [0usize; 10];
    for (_, at) in &closes {
        let i = (at.duration_since(first).as_secs_f64() / span * 10.0) as usize;
        tenths[i.min(9)] += 1;
    }
    let share = CLIENTS as f64 / 10.0;
    assert!(
        tenths.iter().all(|&n| n as f64 <= 1.5 * share),
        "closes per tenth of {span:.2} s: {tenths:?}"
    );
}

#[tokio::test]
async fn a_failing_new_binary_leaves_the_old_process_serving() {
    let _load = LoadShare::take().await;
    let backends = echo_backends(2).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut sluice = Deployed::start(
        "fail",
        &addrs,
        "sticky = { cookie = \"PIN\" }\n",
        "upgrade_timeout = \"2s\"\n",
        false,
    );
    sluice.wait_up().await;
    let old_pid = sluice.proc.pid();
    let mut ws = ws_connect(&sluice.url()).await;
    let first = greeting(&mut ws).await;
    // A sticky cookie, signed with the key this process made up.
    let addr = SocketAddr::from(([127, 0, 0, 1], sluice.port));
    let reply = HttpClient::connect(addr).await.get("/").await;
    let cookie = reply
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a sticky cookie")
        .to_string();
    let pinned = reply.backend();

    // A binary that exits at once.
    let path = sluice.path();
    std::fs::remove_file(&path).expect("unlink");
    std::fs::write(&path, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n").expect("script");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let out = sluice.ctl_upgrade().await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("exited with exit status: 3 before it was ready; this process keeps serving"),
        "{stderr}"
    );
    echo(&mut ws, Message::text("still served")).await;

    // One that never gets ready: stopped after upgrade_timeout; a second
    // upgrade meanwhile is refused.
    std::fs::write(&path, "#!/bin/sh\nexec sleep 60\n").expect("script");
    let admin = sluice.admin.clone();
    let slow = tokio::spawn(async move { admin.upgrade().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    match within(10, "second upgrade", sluice.admin.upgrade()).await {
        Err(ClientError::Status { status, message }) => {
            assert_eq!(status, 409);
            assert_eq!(message, "an upgrade is already under way");
        }
        other => panic!("expected a 409, got {other:?}"),
    }
    match within(10, "slow upgrade", slow).await.expect("task") {
        Err(ClientError::Status { status, message }) => {
            assert_eq!(status, 500);
            assert!(
                message.contains("was not ready within 2s: stopped it"),
                "{message}"
            );
        }
        other => panic!("expected a 500, got {other:?}"),
    }
    assert_eq!(sluice.status().await.processes[0].pid, old_pid);
    echo(&mut ws, Message::text("and still")).await;

    // A client that hangs up on the upgrade does not leave it half done:
    // the slow child is still stopped at the timeout, and the next
    // upgrade (below) is not refused as under way.
    let admin = sluice.admin.clone();
    let hung_up = tokio::spawn(async move { admin.upgrade().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    hung_up.abort();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // The real binary again, by SIGUSR2 this time.
    std::fs::remove_file(&path).expect("unlink");
    std::os::unix::fs::symlink(BIN, &path).expect("link");
    process::send_signal(old_pid, "USR2").expect("SIGUSR2");
    match within(10, "close 1012", futures_util::StreamExt::next(&mut ws)).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1012),
        other => panic!("expected Close 1012, got {other:?}"),
    }
    let new = within(10, "the new process", async {
        loop {
            // The generated token still works: it was handed over too.
            if let Ok(status) = sluice.admin.status().await
                && status.processes[0].pid != old_pid
            {
                return status.processes[0].pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    sluice.later.push(new);
    let mut again = ws_connect(&sluice.url()).await;
    let _ = greeting(&mut again).await;
    let _ = first;
    // The cookie made by the old process still pins: the key was handed over.
    let mut http = HttpClient::connect(addr).await;
    let req = hyper::Request::get("/")
        .header("host", "sluice.test")
        .header("cookie", &cookie)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let reply = http.send(req).await;
    assert_eq!(reply.backend(), pinned);
    assert!(reply.headers.get("set-cookie").is_none(), "no new pin");
    within(15, "the old process exits", async {
        while alive(old_pid) && sluice.proc.0.try_wait().expect("wait").is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Reads notifications as systemd's notify socket does.
async fn next_notification(socket: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = within(10, "a notification", socket.recv(&mut buf))
        .await
        .expect("recv");
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[tokio::test]
async fn the_service_manager_hears_ready_reloading_and_the_new_main_pid() {
    let _load = LoadShare::take().await;
    let backends = echo_backends(1).await;
    let dir = TempDir::new("sluice-notify").expect("temp dir");
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).expect("notify socket");
    let mut sluice = Deployed::start_notifying(
        "notify",
        &[backends[0].addr],
        "drain = { window = \"1s\" }\n",
        "",
        true,
        Some(&path),
    );
    assert_eq!(next_notification(&socket).await, "READY=1\n");
    sluice.wait_up().await;
    let pid = sluice.proc.pid();

    process::send_signal(pid, "HUP").expect("SIGHUP");
    let reloading = next_notification(&socket).await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next_notification(&socket).await, "READY=1\n");

    let out = sluice.ctl_upgrade().await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = new_pid(&String::from_utf8_lossy(&out.stdout)).expect("new pid");
    // From the old (main) process: the new one is the main process now;
    // the new one does not claim readiness itself.
    assert_eq!(
        next_notification(&socket).await,
        format!("MAINPID={new}\nREADY=1\n")
    );
    within(10, "the old process exits", async {
        while sluice.proc.0.try_wait().expect("wait").is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The old process said nothing more (no STOPPING=1 for the service);
    // the new one says STOPPING=1 when it is stopped.
    process::send_signal(new, "TERM").expect("SIGTERM");
    assert_eq!(next_notification(&socket).await, "STOPPING=1\n");
}

#[tokio::test]
async fn after_two_upgrades_a_listener_removed_by_reload_is_closed() {
    let _load = LoadShare::take().await;
    let backends = echo_backends(1).await;
    let second = process::free_port().expect("port");
    let extra =
        format!("[[listener]]\nname = \"second\"\nbind = \"127.0.0.1:{second}\"\npool = \"app\"\n");
    let mut sluice = Deployed::start(
        "twice",
        &[backends[0].addr],
        "drain = { window = \"200ms\" }\n",
        &extra,
        true,
    );
    sluice.wait_up().await;
    let second_addr = SocketAddr::from(([127, 0, 0, 1], second));
    let mut previous = sluice.proc.pid();
    for round in 0..2 {
        let out = sluice.ctl_upgrade().await;
        assert!(
            out.status.success(),
            "upgrade {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let new = new_pid(&String::from_utf8_lossy(&out.stdout)).expect("pid");
        within(15, "the previous process exits", async {
            while alive(previous) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        previous = new;
        // Both listeners serve from the new process.
        let mut ws = ws_connect(&format!("ws://{second_addr}/ws")).await;
        assert_eq!(greeting(&mut ws).await, "b1");
        echo(&mut ws, Message::text("through second")).await;
    }
    let config = sluice.dir.path().join("sluice.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace(&extra, "")).expect("write");
    let report = within(10, "reload", sluice.admin.reload())
        .await
        .expect("reload");
    assert_eq!(
        report.changes,
        ["removed listener second: stopped accepting, draining its connections"]
    );
    // No process holds the socket any more: connecting is refused.
    within(5, "the port closes", async {
        while tokio::net::TcpStream::connect(second_addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut ws = ws_connect(&sluice.url()).await;
    assert_eq!(greeting(&mut ws).await, "b1");
    echo(&mut ws, Message::text("public still serves")).await;
}

/// Opens a WebSocket with `cookie` (if any): the backend it reached and
/// the sticky cookie it was given (if any).
async fn sticky_ws(url: &str, cookie: Option<&str>) -> (Ws, String, Option<String>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().expect("request");
    if let Some(c) = cookie {
        req.headers_mut()
            .insert("cookie", c.parse().expect("value"));
    }
    let (mut ws, resp) = within(10, "upgrade", tokio_tungstenite::connect_async(req))
        .await
        .expect("upgrade");
    let pin = sticky_pin(resp.headers());
    let backend = greeting(&mut ws).await;
    (ws, backend, pin)
}

#[tokio::test]
async fn sticky_clients_moved_by_an_upgrade_are_placed_afresh_by_the_new_process() {
    const CLIENTS: usize = 30;
    let backends = echo_backends(2).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let sluice = Deployed::start(
        "sticky",
        &addrs,
        "sticky = { cookie = \"SLUICE_AFFINITY\" }\n\
         drain = { window = \"1s\" }\nrebalance = { enabled = false }\n",
        "",
        true,
    );
    sluice.wait_up().await;
    // Every client pinned to b1: b2 is drained while they arrive, then
    // back in rotation (and nothing rebalances).
    within(10, "drain", sluice.admin.drain("app", "b2", None))
        .await
        .expect("drain");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (ws, backend, pin) = sticky_ws(&sluice.url(), None).await;
        assert_eq!(backend, "b1");
        clients.push((ws, pin.expect("a first pin")));
    }
    within(10, "undrain", sluice.admin.undrain("app", "b2"))
        .await
        .expect("undrain");

    let mut sluice = sluice;
    let out = sluice.ctl_upgrade().await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each client, closed by the old process (1012), comes back with its
    // cookie to the new one.
    let mut placed: HashMap<String, usize> = HashMap::new();
    let mut back = Vec::new();
    for (mut ws, pin) in clients {
        let code = within(10, "the old process closes it", async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => continue,
                    _ => break None,
                }
            }
        })
        .await;
        assert_eq!(code, Some(1012));
        let (ws, backend, new_pin) = sticky_ws(&sluice.url(), Some(&pin)).await;
        // Kept open: the new process places by its live counts.
        back.push(ws);
        let new_pin = new_pin.expect("a moved client gets a new pin");
        assert_ne!(new_pin, pin);
        *placed.entry(backend).or_default() += 1;
    }
    // Placed by least connections in the new process: level, not all back
    // on b1 as their old pins said.
    let on_b2 = placed.get("b2").copied().unwrap_or_default();
    assert!(
        (CLIENTS / 2 - 1..=CLIENTS / 2 + 1).contains(&on_b2),
        "{placed:?}"
    );
}

/// The members of `sluice:instances`, sorted.
async fn cluster_members(redis: &crate::support::redis::Redis) -> Vec<String> {
    let mut members: Vec<String> =
        ::redis::from_redis_value(redis.cmd(&["SMEMBERS", "sluice:instances"]).await)
            .expect("a set");
    members.sort();
    members
}

/// In cluster mode the old and the new process publish side by side, each
/// under its own pid, until the old one is gone; it then leaves the
/// cluster at once. An operator's drain under way when the upgrade begins
/// goes on in the new process: the drain lives in Redis.
#[tokio::test]
async fn an_upgrade_in_cluster_mode_hands_the_counts_and_the_drains_over() {
    use crate::support::redis::{Redis, redis_here};
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    const CLIENTS: usize = 30;
    let redis = Redis::start().await;
    let backends = echo_backends(3).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let top = format!(
        "[cluster]\nredis = \"{}\"\ninstance = \"lb-1\"\npublish_interval = \"200ms\"\n",
        redis.url()
    );
    let mut sluice = Deployed::start(
        "cluster",
        &addrs,
        "drain = { window = \"2s\" }\nrebalance = { enabled = false }\n",
        &top,
        true,
    );
    sluice.wait_up().await;
    let old_pid = sluice.proc.pid();
    let old = format!("lb-1#{old_pid}");
    within(10, "lb-1 in the cluster", async {
        while cluster_members(&redis).await != [old.clone()] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let stop = CancellationToken::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(chat(sluice.url(), Duration::from_millis(300), stop.clone())))
        .collect();
    eventually(30, "every client connected", || {
        backends.iter().map(|b| b.ws_open()).sum::<usize>() == CLIENTS
    })
    .await;
    // A long drain of b1, still under way after the upgrade.
    within(10, "drain b1", sluice.admin.drain("app", "b1", Some("60s")))
        .await
        .expect("drained");
    within(10, "the drain in Redis", async {
        loop {
            let drains: HashMap<String, String> =
                ::redis::from_redis_value(redis.cmd(&["HGETALL", "sluice:drains"]).await)
                    .expect("a hash");
            if drains.keys().any(|k| k.contains("b1")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let out = sluice.ctl_upgrade().await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid = new_pid(&stdout).expect("new pid");
    let new = format!("lb-1#{new_pid}");
    // Side by side while the old process drains (over 2 s).
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    within(5, "both processes in the cluster", async {
        while cluster_members(&redis).await != both {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The new process took the drain over from Redis, with what is left
    // of its window (it has no WebSocket of its own on b1: drained).
    let status = sluice.status().await;
    let b1 = status.backends().find(|b| b.name == "b1").expect("b1");
    assert!(
        ["draining", "drained"].contains(&b1.state.as_str())
            && b1.drain.as_ref().is_some_and(|d| d.window_ms > 50_000),
        "{status:?}"
    );

    within(30, "the old process exits", async {
        while sluice.proc.0.try_wait().expect("wait").is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Gone from the cluster at once, not after the TTL.
    assert_eq!(cluster_members(&redis).await, [new]);
    let key = format!("sluice:counts:{old}");
    let exists: i64 =
        ::redis::from_redis_value(redis.cmd(&["EXISTS", &key]).await).expect("a number");
    assert_eq!(exists, 0, "the old process's counts are gone");
    eventually(30, "every client back, none on b1", || {
        backends.iter().map(|b| b.ws_open()).sum::<usize>() == CLIENTS && backends[0].ws_open() == 0
    })
    .await;
    let (_, totals) = finish_chat(&stop, clients).await;
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");
}
