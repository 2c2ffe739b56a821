//! Prometheus metrics (prometheus-client), served by the admin listener at `GET /metrics`.
//!
//! Nothing here runs per message: sessions, bytes, messages, frames and message sizes are the totals of
//! [`crate::live`] (each relay folds its counts into them at most once a second and when it ends), read as they are
//! at each scrape; a session's close is counted once at its end, a refusal once when it is answered. Labels are
//! bounded: listener, route, upstream and server names from the config, status codes, close codes, a fixed set of
//! reasons; never a client address or a connection id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::live::{SIZE_BOUNDS, SIZE_BUCKETS, Sessions, Totals};
use crate::state::Shared;
use crate::upstream::{ServerState, now_ms};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    /// `switched` (101 relayed), `backend_refused` (the backend's own non-101 answer passed on), `refused` (by
    /// wsgate).
    outcome: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    /// The first close frame's code, `none` for one without a code, `tcp` for a session that ended without one.
    code: String,
    /// Who sent it (`client`, `backend`), or `proxy` / `none`.
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Every metric wsgate keeps, with the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    handshakes: Family<HandshakeLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    config_generation: Gauge,
    handshake_duration: Histogram,
    connect_duration: Histogram,
    retries: Counter,
    /// The LLM gateway's.
    pub llm: crate::llm::metrics::LlmMetrics,
    /// Read at each scrape: the servers' state and the process's.
    states: Arc<States>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wsgate");
        let metrics = Metrics {
            handshakes: Family::default(),
            rejections: Family::default(),
            closes: Family::default(),
            reloads: Family::default(),
            config_generation: Gauge::default(),
            // 0.5 ms to about 16 s.
            handshake_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            // 0.1 ms to about 3 s.
            connect_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            retries: Counter::default(),
            states: Arc::default(),
            llm: crate::llm::metrics::LlmMetrics::new(&mut registry),
            registry: Registry::default(),
        };
        registry.register_collector(Box::new(metrics.states.clone()));
        registry.register(
            "handshakes",
            "WebSocket upgrade requests answered, by outcome and status",
            metrics.handshakes.clone(),
        );
        registry.register(
            "rejections",
            "Requests and connections wsgate refused, by reason",
            metrics.rejections.clone(),
        );
        registry.register(
            "closes",
            "Ended WebSocket sessions by first close code and the side that sent it",
            metrics.closes.clone(),
        );
        registry.register("reloads", "Config reloads by result", metrics.reloads.clone());
        registry.register(
            "handshake_duration_seconds",
            "Time from a WebSocket request's connection (or, on a keep-alive connection, its request) to the 101",
            metrics.handshake_duration.clone(),
        );
        registry.register(
            "upstream_connect_duration_seconds",
            "Time to open a connection to a backend server (TCP, and TLS on an upstream with tls)",
            metrics.connect_duration.clone(),
        );
        registry.register(
            "retries",
            "Backend servers tried again after one failed, for a request",
            metrics.retries.clone(),
        );
        registry.register(
            "config_generation",
            "Configs loaded since start (1 at start, +1 each successful reload)",
            metrics.config_generation.clone(),
        );
        metrics.config_generation.set(1);
        Metrics { registry, ..metrics }
    }
}

impl Metrics {
    /// Lets the scrape read `shared`'s servers (weakly: the metrics live inside it).
    pub fn attach(&self, shared: &Arc<Shared>) {
        let _ = self.states.shared.set(Arc::downgrade(shared));
    }

