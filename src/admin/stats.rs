//! The live stats page on the admin listener: `GET /stats` serves one self-contained page (its script and style
//! are embedded in the binary and inlined; a Content-Security-Policy allows nothing else), and `GET /stats/ws` is
//! the WebSocket it reads: a [`Snapshot`] of the proxy's totals at once and then every second.
//!
//! The stats socket is the admin listener's own connection: it reads [`crate::live::Sessions::all_totals`] and the
//! servers' state as a scrape does, and is never registered as a session nor counted in a session metric. At most
//! [`MAX_SOCKETS`] are open at once (more get 503); each ends when the admin listener stops (close 1001), when its
//! client stops reading ([`WRITE_TIMEOUT`]), or when the client sends anything but text, pings, pongs and a close.
//! What the client sends is never read for meaning: text is ignored. Rates (handshakes/s, messages/s, bytes/s) are
//! the page's work, from the deltas of the cumulative counters.
//!
//! The token: with `protect_reads`, both need the admin token, as a bearer token or as `?token=` (which is what a
//! browser can give; the page passes on the one it was loaded with). Answers to a refused upgrade come from
//! [`Refusal::answer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AdminSettings;
use crate::state::Shared;

/// Stats sockets open at once, at most.
pub(super) const MAX_SOCKETS: usize = 16;
/// How often a stats socket sends a snapshot.
const PERIOD: Duration = Duration::from_secs(1);
/// How long a snapshot (or a pong, or the close) may take to be written before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the admin listener waits, when it stops, for its stats sockets to send their close.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// The largest message or frame a stats client may send (nothing it sends is used).
const MAX_INCOMING: usize = 4096;

const PAGE_HTML: &str = include_str!("stats.html");
const PAGE_CSS: &str = include_str!("stats.css");
const PAGE_JS: &str = include_str!("stats.js");

/// The stats sockets of one admin listener: how many may open, and what ends them.
pub(super) struct StatsSockets {
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl StatsSockets {
    /// Sockets that end when `stop` is cancelled.
    pub(super) fn new(stop: CancellationToken) -> StatsSockets {
        StatsSockets {
            permits: Arc::new(Semaphore::new(MAX_SOCKETS)),
            stop,
            tasks: TaskTracker::new(),
        }
    }

    /// After the admin listener has stopped: waits a little for the open sockets to send their close frames.
    pub(super) async fn closed(&self) {
        self.tasks.close();
        let _ = tokio::time::timeout(CLOSE_WAIT, self.tasks.wait()).await;
    }
}

/// Whether the request presents the admin token as `?token=` on a stats path (the only paths that take it so: a
/// browser's WebSocket cannot send a header). Compared in constant time.
pub(super) fn authorized_by_query(settings: &AdminSettings, req: &Request<Incoming>) -> bool {
    let Some(token) = &settings.token else {
        return true;
    };
    if !matches!(req.uri().path(), "/stats" | "/stats/ws") {
        return false;
    }
    let Some(presented) = req.uri().query().and_then(query_token) else {
        return false;
    };
    presented.len() == token.len() && bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
}

/// The (percent-decoded) value of the first `token=` parameter of a query.
fn query_token(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .and_then(super::percent_decoded)
}

/// The page with its script and style inlined, and the Content-Security-Policy that allows exactly those.
struct Page {
    html: Bytes,
    csp: HeaderValue,
}

fn page() -> &'static Page {
    static PAGE: OnceLock<Page> = OnceLock::new();
    PAGE.get_or_init(|| {
        let html = PAGE_HTML
            .replacen("/*STYLE*/", PAGE_CSS, 1)
            .replacen("/*SCRIPT*/", PAGE_JS, 1);
        let csp = format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src data:; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            csp_hash(PAGE_JS),
            csp_hash(PAGE_CSS)
        );
        Page {
            html: Bytes::from(html),
            // Made of base64 and ASCII only: always a valid header value.
            csp: HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'")),
        }
    })
}

/// A CSP source for an inline element's text: `sha256-BASE64`.
fn csp_hash(text: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(digest))
}

/// `GET /stats`: the page.
pub(super) fn page_answer() -> Response<Full<Bytes>> {
    let page = page();
    let mut answer = Response::new(Full::new(page.html.clone()));
    let headers = answer.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CONTENT_SECURITY_POLICY, page.csp.clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // The page may have been loaded with `?token=`: it goes nowhere else.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    answer
}

