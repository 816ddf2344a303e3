//! Binary upgrade: a new sluice process takes the listening sockets over,
//! so no connection attempt is refused, and the old one drains.
//!
//! The old process (`Upgrader::upgrade`) starts the binary at the path it
//! was started from, with the same arguments and `SLUICE_UPGRADE_SOCKET`
//! naming a Unix socket in a private directory. The new process
//! (`inherit`, before it starts) connects and receives, in one message,
//! a manifest (`Manifest`: the listeners by name and address, the admin
//! API, the sticky-cookie keys and a generated admin token) and the
//! listening sockets themselves (SCM_RIGHTS, with the `sendfd` crate).
//! Both processes accept on the same sockets until the new one has
//! started everything and writes `ready`; then the old one stops
//! accepting and drains its WebSockets over each pool's drain window with
//! the pool's close code (1012), like a drain of every backend, and exits.
//! Until it does, it writes a status line a second to the new process,
//! which shows it in `/api/v1/status`. A new process that exits, fails to
//! load its config or is not ready within `upgrade_timeout` is stopped
//! and the old one keeps serving.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sendfd::{RecvWithFd as _, SendWithFd as _};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::drain::MovedPin;
use crate::registry::Registry;
use crate::reload::Reloader;

/// The variable that tells a new process where its predecessor waits.
pub const SOCKET_ENV: &str = "SLUICE_UPGRADE_SOCKET";

/// Most listening sockets one handover carries (the kernel's SCM_MAX_FD
/// is 253).
const MAX_FDS: usize = 250;

/// How often the old process tells the new one how far its drain is.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What the old process hands over besides the sockets, which follow in
/// this order: `listeners`, then the admin API's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub old_pid: u32,
    /// Each listener's name and configured address.
    pub listeners: Vec<(String, SocketAddr)>,
    /// The admin API's configured address, when its socket is handed over.
    pub admin: Option<SocketAddr>,
    /// The admin token, when the old process generated it (none was
    /// configured): the operator's token keeps working.
    pub admin_token: Option<String>,
    /// Sticky-cookie keys of pools without `secret_file` (hex): pins
    /// survive the upgrade.
    pub sticky_keys: Vec<(String, String)>,
}

/// What a new process got from its predecessor.
#[derive(Debug)]
pub struct Inherited {
    pub old_pid: u32,
    pub listeners: Vec<(String, SocketAddr, std::net::TcpListener)>,
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    pub admin_token: Option<String>,
    pub sticky_keys: HashMap<String, [u8; 32]>,
    /// To say `ready`, then to hear how the old process's drain goes.
    pub link: StdUnixStream,
}

/// Why an upgrade did not happen; the old process keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already under way")]
    InProgress,
    #[error("the previous process (pid {0}) is still draining; upgrade again once it has exited")]
    PredecessorRunning(u32),
    #[error("this sluice was not started by the sluice binary: there is nothing to start again")]
    NotAvailable,
    #[error("sluice is shutting down")]
    ShuttingDown,
    #[error("preparing the handover socket")]
    Socket(#[source] io::Error),
    #[error("starting {}", path.display())]
    Spawn { path: PathBuf, source: io::Error },
    #[error("the new process (pid {pid}) exited with {status} before it was ready")]
    Exited {
        pid: u32,
        status: std::process::ExitStatus,
    },
    #[error("the new process (pid {pid}) was not ready within {timeout:?}: stopped it")]
    Timeout { pid: u32, timeout: Duration },
    #[error("handing the sockets to the new process (pid {pid})")]
    Handover { pid: u32, source: io::Error },
}

