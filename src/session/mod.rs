//! The per-connection pipeline. [`session`] reads like the data path: read and validate the request head,
//! pick and connect a backend server, forward the head, check the answer, then relay; or hand a plain HTTP
//! request to [`plain`]. Each step is a module of its own; this one only passes what one step found to the next,
//! and every refusal of either path is a [`Refusal`] answered from one place.

mod plain;
mod refusal;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::config::{self, Deflate, Listener, Sticky, TrustedProxies};
use crate::conn::Conn;
use crate::http::handshake::{self, BackendAnswer, BodyEnd, MAX_HEAD_BYTES, Omit, Parsed, ResponseError, UpgradeHead};
use crate::http::trace::Trace;
use crate::http::{Client, RequestView};
use crate::live::{LiveSession, NewSession, PlaceRef};
use crate::metrics::Metrics;
use crate::observe::{ConnectionRecord, RequestInfo};
use crate::otlp::SpanStart;
use crate::policy::{Admitted, KeyAdmitted};
use crate::proxy_protocol::{self, Header, ReadError as ProxyReadError};
use crate::relay;
use crate::route;
use crate::state::{Shared, Snapshot};
use crate::tls::server::ServerTls;
use crate::upstream::{self, Active, Attempts, Upstream, UpstreamError};
use refusal::{Refusal, echoed_path};

/// A client connection just accepted.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub id: u64,
    /// The configured address of the listener that accepted it (routes may be limited to one listener).
    pub listener: SocketAddr,
}

/// Serves one client connection from accept to close, and writes its access log line (a plain HTTP connection
/// writes one per request instead).
///
/// Everything before the relay (the handshake, or a whole plain HTTP connection or refusal) runs in a future of
/// its own on the heap, freed before the relay starts: the task of a long-lived session keeps only what relaying
/// needs, which is most of the memory an idle session costs.
pub fn session(shared: Arc<Shared>, accepted: Accepted) -> impl Future<Output = ()> + Send {
    // Made here, not in the async block: what the block captures it keeps for the task's whole life.
    let front = Box::pin(front(shared, accepted));
    async move {
        let mut opened = front.await;
        // Run in place: a binding of its own would be stored beside it.
        if let Some(relaying) = &mut opened {
            relaying.run().await;
        }
    }
}

/// A WebSocket session switched on both sides, with what its end needs (its access log record, its admission).
struct Relaying {
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    record: Box<ConnectionRecord>,
    started: Instant,
    listener: SocketAddr,
    /// Counted against the connection limits for as long as the connection lives.
    _admitted: Admitted,
    switched: Switched,
}

impl Relaying {
    /// Relays, then writes the session's line. By reference: the task stores the session once.
    async fn run(&mut self) {
        let record = &mut *self.record;
        let end = relay_switched(
            &self.shared,
            &self.snapshot,
            self.listener,
            &mut self.switched,
            record.id,
            &mut record.bytes,
        )
        .await;
        note_relay_end(record, &end);
        finish(
            &self.shared,
            &self.snapshot,
            record,
            self.listener,
            self.started.elapsed(),
        );
    }
}

/// The connection up to the relay: `Some` for a WebSocket session to relay; `None` when it is done, its line
/// written.
async fn front(shared: Arc<Shared>, accepted: Accepted) -> Option<Relaying> {
    let started = Instant::now();
    let listener = accepted.listener;
    let mut record = Box::new(ConnectionRecord::new(accepted.id, accepted.peer));
    let snapshot = shared.snapshot.load_full();
    let opened = tokio::select! {
        // The connection's own end first: a relay of a plain connection's upgrade ends itself at a forced close.
        biased;
        opened = handshake(&shared, &snapshot, accepted, &mut record) => opened,
        () = shared.force_close.cancelled() => {
            record.end = "closed: drain timeout reached during shutdown".into();
            if record.status == 101 {
                record.bytes.close_first = Some("proxy");
            }
            None
        }
    };
    match opened {
        Some((admitted, switched)) => Some(Relaying {
            shared,
            snapshot,
            record,
            started,
            listener,
            _admitted: admitted,
            switched,
        }),
        None => {
            finish(&shared, &snapshot, &record, listener, started.elapsed());
            None
        }
    }
}

/// The end of a connection: its refusal counted, its access log line and its span.
fn finish(shared: &Shared, snapshot: &Snapshot, record: &ConnectionRecord, listener: SocketAddr, duration: Duration) {
    if let Some(reason) = record.rejection {
        shared.metrics.rejected(reason, record.upgrade, record.status);
    }
    if shared.access_log.enabled()
        && let Some(kind) = record.kind()
    {
        let listener = snapshot.listener_name(listener);
        let line = record.line(kind, listener, duration, &snapshot.config);
        shared.access_log.write(line);
    }
    shared.spans.session_ended(record, &snapshot.config, duration);
}

/// Admission and the handshake: the admission and the switched connection for a WebSocket to relay; `None` when
/// the connection was answered otherwise (a refusal, plain HTTP, a backend's non-101 answer) and is done.
async fn handshake(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    mut accepted: Accepted,
    record: &mut ConnectionRecord,
) -> Option<(Admitted, Switched)> {
    // The PROXY protocol header comes before anything else, and its source is the client that admission counts.
    // Boxed: only connections from a load balancer need the read's buffer.
    if reads_proxy_header(snapshot, &accepted) {
        accepted = Box::pin(proxy_header(snapshot, accepted, record)).await?;
    }
    let admitted = match admit(shared, snapshot, &accepted) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let tls = snapshot.listener(accepted.listener).is_some_and(|l| l.tls.is_some());
            refuse_at_once(&accepted.stream, tls, record, &refusal);
            return None;
        }
    };
    let switched = open(shared, snapshot, accepted, record).await?;
    Some((admitted, switched))
}

/// Notes how a relay ended for the access log: its `end`, and who ended it (`close_side`): the side whose close
/// frame came first (frames mode, set by the relay), else wsgate when it closed the session, else the side that
/// closed or failed.
fn note_relay_end(record: &mut ConnectionRecord, end: &relay::End) {
    let side = |side: relay::Side| match side {
        relay::Side::Client => "client",
        relay::Side::Backend => "backend",
    };
    let close_side = &mut record.bytes.close_first;
    match end {
        relay::End::ClosedByProxy(_) | relay::End::IdleTimeout | relay::End::ForceClosed => *close_side = Some("proxy"),
        // The relay named the side of the first close frame (frames mode).
        _ if close_side.is_some() => {}
        relay::End::CloseHandshake { first, .. } => *close_side = Some(side(*first)),
        relay::End::Closed(s) | relay::End::Error(s, _) => *close_side = Some(side(*s)),
    }
    record.end = end.to_string();
}

