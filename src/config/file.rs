//! The config file: TOML read through serde into a schema that mirrors the file (unknown keys refused), then
//! checked and turned into the [`Config`] model. Every problem names the file, the line and column, the key, and
//! what was expected; the checks after parsing report every problem they find, not only the first.
//!
//! The keys are documented in `docs/config.md`.

mod auth;
mod llm;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use toml::Spanned;

use crate::tls::client::{ClientTls, TlsSettings};
use crate::tls::server::{CertFiles, ServerTls};

use super::{
    Access, AccessLogTarget, AdminSettings, Balance, Config, DEFAULT_CONNECT_TIMEOUT, DEFAULT_FALL,
    DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_PATH, DEFAULT_HEALTH_TIMEOUT, DEFAULT_IPV6_PREFIX,
    DEFAULT_REBALANCE_THRESHOLD, DEFAULT_RISE, DEFAULT_STICKY_COOKIE, DEFAULT_STICKY_PATH, DEFAULT_WEIGHT,
    DEFAULT_WRITE_TIMEOUT, Deflate, FrameRules, HTTP_STATUSES, HandshakeRate, HashKey, HealthCheck, HealthKind,
    HostMatch, Listener, LogFormat, MAX_DRAIN_RATE, MAX_DURATION, MAX_DURATION_DAYS, MAX_EJECTION, MAX_HANDSHAKE_RATE,
    MAX_IPV6_PREFIX, MAX_PERCENT, MAX_REBALANCE_THRESHOLD, MAX_RETRIES, MAX_RISE_FALL, MAX_WEIGHT, MAX_WORKERS,
    MIN_CONNECTION_LIMIT, MIN_DRAIN_RATE, MIN_EJECTION, MIN_HEALTH_INTERVAL, MIN_RISE_FALL, MIN_STICKY_MAX_AGE,
    MIN_WEIGHT, OriginPattern, OriginRule, Outlier, PathMatch, Relay, Route, Server, ServerSettings, Sticky,
    StickyCookie, TrustedProxies, TunnelRules, Upstream, human_duration, parse_duration, parse_size,
};
use super::{Cluster, Discovery, DnsDiscovery, DnsKind, KubernetesDiscovery, KubernetesPort, OnRedisDown};
use super::{DEFAULT_CLUSTER_REBALANCE_RATE, DEFAULT_CLUSTER_REBALANCE_THRESHOLD};
use super::{DEFAULT_SERVICE_NAME, MAX_LISTEN_BACKLOG, MAX_TCP_KEEPALIVE, TracingSettings};

/// Why a config file cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", lines(.0))]
    Invalid(Vec<Problem>),
}

fn lines(problems: &[Problem]) -> String {
    problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n")
}

/// One problem in a config file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; 0 when the problem has no place (such as a file with no listener).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
        }
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string()).map_err(FileError::Invalid)
}

/// Validates config text; `file` names it in the problems.
pub fn parse(text: &str, file: &str) -> Result<Config, Vec<Problem>> {
    let mut report = Report {
        text,
        file,
        problems: Vec::new(),
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            // serde stops at the first problem of syntax or type.
            report.at(e.span(), e.message().trim_end().to_string());
            return Err(report.problems);
        }
    };
    let config = build(raw, &mut report);
    if report.problems.is_empty() {
        Ok(Config {
            source: Some(text.into()),
            ..config
        })
    } else {
        Err(report.problems)
    }
}

struct Report<'a> {
    text: &'a str,
    file: &'a str,
    problems: Vec<Problem>,
}

