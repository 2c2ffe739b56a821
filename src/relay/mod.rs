//! Relays that carry a WebSocket connection after the `101 Switching Protocols`: `tunnel` copies bytes both ways
//! without looking at them; `frames` runs the same copy loop with a frame tracker per direction (see `copy`).

mod copy;
mod end;
mod frames;
mod splice;
mod watch;

pub use copy::{Timeouts, relay};
use end::StopCause;
pub use end::{End, Side};
pub use frames::Frames;
pub use splice::{pipes as splice_pipes, set_budget as set_pipe_budget};

use std::task::Context;

use crate::signal::{Phase, StopSignal};

/// A relayed connection's side of its [`StopSignal`] and of the server's [`Phase`]: woken through the signal, it
/// reads the signal's reason (a shed, the admin API) and the phase (a shutdown, a forced close), one atomic load each.
pub struct Stop<'a> {
    signal: &'a StopSignal,
    phase: &'a Phase,
    /// Frames mode: a shutdown closes the connection with 1001 at once (a tunnel runs on until the drain timeout).
    frames: bool,
}

impl<'a> Stop<'a> {
    pub fn new(signal: &'a StopSignal, phase: &'a Phase, frames: bool) -> Stop<'a> {
        Stop { signal, phase, frames }
    }

    /// Whether the connection must close, and why.
    fn poll(&self, cx: &mut Context<'_>) -> Option<StopCause> {
        // Registered before the reads below: a signal given after them wakes the task.
        self.signal.register(cx.waker());
        if self.phase.force_closing() {
            return Some(StopCause::ForceClose);
        }
        if let Some((reason, client, backend)) = self.signal.codes() {
            return Some(StopCause::Shed(reason, client, backend));
        }
        (self.frames && self.phase.shutting_down()).then_some(StopCause::ShuttingDown)
    }
}