/// Whether the connection starts with a PROXY protocol header: the listener's `proxy_protocol` is on and the peer is
/// one of its trusted proxies. From any other peer nothing is read before HTTP, so that a PROXY header it sends is
/// a malformed request.
fn reads_proxy_header(snapshot: &Snapshot, accepted: &Accepted) -> bool {
    snapshot
        .listener(accepted.listener)
        .is_some_and(|l| l.proxy_protocol && l.trusted_proxies.contains(accepted.peer.ip()))
}

/// Reads the PROXY protocol header a trusted proxy sends first, within the handshake timeout; its source stands for
/// the peer from here on (admission, route rules, forwarding headers, the access log). `None` when the connection
/// is done: answered `400` (a malformed header, or none: a trusted proxy must send one) or `408`, or gone.
async fn proxy_header(snapshot: &Snapshot, mut accepted: Accepted, record: &mut ConnectionRecord) -> Option<Accepted> {
    let limit = snapshot.config.server.handshake_timeout;
    let refusal = match timeout(limit, proxy_protocol::read(&mut accepted.stream)).await {
        Ok(Ok(Header::Proxied { source })) => {
            record.proxy = Some(accepted.peer);
            record.client = source;
            accepted.peer = source;
            return Some(accepted);
        }
        Ok(Ok(Header::Local)) => return Some(accepted),
        Ok(Err(ProxyReadError::Invalid(error))) => Refusal::ProxyHeader(error),
        Err(_) => Refusal::ProxyHeaderTimeout(limit),
        Ok(Err(ProxyReadError::Closed)) => {
            record.sent_nothing = true;
            record.end = "client closed before sending a whole PROXY protocol header".into();
            return None;
        }
        Ok(Err(ProxyReadError::Io(e))) => {
            record.end = format!("error: client: while reading the PROXY protocol header: {e}");
            return None;
        }
    };
    // A TLS client could read no plain-text answer: the connection is closed with the reason in the log.
    if snapshot.listener(accepted.listener).is_some_and(|l| l.tls.is_some()) {
        record.rejection = Some(refusal.metric_reason());
        record.end = format!("refused: {refusal} (TLS listener: closed without an answer)");
        return None;
    }
    refuse(Conn::Tcp(accepted.stream), record, refusal).await;
    None
}

/// The listener's address rules and the connection limits, checked before anything is read from the client (but
/// after a PROXY protocol header, whose source they check).
fn admit(shared: &Shared, snapshot: &Snapshot, accepted: &Accepted) -> Result<Admitted, Refusal> {
    let ip = accepted.peer.ip();
    // A listener a reload has removed keeps serving the connections it accepted, with no rules of its own.
    let removed;
    let listener = match snapshot.listener(accepted.listener) {
        Some(listener) => listener,
        None => {
            removed = Listener::new("", accepted.listener);
            &removed
        }
    };
    if !listener.access.admits(ip) {
        return Err(Refusal::Denied {
            client: ip,
            by: format!("listener `{}`", listener.name),
        });
    }
    let limit = shared.admission.overall_limit(snapshot.config.server.max_connections);
    shared.admission.admit(listener, limit, ip).map_err(Refusal::Limit)
}

/// The listener's `handshakes_per_second_per_ip`, counted for a WebSocket handshake from `ip`.
fn handshake_rate(shared: &Shared, snapshot: &Snapshot, listener: SocketAddr, ip: IpAddr) -> Result<(), Refusal> {
    match snapshot.listener(listener) {
        Some(listener) => shared.admission.handshake(listener, ip).map_err(Refusal::Limit),
        None => Ok(()),
    }
}

/// What a request needs to know of the listener that accepted its connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Front<'a> {
    /// The listener's name ("" once a reload has removed it).
    listener: &'a str,
    /// The peers whose forwarding headers say who the client is.
    trusted: &'a TrustedProxies,
    /// How the client reached wsgate: `http` or `https`.
    proto: &'static str,
    /// A plain listener that sends every request to https on this port.
    redirect_https: Option<u16>,
}

/// Runs the TLS handshake of a client on a TLS listener, within the handshake timeout. The error says why it failed
/// for the log (and which server name the client asked for); `None` for a client that closed without sending a
/// byte (a load balancer's TCP check), which gets no access log line.
async fn accept_tls(tls: &ServerTls, stream: TcpStream, limit: Duration) -> Result<Conn, Option<String>> {
    let handshake = async {
        // One look before rustls reads: a connection closed at once is not a failed handshake.
        if stream.peek(&mut [0u8; 1]).await.is_ok_and(|n| n == 0) {
            return Err(None);
        }
        let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = acceptor.await.map_err(|e| Some(format!("{e}")))?;
        let name = start.client_hello().server_name().map(str::to_string);
        let asked = || match &name {
            Some(name) => format!("server name `{name}`"),
            None => "no server name".to_string(),
        };
        if !tls.answers_for(name.as_deref()) {
            // rustls answers with an alert; the log says why.
            let _ = start.into_stream(tls.config()).await;
            return Err(Some(format!("no certificate for {}", asked())));
        }
        match start.into_stream(tls.config()).await {
            Ok(stream) => Ok(Conn::ServerTls(Box::new(stream))),
            Err(e) => Err(Some(format!("{e} ({})", asked()))),
        }
    };
    timeout(limit, handshake)
        .await
        .unwrap_or_else(|_| Err(Some(format!("not completed within {limit:?}"))))
}

/// A connection both sides have switched to WebSocket.
struct Switched {
    client: Conn,
    backend: Conn,
    /// Index of the route in the session's snapshot.
    route: usize,
    /// Counts the connection on its server while it lives.
    active: Active,
    /// The backend accepted permessage-deflate.
    deflate: bool,
    /// Bytes read with the handshake heads: client to backend, backend to client (`None` when there were none, as
    /// is usual: boxed, taken when the relay starts).
    early: Option<Box<[Vec<u8>; 2]>>,
    /// What the route's authentication holds for the session's life.
    auth: Option<Box<AuthHeld>>,
    /// The request's client (a trusted proxy's forwarded client, when there is one).
    client_ip: IpAddr,
}

