//! One span per WebSocket session, built at its end from what the access log knows, and the OTLP/HTTP JSON a batch
//! of spans is sent as (the protobuf JSON mapping: ids in lowercase hex, 64-bit integers as decimal strings). Pure:
//! no sockets, and no clock read here (the caller passes the end time).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::config::Config;
use crate::http::trace::{Trace, hex};
use crate::observe::ConnectionRecord;

/// The instrumentation scope of every span.
pub const SCOPE: &str = "wsgate";
/// OTLP's `SPAN_KIND_SERVER`.
const KIND_SERVER: u8 = 2;
/// OTLP's `STATUS_CODE_OK` and `STATUS_CODE_ERROR`.
const STATUS_OK: u8 = 1;
const STATUS_ERROR: u8 = 2;
/// OTLP span flags: the W3C trace flags in the low byte, then "whether the parent is remote is known" and "the
/// parent is remote" (the client's span always is).
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;
/// The longest path and status message a span carries (longer ones are cut at a character boundary).
const MAX_TEXT: usize = 512;

/// What a session's span needs that the access log does not keep, noted when its request's trace is made (only
/// with `[tracing]`; boxed, so that the session's record stays small).
#[derive(Debug)]
pub struct SpanStart {
    /// The trace as forwarded: wsgate's span id, the client's span as its parent when the trace was continued.
    pub trace: Trace,
    /// The request's path without its query (which may carry a token).
    pub path: Box<str>,
    /// The name of the listener that accepted the connection.
    pub listener: Box<str>,
}

impl SpanStart {
    /// For a request with `target` (as sent: a path or an absolute URL, with its query) on `listener`.
    pub fn new(trace: Trace, target: &str, listener: &str) -> Box<SpanStart> {
        let path = match target.split_once("://") {
            // Absolute form: the path starts after the authority.
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => target,
        };
        let path = path.split(['?', '#']).next().unwrap_or(path);
        Box::new(SpanStart {
            trace,
            path: cut(path).into(),
            listener: listener.into(),
        })
    }
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
}

/// One finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    /// The W3C trace flags.
    pub flags: u8,
    pub name: String,
    /// Since the Unix epoch.
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, Attr)>,
    /// `Some(message)` for a session that ended in an error or a refusal ≥ 500.
    pub error: Option<String>,
}

