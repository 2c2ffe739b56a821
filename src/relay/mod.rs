//! Relays that carry a WebSocket connection after the `101 Switching Protocols`: `tunnel` copies bytes both ways
//! without looking at them; `frames` runs the same copy loop with a frame tracker per direction (see `copy`).

mod copy;
pub mod frame;
mod frames;
mod watch;

pub use copy::{End, Side, Timeouts, relay};
pub use frames::Frames;

use std::future::Future;
use std::pin::Pin;
use std::task::Context;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Why wsgate closes a connection it relays.
#[derive(Debug, Clone, Copy)]
pub enum StopCause {
    /// The process is shutting down: close 1001 "going away".
    ShuttingDown,
    /// The connection's server is drained, removed or rebalanced: close 1012 with this reason.
    Shed(&'static str),
}

/// How wsgate tells a relayed connection to close: a token of its own, cancelled by a drain of its server (or, in
/// frames mode, where it is a child of the shutdown token, by shutdown).
pub struct Stop {
    token: CancellationToken,
    /// Registers the connection's waker with `token`: polled once, it stays registered, and later polls only ask the
    /// token whether it is cancelled. The token is the connection's own (a child of the shutdown token in frames
    /// mode), so that question takes a lock no other connection contends for.
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    registered: bool,
    shutting_down: CancellationToken,
    reason: Box<dyn Fn() -> &'static str + Send + Sync>,
}

impl Stop {
    /// `token` stops the connection; `shutting_down` tells a shutdown from a shed, whose reason `reason` gives.
    pub fn new(
        token: CancellationToken,
        shutting_down: CancellationToken,
        reason: impl Fn() -> &'static str + Send + Sync + 'static,
    ) -> Stop {
        Stop {
            wait: Box::pin(token.clone().cancelled_owned()),
            token,
            registered: false,
            shutting_down,
            reason: Box::new(reason),
        }
    }

    /// Whether the connection must close, and why.
    fn poll(&mut self, cx: &mut Context<'_>) -> Option<StopCause> {
        let stopped = if self.registered {
            self.token.is_cancelled()
        } else {
            self.registered = true;
            self.wait.as_mut().poll(cx).is_ready()
        };
        if !stopped {
            None
        } else if self.shutting_down.is_cancelled() {
            Some(StopCause::ShuttingDown)
        } else {
            Some(StopCause::Shed((self.reason)()))
        }
    }
}
