//! The configuration model: listeners, routes, upstreams and their servers, the relay rules and the timeouts. It
//! is data only (no runtime module is imported here) and is validated once, when it is built, from a file
//! ([`file`]) or from the quick-mode flags ([`Config::quick`]); code that receives a [`Config`] never re-checks it.
//! Every default lives in this module.

pub mod file;
pub mod llm;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::client::ClientTls;
use crate::tls::server::ServerTls;
pub use llm::LlmSettings;

/// Default time to wait for a TCP connection to a backend server.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a client gets to send its whole request head, and a backend to answer the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time live connections get to finish after a shutdown signal.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default name of the sticky-session cookie.
pub const DEFAULT_STICKY_COOKIE: &str = "SERVERID";
/// Default `Path` of the sticky-session cookie.
pub const DEFAULT_STICKY_PATH: &str = "/";
/// The shortest `Max-Age` of the sticky-session cookie (`Max-Age` counts whole seconds; leave it out for a session
/// cookie).
pub const MIN_STICKY_MAX_AGE: Duration = Duration::from_secs(1);

/// A whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The text of the file it was read from (`GET /api/config` shows it, redacted); `None` in quick mode.
    pub source: Option<std::sync::Arc<str>>,
    pub server: ServerSettings,
    /// The admin listener (`GET /metrics`); `None` = none.
    pub admin: Option<AdminSettings>,
    pub listeners: Vec<Listener>,
    /// Tried in order; the first that matches a request wins.
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    /// `[tracing]`: where spans are exported; `None` = nowhere.
    pub tracing: Option<TracingSettings>,
    /// `[llm]`: the LLM gateway's providers, prices and key database; `None` without one.
    pub llm: Option<Arc<LlmSettings>>,
    /// `[cluster]`: what several instances share; `None` = every limit is local.
    pub cluster: Option<Cluster>,
}

/// `[cluster]`: the Redis server several instances keep their shared limits and their fleet view in.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// `redis://…`; `None` = the limits are local (the instance still has a name).
    pub redis: Option<String>,
    /// This instance's name in the fleet (`GET /api/cluster`): the host name and the process id by default.
    pub instance: String,
    /// What a shared limit does while Redis does not answer, unless the limit's own setting says otherwise.
    pub on_redis_down: OnRedisDown,
    /// Sessions shed (close 1012, so that clients reconnect through the balancer in front) while this instance
    /// holds more than its even share of the fleet's by this fraction; `None` = never.
    pub rebalance: Option<f64>,
    /// Sessions shed per second at most while rebalancing.
    pub rebalance_rate: u32,
}

/// Default `[cluster] rebalance_threshold`: shed above 125 % of the even share.
pub const DEFAULT_CLUSTER_REBALANCE_THRESHOLD: f64 = 0.25;
/// Default `[cluster] rebalance_rate`.
pub const DEFAULT_CLUSTER_REBALANCE_RATE: u32 = 10;

/// What a limit kept in Redis does while Redis does not answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnRedisDown {
    /// The connection is admitted, counted by this instance's local limits only.
    #[default]
    Open,
    /// The connection is refused (503).
    Closed,
}

/// A route's limits per authenticated identity (the token's `sub`, or the API key's identity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityLimits {
    /// Live connections one identity may hold; over it: 429.
    pub max_connections: Option<u32>,
    /// Handshakes per second one identity may start (with its burst); over it: 429.
    pub rate: Option<HandshakeRate>,
    /// Overrides `[cluster] on_redis_down` for the route's per-key and per-identity limits.
    pub on_redis_down: Option<OnRedisDown>,
}

/// The `service.name` of exported spans when `[tracing]` names none.
pub const DEFAULT_SERVICE_NAME: &str = "wsgate";