impl Span {
    /// The span of a session that ended at `end`, `duration` after it was accepted; `None` when its request got no
    /// trace (not an upgrade, or refused before it was routed) or its trace is not sampled (the client's flag is
    /// followed: wsgate has no sampler of its own).
    pub fn of_session(record: &ConnectionRecord, config: &Config, duration: Duration, end: SystemTime) -> Option<Span> {
        let start = record.span.as_deref()?;
        if !start.trace.sampled() {
            return None;
        }
        let end_ns = end
            .duration_since(UNIX_EPOCH)
            .ok()
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let start_ns = end_ns.saturating_sub(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        let route = record.route.and_then(|i| config.routes.get(i)).map(|r| r.name.as_str());
        let upstream = record
            .upstream
            .and_then(|i| config.upstreams.get(i))
            .map(|u| u.name.as_str());

        let mut attributes = Vec::with_capacity(24);
        let mut text = |key, value: &str| attributes.push((key, Attr::Str(value.to_string())));
        match record.forwarded_for {
            Some(ip) => text("client.address", &ip.to_string()),
            None => text("client.address", &record.client.ip().to_string()),
        }
        let peer = record.proxy.unwrap_or(record.client);
        text("network.peer.address", &peer.ip().to_string());
        text("http.request.method", "GET");
        text("url.path", &start.path);
        text("network.protocol.name", "websocket");
        text("wsgate.listener", &start.listener);
        if let Some(route) = route {
            text("wsgate.route", route);
        }
        if let Some(upstream) = upstream {
            text("wsgate.upstream", upstream);
        }
        if let Some(server) = record.server {
            text("wsgate.server", &server.to_string());
        }
        if let Some(side) = record.bytes.close_first {
            text("wsgate.close_side", side);
        }
        text("wsgate.end", cut(&record.end));
        let mut int = |key, value: u64| attributes.push((key, Attr::Int(i64::try_from(value).unwrap_or(i64::MAX))));
        if record.forwarded_for.is_none() {
            int("client.port", u64::from(record.client.port()));
        }
        int("network.peer.port", u64::from(peer.port()));
        if record.status != 0 {
            int("http.response.status_code", u64::from(record.status));
        }
        int("wsgate.bytes_in", record.bytes.client_to_backend);
        int("wsgate.bytes_out", record.bytes.backend_to_client);
        if let Some((messages_in, messages_out)) = record.bytes.messages {
            int("wsgate.messages_in", messages_in);
            int("wsgate.messages_out", messages_out);
        }
        if let (Some(code), Some(_)) = (record.bytes.close_code, record.bytes.close_first) {
            int("wsgate.close_code", u64::from(code));
        }
        int("wsgate.connection_id", record.id);

        let failed = record.status >= 500 || record.end.starts_with("error");
        Some(Span {
            trace_id: start.trace.trace_id,
            span_id: start.trace.span_id,
            parent: start.trace.parent,
            flags: start.trace.flags,
            name: match route {
                Some(route) => format!("WebSocket {route}"),
                None => "WebSocket".to_string(),
            },
            start_ns,
            end_ns,
            attributes,
            error: failed.then(|| cut(&record.end).to_string()),
        })
    }

    fn to_json(&self) -> Value {
        let attributes: Vec<Value> = self
            .attributes
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    Attr::Str(s) => json!({ "stringValue": s }),
                    Attr::Int(i) => json!({ "intValue": i.to_string() }),
                };
                json!({ "key": key, "value": value })
            })
            .collect();
        let remote = if self.parent.is_some() { FLAG_IS_REMOTE } else { 0 };
        let mut span = json!({
            "traceId": hex(&self.trace_id),
            "spanId": hex(&self.span_id),
            "flags": u32::from(self.flags) | FLAG_HAS_IS_REMOTE | remote,
            "name": self.name,
            "kind": KIND_SERVER,
            "startTimeUnixNano": self.start_ns.to_string(),
            "endTimeUnixNano": self.end_ns.to_string(),
            "attributes": attributes,
            "status": match &self.error {
                None => json!({ "code": STATUS_OK }),
                Some(message) => json!({ "code": STATUS_ERROR, "message": message }),
            },
        });
        if let (Some(parent), Some(object)) = (self.parent, span.as_object_mut()) {
            object.insert("parentSpanId".into(), Value::from(hex(&parent)));
        }
        span
    }
}

