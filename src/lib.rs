//! wsgate: a WebSocket reverse proxy and gateway.
//!
//! The data path and the module map are described in `ARCHITECTURE.md`.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod demo;
pub mod http;
pub mod observe;
pub mod relay;
pub mod route;
pub mod server;
pub mod session;
pub mod signal;
pub mod supervise;
mod sys;
pub mod upstream;