    /// The metrics as Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A session has switched (its 101 passed on).
    pub fn switched(&self) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                outcome: "switched",
                status: 101,
            })
            .inc();
    }

    /// A session has ended: how it closed (`close_code`: the first close frame's code, `Some(None)` for one without
    /// a code, `None` for a session that ended without a close frame).
    pub fn session_closed(&self, close_code: Option<Option<u16>>, close_side: Option<&'static str>) {
        let code = match close_code {
            Some(Some(code)) => code.to_string(),
            Some(None) => "none".to_string(),
            None => "tcp".to_string(),
        };
        let side = close_side.unwrap_or("none");
        self.closes.get_or_create(&CloseLabels { code, side }).inc();
    }

    /// wsgate refused a request or a connection (`reason`: acl, origin, auth, limit, no_route, overload, upstream,
    /// bad_request, timeout); `upgrade` when it was a WebSocket handshake, answered with `status`.
    pub fn rejected(&self, reason: &'static str, upgrade: bool, status: u16) {
        self.rejections.get_or_create(&ReasonLabels { reason }).inc();
        if upgrade {
            self.handshakes
                .get_or_create(&HandshakeLabels {
                    outcome: "refused",
                    status,
                })
                .inc();
        }
    }

    /// A handshake completed (its 101 passed to the client) this long after it started.
    pub fn handshake_took(&self, took: std::time::Duration) {
        self.handshake_duration.observe(took.as_secs_f64());
    }

    /// A connection to a backend server opened in this long.
    pub fn connect_took(&self, took: std::time::Duration) {
        self.connect_duration.observe(took.as_secs_f64());
    }

    /// A request was tried on `n` more servers after its first failed.
    pub fn retried(&self, n: u64) {
        if n > 0 {
            self.retries.inc_by(n);
        }
    }

    /// A backend answered an upgrade with `status` instead of 101, passed on to the client.
    pub fn backend_refused(&self, status: u16) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                outcome: "backend_refused",
                status,
            })
            .inc();
    }

    /// The generation of the config in force (1 at start, +1 each successful reload).
    pub fn generation(&self) -> i64 {
        self.config_generation.get()
    }

    /// A reload: its result, and the generation of the config in force.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        if ok {
            self.config_generation.inc();
        }
    }
}

const DIRECTIONS: [&str; 2] = ["client_to_backend", "backend_to_client"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    upstream: String,
    server: String,
}

/// What a scrape reads as it is: each server's health, ejection, drain and live connections in the config in
/// force, and the process's descriptors, memory and CPU time.
#[derive(Debug, Default)]
struct States {
    shared: OnceLock<Weak<Shared>>,
}

/// A per-server gauge: its name, help, and how to read it.
type ServerGauge = (
    &'static str,
    &'static str,
    fn(&ServerState, &crate::config::Server, u64) -> i64,
);

