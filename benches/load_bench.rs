//! Load benchmark with every party in a process of its own, as deployed:
//!
//! - three `sluice echo-backend` processes (one thread each; a WebSocket
//!   gets `connected to NAME`, then every message back; a plain request
//!   gets what the backend saw);
//! - the proxy under test, one thread: sluice (`worker_threads = 1`, the
//!   release build), HAProxy (`nbthread 1`) and nginx (one worker) when
//!   installed, with the configs of `benches/proxies/`; `--baseline PATH`
//!   adds another sluice binary as `sluice-base`;
//! - the load generator: this benchmark's own binary, run again with
//!   `--load WORKLOAD` on a 2-thread runtime; it prints one result line.
//!
//! Workloads, each through every target (`direct`: round robin over the
//! three backends):
//!
//! - `churn`: 50 workers, each in a loop: TCP connect, WebSocket upgrade,
//!   the greeting, one 64-byte echo, close (new `ws://` connections/s; the
//!   latency is the whole connection's);
//! - `echo`: 100 WebSockets, each sending 64 bytes and waiting for the echo,
//!   in a loop (messages/s, round-trip latency);
//! - `http`: 50 HTTP/1.1 keep-alive connections, each sending `GET /small`
//!   and reading the answer (a few hundred bytes), in a loop (requests/s).
//!
//! For every run: operations/s, p50 and p99 latency, failures, and the
//! proxy's CPU (utime + stime of the process and its children, from
//! /proc) per operation. Rounds go over all targets in a rotating order,
//! so that noise from the shared machine falls on all of them alike; the
//! median of the rounds is reported, with each figure's ratio to HAProxy
//! and nginx.
//!
//! ```text
//! cargo bench --bench load_bench                 # 3 rounds of 10 s
//! cargo bench --bench load_bench -- --quick      # 1 round of 1 s (CI: the harness runs)
//! cargo bench --bench load_bench -- --seconds 5 --rounds 5 --only sluice,haproxy
//! cargo bench --bench load_bench -- --baseline OLD/target/release/sluice --only sluice,sluice-base
//! ```
//!
//! Every process it starts is stopped by PID at the end (and on errors).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[allow(clippy::duplicate_mod)]
#[path = "../tests/support/process.rs"]
mod process;
#[path = "proxies/mod.rs"]
mod proxies;

use process::{TempDir, free_ports};
use proxies::*;

const WORKLOADS: [Workload; 3] = [Workload::Churn, Workload::Echo, Workload::Http];
const BACKENDS: usize = 3;
const PAYLOAD: usize = 64;
const DEFAULT_SECONDS: u64 = 10;
const DEFAULT_ROUNDS: usize = 3;
const MAX_SECONDS: u64 = 600;
/// One step (connect, a frame, an answer) that takes longer fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Latency samples kept per worker (the first ones), bounding memory.
const MAX_SAMPLES: usize = 1_000_000;
/// Extra time the load process gets beyond its run before it is stopped.
const LOAD_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Workload {
    Churn,
    Echo,
    Http,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Churn => "churn",
            Self::Echo => "echo",
            Self::Http => "http",
        }
    }

    fn parse(name: &str) -> Result<Self> {
        WORKLOADS
            .into_iter()
            .find(|w| w.name() == name)
            .with_context(|| format!("unknown workload {name:?} (churn, echo, http)"))
    }

    /// Concurrent workers (connections) of the load generator.
    fn workers(self) -> usize {
        match self {
            Self::Churn | Self::Http => 50,
            Self::Echo => 100,
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::Churn => "conns/s",
            Self::Echo => "msg/s",
            Self::Http => "req/s",
        }
    }

    fn per(self) -> &'static str {
        match self {
            Self::Churn => "conn",
            Self::Echo => "msg",
            Self::Http => "req",
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--load") {
        return load_main(&args[1..]);
    }
    let opts = Options::parse(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(&opts))
}

/// Command-line options (after `cargo bench --bench load_bench --`).
struct Options {
    seconds: u64,
    rounds: usize,
    only: Option<Vec<String>>,
}