/// The bytes read with the handshake heads, boxed when there are any.
fn early(client: Vec<u8>, backend: &[u8]) -> Option<Box<[Vec<u8>; 2]>> {
    (!client.is_empty() || !backend.is_empty()).then(|| Box::new([client, backend.to_vec()]))
}

/// What an admitted session holds while it lives: its API key's and its identity's connection counts, local and
/// shared with the other instances, and when its token expires (`close_on_expiry`).
struct AuthHeld {
    _key: Option<KeyAdmitted>,
    _identity: Option<KeyAdmitted>,
    _cluster: Option<crate::cluster::limits::Held>,
    expires: Option<Instant>,
    /// Who the session was admitted as: the token's `sub`, or the API key's identity (as the access log says it).
    identity: Option<String>,
}

/// The limits of an upgrade the route has admitted: the listener's handshake rate per client, the API key's and
/// the identity's limits, here and, with `[cluster] redis`, across the fleet (one round trip). What the session
/// keeps of its admission; `None` when there is nothing to keep.
async fn admit_upgrade(
    shared: &Shared,
    snapshot: &Snapshot,
    listener: SocketAddr,
    client: IpAddr,
    route: usize,
    admit: Option<&crate::auth::Admit>,
) -> Result<Option<Box<AuthHeld>>, Refusal> {
    handshake_rate(shared, snapshot, listener, client)?;
    let route = snapshot.config.routes.get(route);
    let route_name = route.map_or("", |r| r.name.as_str());
    let limits = route
        .and_then(|r| r.auth.as_ref())
        .map(|a| a.limits)
        .unwrap_or_default();
    let held = hold_auth(shared, admit, route_name, limits)?;
    let cluster = shared_limits(shared, snapshot.listener(listener), client, route_name, limits, admit).await?;
    Ok(match (held, cluster) {
        (held, None) => held,
        (Some(mut held), cluster) => {
            held._cluster = cluster;
            Some(held)
        }
        (None, cluster) => Some(Box::new(AuthHeld {
            _key: None,
            _identity: None,
            _cluster: cluster,
            expires: None,
            identity: None,
        })),
    })
}

/// The limits kept in Redis with `[cluster] redis` that apply to an upgrade: the listener's per-IP ones, the API
/// key's and the identity's; checked and counted in one round trip. The connections are counted while the
/// returned guard lives.
async fn shared_limits(
    shared: &Shared,
    listener: Option<&Listener>,
    client: IpAddr,
    route_name: &str,
    route: config::IdentityLimits,
    admit: Option<&crate::auth::Admit>,
) -> Result<Option<crate::cluster::limits::Held>, Refusal> {
    use crate::cluster::limits::{Check, CheckKind, Denied};
    use crate::policy::Limit;
    let Some(cluster) = shared.cluster.limits() else {
        return Ok(None);
    };
    let mut checks: Vec<Check> = Vec::new();
    // Who each check counts: the client, an API key or an identity (by its name, for the log).
    let mut whose: Vec<Whose> = Vec::new();
    let mut add = |key: String, max: Option<u32>, rate: Option<config::HandshakeRate>, on_down, who: Whose| {
        if let Some(n) = max {
            checks.push(Check {
                key: key.clone(),
                kind: CheckKind::Connections(n),
                on_down,
            });
            whose.push(who.clone());
        }
        if let Some(rate) = rate {
            checks.push(Check {
                key,
                kind: CheckKind::Rate(rate),
                on_down,
            });
            whose.push(who);
        }
    };
    let default = cluster.on_redis_down();
    if let Some(l) = listener {
        let key = format!("ip:{}:{}", l.name, crate::policy::client_key(client, l.ipv6_prefix));
        let on_down = l.on_redis_down.unwrap_or(default);
        add(key, l.max_connections_per_ip, l.handshake_rate, on_down, Whose::Client);
    }
    if let Some(admit) = admit {
        let on_down = route.on_redis_down.unwrap_or(default);
        if let Some(key) = &admit.key {
            let id = hex(&key.id()[..16]);
            add(
                format!("key:{id}"),
                key.max_connections,
                key.rate,
                on_down,
                Whose::Key(key.identity.clone()),
            );
        }
        if let Some(subject) = &admit.subject {
            let id = hex(&crate::policy::identity_hash(route_name, subject)[..16]);
            add(
                format!("id:{id}"),
                route.max_connections,
                route.rate,
                on_down,
                Whose::Identity(subject.clone()),
            );
        }
    }
    match cluster.admit(&checks).await {
        Ok(held) => Ok(held),
        Err(Denied::Unavailable) => Err(Refusal::ClusterUnavailable),
        Err(Denied::Limit { index, retry_after }) => {
            let (Some(check), Some(who)) = (checks.get(index), whose.get(index)) else {
                return Err(Refusal::ClusterUnavailable);
            };
            let limit = match (who, check.kind) {
                (Whose::Client, CheckKind::Connections(n)) => Limit::PerClient(n),
                (Whose::Client, CheckKind::Rate(r)) => Limit::Rate {
                    per_second: r.per_second,
                    retry_after,
                },
                (Whose::Key(_), CheckKind::Connections(n)) => Limit::PerKey(n),
                (Whose::Key(_), CheckKind::Rate(r)) => Limit::KeyRate {
                    per_second: r.per_second,
                    retry_after,
                },
                (Whose::Identity(_), CheckKind::Connections(n)) => Limit::PerIdentity(n),
                (Whose::Identity(_), CheckKind::Rate(r)) => Limit::IdentityRate {
                    per_second: r.per_second,
                    retry_after,
                },
            };
            let who = match who {
                Whose::Client => String::new(),
                Whose::Key(name) => format!(" (API key `{name}`)"),
                Whose::Identity(name) => format!(" (identity `{name}`)"),
            };
            Err(Refusal::ClusterLimit { limit, who })
        }
    }
}