/// `[tracing]`: one span per WebSocket session, exported by OTLP/HTTP with JSON to `endpoint`.
#[derive(Clone, PartialEq)]
pub struct TracingSettings {
    /// The full traces URL (`http://` or `https://`, with its path, such as `/v1/traces`).
    pub endpoint: http::Uri,
    pub service_name: String,
    /// Sent with every export (an API key, say); `Debug` shows their names only.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// For an https endpoint: its TLS (the system's CA certificates, or `ca`).
    pub tls: Option<Arc<ClientTls>>,
}

impl std::fmt::Debug for TracingSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("TracingSettings")
            .field("endpoint", &self.endpoint)
            .field("service_name", &self.service_name)
            .field("headers", &names)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The admin listener: metrics and (later) the admin API, on an address of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub address: SocketAddr,
    /// The bearer token every POST needs (and every GET with `protect_reads`); `None` = none needed, allowed only
    /// on a loopback address.
    pub token: Option<String>,
    pub protect_reads: bool,
}

/// Settings of the whole process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Time live connections get to finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// Time a client gets to send its whole request head, and a backend to answer the handshake.
    pub handshake_timeout: Duration,
    pub log_format: LogFormat,
    /// Worker threads, each with its own runtime and listening sockets; 0 = one per available core.
    pub workers: usize,
    /// Reload when the config file changes (as well as on SIGHUP).
    pub watch: bool,
    /// Client connections wsgate holds at once, over every listener; over it, new ones get 503. `None` = what the
    /// open-files limit allows (two descriptors a session, and a reserve), worked out at start.
    pub max_connections: Option<u32>,
    /// The listen backlog of every listening socket (the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// TCP keepalive on both sides of every connection: idle time before the first probe; `None` = off.
    pub tcp_keepalive: Option<Duration>,
    /// Where the access log goes.
    pub access_log: AccessLogTarget,
    /// Query parameters whose values the access log replaces, besides [`REDACTED_QUERY_PARAMS`] (lowercase): those
    /// of `access_log_redact` and those routes read credentials from.
    pub access_log_redact: Vec<String>,
}

/// Where the access log's lines go (`[server] access_log`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLogTarget {
    #[default]
    Stdout,
    Off,
    /// A file, appended to (created when missing); reopened on SIGUSR1.
    File(PathBuf),
}

/// The listen backlog unless `listen_backlog` says otherwise.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
/// The largest listen backlog (Linux caps it at `net.core.somaxconn`, 4096 by default, 65535 at most).
pub const MAX_LISTEN_BACKLOG: u32 = 65_535;
/// Idle time before TCP keepalive's first probe, unless `tcp_keepalive` says otherwise: a peer that vanished (a
/// cable, a NAT that forgot the flow) is found within about this plus a minute, on both sides of a session.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// The longest idle time before keepalive's first probe (the kernel's own cap is about 9 hours).
pub const MAX_TCP_KEEPALIVE: Duration = Duration::from_secs(2 * 3600);
/// TCP keepalive's probes after the first, and the time between them.
pub const TCP_KEEPALIVE_PROBES: u32 = 4;
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Query parameters whose values the access log always replaces with `REDACTED` (names compared without case; a
/// name also matches by its last `_`, `-` or `.` segment, so `refresh_token` and `X-Amz-Signature` do, and with a
/// trailing `[]`).
pub const REDACTED_QUERY_PARAMS: &[&str] = &[
    "access_token",
    "token",
    "credential",
    "passwd",
    "api_key",
    "apikey",
    "key",
    "password",
    "secret",
    "signature",
    "sig",
    "auth",
    "jwt",
];

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
            log_format: LogFormat::Text,
            workers: DEFAULT_WORKERS,
            watch: false,
            max_connections: None,
            access_log: AccessLogTarget::Stdout,
            access_log_redact: Vec::new(),
        }
    }
}

