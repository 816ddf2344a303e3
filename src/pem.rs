//! PEM material: certificate chains with their keys, and CA bundles.
//!
//! Owns reading and checking what a certificate or CA file holds (PEM, full
//! chain, RSA/ECDSA/Ed25519 keys, expiry, a key that belongs to its
//! certificate), and the rustls configuration built from a CA bundle. A
//! leaf: it imports nothing else of sluice, so `config` can check files at
//! load and `tls` / `upstream` can use them, without importing each other.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tracing::warn;

/// Where a certificate and its key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files, reloaded when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// PEM text held in memory (the demo's generated certificate).
    Pem { cert: String, key: String },
    /// PEM files sluice writes itself (ACME): until they exist, the names
    /// they are for have `fallback`, or no certificate; reloaded when they
    /// change.
    Managed {
        cert: PathBuf,
        key: PathBuf,
        fallback: Option<Box<CertSource>>,
    },
}

impl CertSource {
    /// The files to watch for changes (none for PEM held in memory).
    pub fn files(&self) -> Vec<&Path> {
        match self {
            Self::Files { cert, key } => vec![cert, key],
            Self::Managed {
                cert,
                key,
                fallback,
            } => {
                let mut files = vec![cert.as_path(), key];
                files.extend(fallback.iter().flat_map(|f| f.files()));
                files
            }
            Self::Pem { .. } => Vec::new(),
        }
    }
}

/// Why a certificate, key or CA bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("reading {}", path.display())]
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

/// The crypto provider every rustls configuration of sluice uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads one certificate chain with its key; an expired one is refused
/// when `refuse_expired`, else served with a warning (a reload must not be
/// blocked by a certificate that is already being served).
pub fn load_key(source: &CertSource, refuse_expired: bool) -> Result<Arc<CertifiedKey>, PemError> {
    let (cert_name, cert_pem, key_name, key_pem) = match source {
        CertSource::Files { cert, key } | CertSource::Managed { cert, key, .. } => {
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
        .map_err(|e| PemError::Unusable {
            path: cert_name.clone(),
            reason: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(PemError::NoCertificate { path: cert_name });
    };
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
        let not_after = parsed.validity().not_after;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if not_after.timestamp() < now {
            let error = PemError::Expired {
                path: cert_name.clone(),
                not_after: not_after.to_string(),
            };
            if refuse_expired {
                return Err(error);
            }
            warn!(%error, "serving an expired certificate");
        }
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| PemError::BadKey {
        path: key_name.clone(),
        reason: e.to_string(),
    })?;
    let certified =
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| PemError::Unusable {
            path: key_name,
            reason: format!("{e} (does the key belong to {}?)", cert_name.display()),
        })?;
    Ok(Arc::new(certified))
}

/// A client configuration (ALPN `http/1.1`) trusting the CAs in `ca` (PEM).
/// The name a certificate is known by (its first DNS name, else its
/// subject's common name) and its `notAfter` as Unix seconds; `None` when
/// its leaf does not parse.
pub fn identity(key: &CertifiedKey) -> Option<(String, i64)> {
    let leaf = key.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let dns = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
        });
    let name = dns
        .or_else(|| {
            parsed
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    Some((name, parsed.validity().not_after.timestamp()))
}

/// A certificate's `notBefore` and `notAfter`; `None` when its leaf does
/// not parse.
pub fn validity(key: &CertifiedKey) -> Option<(SystemTime, SystemTime)> {
    let leaf = key.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Some((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}

pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig, PemError> {
    let pem = read(ca)?;
    let unusable = |reason: String| PemError::Unusable {
        path: ca.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| unusable(e.to_string()))?;
        roots.add(cert).map_err(|e| unusable(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(PemError::NoCertificate {
            path: ca.to_path_buf(),
        });
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `names`, as PEM held in memory.
    pub(crate) fn generated(names: &[&str]) -> CertSource {
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
            assert!(load_key(&source, true).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let (CertSource::Pem { cert, .. }, CertSource::Pem { key, .. }) =
            (generated(&["a.test"]), generated(&["b.test"]))
        else {
            unreachable!("generated() makes PEM sources")
        };
        let err = load_key(&CertSource::Pem { cert, key }, true).expect_err("mismatch");
        assert!(err.to_string().contains("does the key belong to"), "{err}");
        let err = load_key(
            &CertSource::Pem {
                cert: "nope".into(),
                key: "nope".into(),
            },
            true,
        )
        .expect_err("garbage");
        assert!(matches!(err, PemError::NoCertificate { .. }), "{err}");
    }
}
