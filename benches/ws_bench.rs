//! WebSocket benchmark: sluice's memory per idle WebSocket and its echo
//! throughput, next to a direct connection and (when installed) HAProxy and
//! nginx.
//!
//! What it does, all on loopback:
//!
//! 1. Starts three `sluice::demo::EchoBackend`s in this process. Each
//!    WebSocket gets `connected to NAME` first, then every message back.
//! 2. Echo throughput directly to the backends (round robin over the three):
//!    100 WebSockets, each sending a 64-byte binary message and waiting for
//!    its echo, in a loop, for 10 s (3 s with `--quick`).
//! 3. For sluice (the release binary, `sluice run --config FILE`, with
//!    `worker_threads = 1`), then HAProxy (`nbthread 1`) and nginx
//!    (`worker_processes 1`) if `haproxy`/`nginx` are on PATH, each on its
//!    own free port with a generated config:
//!    - memory: the proxy's RSS (VmRSS; for nginx master + workers) with no
//!      connection, after 2,000 and 8,000 idle proxied WebSockets (each has
//!      read its greeting, so the tunnel is up), and 3 s after closing them
//!      all; KiB per connection = (RSS at N - RSS at 0) / N;
//!    - the same echo throughput as step 2, through the proxy, and its
//!      ratio to the direct figure. Echo runs in 3 rounds over all
//!      targets (direct and every proxy, order rotating each round) and
//!      the median of each is reported, with min..max.
//! 4. New wss connections per second: every proxy also has a TLS listener
//!    (one self-signed certificate for `localhost` and 127.0.0.1, generated
//!    at start). 20 clients, each in a loop for the echo duration: TCP
//!    connect, a full TLS handshake (rustls, no session resumption), the
//!    WebSocket upgrade, the backend's greeting, one 64-byte echo, close.
//!    3 rounds of their own over the proxies (order rotating), median
//!    reported; failed connections are counted, not fatal.
//!
//! 5. HTTP/2, over the same TLS listeners (ALPN h2; `benches/h2/`): GETs
//!    on 4 h2 connections x 25 streams in a closed loop (requests/s, p99,
//!    proxy CPU per request); WebSocket echo over h2 (RFC 8441; sluice
//!    and HAProxy) next to the same over TLS HTTP/1.1 (100 WebSockets
//!    each, msg/s and p99); 3 rounds, order rotating, medians. Then
//!    sluice's KiB per idle WebSocket over h2 (100 per connection) and
//!    over wss, 800 each.
//!
//! The client load and the backends run on a multi-thread tokio runtime in
//! this process. A process may hold at most 20,000 file descriptors here and
//! this process holds both ends of every proxied connection it makes (client
//! and backend side), so it never opens more than 8,000 WebSockets at once.
//!
//! Run:
//!
//! ```text
//! cargo bench --bench ws_bench                  # 10 s echo runs, 2,000 and 8,000 idle WebSockets
//! cargo bench --bench ws_bench -- --quick       # 3 s echo runs, 2,000 idle WebSockets
//! cargo bench --bench ws_bench -- --seconds 20  # longer echo runs
//! cargo bench --bench ws_bench -- --only sluice  # skip HAProxy and nginx
//! cargo bench --bench ws_bench -- --quick --only sluice,sluice-base \
//!     --baseline OLD/target/release/sluice      # this build against an older one
//! ```
//!
//! Every process it starts is stopped by PID at the end (and on errors).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt, stream};
use rustls::pki_types::{CertificateDer, ServerName};
use sluice::demo::EchoBackend;

// Shared with the tests; each bench is a crate of its own.
#[path = "h2/mod.rs"]
mod h2;
#[allow(clippy::duplicate_mod)]
#[path = "../tests/support/process.rs"]
mod process;
#[path = "proxies/mod.rs"]
mod proxies;

use process::{TempDir, free_ports};
use proxies::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Idle WebSocket counts at which the proxy's RSS is read.
const MEMORY_STEPS: [usize; 2] = [2_000, 8_000];
/// Hard cap: this process holds two descriptors per proxied WebSocket.
const MAX_CONNS: usize = 8_000;
const QUICK_MAX_CONNS: usize = 2_000;
const DEFAULT_SECONDS: u64 = 10;
const QUICK_SECONDS: u64 = 3;
const MAX_SECONDS: u64 = 600;
/// WebSockets opened (or closed) at once.
const OPEN_CONCURRENCY: usize = 200;
/// WebSockets in the echo throughput test.
const ECHO_CONNS: usize = 100;
const ECHO_PAYLOAD: usize = 64;
/// Echo measurements per target; the median is reported.
const ECHO_ROUNDS: usize = 3;
/// Upper bound on round trips per echo connection, whatever the duration.
const MAX_ROUND_TRIPS: u64 = 100_000_000;
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause before reading RSS after opening connections: longer than
/// sluice's trim interval (src/trim.rs), so every proxy is read at rest.
const SETTLE: Duration = Duration::from_secs(3);
/// Pause before reading RSS after closing every connection.
const AFTER_CLOSE: Duration = Duration::from_secs(3);
const BACKENDS: usize = 3;
/// Concurrent clients in the TLS connection-rate test.
const TLS_CLIENTS: usize = 20;
/// TLS connection-rate measurements per proxy; the median is reported.
const TLS_ROUNDS: usize = 3;
/// Upper bound on connections per TLS client, whatever the duration.
const MAX_TLS_CONNS_PER_CLIENT: u64 = 10_000_000;
/// Limit on each step of a TLS connection (connect, handshake, upgrade, greeting).
const TLS_STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed TLS connection, so a failing proxy is not spun on.
const TLS_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// The name the TLS clients ask for (the certificate also covers 127.0.0.1).
const TLS_SERVER_NAME: &str = "localhost";
const WSS_URL: &str = "wss://localhost/ws";

