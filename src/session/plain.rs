//! Plain HTTP (no upgrade) on a client connection, through hyper: keep-alive with the client, bodies streamed
//! both ways, the same header rules as the upgrade path. Each client connection keeps one backend connection
//! for its requests, opened on the first and replaced when the backend closes it.
//!
//! A WebSocket upgrade that comes later on such a keep-alive connection (the first request of a connection takes
//! the fast path in [`super`]) is validated by the same rules, forwarded on a backend connection of its own
//! through hyper's upgrade path, and once both sides have switched, the raw sockets are taken back from hyper
//! and relayed like every other WebSocket, in the route's mode.
//!
//! A request refused here is a [`Refusal`] like on the upgrade path, answered by the same [`Refusal::answer`];
//! the connection stays open for the next request.
//!
//! Each request leaves its own access log line, written once hyper has flushed the whole answer to the client
//! (so that its bytes and duration include it); an upgrade's line is written when its session ends.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Refusal, failed_try, next_try, start_tries};
use crate::auth::{Admit, jwks};
use crate::config::{Deflate, Sticky};
use crate::conn::Conn;
use crate::http::handshake::{self, HandshakeError, Inspected, MAX_HEAD_BYTES, MAX_HEADERS, without_cookie};
use crate::http::headers::{drop_when_forwarding, has_token};
use crate::http::trace::Trace;
use crate::http::{Client, RequestView};
use crate::metrics::Metrics;
use crate::observe::{ConnectionRecord, RequestInfo};
use crate::route;
use crate::state::{Shared, Snapshot};
use crate::upstream::{Active, Choice, Upstream, UpstreamError};

type Body = Either<Incoming, Either<Full<Bytes>, crate::llm::http::Body>>;

/// Serves plain HTTP requests on `client` until it closes; `head` holds the bytes already read from it.
pub(super) async fn serve(
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    listener: SocketAddr,
    client: Conn,
    head: Vec<u8>,
    record: &mut ConnectionRecord,
) {
    let handshake_timeout = snapshot.config.server.handshake_timeout;
    let redirect_https = snapshot.listener(listener).and_then(|l| l.redirect_https);
    // Every line of the connection is written from here, even when a forced close at shutdown drops this future
    // (see `Drop for State` and `Unwritten`): the session writes none of its own.
    record.written = true;
    let state = Arc::new(State {
        proto: if client.is_tls() { "https" } else { "http" },
        redirect_https,
        id: record.id,
        shared: shared.clone(),
        snapshot,
        listener,
        client_ip: record.client.ip(),
        peer: record.client,
        proxy: record.proxy,
        started: Instant::now(),
        backend: Mutex::new(None),
        switched: Mutex::new(None),
        stats: Stats::default(),
        current: Mutex::new(None),
        answered: AtomicBool::new(false),
    });
    let io = TokioIo::new(Counted {
        prefix: head,
        read_from_prefix: 0,
        inner: client,
        stats: state.clone(),
    });
    let service = {
        let state = state.clone();
        hyper::service::service_fn(move |req| forward(state.clone(), req))
    };
    // Header names keep the case they were sent in, both ways (as the upgrade path passes heads on); names without
    // one, as in wsgate's own answers, are written in title case, as the upgrade path writes them. Later requests
    // on the connection are read by hyper alone, with the upgrade path's limits on a head.
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES)
        .preserve_header_case(true)
        .title_case_headers(true)
        .header_read_timeout(handshake_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    // On shutdown a keep-alive connection is closed gracefully: at once when idle, else after the answer in flight,
    // which goes out with `Connection: close`.
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shared.draining.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    let current = state.current.lock().await.take();
    let switched = state.switched.lock().await.take();
    if let Some(switched) = switched {
        // The upgrade was the connection's last request: its line is the session's, written however it ends.
        let mut line = Unwritten {
            state: &state,
            current: Some(current.unwrap_or_else(|| state.untracked())),
        };
        if let Some(current) = line.current.as_mut() {
            match relay_upgraded(switched, &shared, &state.snapshot, listener, &mut current.record).await {
                Ok(end) => super::note_relay_end(&mut current.record, &end),
                Err(why) => current.record.end = why,
            }
        }
        return;
    }
    match (current, result) {
        // The connection ended before the answer was flushed to the client, or before there was one.
        (Some(mut current), Err(e)) => {
            current.record.end = format!("error: client: {e}");
            state.write_line(current);
        }
        (Some(mut current), Ok(())) => {
            if current.record.end.is_empty() {
                current.record.end = "client closed before the answer".into();
            }
            state.write_line(current);
        }
        // A connection closed while idle, after its requests: nothing to say.
        (None, Ok(())) => {}
        (None, Err(e)) if e.is_timeout() && state.stats.requests.load(Ordering::Relaxed) > 0 => {}
        // A head hyper could not read, or a client error between requests: a line of the connection's own.
        (None, Err(e)) => {
            let mut failed = state.untracked();
            failed.started = state.started;
            failed.record.end = format!("error: client: {e}");
            state.write_line(failed);
        }
    }
}

