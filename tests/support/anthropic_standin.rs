//! A small Anthropic Messages API provider for the gateway's tests: `POST /v1/messages` answers `tokens` tokens
//! (`tok0 `, `tok1 `, …; fewer when the request's `max_tokens` is lower, with `stop_reason: "max_tokens"`) as a
//! JSON message, or with `"stream": true` as Anthropic's event sequence (`message_start`, `content_block_start`,
//! `ping`, one `content_block_delta` per token, `content_block_stop`, `message_delta`, `message_stop`). Usage is
//! reported as Anthropic does: `input_tokens` (the characters of the messages' and system text over four, rounded
//! up) and `output_tokens`. It refuses a request without `x-api-key` (401), `anthropic-version` or `max_tokens`
//! (400), as Anthropic does, and records every request it got.
//!
//! Model names steer it: `busy` answers 429 with `retry-after: 3`, `broken` 500, `overloaded` 529, `invalid` 400
//! (each with Anthropic's error body); `cut` breaks its stream off after two tokens, `stream_error` sends an
//! `error` event after two tokens; `slow` waits a second between tokens, `paced` 20 ms; `tool` answers one token
//! then a call of the request's first tool with the input `{"n": 1}` (`stop_reason: "tool_use"`).

// The record of requests is pushed to and copied under a lock held for nothing else.
#![allow(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request the stand-in got: its path, the headers Anthropic requires, its JSON body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub api_key: Option<String>,
    pub version: Option<String>,
    pub body: Value,
}

pub struct Standin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Streams still being written (a client gone stops them: the connection closes).
    pub open_streams: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Standin {
    /// The `base_url` of a provider of `kind = "anthropic"` pointing here.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Input tokens it reports for a request: the characters of its system text and of its messages' text (string
    /// contents, text blocks, string tool results), over four, rounded up.
    pub fn input_tokens(body: &Value) -> u64 {
        fn text(content: &Value) -> usize {
            match content {
                Value::String(s) => s.chars().count(),
                Value::Array(blocks) => blocks
                    .iter()
                    .map(|b| match b["type"].as_str() {
                        Some("text") => b["text"].as_str().map_or(0, |t| t.chars().count()),
                        Some("tool_result") => text(&b["content"]),
                        _ => 0,
                    })
                    .sum(),
                _ => 0,
            }
        }
        let messages: usize = body["messages"]
            .as_array()
            .map(|m| m.iter().map(|m| text(&m["content"])).sum())
            .unwrap_or(0);
        (messages + text(&body["system"])).div_ceil(4) as u64
    }

    /// The tokens it answers a request with, and its `stop_reason`: `tokens`, or fewer when `max_tokens` is lower.
    pub fn output(body: &Value, tokens: usize) -> (usize, &'static str) {
        let max = body["max_tokens"].as_u64().unwrap_or(0) as usize;
        if max < tokens {
            (max, "max_tokens")
        } else {
            (tokens, "end_turn")
        }
    }

    pub async fn start(tokens: usize) -> Standin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let open_streams = Arc::new(AtomicUsize::new(0));
        let (seen2, open2) = (seen.clone(), open_streams.clone());
        let task = super::serve_http(listener, move |req| answer(req, tokens, seen2.clone(), open2.clone()));
        Standin {
            addr,
            seen,
            open_streams,
            task,
        }
    }
}

use super::{TestBody as Body, json_answer};

