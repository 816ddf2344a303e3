//! TLS termination: wss, https, SNI, certificate reload, handshake timeout.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sluice::config::{CertSource, TlsSettings};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::process::TempDir;
use crate::support::*;

/// Accepts any certificate: the tests look at which one was presented.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection to `addr` for `name`, and the certificate it showed.
pub(crate) async fn tls_connect(addr: SocketAddr, name: &str) -> (TlsStream<TcpStream>, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tls_over(tcp, name).await
}

/// TLS for `name` over a connection the test opened, and the certificate
/// the server showed.
pub(crate) async fn tls_over(tcp: TcpStream, name: &str) -> (TlsStream<TcpStream>, Vec<u8>) {
    tls_over_alpn(tcp, name, &[b"http/1.1"]).await
}

/// Like `tls_over`, offering `alpn`.
pub(crate) async fn tls_over_alpn(
    tcp: TcpStream,
    name: &str,
    alpn: &[&[u8]],
) -> (TlsStream<TcpStream>, Vec<u8>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from(name.to_string()).expect("name");
    let tls = within(
        10,
        "TLS handshake",
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake");
    let cert = tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec();
    (tls, cert)
}

/// Writes a self-signed certificate for `names` to `dir/stem.pem|key`;
/// returns the certificate's DER.
pub(crate) fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> Vec<u8> {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("rcgen");
    std::fs::write(dir.join(format!("{stem}.pem")), c.cert.pem()).expect("write cert");
    std::fs::write(
        dir.join(format!("{stem}.key")),
        c.signing_key.serialize_pem(),
    )
    .expect("write key");
    c.cert.der().to_vec()
}

/// Like `write_cert`, valid until 1 January of `year`.
fn write_cert_until(dir: &Path, stem: &str, name: &str, year: i32) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).expect("write cert");
    std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).expect("write key");
}

/// 1 January of `year` (UTC) in Unix seconds, as the metric shows it.
fn new_year(year: i32) -> i64 {
    // Days from 1970 to `year`, leap years included (valid to 2099).
    let days: i64 = (1970..year)
        .map(|y| if y % 4 == 0 { 366 } else { 365 })
        .sum();
    days * 86_400
}

fn files(dir: &Path, stem: &str) -> CertSource {
    CertSource::Files {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    }
}

pub(crate) fn temp_dir(name: &str) -> TempDir {
    TempDir::new(&format!("sluice-tls-{name}")).expect("temp dir")
}

/// TLS with the one certificate `dir/stem.pem|key`.
pub(crate) fn one_cert(dir: &Path, stem: &str, handshake_timeout: Duration) -> TlsSettings {
    TlsSettings {
        default: files(dir, stem),
        sni: vec![],
        handshake_timeout,
        acme: Vec::new(),
    }
}

async fn tls_sluice(backend: SocketAddr, settings: TlsSettings) -> Sluice {
    let mut cfg = config(&[backend]);
    cfg.listeners[0].tls = Some(settings);
    Sluice::with_config(cfg).await
}

#[tokio::test]
async fn wss_and_https_through_tls_termination() {
    let dir = temp_dir("basic");
    write_cert(&dir, "site", &["app.test"]);
    let backends = echo_backends(1).await;
    let settings = one_cert(&dir, "site", Duration::from_secs(5));
    let sluice = tls_sluice(backends[0].addr, settings).await;

    let (tls, _) = tls_connect(sluice.addr, "app.test").await;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        "wss://app.test/ws",
        tls,
        Some(big_ws_config()),
    )
    .await
    .expect("upgrade over TLS");
    use futures_util::{SinkExt, StreamExt};
    let hello = ws
        .next()
        .await
        .expect("greeting")
        .expect("ok")
        .into_text()
        .expect("text");
    assert_eq!(hello.as_str(), "connected to b1");
    for size in [10, 100_000, 2 << 20] {
        let msg = Message::binary(vec![7u8; size]);
        ws.send(msg.clone()).await.expect("send");
        assert_eq!(
            within(10, "echo", ws.next())
                .await
                .expect("message")
                .expect("ok"),
            msg
        );
    }

    let (tls, _) = tls_connect(sluice.addr, "app.test").await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http");
    tokio::spawn(conn);
    let req = hyper::Request::get("/who")
        .header("host", "app.test")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .to_string();
    assert!(body.contains("x-forwarded-proto: https\n"), "{body}");
    assert!(
        body.contains("forwarded: for=127.0.0.1;proto=https\n"),
        "{body}"
    );
}

