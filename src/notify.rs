//! Telling the service manager (systemd, `Type=notify`) what sluice does:
//! ready, reloading, stopping, and which process is the main one after a
//! binary upgrade. The protocol is the `sd-notify` crate's; without
//! `NOTIFY_SOCKET` in the environment every call does nothing.

use sd_notify::NotifyState;
use tracing::warn;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "could not notify the service manager");
    }
}

/// Started: listeners bound, admin API serving (or a reload is done).
pub fn ready() {
    notify(&[NotifyState::Ready]);
}

/// A config reload begins (with the time, as `Type=notify-reload` wants).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// Shutting down.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// After a binary upgrade: the new process is the service's main process.
pub fn main_pid(pid: u32) {
    notify(&[NotifyState::MainPid(pid), NotifyState::Ready]);
}
