//! Sticky sessions: a cookie that pins a client to a backend.
//!
//! The cookie's value is an HMAC-SHA256 of the pool and backend names under
//! a secret key, cut to 128 bits: it reveals nothing about the backend and
//! cannot be forged to pick one. A value that matches no backend (unknown,
//! tampered, or from another key) counts as no cookie.

use hmac::{Hmac, KeyInit, Mac};
use hyper::header::{COOKIE, HeaderMap, HeaderValue};
use sha2::Sha256;

use crate::config::{SameSite, StickyConfig};

/// Hex characters of a cookie value (128 bits).
const VALUE_LEN: usize = 32;

/// A pool's sticky cookies.
#[derive(Debug)]
pub struct Sticky {
    cfg: StickyConfig,
    /// The cookie value of each backend, in pool order.
    values: Vec<String>,
}

/// Every value of cookie `name` in the request's Cookie headers (a
/// browser sends several when paths or ports differ).
pub fn cookies<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = &'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

/// The first value of cookie `name`.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &'h str) -> Option<&'h str> {
    cookies(headers, name).next()
}

impl Sticky {
    /// Cookie values for `backends` of `pool`, keyed by the configured
    /// secret, else by `fallback_key` (random at start).
    pub fn new(cfg: StickyConfig, pool: &str, backends: &[&str], fallback_key: &[u8]) -> Self {
        let key = cfg.secret.clone().unwrap_or_else(|| fallback_key.to_vec());
        let values = backends
            .iter()
            .map(|b| {
                let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key)
                    .expect("HMAC takes keys of any length");
                mac.update(pool.as_bytes());
                mac.update(&[0]);
                mac.update(b.as_bytes());
                let digest = mac.finalize().into_bytes();
                digest
                    .iter()
                    .take(VALUE_LEN / 2)
                    .map(|b| format!("{b:02x}"))
                    .collect()
            })
            .collect();
        Self { cfg, values }
    }

    /// The backend the request's cookie pins it to, if it has a valid one.
    pub fn pinned(&self, headers: &HeaderMap) -> Option<usize> {
        cookies(headers, &self.cfg.cookie).find_map(|given| self.backend_of(given))
    }

    fn backend_of(&self, given: &str) -> Option<usize> {
        if given.len() != VALUE_LEN {
            return None;
        }
        // Compare every value in full, in constant time.
        let mut found = None;
        for (i, v) in self.values.iter().enumerate() {
            let diff = v
                .bytes()
                .zip(given.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(i);
            }
        }
        found
    }

    /// The Set-Cookie value that pins a client to `backend`.
    pub fn set_cookie(&self, backend: usize) -> Option<HeaderValue> {
        let c = &self.cfg;
        let mut text = format!(
            "{}={}; Path=/; Max-Age={}",
            c.cookie,
            self.values.get(backend)?,
            c.ttl.as_secs()
        );
        if c.http_only {
            text.push_str("; HttpOnly");
        }
        if c.secure {
            text.push_str("; Secure");
        }
        text.push_str(match c.same_site {
            SameSite::Lax => "; SameSite=Lax",
            SameSite::Strict => "; SameSite=Strict",
            SameSite::None => "; SameSite=None",
        });
        HeaderValue::from_str(&text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sticky(secret: &[u8]) -> Sticky {
        let cfg = StickyConfig {
            secure: true,
            secret: Some(secret.to_vec()),
            ..StickyConfig::default()
        };
        Sticky::new(cfg, "app", &["app-1", "app-2"], &[7; 32])
    }

    fn headers(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(cookie).expect("ascii"));
        h
    }

    #[test]
    fn a_cookie_round_trips_and_reveals_nothing() {
        let s = sticky(b"0123456789abcdef0123");
        let set = s.set_cookie(1).expect("value");
        let set = set.to_str().expect("ascii");
        assert!(
            set.ends_with("; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=Lax"),
            "{set}"
        );
        assert!(!set.contains("app-2") && !set.contains("127.0.0.1"));
        let value = set.split(';').next().expect("pair");
        assert_eq!(
            s.pinned(&headers(&format!("theme=dark; {value}; other=1"))),
            Some(1)
        );
    }

    #[test]
    fn forged_tampered_or_foreign_values_count_as_absent() {
        let s = sticky(b"0123456789abcdef0123");
        assert_eq!(s.pinned(&headers("SLUICE_AFFINITY=app-1")), None);
        assert_eq!(
            s.pinned(&headers(&format!("SLUICE_AFFINITY={}", "0".repeat(32)))),
            None
        );
        let mut real = s.values[0].clone();
        real.replace_range(0..1, if real.starts_with('a') { "b" } else { "a" });
        assert_eq!(s.pinned(&headers(&format!("SLUICE_AFFINITY={real}"))), None);
        let other_key = sticky(b"another secret key!!");
        assert_eq!(
            s.pinned(&headers(&format!(
                "SLUICE_AFFINITY={}",
                other_key.values[0]
            ))),
            None
        );
        assert_eq!(s.pinned(&HeaderMap::new()), None);
        // A foreign value first does not hide ours.
        let ours = &s.values[1];
        assert_eq!(
            s.pinned(&headers(&format!(
                "SLUICE_AFFINITY={}; SLUICE_AFFINITY={ours}",
                "f".repeat(32)
            ))),
            Some(1)
        );
    }
}
