//! The tunnel's zero-copy path between two plain TCP sockets on Linux: a direction that has read a full scratch
//! buffer (a large transfer) takes a pipe, and from then on moves bytes socket → pipe → socket with `splice(2)`, so
//! they never enter wsgate's memory. Measured with the shared bench's 64 KiB echo through a tunnel (`scripts/bench-ab`,
//! 5 rounds): 0.67x the CPU per echo of the copy path with 256 KiB pipes; small messages never reach it.
//!
//! The pipe is the direction's buffer: it is filled only when empty, so bytes in it are bytes the receiver has not
//! taken yet (the direction stops reading until they are written), and a fill that would block means the source
//! is drained, never that the pipe is full. What the relay does with the counts, EOF and errors stays in `copy`.
//!
//! Pipes are borrowed, like the scratch buffer: a direction gives its pipe back once it is empty at the session's
//! next fold of its counts (within a second or two of the transfer), so an idle session holds none. Each worker
//! thread keeps a few empty pipes for the next transfer, and has at most [`MAX_PIPES`] at once: beyond that (or
//! when no pipe can be made, say for want of descriptors) the copy path carries the transfer.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// The most pipes one worker thread has at once (two descriptors each), in use or kept.
pub(super) const MAX_PIPES: usize = 64;
/// The smallest pipe worth using: as much as one read of the copy path.
const MIN_CAPACITY: usize = 64 * 1024;
/// The most empty pipes one worker thread keeps for the next transfer.
const KEPT_PIPES: usize = 16;
/// What a pipe is asked to hold: measured against the default 64 KiB with the shared bench's 64 KiB echo through a
/// tunnel (`scripts/bench-ab`, 5 rounds): 0.67x the copy path's CPU per echo against 0.75x. Pages are taken only
/// while bytes sit in the pipe.
const PIPE_BYTES: usize = 256 * 1024;

/// The pipes of this thread: those kept empty for the next transfer, and how many exist in all.
#[derive(Default)]
struct Pool {
    /// Boxed as a direction holds them: a pipe moves between a direction and the pool without a new allocation.
    #[allow(clippy::vec_box)]
    kept: Vec<Box<Pipe>>,
    alive: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Pipes carrying a transfer now, and pipes kept empty, in every worker (what `GET /metrics` reports).
static IN_USE: AtomicUsize = AtomicUsize::new(0);
static KEPT: AtomicUsize = AtomicUsize::new(0);
/// The most pipes the whole process may have (in use or kept): set at start from the open-files limit, so that
/// pipes never take the descriptors admitted sessions need.
static BUDGET: AtomicUsize = AtomicUsize::new(MAX_PIPES);

/// Sets the most pipes the process may have (see [`crate::sys::pipes_allowed`]).
pub fn set_budget(pipes: usize) {
    BUDGET.store(pipes, Ordering::Relaxed);
}

impl Drop for Pool {
    fn drop(&mut self) {
        KEPT.fetch_sub(self.kept.len(), Ordering::Relaxed);
    }
}

/// The pipes carrying a transfer now, and those kept empty for the next one, in the whole process.
pub fn pipes() -> (usize, usize) {
    (IN_USE.load(Ordering::Relaxed), KEPT.load(Ordering::Relaxed))
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
    /// A pipe for a large transfer: a kept one, or a new one; `None` when this thread has [`MAX_PIPES`] already or
    /// no pipe can be made (the copy path carries the transfer).
    pub(super) fn take() -> Option<Box<Pipe>> {
        POOL.with_borrow_mut(|pool| {
            if let Some(mut pipe) = pool.kept.pop() {
                KEPT.fetch_sub(1, Ordering::Relaxed);
                IN_USE.fetch_add(1, Ordering::Relaxed);
                pipe.used = false;
                return Some(pipe);
            }
            let process = IN_USE.load(Ordering::Relaxed) + KEPT.load(Ordering::Relaxed);
            if pool.alive >= MAX_PIPES || process >= BUDGET.load(Ordering::Relaxed) {
                return None;
            }
            let (read, write) = sys::pipe().ok()?;
            let capacity = sys::capacity(&write);
            // A pipe the kernel kept small (a user over `fs.pipe-user-pages-soft`) would move less per system call
            // than the copy path: closed at once.
            if capacity < MIN_CAPACITY {
                return None;
            }
            pool.alive += 1;
            IN_USE.fetch_add(1, Ordering::Relaxed);
            Some(Box::new(Pipe {
                read,
                write,
                capacity,
                held: 0,
                used: false,
            }))
        })
    }

    /// Gives a pipe back: an empty one is kept for the next transfer (up to [`KEPT_PIPES`]), any other closed.
    pub(super) fn give_back(pipe: Box<Pipe>) {
        IN_USE.fetch_sub(1, Ordering::Relaxed);
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pipe.held == 0 && pool.kept.len() < KEPT_PIPES {
                pool.kept.push(pipe);
                KEPT.fetch_add(1, Ordering::Relaxed);
            } else {
                pool.alive = pool.alive.saturating_sub(1);
            }
        });
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
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Larger than the default (16 pages): a 64 KiB message and its header fit in one fill. Where the kernel
        // refuses (a user over `fs.pipe-user-pages-soft` gets pipes of 2 pages), `capacity` reads the size back and
        // a small pipe is not used.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, super::PIPE_BYTES);
        Ok((read, write))
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
