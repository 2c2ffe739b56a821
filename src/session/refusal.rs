//! Every refusal of either request path (the upgrade fast path and plain HTTP through hyper) is one [`Refusal`],
//! and [`Refusal::answer`] is the one place that says what the client gets for it: status, a short reason,
//! `Retry-After`, extra headers. The refusal's `Display` is the log's version, which may name servers; the answer
//! never does.

use std::net::IpAddr;
use std::time::Duration;

use crate::auth::AuthError;
use crate::config::Route;
use crate::http::handshake::HandshakeError;
use crate::http::{Answer, RequestView};
use crate::policy::Limit;
use crate::proxy_protocol::ProxyError;
use crate::upstream::{RETRY_AFTER_BUSY, UpstreamError};

/// The longest host or path a 404's reason repeats back, in characters.
const MAX_ECHOED: usize = 200;

/// Why a client gets an answer of wsgate's own instead of what it asked for.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("client sent no complete request head within {0:?}")]
    HeadTimeout(Duration),
    /// A trusted proxy on a listener with `proxy_protocol` sent no valid PROXY protocol header first.
    #[error("trusted proxy sent no valid PROXY protocol header: {0}")]
    ProxyHeader(ProxyError),
    #[error("trusted proxy sent no whole PROXY protocol header within {0:?}")]
    ProxyHeaderTimeout(Duration),
    /// A PROXY protocol header where none is read: the peer is no trusted proxy of the listener, or the listener's
    /// `proxy_protocol` is off. Its bytes were read as HTTP, and are no request.
    #[error(
        "PROXY protocol header from a peer it is not accepted from (not in the listener's trusted_proxies, or proxy_protocol off)"
    )]
    UnexpectedProxyHeader,
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("no route for host `{host}` and path `{path}`")]
    NoRoute { host: String, path: String },
    /// An upgrade to a path whose route serves no WebSocket (the LLM gateway's HTTP API).
    #[error("`{path}` takes no WebSocket upgrade")]
    NoUpgrade { path: String },
    /// No usable backend connection, after `tries` servers.
    #[error("{error}{}", tried(*.tries))]
    Upstream { error: UpstreamError, tries: usize },
    /// The client's request body broke off while it was being forwarded (plain HTTP).
    #[error("client request body failed: {0}")]
    ClientBody(String),
    /// The client's address is not let in (`by`: which listener or route said so).
    #[error("client {client} denied by {by}")]
    Denied { client: IpAddr, by: String },
    /// An upgrade from an origin the route does not allow (`None`: without an `Origin`).
    #[error("{} not allowed on route `{route}`", origin.as_deref().map_or("an upgrade without Origin".into(), |o| format!("origin `{o}`")))]
    Origin { origin: Option<String>, route: String },
    /// A connection limit is reached.
    #[error("{}", limit_text(.0))]
    Limit(Limit),
    /// A plain listener with `redirect_https` sends every request to https.
    /// (The log line leaves the query out: it may carry a token.)
    #[error("redirected to {}", location.split('?').next().unwrap_or_default())]
    ToHttps { location: String },
    /// The route's authentication refused the request (the reason says why; the client is told no more than
    /// "unauthorized").
    #[error("unauthorized on route `{route}`: {error}")]
    Unauthorized { route: String, error: AuthError },
    /// The API key that admitted the request is at one of its limits.
    #[error("{} (API key `{identity}`)", limit_text(.limit))]
    KeyLimit { identity: String, limit: Limit },
    /// The identity the request was admitted as is at one of the route's limits.
    #[error("{} (identity `{identity}`)", limit_text(.limit))]
    IdentityLimit { identity: String, limit: Limit },
    /// A limit shared with the other instances (`[cluster] redis`) is reached.
    #[error("{} across the cluster{who}", limit_text(.limit))]
    ClusterLimit { limit: Limit, who: String },
    /// Redis, which keeps the shared limits, does not answer, and a limit that applies fails closed.
    #[error("shared limits unavailable (Redis does not answer) and a limit that applies fails closed")]
    ClusterUnavailable,
}

/// A request's path as text for a 404's reason (see [`echoed`]).
pub(crate) fn echoed_path(req: &impl RequestView) -> String {
    echoed(req.path())
}

/// Client-sent bytes as text for a log line or a 404's reason: lossy, at most [`MAX_ECHOED`] characters.
pub(crate) fn echoed(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(MAX_ECHOED).collect()
}