impl Options {
    const USAGE: &str = "usage: cargo bench --bench load_bench [-- [--quick] [--seconds N] [--rounds N] [--only NAME,...] [--baseline PATH]]\n  NAME: direct, sluice, sluice-base, haproxy, nginx";

    fn parse(args: Vec<String>) -> Result<Self> {
        let mut seconds = DEFAULT_SECONDS;
        let mut rounds = DEFAULT_ROUNDS;
        let mut only = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    seconds = 1;
                    rounds = 1;
                }
                "--seconds" => {
                    let value = args.next().context("--seconds needs a value")?;
                    seconds = value
                        .parse()
                        .with_context(|| format!("--seconds {value:?}: not a whole number"))?;
                    ensure!(
                        (1..=MAX_SECONDS).contains(&seconds),
                        "--seconds must be 1..={MAX_SECONDS}"
                    );
                }
                "--rounds" => {
                    let value = args.next().context("--rounds needs a value")?;
                    rounds = value
                        .parse()
                        .with_context(|| format!("--rounds {value:?}: not a whole number"))?;
                    ensure!((1..=20).contains(&rounds), "--rounds must be 1..=20");
                }
                "--only" => {
                    let names = args.next().context("--only needs target names")?;
                    only = Some(names.split(',').map(str::to_string).collect());
                }
                "--baseline" => set_baseline(args.next())?,
                // cargo bench passes --bench to harness = false targets.
                "--bench" => {}
                "-h" | "--help" => {
                    println!("{}", Self::USAGE);
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{}", Self::USAGE),
            }
        }
        Ok(Self {
            seconds,
            rounds,
            only,
        })
    }

    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|n| n == name))
    }
}

/// A place the load goes to: the backends themselves, or a proxy.
struct Target {
    name: String,
    /// `host:port` of each address the load spreads over.
    addrs: Vec<SocketAddr>,
    proxy: Option<Proc>,
}

async fn run(opts: &Options) -> Result<()> {
    println!(
        "load_bench: {} s per run, {} rounds, {} cores; churn/http {} workers, echo {} WebSockets, {PAYLOAD} B messages; load generator: its own process, 2 threads; backends: {BACKENDS} processes, 1 thread each",
        opts.seconds,
        opts.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        Workload::Churn.workers(),
        Workload::Echo.workers(),
    );
    let dir = TempDir::new("load_bench").context("creating a temp dir")?;
    let cert = Cert::generate(dir.path())?;
    let mut backends = Vec::new();
    let mut backend_addrs = Vec::new();
    for i in 1..=BACKENDS {
        let [port] = free_ports().context("a free port")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["echo-backend", "--name", &format!("echo-{i}"), "--bind"])
            .arg(addr.to_string());
        let mut backend = Proc::spawn(
            "echo-backend",
            cmd,
            dir.path().join(format!("echo-{i}.log")),
        )?;
        wait_until_ready(&mut backend, port).await?;
        backends.push(backend);
        backend_addrs.push(addr);
    }
    let mut targets = Vec::new();
    if opts.wants("direct") {
        targets.push(Target {
            name: "direct".into(),
            addrs: backend_addrs.clone(),
            proxy: None,
        });
    }
    for kind in ProxyKind::ALL {
        if !opts.wants(kind.name()) {
            continue;
        }
        if !kind.is_available() {
            println!(
                "{}: skipped ({} is not available)",
                kind.name(),
                kind.program()
            );
            continue;
        }
        let [port, tls_port] = free_ports().context("free ports")?;
        let mut proxy = kind.start(port, tls_port, &backend_addrs, dir.path(), &cert)?;
        wait_until_ready(&mut proxy, port).await?;
        targets.push(Target {
            name: kind.name().into(),
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            proxy: Some(proxy),
        });
    }
    ensure!(!targets.is_empty(), "no target to measure");

    let mut results: HashMap<(usize, usize), Vec<Sample>> = HashMap::new();
    for (w, workload) in WORKLOADS.into_iter().enumerate() {
        for round in 0..opts.rounds {
            for k in 0..targets.len() {
                let t = (k + round) % targets.len();
                let target = &mut targets[t];
                let sample = measure(workload, target, opts.seconds)
                    .await
                    .with_context(|| format!("{} through {}", workload.name(), target.name))?;
                println!(
                    "{}: {} round {}: {}",
                    target.name,
                    workload.name(),
                    round + 1,
                    sample.describe(workload)
                );
                results.entry((w, t)).or_default().push(sample);
            }
        }
    }
    for backend in &mut backends {
        backend.check_running()?;
    }
    println!();
    print_table(&targets, &results, opts);
    Ok(())
}

