//! `sluice ctl`: operating a running sluice through its admin API.
//!
//! Owns the operator's commands: status table, drain (optionally waiting
//! until the backend is empty), undrain, and rollout (drain, restart, wait
//! healthy, undrain, one backend at a time). Talks HTTP to the admin API
//! only; holds no state of its own.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::admin::api;
use crate::admin::client::{AdminClient, ClientError};

/// How often waits poll the status.
const POLL: Duration = Duration::from_millis(250);

/// Why a ctl command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("expected POOL/BACKEND, got {0:?}")]
    BadTarget(String),
    #[error("no pool named {0:?}")]
    UnknownPool(String),
    #[error("{0}")]
    Rollout(String),
}

fn split_target(target: &str) -> Result<(&str, &str), CtlError> {
    match target.split_once('/') {
        Some((p, b)) if !p.is_empty() && !b.is_empty() && !b.contains('/') => Ok((p, b)),
        _ => Err(CtlError::BadTarget(target.to_string())),
    }
}

/// The status as a table (or as pretty-printed JSON).
pub async fn status(client: &AdminClient, raw_json: bool) -> Result<(), CtlError> {
    let status = client.status().await?;
    if raw_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("the status document always serializes")
        );
        return Ok(());
    }
    let rows: Vec<[String; 7]> = status
        .backends()
        .map(|b| {
            let drain = b.drain.map_or("-".to_string(), |d| {
                format!(
                    "{}/{} closed, {:.1}s of {:.1}s",
                    d.closed,
                    d.planned,
                    d.elapsed_ms as f64 / 1000.0,
                    d.window_ms as f64 / 1000.0
                )
            });
            [
                b.pool.clone(),
                b.name.clone(),
                b.address.clone(),
                if b.removed {
                    format!("{} (removed)", b.state)
                } else {
                    b.state.to_string()
                },
                b.connections.ws.to_string(),
                b.connections.http.to_string(),
                drain,
            ]
        })
        .collect();
    print_table(
        &["POOL", "BACKEND", "ADDRESS", "STATE", "WS", "HTTP", "DRAIN"],
        &rows,
    );
    if let Some(config) = &status.config {
        let loaded = std::time::UNIX_EPOCH + Duration::from_millis(config.loaded_at_ms);
        let ago = loaded.elapsed().unwrap_or_default().as_secs();
        println!(
            "config generation {} ({}), loaded {ago}s ago",
            config.generation,
            config.path.as_deref().unwrap_or("built in")
        );
    }
    if status.processes.len() > 1 {
        for p in &status.processes {
            println!("process {} {}: {} WebSockets", p.pid, p.role, p.websockets);
        }
    }
    if let Some(cluster) = &status.cluster {
        print_cluster(cluster);
    }
    Ok(())
}

