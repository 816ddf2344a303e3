//! A network namespace joined to this one by a veth pair, for clients
//! whose link can be taken down mid-connection (a phone that lost its
//! network): no FIN, no RST, just silence. Needs root and `ip`; where
//! that is missing the tests that use it are skipped, unless
//! `SLUICE_REQUIRE_NETNS` is set (`.ci/run` sets it).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace `name` with address `ns_addr` on its end of the pair, and
/// `host_addr` on ours; removed (with the pair) on drop.
pub struct Netns {
    pub name: String,
    ns_if: String,
    pub host_addr: IpAddr,
    pub ns_addr: IpAddr,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// A new namespace, or `None` (the test is skipped) when this machine
    /// cannot make one and `SLUICE_REQUIRE_NETNS` is not set.
    pub fn new() -> Option<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let name = format!("sluice{tag}");
        let (host_if, ns_if) = (format!("slh{tag}"), format!("sln{tag}"));
        let subnet = 200 + (std::process::id() % 50) as u8;
        let host_addr = IpAddr::V4(Ipv4Addr::new(10, subnet, n as u8, 1));
        let ns_addr = IpAddr::V4(Ipv4Addr::new(10, subnet, n as u8, 2));
        let ok = ip(&["netns", "add", &name])
            && ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ])
            && ip(&["link", "set", &ns_if, "netns", &name])
            && ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ns_addr}/30"),
                "dev",
                &ns_if,
            ])
            && ip(&["-n", &name, "link", "set", &ns_if, "up"])
            && ip(&["-n", &name, "link", "set", "lo", "up"]);
        let netns = Self {
            name,
            ns_if,
            host_addr,
            ns_addr,
        };
        if !ok {
            assert!(
                std::env::var_os("SLUICE_REQUIRE_NETNS").is_none(),
                "SLUICE_REQUIRE_NETNS is set but a network namespace could not be made"
            );
            eprintln!("skipped: no network namespace (needs root and ip)");
            return None;
        }
        Some(netns)
    }

    /// A TCP connection to `addr` made from inside the namespace (the
    /// socket stays there after the thread that made it has gone).
    pub async fn connect(&self, addr: SocketAddr) -> tokio::net::TcpStream {
        let path = format!("/var/run/netns/{}", self.name);
        let std_stream = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd changes only this
            // thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
                .expect("connect from the namespace")
        })
        .join()
        .expect("connect thread");
        std_stream.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpStream::from_std(std_stream).expect("tokio stream")
    }

    /// Takes the namespace's link down: its peers hear nothing more.
    pub fn link_down(&self) {
        assert!(ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so both.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
