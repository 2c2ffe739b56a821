//! How a relayed connection ends, from whose side, and why wsgate stops one: the small vocabulary the relay loop
//! (`copy`) and the frames-mode policy (`frames`) share, kept apart so that neither imports the other for it.

use std::io;

/// One end of the relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// This side closed its half of the TCP connection first (tunnel mode).
    Closed(Side),
    /// The WebSocket close handshake completed; this side sent its close frame first (frames mode).
    CloseHandshake { first: Side, code: Option<u16> },
    /// wsgate closed the connection itself (frames mode): why, and the close codes it sent.
    ClosedByProxy(String),
    /// No byte either way for the idle timeout.
    IdleTimeout,
    /// The drain timeout of a shutdown ran out: the connection was closed at once, without close frames.
    ForceClosed,
    /// A socket error on this side.
    Error(Side, io::Error),
}

impl std::fmt::Display for End {
    /// How the access log says it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed(side) => write!(f, "{side} closed"),
            End::CloseHandshake {
                first,
                code: Some(code),
            } => write!(f, "{first} closed with {code}"),
            End::CloseHandshake { first, code: None } => write!(f, "{first} closed without a code"),
            End::ClosedByProxy(why) => write!(f, "closed by wsgate: {why}"),
            End::IdleTimeout => f.write_str("idle timeout"),
            End::ForceClosed => f.write_str("closed: drain timeout reached during shutdown"),
            End::Error(side, e) => write!(f, "error: {side}: {e}"),
        }
    }
}

/// Why wsgate closes a connection it relays.
#[derive(Debug, Clone, Copy)]
pub enum StopCause {
    /// The process is shutting down: close 1001 "going away".
    ShuttingDown,
    /// The connection's server is drained, removed or rebalanced (close 1012), the admin API closes it (with the
    /// code it was given), or its client may not go on (close 1008 to it, 1001 to the backend): close with this
    /// reason and these codes (to the client, to the backend).
    Shed(&'static str, u16, u16),
    /// The drain timeout has run out: close at once, in either mode.
    ForceClose,
}