/// The instances of the cluster and the cluster-wide totals per backend.
fn print_cluster(cluster: &api::Cluster) {
    println!(
        "cluster: this is {}; Redis {}",
        cluster.instance,
        if cluster.redis_up {
            "up"
        } else {
            "unreachable (balancing on this instance's own counts)"
        }
    );
    let mut totals: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    let mut rows = Vec::new();
    for i in &cluster.instances {
        for b in &i.backends {
            *totals.entry((&b.pool, &b.backend)).or_default() += b.connections;
            rows.push([
                i.name.clone(),
                b.pool.clone(),
                b.backend.clone(),
                b.connections.to_string(),
            ]);
        }
    }
    for ((pool, backend), n) in &totals {
        rows.push([
            "(cluster)".into(),
            pool.to_string(),
            backend.to_string(),
            n.to_string(),
        ]);
    }
    print_table(&["INSTANCE", "POOL", "BACKEND", "CONNECTIONS"], &rows);
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Reads the config again: prints each change, or the errors (`Err`, so
/// the command exits non-zero).
pub async fn reload(client: &AdminClient) -> Result<(), CtlError> {
    let report = client.reload().await?;
    if report.changes.is_empty() {
        println!(
            "reloaded: nothing changed (config generation {})",
            report.generation
        );
    } else {
        println!("reloaded: config generation {}", report.generation);
        for change in &report.changes {
            println!("  {change}");
        }
    }
    Ok(())
}

/// Upgrades the binary: prints both processes, or the failure (`Err`).
pub async fn upgrade(client: &AdminClient) -> Result<(), CtlError> {
    let report = client.upgrade().await?;
    println!(
        "upgraded: process {} serves; process {} stopped accepting and drains its WebSockets",
        report.new_pid, report.old_pid
    );
    Ok(())
}

/// Drains POOL/BACKEND; with `wait`, prints progress until it is empty.
pub async fn drain(
    client: &AdminClient,
    target: &str,
    window: Option<&str>,
    wait: bool,
) -> Result<(), CtlError> {
    let (pool, backend) = split_target(target)?;
    let view = client.drain(pool, backend, window).await?;
    let window_ms = view.drain.map_or(0, |d| d.window_ms);
    println!(
        "{pool}/{backend}: draining over {:.1}s ({} connections)",
        window_ms as f64 / 1000.0,
        view.connections.total()
    );
    if wait {
        wait_empty(client, pool, backend, None).await?;
    }
    Ok(())
}

/// Polls until POOL/BACKEND has no connection, printing each change.
async fn wait_empty(
    client: &AdminClient,
    pool: &str,
    backend: &str,
    limit: Option<Duration>,
) -> Result<(), CtlError> {
    let started = Instant::now();
    let mut last = None;
    loop {
        let status = client.status().await?;
        let view = status
            .backend(pool, backend)
            .ok_or_else(|| CtlError::BadTarget(format!("{pool}/{backend}")))?;
        // In cluster mode, through every instance.
        let (others, _) = status
            .cluster
            .as_ref()
            .map_or((0, 0), |c| c.others_on(pool, backend));
        let left = view.connections.total() + others;
        if last != Some(left) {
            let wide = if status.cluster.is_some() {
                " (cluster-wide)"
            } else {
                ""
            };
            println!("{pool}/{backend}: {left} connections left{wide}");
            last = Some(left);
        }
        if left == 0 {
            println!("{pool}/{backend}: drained");
            return Ok(());
        }
        if limit.is_some_and(|l| started.elapsed() > l) {
            return Err(CtlError::Rollout(format!(
                "{pool}/{backend} still has {left} connections after {:?}",
                started.elapsed()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn find(client: &AdminClient, pool: &str, backend: &str) -> Result<api::Backend, CtlError> {
    let status = client.status().await?;
    status
        .backend(pool, backend)
        .cloned()
        .ok_or_else(|| CtlError::BadTarget(format!("{pool}/{backend}")))
}

/// Puts POOL/BACKEND back in rotation.
pub async fn undrain(client: &AdminClient, target: &str) -> Result<(), CtlError> {
    let (pool, backend) = split_target(target)?;
    client.undrain(pool, backend).await?;
    println!("{pool}/{backend}: back in rotation");
    Ok(())
}

/// Rollout settings.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Shell command run for each backend; `{backend}` and `{address}` are
    /// replaced by its name and address.
    pub exec: String,
    pub pacing: Pacing,
}

/// How a rollout waits at each step.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// Drain window (the pool's when `None`).
    pub window: Option<String>,
    /// Longest wait for a drained backend to be empty.
    pub drain_timeout: Duration,
    /// Longest wait for a restarted backend to accept connections.
    pub health_timeout: Duration,
    /// Longest wait for the pool to level out before the next backend.
    pub balance_timeout: Duration,
}

/// Restarts the backends of `pool` one at a time: drain and wait empty, run
/// the command, wait until the backend accepts connections, undrain, wait
/// for the pool to level out (or the timeout), next. Stops at the first
/// failure and leaves that backend drained.
pub async fn rollout(client: &AdminClient, pool: &str, plan: &Rollout) -> Result<(), CtlError> {
    rollout_with(client, pool, &plan.pacing, |step, b| {
        let command = plan
            .exec
            .replace("{backend}", &b.name)
            .replace("{address}", &b.address);
        println!("{step}: running {command}");
        async move {
            let exit = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .status()
                .await
                .map_err(|e| format!("cannot run the command: {e}"))?;
            if exit.success() {
                Ok(())
            } else {
                Err(format!("command failed ({exit})"))
            }
        }
    })
    .await
}

/// `rollout`, with `restart` as the step that restarts a drained backend
/// (called with the step's label and the backend; `Err` says why it
/// failed).
pub async fn rollout_with<F, Fut>(
    client: &AdminClient,
    pool: &str,
    plan: &Pacing,
    mut restart: F,
) -> Result<(), CtlError>
where
    F: FnMut(&str, &api::Backend) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let status = client.status().await?;
    let targets: Vec<api::Backend> = status
        .backends()
        .filter(|b| b.pool == pool)
        .cloned()
        .collect();
    if targets.is_empty() {
        return Err(CtlError::UnknownPool(pool.to_string()));
    }
    let n = targets.len();
    for (i, b) in targets.iter().enumerate() {
        let step = format!("[{}/{n}] {pool}/{}", i + 1, b.name);
        println!("{step}: draining");
        client.drain(pool, &b.name, plan.window.as_deref()).await?;
        wait_empty(client, pool, &b.name, Some(plan.drain_timeout)).await?;
        restart(&step, b)
            .await
            .map_err(|why| CtlError::Rollout(format!("{step}: {why}; {} left drained", b.name)))?;
        let restarted = Instant::now();
        println!("{step}: waiting until sluice sees it healthy");
        wait_healthy(client, pool, b, restarted, plan.health_timeout)
            .await
            .map_err(|why| CtlError::Rollout(format!("{step}: {why}; {} left drained", b.name)))?;
        client.undrain(pool, &b.name).await?;
        println!("{step}: back in rotation");
        match wait_balanced(client, pool, plan.balance_timeout).await? {
            Ok(()) => println!("{step}: pool is level"),
            Err(counts) => println!(
                "{step}: pool not level after {:?} ({counts}); going on",
                plan.balance_timeout
            ),
        }
    }
    println!("rollout of {pool} done: {n} backends restarted");
    Ok(())
}

/// Waits until sluice's own health checks pass `backend` with a check
/// that finished after `since` (the restart). A pool without active checks
/// gives no verdict: then `ctl` waits until the backend accepts a TCP
/// connection from where it runs.
async fn wait_healthy(
    client: &AdminClient,
    pool: &str,
    backend: &api::Backend,
    since: Instant,
    limit: Duration,
) -> Result<(), String> {
    loop {
        let view = find(client, pool, &backend.name)
            .await
            .map_err(|e| e.to_string())?;
        let Some(check) = view.last_check else {
            let addr: SocketAddr = backend
                .address
                .parse()
                .map_err(|_| format!("bad address {}", backend.address))?;
            println!(
                "  (pool {pool} has no health checks: waiting until {addr} accepts a connection from here)"
            );
            return wait_accepting(addr, limit.saturating_sub(since.elapsed()))
                .await
                .map_err(|()| format!("{addr} not accepting after {limit:?}"));
        };
        let after_restart = Duration::from_millis(check.ago_ms) < since.elapsed();
        if after_restart && check.ok {
            return Ok(());
        }
        if since.elapsed() >= limit {
            return Err(format!("not healthy by its health checks after {limit:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_accepting(addr: SocketAddr, limit: Duration) -> Result<(), ()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
        {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    Err(())
}

/// `Ok` once every backend of `pool` that takes connections (in rotation
/// and healthy, the one just back included) holds at least 80 % of its
/// weighted share of the pool's WebSockets; after `limit`, `Err` with each
/// backend's count and share.
async fn wait_balanced(
    client: &AdminClient,
    pool: &str,
    limit: Duration,
) -> Result<Result<(), String>, CtlError> {
    let started = Instant::now();
    loop {
        let status = client.status().await?;
        let up: Vec<&api::Backend> = status
            .backends()
            .filter(|b| b.pool == pool && !b.removed && b.state.is_in_rotation())
            .collect();
        let weight = |b: &api::Backend| u64::from(b.weight.max(1));
        // In cluster mode, through every instance.
        let ws = |b: &api::Backend| {
            b.connections.ws
                + status
                    .cluster
                    .as_ref()
                    .map_or(0, |c| c.others_on(pool, &b.name).1)
        };
        let total: u64 = up.iter().map(|b| ws(b)).sum();
        let weights: u64 = up.iter().map(|b| weight(b)).sum::<u64>().max(1);
        let share = |b: &api::Backend| total as f64 * weight(b) as f64 / weights as f64;
        if up.iter().all(|b| ws(b) as f64 >= 0.8 * share(b)) {
            return Ok(Ok(()));
        }
        if started.elapsed() >= limit {
            let counts: Vec<String> = up
                .iter()
                .map(|b| format!("{} {} of a share of {:.0}", b.name, ws(b), share(b)))
                .collect();
            return Ok(Err(counts.join(", ")));
        }
        tokio::time::sleep(POLL).await;
    }
}
