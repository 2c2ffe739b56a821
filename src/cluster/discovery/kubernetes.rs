//! Servers from the Kubernetes API: the ready endpoints of a Service's EndpointSlices (`discovery.k8s.io/v1`),
//! listed, then watched.
//!
//! The watch is client-go's reflector, reduced to one resource: LIST the slices labelled
//! `kubernetes.io/service-name=SERVICE` and take the list's `resourceVersion`; WATCH from it (bookmarks on, at most
//! [`WATCH_SECONDS`] per request), applying each event to a map of slice name → servers and reporting their union.
//! A watch that ends resumes from the last version seen; `410 Gone` (the answer's status, or an `ERROR` event with
//! code 410) lists again. Any other failure (no connection, a refused token, a bad answer) is logged and tried again
//! with [`backoff`]: the servers known last stay, as they do when the Service has no ready endpoint.
//!
//! Settings default to the pod's service account (`api`, `token_file`, `ca_file`, `namespace`); the token file is
//! read again for every request, since bound service account tokens rotate. Each request has its own connection
//! (a watch holds one for minutes; lists are rare). Every read is bounded: a watch line by [`MAX_LINE_BYTES`], a
//! list by [`MAX_BODY_BYTES`], the wait for an answer by [`REQUEST_TIMEOUT`] and a watch's life by its
//! `timeoutSeconds` plus [`WATCH_GRACE`].
//!
//! The parsing is pure ([`parse_list`], [`parse_event`], [`Lines`]); the requests are the thin shell around it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::task::AbortOnDropHandle;

use super::{Found, Reporter, backoff};
use crate::config::{DEFAULT_WEIGHT, KubernetesDiscovery, KubernetesPort};
use crate::conn::Conn;
use crate::tls::client::{ClientTls, TlsSettings};

/// Where a pod's service account is mounted: `token`, `ca.crt` and `namespace`.
pub const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The longest line of a watch (one event) taken.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The largest list (or refusal) read.
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// A refusal's body is read up to this much, for its message.
const MAX_STATUS_BYTES: usize = 64 << 10;
/// The largest token or namespace file read.
const MAX_FILE_BYTES: u64 = 64 << 10;
/// The time a TCP connection (and then its TLS handshake) to the API server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The time a request may take: a whole list, or a watch until its answer's head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A watch request's `timeoutSeconds`: the API server ends the watch after this, and the next one resumes.
pub const WATCH_SECONDS: u64 = 300;
/// How long past its `timeoutSeconds` a watch is read before it is given up as stuck.
pub const WATCH_GRACE: Duration = Duration::from_secs(30);
/// A watch that ends sooner than this without an event waits the rest before the next one (no busy loop against
/// a server that ends watches at once).
const MIN_WATCH: Duration = Duration::from_secs(1);
/// Lists are at least this far apart (a server that answers every watch with 410 is not listed in a busy loop).
const MIN_LIST_GAP: Duration = Duration::from_secs(1);
/// A refusal's message is cut to this many characters in the log.
const MAX_MESSAGE_CHARS: usize = 300;

/// Why the Service's endpoints could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "not in a cluster (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set): give `api`, \
         `token_file` and `ca_file`"
    )]
    NotInCluster,
    #[error("`{url}` is not an API server URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the CA file: {0}")]
    Ca(String),
    #[error("cannot read the token file {}: {reason}", path.display())]
    Token { path: PathBuf, reason: String },
    #[error("cannot connect to the API server at {authority}: {reason}")]
    Connect { authority: String, reason: String },
    #[error("TLS with the API server at {authority}: {reason}")]
    Tls { authority: String, reason: String },
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("HTTP: {}", with_causes(.0))]
    Http(#[from] hyper::Error),
    #[error("the API server refused {credentials} ({status}): {message}")]
    Refused {
        status: StatusCode,
        message: String,
        /// Which token (its file, never the token itself).
        credentials: String,
    },
    #[error("the API server answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("the answer is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("a watch event is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("unreadable answer: {0}")]
    Parse(String),
    #[error("the watch failed with code {code}: {message}")]
    WatchError { code: u16, message: String },
}

/// An error and its causes, `: `-separated (hyper's own message is only its kind: "connection error").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The servers one EndpointSlice gives, and why it gives fewer than its endpoints when it does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SliceServers {
    pub(crate) servers: Vec<Found>,
    /// Why some or all of its endpoints are not servers, other than not being ready (for the log).
    pub(crate) note: Option<String>,
}

/// One event of a watch, its object reduced to what wsgate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// `ADDED` or `MODIFIED`: the slice as it is now.
    Upsert {
        name: String,
        resource_version: String,
        slice: SliceServers,
    },
    Deleted {
        name: String,
        resource_version: String,
    },
    /// Nothing changed up to this version.
    Bookmark {
        resource_version: String,
    },
    /// The watch failed; code 410 (`Expired`, `Gone`) asks for a new list.
    Error {
        code: u16,
        message: String,
    },
}

/// A list: each slice's name and servers, and the version to watch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listed {
    pub(crate) slices: Vec<(String, SliceServers)>,
    pub(crate) resource_version: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    resource_version: String,
}