/// Why an upgrade to the stats socket is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum Refusal {
    #[error("GET /stats/ws is a WebSocket: send an HTTP/1.1 upgrade")]
    NotUpgrade,
    #[error("Sec-WebSocket-Key is missing or malformed")]
    BadKey,
    #[error("only WebSocket version 13 is served")]
    Version,
    #[error("the Origin is not this admin listener's")]
    CrossOrigin,
    #[error("too many stats sockets are open")]
    Busy,
}

impl Refusal {
    /// The one answer each refusal gets.
    fn answer(self) -> Response<Full<Bytes>> {
        let status = match self {
            Refusal::NotUpgrade | Refusal::BadKey => StatusCode::BAD_REQUEST,
            Refusal::Version => StatusCode::UPGRADE_REQUIRED,
            Refusal::CrossOrigin => StatusCode::FORBIDDEN,
            Refusal::Busy => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut answer = super::json(status, &self.to_string());
        if self == Refusal::Version {
            answer
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        answer
    }
}

/// Whether a comma-separated header holds `token`, ASCII case aside.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks an upgrade request; the `Sec-WebSocket-Accept` it is answered with.
fn check_upgrade(req: &Request<Incoming>) -> Result<HeaderValue, Refusal> {
    let headers = req.headers();
    if req.version() != http::Version::HTTP_11
        || !has_token(headers, header::UPGRADE, "websocket")
        || !has_token(headers, header::CONNECTION, "upgrade")
    {
        return Err(Refusal::NotUpgrade);
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(Refusal::Version);
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or(Refusal::BadKey)?;
    if !valid_key(key.as_bytes()) {
        return Err(Refusal::BadKey);
    }
    if !same_origin(headers) {
        return Err(Refusal::CrossOrigin);
    }
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|_| Refusal::BadKey)
}

/// A `Sec-WebSocket-Key`: 16 bytes in base64.
fn valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// A browser's WebSocket may be opened by any page the admin visits: one with an `Origin` (browsers always send
/// it) must come from a page of this listener, its host being the request's `Host`. Clients that are not browsers
/// send none.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, h)| h);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// `GET /stats/ws`: checks the upgrade, takes a socket permit, answers 101 and serves the socket on a task of the
/// admin listener's.
pub(super) fn upgrade(
    shared: &Arc<Shared>,
    sockets: &StatsSockets,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let accept = match check_upgrade(&req) {
        Ok(accept) => accept,
        Err(refusal) => return refusal.answer(),
    };
    let Ok(permit) = sockets.permits.clone().try_acquire_owned() else {
        tracing::warn!(client = %peer, limit = MAX_SOCKETS, "stats socket refused: too many open");
        return Refusal::Busy.answer();
    };
    let upgrading = hyper::upgrade::on(&mut req);
    let (shared, stop) = (shared.clone(), sockets.stop.clone());
    sockets.tasks.spawn(async move {
        let upgraded = tokio::select! {
            upgraded = upgrading => upgraded,
            () = stop.cancelled() => return,
        };
        match upgraded {
            Ok(upgraded) => serve_socket(TokioIo::new(upgraded), &shared, &stop, peer, permit).await,
            Err(e) => tracing::debug!(client = %peer, error = %e, "stats socket: the upgrade did not complete"),
        }
    });
    let mut answer = Response::new(Full::new(Bytes::new()));
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = answer.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    answer
}

/// How a stats socket ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("the admin listener stopped")]
    Stopped,
    #[error("the client closed")]
    ClientClosed,
    #[error("the client did not read within {WRITE_TIMEOUT:?}")]
    WriteTimeout,
    #[error("the client sent a message the stats socket does not take")]
    Unexpected,
    #[error(transparent)]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

async fn serve_socket<S>(
    io: S,
    shared: &Shared,
    stop: &CancellationToken,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_INCOMING))
        .max_frame_size(Some(MAX_INCOMING));
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    tracing::debug!(client = %peer, "stats socket open");
    let ended = relay_snapshots(&mut ws, shared, stop).await;
    let close = match &ended {
        Ended::Stopped => Some((CloseCode::Away, "the admin listener is stopping")),
        Ended::Unexpected => Some((CloseCode::Unsupported, "the stats socket takes no data")),
        Ended::WebSocket(tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
            Some((CloseCode::Size, "the stats socket takes no data"))
        }
        Ended::ClientClosed | Ended::WriteTimeout | Ended::WebSocket(_) => None,
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, ws.close(Some(frame))).await;
    }
    tracing::debug!(client = %peer, reason = %ended, "stats socket closed");
    drop(permit);
}

