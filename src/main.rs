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
    /// Serve with a config file (SIGTERM or Ctrl-C closes WebSockets with 1001 and exits).
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
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            ExitCode::FAILURE
        }
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
            let cfg = sluice::config::load(&config)?;
            runtime(cfg.worker_threads)?.block_on(async {
                let shutdown = CancellationToken::new();
                let running = sluice::start(cfg, shutdown.clone()).await?;
                let registry = running.registry.clone();
                tokio::spawn(on_signals(shutdown, registry));
                running.wait().await;
                Ok(())
            })
        }
        Command::Demo { bind } => runtime(0)?.block_on(async {
            let shutdown = CancellationToken::new();
            let (backends, running) = sluice::demo::start(bind, shutdown.clone()).await?;
            let addr = running.listeners[0].1;
            println!("sluice demo is running");
            println!("  page (open in a browser): http://{addr}/");
            println!("  websocket endpoint:       ws://{addr}/ws");
            for b in &backends {
                println!("  backend {}:            http://{}/", b.name, b.addr);
            }
            println!("Press Ctrl-C to stop.");
            let registry = running.registry.clone();
            tokio::spawn(on_signals(shutdown, registry));
            running.wait().await;
            Ok(())
        }),
    }
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

/// First SIGTERM or Ctrl-C: graceful shutdown. Second: drop everything now.
async fn on_signals(
    shutdown: CancellationToken,
    registry: std::sync::Arc<sluice::registry::Registry>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals");
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if round == 0 {
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: dropping all connections now");
            registry.abort_all();
        }
    }
}
