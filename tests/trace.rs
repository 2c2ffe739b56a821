//! W3C trace context: a valid `traceparent` is continued with a new span id for wsgate's hop (its `tracestate`
//! kept), anything else starts a new trace (a client's `tracestate` dropped), on the upgrade fast path and on plain
//! HTTP requests; the access log line carries the trace id.

mod support;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use support::binary::BinaryProxy;
use support::*;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// The trace headers the WebSocket backend got for an upgrade to `/headers` with `extra` request headers.
async fn forwarded_trace(proxy: &Proxy, extra: &[(&str, &str)]) -> (Vec<String>, Vec<String>) {
    let (mut ws, _) = connect_with(&proxy.url("/headers"), extra).await;
    let report = match within("the header report", ws.next()).await {
        Some(Ok(Message::Text(t))) => serde_json::from_str::<serde_json::Value>(t.as_str()).expect("json"),
        other => panic!("expected the backend's header report, got {other:?}"),
    };
    let values = |name: &str| -> Vec<String> {
        report["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .filter(|h| h[0] == name)
            .filter_map(|h| h[1].as_str().map(str::to_string))
            .collect()
    };
    (values("traceparent"), values("tracestate"))
}

fn is_valid_parent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
        && parts[1..]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        && parts[1] != "0".repeat(32)
        && parts[2] != "0".repeat(16)
}

#[tokio::test]
async fn a_valid_traceparent_is_continued_and_anything_else_starts_a_trace_on_upgrades() {
    let backend = ws_backend("b").await;
    let proxy = Proxy::start(&[backend.addr]);

    let (parent, state) = forwarded_trace(&proxy, &[("traceparent", PARENT), ("tracestate", "vendor=1")]).await;
    assert_eq!(parent.len(), 1, "{parent:?}");
    assert!(is_valid_parent(&parent[0]), "{parent:?}");
    assert!(
        parent[0].starts_with(&format!("00-{TRACE_ID}-")),
        "the trace goes on: {parent:?}"
    );
    assert!(
        !parent[0].contains("00f067aa0ba902b7"),
        "wsgate's hop has a span of its own: {parent:?}"
    );
    assert!(parent[0].ends_with("-01"), "the flags are kept: {parent:?}");
    assert_eq!(state, ["vendor=1"]);

    let (parent, state) = forwarded_trace(&proxy, &[("tracestate", "vendor=1")]).await;
    assert_eq!(parent.len(), 1, "{parent:?}");
    assert!(
        is_valid_parent(&parent[0]) && !parent[0].contains(TRACE_ID),
        "a new trace: {parent:?}"
    );
    assert!(state.is_empty(), "a tracestate without its trace is dropped: {state:?}");

    let zeros = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let (parent, state) = forwarded_trace(&proxy, &[("traceparent", zeros), ("tracestate", "vendor=1")]).await;
    assert!(
        is_valid_parent(&parent[0]),
        "an invalid traceparent is replaced: {parent:?}"
    );
    assert!(state.is_empty(), "{state:?}");
}

#[tokio::test]
async fn plain_requests_continue_or_start_traces_too_and_the_access_log_has_the_trace_id() {
    let (backend, _task) = http_backend("web").await;
    let mut proxy = BinaryProxy::start(backend, &[]).await;
    let request = format!(
        "GET /page HTTP/1.1\r\nHost: x\r\ntraceparent: {PARENT}\r\ntracestate: vendor=1\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_exchange(proxy.addr, request.as_bytes()).await;
    let parent = answer
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent reached the backend: {answer}"));
    assert!(
        is_valid_parent(parent) && parent.starts_with(&format!("00-{TRACE_ID}-")),
        "{parent}"
    );
    assert!(answer.contains("tracestate: vendor=1"), "{answer}");
    let line = proxy.wait_for_log(&["\"kind\":\"http\""]).await;
    assert!(line.contains(TRACE_ID), "the access log names the trace: {line}");

    let answer = raw_exchange(
        proxy.addr,
        b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let parent = answer
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent reached the backend: {answer}"));
    assert!(is_valid_parent(parent) && !parent.contains(TRACE_ID), "{parent}");
}