/// Sends a snapshot at once and then every [`PERIOD`], answering pings, until the socket ends.
async fn relay_snapshots<S>(ws: &mut WebSocketStream<S>, shared: &Shared, stop: &CancellationToken) -> Ended
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            _ = ticks.tick() => {
                let text = match serde_json::to_string(&Snapshot::read(shared, SystemTime::now())) {
                    Ok(text) => text,
                    // Serializing plain numbers and strings does not fail; were it to, the socket ends.
                    Err(_) => return Ended::Unexpected,
                };
                match tokio::time::timeout(WRITE_TIMEOUT, ws.send(Message::text(text))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return e.into(),
                    Err(_) => return Ended::WriteTimeout,
                }
            }
            incoming = ws.next() => match incoming {
                None | Some(Ok(Message::Close(_))) => return Ended::ClientClosed,
                // tungstenite has queued the pong: flushing sends it now.
                Some(Ok(Message::Ping(_))) => match tokio::time::timeout(WRITE_TIMEOUT, ws.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return e.into(),
                    Err(_) => return Ended::WriteTimeout,
                },
                Some(Ok(Message::Text(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Binary(_) | Message::Frame(_))) => return Ended::Unexpected,
                Some(Err(e)) => return e.into(),
            },
        }
    }
}

/// What a stats socket sends each second. Counters are cumulative since start: `_in` is client to backend, `_out`
/// backend to client.
#[derive(Debug, Serialize)]
pub(super) struct Snapshot {
    /// Milliseconds since the Unix epoch.
    time: u64,
    /// Sessions relaying now, over every place.
    active: i64,
    places: Vec<PlaceStats>,
    servers: Vec<ServerStats>,
}

#[derive(Debug, Serialize)]
struct PlaceStats {
    listener: String,
    route: String,
    upstream: String,
    server: String,
    active: i64,
    sessions: u64,
    bytes_in: u64,
    bytes_out: u64,
    messages_in: u64,
    messages_out: u64,
}

#[derive(Debug, Serialize)]
struct ServerStats {
    upstream: String,
    server: String,
    up: bool,
    ejected: bool,
    draining: bool,
    connections: u32,
}

impl Snapshot {
    /// The totals of every place and the state of every server of the config in force, as they are.
    fn read(shared: &Shared, now: SystemTime) -> Snapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let mut places: Vec<PlaceStats> = shared
            .sessions
            .all_totals()
            .iter()
            .map(|t| PlaceStats {
                listener: t.place.listener.clone(),
                route: t.place.route.clone(),
                upstream: t.place.upstream.clone(),
                server: t.place.server.clone(),
                active: t.active.load(Relaxed).max(0),
                sessions: t.sessions.load(Relaxed),
                bytes_in: t.bytes[0].load(Relaxed),
                bytes_out: t.bytes[1].load(Relaxed),
                messages_in: t.messages[0].load(Relaxed),
                messages_out: t.messages[1].load(Relaxed),
            })
            .collect();
        places.sort_by(|a, b| {
            (&a.listener, &a.route, &a.upstream, &a.server).cmp(&(&b.listener, &b.route, &b.upstream, &b.server))
        });
        let snapshot = shared.snapshot.load();
        let now_ms = crate::upstream::now_ms();
        let servers = snapshot
            .upstreams
            .iter()
            .flat_map(|u| {
                u.servers()
                    .iter()
                    .zip(&u.config.servers)
                    .map(|(state, config)| ServerStats {
                        upstream: u.config.name.clone(),
                        server: state.name.clone(),
                        up: !state.is_down(),
                        ejected: state.is_ejected(now_ms),
                        draining: state.draining(config),
                        connections: state.active(),
                    })
            })
            .collect();
        Snapshot {
            time: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            active: places.iter().map(|p| p.active).fold(0i64, i64::saturating_add),
            places,
            servers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LogFormat, Timeouts};
    use crate::live::{NewSession, PlaceRef};

