//! A client for the admin API, for `sluice ctl` and the tests.
//!
//! Owns the client side of the API: one HTTP/1.1 connection per request,
//! the bearer token, and decoding answers into the `api` types (errors
//! into `ClientError::Status` with the API's message). Also parses the
//! admin address users write (`--admin`, `SLUICE_ADMIN`). Holds no state
//! between requests.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use super::api;

/// Where the status document is.
const STATUS_PATH: &str = "/api/v1/status";

/// Why an admin request failed. Each message names the step; the cause,
/// when there is one, is the `source`, so `{:#}` prints it once.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the admin API at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the admin API at {addr}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The API refused the request; `message` is its `error` field.
    #[error("admin API answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("reading the admin API's answer to {method} {path}")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path:?} is not a valid request path (check the pool and backend names)")]
    Path { path: String },
}

/// Why an admin address was refused. Each names the value as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminAddrError {
    #[error(
        "admin address {0:?}: the admin API speaks plain HTTP, not HTTPS; expected host:port or http://host:port"
    )]
    Https(String),
    #[error(
        "admin address {0:?}: only the http:// scheme is supported; expected host:port or http://host:port"
    )]
    Scheme(String),
    #[error("admin address {0:?}: a path is not allowed; expected host:port or http://host:port")]
    Path(String),
    #[error(
        "admin address {0:?}: not an IP address and port (e.g. 127.0.0.1:9901); expected host:port or http://host:port"
    )]
    Syntax(String),
}

/// Parses the admin address users write: `host:port` or `http://host:port`,
/// where host is an IP address (IPv6 in brackets), with an optional
/// trailing `/`. The scheme is case-insensitive; anything else (another
/// scheme, a path, a query) is refused.
pub fn parse_admin_addr(text: &str) -> Result<SocketAddr, AdminAddrError> {
    let rest = match text.split_once("://") {
        None => text,
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(AdminAddrError::Https(text.to_string()));
        }
        Some(_) => return Err(AdminAddrError::Scheme(text.to_string())),
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    if !(path.is_empty() || path == "/") {
        return Err(AdminAddrError::Path(text.to_string()));
    }
    authority
        .parse()
        .map_err(|_| AdminAddrError::Syntax(text.to_string()))
}

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct AdminClient {
    pub addr: SocketAddr,
    /// Sent as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
}

impl AdminClient {
    /// `GET /api/v1/status`.
    pub async fn status(&self) -> Result<api::Status, ClientError> {
        self.request(Method::GET, STATUS_PATH, None::<&()>).await
    }

    /// Drains `pool`/`backend` over `window` (the pool's drain window when
    /// `None`); answers the backend as it is now.
    pub async fn drain(
        &self,
        pool: &str,
        backend: &str,
        window: Option<&str>,
    ) -> Result<api::Backend, ClientError> {
        let body = api::DrainRequest {
            window: window.map(str::to_string),
        };
        let path = backend_path(pool, backend, "drain");
        self.request(Method::POST, &path, Some(&body)).await
    }

    /// Puts `pool`/`backend` back in rotation; answers the backend as it
    /// is now.
    pub async fn undrain(&self, pool: &str, backend: &str) -> Result<api::Backend, ClientError> {
        let path = backend_path(pool, backend, "undrain");
        self.request(Method::POST, &path, Some(&api::UndrainRequest {}))
            .await
    }

    /// `POST /api/v1/reload`: reads the config file again and applies it.
    pub async fn reload(&self) -> Result<api::ReloadReport, ClientError> {
        self.request(Method::POST, "/api/v1/reload", None::<&()>)
            .await
    }

    /// `POST /api/v1/upgrade`: starts the binary anew and hands it over.
    pub async fn upgrade(&self) -> Result<api::UpgradeReport, ClientError> {
        self.request(Method::POST, "/api/v1/upgrade", None::<&()>)
            .await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let addr = self.addr;
        let uri = path.parse().map_err(|_| ClientError::Path {
            path: path.to_string(),
        })?;
        let body = match body {
            Some(body) => serde_json::to_vec(body).expect("request bodies always serialize"),
            None => Vec::new(),
        };
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ClientError::Http { addr, source })?;
        tokio::spawn(conn);
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(header::HOST, HeaderValue::from_static("sluice-admin"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(v) = self
            .token
            .as_ref()
            .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            headers.insert(header::AUTHORIZATION, v);
        }
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| ClientError::Http { addr, source })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| ClientError::Http { addr, source })?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<api::ErrorBody>(&bytes)
                .map_or_else(|_| "no message".to_string(), |body| body.error);
            return Err(ClientError::Status { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            path: path.to_string(),
            source,
        })
    }
}

/// The path of a backend action (`drain`, `undrain`).
fn backend_path(pool: &str, backend: &str, action: &str) -> String {
    format!("/api/v1/pools/{pool}/backends/{backend}/{action}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_with_and_without_the_http_scheme() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9901));
        for text in [
            "127.0.0.1:9901",
            "http://127.0.0.1:9901",
            "http://127.0.0.1:9901/",
            "HTTP://127.0.0.1:9901",
        ] {
            assert_eq!(parse_admin_addr(text), Ok(addr), "{text}");
        }
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 9901));
        assert_eq!(parse_admin_addr("http://[::1]:9901/"), Ok(v6));
        assert_eq!(parse_admin_addr("[::1]:9901"), Ok(v6));
    }

    #[test]
    fn other_admin_addresses_are_refused_naming_the_value() {
        use AdminAddrError::*;
        let cases = [
            (
                "https://127.0.0.1:9901",
                Https("https://127.0.0.1:9901".into()),
            ),
            (
                "ftp://127.0.0.1:9901",
                Scheme("ftp://127.0.0.1:9901".into()),
            ),
            (
                "http://127.0.0.1:9901/api/v1/status",
                Path("http://127.0.0.1:9901/api/v1/status".into()),
            ),
            ("127.0.0.1:9901/x", Path("127.0.0.1:9901/x".into())),
            (
                "http://127.0.0.1:9901?x=1",
                Syntax("http://127.0.0.1:9901?x=1".into()),
            ),
            ("http://", Syntax("http://".into())),
            ("127.0.0.1", Syntax("127.0.0.1".into())),
            ("garbage", Syntax("garbage".into())),
            ("", Syntax(String::new())),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_admin_addr(text), Err(expected), "{text}");
        }
        assert_eq!(
            parse_admin_addr("https://127.0.0.1:9901")
                .expect_err("https")
                .to_string(),
            "admin address \"https://127.0.0.1:9901\": the admin API speaks plain HTTP, not HTTPS; expected host:port or http://host:port"
        );
        assert_eq!(
            parse_admin_addr("garbage")
                .expect_err("garbage")
                .to_string(),
            "admin address \"garbage\": not an IP address and port (e.g. 127.0.0.1:9901); expected host:port or http://host:port"
        );
    }

    #[test]
    fn client_errors_name_the_step_and_leave_the_cause_to_source() {
        use std::error::Error as _;
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cause = refused.to_string();
        let err = ClientError::Connect {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            source: refused,
        };
        assert_eq!(
            err.to_string(),
            "connecting to the admin API at 127.0.0.1:1"
        );
        assert_eq!(err.source().map(ToString::to_string), Some(cause));
    }
}
