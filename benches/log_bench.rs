//! What the access log costs: the same workloads through two sluice
//! processes started from the release binary, one with `[log] access`
//! writing to a file and one without, measured in the same run.
//!
//! - HTTP/1.1 keep-alive: 50 connections, each a closed loop of GETs of a
//!   small answer (the demo backend's `/health`, 3 bytes), requests/s and
//!   proxy CPU per request (utime + stime from /proc);
//! - WebSocket echo: 100 WebSockets, 64-byte messages in a closed loop,
//!   messages/s and CPU per message;
//! - WebSocket churn: 20 workers in a loop of connect, upgrade, greeting,
//!   one echo, close (one access log line each), connections/s.
//!
//! Each workload runs in 3 rounds, the two processes' order alternating,
//! and the median is reported with the ratio logged / not logged. Both
//! processes run with `worker_threads = 1`; the backends and the clients
//! run in this process.
//!
//! `--baseline PATH` adds another sluice binary (an earlier build), run
//! without the log, measured in the same rounds as `base`, with the
//! ratio off / base.
//!
//! ```text
//! cargo bench --bench log_bench             # 5 s rounds
//! cargo bench --bench log_bench -- --quick  # 2 s rounds
//! cargo bench --bench log_bench -- --quick --baseline OLD/target/release/sluice
//! ```

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sluice::demo::EchoBackend;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

// Shared with the tests; each bench is a crate of its own.
#[allow(clippy::duplicate_mod)]
#[path = "../tests/support/process.rs"]
mod process;

use process::{Proc, TempDir, free_ports};

const ROUNDS: usize = 3;
const HTTP_CONNS: usize = 50;
const ECHO_CONNS: usize = 100;
const CHURN_WORKERS: usize = 20;
/// Upper bound on operations per client, whatever the duration.
const MAX_OPS: u64 = 10_000_000;
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let baseline = args
        .iter()
        .position(|a| a == "--baseline")
        .map(|i| args.get(i + 1).cloned().context("--baseline needs a path"))
        .transpose()?;
    let seconds = if quick { 2 } else { 5 };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(Duration::from_secs(seconds), baseline))
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    proc: Proc,
}