/// Whom a shared limit counts.
#[derive(Debug, Clone)]
enum Whose {
    Client,
    Key(String),
    Identity(String),
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API key's and the identity's limits for an admitted upgrade, and what the session keeps of its admission;
/// `None` when the route has no authentication or nothing to keep.
fn hold_auth(
    shared: &Shared,
    admit: Option<&crate::auth::Admit>,
    route: &str,
    limits: config::IdentityLimits,
) -> Result<Option<Box<AuthHeld>>, Refusal> {
    let Some(admit) = admit else {
        return Ok(None);
    };
    let key = match &admit.key {
        Some(key) => shared
            .admission
            .admit_key(key.id(), key.max_connections, key.rate)
            .map_err(|limit| Refusal::KeyLimit {
                identity: key.identity.clone(),
                limit,
            })?,
        None => None,
    };
    let identity_held = match &admit.subject {
        Some(subject) if limits.max_connections.is_some() || limits.rate.is_some() => shared
            .admission
            .admit_identity(route, subject, limits.max_connections, limits.rate)
            .map_err(|limit| Refusal::IdentityLimit {
                identity: subject.clone(),
                limit,
            })?,
        _ => None,
    };
    // The token's expiry on the runtime's clock: at once when it has passed already.
    let expires = admit.expires.map(|at| {
        let now = Instant::now();
        match at.duration_since(std::time::SystemTime::now()) {
            Ok(left) => now.checked_add(left).unwrap_or(now + config::MAX_DURATION),
            Err(_) => now,
        }
    });
    let identity = admit.subject.clone();
    Ok((key.is_some() || expires.is_some() || identity.is_some()).then(|| {
        Box::new(AuthHeld {
            _key: key,
            _identity: identity_held,
            _cluster: None,
            expires,
            identity,
        })
    }))
}

/// Relays a switched connection in its route's mode. The session is registered on its server, so that a drain or
/// a rebalance can close it (close 1012 in frames mode).
///
/// Only the relay's own future and the registration are held while the session lives: what starts the relay is
/// made in plain functions, so that none of it stays in the session's task (an async function keeps every local
/// that lives across an await, even one moved out of).
async fn relay_switched(
    shared: &Shared,
    snapshot: &Snapshot,
    listener: SocketAddr,
    switched: &mut Switched,
    id: u64,
    counters: &mut crate::observe::Counters,
) -> relay::End {
    shared.metrics.switched();
    // Counted as active, and listed by the admin API, until this function returns or its future is dropped (a
    // forced close of a connection still in a plain HTTP exchange).
    let registered = register(shared, snapshot, listener, switched, id);
    let end = start_relay(shared, snapshot, switched, &registered.session, counters).await;
    shared
        .metrics
        .session_closed(counters.close_first.map(|_| counters.close_code), counters.close_first);
    drop(registered);
    // TLS ends with a close_notify (and whatever rustls still held before it), briefly: a peer that reads nothing
    // more is not waited for. Not after the drain timeout of a shutdown: that closes at once.
    if !matches!(end, relay::End::ForceClosed) {
        for conn in [&mut switched.client, &mut switched.backend] {
            if conn.is_tls() {
                let _ = timeout(TLS_CLOSE_WAIT, conn.shutdown()).await;
            }
        }
    }
    end
}

/// Registers a switched session as live, and on its server: a drain or a rebalance of the server closes it (close
/// 1012 in frames mode); a shutdown wakes it through the registry of live sessions.
fn register<'s>(
    shared: &'s Shared,
    snapshot: &Snapshot,
    listener: SocketAddr,
    switched: &mut Switched,
    id: u64,
) -> crate::live::Registered<'s> {
    let route = &snapshot.config.routes[switched.route];
    let registered = shared.sessions.start(NewSession {
        id,
        client: switched.client_ip,
        identity: switched.auth.as_ref().and_then(|a| a.identity.clone()),
        mode: match route.relay {
            config::Relay::Tunnel(_) => "tunnel",
            config::Relay::Frames(_) => "frames",
        },
        place: PlaceRef {
            listener: snapshot.listener_name(listener),
            route: &route.name,
            // A relayed session's route always has an upstream.
            upstream: route.upstream.map_or("", |u| &snapshot.upstreams[u].config.name),
            server: &switched.active.server().name,
        },
    });
    switched.active.register(registered.session.clone());
    registered
}

/// The relay of a switched session, in its route's mode.
fn start_relay<'a>(
    shared: &'a Shared,
    snapshot: &'a Snapshot,
    switched: &'a mut Switched,
    live: &'a LiveSession,
    counters: &'a mut crate::observe::Counters,
) -> impl Future<Output = relay::End> + 'a {
    let route = &snapshot.config.routes[switched.route];
    let (frames, write, splice) = match route.relay {
        config::Relay::Tunnel(rules) => (None, rules.write_timeout, rules.splice),
        config::Relay::Frames(ref rules) => {
            let mut frames = relay::Frames::new(rules, switched.deflate);
            if let Some(at) = switched.auth.as_ref().and_then(|a| a.expires) {
                frames.expire_at(at);
            }
            (Some(frames), rules.write_timeout, false)
        }
    };
    let timeouts = relay::Timeouts {
        idle: route.idle_timeout,
        write,
        splice,
    };
    // Frames-mode connections close with 1001 at once on a shutdown.
    let stop = relay::Stop::new(&live.stop, &shared.phase, frames.is_some());
    let early = switched.early.take().map_or_else(Default::default, |early| *early);
    let (client, backend) = (&mut switched.client, &mut switched.backend);
    relay::relay(client, backend, timeouts, frames, early, counters, stop, Some(live))
}

/// How long the end of a TLS connection waits for its close_notify to be written.
const TLS_CLOSE_WAIT: Duration = Duration::from_millis(500);

/// An upgrade request routed, with its server choice made and its head for the backend written.
struct Prepared {
    /// The request's client (see [`Client`]).
    client: IpAddr,
    head_len: usize,
    forward: Vec<u8>,
    /// The client's extension offers were left out of `forward`: the backend may accept none.
    extensions_stripped: bool,
    /// What the route's authentication admitted the request as.
    auth: Option<Box<crate::auth::Admit>>,
    accept: [u8; 28],
    route: usize,
    upstream: usize,
    choice: upstream::Choice,
}

/// What the bytes read so far call for.
enum Step {
    More,
    Plain,
    Upgrade(Prepared),
    /// An upgrade to an `llm` route's stream endpoint: wsgate's own WebSocket.
    Llm(Box<LlmStream>),
}

