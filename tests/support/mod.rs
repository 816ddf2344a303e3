//! Real backends, a real sluice and real clients on loopback ports.
//!
//! - `harness`: sluice as a library in the test process, its config and
//!   admin helpers;
//! - `clients`: WebSocket and HTTP clients;
//! - `backends`: raw scripted backends;
//! - `chat`: chatting clients for drain and rebalance load;
//! - `hammer`: clients opening connection after connection;
//! - `netns`: a network namespace whose link a test can take down;
//! - `process`: child processes, free ports, temp dirs (shared with the
//!   benches).

#![allow(dead_code)]

mod backends;
pub mod browser;
mod chat;
mod clients;
mod hammer;
mod harness;
pub mod netns;
pub mod pebble;
pub mod process;
pub mod redis;

pub use backends::*;
pub use chat::*;
pub use clients::*;
// Not used by every bench that includes this module.
#[allow(unused_imports)]
pub use hammer::*;
pub use harness::*;

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The admin token of test configs.
pub const ADMIN_TOKEN: &str = "test-token";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

/// Machine load, shared by every test that runs a sluice (a read guard
/// while one lives, see [`LoadShare`]) and taken whole by the tests that
/// run hundreds of clients ([`heavy`]), so that those run alone and their
/// timing assertions do not measure other tests. tokio's RwLock is fair: a
/// waiting heavy test holds back new tests until it has run.
static LOAD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

type ReadGuard = tokio::sync::RwLockReadGuard<'static, ()>;

thread_local! {
    /// This test thread holds the whole machine (`heavy`).
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This test thread's share, while a sluice of it holds one.
    static SHARE: std::cell::RefCell<std::sync::Weak<ReadGuard>> =
        const { std::cell::RefCell::new(std::sync::Weak::new()) };
}

/// The whole machine for one test with hundreds of clients; released on
/// drop.
pub struct Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'static, ()>);

impl Drop for Alone {
    fn drop(&mut self) {
        ALONE.set(false);
    }
}

/// Taken first by a test that runs hundreds of clients.
pub async fn heavy() -> Alone {
    let guard = LOAD.write().await;
    ALONE.set(true);
    Alone(guard)
}

/// A test's share of the machine, held by each `Sluice` it runs. One read
/// guard per test thread however many sluices it starts (a second read
/// behind a waiting heavy test would deadlock); it is released when the
/// last sluice holding it is dropped, on whatever thread.
pub struct LoadShare(#[allow(dead_code)] Option<std::sync::Arc<ReadGuard>>);

impl LoadShare {
    pub async fn take() -> Self {
        if ALONE.get() {
            return Self(None);
        }
        if let Some(share) = SHARE.with(|s| s.borrow().upgrade()) {
            return Self(Some(share));
        }
        let share = std::sync::Arc::new(LOAD.read().await);
        SHARE.with(|s| *s.borrow_mut() = std::sync::Arc::downgrade(&share));
        Self(Some(share))
    }
}

/// Fails a test that waits too long, instead of hanging CI.
/// Whether a tool a test needs is `installed`; without it the test is
/// skipped, or fails when `require` is set in the environment (`.ci/run`
/// sets it, so CI cannot skip it).
pub fn tool_present(installed: bool, require: &str, missing: &str) -> bool {
    if !installed {
        assert!(std::env::var_os(require).is_none(), "{missing}");
        eprintln!("skipped: {missing}");
    }
    installed
}

pub async fn within<F: std::future::Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

/// Waits until something accepts connections at `addr`.
pub async fn wait_listening(addr: std::net::SocketAddr) {
    within(10, "sluice listening", async {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The value on the Prometheus text line that starts with `line` (a name
/// with its labels); 0 when there is none.
pub fn metric(metrics: &str, line: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `cond` until it holds (or fails the test after `secs`).
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    within(secs, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
