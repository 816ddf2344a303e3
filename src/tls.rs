//! TLS termination: certificates, SNI, reload.
//!
//! Owns each TLS listener's rustls configuration. Certificates (PEM, full
//! chain, RSA/ECDSA/Ed25519 keys) are loaded into a store: a default
//! certificate and SNI entries (exact host names and `*.` wildcards). The
//! resolver reads the store through an `ArcSwap`, so a reload swaps it
//! without touching open connections. A reload that fails (unreadable,
//! unparsable, expired, key not matching the certificate) keeps the
//! previous store and logs the file and the reason.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::tunnel::TunnelIo;

/// How often certificate files are looked at for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Where a certificate and its key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files, reloaded when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// PEM text held in memory (the demo's generated certificate).
    Pem { cert: String, key: String },
}

/// A listener's TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// For clients without SNI, or whose name no SNI entry covers.
    pub default: CertSource,
    /// Host names (exact, or `*.example.com`) and their certificates.
    pub sni: Vec<(Vec<String>, CertSource)>,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
}

/// Why a certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a PEM private key ({reason})", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Unusable { path: PathBuf, reason: String },
    #[error("{}: certificate expired on {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks one certificate chain with its key; an expired one is
/// an error.
pub fn load_certified_key(source: &CertSource) -> Result<Arc<CertifiedKey>, TlsError> {
    load_key(source, true)
}

/// Loads one certificate chain with its key; an expired one is refused
/// when `refuse_expired`, else served with a warning (a reload must not be
/// blocked by a certificate that is already being served).
fn load_key(source: &CertSource, refuse_expired: bool) -> Result<Arc<CertifiedKey>, TlsError> {
    let (cert_name, cert_pem, key_name, key_pem) = match source {
        CertSource::Files { cert, key } => {
            let read = |path: &Path| {
                std::fs::read(path).map_err(|source| TlsError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            };
            (cert.clone(), read(cert)?, key.clone(), read(key)?)
        }
        CertSource::Pem { cert, key } => (
            PathBuf::from("<generated certificate>"),
            cert.clone().into_bytes(),
            PathBuf::from("<generated key>"),
            key.clone().into_bytes(),
        ),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Unusable {
            path: cert_name.clone(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: cert_name });
    };
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
        let not_after = parsed.validity().not_after;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if not_after.timestamp() < now {
            let error = TlsError::Expired {
                path: cert_name.clone(),
                not_after: not_after.to_string(),
            };
            if refuse_expired {
                return Err(error);
            }
            warn!(%error, "serving an expired certificate");
        }
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: key_name.clone(),
        reason: e.to_string(),
    })?;
    let certified =
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Unusable {
            path: key_name,
            reason: format!("{e} (does the key belong to {}?)", cert_name.display()),
        })?;
    Ok(Arc::new(certified))
}

/// The certificates of one listener.
#[derive(Debug)]
struct CertStore {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertStore {
    fn load(settings: &TlsSettings, refuse_expired: bool) -> Result<Self, TlsError> {
        let mut store = Self {
            default: load_key(&settings.default, refuse_expired)?,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (hosts, source) in &settings.sni {
            let key = load_key(source, refuse_expired)?;
            for host in hosts {
                let host = host.to_ascii_lowercase();
                match host.strip_prefix("*.") {
                    Some(suffix) => store.wildcard.insert(suffix.to_string(), key.clone()),
                    None => store.exact.insert(host, key.clone()),
                };
            }
        }
        Ok(store)
    }

    fn resolve(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(key) = self.exact.get(&name) {
            return key.clone();
        }
        // A wildcard covers exactly one label.
        if let Some((_, parent)) = name.split_once('.')
            && let Some(key) = self.wildcard.get(parent)
        {
            return key.clone();
        }
        self.default.clone()
    }
}

#[derive(Debug)]
struct Resolver(Arc<ArcSwap<CertStore>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().resolve(hello.server_name()))
    }
}

/// A TLS listener's acceptor and reloadable certificates.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub handshake_timeout: Duration,
    store: Arc<ArcSwap<CertStore>>,
    settings: Arc<TlsSettings>,
}

impl Tls {
    /// Loads every certificate of `settings`.
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsError> {
        let store = Arc::new(ArcSwap::from_pointee(CertStore::load(settings, true)?));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Unusable {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(store.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: settings.handshake_timeout,
            store,
            settings: Arc::new(settings.clone()),
        })
    }

