//! The `frames` relay's knowledge of the WebSocket protocol, on top of the shared copy loop in `copy`: one
//! [`FrameDir`] per direction walks the frames of the bytes read (through the pure codec in `frame`), and
//! [`Frames`] decides for the connection: limits and protocol violations become close codes, silent peers get pings,
//! a dead or stuck peer gets its partner told with a close frame, a drain closes with 1001, and a session whose
//! token expires (`close_on_expiry`) closes with 1008 to the client.

use std::hash::BuildHasher;
use std::io;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::end::{End, Side, StopCause};
use super::watch::WriteWatch;
use crate::config::FrameRules;
use crate::observe::Counters;
use crate::ws::frame::{self, Rules, Step, Tracker, Violation, opcode};

/// One direction of a frames-mode connection, named by the side it reads from.
#[derive(Debug, Default)]
pub(super) struct FrameDir {
    tracker: Tracker,
    /// An incomplete header or control frame from the last read, put in front of the next one.
    carry: Vec<u8>,
    /// A frame of wsgate's own for this direction's receiver, sent at the next frame boundary.
    inject: Vec<u8>,
    inject_is_close: bool,
    /// wsgate's close has gone to the receiver: the sender's bytes are only read to find its close frame.
    muted: bool,
    /// Nothing more is read from the sender.
    stopped: bool,
    /// Payload of wsgate's unanswered ping to the sender; the pong that carries it is not forwarded.
    ping: Option<[u8; 8]>,
    close_code: Option<Option<u16>>,
    violation: Option<Violation>,
    /// wsgate's ping to the receiver has just been written: its pong deadline starts now.
    ping_written: bool,
}

impl FrameDir {
    fn new(rules: Rules) -> Self {
        Self {
            tracker: Tracker::new(rules),
            ..Self::default()
        }
    }

    /// Moves the carried bytes to the front of `scratch`; returns how many.
    pub(super) fn take_carry(&mut self, scratch: &mut [u8]) -> usize {
        let n = self.carry.len();
        scratch[..n].copy_from_slice(&self.carry);
        self.carry.clear();
        n
    }

    /// Keeps `bytes` for the next read again (the read found nothing new).
    pub(super) fn put_back_carry(&mut self, bytes: &[u8]) {
        self.carry.extend_from_slice(bytes);
    }

    /// wsgate's own frame, when the walk is at a frame boundary.
    pub(super) fn take_injection(&mut self) -> Option<Vec<u8>> {
        if self.inject.is_empty() || !self.tracker.at_boundary() {
            return None;
        }
        if self.inject_is_close {
            self.muted = true;
        } else {
            self.ping_written = true;
        }
        self.tracker.set_stop_at_boundary(false);
        Some(std::mem::take(&mut self.inject))
    }

    pub(super) fn has_injection(&self) -> bool {
        !self.inject.is_empty()
    }

    fn injection_ready(&self) -> bool {
        !self.inject.is_empty() && self.tracker.at_boundary()
    }

    /// Whether nothing more is to be read from the sender: it failed, broke the rules, or sent its close frame
    /// (after which a sender may send nothing, and whatever it sends is ignored, as endpoints do).
    pub(super) fn stopped(&self) -> bool {
        self.stopped || self.violation.is_some() || self.close_code.is_some()
    }

    fn set_injection(&mut self, frame: Vec<u8>, is_close: bool) {
        self.inject = frame;
        self.inject_is_close = is_close;
        self.tracker.set_stop_at_boundary(true);
    }

