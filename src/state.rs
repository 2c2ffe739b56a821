//! The shared model every part of wsgate reads: the config in force with the live state of its upstreams
//! ([`Snapshot`]), and what every session of a running server shares ([`Shared`]: the current snapshot, the
//! drain and shutdown signals, the access log). The server swaps snapshots in, sessions read them, the control thread follows them.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::config::{Config, Listener};
use crate::metrics::Metrics;
use crate::policy::Admission;
use crate::upstream::Upstream;

/// What every session of a server shares.
#[derive(Debug)]
pub struct Shared {
    /// The config in force and the upstreams' state. A connection takes the current one when it is accepted and
    /// keeps it for its life; a reload swaps in a new one for the connections after it.
    pub snapshot: ArcSwap<Snapshot>,
    /// Cancelled when the server starts draining: listeners close (and relays are woken to read the phase).
    pub draining: CancellationToken,
    /// Serving, shutting down (frames-mode sessions close with 1001) or force-closing: what a woken relay reads.
    pub phase: crate::signal::Phase,
    /// The counts behind the connection limits (overall and per client), kept across reloads.
    pub(crate) admission: Arc<Admission>,
    /// Cancelled when the drain timeout has run out: sessions still open then are closed (relaying sessions are
    /// woken to read the phase).
    pub force_close: CancellationToken,
    /// What `GET /metrics` on the admin listener reports.
    pub metrics: Arc<Metrics>,
    /// The WebSocket sessions relaying now, and the totals of every listener, route, upstream and server.
    pub sessions: crate::live::Sessions,
    /// Where sessions hand their access log lines.
    pub(crate) access_log: Arc<AccessLog>,
    /// Where the admin API's `POST /api/reload` asks for a reload of the config file (served by the command line's
    /// signal loop, which knows the file).
    pub reloads: tokio::sync::mpsc::UnboundedSender<ReloadRequest>,
    /// Where sessions leave their spans for the OTLP exporter (`[tracing]`).
    pub(crate) spans: crate::otlp::Queue,
    /// The LLM gateway's key database and keys (`[llm]`), kept across reloads.
    pub llm: crate::llm::Gateway,
    /// The limits shared with other instances through Redis (`[cluster]`), kept across reloads.
    pub cluster: crate::cluster::limits::Cluster,
}

#[cfg(test)]
impl Shared {
    /// What a server would share, for unit tests: `config` in force, no access log, no span export.
    pub(crate) fn for_tests(config: Config) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::new(config, None)),
            draining: CancellationToken::new(),
            phase: crate::signal::Phase::default(),
            admission: Arc::default(),
            force_close: CancellationToken::new(),
            metrics: Arc::default(),
            sessions: crate::live::Sessions::default(),
            reloads: tokio::sync::mpsc::unbounded_channel().0,
            spans: crate::otlp::queue().0,
            access_log: Arc::new(AccessLog::off()),
            llm: crate::llm::Gateway::default(),
            cluster: Default::default(),
        }
    }
}

/// A reload asked for through the admin API, answered with the new config's summary or the file's problems.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<String, Vec<String>>>;

/// One validated config and the live state of its upstreams.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    /// In the order of `config.upstreams`.
    pub upstreams: Vec<Upstream>,
}

impl Snapshot {
    /// Builds the upstreams' state, carrying over from `previous` what belongs to upstreams and servers that stay.
    pub fn new(config: Config, previous: Option<&Snapshot>) -> Snapshot {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let old = previous.and_then(|p| p.upstreams.iter().find(|o| o.config.name == u.name));
                let mut upstream = Upstream::new(u, old);
                upstream.keepalive = config.server.tcp_keepalive;
                upstream
            })
            .collect();
        Snapshot { config, upstreams }
    }

    /// The listener configured on `address` (`None` once a reload has removed it).
    pub fn listener(&self, address: SocketAddr) -> Option<&Listener> {
        self.config.listeners.iter().find(|l| l.address == address)
    }

    /// The name of the listener configured on `address` ("" once a reload has removed it).
    pub fn listener_name(&self, address: SocketAddr) -> &str {
        self.listener(address).map_or("", |l| l.name.as_str())
    }
}