/// An upgrade to the LLM gateway's stream endpoint.
struct LlmStream {
    head_len: usize,
    opening: crate::llm::ws::Opening,
}

/// The virtual key an upgrade to the LLM gateway presents: `Authorization: Bearer KEY`, else `?api_key=KEY`.
fn llm_secret(view: &impl RequestView) -> Option<String> {
    let bearer = view.header_values("authorization").find_map(|v| {
        let v = std::str::from_utf8(v).ok()?;
        let (scheme, key) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim().to_string())
    });
    bearer
        .filter(|k| !k.is_empty())
        .or_else(|| query_value(view, "api_key"))
}

/// A query parameter of the request's target, as sent (`None` when absent or empty).
fn query_value(view: &impl RequestView, name: &str) -> Option<String> {
    let target = std::str::from_utf8(view.target()).ok()?;
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.to_string())
        .filter(|v| !v.is_empty())
}

/// The upgrade fast path's view of a request head, for routing.
struct HeadView<'a, 'h, 'b>(&'a UpgradeHead<'h, 'b>);

impl RequestView for HeadView<'_, '_, '_> {
    fn host(&self) -> Option<&[u8]> {
        Some(self.0.host)
    }
    fn target(&self) -> &[u8] {
        self.0.target.as_bytes()
    }
    fn header_values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        let headers = self.0.headers.iter();
        headers
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// Parses what the client sent so far; for a complete upgrade request: finds its client (noted in `record`),
/// validates it, finds its route and the server choice, and writes the head for the backend. One parse of the head
/// serves all of it.
fn inspect(snapshot: &Snapshot, front: Front<'_>, buf: &[u8], record: &mut ConnectionRecord) -> Result<Step, Refusal> {
    let mut storage = handshake::header_storage();
    let head = match handshake::parse_request(buf, &mut storage) {
        Ok(Parsed::Partial) => return Ok(Step::More),
        Ok(Parsed::Plain { .. }) => return Ok(Step::Plain),
        Ok(Parsed::Upgrade(head)) => {
            record.upgrade = true;
            let mut request = RequestInfo::new(
                b"GET",
                head.target.as_bytes(),
                Some(head.host),
                handshake_header(&head, "user-agent"),
                &snapshot.config.server.access_log_redact,
            );
            request.websocket = true;
            record.request = Some(request);
            head
        }
        Err(_) if proxy_protocol::has_signature(buf) => return Err(Refusal::UnexpectedProxyHeader),
        Err(e) => return Err(e.into()),
    };
    let client = Client::of(
        record.client.ip(),
        front.trusted,
        head.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
    );
    note_client(record, &client);
    let view = HeadView(&head);
    if let Some(port) = front.redirect_https {
        return Err(Refusal::to_https(&view, port));
    }
    let routes = &snapshot.config.routes;
    let Some(route) = route::find(routes, front.listener, &view) else {
        return Err(Refusal::no_route(&view));
    };
    Refusal::check_route(route, client.ip, Some(&view))?;
    let auth = Refusal::check_auth(route, &view, true)?;
    if let Some(request) = record.request.as_deref_mut() {
        request.identity = auth.as_ref().and_then(|a| a.subject.clone());
    }
    // An `llm` route's endpoints are the gateway's own: its stream and Realtime endpoints are WebSockets wsgate
    // serves itself, and no other takes an upgrade.
    let Some(upstream_index) = route.upstream else {
        let path = view.path().strip_suffix(b"/").unwrap_or(view.path());
        let realtime = if path.ends_with(b"/stream") {
            None
        } else if path.ends_with(b"/realtime") {
            let beta = single(view.header_values("openai-beta")).and_then(|v| http::HeaderValue::from_bytes(v).ok());
            Some(crate::llm::ws::Realtime {
                model: query_value(&view, "model"),
                beta,
            })
        } else {
            return Err(Refusal::NoUpgrade {
                path: echoed_path(&view),
            });
        };
        record.route = routes.iter().position(|r| std::ptr::eq(r, route));
        return Ok(Step::Llm(Box::new(LlmStream {
            head_len: head.head_len,
            opening: crate::llm::ws::Opening {
                accept: head.accept(),
                secret: llm_secret(&view),
                realtime,
            },
        })));
    };
    let upstream = &snapshot.upstreams[upstream_index];
    let trace = Trace::of(single(view.header_values("traceparent")));
    record.trace_id = Some(trace.trace_id);
    if snapshot.config.tracing.is_some() {
        record.span = Some(SpanStart::new(trace, &head.target, front.listener));
    }
    let omit = Omit {
        cookie: match &upstream.config.sticky {
            Some(Sticky::Cookie(c)) if !c.forward_cookie => Some(c.name.as_str()),
            _ => None,
        },
        extensions: route.deflate == Deflate::Strip,
        auth: auth.as_ref(),
        trace: Some(&trace),
    };
    Ok(Step::Upgrade(Prepared {
        client: client.ip,
        head_len: head.head_len,
        forward: head.forward(&client, front.proto, omit),
        extensions_stripped: omit.extensions,
        auth: auth.map(Box::new),
        accept: head.accept(),
        route: routes.iter().position(|r| std::ptr::eq(r, route)).unwrap_or(0),
        upstream: upstream_index,
        choice: upstream.choose(&view, client.ip),
    }))
}

/// The first value of a header of a parsed upgrade head.
fn handshake_header<'b>(head: &UpgradeHead<'_, 'b>, name: &str) -> Option<&'b [u8]> {
    head.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Notes a request's client for the access log (when a trusted proxy named another than the peer), and a chain
/// entry passed over for naming no address.
fn note_client(record: &mut ConnectionRecord, client: &Client) {
    record.forwarded_for = (client.ip != client.peer).then_some(client.ip);
    if let Some(entry) = &client.ignored {
        tracing::debug!(id = record.id, entry = %entry, "forwarding chain entry naming no address passed over");
    }
}

/// The one value of a header sent once (`None` when absent or repeated).
fn single<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<&'a [u8]> {
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value),
        _ => None,
    }
}

/// A response head with one more header line before its end.
fn with_header(head: &[u8], name: &str, value: &str) -> Vec<u8> {
    let end = if head.ends_with(b"\r\n\r\n") {
        head.len() - 2
    } else {
        head.len().saturating_sub(1)
    };
    let mut out = Vec::with_capacity(head.len() + name.len() + value.len() + 4);
    out.extend_from_slice(&head[..end]);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&head[end..]);
    out
}

