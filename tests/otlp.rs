//! OTLP export (`[tracing] otlp_endpoint`): each WebSocket session's span reaches a real collector (a hyper server
//! in the test) as OTLP/HTTP JSON, with the trace the backend saw; a reload moves the export to a new endpoint; a
//! collector that is down slows no session, its failures are logged, and shutdown does not wait on it.

mod support;

use std::convert::Infallible;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustix::process::Signal;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use support::binary::Binary;
use support::*;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// One export request the collector received.
struct Export {
    path: String,
    headers: http::HeaderMap,
    body: Value,
}

/// An OTLP/HTTP collector on a free loopback port: every POST is answered 200 and handed to the test.
struct Collector {
    addr: SocketAddr,
    exports: mpsc::UnboundedReceiver<Export>,
    task: JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the collector");
        let addr = listener.local_addr().expect("collector address");
        let (tx, exports) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let headers = req.headers().clone();
                        let bytes = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        let _ = tx.send(Export { path, headers, body });
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                connections
                    .spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Collector { addr, exports, task }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// The next export request, within [`WAIT`].
    async fn next_export(&mut self) -> Export {
        within("an OTLP export request", self.exports.recv())
            .await
            .expect("the collector runs")
    }

    /// The spans of the next exports until one has the span `span_id` (lowercase hex).
    async fn span(&mut self, span_id: &str) -> Value {
        loop {
            let export = self.next_export().await;
            if let Some(span) = spans(&export.body).into_iter().find(|s| s["spanId"] == span_id) {
                return span;
            }
        }
    }
}

/// Every span of an export request's body.
fn spans(body: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for resource in body["resourceSpans"].as_array().into_iter().flatten() {
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            out.extend(scope["spans"].as_array().into_iter().flatten().cloned());
        }
    }
    out
}

/// An attribute's value as text (`stringValue` or `intValue`), `None` when the span lacks it.
fn attr(span: &Value, key: &str) -> Option<String> {
    let attributes = span["attributes"].as_array()?;
    let value = &attributes.iter().find(|a| a["key"] == key)?["value"];
    value["stringValue"]
        .as_str()
        .or_else(|| value["intValue"].as_str())
        .map(str::to_string)
}

fn config(endpoint: &str, backend: SocketAddr) -> String {
    format!(
        r#"
[[listener]]
name = "front"
address = "127.0.0.1:0"

[[route]]
name = "chat"
upstream = "app"
relay = "frames"

[[upstream]]
name = "app"

[[upstream.server]]
address = "{backend}"

[tracing]
otlp_endpoint = "{endpoint}"
service_name = "edge"
headers = {{ "x-api-key" = "k-123" }}
"#
    )
}

