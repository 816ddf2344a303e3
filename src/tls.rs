//! TLS termination: certificates, SNI, reload.
//!
//! Owns each TLS listener's rustls server configuration. Its certificates
//! (loaded by `pem`) sit in a store: a default certificate and SNI entries
//! (exact host names and `*.` wildcards). The resolver reads the store
//! through an `ArcSwap`, so a reload swaps it without touching open
//! connections. A reload that fails (unreadable, unparsable, expired, key
//! not matching the certificate) keeps the previous store and logs the file
//! and the reason. The TLS streams' tunnel I/O lives in `tunnel::stream`; TLS
//! towards backends in `upstream`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::TlsSettings;
use crate::error_chain::chain;
use crate::pem::{self, PemError};

/// How often certificate files are looked at for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The ALPN protocol of HTTP/2 over TLS (RFC 9113).
pub const H2_ALPN: &[u8] = b"h2";

/// The ALPN protocol of a TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Certificates answering TLS-ALPN-01 challenges, by name (written by
/// `acme`, read by the resolver).
pub type Challenges = Arc<ArcSwap<HashMap<String, Arc<CertifiedKey>>>>;

/// The certificates of one listener.
#[derive(Debug)]
struct CertStore {
    /// `None`: an ACME certificate not obtained yet.
    default: Option<Arc<CertifiedKey>>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertStore {
    fn load(settings: &TlsSettings, refuse_expired: bool) -> Result<Self, PemError> {
        let mut store = Self {
            default: load_source(&settings.default, refuse_expired)?,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (hosts, source) in &settings.sni {
            let Some(key) = load_source(source, refuse_expired)? else {
                continue;
            };
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

    fn resolve(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        // A wildcard covers exactly one label.
        if let Some((_, parent)) = name.split_once('.')
            && let Some(key) = self.wildcard.get(parent)
        {
            return Some(key.clone());
        }
        self.default.clone()
    }
}

/// Loads `source`; files sluice writes itself that do not exist yet (or
/// do not load: they are obtained again) give their fallback, or `None`.
fn load_source(
    source: &pem::CertSource,
    refuse_expired: bool,
) -> Result<Option<Arc<CertifiedKey>>, PemError> {
    match (source, pem::load_key(source, refuse_expired)) {
        (_, Ok(key)) => Ok(Some(key)),
        (pem::CertSource::Managed { cert, fallback, .. }, Err(error)) => {
            if cert.exists() {
                warn!(error = %chain(&error), "an ACME certificate in the cache does not load: it is obtained again");
            }
            match fallback {
                Some(fallback) => load_source(fallback, refuse_expired),
                None => Ok(None),
            }
        }
        (_, Err(error)) => Err(error),
    }
}

impl CertStore {
    /// Each distinct certificate once: its name and `notAfter`.
    fn identities(&self) -> Vec<(String, i64)> {
        let mut seen: Vec<&Arc<CertifiedKey>> = Vec::new();
        for key in self
            .default
            .iter()
            .chain(self.exact.values())
            .chain(self.wildcard.values())
        {
            if !seen.iter().any(|k| Arc::ptr_eq(k, key)) {
                seen.push(key);
            }
        }
        seen.into_iter().filter_map(|k| pem::identity(k)).collect()
    }
}

#[derive(Debug)]
struct Resolver {
    store: Arc<ArcSwap<CertStore>>,
    challenges: Challenges,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme {
            // Only the challenge certificate answers a challenge handshake.
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.challenges.load().get(&name).cloned();
        }
        self.store.load().resolve(hello.server_name())
    }
}

/// A TLS listener's acceptor and reloadable certificates.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub handshake_timeout: Duration,
    store: Arc<ArcSwap<CertStore>>,
    settings: Arc<TlsSettings>,
    /// TLS-ALPN-01 answers, for the listener's ACME certificates.
    pub challenges: Challenges,
    /// ALPN offers `h2`.
    pub h2: bool,
}

impl Tls {
    /// Loads every certificate of `settings`; ALPN offers `h2` too when
    /// `h2`.
    pub fn new(settings: &TlsSettings, h2: bool) -> Result<Self, PemError> {
        let store = Arc::new(ArcSwap::from_pointee(CertStore::load(settings, true)?));
        let challenges = Challenges::default();
        let mut config = ServerConfig::builder_with_provider(pem::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| PemError::Unusable {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver {
                store: store.clone(),
                challenges: challenges.clone(),
            }));
        config.alpn_protocols = if h2 {
            vec![H2_ALPN.to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        if !settings.acme.is_empty() {
            config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        }
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: settings.handshake_timeout,
            store,
            settings: Arc::new(settings.clone()),
            challenges,
            h2,
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
                warn!(listener, error = %chain(&error), "certificate reload failed; keeping the certificates in use");
                false
            }
        }
    }

    /// The certificates served now (after any reload): name and
    /// `notAfter` (Unix seconds) of each.
    pub fn certificates(&self) -> Vec<(String, i64)> {
        self.store.load().identities()
    }

    /// The settings it was made from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// True when both are the same acceptor (a reload kept it).
    pub fn same(&self, other: &Tls) -> bool {
        Arc::ptr_eq(&self.store, &other.store)
    }

    fn files(&self) -> Vec<PathBuf> {
        std::iter::once(&self.settings.default)
            .chain(self.settings.sni.iter().map(|(_, s)| s))
            .flat_map(pem::CertSource::files)
            .map(PathBuf::from)
            .collect()
    }

    /// Reloads when a certificate file changes, until `shutdown`. (A
    /// config reload, SIGHUP, reads them again too.)
    pub async fn watch(self, listener: String, shutdown: CancellationToken) {
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
                () = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pem::tests::generated;

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
            acme: Vec::new(),
        };
        let store = CertStore::load(&settings, true).expect("loads");
        let is = |a: &Option<Arc<CertifiedKey>>, b: &Arc<CertifiedKey>| {
            a.as_ref().is_some_and(|a| Arc::ptr_eq(a, b))
        };
        let default = store.default.clone().expect("a default");
        assert!(is(
            &store.resolve(Some("API.example.com")),
            &store.exact["api.example.com"]
        ));
        assert!(is(
            &store.resolve(Some("a.ws.example.com")),
            &store.wildcard["ws.example.com"]
        ));
        assert!(
            is(&store.resolve(Some("a.b.ws.example.com")), &default),
            "a wildcard covers one label"
        );
        assert!(is(&store.resolve(None), &default));
    }

    #[test]
    fn an_acme_certificate_not_obtained_yet_leaves_its_names_without_one() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-managed-{}", std::process::id()));
        let settings = TlsSettings {
            default: pem::CertSource::Managed {
                cert: dir.join("none.pem"),
                key: dir.join("none.key"),
                fallback: None,
            },
            sni: vec![(vec!["api.test".into()], generated(&["api.test"]))],
            handshake_timeout: Duration::from_secs(5),
            acme: Vec::new(),
        };
        let store = CertStore::load(&settings, true).expect("loads without the files");
        assert!(store.resolve(Some("chat.test")).is_none());
        assert!(store.resolve(None).is_none());
        assert!(store.resolve(Some("api.test")).is_some());

        // With a fallback, that is served until the files are there.
        let fallback = generated(&["chat.test"]);
        let with_fallback = TlsSettings {
            default: pem::CertSource::Managed {
                cert: dir.join("none.pem"),
                key: dir.join("none.key"),
                fallback: Some(Box::new(fallback.clone())),
            },
            ..settings
        };
        let store = CertStore::load(&with_fallback, true).expect("loads the fallback");
        let expected = pem::load_key(&fallback, true).expect("fallback");
        assert_eq!(
            store.resolve(Some("chat.test")).map(|k| k.cert.clone()),
            Some(expected.cert.clone())
        );
    }
}
