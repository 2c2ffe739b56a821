//! The WebSocket streaming protocol of an `llm` route (`…/stream`, documented in `docs/llm-protocol.md`): a client
//! sends `request` messages (an id, a model, OpenAI chat parameters) and gets `delta` messages as tokens arrive,
//! then `done` with usage and cost, or `error`; several requests may be in flight on one socket, told apart by
//! id; `cancel` (or the socket closing) stops a request's upstream generation at once and bills what had streamed.
//!
//! wsgate is the WebSocket server here (tungstenite over the client's connection, after wsgate's own 101); each
//! request runs in a task of its own on the connection's worker and hands its messages to the one writer.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

use super::http::ApiError;
use super::keys::{KeyRefusal, KeyState};
use super::meter::{Chunk, Meter, estimate_prompt_tokens, prompt_text};
use super::metrics::Clock;
use super::{Metered, provider, sse};
use crate::config::llm::{LlmSettings, Provider};
use crate::conn::Conn;
use crate::state::Shared;

/// Requests one socket may have in flight; more are refused with an `error` (429).
pub const MAX_IN_FLIGHT: usize = 16;
/// The longest request id.
const MAX_ID: usize = 128;
/// How long a close frame or a message may take to be written to a client that reads slowly.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// An upgrade to an `llm` route's stream or Realtime endpoint, as the request head gave it.
#[derive(Debug)]
pub struct Opening {
    pub accept: [u8; 28],
    /// The key: `Authorization: Bearer KEY`, or `?api_key=KEY` (browsers cannot set headers on a WebSocket).
    pub secret: Option<String>,
    /// A Realtime session (`…/realtime`), not the stream protocol.
    pub realtime: Option<Realtime>,
}

/// What a Realtime upgrade asked for.
#[derive(Debug)]
pub struct Realtime {
    /// `?model=`.
    pub model: Option<String>,
    /// The client's `OpenAI-Beta` header, passed on to the provider.
    pub beta: Option<http::HeaderValue>,
}

/// Why a stream socket ended (for the access log).
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("closed by client")]
    ClientClosed,
    #[error("client gone: {0}")]
    Client(String),
    #[error("closed by wsgate: server shutting down")]
    ShuttingDown,
    #[error("closed by wsgate: the client did not read within {WRITE_TIMEOUT:?}")]
    WriteTimeout,
}

/// Serves a stream socket: checks its key (an HTTP 401/503 before any upgrade when it fails), switches, and runs
/// the protocol until the socket ends. `early`: bytes the client sent after its head. Returns the HTTP status
/// answered and how it ended.
pub async fn serve(
    shared: &Arc<Shared>,
    settings: &Arc<LlmSettings>,
    mut client: Conn,
    opening: Opening,
    early: Vec<u8>,
) -> (u16, String) {
    if let Some(realtime) = opening.realtime {
        let secret = opening.secret.as_deref();
        return super::realtime::serve(shared, settings, client, secret, realtime, opening.accept, early).await;
    }
    let key = match authenticate(shared, opening.secret.as_deref()).await {
        Ok(key) => key,
        Err(e) => {
            e.count(&shared.metrics.llm);
            return refuse_upgrade(&mut client, &e).await;
        }
    };
    if let Err(e) = switch(&mut client, &opening.accept).await {
        return (101, format!("error: client: {e}"));
    }
    let limit = usize::try_from(settings.max_request_body).unwrap_or(usize::MAX);
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let io = Prefixed::new(early, client);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let secret = opening.secret.unwrap_or_default();
    let ended = Socket::new(shared.clone(), settings.clone(), key, secret).run(ws).await;
    (101, ended.to_string())
}

async fn authenticate(shared: &Shared, secret: Option<&str>) -> Result<Arc<KeyState>, ApiError> {
    let db = shared
        .llm
        .db()
        .ok_or_else(|| ApiError::from_key(&KeyRefusal::Unavailable(super::DbError::Closed)))?;
    let secret = secret.ok_or_else(|| ApiError::from_key(&KeyRefusal::Missing))?;
    shared
        .llm
        .keys
        .authenticate(&db, secret)
        .await
        .map_err(|e| ApiError::from_key(&e))
}

/// What request tasks hand the writer.
enum Out {
    Message(Value),
    /// The request's last message went out before this: its id is free again.
    Finished(String),
}

