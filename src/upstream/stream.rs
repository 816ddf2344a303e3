//! Connections to one backend: TCP with a timeout, and TLS over it for
//! backends that only speak TLS.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{BackendTls, TcpKeepalive};
use crate::pem::{self, PemError};
use crate::sockopt;
use crate::tunnel::TunnelIo;

use super::UpstreamError;

/// How to open TLS to one backend: built once at start from its `tls`
/// settings.
#[derive(Clone)]
pub struct BackendTlsConnector {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for BackendTlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTlsConnector")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl BackendTlsConnector {
    /// The connector and server name for a backend's `tls` settings.
    pub fn new(cfg: &BackendTls) -> Result<Self, PemError> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(pem::client_config(&cfg.ca)?));
        let server_name =
            ServerName::try_from(cfg.server_name.clone()).map_err(|e| PemError::Unusable {
                path: cfg.ca.clone(),
                reason: format!("server_name {:?}: {e}", cfg.server_name),
            })?;
        Ok(Self {
            connector,
            server_name,
        })
    }

    /// The host name the backend's certificate must carry.
    pub fn host(&self) -> String {
        self.server_name.to_str().into_owned()
    }
}

/// Opens a TCP connection to `addr` within `timeout`, with keepalive
/// probes when the pool has them.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<TcpKeepalive>,
) -> Result<TcpStream, UpstreamError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Ok(Ok(stream)) => {
            // Small WebSocket frames must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            if let Some(k) = keepalive {
                sockopt::keepalive(&stream, k.idle, k.interval, k.count);
            }
            Ok(stream)
        }
    }
}

/// A connection to a backend: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl TunnelIo for BackendStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Plain(s) => TunnelIo::poll_read_ready(s, cx),
            Self::Tls(s) => TunnelIo::poll_read_ready(s.as_mut(), cx),
        }
    }

    fn read_available(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read_available(buf),
            Self::Tls(s) => s.as_mut().read_available(buf),
        }
    }
}
