//! The `sluice` command: argument parsing, logging and exit codes only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// A WebSocket-native load balancer.
#[derive(Parser)]
#[command(name = "sluice", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a config file (SIGHUP reloads it, SIGUSR1 reopens the
    /// access log, SIGUSR2 upgrades the binary; SIGTERM or Ctrl-C closes
    /// WebSockets with 1001 and exits).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file; errors name the file, line and key.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Three demo echo backends and sluice in front of them, no config needed.
    Demo {
        /// Where the balancer listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
        /// Where it listens with TLS (a self-signed certificate made at start).
        #[arg(long, default_value = "127.0.0.1:8443")]
        tls_bind: SocketAddr,
        /// Simulated chat clients to start: each sends a message every
        /// second through sluice and counts its echoes.
        #[arg(long, default_value_t = 0)]
        clients: usize,
        /// Restart the three demo backends one at a time through sluice's
        /// rollout, print what the clients saw, and exit.
        #[arg(long)]
        rollout: bool,
        /// The demo pool's drain window.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        window: std::time::Duration,
    },
    /// Run one demo echo backend (HTTP echo, WebSocket echo, page at /), to
    /// try drains and rollouts against real processes.
    EchoBackend {
        /// Name it greets WebSockets with.
        #[arg(long)]
        name: String,
        #[arg(long)]
        bind: SocketAddr,
    },
    /// Operate a running sluice through its admin API.
    Ctl {
        /// Admin API address, host:port or http://host:port [env: SLUICE_ADMIN]
        /// (default: from --config, else 127.0.0.1:9901).
        #[arg(long, global = true, value_parser = sluice::admin::client::parse_admin_addr)]
        admin: Option<SocketAddr>,
        /// Bearer token [env: SLUICE_TOKEN] (default: the config's token_file).
        #[arg(long, global = true)]
        token: Option<String>,
        /// Read the admin address and token file from this config.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Pools, backends, states, connection counts, drain progress.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take POOL/BACKEND out of rotation and close its WebSockets gradually.
    Drain {
        target: String,
        /// Spread the closes over this window (default: the pool's drain window).
        #[arg(long)]
        window: Option<String>,
        /// Show progress and return when the backend has no connection.
        #[arg(long)]
        wait: bool,
    },
    /// Put POOL/BACKEND back in rotation.
    Undrain { target: String },
    /// Read the config file again and apply it without dropping connections;
    /// prints what changed, or the errors (and exits non-zero).
    Reload,
    /// Start the binary anew (same path, same arguments), hand it the
    /// listening sockets, then drain this process's WebSockets over the
    /// drain window; exits non-zero when the new process fails.
    Upgrade,
    /// Restart POOL's backends one at a time: drain, run CMD, wait, undrain.
    Rollout {
        pool: String,
        /// Shell command; {backend} and {address} are replaced.
        #[arg(long)]
        exec: String,
        /// Drain window (default: the pool's).
        #[arg(long)]
        window: Option<String>,
        /// Longest wait for a drained backend to be empty.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        drain_timeout: std::time::Duration,
        /// Longest wait for a restarted backend to accept connections.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        health_timeout: std::time::Duration,
        /// Longest wait for the pool to level out before the next backend.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        balance_timeout: std::time::Duration,
    },
}