fn main() -> Result<()> {
    let fd_limit =
        rlimit::increase_nofile_limit(u64::MAX).context("raising the open file limit")?;
    let opts = Options::parse(std::env::args().skip(1))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(&opts, fd_limit))
}

/// Command-line options (after `cargo bench --bench ws_bench --`).
struct Options {
    quick: bool,
    seconds: u64,
    max_conns: usize,
    /// Benchmark only these proxies (sluice, sluice-base, haproxy, nginx).
    only: Option<Vec<String>>,
}

impl Options {
    const USAGE: &str = "usage: cargo bench --bench ws_bench [-- [--quick] [--seconds N] [--only NAME,...] [--baseline PATH]]\n  NAME: sluice, sluice-base, haproxy, nginx; --baseline: another sluice binary, measured as sluice-base";

    fn parse(args: impl IntoIterator<Item = String>) -> Result<Self> {
        let mut quick = false;
        let mut seconds = None;
        let mut only = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--only" => {
                    let names = args.next().context("--only needs proxy names")?;
                    only = Some(names.split(',').map(str::to_string).collect());
                }
                "--baseline" => set_baseline(args.next())?,
                "--seconds" => {
                    let value = args.next().context("--seconds needs a value")?;
                    let n: u64 = value
                        .parse()
                        .with_context(|| format!("--seconds {value:?}: not a whole number"))?;
                    ensure!(
                        (1..=MAX_SECONDS).contains(&n),
                        "--seconds must be 1..={MAX_SECONDS}"
                    );
                    seconds = Some(n);
                }
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                "-h" | "--help" => {
                    println!("{}", Self::USAGE);
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{}", Self::USAGE),
            }
        }
        let default_seconds = if quick {
            QUICK_SECONDS
        } else {
            DEFAULT_SECONDS
        };
        Ok(Self {
            quick,
            seconds: seconds.unwrap_or(default_seconds),
            max_conns: if quick { QUICK_MAX_CONNS } else { MAX_CONNS },
            only,
        })
    }

    fn memory_steps(&self) -> Vec<usize> {
        MEMORY_STEPS
            .into_iter()
            .filter(|&n| n <= self.max_conns)
            .collect()
    }

    fn echo_duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }
}

