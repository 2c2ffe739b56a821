//! What wsgate tells its operators: the log subscriber (text or JSON) and the one line written per connection
//! when it ends.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global log subscriber: `info` and above unless `RUST_LOG` says otherwise, to stderr.
/// Calling it again (as tests do) keeps the first one.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Bytes carried so far, each way. Updated as a connection runs, so they are right even when it is cut short.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Messages each way (client to backend, backend to client), in frames mode.
    pub messages: Option<(u64, u64)>,
    /// The code of the first close frame, and which side sent it, in frames mode.
    pub close_code: Option<u16>,
    pub close_first: Option<&'static str>,
}

/// Everything the access log says about one connection, filled in as the connection goes.
#[derive(Debug)]
pub struct ConnectionRecord {
    pub id: u64,
    /// Where the connection comes from: the TCP peer, or the source a PROXY protocol header named.
    pub client: SocketAddr,
    /// The TCP peer, when a PROXY protocol header named another source.
    pub proxy: Option<SocketAddr>,
    /// The client a trusted proxy's forwarding headers named, when not `client` itself (on a plain HTTP
    /// connection, the last request's). The log shows it as `client`, and `client` as `via`.
    pub forwarded_for: Option<IpAddr>,
    /// The route the request matched and its upstream (indexes into the config in force for the connection); on a
    /// plain HTTP connection, those of its last request.
    pub route: Option<usize>,
    pub upstream: Option<usize>,
    /// The backend server tried last (the one relayed to, for a WebSocket).
    pub server: Option<SocketAddr>,
    /// The HTTP status the client was given (101 for a relayed WebSocket); 0 when it got none.
    pub status: u16,
    pub bytes: Counters,
    /// Requests served, on a plain HTTP connection.
    pub requests: u32,
    /// How the connection ended: `client closed`, `backend closed`, `idle timeout`, `error: ...`, ...
    pub end: String,
    /// Its request was a WebSocket upgrade (the fast path's first request).
    pub upgrade: bool,
    /// Why wsgate refused it, as `wsgate_rejections_total` says it (the fast path: one refusal at most).
    pub rejection: Option<&'static str>,
    /// The W3C trace id its request went on with (on a plain HTTP connection, its last request's).
    pub trace_id: Option<String>,
    /// What its span needs beyond this record, with `[tracing]` (a WebSocket upgrade that got a trace).
    pub span: Option<Box<crate::otlp::SpanStart>>,
}

impl ConnectionRecord {
    pub fn new(id: u64, client: SocketAddr) -> Self {
        Self {
            id,
            client,
            proxy: None,
            forwarded_for: None,
            route: None,
            upstream: None,
            server: None,
            upgrade: false,
            rejection: None,
            trace_id: None,
            span: None,
            status: 0,
            bytes: Counters::default(),
            requests: 0,
            end: String::new(),
        }
    }

    /// Writes the connection's access log line; `config` (the one the connection used) names its route and upstream.
    pub fn log(&self, duration: Duration, config: &Config) {
        let route = self.route.and_then(|i| config.routes.get(i)).map(|r| r.name.as_str());
        let upstream = self
            .upstream
            .and_then(|i| config.upstreams.get(i))
            .map(|u| u.name.as_str());
        let server = self.server.map(|b| b.to_string());
        let (client, via) = match self.forwarded_for {
            Some(ip) => (ip.to_string(), Some(self.client.to_string())),
            None => (self.client.to_string(), None),
        };
        let proxy = self.proxy.map(|p| p.to_string());
        tracing::info!(
            target: "wsgate::access",
            id = self.id,
            client = %client,
            via = via.as_deref(),
            proxy = proxy.as_deref(),
            route = route.unwrap_or("-"),
            upstream = upstream.unwrap_or("-"),
            server = server.as_deref().unwrap_or("-"),
            status = self.status,
            duration_ms = duration.as_millis() as u64,
            bytes_in = self.bytes.client_to_backend,
            bytes_out = self.bytes.backend_to_client,
            requests = self.requests,
            messages_in = self.bytes.messages.map(|m| m.0),
            messages_out = self.bytes.messages.map(|m| m.1),
            close_code = self.bytes.close_code,
            close_first = self.bytes.close_first,
            trace_id = self.trace_id.as_deref(),
            end = %self.end,
            "connection closed"
        );
    }
}
