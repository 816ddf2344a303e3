//! Request and response header rules for a proxy: upgrade detection,
//! hop-by-hop stripping (RFC 9110 §7.6.1) and forwarded headers (RFC 7239).

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri, Version};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Fields a `Connection` header cannot name away.
const END_TO_END: [HeaderName; 7] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_ACCEPT,
    header::SEC_WEBSOCKET_PROTOCOL,
    header::SEC_WEBSOCKET_EXTENSIONS,
];

/// True when `value` (a comma-separated header) lists `token`.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// The request asks to become a WebSocket (`Upgrade: websocket`).
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    has_token(req.headers(), &header::UPGRADE, "websocket")
}

/// The edge rules every request must pass before anything is forwarded:
/// a target no longer than `max_uri_length` (else 414) and of visible
/// ASCII only; `*` only for OPTIONS; no CONNECT (sluice is no forward
/// proxy: 405); and exactly one Host, a `uri-host [":" port]` (RFC 9112
/// §3.2; an HTTP/1.0 request may have none, and an absolute-form target
/// names its host itself).
pub fn check_request<B>(
    req: &Request<B>,
    max_uri_length: usize,
) -> Result<(), (StatusCode, &'static str)> {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + 3);
    if target > max_uri_length {
        return Err((StatusCode::URI_TOO_LONG, "request target too long\n"));
    }
    let path = uri.path_and_query().map_or("", |pq| pq.as_str());
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err((StatusCode::BAD_REQUEST, "invalid request target\n"));
    }
    if req.method() == Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served here\n",
        ));
    }
    if uri
        .authority()
        .is_some_and(|a| !is_host(a.as_str().as_bytes()))
    {
        // Userinfo (`user@host`) or worse in an absolute-form target, which
        // would become the Host sent on.
        return Err((StatusCode::BAD_REQUEST, "invalid request target\n"));
    }
    if path == "*" && req.method() != Method::OPTIONS {
        return Err((
            StatusCode::BAD_REQUEST,
            "a \"*\" target is for OPTIONS only\n",
        ));
    }
    check_transfer_coding(req.headers())?;
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err((StatusCode::BAD_REQUEST, "more than one Host header\n")),
        (Some(host), None) if !is_host(host.as_bytes()) => {
            Err((StatusCode::BAD_REQUEST, "invalid Host header\n"))
        }
        (None, None)
            if matches!(req.version(), Version::HTTP_11 | Version::HTTP_2)
                && uri.authority().is_none() =>
        {
            Err((StatusCode::BAD_REQUEST, "request without a Host header\n"))
        }
        _ => Ok(()),
    }
}

/// `uri-host [":" port]` (RFC 3986 §3.2.2): a bracketed IP literal or a
/// non-empty reg-name / IPv4 address, then optional digits after a colon.
fn is_host(value: &[u8]) -> bool {
    let port = if value.first() == Some(&b'[') {
        let Some(end) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..end];
        let ip_char = |b: &u8| b.is_ascii_hexdigit() || matches!(b, b':' | b'.');
        if literal.is_empty() || !literal.iter().all(ip_char) {
            return false;
        }
        &value[end + 1..]
    } else {
        let split = value
            .iter()
            .rposition(|&b| b == b':')
            .unwrap_or(value.len());
        let (host, port) = value.split_at(split);
        // reg-name: unreserved, pct-encoded and sub-delims.
        let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b);
        if host.is_empty() || !host.iter().all(reg_name) {
            return false;
        }
        port
    };
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// A request body may be framed by a single, final `chunked` and nothing
/// else (RFC 9112 §6.1): a coding sluice does not implement is a 501 (it
/// would reach the backend undeclared once sluice drops the hop-by-hop
/// header), `chunked` twice or not last a 400.
fn check_transfer_coding(headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    let mut codings = Vec::new();
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(text) = value.to_str() else {
            return Err((StatusCode::BAD_REQUEST, "invalid Transfer-Encoding\n"));
        };
        codings.extend(text.split(',').map(str::trim).filter(|c| !c.is_empty()));
    }
    let is_chunked = |c: &str| c.eq_ignore_ascii_case("chunked");
    let chunked = codings.iter().filter(|c| is_chunked(c)).count();
    match (codings.last(), chunked, codings.len()) {
        (Some(last), 1, 1) if is_chunked(last) => Ok(()),
        (Some(last), 1, _) if is_chunked(last) => Err((
            StatusCode::NOT_IMPLEMENTED,
            "transfer coding not supported\n",
        )),
        _ => Err((StatusCode::BAD_REQUEST, "invalid Transfer-Encoding\n")),
    }
}