async fn run(opts: &Options, fd_limit: u64) -> Result<()> {
    println!(
        "ws_bench: mode {}, echo {} conns x {} B for {} s, idle steps {:?}, {} cores, fd limit {}",
        if opts.quick { "quick" } else { "full" },
        ECHO_CONNS,
        ECHO_PAYLOAD,
        opts.seconds,
        opts.memory_steps(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        fd_limit,
    );
    println!(
        "ws_bench: TLS: {TLS_CLIENTS} clients opening new wss connections (full handshake, greeting, one {ECHO_PAYLOAD} B echo, close) for {} s, {TLS_ROUNDS} rounds",
        opts.seconds,
    );
    let backends = start_backends().await?;
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = TempDir::new("ws_bench").context("creating a temp dir")?;
    let cert = Cert::generate(dir.path())?;

    // Memory: one proxy at a time; each stays up (idle) for the echo rounds.
    let mut started = Vec::new();
    for kind in ProxyKind::ALL {
        if opts
            .only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|n| n == kind.name()))
        {
            continue;
        }
        if !kind.is_available() {
            println!(
                "{}: skipped ({} is not on PATH)",
                kind.name(),
                kind.program()
            );
            continue;
        }
        let (proxy, addr, tls_addr, memory) =
            start_and_measure_memory(kind, &backend_addrs, &backends, dir.path(), &cert, opts)
                .await
                .with_context(|| format!("benchmarking {}", kind.name()))?;
        started.push((kind, proxy, addr, tls_addr, memory));
    }

    // Echo: rounds over every target, in a rotating order, so that noise
    // from the shared machine falls on all of them alike; the median counts.
    let mut targets: Vec<(String, Vec<String>)> = vec![(
        "direct".into(),
        backend_addrs.iter().map(|a| ws_url(*a)).collect(),
    )];
    targets.extend(
        started
            .iter()
            .map(|(kind, _, addr, _, _)| (kind.name().to_string(), vec![ws_url(*addr)])),
    );
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut cpu_samples: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..ECHO_ROUNDS {
        for k in 0..targets.len() {
            let t = (k + round) % targets.len();
            let (name, urls) = &targets[t];
            // Target 0 is direct; the others are the started proxies in order.
            let proxy = t.checked_sub(1).map(|i| &started[i].1);
            let ticks_before = proxy.map(Proc::cpu_ticks);
            let rate = measure_echo(urls, opts.echo_duration())
                .await
                .with_context(|| format!("echo through {name}"))?;
            let messages = rate * opts.echo_duration().as_secs_f64();
            let cpu_us_per_msg = proxy.zip(ticks_before).map(|(p, before)| {
                (p.cpu_ticks().saturating_sub(before)) as f64 / CLOCK_TICKS_PER_S * 1e6
                    / messages.max(1.0)
            });
            match cpu_us_per_msg {
                Some(us) => {
                    println!(
                        "{name}: round {}: {rate:.0} msg/s, {us:.2} us of proxy CPU per message",
                        round + 1
                    );
                    cpu_samples[t].push(us);
                }
                None => println!("{name}: round {}: {rate:.0} msg/s", round + 1),
            }
            samples[t].push(rate);
        }
    }

    // TLS: new wss connections per second, in rounds of their own over the
    // proxies (rotating order, as for echo); the median counts.
    let connector = TlsConnector::from(tls_client_config(&cert.der, &[b"http/1.1"])?);
    let mut tls_samples: Vec<Vec<f64>> = vec![Vec::new(); started.len()];
    let mut tls_failures: Vec<u64> = vec![0; started.len()];
    for round in 0..TLS_ROUNDS {
        for k in 0..started.len() {
            let i = (k + round) % started.len();
            let (kind, proxy, _, tls_addr, _) = &started[i];
            let name = kind.name();
            let ticks_before = proxy.cpu_ticks();
            let result = measure_tls_conns(*tls_addr, &connector, opts.echo_duration()).await;
            let conns = result.conns_per_s * opts.echo_duration().as_secs_f64();
            let cpu_us_per_conn =
                proxy.cpu_ticks().saturating_sub(ticks_before) as f64 / CLOCK_TICKS_PER_S * 1e6
                    / conns.max(1.0);
            println!(
                "{name}: TLS round {}: {:.0} new wss conns/s, {} failed, {cpu_us_per_conn:.0} us of proxy CPU per connection",
                round + 1,
                result.conns_per_s,
                result.failures,
            );
            if let Some(error) = &result.first_error {
                println!("{name}: TLS round {}: first failure: {error}", round + 1);
            }
            tls_samples[i].push(result.conns_per_s);
            tls_failures[i] += result.failures;
        }
    }

    let h2_figures = h2_rounds(&started, &cert, opts).await?;

    let mut memories: Vec<Option<Memory>> = vec![None];
    let mut tls_rates: Vec<Option<WssTls>> = vec![None];
    for ((_, mut proxy, _, _, memory), (samples, failures)) in started
        .into_iter()
        .zip(tls_samples.into_iter().zip(tls_failures))
    {
        proxy.stop();
        memories.push(Some(memory));
        tls_rates.push(Some(WssTls {
            conns_per_s: Echo::from_samples(samples).median,
            failures,
        }));
    }
    let rows: Vec<Row> = targets
        .into_iter()
        .zip(samples)
        .zip(cpu_samples)
        .zip(memories)
        .zip(tls_rates)
        .map(|(((((name, _), samples), cpu), memory), wss_tls)| Row {
            name,
            memory,
            echo: Echo::from_samples(samples),
            cpu_us_per_msg: (!cpu.is_empty()).then(|| Echo::from_samples(cpu).median),
            wss_tls,
        })
        .collect();
    let direct = rows[0].echo.median;

    println!();
    print_table(&rows, &opts.memory_steps(), direct);
    println!();
    print_figures(&rows, direct);
    print_h2_figures(&h2_figures);
    Ok(())
}

/// What the HTTP/2 part measured of one proxy (medians over its rounds).
struct H2Figures {
    name: &'static str,
    req_per_s: f64,
    req_p99_ms: f64,
    cpu_us_per_req: f64,
    /// Echo over WebSockets inside h2, and over TLS HTTP/1.1; `None` for
    /// nginx, which does not do RFC 8441.
    ws_h2: Option<(f64, f64)>,
    wss: Option<(f64, f64)>,
    /// sluice: KiB per idle WebSocket over h2 and over TLS HTTP/1.1.
    idle_kib: Option<(f64, f64)>,
}

/// Idle WebSockets for the h2-against-h1 memory figure (under the TLS
/// listener's limit).
const H2_IDLE: usize = 800;

