//! A fast OpenAI-compatible fake LLM server for `scripts/bench-llm`: it answers at once, with no model behind it,
//! so what a proxy in front of it adds stands out.
//!
//!   llm_fake --listen ADDR [--token-delay-ms D]
//!
//! - `GET …/models`: one model, `fake` (any model name is served);
//! - `POST …/chat/completions` with `stream: true`: server-sent events in the OpenAI shape, one chunk per token
//!   (`"delta":{"content":"tok0@T "}`, `tok1@T `, …, the first with `"role":"assistant"` too), `max_tokens` (or
//!   `max_completion_tokens`) of them, 100 by default; then a chunk with `finish_reason: "length"`, a usage chunk
//!   (empty `choices`) when `stream_options.include_usage` is true, and `data: [DONE]`;
//! - `stream: false`: one JSON completion, with usage.
//!
//! A token's text is `tok{N}@{T} `: its number, and the time it was written in microseconds since the Unix epoch
//! (the system clock), from which `llm_load` reads how long it took to arrive; and no two chunks are alike (LiteLLM
//! ends a stream that repeats one chunk 100 times).
//!
//! Each token is written to the socket on its own: with a token delay, the stream sleeps that long between tokens;
//! without one, it yields once between tokens, so every chunk leaves in a write of its own as from a real server
//! (several chunks may still arrive in one read, if the reader is slower than the writer). The delay is, by
//! precedence, the body's `metadata.token_delay_ms`, the `x-fake-token-delay-ms` header, a model name ending in
//! `-Nms` (`fake-20ms`: the one that passes through any proxy), or `--token-delay-ms`.
//! Prompt tokens are the characters of the messages' contents over four, rounded up.

use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Sleep;

/// The largest request body read.
const MAX_BODY: usize = 1024 * 1024;
/// The most tokens one answer streams.
const MAX_TOKENS: u64 = 1_000_000;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Args {
    listen: SocketAddr,
    token_delay: Duration,
}

fn parse() -> Result<Args, String> {
    let mut listen = None;
    let mut token_delay = Duration::ZERO;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| bad(&e))?),
            "--token-delay-ms" => token_delay = Duration::from_millis(value.parse().map_err(|e| bad(&e))?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("usage: llm_fake --listen ADDR [--token-delay-ms D]")?,
        token_delay,
    })
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("llm_fake: {e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("llm_fake: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(args)) {
        eprintln!("llm_fake: {e}");
        std::process::exit(1);
    }
}

async fn serve(args: Args) -> Result<(), String> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", args.listen))?;
    let delay = args.token_delay;
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: say so, and let the backlog wait a little.
                eprintln!("llm_fake: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| async move { Ok::<_, Infallible>(answer(req, delay).await) });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await
                && !e.is_incomplete_message()
            {
                eprintln!("llm_fake: connection: {e}");
            }
        });
    }
}

/// An answer: whole, or a stream of server-sent events.
enum Answer {
    Full(Option<Bytes>),
    Stream(Box<Sse>),
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Answer::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Answer::Stream(sse) => sse.poll_next(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Answer::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Answer::Full(None) => SizeHint::with_exact(0),
            Answer::Stream(_) => SizeHint::default(),
        }
    }
}

/// A streamed completion: `tokens` chunks, then the finish chunk, the usage chunk (when asked for) and `[DONE]`.
struct Sse {
    /// `{"id":…,"object":"chat.completion.chunk","created":…,"model":…,` shared by every chunk.
    head: String,
    tokens: u64,
    sent: u64,
    prompt_tokens: u64,
    include_usage: bool,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether the stream has yielded since its last chunk (without a delay).
    yielded: bool,
    done: bool,
}