/// An address wsgate accepts client connections on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Which client addresses may connect at all (403 otherwise).
    pub access: Access,
    /// Live connections one client (an IPv4 address, an IPv6 prefix) may hold on this listener; over it: 429.
    pub max_connections_per_ip: Option<u32>,
    /// IPv6 clients are counted per prefix of this length (a host usually has a whole /64).
    pub ipv6_prefix: u8,
    /// WebSocket handshakes one client may start per second on this listener, on average; over it: 429.
    pub handshake_rate: Option<HandshakeRate>,
    /// TLS (wss, https) with these certificates, loaded; `None` = plain.
    pub tls: Option<Arc<ServerTls>>,
    /// A plain listener answering every request with a 308 to `https://` on this port (443: no port in the URL).
    pub redirect_https: Option<u16>,
    /// Peers whose forwarding headers (and PROXY protocol header) say who the client is.
    pub trusted_proxies: TrustedProxies,
    /// Overrides `[cluster] on_redis_down` for the listener's per-IP limits.
    pub on_redis_down: Option<OnRedisDown>,
    /// Connections from a trusted proxy start with a PROXY protocol header (version 1 or 2).
    pub proxy_protocol: bool,
}

/// The networks of the proxies in front of a listener: only a peer in one of them may say, in `X-Forwarded-For`,
/// `Forwarded` or a PROXY protocol header, which client it speaks for. IPv4-mapped networks are the IPv4 ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<ipnet::IpNet>);

/// A rate of handshakes per client: `per_second` on average, `burst` more at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeRate {
    pub per_second: u32,
    pub burst: u32,
}

impl Listener {
    /// A listener with no access rules or limits.
    pub fn new(name: &str, address: SocketAddr) -> Listener {
        Listener {
            name: name.into(),
            address,
            access: Access::default(),
            max_connections_per_ip: None,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            handshake_rate: None,
            tls: None,
            redirect_https: None,
            trusted_proxies: TrustedProxies::default(),
            on_redis_down: None,
            proxy_protocol: false,
        }
    }
}

/// The prefix length IPv6 clients are grouped by for per-IP limits.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// The longest IPv6 prefix: one address.
pub const MAX_IPV6_PREFIX: u8 = 128;
/// The highest `handshakes_per_second_per_ip` (a handshake every microsecond; above it the limit means nothing).
pub const MAX_HANDSHAKE_RATE: u32 = 1_000_000;

/// Client addresses let in: those in no `deny` network and, when `allow` lists any, in one of those. A client in
/// both is denied (as in HAProxy's and Envoy's deny-first rules).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub allow: Vec<ipnet::IpNet>,
    pub deny: Vec<ipnet::IpNet>,
}

/// Which `Origin` a WebSocket upgrade may come from (browsers send it; a page from another site must not open a
/// WebSocket with the user's cookies: cross-site WebSocket hijacking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRule {
    pub allowed: Vec<OriginPattern>,
    /// An upgrade without `Origin` (not from a browser) is let through.
    pub allow_missing: bool,
}

/// One allowed origin: scheme, host (exact, or `*.` and a suffix) and port (the scheme's default when not
/// written), all lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    pub scheme: String,
    /// `example.com`, or `.example.com` for `*.example.com` (any name ending in it, not `example.com` itself).
    pub host: String,
    pub wildcard: bool,
    pub port: u16,
}

/// Which requests go to which upstream, and how their WebSocket connections are relayed.
#[derive(Debug, Clone)]
pub struct Route {
    /// For logs: the route's `name`, or `route #N` (1-based, in file order).
    pub name: String,
    /// Only requests accepted on this listener match; `None` = any listener.
    pub listener: Option<String>,
    pub host: HostMatch,
    pub path: PathMatch,
    /// Headers that must all be present with these values (names lowercase, values compared exactly).
    pub headers: Vec<(String, String)>,
    /// Index into [`Config::upstreams`]; `None` for a route of `kind = "llm"`, which the LLM gateway serves itself
    /// (`Config::llm`).
    pub upstream: Option<usize>,
    pub relay: Relay,
    /// Closes a relayed connection after this long without a byte either way; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// What happens to the client's offer of permessage-deflate.
    pub deflate: Deflate,
    /// Which client addresses may use the route (403 otherwise).
    pub access: Access,
    /// Which origins may open WebSockets on the route; `None` = any.
    pub origins: Option<OriginRule>,
    /// Who may use the route: a token or an API key (401 otherwise), with its keys loaded; `None` = anyone.
    pub auth: Option<std::sync::Arc<crate::auth::Auth>>,
}