/// HTTP/2 requests, WebSocket echo over h2 and over wss, in rounds over
/// the proxies (rotating order); then sluice's idle memory over each.
async fn h2_rounds(
    started: &[(ProxyKind, Proc, SocketAddr, SocketAddr, Memory)],
    cert: &Cert,
    opts: &Options,
) -> Result<Vec<H2Figures>> {
    let h2c = h2::connector(&cert.der, &[b"h2"])?;
    let h1c = h2::connector(&cert.der, &[b"http/1.1"])?;
    let duration = opts.echo_duration();
    println!(
        "ws_bench: HTTP/2: {} connections x {} streams of GETs, {ECHO_CONNS} WebSockets over h2 and over wss, {} s each, {ECHO_ROUNDS} rounds",
        h2::H2_CONNS,
        h2::H2_STREAMS,
        opts.seconds
    );
    // A baseline binary may not speak HTTP/2.
    let started: Vec<_> = started
        .iter()
        .filter(|s| !matches!(s.0, ProxyKind::SluiceBase))
        .collect();
    let n = started.len();
    let mut req: Vec<Vec<h2::Rate>> = (0..n).map(|_| Vec::new()).collect();
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut ws_h2: Vec<Vec<h2::Rate>> = (0..n).map(|_| Vec::new()).collect();
    let mut wss: Vec<Vec<h2::Rate>> = (0..n).map(|_| Vec::new()).collect();
    for round in 0..ECHO_ROUNDS {
        for k in 0..n {
            let i = (k + round) % n;
            let (kind, proxy, _, tls_addr, _) = &started[i];
            let name = kind.name();
            let before = proxy.cpu_ticks();
            let rate = h2::requests(*tls_addr, &h2c, duration)
                .await
                .with_context(|| format!("HTTP/2 requests through {name}"))?;
            let requests = rate.per_s * duration.as_secs_f64();
            let us = proxy.cpu_ticks().saturating_sub(before) as f64 / CLOCK_TICKS_PER_S * 1e6
                / requests.max(1.0);
            println!(
                "{name}: h2 round {}: {:.0} req/s, p99 {:.2} ms, {us:.1} us of proxy CPU per request",
                round + 1,
                rate.per_s,
                rate.p99_ms
            );
            req[i].push(rate);
            cpu[i].push(us);
            if matches!(kind, ProxyKind::Nginx) {
                continue;
            }
            let over_h2 = h2::echo_h2(*tls_addr, &h2c, duration)
                .await
                .with_context(|| format!("WebSocket echo over h2 through {name}"))?;
            let over_h1 = h2::echo_wss(*tls_addr, &h1c, duration)
                .await
                .with_context(|| format!("wss echo through {name}"))?;
            println!(
                "{name}: h2 round {}: echo over h2 {:.0} msg/s p99 {:.2} ms, over wss {:.0} msg/s p99 {:.2} ms",
                round + 1,
                over_h2.per_s,
                over_h2.p99_ms,
                over_h1.per_s,
                over_h1.p99_ms
            );
            ws_h2[i].push(over_h2);
            wss[i].push(over_h1);
        }
    }
    let median_rate = |rates: Vec<h2::Rate>| -> Option<(f64, f64)> {
        if rates.is_empty() {
            return None;
        }
        let per_s = Echo::from_samples(rates.iter().map(|r| r.per_s).collect()).median;
        let p99 = Echo::from_samples(rates.iter().map(|r| r.p99_ms).collect()).median;
        Some((per_s, p99))
    };
    let mut out = Vec::new();
    for (i, (kind, proxy, _, tls_addr, _)) in started.iter().enumerate() {
        let (req_per_s, req_p99_ms) = median_rate(std::mem::take(&mut req[i])).unwrap_or_default();
        let idle_kib = if matches!(kind, ProxyKind::Sluice) {
            Some(h2_idle_memory(proxy, *tls_addr, &h2c, &h1c).await?)
        } else {
            None
        };
        out.push(H2Figures {
            name: kind.name(),
            req_per_s,
            req_p99_ms,
            cpu_us_per_req: Echo::from_samples(std::mem::take(&mut cpu[i])).median,
            ws_h2: median_rate(std::mem::take(&mut ws_h2[i])),
            wss: median_rate(std::mem::take(&mut wss[i])),
            idle_kib,
        });
    }
    Ok(out)
}