async fn run(duration: Duration, baseline: Option<String>) -> Result<()> {
    let mut backends = Vec::new();
    for i in 1..=3 {
        backends.push(EchoBackend::start(&format!("b{i}"), "127.0.0.1:0".parse()?).await?);
    }
    let dir = TempDir::new("log_bench")?;
    let log_path = dir.path().join("access.log");
    let mut targets = Vec::new();
    let current = env!("CARGO_BIN_EXE_sluice").to_string();
    let mut runs = vec![
        ("off", current.clone(), String::new()),
        (
            "logged",
            current,
            format!("[log]\naccess = \"{}\"\n", log_path.display()),
        ),
    ];
    if let Some(base) = baseline {
        runs.push(("base", base, String::new()));
    }
    for (name, program, log) in runs {
        let [port] = free_ports()?;
        let mut config = format!(
            "worker_threads = 1\n{log}[admin]\nenabled = false\n\
             [[listener]]\nname = \"bench\"\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\nmax_connections = 2000\n\
             [[pool]]\nname = \"app\"\n"
        );
        for b in &backends {
            config += &format!(
                "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
                b.name, b.addr
            );
        }
        let path = dir.write(&format!("{name}.toml"), &config)?;
        let proc = Proc(
            Command::new(&program)
                .args(["run", "--config"])
                .arg(&path)
                .env("SLUICE_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting sluice")?,
        );
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        wait_listening(addr).await?;
        targets.push(Target { name, addr, proc });
    }
    println!(
        "log_bench: {} s rounds, {ROUNDS} rounds, order alternating; sluice worker_threads = 1",
        duration.as_secs()
    );
    type Workload =
        fn(SocketAddr, Duration) -> futures_util::future::BoxFuture<'static, Result<u64>>;
    let workloads: [(&str, &str, Workload); 3] = [
        ("HTTP keep-alive GET", "req", |a, d| {
            Box::pin(http_load(a, d))
        }),
        ("WebSocket echo", "msg", |a, d| Box::pin(echo_load(a, d))),
        ("WebSocket churn", "conn", |a, d| Box::pin(churn_load(a, d))),
    ];
    for (title, unit, load) in workloads {
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        for round in 0..ROUNDS {
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                let t = &targets[i];
                let cpu_before = cpu_seconds(t.proc.pid())?;
                let started = Instant::now();
                let ops = load(t.addr, duration).await?;
                let elapsed = started.elapsed().as_secs_f64();
                let cpu = cpu_seconds(t.proc.pid())? - cpu_before;
                rates[i].push(ops as f64 / elapsed);
                cpus[i].push(cpu * 1e6 / ops.max(1) as f64);
            }
        }
        let medians: Vec<(f64, f64)> = rates
            .iter()
            .zip(&cpus)
            .map(|(r, c)| (median(r), median(c)))
            .collect();
        println!("\n{title}");
        for (t, (rate, cpu)) in targets.iter().zip(&medians) {
            println!(
                "  access log {:<7} {rate:>10.0} {unit}/s  {cpu:>6.2} µs CPU per {unit}",
                t.name
            );
        }
        println!(
            "  logged / off: {:.3}x {unit}/s, {:.3}x CPU per {unit}",
            medians[1].0 / medians[0].0,
            medians[1].1 / medians[0].1
        );
        if let Some(base) = medians.get(2) {
            println!(
                "  off / base:   {:.3}x {unit}/s, {:.3}x CPU per {unit}",
                medians[0].0 / base.0,
                medians[0].1 / base.1
            );
        }
    }
    let lines = std::fs::read_to_string(&log_path)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    println!("\naccess log lines written: {lines}");
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

async fn wait_listening(addr: SocketAddr) -> Result<()> {
    let started = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("sluice did not listen on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn timed<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .context("a step timed out")?
}

/// The operations the workers did, all together.
async fn total(tasks: Vec<tokio::task::JoinHandle<Result<u64>>>) -> Result<u64> {
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

async fn http_load(addr: SocketAddr, duration: Duration) -> Result<u64> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..HTTP_CONNS {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut done = 0u64;
            while Instant::now() < deadline && done < MAX_OPS {
                let req = hyper::Request::get("/health")
                    .header("host", "bench")
                    .body(Empty::<Bytes>::new())?;
                timed(async {
                    let resp = sender.send_request(req).await?;
                    resp.into_body().collect().await?;
                    Ok(())
                })
                .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    total(tasks).await
}

async fn echo_load(addr: SocketAddr, duration: Duration) -> Result<u64> {
    let url = format!("ws://{addr}/ws");
    let mut sockets = Vec::new();
    for _ in 0..ECHO_CONNS {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        ws.next().await.context("greeting")??;
        sockets.push(ws);
    }
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for mut ws in sockets {
        tasks.push(tokio::spawn(async move {
            let payload = Bytes::from(vec![7u8; 64]);
            let mut done = 0u64;
            while Instant::now() < deadline && done < MAX_OPS {
                timed(async {
                    ws.send(Message::Binary(payload.clone())).await?;
                    ws.next().await.context("echo")??;
                    Ok(())
                })
                .await?;
                done += 1;
            }
            let _ = ws.close(None).await;
            anyhow::Ok(done)
        }));
    }
    total(tasks).await
}

async fn churn_load(addr: SocketAddr, duration: Duration) -> Result<u64> {
    let url = format!("ws://{addr}/ws");
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..CHURN_WORKERS {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline && done < MAX_OPS {
                timed(async {
                    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
                    ws.next().await.context("greeting")??;
                    ws.send(Message::text("x")).await?;
                    ws.next().await.context("echo")??;
                    ws.close(None).await?;
                    while ws.next().await.is_some() {}
                    Ok(())
                })
                .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    total(tasks).await
}