/// Why a new process could not take over from its predecessor.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("connecting to the previous process at {}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("receiving the listening sockets")]
    Receive(#[source] io::Error),
    #[error("the previous process sent an unreadable manifest")]
    Manifest(#[source] serde_json::Error),
    #[error("the previous process sent {got} sockets for {expected}")]
    Sockets { got: usize, expected: usize },
}

/// A finished handover, from the old process's side.
#[derive(Debug, Clone, Copy)]
pub struct Upgraded {
    pub old_pid: u32,
    pub new_pid: u32,
}

/// How the old process's drain goes, as it reports it to the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Predecessor {
    pub pid: u32,
    /// Its WebSockets left.
    pub websockets: u64,
}

/// The binary and arguments to start again.
#[derive(Debug, Clone)]
pub struct Exec {
    pub path: PathBuf,
    pub args: Vec<OsString>,
}

impl Exec {
    /// This process's binary as it was started: `argv[0]`, made absolute
    /// when it is a path and left to the `PATH` search when it is a bare
    /// name (so an upgrade starts whatever is installed there now, as
    /// HAProxy and nginx do, also after the old file was replaced); and
    /// its arguments.
    pub fn current() -> Option<Self> {
        let mut args = std::env::args_os();
        let argv0 = PathBuf::from(args.next()?);
        let path = if argv0.components().count() > 1 {
            std::path::absolute(&argv0).ok()?
        } else {
            argv0
        };
        Some(Self {
            path,
            args: args.collect(),
        })
    }
}

/// What the old process hands over, gathered when an upgrade starts.
struct Handover {
    manifest: Manifest,
    /// In the manifest's order.
    fds: Vec<OwnedFd>,
}

/// The admin API's socket, for a handover.
struct AdminSocket {
    bind: SocketAddr,
    fd: OwnedFd,
    generated_token: Option<String>,
}

/// Starts upgrades of this process and remembers its predecessor.
pub struct Upgrader {
    exec: Option<Exec>,
    reloader: Arc<Reloader>,
    registry: Arc<Registry>,
    admin: Mutex<Option<AdminSocket>>,
    started: AtomicBool,
    /// Set when the new process is ready: this one then drains and exits.
    pub handed_over: CancellationToken,
    predecessor: Arc<Mutex<Option<Predecessor>>>,
    /// After the handover: where this process's drain sends the sticky
    /// pins it moves, for the new process (taken once).
    moved_feed: Mutex<Option<UnboundedSender<MovedPin>>>,
}

/// Pins of `pool` whose WebSocket the old process closed after the
/// handover, as it tells the new one (a status line of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MovedLine {
    pool: String,
    moved: Vec<u64>,
}

impl Upgrader {
    pub fn new(exec: Option<Exec>, reloader: Arc<Reloader>, registry: Arc<Registry>) -> Self {
        Self {
            exec,
            reloader,
            registry,
            admin: Mutex::new(None),
            started: AtomicBool::new(false),
            handed_over: CancellationToken::new(),
            predecessor: Arc::default(),
            moved_feed: Mutex::new(None),
        }
    }

    /// The admin API's socket (configured on `bind`), handed over too, and
    /// its token when it was generated.
    pub fn set_admin(&self, bind: SocketAddr, fd: OwnedFd, generated_token: Option<String>) {
        *lock(&self.admin) = Some(AdminSocket {
            bind,
            fd,
            generated_token,
        });
    }

    /// The previous process, while it still drains.
    pub fn predecessor(&self) -> Option<Predecessor> {
        *lock(&self.predecessor)
    }