/// sluice's RSS per idle WebSocket over h2 and over wss, [`H2_IDLE`] each.
async fn h2_idle_memory(
    proxy: &Proc,
    tls_addr: SocketAddr,
    h2c: &TlsConnector,
    h1c: &TlsConnector,
) -> Result<(f64, f64)> {
    tokio::time::sleep(SETTLE).await;
    let start = proxy.rss_kib()?;
    let (senders, streams) = h2::open_h2_ws(tls_addr, h2c, H2_IDLE).await?;
    tokio::time::sleep(SETTLE).await;
    let with_h2 = proxy.rss_kib()?;
    drop(streams);
    drop(senders);
    tokio::time::sleep(AFTER_CLOSE).await;
    let between = proxy.rss_kib()?;
    let conns = h2::open_wss(tls_addr, h1c, H2_IDLE).await?;
    tokio::time::sleep(SETTLE).await;
    let with_wss = proxy.rss_kib()?;
    drop(conns);
    let per = |at: u64, from: u64| (at as f64 - from as f64) / H2_IDLE as f64;
    println!(
        "{}: RSS {start} KiB, {with_h2} KiB with {H2_IDLE} idle WebSockets over h2, {between} KiB after, {with_wss} KiB with {H2_IDLE} over wss",
        proxy.name
    );
    Ok((per(with_h2, start), per(with_wss, between)))
}

fn print_h2_figures(figures: &[H2Figures]) {
    let by = |name: &str| figures.iter().find(|f| f.name == name);
    for f in figures {
        let n = f.name;
        println!("{n}.h2_req_per_s = {:.0}", f.req_per_s);
        println!("{n}.h2_req_p99_ms = {:.2}", f.req_p99_ms);
        println!("{n}.h2_cpu_us_per_req = {:.1}", f.cpu_us_per_req);
        if let Some((per_s, p99)) = f.ws_h2 {
            println!("{n}.ws_over_h2_echo_msgs_per_s = {per_s:.0}");
            println!("{n}.ws_over_h2_echo_p99_ms = {p99:.2}");
        }
        if let Some((per_s, p99)) = f.wss {
            println!("{n}.wss_echo_msgs_per_s = {per_s:.0}");
            println!("{n}.wss_echo_p99_ms = {p99:.2}");
        }
        if let Some((h2, h1)) = f.idle_kib {
            println!("{n}.kib_per_idle_ws_over_h2_at_{H2_IDLE} = {h2:.2}");
            println!("{n}.kib_per_idle_wss_at_{H2_IDLE} = {h1:.2}");
        }
    }
    if let Some(s) = by("sluice") {
        for other in ["haproxy", "nginx", "sluice-base"] {
            if let Some(o) = by(other).filter(|o| o.req_per_s > 0.0) {
                println!(
                    "sluice.h2_req_vs_{other} = {:.3}",
                    s.req_per_s / o.req_per_s
                );
            }
        }
        if let (Some((h2, _)), Some((h1, _))) = (s.ws_h2, s.wss) {
            println!("sluice.ws_over_h2_echo_vs_wss = {:.3}", h2 / h1);
        }
    }
}

async fn start_backends() -> Result<Vec<EchoBackend>> {
    let mut backends = Vec::with_capacity(BACKENDS);
    for i in 1..=BACKENDS {
        let name = format!("echo-{i}");
        let bind: SocketAddr = "127.0.0.1:0".parse()?;
        let backend = EchoBackend::start(&name, bind)
            .await
            .with_context(|| format!("starting backend {name}"))?;
        backends.push(backend);
    }
    Ok(backends)
}

