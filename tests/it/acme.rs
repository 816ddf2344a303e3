//! ACME with a real CA: Pebble on loopback.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sluice::config::{AcmeChallenge, AcmeSettings, Config, ListenerConfig, TlsSettings};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::pebble::{self, Pebble};
use crate::support::process::{Proc, TempDir, free_port, free_ports};
use crate::support::*;

const NAME: &str = "chat.sluice.test";

/// Skips (or fails under `.ci/run`) without Pebble.
fn pebble_here() -> bool {
    tool_present(
        pebble::installed(),
        "SLUICE_REQUIRE_PEBBLE",
        "needs Debian's pebble package",
    )
}

fn acme_settings(pebble: &Pebble, cache: &std::path::Path) -> AcmeSettings {
    AcmeSettings {
        domains: vec![NAME.into()],
        contact: vec!["mailto:ops@sluice.test".into()],
        directory: pebble.directory.clone(),
        directory_ca: Some(pebble.directory_ca.clone()),
        cache: cache.to_path_buf(),
        challenge: AcmeChallenge::TlsAlpn01,
        renew_before: None,
        fallback: None,
    }
}

async fn acme_sluice(port: u16, acme: AcmeSettings, backend: std::net::SocketAddr) -> Sluice {
    Sluice::with_config(acme_config(port, acme, backend)).await
}