    /// Walks a chunk read from the sender and hands what goes on to the receiver to `emit`, in order.
    pub(super) fn walk(&mut self, chunk: &[u8], mut emit: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut start = 0;
        let mut pos = 0;
        while pos < chunk.len() {
            if !self.inject.is_empty() && self.tracker.at_boundary() {
                emit(&chunk[start..pos])?;
                start = pos;
                if let Some(frame) = self.take_injection() {
                    emit(&frame)?;
                }
            }
            if self.stopped() {
                // Whatever else the sender sent is not wanted.
                return emit(&chunk[start..pos]);
            }
            match self.tracker.next(&chunk[pos..]) {
                Step::Pass(n) => {
                    pos += n;
                    if self.muted {
                        start = pos;
                    }
                }
                Step::Control(c) => {
                    let forward = match c.opcode {
                        opcode::PONG if self.ping.is_some_and(|p| p == c.payload()) => {
                            self.ping = None;
                            false
                        }
                        opcode::CLOSE => {
                            self.close_code = Some(c.close().map(|(code, _)| code));
                            // A close from the sender makes wsgate's own close to the receiver pointless: the
                            // receiver gets the sender's instead.
                            if self.inject_is_close && !self.inject.is_empty() {
                                self.inject.clear();
                                self.tracker.set_stop_at_boundary(false);
                            }
                            !self.muted
                        }
                        _ => !self.muted,
                    };
                    if !forward {
                        emit(&chunk[start..pos])?;
                        start = pos + c.wire_len;
                    }
                    pos += c.wire_len;
                    if self.close_code.is_some() {
                        break;
                    }
                }
                Step::NeedMore => {
                    self.carry.extend_from_slice(&chunk[pos..]);
                    break;
                }
                Step::Violation(v) => {
                    self.violation = Some(v);
                    break;
                }
            }
        }
        emit(&chunk[start..pos])
    }
}

/// What [`Frames::poll_verdict`] says about the connection.
pub(super) enum Verdict {
    Continue,
    /// Poll again at once: a deadline has passed.
    Wake,
    End(End),
}

/// When each side (client, backend) was last heard from, and when its pong is due.
struct Keepalive {
    last_heard: [Instant; 2],
    pong_deadline: [Option<Instant>; 2],
}

/// The token buckets of `messages_per_second`, one per side (client, backend).
struct Rate {
    tokens: [f64; 2],
    accounted: [u64; 2],
    refilled: Instant,
}

/// A close wsgate started.
#[derive(Debug)]
struct Closing {
    why: String,
    deadline: Instant,
    /// wsgate sent close frames of its own (otherwise it only waits for a reply to a side's close).
    by_proxy: bool,
}

/// The frames-mode state of one connection, with its route's rules (borrowed from the config in force for it).
pub struct Frames<'r> {
    rules: &'r FrameRules,
    client: FrameDir,
    backend: FrameDir,
    dead: [bool; 2],
    /// wsgate has queued a close frame of its own to this side.
    close_sent: [bool; 2],
    first_close: Option<Side>,
    /// Boxed: only a closing connection has one.
    closing: Option<Box<Closing>>,
    /// The keepalive's state (boxed: only a route with `ping_interval` has one).
    keepalive: Option<Box<Keepalive>>,
    /// The write timeout of each receiver.
    watch: WriteWatch,
    /// The token buckets of `messages_per_second` (boxed: only a route with the limit has them).
    rate: Option<Box<Rate>>,
    /// Made the first time the connection has a deadline (a ping due, a pong awaited, a close, a stuck writer,
    /// the token's expiry): an idle connection without keepalive has none.
    timer: Option<Pin<Box<Sleep>>>,
    timer_at: Option<Instant>,
    /// When the client's token expires: the connection is closed then.
    expires: Option<Instant>,
}

fn index(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

/// A mask key or ping payload: unpredictable enough for a proxy talking to a backend.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let value = std::hash::RandomState::new().hash_one(i);
        chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
    }
    out
}