/// Checks the parts of an upgrade request a backend cannot do without
/// (RFC 6455 §4.1), and that it has no body; the reason goes back to the
/// client with a 400.
pub fn check_websocket_request<B>(req: &Request<B>) -> Result<(), &'static str> {
    if req.method() != Method::GET {
        return Err("WebSocket upgrade must use GET\n");
    }
    if req.version() != Version::HTTP_11 {
        return Err("WebSocket upgrade needs HTTP/1.1\n");
    }
    if !has_token(req.headers(), &header::CONNECTION, "upgrade") {
        return Err("WebSocket upgrade without \"Connection: Upgrade\"\n");
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY);
    if key.is_none_or(|k| k.is_empty()) {
        return Err("WebSocket upgrade without Sec-WebSocket-Key\n");
    }
    if !req.headers().contains_key(header::SEC_WEBSOCKET_VERSION) {
        return Err("WebSocket upgrade without Sec-WebSocket-Version\n");
    }
    // A body before the switch would reach the backend either as body or
    // as the first bytes of the WebSocket, depending on who reads it: the
    // request is refused instead, and its connection closed.
    let length = req.headers().get(header::CONTENT_LENGTH);
    if req.headers().contains_key(header::TRANSFER_ENCODING)
        || length.is_some_and(|v| v.as_bytes() != b"0")
    {
        return Err("WebSocket upgrade with a request body\n");
    }
    Ok(())
}

