//! What ties a request to a backend besides load: its sticky cookie and,
//! for `algorithm = "hash"`, the hash of its key. Read from the request
//! here, so that `upstream` never parses requests.

use std::net::SocketAddr;

use hyper::Request;

use crate::balance::{hash, sticky};
use crate::config::{Algorithm, HashKey};
use crate::upstream::{Affinity, Upstream};

/// How `req` is tied to a backend of `upstream`'s pool.
pub fn affinity<B>(upstream: &Upstream, req: &Request<B>, peer: SocketAddr) -> Affinity {
    let pin = upstream
        .sticky
        .as_ref()
        .and_then(|s| s.pinned(req.headers()));
    let key = match &upstream.cfg.algorithm {
        Algorithm::Hash(key) => hash_key(key, req, peer),
        _ => None,
    };
    let mut affinity = Affinity {
        pinned: pin.map(|p| p.backend),
        nonce: pin.and_then(|p| p.nonce),
        key,
        reusable: !super::headers::is_websocket_upgrade(req),
        ..Affinity::default()
    };
    // A pin whose WebSocket sluice closed on purpose is placed afresh.
    if let Some(nonce) = affinity.nonce
        && let Some(from) = upstream
            .pool
            .stats
            .moved
            .take(nonce, std::time::Instant::now())
    {
        affinity.avoid = upstream.pool.backends.iter().position(|b| b.id == from);
        affinity.pinned = None;
        affinity.nonce = None;
        affinity.moved = true;
    }
    affinity
}

/// The hash of what `key` names in `req`, if the request has it.
fn hash_key<B>(key: &HashKey, req: &Request<B>, peer: SocketAddr) -> Option<u64> {
    let bytes: Vec<u8> = match key {
        HashKey::Ip => peer.ip().to_canonical().to_string().into_bytes(),
        HashKey::Header(name) => req.headers().get(name.as_str())?.as_bytes().to_vec(),
        HashKey::Cookie(name) => sticky::cookie(req.headers(), name)?.as_bytes().to_vec(),
        HashKey::Query(name) => percent_decode(
            req.uri()
                .query()?
                .split('&')
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                .find(|(k, _)| percent_decode(k) == name.as_bytes())?
                .1,
        ),
    };
    Some(hash::hash64(&bytes))
}

/// `%XX` escapes and `+` decoded, so that `a%40b` and `a@b` are one key.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_keys_are_percent_decoded() {
        assert_eq!(percent_decode("a%40b+c"), b"a@b c");
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%zz%4"), b"%zz%4");
    }
}