#[derive(Deserialize)]
struct SliceList {
    #[serde(default)]
    metadata: Meta,
    items: Option<Vec<EndpointSlice>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointSlice {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    address_type: String,
    endpoints: Option<Vec<Endpoint>>,
    ports: Option<Vec<EndpointPort>>,
}

#[derive(Deserialize)]
struct Endpoint {
    addresses: Option<Vec<String>>,
    conditions: Option<Conditions>,
}

#[derive(Deserialize)]
struct Conditions {
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct EndpointPort {
    name: Option<String>,
    port: Option<i64>,
    protocol: Option<String>,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

/// A `Status` object: what a refusal's body and an `ERROR` event carry.
#[derive(Deserialize, Default)]
struct Status {
    code: Option<u16>,
    reason: Option<String>,
    message: Option<String>,
}

/// The servers of a slice: the ready endpoints' addresses (a `ready` condition that is absent counts as ready) on
/// the slice's TCP port that `wanted` names. FQDN slices give none.
fn servers_of(slice: &EndpointSlice, wanted: &KubernetesPort) -> SliceServers {
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        other => {
            return SliceServers {
                servers: Vec::new(),
                note: Some(format!(
                    "its addressType is {other}: only IPv4 and IPv6 slices give servers"
                )),
            };
        }
    };
    let endpoints = slice.endpoints.as_deref().unwrap_or_default();
    let ports = slice.ports.as_deref().unwrap_or_default();
    let tcp = |p: &&EndpointPort| p.protocol.as_deref().unwrap_or("TCP") == "TCP";
    let number = ports.iter().filter(tcp).find_map(|p| match (wanted, p.port) {
        (KubernetesPort::Name(name), Some(n)) if p.name.as_deref().unwrap_or("") == name => u16::try_from(n).ok(),
        (KubernetesPort::Number(want), Some(n)) if n == i64::from(*want) => Some(*want),
        // A port without a number stands for all ports (a Service without a selector may say so).
        (KubernetesPort::Number(want), None) => Some(*want),
        _ => None,
    });
    let Some(number) = number else {
        let have: Vec<String> = ports
            .iter()
            .map(|p| {
                let name = p.name.as_deref().filter(|n| !n.is_empty()).unwrap_or("(unnamed)");
                let number = p.port.map_or("all".to_string(), |n| n.to_string());
                format!("{name} {number}/{}", p.protocol.as_deref().unwrap_or("TCP"))
            })
            .collect();
        let wanted = match wanted {
            KubernetesPort::Name(name) => format!("named `{name}`"),
            KubernetesPort::Number(n) => format!("{n}"),
        };
        let note = (!endpoints.is_empty()).then(|| format!("it has no TCP port {wanted} (its ports: {have:?})"));
        return SliceServers {
            servers: Vec::new(),
            note,
        };
    };
    let mut servers = Vec::new();
    let mut unusable = Vec::new();
    for endpoint in endpoints {
        if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        for address in endpoint.addresses.as_deref().unwrap_or_default() {
            match address.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv6() == v6 => servers.push(Found {
                    address: SocketAddr::new(ip, number),
                    weight: DEFAULT_WEIGHT,
                    backup: false,
                }),
                _ => unusable.push(address.clone()),
            }
        }
    }
    let note = (!unusable.is_empty())
        .then(|| format!("addresses that are not {} addresses: {unusable:?}", slice.address_type));
    SliceServers { servers, note }
}

/// An `EndpointSliceList`'s slices and version.
pub(crate) fn parse_list(body: &[u8], port: &KubernetesPort) -> Result<Listed, KubernetesError> {
    let list: SliceList = serde_json::from_slice(body).map_err(|e| KubernetesError::Parse(e.to_string()))?;
    if list.metadata.resource_version.is_empty() {
        return Err(KubernetesError::Parse(
            "the list has no metadata.resourceVersion".into(),
        ));
    }
    let slices = list
        .items
        .unwrap_or_default()
        .iter()
        .map(|slice| (slice.metadata.name.clone(), servers_of(slice, port)))
        .collect();
    Ok(Listed {
        slices,
        resource_version: list.metadata.resource_version,
    })
}

/// One line of a watch: `{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": {...}}`.
pub(crate) fn parse_event(line: &[u8], port: &KubernetesPort) -> Result<Event, KubernetesError> {
    let bad = |e: serde_json::Error| KubernetesError::Parse(format!("a watch event: {e}"));
    let event: WatchEvent = serde_json::from_slice(line).map_err(bad)?;
    let slice = || EndpointSlice::deserialize(&event.object).map_err(bad);
    Ok(match event.kind.as_str() {
        "ADDED" | "MODIFIED" => {
            let slice = slice()?;
            Event::Upsert {
                slice: servers_of(&slice, port),
                name: slice.metadata.name,
                resource_version: slice.metadata.resource_version,
            }
        }
        "DELETED" => {
            let slice = slice()?;
            Event::Deleted {
                name: slice.metadata.name,
                resource_version: slice.metadata.resource_version,
            }
        }
        "BOOKMARK" => Event::Bookmark {
            resource_version: slice()?.metadata.resource_version,
        },
        "ERROR" => {
            let status = Status::deserialize(&event.object).map_err(bad)?;
            Event::Error {
                code: status.code.unwrap_or(0),
                message: status_text(&status),
            }
        }
        other => {
            return Err(KubernetesError::Parse(format!(
                "a watch event of unknown type `{other}`"
            )));
        }
    })
}

/// A Status's message and reason, cut short for the log.
fn status_text(status: &Status) -> String {
    let text = match (&status.message, &status.reason) {
        (Some(message), _) if !message.is_empty() => message.clone(),
        (_, Some(reason)) => reason.clone(),
        _ => "no message".to_string(),
    };
    text.chars().take(MAX_MESSAGE_CHARS).collect()
}

/// The message of a refusal's body: a Status's, else its first characters.
fn refusal_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Status>(body) {
        Ok(status) => status_text(&status),
        Err(_) => String::from_utf8_lossy(body)
            .trim()
            .chars()
            .take(MAX_MESSAGE_CHARS)
            .collect(),
    }
}

