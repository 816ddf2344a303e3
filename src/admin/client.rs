//! A client for the admin API, for `sluice ctl` and the tests.
//!
//! Owns the client side of the API: one HTTP/1.1 connection per request,
//! the bearer token, and decoding answers into the `api` types (errors
//! into `ClientError::Status` with the API's message). Holds no state
//! between requests.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpStream;

use super::api;

/// Where the status document is.
const STATUS_PATH: &str = "/api/v1/status";

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the admin API at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("talking to the admin API at {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("admin API answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("admin API sent invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
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

    /// Any GET, answered as untyped JSON (the typed methods are the API;
    /// this is for probing it).
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, None::<&()>).await
    }

    /// Any POST with a JSON body, answered as untyped JSON.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, ClientError> {
        self.request(Method::POST, path, Some(&body)).await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let addr = self.addr;
        let uri = path.parse().map_err(|_| ClientError::Status {
            status: StatusCode::BAD_REQUEST,
            message: format!("invalid path {path:?}"),
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
        *req.method_mut() = method;
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
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// The path of a backend action (`drain`, `undrain`).
fn backend_path(pool: &str, backend: &str, action: &str) -> String {
    format!("/api/v1/pools/{pool}/backends/{backend}/{action}")
}