/// A WebSocket upgrade accepted on a keep-alive connection: the client's side as hyper will hand it over, and the
/// backend's side already switched.
struct Upgrading {
    client: hyper::upgrade::OnUpgrade,
    route: usize,
    server: Active,
    backend: Conn,
    /// Bytes the backend sent after its 101 that hyper had already read.
    backend_early: Bytes,
    /// The backend accepted permessage-deflate.
    deflate: bool,
    /// What the route's authentication holds for the session's life.
    auth: Option<Box<super::AuthHeld>>,
    /// The request's client (a trusted proxy's forwarded client, when there is one).
    client_ip: std::net::IpAddr,
}

/// Takes the client's socket back from hyper and relays the switched connection: how the relay ended, or why it
/// could not start.
async fn relay_upgraded(
    switched: Upgrading,
    shared: &Shared,
    snapshot: &Snapshot,
    listener: SocketAddr,
    record: &mut ConnectionRecord,
) -> Result<crate::relay::End, String> {
    let Upgrading {
        client,
        route: route_index,
        server,
        backend,
        backend_early,
        deflate,
        auth,
        client_ip,
    } = switched;
    let upgraded = match client.await {
        Ok(upgraded) => upgraded,
        Err(e) => return Err(format!("error: client: upgrade not completed: {e}")),
    };
    let Ok(parts) = upgraded.downcast::<TokioIo<Counted>>() else {
        return Err("error: client: upgraded connection of an unexpected type".into());
    };
    let Counted {
        prefix,
        read_from_prefix,
        inner: client,
        ..
    } = parts.io.into_inner();
    // What the prefix and hyper's read buffer still hold of the client's WebSocket stream, and what hyper read
    // after the backend's 101, go first, through the relay like every other byte.
    let client_early = [prefix.get(read_from_prefix..).unwrap_or_default(), &parts.read_buf[..]].concat();
    let mut switched = super::Switched {
        client,
        backend,
        route: route_index,
        active: server,
        deflate,
        early: super::early(client_early, &backend_early),
        auth,
        client_ip,
    };
    Ok(super::relay_switched(shared, snapshot, listener, &mut switched, record.id, &mut record.bytes).await)
}

/// What a forced close at shutdown (the drain timeout) says of a line it cuts short.
const FORCED_END: &str = "closed: drain timeout reached during shutdown";

/// A line that is written when this is dropped: at the end of its session, or when a forced close at shutdown
/// drops the session's future first.
struct Unwritten<'a> {
    state: &'a State,
    current: Option<Box<Current>>,
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if let Some(mut current) = self.current.take() {
            if current.record.end.is_empty() {
                current.record.end = FORCED_END.into();
                if current.record.status == 101 {
                    current.record.bytes.close_first = Some("proxy");
                }
            }
            self.state.write_line(current);
        }
    }
}

impl Drop for State {
    /// A request still in flight when a forced close at shutdown drops the connection gets its line.
    fn drop(&mut self) {
        if let Some(mut current) = self.current.get_mut().take() {
            if current.record.end.is_empty() {
                current.record.end = FORCED_END.into();
            }
            self.write_line(current);
        }
    }
}

struct State {
    /// The connection's id, for log lines.
    id: u64,
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    /// The configured address of the listener that accepted the connection.
    listener: SocketAddr,
    /// Where the connection comes from (the TCP peer or a PROXY protocol source); a request's client may be
    /// another, named by a trusted proxy.
    client_ip: IpAddr,
    /// The same with its port, and the PROXY protocol peer: every line of the connection names them.
    peer: SocketAddr,
    proxy: Option<SocketAddr>,
    /// When hyper took the connection over.
    started: Instant,
    /// How the client reached wsgate: `http` or `https`.
    proto: &'static str,
    /// A plain listener that sends every request to https on this port.
    redirect_https: Option<u16>,
    backend: Mutex<Option<Backend>>,
    /// Set when a WebSocket upgrade was accepted: served once hyper hands the connection back.
    switched: Mutex<Option<Upgrading>>,
    stats: Stats,
    /// The request being served, until its access log line is written (none while the access log is off).
    current: Mutex<Option<Box<Current>>>,
    /// The current request's answer went to hyper whole: its line is written at the connection's next flush.
    answered: AtomicBool,
}