/// What a route does with WebSocket extensions (in practice permessage-deflate) offered by the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Deflate {
    /// The offer goes to the backend; if it accepts, compressed frames pass through as they are, and frames-mode
    /// limits count their compressed (wire) sizes.
    #[default]
    Pass,
    /// The offer is removed from the forwarded handshake: both sides speak uncompressed, so every limit and check
    /// sees real message sizes. A backend that accepts an extension anyway is answered 502.
    Strip,
}

/// How a route matches the request's host (the `Host` header without its port, compared case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lowercase host name.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: matches any name ending in it (not `example.com` itself).
    Suffix(String),
}

/// How a route matches the request's path (the request target without its query, as sent: not decoded).
#[derive(Debug, Clone)]
pub enum PathMatch {
    Any,
    /// The path starts with this string (as nginx's and Envoy's prefixes do: `/ws` matches `/ws`, `/ws/a` and
    /// `/wsx`).
    Prefix(String),
    Exact(String),
    Regex(regex::Regex),
}

/// A named group of backend servers and how connections are spread over them.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub balance: Balance,
    /// What `Balance::ConsistentHash` hashes; requests without it fall back to round robin.
    pub hash_key: HashKey,
    pub connect_timeout: Duration,
    pub sticky: Option<Sticky>,
    pub servers: Vec<Server>,
    /// Active health checks; `None` = servers are assumed up (passive outlier detection still applies).
    pub health: Option<HealthCheck>,
    pub outlier: Outlier,
    /// Servers tried after the first one fails before the 101 (each server at most once).
    pub retries: u32,
    /// Retries may be at most this percentage of the handshakes in flight (at least [`MIN_RETRY_CONCURRENCY`]).
    pub retry_budget_percent: u32,
    /// Live connections to the whole upstream; over it new connections get 503.
    pub max_connections: Option<u32>,
    /// Handshakes waiting for a backend's answer; over it new connections get 503.
    pub max_pending_handshakes: Option<u32>,
    /// TLS to the servers (and their health checks), loaded; `None` = plain TCP.
    pub tls: Option<Arc<ClientTls>>,
    /// A server that comes back (up again, back from ejection, or new in a reload) ramps its share of new
    /// connections from 10 % to full over this time.
    pub slow_start: Option<Duration>,
    /// Live connections closed per second on a server being drained (or shed to rebalance).
    pub drain_rate: u32,
    /// Shed connections from the busiest servers when a server joins or returns and the spread of live connections
    /// is uneven by more than this fraction of even; `None` = never.
    pub rebalance: Option<f64>,
    /// Where more servers are found (`discovery = { … }`): they join the balancer as they appear and are drained
    /// (as a server removed from the config is) when they go.
    pub discovery: Option<Discovery>,
}

impl Upstream {
    /// The discovery file, read with the config and watched: a change reloads the config.
    pub fn discovery_file(&self) -> Option<&std::path::Path> {
        match &self.discovery {
            Some(Discovery::File(path)) => Some(path),
            _ => None,
        }
    }
}

/// Where an upstream's servers are found besides its `[[upstream.server]]` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A file of addresses, one a line, read with the config (a change reloads it).
    File(PathBuf),
    /// A DNS name, looked up again when its records' TTL has passed.
    Dns(DnsDiscovery),
    /// A Kubernetes Service's EndpointSlices, watched through the API server.
    Kubernetes(KubernetesDiscovery),
}

