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
    /// How WebSocket connections are relayed after the 101.
    pub relay: Relay,
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

/// How a WebSocket connection is relayed after the 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Relay {
    /// Bytes both ways, blind to frames. Cheapest.
    #[default]
    Tunnel,
    /// Frame-aware: message counts, limits, keepalive pings, protocol checks, close codes, 1001 on drain.
    Frames(FrameRules),
}

/// Default time wsgate waits for the close replies after sending close frames of its own.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default time a pong may take to answer wsgate's ping.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time a side may take to accept bytes wsgate has for it before it counts as stuck.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the frames relay enforces, per direction. Every limit is off unless set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRules {
    /// Largest message (sum of its fragments' payloads, wire bytes); over it the sender gets close 1009.
    pub max_message_size: Option<u64>,
    /// Largest frame payload; over it the sender gets close 1009.
    pub max_frame_size: Option<u64>,
    /// Messages per second each side may send, with `burst` on top; over it the sender gets close 1008.
    pub messages_per_second: Option<u32>,
    pub burst: u32,
    /// A side silent this long gets a ping from wsgate.
    pub ping_interval: Option<Duration>,
    /// No pong within this after wsgate's ping closes the connection.
    pub pong_timeout: Duration,
    /// Check that text messages are valid UTF-8 (close 1007 otherwise).
    pub validate_utf8: bool,
    /// How long wsgate waits for close replies after closing a connection itself.
    pub close_timeout: Duration,
    /// How long a side may leave bytes for it unread before the connection is closed.
    pub write_timeout: Duration,
}

impl Default for FrameRules {
    fn default() -> Self {
        Self {
            max_message_size: None,
            max_frame_size: None,
            messages_per_second: None,
            burst: 0,
            ping_interval: None,
            pong_timeout: DEFAULT_PONG_TIMEOUT,
            validate_utf8: false,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
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
    #[error("`{key}` is out of range: {expected}")]
    OutOfRange { key: &'static str, expected: &'static str },
}

/// The longest duration any setting may have (longer ones would only overflow clocks).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The shortest ping interval: pings more often than this are a load, not a keepalive.
pub const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);

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

/// A size as people write it: `512`, `64KiB`, `16MiB`, `1GiB` (also `KB`/`MB`/`GB` as powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid size `{s}`: expected a number and a unit, like 16MiB or 512KiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size unit `{other}` in `{s}`: expected B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("size `{s}` is out of range"))
}

impl FrameRules {
    fn validate(&self) -> Result<(), ConfigError> {
        let range = |key, expected| Err(ConfigError::OutOfRange { key, expected });
        if self
            .ping_interval
            .is_some_and(|d| !(MIN_PING_INTERVAL..=MAX_DURATION).contains(&d))
        {
            return range("ping-interval", "from 100ms to 30 days");
        }
        for (key, d) in [
            ("pong-timeout", self.pong_timeout),
            ("close-timeout", self.close_timeout),
            ("write-timeout", self.write_timeout),
        ] {
            if d.is_zero() || d > MAX_DURATION {
                return range(key, "more than 0 and at most 30 days");
            }
        }
        if self.messages_per_second == Some(0) {
            return range("messages-per-second", "at least 1");
        }
        if self.max_message_size == Some(0) || self.max_frame_size == Some(0) {
            return range("max-message-size / max-frame-size", "at least 1 byte");
        }
        Ok(())
    }
}

impl Config {
    /// Sets the relay mode, checking its rules.
    pub fn with_relay(mut self, relay: Relay) -> Result<Config, ConfigError> {
        if let Relay::Frames(rules) = &relay {
            rules.validate()?;
        }
        self.relay = relay;
        Ok(self)
    }

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
        for (key, d) in [
            ("connect-timeout", Some(timeouts.connect)),
            ("handshake-timeout", Some(timeouts.handshake)),
            ("idle-timeout", timeouts.idle),
            ("drain-timeout", Some(timeouts.drain)),
        ] {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(ConfigError::OutOfRange {
                    key,
                    expected: "at most 30 days",
                });
            }
        }
        Ok(Config {
            listen,
            servers,
            timeouts: Timeouts {
                idle: timeouts.idle.filter(|d| !d.is_zero()),
                ..timeouts
            },
            relay: Relay::Tunnel,
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
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("2KB"), Ok(2000));
        assert!(parse_size("1PiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn quick_mode_resolves_and_refuses() {
        let to = ["localhost:9000".to_string()];
        let cfg = Config::quick("127.0.0.1:0", &to, Timeouts::default(), LogFormat::Text).unwrap();
        assert_eq!(cfg.servers[0].address.port(), 9000);
        assert!(Config::quick("nowhere", &to, Timeouts::default(), LogFormat::Text).is_err());
        let frames = |rules| Config::quick("127.0.0.1:0", &to, Timeouts::default(), LogFormat::Text)?.with_relay(rules);
        assert!(frames(Relay::Frames(FrameRules::default())).is_ok());
        let zero_ping = FrameRules {
            ping_interval: Some(Duration::ZERO),
            ..FrameRules::default()
        };
        assert!(frames(Relay::Frames(zero_ping)).is_err());
        let huge = FrameRules {
            write_timeout: Duration::from_secs(u64::MAX / 4),
            ..FrameRules::default()
        };
        assert!(frames(Relay::Frames(huge)).is_err());
        let bad = ["no-port".to_string()];
        assert!(Config::quick("127.0.0.1:0", &bad, Timeouts::default(), LogFormat::Text).is_err());
    }
}
