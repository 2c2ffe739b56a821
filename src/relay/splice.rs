//! EXPERIMENT (A/B benchmark only): the tunnel's zero-copy path between two plain TCP sockets on Linux. A
//! direction that has read a full scratch buffer gets a pipe of its own, and from then on moves bytes socket →
//! pipe → socket with `splice(2)`, so they never enter wsgate's memory. Off unless `WSGATE_SPLICE=1`.
//!
//! The pipe is the direction's buffer: it is filled only when empty, so bytes in it are bytes the receiver has not
//! taken yet (the direction stops reading until they are written), and a fill that would block means the source
//! is drained, never that the pipe is full. What the relay does with the counts, EOF and errors stays in `copy`.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Whether `WSGATE_SPLICE=1` was set when the process first asked.
pub(super) fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("WSGATE_SPLICE").is_some_and(|v| v == "1"))
}

/// Whether `e` is an error a read of the socket itself would report (reported once: a read after a reset sees
/// EOF), which ends the direction as on the copy path rather than sending it back there.
pub(super) fn from_socket(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe | TimedOut
    )
}

/// One direction's pipe, and how many bytes it holds.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// The most one fill asks for: the pipe's capacity.
    capacity: usize,
    held: usize,
    /// Whether a byte has ever gone in: until then an error may fall back to the copy path.
    used: bool,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        let (read, write) = sys::pipe()?;
        let capacity = sys::capacity(&write);
        Ok(Pipe {
            read,
            write,
            capacity,
            held: 0,
            used: false,
        })
    }

    /// Whether bytes wait in the pipe for the receiver.
    pub(super) fn holds(&self) -> bool {
        self.held > 0
    }

    pub(super) fn used(&self) -> bool {
        self.used
    }

    /// Moves what `src` has into the (empty) pipe: the count, `0` at EOF.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>, src: &TcpStream) -> Poll<io::Result<usize>> {
        debug_assert!(self.held == 0, "a pipe is filled only when empty");
        loop {
            ready!(src.poll_read_ready(cx))?;
            // A short fill does not clear the readiness: a pipe's capacity counts pages, so a fill may stop short
            // of the bytes the socket holds. Only EAGAIN (cleared by `try_io`) says the socket is drained.
            match src.try_io(Interest::READABLE, || sys::splice(src, &self.write, self.capacity)) {
                Ok(n) => {
                    self.held = n;
                    self.used |= n > 0;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes what the pipe holds to `dst`, adding each count to `delivered`; ready once the pipe is empty.
    pub(super) fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        dst: &TcpStream,
        delivered: &mut u64,
        active: &mut bool,
    ) -> Poll<io::Result<()>> {
        while self.held > 0 {
            ready!(dst.poll_write_ready(cx))?;
            match dst.try_io(Interest::WRITABLE, || sys::splice(&self.read, dst, self.held)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.held = self.held.saturating_sub(n);
                    *delivered += n as u64;
                    *active = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The two system calls, through rustix (no `unsafe`); elsewhere than Linux they fail, and the copy path is used.
#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};

    use rustix::pipe::{PipeFlags, SpliceFlags};

    pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        Ok(rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?)
    }

    /// The pipe's capacity; the kernel's default (16 pages) if it cannot be read.
    pub(super) fn capacity(pipe: impl AsFd) -> usize {
        rustix::pipe::fcntl_getpipe_size(pipe).unwrap_or(16 * 4096)
    }

    /// One `splice(2)` of at most `len` bytes from `from` to `to`, one of them a pipe.
    pub(super) fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        Ok(rustix::pipe::splice(from, None, to, None, len, flags)?)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};

    pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub(super) fn capacity(_pipe: impl AsFd) -> usize {
        0
    }

    pub(super) fn splice(_from: impl AsFd, _to: impl AsFd, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}
