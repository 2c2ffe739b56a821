//! Relays that carry a WebSocket connection after the `101 Switching Protocols`: `tunnel` copies bytes both ways
//! without looking at them; `frames` runs the same copy loop with a frame tracker per direction (see `copy`).

mod copy;
pub mod frame;
mod frames;

pub use copy::{End, Side, relay};
pub use frames::Frames;