impl Report<'_> {
    /// A path written in the file: relative ones are relative to the file's directory.
    fn path(&self, written: &str) -> PathBuf {
        let written = Path::new(written);
        match Path::new(self.file).parent() {
            Some(dir) if written.is_relative() => dir.join(written),
            _ => written.to_path_buf(),
        }
    }

    fn at(&mut self, span: Option<Range<usize>>, message: String) {
        let (line, column) = match span {
            Some(span) => line_column(self.text, span.start),
            None => (0, 0),
        };
        self.problems.push(Problem {
            file: self.file.to_string(),
            line,
            column,
            message,
        });
    }

    fn key<T>(&mut self, value: &Spanned<T>, key: &str, message: impl fmt::Display) {
        self.at(Some(value.span()), format!("`{key}`: {message}"));
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

// ---- The schema, as written in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    server: RawServer,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    upstream: Vec<Spanned<RawUpstream>>,
    tracing: Option<Spanned<RawTracing>>,
    llm: Option<Spanned<llm::RawLlm>>,
    cluster: Option<Spanned<RawCluster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis: Option<Spanned<String>>,
    instance: Option<Spanned<String>>,
    on_redis_down: Option<RawOnRedisDown>,
    rebalance: Option<Spanned<bool>>,
    rebalance_threshold: Option<Spanned<f64>>,
    rebalance_rate: Option<Spanned<u32>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawOnRedisDown {
    Open,
    Closed,
}

impl From<RawOnRedisDown> for OnRedisDown {
    fn from(raw: RawOnRedisDown) -> Self {
        match raw {
            RawOnRedisDown::Open => OnRedisDown::Open,
            RawOnRedisDown::Closed => OnRedisDown::Closed,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTracing {
    otlp_endpoint: Spanned<String>,
    service_name: Option<Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Spanned<String>,
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    protect_reads: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    drain_timeout: Option<Spanned<Dur>>,
    handshake_timeout: Option<Spanned<Dur>>,
    log_format: Option<RawLogFormat>,
    workers: Option<Spanned<usize>>,
    watch: Option<bool>,
    max_connections: Option<Spanned<u32>>,
    listen_backlog: Option<Spanned<u32>>,
    tcp_keepalive: Option<Spanned<Dur>>,
    access_log: Option<Spanned<String>>,
    #[serde(default)]
    access_log_redact: Vec<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawLogFormat {
    Text,
    Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    address: Spanned<String>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    max_connections_per_ip: Option<Spanned<u32>>,
    ipv6_prefix: Option<Spanned<u8>>,
    handshakes_per_second_per_ip: Option<Spanned<u32>>,
    handshake_burst: Option<Spanned<u32>>,
    on_redis_down: Option<RawOnRedisDown>,
    tls: Option<Spanned<RawCertificate>>,
    #[serde(default)]
    certificate: Vec<Spanned<RawCertificate>>,
    redirect_https: Option<Spanned<bool>>,
    redirect_https_port: Option<Spanned<u16>>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    proxy_protocol: Option<Spanned<bool>>,
}

/// `tls = { cert, key }` or one `[[listener.certificate]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: String,
    key: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    default: bool,
}

/// An upstream's `tls = { ca, server_name, cert, key, insecure_skip_verify }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: Option<String>,
    server_name: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<Spanned<String>>,
    listener: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    path_regex: Option<Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<Spanned<String>, String>,
    upstream: Option<Spanned<String>>,
    kind: Option<Spanned<RawRouteKind>>,
    relay: Option<Spanned<RawRelay>>,
    idle_timeout: Option<Spanned<Dur>>,
    permessage_deflate: Option<Spanned<RawDeflate>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    allowed_origins: Option<Spanned<Vec<Spanned<String>>>>,
    allow_missing_origin: Option<Spanned<bool>>,
    auth: Option<Spanned<auth::RawAuth>>,
    // The frames relay's rules (relay = "frames" only).
    max_message_size: Option<Spanned<Size>>,
    max_frame_size: Option<Spanned<Size>>,
    messages_per_second: Option<Spanned<u32>>,
    burst: Option<Spanned<u32>>,
    ping_interval: Option<Spanned<Dur>>,
    pong_timeout: Option<Spanned<Dur>>,
    validate_utf8: Option<Spanned<bool>>,
    close_timeout: Option<Spanned<Dur>>,
    write_timeout: Option<Spanned<Dur>>,
    // The tunnel's (relay = "tunnel" only).
    splice: Option<Spanned<bool>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawDeflate {
    Pass,
    Strip,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawRouteKind {
    Proxy,
    Llm,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawRelay {
    Tunnel,
    Frames,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Spanned<String>,
    balance: Option<Spanned<RawBalance>>,
    hash_key: Option<Spanned<HashKey>>,
    connect_timeout: Option<Spanned<Dur>>,
    sticky: Option<Spanned<RawSticky>>,
    #[serde(default)]
    server: Vec<Spanned<RawServerEntry>>,
    health: Option<Spanned<RawHealth>>,
    outlier: Option<RawOutlier>,
    retries: Option<Spanned<u32>>,
    retry_budget_percent: Option<Spanned<u32>>,
    max_connections: Option<Spanned<u32>>,
    max_pending_handshakes: Option<Spanned<u32>>,
    slow_start: Option<Spanned<Dur>>,
    drain_rate: Option<Spanned<u32>>,
    rebalance: Option<bool>,
    rebalance_threshold: Option<Spanned<f64>>,
    tls: Option<Spanned<RawUpstreamTls>>,
    discovery: Option<Spanned<RawDiscovery>>,
}

/// Where more servers of an upstream are found: one of `file`, `dns` and `kubernetes`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    /// A file of addresses, one a line (`#` starts a comment), relative to the config file.
    file: Option<Spanned<String>>,
    /// A DNS name, with `port` (not for SRV), `resolver` and `kind`.
    dns: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    resolver: Option<Spanned<String>>,
    kind: Option<Spanned<RawDnsKind>>,
    kubernetes: Option<Spanned<RawKubernetes>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawDnsKind {
    A,
    Aaaa,
    Ip,
    Srv,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    namespace: Option<Spanned<String>>,
    service: Spanned<String>,
    port: Spanned<RawKubernetesPort>,
    api: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawKubernetesPort {
    Number(u16),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Spanned<RawHealthKind>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    expect_status: Option<Spanned<Vec<Spanned<u16>>>>,
    send: Option<Spanned<String>>,
    interval: Option<Spanned<Dur>>,
    timeout: Option<Spanned<Dur>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawHealthKind {
    Tcp,
    Http,
    Websocket,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<Spanned<u32>>,
    ejection: Option<Spanned<Dur>>,
    max_ejected_percent: Option<Spanned<u32>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawBalance {
    RoundRobin,
    LeastConn,
    ConsistentHash,
    RandomTwo,
    SourceIp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerEntry {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
    backup: Option<bool>,
    drain: Option<bool>,
    max_connections: Option<Spanned<u32>>,
}

/// `sticky = "source_ip"`, or a table with `cookie = "NAME"` or `header = "NAME"`.
enum RawSticky {
    SourceIp,
    Table(RawStickyTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStickyTable {
    cookie: Option<String>,
    header: Option<String>,
    path: Option<String>,
    max_age: Option<Dur>,
    forward_cookie: Option<bool>,
    secret: Option<String>,
}

impl<'de> Deserialize<'de> for RawSticky {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StickyVisitor;
        impl<'de> Visitor<'de> for StickyVisitor {
            type Value = RawSticky;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""source_ip", { cookie = "NAME" } or { header = "NAME" }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSticky, E> {
                match v {
                    "source_ip" => Ok(RawSticky::SourceIp),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawSticky, A::Error> {
                RawStickyTable::deserialize(de::value::MapAccessDeserializer::new(map)).map(RawSticky::Table)
            }
        }
        deserializer.deserialize_any(StickyVisitor)
    }
}

/// A duration written as a string: `250ms`, `30s`, `5m`, `1h`.
#[derive(Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        let d = parse_duration(&s).map_err(de::Error::custom)?;
        if d > MAX_DURATION {
            return Err(de::Error::custom(format!(
                "duration `{s}` is over the {MAX_DURATION_DAYS}-day maximum"
            )));
        }
        Ok(Dur(d))
    }
}

/// A size written as a string (`16MiB`, `64KiB`) or a number of bytes.
#[derive(Clone, Copy)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size such as "16MiB", "64KiB" or a number of bytes"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        let expected = "header:NAME, cookie:NAME, query:NAME, source_ip or path";
        let named = |kind: fn(String) -> HashKey, name: &str| {
            if name.is_empty() {
                Err(de::Error::custom(format!(
                    "hash key `{s}` names nothing: expected {expected}"
                )))
            } else {
                Ok(kind(name.to_string()))
            }
        };
        match s.split_once(':') {
            Some(("header", name)) => named(|n| HashKey::Header(n.to_ascii_lowercase()), name),
            Some(("cookie", name)) => named(HashKey::Cookie, name),
            Some(("query", name)) => named(HashKey::Query, name),
            None if s == "source_ip" => Ok(HashKey::SourceIp),
            None if s == "path" => Ok(HashKey::Path),
            _ => Err(de::Error::custom(format!(
                "unknown hash key `{s}`: expected {expected}"
            ))),
        }
    }
}

// ---- From the schema to the model ----

fn build(raw: RawFile, report: &mut Report<'_>) -> Config {
    let mut server = build_server(&raw.server, report);
    let listeners = build_listeners(&raw.listener, report);
    let upstreams = build_upstreams(&raw.upstream, report);
    let routes = build_routes(&raw.route, &listeners, &upstreams, report);
    let admin = raw.admin.as_ref().and_then(|a| build_admin(a, &listeners, report));
    let tracing = raw.tracing.as_ref().and_then(|t| build_tracing(t, report));
    let llm = raw.llm.as_ref().and_then(|l| llm::build(l, report)).map(Arc::new);
    let cluster = raw.cluster.as_ref().map(|c| build_cluster(c, report));
    check_llm_routes(&raw.route, llm.is_some(), report);
    // A query parameter a route reads a credential from is a secret wherever it is sent.
    for auth in routes.iter().filter_map(|r| r.auth.as_deref()) {
        for name in auth.query_names() {
            let name = name.to_ascii_lowercase();
            if !server.access_log_redact.contains(&name) {
                server.access_log_redact.push(name);
            }
        }
    }
    Config {
        source: None,
        server,
        admin,
        listeners,
        routes,
        upstreams,
        tracing,
        llm,
        cluster,
    }
}

/// `[cluster]`: a Redis URL is checked here (connecting is for the running server); the instance's name is the
/// host name and the process id when not given.
fn build_cluster(c: &Spanned<RawCluster>, report: &mut Report<'_>) -> Cluster {
    let c = c.get_ref();
    let redis = c
        .redis
        .as_ref()
        .and_then(|url| match crate::cluster::redis::check_url(url.get_ref()) {
            Ok(()) => Some(url.get_ref().clone()),
            Err(why) => {
                report.key(url, "cluster.redis", format!("not a Redis URL: {why}"));
                None
            }
        });
    let instance = match &c.instance {
        Some(name) if name.get_ref().trim().is_empty() || name.get_ref().len() > 128 => {
            report.key(name, "cluster.instance", "must be a name of 1 to 128 characters");
            String::new()
        }
        Some(name) => name.get_ref().trim().to_string(),
        None => default_instance(),
    };
    let on = c.rebalance.as_ref().is_some_and(|r| *r.get_ref());
    if on
        && c.redis.is_none()
        && let Some(r) = &c.rebalance
    {
        report.key(
            r,
            "cluster.rebalance",
            "needs `redis`: the fleet's counts are kept there",
        );
    }
    for (given, key) in [
        (c.rebalance_threshold.as_ref().map(Spanned::span), "rebalance_threshold"),
        (c.rebalance_rate.as_ref().map(Spanned::span), "rebalance_rate"),
    ] {
        if given.is_some() && !on {
            report.at(given, format!("cluster.{key}: applies only with `rebalance = true`"));
        }
    }
    let threshold = match &c.rebalance_threshold {
        Some(t) if !(0.0..=MAX_REBALANCE_THRESHOLD).contains(t.get_ref()) => {
            report.key(
                t,
                "cluster.rebalance_threshold",
                format!("must be from 0 to {MAX_REBALANCE_THRESHOLD}"),
            );
            DEFAULT_CLUSTER_REBALANCE_THRESHOLD
        }
        Some(t) => *t.get_ref(),
        None => DEFAULT_CLUSTER_REBALANCE_THRESHOLD,
    };
    Cluster {
        redis,
        instance,
        on_redis_down: c.on_redis_down.map(OnRedisDown::from).unwrap_or_default(),
        rebalance: on.then_some(threshold),
        rebalance_rate: limited(&c.rebalance_rate, "cluster.rebalance_rate", 1..=MAX_DRAIN_RATE, report)
            .unwrap_or(DEFAULT_CLUSTER_REBALANCE_RATE),
    }
}

/// This host's name and the process id: `edge-a-4127`.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wsgate".to_string());
    format!("{host}-{}", std::process::id())
}

/// Routes of `kind = "llm"` serve `[llm]`'s providers: they need the section, and take no upstream, relay or
/// route authentication (virtual keys are the gateway's own).
fn check_llm_routes(routes: &[Spanned<RawRoute>], has_llm: bool, report: &mut Report<'_>) {
    for route in routes {
        let r = route.get_ref();
        let Some(kind) = r.kind.as_ref().filter(|k| *k.get_ref() == RawRouteKind::Llm) else {
            continue;
        };
        if !has_llm {
            report.key(kind, "kind", "an `llm` route needs an [llm] section with its providers");
        }
        if let Some(upstream) = &r.upstream {
            report.key(
                upstream,
                "upstream",
                "an `llm` route serves [llm]'s providers: leave `upstream` out",
            );
        }
        if let Some(relay) = &r.relay {
            report.key(relay, "relay", "an `llm` route relays no WebSocket: leave `relay` out");
        }
        if let Some(auth) = &r.auth {
            report.key(
                auth,
                "auth",
                "an `llm` route checks the gateway's own keys (`wsgate llm-key`): leave `auth` out",
            );
        }
    }
}

/// Headers an export may not set: wsgate writes them itself.
const OWN_EXPORT_HEADERS: [&str; 5] = [
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
];

/// `[tracing]`: the full traces URL (http or https, a host, a path; no user information, which would end up in
/// logs), a service name, extra headers, and for https its CA (the system's CA certificates without one).
fn build_tracing(raw: &Spanned<RawTracing>, report: &mut Report<'_>) -> Option<TracingSettings> {
    let t = raw.get_ref();
    let endpoint = &t.otlp_endpoint;
    const EXPECTED: &str = "expected the full OTLP/HTTP traces URL, e.g. \"http://127.0.0.1:4318/v1/traces\"";
    let problem = match endpoint.get_ref().parse::<http::Uri>() {
        Err(e) => Some(format!("not a URL ({e}): {EXPECTED}")),
        Ok(uri) => match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(authority)) if authority.as_str().contains('@') => {
                Some("user information in the URL is not supported: give credentials in `headers`".into())
            }
            (Some("http" | "https"), Some(authority)) if authority.host().is_empty() => {
                Some(format!("no host: {EXPECTED}"))
            }
            (Some("http" | "https"), Some(_)) if uri.path() == "/" => Some(format!(
                "no path: {EXPECTED} (the URL is used as written; OTLP/HTTP collectors take traces on /v1/traces)"
            )),
            (Some("http" | "https"), Some(_)) => None,
            (Some(other), _) if other != "http" && other != "https" => {
                Some(format!("scheme `{other}`: only http:// and https:// are supported"))
            }
            _ => Some(EXPECTED.to_string()),
        },
    };
    if let Some(problem) = &problem {
        report.key(endpoint, "tracing.otlp_endpoint", problem);
    }
    let service_name = match &t.service_name {
        None => DEFAULT_SERVICE_NAME.to_string(),
        Some(name) => {
            if name.get_ref().trim().is_empty() || name.get_ref().chars().any(char::is_control) {
                report.key(
                    name,
                    "tracing.service_name",
                    "expected a non-empty name without control characters",
                );
            }
            name.get_ref().clone()
        }
    };
    let mut headers = Vec::with_capacity(t.headers.len());
    for (name, value) in &t.headers {
        let parsed_name = http::HeaderName::from_bytes(name.as_bytes());
        let parsed_value = http::HeaderValue::from_str(value.get_ref());
        match (parsed_name, parsed_value) {
            (Ok(n), _) if OWN_EXPORT_HEADERS.contains(&n.as_str()) => report.key(
                value,
                "tracing.headers",
                format!("`{name}` is written by wsgate itself and cannot be set"),
            ),
            (Ok(n), Ok(v)) => headers.push((n, v)),
            (Err(_), _) => report.key(value, "tracing.headers", format!("`{name}` is not a header name")),
            (Ok(_), Err(_)) => report.key(
                value,
                "tracing.headers",
                format!("the value of `{name}` is not a header value (visible ASCII and spaces only)"),
            ),
        }
    }
    let uri = endpoint
        .get_ref()
        .parse::<http::Uri>()
        .ok()
        .filter(|_| problem.is_none())?;
    let tls = https_tls(
        &uri,
        t.ca.as_ref(),
        endpoint,
        ("tracing.ca", "tracing.otlp_endpoint"),
        report,
    )
    .ok()?;
    Some(TracingSettings {
        endpoint: uri,
        service_name,
        headers,
        tls,
    })
}

/// The TLS of an `https://` URL a key names (`url`): the system's CA certificates, or the file of `ca`; `None` for
/// `http://`. `Err` once a problem is reported: a CA that does not load, or a `ca` for an `http://` URL. `keys`: the
/// names of the `ca` key and the URL's key, for the problems.
fn https_tls(
    uri: &http::Uri,
    ca: Option<&Spanned<String>>,
    url: &Spanned<String>,
    keys: (&str, &str),
    report: &mut Report<'_>,
) -> Result<Option<Arc<ClientTls>>, ()> {
    match (uri.scheme_str(), ca) {
        (Some("https"), ca) => {
            let loaded = match ca {
                Some(ca) => ClientTls::load(TlsSettings {
                    ca: Some(report.path(ca.get_ref())),
                    ..TlsSettings::default()
                }),
                None => ClientTls::system_roots(),
            };
            match (loaded, ca) {
                (Ok(tls), _) => return Ok(Some(Arc::new(tls))),
                (Err(e), Some(ca)) => report.key(ca, keys.0, e),
                (Err(e), None) => report.key(url, keys.1, e),
            }
            Err(())
        }
        (_, Some(ca)) => {
            report.key(ca, keys.0, "applies to https:// URLs only");
            Err(())
        }
        (_, None) => Ok(None),
    }
}

/// `[admin]`: its own address (never a proxy listener's), a token read from its file now (its trailing newline is
/// not part of it), and no address beyond loopback without one.
fn build_admin(raw: &Spanned<RawAdmin>, listeners: &[Listener], report: &mut Report<'_>) -> Option<AdminSettings> {
    let a = raw.get_ref();
    let Ok(address) = a.address.get_ref().parse::<SocketAddr>() else {
        report.key(&a.address, "admin.address", "expected IP:PORT, e.g. 127.0.0.1:9090");
        return None;
    };
    if address.port() != 0 && listeners.iter().any(|l| l.address == address) {
        report.key(
            &a.address,
            "admin.address",
            "is a proxy listener's address: the admin listener needs its own",
        );
        return None;
    }
    let token = match &a.token_file {
        None => None,
        Some(file) => {
            let path = report.path(file.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let token = text.strip_suffix('\n').unwrap_or(&text);
                    let token = token.strip_suffix('\r').unwrap_or(token);
                    if token.is_empty() || token.chars().any(|c| c.is_control() || c == ' ') {
                        report.key(
                            file,
                            "admin.token_file",
                            format!("{}: the token must be one line of visible characters", path.display()),
                        );
                        return None;
                    }
                    Some(token.to_string())
                }
                Err(e) => {
                    report.key(
                        file,
                        "admin.token_file",
                        format!("{}: cannot read: {e}", path.display()),
                    );
                    return None;
                }
            }
        }
    };
    if token.is_none() && !address.ip().is_loopback() {
        report.key(
            &a.address,
            "admin.address",
            "an admin listener beyond loopback needs `token_file`: anyone who reaches it could reload and drain",
        );
        return None;
    }
    if token.is_none() && a.protect_reads {
        report.at(Some(raw.span()), "`admin.protect_reads` needs `token_file`".into());
        return None;
    }
    Some(AdminSettings {
        address,
        token,
        protect_reads: a.protect_reads,
    })
}

fn build_server(raw: &RawServer, report: &mut Report<'_>) -> ServerSettings {
    let defaults = ServerSettings::default();
    if let Some(d) = &raw.handshake_timeout
        && d.get_ref().0.is_zero()
    {
        report.key(d, "handshake_timeout", "must be more than 0");
    }
    if let Some(w) = &raw.workers
        && *w.get_ref() > MAX_WORKERS
    {
        report.key(
            w,
            "workers",
            format!("must be at most {MAX_WORKERS} (0 = one per core)"),
        );
    }
    ServerSettings {
        drain_timeout: raw
            .drain_timeout
            .as_ref()
            .map_or(defaults.drain_timeout, |d| d.get_ref().0),
        handshake_timeout: raw
            .handshake_timeout
            .as_ref()
            .map_or(defaults.handshake_timeout, |d| d.get_ref().0),
        log_format: match raw.log_format {
            None => defaults.log_format,
            Some(RawLogFormat::Text) => LogFormat::Text,
            Some(RawLogFormat::Json) => LogFormat::Json,
        },
        workers: raw.workers.as_ref().map_or(defaults.workers, |w| *w.get_ref()),
        watch: raw.watch.unwrap_or(defaults.watch),
        max_connections: limited(
            &raw.max_connections,
            "max_connections",
            MIN_CONNECTION_LIMIT..=u32::MAX,
            report,
        ),
        listen_backlog: limited(&raw.listen_backlog, "listen_backlog", 1..=MAX_LISTEN_BACKLOG, report)
            .unwrap_or(defaults.listen_backlog),
        // "0s" turns it off.
        tcp_keepalive: match &raw.tcp_keepalive {
            None => defaults.tcp_keepalive,
            Some(d) if d.get_ref().0.is_zero() => None,
            Some(d) if d.get_ref().0 > MAX_TCP_KEEPALIVE => {
                report.key(
                    d,
                    "tcp_keepalive",
                    format!(
                        "must be at most {} (\"0s\" turns it off)",
                        human_duration(MAX_TCP_KEEPALIVE)
                    ),
                );
                defaults.tcp_keepalive
            }
            Some(d) => Some(d.get_ref().0),
        },
        access_log: raw
            .access_log
            .as_ref()
            .map_or(defaults.access_log, |t| access_log_target(t, report)),
        access_log_redact: redacted_names(&raw.access_log_redact, report),
    }
}

/// `access_log`: `"stdout"`, `"off"`, or a file (relative to the config file) in a directory that exists, which
/// wsgate creates or appends to.
fn access_log_target(written: &Spanned<String>, report: &mut Report<'_>) -> AccessLogTarget {
    match written.get_ref().as_str() {
        "stdout" => AccessLogTarget::Stdout,
        "off" => AccessLogTarget::Off,
        "" => {
            report.key(written, "access_log", "expected \"stdout\", \"off\" or a file path");
            AccessLogTarget::Off
        }
        path => {
            let path = report.path(path);
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if path.is_dir() {
                report.key(
                    written,
                    "access_log",
                    format!("{} is a directory, not a file", path.display()),
                );
            } else if !dir.is_dir() {
                report.key(
                    written,
                    "access_log",
                    format!("{}: directory {} does not exist", path.display(), dir.display()),
                );
            }
            AccessLogTarget::File(path)
        }
    }
}

/// `access_log_redact`: query parameter names (compared without case), each a non-empty name without `&`, `=`,
/// `?` or `#`.
fn redacted_names(written: &[Spanned<String>], report: &mut Report<'_>) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(written.len());
    for name in written {
        let text = name.get_ref();
        if text.is_empty()
            || text
                .chars()
                .any(|c| matches!(c, '&' | '=' | '?' | '#') || c.is_whitespace())
        {
            report.key(
                name,
                "access_log_redact",
                format!("`{text}` is no query parameter name"),
            );
            continue;
        }
        let lower = text.to_ascii_lowercase();
        if !names.contains(&lower) {
            names.push(lower);
        }
    }
    names
}

/// Reports a name used twice (`what` says what it names).
fn unique_name(seen: &mut HashSet<String>, name: &Spanned<String>, what: &str, report: &mut Report<'_>) {
    if name.get_ref().trim().is_empty() {
        report.key(name, "name", format!("{what} needs a non-empty name"));
    } else if !seen.insert(name.get_ref().clone()) {
        report.key(name, "name", format!("duplicate {what} name `{}`", name.get_ref()));
    }
}

fn build_listeners(raw: &[Spanned<RawListener>], report: &mut Report<'_>) -> Vec<Listener> {
    if raw.is_empty() {
        report.at(
            None,
            "no [[listener]]: at least one is needed, e.g. [[listener]] name = \"public\" address = \"0.0.0.0:8080\""
                .into(),
        );
    }
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut listeners = Vec::with_capacity(raw.len());
    for listener in raw {
        let l = listener.get_ref();
        unique_name(&mut names, &l.name, "listener", report);
        let Ok(address) = l.address.get_ref().parse::<SocketAddr>() else {
            report.key(
                &l.address,
                "address",
                format!(
                    "invalid address `{}`: expected IP:PORT, e.g. 0.0.0.0:8080",
                    l.address.get_ref()
                ),
            );
            continue;
        };
        // Port 0 asks for any free port: each such listener gets its own.
        if address.port() != 0 && !addresses.insert(address) {
            report.key(&l.address, "address", format!("two listeners on {address}"));
        }
        let ipv6_prefix = match &l.ipv6_prefix {
            Some(p) if *p.get_ref() > MAX_IPV6_PREFIX => {
                report.key(p, "ipv6_prefix", format!("must be at most {MAX_IPV6_PREFIX}"));
                DEFAULT_IPV6_PREFIX
            }
            Some(p) => *p.get_ref(),
            None => DEFAULT_IPV6_PREFIX,
        };
        listeners.push(Listener {
            name: l.name.get_ref().clone(),
            address,
            access: build_access(&l.allow, &l.deny, report),
            max_connections_per_ip: limited(
                &l.max_connections_per_ip,
                "max_connections_per_ip",
                MIN_CONNECTION_LIMIT..=u32::MAX,
                report,
            ),
            ipv6_prefix,
            handshake_rate: build_handshake_rate(l, report),
            tls: build_listener_tls(l, report),
            redirect_https: build_redirect(l, report),
            trusted_proxies: TrustedProxies(networks(&l.trusted_proxies, "trusted_proxies", report)),
            proxy_protocol: build_proxy_protocol(l, report),
            on_redis_down: l.on_redis_down.map(OnRedisDown::from),
        });
    }
    listeners
}

/// A listener's `tls` or `[[listener.certificate]]` entries, loaded: every file is read and every key checked
/// against its certificate now, so that `check` and a reload say what is wrong with them.
fn build_listener_tls(l: &RawListener, report: &mut Report<'_>) -> Option<Arc<ServerTls>> {
    let entries: Vec<&Spanned<RawCertificate>> = l.tls.iter().chain(&l.certificate).collect();
    let first = entries.first()?;
    if l.tls.is_some() && !l.certificate.is_empty() {
        report.key(
            first,
            "tls",
            "give either `tls` or `[[listener.certificate]]` entries, not both",
        );
        return None;
    }
    if entries.iter().filter(|e| e.get_ref().default).count() > 1 {
        report.key(first, "certificate", "only one certificate can be the `default`");
        return None;
    }
    let files = entries
        .iter()
        .map(|e| {
            let e = e.get_ref();
            CertFiles {
                cert: report.path(&e.cert),
                key: report.path(&e.key),
                names: e.names.clone(),
                default: e.default,
            }
        })
        .collect();
    match ServerTls::load(files) {
        Ok(tls) => Some(Arc::new(tls)),
        Err(e) => {
            report.key(first, "tls", e);
            None
        }
    }
}

/// `redirect_https` (with `redirect_https_port`, 443 by default): only on a plain listener.
fn build_redirect(l: &RawListener, report: &mut Report<'_>) -> Option<u16> {
    let on = l.redirect_https.as_ref().is_some_and(|r| *r.get_ref());
    let port = l.redirect_https_port.as_ref().map(|p| *p.get_ref());
    match (&l.redirect_https, on) {
        (Some(r), true) if l.tls.is_some() || !l.certificate.is_empty() => {
            report.key(
                r,
                "redirect_https",
                "a TLS listener cannot redirect to https: it is https",
            );
            None
        }
        (_, true) if port == Some(0) => {
            if let Some(p) = &l.redirect_https_port {
                report.key(p, "redirect_https_port", "must be a port from 1 to 65535");
            }
            None
        }
        (_, true) => Some(port.unwrap_or(443)),
        (_, false) => {
            if let Some(p) = &l.redirect_https_port {
                report.key(p, "redirect_https_port", "applies only with `redirect_https = true`");
            }
            None
        }
    }
}

/// An upstream's `tls`, loaded (CA and client certificate read and checked now).
fn build_upstream_tls(u: &RawUpstream, report: &mut Report<'_>) -> Option<Arc<ClientTls>> {
    let raw = u.tls.as_ref()?;
    let t = raw.get_ref();
    let settings = TlsSettings {
        ca: t.ca.as_deref().map(|p| report.path(p)),
        server_name: t.server_name.clone(),
        cert: t.cert.as_deref().map(|p| report.path(p)),
        key: t.key.as_deref().map(|p| report.path(p)),
        insecure_skip_verify: t.insecure_skip_verify,
    };
    match ClientTls::load(settings) {
        Ok(tls) => Some(Arc::new(tls)),
        Err(e) => {
            report.key(raw, "tls", e);
            None
        }
    }
}

/// `handshakes_per_second_per_ip` with its `handshake_burst` (one second's worth when not given).
fn build_handshake_rate(l: &RawListener, report: &mut Report<'_>) -> Option<HandshakeRate> {
    let Some(rate) = limited(
        &l.handshakes_per_second_per_ip,
        "handshakes_per_second_per_ip",
        1..=MAX_HANDSHAKE_RATE,
        report,
    ) else {
        if let Some(burst) = &l.handshake_burst {
            report.key(
                burst,
                "handshake_burst",
                "applies only with `handshakes_per_second_per_ip`",
            );
        }
        return None;
    };
    Some(HandshakeRate {
        per_second: rate,
        burst: l.handshake_burst.as_ref().map_or(rate, |b| *b.get_ref()),
    })
}

/// `proxy_protocol`, which reads a header from trusted proxies only: without any, it could never apply.
fn build_proxy_protocol(l: &RawListener, report: &mut Report<'_>) -> bool {
    let Some(on) = &l.proxy_protocol else {
        return false;
    };
    if *on.get_ref() && l.trusted_proxies.is_empty() {
        report.key(
            on,
            "proxy_protocol",
            "needs `trusted_proxies`: the header is read only from the proxies listed there",
        );
    }
    *on.get_ref()
}

/// An `allow` / `deny` pair: each entry a network (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
fn build_access(allow: &[Spanned<String>], deny: &[Spanned<String>], report: &mut Report<'_>) -> Access {
    Access {
        allow: networks(allow, "allow", report),
        deny: networks(deny, "deny", report),
    }
}

/// A list of networks (`10.0.0.0/8`, `2001:db8::/32`) or single addresses under `key`.
fn networks(list: &[Spanned<String>], key: &str, report: &mut Report<'_>) -> Vec<IpNet> {
    list.iter()
        .filter_map(|entry| match parse_net(entry.get_ref()) {
            Some(net) => Some(net),
            None => {
                report.key(
                    entry,
                    key,
                    format!(
                        "`{}` is not a network or an address, e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32",
                        entry.get_ref()
                    ),
                );
                None
            }
        })
        .collect()
}

/// A network as written (its host bits cleared), or a single address as the network of just it. IPv4-mapped IPv6
/// networks (`::ffff:10.0.0.0/104`) become the IPv4 networks they are, as clients' mapped addresses do.
fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => IpNet::from(text.parse::<std::net::IpAddr>().ok()?),
    };
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok().map(IpNet::V4),
            None => Some(net),
        },
        _ => Some(net),
    }
}

