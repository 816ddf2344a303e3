//! The proxies the benchmarks compare (sluice, an older sluice build,
//! HAProxy, nginx): their generated configs, their processes (stopped by
//! PID), their memory and CPU from /proc, and the bench's self-signed
//! certificate. Shared by the benchmarks; each is a crate of its own.

#![allow(dead_code)]

use std::fs;
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rustls::pki_types::CertificateDer;

use super::process::send_signal;

pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
pub const POLL: Duration = Duration::from_millis(50);
/// Clock ticks per second in /proc/PID/stat (USER_HZ, 100 on Linux).
pub const CLOCK_TICKS_PER_S: f64 = 100.0;
/// sluice's TLS listener limit, small so that sluice's own check (2
/// descriptors per connection over all listeners, + 64) stays within the
/// 20,000 descriptors a process may hold: 2 x (9,000 + 900) + 64.
pub const TLS_MAX_CONNS: usize = 900;

/// Another sluice binary (`--baseline PATH`), measured as `sluice-base`
/// in the same run: e.g. the release build of an earlier commit.
pub static BASELINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--baseline PATH`: the sluice binary measured as `sluice-base`.
pub fn set_baseline(path: Option<String>) -> Result<()> {
    let path = path.context("--baseline needs a path")?;
    anyhow::ensure!(
        Path::new(&path).is_file(),
        "--baseline {path:?}: no such file"
    );
    let _ = BASELINE.set(path);
    Ok(())
}

// ---------------------------------------------------------------- proxies

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Sluice,
    /// The `--baseline` sluice binary.
    SluiceBase,
    Haproxy,
    Nginx,
}

impl ProxyKind {
    pub const ALL: [Self; 4] = [Self::Sluice, Self::SluiceBase, Self::Haproxy, Self::Nginx];

    pub fn name(self) -> &'static str {
        match self {
            Self::Sluice => "sluice",
            Self::SluiceBase => "sluice-base",
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
        }
    }

    pub fn program(self) -> &'static str {
        match self {
            Self::Sluice => env!("CARGO_BIN_EXE_sluice"),
            Self::SluiceBase => BASELINE.get().map_or("(no --baseline)", String::as_str),
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
        }
    }

    pub fn is_available(self) -> bool {
        match self {
            Self::Sluice => true,
            Self::SluiceBase => BASELINE.get().is_some(),
            Self::Haproxy | Self::Nginx => on_path(self.program()),
        }
    }

    /// Writes this proxy's config into `dir` and spawns it: plain
    /// WebSockets on `port`, TLS with `cert` on `tls_port`.
    pub fn start(
        self,
        port: u16,
        tls_port: u16,
        backends: &[SocketAddr],
        dir: &Path,
        cert: &Cert,
    ) -> Result<Proc> {
        let name = self.name();
        let config = dir.join(format!("{name}.conf"));
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(self.program());
        let text = match self {
            Self::Sluice | Self::SluiceBase => {
                cmd.arg("run")
                    .arg("--config")
                    .arg(&config)
                    .env("SLUICE_LOG", "warn");
                // A baseline binary may predate the HTTP/2 keys.
                sluice_config(port, tls_port, backends, cert, self == Self::Sluice)
            }
            Self::Haproxy => {
                cmd.arg("-db").arg("-f").arg(&config);
                haproxy_config(port, tls_port, backends, cert)
            }
            Self::Nginx => {
                let prefix = dir.join("nginx");
                fs::create_dir_all(&prefix)
                    .with_context(|| format!("creating {}", prefix.display()))?;
                cmd.arg("-p").arg(&prefix).arg("-c").arg(&config);
                nginx_config(port, tls_port, backends, cert, &prefix, running_as_root())
            }
        };
        fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        Proc::spawn(name, cmd, log)
    }
}

pub fn sluice_config(
    port: u16,
    tls_port: u16,
    backends: &[SocketAddr],
    cert: &Cert,
    h2_websockets: bool,
) -> String {
    let (cert, key) = (cert.cert.display(), cert.key.display());
    let h2 = if h2_websockets {
        "websocket_over_http2 = true\n"
    } else {
        ""
    };
    let mut text = format!(
        "worker_threads = 1\nshutdown_timeout = \"2s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"bench\"\nbind = \"127.0.0.1:{port}\"\npool = \"echo\"\nmax_connections = 9000\n\n\
         [[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:{tls_port}\"\npool = \"echo\"\nmax_connections = {TLS_MAX_CONNS}\n\
         {h2}tls = {{ cert = \"{cert}\", key = \"{key}\" }}\n\n\
         [[pool]]\nname = \"echo\"\nalgorithm = \"least_conn\"\n"
    );
    for (i, addr) in backends.iter().enumerate() {
        text.push_str(&format!(
            "\n[[pool.backend]]\nname = \"echo-{}\"\naddress = \"{addr}\"\n",
            i + 1
        ));
    }
    text
}

pub fn haproxy_config(port: u16, tls_port: u16, backends: &[SocketAddr], cert: &Cert) -> String {
    let combined = cert.combined.display();
    let mut text = format!(
        "global\n    nbthread 1\n    maxconn 9000\n\n\
         defaults\n    mode http\n    maxconn 9000\n    timeout connect 5s\n    timeout client 1h\n    \
         timeout server 1h\n    timeout tunnel 1h\n    timeout http-request 10s\n\n\
         frontend bench\n    bind 127.0.0.1:{port}\n\
         \x20   bind 127.0.0.1:{tls_port} ssl crt {combined} alpn h2,http/1.1\n    default_backend echo\n\n\
         backend echo\n    balance leastconn\n"
    );
    for (i, addr) in backends.iter().enumerate() {
        text.push_str(&format!("    server echo-{} {addr}\n", i + 1));
    }
    text
}

pub fn nginx_config(
    port: u16,
    tls_port: u16,
    backends: &[SocketAddr],
    cert: &Cert,
    prefix: &Path,
    as_root: bool,
) -> String {
    let p = prefix.display();
    let (cert, key) = (cert.cert.display(), cert.key.display());
    // The same WebSocket proxying on both servers; plain requests reuse
    // backend connections (an empty Connection header for them), as
    // sluice and HAProxy do.
    let location = "        location / {\n            proxy_pass http://echo;\n            proxy_http_version 1.1;\n\
         \x20           proxy_set_header Upgrade $http_upgrade;\n            proxy_set_header Connection $connection_upgrade;\n\
         \x20           proxy_read_timeout 3600s;\n            proxy_send_timeout 3600s;\n        }\n";
    let servers: String = backends
        .iter()
        .map(|a| format!("        server {a};\n"))
        .collect();
    // As root, nginx would switch its worker to `nobody`: keep the current user.
    let user = if as_root { "user root;\n" } else { "" };
    format!(
        "{user}worker_processes 1;\ndaemon off;\nmaster_process on;\npid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\nworker_rlimit_nofile 19500;\n\n\
         events {{\n    worker_connections 19000;\n}}\n\n\
         http {{\n    access_log off;\n    keepalive_requests 100000000;\n\
         \x20   client_body_temp_path {p}/client_body;\n    proxy_temp_path {p}/proxy;\n\
         \x20   fastcgi_temp_path {p}/fastcgi;\n    uwsgi_temp_path {p}/uwsgi;\n    scgi_temp_path {p}/scgi;\n\n\
         \x20   map $http_upgrade $connection_upgrade {{\n        default upgrade;\n        '' '';\n    }}\n\n\
         \x20   upstream echo {{\n        least_conn;\n{servers}        keepalive 64;\n    }}\n\n\
         \x20   server {{\n        listen 127.0.0.1:{port} backlog=4096;\n{location}    }}\n\n\
         \x20   server {{\n        listen 127.0.0.1:{tls_port} ssl http2 backlog=4096;\n\
         \x20       ssl_certificate {cert};\n        ssl_certificate_key {key};\n{location}    }}\n}}\n"
    )
}

/// A child process, stopped by PID (with its direct children) when dropped.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {name} ({:?})", cmd.get_program()))?;
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited, quoting the end of its log.
    pub fn check_running(&mut self) -> Result<()> {
        match self
            .child
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))?
        {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// RSS of the process plus its direct children (nginx's workers), KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid();
        let mut total = vm_rss_kib(pid)?;
        for child in child_pids(pid) {
            // A child may exit between the listing and the read.
            total += vm_rss_kib(child).unwrap_or(0);
        }
        Ok(total)
    }

    /// CPU time used so far by the process and its children, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let pid = self.pid();
        std::iter::once(pid)
            .chain(child_pids(pid))
            .filter_map(cpu_ticks)
            .sum()
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; children that outlive
    /// the process get SIGKILL too.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.pid();
        let children = child_pids(pid);
        if let Err(error) = send_signal(pid, "TERM") {
            eprintln!("{error}");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(POLL);
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("{} (pid {pid}) ignored SIGTERM: killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for child in children {
            if Path::new(&format!("/proc/{child}")).exists() {
                let _ = send_signal(child, "KILL");
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn wait_until_ready(proxy: &mut Proc, port: u16) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        proxy.check_running()?;
        if StdTcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    bail!(
        "{} did not accept connections on port {port} within {READY_TIMEOUT:?}; its log ends with:\n{}",
        proxy.name,
        proxy.log_tail()
    )
}

/// The bench's self-signed certificate (for `localhost` and 127.0.0.1),
/// written where every proxy reads it; the clients trust its DER.
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key, for HAProxy.
    pub combined: PathBuf,
    pub der: CertificateDer<'static>,
}

impl Cert {
    pub fn generate(dir: &Path) -> Result<Self> {
        let generated = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .context("generating a self-signed certificate")?;
        let cert_pem = generated.cert.pem();
        let key_pem = generated.signing_key.serialize_pem();
        let cert = Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            combined: dir.join("combined.pem"),
            der: generated.cert.der().clone(),
        };
        let combined = if cert_pem.ends_with('\n') {
            format!("{cert_pem}{key_pem}")
        } else {
            format!("{cert_pem}\n{key_pem}")
        };
        for (path, text) in [
            (&cert.cert, &cert_pem),
            (&cert.key, &key_pem),
            (&cert.combined, &combined),
        ] {
            fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(cert)
    }
}

// ------------------------------------------------------------------- system

pub fn on_path(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// VmRSS of `pid`, in KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .with_context(|| format!("{path} has no VmRSS line"))?;
    let kib = line.trim().trim_end_matches("kB").trim();
    kib.parse()
        .with_context(|| format!("{path}: VmRSS {kib:?} is not a number"))
}

/// PIDs whose parent is `ppid`, from /proc/*/stat.
pub fn child_pids(ppid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_pid(pid) == Some(ppid))
        .collect()
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of stat).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The parent PID from /proc/PID/stat (the field after the state, after the
/// command name, which may itself hold spaces and parentheses).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

pub fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uids = s.lines().find_map(|l| l.strip_prefix("Uid:"))?.to_owned();
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}