/// A request being served, for its access log line.
struct Current {
    record: ConnectionRecord,
    started: Instant,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU32,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// `bytes_in` and `bytes_out` when the last line was written: a request's bytes are those since.
    logged_in: AtomicU64,
    logged_out: AtomicU64,
}

/// The client connection's backend connection for plain requests.
struct Backend {
    /// Index of the upstream in the session's snapshot.
    upstream: usize,
    server: Active,
    sender: SendRequest<Incoming>,
    /// Servers tried to open it.
    tries: usize,
}

/// A plain request's route, seen through hyper.
struct HyperView<'a>(&'a Request<Incoming>);

impl RequestView for HyperView<'_> {
    /// The target's authority when it came in absolute form (it replaces `Host`, RFC 9112 §3.2.2), else `Host`.
    fn host(&self) -> Option<&[u8]> {
        match self.0.uri().authority() {
            Some(authority) => Some(authority.as_str().as_bytes()),
            None => self.0.headers().get(HOST).map(HeaderValue::as_bytes),
        }
    }
    fn target(&self) -> &[u8] {
        self.0.uri().path_and_query().map_or(b"/", |p| p.as_str().as_bytes())
    }
    fn header_values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        self.0.headers().get_all(name).iter().map(HeaderValue::as_bytes)
    }
}

/// Where a plain request goes: to an upstream, or to the LLM gateway (an `llm` route, by its index).
enum Routed {
    Upstream(Target),
    Llm(usize),
}

/// Where a plain request to an upstream goes: its route and upstream (indexes in the snapshot) and the server
/// choice.
#[derive(Clone, Copy)]
struct Target {
    route: usize,
    upstream: usize,
    choice: Choice,
}

impl State {
    /// The request's route and server choice, or why it may not have one: no route (404), or the route's address
    /// rules or, for an `upgrade`, its allowed origins (403).
    fn target(&self, req: &Request<Incoming>, client: &Client, upgrade: bool) -> Result<Routed, Refusal> {
        let view = HyperView(req);
        if let Some(port) = self.redirect_https {
            return Err(Refusal::to_https(&view, port));
        }
        let routes = &self.snapshot.config.routes;
        let Some(route) = route::find(routes, self.snapshot.listener_name(self.listener), &view) else {
            return Err(Refusal::no_route(&view));
        };
        Refusal::check_route(route, client.ip, upgrade.then_some(&view))?;
        let index = routes.iter().position(|r| std::ptr::eq(r, route)).unwrap_or(0);
        let Some(upstream_index) = route.upstream else {
            if upgrade {
                return Err(Refusal::NoUpgrade {
                    path: super::refusal::echoed_path(&view),
                });
            }
            return Ok(Routed::Llm(index));
        };
        let upstream = &self.snapshot.upstreams[upstream_index];
        Ok(Routed::Upstream(Target {
            route: index,
            upstream: upstream_index,
            choice: upstream.choose(&view, client.ip),
        }))
    }