impl<'r> Frames<'r> {
    /// The frames state for a connection whose 101 negotiated `deflate` or not.
    pub fn new(rules: &'r FrameRules, deflate: bool) -> Box<Frames<'r>> {
        let dir_rules = |masked| Rules {
            masked,
            rsv1_allowed: deflate,
            validate_utf8: rules.validate_utf8,
            max_frame_size: rules.max_frame_size,
            max_message_size: rules.max_message_size,
        };
        let now = Instant::now();
        let mut frames = Box::new(Frames {
            rules,
            client: FrameDir::new(dir_rules(true)),
            backend: FrameDir::new(dir_rules(false)),
            dead: [false; 2],
            close_sent: [false; 2],
            first_close: None,
            closing: None,
            keepalive: rules.ping_interval.map(|_| {
                Box::new(Keepalive {
                    last_heard: [now; 2],
                    pong_deadline: [None; 2],
                })
            }),
            watch: WriteWatch::default(),
            rate: rules.messages_per_second.map(|rate| {
                let full = f64::from(rules.burst) + f64::from(rate);
                Box::new(Rate {
                    tokens: [full; 2],
                    accounted: [0; 2],
                    refilled: now,
                })
            }),
            timer: None,
            timer_at: None,
            expires: None,
        });
        frames.account_rate();
        frames
    }

    /// Hands the backend's text messages that `capture` keeps to its sink, as they pass (each one once whole).
    pub fn tap_backend(&mut self, capture: crate::ws::frame::Capture) {
        self.backend.tracker.set_capture(capture);
    }

    /// Closes the connection at `at` (the client's token expires): close 1008 to the client, 1001 to the backend.
    pub fn expire_at(&mut self, at: Instant) {
        self.expires = Some(at);
    }

    /// Whether `side` is gone (nothing can be written to it any more).
    pub(super) fn is_dead(&self, side: Side) -> bool {
        self.dead[index(side)]
    }

    pub(super) fn dir_mut(&mut self, side: Side) -> &mut FrameDir {
        match side {
            Side::Client => &mut self.client,
            Side::Backend => &mut self.backend,
        }
    }

    /// The frame trackers: the client's (its messages to the backend), then the backend's.
    pub(super) fn trackers_mut(&mut self) -> [&mut crate::ws::frame::Tracker; 2] {
        [&mut self.client.tracker, &mut self.backend.tracker]
    }

    fn dir(&self, side: Side) -> &FrameDir {
        match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        }
    }

    /// Bytes were read from `side`.
    pub(super) fn heard(&mut self, side: Side) {
        if let Some(keepalive) = &mut self.keepalive {
            keepalive.last_heard[index(side)] = Instant::now();
        }
    }

    /// `side`'s connection ended (`None`: EOF) or failed while reading.
    pub(super) fn source_closed(&mut self, side: Side, error: Option<io::Error>) {
        if self.dead[index(side)] {
            return;
        }
        let dir = self.dir_mut(side);
        dir.stopped = true;
        if dir.close_code.is_some() && error.is_none() {
            // The close handshake came first: an orderly end.
            return;
        }
        let why = match error {
            Some(e) => format!("{side} connection failed: {e}"),
            None => format!("{side} connection lost without a close frame"),
        };
        self.lost(side, why);
    }

    /// Writing to `side` failed.
    pub(super) fn sink_failed(&mut self, side: Side, error: io::Error) {
        if !self.dead[index(side)] {
            self.lost(side, format!("{side} connection failed: {error}"));
        }
    }

    /// `side` is gone: its partner is told with a close frame, and wsgate waits for the partner's close reply.
    fn lost(&mut self, side: Side, why: String) {
        self.dead[index(side)] = true;
        self.dir_mut(side).stopped = true;
        if self.dir(side).close_code.is_some() {
            // It said goodbye before it went: the partner's close reply ends the connection as usual, if it comes
            // in time.
            let deadline = Instant::now() + self.rules.close_timeout;
            self.closing.get_or_insert_with(|| {
                Box::new(Closing {
                    why: format!("{side} left after its close frame; the other side did not answer it"),
                    deadline,
                    by_proxy: false,
                })
            });
            return;
        }
        // Nothing more can be written to the lost side, and nothing more of the partner's is forwarded.
        self.dir_mut(side.other()).muted = true;
        let (code, reason) = match side {
            Side::Backend => (1011, "backend connection lost"),
            Side::Client => (1001, "client went away"),
        };
        self.close_to(side.other(), code, reason);
        self.start_closing(why);
    }