/// A route's `allowed_origins` and `allow_missing_origin`.
fn build_origins(r: &RawRoute, report: &mut Report<'_>) -> Option<OriginRule> {
    let Some(list) = &r.allowed_origins else {
        if let Some(missing) = &r.allow_missing_origin {
            report.key(
                missing,
                "allow_missing_origin",
                "applies only with `allowed_origins` (without it every origin is let through)",
            );
        }
        return None;
    };
    if list.get_ref().is_empty() {
        report.key(
            list,
            "allowed_origins",
            "is empty: it would refuse every browser; leave it out to let every origin through",
        );
    }
    let allowed = list
        .get_ref()
        .iter()
        .filter_map(|entry| match parse_origin(entry.get_ref()) {
            Ok(pattern) => Some(pattern),
            Err(why) => {
                report.key(entry, "allowed_origins", format!("`{}`: {why}", entry.get_ref()));
                None
            }
        })
        .collect();
    Some(OriginRule {
        allowed,
        allow_missing: r.allow_missing_origin.as_ref().is_none_or(|m| *m.get_ref()),
    })
}

/// An allowed origin: `scheme://host[:port]`, the host possibly `*.` and a domain.
fn parse_origin(text: &str) -> Result<OriginPattern, &'static str> {
    const EXPECTED: &str = "expected scheme://host[:port], e.g. https://app.example.com or https://*.example.com";
    let text = text.trim().to_ascii_lowercase();
    let (scheme, rest) = text.split_once("://").ok_or(EXPECTED)?;
    let default_port = match scheme {
        "https" | "wss" => 443,
        "http" | "ws" => 80,
        _ => return Err("the scheme must be http, https, ws or wss"),
    };
    if rest.contains(['/', '?', '#', '@']) {
        return Err("an origin has no path, query or user: scheme://host[:port] only");
    }
    let (host, port) = split_port(rest, default_port).ok_or("the port must be a number from 1 to 65535")?;
    let (wildcard, host) = match host.strip_prefix("*.") {
        Some(suffix) => (true, format!(".{suffix}")),
        None => (false, host.to_string()),
    };
    if host.is_empty() || host == "." || host.contains('*') {
        return Err(EXPECTED);
    }
    Ok(OriginPattern {
        scheme: scheme.to_string(),
        host,
        wildcard,
        port,
    })
}

