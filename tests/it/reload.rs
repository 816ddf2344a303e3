//! Config reload: backends and listeners come and go, nothing that still
//! fits the config is touched, a broken file changes nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sluice::admin::api::BackendState;
use sluice::admin::client::ClientError;
use sluice::demo::EchoBackend;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::process::{Proc, TempDir};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A config file that tests rewrite and reload.
struct ConfigFile {
    dir: TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(name: &str) -> Self {
        let dir = TempDir::new(&format!("sluice-reload-{name}")).expect("temp dir");
        dir.write("admin.token", ADMIN_TOKEN).expect("token file");
        let path = dir.path().join("sluice.toml");
        Self { dir, path }
    }

    /// Writes a config: the admin API, listener `public` on a free port
    /// (`127.0.0.1:0`, which stays the same listener across reloads),
    /// `extra_listeners`, and pool `app` with `pool_settings` and
    /// `backends` (name, address, weight).
    fn write(&self, pool_settings: &str, backends: &[(&str, SocketAddr, u32)], extra: &str) {
        let mut text = String::from(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\n\
             [[listener]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n",
        );
        text.push_str(extra);
        text.push_str("\n[[pool]]\nname = \"app\"\n");
        text.push_str(pool_settings);
        for (name, addr, weight) in backends {
            text.push_str(&format!(
                "\n[[pool.backend]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\n"
            ));
        }
        self.dir.write("sluice.toml", &text).expect("write config");
    }

    async fn start(&self) -> Sluice {
        let cfg = sluice::config::load(&self.path).expect("valid config");
        Sluice::with_config(cfg).await
    }
}

fn named<'a>(backends: &'a [EchoBackend], names: &[&'a str]) -> Vec<(&'a str, SocketAddr, u32)> {
    names
        .iter()
        .map(|n| {
            let b = backends
                .iter()
                .find(|b| b.name == *n)
                .expect("a backend of that name");
            (*n, b.addr, 1)
        })
        .collect()
}

async fn reload(sluice: &Sluice) -> Result<sluice::admin::api::ReloadReport, ClientError> {
    within(10, "reload", sluice.admin().reload()).await
}

#[tokio::test]
async fn an_added_backend_ramps_up_and_the_pool_levels() {
    let backends = echo_backends(3).await;
    let file = ConfigFile::new("add");
    let settings = "slow_start = \"2s\"\n\
         rebalance = { interval = \"300ms\", tolerance = 0.2, min_excess = 1, max_shed_per_interval = 4 }\n\
         drain = { window = \"1s\" }\n";
    file.write(settings, &named(&backends, &["b1", "b2"]), "");
    let sluice = file.start().await;
    let stop = CancellationToken::new();
    let clients = chatters(&sluice, 24, Duration::from_millis(100), &stop);
    eventually(10, "clients on b1 and b2", || {
        backends[0].ws_open() == 12 && backends[1].ws_open() == 12
    })
    .await;

    file.write(settings, &named(&backends, &["b1", "b2", "b3"]), "");
    let report = reload(&sluice).await.expect("reload");
    assert_eq!(report.changes, ["added backend app/b3"]);
    assert_eq!(report.generation, 2);
    let b3 = sluice.backend_status("b3").await;
    assert_eq!(b3.state, BackendState::SlowStart, "{b3:?}");
    assert_eq!(sluice.status().await.config.expect("config").generation, 2);
    // The rebalancer moves clients over to the new backend, a few at a time.
    eventually(30, "the pool levels out over three backends", || {
        backends.iter().all(|b| (6..=10).contains(&b.ws_open()))
    })
    .await;
    let (_, totals) = finish_chat(&stop, clients).await;
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");
}

#[tokio::test]
async fn a_removed_backend_drains_over_the_window_then_is_forgotten() {
    let backends = echo_backends(3).await;
    let file = ConfigFile::new("remove");
    let window = Duration::from_secs(2);
    let settings = "rebalance = { enabled = false }\ndrain = { window = \"2s\" }\n";
    file.write(settings, &named(&backends, &["b1", "b2", "b3"]), "");
    let sluice = file.start().await;
    let stop = CancellationToken::new();
    let clients = chatters(&sluice, 30, Duration::from_millis(100), &stop);
    eventually(10, "ten clients each", || {
        backends.iter().all(|b| b.ws_open() == 10)
    })
    .await;
    let before: Vec<_> = backends[..2]
        .iter()
        .map(|b| {
            sluice.registry().pools()[0]
                .find(&b.name)
                .expect("backend")
                .id
        })
        .collect();

    file.write(settings, &named(&backends, &["b1", "b2"]), "");
    let started = Instant::now();
    let report = reload(&sluice).await.expect("reload");
    assert_eq!(report.changes, ["draining removed backend app/b3"]);
    let b3 = sluice.backend_status("b3").await;
    assert!(b3.removed, "{b3:?}");
    assert_eq!(b3.state, BackendState::Draining);
    // Gradually: a quarter into the window most of its clients are still there.
    tokio::time::sleep(window / 4).await;
    assert!(backends[2].ws_open() >= 5, "{}", backends[2].ws_open());
    eventually(10, "b3 is empty", || backends[2].ws_open() == 0).await;
    assert!(
        started.elapsed() >= window * 3 / 4,
        "{:?}",
        started.elapsed()
    );
    within(10, "b3 is forgotten", async {
        while sluice.status().await.backend("app", "b3").is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The backends that stayed are the same ones, with their clients.
    let after: Vec<_> = backends[..2]
        .iter()
        .map(|b| {
            sluice.registry().pools()[0]
                .find(&b.name)
                .expect("backend")
                .id
        })
        .collect();
    assert_eq!(before, after);
    let (stats, totals) = finish_chat(&stop, clients).await;
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");
    let codes: Vec<u16> = stats.iter().flat_map(|s| &s.closes).map(|c| c.0).collect();
    assert_eq!(codes.len(), 10, "only b3's clients were closed: {codes:?}");
    assert!(codes.iter().all(|&c| c == 1012), "{codes:?}");
    let times: Vec<Instant> = stats.iter().flat_map(|s| &s.closes).map(|c| c.1).collect();
    let spread = *times.iter().max().expect("closes") - *times.iter().min().expect("closes");
    assert!(spread >= window / 2, "closes spread over {spread:?}");
}

#[tokio::test]
async fn a_broken_file_is_refused_with_file_line_and_key_and_changes_nothing() {
    let backends = echo_backends(2).await;
    let file = ConfigFile::new("broken");
    file.write("", &named(&backends, &["b1"]), "");
    let sluice = file.start().await;
    let mut ws = sluice.ws("/ws").await;
    assert_eq!(greeting(&mut ws).await, "b1");

    // Line 13 of the file: the pool's first setting.
    file.write("algoritm = \"p2c\"\n", &named(&backends, &["b1", "b2"]), "");
    let expected = format!(
        "{}:13: pool \"app\": unknown key \"algoritm\"",
        file.path.display()
    );
    match reload(&sluice).await {
        Err(ClientError::Status { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.ends_with(&expected), "{message}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    let out = within(
        30,
        "ctl reload",
        tokio::process::Command::new(BIN)
            .env_remove("SLUICE_ADMIN")
            .env_remove("SLUICE_TOKEN")
            .args(["ctl", "--admin", &sluice.admin_addr().to_string()])
            .args(["--token", ADMIN_TOKEN, "reload"])
            .output(),
    )
    .await
    .expect("ctl runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&expected), "{stderr}");

    // Nothing changed: the same generation, b2 not added, the WebSocket open.
    let status = sluice.status().await;
    assert_eq!(status.config.as_ref().expect("config").generation, 1);
    assert!(status.backend("app", "b2").is_none());
    echo(&mut ws, Message::text("still here")).await;

    // A listener whose address is taken: refused before anything changed.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let extra = format!(
        "[[listener]]\nname = \"second\"\nbind = \"{}\"\npool = \"app\"\n",
        taken.local_addr().expect("addr")
    );
    file.write("", &named(&backends, &["b1", "b2"]), &extra);
    match reload(&sluice).await {
        Err(ClientError::Status { status, message }) => {
            assert_eq!(status, 400);
            assert!(
                message.contains("listener \"second\": binding 127.0.0.1:"),
                "{message}"
            );
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    assert!(sluice.status().await.backend("app", "b2").is_none());

    // The original file again: nothing to change, and it says so.
    file.write("", &named(&backends, &["b1"]), "");
    let report = reload(&sluice).await.expect("reload");
    assert!(report.changes.is_empty(), "{report:?}");
    assert_eq!(report.generation, 1);
    echo(&mut ws, Message::text("and still")).await;
}

#[tokio::test]
async fn listeners_open_and_close_with_a_reload() {
    let backends = echo_backends(1).await;
    let file = ConfigFile::new("listeners");
    let settings = "drain = { window = \"500ms\" }\n";
    file.write(settings, &named(&backends, &["b1"]), "");
    let sluice = file.start().await;
    let mut public = sluice.ws("/ws").await;
    assert_eq!(greeting(&mut public).await, "b1");

    let port = crate::support::process::free_port().expect("port");
    let second =
        format!("[[listener]]\nname = \"second\"\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\n");
    file.write(settings, &named(&backends, &["b1"]), &second);
    let report = reload(&sluice).await.expect("reload");
    assert_eq!(report.changes, ["added listener second"]);
    let running = sluice.running.as_ref().expect("running");
    let addr = running.addr("second").expect("second listener");
    let mut through_second = ws_connect(&format!("ws://{addr}/ws")).await;
    assert_eq!(greeting(&mut through_second).await, "b1");
    echo(&mut through_second, Message::text("hi")).await;

    file.write(settings, &named(&backends, &["b1"]), "");
    let report = reload(&sluice).await.expect("reload");
    assert_eq!(
        report.changes,
        ["removed listener second: stopped accepting, draining its connections"]
    );
    match within(5, "close 1012", through_second.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1012),
        other => panic!("expected Close 1012, got {other:?}"),
    }
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the removed listener's socket is closed"
    );
    assert!(running.addr("second").is_none());
    // The listener that stayed was not touched.
    echo(&mut public, Message::text("untouched")).await;
}

#[tokio::test]
async fn connections_hammered_through_reloads_never_fail() {
    let backends = echo_backends(3).await;
    let file = ConfigFile::new("hammer");
    let settings = "drain = { window = \"300ms\" }\n";
    file.write(settings, &named(&backends, &["b1", "b2"]), "");
    let sluice = file.start().await;
    let stop = CancellationToken::new();
    let (seen, workers) = hammer(sluice.url("/ws"), 4, &stop);
    let mut reloads = 0;
    for round in 0..12 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Backends join and leave, weights change, listeners come and go.
        let mut set = named(&backends, &["b1", "b2"]);
        if round % 2 == 0 {
            set.extend(named(&backends, &["b3"]));
        }
        set[0].2 = 1 + round % 3;
        let extra = if round % 4 == 1 {
            "[[listener]]\nname = \"extra\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n"
        } else {
            ""
        };
        file.write(settings, &set, extra);
        let report = reload(&sluice).await.expect("reload");
        assert!(!report.changes.is_empty(), "round {round}");
        reloads += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    for w in workers {
        within(10, "hammer worker", w).await.expect("worker");
    }
    let (ok, moved, failed) = (
        seen.ok.load(Ordering::Relaxed),
        seen.moved.load(Ordering::Relaxed),
        seen.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "hammer: {reloads} reloads, {ok} rounds ok, {moved} closed with 1012, {failed} failed, longest gap between connects {} ms",
        seen.longest_gap_us.load(Ordering::Relaxed) / 1000
    );
    assert_eq!(failed, 0);
    assert!(ok > 50, "{ok} rounds");
}

#[tokio::test]
async fn sighup_reloads_the_config_of_the_binary() {
    let _load = LoadShare::take().await;
    let backends = echo_backends(2).await;
    let dir = TempDir::new("sluice-reload-sighup").expect("temp dir");
    dir.write("admin.token", ADMIN_TOKEN).expect("token");
    let [port, admin_port] = crate::support::process::free_ports().expect("ports");
    let text = |set: &[(&str, SocketAddr, u32)]| {
        let mut text = format!(
            "[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_file = \"admin.token\"\n\
             [[listener]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\n\
             [[pool]]\nname = \"app\"\n"
        );
        for (name, addr, weight) in set {
            text.push_str(&format!(
                "[[pool.backend]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\n"
            ));
        }
        text
    };
    let path = dir
        .write("sluice.toml", &text(&named(&backends, &["b1"])))
        .expect("config");
    let proc = Proc(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts"),
    );
    let admin = sluice::admin::client::AdminClient {
        addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        token: Some(ADMIN_TOKEN.to_string()),
    };
    within(10, "sluice up", async {
        while admin.status().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut ws = ws_connect(&format!("ws://127.0.0.1:{port}/ws")).await;
    assert_eq!(greeting(&mut ws).await, "b1");

    let mut set = named(&backends, &["b1", "b2"]);
    set[0].2 = 3;
    dir.write("sluice.toml", &text(&set)).expect("config");
    crate::support::process::send_signal(proc.pid(), "HUP").expect("SIGHUP");
    let status = within(10, "generation 2", async {
        loop {
            let status = admin.status().await.expect("status");
            if status.config.as_ref().is_some_and(|c| c.generation == 2) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(status.backend("app", "b1").expect("b1").weight, 3);
    assert!(status.backend("app", "b2").is_some());
    echo(&mut ws, Message::text("across the reload")).await;
}

#[tokio::test]
async fn a_reload_changes_the_certificate_and_leaves_open_connections_alone() {
    use crate::tls::{tls_connect, write_cert};
    let backends = echo_backends(1).await;
    let file = ConfigFile::new("tls");
    let first = write_cert(file.dir.path(), "first", &["app.test"]);
    let second = write_cert(file.dir.path(), "second", &["app.test"]);
    let tls = |stem: &str| format!("tls = {{ cert = \"{stem}.pem\", key = \"{stem}.key\" }}\n");
    file.write("", &named(&backends, &["b1"]), &tls("first"));
    let sluice = file.start().await;
    let (stream, seen) = tls_connect(sluice.addr, "app.test").await;
    assert_eq!(seen, first);
    let (mut ws, _) = tokio_tungstenite::client_async("wss://app.test/ws", stream)
        .await
        .expect("upgrade");
    use futures_util::SinkExt as _;
    let hello = within(10, "greeting", ws.next()).await;
    assert!(matches!(hello, Some(Ok(Message::Text(_)))), "{hello:?}");

    file.write("", &named(&backends, &["b1"]), &tls("second"));
    let report = reload(&sluice).await.expect("reload");
    assert_eq!(report.changes, ["changed listener public: tls"]);
    assert_eq!(tls_connect(sluice.addr, "app.test").await.1, second);
    ws.send(Message::text("same connection"))
        .await
        .expect("send");
    let back = within(10, "echo", ws.next()).await;
    assert!(
        matches!(&back, Some(Ok(Message::Text(t))) if t.as_str() == "same connection"),
        "{back:?}"
    );

    // A certificate that does not load is refused, naming the file.
    file.write("", &named(&backends, &["b1"]), &tls("missing"));
    match reload(&sluice).await {
        Err(ClientError::Status { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.contains("missing.pem"), "{message}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    assert_eq!(tls_connect(sluice.addr, "app.test").await.1, second);
}
