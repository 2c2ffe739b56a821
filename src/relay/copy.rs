//! The relay loop both modes share: a readiness-driven copy in both directions between the client's and the
//! backend's sockets.
//!
//! Each direction waits until its source is readable, reads into a scratch buffer shared by every connection on
//! the thread, and writes straight to the destination. Only the bytes the destination could not take are copied
//! into a buffer of the connection's own, held until they are written; while that buffer is not empty the
//! direction stops reading, so a slow reader slows its writer and memory per connection stays bounded by one
//! scratch buffer per direction. An idle connection holds no buffer at all.
//!
//! A short read (fewer bytes than asked for) or a short write means the socket is drained or full: the relay then
//! clears the readiness it holds instead of making one more system call only to be told `EAGAIN`.
//!
//! In `tunnel` mode that is all, except that a direction between two plain TCP sockets that reads a full scratch
//! buffer (a large transfer) borrows a pipe and moves its bytes with splice(2) until it gives the pipe back (see
//! `splice`; the route's `splice = false` turns that off).
//! In `frames` mode each direction also has a [`FrameDir`]: every chunk read goes through its frame tracker before
//! it is written, which may keep a few bytes of an incomplete header for the next read, drop a pong that answers
//! wsgate's own ping, or put a frame of wsgate's own at a frame boundary; and the connection's [`Frames`] state
//! decides when and how the connection ends (close codes, keepalive, drain).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::Stop;
use super::end::{End, Side, StopCause};
use super::frames::{FrameDir, Frames, Verdict};
use super::splice::{self, Pipe};
use super::watch::WriteWatch;
use crate::conn::Conn;
use crate::live::{Counted, LiveSession};
use crate::observe::Counters;

/// Size of the per-thread scratch buffer, and so of the largest single read.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Reads one direction may make in one poll before yielding to other connections on the thread.
const READS_PER_POLL: usize = 16;
/// How long the other direction may go on after one side has closed its half of the connection (tunnel mode).
pub const HALF_CLOSE_LINGER: Duration = Duration::from_secs(1);
/// The longest a live session's counts wait before they are folded into its record and its place's totals.
const FOLD_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// Relays between `client` and `backend` until the connection ends. `frames` turns on the frames mode. `early`
/// holds bytes already read with the handshake heads (client to backend, backend to client): they go first, and in
/// frames mode through the frame trackers like every other byte. `stop` closes the connection: in frames mode with
/// close frames, in tunnel mode at once. `live`, when the session is registered, gets the counts at most once a
/// second while bytes move, and when the relay ends (or is dropped).
#[allow(clippy::too_many_arguments)]
pub fn relay<'a>(
    client: &'a mut Conn,
    backend: &'a mut Conn,
    timeouts: Timeouts,
    mut frames: Option<Box<Frames<'a>>>,
    early: [Vec<u8>; 2],
    counters: &'a mut Counters,
    stop: Stop<'a>,
    live: Option<&'a LiveSession>,
) -> impl Future<Output = End> + 'a {
    let may_splice = frames.is_none() && timeouts.splice && !client.is_tls() && !backend.is_tls();
    let mut halves = [Half::default(), Half::default()];
    // Bytes read with the heads are relayed bytes too, in either mode.
    counters.client_to_backend += early[0].len() as u64;
    counters.backend_to_client += early[1].len() as u64;
    for ((half, bytes), side) in halves.iter_mut().zip(early).zip([Side::Client, Side::Backend]) {
        half.may_splice = may_splice;
        match frames.as_deref_mut() {
            None => half.pending = bytes,
            Some(frames) if !bytes.is_empty() => {
                let _ = frames.dir_mut(side).walk(&bytes, |passed| {
                    half.pending.extend_from_slice(passed);
                    Ok(())
                });
            }
            Some(_) => {}
        }
    }
    let [up, down] = halves;
    Relay {
        client,
        backend,
        up,
        down,
        first_closed: None,
        linger: None,
        idle: timeouts.idle.map(|after| {
            Box::new(Idle {
                after,
                last_activity: Instant::now(),
                timer: Box::pin(tokio::time::sleep(after)),
            })
        }),
        frames,
        counters,
        stop,
        write_timeout: timeouts.write,
        watch: None,
        live,
        fold_timer: None,
    }
}