    /// A request of an `llm` route, served by the LLM gateway.
    async fn llm(
        self: &Arc<Self>,
        route: usize,
        req: Request<Incoming>,
        client: &Client,
        trace: Trace,
    ) -> Response<Answer> {
        self.note(|record| {
            record.route = Some(route);
            record.forwarded_for = (client.ip != client.peer).then_some(client.ip);
            record.trace_id = Some(trace.trace_id);
        })
        .await;
        let response = match &self.snapshot.config.llm {
            Some(settings) => crate::llm::http::serve(&self.shared.llm, settings, &self.shared.metrics, req).await,
            // A config with an `llm` route has an [llm] section: `check` refuses one without.
            None => crate::llm::http::ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_url",
                "no LLM gateway here",
            )
            .response(),
        };
        self.note_answer(response.status().as_u16()).await;
        let state = self.clone();
        response.map(|body| Answer {
            body: Either::Right(Either::Right(body)),
            state,
            done: false,
        })
    }

    /// A request's client: the connection's peer, or the client a trusted proxy's headers name.
    fn client(&self, req: &Request<Incoming>) -> Client {
        let Some(listener) = self.snapshot.listener(self.listener) else {
            return Client::direct(self.client_ip);
        };
        let headers = req.headers().iter();
        let client = Client::of(
            self.client_ip,
            &listener.trusted_proxies,
            headers.map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
        );
        if let Some(entry) = &client.ignored {
            tracing::debug!(id = self.id, entry = %entry, "forwarding chain entry naming no address passed over");
        }
        client
    }

    /// The route's authentication of a request: what it is admitted as (`None` on a route without), or the
    /// refusal. A token naming a key id the route's key set lacks has the set fetched again (when not too
    /// recently) and the request checked once more.
    async fn authenticate(
        &self,
        target: Target,
        req: &Request<Incoming>,
        upgrade: bool,
    ) -> Result<Option<Admit>, Refusal> {
        let route = &self.snapshot.config.routes[target.route];
        let view = HyperView(req);
        match Refusal::check_auth(route, &view, upgrade) {
            Err(refusal) => match refusal.jwks_refresh() {
                Some(remote) if remote.refresh(jwks::UNKNOWN_KID_REFRESH).await => {
                    Refusal::check_auth(route, &view, upgrade)
                }
                _ => Err(refusal),
            },
            admitted => admitted,
        }
    }

    /// A record of the connection's own, for a line no request is being served for.
    fn untracked(&self) -> Box<Current> {
        let mut record = ConnectionRecord::new(self.id, self.peer);
        record.proxy = self.proxy;
        Box::new(Current {
            record,
            started: Instant::now(),
        })
    }

    /// A request starts: its line is begun (when the access log is on). A line still waiting for its flush is
    /// written first.
    async fn begin(&self, req: &Request<Incoming>, websocket: bool) {
        if !self.shared.access_log.enabled() {
            return;
        }
        let view = HyperView(req);
        let mut request = RequestInfo::new(
            req.method().as_str().as_bytes(),
            view.target(),
            view.host(),
            req.headers().get(USER_AGENT).map(HeaderValue::as_bytes),
            &self.snapshot.config.server.access_log_redact,
        );
        request.websocket = websocket;
        let mut current = self.untracked();
        current.record.request = Some(request);
        let waiting = self.current.lock().await.replace(current);
        if let Some(waiting) = waiting {
            // A pipelined request came before the last answer's flush: that answer's line is written now, and the
            // next flush is not taken for this request's.
            self.answered.store(false, Ordering::Relaxed);
            self.write_line(waiting);
        }
    }

    /// Notes something of the current request for its line.
    async fn note(&self, what: impl FnOnce(&mut ConnectionRecord)) {
        if let Some(current) = self.current.lock().await.as_mut() {
            what(&mut current.record);
        }
    }

    /// Notes a new request's route and upstream (none for a request without a route), its client and its trace,
    /// for the access log line.
    async fn note_target(&self, target: Option<Target>, client: &Client, trace: Trace) {
        self.note(|record| {
            record.route = target.map(|t| t.route);
            record.upstream = target.map(|t| t.upstream);
            record.forwarded_for = (client.ip != client.peer).then_some(client.ip);
            record.trace_id = Some(trace.trace_id);
        })
        .await;
    }

    /// Notes the server the request goes to.
    async fn note_server(&self, server: SocketAddr) {
        self.note(|record| record.server = Some(server)).await;
    }

    /// Notes who the route's authentication admitted the request as.
    async fn note_identity(&self, admit: Option<&Admit>) {
        if let Some(subject) = admit.and_then(|a| a.subject.clone()) {
            self.note(|record| {
                if let Some(request) = record.request.as_deref_mut() {
                    request.identity = Some(subject);
                }
            })
            .await;
        }
    }

    /// Notes the status of the answer going out, and how the request ended unless that is said already.
    async fn note_answer(&self, status: u16) {
        self.note(|record| {
            record.status = status;
            let websocket = record.request.as_ref().is_some_and(|r| r.websocket);
            if record.end.is_empty() && status != 101 {
                record.end = if websocket {
                    format!("backend answered {status} to the upgrade")
                } else {
                    "answered".into()
                };
            }
        })
        .await;
    }

    /// The connection has flushed what hyper wrote: the line of a request whose whole answer it holds is written
    /// (a switched upgrade's waits for its session to end).
    fn flushed(&self) {
        let Ok(mut current) = self.current.try_lock() else {
            // Not reachable (hyper polls the service and the connection on one task, and no lock is held across an
            // await); the line is written at the end of the connection then.
            return;
        };
        if current.as_ref().is_some_and(|c| c.record.status != 101)
            && let Some(done) = current.take()
        {
            drop(current);
            self.write_line(done);
        }
    }

    /// Writes a request's line (or the connection's own); its bytes are those since the last line, unless it is a
    /// relayed session, whose relay counted them.
    fn write_line(&self, mut current: Box<Current>) {
        let stats = &self.stats;
        let (bytes_in, bytes_out) = (
            stats.bytes_in.load(Ordering::Relaxed),
            stats.bytes_out.load(Ordering::Relaxed),
        );
        let record = &mut current.record;
        if record.status != 101 {
            record.bytes.client_to_backend = bytes_in.saturating_sub(stats.logged_in.swap(bytes_in, Ordering::Relaxed));
            record.bytes.backend_to_client =
                bytes_out.saturating_sub(stats.logged_out.swap(bytes_out, Ordering::Relaxed));
        }
        let log = &self.shared.access_log;
        if log.enabled()
            && let Some(kind) = record.kind()
        {
            let listener = self.snapshot.listener_name(self.listener);
            log.write(record.line(kind, listener, current.started.elapsed(), &self.snapshot.config));
        }
    }

    /// The answer to a refused request, with a log line that says why (the answer itself names nothing internal):
    /// at debug level for what the client caused, which a client may cause many times over.
    async fn refused(&self, refusal: Refusal, upgrade: bool) -> Response<Body> {
        if let Refusal::Upstream { error, .. } = &refusal
            && let Some(server) = error.server()
        {
            self.note_server(server).await;
        }
        self.note(|record| record.end = format!("{}{refusal}", crate::observe::REFUSED))
            .await;
        let answer = refusal.answer();
        self.shared
            .metrics
            .rejected(refusal.metric_reason(), upgrade, answer.status);
        if refusal.by_client() {
            tracing::debug!(id = self.id, status = answer.status, reason = %refusal, "plain request refused");
        } else {
            tracing::info!(id = self.id, status = answer.status, reason = %refusal, "plain request refused");
        }
        answer.to_response().map(|b| Either::Right(Either::Left(b)))
    }

    fn upstream(&self, target: Target) -> &Upstream {
        &self.snapshot.upstreams[target.upstream]
    }
}