    /// Starts the new process, hands it the listening sockets, waits up to
    /// `upgrade_timeout` for it to be ready and then marks this one handed
    /// over (it stops accepting and drains). On any failure the new
    /// process is stopped and this one serves on. The work runs on a task
    /// of its own: a caller that goes away (a client that hangs up) does
    /// not leave it half done.
    pub async fn upgrade(self: &Arc<Self>) -> Result<Upgraded, UpgradeError> {
        if self.exec.is_none() {
            return Err(UpgradeError::NotAvailable);
        }
        if self.handed_over.is_cancelled() {
            return Err(UpgradeError::ShuttingDown);
        }
        if let Some(p) = self.predecessor() {
            return Err(UpgradeError::PredecessorRunning(p.pid));
        }
        if self.started.swap(true, Ordering::AcqRel) {
            return Err(UpgradeError::InProgress);
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            let result = this.upgrade_now().await;
            match &result {
                Ok(done) => {
                    info!(
                        old.pid = done.old_pid,
                        new.pid = done.new_pid,
                        "upgrade: the new process is ready; this one stops accepting and drains"
                    );
                    // The service manager follows the new process from now on.
                    crate::notify::main_pid(done.new_pid);
                    this.handed_over.cancel();
                }
                Err(error) => {
                    warn!(error = %crate::error_chain::chain(error), "upgrade failed; this process keeps serving");
                    this.started.store(false, Ordering::Release);
                }
            }
            result
        });
        match task.await {
            Ok(result) => result,
            // Only a panic gets here; the upgrade did not happen.
            Err(error) => {
                self.started.store(false, Ordering::Release);
                Err(UpgradeError::Socket(io::Error::other(error.to_string())))
            }
        }
    }

    async fn upgrade_now(&self) -> Result<Upgraded, UpgradeError> {
        let exec = self.exec.as_ref().ok_or(UpgradeError::NotAvailable)?;
        let cfg = self
            .reloader
            .config()
            .await
            .ok_or(UpgradeError::ShuttingDown)?;
        let handover = self.gather().await.map_err(UpgradeError::Socket)?;
        let registry = self.registry.clone();
        self.run(exec, handover, cfg.upgrade_timeout, move || {
            registry.ws_total()
        })
        .await
    }

    /// After the handover: where the drain sends the sticky pins it moves,
    /// so that the new process places their clients afresh.
    pub fn moved_feed(&self) -> Option<UnboundedSender<MovedPin>> {
        lock(&self.moved_feed).take()
    }

    /// After the handover: the duplicates of the sockets are the new
    /// process's business now (a listener it removes must close).
    pub fn release_admin(&self) {
        lock(&self.admin).take();
    }

    /// The manifest and the sockets it names.
    async fn gather(&self) -> io::Result<Handover> {
        let handed = self.reloader.handover().await?;
        let mut fds = Vec::with_capacity(handed.listeners.len() + 1);
        let mut listeners = Vec::with_capacity(handed.listeners.len());
        for (name, bind, fd) in handed.listeners {
            listeners.push((name, bind));
            fds.push(fd);
        }
        let (admin, admin_token) = match &*lock(&self.admin) {
            Some(a) => {
                fds.push(a.fd.try_clone()?);
                (Some(a.bind), a.generated_token.clone())
            }
            None => (None, None),
        };
        if fds.len() > MAX_FDS {
            return Err(io::Error::other(format!(
                "{} listening sockets: at most {MAX_FDS} can be handed over",
                fds.len()
            )));
        }
        Ok(Handover {
            manifest: Manifest {
                old_pid: std::process::id(),
                listeners,
                admin,
                admin_token,
                sticky_keys: handed
                    .sticky_keys
                    .iter()
                    .map(|(pool, key)| (pool.clone(), key_hex(key)))
                    .collect(),
            },
            fds,
        })
    }

    async fn run(
        &self,
        exec: &Exec,
        handover: Handover,
        timeout: Duration,
        websockets: impl Fn() -> usize + Send + 'static,
    ) -> Result<Upgraded, UpgradeError> {
        let dir = PrivateDir::new().map_err(UpgradeError::Socket)?;
        let path = dir.0.join("handover.sock");
        let listener = UnixListener::bind(&path).map_err(UpgradeError::Socket)?;
        let mut child = tokio::process::Command::new(&exec.path)
            .args(&exec.args)
            .env(SOCKET_ENV, &path)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                path: exec.path.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        info!(new.pid = pid, path = %exec.path.display(), "upgrade: started the new process");
        let deadline = tokio::time::Instant::now() + timeout;
        let outcome = async {
            let stream = tokio::select! {
                accepted = listener.accept() => accepted.map_err(|source| UpgradeError::Handover { pid, source })?.0,
                status = child.wait() => return Err(exited(pid, status)),
                () = tokio::time::sleep_until(deadline) => return Err(UpgradeError::Timeout { pid, timeout }),
            };
            let stream = send(stream, handover)
                .await
                .map_err(|source| UpgradeError::Handover { pid, source })?;
            let mut lines = BufReader::new(stream);
            let mut line = String::new();
            tokio::select! {
                read = lines.read_line(&mut line) => {
                    read.map_err(|source| UpgradeError::Handover { pid, source })?;
                }
                status = child.wait() => return Err(exited(pid, status)),
                () = tokio::time::sleep_until(deadline) => return Err(UpgradeError::Timeout { pid, timeout }),
            }
            if line.trim() != "ready" {
                // It closed the link without a word: it failed; its own
                // log says why. Wait briefly for its exit status.
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                return match status {
                    Ok(status) => Err(exited(pid, status)),
                    Err(_) => Err(UpgradeError::Timeout { pid, timeout }),
                };
            }
            Ok(lines.into_inner())
        }
        .await;
        let stream = match outcome {
            Ok(stream) => stream,
            Err(error) => {
                // Two processes must not go on sharing the sockets.
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                return Err(error);
            }
        };
        drop(dir);
        let (feed, moved) = tokio::sync::mpsc::unbounded_channel();
        *lock(&self.moved_feed) = Some(feed);
        // The child lives on when this process exits; it is not waited for.
        tokio::spawn(report_status(stream, websockets, moved));
        Ok(Upgraded {
            old_pid: std::process::id(),
            new_pid: pid,
        })
    }
}

