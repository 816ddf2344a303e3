//! sluice itself, started as a library in the test process: its config,
//! its echo backends, its admin API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice::config::{AdminConfig, Algorithm, BackendConfig, Config, ListenerConfig, PoolConfig};
use sluice::demo::EchoBackend;
use tokio_util::sync::CancellationToken;

use super::*;

/// Demo echo backends named `b1`, `b2`, ...
pub async fn echo_backends(n: usize) -> Vec<EchoBackend> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(
            EchoBackend::start(&format!("b{i}"), SocketAddr::from(LOOPBACK))
                .await
                .expect("backend starts"),
        );
    }
    out
}

/// A sluice in this process, with one listener and one pool.
pub struct Sluice {
    pub running: Option<sluice::Running>,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    /// Its test's share of the machine (see `heavy`).
    _load: LoadShare,
}

/// Sticky cookies with a fixed key, as the tests use them.
pub fn test_sticky() -> sluice::config::StickyConfig {
    sluice::config::StickyConfig {
        secret: Some(b"test secret, at least 16 bytes".to_vec()),
        ..sluice::config::StickyConfig::default()
    }
}

/// A config with one listener on an ephemeral port and one pool of `addrs`.
pub fn config(addrs: &[SocketAddr]) -> Config {
    let backends = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| BackendConfig {
            name: format!("b{}", i + 1),
            address: *a,
            weight: 1,
            tls: None,
        })
        .collect();
    let mut pool = PoolConfig::new("app", backends);
    pool.algorithm = Algorithm::LeastConn;
    pool.connect_timeout = Duration::from_secs(2);
    pool.drain.close_timeout = Duration::from_secs(2);
    Config {
        listeners: vec![ListenerConfig::new("public", SocketAddr::from(LOOPBACK), 0)],
        pools: vec![pool],
        admin: Some(AdminConfig::new(
            SocketAddr::from(LOOPBACK),
            Some(ADMIN_TOKEN.to_string()),
        )),
        shutdown_timeout: Duration::from_secs(5),
        worker_threads: 0,
        upgrade_timeout: Config::DEFAULT_UPGRADE_TIMEOUT,
        log: sluice::config::LogConfig::default(),
        cluster: None,
        path: None,
    }
}

impl Sluice {
    pub async fn start(backends: &[&EchoBackend]) -> Self {
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        Self::with_config(config(&addrs)).await
    }

    pub async fn with_config(cfg: Config) -> Self {
        let load = LoadShare::take().await;
        let shutdown = CancellationToken::new();
        let running = sluice::start(cfg, shutdown.clone())
            .await
            .expect("sluice starts");
        let addr = running.listeners[0].1;
        Self {
            running: Some(running),
            addr,
            shutdown,
            _load: load,
        }
    }

    pub fn registry(&self) -> &Arc<sluice::registry::Registry> {
        &self.running.as_ref().expect("running").registry
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// A WebSocket client through sluice that accepts messages up to 64 MiB.
    pub async fn ws(&self, path: &str) -> Ws {
        ws_connect(&self.url(path)).await
    }

    /// Like `ws`, then reads the demo backend's greeting and returns its name.
    pub async fn ws_named(&self, path: &str) -> (Ws, String) {
        let mut ws = self.ws(path).await;
        let name = greeting(&mut ws).await;
        (ws, name)
    }

    /// Plain HTTP/1.1 client connection to sluice.
    pub async fn http(&self) -> HttpClient {
        HttpClient::connect(self.addr).await
    }

    /// Cancels and waits for sluice to finish.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            within(15, "sluice shutdown", running.wait()).await;
        }
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Sluice {
    /// The admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.running
            .as_ref()
            .expect("running")
            .admin
            .as_ref()
            .expect("admin enabled")
            .addr
    }

    /// A client of the admin API with the test token.
    pub fn admin(&self) -> sluice::admin::client::AdminClient {
        sluice::admin::client::AdminClient {
            addr: self.admin_addr(),
            token: Some(ADMIN_TOKEN.to_string()),
        }
    }

    /// The admin API's status document.
    /// `GET /metrics` of its admin API, as text.
    pub async fn metrics(&self) -> String {
        HttpClient::connect(self.admin_addr())
            .await
            .get("/metrics")
            .await
            .text()
    }

    pub async fn status(&self) -> sluice::admin::api::Status {
        within(10, "admin status", self.admin().status())
            .await
            .expect("admin status")
    }

    /// One backend of pool `app` as the status document shows it.
    pub async fn backend_status(&self, name: &str) -> sluice::admin::api::Backend {
        self.status()
            .await
            .backend("app", name)
            .unwrap_or_else(|| panic!("no backend app/{name} in the status"))
            .clone()
    }

    /// Polls the status until backend `name` of pool `app` is in `state`
    /// (or fails the test after `secs`); returns it as then shown.
    pub async fn wait_backend_state(
        &self,
        secs: u64,
        name: &str,
        state: sluice::admin::api::BackendState,
    ) -> sluice::admin::api::Backend {
        within(secs, &format!("app/{name} {state}"), async {
            loop {
                let backend = self.backend_status(name).await;
                if backend.state == state {
                    return backend;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}