/// An Anthropic error answer.
fn error_answer(status: u16, kind: &str, message: &str) -> hyper::Response<Body> {
    json_answer(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

/// One event as Anthropic writes it: its name, then its data (which carries the name again as `type`).
fn event(name: &str, data: Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// Counts a stream as open until it is dropped (written to its end, or abandoned).
struct OpenStream(Arc<AtomicUsize>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One step of a stream: an event (a token's, when `true`, paced as the model says), or a break.
enum Step {
    Send(Bytes, bool),
    Cut,
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    tokens: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    open: Arc<AtomicUsize>,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap_or("?").to_string());
    let (api_key, version) = (header("x-api-key"), header("anthropic-version"));
    let post = req.method() == hyper::Method::POST;
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    seen.lock().unwrap().push(Seen {
        path: path.clone(),
        api_key: api_key.clone(),
        version: version.clone(),
        body: body.clone(),
    });
    if !post || path != "/v1/messages" {
        return error_answer(404, "not_found_error", "Not found");
    }
    if api_key.is_none() {
        return error_answer(401, "authentication_error", "x-api-key header is required");
    }
    if version.is_none() {
        return error_answer(400, "invalid_request_error", "anthropic-version: header is required");
    }
    if !body["max_tokens"].is_u64() {
        return error_answer(400, "invalid_request_error", "max_tokens: Field required");
    }
    let model = body["model"].as_str().unwrap_or("").to_string();
    match model.as_str() {
        "busy" => {
            let mut resp = error_answer(
                429,
                "rate_limit_error",
                "Number of requests has exceeded your rate limit",
            );
            resp.headers_mut().insert("retry-after", "3".parse().unwrap());
            return resp;
        }
        "broken" => return error_answer(500, "api_error", "Internal server error"),
        "overloaded" => return error_answer(529, "overloaded_error", "Overloaded"),
        "invalid" => return error_answer(400, "invalid_request_error", "messages: roles must alternate"),
        _ => {}
    }
    let input_tokens = Standin::input_tokens(&body);
    let (mut n, mut stop_reason) = Standin::output(&body, tokens);
    // `tool`: one token of text, then a call of the first tool.
    let tool = match (model.as_str(), body["tools"][0]["name"].as_str()) {
        ("tool", Some(name)) => {
            n = n.min(1);
            stop_reason = "tool_use";
            Some(name.to_string())
        }
        _ => None,
    };
    let id = format!("msg_standin{}", seen.lock().unwrap().len());
    if !body["stream"].as_bool().unwrap_or(false) {
        let text: String = (0..n).map(|i| format!("tok{i} ")).collect();
        let mut content = vec![json!({"type": "text", "text": text})];
        if let Some(name) = &tool {
            content.push(json!({"type": "tool_use", "id": "toolu_standin", "name": name, "input": {"n": 1}}));
        }
        return json_answer(
            200,
            &json!({
                "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": n},
            }),
        );
    }

    let mut steps = vec![
        Step::Send(
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
                    "content": [], "model": model, "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
            ),
            false,
        ),
        Step::Send(
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            false,
        ),
        Step::Send(event("ping", json!({"type": "ping"})), false),
    ];
    for i in 0..n {
        if i == 2 && model == "cut" {
            steps.push(Step::Cut);
            break;
        }
        if i == 2 && model == "stream_error" {
            let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
            steps.push(Step::Send(event("error", error), false));
            break;
        }
        let delta = json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": format!("tok{i} ")}});
        steps.push(Step::Send(event("content_block_delta", delta), true));
    }
    let stopped_early = matches!(model.as_str(), "cut" | "stream_error") && n > 2;
    if !stopped_early {
        steps.push(Step::Send(
            event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
            false,
        ));
        if let Some(name) = &tool {
            let start = json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_standin", "name": name, "input": {}}});
            steps.push(Step::Send(event("content_block_start", start), false));
            for part in ["{\"n\":", " 1}"] {
                let delta = json!({"type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": part}});
                steps.push(Step::Send(event("content_block_delta", delta), false));
            }
            steps.push(Step::Send(
                event("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
                false,
            ));
        }
        let delta = json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": n}});
        steps.push(Step::Send(event("message_delta", delta), false));
        steps.push(Step::Send(
            event("message_stop", json!({"type": "message_stop"})),
            false,
        ));
    }

    open.fetch_add(1, Ordering::SeqCst);
    let guard = OpenStream(open);
    let pace = match model.as_str() {
        "slow" => Some(Duration::from_secs(1)),
        "paced" => Some(Duration::from_millis(20)),
        _ => None,
    };
    let events = stream::unfold(
        (steps.into_iter(), false, guard),
        move |(mut steps, mut tokens_sent, guard)| {
            async move {
                let bytes = match steps.next()? {
                    Step::Send(bytes, token) => {
                        if token {
                            if tokens_sent && let Some(pace) = pace {
                                tokio::time::sleep(pace).await;
                            }
                            tokens_sent = true;
                        }
                        bytes
                    }
                    Step::Cut => {
                        // After what it wrote has gone out: the cut comes mid-stream, not before the answer's head.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return Some((Err(std::io::Error::other("cut off")), (steps, tokens_sent, guard)));
                    }
                };
                Some((Ok::<_, std::io::Error>(Frame::data(bytes)), (steps, tokens_sent, guard)))
            }
        },
    );
    let mut resp = hyper::Response::new(StreamBody::new(events).boxed());
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    resp
}