/// Removes the sticky cookie from a request forwarded to the backend (unless the upstream keeps it).
fn remove_sticky_cookie(req: &mut Request<Incoming>, upstream: &Upstream) {
    let Some(Sticky::Cookie(c)) = &upstream.config.sticky else {
        return;
    };
    if c.forward_cookie {
        return;
    }
    let headers = req.headers_mut();
    let kept: Vec<HeaderValue> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .map(|v| without_cookie(v.as_bytes(), &c.name))
        .filter(|v| !v.is_empty())
        .filter_map(|v| HeaderValue::from_bytes(&v).ok())
        .collect();
    headers.remove(http::header::COOKIE);
    for v in kept {
        headers.append(http::header::COOKIE, v);
    }
}

/// Adds the sticky cookie to an answer when the client is not stuck to the server that gave it.
fn add_sticky_cookie<B>(resp: &mut Response<B>, upstream: &Upstream, choice: Choice, server: &Active) {
    if let Some(cookie) = upstream.sticky_cookie(choice, server.server())
        && let Ok(value) = HeaderValue::from_str(&cookie)
    {
        resp.headers_mut().append(http::header::SET_COOKIE, value);
    }
}

/// What hyper lets through and the upgrade path refuses, so that routing and the backend read the request alike:
/// its body framing (hyper already refuses a coding other than a final `chunked` and different or malformed
/// `Content-Length` values, and reads `Content-Length` with `Transfer-Encoding` as chunked, dropping the length),
/// more than one `Host` or none in HTTP/1.1 (routing reads one, a backend may read another), user information in
/// an absolute-form target, and dot segments in the path.
fn check_head(req: &Request<Incoming>) -> Result<(), Refusal> {
    let values = |name| req.headers().get_all(name).into_iter().map(HeaderValue::as_bytes);
    handshake::request_framing(values(TRANSFER_ENCODING), values(CONTENT_LENGTH))?;
    let hosts = req.headers().get_all(HOST).iter().count();
    if hosts > 1 || (hosts == 0 && req.version() == http::Version::HTTP_11 && req.uri().authority().is_none()) {
        return Err(HandshakeError::Malformed("a request needs exactly one Host header").into());
    }
    if req.uri().authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(HandshakeError::Malformed("absolute request target with user information").into());
    }
    handshake::check_path(req.uri().path().as_bytes())?;
    Ok(())
}

