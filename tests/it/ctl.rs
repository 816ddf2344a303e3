//! `sluice ctl` against a running sluice, and a real rollout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use futures_util::future::join_all;
use sluice::admin::api::{self, BackendState};
use tokio_util::sync::CancellationToken;

use crate::support::process::TempDir;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

async fn ctl(sluice: &Sluice, args: &[&str]) -> Output {
    ctl_at(&sluice.admin_addr().to_string(), args).await
}

/// `sluice ctl --admin ADMIN --token TEST-TOKEN ARGS`, with no admin
/// settings from the environment.
async fn ctl_at(admin: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.kill_on_drop(true)
        .env_remove("SLUICE_ADMIN")
        .env_remove("SLUICE_TOKEN")
        .arg("ctl")
        .args(["--admin", admin, "--token", ADMIN_TOKEN])
        .args(args);
    within(60, "sluice ctl", cmd.output())
        .await
        .expect("ctl runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test]
async fn ctl_status_drain_wait_and_undrain() {
    let backends = echo_backends(2).await;
    let sluice = Sluice::start(&[&backends[0], &backends[1]]).await;
    let stop = CancellationToken::new();
    let clients = chatters(&sluice, 6, Duration::from_millis(100), &stop);
    eventually(10, "clients connected", || {
        backends[0].ws_open() == 3 && backends[1].ws_open() == 3
    })
    .await;

    let out = ctl(&sluice, &["status"]).await;
    assert!(out.status.success());
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("POOL  BACKEND  ADDRESS"), "{text}");
    assert!(
        lines[1].starts_with("app   b1       ")
            && lines[1].contains(" up ")
            && lines[1].contains(" 3 "),
        "{text}"
    );
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[3].starts_with("config generation 1 (built in), loaded "),
        "{text}"
    );

    let out = ctl(&sluice, &["status", "--json"]).await;
    let status: api::Status = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status.pools[0].backends[1].name, "b2");
    assert_eq!(status.pools[0].backends[0].connections.ws, 3);

    let out = ctl(&sluice, &["drain", "app/b1", "--window", "1s", "--wait"]).await;
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("app/b1: draining over 1.0s (3 connections)\n"),
        "{text}"
    );
    assert!(
        text.contains("app/b1: 0 connections left\napp/b1: drained\n"),
        "{text}"
    );
    assert_eq!(backends[0].ws_open(), 0);
    let b1 = sluice
        .wait_backend_state(5, "b1", BackendState::Drained)
        .await;
    assert_eq!(b1.drain.map(|d| d.window_ms), Some(1000));
    let text = stdout(&ctl(&sluice, &["status"]).await);
    let row = text.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("app   b1 ") && row.contains(" drained ") && row.contains(" 3/3 closed"),
        "{text}"
    );

    let out = ctl(&sluice, &["undrain", "app/b1"]).await;
    assert_eq!(stdout(&out), "app/b1: back in rotation\n");
    assert_eq!(sluice.backend_status("b1").await.state, BackendState::Up);
    stop.cancel();
    let stats: Vec<ChatStats> = join_all(clients)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    assert_eq!(stats.iter().map(|s| s.lost + s.wrong).sum::<u64>(), 0);
    assert!(stats.iter().map(|s| s.resent).sum::<u64>() <= 2);
}

