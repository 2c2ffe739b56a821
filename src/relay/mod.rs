//! Relays that carry a WebSocket connection after the `101 Switching Protocols`. `tunnel` copies bytes both
//! ways without looking at them; a frame-aware relay will share its loop.

pub mod frame;
mod tunnel;

pub use tunnel::{End, Side, tunnel};
