//! How wsgate tells one relayed connection to close: a [`StopSignal`] per connection, held by the relay and by the
//! registry of its server's sessions. A drain, a removal or a rebalance of the server sets its reason and cancels
//! its token, which wakes the connection; the relay then reads the reason with one atomic load, so checking for it
//! on every wake-up costs next to nothing. A leaf module: the relay and the upstreams both use it, and neither
//! knows the other.

use std::sync::OnceLock;

use tokio_util::sync::CancellationToken;

/// The close code of a drain, a removal or a rebalance: 1012 "service restart".
const SHED_CODE: u16 = 1012;

#[derive(Debug)]
pub struct StopSignal {
    /// Why, and the close code a frames-mode connection is closed with: set once, together.
    stop: OnceLock<(&'static str, u16)>,
    token: CancellationToken,
}

impl StopSignal {
    /// A signal that wakes the connection through `token` (the relay waits on it).
    pub fn new(token: CancellationToken) -> StopSignal {
        StopSignal {
            stop: OnceLock::new(),
            token,
        }
    }

    /// Asks the connection to close (with 1012 in frames mode), saying why; the first reason given is the one it
    /// says.
    pub fn stop(&self, reason: &'static str) {
        self.stop_with(SHED_CODE, reason);
    }

    /// Asks the connection to close with `code` (frames mode; a tunnel is closed at once); `false` when it was asked
    /// to close already (its first reason and code stand).
    pub fn stop_with(&self, code: u16, reason: &'static str) -> bool {
        let first = self.stop.set((reason, code)).is_ok();
        self.token.cancel();
        first
    }

    /// Why the connection was asked to close, and the close code, if it was.
    pub fn reason(&self) -> Option<(&'static str, u16)> {
        self.stop.get().copied()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}
