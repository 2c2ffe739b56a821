//! How wsgate tells one relayed connection to close: a [`StopSignal`] per connection, held by the relay and by the
//! registry of its server's sessions. A drain, a removal or a rebalance of the server sets its reason and cancels
//! its token, which wakes the connection; the relay then reads the reason with one atomic load, so checking for it
//! on every wake-up costs next to nothing. A leaf module: the relay and the upstreams both use it, and neither
//! knows the other.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct StopSignal {
    reason: OnceLock<&'static str>,
    /// The close code a frames-mode connection is closed with (0: 1012, "service restart").
    code: AtomicU16,
    token: CancellationToken,
}

impl StopSignal {
    /// A signal that wakes the connection through `token` (the relay waits on it).
    pub fn new(token: CancellationToken) -> StopSignal {
        StopSignal {
            reason: OnceLock::new(),
            code: AtomicU16::new(0),
            token,
        }
    }

    /// Asks the connection to close, saying why; the first reason given is the one it says.
    pub fn stop(&self, reason: &'static str) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Asks the connection to close with `code` (frames mode; a tunnel is closed at once), unless it was asked to
    /// close already.
    pub fn stop_with(&self, code: u16, reason: &'static str) {
        if self.reason.set(reason).is_ok() {
            self.code.store(code, Ordering::Release);
        }
        self.token.cancel();
    }

    /// The close code to close with.
    pub fn code(&self) -> u16 {
        match self.code.load(Ordering::Acquire) {
            0 => 1012,
            code => code,
        }
    }

    /// Why the connection was asked to close, if it was.
    pub fn reason(&self) -> Option<&'static str> {
        self.reason.get().copied()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}
