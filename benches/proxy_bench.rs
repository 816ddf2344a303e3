//! New connections per second with and without a PROXY header in front.
//!
//! Starts the release `sluice` binary single-threaded with two listeners
//! on one pool of three in-process echo backends: `plain`, and `proxied`
//! (`proxy_protocol = "v2"` from 127.0.0.1). 20 clients each loop for the
//! round's duration: TCP connect, (on `proxied`) a v2 header for a
//! different made-up client each time, one HTTP/1.1 GET with
//! `Connection: close`, read the whole answer, close. Rounds alternate
//! between the listeners (3 each, order rotating) and the median counts.
//!
//! ```text
//! cargo bench --bench proxy_bench             # 5 s rounds
//! cargo bench --bench proxy_bench -- --quick  # 2 s rounds
//! ```

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use sluice::demo::EchoBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// Shared with the tests; each bench is a crate of its own.
#[allow(clippy::duplicate_mod)]
#[path = "../tests/support/process.rs"]
mod process;

use process::{Proc, TempDir, free_ports};

const CLIENTS: usize = 20;
const ROUNDS: usize = 3;

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let seconds = if quick { 2 } else { 5 };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(run(Duration::from_secs(seconds)))
}

async fn run(duration: Duration) -> Result<()> {
    let mut backends = Vec::new();
    for i in 1..=3 {
        backends.push(EchoBackend::start(&format!("b{i}"), "127.0.0.1:0".parse()?).await?);
    }
    let dir = TempDir::new("proxy_bench")?;
    let [plain_port, proxied_port] = free_ports()?;
    let mut config = format!(
        "worker_threads = 1\n[admin]\nenabled = false\n\
         [[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:{plain_port}\"\npool = \"app\"\nmax_connections = 2000\n\
         [[listener]]\nname = \"proxied\"\nbind = \"127.0.0.1:{proxied_port}\"\npool = \"app\"\nmax_connections = 2000\n\
         proxy_protocol = \"v2\"\nproxy_protocol_from = [\"127.0.0.1\"]\n\
         [[pool]]\nname = \"app\"\n"
    );
    for b in &backends {
        config += &format!(
            "[[pool.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
            b.name, b.addr
        );
    }
    let path = dir.write("sluice.toml", &config)?;
    let sluice = Proc(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&path)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting sluice")?,
    );
    let plain: SocketAddr = format!("127.0.0.1:{plain_port}").parse()?;
    let proxied: SocketAddr = format!("127.0.0.1:{proxied_port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(proxied).await.is_err() {
        if Instant::now() > deadline {
            bail!("sluice did not start listening");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "proxy_bench: {CLIENTS} clients, new connection + GET + close, {} s rounds, {ROUNDS} per listener, sluice single-threaded (pid {})",
        duration.as_secs(),
        sluice.pid()
    );
    let mut rates = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS * 2 {
        let which = (round + round / 2) % 2;
        let (addr, header) = if which == 0 {
            (plain, false)
        } else {
            (proxied, true)
        };
        let rate = measure(addr, header, duration).await?;
        println!(
            "{}: round {}: {rate:.0} conns/s",
            ["plain", "proxied"][which],
            round / 2 + 1
        );
        rates[which].push(rate);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut rates[0]), median(&mut rates[1]));
    println!("plain.conns_per_s = {off:.0}");
    println!("proxied.conns_per_s = {on:.0}");
    println!("proxied_vs_plain = {:.3}", on / off);
    Ok(())
}

/// Connections per second through `addr` for `duration`.
async fn measure(addr: SocketAddr, header: bool, duration: Duration) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut buf = Vec::with_capacity(4096);
            while started.elapsed() < duration {
                let mut stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let mut request = Vec::with_capacity(128);
                if header {
                    let source = SocketAddr::from((
                        [198, 51, (client % 256) as u8, (done % 256) as u8],
                        40000,
                    ));
                    let bytes = ppp::v2::Builder::with_addresses(
                        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                        ppp::v2::Protocol::Stream,
                        (source, addr),
                    )
                    .build()?;
                    request.extend_from_slice(&bytes);
                }
                // One write, as an L4 balancer forwards header and data.
                request.extend_from_slice(
                    b"GET /x HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n",
                );
                stream.write_all(&request).await?;
                buf.clear();
                stream.read_to_end(&mut buf).await?;
                if !buf.starts_with(b"HTTP/1.1 200") {
                    bail!("unexpected answer: {}", String::from_utf8_lossy(&buf));
                }
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
