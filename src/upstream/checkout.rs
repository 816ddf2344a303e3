//! The one path from a client request to a backend's answer, for plain
//! requests and WebSocket upgrades alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HOST, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{debug, warn};

use tokio::io::AsyncWriteExt;

use crate::error_chain::chain;
use crate::proxy_protocol::{self, Client};
use crate::registry::{Lease, Registry};

use super::stream::{BackendStream, connect};
use super::{Affinity, BodyStalled, RequestBody, Upstream, UpstreamError};

/// Idle connections the backend closed under us that a request may meet
/// before it is sent on a fresh one; they do not count as attempts.
const STALE_RETRIES: usize = 3;

/// A backend's answer to a request, with what it was sent over.
#[derive(Debug)]
pub struct Answer {
    /// The backend's index in the pool.
    pub backend: usize,
    /// Keeps the request counted on the backend until the answer is done.
    pub lease: Lease,
    /// The connection: back to the idle pool after a plain response, or
    /// handed to the tunnel after a 101.
    pub sender: SendRequest<RequestBody>,
    pub resp: Response<Incoming>,
}

impl Upstream {
    /// Sends `req` to a backend of the pool and returns its answer head.
    ///
    /// Picks and leases a backend (waiting for admission if need be), takes
    /// an idle connection for a plain request or opens one, sends, and
    /// waits `response_timeout` for the answer. A backend that cannot be
    /// connected to is counted against its passive health and another one
    /// is tried, `retries` more at most; one that fails before answering
    /// (or answers an upgrade with a 5xx) is counted too. The error says
    /// who failed ([`UpstreamError::blame`]).
    pub async fn send(
        &self,
        registry: &Arc<Registry>,
        affinity: Affinity,
        mut req: Request<RequestBody>,
        client: &Client,
    ) -> Result<Answer, UpstreamError> {
        let kind = if affinity.reusable {
            "request"
        } else {
            "upgrade"
        };
        // The one Sec-WebSocket-Accept a backend's 101 may carry.
        let expected_accept = if affinity.reusable {
            None
        } else {
            req.headers()
                .get(SEC_WEBSOCKET_KEY)
                .map(|key| derive_accept_key(key.as_bytes()))
        };
        let mut tried = Vec::new();
        let mut stale_left = STALE_RETRIES;
        let mut host_added = false;
        loop {
            let (i, lease) = self.next_lease(registry, &tried, affinity).await?;
            let backend = lease.backend();
            // After a retry the span shows each backend tried, in order.
            tracing::Span::current().record("backend", backend.name.as_str());
            if let Some(tried) = req.extensions().get::<super::TriedBackend>() {
                tried.note(backend);
            }
            let pooled = if affinity.reusable && self.reuses_connections() {
                self.idle[i].checkout()
            } else {
                None
            };
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(sender) => sender,
                None => match self.open_http(i, client).await {
                    Ok(sender) => sender,
                    Err(error) => {
                        warn!(pool = %self.cfg.name, backend = %backend.name, error = %chain(&error), "upstream connect failed");
                        self.note_failure(backend, "connect failed");
                        tried.push(i);
                        self.give_up_after(&tried, error)?;
                        continue;
                    }
                },
            };
            if host_added || !req.headers().contains_key(HOST) {
                // An HTTP/1.0 request may come without Host; it goes on as
                // HTTP/1.1, which needs one: the address of the backend it
                // goes to (as nginx's `proxy_set_header Host $proxy_host`),
                // set again on a retry to another.
                if let Ok(host) = HeaderValue::from_str(&backend.addr.to_string()) {
                    req.headers_mut().insert(HOST, host);
                    host_added = true;
                }
            }
            let timeout = self.cfg.response_timeout;
            let Ok(sent) = tokio::time::timeout(timeout, sender.try_send_request(req)).await else {
                warn!(pool = %self.cfg.name, backend = %backend.name, kind, ?timeout, "backend did not answer in time");
                return Err(UpstreamError::ResponseTimeout {
                    addr: backend.addr,
                    timeout,
                });
            };
            let mut error = match sent {
                Ok(resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && let Err(reason) = check_switch(&resp, expected_accept.as_deref())
                    {
                        warn!(pool = %self.cfg.name, backend = %backend.name, kind, reason, "backend switched protocols wrongly");
                        self.note_failure(backend, "an invalid 101");
                        return Err(UpstreamError::BadSwitch {
                            addr: backend.addr,
                            reason,
                        });
                    }
                    if !affinity.reusable && resp.status().is_server_error() {
                        self.note_failure(backend, "5xx to an upgrade");
                    } else {
                        backend.note_success();
                    }
                    return Ok(Answer {
                        backend: i,
                        lease,
                        sender,
                        resp,
                    });
                }
                Err(error) => error,
            };
            match error.take_message() {
                Some(unsent) if reused && stale_left > 0 => {
                    // The idle connection was closed by the backend: the
                    // request was not sent, so it can go on a fresh one.
                    stale_left -= 1;
                    req = unsent;
                }
                _ if affinity.reusable && error.error().is_user() => {
                    // The client's own request body failed (it went away
                    // mid-upload): not the backend's fault. (An upgrade has
                    // no body: there it is the backend's connection.)
                    debug!(error = %chain(error.error()), "request body failed");
                    let source = error.into_error();
                    let stalled =
                        std::iter::successors(std::error::Error::source(&source), |e| e.source())
                            .find_map(|e| e.downcast_ref::<BodyStalled>());
                    if let Some(BodyStalled(timeout)) = stalled {
                        return Err(UpstreamError::BodyStalled { timeout: *timeout });
                    }
                    return Err(UpstreamError::ClientBody { source });
                }
                _ => {
                    warn!(pool = %self.cfg.name, backend = %backend.name, kind, error = %chain(error.error()), "backend failed before answering");
                    self.note_failure(backend, "failed before answering");
                    return Err(UpstreamError::Failed {
                        addr: backend.addr,
                        source: error.into_error(),
                    });
                }
            }
        }
    }

    /// Opens a connection to backend `backend` (TCP with the pool's
    /// timeout, recording how long it took; TLS when the backend has it)
    /// and starts HTTP/1.1 on it.
    async fn open_http(
        &self,
        backend: usize,
        client: &Client,
    ) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let addr = self.cfg.backends[backend].address;
        let stream = self.open(backend, addr, client).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        // Driven by its own task, which also lets an upgrade (101) hand the
        // socket over.
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                debug!(backend.addr = %addr, error = %chain(&error), "upstream connection ended");
            }
        });
        Ok(sender)
    }

    async fn open(
        &self,
        backend: usize,
        addr: SocketAddr,
        client: &Client,
    ) -> Result<BackendStream, UpstreamError> {
        let started = Instant::now();
        let mut tcp = connect(addr, self.cfg.connect_timeout, self.cfg.tcp_keepalive).await?;
        self.connect_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(version) = self.cfg.send_proxy_protocol {
            // Before anything else on the connection, TLS included.
            tcp.write_all(&proxy_protocol::header(client, version))
                .await
                .map_err(|source| UpstreamError::Connect { addr, source })?;
        }
        let Some(tls) = &self.connectors[backend] else {
            return Ok(BackendStream::Plain(tcp));
        };
        let handshake = tls.connector.connect(tls.server_name.clone(), tcp);
        match tokio::time::timeout(self.cfg.connect_timeout, handshake).await {
            Ok(Ok(tls)) => Ok(BackendStream::Tls(Box::new(tls))),
            Ok(Err(source)) => Err(UpstreamError::Tls { addr, source }),
            Err(_) => Err(UpstreamError::ConnectTimeout {
                addr,
                timeout: self.cfg.connect_timeout,
            }),
        }
    }

    /// After a failed attempt: `Err` when no further attempt may be made.
    fn give_up_after(&self, tried: &[usize], error: UpstreamError) -> Result<(), UpstreamError> {
        if tried.len() >= self.cfg.backends.len() {
            return Err(UpstreamError::AllFailed {
                pool: self.cfg.name.clone(),
            });
        }
        if tried.len() > self.cfg.retries {
            return Err(error);
        }
        Ok(())
    }
}

