//! What wsgate tells its operators: the log subscriber (text or JSON, on stderr), and what a connection's access
//! log lines say ([`ConnectionRecord`], filled in as the connection goes; written by `access_log`).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use tracing_subscriber::EnvFilter;

use crate::access_log::line::{self, Kind, Line};
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
    /// The code of the first close frame, and which side sent it, in frames mode. The access log's `close_side`
    /// is who ended the session: once the relay has ended, the session sets it to `proxy` when wsgate closed it,
    /// and to the side that closed or failed in tunnel mode.
    pub close_code: Option<u16>,
    pub close_first: Option<&'static str>,
}

/// Everything the access log says about one connection (or, on a plain HTTP connection, one request), filled in
/// as it goes.
#[derive(Debug)]
pub struct ConnectionRecord {
    pub id: u64,
    /// Where the connection comes from: the TCP peer, or the source a PROXY protocol header named.
    pub client: SocketAddr,
    /// The TCP peer, when a PROXY protocol header named another source.
    pub proxy: Option<SocketAddr>,
    /// The client a trusted proxy's forwarding headers named, when not `client` itself. The log shows it as
    /// `client`, and `client` as `via`.
    pub forwarded_for: Option<IpAddr>,
    /// The route the request matched and its upstream (indexes into the config in force for the connection).
    pub route: Option<usize>,
    pub upstream: Option<usize>,
    /// The backend server tried last (the one relayed to, for a WebSocket).
    pub server: Option<SocketAddr>,
    /// The HTTP status the client was given (101 for a relayed WebSocket); 0 when it got none.
    pub status: u16,
    pub bytes: Counters,
    /// How it ended: `client closed`, `backend closed`, `idle timeout`, ... A refusal of wsgate's starts with
    /// [`REFUSED`], a failure with [`ERROR`]: the log's `error` is what follows.
    pub end: String,
    /// Its request was a WebSocket upgrade (the fast path's first request).
    pub upgrade: bool,
    /// Why wsgate refused it, as `wsgate_rejections_total` says it (the fast path: one refusal at most).
    pub rejection: Option<&'static str>,
    /// The W3C trace id its request went on with.
    pub trace_id: Option<[u8; 16]>,
    /// What its span needs beyond this record, with `[tracing]` (a WebSocket upgrade that got a trace).
    pub span: Option<Box<crate::otlp::SpanStart>>,
    /// What the request asked for and what it was admitted as; boxed: a connection refused before a request, or
    /// a long-lived session, does not need it inline.
    pub request: Option<Box<RequestInfo>>,
    /// The client left before sending anything (not even a whole PROXY protocol header): no line is written.
    pub sent_nothing: bool,
    /// The connection's lines are written already (plain HTTP writes one per request).
    pub written: bool,
}

/// How a refusal's `end` starts.
pub const REFUSED: &str = "refused: ";
/// How a failure's `end` starts.
pub const ERROR: &str = "error: ";

/// A request as the access log shows it.
#[derive(Debug, Default)]
pub struct RequestInfo {
    /// A static string for the usual methods: a long-lived session keeps no allocation for it.
    pub method: Cow<'static, str>,
    /// The target with the values of secret query parameters replaced.
    pub path: String,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    /// It asked for a WebSocket upgrade.
    pub websocket: bool,
    /// The subprotocol the backend's 101 chose.
    pub subprotocol: Option<String>,
    /// The extensions the backend's 101 accepted, as it wrote them.
    pub extensions: Option<String>,
    /// Who the route's authentication admitted it as.
    pub identity: Option<String>,
}

/// A request's method as the access log writes it.
fn method_name(method: &[u8]) -> Cow<'static, str> {
    const USUAL: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"];
    match USUAL.iter().find(|m| m.as_bytes() == method) {
        Some(m) => Cow::Borrowed(m),
        None => Cow::Owned(String::from_utf8_lossy(method).into_owned()),
    }
}

impl RequestInfo {
    /// A request from its parts as sent; `redact` names the query parameters (lowercase) whose values are left
    /// out, besides the default ones.
    pub fn new(
        method: &[u8],
        target: &[u8],
        host: Option<&[u8]>,
        user_agent: Option<&[u8]>,
        redact: &[String],
    ) -> Box<RequestInfo> {
        Box::new(RequestInfo {
            method: method_name(method),
            path: line::redact_target(target, redact),
            host: host.map(|h| String::from_utf8_lossy(h).into_owned()),
            user_agent: user_agent.map(line::user_agent),
            ..RequestInfo::default()
        })
    }