    fn shared() -> Shared {
        let servers = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let config = Config::quick("127.0.0.1:0", &servers, Timeouts::default(), LogFormat::Text)
            .unwrap_or_else(|e| panic!("{e}"));
        Shared::for_tests(config)
    }

    fn session(id: u64, route: &str) -> NewSession<'_> {
        NewSession {
            id,
            client: std::net::IpAddr::from([127, 0, 0, 1]),
            identity: None,
            mode: "frames",
            place: PlaceRef {
                route,
                ..PlaceRef::default()
            },
        }
    }

    #[test]
    fn a_snapshot_sums_the_places_and_lists_every_server() {
        let shared = shared();
        let a = shared.sessions.start(session(1, "b"));
        let _b = shared.sessions.start(session(2, "a"));
        let _c = shared.sessions.start(session(3, "a"));
        drop(a);
        let snapshot = Snapshot::read(&shared, SystemTime::UNIX_EPOCH + Duration::from_millis(1500));
        assert_eq!(snapshot.time, 1500);
        assert_eq!(snapshot.active, 2);
        let routes: Vec<_> = snapshot
            .places
            .iter()
            .map(|p| (p.route.as_str(), p.active, p.sessions))
            .collect();
        assert_eq!(routes, [("a", 2, 2), ("b", 0, 1)], "sorted by place");
        assert_eq!(snapshot.servers.len(), 2);
        assert!(
            snapshot
                .servers
                .iter()
                .all(|s| s.up && !s.draining && s.connections == 0)
        );
    }

    /// A client that never reads: the first snapshot that cannot be written within the write timeout ends it.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_is_dropped() {
        let shared = shared();
        let _sessions: Vec<_> = (0..20)
            .map(|id| shared.sessions.start(session(id, &format!("route-{id}"))))
            .collect();
        let (_client, server) = tokio::io::duplex(64);
        let mut ws = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        let started = tokio::time::Instant::now();
        let ended = relay_snapshots(&mut ws, &shared, &CancellationToken::new()).await;
        assert!(matches!(ended, Ended::WriteTimeout), "{ended}");
        assert_eq!(started.elapsed(), WRITE_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_admin_listener_stopping_ends_the_socket() {
        let shared = shared();
        let (_client, server) = tokio::io::duplex(1 << 20);
        let mut ws = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            stopping.cancel();
        });
        let ended = relay_snapshots(&mut ws, &shared, &stop).await;
        assert!(matches!(ended, Ended::Stopped), "{ended}");
    }

    #[test]
    fn the_page_inlines_its_script_and_style_and_the_policy_allows_exactly_them() {
        let page = page();
        let html = std::str::from_utf8(&page.html).unwrap_or_default();
        assert!(html.contains(PAGE_JS) && html.contains(PAGE_CSS));
        assert!(!html.contains("/*SCRIPT*/") && !html.contains("/*STYLE*/"));
        assert!(html.contains("id=\"sessions-active\""));
        let csp = page.csp.to_str().unwrap_or_default();
        assert!(
            csp.contains(&csp_hash(PAGE_JS)) && csp.contains(&csp_hash(PAGE_CSS)),
            "{csp}"
        );
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
    }

    #[test]
    fn the_query_token_is_percent_decoded_and_plus_stays_a_plus() {
        assert_eq!(query_token("a=1&token=s%2Fe+c").as_deref(), Some("s/e+c"));
        assert_eq!(query_token("tokens=x"), None);
        assert_eq!(query_token("token=%zz"), None);
    }

    #[test]
    fn keys_are_16_bytes_of_base64() {
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!valid_key(b"not base64 at all!!!!!!!"));
    }

    #[test]
    fn an_origin_must_name_the_host_asked() {
        let headers = |origin: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9090"));
            if let Some(o) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_static(o));
            }
            h
        };
        assert!(same_origin(&headers(None)));
        assert!(same_origin(&headers(Some("http://127.0.0.1:9090"))));
        assert!(!same_origin(&headers(Some("https://evil.example"))));
        assert!(!same_origin(&headers(Some("null"))));
    }
}
