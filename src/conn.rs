//! A connection's byte stream as the session and the relay see it: a TCP socket, or TLS over one (a client on a
//! listener with `tls`, a backend of an upstream with `tls`).
//!
//! The session reads and writes heads through [`AsyncRead`]/[`AsyncWrite`]; the relay uses the few calls below,
//! which on a plain socket are exactly the readiness-driven system calls the relay made before TLS existed (a
//! short read or write clears the readiness it holds), and on TLS go through rustls, whose buffers hold what a
//! full socket could not take until [`Conn::poll_flush_out`] has written it.

use std::io::{self, Read as _, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;
type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// A client's or a backend's connection.
pub enum Conn {
    Tcp(TcpStream),
    /// A client's connection to a TLS listener (boxed: rustls's state is large, and most connections are plain).
    ServerTls(Box<ServerTls>),
    /// A connection to a backend of a TLS upstream.
    ClientTls(Box<ClientTls>),
}

impl From<TcpStream> for Conn {
    fn from(stream: TcpStream) -> Self {
        Conn::Tcp(stream)
    }
}

impl Conn {
    /// The TCP socket under the connection.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Tcp(s) => s,
            Conn::ServerTls(s) => s.get_ref().0,
            Conn::ClientTls(s) => s.get_ref().0,
        }
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Conn::Tcp(_))
    }

    /// Reads once into `buf`: `Ok(0)` when the peer has closed. On TLS, a TCP close without TLS's close_notify is
    /// a close too (clients that drop the socket after a WebSocket close frame do that).
    pub(crate) fn poll_read_some(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            Conn::Tcp(s) => loop {
                ready!(s.poll_read_ready(cx))?;
                match read_some(s, buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return Poll::Ready(other),
                }
            },
            Conn::ServerTls(s) => poll_tls_read(Pin::new(&mut **s), cx, buf),
            Conn::ClientTls(s) => poll_tls_read(Pin::new(&mut **s), cx, buf),
        }
    }

    /// Writes as much of `buf` as the connection takes now; `Pending` when it takes nothing. On TLS the bytes
    /// taken may still sit in rustls's buffer: see [`Conn::poll_flush_out`].
    pub(crate) fn poll_write_some(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Conn::Tcp(s) => loop {
                ready!(s.poll_write_ready(cx))?;
                match write_some(s, buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return Poll::Ready(other),
                }
            },
            Conn::ServerTls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Conn::ClientTls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    /// Writes out what TLS holds for the socket; always ready on a plain socket, which holds nothing.
    #[inline]
    pub(crate) fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Conn::Tcp(_) => Poll::Ready(Ok(())),
            Conn::ServerTls(s) if s.get_ref().1.wants_write() => Pin::new(&mut **s).poll_flush(cx),
            Conn::ClientTls(s) if s.get_ref().1.wants_write() => Pin::new(&mut **s).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Whether TLS holds bytes for the socket that it has not written yet (a plain socket holds none).
    #[inline]
    pub(crate) fn holds_out(&self) -> bool {
        match self {
            Conn::Tcp(_) => false,
            Conn::ServerTls(s) => s.get_ref().1.wants_write(),
            Conn::ClientTls(s) => s.get_ref().1.wants_write(),
        }
    }

    /// Closes the sending half (tunnel mode, when the other side has closed its own): on TLS after a
    /// close_notify, once it and everything before it are written. A peer that is gone is not waited for: the
    /// other direction reports it.
    pub(crate) fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let flushed = match self {
            Conn::Tcp(_) => Poll::Ready(Ok(())),
            Conn::ServerTls(s) => {
                // Queued once: rustls sends no second close_notify.
                s.get_mut().1.send_close_notify();
                Pin::new(&mut **s).poll_flush(cx)
            }
            Conn::ClientTls(s) => {
                s.get_mut().1.send_close_notify();
                Pin::new(&mut **s).poll_flush(cx)
            }
        };
        if flushed.is_pending() {
            return Poll::Pending;
        }
        let _ = SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write);
        Poll::Ready(())
    }
}

fn poll_tls_read<S: AsyncRead>(stream: Pin<&mut S>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
    let mut buf = ReadBuf::new(buf);
    match ready!(stream.poll_read(cx, &mut buf)) {
        Ok(()) => Poll::Ready(Ok(buf.filled().len())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(0)),
        Err(e) => Poll::Ready(Err(e)),
    }
}

/// One `read(2)`; a short read also clears the socket's read readiness.
fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let result = src.try_io(Interest::READABLE, || {
        got = (&*SockRef::from(src)).read(buf)?;
        if got > 0 && got < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// One `send(2)`; a short write also clears the socket's write readiness.
fn write_some(dst: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut put = 0;
    let result = dst.try_io(Interest::WRITABLE, || {
        put = (&*SockRef::from(dst)).write(buf)?;
        if put < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(put)
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && put > 0 => Ok(put),
        other => other,
    }
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::ServerTls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Conn::ClientTls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::ServerTls(s) => s.is_write_vectored(),
            Conn::ClientTls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}