fn exited(pid: u32, status: io::Result<std::process::ExitStatus>) -> UpgradeError {
    match status {
        Ok(status) => UpgradeError::Exited { pid, status },
        Err(source) => UpgradeError::Handover { pid, source },
    }
}

/// Sends the manifest's length with the sockets, then the manifest.
async fn send(
    stream: tokio::net::UnixStream,
    handover: Handover,
) -> io::Result<tokio::net::UnixStream> {
    let std = stream.into_std()?;
    let std = tokio::task::spawn_blocking(move || -> io::Result<StdUnixStream> {
        std.set_nonblocking(false)?;
        let body = serde_json::to_vec(&handover.manifest).map_err(io::Error::other)?;
        let fds: Vec<RawFd> = handover.fds.iter().map(|f| f.as_raw_fd()).collect();
        let len = (body.len() as u32).to_be_bytes();
        let sent = std.send_with_fd(&len, &fds)?;
        let mut rest = len[sent..].to_vec();
        rest.extend_from_slice(&body);
        std::io::Write::write_all(&mut &std, &rest)?;
        std.set_nonblocking(true)?;
        Ok(std)
    })
    .await
    .map_err(io::Error::other)??;
    tokio::net::UnixStream::from_std(std)
}

/// Writes how many WebSockets this (old) process has left, every second,
/// and the sticky pins its drain moves as soon as they are moved (before
/// their clients can come back), until it exits or the new process goes
/// away.
async fn report_status(
    mut stream: tokio::net::UnixStream,
    websockets: impl Fn() -> usize + Send + 'static,
    mut moved: UnboundedReceiver<MovedPin>,
) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    let mut feeding = true;
    let mut waiting = Vec::new();
    loop {
        let mut out = Vec::new();
        tokio::select! {
            _ = tick.tick() => {
                let status = Predecessor {
                    pid: std::process::id(),
                    websockets: websockets() as u64,
                };
                push_line(&mut out, &status);
            }
            pin = moved.recv(), if feeding => {
                let Some(first) = pin else {
                    feeding = false; // every drain is done
                    continue;
                };
                // Whatever else is queued goes in the same write.
                let mut by_pool: HashMap<String, Vec<u64>> = HashMap::new();
                let mut next = Some(first);
                while let Some((pool, nonce, told)) = next {
                    by_pool.entry(pool).or_default().push(nonce);
                    waiting.push(told);
                    next = moved.try_recv().ok();
                }
                for (pool, moved) in by_pool {
                    push_line(&mut out, &MovedLine { pool, moved });
                }
            }
        }
        let written = stream.write_all(&out).await;
        // Their WebSockets may close now (when the link broke too: the
        // pins then stay good).
        for told in waiting.drain(..) {
            let _ = told.send(());
        }
        if written.is_err() {
            return;
        }
    }
}