/// Starts one proxy and measures its memory; returns it running.
async fn start_and_measure_memory(
    kind: ProxyKind,
    backend_addrs: &[SocketAddr],
    backends: &[EchoBackend],
    dir: &Path,
    cert: &Cert,
    opts: &Options,
) -> Result<(Proc, SocketAddr, SocketAddr, Memory)> {
    let [port, tls_port] = free_ports()?;
    let mut proxy = kind.start(port, tls_port, backend_addrs, dir, cert)?;
    wait_until_ready(&mut proxy, port).await?;
    wait_until_ready(&mut proxy, tls_port).await?;
    println!(
        "{}: listening on 127.0.0.1:{port} and 127.0.0.1:{tls_port} (TLS) (pid {})",
        kind.name(),
        proxy.pid()
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let memory = measure_memory(&proxy, addr, backends, &opts.memory_steps()).await?;
    Ok((proxy, addr, tls_addr, memory))
}

// ------------------------------------------------------------------ memory

/// Proxy RSS at 0 connections, at each step, and after closing them all.
struct Memory {
    start_kib: u64,
    steps: Vec<(usize, u64)>,
    after_close_kib: u64,
}

impl Memory {
    fn at(&self, conns: usize) -> Option<u64> {
        self.steps
            .iter()
            .find(|(n, _)| *n == conns)
            .map(|(_, kib)| *kib)
    }

    fn per_conn_kib(&self, conns: usize) -> Option<f64> {
        let kib = self.at(conns)?;
        Some((kib as f64 - self.start_kib as f64) / conns as f64)
    }
}

async fn measure_memory(
    proxy: &Proc,
    addr: SocketAddr,
    backends: &[EchoBackend],
    steps: &[usize],
) -> Result<Memory> {
    tokio::time::sleep(SETTLE).await;
    let start_kib = proxy.rss_kib()?;
    println!("{}: RSS {start_kib} KiB with no connection", proxy.name);
    let url = ws_url(addr);
    let mut conns: Vec<Ws> = Vec::new();
    let mut figures = Vec::new();
    for &target in steps {
        let opened = Instant::now();
        let more = open_many(&url, target - conns.len()).await?;
        conns.extend(more);
        let secs = opened.elapsed().as_secs_f64();
        tokio::time::sleep(SETTLE).await;
        let kib = proxy.rss_kib()?;
        println!(
            "{}: RSS {kib} KiB with {target} idle WebSockets (opened in {secs:.1} s; backends hold {})",
            proxy.name,
            backends_open(backends),
        );
        figures.push((target, kib));
    }
    let clean = close_all(conns).await;
    tokio::time::sleep(AFTER_CLOSE).await;
    let after_close_kib = proxy.rss_kib()?;
    println!(
        "{}: RSS {after_close_kib} KiB {AFTER_CLOSE:?} after closing them ({clean} clean closes; backends hold {})",
        proxy.name,
        backends_open(backends),
    );
    Ok(Memory {
        start_kib,
        steps: figures,
        after_close_kib,
    })
}

fn backends_open(backends: &[EchoBackend]) -> usize {
    backends.iter().map(EchoBackend::ws_open).sum()
}

// -------------------------------------------------------------- websockets

fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

/// Opens a WebSocket and reads the backend's greeting (so the tunnel is up).
async fn open_ws(url: &str) -> Result<Ws> {
    let open = async {
        let (mut ws, _) = connect_async_with_config(url, None, true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let greeting = ws
            .next()
            .await
            .context("closed before the greeting")?
            .context("reading the greeting")?;
        match &greeting {
            Message::Text(text) if text.starts_with("connected to ") => Ok(ws),
            other => bail!("unexpected greeting from {url}: {other:?}"),
        }
    };
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .with_context(|| format!("opening {url}: no greeting within {OPEN_TIMEOUT:?}"))?
}

/// Opens `n` WebSockets to `url`, [`OPEN_CONCURRENCY`] at a time.
async fn open_many(url: &str, n: usize) -> Result<Vec<Ws>> {
    stream::iter(0..n)
        .map(|_| open_ws(url))
        .buffer_unordered(OPEN_CONCURRENCY)
        .try_collect()
        .await
}

/// Sends a Close frame and waits for the peer's; true if that completed.
async fn close_ws(mut ws: Ws) -> bool {
    let close = async {
        ws.close(None).await?;
        // Read up to the peer's Close; the stream ends after it.
        while let Some(msg) = ws.next().await {
            msg?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    matches!(tokio::time::timeout(CLOSE_TIMEOUT, close).await, Ok(Ok(())))
}

/// Closes every WebSocket, [`OPEN_CONCURRENCY`] at a time; returns the clean closes.
async fn close_all(conns: Vec<Ws>) -> usize {
    stream::iter(conns)
        .map(close_ws)
        .buffer_unordered(OPEN_CONCURRENCY)
        .filter(|clean| std::future::ready(*clean))
        .count()
        .await
}

// -------------------------------------------------------------------- echo

/// Echo round trips per second over [`ECHO_CONNS`] WebSockets, spread
/// round robin over `urls`, counting the round trips done within `duration`.
async fn measure_echo(urls: &[String], duration: Duration) -> Result<f64> {
    let conns: Vec<Ws> = stream::iter(0..ECHO_CONNS)
        .map(|i| open_ws(&urls[i % urls.len()]))
        .buffer_unordered(OPEN_CONCURRENCY)
        .try_collect()
        .await?;
    let deadline = tokio::time::Instant::now() + duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| tokio::spawn(echo_loop(ws, deadline)))
        .collect();
    let mut total = 0u64;
    for task in tasks {
        total += task.await.context("echo task panicked")??;
    }
    Ok(total as f64 / duration.as_secs_f64())
}

/// Sends a message and waits for its echo until `deadline`; returns the round trips finished by then.
async fn echo_loop(mut ws: Ws, deadline: tokio::time::Instant) -> Result<u64> {
    let payload = Bytes::from(vec![0x5a; ECHO_PAYLOAD]);
    let mut done = 0;
    for _ in 0..MAX_ROUND_TRIPS {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::timeout(ECHO_TIMEOUT, round_trip(&mut ws, &payload))
            .await
            .with_context(|| format!("no echo within {ECHO_TIMEOUT:?}"))??;
        if tokio::time::Instant::now() <= deadline {
            done += 1;
        }
    }
    close_ws(ws).await;
    Ok(done)
}

async fn round_trip<S>(ws: &mut WebSocketStream<S>, payload: &Bytes) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Binary(payload.clone()))
        .await
        .context("sending")?;
    // Skip control frames (a few at most) until the echo.
    for _ in 0..8 {
        match ws
            .next()
            .await
            .context("closed while waiting for the echo")?
            .context("reading the echo")?
        {
            Message::Binary(echo) if echo == *payload => return Ok(()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => bail!("unexpected reply: {other:?}"),
        }
    }
    bail!("no echo after 8 control frames")
}

// --------------------------------------------------------------------- tls

/// A rustls client that trusts only `cert` (a self-signed end-entity
/// certificate is its own trust anchor), offers `alpn`, and never resumes
/// a session: every connection pays a full handshake.
fn tls_client_config(
    cert: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cert.clone())
        .context("trusting the bench certificate")?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("choosing TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// New wss connections per second through one proxy.
struct TlsRate {
    conns_per_s: f64,
    failures: u64,
    first_error: Option<String>,
}

/// [`TLS_CLIENTS`] clients open wss connections to `addr` one after the
/// other (see [`wss_once`]) for `duration`; counts those completed by then.
async fn measure_tls_conns(
    addr: SocketAddr,
    connector: &TlsConnector,
    duration: Duration,
) -> TlsRate {
    let deadline = tokio::time::Instant::now() + duration;
    let tasks: Vec<_> = (0..TLS_CLIENTS)
        .map(|_| tokio::spawn(tls_conn_loop(addr, connector.clone(), deadline)))
        .collect();
    let mut done = 0;
    let mut failures = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(client) => {
                done += client.done;
                failures += client.failures;
                first_error = first_error.or(client.first_error);
            }
            Err(error) => {
                failures += 1;
                first_error.get_or_insert_with(|| format!("client task failed: {error}"));
            }
        }
    }
    TlsRate {
        conns_per_s: done as f64 / duration.as_secs_f64(),
        failures,
        first_error,
    }
}

/// What one TLS client did.
struct TlsClient {
    done: u64,
    failures: u64,
    first_error: Option<String>,
}

/// Opens wss connections one after the other until `deadline`.
async fn tls_conn_loop(
    addr: SocketAddr,
    connector: TlsConnector,
    deadline: tokio::time::Instant,
) -> TlsClient {
    let payload = Bytes::from(vec![0x5a; ECHO_PAYLOAD]);
    let mut client = TlsClient {
        done: 0,
        failures: 0,
        first_error: None,
    };
    for _ in 0..MAX_TLS_CONNS_PER_CLIENT {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        match wss_once(addr, &connector, &payload).await {
            Ok(()) => {
                if tokio::time::Instant::now() <= deadline {
                    client.done += 1;
                }
            }
            Err(error) => {
                client.failures += 1;
                client
                    .first_error
                    .get_or_insert_with(|| format!("{error:#}"));
                tokio::time::sleep(TLS_RETRY_PAUSE).await;
            }
        }
    }
    client
}

/// One new wss connection: TCP connect, TLS handshake, WebSocket upgrade,
/// the backend's greeting, one echo, close; each step with its timeout.
async fn wss_once(addr: SocketAddr, connector: &TlsConnector, payload: &Bytes) -> Result<()> {
    let tcp = step("TCP connect", TLS_STEP_TIMEOUT, async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    })
    .await?;
    let name = ServerName::try_from(TLS_SERVER_NAME)?;
    let tls = step("TLS handshake", TLS_STEP_TIMEOUT, async {
        Ok(connector.connect(name, tcp).await?)
    })
    .await?;
    let mut ws = step("WebSocket upgrade", TLS_STEP_TIMEOUT, async {
        Ok(tokio_tungstenite::client_async(WSS_URL, tls).await?.0)
    })
    .await?;
    step("greeting", TLS_STEP_TIMEOUT, async {
        match ws.next().await.context("closed before the greeting")?? {
            Message::Text(text) if text.starts_with("connected to ") => Ok(()),
            other => bail!("unexpected greeting: {other:?}"),
        }
    })
    .await?;
    step("echo", ECHO_TIMEOUT, round_trip(&mut ws, payload)).await?;
    step("close", CLOSE_TIMEOUT, async {
        ws.close(None).await?;
        // Read up to the peer's Close and the end of the stream. Once the
        // Close has come, an error only means the TCP connection ended
        // without a TLS close_notify: the WebSocket is closed all the same.
        let mut closed_by_peer = false;
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(_)) => closed_by_peer = true,
                Ok(_) => {}
                Err(_) if closed_by_peer => break,
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    })
    .await
}