/// Everything before the relay. Returns the client's and the backend's sockets once the backend's 101 has been
/// passed to the client; `None` when the connection was answered otherwise (a refusal, plain HTTP, a backend's
/// non-101 answer) and is done.
async fn open(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    accepted: Accepted,
    record: &mut ConnectionRecord,
) -> Option<Switched> {
    let started = Instant::now();
    let Accepted { stream, listener, .. } = accepted;
    let handshake_timeout = snapshot.config.server.handshake_timeout;
    let listener_config = snapshot.listener(listener);
    let mut client = match listener_config.and_then(|l| l.tls.as_deref()) {
        None => Conn::Tcp(stream),
        Some(tls) => match accept_tls(tls, stream, handshake_timeout).await {
            Ok(client) => client,
            Err(Some(why)) => {
                record.end = format!("error: TLS handshake: {why}");
                return None;
            }
            Err(None) => {
                record.end = "client closed before its TLS handshake".into();
                record.sent_nothing = true;
                return None;
            }
        },
    };
    static NO_PROXIES: TrustedProxies = TrustedProxies(Vec::new());
    let front = Front {
        listener: listener_config.map_or("", |l| l.name.as_str()),
        trusted: listener_config.map_or(&NO_PROXIES, |l| &l.trusted_proxies),
        proto: if client.is_tls() { "https" } else { "http" },
        redirect_https: listener_config.and_then(|l| l.redirect_https),
    };
    let mut head = Vec::with_capacity(1024);
    let (prepared, auth) = match read_head(&mut client, &mut head, snapshot, front, record).await {
        Head::Upgrade(prepared) => match admit_upgrade(
            shared,
            snapshot,
            listener,
            prepared.client,
            prepared.route,
            prepared.auth.as_deref(),
        )
        .await
        {
            Ok(auth) => (prepared, auth),
            Err(refusal) => return refuse(client, record, refusal).await,
        },
        Head::Plain => {
            plain::serve(shared.clone(), snapshot.clone(), listener, client, head, record).await;
            return None;
        }
        Head::Llm(stream) => {
            let Some(settings) = &snapshot.config.llm else {
                return refuse(client, record, Refusal::NoUpgrade { path: String::new() }).await;
            };
            let early = head.get(stream.head_len..).unwrap_or_default().to_vec();
            drop(head);
            let (status, end) = crate::llm::ws::serve(shared, settings, client, stream.opening, early).await;
            record.status = status;
            record.end = end;
            return None;
        }
        Head::Refused(refusal @ Refusal::Unauthorized { .. }) => {
            // A failed credential costs a handshake of the client's rate too: guessing keys is throttled.
            let client_ip = record.forwarded_for.unwrap_or(record.client.ip());
            let refusal = handshake_rate(shared, snapshot, listener, client_ip)
                .err()
                .unwrap_or(refusal);
            return refuse(client, record, refusal).await;
        }
        Head::Refused(refusal) => return refuse(client, record, refusal).await,
        Head::Gone => return None,
    };
    // Bytes the client sent after its head already belong to the WebSocket stream: they go to the relay.
    let client_early = head.get(prepared.head_len..).unwrap_or_default().to_vec();
    drop(head);

    record.route = Some(prepared.route);
    record.upstream = Some(prepared.upstream);
    let upstream = &snapshot.upstreams[prepared.upstream];
    let opened = match open_backend(upstream, &shared.metrics, handshake_timeout, &prepared, record).await {
        Ok(opened) => opened,
        Err(refusal) => {
            if let Refusal::Upstream { tries, .. } = &refusal {
                shared.metrics.retried((*tries as u64).saturating_sub(1));
            }
            return refuse(client, record, refusal).await;
        }
    };
    match opened.head {
        AnswerHead::Switching { deflate, head_len, .. } => {
            let cookie = upstream.sticky_cookie(prepared.choice, opened.server.server());
            let (answer_head, backend_early) = opened.answer.split_at(head_len.min(opened.answer.len()));
            record.status = 101;
            if let Some(request) = record.request.as_deref_mut() {
                request.switched_head(answer_head);
            }
            if let Err(e) = pass_switch(&mut client, answer_head, cookie, handshake_timeout).await {
                record.end = format!("error: client: {e}");
                return None;
            }
            shared.metrics.handshake_took(started.elapsed());
            Some(Switched {
                client,
                early: early(client_early, backend_early),
                backend: opened.backend,
                route: prepared.route,
                active: opened.server,
                deflate,
                auth,
                client_ip: prepared.client,
            })
        }
        AnswerHead::Other { status, head, body } => {
            let Opened {
                mut backend, answer, ..
            } = opened;
            record.status = status;
            shared.metrics.backend_refused(status);
            let passed = pass_answer(&mut client, &mut backend, &head, &answer, body, handshake_timeout);
            record.end = match passed.await {
                Ok(()) => format!("backend answered {status} to the upgrade"),
                Err(e) => format!("error: while passing the backend's {status} answer: {e}"),
            };
            lingering_close(client).await;
            None
        }
    }
}

/// Passes the backend's 101 on to the client, with the sticky cookie when the client needs one.
async fn pass_switch(client: &mut Conn, head: &[u8], cookie: Option<String>, limit: Duration) -> std::io::Result<()> {
    match cookie {
        Some(cookie) => write_within(client, &with_header(head, "Set-Cookie", &cookie), limit).await,
        None => write_within(client, head, limit).await,
    }
}

/// What the client's first request head turned out to be.
enum Head {
    Upgrade(Prepared),
    Llm(Box<LlmStream>),
    Plain,
    Refused(Refusal),
    /// The client left or failed before sending a whole head (the record says how).
    Gone,
}

