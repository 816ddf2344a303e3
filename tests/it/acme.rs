//! ACME with a real CA: Pebble on loopback.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sluice::config::{AcmeChallenge, AcmeSettings, ListenerConfig, TlsSettings};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::pebble::{self, Pebble};
use crate::support::process::{TempDir, free_port};
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
    }
}

async fn acme_sluice(port: u16, acme: AcmeSettings, backend: std::net::SocketAddr) -> Sluice {
    let mut cfg = config(&[backend]);
    let mut listener = ListenerConfig::new("public", ([127, 0, 0, 1], port).into(), 0);
    listener.tls = Some(TlsSettings {
        default: acme.files(),
        sni: Vec::new(),
        handshake_timeout: Duration::from_secs(5),
        acme: vec![acme],
    });
    cfg.listeners = vec![listener];
    Sluice::with_config(cfg).await
}

/// A wss echo through `port` with a client that trusts only `root`; the
/// certificate it was shown (DER), or the handshake error.
async fn wss_echo(port: u16, root: &str) -> Result<Vec<u8>, String> {
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
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(NAME).expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let seen = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{NAME}/ws"), tls)
        .await
        .map_err(|e| e.to_string())?;
    use futures_util::{SinkExt as _, StreamExt as _};
    let greeting = within(10, "greeting", ws.next()).await;
    assert!(
        matches!(greeting, Some(Ok(Message::Text(_)))),
        "{greeting:?}"
    );
    ws.send(Message::text("over ACME"))
        .await
        .map_err(|e| e.to_string())?;
    let back = within(10, "echo", ws.next()).await;
    assert!(
        matches!(&back, Some(Ok(Message::Text(t))) if t.as_str() == "over ACME"),
        "{back:?}"
    );
    Ok(seen)
}

/// Waits until a wss echo through `port` succeeds; the certificate seen.
async fn wait_served(port: u16, root: &str) -> Vec<u8> {
    within(60, "an ACME certificate is served", async {
        loop {
            if let Ok(seen) = wss_echo(port, root).await {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_first_start_obtains_a_certificate_by_tls_alpn_and_a_restart_reuses_it() {
    if !pebble_here() {
        return;
    }
    let port = free_port().expect("port");
    let pebble = Pebble::start(port, free_port().expect("port"), Duration::from_secs(3600)).await;
    let root = pebble.root().await;
    let cache = TempDir::new("sluice-acme-cache").expect("cache");
    let backends = echo_backends(1).await;
    let mut sluice =
        acme_sluice(port, acme_settings(&pebble, cache.path()), backends[0].addr).await;
    let first = wait_served(port, &root).await;
    let metrics = sluice.metrics().await;
    assert!(
        metrics.contains("sluice_acme_orders_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "sluice_tls_certificate_expiry_seconds{{listener=\"public\",name=\"{NAME}\"}}"
    )));
    // The account key and the certificate are in the cache, owner-only.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &str| {
        std::fs::metadata(cache.path().join(p))
            .expect("in the cache")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&format!("{NAME}.key")), 0o600);
    sluice.stop().await;

    // Started again with the cache: the same certificate, no new order.
    let sluice = acme_sluice(port, acme_settings(&pebble, cache.path()), backends[0].addr).await;
    assert_eq!(wss_echo(port, &root).await, Ok(first));
    let metrics = sluice.metrics().await;
    assert!(
        !metrics.contains("sluice_acme_orders_total{result=\"ok\"} 1"),
        "no order at the second start: {metrics}"
    );
}