/// `host[:port]` (the host possibly a bracketed IPv6 address) split, with `default` when no port is written.
pub(crate) fn split_port(text: &str, default: u16) -> Option<(&str, u16)> {
    let port_at = if text.starts_with('[') {
        text.find(']').map(|end| end + 1)
    } else {
        text.find(':')
    };
    match port_at.map(|at| text.split_at(at)) {
        Some((host, port)) if !port.is_empty() => {
            let port = port.strip_prefix(':')?.parse::<u16>().ok().filter(|&p| p != 0)?;
            Some((host, port))
        }
        _ => Some((text, default)),
    }
}

fn build_upstreams(raw: &[Spanned<RawUpstream>], report: &mut Report<'_>) -> Vec<Upstream> {
    let mut names = HashSet::new();
    let mut upstreams = Vec::with_capacity(raw.len());
    for upstream in raw {
        let u = upstream.get_ref();
        unique_name(&mut names, &u.name, "upstream", report);
        let name = u.name.get_ref().clone();
        let servers = build_servers(upstream, &name, report);
        let (balance, hash_key) = build_balance(u, report);
        let dynamic = u
            .discovery
            .as_ref()
            .is_some_and(|d| d.get_ref().dns.is_some() || d.get_ref().kubernetes.is_some());
        check_servers(upstream, &servers, &name, report, dynamic);
        let sticky = u.sticky.as_ref().and_then(|s| build_sticky(s, &name, report));
        let health = u.health.as_ref().map(|h| build_health(h, report));
        let outlier = build_outlier(u.outlier.as_ref(), report);
        let limits = build_limits(u, Upstream::new(&name, servers), report);
        let rebalance = build_rebalance(u, report);
        let connect_timeout = build_connect_timeout(u, report);
        let tls = build_upstream_tls(u, report);
        upstreams.push(Upstream {
            tls,
            discovery: u.discovery.as_ref().and_then(|d| build_discovery(d, report)),
            balance,
            hash_key,
            connect_timeout,
            sticky,
            health,
            outlier,
            rebalance,
            ..limits
        });
    }
    upstreams
}

/// Resolves an upstream's servers, refusing one listed twice (by name or by address): it would get a double share.
fn build_servers(upstream: &Spanned<RawUpstream>, name: &str, report: &mut Report<'_>) -> Vec<Server> {
    let u = upstream.get_ref();
    if u.server.is_empty() && u.discovery.is_none() {
        report.at(
            Some(upstream.span()),
            format!("upstream `{name}` has no servers: add at least one [[upstream.server]] with an address"),
        );
    }
    let mut servers = Vec::with_capacity(u.server.len());
    let mut identities = HashSet::new();
    if let Some(file) = u.discovery.as_ref().and_then(|d| d.get_ref().file.as_ref()) {
        discovered_servers(file, name, u.server.is_empty(), &mut servers, &mut identities, report);
    }
    for entry in &u.server {
        let s = entry.get_ref();
        let weight = s.weight.as_ref().map_or(DEFAULT_WEIGHT, |w| *w.get_ref());
        if let Some(w) = &s.weight
            && !(MIN_WEIGHT..=MAX_WEIGHT).contains(w.get_ref())
        {
            report.key(
                w,
                "weight",
                format!("must be from {MIN_WEIGHT} to {MAX_WEIGHT}, not {}", w.get_ref()),
            );
        }
        let address = s.address.get_ref();
        if !identities.insert(address.clone()) {
            report.key(
                &s.address,
                "address",
                format!("server `{address}` is listed twice in `{name}`"),
            );
        }
        match super::resolve(address) {
            Ok(resolved) if servers.iter().any(|s: &Server| s.address == resolved.address) => report.key(
                &s.address,
                "address",
                format!("`{address}` is {}, which `{name}` already lists", resolved.address),
            ),
            Ok(resolved) => servers.push(Server {
                weight,
                backup: s.backup.unwrap_or(false),
                drain: s.drain.unwrap_or(false),
                max_connections: s.max_connections.as_ref().map(|m| *m.get_ref()),
                ..resolved
            }),
            Err(reason) => report.key(
                &s.address,
                "address",
                format!("cannot resolve `{address}` (expected IP:PORT or HOST:PORT): {reason}"),
            ),
        }
    }
    servers
}

/// The servers a discovery file lists, added to `servers`: one address a line, blank lines and `#` comments
/// skipped. A file that cannot be read, a line that does not resolve, a server listed twice, and a file that
/// leaves the upstream with no server at all are problems of the config, so that a reload with such a file is
/// refused and the servers known last stay in force.
fn discovered_servers(
    file: &Spanned<String>,
    name: &str,
    only_source: bool,
    servers: &mut Vec<Server>,
    identities: &mut HashSet<String>,
    report: &mut Report<'_>,
) {
    let path = report.path(file.get_ref());
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            report.key(file, "discovery.file", format!("{}: cannot read: {e}", path.display()));
            return;
        }
    };
    let before = servers.len();
    for (n, line) in text.lines().enumerate() {
        let address = line.split('#').next().unwrap_or("").trim();
        if address.is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        if !identities.insert(address.to_string()) {
            report.key(
                file,
                "discovery.file",
                format!("{at}: server `{address}` is listed twice in `{name}`"),
            );
            continue;
        }
        match super::resolve(address) {
            Ok(resolved) if servers.iter().any(|s| s.address == resolved.address) => report.key(
                file,
                "discovery.file",
                format!(
                    "{at}: `{address}` is {}, which `{name}` already lists",
                    resolved.address
                ),
            ),
            Ok(resolved) => servers.push(resolved),
            Err(reason) => report.key(
                file,
                "discovery.file",
                format!("{at}: cannot resolve `{address}` (expected IP:PORT or HOST:PORT): {reason}"),
            ),
        }
    }
    if servers.len() == before && only_source {
        report.key(
            file,
            "discovery.file",
            format!("{}: lists no server, and `{name}` has no other", path.display()),
        );
    }
}