/// Prints a line to stdout, ignoring errors: a long-running sluice must not
/// die because whoever started it stopped reading its output.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let args = Args::parse();
    // `sluice run` logs in its config's format, set once it is read.
    if !matches!(args.command, Command::Run { .. }) {
        init_logging(sluice::config::LogFormat::Text);
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The diagnostic log, on stderr, filtered by `SLUICE_LOG` (default
/// `info`).
fn init_logging(format: sluice::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        sluice::config::LogFormat::Json => builder.json().init(),
        // Colours only for a terminal, not in log files and journals.
        sluice::config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Check { config } => {
            let cfg = sluice::config::load(&config)?;
            println!(
                "{}: ok ({} listener(s), {} pool(s), {} backend(s))",
                config.display(),
                cfg.listeners.len(),
                cfg.pools.len(),
                cfg.pools.iter().map(|p| p.backends.len()).sum::<usize>()
            );
            Ok(())
        }
        Command::Run { config } => {
            let cfg = sluice::config::load(&config);
            init_logging(cfg.as_ref().map(|c| c.log.format).unwrap_or_default());
            let cfg = cfg?;
            // Started by `sluice ctl upgrade`: take the sockets over first.
            let inherited =
                sluice::upgrade::inherit().context("taking over from the previous process")?;
            let upgrading = inherited.is_some();
            runtime(cfg.worker_threads)?.block_on(async {
                let signals = Signals::listen()?;
                let shutdown = CancellationToken::new();
                let options = sluice::Options {
                    inherited,
                    exec: sluice::upgrade::Exec::current(),
                };
                let running = sluice::start_with(cfg, shutdown.clone(), options).await?;
                if !upgrading {
                    print_admin(&running);
                }
                serve_until_signalled(running, shutdown, signals).await;
                Ok(())
            })
        }
        Command::EchoBackend { name, bind } => runtime(1)?.block_on(async {
            let backend = sluice::demo::EchoBackend::start(&name, bind)
                .await
                .with_context(|| format!("starting echo backend on {bind}"))?;
            say!("echo backend {name} on http://{}/", backend.addr);
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            Ok(())
        }),
        Command::Ctl {
            admin,
            token,
            config,
            command,
        } => {
            let client = admin_client(admin, token, config)?;
            runtime(1)?.block_on(ctl(client, command))
        }
        Command::Demo {
            bind,
            tls_bind,
            clients,
            rollout,
            window,
        } => runtime(0)?.block_on(demo(bind, tls_bind, clients, rollout, window)),
    }
}

async fn demo(
    bind: SocketAddr,
    tls_bind: SocketAddr,
    clients: usize,
    rollout: bool,
    window: std::time::Duration,
) -> anyhow::Result<()> {
    use std::time::Duration;
    let signals = Signals::listen()?;
    let shutdown = CancellationToken::new();
    let (backends, running) =
        sluice::demo::start(bind, Some(tls_bind), window, shutdown.clone()).await?;
    let addr = running.listeners[0].1;
    say!("sluice demo is running");
    say!("  page (open in a browser): http://{addr}/");
    say!("  websocket endpoint:       ws://{addr}/ws");
    if let Some(tls_addr) = running.addr("demo-tls") {
        say!("  page over TLS:            https://{tls_addr}/  (self-signed certificate)");
        say!("  secure websocket:         wss://{tls_addr}/ws");
    }
    for b in &backends {
        say!("  backend {}:            http://{}/", b.name, b.addr);
    }
    print_admin(&running);
    let chat = (clients > 0).then(|| {
        sluice::demo::clients::Clients::start(
            &format!("ws://{addr}/ws"),
            clients,
            Duration::from_secs(1),
        )
    });
    if chat.is_some() {
        say!("  {clients} chat clients started, one message a second each");
    }
    let report = |chat: Option<sluice::demo::clients::Clients>| async move {
        if let Some(chat) = chat {
            let report = chat.finish(Duration::from_secs(5)).await;
            say!("{report}");
        }
    };
    let mut signals = signals;
    if !rollout {
        say!("Press Ctrl-C to stop.");
        if chat.is_some() {
            // The clients' tally first, while sluice still serves them.
            tokio::select! {
                _ = signals.int.recv() => {}
                _ = signals.term.recv() => {}
            }
            report(chat).await;
            shutdown.cancel();
        }
        serve_until_signalled(running, shutdown, signals).await;
        return Ok(());
    }
    let admin = running
        .admin
        .as_ref()
        .map(|a| sluice::admin::client::AdminClient {
            addr: a.addr,
            token: Some(a.token.clone()),
        })
        .context("the demo has an admin API")?;
    let interrupted = async {
        tokio::select! {
            _ = signals.int.recv() => {}
            _ = signals.term.recv() => {}
        }
    };
    tokio::pin!(interrupted);
    let mut stopped = false;
    if let Some(chat) = &chat {
        // Let the clients connect and the pool settle, as it would be
        // before a deploy.
        let settle = async {
            let started = std::time::Instant::now();
            while chat.connected() < clients && started.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            say!("  {} of {clients} clients connected", chat.connected());
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        tokio::select! {
            () = settle => {}
            () = &mut interrupted => stopped = true,
        }
    }
    let pacing = sluice::ctl::Pacing {
        window: None,
        drain_timeout: window + Duration::from_secs(30),
        health_timeout: Duration::from_secs(30),
        balance_timeout: Duration::from_secs(30),
    };
    let backends = std::sync::Mutex::new(backends);
    let rolled = if stopped {
        Ok(())
    } else {
        say!("rolling restart of the demo backends, through sluice's rollout:");
        tokio::select! {
            rolled = sluice::demo::rolling_restart(&admin, &backends, &pacing) => rolled,
            () = &mut interrupted => {
                say!("interrupted: stopping the rollout");
                Ok(())
            }
        }
    };
    // A last moment of chat on the restarted pool, then the tally.
    tokio::time::sleep(Duration::from_secs(2)).await;
    report(chat).await;
    shutdown.cancel();
    running.wait().await;
    rolled.context("rolling restart")?;
    Ok(())
}

fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: everything runs on the main thread, no hand-offs.
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn print_admin(running: &sluice::Running) {
    if let Some(admin) = &running.admin {
        // A generated token is filled in (in the fragment, which the
        // browser keeps to itself); a configured one the page asks for.
        let fragment = if admin.generated {
            format!("#token={}", admin.token)
        } else {
            String::new()
        };
        say!(
            "  dashboard:                http://{}/{fragment}",
            admin.addr
        );
        say!(
            "  admin API:                http://{}/api/v1/status",
            admin.addr
        );
        say!("  metrics:                  http://{}/metrics", admin.addr);
        if admin.generated {
            say!("  admin token (generated):  {}", admin.token);
        }
    }
}

/// The signals sluice acts on, listened for before it starts: a signal
/// that arrives once it said it is ready (SIGHUP from `systemctl reload`)
/// must not meet the default action, which ends the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            hup: signal(SignalKind::hangup()).context("listening for SIGHUP")?,
            usr1: signal(SignalKind::user_defined1()).context("listening for SIGUSR1")?,
            usr2: signal(SignalKind::user_defined2()).context("listening for SIGUSR2")?,
        })
    }
}

