//! The `tunnel` relay: a readiness-driven copy in both directions between the client's and the backend's
//! sockets.
//!
//! Each direction waits until its source is readable, reads into a scratch buffer shared by every connection on
//! the thread, and writes straight to the destination. Only the bytes the destination could not take are copied
//! into a buffer of the connection's own, held until they are written; while that buffer is not empty the
//! direction stops reading, so a slow reader slows its writer and memory per connection stays bounded by one
//! scratch buffer per direction. An idle connection holds no buffer at all.
//!
//! A short read (fewer bytes than asked for) or a short write means the socket is drained or full: the relay then
//! clears the readiness it holds instead of making one more system call only to be told `EAGAIN`.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read as _, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::observe::Counters;

/// Size of the per-thread scratch buffer, and so of the largest single read.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Reads one direction may make in one poll before yielding to other connections on the thread.
const READS_PER_POLL: usize = 16;
/// How long the other direction may go on after one side has closed its half of the connection.
pub const HALF_CLOSE_LINGER: Duration = Duration::from_secs(1);

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// One end of the relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// This side closed its half first (the other then closed too, or was closed after the linger).
    Closed(Side),
    /// No byte either way for the idle timeout.
    IdleTimeout,
    /// A socket error on this side.
    Error(Side, io::Error),
}

impl std::fmt::Display for End {
    /// How the access log says it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed(side) => write!(f, "{side} closed"),
            End::IdleTimeout => f.write_str("idle timeout"),
            End::Error(side, e) => write!(f, "error: {side}: {e}"),
        }
    }
}

/// Relays between `client` and `backend` until both directions are closed, one fails, or the connection is idle
/// for `idle_timeout`.
pub fn tunnel<'a>(
    client: &'a TcpStream,
    backend: &'a TcpStream,
    idle_timeout: Option<Duration>,
    counters: &'a mut Counters,
) -> impl Future<Output = End> + 'a {
    Tunnel {
        client,
        backend,
        up: Half::default(),
        down: Half::default(),
        first_closed: None,
        linger: None,
        idle: idle_timeout.map(|after| Idle {
            after,
            last_activity: Instant::now(),
            timer: Box::pin(tokio::time::sleep(after)),
        }),
        counters,
    }
}

struct Tunnel<'a> {
    client: &'a TcpStream,
    backend: &'a TcpStream,
    /// Client to backend.
    up: Half,
    /// Backend to client.
    down: Half,
    first_closed: Option<Side>,
    linger: Option<Pin<Box<Sleep>>>,
    idle: Option<Idle>,
    counters: &'a mut Counters,
}

struct Idle {
    after: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

/// One direction's state.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet written; empty (and unallocated) most of the time.
    pending: Vec<u8>,
    written: usize,
    eof: bool,
    done: bool,
}

enum HalfError {
    Read(io::Error),
    Write(io::Error),
}

impl Half {
    /// Moves bytes from `src` to `dst` until it would block. `Ready(Ok(()))` once `src` has closed, every byte has
    /// been written and `dst`'s write half has been shut down.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        relayed: &mut u64,
        active: &mut bool,
        other_done: bool,
    ) -> Poll<Result<(), HalfError>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let mut reads = 0;
        loop {
            while self.written < self.pending.len() {
                ready!(dst.poll_write_ready(cx)).map_err(HalfError::Write)?;
                match write_some(dst, &self.pending[self.written..]) {
                    Ok(n) => {
                        self.written += n;
                        *active = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(HalfError::Write(e))),
                }
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.eof {
                // When the other direction is over too, both sockets are about to be closed and the close sends
                // the FIN: no need to shut the write half first. The peer may already be gone; its own direction
                // reports that.
                if !other_done {
                    let _ = SockRef::from(dst).shutdown(std::net::Shutdown::Write);
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            ready!(src.poll_read_ready(cx)).map_err(HalfError::Read)?;
            let step = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let n = match read_some(src, &mut scratch) {
                    Ok(0) => {
                        self.eof = true;
                        return Ok(());
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(HalfError::Read(e)),
                };
                *relayed += n as u64;
                *active = true;
                let sent = match write_some(dst, &scratch[..n]) {
                    Ok(w) => w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(HalfError::Write(e)),
                };
                if sent < n {
                    self.pending.extend_from_slice(&scratch[sent..n]);
                }
                Ok(())
            });
            step?;
        }
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

impl Future for Tunnel<'_> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        let mut active = false;
        let up = this.up.poll_copy(
            cx,
            this.client,
            this.backend,
            &mut this.counters.client_to_backend,
            &mut active,
            this.down.done,
        );
        let up_done = match up {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(HalfError::Read(e))) => {
                return Poll::Ready(End::Error(Side::Client, e));
            }
            Poll::Ready(Err(HalfError::Write(e))) => {
                return Poll::Ready(End::Error(Side::Backend, e));
            }
            Poll::Pending => false,
        };
        let down = this.down.poll_copy(
            cx,
            this.backend,
            this.client,
            &mut this.counters.backend_to_client,
            &mut active,
            this.up.done,
        );
        let down_done = match down {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(HalfError::Read(e))) => {
                return Poll::Ready(End::Error(Side::Backend, e));
            }
            Poll::Ready(Err(HalfError::Write(e))) => {
                return Poll::Ready(End::Error(Side::Client, e));
            }
            Poll::Pending => false,
        };
        if this.first_closed.is_none() {
            this.first_closed = match (up_done, down_done) {
                (true, _) => Some(Side::Client),
                (false, true) => Some(Side::Backend),
                _ => None,
            };
        }
        if let Some(first) = this.first_closed {
            if up_done && down_done {
                return Poll::Ready(End::Closed(first));
            }
            let linger = this
                .linger
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(HALF_CLOSE_LINGER)));
            if linger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Closed(first));
            }
        }
        if let Some(idle) = &mut this.idle {
            // Bytes held for a reader that is draining them slowly are not idleness: the kernel may not report the
            // socket writable again for longer than the timeout while the reader keeps reading.
            if active || !this.up.pending.is_empty() || !this.down.pending.is_empty() {
                idle.last_activity = Instant::now();
            }
            while idle.timer.as_mut().poll(cx).is_ready() {
                let deadline = idle.last_activity + idle.after;
                if deadline <= Instant::now() {
                    return Poll::Ready(End::IdleTimeout);
                }
                idle.timer.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }
}