    /// Queues a close frame to `side` (written by the direction that writes to it).
    fn close_to(&mut self, side: Side, code: u16, reason: &str) {
        // Not to a side that is gone, nor to one that has already been sent a close (its partner's or wsgate's).
        if self.dead[index(side)] || self.dir(side.other()).close_code.is_some() || self.close_sent[index(side)] {
            return;
        }
        self.close_sent[index(side)] = true;
        let mask = (side == Side::Backend).then(random_bytes::<4>);
        let frame = frame::close_frame(code, reason, mask);
        self.dir_mut(side.other()).set_injection(frame, true);
    }

    fn start_closing(&mut self, why: String) {
        match &mut self.closing {
            None => {
                self.closing = Some(Box::new(Closing {
                    why,
                    deadline: Instant::now() + self.rules.close_timeout,
                    by_proxy: true,
                }))
            }
            // Waiting for a reply to a side's close, and now wsgate closes too: its reason is the one to log.
            Some(closing) if !closing.by_proxy => {
                closing.why = why;
                closing.by_proxy = true;
            }
            Some(_) => {}
        }
    }

    /// Closes both sides with `code` (shutdown: 1001 "going away"; a server drained: 1012 "service restart").
    fn close_both(&mut self, code: u16, reason: &str, why: String) {
        self.close_to(Side::Client, code, reason);
        self.close_to(Side::Backend, code, reason);
        self.start_closing(why);
    }

    /// Decides what happens to the connection after both directions have run.
    /// `unacked(i)`: the bytes receiver i (0: the backend, 1: the client) has not acknowledged yet. `stop`: wsgate
    /// wants the connection closed (shutdown, or its server drained).
    pub(super) fn poll_verdict(
        &mut self,
        cx: &mut Context<'_>,
        pending: [bool; 2],
        written: [u64; 2],
        unacked: impl Fn(usize) -> Option<u64>,
        stop: Option<StopCause>,
    ) -> Verdict {
        let now = Instant::now();
        for side in [Side::Client, Side::Backend] {
            if let Some(v) = self.dir(side).violation
                && self.closing.is_none()
            {
                self.dir_mut(side).stopped = true;
                if !self.dir(side).tracker.at_boundary() {
                    // Part of the offending frame has gone to the other side: no close frame can follow it there,
                    // so that connection is only closed.
                    self.dead[index(side.other())] = true;
                    self.dir_mut(side.other()).stopped = true;
                }
                // The rule-breaker still gets what is on its way to it, up to a frame boundary, then the close.
                self.close_to(side, v.close_code(), &v.to_string());
                self.close_to(side.other(), 1011, &format!("{side} broke the WebSocket protocol"));
                self.start_closing(format!("{side} sent {v} (close {})", v.close_code()));
            }
            if self.first_close.is_none() && self.dir(side).close_code.is_some() {
                self.first_close = Some(side);
                // The other side has close_timeout to answer.
                let deadline = now + self.rules.close_timeout;
                self.closing.get_or_insert_with(|| {
                    Box::new(Closing {
                        why: format!("{side} sent its close frame; the other side did not answer it"),
                        deadline,
                        by_proxy: false,
                    })
                });
            }
        }
        match stop {
            _ if self.closing.is_some() => {}
            _ if self.expires.is_some_and(|at| now >= at) => {
                self.close_to(Side::Client, 1008, "token expired");
                self.close_to(Side::Backend, 1001, "going away");
                self.start_closing("the client's token expired (close 1008 to the client, 1001 to the backend)".into());
            }
            // Handled by the relay before the frames state is asked.
            None | Some(StopCause::ForceClose) => {}
            Some(StopCause::ShuttingDown) => self.close_both(
                1001,
                "going away",
                "server shutting down (close 1001 to both sides)".into(),
            ),
            Some(StopCause::Shed(reason, client, backend)) if client == backend => {
                self.close_both(client, reason, format!("{reason} (close {client} to both sides)"))
            }
            Some(StopCause::Shed(reason, client, backend)) => {
                self.close_to(Side::Client, client, reason);
                self.close_to(Side::Backend, backend, "going away");
                self.start_closing(format!(
                    "{reason} (close {client} to the client, {backend} to the backend)"
                ));
            }
        }
        let flushed = !pending[0] && !pending[1] && self.client.inject.is_empty() && self.backend.inject.is_empty();
        if flushed && let Some(end) = self.finished() {
            return Verdict::End(end);
        }
        if let Some(closing) = &self.closing
            && now >= closing.deadline
        {
            return Verdict::End(End::ClosedByProxy(format!("{} (no close reply in time)", closing.why)));
        }
        self.keepalive(now);
        self.write_timeouts(now, pending, written, unacked);
        // A frame of wsgate's own queued just now, with its direction at a boundary and nothing in the way: the
        // direction must run again to send it.
        if (self.client.injection_ready() && !pending[0]) || (self.backend.injection_ready() && !pending[1]) {
            return Verdict::Wake;
        }
        match self.next_deadline(pending) {
            Some(at) if at <= now => Verdict::Wake,
            Some(at) => {
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if self.timer_at != Some(at) {
                    timer.as_mut().reset(at);
                    self.timer_at = Some(at);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    self.timer_at = None;
                    Verdict::Wake
                } else {
                    Verdict::Continue
                }
            }
            None => Verdict::Continue,
        }
    }

