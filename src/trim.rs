//! Giving freed heap memory back to the operating system.
//!
//! Owns one background task. After a burst of connection setups (each
//! handshake briefly holds HTTP buffers) or after many WebSockets close,
//! glibc's allocator keeps the freed memory, so RSS would stay at its peak
//! and idle WebSockets would look several times more expensive than they
//! are. Every [`TRIM_INTERVAL`], when connections came or went since the
//! last look, the task asks the allocator to return free pages
//! (`malloc_trim`). It reads registry counters only and runs the trim on
//! the blocking pool, away from the data path.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// How often the task looks for connection churn.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(2);

/// Runs until `shutdown`.
pub async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut last = registry.churn_marker();
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = registry.churn_marker();
        if now != last {
            last = now;
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

/// Returns free heap pages to the OS, where the allocator supports it.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reads and adjusts the allocator's own state
    // under its locks; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