/// `discovery = { dns = "app.internal", port = 8080, resolver = "10.0.0.2:53", kind = "a" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDiscovery {
    pub name: String,
    /// The servers' port (`a` and `aaaa`); SRV records carry their own.
    pub port: u16,
    /// The name server asked; `None` = the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    pub kind: DnsKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsKind {
    /// IPv4 addresses (A records).
    A,
    /// IPv6 addresses (AAAA records).
    Aaaa,
    /// Both A and AAAA records.
    Ip,
    /// SRV records: target, port, priority (the lowest are primaries, the others backups) and weight.
    Srv,
}

/// `discovery = { kubernetes = { namespace = "default", service = "app", port = "ws" } }`: the ready endpoints of
/// the Service's EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesDiscovery {
    /// `None` = the pod's own namespace (the service account's `namespace` file), else `default`.
    pub namespace: Option<String>,
    pub service: String,
    pub port: KubernetesPort,
    /// The API server's URL; `None` = in-cluster (`https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`).
    pub api: Option<String>,
    /// The bearer token file; `None` = the service account's.
    pub token_file: Option<PathBuf>,
    /// The CA that signs the API server's certificate; `None` = the service account's.
    pub ca_file: Option<PathBuf>,
}

/// Which port of the endpoints: by its name in the EndpointSlice, or its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubernetesPort {
    Name(String),
    Number(u16),
}

/// Active health checking of an upstream's servers.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// Request path of `http` and `websocket` checks.
    pub path: String,
    /// `Host` of `http` and `websocket` checks; `None` = the server as written in the config.
    pub host: Option<String>,
    /// Statuses an `http` check accepts; empty = any 2xx.
    pub expect_status: Vec<u16>,
    /// Text a `websocket` check sends after the 101, expecting a message back; `None` = a ping, expecting its pong.
    pub send: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that mark a down server up.
    pub rise: u32,
    /// Consecutive failures that mark an up server down.
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthKind {
    /// A TCP connection.
    Tcp,
    /// `GET path` answered with an accepted status.
    Http,
    /// A full upgrade handshake (accept key checked), one round trip, and a clean close 1000.
    WebSocket,
}

/// Passive outlier detection: servers failing real handshakes are ejected for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive failures (connect failure, reset or timeout before the answer, 5xx to the upgrade) that eject a
    /// server; 0 = never.
    pub consecutive_failures: u32,
    /// How long a first ejection lasts; it doubles for a server ejected again soon after, up to [`MAX_EJECTION`].
    pub ejection: Duration,
    /// Never eject more than this percentage of an upstream's servers.
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            ejection: DEFAULT_EJECTION,
            max_ejected_percent: DEFAULT_MAX_EJECTED_PERCENT,
        }
    }
}