struct Socket {
    shared: Arc<Shared>,
    settings: Arc<LlmSettings>,
    key: Arc<KeyState>,
    /// The client's key, read again for each request (at most every 10 s from the database): a key revoked
    /// elsewhere stops working on open sockets too.
    secret: String,
    in_flight: HashMap<String, CancellationToken>,
    out_tx: mpsc::Sender<Out>,
    out_rx: mpsc::Receiver<Out>,
}

impl Socket {
    fn new(shared: Arc<Shared>, settings: Arc<LlmSettings>, key: Arc<KeyState>, secret: String) -> Socket {
        let (out_tx, out_rx) = mpsc::channel(64);
        Socket {
            shared,
            settings,
            key,
            secret,
            in_flight: HashMap::new(),
            out_tx,
            out_rx,
        }
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut self, ws: WebSocketStream<S>) -> Ended {
        let (mut sink, mut stream) = ws.split();
        let every = self.settings.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + every, every);
        let draining = self.shared.draining.clone();
        let mut closing = false;
        let ended = loop {
            if closing && self.in_flight.is_empty() {
                let frame = CloseFrame {
                    code: CloseCode::Away,
                    reason: "server shutting down".into(),
                };
                let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
                break Ended::ShuttingDown;
            }
            tokio::select! {
                biased;
                out = self.out_rx.recv() => {
                    let message = match out {
                        Some(Out::Message(message)) => message,
                        Some(Out::Finished(id)) => {
                            self.in_flight.remove(&id);
                            continue;
                        }
                        None => continue,
                    };
                    match tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::text(message.to_string()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Ended::Client(e.to_string()),
                        Err(_) => break Ended::WriteTimeout,
                    }
                }
                incoming = stream.next() => match incoming {
                    None | Some(Ok(Message::Close(_))) => break Ended::ClientClosed,
                    Some(Err(e)) => {
                        // Too large a message gets its close code; the socket is over either way.
                        if let tokio_tungstenite::tungstenite::Error::Capacity(_) = e {
                            let frame = CloseFrame { code: CloseCode::Size, reason: "message too large".into() };
                            let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
                        }
                        break Ended::Client(e.to_string());
                    }
                    Some(Ok(Message::Text(text))) => self.message(text.as_str(), closing).await,
                    Some(Ok(Message::Binary(_))) => {
                        self.say(error(None, StatusCode::BAD_REQUEST, "expected a JSON text message")).await;
                    }
                    Some(Ok(_)) => {}
                },
                _ = ping.tick() => {
                    if tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Ping(Bytes::new()))).await.is_err() {
                        break Ended::WriteTimeout;
                    }
                }
                () = draining.cancelled(), if !closing => closing = true,
            }
        };
        // Whatever is still running stops now: its provider's connection closes, and it bills what streamed.
        for (_, cancel) in self.in_flight.drain() {
            cancel.cancel();
        }
        ended
    }

    /// Queues a message of the socket's own for the writer.
    async fn say(&self, message: Value) {
        let _ = self.out_tx.send(Out::Message(message)).await;
    }

    async fn message(&mut self, text: &str, closing: bool) {
        let Ok(Value::Object(mut message)) = serde_json::from_str::<Value>(text) else {
            self.say(error(None, StatusCode::BAD_REQUEST, "expected a JSON object"))
                .await;
            return;
        };
        let id = match message.get("id") {
            Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_ID => Some(id.clone()),
            Some(_) => {
                let why = format!("`id` must be a string of 1 to {MAX_ID} bytes");
                self.say(error(None, StatusCode::BAD_REQUEST, &why)).await;
                return;
            }
            None => None,
        };
        match (message.get("type").and_then(Value::as_str), id) {
            (Some("request"), Some(id)) => {
                message.remove("type");
                message.remove("id");
                self.request(id, message, closing).await;
            }
            (Some("cancel"), Some(id)) => match self.in_flight.get(&id) {
                Some(cancel) => cancel.cancel(),
                None => {
                    let why = "no request in flight with this id";
                    self.say(error(Some(&id), StatusCode::NOT_FOUND, why)).await;
                }
            },
            (Some("request" | "cancel"), None) => {
                self.say(error(None, StatusCode::BAD_REQUEST, "`id` is required")).await;
            }
            (_, id) => {
                let why = "`type` must be \"request\" or \"cancel\"";
                self.say(error(id.as_deref(), StatusCode::BAD_REQUEST, why)).await;
            }
        }
    }

    async fn request(&mut self, id: String, mut body: Map<String, Value>, closing: bool) {
        if closing {
            let why = "the server is shutting down";
            self.say(error(Some(&id), StatusCode::SERVICE_UNAVAILABLE, why)).await;
            return;
        }
        if self.in_flight.contains_key(&id) {
            self.say(error(
                Some(&id),
                StatusCode::CONFLICT,
                "a request with this id is in flight",
            ))
            .await;
            return;
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            let why = format!("at most {MAX_IN_FLIGHT} requests may be in flight on one socket");
            self.say(error(Some(&id), StatusCode::TOO_MANY_REQUESTS, &why)).await;
            return;
        }
        let model = match body.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            _ => {
                let why = "`model` (a string) is required";
                self.say(error(Some(&id), StatusCode::BAD_REQUEST, why)).await;
                return;
            }
        };
        if !body.get("messages").is_some_and(Value::is_array) {
            let why = "`messages` (an array) is required";
            self.say(error(Some(&id), StatusCode::BAD_REQUEST, why)).await;
            return;
        }
        let providers: Vec<Provider> = (self.shared.llm.order(self.settings.providers_for(&model).collect()))
            .into_iter()
            .cloned()
            .collect();
        if providers.is_empty() {
            let why = format!(
                "the model `{}` does not exist",
                model.chars().take(200).collect::<String>()
            );
            self.say(error(Some(&id), StatusCode::NOT_FOUND, &why)).await;
            return;
        }
        let Some(db) = self.shared.llm.db() else {
            let why = "API keys cannot be checked right now";
            self.say(error(Some(&id), StatusCode::SERVICE_UNAVAILABLE, why)).await;
            return;
        };
        match self.shared.llm.keys.authenticate(&db, &self.secret).await {
            Ok(key) => self.key = key,
            Err(e) => {
                let api = ApiError::from_key(&e);
                self.say(error(Some(&id), api.status, &api.message)).await;
                return;
            }
        }
        if let Err(over) = self.key.admit(&db, &model).await {
            let api = ApiError::from_limit(&over);
            let mut e = error(Some(&id), api.status, &api.message);
            if let Some(after) = over.retry_after {
                e["retry_after"] = json!(after.as_secs_f64().ceil() as u64);
            }
            self.say(e).await;
            return;
        }
        if self.settings.log_bodies {
            let text = Value::Object(body.clone());
            tracing::debug!(key = self.key.id(), model = %model, body = %text, "LLM request body");
        }
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));

        let cancel = CancellationToken::new();
        self.in_flight.insert(id.clone(), cancel.clone());
        let run = Run {
            id,
            model: model.clone(),
            meter: Meter::new(estimate_prompt_tokens(&body), self.settings.log_bodies),
            clock: Clock::start(&self.shared.metrics.llm, self.settings.model_label(&model)),
            prompt: Some(prompt_text(&body)),
            served: None,
            finish_reason: None,
            metered: Some(Metered {
                settings: self.settings.clone(),
                key: self.key.clone(),
                model,
                db,
                metrics: self.shared.metrics.clone(),
            }),
            out: self.out_tx.clone(),
        };
        tokio::spawn(run.run(providers, body, cancel));
    }
}