    /// Loads the certificates again; on any failure keeps the ones in use.
    pub fn reload(&self, listener: &str) -> bool {
        match CertStore::load(&self.settings, false) {
            Ok(store) => {
                self.store.store(Arc::new(store));
                info!(listener, "certificates reloaded");
                true
            }
            Err(error) => {
                warn!(listener, %error, "certificate reload failed; keeping the certificates in use");
                false
            }
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for source in
            std::iter::once(&self.settings.default).chain(self.settings.sni.iter().map(|(_, s)| s))
        {
            if let CertSource::Files { cert, key } = source {
                files.push(cert.clone());
                files.push(key.clone());
            }
        }
        files
    }

    /// Reloads when a certificate file changes, or when `hup` is notified
    /// (SIGHUP), until `shutdown`.
    pub async fn watch(
        self,
        listener: String,
        mut hup: tokio::sync::watch::Receiver<()>,
        shutdown: CancellationToken,
    ) {
        let stamp = |files: &[PathBuf]| -> Vec<Option<(SystemTime, u64)>> {
            files
                .iter()
                .map(|f| {
                    std::fs::metadata(f)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len())))
                })
                .collect()
        };
        let files = self.files();
        let mut seen = stamp(&files);
        loop {
            tokio::select! {
                () = tokio::time::sleep(RELOAD_CHECK) => {
                    // A failed reload is tried again at the next look.
                    let now = stamp(&files);
                    if now != seen && self.reload(&listener) {
                        seen = now;
                    }
                }
                changed = hup.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = stamp(&files);
                    if self.reload(&listener) {
                        seen = now;
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// How to open TLS to one backend.
#[derive(Clone)]
pub struct BackendTlsConnector {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for BackendTlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTlsConnector")
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// The connector and server name for a backend's `tls` settings.
pub fn backend_tls(cfg: &crate::config::BackendTls) -> Result<BackendTlsConnector, TlsError> {
    let connector = backend_connector(&cfg.ca)?;
    let server_name =
        rustls::pki_types::ServerName::try_from(cfg.server_name.clone()).map_err(|e| {
            TlsError::Unusable {
                path: cfg.ca.clone(),
                reason: format!("server_name {:?}: {e}", cfg.server_name),
            }
        })?;
    Ok(BackendTlsConnector {
        connector,
        server_name,
    })
}

/// A client-side connector trusting the CAs in `ca` (PEM).
pub fn backend_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let pem = std::fs::read(ca).map_err(|source| TlsError::Read {
        path: ca.to_path_buf(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::Unusable {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsError::Unusable {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: ca.to_path_buf(),
        });
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Unusable {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A connection to a backend: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl TunnelIo for BackendStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Plain(s) => TunnelIo::poll_read_ready(s, cx),
            Self::Tls(s) => {
                let (tcp, conn) = s.get_mut();
                poll_tls_read_ready(tcp, conn, cx)
            }
        }
    }

    fn read_available(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read_available(buf),
            Self::Tls(s) => read_with_noop_waker(s.as_mut(), buf),
        }
    }
}

/// Ready when rustls already holds decrypted bytes (or the end of the
/// stream, or an error), else when the socket is readable.
fn poll_tls_read_ready<D>(
    tcp: &TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let buffered = conn.process_new_packets().map_or(true, |state| {
        state.plaintext_bytes_to_read() > 0 || state.peer_has_closed()
    });
    if buffered {
        return Poll::Ready(Ok(()));
    }
    tcp.poll_read_ready(cx)
}

/// Reads with a no-op waker: Pending means nothing is there now; the
/// tunnel then waits in `poll_read_ready` with its own waker.
fn read_with_noop_waker(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let spare = buf.spare_capacity_mut();
    let mut read = ReadBuf::uninit(spare);
    let start = read.filled().as_ptr();
    match Pin::new(stream).poll_read(&mut cx, &mut read) {
        Poll::Ready(Ok(())) => {
            if read.filled().as_ptr() != start {
                // The reader swapped the buffer: its bytes are not in ours.
                return Err(io::Error::other("reader replaced the read buffer"));
            }
            let n = read.filled().len();
            // SAFETY: poll_read initialised and filled the first n bytes of
            // the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            Ok(n)
        }
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl TunnelIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, conn) = self.get_mut();
        poll_tls_read_ready(tcp, conn, cx)
    }

    fn read_available(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        read_with_noop_waker(self, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(names: &[&str]) -> CertSource {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .expect("rcgen");
        CertSource::Pem {
            cert: c.cert.pem(),
            key: c.signing_key.serialize_pem(),
        }
    }

    #[test]
    fn sni_picks_exact_wildcard_then_default() {
        let settings = TlsSettings {
            default: generated(&["default.test"]),
            sni: vec![
                (
                    vec!["api.example.com".into()],
                    generated(&["api.example.com"]),
                ),
                (
                    vec!["*.ws.example.com".into()],
                    generated(&["*.ws.example.com"]),
                ),
            ],
            handshake_timeout: Duration::from_secs(5),
        };
        let store = CertStore::load(&settings, true).expect("loads");
        let is = |a: &Arc<CertifiedKey>, b: &Arc<CertifiedKey>| Arc::ptr_eq(a, b);
        assert!(is(
            &store.resolve(Some("API.example.com")),
            &store.exact["api.example.com"]
        ));
        assert!(is(
            &store.resolve(Some("a.ws.example.com")),
            &store.wildcard["ws.example.com"]
        ));
        assert!(
            is(&store.resolve(Some("a.b.ws.example.com")), &store.default),
            "a wildcard covers one label"
        );
        assert!(is(&store.resolve(None), &store.default));
    }

    #[test]
    fn ecdsa_and_ed25519_keys_load() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).expect("key");
            let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
                .expect("params")
                .self_signed(&key)
                .expect("cert");
            let source = CertSource::Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            };
            assert!(load_certified_key(&source).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let (CertSource::Pem { cert, .. }, CertSource::Pem { key, .. }) =
            (generated(&["a.test"]), generated(&["b.test"]))
        else {
            unreachable!("generated() makes PEM sources")
        };
        let err = load_certified_key(&CertSource::Pem { cert, key }).expect_err("mismatch");
        assert!(err.to_string().contains("does the key belong to"), "{err}");
        let err = load_certified_key(&CertSource::Pem {
            cert: "nope".into(),
            key: "nope".into(),
        })
        .expect_err("garbage");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }
}