    /// The request in a head wsgate refused, as far as it can be read (`None` when not even its request line can).
    pub fn from_head(head: &[u8], redact: &[String]) -> Option<Box<RequestInfo>> {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut headers);
        // A partial parse still has the request line and the headers read so far.
        let _ = req.parse(head);
        let (method, target) = (req.method?, req.path?);
        let value = |name: &str| {
            req.headers
                .iter()
                .take_while(|h| !h.name.is_empty())
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let mut info = RequestInfo::new(
            method.as_bytes(),
            target.as_bytes(),
            value("host"),
            value("user-agent"),
            redact,
        );
        info.websocket = value("upgrade").is_some_and(|v| {
            v.split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"websocket"))
        });
        Some(info)
    }

    /// Notes what the backend's answer to an upgrade chose: its subprotocol and extensions. `values` gives a
    /// header's values (by lowercase name).
    pub fn switched<'a, I: Iterator<Item = &'a [u8]>>(&mut self, values: impl Fn(&'static str) -> I) {
        let joined = |name: &'static str| {
            let all: Vec<String> = values(name).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
            (!all.is_empty()).then(|| all.join(", "))
        };
        self.subprotocol = joined("sec-websocket-protocol");
        self.extensions = joined("sec-websocket-extensions");
    }

    /// [`RequestInfo::switched`] from the backend's 101 head as it was passed on.
    pub fn switched_head(&mut self, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut answer = httparse::Response::new(&mut headers);
        if answer.parse(head).is_err() {
            return;
        }
        self.switched(|name| {
            answer
                .headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        });
    }
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
            end: String::new(),
            request: None,
            sent_nothing: false,
            written: false,
        }
    }

    /// The refusal or failure in `end`, without its prefix.
    pub fn error(&self) -> Option<&str> {
        self.end.strip_prefix(REFUSED).or_else(|| self.end.strip_prefix(ERROR))
    }

    /// The kind of line the connection leaves at its end: `None` when it leaves none (its lines are written, or
    /// the client sent nothing).
    pub fn kind(&self) -> Option<Kind> {
        if self.written || self.sent_nothing {
            return None;
        }
        match &self.request {
            _ if self.upgrade => Some(Kind::WebSocket),
            Some(request) if request.websocket => Some(Kind::WebSocket),
            Some(_) => Some(Kind::Http),
            None => Some(Kind::Connection),
        }
    }

    /// The access log line: `listener` names the listener, `config` (the one the connection used) its route and
    /// upstream; `duration` is from the connection's (or the request's) start to now.
    pub fn line(&self, kind: Kind, listener: &str, duration: Duration, config: &Config) -> Vec<u8> {
        let route = self.route.and_then(|i| config.routes.get(i)).map(|r| r.name.as_str());
        let upstream = self
            .upstream
            .and_then(|i| config.upstreams.get(i))
            .map(|u| u.name.as_str());
        let (client, via) = match self.forwarded_for {
            Some(ip) => (ip.to_string(), Some(self.client.to_string())),
            None => (self.client.to_string(), None),
        };
        let request = self.request.as_deref();
        let trace_id = self.trace_id.map(|id| crate::http::trace::hex(&id));
        let line = Line {
            time: line::rfc3339(SystemTime::now()),
            kind,
            id: self.id,
            client,
            via,
            proxy: self.proxy.map(|p| p.to_string()),
            listener,
            route,
            upstream,
            server: self.server.map(|s| s.to_string()),
            method: request.map(|r| r.method.as_ref()),
            path: request.map(|r| r.path.as_str()),
            host: request.and_then(|r| r.host.as_deref()),
            status: (self.status != 0).then_some(self.status),
            subprotocol: request.and_then(|r| r.subprotocol.as_deref()),
            extensions: request.and_then(|r| r.extensions.as_deref()),
            identity: request.and_then(|r| r.identity.as_deref()),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            bytes_in: self.bytes.client_to_backend,
            bytes_out: self.bytes.backend_to_client,
            messages_in: self.bytes.messages.map(|m| m.0),
            messages_out: self.bytes.messages.map(|m| m.1),
            close_code: self.bytes.close_code,
            close_side: self.bytes.close_first,
            end: &self.end,
            error: self.error(),
            trace_id: trace_id.as_deref(),
            user_agent: request.and_then(|r| r.user_agent.as_deref()),
        };
        line.to_bytes()
    }
}