/// Default consecutive failures of real handshakes that eject a server.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default length of a first ejection.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(30);
/// The shortest ejection.
pub const MIN_EJECTION: Duration = Duration::from_secs(1);
/// The longest an ejection lasts, however often a server is ejected.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Default share of an upstream's servers that may be ejected at once, in percent.
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
/// The largest percentage a setting may give (`retry_budget_percent`, `max_ejected_percent`).
pub const MAX_PERCENT: u32 = 100;
/// Default number of servers tried after the first one fails.
pub const DEFAULT_RETRIES: u32 = 2;
/// The most retries an upstream may ask for.
pub const MAX_RETRIES: u32 = 100;
/// Default share of the handshakes in flight that may be retries.
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
/// Retries always allowed in flight, whatever the budget says (so that a quiet upstream can still retry).
pub const MIN_RETRY_CONCURRENCY: u32 = 3;
/// The smallest connection or handshake limit: 0 would refuse everything (leaving the key out means no limit).
pub const MIN_CONNECTION_LIMIT: u32 = 1;
/// Default pace of a drain: connections closed per second.
pub const DEFAULT_DRAIN_RATE: u32 = 50;
/// The slowest drain pace.
pub const MIN_DRAIN_RATE: u32 = 1;
/// The fastest drain pace.
pub const MAX_DRAIN_RATE: u32 = 100_000;
/// Default time between two health check rounds of an upstream.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default time a health check probe may take before it fails.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default request path of `http` and `websocket` health checks.
pub const DEFAULT_HEALTH_PATH: &str = "/";
/// Default consecutive successes that mark a down server up.
pub const DEFAULT_RISE: u32 = 2;
/// Default consecutive failures that mark an up server down.
pub const DEFAULT_FALL: u32 = 3;
/// The fewest consecutive results `rise` and `fall` may ask for.
pub const MIN_RISE_FALL: u32 = 1;
/// The most consecutive results `rise` and `fall` may ask for.
pub const MAX_RISE_FALL: u32 = 1000;
/// The statuses an `http` health check may expect: every HTTP status.
pub const HTTP_STATUSES: std::ops::RangeInclusive<u16> = 100..=599;
/// The shortest health check interval.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
/// Default fraction of even by which the spread of live connections may differ before `rebalance` sheds.
pub const DEFAULT_REBALANCE_THRESHOLD: f64 = 0.1;
/// The largest `rebalance_threshold` (the smallest is anything above 0).
pub const MAX_REBALANCE_THRESHOLD: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin, as nginx does it.
    RoundRobin,
    /// Fewest live connections for its weight; ties in round-robin order.
    LeastConn,
    /// A hash ring over `hash_key`: adding or removing one of N servers moves about 1/N of the keys.
    ConsistentHash,
    /// Two servers drawn at random (by weight); the one with fewer live connections for its weight.
    RandomTwo,
    /// The client's IP on the hash ring.
    SourceIp,
}

/// The part of a request that consistent hashing maps to a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A header's value (name lowercase).
    Header(String),
    Cookie(String),
    /// A query-string parameter.
    Query(String),
    SourceIp,
    Path,
}

/// How a client is kept on the server it was first sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// wsgate sets a cookie naming the server (by a keyed hash, not its address).
    Cookie(StickyCookie),
    /// Requests with the same value of this header (name lowercase) go to the same server, on the hash ring.
    Header(String),
    /// Requests from the same IP go to the same server, on the hash ring.
    SourceIp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyCookie {
    pub name: String,
    pub path: String,
    /// `Max-Age` of the cookie; `None` = a session cookie.
    pub max_age: Option<Duration>,
    /// Keep the cookie in the request forwarded to the backend (by default it is removed).
    pub forward_cookie: bool,
    /// Key of the hash that names a server in the cookie. Without one, the upstream's name is the key: cookies
    /// survive restarts either way, but only a secret keeps the server ids from being computed from addresses.
    pub secret: String,
}

/// A backend server as configured and as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// As written by the user (`host:port`): its identity for logs, balancer state and sticky cookies.
    pub name: String,
    pub address: SocketAddr,
    /// Relative share of new connections (1 to [`MAX_WEIGHT`]).
    pub weight: u32,
    /// Takes connections only when every primary server is down or ejected.
    pub backup: bool,
    /// Takes no new connections; its live ones are closed at the upstream's `drain_rate`.
    pub drain: bool,
    /// Live connections to this server; when every server is at its limit new connections get 503.
    pub max_connections: Option<u32>,
}

impl Upstream {
    /// An upstream with every setting but its name, servers and balancing at its default.
    pub fn new(name: &str, servers: Vec<Server>) -> Upstream {
        Upstream {
            name: name.into(),
            balance: Balance::RoundRobin,
            hash_key: HashKey::SourceIp,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            sticky: None,
            servers,
            health: None,
            outlier: Outlier::default(),
            retries: DEFAULT_RETRIES,
            retry_budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            max_connections: None,
            max_pending_handshakes: None,
            tls: None,
            slow_start: None,
            drain_rate: DEFAULT_DRAIN_RATE,
            rebalance: None,
            discovery: None,
        }
    }
}