/// `work`, failing with `what` in the message if it fails or takes longer than `limit`.
async fn step<T>(what: &str, limit: Duration, work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| anyhow!("{what}: nothing within {limit:?}"))?
        .with_context(|| what.to_string())
}

// ------------------------------------------------------------------ report

struct Row {
    name: String,
    memory: Option<Memory>,
    echo: Echo,
    /// Median proxy CPU time per echoed message (both directions), µs.
    cpu_us_per_msg: Option<f64>,
    /// New wss connections per second (proxies only).
    wss_tls: Option<WssTls>,
}

/// The TLS connection rate over the rounds.
struct WssTls {
    /// Median, connections/s.
    conns_per_s: f64,
    /// Failed connections, all rounds together.
    failures: u64,
}

/// Echo throughput over the rounds, msg/s.
struct Echo {
    median: f64,
    min: f64,
    max: f64,
}

impl Echo {
    fn from_samples(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Self {
            median: samples.get(samples.len() / 2).copied().unwrap_or(0.0),
            min: samples.first().copied().unwrap_or(0.0),
            max: samples.last().copied().unwrap_or(0.0),
        }
    }
}

fn print_table(rows: &[Row], steps: &[usize], direct: f64) {
    let mut header = vec!["target".to_string(), "RSS idle KiB".to_string()];
    for n in steps {
        header.push(format!("RSS @{n} KiB"));
        header.push(format!("KiB/conn @{n}"));
    }
    header.extend([
        "RSS closed KiB".into(),
        "echo msg/s (median)".into(),
        "min..max".into(),
        "vs direct".into(),
        "proxy CPU us/msg".into(),
        "wss conn/s (TLS)".into(),
    ]);
    let mut table = vec![header];
    for row in rows {
        let mem = row.memory.as_ref();
        let mut cells = vec![row.name.clone(), cell(mem.map(|m| m.start_kib))];
        for &n in steps {
            cells.push(cell(mem.and_then(|m| m.at(n))));
            cells.push(
                mem.and_then(|m| m.per_conn_kib(n))
                    .map_or("-".into(), |k| format!("{k:.2}")),
            );
        }
        cells.push(cell(mem.map(|m| m.after_close_kib)));
        cells.push(format!("{:.0}", row.echo.median));
        cells.push(format!("{:.0}..{:.0}", row.echo.min, row.echo.max));
        cells.push(format!("{:.3}", row.echo.median / direct));
        cells.push(
            row.cpu_us_per_msg
                .map_or("-".into(), |us| format!("{us:.2}")),
        );
        cells.push(
            row.wss_tls
                .as_ref()
                .map_or("-".into(), |t| format!("{:.0}", t.conns_per_s)),
        );
        table.push(cells);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for (i, cells) in table.iter().enumerate() {
        let line: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (text, w))| {
                if c == 0 {
                    format!("{text:<w$}")
                } else {
                    format!("{text:>w$}")
                }
            })
            .collect();
        println!("{}", line.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("{}", rule.join("-|-"));
        }
    }
}