/// A response with Transfer-Encoding was framed by it, not by a
/// Content-Length it also carries (RFC 9112 §6.3): the length is dropped
/// before the response is passed on (with the body hyper decoded), so the
/// client is never told a wrong length.
pub fn drop_length_of_chunked(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Removes hop-by-hop headers, including those the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        // A Connection header may not take away what the request needs
        // end to end (RFC 9110 §7.6.1 lists hop-by-hop fields only).
        if !END_TO_END.contains(&name) {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Turns a client request into the request for the backend: origin-form
/// target, HTTP/1.1, no hop-by-hop headers (but the upgrade pair for a
/// WebSocket), and forwarded headers with the client's scheme (`forwarded`,
/// `None` when disabled).
pub fn prepare_request<B>(
    req: &mut Request<B>,
    peer: SocketAddr,
    forwarded: Option<&'static str>,
    websocket: bool,
) {
    if req.uri().authority().is_some() {
        // Absolute-form target: the backend gets origin-form, and a Host
        // equal to the target's authority (RFC 9112 §3.2.2).
        if let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned())
            && let Ok(host) = HeaderValue::from_str(&authority)
        {
            req.headers_mut().insert(header::HOST, host);
        }
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        *req.uri_mut() = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
    }
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    join_cookies(headers);
    if websocket {
        // Only the protocol sluice tunnels: a client's `Upgrade: websocket,
        // h2c` must not let a backend switch it to something else.
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    if let Some(proto) = forwarded {
        add_forwarded(headers, peer, proto);
    }
}

/// Sets Host from the target's authority when the request has none (an
/// HTTP/2 request names its host in `:authority`).
pub fn host_from_authority<B>(req: &mut Request<B>) {
    if req.headers().contains_key(header::HOST) {
        return;
    }
    if let Some(host) = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
}

/// One Cookie header of all of them, `; `-separated: HTTP/2 clients send
/// each cookie in a field of its own, which an HTTP/1.1 backend must get
/// as one (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// Appends the client to X-Forwarded-For and Forwarded, and sets
/// X-Forwarded-Proto to the scheme the client used.
pub fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, proto: &'static str) {
    let ip = peer.ip().to_canonical();
    // Every X-Forwarded-For line the client sent, in order, then the client.
    let mut xff: Vec<String> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    xff.push(ip.to_string());
    let xff = xff.join(", ");
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    let node = if ip.is_ipv6() {
        format!("for=\"[{ip}]\";proto={proto}")
    } else {
        format!("for={ip};proto={proto}")
    };
    if let Ok(v) = HeaderValue::from_str(&node) {
        headers.append(FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/chat");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid request")
    }

    #[test]
    fn host_values_are_uri_host_and_port() {
        for good in [
            "sluice.test",
            "sluice.test:8080",
            "127.0.0.1",
            "[::1]:443",
            "[2001:db8::1]",
            "a-b_c~d",
            "x:",
        ] {
            assert!(is_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "' sluice.test",
            "user@evil.test",
            "a b",
            "a:b",
            "[::1",
            "[]",
            "[::1]x",
            "a/b",
            "\u{e9}.test",
        ] {
            assert!(!is_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn upgrade_detection_is_token_based() {
        assert!(is_websocket_upgrade(&req(&[("upgrade", "WebSocket")])));
        assert!(!is_websocket_upgrade(&req(&[("upgrade", "h2c")])));
        let ok = req(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ]);
        assert_eq!(check_websocket_request(&ok), Ok(()));
        let no_key = req(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
        ]);
        assert!(check_websocket_request(&no_key).is_err());
    }

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut r = req(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "5"),
            ("cookie", "a=b"),
        ]);
        prepare_request(&mut r, "10.1.2.3:5555".parse().expect("addr"), None, false);
        let h = r.headers();
        assert!(
            h.get("connection").is_none()
                && h.get("x-secret").is_none()
                && h.get("keep-alive").is_none()
        );
        assert_eq!(h["cookie"], "a=b");
    }

    #[test]
    fn websocket_keeps_the_upgrade_pair() {
        let mut r = req(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("origin", "http://x"),
        ]);
        prepare_request(
            &mut r,
            "10.1.2.3:5555".parse().expect("addr"),
            Some("http"),
            true,
        );
        let h = r.headers();
        assert_eq!(h["connection"], "Upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["origin"], "http://x");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut r = req(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=1.1.1.1")]);
        prepare_request(
            &mut r,
            "10.1.2.3:5555".parse().expect("addr"),
            Some("http"),
            false,
        );
        let h = r.headers();
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        let fwd: Vec<_> = h.get_all("forwarded").iter().collect();
        assert_eq!(fwd, ["for=1.1.1.1", "for=10.1.2.3;proto=http"]);
        let mut r = req(&[]);
        prepare_request(
            &mut r,
            "[::1]:80".parse().expect("addr"),
            Some("http"),
            false,
        );
        assert_eq!(r.headers()["forwarded"], "for=\"[::1]\";proto=http");
    }

    #[test]
    fn every_forwarded_for_line_is_kept() {
        let mut r = req(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2, 3.3.3.3"),
        ]);
        prepare_request(
            &mut r,
            "10.1.2.3:5555".parse().expect("addr"),
            Some("http"),
            false,
        );
        let all: Vec<_> = r.headers().get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3"]);
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let mut r = Request::builder()
            .uri("http://example.com/a?b=1")
            .body(())
            .expect("valid");
        prepare_request(&mut r, "10.1.2.3:5555".parse().expect("addr"), None, false);
        assert_eq!(r.uri(), "/a?b=1");
        assert_eq!(r.headers()["host"], "example.com");
    }

    #[test]
    fn an_http2_request_reaches_the_backend_as_http_1_1_with_one_cookie_line() {
        let mut r = Request::builder()
            .version(Version::HTTP_2)
            .uri("https://chat.example.com/page")
            .header("cookie", "a=1")
            .header("cookie", "sluice=b1.x")
            .body(())
            .expect("valid");
        prepare_request(&mut r, "10.1.2.3:5555".parse().expect("addr"), None, false);
        assert_eq!(r.version(), Version::HTTP_11);
        assert_eq!(r.uri(), "/page");
        assert_eq!(r.headers()["host"], "chat.example.com");
        let cookies: Vec<_> = r.headers().get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; sluice=b1.x"]);
    }
}
