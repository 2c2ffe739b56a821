//! Relays that carry a WebSocket connection after the `101 Switching Protocols`: `tunnel` copies bytes both ways
//! without looking at them; `frames` runs the same copy loop with a frame tracker per direction (see `copy`).
//! `splice` is an experiment: the tunnel's bytes through a pipe instead of a buffer.

mod copy;
mod end;
mod frames;
mod splice;
mod watch;

pub use copy::{Timeouts, relay};
use end::StopCause;
pub use end::{End, Side};
pub use frames::Frames;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;

use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::signal::StopSignal;

/// A relayed connection's side of its [`StopSignal`]: woken through the signal's token, it reads the signal's reason
/// (a shed) and, in frames mode, the process's shutdown flag, one atomic load each.
pub struct Stop {
    signal: Arc<StopSignal>,
    /// Registers the connection's waker with the signal's token: polled once, it stays registered.
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    registered: bool,
    /// Set at shutdown (frames mode only: the token is then a child of the shutdown token, so it wakes the relay).
    shutting_down: Option<Arc<AtomicBool>>,
}

impl Stop {
    pub fn new(signal: Arc<StopSignal>, shutting_down: Option<Arc<AtomicBool>>) -> Stop {
        Stop {
            wait: Box::pin(signal.token().clone().cancelled_owned()),
            signal,
            registered: false,
            shutting_down,
        }
    }

    /// Whether the connection must close, and why.
    fn poll(&mut self, cx: &mut Context<'_>) -> Option<StopCause> {
        if !self.registered {
            self.registered = true;
            // Ready at once only for a signal already given; its cause is read below either way.
            let _ = self.wait.as_mut().poll(cx);
        }
        if let Some((reason, code)) = self.signal.reason() {
            return Some(StopCause::Shed(reason, code));
        }
        self.shutting_down
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Acquire))
            .then_some(StopCause::ShuttingDown)
    }
}