/// Default worker threads: 0 = one per available core.
pub const DEFAULT_WORKERS: usize = 0;
/// The most worker threads.
pub const MAX_WORKERS: usize = 1024;

/// Default server weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// The smallest server weight.
pub const MIN_WEIGHT: u32 = 1;
/// The largest server weight.
pub const MAX_WEIGHT: u32 = 1000;

/// The timeouts quick mode takes from its flags.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// Bytes both ways, blind to frames.
    Tunnel(TunnelRules),
    /// Frame-aware: message counts, limits, keepalive pings, protocol checks, close codes, 1001 on drain.
    Frames(FrameRules),
}

impl Relay {
    /// The tunnel with its default rules.
    pub fn tunnel() -> Relay {
        Relay::Tunnel(TunnelRules::default())
    }
}

/// What the tunnel relay enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelRules {
    /// How long a side may leave bytes for it unread before the connection is closed.
    pub write_timeout: Duration,
    /// Large transfers between two plain TCP sockets move with splice(2) through a pipe (Linux), not through
    /// wsgate's memory.
    pub splice: bool,
}

impl Default for TunnelRules {
    fn default() -> Self {
        Self {
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            splice: true,
        }
    }
}

/// Frames is the default: measured at the tunnel's CPU per echo (within the noise), it adds close codes, 1001 on
/// drain and message counts at no cost.
impl Default for Relay {
    fn default() -> Self {
        Relay::Frames(FrameRules::default())
    }
}

/// Default time wsgate waits for the close replies after sending close frames of its own.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default time a pong may take to answer wsgate's ping.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time a side may take to accept bytes wsgate has for it before it counts as stuck.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default messages a side may send at once on top of `messages_per_second`.
pub const DEFAULT_BURST: u32 = 0;

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
            burst: DEFAULT_BURST,
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
    OutOfRange { key: &'static str, expected: String },
}

/// Seconds in a day.
const DAY_SECS: u64 = 24 * 3600;
/// The longest duration any setting may have, in days (longer ones would only overflow clocks).
pub const MAX_DURATION_DAYS: u64 = 30;
/// The longest duration any setting may have: [`MAX_DURATION_DAYS`].
pub const MAX_DURATION: Duration = Duration::from_secs(MAX_DURATION_DAYS * DAY_SECS);
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

/// A limit as the messages write it: in its largest whole unit, `100ms`, `1s`, `5m`, `1h` or `30 days`.
pub(crate) fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 || d.subsec_nanos() != 0 {
        return format!("{}ms", d.as_millis());
    }
    match secs {
        DAY_SECS => "1 day".to_string(),
        _ if secs.is_multiple_of(DAY_SECS) => format!("{} days", secs / DAY_SECS),
        _ if secs.is_multiple_of(3600) => format!("{}h", secs / 3600),
        _ if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
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

/// What a timeout's allowed range is, for the problems below.
fn timeout_range() -> String {
    format!("more than 0 and at most {}", human_duration(MAX_DURATION))
}

/// A write timeout's allowed range, for [`FrameRules::problems`] and [`TunnelRules::problems`].
fn write_timeout_problem(d: Duration) -> Option<(&'static str, String)> {
    (d.is_zero() || d > MAX_DURATION).then(|| ("write_timeout", timeout_range()))
}

impl TunnelRules {
    /// Every rule out of range, as (key, what is expected).
    pub(crate) fn problems(&self) -> Vec<(&'static str, String)> {
        write_timeout_problem(self.write_timeout).into_iter().collect()
    }
}

impl FrameRules {
    /// Every rule out of range, as (key, what is expected).
    pub(crate) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self
            .ping_interval
            .is_some_and(|d| !(MIN_PING_INTERVAL..=MAX_DURATION).contains(&d))
        {
            problems.push((
                "ping_interval",
                format!(
                    "from {} to {}",
                    human_duration(MIN_PING_INTERVAL),
                    human_duration(MAX_DURATION)
                ),
            ));
        }
        for (key, d) in [
            ("pong_timeout", self.pong_timeout),
            ("close_timeout", self.close_timeout),
        ] {
            if d.is_zero() || d > MAX_DURATION {
                problems.push((key, timeout_range()));
            }
        }
        problems.extend(write_timeout_problem(self.write_timeout));
        if self.messages_per_second == Some(0) {
            problems.push(("messages_per_second", "at least 1".into()));
        }
        if self.max_message_size == Some(0) {
            problems.push(("max_message_size", "at least 1 byte".into()));
        }
        if self.max_frame_size == Some(0) {
            problems.push(("max_frame_size", "at least 1 byte".into()));
        }
        problems
    }
}

