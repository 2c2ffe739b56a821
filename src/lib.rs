//! wsgate: a WebSocket reverse proxy and gateway.
//!
//! The data path and the module map are described in `ARCHITECTURE.md`. The public modules are what the binary,
//! the tests and the fuzz targets use; the rest is the crate's own.
#![deny(unsafe_code)]

mod access_log;
mod admin;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
mod conn;
pub mod demo;
pub mod http;
pub mod live;
pub mod llm;
pub mod metrics;
mod notify;
mod observe;
mod otlp;
mod policy;
mod proxy_protocol;
mod relay;
mod route;
pub mod server;
mod session;
mod signal;
pub mod state;
mod supervise;
mod sys;
pub mod tls;
pub mod upstream;
pub mod ws;