/// An upstream's `discovery`: exactly one source, with only the keys that source reads.
fn build_discovery(discovery: &Spanned<RawDiscovery>, report: &mut Report<'_>) -> Option<Discovery> {
    let d = discovery.get_ref();
    let sources = [d.file.is_some(), d.dns.is_some(), d.kubernetes.is_some()];
    if sources.iter().filter(|&&s| s).count() != 1 {
        report.key(
            discovery,
            "discovery",
            "give exactly one of `file`, `dns` and `kubernetes`",
        );
        return None;
    }
    if d.dns.is_none() {
        for (given, key) in [
            (d.port.as_ref().map(Spanned::span), "port"),
            (d.resolver.as_ref().map(Spanned::span), "resolver"),
            (d.kind.as_ref().map(Spanned::span), "kind"),
        ] {
            if given.is_some() {
                report.at(given, format!("discovery.{key}: only a `dns` discovery reads it"));
            }
        }
    }
    if let Some(file) = &d.file {
        return Some(Discovery::File(report.path(file.get_ref())));
    }
    if let Some(k) = &d.kubernetes {
        return build_kubernetes(k, report).map(Discovery::Kubernetes);
    }
    let name = d.dns.as_ref()?;
    if name.get_ref().trim().is_empty() || name.get_ref().contains([' ', '/', ':']) {
        report.key(name, "discovery.dns", format!("`{}` is not a DNS name", name.get_ref()));
    }
    let kind = match d.kind.as_ref().map(|k| *k.get_ref()) {
        None | Some(RawDnsKind::A) => DnsKind::A,
        Some(RawDnsKind::Aaaa) => DnsKind::Aaaa,
        Some(RawDnsKind::Ip) => DnsKind::Ip,
        Some(RawDnsKind::Srv) => DnsKind::Srv,
    };
    let port = match (&d.port, kind) {
        (Some(port), DnsKind::Srv) => {
            report.key(
                port,
                "discovery.port",
                "SRV records carry their own ports: leave `port` out",
            );
            0
        }
        (None, DnsKind::Srv) => 0,
        (Some(port), _) if *port.get_ref() == 0 => {
            report.key(port, "discovery.port", "must be from 1 to 65535");
            0
        }
        (Some(port), _) => *port.get_ref(),
        (None, _) => {
            report.key(name, "discovery.port", "give the servers' `port` (or `kind = \"srv\"`)");
            0
        }
    };
    let resolver = d.resolver.as_ref().and_then(|r| {
        let text = r.get_ref();
        let parsed = text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)));
        match parsed {
            Ok(address) => Some(address),
            Err(_) => {
                report.key(
                    r,
                    "discovery.resolver",
                    format!("`{text}` is not an IP address (IP or IP:PORT)"),
                );
                None
            }
        }
    });
    Some(Discovery::Dns(DnsDiscovery {
        name: name.get_ref().trim().trim_end_matches('.').to_string(),
        port,
        resolver,
        kind,
    }))
}

fn build_kubernetes(k: &Spanned<RawKubernetes>, report: &mut Report<'_>) -> Option<KubernetesDiscovery> {
    let k = k.get_ref();
    let port = match k.port.get_ref() {
        RawKubernetesPort::Number(0) => {
            report.key(
                &k.port,
                "discovery.kubernetes.port",
                "must be from 1 to 65535, or a port's name",
            );
            return None;
        }
        RawKubernetesPort::Number(n) => KubernetesPort::Number(*n),
        RawKubernetesPort::Name(name) => KubernetesPort::Name(name.clone()),
    };
    if let Some(api) = &k.api
        && !(api.get_ref().starts_with("https://") || api.get_ref().starts_with("http://"))
    {
        report.key(api, "discovery.kubernetes.api", "must be an https:// (or http://) URL");
    }
    if let (Some(api), Some(ca)) = (&k.api, &k.ca_file)
        && api.get_ref().starts_with("http://")
    {
        report.key(
            ca,
            "discovery.kubernetes.ca_file",
            "an http:// API server has no certificate to check",
        );
    }
    // Names as Kubernetes gives them (RFC 1123 labels): anything else would never match, or would change the path.
    for (name, key) in [(Some(&k.service), "service"), (k.namespace.as_ref(), "namespace")] {
        let Some(name) = name else { continue };
        let text = name.get_ref();
        let label = !text.is_empty()
            && text.len() <= 63
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !text.starts_with('-')
            && !text.ends_with('-');
        if !label {
            report.key(
                name,
                &format!("discovery.kubernetes.{key}"),
                format!("`{text}` is not a Kubernetes name (lowercase letters, digits and `-`, at most 63)"),
            );
        }
    }
    Some(KubernetesDiscovery {
        namespace: k.namespace.as_ref().map(|n| n.get_ref().clone()),
        service: k.service.get_ref().clone(),
        port,
        api: k.api.as_ref().map(|a| a.get_ref().trim_end_matches('/').to_string()),
        token_file: k.token_file.as_ref().map(|f| report.path(f.get_ref())),
        ca_file: k.ca_file.as_ref().map(|f| report.path(f.get_ref())),
    })
}

/// The balancer and what it hashes: consistent hashing needs a `hash_key`, and no other balancer reads one.
fn build_balance(u: &RawUpstream, report: &mut Report<'_>) -> (Balance, HashKey) {
    let balance = match u.balance.as_ref().map(|b| *b.get_ref()) {
        None | Some(RawBalance::RoundRobin) => Balance::RoundRobin,
        Some(RawBalance::LeastConn) => Balance::LeastConn,
        Some(RawBalance::ConsistentHash) => Balance::ConsistentHash,
        Some(RawBalance::RandomTwo) => Balance::RandomTwo,
        Some(RawBalance::SourceIp) => Balance::SourceIp,
    };
    let hash_key = match (&u.hash_key, balance) {
        (Some(key), Balance::ConsistentHash) => key.get_ref().clone(),
        (None, Balance::ConsistentHash) => {
            if let Some(b) = &u.balance {
                report.key(
                    b,
                    "balance",
                    "consistent_hash needs `hash_key` (header:NAME, cookie:NAME, query:NAME, source_ip or path)",
                );
            }
            HashKey::SourceIp
        }
        (Some(key), _) => {
            report.key(key, "hash_key", "is used only with balance = \"consistent_hash\"");
            HashKey::SourceIp
        }
        (None, _) => HashKey::SourceIp,
    };
    (balance, hash_key)
}

/// Reports a server limit of 0 and an upstream of backups only: either could never take a connection.
/// Each server's limit, and a primary among the servers (static backups are fine beside primaries that DNS or
/// Kubernetes discovery finds at run time: `dynamic`).
fn check_servers(
    upstream: &Spanned<RawUpstream>,
    servers: &[Server],
    name: &str,
    report: &mut Report<'_>,
    dynamic: bool,
) {
    for entry in &upstream.get_ref().server {
        if let Some(m) = &entry.get_ref().max_connections
            && *m.get_ref() < MIN_CONNECTION_LIMIT
        {
            report.key(
                m,
                "max_connections",
                format!("must be at least {MIN_CONNECTION_LIMIT} (leave it out for no limit)"),
            );
        }
    }
    if !dynamic && !servers.is_empty() && servers.iter().all(|s| s.backup) {
        report.at(
            Some(upstream.span()),
            format!("every server of upstream `{name}` is a backup: at least one must be a primary"),
        );
    }
}

/// The retry, connection and drain limits the file gives over `defaults`, each refused outside its range.
fn build_limits(u: &RawUpstream, defaults: Upstream, report: &mut Report<'_>) -> Upstream {
    Upstream {
        retries: limited(&u.retries, "retries", 0..=MAX_RETRIES, report).unwrap_or(defaults.retries),
        retry_budget_percent: limited(&u.retry_budget_percent, "retry_budget_percent", 0..=MAX_PERCENT, report)
            .unwrap_or(defaults.retry_budget_percent),
        max_connections: limited(
            &u.max_connections,
            "max_connections",
            MIN_CONNECTION_LIMIT..=u32::MAX,
            report,
        ),
        max_pending_handshakes: limited(
            &u.max_pending_handshakes,
            "max_pending_handshakes",
            MIN_CONNECTION_LIMIT..=u32::MAX,
            report,
        ),
        slow_start: u.slow_start.as_ref().map(|d| d.get_ref().0).filter(|d| !d.is_zero()),
        drain_rate: limited(&u.drain_rate, "drain_rate", MIN_DRAIN_RATE..=MAX_DRAIN_RATE, report)
            .unwrap_or(defaults.drain_rate),
        ..defaults
    }
}

/// The connect timeout, refused at 0: no connection could ever open.
fn build_connect_timeout(u: &RawUpstream, report: &mut Report<'_>) -> Duration {
    let Some(d) = &u.connect_timeout else {
        return DEFAULT_CONNECT_TIMEOUT;
    };
    if d.get_ref().0.is_zero() {
        report.key(d, "connect_timeout", "must be more than 0");
    }
    d.get_ref().0
}

fn build_sticky(raw: &Spanned<RawSticky>, upstream: &str, report: &mut Report<'_>) -> Option<Sticky> {
    let table = match raw.get_ref() {
        RawSticky::SourceIp => return Some(Sticky::SourceIp),
        RawSticky::Table(table) => table,
    };
    let cookie_only = [
        ("path", table.path.is_some()),
        ("max_age", table.max_age.is_some()),
        ("forward_cookie", table.forward_cookie.is_some()),
        ("secret", table.secret.is_some()),
    ];
    match (&table.cookie, &table.header) {
        (Some(name), None) => {
            if !is_token(name) {
                report.key(raw, "sticky.cookie", format!("`{name}` is not a valid cookie name"));
            }
            if table.max_age.is_some_and(|d| d.0 < MIN_STICKY_MAX_AGE) {
                report.key(
                    raw,
                    "sticky.max_age",
                    format!(
                        "must be at least {} (leave it out for a session cookie)",
                        human_duration(MIN_STICKY_MAX_AGE)
                    ),
                );
            }
            if let Some(path) = &table.path
                && !(path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b','))
            {
                report.key(
                    raw,
                    "sticky.path",
                    format!("`{path}` is not a cookie path: expected / and visible characters other than ; and ,"),
                );
            }
            Some(Sticky::Cookie(StickyCookie {
                name: name.clone(),
                path: table.path.clone().unwrap_or_else(|| DEFAULT_STICKY_PATH.into()),
                max_age: table.max_age.map(|d| d.0),
                forward_cookie: table.forward_cookie.unwrap_or(false),
                secret: table.secret.clone().unwrap_or_else(|| upstream.to_string()),
            }))
        }
        (None, Some(header)) => {
            if !is_token(header) {
                report.key(raw, "sticky.header", format!("`{header}` is not a valid header name"));
            }
            for (key, set) in cookie_only {
                if set {
                    report.key(raw, &format!("sticky.{key}"), "applies to cookie stickiness only");
                }
            }
            Some(Sticky::Header(header.to_ascii_lowercase()))
        }
        _ => {
            report.key(
                raw,
                "sticky",
                format!(
                    "expected exactly one of `cookie` or `header`, e.g. {{ cookie = \"{DEFAULT_STICKY_COOKIE}\" }}"
                ),
            );
            None
        }
    }
}

/// A number key's value when it is within `range`; reported otherwise.
fn limited(
    value: &Option<Spanned<u32>>,
    key: &str,
    range: std::ops::RangeInclusive<u32>,
    report: &mut Report<'_>,
) -> Option<u32> {
    let value = value.as_ref()?;
    let v = *value.get_ref();
    if range.contains(&v) {
        return Some(v);
    }
    let expected = if *range.end() == u32::MAX {
        format!("must be at least {}", range.start())
    } else {
        format!("must be from {} to {}", range.start(), range.end())
    };
    report.key(value, key, format!("{expected}, not {v}"));
    None
}

fn build_rebalance(u: &RawUpstream, report: &mut Report<'_>) -> Option<f64> {
    let threshold = match &u.rebalance_threshold {
        Some(t) if !(t.get_ref().is_finite() && *t.get_ref() > 0.0 && *t.get_ref() <= MAX_REBALANCE_THRESHOLD) => {
            report.key(
                t,
                "rebalance_threshold",
                format!(
                    "must be a fraction above 0 and at most {MAX_REBALANCE_THRESHOLD}, \
                     e.g. {DEFAULT_REBALANCE_THRESHOLD}"
                ),
            );
            DEFAULT_REBALANCE_THRESHOLD
        }
        Some(t) => *t.get_ref(),
        None => DEFAULT_REBALANCE_THRESHOLD,
    };
    if u.rebalance != Some(true)
        && let Some(t) = &u.rebalance_threshold
    {
        report.key(t, "rebalance_threshold", "is used only with rebalance = true");
    }
    (u.rebalance == Some(true)).then_some(threshold)
}