/// Appends `value` as one line of JSON.
fn push_line(out: &mut Vec<u8>, value: &impl Serialize) {
    // Plain structs of numbers and strings: serializing cannot fail.
    if serde_json::to_writer(&mut *out, value).is_ok() {
        out.push(b'\n');
    }
}

/// In a new process started by an upgrade: connects to the predecessor and
/// takes the sockets over. `Ok(None)` when this is no upgrade.
pub fn inherit() -> Result<Option<Inherited>, InheritError> {
    let Some(path) = std::env::var_os(SOCKET_ENV).map(PathBuf::from) else {
        return Ok(None);
    };
    let link = StdUnixStream::connect(&path).map_err(|source| InheritError::Connect {
        path: path.clone(),
        source,
    })?;
    let mut len = [0u8; 4];
    let mut raw = [0 as RawFd; MAX_FDS];
    let (got, nfds) = link
        .recv_with_fd(&mut len, &mut raw)
        .map_err(InheritError::Receive)?;
    // SAFETY: the kernel has just installed these descriptors in this
    // process for us (SCM_RIGHTS); nothing else owns them.
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    // Received descriptors are not close-on-exec: without this, every
    // later upgrade would pass them on to a process that knows nothing of
    // them, keeping ports open that a reload closed.
    let mut fds = fds
        .into_iter()
        .map(|fd| {
            let socket = socket2::Socket::from(fd);
            socket.set_cloexec(true).map(|()| OwnedFd::from(socket))
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(InheritError::Receive)?;
    (&link)
        .read_exact(&mut len[got..])
        .map_err(InheritError::Receive)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    (&link)
        .read_exact(&mut body)
        .map_err(InheritError::Receive)?;
    let manifest: Manifest = serde_json::from_slice(&body).map_err(InheritError::Manifest)?;
    let expected = manifest.listeners.len() + usize::from(manifest.admin.is_some());
    if fds.len() != expected {
        return Err(InheritError::Sockets {
            got: fds.len(),
            expected,
        });
    }
    let admin_fd = manifest.admin.is_some().then(|| fds.pop()).flatten();
    let listeners = manifest
        .listeners
        .into_iter()
        .zip(fds)
        .map(|((name, bind), fd)| (name, bind, std::net::TcpListener::from(fd)))
        .collect();
    let admin = manifest
        .admin
        .zip(admin_fd)
        .map(|(bind, fd)| (bind, std::net::TcpListener::from(fd)));
    let sticky_keys = manifest
        .sticky_keys
        .into_iter()
        .filter_map(|(pool, hex)| Some((pool, parse_key(&hex)?)))
        .collect();
    Ok(Some(Inherited {
        old_pid: manifest.old_pid,
        listeners,
        admin,
        admin_token: manifest.admin_token,
        sticky_keys,
        link,
    }))
}

impl Upgrader {
    /// In the new process, once everything is serving: tells the old one,
    /// then follows its drain until it exits.
    pub fn ready(&self, link: StdUnixStream, old_pid: u32) {
        let predecessor = self.predecessor.clone();
        let registry = self.registry.clone();
        *lock(&predecessor) = Some(Predecessor {
            pid: old_pid,
            websockets: 0,
        });
        tokio::spawn(async move {
            let follow = async {
                link.set_nonblocking(true)?;
                let mut stream = tokio::net::UnixStream::from_std(link)?;
                stream.write_all(b"ready\n").await?;
                let mut lines = BufReader::new(stream).lines();
                while let Some(line) = lines.next_line().await? {
                    if let Ok(status) = serde_json::from_str::<Predecessor>(&line) {
                        *lock(&predecessor) = Some(status);
                    } else if let Ok(moved) = serde_json::from_str::<MovedLine>(&line) {
                        note_moved(&registry, moved);
                    }
                }
                io::Result::Ok(())
            };
            if let Err(error) = follow.await {
                warn!(%error, "lost the link to the previous process");
            }
            info!(old.pid = old_pid, "the previous process has exited");
            *lock(&predecessor) = None;
        });
    }
}

/// Remembers pins the old process moved, so that their clients are placed
/// afresh here: by least connections, their old backend not excluded (it
/// was not the reason for the move).
fn note_moved(registry: &Registry, line: MovedLine) {
    let Some(pool) = registry.pool(&line.pool) else {
        return; // a pool this config does not have: placed afresh anyway
    };
    let now = std::time::Instant::now();
    let until = now + pool.moved_pin_ttl();
    for nonce in line.moved {
        // Backend id 0 is no backend: nothing is avoided.
        pool.stats.moved.record(nonce, 0, now, until);
    }
}

/// The hex of a 32-byte key.
pub fn key_hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_key(hex: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// A directory only this user can enter, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> io::Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "sluice-upgrade-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_moved_lines_never_parse_as_each_other() {
        let mut out = Vec::new();
        push_line(
            &mut out,
            &Predecessor {
                pid: 7,
                websockets: 3,
            },
        );
        push_line(
            &mut out,
            &MovedLine {
                pool: "app".into(),
                moved: vec![1, 2],
            },
        );
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert!(serde_json::from_str::<MovedLine>(lines[0]).is_err());
        assert!(serde_json::from_str::<Predecessor>(lines[1]).is_err());
        let moved: MovedLine = serde_json::from_str(lines[1]).expect("moved line");
        assert_eq!(moved.moved, [1, 2]);
    }

    #[test]
    fn keys_round_trip_through_hex() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 7) as u8);
        assert_eq!(parse_key(&key_hex(&key)), Some(key));
        assert_eq!(parse_key("00"), None);
        assert_eq!(parse_key(&"zz".repeat(32)), None);
    }

    #[test]
    fn sockets_and_manifest_cross_a_socket_pair() {
        let (a, b) = StdUnixStream::pair().expect("pair");
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l1.local_addr().expect("addr");
        let manifest = Manifest {
            old_pid: 7,
            listeners: vec![("public".into(), addr)],
            admin: None,
            admin_token: None,
            sticky_keys: vec![("app".into(), key_hex(&[9; 32]))],
        };
        let body = serde_json::to_vec(&manifest).expect("json");
        let len = (body.len() as u32).to_be_bytes();
        a.send_with_fd(&len, &[l1.as_raw_fd()]).expect("send");
        std::io::Write::write_all(&mut &a, &body).expect("write");
        let mut got_len = [0u8; 4];
        let mut raw = [0 as RawFd; MAX_FDS];
        let (n, nfds) = b.recv_with_fd(&mut got_len, &mut raw).expect("recv");
        assert_eq!((n, nfds), (4, 1));
        // SAFETY: just received.
        let fd = unsafe { OwnedFd::from_raw_fd(raw[0]) };
        let inherited = std::net::TcpListener::from(fd);
        assert_eq!(
            inherited.local_addr().expect("addr"),
            addr,
            "the same socket"
        );
        let mut text = vec![0u8; u32::from_be_bytes(got_len) as usize];
        (&b).read_exact(&mut text).expect("body");
        let back: Manifest = serde_json::from_slice(&text).expect("manifest");
        assert_eq!(back.listeners, manifest.listeners);
    }
}