/// Reads the client's first request head within the handshake timeout.
async fn read_head(
    client: &mut Conn,
    head: &mut Vec<u8>,
    snapshot: &Snapshot,
    front: Front<'_>,
    record: &mut ConnectionRecord,
) -> Head {
    let limit = snapshot.config.server.handshake_timeout;
    let read = read_request(client, head, snapshot, front, record);
    let read = timeout(limit, read).await;
    // A refused head shows in the log as far as it can be read.
    if matches!(read, Err(_) | Ok(Err(ReadError::Refused(_)))) && record.request.is_none() {
        record.request = RequestInfo::from_head(head, &snapshot.config.server.access_log_redact);
    }
    match read {
        Err(_) => Head::Refused(Refusal::HeadTimeout(limit)),
        Ok(Err(ReadError::Closed)) => {
            record.sent_nothing = head.is_empty();
            record.end = "client closed before sending a request".into();
            Head::Gone
        }
        Ok(Err(ReadError::Io(e))) => {
            record.end = format!("error: client: {e}");
            Head::Gone
        }
        Ok(Err(ReadError::Refused(refusal))) => Head::Refused(refusal),
        Ok(Ok(None)) => Head::Plain,
        Ok(Ok(Some(Ready::Upgrade(prepared)))) => Head::Upgrade(prepared),
        Ok(Ok(Some(Ready::Llm(stream)))) => Head::Llm(stream),
    }
}

/// A whole upgrade head, ready to act on.
enum Ready {
    Upgrade(Prepared),
    Llm(Box<LlmStream>),
}

enum ReadError {
    Closed,
    Io(std::io::Error),
    Refused(Refusal),
}

/// Reads the client's request head into `buf`: `Some` for a valid upgrade (routed and ready to forward), `None`
/// for a plain HTTP request.
async fn read_request(
    client: &mut Conn,
    buf: &mut Vec<u8>,
    snapshot: &Snapshot,
    front: Front<'_>,
    record: &mut ConnectionRecord,
) -> Result<Option<Ready>, ReadError> {
    loop {
        let room = MAX_HEAD_BYTES.saturating_sub(buf.len()).max(1);
        buf.reserve(room.min(4096));
        let n = (&mut *client)
            .take(room as u64)
            .read_buf(buf)
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        let mut step = inspect(snapshot, front, buf, record);
        // A token naming a key id its route's key set lacks: the set is fetched again (when not too recently) and
        // the request checked once more.
        if let Err(refusal) = &step
            && let Some(remote) = refusal.jwks_refresh()
            && remote.refresh(crate::auth::jwks::UNKNOWN_KID_REFRESH).await
        {
            step = inspect(snapshot, front, buf, record);
        }
        match step {
            Ok(Step::More) => continue,
            Ok(Step::Plain) => return Ok(None),
            Ok(Step::Upgrade(prepared)) => return Ok(Some(Ready::Upgrade(prepared))),
            Ok(Step::Llm(stream)) => return Ok(Some(Ready::Llm(stream))),
            Err(e) => return Err(ReadError::Refused(e)),
        }
    }
}

/// The parts of a backend's answer the session acts on.
enum AnswerHead {
    Switching {
        deflate: bool,
        /// The backend accepted some extension.
        extensions: bool,
        head_len: usize,
    },
    Other {
        status: u16,
        /// The head to write to the client.
        head: Vec<u8>,
        /// How to find the end of the body, and where it starts in the answer buffer.
        body: Option<(BodyEnd, usize)>,
    },
}

/// A backend connection that has answered the forwarded head.
struct Opened {
    backend: Conn,
    server: Active,
    /// The bytes read from the backend: its answer's head and what followed it.
    answer: Vec<u8>,
    head: AnswerHead,
}

/// Connects to a server of the upstream, forwards the request head, and reads its answer. A failure another server
/// may not share (refused, reset, a timeout) moves on to the next server, as the upstream's retries allow.
async fn open_backend(
    upstream: &Upstream,
    metrics: &Metrics,
    handshake_timeout: Duration,
    prepared: &Prepared,
    record: &mut ConnectionRecord,
) -> Result<Opened, Refusal> {
    let mut attempts = start_tries(upstream, prepared.choice)?;
    loop {
        let (i, active) = next_try(&mut attempts)?;
        let server = active.server().address;
        record.server = Some(server);
        let connecting = Instant::now();
        let error = match upstream.connect(active.server()).await {
            Err(e) => e,
            Ok(mut backend) => {
                metrics.connect_took(connecting.elapsed());
                let exchange = exchange_heads(&mut backend, &prepared.forward, &prepared.accept);
                match timeout(handshake_timeout, exchange).await {
                    Ok(Ok((_, AnswerHead::Switching { extensions: true, .. }))) if prepared.extensions_stripped => {
                        UpstreamError::BadAnswer {
                            server,
                            reason: ResponseError::ExtensionNotOffered.to_string(),
                        }
                    }
                    Ok(Ok((answer, head))) => {
                        let error_status = matches!(head, AnswerHead::Other { status, .. } if status >= 500);
                        attempts.answered(i, error_status);
                        metrics.retried((attempts.tries() as u64).saturating_sub(1));
                        return Ok(Opened {
                            backend,
                            server: active,
                            answer,
                            head,
                        });
                    }
                    Err(_) => UpstreamError::AnswerTimeout {
                        server,
                        after: handshake_timeout,
                    },
                    Ok(Err(Exchange::Io(source))) => UpstreamError::Lost { server, source },
                    Ok(Err(Exchange::Answer(source))) => UpstreamError::BadAnswer {
                        server,
                        reason: source.to_string(),
                    },
                }
            }
        };
        failed_try(&mut attempts, i, error)?;
    }
}

/// Starts a request's tries of the upstream's servers; the refusal when it can take no request now.
fn start_tries(upstream: &Upstream, choice: upstream::Choice) -> Result<Attempts<'_>, Refusal> {
    Attempts::start(upstream, choice).map_err(|error| Refusal::upstream(error, 0))
}

/// The next server to try and its counted connection; the refusal when none is left.
fn next_try(attempts: &mut Attempts<'_>) -> Result<(usize, Active), Refusal> {
    attempts
        .next_server()
        .map_err(|error| Refusal::upstream(error, attempts.tries()))
}

/// Server `i` failed: `Ok` when another server may be tried, else the refusal.
fn failed_try(attempts: &mut Attempts<'_>, i: usize, error: UpstreamError) -> Result<(), Refusal> {
    let tries = attempts.tries();
    attempts
        .failed(i, error)
        .map_err(|error| Refusal::upstream(error, tries))
}

enum Exchange {
    Io(std::io::Error),
    Answer(ResponseError),
}