/// Newline-delimited lines out of a stream's chunks, each at most `max` bytes (check, then take: a line is handed
/// out only once its newline has arrived).
#[derive(Debug)]
pub(crate) struct Lines {
    buf: Vec<u8>,
    /// The bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
}

impl Lines {
    pub(crate) fn new(max: usize) -> Lines {
        Lines {
            buf: Vec::new(),
            scanned: 0,
            max,
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole line (without its `\n` or `\r\n`; blank lines are passed over), `None` until one has
    /// arrived; an error when a line is longer than the bound.
    pub(crate) fn next_line(&mut self) -> Result<Option<Vec<u8>>, KubernetesError> {
        loop {
            let unscanned = self.buf.get(self.scanned..).unwrap_or_default();
            let Some(at) = memchr::memchr(b'\n', unscanned) else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    return Err(KubernetesError::LineTooLong);
                }
                return Ok(None);
            };
            let end = self.scanned.saturating_add(at);
            if end > self.max {
                return Err(KubernetesError::LineTooLong);
            }
            let rest = self.buf.split_off(end.saturating_add(1).min(self.buf.len()));
            let mut line = std::mem::replace(&mut self.buf, rest);
            self.scanned = 0;
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(line));
        }
    }

    /// Whether part of a line is waiting for its end.
    pub(crate) fn pending(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// A path segment or query value with everything but RFC 3986's unreserved characters percent-encoded.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The list request of the slices of `service` in `namespace`, under the API's path `prefix` (usually empty).
pub(crate) fn list_path(prefix: &str, namespace: &str, service: &str) -> String {
    format!(
        "{prefix}/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{}",
        encode(namespace),
        encode(service)
    )
}

/// The watch request following a list (or a watch) that ended at `resource_version`.
pub(crate) fn watch_path(list_path: &str, resource_version: &str) -> String {
    format!(
        "{list_path}&watch=1&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}",
        encode(resource_version)
    )
}

/// The API server's URL inside a pod, from the variables the kubelet sets.
pub(crate) fn in_cluster_url(host: Option<&str>, port: Option<&str>) -> Result<String, KubernetesError> {
    match (host.filter(|h| !h.is_empty()), port.filter(|p| !p.is_empty())) {
        (Some(host), Some(port)) if host.contains(':') => Ok(format!("https://[{host}]:{port}")),
        (Some(host), Some(port)) => Ok(format!("https://{host}:{port}")),
        _ => Err(KubernetesError::NotInCluster),
    }
}

/// Where the API server is, as a URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiUrl {
    pub(crate) https: bool,
    /// `host:port` to connect to (an IPv6 host in brackets).
    pub(crate) authority: String,
    /// The host as written: the `Host` header's and, without brackets, the name the certificate must hold.
    pub(crate) host: String,
    /// The `Host` header.
    pub(crate) host_header: String,
    /// A path the API is served under (a proxy's), without a trailing `/`; usually empty.
    pub(crate) prefix: String,
}