    /// The end of the connection, once there is nothing left to say on it.
    fn finished(&self) -> Option<End> {
        let done = |side: Side| {
            let dir = self.dir(side);
            self.dead[index(side)] || dir.stopped || dir.violation.is_some() || dir.close_code.is_some()
        };
        match &self.closing {
            // Each side still alive is waited for until its close reply arrives.
            Some(closing) if closing.by_proxy => {
                (done(Side::Client) && done(Side::Backend)).then(|| End::ClosedByProxy(closing.why.clone()))
            }
            _ => {
                let both = self.client.close_code.is_some() && self.backend.close_code.is_some();
                both.then(|| {
                    let first = self.first_close.unwrap_or(Side::Client);
                    let code = self.dir(first).close_code.flatten();
                    End::CloseHandshake { first, code }
                })
            }
        }
    }

    /// The token bucket of `messages_per_second`: messages started since the last look are paid for, time pays
    /// back (up to one second's worth plus the burst), and each side may start as many messages as it has whole
    /// tokens before its tracker answers with a rate-limit violation.
    pub(super) fn account_rate(&mut self) {
        let (Some(rate), Some(bucket)) = (self.rules.messages_per_second, self.rate.as_deref_mut()) else {
            return;
        };
        let now = Instant::now();
        let rate = f64::from(rate);
        let cap = rate + f64::from(self.rules.burst);
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.refilled = now;
        for (i, dir) in [&mut self.client, &mut self.backend].into_iter().enumerate() {
            let started = dir.tracker.messages();
            let spent = started.saturating_sub(bucket.accounted[i]);
            bucket.accounted[i] = started;
            bucket.tokens[i] = (bucket.tokens[i] - spent as f64 + elapsed * rate).min(cap);
            let budget = bucket.tokens[i].max(0.0).floor() as u64;
            dir.tracker.set_budget(Some(budget));
        }
    }

