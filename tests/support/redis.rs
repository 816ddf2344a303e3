//! A real redis-server (Debian's package) on a free loopback port, for
//! cluster mode.

use std::net::SocketAddr;

use super::process::{Proc, TempDir, free_port};
use super::*;

/// True when redis-server is installed; else the test is skipped, or
/// fails under `SLUICE_REQUIRE_REDIS` (`.ci/run` sets it).
pub fn redis_here() -> bool {
    let installed = std::process::Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .is_ok_and(|o| o.status.success());
    tool_present(
        installed,
        "SLUICE_REQUIRE_REDIS",
        "needs Debian's redis-server package",
    )
}

/// A redis-server, killed when dropped.
pub struct Redis {
    pub addr: SocketAddr,
    proc: Option<Proc>,
    dir: TempDir,
    password: Option<String>,
}

impl Redis {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A redis-server that asks clients for `password`, if given.
    pub async fn start_with(password: Option<&str>) -> Self {
        let dir = TempDir::new("redis").expect("temp dir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().expect("port"))
            .parse()
            .expect("addr");
        let mut redis = Self {
            addr,
            proc: None,
            dir,
            password: password.map(str::to_string),
        };
        redis.run().await;
        redis
    }

    /// A command to this Redis, answered (`DEBUG SLEEP` blocks it).
    pub async fn cmd(&self, args: &[&str]) -> ::redis::Value {
        let client = ::redis::Client::open(self.url()).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        let mut cmd = ::redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await.expect("answer")
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    async fn run(&mut self) {
        let mut cmd = std::process::Command::new("redis-server");
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        let proc = Proc(
            cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--enable-debug-command", "local"])
                .args(["--port", &self.addr.port().to_string()])
                .arg("--dir")
                .arg(self.dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server starts"),
        );
        self.proc = Some(proc);
        wait_listening(self.addr).await;
    }

    /// `kill -9`, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let _ = super::process::send_signal(proc.pid(), "KILL");
            let _ = proc.wait_exit(std::time::Duration::from_secs(5));
        }
    }

    /// Starts it again on the same port (empty: nothing was saved).
    pub async fn restart(&mut self) {
        self.kill9();
        self.run().await;
    }
}