/// The timeouts of a relayed connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// No byte either way for this long closes the connection; `None` = never.
    pub idle: Option<Duration>,
    /// A side leaving bytes for it unread this long closes the connection (tunnel mode: frames mode has its own in
    /// its rules).
    pub write: Duration,
    /// Tunnel mode: large transfers between plain TCP sockets may move with splice(2).
    pub splice: bool,
}

/// The tunnel's write timeout, made the first time bytes wait for a receiver.
struct TunnelWatch {
    watch: WriteWatch,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
}

struct Relay<'a> {
    client: &'a mut Conn,
    backend: &'a mut Conn,
    /// Client to backend.
    up: Half,
    /// Backend to client.
    down: Half,
    first_closed: Option<Side>,
    linger: Option<Pin<Box<Sleep>>>,
    /// Boxed: a route without an idle timeout (the default) needs none.
    idle: Option<Box<Idle>>,
    frames: Option<Box<Frames<'a>>>,
    counters: &'a mut Counters,
    stop: Stop<'a>,
    write_timeout: Duration,
    /// Tunnel mode's write timeout, once bytes have had to wait.
    watch: Option<Box<TunnelWatch>>,
    live: Option<&'a LiveSession>,
    /// Armed by the first activity after a fold: the counts are folded when it fires. An idle session has none.
    fold_timer: Option<Pin<Box<Sleep>>>,
}

struct Idle {
    after: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

/// One direction's bytes in flight.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet written; empty (and unallocated) most of the time.
    pending: Vec<u8>,
    written: usize,
    /// Bytes written from `pending` so far (progress of a backpressured direction).
    delivered: u64,
    eof: bool,
    done: bool,
    /// Tunnel mode between two plain TCP sockets (and the route allows it): a full read takes a `pipe`.
    may_splice: bool,
    /// Once taken, the direction's bytes go through it (see `splice`); given back when empty at a fold, and when
    /// the relay ends.
    pipe: Option<Box<Pipe>>,
}

impl Drop for Half {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            Pipe::give_back(pipe);
        }
    }
}

/// What stopped a direction.
pub(super) enum HalfError {
    Read(io::Error),
    Write(io::Error),
}