async fn forward(state: Arc<State>, mut req: Request<Incoming>) -> Result<Response<Answer>, Infallible> {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let wants_websocket = req
        .headers()
        .get_all(UPGRADE)
        .iter()
        .any(|v| has_token(v.as_bytes(), "websocket"));
    state.begin(&req, wants_websocket).await;
    let client = state.client(&req);
    let trace = {
        let mut values = req.headers().get_all("traceparent").iter();
        match (values.next(), values.next()) {
            (Some(value), None) => Trace::of(Some(value.as_bytes())),
            _ => Trace::of(None),
        }
    };
    let target = match check_head(&req).and_then(|()| state.target(&req, &client, wants_websocket)) {
        Ok(Routed::Llm(route)) => return Ok(state.llm(route, req, &client, trace).await),
        Ok(Routed::Upstream(target)) => Ok(target),
        Err(refusal) => Err(refusal),
    };
    state.note_target(target.as_ref().ok().copied(), &client, trace).await;
    let admitted = match target {
        Err(refusal) => Err(refusal),
        Ok(target) => state
            .authenticate(target, &req, wants_websocket)
            .await
            .map(|admit| (target, admit)),
    };
    if let Ok((_, admit)) = &admitted {
        state.note_identity(admit.as_ref()).await;
    }
    let result = match admitted {
        // A failed credential on an upgrade costs a handshake of the client's rate too.
        Err(refusal @ Refusal::Unauthorized { .. }) if wants_websocket => {
            Err(
                super::handshake_rate(&state.shared, &state.snapshot, state.listener, client.ip)
                    .err()
                    .unwrap_or(refusal),
            )
        }
        Err(refusal) => Err(refusal),
        Ok((target, admit)) if wants_websocket => upgrade(&state, target, &client, admit, &trace, req).await,
        Ok((target, admit)) => {
            rewrite_request(&mut req, &client, state.proto, &trace);
            if let Some(admit) = &admit {
                admit.rewrite(&mut req);
            }
            remove_sticky_cookie(&mut req, state.upstream(target));
            send(&state, target, req).await.map(|mut resp| {
                strip_hop_by_hop(resp.headers_mut(), false);
                resp.map(Either::Left)
            })
        }
    };
    let response = match result {
        Ok(response) => response,
        Err(refusal) => state.refused(refusal, wants_websocket).await,
    };
    state.note_answer(response.status().as_u16()).await;
    let state = state.clone();
    Ok(response.map(|body| Answer {
        body,
        state,
        done: false,
    }))
}

/// An answer's body on its way to the client. When it ends, or when hyper drops it (sent, not needed, or given
/// up), the request's line waits for the connection's next flush, so that its bytes and duration include the
/// whole answer.
struct Answer {
    body: Body,
    state: Arc<State>,
    done: bool,
}