fn limit_text(limit: &Limit) -> String {
    match limit {
        Limit::Overall(n) => format!("wsgate holds its max_connections ({n})"),
        Limit::PerClient(n) => format!("the client holds max_connections_per_ip ({n}) on this listener"),
        Limit::Rate { per_second, .. } => format!("the client starts handshakes faster than {per_second} per second"),
        Limit::PerKey(n) => format!("the API key holds its max_connections ({n})"),
        Limit::KeyRate { per_second, .. } => {
            format!("the API key starts handshakes faster than {per_second} per second")
        }
        Limit::PerIdentity(n) => format!("the identity holds max_connections_per_identity ({n})"),
        Limit::IdentityRate { per_second, .. } => {
            format!("the identity starts handshakes faster than {per_second} per second")
        }
    }
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

    /// The redirect of a request to the same host and target on https, on `port`.
    pub(crate) fn to_https(req: &impl RequestView, port: u16) -> Refusal {
        let host = req.host().unwrap_or_default();
        let host = String::from_utf8_lossy(host);
        let (name, _) = crate::config::file::split_port(&host, 443).unwrap_or((&host, 443));
        let target = String::from_utf8_lossy(req.target());
        let location = match port {
            443 => format!("https://{name}{target}"),
            port => format!("https://{name}:{port}{target}"),
        };
        Refusal::ToHttps { location }
    }

    pub(crate) fn no_route(req: &impl RequestView) -> Refusal {
        Refusal::NoRoute {
            host: echoed(req.host().unwrap_or(b"-")),
            path: echoed(req.path()),
        }
    }

    /// The route's address rules and, for an upgrade, its allowed origins: `Err` with the refusal when the client
    /// may not use it.
    pub(crate) fn check_route(
        route: &Route,
        client: IpAddr,
        upgrade: Option<&impl RequestView>,
    ) -> Result<(), Refusal> {
        if !route.access.admits(client) {
            return Err(Refusal::Denied {
                client,
                by: format!("route `{}`", route.name),
            });
        }
        if let (Some(rule), Some(req)) = (&route.origins, upgrade) {
            let mut origins = req.header_values("origin");
            let origin = origins.next();
            if origins.next().is_some() {
                return Err(HandshakeError::Malformed("more than one Origin header").into());
            }
            if !rule.admits(origin) {
                return Err(Refusal::Origin {
                    origin: origin.map(echoed),
                    route: route.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// The route's authentication: what the admitted request becomes, or the refusal. `upgrade`: the request is
    /// a WebSocket upgrade.
    pub(crate) fn check_auth(
        route: &Route,
        req: &impl RequestView,
        upgrade: bool,
    ) -> Result<Option<crate::auth::Admit>, Refusal> {
        let Some(auth) = &route.auth else {
            return Ok(None);
        };
        auth.check(req, upgrade)
            .map(Some)
            .map_err(|error| Refusal::Unauthorized {
                route: route.name.clone(),
                error,
            })
    }

    /// The remote key set to refresh before the request is checked again (a token named a key id it lacks).
    pub(crate) fn jwks_refresh(&self) -> Option<std::sync::Arc<crate::auth::jwks::Remote>> {
        match self {
            Self::Unauthorized { error, .. } => error.refresh(),
            _ => None,
        }
    }

    /// The reason label of `wsgate_rejections_total`.
    pub(crate) fn metric_reason(&self) -> &'static str {
        match self {
            Self::Denied { .. } => "acl",
            Self::Origin { .. } => "origin",
            Self::Unauthorized { .. } => "auth",
            Self::Limit(_) | Self::KeyLimit { .. } | Self::IdentityLimit { .. } | Self::ClusterLimit { .. } => "limit",
            Self::ClusterUnavailable => "overload",
            Self::NoRoute { .. } | Self::NoUpgrade { .. } => "no_route",
            Self::Upstream { error, .. } if error.cause() != crate::upstream::Cause::Server => "overload",
            Self::Upstream { .. } => "upstream",
            Self::HeadTimeout(_) | Self::ProxyHeaderTimeout(_) => "timeout",
            Self::ToHttps { .. } => "redirect",
            Self::Handshake(_) | Self::ProxyHeader(_) | Self::UnexpectedProxyHeader | Self::ClientBody(_) => {
                "bad_request"
            }
        }
    }

    /// What the client is answered.
    pub(crate) fn answer(&self) -> Answer {
        match self {
            Self::HeadTimeout(_) => Answer::new(408, self.to_string()),
            Self::ProxyHeaderTimeout(_) => Answer::new(408, "no PROXY protocol header received").closing(),
            Self::ProxyHeader(_) => Answer::new(400, "missing or malformed PROXY protocol header").closing(),
            Self::UnexpectedProxyHeader => Answer::new(400, "malformed request head").closing(),
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
            Self::NoRoute { .. } | Self::NoUpgrade { .. } => Answer::new(404, self.to_string()),
            Self::Upstream { error, .. } => {
                Answer::new(error.status(), error.public_reason()).with_retry_after(error.retry_after())
            }
            Self::ClientBody(_) => Answer::new(400, "request body not received").closing(),
            Self::Denied { .. } => Answer::new(403, "forbidden"),
            Self::Origin { .. } => Answer::new(403, "origin not allowed"),
            Self::ClusterUnavailable => {
                Answer::new(503, "connection limits unavailable").with_retry_after(Some(RETRY_AFTER_BUSY))
            }
            Self::Limit(limit)
            | Self::KeyLimit { limit, .. }
            | Self::IdentityLimit { limit, .. }
            | Self::ClusterLimit { limit, .. } => match *limit {
                Limit::PerClient(_) => Answer::new(429, "too many connections from this address"),
                Limit::Rate { retry_after, .. } => {
                    Answer::new(429, "too many handshakes from this address").with_retry_after(Some(retry_after))
                }
                Limit::Overall(_) => {
                    Answer::new(503, "server at its connection limit").with_retry_after(Some(RETRY_AFTER_BUSY))
                }
                Limit::PerKey(_) => Answer::new(429, "too many connections with this API key"),
                Limit::KeyRate { retry_after, .. } => {
                    Answer::new(429, "too many handshakes with this API key").with_retry_after(Some(retry_after))
                }
                Limit::PerIdentity(_) => Answer::new(429, "too many connections for this identity"),
                Limit::IdentityRate { retry_after, .. } => {
                    Answer::new(429, "too many handshakes for this identity").with_retry_after(Some(retry_after))
                }
            },
            Self::ToHttps { location } => Answer::new(308, "use https").with_header("Location", location.clone()),
            Self::Unauthorized { error, .. } => {
                let answer = Answer::new(401, "unauthorized");
                error
                    .challenges()
                    .into_iter()
                    .fold(answer, |a, c| a.with_header("WWW-Authenticate", c))
            }
        }
    }
}
