//! Cluster benchmark: what cluster mode costs Redis, how fast a drain
//! reaches the other instance, and how a skewed pool levels with two
//! instances against one.
//!
//! Starts a redis-server (Debian's package), three echo backends in this
//! process, and the release `sluice` binary twice (lb-1, lb-2, each its
//! own process, `publish_interval = "1s"`). N chat clients (9,000 by
//! default, half through each instance) send a message every 2 s.
//!
//! 1. Redis load: `total_commands_processed` over 10 s, per instance per
//!    second, with every client connected.
//! 2. Drain propagation, 5 times: a drain asked of lb-2 until lb-1's
//!    status shows the backend draining; the undrain asked of lb-1 until
//!    lb-2 shows it up again.
//! 3. Levelling: b3 drained (its clients move to b1 and b2), then
//!    undrained; the counts every second until every backend is within
//!    the tolerance, and the rebalancer's closes (1012 closes the clients
//!    saw). Then the same clients through one standalone sluice (no
//!    cluster), for comparison.
//!
//! Run: `cargo bench --bench cluster_bench` (`-- --quick`: 600 clients;
//! `-- --conns N`; `--interval SECS`, the rebalance interval, 2 by
//! default; `SLUICE_BIN=PATH` for another build).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::future::join_all;
use sluice::admin::api::BackendState;
use sluice::admin::client::AdminClient;
use tokio_util::sync::CancellationToken;

use support::process::{Proc, TempDir, free_port, start_sluice, wait_until};
use support::{ChatStats, chat, echo_backends};

const TOKEN: &str = "cluster-bench";
const OPEN_BATCH: usize = 250;
/// The rebalancer's most closes per interval in this benchmark.
const MAX_SHED: usize = 300;

fn main() -> Result<()> {
    let mut conns = 9000;
    let mut interval = 2;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => conns = 600,
            "--conns" => conns = args.next().context("--conns N")?.parse()?,
            "--interval" => interval = args.next().context("--interval SECS")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(conns, interval))
}

/// One sluice process and its admin API.
struct Instance {
    _proc: Proc,
    addr: SocketAddr,
    admin: AdminClient,
}

async fn start(
    dir: &TempDir,
    interval: u64,
    name: &str,
    redis: Option<&str>,
    backends: &[sluice::demo::EchoBackend],
) -> Result<Instance> {
    let (port, admin_port) = (free_port()?, free_port()?);
    dir.write("token", TOKEN)?;
    let mut text = format!(
        "[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_file = \"token\"\n\
         [[listener]]\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\nmax_connections = 10000\n\
         [[pool]]\nname = \"app\"\n\
         [pool.rebalance]\ninterval = \"{interval}s\"\nmax_shed_per_interval = {MAX_SHED}\n"
    );
    for b in backends {
        text += &format!(
            "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
            b.name, b.addr
        );
    }
    if let Some(url) = redis {
        text += &format!(
            "[cluster]\nredis = \"{url}\"\ninstance = \"{name}\"\npublish_interval = \"1s\"\n"
        );
    }
    let path = dir.write(&format!("{name}.toml"), &text)?;
    let proc = start_sluice(&path, port)
        .await
        .with_context(|| format!("starting {name}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    Ok(Instance {
        _proc: proc,
        addr,
        admin: AdminClient {
            addr: format!("127.0.0.1:{admin_port}").parse()?,
            token: Some(TOKEN.to_string()),
        },
    })
}

fn counts(backends: &[sluice::demo::EchoBackend]) -> Vec<usize> {
    backends.iter().map(|b| b.ws_open()).collect()
}