impl Answer {
    fn finish(&mut self, failed: Option<String>) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(failed) = failed
            && let Ok(mut current) = self.state.current.try_lock()
            && let Some(current) = current.as_mut()
        {
            current.record.end = failed;
        }
        self.state.answered.store(true, Ordering::Relaxed);
    }
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = <Body as hyper::body::Body>::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(None),
            Poll::Ready(Some(Err(e))) => {
                let failed = format!("{}backend: the answer's body broke off: {e}", crate::observe::ERROR);
                self.finish(Some(failed));
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// A WebSocket upgrade on a keep-alive connection: validated by the fast path's rules, sent on a backend
/// connection of its own; on a 101 with the right accept key, both sides are switched and the session relays
/// them when hyper hands the client's connection back.
async fn upgrade(
    state: &State,
    target: Target,
    client: &Client,
    admit: Option<Admit>,
    trace: &Trace,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let started = tokio::time::Instant::now();
    // A malformed upgrade costs no handshake of the limits (nor a round trip to Redis).
    let accept = match handshake::inspect_request(&request_head(&req), state.client_ip, "http")? {
        Inspected::Upgrade(up) => up.accept,
        Inspected::Plain { .. } | Inspected::Partial => {
            return Err(HandshakeError::Malformed("malformed upgrade request").into());
        }
    };
    let auth = super::admit_upgrade(
        &state.shared,
        &state.snapshot,
        state.listener,
        client.ip,
        target.route,
        admit.as_ref(),
    )
    .await?;
    let client_side = hyper::upgrade::on(&mut req);
    rewrite_request(&mut req, client, state.proto, trace);
    if let Some(admit) = &admit {
        admit.rewrite(&mut req);
    }
    let upstream = state.upstream(target);
    remove_sticky_cookie(&mut req, upstream);
    let strip = state.snapshot.config.routes[target.route].deflate == Deflate::Strip;
    let headers = req.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if strip {
        headers.remove(handshake::EXTENSIONS);
    }
    let Backend {
        server: active,
        mut sender,
        tries,
        ..
    } = open(upstream, target, &state.shared.metrics).await?;
    let server = active.server().address;
    state.note_server(server).await;
    let refused = |error| Refusal::upstream(error, tries);
    let wait = state.snapshot.config.server.handshake_timeout;
    let mut resp = match tokio::time::timeout(wait, sender.send_request(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(failed_exchange(server, e, tries)),
        Err(_) => return Err(refused(UpstreamError::AnswerTimeout { server, after: wait })),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        state.shared.metrics.backend_refused(resp.status().as_u16());
        strip_hop_by_hop(resp.headers_mut(), false);
        return Ok(resp.map(Either::Left));
    }
    let mut accepts = resp.headers().get_all("sec-websocket-accept").iter();
    if !matches!((accepts.next(), accepts.next()), (Some(a), None) if a.as_bytes() == accept) {
        let reason = handshake::ResponseError::BadAccept.to_string();
        return Err(refused(UpstreamError::BadAnswer { server, reason }));
    }
    let lost = |source| refused(UpstreamError::Lost { server, source });
    let backend_side = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| lost(io::Error::other(e)))?;
    let Ok(parts) = backend_side.downcast::<TokioIo<Conn>>() else {
        return Err(lost(io::Error::other(
            "upgraded backend connection of an unexpected type",
        )));
    };
    let deflate = handshake::negotiates_deflate(
        resp.headers()
            .get_all(handshake::EXTENSIONS)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let extensions = handshake::accepts_extensions(
        resp.headers()
            .get_all(handshake::EXTENSIONS)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    if strip && extensions {
        let reason = handshake::ResponseError::ExtensionNotOffered.to_string();
        return Err(refused(UpstreamError::BadAnswer { server, reason }));
    }
    add_sticky_cookie(&mut resp, upstream, target.choice, &active);
    state
        .note(|record| {
            if let Some(request) = record.request.as_deref_mut() {
                request.switched(|name| resp.headers().get_all(name).iter().map(HeaderValue::as_bytes));
            }
        })
        .await;
    *state.switched.lock().await = Some(Upgrading {
        deflate,
        client: client_side,
        route: target.route,
        server: active,
        backend: parts.io.into_inner(),
        backend_early: parts.read_buf,
        auth,
        client_ip: client.ip,
    });
    let (head, _) = resp.into_parts();
    state.shared.metrics.handshake_took(started.elapsed());
    Ok(Response::from_parts(
        head,
        Either::Right(Either::Left(Full::new(Bytes::new()))),
    ))
}

/// A request exchange with `server` that hyper gave up on, after `tries` servers: the client's own request body
/// failing is the client's doing; an answer hyper could not parse is a bad answer; anything else a lost connection.
fn failed_exchange(server: SocketAddr, e: hyper::Error, tries: usize) -> Refusal {
    let error = if e.is_user() {
        return Refusal::ClientBody(e.to_string());
    } else if e.is_parse() || e.is_parse_status() {
        UpstreamError::BadAnswer {
            server,
            reason: e.to_string(),
        }
    } else {
        UpstreamError::Lost {
            server,
            source: io::Error::other(e),
        }
    };
    Refusal::upstream(error, tries)
}

/// The request head as the client sent it, for the fast path's validation.
fn request_head(req: &Request<Incoming>) -> Vec<u8> {
    let version = match req.version() {
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/?",
    };
    let mut head = format!("{} {} {version}\r\n", req.method(), req.uri()).into_bytes();
    for (name, value) in req.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Sends `req` on the client's backend connection, opening one when there is none, when the last one was closed
/// by the backend before this request went out, or when it goes to another upstream or to a server other than
/// the one the request is stuck or hashed to.
async fn send(state: &State, target: Target, mut req: Request<Incoming>) -> Result<Response<Incoming>, Refusal> {
    let upstream = state.upstream(target);
    let mut backend = state.backend.lock().await;
    let mut reopened = false;
    loop {
        let preferred = upstream.preferred(target.choice);
        let fits = backend.as_ref().is_some_and(|b| {
            b.upstream == target.upstream
                && upstream.takes_new(b.server.server())
                && preferred.is_none_or(|i| {
                    upstream
                        .servers()
                        .get(i)
                        .is_some_and(|s| std::ptr::eq(&**s, b.server.server()))
                })
        });
        let ready = match backend.as_mut() {
            Some(b) if fits => b.sender.ready().await.is_ok(),
            _ => false,
        };
        if !ready {
            *backend = None;
            *backend = Some(open(upstream, target, &state.shared.metrics).await?);
            reopened = true;
        }
        let Some(b) = backend.as_mut() else {
            continue;
        };
        let server = b.server.server().address;
        state.note_server(server).await;
        // Servers tried for this request: those tried to open the connection, or the one it reuses.
        let tries = if reopened { b.tries } else { 1 };
        match b.sender.try_send_request(req).await {
            Ok(mut resp) => {
                add_sticky_cookie(&mut resp, upstream, target.choice, &b.server);
                return Ok(resp);
            }
            Err(mut e) => {
                *backend = None;
                match e.take_message() {
                    // Never sent: the backend closed its idle connection under us; one fresh try.
                    Some(unsent) if !reopened => req = unsent,
                    _ => return Err(failed_exchange(server, e.into_error(), tries)),
                }
            }
        }
    }
}

/// Opens a backend connection for plain HTTP: servers tried in turn as the upstream's retries allow.
async fn open(upstream: &Upstream, target: Target, metrics: &Metrics) -> Result<Backend, Refusal> {
    let mut attempts = start_tries(upstream, target.choice)?;
    loop {
        let (i, active) = next_try(&mut attempts)?;
        let server = active.server().address;
        let connecting = tokio::time::Instant::now();
        let error = match upstream.connect(active.server()).await {
            Err(e) => e,
            Ok(stream) => match client_handshake(stream).await {
                Ok((sender, conn)) => {
                    // The connection task ends when `sender` is dropped with the client's session, or when the
                    // backend closes it.
                    tokio::spawn(conn.with_upgrades());
                    metrics.connect_took(connecting.elapsed());
                    metrics.retried((attempts.tries() as u64).saturating_sub(1));
                    return Ok(Backend {
                        upstream: target.upstream,
                        server: active,
                        sender,
                        tries: attempts.tries(),
                    });
                }
                Err(e) => UpstreamError::Lost {
                    server,
                    source: io::Error::other(e),
                },
            },
        };
        failed_try(&mut attempts, i, error)?;
    }
}

/// Starts HTTP/1.1 on a backend connection: header names keep the case the client sent (those wsgate adds are in
/// title case, as on the upgrade path), and the answer's keep theirs.
async fn client_handshake(
    stream: Conn,
) -> hyper::Result<(
    SendRequest<Incoming>,
    hyper::client::conn::http1::Connection<TokioIo<Conn>, Incoming>,
)> {
    hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(true)
        .handshake(TokioIo::new(stream))
        .await
}

/// The request as the backend gets it: in origin form, a target's authority as its `Host` (RFC 9112 §3.2.2),
/// hop-by-hop headers out, forwarding headers (for `client`) in, and `trace`'s `traceparent` (the client's
/// `tracestate` kept only with a trace it continues).
fn rewrite_request(req: &mut Request<Incoming>, client: &Client, proto: &'static str, trace: &Trace) {
    let authority = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    if let Some(authority) = authority {
        let origin_form = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if let Ok(uri) = origin_form.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
        req.headers_mut().insert(HOST, authority);
    }
    *req.version_mut() = http::Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, true);
    let host = headers.get(HOST).cloned();
    let mut added = Vec::with_capacity(5);
    client
        .forwarding(proto, host.as_ref().map(HeaderValue::as_bytes))
        .each(|name, value| {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                added.push((name, value));
            }
        });
    for (name, value) in added {
        headers.append(name, value);
    }
    headers.remove("traceparent");
    if !trace.continued {
        headers.remove("tracestate");
    }
    if let Ok(value) = HeaderValue::from_str(&trace.header()) {
        headers.insert("traceparent", value);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap, is_request: bool) {
    let connection: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
    let drop: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| {
            drop_when_forwarding(
                name.as_str().as_bytes(),
                connection.iter().map(HeaderValue::as_bytes),
                is_request,
            )
        })
        .cloned()
        .collect();
    for name in drop {
        headers.remove(name);
    }
}

/// The client connection as hyper sees it: first the bytes wsgate already read while looking for an upgrade,
/// then the socket; bytes counted both ways for the access log.
struct Counted {
    prefix: Vec<u8>,
    read_from_prefix: usize,
    inner: Conn,
    stats: Arc<State>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.read_from_prefix < this.prefix.len() {
            let rest = &this.prefix[this.read_from_prefix..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read_from_prefix += n;
            if this.read_from_prefix == this.prefix.len() {
                this.prefix = Vec::new();
                this.read_from_prefix = 0;
            }
            this.stats.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.stats.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.stats.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.stats.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) && self.stats.answered.swap(false, Ordering::Relaxed) {
            self.stats.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
