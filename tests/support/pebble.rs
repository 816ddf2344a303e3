//! Pebble (Debian's `pebble` package), the ACME test CA, on loopback: its
//! own mock DNS (`pebble-challtestsrv -dns01`) answers every name with
//! 127.0.0.1, so the CA validates challenges against sluice's listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{Proc, TempDir, free_ports};

pub struct Pebble {
    pub dir: TempDir,
    /// The directory URL.
    pub directory: String,
    /// The CA bundle that trusts Pebble's own HTTPS (for `directory_ca`).
    pub directory_ca: PathBuf,
    management: SocketAddr,
    _dns: Proc,
    _pebble: Proc,
}

/// Whether both programs are installed.
pub fn installed() -> bool {
    ["pebble", "pebble-challtestsrv"].iter().all(|p| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

impl Pebble {
    /// Starts Pebble validating TLS-ALPN-01 on `tls_port` and HTTP-01 on
    /// `http_port` of 127.0.0.1, with certificates valid `validity`.
    pub async fn start(tls_port: u16, http_port: u16, validity: Duration) -> Self {
        // The ports are picked free, then bound by Pebble: another test
        // may take one in between, and Pebble exits. Then again, anew.
        for _ in 0..3 {
            if let Some(pebble) = Self::try_start(tls_port, http_port, validity).await {
                return pebble;
            }
        }
        panic!("pebble did not start three times (see its log above)");
    }

    async fn try_start(tls_port: u16, http_port: u16, validity: Duration) -> Option<Self> {
        let dir = TempDir::new("sluice-pebble").expect("temp dir");
        let [listen, management, dns, dns_mgmt] = free_ports().expect("ports");
        let own = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("rcgen");
        let cert = dir.write("pebble.pem", &own.cert.pem()).expect("cert");
        let key = dir
            .write("pebble.key", &own.signing_key.serialize_pem())
            .expect("key");
        let config = format!(
            r#"{{"pebble": {{"listenAddress": "127.0.0.1:{listen}",
              "managementListenAddress": "127.0.0.1:{management}",
              "certificate": "{}", "privateKey": "{}",
              "httpPort": {http_port}, "tlsPort": {tls_port},
              "ocspResponderURL": "", "externalAccountBindingRequired": false,
              "certificateValidityPeriod": {}}}}}"#,
            cert.display(),
            key.display(),
            validity.as_secs()
        );
        let config = dir.write("pebble.json", &config).expect("config");
        let mut dns_proc = Proc(
            Command::new("pebble-challtestsrv")
                .args(["-dns01", &format!("127.0.0.1:{dns}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                // IPv4 only: sluice listens on 127.0.0.1.
                .args(["-defaultIPv6", ""])
                .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("pebble-challtestsrv starts"),
        );
        let log = std::fs::File::create(dir.path().join("pebble.log")).expect("log");
        let mut pebble = Proc(
            Command::new("pebble")
                .arg("-config")
                .arg(&config)
                .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
                // No random waits and no rejected nonces: tests stay fast.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0")
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("pebble starts"),
        );
        let management = SocketAddr::from(([127, 0, 0, 1], management));
        let up = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let listening = tokio::net::TcpStream::connect(("127.0.0.1", listen))
                    .await
                    .is_ok()
                    && tokio::net::TcpStream::connect(management).await.is_ok();
                if listening {
                    return true;
                }
                let exited = |p: &mut Proc| p.0.try_wait().is_ok_and(|s| s.is_some());
                if exited(&mut pebble) || exited(&mut dns_proc) {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or(false);
        if !up {
            let log = std::fs::read_to_string(dir.path().join("pebble.log")).unwrap_or_default();
            eprintln!("pebble did not start; its log:\n{log}");
            return None;
        }
        Some(Self {
            directory: format!("https://127.0.0.1:{listen}/dir"),
            directory_ca: cert,
            dir,
            management,
            _dns: dns_proc,
            _pebble: pebble,
        })
    }

    /// ACME requests Pebble has handled so far (from its log).
    pub fn requests(&self) -> usize {
        self.log().matches("-> calling handler()").count()
    }

    /// Certificates Pebble has issued so far.
    pub fn issued(&self) -> usize {
        self.log().matches("Issued certificate serial").count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// The root that Pebble's issued certificates chain to (PEM).
    pub async fn root(&self) -> String {
        super::curl(&[
            "--fail",
            "--cacert",
            &self.directory_ca.display().to_string(),
            &format!("https://{}/roots/0", self.management),
        ])
        .await
    }
}