/// `n` chat clients spread over `through`, opened in batches.
async fn open(
    through: &[&Instance],
    n: usize,
    backends: &[sluice::demo::EchoBackend],
    stop: &CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<ChatStats>>> {
    let mut clients = Vec::with_capacity(n);
    let base: usize = counts(backends).iter().sum();
    while clients.len() < n {
        for _ in 0..OPEN_BATCH.min(n - clients.len()) {
            let via = through[clients.len() % through.len()];
            let url = format!("ws://{}/ws", via.addr);
            clients.push(tokio::spawn(chat(
                url,
                Duration::from_secs(2),
                stop.clone(),
            )));
        }
        let want = base + clients.len();
        wait_until(Duration::from_secs(60), || {
            counts(backends).iter().sum::<usize>() >= want
        })
        .await?;
    }
    Ok(clients)
}

async fn state_of(admin: &AdminClient, backend: &str) -> Result<BackendState> {
    let status = admin.status().await?;
    Ok(status
        .backend("app", backend)
        .context("no such backend")?
        .state)
}

/// Polls `admin` until `backend` is in one of `states`.
async fn until_state(
    admin: &AdminClient,
    backend: &str,
    states: &[BackendState],
) -> Result<Duration> {
    let started = Instant::now();
    while !states.contains(&state_of(admin, backend).await?) {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("{backend} never reached {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(started.elapsed())
}

fn commands(info: redis::Value) -> u64 {
    let text = match info {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).to_string(),
        redis::Value::VerbatimString { text, .. } => text,
        _ => String::new(),
    };
    text.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Skews the pool (b3 drained through `admin`, its clients moved), puts
/// b3 back and follows the counts each second until level. Returns the
/// curve, the time, and the clients the rebalancer moved (each one a new
/// connection to a backend).
async fn level(
    interval: u64,
    admin: &AdminClient,
    backends: &[sluice::demo::EchoBackend],
    total: usize,
) -> Result<(Vec<Vec<usize>>, Duration, usize)> {
    admin.drain("app", "b3", Some("0s")).await?;
    wait_until(Duration::from_secs(60), || {
        let c = counts(backends);
        c[2] == 0 && c.iter().sum::<usize>() >= total
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    admin.undrain("app", "b3").await?;
    let started = Instant::now();
    let std_started = std::time::Instant::now();
    let share = total as f64 / 3.0;
    let mut curve = vec![counts(backends)];
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = counts(backends);
        curve.push(c.clone());
        // The rebalancer's default tolerance: 20 % of the share.
        if c.iter().all(|&n| (n as f64 - share).abs() <= 0.2 * share) {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("not level after 600 s: {curve:?}");
        }
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(interval * 2)).await;
    let moved = backends
        .iter()
        .map(|b| b.accepted_since(std_started).len())
        .sum();
    Ok((curve, took, moved))
}

async fn run(conns: usize, interval: u64) -> Result<()> {
    let installed = Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        bail!("cluster_bench needs redis-server (Debian package redis-server)");
    }
    println!(
        "cluster_bench: {conns} clients (a message each per 2 s), 3 backends, rebalance every {interval} s (at most {MAX_SHED} closes)"
    );
    let redis = support::redis::Redis::start().await;
    let backends = echo_backends(3).await;
    let dir = TempDir::new("cluster-bench")?;
    let url = redis.url();
    let lb1 = start(&dir, interval, "lb-1", Some(&url), &backends).await?;
    let lb2 = start(&dir, interval, "lb-2", Some(&url), &backends).await?;
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;

    let stop = CancellationToken::new();
    let opened = Instant::now();
    let clients = open(&[&lb1, &lb2], conns, &backends, &stop).await?;
    println!(
        "{conns} clients through lb-1 and lb-2 in {:.1} s: {:?}",
        opened.elapsed().as_secs_f64(),
        counts(&backends)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. Redis load.
    let info = || redis::cmd("INFO").arg("stats").clone();
    let before = commands(info().query_async(&mut conn).await?);
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = commands(info().query_async(&mut conn).await?);
    // Minus this benchmark's own INFO.
    let per_instance = (after - before - 1) as f64 / measured.elapsed().as_secs_f64() / 2.0;
    println!("redis.commands_per_s_per_instance = {per_instance:.1}");

    // 2. Drain propagation.
    let mut reached = Vec::new();
    let mut undone = Vec::new();
    for _ in 0..5 {
        lb2.admin.drain("app", "b1", Some("30s")).await?;
        reached.push(
            until_state(
                &lb1.admin,
                "b1",
                &[BackendState::Draining, BackendState::Drained],
            )
            .await?,
        );
        lb1.admin.undrain("app", "b1").await?;
        undone.push(until_state(&lb2.admin, "b1", &[BackendState::Up]).await?);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ms = |d: &[Duration]| -> Vec<String> {
        d.iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
            .collect()
    };
    println!("drain.reached_other_ms = {:?}", ms(&reached));
    println!("undrain.reached_other_ms = {:?}", ms(&undone));
    wait_until(Duration::from_secs(60), || {
        counts(&backends).iter().sum::<usize>() >= conns
    })
    .await?;

    // 3. Levelling with two instances.
    let (curve2, took2, shed2) = level(interval, &lb1.admin, &backends, conns).await?;
    println!(
        "two instances: level after {:.0} s, {shed2} closes; counts per second: {curve2:?}",
        took2.as_secs_f64()
    );
    stop.cancel();
    let _ = join_all(clients).await;
    drop((lb1, lb2));
    wait_until(Duration::from_secs(30), || {
        counts(&backends).iter().sum::<usize>() == 0
    })
    .await?;

    // The same through one standalone instance.
    let alone = start(&dir, interval, "alone", None, &backends).await?;
    let stop = CancellationToken::new();
    let clients = open(&[&alone], conns, &backends, &stop).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (curve1, took1, shed1) = level(interval, &alone.admin, &backends, conns).await?;
    println!(
        "one instance: level after {:.0} s, {shed1} closes; counts per second: {curve1:?}",
        took1.as_secs_f64()
    );
    stop.cancel();
    let _ = join_all(clients).await;
    let moves = conns / 3 - (0.2 * conns as f64 / 3.0) as usize;
    println!("level.min_moves_into_tolerance = {moves}");
    println!("level.two_instances_s = {:.0}", took2.as_secs_f64());
    println!("level.two_instances_closes = {shed2}");
    println!("level.one_instance_s = {:.0}", took1.as_secs_f64());
    println!("level.one_instance_closes = {shed1}");
    Ok(())
}
