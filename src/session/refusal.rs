//! Every refusal of either request path (the upgrade fast path and plain HTTP through hyper) is one [`Refusal`],
//! and [`Refusal::answer`] is the one place that says what the client gets for it: status, a short reason,
//! `Retry-After`, extra headers. The refusal's `Display` is the log's version, which may name servers; the answer
//! never does.

use std::time::Duration;

use crate::http::handshake::HandshakeError;
use crate::http::{Answer, RequestView};
use crate::upstream::UpstreamError;

/// The longest host or path a 404's reason repeats back, in characters.
const MAX_ECHOED: usize = 200;

/// Why a client gets an answer of wsgate's own instead of what it asked for.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("client sent no complete request head within {0:?}")]
    HeadTimeout(Duration),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("no route for host `{host}` and path `{path}`")]
    NoRoute { host: String, path: String },
    /// No usable backend connection, after `tries` servers.
    #[error("{error}{}", tried(*.tries))]
    Upstream { error: UpstreamError, tries: usize },
    /// The client's request body broke off while it was being forwarded (plain HTTP).
    #[error("client request body failed: {0}")]
    ClientBody(String),
}

fn tried(tries: usize) -> String {
    if tries > 1 {
        format!(" ({tries} servers tried)")
    } else {
        String::new()
    }
}

impl Refusal {
    pub(crate) fn upstream(error: UpstreamError, tries: usize) -> Refusal {
        Refusal::Upstream { error, tries }
    }

    /// Whether the client caused it (the plain path logs those at debug level only: a client can cause many).
    pub(crate) fn by_client(&self) -> bool {
        !matches!(self, Self::Upstream { .. })
    }

    pub(crate) fn no_route(req: &impl RequestView) -> Refusal {
        let text = |b: Option<&[u8]>| {
            String::from_utf8_lossy(b.unwrap_or(b"-"))
                .chars()
                .take(MAX_ECHOED)
                .collect()
        };
        Refusal::NoRoute {
            host: text(req.host()),
            path: text(Some(req.path())),
        }
    }

    /// What the client is answered.
    pub(crate) fn answer(&self) -> Answer {
        match self {
            Self::HeadTimeout(_) => Answer::new(408, self.to_string()),
            Self::Handshake(e @ HandshakeError::UnsupportedVersion) => {
                Answer::new(e.status(), e.to_string()).with_header("Sec-WebSocket-Version", "13")
            }
            // Where an ambiguous request's body ends is unknown, and what follows a refused upgrade's body is neither
            // a request nor a WebSocket stream: nothing after either on the connection can be read.
            Self::Handshake(e @ (HandshakeError::Framing(_) | HandshakeError::UpgradeWithBody)) => {
                Answer::new(e.status(), e.to_string()).closing()
            }
            Self::Handshake(e) => Answer::new(e.status(), e.to_string()),
            // The client's own host and path, as it sent them: nothing of wsgate's.
            Self::NoRoute { .. } => Answer::new(404, self.to_string()),
            Self::Upstream { error, .. } => {
                Answer::new(error.status(), error.public_reason()).with_retry_after(error.retry_after())
            }
            Self::ClientBody(_) => Answer::new(400, "request body not received").closing(),
        }
    }
}