/// One run of a workload through one target.
#[derive(Debug, Clone, Default)]
struct Sample {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    /// The proxy's CPU per operation, µs.
    cpu_us: Option<f64>,
}

impl Sample {
    fn describe(&self, workload: Workload) -> String {
        let cpu = self.cpu_us.map_or(String::new(), |us| {
            format!(", {us:.1} us of proxy CPU per {}", workload.per())
        });
        format!(
            "{:.0} {}, p50 {:.2} ms, p99 {:.2} ms, {} failed{cpu}",
            self.rate,
            workload.unit(),
            self.p50_ms,
            self.p99_ms,
            self.failed
        )
    }
}

/// Runs the load generator (this binary, `--load`) against `target` for
/// `seconds`, with the proxy's CPU read around it.
async fn measure(workload: Workload, target: &mut Target, seconds: u64) -> Result<Sample> {
    if let Some(proxy) = &mut target.proxy {
        proxy.check_running()?;
    }
    let addrs: Vec<String> = target.addrs.iter().map(ToString::to_string).collect();
    let exe = std::env::current_exe().context("this benchmark's own path")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["--load", workload.name(), "--seconds", &seconds.to_string()])
        .args(["--addrs", &addrs.join(",")])
        .kill_on_drop(true);
    let before = target.proxy.as_ref().map(Proc::cpu_ticks);
    let limit = Duration::from_secs(seconds) + LOAD_GRACE;
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("the load generator ran past {limit:?}"))?
        .context("running the load generator")?;
    let after = target.proxy.as_ref().map(Proc::cpu_ticks);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the load generator failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .with_context(|| format!("no result line in {stdout:?}"))?;
    let mut sample = parse_result(line)?;
    let ops = sample.rate * seconds as f64;
    sample.cpu_us = before
        .zip(after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / CLOCK_TICKS_PER_S * 1e6 / ops.max(1.0));
    Ok(sample)
}