/// A 101 is a WebSocket or nothing: an answer to an upgrade sluice asked
/// for (`expected_accept`, from the client's key), naming `websocket`,
/// with the matching Sec-WebSocket-Accept (RFC 6455 §4.2.2). A 101 to a
/// plain request (no key) is refused too: the client asked for nothing.
fn check_switch<B>(resp: &Response<B>, expected_accept: Option<&str>) -> Result<(), &'static str> {
    let Some(expected) = expected_accept else {
        return Err("a 101 to a request that asked for no upgrade");
    };
    let names_websocket = resp.headers().get_all(UPGRADE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.trim().eq_ignore_ascii_case("websocket"))
    });
    if !names_websocket {
        return Err("its Upgrade is not websocket");
    }
    match resp.headers().get(SEC_WEBSOCKET_ACCEPT) {
        Some(accept) if accept.as_bytes() == expected.as_bytes() => Ok(()),
        Some(_) => Err("Sec-WebSocket-Accept does not match the client's key"),
        None => Err("no Sec-WebSocket-Accept"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(headers: &[(&str, &str)]) -> Response<()> {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        for (k, v) in headers {
            resp.headers_mut().append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                hyper::header::HeaderValue::from_str(v).expect("value"),
            );
        }
        resp
    }

    #[test]
    fn only_the_websocket_asked_for_may_switch() {
        // RFC 6455's example key and accept.
        let expected = derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(expected, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let good = switch(&[
            ("upgrade", "WebSocket"),
            ("sec-websocket-accept", &expected),
        ]);
        assert_eq!(check_switch(&good, Some(&expected)), Ok(()));
        let wrong = switch(&[("upgrade", "websocket"), ("sec-websocket-accept", "x")]);
        assert!(check_switch(&wrong, Some(&expected)).is_err());
        let missing = switch(&[("upgrade", "websocket")]);
        assert_eq!(
            check_switch(&missing, Some(&expected)),
            Err("no Sec-WebSocket-Accept")
        );
        let h2c = switch(&[("upgrade", "h2c"), ("sec-websocket-accept", &expected)]);
        assert!(check_switch(&h2c, Some(&expected)).is_err());
        assert!(
            check_switch(&good, None).is_err(),
            "no upgrade was asked for"
        );
    }
}