#[tokio::test]
async fn ctl_reports_errors_and_reads_the_environment() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let out = within(
        20,
        "ctl",
        tokio::process::Command::new(BIN)
            .args(["ctl", "status"])
            .env("SLUICE_ADMIN", sluice.admin_addr().to_string())
            .env("SLUICE_TOKEN", ADMIN_TOKEN)
            .output(),
    )
    .await
    .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("app   b1"));

    for (args, message) in [
        (vec!["drain", "app"], "expected POOL/BACKEND"),
        (vec!["drain", "app/nope"], "404"),
        (vec!["undrain", "nope/b1"], "no pool named \"nope\""),
    ] {
        let out = ctl(&sluice, &args).await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
    let out = within(
        20,
        "ctl",
        tokio::process::Command::new(BIN)
            .args([
                "ctl",
                "--admin",
                &sluice.admin_addr().to_string(),
                "--token",
                "wrong",
                "status",
            ])
            .output(),
    )
    .await
    .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[tokio::test]
async fn ctl_takes_the_admin_address_as_an_http_url() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let admin = sluice.admin_addr();
    for url in [format!("http://{admin}"), format!("http://{admin}/")] {
        let out = ctl_at(&url, &["status"]).await;
        assert!(out.status.success(), "--admin {url}: {}", stderr(&out));
        assert!(stdout(&out).contains("app   b1"), "{}", stdout(&out));
    }
    let out = within(
        20,
        "ctl",
        tokio::process::Command::new(BIN)
            .args(["ctl", "undrain", "app/b1"])
            .env("SLUICE_ADMIN", format!("http://{admin}/"))
            .env("SLUICE_TOKEN", ADMIN_TOKEN)
            .output(),
    )
    .await
    .expect("runs");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "app/b1: back in rotation\n");
}

#[tokio::test]
async fn ctl_refuses_an_admin_address_it_cannot_use() {
    for (value, reason) in [
        (
            "https://127.0.0.1:9901",
            "the admin API speaks plain HTTP, not HTTPS",
        ),
        (
            "http://127.0.0.1:9901/api/v1/status",
            "a path is not allowed",
        ),
        ("garbage", "not an IP address and port"),
    ] {
        let out = ctl_at(value, &["status"]).await;
        assert!(!out.status.success(), "--admin {value} was accepted");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("invalid value '{value}' for '--admin <ADMIN>'"))
                && err.contains(&format!("admin address {value:?}: {reason}")),
            "--admin {value}: {err}"
        );
        let out = within(
            20,
            "ctl",
            tokio::process::Command::new(BIN)
                .args(["ctl", "status"])
                .env("SLUICE_ADMIN", value)
                .output(),
        )
        .await
        .expect("runs");
        assert!(!out.status.success(), "SLUICE_ADMIN={value} was accepted");
        let err = stderr(&out);
        assert!(
            err.starts_with(&format!(
                "sluice: reading SLUICE_ADMIN: admin address {value:?}: {reason}"
            )),
            "SLUICE_ADMIN={value}: {err}"
        );
    }
}