const SERVER_GAUGES: [ServerGauge; 4] = [
    (
        "upstream_server_up",
        "1 unless active health checks say the server is down",
        |s, _, _| i64::from(!s.is_down()),
    ),
    (
        "upstream_server_ejected",
        "1 while outlier detection keeps the server out",
        |s, _, now| i64::from(s.is_ejected(now)),
    ),
    (
        "upstream_server_draining",
        "1 for a server in drain (no new connections)",
        |s, c, _| i64::from(s.draining(c)),
    ),
    (
        "upstream_server_connections",
        "Live connections to the server (WebSocket sessions and plain HTTP backend connections)",
        |s, _, _| i64::from(s.active()),
    ),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaceLabels {
    listener: String,
    route: String,
    upstream: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaceDirectionLabels {
    #[prometheus(flatten)]
    place: PlaceLabels,
    /// `client_to_backend` or `backend_to_client`.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// A per-place, per-direction counter: its name, help, and its cells.
type PlaceCounter = (&'static str, &'static str, fn(&Totals) -> &[AtomicU64; 2]);

const PLACE_COUNTERS: [PlaceCounter; 3] = [
    (
        "bytes",
        "Bytes relayed by WebSocket sessions, each way (live sessions' counts folded in at least every second)",
        |t| &t.bytes,
    ),
    (
        "messages",
        "WebSocket data messages relayed by frames-mode sessions, each way (a fragmented message counts once)",
        |t| &t.messages,
    ),
    (
        "frames",
        "WebSocket frames (data and control) read by frames-mode sessions, each way",
        |t| &t.frames,
    ),
];

/// The live sessions' families: sessions active and in all per place, bytes, messages and frames per place and
/// direction, and the message size histogram.
fn encode_sessions(sessions: &Sessions, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let mut totals = sessions.all_totals();
    totals.sort_by(|a, b| a.place.cmp(&b.place));
    let labels = |t: &Totals| PlaceLabels {
        listener: t.place.listener.clone(),
        route: t.place.route.clone(),
        upstream: t.place.upstream.clone(),
        server: t.place.server.clone(),
    };
    let mut metric = encoder.encode_descriptor(
        "sessions_active",
        "WebSocket sessions relayed now",
        None,
        MetricType::Gauge,
    )?;
    for t in &totals {
        ConstGauge::new(t.active.load(Ordering::Relaxed)).encode(metric.encode_family(&labels(t))?)?;
    }
    let mut metric = encoder.encode_descriptor(
        "sessions",
        "WebSocket sessions relayed since start",
        None,
        MetricType::Counter,
    )?;
    for t in &totals {
        ConstCounter::new(t.sessions.load(Ordering::Relaxed)).encode(metric.encode_family(&labels(t))?)?;
    }
    for (name, help, cells) in PLACE_COUNTERS {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for t in &totals {
            for (direction, cell) in DIRECTIONS.into_iter().zip(cells(t)) {
                let labels = PlaceDirectionLabels {
                    place: labels(t),
                    direction,
                };
                ConstCounter::new(cell.load(Ordering::Relaxed)).encode(metric.encode_family(&labels)?)?;
            }
        }
    }
    let mut metric = encoder.encode_descriptor(
        "message_size_bytes",
        "Sizes of the WebSocket data messages frames-mode sessions relayed, each way",
        None,
        MetricType::Histogram,
    )?;
    let sizes = &sessions.sizes;
    for (i, direction) in DIRECTIONS.into_iter().enumerate() {
        let mut buckets = [(f64::MAX, 0u64); SIZE_BUCKETS];
        for (b, (bucket, cell)) in buckets.iter_mut().zip(&sizes.buckets[i]).enumerate() {
            *bucket = (
                SIZE_BOUNDS.get(b).map_or(f64::MAX, |&bound| bound as f64),
                cell.load(Ordering::Relaxed),
            );
        }
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = sizes.sum[i].load(Ordering::Relaxed) as f64;
        metric
            .encode_family(&DirectionLabels { direction })?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for States {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(shared) = self.shared.get().and_then(Weak::upgrade) {
            encode_sessions(&shared.sessions, &mut encoder)?;
            let snapshot = shared.snapshot.load();
            let now = now_ms();
            for (name, help, read) in SERVER_GAUGES {
                let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for upstream in &snapshot.upstreams {
                    for (state, config) in upstream.servers().iter().zip(&upstream.config.servers) {
                        let labels = ServerLabels {
                            upstream: upstream.config.name.clone(),
                            server: state.name.clone(),
                        };
                        ConstGauge::new(read(state, config, now)).encode(metric.encode_family(&labels)?)?;
                    }
                }
            }
            for (name, help, value) in [
                (
                    "access_log_lines_dropped",
                    "Access log lines dropped because the writer was behind (its queue full)",
                    shared.access_log.dropped_total(),
                ),
                (
                    "otlp_spans_dropped",
                    "Spans dropped because the OTLP exporter was behind (its queue full)",
                    shared.spans.dropped_total(),
                ),
                (
                    "cluster_handshakes_unchecked",
                    "Handshakes admitted without the limits shared in Redis: Redis did not answer and their limits fail open",
                    shared.cluster.stats.admitted_unchecked.load(Ordering::Relaxed),
                ),
                (
                    "cluster_handshakes_refused_unavailable",
                    "Handshakes refused (503) because Redis did not answer and a limit that applies fails closed",
                    shared.cluster.stats.refused_unavailable.load(Ordering::Relaxed),
                ),
            ] {
                let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(value).encode(metric)?;
            }
            if shared.cluster.limits().is_some() {
                let metric = encoder.encode_descriptor(
                    "cluster_redis_up",
                    "1 while Redis answers the shared limits' checks, 0 since one went unanswered",
                    None,
                    MetricType::Gauge,
                )?;
                ConstGauge::new(i64::from(!shared.cluster.stats.down.load(Ordering::Relaxed))).encode(metric)?;
            }
            let mut metric = encoder.encode_descriptor(
                "upstream_server_ejections",
                "Times outlier detection has ejected the server since start",
                None,
                MetricType::Counter,
            )?;
            for upstream in &snapshot.upstreams {
                for state in upstream.servers().iter() {
                    let labels = ServerLabels {
                        upstream: upstream.config.name.clone(),
                        server: state.name.clone(),
                    };
                    ConstCounter::new(state.ejections_total()).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        let (in_use, kept) = crate::relay::splice_pipes();
        let process = crate::sys::process_usage();
        let gauges = [
            (
                "splice_pipes_in_use",
                "Pipes carrying a large transfer with splice(2) now (two descriptors each)",
                Some(in_use as u64),
            ),
            (
                "splice_pipes_kept",
                "Empty pipes kept for the next large transfer (two descriptors each)",
                Some(kept as u64),
            ),
            (
                "process_open_fds",
                "File descriptors the process holds",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "The most file descriptors the process may hold (its soft limit)",
                process.max_fds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory of the process",
                process.resident_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)?;
            }
        }
        if let Some(cpu) = process.cpu_seconds {
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "CPU time (user and system) the process has used",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(metric)?;
        }
        Ok(())
    }
}