fn build_outlier(raw: Option<&RawOutlier>, report: &mut Report<'_>) -> Outlier {
    let defaults = Outlier::default();
    let Some(raw) = raw else {
        return defaults;
    };
    if let Some(d) = &raw.ejection
        && !(MIN_EJECTION..=MAX_EJECTION).contains(&d.get_ref().0)
    {
        report.key(
            d,
            "outlier.ejection",
            format!(
                "must be from {} to {}",
                human_duration(MIN_EJECTION),
                human_duration(MAX_EJECTION)
            ),
        );
    }
    Outlier {
        consecutive_failures: raw
            .consecutive_failures
            .as_ref()
            .map_or(defaults.consecutive_failures, |c| *c.get_ref()),
        ejection: raw.ejection.as_ref().map_or(defaults.ejection, |d| d.get_ref().0),
        max_ejected_percent: limited(
            &raw.max_ejected_percent,
            "outlier.max_ejected_percent",
            0..=MAX_PERCENT,
            report,
        )
        .unwrap_or(defaults.max_ejected_percent),
    }
}

fn build_health(raw: &Spanned<RawHealth>, report: &mut Report<'_>) -> HealthCheck {
    let h = raw.get_ref();
    let kind = match h.kind.get_ref() {
        RawHealthKind::Tcp => HealthKind::Tcp,
        RawHealthKind::Http => HealthKind::Http,
        RawHealthKind::Websocket => HealthKind::WebSocket,
    };
    let interval = h.interval.as_ref().map_or(DEFAULT_HEALTH_INTERVAL, |d| d.get_ref().0);
    if let Some(d) = &h.interval
        && d.get_ref().0 < MIN_HEALTH_INTERVAL
    {
        report.key(
            d,
            "health.interval",
            format!("must be at least {}", human_duration(MIN_HEALTH_INTERVAL)),
        );
    }
    let timeout = h.timeout.as_ref().map_or(DEFAULT_HEALTH_TIMEOUT, |d| d.get_ref().0);
    if let Some(d) = &h.timeout
        && d.get_ref().0.is_zero()
    {
        report.key(d, "health.timeout", "must be more than 0");
    }
    let rise = limited(&h.rise, "health.rise", MIN_RISE_FALL..=MAX_RISE_FALL, report).unwrap_or(DEFAULT_RISE);
    let fall = limited(&h.fall, "health.fall", MIN_RISE_FALL..=MAX_RISE_FALL, report).unwrap_or(DEFAULT_FALL);
    let not_for = |key: &str, kinds: &str, report: &mut Report<'_>| {
        report.at(
            Some(h.kind.span()),
            format!("`health.{key}` is used only by {kinds} checks, not by this one"),
        )
    };
    if kind == HealthKind::Tcp {
        if h.path.is_some() {
            not_for("path", "http and websocket", report);
        }
        if h.host.is_some() {
            not_for("host", "http and websocket", report);
        }
    }
    if kind != HealthKind::Http && h.expect_status.is_some() {
        not_for("expect_status", "http", report);
    }
    if kind != HealthKind::WebSocket && h.send.is_some() {
        not_for("send", "websocket", report);
    }
    if let Some(path) = &h.path
        && !(path.get_ref().starts_with('/') && path.get_ref().bytes().all(|b| b.is_ascii_graphic()))
    {
        report.key(
            path,
            "health.path",
            "must start with / and hold only visible ASCII characters",
        );
    }
    if let Some(host) = &h.host
        && (host.get_ref().is_empty() || !host.get_ref().bytes().all(|b| b.is_ascii_graphic()))
    {
        report.key(host, "health.host", "must be a non-empty host name");
    }
    let mut expect_status = Vec::new();
    if let Some(list) = &h.expect_status {
        if list.get_ref().is_empty() {
            report.key(
                list,
                "health.expect_status",
                "must list at least one status (leave it out for any 2xx)",
            );
        }
        for status in list.get_ref() {
            if !HTTP_STATUSES.contains(status.get_ref()) {
                report.key(
                    status,
                    "health.expect_status",
                    format!("{} is not an HTTP status", status.get_ref()),
                );
            }
            expect_status.push(*status.get_ref());
        }
    }
    HealthCheck {
        kind,
        path: h
            .path
            .as_ref()
            .map_or_else(|| DEFAULT_HEALTH_PATH.into(), |p| p.get_ref().clone()),
        host: h.host.as_ref().map(|p| p.get_ref().clone()),
        expect_status,
        send: h.send.as_ref().map(|p| p.get_ref().clone()),
        interval,
        timeout,
        rise,
        fall,
    }
}

