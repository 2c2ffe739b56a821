//! OpenTelemetry export (`[tracing] otlp_endpoint`): one span per WebSocket session, sent by OTLP/HTTP with JSON.
//! [`span`] builds a session's span from its access log record and encodes batches (pure); [`export`] owns the
//! thread that batches and sends them. A session hands its span to the [`Queue`] at its end and never waits: when
//! the queue is full the span is dropped and counted. This module does not decide what a trace is (`http::trace`)
//! nor what the access log says (`observe`).

mod export;
mod span;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::config::Config;
use crate::observe::ConnectionRecord;

pub(crate) use export::Exporter;
use span::Span;
pub(crate) use span::SpanStart;

/// Spans waiting for the exporter; more are dropped (and counted) until it catches up.
pub const QUEUE_CAPACITY: usize = 2048;

/// Where sessions leave their spans: the near end of the exporter's queue, shared by every worker.
#[derive(Debug)]
pub(crate) struct Queue {
    spans: mpsc::Sender<Span>,
    /// Spans dropped because the queue was full (the exporter logs and resets it).
    dropped: Arc<AtomicU64>,
    /// The same, since start (`wsgate_otlp_spans_dropped_total`).
    dropped_total: AtomicU64,
}

/// The far end of the queue, for the [`Exporter`].
pub(crate) struct Receiving {
    spans: mpsc::Receiver<Span>,
    dropped: Arc<AtomicU64>,
}

/// A queue and its far end.
pub(crate) fn queue() -> (Queue, Receiving) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let dropped = Arc::new(AtomicU64::new(0));
    let receiving = Receiving {
        spans: rx,
        dropped: dropped.clone(),
    };
    (
        Queue {
            spans: tx,
            dropped,
            dropped_total: AtomicU64::new(0),
        },
        receiving,
    )
}

impl Queue {
    /// Exports the span of a session that ended `duration` after it was accepted, when `config` (the session's)
    /// has `[tracing]` and its request got a sampled trace.
    pub(crate) fn session_ended(&self, record: &ConnectionRecord, config: &Config, duration: Duration) {
        if config.tracing.is_none() {
            return;
        }
        let Some(span) = Span::of_session(record, config, duration, SystemTime::now()) else {
            return;
        };
        if self.spans.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped on a full queue since start.
    pub(crate) fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LogFormat, Timeouts, TracingSettings};
    use crate::http::trace::Trace;

    #[test]
    fn a_full_queue_drops_and_counts_spans_and_only_sampled_traced_sessions_are_queued() {
        let mut config = Config::quick(
            "127.0.0.1:0",
            &["127.0.0.1:9".into()],
            Timeouts::default(),
            LogFormat::Text,
        )
        .expect("config");
        let (queue, mut receiving) = queue();
        let mut record = ConnectionRecord::new(1, "127.0.0.1:5".parse().expect("addr"));
        record.span = Some(SpanStart::new(Trace::of(None), "/", "quick"));
        queue.session_ended(&record, &config, Duration::ZERO);
        assert!(receiving.spans.try_recv().is_err(), "no [tracing]: nothing queued");

        config.tracing = Some(TracingSettings {
            endpoint: "http://127.0.0.1:4318/v1/traces".parse().expect("uri"),
            service_name: "wsgate".into(),
            headers: Vec::new(),
            tls: None,
        });
        for _ in 0..QUEUE_CAPACITY + 3 {
            queue.session_ended(&record, &config, Duration::ZERO);
        }
        assert_eq!(receiving.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(queue.dropped_total(), 3);
        assert_eq!(receiving.spans.len(), QUEUE_CAPACITY);
    }
}
