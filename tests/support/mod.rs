//! Real backends, a real sluice and real clients on loopback ports.
//!
//! - `harness`: sluice as a library in the test process, its config and
//!   admin helpers;
//! - `clients`: WebSocket and HTTP clients;
//! - `backends`: raw scripted backends;
//! - `chat`: chatting clients for drain and rebalance load;
//! - `process`: child processes, free ports, temp dirs (shared with the
//!   benches).

#![allow(dead_code)]

mod backends;
mod chat;
mod clients;
mod harness;
pub mod process;

pub use backends::*;
pub use chat::*;
pub use clients::*;
pub use harness::*;

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The admin token of test configs.
pub const ADMIN_TOKEN: &str = "test-token";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

/// Taken by the tests that run hundreds of clients, so that no two of them
/// load the machine at once (their timing assertions would then measure
/// each other). Others run alongside as usual.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Fails a test that waits too long, instead of hanging CI.
pub async fn within<F: std::future::Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
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