impl Half {
    /// Moves bytes from `src` to `dst` until it would block. `Ready(Ok(()))` once `src` has closed and every byte
    /// has been written (in tunnel mode, also once `dst`'s write half has been shut down), or, in frames mode, once
    /// the direction has nothing more to do.
    #[allow(clippy::too_many_arguments)]
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Conn,
        dst: &mut Conn,
        relayed: &mut u64,
        active: &mut bool,
        other_done: bool,
        dst_dead: bool,
        mut frames: Option<&mut FrameDir>,
    ) -> Poll<Result<(), HalfError>> {
        if self.done && !self.has_pending() && frames.as_deref().is_none_or(|dir| !dir.has_injection()) {
            if !dst_dead {
                ready!(dst.poll_flush_out(cx)).map_err(HalfError::Write)?;
            }
            return Poll::Ready(Ok(()));
        }
        let mut reads = 0;
        loop {
            while self.written < self.pending.len() {
                let n = ready!(dst.poll_write_some(cx, &self.pending[self.written..])).map_err(HalfError::Write)?;
                self.written += n;
                self.delivered += n as u64;
                *active = true;
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
            }
            // Only plain sockets have a pipe.
            if let Some(pipe) = &mut self.pipe {
                ready!(pipe.poll_drain(cx, dst.tcp(), &mut self.delivered, active)).map_err(HalfError::Write)?;
            }
            // What TLS still holds for `dst` goes out before more is read for it (unless `dst` is gone, and what
            // is read for it is dropped anyway).
            if !dst_dead {
                ready!(dst.poll_flush_out(cx)).map_err(HalfError::Write)?;
            }
            if let Some(dir) = frames.as_deref_mut() {
                // A frame of wsgate's own waiting for a boundary the walk has already reached.
                if let Some(frame) = dir.take_injection() {
                    self.pending = frame;
                    continue;
                }
                if self.eof || dir.stopped() {
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
            } else if self.eof {
                // When the other direction is over too, both sockets are about to be closed and the close sends
                // the FIN: no need to shut the write half first. The peer may already be gone; its own direction
                // reports that.
                if !other_done {
                    ready!(dst.poll_shutdown_write(cx));
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            if let Some(pipe) = &mut self.pipe {
                match ready!(pipe.poll_fill(cx, src.tcp())) {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        *relayed += n as u64;
                        *active = true;
                    }
                    Err(e) if pipe.used() || splice::from_socket(&e) => return Poll::Ready(Err(HalfError::Read(e))),
                    // Before any byte went through the pipe, an error that is not the socket's is splice's: the
                    // copy path takes over.
                    Err(_) => {
                        if let Some(pipe) = self.pipe.take() {
                            Pipe::give_back(pipe);
                        }
                        self.may_splice = false;
                    }
                }
                if self.pipe.is_some() {
                    continue;
                }
            }
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let carried = frames.as_deref_mut().map_or(0, |dir| dir.take_carry(&mut scratch));
                let n = match src.poll_read_some(cx, &mut scratch[carried..]) {
                    Poll::Ready(Ok(0)) => {
                        self.eof = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(n)) => n,
                    Poll::Pending => {
                        if let Some(dir) = frames.as_deref_mut() {
                            dir.put_back_carry(&scratch[..carried]);
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(HalfError::Read(e))),
                };
                *relayed += n as u64;
                *active = true;
                if n == scratch.len() {
                    self.start_splice();
                }
                let chunk = &scratch[..carried + n];
                Poll::Ready(
                    match frames.as_deref_mut() {
                        None => self.emit(cx, dst, chunk),
                        Some(dir) => dir.walk(chunk, |bytes| self.emit(cx, dst, bytes)),
                    }
                    .map_err(HalfError::Write),
                )
            });
            ready!(read)?;
        }
    }

    /// Writes `bytes` to `dst` now if nothing is waiting before them, and keeps what `dst` cannot take.
    fn emit(&mut self, cx: &mut Context<'_>, dst: &mut Conn, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.written < self.pending.len() {
            self.pending.extend_from_slice(bytes);
            return Ok(());
        }
        let sent = match dst.poll_write_some(cx, bytes) {
            Poll::Ready(Ok(w)) => w,
            Poll::Pending => 0,
            Poll::Ready(Err(e)) => return Err(e),
        };
        if sent < bytes.len() {
            self.pending.clear();
            self.written = 0;
            self.pending.extend_from_slice(&bytes[sent..]);
        }
        Ok(())
    }

    /// A full read: a large transfer, which the splice path takes over if it may and a pipe is to be had (bytes
    /// already read go first).
    fn start_splice(&mut self) {
        if self.may_splice && self.pipe.is_none() {
            self.pipe = Pipe::take();
        }
    }

    /// Gives the pipe back if it is empty: the transfer is over or resumes with the next full read.
    fn release_pipe(&mut self) {
        if self.pipe.as_ref().is_some_and(|pipe| !pipe.holds())
            && let Some(pipe) = self.pipe.take()
        {
            Pipe::give_back(pipe);
        }
    }

    fn has_pending(&self) -> bool {
        self.written < self.pending.len() || self.pipe.as_ref().is_some_and(|pipe| pipe.holds())
    }
}

impl Future for Relay<'_> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        let stop = this.stop.poll(cx);
        if let Some(StopCause::ForceClose) = stop {
            if let Some(frames) = &this.frames {
                frames.record(this.counters);
                // Closed without close frames, whatever a side had sent: a TCP close, as the access log and the
                // closes metric say it.
                this.counters.close_code = None;
                this.counters.close_first = None;
            }
            return Poll::Ready(End::ForceClosed);
        }
        match this.frames.take() {
            Some(mut frames) => {
                let end = this.poll_frames(cx, &mut frames, stop);
                this.frames = Some(frames);
                end
            }
            None => match stop {
                Some(StopCause::Shed(reason, ..)) => Poll::Ready(End::ClosedByProxy(format!("{reason} (TCP closed)"))),
                Some(StopCause::ShuttingDown) => Poll::Ready(End::ClosedByProxy("server shutting down".into())),
                Some(StopCause::ForceClose) | None => this.poll_tunnel(cx),
            },
        }
    }
}

impl Drop for Relay<'_> {
    /// The last fold: however the relay ends, its session's totals get everything it counted.
    fn drop(&mut self) {
        let mut frames = self.frames.take();
        self.fold(frames.as_deref_mut());
    }
}

