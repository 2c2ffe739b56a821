//! The configuration model: what to listen on, which servers to forward to, and the timeouts. It is data only
//! (no runtime module is imported here) and is validated once, when it is built; code that receives a
//! [`Config`] never re-checks it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Default time to wait for a TCP connection to a backend server.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a client gets to send its whole request head, and a backend to answer the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time live connections get to finish after a shutdown signal.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Backend servers, tried in round-robin order.
    pub servers: Vec<Server>,
    pub timeouts: Timeouts,
    pub log_format: LogFormat,
    /// Worker threads, each with its own runtime and listening socket; 0 = one per available core.
    pub workers: usize,
}

/// A backend server as configured and as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// As written by the user (`host:port`), for logs.
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub handshake: Duration,
    /// Closes a relayed connection after this long without a byte either way; `None` = never.
    pub idle: Option<Duration>,
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: DEFAULT_CONNECT_TIMEOUT,
            handshake: DEFAULT_HANDSHAKE_TIMEOUT,
            idle: None,
            drain: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid listen address `{0}`: expected IP:PORT, e.g. 127.0.0.1:8080")]
    Listen(String),
    #[error("cannot resolve server `{name}`: {reason}")]
    Resolve { name: String, reason: String },
    #[error("a timeout of 0 is not allowed for `{0}`")]
    ZeroTimeout(&'static str),
}

/// A duration as people write it: `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration `{s}`: expected a number and a unit, like 30s or 250ms"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit `{other}` in `{s}`: expected ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("duration `{s}` is out of range"))
}

impl Config {
    /// The quick-mode configuration: one listener, round robin over `servers` (each `host:port`).
    pub fn quick(
        listen: &str,
        servers: &[String],
        timeouts: Timeouts,
        log_format: LogFormat,
    ) -> Result<Config, ConfigError> {
        let listen: SocketAddr = listen.parse().map_err(|_| ConfigError::Listen(listen.to_string()))?;
        let servers = servers
            .iter()
            .map(|name| resolve(name))
            .collect::<Result<Vec<_>, _>>()?;
        for (name, d) in [
            ("connect-timeout", timeouts.connect),
            ("handshake-timeout", timeouts.handshake),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroTimeout(name));
            }
        }
        Ok(Config {
            listen,
            servers,
            timeouts: Timeouts {
                idle: timeouts.idle.filter(|d| !d.is_zero()),
                ..timeouts
            },
            log_format,
            workers: 0,
        })
    }
}

fn resolve(name: &str) -> Result<Server, ConfigError> {
    let err = |reason: String| ConfigError::Resolve {
        name: name.to_string(),
        reason,
    };
    let address = name
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address found".into()))?;
    Ok(Server {
        name: name.to_string(),
        address,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn quick_mode_resolves_and_refuses() {
        let to = ["localhost:9000".to_string()];
        let cfg = Config::quick("127.0.0.1:0", &to, Timeouts::default(), LogFormat::Text).unwrap();
        assert_eq!(cfg.servers[0].address.port(), 9000);
        assert!(Config::quick("nowhere", &to, Timeouts::default(), LogFormat::Text).is_err());
        let bad = ["no-port".to_string()];
        assert!(Config::quick("127.0.0.1:0", &bad, Timeouts::default(), LogFormat::Text).is_err());
    }
}