impl ApiUrl {
    pub(crate) fn parse(url: &str) -> Result<ApiUrl, KubernetesError> {
        let bad = |reason: &str| KubernetesError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("only https:// and http:// URLs")),
        };
        let Some(authority) = uri.authority() else {
            return Err(bad("no host"));
        };
        if uri.query().is_some() {
            return Err(bad("a query has no place in it"));
        }
        let host = authority.host().to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(ApiUrl {
            https,
            authority: format!("{host}:{port}"),
            host_header: authority.as_str().to_string(),
            host,
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// A request's answer, with what keeps its connection going while its body is read.
struct Answer {
    response: http::Response<Incoming>,
    _sender: SendRequest<Empty<Bytes>>,
    _driver: AbortOnDropHandle<()>,
}

/// The API server as this watch talks to it.
struct Api {
    url: ApiUrl,
    /// For https: the CA's verifier, loaded again after a failed handshake (the CA may have been rotated).
    tls: Option<ClientTls>,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    namespace: String,
    list_path: String,
}

impl Api {
    /// The settings, with the service account's for those not given.
    async fn new(k: &KubernetesDiscovery) -> Result<Api, KubernetesError> {
        let account = Path::new(SERVICE_ACCOUNT);
        let text = match &k.api {
            Some(api) => api.clone(),
            None => in_cluster_url(
                std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
                std::env::var("KUBERNETES_SERVICE_PORT").ok().as_deref(),
            )?,
        };
        let url = ApiUrl::parse(&text)?;
        let (ca_file, token_file) = if url.https {
            (
                Some(k.ca_file.clone().unwrap_or_else(|| account.join("ca.crt"))),
                Some(k.token_file.clone().unwrap_or_else(|| account.join("token"))),
            )
        } else {
            // Plain HTTP is `kubectl proxy` and the like, which add the credentials themselves: a token is sent
            // only when one is given.
            (None, k.token_file.clone())
        };
        let namespace = match &k.namespace {
            Some(namespace) => namespace.clone(),
            None => read_small(&account.join("namespace"))
                .await
                .ok()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_string()),
        };
        let list_path = list_path(&url.prefix, &namespace, &k.service);
        let mut api = Api {
            url,
            tls: None,
            ca_file,
            token_file,
            namespace,
            list_path,
        };
        api.load_tls()?;
        Ok(api)
    }

    fn load_tls(&mut self) -> Result<(), KubernetesError> {
        if let Some(ca) = &self.ca_file {
            let tls = ClientTls::load(TlsSettings {
                ca: Some(ca.clone()),
                ..TlsSettings::default()
            })
            .map_err(|e| KubernetesError::Ca(e.to_string()))?;
            self.tls = Some(tls);
        }
        Ok(())
    }

    /// The bearer token, read now: a rotated token is used from its first request on.
    async fn token(&self) -> Result<Option<String>, KubernetesError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let failed = |reason: String| KubernetesError::Token {
            path: path.clone(),
            reason,
        };
        let text = read_small(path).await.map_err(|e| failed(e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(failed("it is empty".into()));
        }
        Ok(Some(token.to_string()))
    }

    /// Sends `GET path` on a new connection; the answer's head.
    async fn get(&mut self, path: &str) -> Result<Answer, KubernetesError> {
        let token = self.token().await?;
        let authority = self.url.authority.clone();
        let tcp = timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&authority))
            .await
            .map_err(|_| KubernetesError::Timeout("connecting to the API server"))?
            .map_err(|e| KubernetesError::Connect {
                authority: authority.clone(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = match &self.tls {
            None => Conn::Tcp(tcp),
            Some(tls) => {
                let tls_failed = |reason: String| KubernetesError::Tls {
                    authority: authority.clone(),
                    reason,
                };
                let name = tls.server_name(&self.url.host).map_err(|e| tls_failed(e.to_string()))?;
                let handshake = timeout(CONNECT_TIMEOUT, tls.connect(tcp, name))
                    .await
                    .map_err(|_| KubernetesError::Timeout("the TLS handshake with the API server"))?;
                match handshake {
                    Ok(stream) => Conn::ClientTls(Box::new(stream)),
                    Err(e) => {
                        // The next request reads the CA file again: it may have been rotated.
                        self.load_tls()?;
                        return Err(tls_failed(e.to_string()));
                    }
                }
            }
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Owned by the answer: the connection ends when the answer is dropped.
        let driver = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let mut request = http::Request::get(path)
            .header(HOST, self.url.host_header.as_str())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("wsgate/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| KubernetesError::Token {
                path: self.token_file.clone().unwrap_or_default(),
                reason: "it holds characters a header cannot carry".into(),
            })?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| KubernetesError::Parse(format!("the request: {e}")))?;
        let response = sender.send_request(request).await?;
        Ok(Answer {
            response,
            _sender: sender,
            _driver: driver,
        })
    }
}

/// Reads a small file (a token, a namespace) whole, off the runtime's thread, up to [`MAX_FILE_BYTES`].
async fn read_small(path: &Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)?
            .take(MAX_FILE_BYTES)
            .read_to_string(&mut text)?;
        Ok(text)
    });
    read.await.map_err(std::io::Error::other)?
}

/// Why an answer other than 200 OK is not one: a refusal of the credentials (of the token read from `token_file`),
/// or another status, with the message of its body.
async fn refusal(answer: Answer, token_file: Option<&Path>) -> KubernetesError {
    let status = answer.response.status();
    let body = Limited::new(answer.response.into_body(), MAX_STATUS_BYTES).collect();
    let message = match timeout(REQUEST_TIMEOUT, body).await {
        Ok(Ok(body)) => refusal_message(&body.to_bytes()),
        _ => status.canonical_reason().unwrap_or("").to_string(),
    };
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => KubernetesError::Refused {
            status,
            message,
            credentials: match token_file {
                Some(path) => format!("the token of {}", path.display()),
                None => "a request without a token".to_string(),
            },
        },
        _ => KubernetesError::Status { status, message },
    }
}

/// How a watch request ended, when it did not fail.
enum WatchEnd {
    /// The server ended it (its `timeoutSeconds`) or it outlived its deadline: the next one resumes. (A list
    /// ends so too.)
    Ended,
    /// The version watched from is too old: list again.
    Gone,
    /// The serve loop no longer listens.
    Stopped,
}