fn cell(value: Option<u64>) -> String {
    value.map_or("-".into(), |v| v.to_string())
}

/// One `name.figure = value` line per figure.
fn print_figures(rows: &[Row], direct: f64) {
    for row in rows {
        let name = &row.name;
        if let Some(m) = &row.memory {
            println!("{name}.rss_start_kib = {}", m.start_kib);
            for &(n, kib) in &m.steps {
                println!("{name}.rss_at_{n}_kib = {kib}");
                if let Some(per) = m.per_conn_kib(n) {
                    println!("{name}.kib_per_conn_at_{n} = {per:.2}");
                }
            }
            println!("{name}.rss_after_close_kib = {}", m.after_close_kib);
            println!(
                "{name}.rss_after_close_minus_start_kib = {}",
                m.after_close_kib as i64 - m.start_kib as i64
            );
        }
        println!("{name}.echo_msgs_per_s = {:.0}", row.echo.median);
        if row.memory.is_some() {
            println!(
                "{name}.echo_ratio_vs_direct = {:.3}",
                row.echo.median / direct
            );
        }
        if let Some(us) = row.cpu_us_per_msg {
            println!("{name}.cpu_us_per_msg = {us:.2}");
        }
        if let Some(t) = &row.wss_tls {
            println!("{name}.wss_tls_conns_per_s = {:.0}", t.conns_per_s);
            println!("{name}.wss_tls_failures = {}", t.failures);
        }
    }
    let tls_rate = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.wss_tls.as_ref())
            .map(|t| t.conns_per_s)
    };
    if let (Some(sluice), Some(haproxy)) = (tls_rate("sluice"), tls_rate("haproxy"))
        && haproxy > 0.0
    {
        println!("sluice.wss_tls_vs_haproxy = {:.3}", sluice / haproxy);
    }
    // This build against the --baseline binary, measured in the same run.
    let row = |name: &str| rows.iter().find(|r| r.name == name);
    if let (Some(now), Some(base)) = (row("sluice"), row("sluice-base")) {
        if base.echo.median > 0.0 {
            println!(
                "sluice.echo_vs_base = {:.3}",
                now.echo.median / base.echo.median
            );
        }
        if let (Some(now), Some(base)) = (tls_rate("sluice"), tls_rate("sluice-base"))
            && base > 0.0
        {
            println!("sluice.wss_tls_vs_base = {:.3}", now / base);
        }
        if let (Some(now), Some(base)) = (&now.memory, &base.memory) {
            for &(n, _) in &now.steps {
                if let (Some(a), Some(b)) = (now.per_conn_kib(n), base.per_conn_kib(n))
                    && b > 0.0
                {
                    println!("sluice.kib_per_conn_at_{n}_vs_base = {:.3}", a / b);
                }
            }
        }
    }
}
