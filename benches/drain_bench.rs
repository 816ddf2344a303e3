//! Drain benchmark: how a gradual drain spreads reconnects, against simply
//! killing the backend.
//!
//! Starts three echo backends in this process and the release `sluice`
//! binary in front of them (its own process: each proxied connection costs
//! it two file descriptors, and this process holds both other ends). N
//! clients (6,000 by default) each send a numbered message every second
//! and check its echo; a message not echoed when its connection ends is
//! sent again after reconnecting, and counted.
//!
//! 1. Drain: `POST .../backends/b1/drain` with the window (30 s by
//!    default). Reports the clients moved, Close frames per second (max vs
//!    mean over the window), messages that had to be sent again, cut
//!    messages, and the time until b1 was empty.
//! 2. Kill, for contrast: backend b2 drops every connection at once, as a
//!    crashed server would. Reports the same figures for its clients.
//!
//! Run: `cargo bench --bench drain_bench` (`-- --quick`: 600 clients, 5 s
//! window; `-- --conns N --window SECS --every MS`, the clients' message
//! interval, 1,000 ms by default; `--delay MIN-MAX`: the backends take
//! that many ms to answer each message, as an app answering requests
//! does; `SLUICE_BIN=PATH` runs another sluice build instead of this
//! one). `drain.resent_per_1000_closes` is the
//! rate of messages caught in a close (sent while sluice's Close was on its
//! way, so sent again after reconnecting).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::future::join_all;
use sluice::admin::client::AdminClient;
use tokio_util::sync::CancellationToken;

use support::process::{start_sluice, wait_until};
use support::{ChatStats, chat, echo_backends};

const TOKEN: &str = "drain-bench";
/// Clients opened at once.
const OPEN_BATCH: usize = 250;

struct Options {
    conns: usize,
    window: u64,
    /// Message interval of every client.
    every: Duration,
    /// The backends take this long to answer each message (at random).
    delay: (Duration, Duration),
}

fn options() -> Result<Options> {
    let mut opts = Options {
        conns: 6000,
        window: 30,
        every: Duration::from_secs(1),
        delay: (Duration::ZERO, Duration::ZERO),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bench" => {}
            "--quick" => {
                opts.conns = 600;
                opts.window = 5;
            }
            "--conns" => opts.conns = args.next().context("--conns needs a number")?.parse()?,
            "--window" => opts.window = args.next().context("--window needs seconds")?.parse()?,
            "--delay" => {
                let text = args.next().context("--delay needs MIN-MAX milliseconds")?;
                let (lo, hi) = text.split_once('-').unwrap_or((&text, &text));
                opts.delay = (
                    Duration::from_millis(lo.parse()?),
                    Duration::from_millis(hi.parse()?),
                );
            }
            "--every" => {
                let ms: u64 = args.next().context("--every needs milliseconds")?.parse()?;
                opts.every = Duration::from_millis(ms);
            }
            other => bail!(
                "unknown argument {other:?}; use --quick, --conns N, --window SECS, --every MS, --delay MIN-MAX"
            ),
        }
    }
    if opts.conns > 8000 {
        bail!(
            "at most 8,000 clients: this process holds two descriptors per client, and 20,000 is the limit"
        );
    }
    Ok(opts)
}

// Shared with the tests; each bench is a crate of its own.
#[allow(clippy::duplicate_mod)]
#[path = "../tests/support/process.rs"]
mod process;

use process::free_port;

fn main() -> Result<()> {
    let opts = options()?;
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(opts, limit))
}