/// Runs until sluice has shut down. First SIGTERM or Ctrl-C: drain and stop.
/// Second: close every WebSocket now. Third: drop everything. SIGHUP
/// reloads the config, SIGUSR1 reopens the access log file, SIGUSR2
/// upgrades the binary.
async fn serve_until_signalled(
    running: sluice::Running,
    shutdown: CancellationToken,
    signals: Signals,
) {
    let Signals {
        mut term,
        mut int,
        mut hup,
        mut usr1,
        mut usr2,
    } = signals;
    let registry = running.registry.clone();
    let reloader = running.reloader.clone();
    let upgrader = running.upgrader.clone();
    let handle = tokio::spawn(running.wait());
    let mut signals = 0;
    tokio::pin!(handle);
    loop {
        tokio::select! {
            _ = &mut handle => return,
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reading the config again");
                // The reload logs what changed, or why it was refused.
                let reloader = reloader.clone();
                tokio::spawn(async move { let _ = reloader.reload().await; });
                continue;
            }
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: reopening the access log");
                reloader.reopen_logs();
                continue;
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading the binary");
                // The upgrade logs how it went; on success this process drains.
                let upgrader = upgrader.clone();
                tokio::spawn(async move { let _ = upgrader.upgrade().await; });
                continue;
            }
        }
        signals += 1;
        match signals {
            1 => shutdown.cancel(),
            2 => {
                tracing::warn!("second signal: closing every WebSocket now");
                registry.close_all(sluice::SHUTDOWN_CLOSE_CODE);
            }
            _ => {
                tracing::warn!("third signal: dropping all connections");
                registry.abort_all();
            }
        }
    }
}

/// The admin address and token: flags, then environment, then the config.
fn admin_client(
    admin: Option<SocketAddr>,
    token: Option<String>,
    config: Option<PathBuf>,
) -> anyhow::Result<sluice::admin::client::AdminClient> {
    let from_config = match config {
        Some(path) => sluice::config::load(&path)?.admin,
        None => None,
    };
    let env_admin = match std::env::var("SLUICE_ADMIN") {
        Ok(text) => {
            Some(sluice::admin::client::parse_admin_addr(&text).context("reading SLUICE_ADMIN")?)
        }
        Err(_) => None,
    };
    let addr = admin
        .or(env_admin)
        .or(from_config.as_ref().map(|a| a.bind))
        .unwrap_or(sluice::config::AdminConfig::DEFAULT_BIND);
    let token = token
        .or_else(|| std::env::var("SLUICE_TOKEN").ok())
        .or(from_config.and_then(|a| a.token));
    Ok(sluice::admin::client::AdminClient { addr, token })
}

async fn ctl(
    client: sluice::admin::client::AdminClient,
    command: CtlCommand,
) -> anyhow::Result<()> {
    use sluice::ctl;
    match command {
        CtlCommand::Status { json } => ctl::status(&client, json).await?,
        CtlCommand::Drain {
            target,
            window,
            wait,
        } => ctl::drain(&client, &target, window.as_deref(), wait).await?,
        CtlCommand::Undrain { target } => ctl::undrain(&client, &target).await?,
        CtlCommand::Reload => ctl::reload(&client).await?,
        CtlCommand::Upgrade => ctl::upgrade(&client).await?,
        CtlCommand::Rollout {
            pool,
            exec,
            window,
            drain_timeout,
            health_timeout,
            balance_timeout,
        } => {
            let plan = ctl::Rollout {
                exec,
                pacing: ctl::Pacing {
                    window,
                    drain_timeout,
                    health_timeout,
                    balance_timeout,
                },
            };
            ctl::rollout(&client, &pool, &plan).await?
        }
    }
    Ok(())
}