/// An `error` message.
fn error(id: Option<&str>, status: StatusCode, message: &str) -> Value {
    json!({"type": "error", "id": id, "status": status.as_u16(), "message": message})
}

/// One request of a socket, from its providers to its `done`.
struct Run {
    id: String,
    model: String,
    meter: Meter,
    clock: Clock,
    /// The prompt's text, counted when the provider reports no usage.
    prompt: Option<String>,
    /// The provider that answered.
    served: Option<Provider>,
    /// The provider's last finish reason.
    finish_reason: Option<String>,
    /// Taken when billed: a run dropped unbilled (its socket's task gone) bills in `Drop`.
    metered: Option<Metered>,
    out: mpsc::Sender<Out>,
}

/// How a run's stream ended.
enum Finish {
    /// The provider ended it (with its finish reason).
    Provider,
    Cancelled,
    /// The key's budget was spent mid-way.
    Budget,
    /// It broke off after the provider had answered: what streamed is billed.
    Failed(&'static str),
    /// No provider served it: nothing is billed.
    Unserved(&'static str),
    /// The request cannot be put to the model's provider (a 400 of the client's making): nothing is billed.
    Invalid(String),
}

impl Run {
    async fn run(mut self, providers: Vec<Provider>, body: Map<String, Value>, cancel: CancellationToken) {
        let finish = tokio::select! {
            finish = self.stream(&providers, &body) => finish,
            () = cancel.cancelled() => Finish::Cancelled,
        };
        // The provider's connection is closed by now (its body was dropped with the stream above). A stream it
        // reported no usage for has its prompt counted: by its tokenizer where it has one, else locally.
        if !self.meter.reported()
            && let (Some(provider), Some(text)) = (&self.served, self.prompt.take())
            && let Some(n) = provider::count_prompt(provider, &self.model, text).await
        {
            self.meter.set_prompt(n);
        }
        let (usage, counted) = self.meter.usage();
        if let Some(text) = self.meter.text() {
            tracing::debug!(model = %self.model, completion = %text, "LLM completion");
        }
        let cost = self
            .metered
            .as_ref()
            .map_or(0.0, |m| m.settings.cost(&self.model, usage.prompt, usage.completion));
        // A stream that failed before its first token, and reported nothing, was not served: not billed.
        let unserved = matches!(finish, Finish::Failed(_)) && !self.meter.started() && !self.meter.reported();
        let outcome = match finish {
            Finish::Provider => "ok",
            Finish::Cancelled => "cancelled",
            Finish::Budget => "budget",
            Finish::Failed(_) | Finish::Unserved(_) | Finish::Invalid(_) => "error",
        };
        if let Some(metered) = self.metered.take() {
            if unserved || matches!(finish, Finish::Unserved(_) | Finish::Invalid(_)) {
                metered.metrics.llm.failed(metered.label());
            } else {
                metered.bill(usage, counted, outcome);
            }
        }
        let broke_off = match finish {
            Finish::Failed(why) => Some(why),
            _ => None,
        };
        let last = match finish {
            Finish::Unserved(why) => error(Some(&self.id), StatusCode::BAD_GATEWAY, why),
            Finish::Invalid(why) => error(Some(&self.id), StatusCode::BAD_REQUEST, &why),
            finish => {
                let reason = match finish {
                    Finish::Provider => self.finish_reason.take().unwrap_or_else(|| "stop".into()),
                    Finish::Cancelled => "cancelled".into(),
                    Finish::Budget => "length".into(),
                    Finish::Failed(_) | Finish::Unserved(_) | Finish::Invalid(_) => "error".into(),
                };
                let mut done = json!({
                    "type": "done", "id": self.id, "finish_reason": reason,
                    "usage": {"prompt_tokens": usage.prompt, "completion_tokens": usage.completion},
                    "cost": cost, "counted": counted,
                });
                if let Some(why) = broke_off {
                    done["message"] = json!(why);
                }
                done
            }
        };
        let _ = self.out.send(Out::Message(last)).await;
        let _ = self.out.send(Out::Finished(self.id.clone())).await;
    }

    /// Streams from the first provider that answers and sends a first token; `delta`s go out as chunks arrive. A
    /// stream that fails before its first token (broken off, stalled, an error event) has sent the client nothing:
    /// the next provider is tried. Once a token went out, a failure ends the request.
    async fn stream(&mut self, providers: &[Provider], request: &Map<String, Value>) -> Finish {
        let mut last_error = None;
        let mut failed = None;
        for provider in providers {
            let (path, body) = match provider::request_for(provider, "/chat/completions", request) {
                None => continue,
                Some(Ok(request)) => request,
                Some(Err(e)) => return Finish::Invalid(e.to_string()),
            };
            match provider::send(provider, Method::POST, path, Some(body), true).await {
                Ok(a) if a.status().is_success() => {
                    self.served = Some(provider.clone());
                    match self.relay(a, provider).await {
                        Finish::Failed(why) if !self.meter.started() => {
                            tracing::warn!(model = %self.model, provider = %provider.name, why, "LLM provider's stream failed before its first token; trying the next provider");
                            if let Some(m) = &self.metered {
                                m.metrics.llm.provider_error(&provider.name, "stream");
                            }
                            self.meter.restart();
                            self.finish_reason = None;
                            failed = Some(why);
                        }
                        finish => return finish,
                    }
                }
                Ok(a) => {
                    tracing::warn!(model = %self.model, status = %a.status(), "LLM provider refused a stream request");
                    return Finish::Unserved("the model's provider refused the request");
                }
                Err(e) => {
                    tracing::warn!(model = %self.model, error = %e, "LLM provider failed");
                    if let Some(m) = &self.metered {
                        m.metrics.llm.provider_error(&provider.name, e.kind());
                    }
                    let fails_over = e.fails_over();
                    provider::keep_failure(&mut last_error, e);
                    if !fails_over {
                        break;
                    }
                }
            }
        }
        if let Some(why) = failed {
            return Finish::Failed(why);
        }
        Finish::Unserved(match last_error {
            Some(provider::ProviderError::Status {
                status: StatusCode::TOO_MANY_REQUESTS,
                ..
            }) => "the model's providers are busy",
            Some(provider::ProviderError::Timeout { .. }) => "the model's provider did not answer in time",
            _ => "the model's provider is unavailable",
        })
    }

    /// Relays one provider's stream as `delta`s, to its end, its failure, or the key's budget.
    async fn relay(&mut self, answer: http::Response<hyper::body::Incoming>, provider: &Provider) -> Finish {
        let (first_token_timeout, token_timeout) = (provider.first_token_timeout, provider.token_timeout);
        let mut format = provider::StreamFormat::of(provider, &self.model);
        let mut body = answer.into_body();
        let mut reader = sse::Reader::default();
        // Until the first token, the provider has its first_token_timeout; then token_timeout between chunks.
        let first_token_by = Instant::now() + first_token_timeout;
        loop {
            let by = if self.meter.started() {
                Instant::now() + token_timeout
            } else {
                first_token_by
            };
            let frame = match tokio::time::timeout_at(by, body.frame()).await {
                Err(_) => return Finish::Failed("the provider sent no token in time"),
                Ok(None) => return Finish::Provider,
                Ok(Some(Err(_))) => return Finish::Failed("the provider's stream broke off"),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            let mut events = Vec::new();
            if reader.feed(&data, |e| events.push(e)).is_err() {
                return Finish::Failed("the provider sent an oversized event");
            }
            let events: Vec<(Option<String>, String)> =
                events.into_iter().flat_map(|e| format.openai_events(e)).collect();
            for (_, data) in events {
                let chunk = Chunk::read(&data);
                if chunk.json.is_none() && !chunk.done {
                    return Finish::Failed("the provider sent an event that is not JSON");
                }
                self.meter.note(&chunk);
                if chunk.done {
                    return Finish::Provider;
                }
                if chunk.finish_reason.is_some() {
                    self.finish_reason.clone_from(&chunk.finish_reason);
                }
                if let Some(why) = &chunk.error {
                    tracing::warn!(model = %self.model, error = %why, "LLM provider's stream carried an error");
                    return Finish::Failed("the provider's stream failed");
                }
                if !chunk.content.is_empty() {
                    self.clock.token();
                    let delta = json!({"type": "delta", "id": self.id, "content": chunk.content});
                    if self.out.send(Out::Message(delta)).await.is_err() {
                        // The socket is gone: stop here, and bill what streamed.
                        return Finish::Cancelled;
                    }
                    if let Some(m) = &self.metered
                        && self.meter.spends_budget(&m.key, &m.settings, &self.model)
                    {
                        return Finish::Budget;
                    }
                }
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(metered) = self.metered.take() {
            let (usage, counted) = self.meter.usage();
            metered.bill(usage, counted, "cancelled");
        }
    }
}

/// Answers an upgrade that is refused (a key, a limit, a provider) with the HTTP error and its JSON body, and closes.
pub(super) async fn refuse_upgrade(client: &mut Conn, e: &ApiError) -> (u16, String) {
    let status = e.status.as_u16();
    let body = e.body().to_string();
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        e.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(after) = e.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        head.push_str(&format!("Retry-After: {}\r\n", secs.max(1)));
    }
    head.push_str("\r\n");
    // Head and body in one write: a client that reads the head gets the body with it.
    head.push_str(&body);
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        client.write_all(head.as_bytes()).await?;
        client.shutdown().await
    })
    .await;
    (status, format!("refused: {}", e.message))
}

/// wsgate's own 101 for an upgrade it serves itself.
pub(super) async fn switch(client: &mut Conn, accept: &[u8; 28]) -> io::Result<()> {
    let accept = String::from_utf8_lossy(accept);
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    match tokio::time::timeout(WRITE_TIMEOUT, client.write_all(head.as_bytes())).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the 101 was not taken in time")),
    }
}

/// The client's connection with the bytes it sent after its head read first.
pub(super) struct Prefixed {
    early: Vec<u8>,
    read: usize,
    inner: Conn,
}

impl Prefixed {
    pub(super) fn new(early: Vec<u8>, inner: Conn) -> Prefixed {
        Prefixed { early, read: 0, inner }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.read < this.early.len() {
            let n = (this.early.len() - this.read).min(buf.remaining());
            buf.put_slice(&this.early[this.read..this.read + n]);
            this.read += n;
            if this.read == this.early.len() {
                this.early = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
