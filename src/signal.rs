//! How wsgate tells one relayed connection to close: a [`StopSignal`] per connection, held in its live-session
//! record, which the relay and the registry of its server's sessions share. A drain, a removal or a rebalance of the
//! server, or the admin API, sets its reason and wakes the connection; the relay then reads the reason with one
//! atomic load, so checking for it on every wake-up costs next to nothing. A shutdown wakes every connection the
//! same way ([`StopSignal::wake`]), and the relay reads the server's phase. A leaf module: the relay and the
//! upstreams both use it, and neither knows the other.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Waker;

use atomic_waker::AtomicWaker;

/// The close code of a drain, a removal or a rebalance: 1012 "service restart".
const SHED_CODE: u16 = 1012;

#[derive(Debug, Default)]
pub struct StopSignal {
    /// Why, and the close codes a frames-mode connection is closed with (to the client, to the backend): set once,
    /// together.
    stop: OnceLock<(&'static str, u16, u16)>,
    /// The relay's task, woken when the signal is given.
    waker: AtomicWaker,
}

impl StopSignal {
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// Asks the connection to close (with 1012 in frames mode), saying why; the first reason given is the one it
    /// says.
    pub fn stop(&self, reason: &'static str) {
        self.stop_with(SHED_CODE, reason);
    }

    /// Asks the connection to close with `code` (frames mode; a tunnel is closed at once); `false` when it was asked
    /// to close already (its first reason and code stand).
    pub fn stop_with(&self, code: u16, reason: &'static str) -> bool {
        self.stop_split(code, code, reason)
    }

    /// Asks the connection to close with `client` to the client and `backend` to the backend (frames mode): a
    /// session wsgate ends for its client's sake (its key's limit), whose backend did nothing wrong.
    pub fn stop_split(&self, client: u16, backend: u16, reason: &'static str) -> bool {
        let first = self.stop.set((reason, client, backend)).is_ok();
        self.waker.wake();
        first
    }

    /// Why the connection was asked to close, and the client's close code, if it was.
    pub fn reason(&self) -> Option<(&'static str, u16)> {
        self.stop.get().map(|&(reason, client, _)| (reason, client))
    }

    /// Why the connection was asked to close, and the close codes to the client and to the backend, if it was.
    pub fn codes(&self) -> Option<(&'static str, u16, u16)> {
        self.stop.get().copied()
    }

    /// Wakes the connection without a reason of its own: it looks at the server's phase (a shutdown).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// The task to wake: registered before the relay reads the reason and the phase, so that a signal given after
    /// that read wakes it.
    pub fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }
}

/// Where the server is in its life, as a relay reads it when woken: serving, shutting down (frames-mode connections
/// close with 1001), or past the drain timeout (every connection still open is closed at once).
#[derive(Debug, Default)]
pub struct Phase(AtomicU8);

// 0: serving.
const SHUTTING_DOWN: u8 = 1;
const FORCE_CLOSING: u8 = 2;

impl Phase {
    pub fn shutting_down(&self) -> bool {
        self.0.load(Ordering::Acquire) >= SHUTTING_DOWN
    }

    pub fn force_closing(&self) -> bool {
        self.0.load(Ordering::Acquire) >= FORCE_CLOSING
    }

    /// The shutdown has started (set before the connections are woken).
    pub fn start_shutdown(&self) {
        self.0.fetch_max(SHUTTING_DOWN, Ordering::AcqRel);
    }

    /// The drain timeout has run out (set before the connections are woken).
    pub fn start_force_close(&self) {
        self.0.fetch_max(FORCE_CLOSING, Ordering::AcqRel);
    }
}