#[tokio::test]
async fn sni_chooses_the_certificate() {
    let dir = temp_dir("sni");
    let default = write_cert(&dir, "default", &["default.test"]);
    let api = write_cert(&dir, "api", &["api.test"]);
    let wild = write_cert(&dir, "wild", &["*.ws.test"]);
    let backends = echo_backends(1).await;
    let settings = TlsSettings {
        default: files(&dir, "default"),
        sni: vec![
            (vec!["api.test".into()], files(&dir, "api")),
            (vec!["*.ws.test".into()], files(&dir, "wild")),
        ],
        handshake_timeout: Duration::from_secs(5),
        acme: Vec::new(),
    };
    let sluice = tls_sluice(backends[0].addr, settings).await;
    assert_eq!(tls_connect(sluice.addr, "api.test").await.1, api);
    assert_eq!(tls_connect(sluice.addr, "eu.ws.test").await.1, wild);
    assert_eq!(tls_connect(sluice.addr, "other.test").await.1, default);
    // An IP address is sent without SNI.
    assert_eq!(tls_connect(sluice.addr, "127.0.0.1").await.1, default);
}

#[tokio::test]
async fn certificates_reload_without_touching_open_connections() {
    let dir = temp_dir("reload");
    let old = write_cert(&dir, "site", &["app.test"]);
    let backends = echo_backends(1).await;
    let settings = one_cert(&dir, "site", Duration::from_secs(5));
    let sluice = tls_sluice(backends[0].addr, settings).await;
    let (tls, seen) = tls_connect(sluice.addr, "app.test").await;
    assert_eq!(seen, old);
    let (mut ws, _) = tokio_tungstenite::client_async("wss://app.test/ws", tls)
        .await
        .expect("upgrade");
    use futures_util::{SinkExt, StreamExt};
    ws.next().await.expect("greeting").expect("ok");

    // A broken replacement: the old certificate stays.
    std::fs::write(dir.join("site.pem"), "not a certificate").expect("write");
    tokio::time::sleep(sluice::tls::RELOAD_CHECK * 2).await;
    assert_eq!(
        tls_connect(sluice.addr, "app.test").await.1,
        old,
        "broken file: old certificate kept"
    );

    // A good replacement: new connections get it; the open one goes on.
    let new = write_cert(&dir, "site", &["app.test"]);
    let mut now = Vec::new();
    for _ in 0..40 {
        now = tls_connect(sluice.addr, "app.test").await.1;
        if now == new {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(now, new, "the new certificate is served");
    ws.send(Message::text("still here")).await.expect("send");
    assert_eq!(
        ws.next().await.expect("echo").expect("ok"),
        Message::text("still here")
    );
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let dir = temp_dir("timeout");
    write_cert(&dir, "site", &["app.test"]);
    let backends = echo_backends(1).await;
    let settings = one_cert(&dir, "site", Duration::from_millis(300));
    let sluice = tls_sluice(backends[0].addr, settings).await;
    let mut silent = TcpStream::connect(sluice.addr).await.expect("connect");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = within(5, "closed by sluice", silent.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed after {:?}",
        started.elapsed()
    );
    assert_eq!(
        backends[0]
            .stats
            .tcp_accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn tls_towards_a_backend_that_only_speaks_tls() {
    let dir = temp_dir("backend");
    write_cert(&dir, "backend", &["backend.test"]);
    let echo_server = echo_backends(1).await;
    // The TLS-only backend: a second sluice terminating TLS in front of the echo server.
    let settings = one_cert(&dir, "backend", Duration::from_secs(5));
    let tls_backend = tls_sluice(echo_server[0].addr, settings).await;
    let mut cfg = config(&[tls_backend.addr]);
    cfg.pools[0].backends[0].tls = Some(sluice::config::BackendTls {
        ca: dir.join("backend.pem"),
        server_name: "backend.test".into(),
    });
    let front = Sluice::with_config(cfg).await;
    let (mut ws, name) = front.ws_named("/ws").await;
    assert_eq!(name, "b1");
    echo(&mut ws, Message::binary(vec![3u8; 300_000])).await;
    let reply = front.http().await.get("/through").await;
    assert_eq!(reply.status, 200);
    // The TLS hop said https to the echo server.
    assert!(
        reply.text().contains("x-forwarded-proto: https\n"),
        "{}",
        reply.text()
    );

    // A name the certificate does not cover: the connection is refused.
    let mut cfg = config(&[tls_backend.addr]);
    cfg.pools[0].backends[0].tls = Some(sluice::config::BackendTls {
        ca: dir.join("backend.pem"),
        server_name: "other.test".into(),
    });
    let wrong = Sluice::with_config(cfg).await;
    assert_eq!(wrong.http().await.get("/x").await.status, 503);
}

/// Regression (review): health checks spoke plain HTTP to a backend that
/// only speaks TLS, so it went down and the pool answered 503.
#[tokio::test]
async fn health_checks_reach_a_tls_backend_over_tls() {
    let dir = temp_dir("health");
    write_cert(&dir, "backend", &["backend.test"]);
    let echo_server = echo_backends(1).await;
    let tls_backend = tls_sluice(
        echo_server[0].addr,
        one_cert(&dir, "backend", Duration::from_secs(5)),
    )
    .await;
    let mut cfg = config(&[tls_backend.addr]);
    cfg.pools[0].backends[0].tls = Some(sluice::config::BackendTls {
        ca: dir.join("backend.pem"),
        server_name: "backend.test".into(),
    });
    cfg.pools[0].health = Some(sluice::config::HealthConfig {
        path: Some("/health".into()),
        interval: Duration::from_millis(100),
        fall: 2,
        ..sluice::config::HealthConfig::default()
    });
    let front = Sluice::with_config(cfg).await;
    // Each check that gets through the TLS hop is a request it proxies.
    eventually(10, "three health checks through the TLS backend", || {
        tls_backend.registry().churn_marker().0 >= 3
    })
    .await;
    assert_eq!(
        front.registry().pools()[0].backends[0].condition().as_str(),
        "up"
    );
    assert_eq!(front.http().await.get("/x").await.status, 200);
}

#[tokio::test]
async fn certificate_expiry_is_exported_per_name_and_follows_a_reload() {
    let dir = temp_dir("expiry");
    write_cert_until(&dir, "site", "app.test", 2031);
    write_cert_until(&dir, "api", "api.test", 2032);
    let backends = echo_backends(1).await;
    let mut settings = one_cert(&dir, "site", Duration::from_secs(5));
    settings.sni = vec![(vec!["api.test".into()], files(&dir, "api"))];
    let sluice = tls_sluice(backends[0].addr, settings).await;
    let series = |name: &str, year: i32| {
        format!(
            "sluice_tls_certificate_expiry_seconds{{listener=\"public\",name=\"{name}\"}} {}",
            new_year(year)
        )
    };
    let text = sluice.metrics().await;
    for line in [series("app.test", 2031), series("api.test", 2032)] {
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
    // A renewed file: the metric follows the certificate served.
    write_cert_until(&dir, "api", "api.test", 2033);
    let want = series("api.test", 2033);
    let mut text = String::new();
    for _ in 0..50 {
        text = sluice.metrics().await;
        if text.contains(&want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(text.contains(&want), "{want} in:\n{text}");
    assert!(text.contains(&series("app.test", 2031)));
}
