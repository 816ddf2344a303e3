//! Certificates from an ACME CA (RFC 8555), with instant-acme.
//!
//! One task per `acme = { ... }` of a TLS listener. It keeps the account
//! key and the certificate in the `cache` folder (owner-only), reuses them
//! at start, and orders a certificate when there is none or when it is due
//! for renewal (`renew_before`, else a third of its lifetime before it
//! expires). It proves the names with TLS-ALPN-01 (the challenge
//! certificates go into the listener's `Tls::challenges`, which its
//! resolver answers `acme-tls/1` handshakes with) or HTTP-01 (the key
//! authorizations go into the process's `Http01Answers`, which its plain
//! listeners answer `/.well-known/acme-challenge/` from). The new certificate is
//! written to the cache files the listener serves from (a
//! `CertSource::Managed`) and the listener reloads them, as it reloads any
//! certificate file, without touching open connections. Failures are
//! logged with the CA's problem document, counted, and retried with a
//! jittered, doubling backoff.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use prometheus_client::metrics::counter::Counter;
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AcmeChallenge, AcmeSettings, CertSource};
use crate::error_chain::chain;
use crate::http::challenge::Http01Answers;
use crate::pem;
use crate::tls::Tls;

/// The first retry after a failed order; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Never two orders closer than this, whatever `renew_before` says.
const MIN_ORDER_GAP: Duration = Duration::from_secs(5);

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the ACME CA at {directory}")]
    Ca {
        directory: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("the CA offers no {0} challenge for {1}")]
    NoChallenge(&'static str, String),
    #[error("the order for {domains:?} ended {status}: {problems}")]
    Order {
        domains: Vec<String>,
        status: String,
        /// The CA's problem documents, of the order and its challenges.
        problems: String,
    },
    #[error("making the challenge certificate")]
    ChallengeCert(#[source] rcgen::Error),
    #[error("loading the challenge certificate's key: {0}")]
    ChallengeKey(String),
    #[error("{}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the certificate the CA issued does not load")]
    Issued(#[source] pem::PemError),
    #[error("stopped")]
    Stopped,
}

/// Counters of orders, by result.
#[derive(Debug, Clone)]
pub struct OrderCounters {
    pub ok: Counter,
    pub failed: Counter,
}

/// When the certificate in `files` is due for renewal, `None` when there
/// is none (or it does not load): due now.
fn due(files: &CertSource, settings: &AcmeSettings) -> Option<SystemTime> {
    let key = pem::load_key(files, false).ok()?;
    let (not_before, not_after) = pem::validity(&key)?;
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let before = settings.renew_before.unwrap_or(lifetime / 3);
    Some(not_after.checked_sub(before).unwrap_or(not_before))
}

/// Keeps the certificate of `settings` for listener `listener`'s `tls`,
/// until `stop`; HTTP-01 answers go into `http01`, which the process's
/// plain listeners serve.
pub async fn run(
    settings: AcmeSettings,
    tls: Tls,
    http01: Http01Answers,
    listener: String,
    orders: OrderCounters,
    stop: CancellationToken,
) {
    let files = settings.files();
    let mut backoff = FIRST_BACKOFF;
    let mut last_order: Option<tokio::time::Instant> = None;
    loop {
        if let Some(at) = due(&files, &settings) {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            if !wait.is_zero() {
                info!(listener, domains = ?settings.domains, renew_in = ?wait, "ACME certificate in the cache");
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
        }
        if let Some(last) = last_order {
            tokio::select! {
                () = tokio::time::sleep_until(last + MIN_ORDER_GAP) => {}
                () = stop.cancelled() => return,
            }
        }
        last_order = Some(tokio::time::Instant::now());
        let mut tokens = Vec::new();
        let result = tokio::select! {
            r = obtain(&settings, &tls, &http01, &mut tokens, &files) => r,
            () = stop.cancelled() => Err(AcmeError::Stopped),
        };
        clear_challenges(&tls, &settings.domains, &http01, &tokens);
        if stop.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => {
                orders.ok.inc();
                backoff = FIRST_BACKOFF;
                tls.reload(&listener);
                info!(listener, domains = ?settings.domains, "ACME certificate obtained");
            }
            Err(error) => {
                orders.failed.inc();
                // Jittered, so that many names do not retry in step.
                let wait = backoff.mul_f64(rand::random_range(0.5..1.0));
                warn!(listener, domains = ?settings.domains, error = %chain(&error), retry_in = ?wait, "ACME order failed");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One order: account, challenges, certificate, written to the cache.
/// The HTTP-01 tokens it answers are added to `tokens`.
async fn obtain(
    settings: &AcmeSettings,
    tls: &Tls,
    http01: &Http01Answers,
    tokens: &mut Vec<String>,
    files: &CertSource,
) -> Result<(), AcmeError> {
    let ca = |source| AcmeError::Ca {
        directory: settings.directory.clone(),
        source,
    };
    create_cache(&settings.cache)?;
    let account = account(settings).await?;
    let identifiers: Vec<Identifier> = settings
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(ca)?;
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(ca)?;
        if authz.status == AuthorizationStatus::Valid {
            continue;
        }
        let name = authz.identifier().to_string();
        let (kind, label) = match settings.challenge {
            AcmeChallenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
            AcmeChallenge::Http01 => (ChallengeType::Http01, "http-01"),
        };
        let mut challenge = authz
            .challenge(kind)
            .ok_or_else(|| AcmeError::NoChallenge(label, name.clone()))?;
        match settings.challenge {
            AcmeChallenge::TlsAlpn01 => {
                let key = challenge_cert(&name, challenge.key_authorization().digest().as_ref())?;
                let name = name.to_ascii_lowercase();
                edit(&tls.challenges, |answers| {
                    answers.insert(name.clone(), key.clone());
                });
            }
            AcmeChallenge::Http01 => {
                let key_auth = challenge.key_authorization().as_str().to_string();
                let token = challenge.token.clone();
                edit(http01, |answers| {
                    answers.insert(token.clone(), key_auth.clone());
                });
                tokens.push(token);
            }
        }
        challenge.set_ready().await.map_err(ca)?;
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(Duration::from_secs(60));
    let status = order.poll_ready(&retries).await.map_err(ca)?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Order {
            domains: settings.domains.clone(),
            status: format!("{status:?}"),
            problems: problems(&mut order).await,
        });
    }
    let key_pem = order.finalize().await.map_err(ca)?;
    let chain_pem = order.poll_certificate(&retries).await.map_err(ca)?;
    // Checked before it replaces what the listener serves.
    pem::load_key(
        &CertSource::Pem {
            cert: chain_pem.clone(),
            key: key_pem.clone(),
        },
        true,
    )
    .map_err(AcmeError::Issued)?;
    let CertSource::Managed { cert, key, .. } = files else {
        return Ok(());
    };
    // The key first: a reload between the two sees the old pair or a
    // mismatch (refused, the old one kept), never a key it cannot use.
    write_private(key, key_pem.as_bytes())?;
    write_private(cert, chain_pem.as_bytes())?;
    Ok(())
}

/// What the CA said went wrong with `order`: its problem document and
/// those of its challenges.
async fn problems(order: &mut instant_acme::Order) -> String {
    let mut out: Vec<String> = order.state().error.iter().map(|p| p.to_string()).collect();
    let mut authorizations = order.authorizations();
    while let Some(Ok(authz)) = authorizations.next().await {
        let name = authz.identifier().to_string();
        for c in &authz.challenges {
            if let Some(problem) = &c.error {
                out.push(format!("{name} {:?}: {problem}", c.r#type));
            }
        }
    }
    if out.is_empty() {
        "no problem document".into()
    } else {
        out.join("; ")
    }
}

/// The account of `settings`' CA from the cache, else a new one (saved).
async fn account(settings: &AcmeSettings) -> Result<Account, AcmeError> {
    let ca = |source| AcmeError::Ca {
        directory: settings.directory.clone(),
        source,
    };
    let builder = || match &settings.directory_ca {
        Some(root) => Account::builder_with_root(root),
        None => Account::builder(),
    };
    let path = settings.cache.join(format!(
        "account-{:016x}.json",
        crate::balance::hash::hash64(settings.directory.as_bytes())
    ));
    if let Ok(text) = std::fs::read(&path)
        && let Ok(credentials) = serde_json::from_slice::<AccountCredentials>(&text)
    {
        return builder()
            .map_err(ca)?
            .from_credentials(credentials)
            .await
            .map_err(ca);
    }
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()
        .map_err(ca)?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            None,
        )
        .await
        .map_err(ca)?;
    let text = serde_json::to_vec(&credentials).map_err(|e| AcmeError::Cache {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    write_private(&path, &text)?;
    info!(directory = %settings.directory, "ACME account created");
    Ok(account)
}

/// The TLS-ALPN-01 certificate for `name` (RFC 8737): self-signed, with
/// the key authorization's digest in the acmeIdentifier extension.
fn challenge_cert(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(AcmeError::ChallengeCert)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(AcmeError::ChallengeCert)?;
    let cert = params.self_signed(&key).map_err(AcmeError::ChallengeCert)?;
    // Not through `pem::load_key`: its key check runs webpki, which
    // refuses the critical acmeIdentifier extension this certificate must
    // carry.
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = pem::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| AcmeError::ChallengeKey(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

/// Takes the answers of one order's challenges back.
fn clear_challenges(tls: &Tls, domains: &[String], http01: &Http01Answers, tokens: &[String]) {
    edit(&tls.challenges, |answers| {
        for d in domains {
            answers.remove(&d.to_ascii_lowercase());
        }
    });
    if !tokens.is_empty() {
        edit(http01, |answers| {
            for t in tokens {
                answers.remove(t);
            }
        });
    }
}

/// Changes a shared answer map; `rcu`, so that the tasks of several ACME
/// sections editing it at once do not undo each other.
fn edit<V: Clone>(
    map: &arc_swap::ArcSwap<std::collections::HashMap<String, V>>,
    change: impl Fn(&mut std::collections::HashMap<String, V>),
) {
    map.rcu(|current| {
        let mut next = (**current).clone();
        change(&mut next);
        next
    });
}

fn create_cache(dir: &Path) -> Result<(), AcmeError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AcmeError::Cache {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `bytes` to `path` readable by the owner only, through a
/// temporary file renamed over it (a reader never sees half a file).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    let err = |source| AcmeError::Cache {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
