//! Sticky sessions: a cookie that pins a client to a backend.
//!
//! The cookie's value is a random 64-bit nonce naming the pin, then an
//! HMAC-SHA256 of the pool and backend names and that nonce under a secret
//! key, cut to 128 bits: it reveals nothing about the backend and cannot be
//! forged to pick one, and sluice can tell one client's pin from another's
//! (to re-place the clients whose WebSocket it closed itself). Values of
//! the earlier form, the HMAC of pool and backend alone, still pin (without
//! a nonce). A value that matches no backend (unknown, tampered, or from
//! another key) counts as no cookie.

use hmac::{Hmac, KeyInit, Mac};
use hyper::header::{COOKIE, HeaderMap, HeaderValue};
use sha2::Sha256;

use crate::config::{SameSite, StickyConfig};

/// Hex characters of a cookie's MAC (128 bits), the whole value of the
/// earlier form.
const VALUE_LEN: usize = 32;

/// Hex characters of the nonce in front of the MAC.
const NONCE_LEN: usize = 16;

/// A pool's sticky cookies.
#[derive(Debug)]
pub struct Sticky {
    cfg: StickyConfig,
    /// The value of the earlier form for each backend, in pool order.
    values: Vec<String>,
    /// The same, as bytes.
    raw: Vec<[u8; VALUE_LEN / 2]>,
    /// The keyed MAC state after the pool's name, to add a nonce to: a
    /// pin's value is its nonce and its backend's value masked with the
    /// MAC of the nonce, so one MAC checks a cookie whatever the number
    /// of backends (one MAC per backend took 12 µs a request with 8).
    nonce_mac: Hmac<Sha256>,
}

/// What a valid cookie says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The backend, by index in the pool.
    pub backend: usize,
    /// The pin's nonce; `None` for a cookie of the earlier form.
    pub nonce: Option<u64>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        let keyed =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC takes keys of any length");
        let raw: Vec<[u8; VALUE_LEN / 2]> = backends
            .iter()
            .map(|b| {
                let mut mac = keyed.clone();
                mac.update(pool.as_bytes());
                mac.update(&[0]);
                mac.update(b.as_bytes());
                let digest = mac.finalize().into_bytes();
                std::array::from_fn(|i| digest[i])
            })
            .collect();
        let values = raw.iter().map(|r| hex(r)).collect();
        let mut nonce_mac = keyed;
        nonce_mac.update(pool.as_bytes());
        nonce_mac.update(&[1]);
        Self {
            cfg,
            values,
            raw,
            nonce_mac,
        }
    }

    /// What masks a backend's value in pin `nonce`.
    fn mask(&self, nonce: u64) -> [u8; VALUE_LEN / 2] {
        let mut mac = self.nonce_mac.clone();
        mac.update(&nonce.to_be_bytes());
        let digest = mac.finalize().into_bytes();
        std::array::from_fn(|i| digest[i])
    }

    /// Backend `backend`'s value in pin `nonce`, as hex.
    fn tag(&self, backend: usize, nonce: u64) -> String {
        let mask = self.mask(nonce);
        let masked: Vec<u8> = self.raw[backend]
            .iter()
            .zip(mask)
            .map(|(v, m)| v ^ m)
            .collect();
        hex(&masked)
    }

    /// The pin the request's cookie holds, if it has a valid one.
    pub fn pinned(&self, headers: &HeaderMap) -> Option<Pin> {
        cookies(headers, &self.cfg.cookie).find_map(|given| self.pin_of(given))
    }

    fn pin_of(&self, given: &str) -> Option<Pin> {
        if given.len() == NONCE_LEN + VALUE_LEN {
            let nonce = u64::from_str_radix(given.get(..NONCE_LEN)?, 16).ok()?;
            let mask = self.mask(nonce);
            let hex = given.as_bytes().get(NONCE_LEN..)?;
            let mut value = [0u8; VALUE_LEN / 2];
            for (i, byte) in value.iter_mut().enumerate() {
                let pair = std::str::from_utf8(hex.get(2 * i..2 * i + 2)?).ok()?;
                *byte = u8::from_str_radix(pair, 16).ok()? ^ mask[i];
            }
            // Every backend's value is compared in full, found or not.
            let backend = self.raw.iter().enumerate().fold(None, |found, (i, r)| {
                let diff = r.iter().zip(&value).fold(0u8, |acc, (a, b)| acc | (a ^ b));
                if diff == 0 { Some(i) } else { found }
            })?;
            return Some(Pin {
                backend,
                nonce: Some(nonce),
            });
        }
        self.backend_of(given).map(|backend| Pin {
            backend,
            nonce: None,
        })
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

    /// The Set-Cookie value that pins a client to `backend` with pin
    /// `nonce`.
    pub fn set_cookie(&self, backend: usize, nonce: u64) -> Option<HeaderValue> {
        let c = &self.cfg;
        if backend >= self.raw.len() {
            return None;
        }
        let mut text = format!(
            "{}={nonce:016x}{}; Path=/; Max-Age={}",
            c.cookie,
            self.tag(backend, nonce),
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
        let set = s.set_cookie(1, 0xfeed).expect("value");
        let set = set.to_str().expect("ascii");
        assert!(
            set.ends_with("; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=Lax"),
            "{set}"
        );
        assert!(!set.contains("app-2") && !set.contains("127.0.0.1"));
        let value = set.split(';').next().expect("pair");
        assert_eq!(
            s.pinned(&headers(&format!("theme=dark; {value}; other=1"))),
            Some(Pin {
                backend: 1,
                nonce: Some(0xfeed)
            })
        );
        // Each pin has its own value; a tampered nonce is no pin.
        let other = s.set_cookie(1, 0xbeef).expect("value");
        assert_ne!(
            other.to_str().expect("ascii").split(';').next(),
            Some(value)
        );
        let forged = value.replace("000000000000feed", "000000000000beef");
        assert_eq!(s.pinned(&headers(&forged)), None);
        // The earlier form still pins, without a nonce.
        assert_eq!(
            s.pinned(&headers(&format!("SLUICE_AFFINITY={}", s.values[0]))),
            Some(Pin {
                backend: 0,
                nonce: None
            })
        );
    }

    #[test]
    fn forged_tampered_or_foreign_values_count_as_absent() {
        let one = |b| {
            Some(Pin {
                backend: b,
                nonce: None,
            })
        };
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
            one(1)
        );
    }
}