/// Opens a session to `/headers?token=...` with `extra` headers, exchanges a message, closes it with 4000 and
/// waits for the close reply. Returns the `traceparent` the backend got.
async fn session(proxy: &Proxy, extra: &[(&str, &str)]) -> String {
    let (mut ws, _) = connect_with(&proxy.url("/headers/room?token=secret"), extra).await;
    let report = match next_message(&mut ws).await {
        Message::Text(t) => serde_json::from_str::<Value>(t.as_str()).expect("the backend's report"),
        other => panic!("expected the backend's header report, got {other:?}"),
    };
    let traceparent = report["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .find(|h| h[0] == "traceparent")
        .and_then(|h| h[1].as_str())
        .expect("a traceparent reached the backend")
        .to_string();
    ws.send(Message::text("hello")).await.expect("send");
    assert_eq!(next_message(&mut ws).await, Message::text("hello"));
    let close = CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye".into(),
    };
    ws.send(Message::Close(Some(close))).await.expect("close");
    within("the close reply", async {
        while let Some(Ok(message)) = ws.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    traceparent
}

/// The span id in a `traceparent` value.
fn span_id_of(traceparent: &str) -> String {
    traceparent.split('-').nth(2).expect("a span id").to_string()
}

#[tokio::test]
async fn a_sessions_span_reaches_the_collector_with_the_trace_the_backend_saw() {
    let mut collector = Collector::start().await;
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(&collector.endpoint(), backend.addr));

    let forwarded = session(&proxy, &[("traceparent", PARENT)]).await;
    assert!(forwarded.starts_with(&format!("00-{TRACE_ID}-")), "{forwarded}");
    let span_id = span_id_of(&forwarded);
    let export = within("the span", async {
        loop {
            let export = collector.next_export().await;
            if spans(&export.body).iter().any(|s| s["spanId"] == span_id.as_str()) {
                return export;
            }
        }
    })
    .await;
    assert_eq!(export.path, "/v1/traces");
    assert_eq!(export.headers["content-type"], "application/json");
    assert_eq!(export.headers["x-api-key"], "k-123");
    let resource = &export.body["resourceSpans"][0];
    assert_eq!(
        resource["resource"]["attributes"][0],
        serde_json::json!({ "key": "service.name", "value": { "stringValue": "edge" } })
    );
    assert_eq!(resource["scopeSpans"][0]["scope"]["name"], "wsgate");
    let span = spans(&export.body)
        .into_iter()
        .find(|s| s["spanId"] == span_id.as_str())
        .expect("the span");

    assert_eq!(span["traceId"], TRACE_ID);
    assert_eq!(span["parentSpanId"], PARENT_SPAN);
    assert_eq!(span["name"], "WebSocket chat");
    assert_eq!(span["kind"], 2);
    assert_eq!(span["status"]["code"], 1);
    let time = |key: &str| -> u128 {
        span[key]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{key} as a decimal string: {span}"))
    };
    assert!(time("startTimeUnixNano") < time("endTimeUnixNano"), "{span}");
    assert_eq!(attr(&span, "wsgate.route").as_deref(), Some("chat"));
    assert_eq!(attr(&span, "wsgate.upstream").as_deref(), Some("app"));
    assert_eq!(attr(&span, "wsgate.listener").as_deref(), Some("front"));
    assert_eq!(attr(&span, "wsgate.server"), Some(backend.addr.to_string()));
    assert_eq!(attr(&span, "wsgate.close_code").as_deref(), Some("4000"));
    assert_eq!(attr(&span, "wsgate.close_side").as_deref(), Some("client"));
    assert_eq!(attr(&span, "http.response.status_code").as_deref(), Some("101"));
    assert_eq!(attr(&span, "url.path").as_deref(), Some("/headers/room"));
    assert_eq!(attr(&span, "client.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(attr(&span, "network.protocol.name").as_deref(), Some("websocket"));
    assert_eq!(attr(&span, "wsgate.messages_in").as_deref(), Some("1"), "hello");
    let bytes_in: u64 = attr(&span, "wsgate.bytes_in")
        .and_then(|b| b.parse().ok())
        .expect("bytes_in");
    let bytes_out: u64 = attr(&span, "wsgate.bytes_out")
        .and_then(|b| b.parse().ok())
        .expect("bytes_out");
    assert!(bytes_in > 0 && bytes_out > 0, "{span}");
    assert!(!export.body.to_string().contains("secret"), "no query string in a span");

    // Without a traceparent: a trace of its own, no parent.
    let forwarded = session(&proxy, &[]).await;
    let span = within("the second span", collector.span(&span_id_of(&forwarded))).await;
    assert!(!forwarded.contains(TRACE_ID), "{forwarded}");
    assert_eq!(span["traceId"], forwarded.split('-').nth(1).expect("a trace id"));
    assert!(span.get("parentSpanId").is_none(), "{span}");
}

#[tokio::test]
async fn a_reload_sends_the_spans_of_later_sessions_to_the_new_endpoint() {
    let mut first = Collector::start().await;
    let mut second = Collector::start().await;
    let backend = ws_backend("b").await;
    let mut proxy = Proxy::from_toml(&config(&first.endpoint(), backend.addr));
    let forwarded = session(&proxy, &[]).await;
    within("the span at the first collector", first.span(&span_id_of(&forwarded))).await;

    proxy.reload(&config(&second.endpoint(), backend.addr));
    let forwarded = session(&proxy, &[]).await;
    within("the span at the second collector", second.span(&span_id_of(&forwarded))).await;
}

/// A config file in the temp dir, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!("wsgate-otlp-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        ConfigFile(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn a_collector_that_is_down_slows_no_session_and_its_failures_are_logged() {
    let backend = ws_backend("b").await;
    let listen = unused_addr();
    // Nothing listens on the discard port of 127.0.0.2 (no test binds it): every export is refused.
    let down = "http://127.0.0.2:9/v1/traces".to_string();
    let text = config(&down, backend.addr).replace("127.0.0.1:0", &listen.to_string());
    let file = ConfigFile::new("down", &format!("[server]\ndrain_timeout = \"1s\"\n{text}"));
    let mut wsgate = Binary::spawn([OsStr::new("run"), OsStr::new("--config"), file.0.as_os_str()]);
    wsgate.wait_for_log(&["listening"]).await;

    for _ in 0..3 {
        let (mut ws, _) = connect_with(&format!("ws://{listen}/echo"), &[("traceparent", PARENT)]).await;
        ws.send(Message::text("hello")).await.expect("send");
        assert_eq!(next_message(&mut ws).await, Message::text("hello"));
        ws.close(None).await.expect("close");
    }
    let line = wsgate.wait_for_log(&["OTLP export failed"]).await;
    assert!(
        line.contains("spans dropped") && line.contains("cannot connect"),
        "{line}"
    );

    // Shutdown sends what is left within its bound: it does not wait on the collector.
    let session = connect(&format!("ws://{listen}/echo")).await;
    drop(session);
    wsgate.signal(Signal::TERM);
    assert_eq!(wsgate.exit_code().await, Some(0));
}

#[tokio::test]
async fn shutdown_does_not_wait_on_a_collector_that_never_answers() {
    // Accepts export connections and reads nothing from them, answering nothing.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}/v1/traces", silent.local_addr().expect("addr"));
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(&endpoint, backend.addr));
    session(&proxy, &[]).await;
    let (held, _) = within("the exporter's connection", silent.accept())
        .await
        .expect("accept");

    let started = tokio::time::Instant::now();
    within(
        "shutdown",
        tokio::task::spawn_blocking(move || proxy.shutdown_and_join()),
    )
    .await
    .expect("joined");
    // The drain has nothing to wait for; the exporter gives up on its last batch after 2 s, well before its 5 s
    // request timeout (and a retry) would.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    drop(held);
}