#[tokio::test]
async fn ctl_names_the_failed_step_and_its_cause_once() {
    // Port 1 on loopback: nothing listens there.
    let cause = std::net::TcpStream::connect("127.0.0.1:1")
        .expect_err("nothing listens on 127.0.0.1:1")
        .to_string();
    let out = ctl_at("127.0.0.1:1", &["status"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    // e.g. "sluice: connecting to the admin API at 127.0.0.1:1: Connection refused (os error 111)"
    assert_eq!(
        err,
        format!("sluice: connecting to the admin API at 127.0.0.1:1: {cause}\n")
    );
    assert_eq!(err.matches(&cause).count(), 1, "{err}");
}

/// Echo backends in processes of their own, restartable by a script.
struct BackendProcs {
    dir: TempDir,
    names: Vec<String>,
}

impl BackendProcs {
    fn start(names: &[&str], addrs: &[SocketAddr]) -> Self {
        let dir = TempDir::new("sluice-rollout").expect("temp dir");
        let script = "#!/bin/sh\n\
            # restart.sh NAME ADDRESS: stop the echo backend NAME and start it again.\n\
            dir=$(dirname \"$0\")\n\
            pid=$(cat \"$dir/$1.pid\")\n\
            kill \"$pid\"\n\
            while kill -0 \"$pid\" 2>/dev/null; do sleep 0.05; done\n\
            \"$SLUICE_BIN\" echo-backend --name \"$1\" --bind \"$2\" >/dev/null 2>&1 &\n\
            echo $! > \"$dir/$1.pid\"\n";
        std::fs::write(dir.join("restart.sh"), script).expect("script");
        for (name, addr) in names.iter().zip(addrs) {
            let mut child = Command::new(BIN)
                .args(["echo-backend", "--name", name, "--bind", &addr.to_string()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("backend starts");
            std::fs::write(dir.join(format!("{name}.pid")), child.id().to_string())
                .expect("pid file");
            // Reap it when the restart script stops it, so it does not
            // linger as a zombie that `kill -0` still finds.
            std::thread::spawn(move || child.wait());
        }
        Self {
            dir,
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn script(&self) -> PathBuf {
        self.dir.join("restart.sh")
    }

    fn pid(dir: &Path, name: &str) -> Option<String> {
        std::fs::read_to_string(dir.join(format!("{name}.pid")))
            .ok()
            .map(|s| s.trim().to_string())
    }
}

impl Drop for BackendProcs {
    fn drop(&mut self) {
        for name in &self.names {
            if let Some(pid) = Self::pid(&self.dir, name) {
                let _ = Command::new("kill").arg(&pid).status();
            }
        }
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

#[tokio::test]
async fn rollout_restarts_every_backend_without_losing_a_message() {
    // sluice and its backends run as processes here: a share of the
    // machine all the same (see `heavy`).
    let _load = LoadShare::take().await;
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let procs = BackendProcs::start(&["b1", "b2", "b3"], &addrs);
    for addr in &addrs {
        within(10, "backend up", async {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    // sluice's own health checks say when a restarted backend is back;
    // the rebalancer levels the pool before the next one.
    let mut cfg = config(&addrs);
    cfg.pools[0].health = Some(sluice::config::HealthConfig {
        path: Some("/health".into()),
        interval: Duration::from_millis(200),
        rise: 2,
        fall: 2,
        ..sluice::config::HealthConfig::default()
    });
    cfg.pools[0].rebalance.interval = Duration::from_millis(400);
    cfg.pools[0].rebalance.min_excess = 2;
    let sluice = Sluice::with_config(cfg).await;
    let stop = CancellationToken::new();
    const CLIENTS: usize = 60;
    let clients = chatters(&sluice, CLIENTS, Duration::from_millis(200), &stop);
    eventually(20, "clients connected", || {
        sluice.registry().ws_total() == CLIENTS
    })
    .await;
    let pids_before: Vec<_> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| BackendProcs::pid(&procs.dir, n))
        .collect();

    let exec = format!("sh {} {{backend}} {{address}}", procs.script().display());
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.kill_on_drop(true)
        .env("SLUICE_BIN", BIN)
        .args([
            "ctl",
            "--admin",
            &sluice.admin_addr().to_string(),
            "--token",
            ADMIN_TOKEN,
        ])
        .args([
            "rollout",
            "app",
            "--exec",
            &exec,
            "--window",
            "1s",
            "--balance-timeout",
            "20s",
        ]);
    let out = within(90, "rollout", cmd.output())
        .await
        .expect("rollout runs");
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "[1/3] app/b1: draining",
        "[1/3] app/b1: waiting until sluice sees it healthy",
        "[1/3] app/b1: pool is level",
        "[2/3] app/b2: back in rotation",
        "[2/3] app/b2: pool is level",
        "[3/3] app/b3: running sh",
        "[3/3] app/b3: pool is level",
    ] {
        assert!(text.contains(step), "missing {step:?} in\n{text}");
    }
    assert!(!text.contains("has no health checks"), "{text}");
    assert!(
        text.ends_with("rollout of app done: 3 backends restarted\n"),
        "{text}"
    );
    let pids_after: Vec<_> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| BackendProcs::pid(&procs.dir, n))
        .collect();
    for (before, after) in pids_before.iter().zip(&pids_after) {
        assert_ne!(before, after, "every backend process was replaced");
    }

    eventually(20, "everyone connected again", || {
        sluice.registry().ws_total() == CLIENTS
    })
    .await;
    for b in &sluice.registry().pools()[0].backends {
        assert_eq!(b.state().as_str(), "up");
    }
    let (stats, t) = finish_chat(&stop, clients).await;
    let (lost, wrong, closes, resent) = (t.lost, t.wrong, t.closes, t.resent);
    assert_eq!((lost, wrong), (0, 0));
    assert!(resent <= 5, "{resent} messages had to be sent again");
    assert!(
        closes >= CLIENTS,
        "every client was moved at least once: {closes} closes"
    );
    assert!(
        stats
            .iter()
            .flat_map(|s| &s.closes)
            .all(|(code, _)| *code == 1012)
    );
}