    fn keepalive(&mut self, now: Instant) {
        if self.closing.is_some() {
            return;
        }
        if let (Some(interval), Some(mut keepalive)) = (self.rules.ping_interval, self.keepalive.take()) {
            self.ping_or_wait(&mut keepalive, interval, now);
            self.keepalive = Some(keepalive);
        }
    }

    /// Pings a side silent for `interval`, and gives up on one whose pong is overdue.
    fn ping_or_wait(&mut self, keepalive: &mut Keepalive, interval: Duration, now: Instant) {
        for side in [Side::Client, Side::Backend] {
            let i = index(side);
            if self.dead[i] {
                continue;
            }
            if self.dir(side).ping.is_none() {
                keepalive.pong_deadline[i] = None;
                let writer = self.dir(side.other());
                if now >= keepalive.last_heard[i] + interval && writer.inject.is_empty() {
                    let payload = random_bytes::<8>();
                    let mask = (side == Side::Backend).then(random_bytes::<4>);
                    let ping = frame::control_frame(opcode::PING, &payload, mask);
                    self.dir_mut(side.other()).set_injection(ping, false);
                    self.dir_mut(side).ping = Some(payload);
                }
            } else if std::mem::take(&mut self.dir_mut(side.other()).ping_written) {
                // The pong may take pong_timeout from when the ping went out, not from when it was queued behind a
                // long frame.
                keepalive.pong_deadline[i] = Some(now + self.rules.pong_timeout);
            } else if keepalive.pong_deadline[i].is_some_and(|d| now >= d) {
                let why = format!("{side} did not answer a ping within {:?}", self.rules.pong_timeout);
                self.lost(side, why);
            }
        }
    }

    /// A receiver that leaves bytes for it unread for the write timeout is lost (see `watch`).
    fn write_timeouts(
        &mut self,
        now: Instant,
        pending: [bool; 2],
        written: [u64; 2],
        unacked: impl Fn(usize) -> Option<u64>,
    ) {
        // Receiver 0 is the backend (bytes read from the client), 1 the client.
        let receivers = [Side::Backend, Side::Client];
        let gone = receivers.map(|r| self.dead[index(r)]);
        let timeout = self.rules.write_timeout;
        let stuck = self.watch.stuck(now, timeout, pending, written, unacked, gone);
        for (receiver, stuck) in receivers.into_iter().zip(stuck) {
            if stuck {
                self.lost(receiver, format!("{receiver} stopped reading for {timeout:?}"));
            }
        }
    }

    fn next_deadline(&self, pending: [bool; 2]) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut consider = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if let Some(closing) = &self.closing {
            consider(closing.deadline);
        } else {
            if let Some(expires) = self.expires {
                consider(expires);
            }
            self.keepalive_deadlines(&mut consider);
        }
        if let Some(t) = self.watch.deadline(self.rules.write_timeout, pending) {
            consider(t);
        }
        at
    }

    /// The keepalive's next deadlines: pong timeouts, and when a silent side is due a ping.
    fn keepalive_deadlines(&self, consider: &mut impl FnMut(Instant)) {
        if let (Some(interval), Some(keepalive)) = (self.rules.ping_interval, &self.keepalive) {
            for side in [Side::Client, Side::Backend] {
                let i = index(side);
                match keepalive.pong_deadline[i] {
                    Some(d) => consider(d),
                    // A ping can only be queued when the direction that carries it has nothing queued.
                    None if !self.dead[i] && self.dir(side.other()).inject.is_empty() => {
                        consider(keepalive.last_heard[i] + interval)
                    }
                    None => {}
                }
            }
        }
    }

    /// Puts the connection's frame counters into the access log record.
    pub(super) fn record(&self, counters: &mut Counters) {
        counters.messages = Some((self.client.tracker.messages(), self.backend.tracker.messages()));
        counters.close_code = self.first_close.and_then(|side| self.dir(side).close_code.flatten());
        counters.close_first = self.first_close.map(|side| match side {
            Side::Client => "client",
            Side::Backend => "backend",
        });
    }
}