/// One TLS listener on `port` whose certificate comes from `acme`.
fn acme_config(port: u16, acme: AcmeSettings, backend: std::net::SocketAddr) -> Config {
    let mut cfg = config(&[backend]);
    let mut listener = ListenerConfig::new("public", ([127, 0, 0, 1], port).into(), 0);
    listener.tls = Some(TlsSettings {
        default: acme.files(),
        sni: Vec::new(),
        handshake_timeout: Duration::from_secs(5),
        acme: vec![acme],
    });
    cfg.listeners = vec![listener];
    cfg
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A wss connection to `name` through `port` with a client that trusts
/// only `root`, past the backend's greeting; with the certificate it was
/// shown (DER), or the handshake error.
async fn wss_connect(port: u16, name: &str, root: &str) -> Result<(Wss, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(root.as_bytes()) {
        roots.add(c.expect("root PEM")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let tls = within(
        10,
        "TLS handshake",
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(name.to_string()).expect("name"), tcp),
    )
    .await
    .map_err(|e| e.to_string())?;
    let seen = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{name}/ws"), tls)
        .await
        .map_err(|e| e.to_string())?;
    let greeting = within(10, "greeting", ws.next()).await;
    assert!(
        matches!(greeting, Some(Ok(Message::Text(_)))),
        "{greeting:?}"
    );
    Ok((ws, seen))
}

/// Sends `text` and expects it back.
async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.expect("send");
    let back = within(10, "echo", ws.next()).await;
    assert!(
        matches!(&back, Some(Ok(Message::Text(t))) if t.as_str() == text),
        "{back:?}"
    );
}

/// A wss echo through `port` for `NAME`; the certificate it was shown.
async fn wss_echo(port: u16, root: &str) -> Result<Vec<u8>, String> {
    let (mut ws, seen) = wss_connect(port, NAME, root).await?;
    echo(&mut ws, "over ACME").await;
    Ok(seen)
}

/// Waits until a wss echo through `port` succeeds; the certificate seen.
async fn wait_served(port: u16, root: &str) -> Vec<u8> {
    within(60, "an ACME certificate is served", async {
        loop {
            if let Ok(seen) = wss_echo(port, root).await {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

const ORDERS_OK: &str = "sluice_acme_orders_total{result=\"ok\"}";
const ORDERS_FAILED: &str = "sluice_acme_orders_total{result=\"failed\"}";

#[tokio::test]
async fn a_first_start_obtains_a_certificate_by_tls_alpn_and_a_restart_reuses_it() {
    if !pebble_here() {
        return;
    }
    let port = free_port().expect("port");
    let pebble = Pebble::start(port, free_port().expect("port"), Duration::from_secs(3600)).await;
    let root = pebble.root().await;
    let dir = TempDir::new("sluice-acme-cache").expect("cache");
    // sluice creates it.
    let cache = dir.path().join("acme");
    let backends = echo_backends(1).await;
    let started = Instant::now();
    let mut sluice = acme_sluice(port, acme_settings(&pebble, &cache), backends[0].addr).await;
    let first = wait_served(port, &root).await;
    let per_issuance = pebble.requests();
    eprintln!(
        "tls-alpn-01: served after {:?}, {per_issuance} ACME requests",
        started.elapsed()
    );
    let metrics = sluice.metrics().await;
    assert_eq!(metric(&metrics, ORDERS_OK), 1.0, "{metrics}");
    assert!(metrics.contains(&format!(
        "sluice_tls_certificate_expiry_seconds{{listener=\"public\",name=\"{NAME}\"}}"
    )));
    // The account key and the certificate are in the cache, owner-only.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &str| {
        std::fs::metadata(cache.join(p))
            .expect("in the cache")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&format!("{NAME}.key")), 0o600);
    assert_eq!(mode(""), 0o700, "the cache folder");
    sluice.stop().await;

    // Started again with the cache: the same certificate, not one request
    // to the CA.
    let sluice = acme_sluice(port, acme_settings(&pebble, &cache), backends[0].addr).await;
    assert_eq!(wss_echo(port, &root).await, Ok(first));
    let metrics = sluice.metrics().await;
    assert_eq!(metric(&metrics, ORDERS_OK), 0.0, "{metrics}");
    assert_eq!(
        pebble.requests(),
        per_issuance,
        "requests at a warm restart"
    );
    assert_eq!(pebble.issued(), 1);
}

#[tokio::test]
async fn http_01_is_answered_on_the_plain_listener_and_never_forwarded() {
    if !pebble_here() {
        return;
    }
    let [tls_port, http_port] = free_ports().expect("ports");
    let pebble = Pebble::start(tls_port, http_port, Duration::from_secs(3600)).await;
    let root = pebble.root().await;
    let cache = TempDir::new("sluice-acme-http01").expect("cache");
    let backends = echo_backends(1).await;
    let mut acme = acme_settings(&pebble, cache.path());
    acme.challenge = AcmeChallenge::Http01;
    let mut cfg = acme_config(tls_port, acme, backends[0].addr);
    cfg.listeners.push(ListenerConfig::new(
        "plain",
        ([127, 0, 0, 1], http_port).into(),
        0,
    ));
    let started = Instant::now();
    let sluice = Sluice::with_config(cfg).await;
    wait_served(tls_port, &root).await;
    eprintln!(
        "http-01: served after {:?}, {} ACME requests",
        started.elapsed(),
        pebble.requests()
    );
    assert_eq!(metric(&sluice.metrics().await, ORDERS_OK), 1.0);
    let forwarded = || backends[0].stats.http_requests.load(Ordering::Relaxed);
    assert_eq!(
        forwarded(),
        0,
        "the CA's challenge request reached a backend"
    );

    // curl trusts the certificate too (Pebble's root, nothing else).
    let root_file = cache.write("root.pem", &root).expect("root");
    curl(&[
        "--fail",
        "--cacert",
        &root_file.display().to_string(),
        "--resolve",
        &format!("{NAME}:{tls_port}:127.0.0.1"),
        &format!("https://{NAME}:{tls_port}/"),
    ])
    .await;
    assert_eq!(forwarded(), 1);

    // Other tokens are answered by sluice too; other paths go through.
    let mut http = HttpClient::connect(([127, 0, 0, 1], http_port).into()).await;
    let unknown = http.get("/.well-known/acme-challenge/not-a-token").await;
    assert_eq!(
        (unknown.status, unknown.text().as_str()),
        (404, "no such ACME challenge\n")
    );
    let page = http.get("/").await;
    assert_eq!((page.status, page.backend().as_str()), (200, "b1"));
    assert_eq!(forwarded(), 2);
}

#[tokio::test]
async fn a_renewal_is_served_to_new_connections_while_open_ones_keep_echoing() {
    if !pebble_here() {
        return;
    }
    let port = free_port().expect("port");
    let validity = Duration::from_secs(3600);
    let pebble = Pebble::start(port, free_port().expect("port"), validity).await;
    let root = pebble.root().await;
    let cache = TempDir::new("sluice-acme-renew").expect("cache");
    let backends = echo_backends(1).await;
    let mut acme = acme_settings(&pebble, cache.path());
    // Due 5 s after each issuance.
    acme.renew_before = Some(validity - Duration::from_secs(5));
    let sluice = acme_sluice(port, acme, backends[0].addr).await;
    let first = wait_served(port, &root).await;
    let at_first = pebble.requests();
    let (mut open, seen) = wss_connect(port, NAME, &root).await.expect("wss");
    assert_eq!(seen, first);
    echo(&mut open, "before").await;

    let renewed = within(60, "a renewed certificate is served", async {
        loop {
            let seen = wss_echo(port, &root).await.expect("served throughout");
            if seen != first {
                return seen;
            }
            echo(&mut open, "meanwhile").await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    assert_ne!(renewed, first);
    echo(&mut open, "after").await;
    assert!(metric(&sluice.metrics().await, ORDERS_OK) >= 2.0);
    let issued = pebble.issued();
    assert!(issued >= 2);
    eprintln!(
        "renewal: about {} ACME requests per renewal",
        (pebble.requests() - at_first) / (issued - 1)
    );
}

#[tokio::test]
async fn a_ca_that_refuses_or_is_down_leaves_the_rest_serving_and_is_retried() {
    if !pebble_here() {
        return;
    }
    // Pebble validates TLS-ALPN-01 on a port where nothing listens: every
    // challenge fails, and the CA says so in a problem document.
    let [tls_port, down_port, plain_port, admin_port, no_one, closed] =
        free_ports().expect("ports");
    let pebble = Pebble::start(
        no_one,
        free_port().expect("port"),
        Duration::from_secs(3600),
    )
    .await;
    let dir = TempDir::new("sluice-acme-refused").expect("dir");
    dir.write("admin.token", ADMIN_TOKEN).expect("token");
    let cert = |name: &str| {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("rcgen");
        dir.write(&format!("{name}.pem"), &c.cert.pem())
            .expect("cert");
        dir.write(&format!("{name}.key"), &c.signing_key.serialize_pem())
            .expect("key");
        (c.cert.der().to_vec(), c.cert.pem())
    };
    let other = cert("other.sluice.test");
    let fallback = cert(NAME);
    let backends = echo_backends(1).await;
    let config = format!(
        r#"[admin]
bind = "127.0.0.1:{admin_port}"
token_file = "admin.token"

[[listener]]
name = "public"
bind = "127.0.0.1:{tls_port}"
pool = "app"
[listener.tls]
cert = "other.sluice.test.pem"
key = "other.sluice.test.key"
[[listener.tls.sni]]
acme = {{ domains = ["{NAME}"], directory = "{directory}", directory_ca = "{ca}", cache = "cache-refused", fallback_cert = "{NAME}.pem", fallback_key = "{NAME}.key" }}

[[listener]]
name = "down"
bind = "127.0.0.1:{down_port}"
pool = "app"
[listener.tls]
acme = {{ domains = ["down.sluice.test"], directory = "https://127.0.0.1:{closed}/dir", cache = "cache-down" }}

[[listener]]
name = "plain"
bind = "127.0.0.1:{plain_port}"
pool = "app"

[[pool]]
name = "app"
[[pool.backend]]
name = "b1"
address = "{backend}"
"#,
        directory = pebble.directory,
        ca = pebble.directory_ca.display(),
        backend = backends[0].addr,
    );
    let path = dir.write("sluice.toml", &config).expect("config");
    let log = dir.path().join("sluice.log");
    let _sluice = Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&path)
            .env("SLUICE_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("sluice starts"),
    );
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    within(20, "sluice listening", async {
        while TcpStream::connect(admin).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // The other listeners and names serve meanwhile; the ACME name has
    // its fallback certificate.
    let mut plain = ws_connect(&format!("ws://127.0.0.1:{plain_port}/ws")).await;
    greeting(&mut plain).await;
    echo(&mut plain, "plain").await;
    let (mut ws, seen) = wss_connect(tls_port, "other.sluice.test", &other.1)
        .await
        .expect("the static name serves");
    assert_eq!(seen, other.0);
    echo(&mut ws, "static").await;
    let (mut ws, seen) = wss_connect(tls_port, NAME, &fallback.1)
        .await
        .expect("the fallback serves");
    assert_eq!(seen, fallback.0);
    echo(&mut ws, "fallback").await;
    // Without a fallback, the handshake fails, cleanly and at once.
    let refused = wss_connect(down_port, "down.sluice.test", &other.1).await;
    assert!(refused.is_err(), "{:?}", refused.map(|r| r.1));

    // Both retry, with a growing, jittered wait: at least twice each.
    let mut admin_http = HttpClient::connect(admin).await;
    within(30, "orders failed and retried", async {
        loop {
            let req = hyper::Request::get("/metrics")
                .header("host", "sluice.test")
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            let metrics = admin_http.send(req).await.text();
            if metric(&metrics, ORDERS_FAILED) >= 4.0 {
                assert_eq!(metric(&metrics, ORDERS_OK), 0.0);
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).expect("log");
    let failures = |listener: &str| -> Vec<String> {
        text.lines()
            .filter(|l| {
                l.contains("ACME order failed") && l.contains(&format!("listener=\"{listener}\""))
            })
            .map(str::to_string)
            .collect()
    };
    let refused = failures("public");
    let down = failures("down");
    assert!(refused.len() >= 2 && down.len() >= 2, "{text}");
    // The CA's problem document is in the log.
    assert!(
        refused[0].contains("urn:ietf:params:acme:error:"),
        "{}",
        refused[0]
    );
    assert!(down[0].contains("Connection refused"), "{}", down[0]);
    let waits: Vec<f64> = down
        .iter()
        .map(|l| {
            let w = l.split("retry_in=").nth(1).expect("retry_in");
            let w = w.split_whitespace().next().unwrap_or_default();
            match w.strip_suffix("ms") {
                Some(ms) => ms.parse::<f64>().expect("ms") / 1000.0,
                None => w.trim_end_matches('s').parse().expect("s"),
            }
        })
        .collect();
    assert!(waits[1] > waits[0], "backoff grows: {waits:?}");
}