async fn exchange_heads(
    backend: &mut Conn,
    forward: &[u8],
    accept: &[u8; 28],
) -> Result<(Vec<u8>, AnswerHead), Exchange> {
    backend.write_all(forward).await.map_err(Exchange::Io)?;
    backend.flush().await.map_err(Exchange::Io)?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let room = MAX_HEAD_BYTES.saturating_sub(buf.len()).max(1);
        buf.reserve(room.min(4096));
        let n = (&mut *backend)
            .take(room as u64)
            .read_buf(&mut buf)
            .await
            .map_err(Exchange::Io)?;
        if n == 0 {
            return Err(Exchange::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "backend closed the connection before answering the handshake",
            )));
        }
        let head = match handshake::inspect_response(&buf, accept).map_err(Exchange::Answer)? {
            BackendAnswer::Partial => continue,
            BackendAnswer::Switching {
                deflate,
                extensions,
                head_len,
            } => AnswerHead::Switching {
                deflate,
                extensions,
                head_len,
            },
            BackendAnswer::Other {
                status,
                head_len,
                head,
                framing,
            } => AnswerHead::Other {
                status,
                head,
                body: BodyEnd::new(framing).map(|end| (end, head_len)),
            },
        };
        return Ok((buf, head));
    }
}

/// Passes a backend's non-101 answer to the client: its head, then its body up to where the body ends. Each read
/// from the backend and each write to the client must complete within `read_timeout`.
async fn pass_answer(
    client: &mut Conn,
    backend: &mut Conn,
    head: &[u8],
    answer: &[u8],
    body: Option<(BodyEnd, usize)>,
    read_timeout: Duration,
) -> std::io::Result<()> {
    write_within(client, head, read_timeout).await?;
    let Some((mut end, body_start)) = body else {
        return Ok(());
    };
    let malformed = |e| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut chunk = answer.get(body_start..).unwrap_or_default().to_vec();
    loop {
        let done = end.feed(&chunk).map_err(malformed)?;
        write_within(client, &chunk[..done.unwrap_or(chunk.len())], read_timeout).await?;
        if done.is_some() {
            return Ok(());
        }
        chunk.clear();
        chunk.reserve(16 * 1024);
        let n = timeout(read_timeout, backend.read_buf(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "backend stalled"))??;
        if n == 0 {
            return match end {
                BodyEnd::UntilClose => Ok(()),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "backend closed before the end of the body",
                )),
            };
        }
    }
}

/// Writes all of `bytes` unless the peer takes none of them for `limit`.
async fn write_within(stream: &mut Conn, bytes: &[u8], limit: Duration) -> std::io::Result<()> {
    timeout(limit, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "peer stopped reading"))?
}

/// Answers the client with a refusal and closes: the fast path serves one request per connection. Returns `None`:
/// the connection is done.
async fn refuse(mut client: Conn, record: &mut ConnectionRecord, refusal: Refusal) -> Option<Switched> {
    const WRITE_LIMIT: Duration = Duration::from_secs(5);
    let answer = refusal.answer().closing();
    record.status = answer.status;
    record.rejection = Some(refusal.metric_reason());
    record.end = format!("refused: {refusal}");
    let written = timeout(WRITE_LIMIT, async {
        client.write_all(&answer.to_bytes()).await?;
        client.flush().await
    });
    if written.await.is_ok() {
        lingering_close(client).await;
    }
    None
}

/// Answers a connection refused before anything was read from it (its address, a connection limit) without
/// waiting for it: under a flood of such connections none may hold a socket or a task any longer than this. The
/// answer goes into the socket's empty send buffer at once; what the client has sent so far is read and dropped,
/// so that the close is a FIN rather than a reset in the common case. On a TLS listener the connection is closed
/// without an answer: there is no plain-text answer a TLS client could read, and a TLS handshake per refused
/// connection is the cost a flood must not get from wsgate.
fn refuse_at_once(client: &TcpStream, tls: bool, record: &mut ConnectionRecord, refusal: &Refusal) {
    let answer = refusal.answer().closing();
    record.status = answer.status;
    record.rejection = Some(refusal.metric_reason());
    record.end = format!("refused: {refusal}");
    if tls {
        record.end.push_str(" (TLS listener: closed without an answer)");
    } else {
        let _ = client.try_write(&answer.to_bytes());
    }
    let mut sink = [0u8; 1024];
    while matches!(client.try_read(&mut sink), Ok(n) if n > 0) {}
}

/// Closes after an answer so that the client reads it: shut down our side, then read and drop what the client
/// still sends (bounded in time and bytes) so the kernel does not reset the connection under unread data.
async fn lingering_close(mut client: Conn) {
    const LINGER: Duration = Duration::from_secs(2);
    const MAX_DISCARD: usize = 256 * 1024;
    if client.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    let _ = timeout(LINGER, async {
        while discarded < MAX_DISCARD {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LogFormat, Timeouts};

    /// Every live session is one of these futures, so its size is memory per idle connection: the handshake's state
    /// lives on the heap and is freed before the relay starts, and the relay phase holds the session once (an
    /// async function keeps every local that lives across an await, even one moved out of: a field destructured
    /// out of the session, or a session moved into a binding of its own, would be stored twice).
    #[tokio::test]
    async fn a_session_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = TcpStream::connect(addr).await.expect("connect");
        let timeouts = Timeouts::default();
        let config = Config::quick(&addr.to_string(), &[addr.to_string()], timeouts, LogFormat::Text).expect("config");
        let shared = Arc::new(Shared::for_tests(config));
        let accepted = Accepted {
            stream,
            peer: addr,
            id: 1,
            listener: addr,
        };
        let size = std::mem::size_of_val(&session(shared, accepted));
        // About 660 bytes today, in a debug build as in a release build, where tokio's task cell with it takes
        // 768 bytes (cells are 128-byte aligned). A copy of the session or a stray buffer would show.
        assert!(size <= 700, "a session future takes {size} bytes");
        let relaying = std::mem::size_of::<Relaying>();
        assert!(relaying <= 256, "the relayed session takes {relaying} bytes");
        // The frames-mode state, boxed beside the task: 736 bytes today (rules borrowed from the config; the close,
        // the rate limit's, the keepalive's and a tap's state boxed only when there are any).
        let frames = std::mem::size_of::<relay::Frames>();
        assert!(frames <= 736, "the frames state takes {frames} bytes");
    }
}