/// An HTTP token (RFC 9110 §5.6.2): what header and cookie names are made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn build_routes(
    raw: &[Spanned<RawRoute>],
    listeners: &[Listener],
    upstreams: &[Upstream],
    report: &mut Report<'_>,
) -> Vec<Route> {
    if raw.is_empty() {
        report.at(
            None,
            "no [[route]]: at least one is needed, e.g. [[route]] upstream = \"NAME\" (matches every request)".into(),
        );
    }
    let mut names = HashSet::new();
    let mut routes = Vec::with_capacity(raw.len());
    for (i, route) in raw.iter().enumerate() {
        let r = route.get_ref();
        if let Some(name) = &r.name {
            unique_name(&mut names, name, "route", report);
        }
        let llm_route = r.kind.as_ref().is_some_and(|k| *k.get_ref() == RawRouteKind::Llm);
        let upstream = match &r.upstream {
            _ if llm_route => None,
            None => {
                report.at(
                    Some(route.span()),
                    "`upstream` is required (or `kind = \"llm\"` for the LLM gateway)".into(),
                );
                None
            }
            Some(wanted) => {
                let upstream = upstreams.iter().position(|u| u.name == *wanted.get_ref());
                if upstream.is_none() {
                    let mut known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                    known.dedup();
                    report.key(
                        wanted,
                        "upstream",
                        format!(
                            "no upstream named `{}` (upstreams: {})",
                            wanted.get_ref(),
                            if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                }
                upstream
            }
        };
        if let Some(listener) = &r.listener
            && !listeners.iter().any(|l| l.name == *listener.get_ref())
        {
            report.key(
                listener,
                "listener",
                format!("no listener named `{}`", listener.get_ref()),
            );
        }
        let mut headers = Vec::with_capacity(r.headers.len());
        for (name, value) in &r.headers {
            if !is_token(name.get_ref()) {
                report.key(
                    name,
                    "headers",
                    format!("`{}` is not a valid header name", name.get_ref()),
                );
            }
            headers.push((name.get_ref().to_ascii_lowercase(), value.clone()));
        }
        let relay = build_relay(r, report);
        let auth = auth::build(r.auth.as_ref(), &relay, report);
        if let Some(d) = &r.idle_timeout
            && d.get_ref().0.is_zero()
        {
            report.key(
                d,
                "idle_timeout",
                "must be more than 0 (leave it out for no idle timeout)",
            );
        }
        routes.push(Route {
            name: r
                .name
                .as_ref()
                .map_or_else(|| format!("route #{}", i + 1), |n| n.get_ref().clone()),
            listener: r.listener.as_ref().map(|l| l.get_ref().clone()),
            host: build_host(r.host.as_ref(), report),
            path: build_path(r, report),
            headers,
            upstream,
            relay,
            idle_timeout: r.idle_timeout.as_ref().map(|d| d.get_ref().0),
            deflate: match r.permessage_deflate.as_ref().map(|d| *d.get_ref()) {
                Some(RawDeflate::Strip) => Deflate::Strip,
                Some(RawDeflate::Pass) | None => Deflate::Pass,
            },
            access: build_access(&r.allow, &r.deny, report),
            origins: build_origins(r, report),
            auth,
        });
    }
    routes
}

fn build_host(raw: Option<&Spanned<String>>, report: &mut Report<'_>) -> HostMatch {
    let Some(host) = raw else {
        return HostMatch::Any;
    };
    let name = host.get_ref().to_ascii_lowercase();
    let (suffix, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    let valid = !rest.is_empty()
        && rest
            .split('.')
            .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid {
        report.key(
            host,
            "host",
            format!(
                "`{}` is not a host name: expected a name like chat.example.com or *.example.com (no port)",
                host.get_ref()
            ),
        );
    }
    if suffix {
        HostMatch::Suffix(format!(".{rest}"))
    } else {
        HostMatch::Exact(name)
    }
}

fn build_path(r: &RawRoute, report: &mut Report<'_>) -> PathMatch {
    let given: Vec<&Spanned<String>> = [&r.path_prefix, &r.path, &r.path_regex].into_iter().flatten().collect();
    if given.len() > 1 {
        report.key(
            given[1],
            "path",
            "give at most one of `path`, `path_prefix` and `path_regex`",
        );
    }
    let starts_with_slash = |key: &str, p: &Spanned<String>, report: &mut Report<'_>| {
        if !p.get_ref().starts_with('/') {
            report.key(p, key, format!("`{}` must start with /", p.get_ref()));
        }
    };
    if let Some(p) = &r.path_prefix {
        starts_with_slash("path_prefix", p, report);
        PathMatch::Prefix(p.get_ref().clone())
    } else if let Some(p) = &r.path {
        starts_with_slash("path", p, report);
        PathMatch::Exact(p.get_ref().clone())
    } else if let Some(p) = &r.path_regex {
        match regex::Regex::new(p.get_ref()) {
            Ok(re) => PathMatch::Regex(re),
            Err(e) => {
                let first = e.to_string().lines().last().unwrap_or_default().trim().to_string();
                report.key(p, "path_regex", format!("invalid regular expression: {first}"));
                PathMatch::Any
            }
        }
    } else {
        PathMatch::Any
    }
}

fn build_relay(r: &RawRoute, report: &mut Report<'_>) -> Relay {
    let frames = r
        .relay
        .as_ref()
        .map_or(matches!(Relay::default(), Relay::Frames(_)), |m| {
            *m.get_ref() == RawRelay::Frames
        });
    let dur = |d: &Option<Spanned<Dur>>| d.as_ref().map(|d| d.get_ref().0);
    let size = |s: &Option<Spanned<Size>>| s.as_ref().map(|s| s.get_ref().0);
    // (key, its span when given): for the problems below.
    let given: [(&str, Option<Range<usize>>); 9] = [
        ("max_message_size", r.max_message_size.as_ref().map(Spanned::span)),
        ("max_frame_size", r.max_frame_size.as_ref().map(Spanned::span)),
        ("messages_per_second", r.messages_per_second.as_ref().map(Spanned::span)),
        ("burst", r.burst.as_ref().map(Spanned::span)),
        ("ping_interval", r.ping_interval.as_ref().map(Spanned::span)),
        ("pong_timeout", r.pong_timeout.as_ref().map(Spanned::span)),
        ("validate_utf8", r.validate_utf8.as_ref().map(Spanned::span)),
        ("close_timeout", r.close_timeout.as_ref().map(Spanned::span)),
        ("write_timeout", r.write_timeout.as_ref().map(Spanned::span)),
    ];
    if !frames {
        // The write timeout is the tunnel's one rule; every other key belongs to the frames relay.
        for (key, span) in &given {
            if span.is_some() && *key != "write_timeout" {
                report.at(
                    span.clone(),
                    format!("`{key}`: applies to relay = \"frames\" only (this route relays as a tunnel)"),
                );
            }
        }
        let rules = TunnelRules {
            write_timeout: dur(&r.write_timeout).unwrap_or(DEFAULT_WRITE_TIMEOUT),
            splice: r.splice.as_ref().is_none_or(|s| *s.get_ref()),
        };
        for (key, expected) in rules.problems() {
            report.at(
                r.write_timeout.as_ref().map(Spanned::span),
                format!("`{key}`: out of range: expected {expected}"),
            );
        }
        return Relay::Tunnel(rules);
    }
    if let Some(splice) = &r.splice {
        report.at(
            Some(splice.span()),
            "`splice`: applies to relay = \"tunnel\" only (frames mode reads every byte)".to_string(),
        );
    }
    let defaults = FrameRules::default();
    let rules = FrameRules {
        max_message_size: size(&r.max_message_size),
        max_frame_size: size(&r.max_frame_size),
        messages_per_second: r.messages_per_second.as_ref().map(|n| *n.get_ref()),
        burst: r.burst.as_ref().map_or(defaults.burst, |n| *n.get_ref()),
        ping_interval: dur(&r.ping_interval),
        pong_timeout: dur(&r.pong_timeout).unwrap_or(defaults.pong_timeout),
        validate_utf8: r.validate_utf8.as_ref().is_some_and(|v| *v.get_ref()),
        close_timeout: dur(&r.close_timeout).unwrap_or(defaults.close_timeout),
        write_timeout: dur(&r.write_timeout).unwrap_or(defaults.write_timeout),
    };
    for (key, expected) in rules.problems() {
        let span = given.iter().find(|(k, _)| *k == key).and_then(|(_, span)| span.clone());
        report.at(span, format!("`{key}`: out of range: expected {expected}"));
    }
    Relay::Frames(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthKind;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, "t.toml") {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(ToString::to_string).collect(),
        }
    }

    const MINIMAL: &str = r#"
[[listener]]
name = "public"
address = "127.0.0.1:8080"

[[route]]
upstream = "app"

[[upstream]]
name = "app"
[[upstream.server]]
address = "127.0.0.1:9000"
"#;

    #[test]
    fn minimal_file_builds_the_model_with_defaults() {
        let config = parse(MINIMAL, "t.toml").expect("valid");
        assert_eq!(config.listeners[0].address, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.routes[0].name, "route #1");
        assert_eq!(config.upstreams[0].balance, Balance::RoundRobin);
        assert_eq!(config.upstreams[0].servers[0].weight, 1);
        assert_eq!(config.server, ServerSettings::default());
    }

    #[test]
    fn unknown_key_names_line_column_and_the_expected_keys() {
        let text = MINIMAL.replace("upstream = \"app\"", "upstream = \"app\"\nno_such_key = 1");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("t.toml:8:1: unknown field `no_such_key`, expected one of"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn wrong_types_and_bad_values_are_placed() {
        let p = problems(&MINIMAL.replace(
            "address = \"127.0.0.1:9000\"",
            "address = \"127.0.0.1:9000\"\nweight = \"x\"",
        ));
        assert!(
            p[0].starts_with("t.toml:13:10: invalid type: string \"x\", expected u32"),
            "{p:?}"
        );
        let p = problems(&format!("[server]\ndrain_timeout = \"5 parsecs\"\n{MINIMAL}"));
        assert!(p[0].starts_with("t.toml:2:17: invalid duration unit"), "{p:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_place() {
        let text = r#"
[[listener]]
name = "a"
address = "127.0.0.1:8080"
[[listener]]
name = "a"
address = "127.0.0.1:8080"

[[route]]
upstream = "missing"
path = "/x"
path_regex = "^/y"

[[route]]
upstream = "app"
path_regex = "(unclosed"

[[upstream]]
name = "app"
[[upstream.server]]
address = "127.0.0.1:9000"
weight = 0

[[upstream]]
name = "empty"
"#;
        let p = problems(text);
        let expect = [
            "t.toml:6:8: `name`: duplicate listener name `a`",
            "t.toml:7:11: `address`: two listeners on 127.0.0.1:8080",
            "t.toml:22:10: `weight`: must be from 1 to 1000, not 0",
            "t.toml:24:1: upstream `empty` has no servers",
            "t.toml:10:12: `upstream`: no upstream named `missing` (upstreams: app, empty)",
            "t.toml:12:14: `path`: give at most one of",
            "t.toml:16:14: `path_regex`: invalid regular expression",
        ];
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        for (got, want) in p.iter().zip(expect) {
            assert!(got.starts_with(want), "got {got}\nwant {want}");
        }
    }

    #[test]
    fn tunnel_routes_take_a_write_timeout_and_refuse_the_frames_keys() {
        let head = "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[upstream]]\nname = \"app\"\n\
                    [[upstream.server]]\naddress = \"127.0.0.1:9\"\n[[route]]\nupstream = \"app\"\nrelay = \"tunnel\"\n";
        let config = parse(&format!("{head}write_timeout = \"5s\"\n"), "t.toml").expect("valid");
        let rules = TunnelRules {
            write_timeout: Duration::from_secs(5),
            splice: true,
        };
        assert_eq!(config.routes[0].relay, Relay::Tunnel(rules));
        let copied = parse(&format!("{head}splice = false\n"), "t.toml").expect("valid");
        assert_eq!(
            copied.routes[0].relay,
            Relay::Tunnel(TunnelRules {
                splice: false,
                ..TunnelRules::default()
            })
        );
        let default = parse(head, "t.toml").expect("valid");
        assert_eq!(default.routes[0].relay, Relay::tunnel());
        let p = problems(&format!("{head}write_timeout = \"0s\"\nping_interval = \"1s\"\n"));
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].contains("`ping_interval`: applies to relay = \"frames\" only"),
            "{p:#?}"
        );
        assert!(p[1].contains("`write_timeout`: out of range"), "{p:#?}");
        let frames = head.replace("relay = \"tunnel\"", "relay = \"frames\"");
        let p = problems(&format!("{frames}splice = true\n"));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].contains("`splice`: applies to relay = \"tunnel\" only"), "{p:#?}");
    }

    #[test]
    fn resilience_keys_build_the_model_and_bad_values_are_placed() {
        let head = "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"app\"\n";
        let good = format!(
            "{head}[[upstream]]\nname = \"app\"\nretries = 1\nretry_budget_percent = 10\nmax_connections = 100\n\
             max_pending_handshakes = 5\nslow_start = \"30s\"\ndrain_rate = 20\nrebalance = true\n\
             rebalance_threshold = 0.2\n[upstream.health]\nkind = \"websocket\"\npath = \"/ws\"\nsend = \"hi\"\n\
             [upstream.outlier]\nconsecutive_failures = 2\nejection = \"10s\"\nmax_ejected_percent = 30\n\
             [[upstream.server]]\naddress = \"127.0.0.1:9000\"\nmax_connections = 7\n\
             [[upstream.server]]\naddress = \"127.0.0.1:9001\"\nbackup = true\ndrain = true\n"
        );
        let config = parse(&good, "t.toml").expect("valid");
        let u = &config.upstreams[0];
        assert_eq!((u.retries, u.retry_budget_percent), (1, 10));
        assert_eq!((u.max_connections, u.max_pending_handshakes), (Some(100), Some(5)));
        assert_eq!(
            (u.slow_start, u.drain_rate, u.rebalance),
            (Some(Duration::from_secs(30)), 20, Some(0.2))
        );
        let health = u.health.as_ref().expect("health");
        assert_eq!(
            (health.kind, health.path.as_str(), health.send.as_deref()),
            (HealthKind::WebSocket, "/ws", Some("hi"))
        );
        assert_eq!(
            (health.interval, health.rise, health.fall),
            (DEFAULT_HEALTH_INTERVAL, DEFAULT_RISE, DEFAULT_FALL)
        );
        assert_eq!(
            u.outlier,
            Outlier {
                consecutive_failures: 2,
                ejection: Duration::from_secs(10),
                max_ejected_percent: 30
            }
        );
        assert_eq!(u.servers[0].max_connections, Some(7));
        assert!(u.servers[1].backup && u.servers[1].drain && !u.servers[0].backup);

        let defaults = parse(
            &format!("{head}[[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"127.0.0.1:9\"\n"),
            "t.toml",
        )
        .expect("valid");
        let u = &defaults.upstreams[0];
        assert_eq!((u.retries, u.retry_budget_percent, u.drain_rate), (2, 20, 50));
        assert_eq!(
            (u.health.is_none(), u.rebalance, u.outlier),
            (true, None, Outlier::default())
        );

        let bad = format!(
            "{head}[[upstream]]\nname = \"app\"\nretries = 101\nmax_connections = 0\ndrain_rate = 0\n\
             rebalance_threshold = 0.5\n[upstream.outlier]\nejection = \"10m\"\nmax_ejected_percent = 101\n\
             [[upstream.server]]\naddress = \"127.0.0.1:9\"\nbackup = true\nmax_connections = 0\n"
        );
        let p = problems(&bad);
        let expect = [
            "`max_connections`: must be at least 1 (leave it out for no limit)",
            "every server of upstream `app` is a backup",
            "`outlier.ejection`: must be from 1s to 5m",
            "`outlier.max_ejected_percent`: must be from 0 to 100, not 101",
            "`retries`: must be from 0 to 100, not 101",
            "`max_connections`: must be at least 1, not 0",
            "`drain_rate`: must be from 1 to 100000, not 0",
            "`rebalance_threshold`: is used only with rebalance = true",
        ];
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        for want in expect {
            assert!(
                p.iter().any(|got| got.contains(want) && got.starts_with("t.toml:")),
                "{want}\n{p:#?}"
            );
        }
    }

    #[test]
    fn trusted_proxies_and_proxy_protocol_build_the_model_and_need_each_other() {
        let listener = |keys: &str| {
            format!(
                "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n{keys}\n[[route]]\nupstream = \"app\"\n\
                 [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"127.0.0.1:9\"\n"
            )
        };
        let good =
            listener("trusted_proxies = [\"10.1.2.3/8\", \"::1\", \"::ffff:192.0.2.0/120\"]\nproxy_protocol = true");
        let config = parse(&good, "t.toml").expect("valid");
        let l = &config.listeners[0];
        let nets: Vec<String> = l.trusted_proxies.0.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.0.0.0/8", "::1/128", "192.0.2.0/24"]);
        assert!(l.proxy_protocol);
        let plain = parse(&listener(""), "t.toml").expect("valid");
        assert_eq!(
            (&plain.listeners[0].trusted_proxies, plain.listeners[0].proxy_protocol),
            (&TrustedProxies::default(), false)
        );
        let p = problems(&listener("proxy_protocol = true\ntrusted_proxies = []"));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].starts_with("t.toml:4:18: `proxy_protocol`: needs `trusted_proxies`"),
            "{p:#?}"
        );
        let p = problems(&listener("trusted_proxies = [\"10.0.0.0/40\"]"));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].contains("`trusted_proxies`: `10.0.0.0/40` is not a network or an address"),
            "{p:#?}"
        );
    }

    #[test]
    fn access_keys_build_the_model_and_bad_values_are_placed() {
        let good = "[server]\nmax_connections = 1000\n\
                    [[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\nallow = [\"10.1.2.3/8\", \"::1\"]\n\
                    deny = [\"10.6.6.6\"]\nmax_connections_per_ip = 20\nipv6_prefix = 56\n\
                    handshakes_per_second_per_ip = 5\n\
                    [[route]]\nupstream = \"app\"\nallowed_origins = [\"https://*.Example.com\", \"http://[::1]:3000\"]\n\
                    [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"127.0.0.1:9\"\n";
        let config = parse(good, "t.toml").expect("valid");
        assert_eq!(config.server.max_connections, Some(1000));
        let l = &config.listeners[0];
        let nets = |v: &[IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(nets(&l.access.allow), ["10.0.0.0/8", "::1/128"]);
        assert_eq!(nets(&l.access.deny), ["10.6.6.6/32"]);
        assert_eq!((l.max_connections_per_ip, l.ipv6_prefix), (Some(20), 56));
        assert_eq!(
            l.handshake_rate,
            Some(HandshakeRate {
                per_second: 5,
                burst: 5
            })
        );
        let origins = config.routes[0].origins.as_ref().expect("origins");
        assert!(origins.allow_missing);
        assert_eq!(
            origins.allowed[0],
            OriginPattern {
                scheme: "https".into(),
                host: ".example.com".into(),
                wildcard: true,
                port: 443
            }
        );
        assert_eq!(
            (origins.allowed[1].host.as_str(), origins.allowed[1].port),
            ("[::1]", 3000)
        );

        let bad = "[server]\nmax_connections = 0\n\
                   [[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\nallow = [\"10.0.0.0/33\"]\n\
                   deny = [\"nowhere\"]\nmax_connections_per_ip = 0\nipv6_prefix = 129\nhandshake_burst = 3\n\
                   [[route]]\nupstream = \"app\"\nallowed_origins = [\"ftp://x\", \"https://a/b\", \"https://a:0\", \"*\"]\n\
                   [[route]]\nupstream = \"app\"\nallow_missing_origin = false\n\
                   [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"127.0.0.1:9\"\n";
        let p = problems(bad);
        let expect = [
            "`max_connections`: must be at least 1, not 0",
            "`allow`: `10.0.0.0/33` is not a network or an address",
            "`deny`: `nowhere` is not a network or an address",
            "`max_connections_per_ip`: must be at least 1, not 0",
            "`ipv6_prefix`: must be at most 128",
            "`allowed_origins`: `ftp://x`: the scheme must be http, https, ws or wss",
            "`allowed_origins`: `https://a/b`: an origin has no path",
            "`allowed_origins`: `https://a:0`: the port must be a number from 1 to 65535",
            "`allowed_origins`: `*`: expected scheme://host[:port]",
            "`allow_missing_origin`: applies only with `allowed_origins`",
            "`handshake_burst`: applies only with `handshakes_per_second_per_ip`",
        ];
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        for want in expect {
            assert!(
                p.iter().any(|got| got.contains(want) && got.starts_with("t.toml:")),
                "{want}\n{p:#?}"
            );
        }
    }

    #[test]
    fn routes_hosts_headers_sticky_and_frames_keys() {
        let text = r#"
[[listener]]
name = "public"
address = "127.0.0.1:8080"

[[route]]
host = "*.Example.com"
path_prefix = "/ws"
headers = { "X-Tenant" = "a" }
upstream = "chat"
relay = "frames"
max_message_size = "1MiB"
ping_interval = "30s"

[[route]]
host = "api.example.com"
upstream = "chat"
relay = "tunnel"

[[upstream]]
name = "chat"
balance = "consistent_hash"
hash_key = "header:X-User"
sticky = { cookie = "SERVERID", max_age = "1h" }
[[upstream.server]]
address = "localhost:9000"
weight = 3
"#;
        let config = parse(text, "t.toml").expect("valid");
        let r = &config.routes[0];
        assert_eq!(r.host, HostMatch::Suffix(".example.com".into()));
        assert!(matches!(&r.path, PathMatch::Prefix(p) if p == "/ws"));
        assert_eq!(r.headers, [("x-tenant".to_string(), "a".to_string())]);
        let Relay::Frames(rules) = r.relay else {
            panic!("frames")
        };
        assert_eq!(rules.max_message_size, Some(1 << 20));
        assert_eq!(rules.ping_interval, Some(Duration::from_secs(30)));
        assert_eq!(config.routes[1].relay, Relay::tunnel());
        let u = &config.upstreams[0];
        assert_eq!(u.hash_key, HashKey::Header("x-user".into()));
        let Some(Sticky::Cookie(c)) = &u.sticky else {
            panic!("cookie")
        };
        assert_eq!(
            (c.name.as_str(), c.max_age, c.secret.as_str()),
            ("SERVERID", Some(Duration::from_secs(3600)), "chat")
        );
        assert_eq!(u.servers[0].weight, 3);

        let tunnel_with_limit = text.replace("relay = \"tunnel\"", "relay = \"tunnel\"\nping_interval = \"1s\"");
        let p = problems(&tunnel_with_limit);
        assert!(
            p[0].contains("`ping_interval`: applies to relay = \"frames\" only"),
            "{p:?}"
        );
        let p = problems(&text.replace("\"30s\"", "\"10ms\""));
        assert!(p[0].starts_with("t.toml:13:17: `ping_interval`: out of range"), "{p:?}");
        let p = problems(&text.replace(
            "{ cookie = \"SERVERID\", max_age = \"1h\" }",
            "{ cookie = \"A\", header = \"B\" }",
        ));
        assert!(p[0].contains("expected exactly one of `cookie` or `header`"), "{p:?}");
        let p = problems(&text.replace(
            "{ cookie = \"SERVERID\", max_age = \"1h\" }",
            "{ cookie = \"A\", colour = \"B\" }",
        ));
        assert!(p[0].contains("unknown field `colour`"), "{p:?}");
        let p = problems(&text.replace("max_age = \"1h\"", "max_age = \"0s\", path = \"/a;Domain=x\""));
        assert!(p[0].contains("`sticky.max_age`: must be at least 1s"), "{p:?}");
        assert!(
            p[1].contains("`sticky.path`: `/a;Domain=x` is not a cookie path"),
            "{p:?}"
        );
        let p = problems(&text.replace("ping_interval = \"30s\"", "messages_per_second = 0\nmax_frame_size = 0"));
        assert_eq!(p.len(), 2, "every frames key out of range is reported: {p:?}");
        // localhost resolves to one of these first, whatever the machine's resolver prefers.
        let twice = "weight = 3\n[[upstream.server]]\naddress = \"127.0.0.1:9000\"\n[[upstream.server]]\naddress = \"[::1]:9000\"";
        let p = problems(&text.replace("weight = 3", twice));
        assert!(p.len() == 1 && p[0].contains("which `chat` already lists"), "{p:?}");
        let p = problems(&text.replace("hash_key = \"header:X-User\"", "hash_key = \"header:\""));
        assert!(p[0].contains("names nothing"), "{p:?}");
        let p = problems(&text.replace("*.Example.com", "example.com:8080"));
        assert!(p[0].contains("is not a host name"), "{p:?}");
    }

    #[test]
    fn not_toml_and_empty_files_are_refused() {
        assert!(problems("[[listener]\nname=")[0].starts_with("t.toml:1:"));
        let p = problems("");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("no [[listener]]") && p[1].contains("no [[route]]"));
    }

    #[test]
    fn cluster_settings_and_their_mistakes() {
        let text = format!(
            "{MINIMAL}\n[cluster]\nredis = \"redis://10.0.0.5:6379/0\"\ninstance = \"edge-1\"\non_redis_down = \"closed\"\n\
             rebalance = true\nrebalance_rate = 5\n"
        );
        let config = parse(&text, "t.toml").unwrap_or_else(|p| panic!("{p:?}"));
        let cluster = config.cluster.expect("[cluster]");
        assert_eq!(cluster.redis.as_deref(), Some("redis://10.0.0.5:6379/0"));
        assert_eq!(cluster.instance, "edge-1");
        assert_eq!(cluster.on_redis_down, OnRedisDown::Closed);
        assert_eq!(
            cluster.rebalance,
            Some(crate::config::DEFAULT_CLUSTER_REBALANCE_THRESHOLD)
        );
        assert_eq!(cluster.rebalance_rate, 5);
        let default = parse(&format!("{MINIMAL}\n[cluster]\n"), "t.toml").unwrap_or_else(|p| panic!("{p:?}"));
        let default = default.cluster.expect("[cluster]");
        assert!(
            default.instance.ends_with(&format!("-{}", std::process::id())),
            "{}",
            default.instance
        );
        assert_eq!((default.redis, default.on_redis_down), (None, OnRedisDown::Open));

        let p = problems(&format!(
            "{MINIMAL}\n[cluster]\nredis = \"rediss://x:1\"\nrebalance_threshold = 0.5\n"
        ));
        assert!(
            p.iter().any(|p| p.contains("cluster.redis") && p.contains("TLS")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|p| p.contains("applies only with `rebalance = true`")),
            "{p:?}"
        );
        let p = problems(&format!("{MINIMAL}\n[cluster]\nrebalance = true\n"));
        assert!(p.iter().any(|p| p.contains("needs `redis`")), "{p:?}");
    }

    #[test]
    fn discovery_takes_one_source_with_its_own_keys() {
        let upstream = |discovery: &str| {
            format!(
                "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"app\"\n\
                 [[upstream]]\nname = \"app\"\ndiscovery = {discovery}\n"
            )
        };
        let config = parse(
            &upstream("{ dns = \"_ws._tcp.app.internal.\", kind = \"srv\", resolver = \"10.0.0.2\" }"),
            "t.toml",
        )
        .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(
            config.upstreams[0].discovery,
            Some(Discovery::Dns(DnsDiscovery {
                name: "_ws._tcp.app.internal".into(),
                port: 0,
                resolver: Some("10.0.0.2:53".parse().unwrap()),
                kind: DnsKind::Srv,
            }))
        );
        assert!(
            config.upstreams[0].servers.is_empty(),
            "found at run time, not by check"
        );
        let config = parse(
            &upstream("{ kubernetes = { service = \"app\", port = 8080 } }"),
            "t.toml",
        )
        .unwrap_or_else(|p| panic!("{p:?}"));
        let Some(Discovery::Kubernetes(k)) = &config.upstreams[0].discovery else {
            panic!("{:?}", config.upstreams[0].discovery)
        };
        assert_eq!(
            (k.service.as_str(), &k.port, &k.namespace),
            ("app", &KubernetesPort::Number(8080), &None)
        );

        for (discovery, expected) in [
            (
                "{ dns = \"a.internal\", port = 80, file = \"s.txt\" }",
                "exactly one of",
            ),
            ("{ file = \"s.txt\", port = 80 }", "only a `dns` discovery reads it"),
            ("{ dns = \"a b\", port = 80 }", "is not a DNS name"),
            (
                "{ dns = \"a.internal\", port = 80, resolver = \"dns.internal\" }",
                "is not an IP address",
            ),
            (
                "{ kubernetes = { service = \"App_1\", port = \"ws\" } }",
                "is not a Kubernetes name",
            ),
            (
                "{ kubernetes = { service = \"app\", port = \"ws\", api = \"http://127.0.0.1:8001\", ca_file = \"ca.pem\" } }",
                "no certificate to check",
            ),
            ("{ kubernetes = { service = \"app\", port = 0 } }", "or a port's name"),
        ] {
            let p = problems(&upstream(discovery));
            assert!(p.iter().any(|p| p.contains(expected)), "{discovery}: {p:?}");
        }
        // Static backups beside the primaries discovery will find are fine.
        let text = format!(
            "{}[[upstream.server]]\naddress = \"127.0.0.1:9000\"\nbackup = true\n",
            upstream("{ dns = \"app.internal\", port = 80 }")
        );
        assert_eq!(problems(&text), Vec::<String>::new());
    }
}