/// `ops=N secs=S p50_us=A p99_us=B failed=F`.
fn parse_result(line: &str) -> Result<Sample> {
    let fields: HashMap<&str, f64> = line
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k, v.parse().ok()?))
        })
        .collect();
    let get = |k: &str| {
        fields
            .get(k)
            .copied()
            .with_context(|| format!("{k} missing in {line:?}"))
    };
    Ok(Sample {
        rate: get("ops")? / get("secs")?.max(1e-9),
        p50_ms: get("p50_us")? / 1e3,
        p99_ms: get("p99_us")? / 1e3,
        failed: get("failed")? as u64,
        cpu_us: None,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The medians of each target's rounds, with ratios to HAProxy and nginx.
fn print_table(targets: &[Target], results: &HashMap<(usize, usize), Vec<Sample>>, opts: &Options) {
    println!(
        "medians of {} round(s) of {} s; ratios: this / HAProxy and this / nginx in the same run",
        opts.rounds, opts.seconds
    );
    let index = |name: &str| targets.iter().position(|t| t.name == name);
    for (w, workload) in WORKLOADS.into_iter().enumerate() {
        let medians: Vec<Sample> = (0..targets.len())
            .map(|t| {
                let samples = results.get(&(w, t)).cloned().unwrap_or_default();
                let cpu: Vec<f64> = samples.iter().filter_map(|s| s.cpu_us).collect();
                Sample {
                    rate: median(samples.iter().map(|s| s.rate).collect()),
                    p50_ms: median(samples.iter().map(|s| s.p50_ms).collect()),
                    p99_ms: median(samples.iter().map(|s| s.p99_ms).collect()),
                    failed: samples.iter().map(|s| s.failed).sum(),
                    cpu_us: (!cpu.is_empty()).then(|| median(cpu)),
                }
            })
            .collect();
        println!(
            "\n{:<12} {:>12} {:>9} {:>9} {:>7} {:>10}   vs haproxy (rate, p99, cpu)   vs nginx (rate, p99, cpu)",
            workload.name(),
            workload.unit(),
            "p50 ms",
            "p99 ms",
            "failed",
            format!("cpu us/{}", workload.per()),
        );
        let ratio = |m: &Sample, base: Option<usize>| -> String {
            let Some(b) = base.map(|i| &medians[i]) else {
                return "-".into();
            };
            let cpu = match (m.cpu_us, b.cpu_us) {
                (Some(a), Some(b)) => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            format!(
                "{:.2}x, {:.2}x, {cpu}",
                m.rate / b.rate,
                m.p99_ms / b.p99_ms
            )
        };
        for (t, m) in medians.iter().enumerate() {
            println!(
                "{:<12} {:>12.0} {:>9.2} {:>9.2} {:>7} {:>10}   {:<29} {}",
                targets[t].name,
                m.rate,
                m.p50_ms,
                m.p99_ms,
                m.failed,
                m.cpu_us.map_or("-".into(), |us| format!("{us:.1}")),
                ratio(m, index("haproxy")),
                ratio(m, index("nginx")),
            );
        }
    }
}

// ------------------------------------------------------------ load process

/// The load generator's side: `--load WORKLOAD --seconds N --addrs A,B`.
/// Prints `result ops=… secs=… p50_us=… p99_us=… failed=…`.
fn load_main(args: &[String]) -> Result<()> {
    let workload = Workload::parse(args.first().context("--load needs a workload")?)?;
    let mut seconds = DEFAULT_SECONDS;
    let mut addrs = Vec::new();
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = rest
                    .next()
                    .context("--seconds needs a value")?
                    .parse()
                    .context("--seconds")?;
            }
            "--addrs" => {
                for a in rest.next().context("--addrs needs addresses")?.split(',') {
                    addrs.push(
                        a.parse::<SocketAddr>()
                            .with_context(|| format!("address {a:?}"))?,
                    );
                }
            }
            other => bail!("unknown load argument {other:?}"),
        }
    }
    ensure!(!addrs.is_empty(), "--addrs needs at least one address");
    rlimit::increase_nofile_limit(u64::MAX).context("raising the open file limit")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the load generator's runtime")?;
    let duration = Duration::from_secs(seconds.min(MAX_SECONDS));
    let (ops, failed, mut latencies, secs) = runtime.block_on(async {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + duration;
        let workers: Vec<_> = (0..workload.workers())
            .map(|i| {
                let addr = addrs[i % addrs.len()];
                tokio::spawn(worker(workload, addr, deadline))
            })
            .collect();
        let mut ops = 0u64;
        let mut failed = 0u64;
        let mut latencies = Vec::new();
        for w in workers {
            let tally = w.await.context("a load worker panicked")?;
            ops += tally.ops;
            failed += tally.failed;
            latencies.extend(tally.latencies_us);
        }
        Ok::<_, anyhow::Error>((ops, failed, latencies, started.elapsed().as_secs_f64()))
    })?;
    latencies.sort_unstable();
    let pct = |p: f64| -> u32 {
        if latencies.is_empty() {
            return 0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i]
    };
    println!(
        "result ops={ops} secs={secs:.3} p50_us={} p99_us={} failed={failed}",
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}

/// What one worker did.
#[derive(Default)]
struct Tally {
    ops: u64,
    failed: u64,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn record(&mut self, since: Instant) {
        self.ops += 1;
        if self.latencies_us.len() < MAX_SAMPLES {
            let us = since.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            self.latencies_us.push(us);
        }
    }
}

/// One worker's loop until `deadline`: failures are counted, and the
/// worker starts its step again after a short pause.
async fn worker(workload: Workload, addr: SocketAddr, deadline: tokio::time::Instant) -> Tally {
    let mut tally = Tally::default();
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let url = format!("ws://{addr}/ws");
    while tokio::time::Instant::now() < deadline {
        let run = async {
            match workload {
                Workload::Churn => churn_loop(&url, &payload, deadline, &mut tally).await,
                Workload::Echo => echo_loop(&url, &payload, deadline, &mut tally).await,
                Workload::Http => http_loop(addr, deadline, &mut tally).await,
            }
        };
        if run.await.is_err() {
            tally.failed += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tally
}

async fn step<T>(what: &str, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, work)
        .await
        .with_context(|| format!("{what}: no answer within {STEP_TIMEOUT:?}"))?
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open_ws(url: &str) -> Result<Ws> {
    let (mut ws, _) = step("upgrade", async {
        tokio_tungstenite::connect_async(url)
            .await
            .context("WebSocket connect")
    })
    .await?;
    let greeting = step("greeting", async { ws.next().await.context("closed") })
        .await?
        .context("greeting")?;
    ensure!(greeting.is_text(), "greeting: {greeting:?}");
    Ok(ws)
}

async fn round_trip(ws: &mut Ws, payload: &Bytes) -> Result<()> {
    step("echo", async {
        ws.send(Message::Binary(payload.clone())).await?;
        loop {
            match ws.next().await.context("closed")?? {
                Message::Binary(b) if b == *payload => return Ok(()),
                Message::Ping(_) | Message::Pong(_) => {}
                other => bail!("unexpected {other:?}"),
            }
        }
    })
    .await
}

/// New connections until `deadline`: connect, upgrade, greeting, echo,
/// close (a Close handshake, then the TCP close).
async fn churn_loop(
    url: &str,
    payload: &Bytes,
    deadline: tokio::time::Instant,
    tally: &mut Tally,
) -> Result<()> {
    while tokio::time::Instant::now() < deadline {
        let started = Instant::now();
        let mut ws = open_ws(url).await?;
        round_trip(&mut ws, payload).await?;
        step("close", async {
            ws.close(None).await?;
            while let Some(msg) = ws.next().await {
                if msg.is_err() {
                    break;
                }
            }
            Ok(())
        })
        .await?;
        tally.record(started);
    }
    Ok(())
}

/// One WebSocket, echoes in a closed loop until `deadline`.
async fn echo_loop(
    url: &str,
    payload: &Bytes,
    deadline: tokio::time::Instant,
    tally: &mut Tally,
) -> Result<()> {
    let mut ws = open_ws(url).await?;
    while tokio::time::Instant::now() < deadline {
        let started = Instant::now();
        round_trip(&mut ws, payload).await?;
        tally.record(started);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(())
}

/// One keep-alive HTTP/1.1 connection, requests in a closed loop until
/// `deadline`.
async fn http_loop(
    addr: SocketAddr,
    deadline: tokio::time::Instant,
    tally: &mut Tally,
) -> Result<()> {
    let stream = step("connect", async { Ok(TcpStream::connect(addr).await?) }).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = step("handshake", async {
        Ok(hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?)
    })
    .await?;
    let conn = tokio::spawn(conn);
    let host = addr.to_string();
    while tokio::time::Instant::now() < deadline {
        let started = Instant::now();
        let req = hyper::Request::get("/small")
            .header("host", &host)
            .body(Empty::<Bytes>::new())?;
        step("request", async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            ensure!(resp.status().is_success(), "status {}", resp.status());
            resp.into_body().collect().await?;
            Ok(())
        })
        .await?;
        tally.record(started);
    }
    conn.abort();
    Ok(())
}