impl Sse {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.sent > 0 {
            // Between two writes: the delay, or one turn of the event loop, so that each chunk is written alone.
            if self.delay.is_zero() {
                if !self.yielded {
                    self.yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                self.yielded = false;
            } else {
                let delay = self.delay;
                let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
        }
        if self.sent < self.tokens {
            let role = if self.sent == 0 { r#""role":"assistant","# } else { "" };
            // When the token leaves, in µs of the system clock: readers on this machine learn its transit time.
            let at = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let chunk = format!(
                concat!(
                    "data: {}\"choices\":[{{\"index\":0,\"delta\":{{{role}\"content\":\"tok{}@{at} \"}},",
                    "\"finish_reason\":null}}]}}\n\n"
                ),
                self.head,
                self.sent,
                role = role,
                at = at,
            );
            self.sent += 1;
            return Poll::Ready(Some(Bytes::from(chunk)));
        }
        self.done = true;
        let mut tail = format!(
            "data: {}\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"length\"}}]}}\n\n",
            self.head
        );
        if self.include_usage {
            tail.push_str(&format!(
                concat!(
                    "data: {}\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},",
                    "\"total_tokens\":{t}}}}}\n\n"
                ),
                self.head,
                p = self.prompt_tokens,
                c = self.tokens,
                t = self.prompt_tokens + self.tokens,
            ));
        }
        tail.push_str("data: [DONE]\n\n");
        Poll::Ready(Some(Bytes::from(tail)))
    }
}

/// The delay a model name asks for: `NAME-20ms` streams at 20 ms a token. Proxies pass the model name on when they
/// pass nothing else of the request's.
fn model_delay(model: &str) -> Option<u64> {
    let (_, tail) = model.rsplit_once('-')?;
    tail.strip_suffix("ms")?.parse().ok()
}

fn json_answer(status: StatusCode, value: &Value) -> Response<Answer> {
    let mut resp = Response::new(Answer::Full(Some(Bytes::from(value.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Answer> {
    json_answer(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}}),
    )
}

async fn answer(req: Request<Incoming>, default_delay: Duration) -> Response<Answer> {
    let path = req.uri().path().to_string();
    if path.ends_with("/models") {
        return json_answer(
            StatusCode::OK,
            &json!({"object": "list",
                "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "llm_fake"}]}),
        );
    }
    if !path.ends_with("/chat/completions") {
        return error(StatusCode::NOT_FOUND, &format!("no endpoint {path}"));
    }
    if req.method() != hyper::Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "POST a chat completion");
    }
    let header_delay = req
        .headers()
        .get("x-fake-token-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(body @ Value::Object(_)) => body,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "the body is not a JSON object"),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body is not JSON: {e}")),
    };
    let model = body["model"].as_str().unwrap_or("fake");
    let tokens = body["max_tokens"]
        .as_u64()
        .or_else(|| body["max_completion_tokens"].as_u64())
        .unwrap_or(100)
        .min(MAX_TOKENS);
    let delay = body["metadata"]["token_delay_ms"]
        .as_u64()
        .or(header_delay)
        .or_else(|| model_delay(model))
        .map_or(default_delay, Duration::from_millis);
    let prompt_tokens = body["messages"]
        .as_array()
        .map_or(0, |m| {
            m.iter()
                .map(|m| m["content"].as_str().map_or(0, |c| c.chars().count()))
                .sum::<usize>()
        })
        .div_ceil(4) as u64;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if !body["stream"].as_bool().unwrap_or(false) {
        let text: String = (0..tokens).map(|i| format!("tok{i} ")).collect();
        return json_answer(
            StatusCode::OK,
            &json!({
                "id": format!("chatcmpl-fake-{id}"), "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                    "finish_reason": "length"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                    "total_tokens": prompt_tokens + tokens},
            }),
        );
    }
    let head = format!(
        "{{\"id\":\"chatcmpl-fake-{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},",
        Value::from(model)
    );
    let mut resp = Response::new(Answer::Stream(Box::new(Sse {
        head,
        tokens,
        sent: 0,
        prompt_tokens,
        include_usage: body["stream_options"]["include_usage"].as_bool().unwrap_or(false),
        delay,
        sleep: None,
        yielded: false,
        done: false,
    })));
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    resp
}