/// What is known of the Service's slices.
struct View {
    slices: HashMap<String, Vec<Found>>,
    /// The note logged last per slice, so that a slice's unchanged problem is logged once.
    notes: HashMap<String, String>,
    /// `None` until a list has succeeded (and after a `410 Gone`): list first.
    resource_version: Option<String>,
    /// Whether the empty set was logged (once until the Service has endpoints again).
    empty_logged: bool,
}

/// One upstream's watch: the API, what it gave, and where it reports.
struct Watcher {
    k: KubernetesDiscovery,
    reporter: Reporter,
    view: View,
    /// The Service as written in logs: `namespace/name`.
    service: String,
    /// Failures since the last answer.
    failures: u32,
    /// When the last list was sent.
    last_list: Option<Instant>,
}

/// Watches the Service's EndpointSlices for as long as the task runs, reporting each changed set of servers.
pub async fn watch(k: KubernetesDiscovery, reporter: Reporter) {
    let mut watcher = Watcher {
        service: k.service.clone(),
        k,
        reporter,
        view: View {
            slices: HashMap::new(),
            notes: HashMap::new(),
            resource_version: None,
            empty_logged: false,
        },
        failures: 0,
        last_list: None,
    };
    watcher.run().await;
}

impl Watcher {
    async fn run(&mut self) {
        let mut api = None;
        loop {
            let api = match &mut api {
                Some(api) => api,
                None => match Api::new(&self.k).await {
                    Ok(found) => {
                        self.service = format!("{}/{}", found.namespace, self.k.service);
                        tracing::info!(
                            upstream = self.reporter.upstream(),
                            service = %self.service,
                            api = %found.url.host_header,
                            "Kubernetes discovery: watching the Service's EndpointSlices"
                        );
                        api.insert(found)
                    }
                    Err(e) => {
                        self.failed(&e).await;
                        continue;
                    }
                },
            };
            let result = match self.view.resource_version.clone() {
                None => self.list(api).await,
                Some(version) => self.watch_from(api, &version).await,
            };
            match result {
                Ok(WatchEnd::Stopped) => return,
                Ok(WatchEnd::Gone) => {
                    tracing::info!(
                        upstream = self.reporter.upstream(),
                        service = %self.service,
                        "Kubernetes discovery: the version watched from is gone (410): listing again"
                    );
                    self.view.resource_version = None;
                }
                Ok(WatchEnd::Ended) => self.answered(),
                Err(e) => {
                    // A watch that lost an event (unreadable, too long) cannot resume: list again.
                    if matches!(e, KubernetesError::Parse(_) | KubernetesError::LineTooLong) {
                        self.view.resource_version = None;
                    }
                    self.failed(&e).await;
                }
            }
        }
    }

    /// Logs a failure (never the token: no error carries it) and waits before the next try.
    async fn failed(&mut self, e: &KubernetesError) {
        self.failures = self.failures.saturating_add(1);
        let wait = backoff(self.failures - 1);
        tracing::warn!(
            upstream = self.reporter.upstream(),
            service = %self.service,
            "Kubernetes discovery: {e}: the servers known last stay; next try in {wait:?}"
        );
        sleep(wait).await;
    }

