//! The streams a tunnel moves bytes between: plain TCP and TLS over TCP,
//! waited on without holding a buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A stream the tunnel can wait on without holding a buffer.
pub trait TunnelIo: AsyncWrite + Unpin + Send + 'static {
    /// Ready when a read would make progress (data, end of stream, error).
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Reads what is available into `buf`'s spare capacity; `WouldBlock`
    /// when nothing is.
    fn read_available(&mut self, buf: &mut Vec<u8>) -> io::Result<usize>;
}

impl TunnelIo for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    /// A read that does not fill the buffer has drained the socket, so the
    /// readiness is cleared right away: the next read attempt costs no
    /// system call that would only answer "would block". (tokio keeps
    /// readiness that a newer event set, so data arriving meanwhile is not
    /// missed.)
    fn read_available(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let spare = buf.capacity() - buf.len();
        let mut short_read = None;
        let result = self.try_io(Interest::READABLE, || {
            let n = self.try_read_buf(buf)?;
            if n > 0 && n < spare {
                short_read = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match short_read {
            Some(n) => Ok(n),
            None => result,
        }
    }
}

/// Ready when rustls already holds decrypted bytes (or the end of the
/// stream, or an error), else when the socket is readable.
fn poll_tls_read_ready<D>(
    tcp: &TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let buffered = conn.process_new_packets().map_or(true, |state| {
        state.plaintext_bytes_to_read() > 0 || state.peer_has_closed()
    });
    if buffered {
        return Poll::Ready(Ok(()));
    }
    tcp.poll_read_ready(cx)
}

/// Reads with a no-op waker: Pending means nothing is there now; the
/// tunnel then waits in `poll_read_ready` with its own waker.
pub fn read_with_noop_waker(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let spare = buf.spare_capacity_mut();
    let mut read = ReadBuf::uninit(spare);
    let start = read.filled().as_ptr();
    match Pin::new(stream).poll_read(&mut cx, &mut read) {
        Poll::Ready(Ok(())) => {
            if read.filled().as_ptr() != start {
                // The reader swapped the buffer: its bytes are not in ours.
                return Err(io::Error::other("reader replaced the read buffer"));
            }
            let n = read.filled().len();
            // SAFETY: poll_read initialised and filled the first n bytes of
            // the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            Ok(n)
        }
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl TunnelIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, conn) = self.get_mut();
        poll_tls_read_ready(tcp, conn, cx)
    }

    fn read_available(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        read_with_noop_waker(self, buf)
    }
}

impl TunnelIo for tokio_rustls::client::TlsStream<TcpStream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, conn) = self.get_mut();
        poll_tls_read_ready(tcp, conn, cx)
    }

    fn read_available(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        read_with_noop_waker(self, buf)
    }
}