impl Relay<'_> {
    /// Whether each direction (client to backend, backend to client) has bytes waiting for its receiver: in the
    /// relay's own buffer, or held by TLS for the receiver's socket.
    fn pending(&self) -> [bool; 2] {
        [
            self.up.has_pending() || self.backend.holds_out(),
            self.down.has_pending() || self.client.holds_out(),
        ]
    }

    fn poll_tunnel(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let mut active = false;
        let up = self.up.poll_copy(
            cx,
            &mut *self.client,
            &mut *self.backend,
            &mut self.counters.client_to_backend,
            &mut active,
            self.down.done,
            false,
            None,
        );
        let up_done = match up {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(HalfError::Read(e))) => return Poll::Ready(End::Error(Side::Client, e)),
            Poll::Ready(Err(HalfError::Write(e))) => return Poll::Ready(End::Error(Side::Backend, e)),
            Poll::Pending => false,
        };
        let down = self.down.poll_copy(
            cx,
            &mut *self.backend,
            &mut *self.client,
            &mut self.counters.backend_to_client,
            &mut active,
            self.up.done,
            false,
            None,
        );
        let down_done = match down {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(HalfError::Read(e))) => return Poll::Ready(End::Error(Side::Backend, e)),
            Poll::Ready(Err(HalfError::Write(e))) => return Poll::Ready(End::Error(Side::Client, e)),
            Poll::Pending => false,
        };
        if self.first_closed.is_none() {
            self.first_closed = match (up_done, down_done) {
                (true, _) => Some(Side::Client),
                (false, true) => Some(Side::Backend),
                _ => None,
            };
        }
        if let Some(first) = self.first_closed {
            if up_done && down_done {
                return Poll::Ready(End::Closed(first));
            }
            let linger = self
                .linger
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(HALF_CLOSE_LINGER)));
            if linger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Closed(first));
            }
        }
        if let Some(end) = self.poll_write_timeout(cx) {
            return Poll::Ready(end);
        }
        self.poll_fold(cx, active, None);
        self.poll_idle(cx, active, None)
    }

    /// Tunnel mode: a receiver that leaves the bytes held for it unread for the write timeout ends the connection.
    fn poll_write_timeout(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let pending = self.pending();
        if !pending[0] && !pending[1] {
            // The common case, without a look at the clock.
            if let Some(w) = &mut self.watch {
                w.watch.clear();
            }
            return None;
        }
        let now = Instant::now();
        let w = self.watch.get_or_insert_with(|| {
            Box::new(TunnelWatch {
                watch: WriteWatch::default(),
                timer: Box::pin(tokio::time::sleep_until(now)),
                timer_at: None,
            })
        });
        let written = [self.up.delivered, self.down.delivered];
        let (client, backend) = (self.client.tcp(), self.backend.tcp());
        let unacked = |i: usize| crate::sys::unacked_bytes(if i == 0 { backend } else { client });
        let stuck = w
            .watch
            .stuck(now, self.write_timeout, pending, written, unacked, [false; 2]);
        if let Some(receiver) = [Side::Backend, Side::Client]
            .into_iter()
            .zip(stuck)
            .find_map(|(r, s)| s.then_some(r))
        {
            return Some(End::ClosedByProxy(format!(
                "{receiver} stopped reading for {:?} (TCP closed)",
                self.write_timeout
            )));
        }
        if let Some(at) = w.watch.deadline(self.write_timeout, pending) {
            if w.timer_at != Some(at) {
                w.timer.as_mut().reset(at);
                w.timer_at = Some(at);
            }
            if w.timer.as_mut().poll(cx).is_ready() {
                w.timer_at = None;
                cx.waker().wake_by_ref();
            }
        }
        None
    }

    fn poll_frames(&mut self, cx: &mut Context<'_>, frames: &mut Frames, stop: Option<StopCause>) -> Poll<End> {
        let mut active = false;
        // Tokens earned since the last poll are handed out before the directions spend them.
        frames.account_rate();
        // Each direction runs until it blocks; a failed side is handed to the frame state, which decides what the
        // other side is told.
        for side in [Side::Client, Side::Backend] {
            let (half, other_done, src, dst, relayed) = match side {
                Side::Client => (
                    &mut self.up,
                    self.down.done,
                    &mut *self.client,
                    &mut *self.backend,
                    &mut self.counters.client_to_backend,
                ),
                Side::Backend => (
                    &mut self.down,
                    self.up.done,
                    &mut *self.backend,
                    &mut *self.client,
                    &mut self.counters.backend_to_client,
                ),
            };
            if frames.is_dead(side.other()) {
                // Bytes for a receiver that is gone are dropped.
                half.pending = Vec::new();
                half.written = 0;
            }
            let heard_before = *relayed;
            let dst_dead = frames.is_dead(side.other());
            let dir = frames.dir_mut(side);
            match half.poll_copy(
                cx,
                src,
                dst,
                &mut *relayed,
                &mut active,
                other_done,
                dst_dead,
                Some(dir),
            ) {
                Poll::Ready(Ok(())) => {
                    if half.eof {
                        frames.source_closed(side, None);
                    }
                }
                Poll::Ready(Err(HalfError::Read(e))) => frames.source_closed(side, Some(e)),
                Poll::Ready(Err(HalfError::Write(e))) => frames.sink_failed(side.other(), e),
                Poll::Pending => {}
            }
            if *relayed != heard_before {
                frames.heard(side);
            }
        }
        // Bytes for a receiver that is gone are not waited for.
        let [up, down] = self.pending();
        let pending = [
            up && !frames.is_dead(Side::Backend),
            down && !frames.is_dead(Side::Client),
        ];
        let written = [self.up.delivered, self.down.delivered];
        let (client, backend) = (self.client.tcp(), self.backend.tcp());
        let unacked = |i: usize| crate::sys::unacked_bytes(if i == 0 { backend } else { client });
        match frames.poll_verdict(cx, pending, written, unacked, stop) {
            Verdict::Continue => {}
            Verdict::Wake => cx.waker().wake_by_ref(),
            Verdict::End(end) => {
                frames.record(self.counters);
                return Poll::Ready(end);
            }
        }
        self.poll_fold(cx, active, Some(frames));
        self.poll_idle(cx, active, Some(frames))
    }

    /// Folds the counts when the fold timer fires; arms it on activity.
    fn poll_fold(&mut self, cx: &mut Context<'_>, active: bool, frames: Option<&mut Frames>) {
        if self.live.is_none() {
            return;
        }
        if active && self.fold_timer.is_none() {
            self.fold_timer = Some(Box::pin(tokio::time::sleep(FOLD_EVERY)));
        }
        if let Some(timer) = &mut self.fold_timer
            && timer.as_mut().poll(cx).is_ready()
        {
            self.fold_timer = None;
            self.fold(frames);
            // A pipe is borrowed for a transfer, not for the session: an empty one goes back at each fold.
            self.up.release_pipe();
            self.down.release_pipe();
        }
    }

    /// Hands the counts so far to the session's live record.
    fn fold(&mut self, frames: Option<&mut Frames>) {
        let Some(live) = self.live else { return };
        let mut counted = Counted {
            bytes: [self.counters.client_to_backend, self.counters.backend_to_client],
            ..Counted::default()
        };
        match frames {
            Some(frames) => {
                let [client, backend] = frames.trackers_mut();
                counted.messages = [client.messages(), backend.messages()];
                counted.frames = [client.frames(), backend.frames()];
                live.fold(&counted, [Some(client.sizes_mut()), Some(backend.sizes_mut())]);
            }
            None => live.fold(&counted, [None, None]),
        }
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>, active: bool, frames: Option<&mut Frames>) -> Poll<End> {
        let pending = self.idle.is_some() && self.pending().contains(&true);
        if let Some(idle) = &mut self.idle {
            // Bytes held for a reader that is draining them slowly are not idleness: the kernel may not report the
            // socket writable again for longer than the timeout while the reader keeps reading.
            if active || pending {
                idle.last_activity = Instant::now();
            }
            while idle.timer.as_mut().poll(cx).is_ready() {
                let deadline = idle.last_activity + idle.after;
                if deadline <= Instant::now() {
                    if let Some(frames) = frames {
                        frames.record(self.counters);
                    }
                    return Poll::Ready(End::IdleTimeout);
                }
                idle.timer.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }
}