    /// Lists the slices, replacing what was known, and reports their servers.
    async fn list(&mut self, api: &mut Api) -> Result<WatchEnd, KubernetesError> {
        if let Some(last) = self.last_list {
            tokio::time::sleep_until(last + MIN_LIST_GAP).await;
        }
        self.last_list = Some(Instant::now());
        let path = api.list_path.clone();
        let body = timeout(REQUEST_TIMEOUT, async {
            let answer = api.get(&path).await?;
            if answer.response.status() != StatusCode::OK {
                return Err(refusal(answer, api.token_file.as_deref()).await);
            }
            let body = Limited::new(answer.response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(e) => KubernetesError::Http(*e),
                    Err(_) => KubernetesError::TooLarge,
                })?;
            Ok(body.to_bytes())
        })
        .await
        .map_err(|_| KubernetesError::Timeout("the list"))??;
        let listed = parse_list(&body, &self.k.port)?;
        self.answered();
        self.view.slices.clear();
        let count = listed.slices.len();
        for (name, slice) in listed.slices {
            self.take(name, slice);
        }
        self.view.notes.retain(|name, _| self.view.slices.contains_key(name));
        tracing::info!(
            upstream = self.reporter.upstream(),
            service = %self.service,
            slices = count,
            servers = self.view.slices.values().map(Vec::len).sum::<usize>(),
            resource_version = %listed.resource_version,
            "Kubernetes discovery: listed the Service's EndpointSlices"
        );
        self.view.resource_version = Some(listed.resource_version);
        Ok(if self.report().await {
            WatchEnd::Ended
        } else {
            WatchEnd::Stopped
        })
    }

    /// Notes a good answer (a list, a watch event, a watch's end): the failures, if any, are over.
    fn answered(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                upstream = self.reporter.upstream(),
                service = %self.service,
                "Kubernetes discovery: the API server answers again"
            );
        }
        self.failures = 0;
    }

    /// Keeps a slice's servers, logging its note when it is new.
    fn take(&mut self, name: String, slice: SliceServers) {
        match slice.note {
            Some(note) => {
                if self.view.notes.get(&name) != Some(&note) {
                    tracing::warn!(
                        upstream = self.reporter.upstream(),
                        service = %self.service,
                        slice = %name,
                        "Kubernetes discovery: EndpointSlice `{name}`: {note}"
                    );
                    self.view.notes.insert(name.clone(), note);
                }
            }
            None => {
                self.view.notes.remove(&name);
            }
        }
        self.view.slices.insert(name, slice.servers);
    }

    /// Reports the union of the slices' servers; an empty one is logged (once) and leaves the servers known last.
    /// Returns whether the serve loop still listens.
    async fn report(&mut self) -> bool {
        let servers: Vec<Found> = self.view.slices.values().flatten().copied().collect();
        if servers.is_empty() {
            if !self.view.empty_logged {
                self.view.empty_logged = true;
                tracing::warn!(
                    upstream = self.reporter.upstream(),
                    service = %self.service,
                    "Kubernetes discovery: the Service has no ready endpoint on the port: the servers known last stay"
                );
            }
        } else {
            self.view.empty_logged = false;
        }
        self.reporter.report(servers).await
    }

    /// One watch request from `version`, applying its events until it ends.
    async fn watch_from(&mut self, api: &mut Api, version: &str) -> Result<WatchEnd, KubernetesError> {
        let path = watch_path(&api.list_path, version);
        let started = Instant::now();
        let answer = timeout(REQUEST_TIMEOUT, api.get(&path))
            .await
            .map_err(|_| KubernetesError::Timeout("the watch request"))??;
        match answer.response.status() {
            StatusCode::OK => {}
            StatusCode::GONE => return Ok(WatchEnd::Gone),
            _ => return Err(refusal(answer, api.token_file.as_deref()).await),
        }
        let deadline = started + Duration::from_secs(WATCH_SECONDS) + WATCH_GRACE;
        let mut body = answer.response.into_body();
        let mut lines = Lines::new(MAX_LINE_BYTES);
        let mut events = 0usize;
        loop {
            let frame = match timeout_at(deadline, body.frame()).await {
                Ok(Some(frame)) => frame?,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        upstream = self.reporter.upstream(),
                        service = %self.service,
                        "Kubernetes discovery: the watch outlived its timeoutSeconds: watching again"
                    );
                    break;
                }
            };
            let Ok(data) = frame.into_data() else { continue };
            lines.push(&data);
            while let Some(line) = lines.next_line()? {
                events = events.saturating_add(1);
                let event = parse_event(&line, &self.k.port)?;
                if !matches!(event, Event::Error { .. }) {
                    self.answered();
                }
                match event {
                    Event::Upsert {
                        name,
                        resource_version,
                        slice,
                    } => {
                        self.take(name, slice);
                        if !resource_version.is_empty() {
                            self.view.resource_version = Some(resource_version);
                        }
                    }
                    Event::Deleted { name, resource_version } => {
                        self.view.slices.remove(&name);
                        self.view.notes.remove(&name);
                        if !resource_version.is_empty() {
                            self.view.resource_version = Some(resource_version);
                        }
                    }
                    Event::Bookmark { resource_version } => {
                        if !resource_version.is_empty() {
                            self.view.resource_version = Some(resource_version);
                        }
                        continue;
                    }
                    Event::Error { code: 410, .. } => return Ok(WatchEnd::Gone),
                    Event::Error { code, message } => return Err(KubernetesError::WatchError { code, message }),
                }
                if !self.report().await {
                    return Ok(WatchEnd::Stopped);
                }
            }
        }
        if lines.pending() {
            tracing::debug!(
                upstream = self.reporter.upstream(),
                "Kubernetes discovery: the watch ended in the middle of an event"
            );
        }
        if events == 0 && started.elapsed() < MIN_WATCH {
            sleep(MIN_WATCH.saturating_sub(started.elapsed())).await;
        }
        Ok(WatchEnd::Ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The servers of a slice given as JSON.
    fn slice_servers(json: &serde_json::Value, port: &KubernetesPort) -> Result<SliceServers, serde_json::Error> {
        Ok(servers_of(&EndpointSlice::deserialize(json)?, port))
    }

    fn ws() -> KubernetesPort {
        KubernetesPort::Name("ws".into())
    }

    fn server(address: &str) -> Found {
        Found {
            address: address.parse().unwrap(),
            weight: DEFAULT_WEIGHT,
            backup: false,
        }
    }

    /// A slice as the EndpointSlice controller writes it, with these endpoints `(addresses, ready)`.
    fn slice(name: &str, address_type: &str, endpoints: &[(&[&str], Option<bool>)]) -> serde_json::Value {
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(addresses, ready)| {
                let mut conditions = serde_json::json!({ "serving": true, "terminating": false });
                if let Some(ready) = ready {
                    conditions["ready"] = serde_json::json!(ready);
                }
                serde_json::json!({ "addresses": addresses, "conditions": conditions, "nodeName": "worker-1" })
            })
            .collect();
        serde_json::json!({
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {
                "name": name,
                "namespace": "default",
                "resourceVersion": "700",
                "labels": { "kubernetes.io/service-name": "app" },
                "managedFields": [{ "manager": "kube-controller-manager", "operation": "Update" }]
            },
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": [
                { "name": "metrics", "protocol": "TCP", "port": 9090 },
                { "name": "ws", "protocol": "TCP", "port": 8080 },
                { "name": "dns", "protocol": "UDP", "port": 53 }
            ]
        })
    }

    #[test]
    fn ready_endpoints_on_the_named_port_are_the_servers() {
        let s = slice(
            "app-x1",
            "IPv4",
            &[
                (&["10.0.0.1"], Some(true)),
                (&["10.0.0.2", "10.0.0.3"], None),
                (&["10.0.0.4"], Some(false)),
            ],
        );
        let found = slice_servers(&s, &ws()).unwrap();
        assert_eq!(
            found.servers,
            [
                server("10.0.0.1:8080"),
                server("10.0.0.2:8080"),
                server("10.0.0.3:8080")
            ],
            "ready or without a ready condition; not ready is left out"
        );
        assert_eq!(found.note, None);
        let by_number = slice_servers(&s, &KubernetesPort::Number(9090)).unwrap();
        assert_eq!(by_number.servers.first(), Some(&server("10.0.0.1:9090")));
    }

    #[test]
    fn only_a_tcp_port_serves_and_a_missing_one_is_named() {
        let s = slice("app-x1", "IPv4", &[(&["10.0.0.1"], Some(true))]);
        let udp = slice_servers(&s, &KubernetesPort::Number(53)).unwrap();
        assert!(udp.servers.is_empty());
        let note = udp.note.unwrap();
        assert!(note.contains("no TCP port 53"), "{note}");
        let named = slice_servers(&s, &KubernetesPort::Name("http".into())).unwrap();
        let note = named.note.unwrap();
        assert!(note.contains("named `http`") && note.contains("ws 8080/TCP"), "{note}");
        // A slice with no endpoint at all has nothing to say about its ports.
        let empty = slice("app-x2", "IPv4", &[]);
        assert_eq!(
            slice_servers(&empty, &KubernetesPort::Number(53)).unwrap(),
            SliceServers::default()
        );
    }

    #[test]
    fn ipv6_slices_give_ipv6_servers_and_fqdn_slices_none() {
        let v6 = slice("app-v6", "IPv6", &[(&["fd00::7"], Some(true))]);
        assert_eq!(slice_servers(&v6, &ws()).unwrap().servers, [server("[fd00::7]:8080")]);
        let fqdn = slice("app-fq", "FQDN", &[(&["app.example.com"], Some(true))]);
        let found = slice_servers(&fqdn, &ws()).unwrap();
        assert!(found.servers.is_empty());
        assert!(found.note.unwrap().contains("FQDN"));
        // An address of the other family (or none at all) is named, the others kept.
        let mixed = slice("app-m", "IPv4", &[(&["10.0.0.1", "fd00::1", "nonsense"], None)]);
        let found = slice_servers(&mixed, &ws()).unwrap();
        assert_eq!(found.servers, [server("10.0.0.1:8080")]);
        assert!(found.note.unwrap().contains("nonsense"));
    }

    #[test]
    fn a_list_gives_each_slice_and_the_version_to_watch_from() {
        let list = serde_json::json!({
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": { "resourceVersion": "48213" },
            "items": [
                slice("app-a", "IPv4", &[(&["10.0.0.1"], Some(true))]),
                slice("app-b", "IPv4", &[(&["10.0.0.2"], Some(false))]),
            ]
        });
        let listed = parse_list(list.to_string().as_bytes(), &ws()).unwrap();
        assert_eq!(listed.resource_version, "48213");
        let names: Vec<&str> = listed.slices.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["app-a", "app-b"]);
        assert_eq!(listed.slices[0].1.servers, [server("10.0.0.1:8080")]);
        assert!(listed.slices[1].1.servers.is_empty());
        // No slice (`items: null`) is an empty list, not an error; no version is.
        let none = br#"{"kind":"EndpointSliceList","metadata":{"resourceVersion":"9"},"items":null}"#;
        assert!(parse_list(none, &ws()).unwrap().slices.is_empty());
        assert!(parse_list(br#"{"items":[]}"#, &ws()).is_err());
        assert!(parse_list(b"<html>", &ws()).is_err());
    }

    #[test]
    fn watch_events_of_every_type() {
        let added = serde_json::json!({ "type": "ADDED", "object": slice("app-a", "IPv4", &[(&["10.0.0.1"], None)]) });
        assert_eq!(
            parse_event(added.to_string().as_bytes(), &ws()).unwrap(),
            Event::Upsert {
                name: "app-a".into(),
                resource_version: "700".into(),
                slice: SliceServers {
                    servers: vec![server("10.0.0.1:8080")],
                    note: None
                },
            }
        );
        let modified = serde_json::json!({ "type": "MODIFIED", "object": slice("app-a", "IPv4", &[(&["10.0.0.1"], Some(false))]) });
        assert!(matches!(
            parse_event(modified.to_string().as_bytes(), &ws()).unwrap(),
            Event::Upsert { slice, .. } if slice.servers.is_empty()
        ));
        let deleted = serde_json::json!({ "type": "DELETED", "object": slice("app-a", "IPv4", &[]) });
        assert_eq!(
            parse_event(deleted.to_string().as_bytes(), &ws()).unwrap(),
            Event::Deleted {
                name: "app-a".into(),
                resource_version: "700".into()
            }
        );
        // A bookmark as the API server sends it: only a version, and nulls.
        let bookmark = br#"{"type":"BOOKMARK","object":{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"resourceVersion":"48305","creationTimestamp":null},"addressType":"","endpoints":null,"ports":null}}"#;
        assert_eq!(
            parse_event(bookmark, &ws()).unwrap(),
            Event::Bookmark {
                resource_version: "48305".into()
            }
        );
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 48213 (48390)","reason":"Expired","code":410}}"#;
        assert_eq!(
            parse_event(gone, &ws()).unwrap(),
            Event::Error {
                code: 410,
                message: "too old resource version: 48213 (48390)".into()
            }
        );
        assert!(parse_event(br#"{"type":"SYNC","object":{}}"#, &ws()).is_err());
        assert!(parse_event(b"{\"type\":\"ADDED\"", &ws()).is_err());
        assert!(parse_event(br#"{"type":"ADDED","object":{"endpoints":"many"}}"#, &ws()).is_err());
    }

    #[test]
    fn lines_are_joined_across_chunks_and_bounded() {
        let mut lines = Lines::new(16);
        lines.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(lines.next_line().unwrap().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(lines.next_line().unwrap(), None);
        assert!(lines.pending());
        lines.push(b":2}\r\n\n  \n{\"c\":3}\n");
        assert_eq!(lines.next_line().unwrap().as_deref(), Some(&b"{\"b\":2}"[..]));
        assert_eq!(lines.next_line().unwrap().as_deref(), Some(&b"{\"c\":3}"[..]));
        assert_eq!(lines.next_line().unwrap(), None);
        assert!(!lines.pending());
        // Too long, with its end not arrived yet, and with it.
        let mut lines = Lines::new(16);
        lines.push(&[b'x'; 17]);
        assert!(matches!(lines.next_line(), Err(KubernetesError::LineTooLong)));
        let mut lines = Lines::new(16);
        lines.push(&[b'x'; 20]);
        lines.push(b"\n");
        assert!(matches!(lines.next_line(), Err(KubernetesError::LineTooLong)));
        let mut lines = Lines::new(16);
        lines.push(&[b'x'; 16]);
        lines.push(b"\n");
        assert_eq!(lines.next_line().unwrap().map(|l| l.len()), Some(16));
    }

    #[test]
    fn requests_select_the_service_and_resume_from_a_version() {
        let list = list_path("", "default", "app");
        assert_eq!(
            list,
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices\
             ?labelSelector=kubernetes.io%2Fservice-name%3Dapp"
        );
        assert_eq!(
            watch_path(&list, "48213"),
            format!("{list}&watch=1&resourceVersion=48213&allowWatchBookmarks=true&timeoutSeconds=300")
        );
        assert_eq!(
            list_path("/k8s/clusters/c-1", "a b", "x/y"),
            "/k8s/clusters/c-1/apis/discovery.k8s.io/v1/namespaces/a%20b/endpointslices\
             ?labelSelector=kubernetes.io%2Fservice-name%3Dx%2Fy"
        );
    }

    #[test]
    fn api_urls_in_and_out_of_a_cluster() {
        assert_eq!(
            in_cluster_url(Some("10.96.0.1"), Some("443")).unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            in_cluster_url(Some("fd00:10:96::1"), Some("443")).unwrap(),
            "https://[fd00:10:96::1]:443"
        );
        assert!(matches!(
            in_cluster_url(None, Some("443")),
            Err(KubernetesError::NotInCluster)
        ));
        assert!(matches!(
            in_cluster_url(Some(""), Some("443")),
            Err(KubernetesError::NotInCluster)
        ));

        let url = ApiUrl::parse("https://[fd00::1]:6443").unwrap();
        assert_eq!(
            (url.authority.as_str(), url.host.as_str()),
            ("[fd00::1]:6443", "[fd00::1]")
        );
        let url = ApiUrl::parse("https://k8s.example.com/k8s/clusters/c-1/").unwrap();
        assert_eq!(url.authority, "k8s.example.com:443");
        assert_eq!(url.host_header, "k8s.example.com");
        assert_eq!(url.prefix, "/k8s/clusters/c-1");
        let url = ApiUrl::parse("http://127.0.0.1:8001").unwrap();
        assert!(!url.https);
        assert_eq!(url.prefix, "");
        assert!(ApiUrl::parse("ftp://x").is_err());
        assert!(ApiUrl::parse("https://x/?a=1").is_err());
    }

    #[test]
    fn refusals_are_told_by_their_status_message() {
        let body = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:default:edge\" cannot list resource \"endpointslices\"","reason":"Forbidden","code":403}"#;
        assert!(refusal_message(body).starts_with("endpointslices.discovery.k8s.io is forbidden"));
        assert_eq!(refusal_message(b"  Unauthorized\n"), "Unauthorized");
        assert_eq!(refusal_message(&[b'x'; 1000]).len(), MAX_MESSAGE_CHARS);
    }
}