impl Config {
    /// Sets the relay mode of every route, checking its rules.
    pub fn with_relay(mut self, relay: Relay) -> Result<Config, ConfigError> {
        let problems = match &relay {
            Relay::Frames(rules) => rules.problems(),
            Relay::Tunnel(rules) => rules.problems(),
        };
        if let Some((key, expected)) = problems.into_iter().next() {
            return Err(ConfigError::OutOfRange { key, expected });
        }
        for route in &mut self.routes {
            route.relay = relay;
        }
        Ok(self)
    }

    /// The quick-mode configuration: one listener, one route for every request, one upstream with round robin
    /// over `servers` (each `host:port`). The same model a file gives, so both share one code path after parsing.
    pub fn quick(
        listen: &str,
        servers: &[String],
        timeouts: Timeouts,
        log_format: LogFormat,
    ) -> Result<Config, ConfigError> {
        let listen: SocketAddr = listen.parse().map_err(|_| ConfigError::Listen(listen.to_string()))?;
        let servers = servers
            .iter()
            .map(|name| {
                resolve(name).map_err(|reason| ConfigError::Resolve {
                    name: name.clone(),
                    reason,
                })
            })
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
                    expected: format!("at most {}", human_duration(MAX_DURATION)),
                });
            }
        }
        Ok(Config {
            source: None,
            admin: None,
            tracing: None,
            llm: None,
            cluster: None,
            server: ServerSettings {
                drain_timeout: timeouts.drain,
                handshake_timeout: timeouts.handshake,
                log_format,
                ..ServerSettings::default()
            },
            listeners: vec![Listener::new("quick", listen)],
            routes: vec![Route {
                name: "quick".into(),
                listener: None,
                host: HostMatch::Any,
                path: PathMatch::Any,
                headers: Vec::new(),
                upstream: Some(0),
                relay: Relay::default(),
                idle_timeout: timeouts.idle.filter(|d| !d.is_zero()),
                deflate: Deflate::default(),
                access: Access::default(),
                origins: None,
                auth: None,
            }],
            upstreams: vec![Upstream {
                connect_timeout: timeouts.connect,
                ..Upstream::new("quick", servers)
            }],
        })
    }

    /// Every server of every upstream.
    pub fn server_count(&self) -> usize {
        self.upstreams.iter().map(|u| u.servers.len()).sum()
    }
}

/// Resolves `host:port` (an IP or a name) to its first address, as a server of the default weight.
pub(crate) fn resolve(name: &str) -> Result<Server, String> {
    let address = name
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "no address found".to_string())?;
    Ok(Server {
        name: name.to_string(),
        address,
        weight: DEFAULT_WEIGHT,
        backup: false,
        drain: false,
        max_connections: None,
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
    fn limits_are_written_as_people_write_them() {
        assert_eq!(human_duration(MIN_PING_INTERVAL), "100ms");
        assert_eq!(human_duration(MIN_EJECTION), "1s");
        assert_eq!(human_duration(MAX_EJECTION), "5m");
        assert_eq!(human_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(human_duration(Duration::from_secs(DAY_SECS)), "1 day");
        assert_eq!(human_duration(MAX_DURATION), "30 days");
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
        assert_eq!(cfg.upstreams[0].servers[0].address.port(), 9000);
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
