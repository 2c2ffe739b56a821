//! A small OpenAI-compatible provider for the gateway's tests, where a case needs precise control: it streams
//! `tokens` chunks per request (one token each, `tok0 `, `tok1 `, …), reports usage as the OpenAI API does
//! (`usage` in a JSON answer; a last chunk with empty `choices` when `stream_options.include_usage` is set), and
//! records every request it got. Model names steer it: `busy` answers 429 with `Retry-After: 7`, `broken` answers
//! 500, `unauthorized` 401 (naming its key, as OpenAI does), `rejected` 400, `garbage` answers HTML (a stream: one chunk, then an event that is not JSON), `cut` breaks its stream off after two chunks, `slow` waits a second between tokens, `paced` 20 ms, `late` a second before the first. With `failing_streams` set, every stream fails before its first
//! token.

// The record of requests is pushed to and copied under a lock held for nothing else.
#![allow(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request the stand-in got: its path, its `Authorization` header, its JSON body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

pub struct Standin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Streams still being written (a client gone stops them: the connection closes).
    pub open_streams: Arc<std::sync::atomic::AtomicUsize>,
    /// While set, every stream fails before its first token: 200, then an error event, as an overloaded server's.
    pub failing_streams: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Standin {
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Prompt tokens it reports for a request: the characters of its messages' contents, over four, rounded up.
    pub fn prompt_tokens(body: &Value) -> u64 {
        let chars: usize = body["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| m["content"].as_str().map_or(0, |c| c.chars().count()))
                    .sum()
            })
            .unwrap_or(0);
        chars.div_ceil(4) as u64
    }

    pub async fn start(tokens: usize) -> Standin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let open_streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failing_streams = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, open2, failing2) = (seen.clone(), open_streams.clone(), failing_streams.clone());
        let task = super::serve_http(listener, move |req| {
            let failing = failing2.load(std::sync::atomic::Ordering::SeqCst);
            answer(req, tokens, seen2.clone(), open2.clone(), failing)
        });
        Standin {
            addr,
            seen,
            open_streams,
            failing_streams,
            task,
        }
    }
}

use super::{TestBody as Body, json_answer};

/// Counts a stream as open until it is dropped (written to its end, or abandoned).
struct OpenStream(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    tokens: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    failing_streams: bool,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    seen.lock().unwrap().push(Seen {
        path: path.clone(),
        authorization,
        body: body.clone(),
    });
    let model = body["model"].as_str().unwrap_or("").to_string();
    match model.as_str() {
        "busy" => {
            let mut resp = json_answer(429, &json!({"error": {"message": "busy", "type": "rate_limit_error"}}));
            resp.headers_mut().insert("retry-after", "7".parse().unwrap());
            return resp;
        }
        "broken" => return json_answer(500, &json!({"error": {"message": "internal", "type": "server_error"}})),
        "unauthorized" => {
            let body = json!({"error": {"message": "Incorrect API key provided: sk-prov****0123.", "type": "invalid_request_error"}});
            return json_answer(401, &body);
        }
        "rejected" => {
            let body = json!({"error": {"message": "max_tokens is too large for this model", "type": "invalid_request_error"}});
            return json_answer(400, &body);
        }
        "garbage" => {
            let (content_type, text) = if body["stream"].as_bool().unwrap_or(false) {
                (
                    "text/event-stream",
                    "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: <html>oops\n\n",
                )
            } else {
                ("text/html", "<html>oops</html>")
            };
            let mut resp = hyper::Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed());
            resp.headers_mut().insert("content-type", content_type.parse().unwrap());
            return resp;
        }
        _ => {}
    }
    let prompt = Standin::prompt_tokens(&body);
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens as u64});
    if !body["stream"].as_bool().unwrap_or(false) {
        let text: String = (0..tokens).map(|i| format!("tok{i} ")).collect();
        return json_answer(
            200,
            &json!({
                "id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }),
        );
    }
    if failing_streams {
        let text = "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n";
        let mut resp = hyper::Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed());
        resp.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        return resp;
    }
    let include_usage = body["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let guard = OpenStream(open);
    let chunk = move |delta: Value, finish: Value| {
        let c = json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        Bytes::from(format!("data: {c}\n\n"))
    };
    let events = stream::unfold(0usize, move |i| {
        let chunk = chunk.clone();
        let usage = usage.clone();
        let model_mode = body["model"].as_str().unwrap_or("").to_string();
        let _keep = &guard;
        async move {
            if model_mode == "slow" && i > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if model_mode == "late" && i == 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if model_mode == "paced" && i > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if model_mode == "cut" && i == 2 {
                // After what it wrote has gone out: the cut comes mid-stream, not before the answer's head.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Some((Err(std::io::Error::other("cut off")), usize::MAX));
            }
            if i == usize::MAX {
                return None;
            }
            let bytes = if i < tokens {
                chunk(json!({"content": format!("tok{i} ")}), Value::Null)
            } else if i == tokens {
                chunk(json!({}), json!("stop"))
            } else if i == tokens + 1 && include_usage {
                let u = json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0,
                    "model": model_mode, "choices": [], "usage": usage});
                Bytes::from(format!("data: {u}\n\n"))
            } else if i <= tokens + 2 {
                Bytes::from_static(b"data: [DONE]\n\n")
            } else {
                return None;
            };
            let next = if i == tokens + 1 && !include_usage {
                i + 2
            } else {
                i + 1
            };
            Some((Ok::<_, std::io::Error>(Frame::data(bytes)), next))
        }
    });
    let mut resp = hyper::Response::new(StreamBody::new(events).boxed());
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    resp
}