async fn run(opts: Options, fd_limit: u64) -> Result<()> {
    println!(
        "drain_bench: {} clients (a message each per {:?}), drain window {} s, fd limit {fd_limit}",
        opts.conns, opts.every, opts.window
    );
    let backends = echo_backends(3).await;
    for b in &backends {
        b.set_reply_delay(opts.delay.0, opts.delay.1);
    }
    let dir = std::env::temp_dir().join(format!("sluice-drain-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (port, admin_port) = (free_port()?, free_port()?);
    std::fs::write(dir.join("token"), TOKEN)?;
    let mut config = format!(
        "[admin]\nbind = \"127.0.0.1:{admin_port}\"\ntoken_file = \"token\"\n\
         [[listener]]\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\nmax_connections = 9000\n\
         [[pool]]\nname = \"app\"\n"
    );
    for b in &backends {
        config += &format!(
            "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
            b.name, b.addr
        );
    }
    std::fs::write(dir.join("sluice.toml"), config)?;
    let _sluice = start_sluice(&dir.join("sluice.toml"), port).await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let admin = AdminClient {
        addr: format!("127.0.0.1:{admin_port}").parse()?,
        token: Some(TOKEN.to_string()),
    };

    let stop = CancellationToken::new();
    let url = format!("ws://{addr}/ws");
    let mut clients = Vec::new();
    let opened = Instant::now();
    while clients.len() < opts.conns {
        for _ in 0..OPEN_BATCH.min(opts.conns - clients.len()) {
            clients.push(tokio::spawn(chat(url.clone(), opts.every, stop.clone())));
        }
        wait_until(Duration::from_secs(30), || open(&backends) >= clients.len()).await?;
    }
    println!(
        "{} clients connected in {:.1} s: {:?}",
        opts.conns,
        opened.elapsed().as_secs_f64(),
        counts(&backends)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. Drain b1.
    let window = Duration::from_secs(opts.window);
    let drain_start = Instant::now();
    admin
        .drain("app", "b1", Some(&format!("{}s", opts.window)))
        .await?;
    wait_until(window + Duration::from_secs(60), || {
        backends[0].ws_open() == 0
    })
    .await?;
    let drained_after = drain_start.elapsed();
    wait_until(Duration::from_secs(30), || open(&backends) >= opts.conns).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drain_end = Instant::now();

    // 2. Kill b2 (b1 back in rotation first, as after a restart).
    admin.undrain("app", "b1").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let on_b2 = backends[1].ws_open();
    let kill_start = Instant::now();
    backends[1].kill();
    wait_until(Duration::from_secs(60), || {
        backends[0].ws_open() + backends[2].ws_open() >= opts.conns
    })
    .await?;
    let recovered_after = kill_start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let stats: Vec<ChatStats> = join_all(clients)
        .await
        .into_iter()
        .filter_map(|r| r.ok())
        .collect();

    let drain = Phase::measure(&stats, drain_start, drain_end);
    let kill = Phase::measure(&stats, kill_start, Instant::now());
    println!();
    println!(
        "                    | clients moved | closes 1012 | busiest second | mean per second | resent msgs | cut/wrong | empty after"
    );
    println!(
        "drain b1 over {:>3} s | {:>13} | {:>11} | {:>14} | {:>15.1} | {:>11} | {:>9} | {:>9.2} s",
        opts.window,
        drain.moved,
        drain.closes_1012,
        drain.busiest,
        drain.moved as f64 / opts.window as f64,
        drain.resent,
        drain.wrong,
        drained_after.as_secs_f64()
    );
    println!(
        "kill b2             | {:>13} | {:>11} | {:>14} | {:>15} | {:>11} | {:>9} | {:>9.2} s",
        on_b2,
        kill.closes_1012,
        kill.busiest,
        "-",
        kill.resent,
        kill.wrong,
        recovered_after.as_secs_f64()
    );
    println!();
    println!("drain.clients_moved = {}", drain.moved);
    println!("drain.busiest_second = {}", drain.busiest);
    println!(
        "drain.mean_per_second = {:.1}",
        drain.moved as f64 / opts.window as f64
    );
    println!("drain.resent = {}", drain.resent);
    println!(
        "drain.resent_per_1000_closes = {:.2}",
        drain.resent as f64 * 1000.0 / drain.closes_1012.max(1) as f64
    );
    println!("drain.wrong = {}", drain.wrong);
    println!("drain.empty_after_s = {:.2}", drained_after.as_secs_f64());
    println!("kill.clients_on_backend = {on_b2}");
    println!("kill.busiest_second = {}", kill.busiest);
    println!("kill.resent = {}", kill.resent);
    println!(
        "kill.all_reconnected_after_s = {:.2}",
        recovered_after.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// What the clients saw between two instants.
struct Phase {
    moved: usize,
    closes_1012: usize,
    busiest: usize,
    resent: u64,
    wrong: u64,
}

impl Phase {
    fn measure(stats: &[ChatStats], from: Instant, to: Instant) -> Self {
        let within = |t: &Instant| *t >= from && *t < to;
        let mut per_second = std::collections::HashMap::<u64, usize>::new();
        let mut moved = 0;
        for s in stats {
            let ends: Vec<&Instant> = s.disconnects.iter().filter(|t| within(t)).collect();
            if !ends.is_empty() {
                moved += 1;
            }
            for t in ends {
                *per_second
                    .entry(t.duration_since(from).as_secs())
                    .or_default() += 1;
            }
        }
        Self {
            moved,
            closes_1012: stats
                .iter()
                .flat_map(|s| &s.closes)
                .filter(|(code, t)| *code == 1012 && within(t))
                .count(),
            busiest: per_second.values().copied().max().unwrap_or(0),
            resent: stats
                .iter()
                .flat_map(|s| &s.resent_at)
                .filter(|t| within(t))
                .count() as u64,
            // Cut or mixed-up messages, over the whole run.
            wrong: stats.iter().map(|s| s.wrong).sum(),
        }
    }
}

fn open(backends: &[sluice::demo::EchoBackend]) -> usize {
    backends.iter().map(|b| b.ws_open()).sum()
}

fn counts(backends: &[sluice::demo::EchoBackend]) -> Vec<usize> {
    backends.iter().map(|b| b.ws_open()).collect()
}