/// The body of an OTLP/HTTP JSON export request (`ExportTraceServiceRequest`) carrying `spans`.
pub fn encode(spans: &[Span], service_name: &str) -> Vec<u8> {
    let spans: Vec<Value> = spans.iter().map(Span::to_json).collect();
    let body = json!({
        "resourceSpans": [{
            "resource": {
                "attributes": [{ "key": "service.name", "value": { "stringValue": service_name } }],
            },
            "scopeSpans": [{
                "scope": { "name": SCOPE, "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }],
        }],
    });
    body.to_string().into_bytes()
}

/// `text` up to [`MAX_TEXT`] bytes, cut at a character boundary.
fn cut(text: &str) -> &str {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LogFormat, Timeouts};
    use crate::observe::Counters;

    const PARENT: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn config() -> Config {
        Config::quick(
            "127.0.0.1:0",
            &["127.0.0.1:9".into()],
            Timeouts::default(),
            LogFormat::Text,
        )
        .expect("config")
    }

    fn record(trace: Trace, target: &str) -> ConnectionRecord {
        let mut record = ConnectionRecord::new(7, "192.0.2.1:50000".parse().expect("addr"));
        record.span = Some(SpanStart::new(trace, target, "quick"));
        record.route = Some(0);
        record.upstream = Some(0);
        record.server = Some("127.0.0.1:9".parse().expect("addr"));
        record.status = 101;
        record.bytes = Counters {
            client_to_backend: 10,
            backend_to_client: 20,
            messages: Some((1, 2)),
            close_code: Some(4000),
            close_first: Some("client"),
        };
        record.end = "client closed with 4000".into();
        record
    }

    fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
        let attributes = span["attributes"].as_array().expect("attributes");
        let found = attributes.iter().find(|a| a["key"] == key);
        &found.unwrap_or_else(|| panic!("no attribute {key}: {span}"))["value"]
    }

    #[test]
    fn a_session_span_continues_the_clients_trace_in_otlp_json() {
        let trace = Trace::of(Some(PARENT));
        let record = record(trace, "/chat/room?token=secret");
        let end = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let span = Span::of_session(&record, &config(), Duration::from_millis(1500), end).expect("a span");
        let body: Value = serde_json::from_slice(&encode(&[span], "edge")).expect("json");
        let resource = &body["resourceSpans"][0];
        assert_eq!(resource["resource"]["attributes"][0]["value"]["stringValue"], "edge");
        assert_eq!(resource["scopeSpans"][0]["scope"]["name"], "wsgate");
        let span = &resource["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(span["spanId"], hex(&trace.span_id));
        assert_eq!(span["flags"], 0x301);
        assert_eq!(span["kind"], 2);
        assert_eq!(span["name"], "WebSocket quick");
        assert_eq!(span["startTimeUnixNano"], "1699999998500000000");
        assert_eq!(span["endTimeUnixNano"], "1700000000000000000");
        assert_eq!(span["status"], json!({ "code": 1 }));
        assert_eq!(attr(span, "url.path")["stringValue"], "/chat/room");
        assert!(!body.to_string().contains("secret"), "no query string: {body}");
        assert_eq!(attr(span, "client.address")["stringValue"], "192.0.2.1");
        assert_eq!(attr(span, "client.port")["intValue"], "50000");
        assert_eq!(attr(span, "wsgate.close_code")["intValue"], "4000");
        assert_eq!(attr(span, "wsgate.messages_out")["intValue"], "2");
        assert_eq!(attr(span, "wsgate.server")["stringValue"], "127.0.0.1:9");
        assert_eq!(attr(span, "http.response.status_code")["intValue"], "101");
    }

    #[test]
    fn new_traces_have_no_parent_and_errors_and_unsampled_traces_are_told_apart() {
        let config = config();
        let mut record = record(Trace::of(None), "http://example.com/a/b?x=1");
        record.status = 502;
        record.end = "refused: upstream connect refused".into();
        let span = Span::of_session(&record, &config, Duration::ZERO, SystemTime::now()).expect("a span");
        let json = span.to_json();
        assert!(json.get("parentSpanId").is_none(), "{json}");
        assert_eq!(json["flags"], 0x101);
        assert_eq!(json["status"]["code"], 2);
        assert_eq!(attr(&json, "url.path")["stringValue"], "/a/b");

        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let record = self::record(Trace::of(Some(unsampled)), "/");
        assert_eq!(
            Span::of_session(&record, &config, Duration::ZERO, SystemTime::now()),
            None
        );
        let mut record = self::record(Trace::of(None), "/");
        record.span = None;
        assert_eq!(
            Span::of_session(&record, &config, Duration::ZERO, SystemTime::now()),
            None
        );
    }

    #[test]
    fn long_paths_are_cut_at_a_character_boundary() {
        let long = format!("/{}", "é".repeat(MAX_TEXT));
        let start = SpanStart::new(Trace::of(None), &long, "l");
        assert!(start.path.len() <= MAX_TEXT && start.path.starts_with("/é"));
    }
}
