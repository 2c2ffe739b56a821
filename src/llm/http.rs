//! The OpenAI-compatible HTTP API of an `llm` route: `GET …/models`, `POST …/chat/completions` and
//! `POST …/completions`, with `stream: true` answered as server-sent events exactly as the provider sends them
//! (less the usage chunk when the client did not ask for one) and `stream: false` as JSON. Every refusal is an
//! OpenAI-style error body; nothing in one names a provider, its address or its key.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use serde_json::{Value, json};
use tokio::time::{Instant, Sleep};

use super::keys::{KeyRefusal, KeyState, Limit, OverLimit};
use super::meter::{Chunk, Meter, Usage, estimate_prompt_tokens, prompt_text};
use super::metrics::Clock;
use super::provider::{self, ProviderError};
use super::sse;
use super::store::{UsageDelta, day_of};
use super::{Gateway, Metered};
use crate::config::llm::{LlmSettings, Provider, ProviderKind};
use crate::metrics::Metrics;

/// Events a stream may send before its first token that are held back with the answer's head; past them it is
/// passed on (and no longer handed to another provider).
const MAX_HELD_EVENTS: usize = 64;
/// The longest non-streamed answer read from a provider.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// An answer of the gateway's: whole, or a provider's stream passed on event by event.
pub enum Body {
    Full(Option<Bytes>),
    Stream(Box<Stream>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(stream) => stream.poll_next(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// An API error: its status and OpenAI-style body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
    }

    /// Counts a refusal of the gateway's own (a provider's failure is counted where it happens).
    pub fn count(&self, metrics: &super::metrics::LlmMetrics) {
        if !self.code.starts_with("provider_") {
            metrics.refused(self.code);
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }

    pub fn response(&self) -> Response<Body> {
        let mut resp = json_response(self.status, &self.body());
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: a client that waits that long finds the limit clear.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
        }
        resp
    }

    pub fn from_key(refusal: &KeyRefusal) -> ApiError {
        match refusal {
            KeyRefusal::Missing => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing_api_key",
                "no API key: send one as `Authorization: Bearer KEY`",
            ),
            KeyRefusal::Unknown => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                "invalid API key",
            ),
            KeyRefusal::Revoked(_) => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "revoked_api_key",
                "this API key has been revoked",
            ),
            KeyRefusal::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "keys_unavailable",
                "API keys cannot be checked right now",
            ),
        }
    }

    pub fn from_limit(over: &OverLimit) -> ApiError {
        let (status, kind, code) = match over.limit {
            Limit::Model => (StatusCode::FORBIDDEN, "invalid_request_error", "model_not_allowed"),
            Limit::Revoked => (StatusCode::UNAUTHORIZED, "invalid_request_error", "revoked_api_key"),
            Limit::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "api_error", "keys_unavailable"),
            Limit::Budget(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "insufficient_quota",
            ),
            _ => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limit_exceeded"),
        };
        ApiError {
            retry_after: over.retry_after,
            ..ApiError::new(status, kind, code, over.message())
        }
    }
}

/// Client-sent text repeated in an error: at most 200 characters.
fn cut(text: &str) -> String {
    text.chars().take(200).collect()
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::Full(Some(Bytes::from(value.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The endpoints, by the end of the request's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Models,
    ChatCompletions,
    Completions,
}

impl Endpoint {
    pub fn of(path: &str) -> Option<Endpoint> {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Endpoint::ChatCompletions)
        } else if path.ends_with("/completions") {
            Some(Endpoint::Completions)
        } else if path.ends_with("/models") {
            Some(Endpoint::Models)
        } else {
            None
        }
    }

    fn provider_path(self) -> &'static str {
        match self {
            Endpoint::Models => "/models",
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }
}

/// The key a request presents: `Authorization: Bearer KEY`.
pub fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// Serves one request of an `llm` route.
pub async fn serve(
    gateway: &Gateway,
    settings: &Arc<LlmSettings>,
    metrics: &Arc<Metrics>,
    req: Request<Incoming>,
) -> Response<Body> {
    match handle(gateway, settings, metrics, req).await {
        Ok(resp) => resp,
        Err(e) => {
            e.count(&metrics.llm);
            e.response()
        }
    }
}

async fn handle(
    gateway: &Gateway,
    settings: &Arc<LlmSettings>,
    metrics: &Arc<Metrics>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let Some(endpoint) = Endpoint::of(req.uri().path()) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            format!("no endpoint at `{}`", cut(req.uri().path())),
        ));
    };
    let wanted = if endpoint == Endpoint::Models {
        Method::GET
    } else {
        Method::POST
    };
    if req.method() != wanted {
        let mut e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            format!("use {wanted} on this endpoint"),
        );
        e.retry_after = None;
        return Err(e);
    }
    let db = gateway
        .db()
        .ok_or_else(|| ApiError::from_key(&KeyRefusal::Unavailable(super::db::DbError::Closed)))?;
    let secret = bearer(&req).ok_or_else(|| ApiError::from_key(&KeyRefusal::Missing))?;
    let key = gateway
        .keys
        .authenticate(&db, secret)
        .await
        .map_err(|e| ApiError::from_key(&e))?;
    if endpoint == Endpoint::Models {
        return Ok(models(settings, &key));
    }
    let body = read_body(req, settings.max_request_body).await?;
    let mut request: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("invalid_json", format!("the body is not JSON: {e}")))?;
    let Some(object) = request.as_object_mut() else {
        return Err(ApiError::invalid("invalid_json", "the body is not a JSON object"));
    };
    let model = match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => return Err(ApiError::invalid("missing_model", "`model` (a string) is required")),
    };
    let stream = object.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let usage_asked = object
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if stream {
        // The provider is asked for usage whatever the client asked; its usage chunk is passed on only if asked for.
        object.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let prompt_estimate = estimate_prompt_tokens(object);
    let providers = gateway.order(settings.providers_for(&model).collect());
    if providers.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model `{}` does not exist", cut(&model)),
        ));
    }
    key.admit(&db, &model)
        .await
        .map_err(|over| ApiError::from_limit(&over))?;
    let object = &*object;
    if settings.log_bodies {
        let body = Value::Object(object.clone());
        tracing::debug!(key = key.id(), model = %model, body = %body, "LLM request body");
    }
    let mut metered = Metered {
        settings: settings.clone(),
        key: key.clone(),
        model: model.clone(),
        db: db.clone(),
        metrics: metrics.clone(),
    };
    let mut last = None;
    let mut tried = 0;
    let count = providers.len();
    for (i, provider) in providers.into_iter().enumerate() {
        let (path, body) = match provider::request_for(provider, endpoint.provider_path(), object) {
            // This provider has no such endpoint (an Anthropic one serves chat only).
            None => continue,
            Some(Ok(request)) => request,
            Some(Err(e)) => return Err(ApiError::invalid("unsupported_request", e.to_string())),
        };
        tried += 1;
        match provider::send(provider, Method::POST, path, Some(body), stream).await {
            Ok(answer) if stream && answer.status().is_success() => {
                // A stream the provider reports no usage for has its prompt counted by a tokenizer.
                let tokenize = Box::new((provider.clone(), prompt_text(object)));
                let mut s = Stream::new(
                    answer.into_body(),
                    provider,
                    metered,
                    usage_asked,
                    prompt_estimate,
                    tokenize,
                );
                // The answer's head waits for the first token: a stream that fails before it has sent the client
                // nothing, and the next provider is tried (the last one's failure is passed on as its stream has it).
                if s.failed_before_first_token().await && i + 1 < count {
                    tracing::warn!(model = %model, provider = %provider.name, "LLM provider's stream failed before its first token; trying the next provider");
                    match s.abandon() {
                        Some(m) => metered = m,
                        None => return Ok(s.respond()),
                    }
                    continue;
                }
                return Ok(s.respond());
            }
            Ok(answer) => return Ok(whole(answer, provider, metered, object).await),
            Err(e) => {
                tracing::warn!(model = %model, error = %e, "LLM provider failed");
                metrics.llm.provider_error(&provider.name, e.kind());
                let fails_over = e.fails_over();
                provider::keep_failure(&mut last, e);
                if !fails_over {
                    break;
                }
            }
        }
    }
    if tried == 0 {
        return Err(ApiError::invalid(
            "unsupported_endpoint",
            format!("the model `{}` serves chat completions only", cut(&model)),
        ));
    }
    // Nothing was served: the request is not billed, but it counted against the request rate.
    metrics.llm.failed(settings.model_label(&model));
    Err(provider_failed(last))
}

/// The answer when no provider could serve a request: 502, or the last provider's 429 (with its `Retry-After`).
pub(super) fn provider_failed(last: Option<ProviderError>) -> ApiError {
    match last {
        Some(ProviderError::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after,
            ..
        }) => ApiError {
            retry_after: retry_after.map(|s| Duration::from_secs(u64::from(s))),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "provider_busy",
                "the model's providers are busy",
            )
        },
        Some(ProviderError::Timeout { .. }) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "api_error",
            "provider_timeout",
            "the model's provider did not answer in time",
        ),
        _ => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "provider_unavailable",
            "the model's provider is unavailable",
        ),
    }
}

/// `GET …/models`: the models of the providers (those named exactly; patterns name no model) that the key may use.
fn models(settings: &LlmSettings, key: &KeyState) -> Response<Body> {
    let mut seen = Vec::new();
    for provider in &settings.providers {
        for m in provider.models.iter().filter_map(|m| m.exact()) {
            if key.allows_model(m) && !seen.contains(&m) {
                seen.push(m);
            }
        }
    }
    let data: Vec<Value> = seen
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "wsgate"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn read_body(req: Request<Incoming>, max: u64) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {max} bytes"),
        )
    };
    if req.body().size_hint().lower() > max {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(req.into_body(), usize::try_from(max).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::invalid(
            "body_not_received",
            format!("the request body broke off: {e}"),
        )),
    }
}

/// A non-streamed answer: read whole, its usage billed, passed on as it is.
async fn whole(
    answer: Response<Incoming>,
    provider: &Provider,
    metered: Metered,
    request: &serde_json::Map<String, Value>,
) -> Response<Body> {
    let (parts, body) = answer.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_ANSWER_BYTES);
    let bytes = match tokio::time::timeout(provider.first_token_timeout, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => {
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "provider_error",
                "the provider's answer broke off",
            )
            .response();
        }
    };
    if metered.settings.log_bodies {
        let text = String::from_utf8_lossy(&bytes);
        tracing::debug!(key = metered.key.id(), model = %metered.model, answer = %text, "LLM answer body");
    }
    let parsed = serde_json::from_slice::<Value>(&bytes).ok();
    if !parts.status.is_success() {
        // The provider refused the request (400, 413, 422): its own words are logged; the client gets the message
        // only, in OpenAI's shape, and nothing that is not one (an HTML page, a stack).
        let message = parsed.as_ref().and_then(|v| {
            let e = v.get("error")?;
            e.get("message")
                .or(Some(e))
                .and_then(Value::as_str)
                .map(|m| m.chars().take(500).collect::<String>())
        });
        tracing::warn!(provider = %provider.name, status = %parts.status, body = %String::from_utf8_lossy(&bytes).chars().take(1000).collect::<String>(), "LLM provider refused a request");
        let message = message.map_or_else(
            || "the model's provider refused the request".to_string(),
            |m| format!("the model's provider refused the request: {m}"),
        );
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "provider_rejected",
            message,
        );
        e.status = parts.status;
        return e.response();
    }
    // An Anthropic provider's answer in the OpenAI shape the client asked for.
    let answer = match (provider.kind, parsed) {
        (ProviderKind::Anthropic, Some(v)) => super::anthropic::response(&v, &metered.model).ok(),
        (_, parsed) => parsed.filter(|v| v.get("choices").is_some_and(Value::is_array)),
    };
    let Some(answer) = answer else {
        tracing::warn!(provider = %provider.name, "LLM provider's answer is not a completion");
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "provider_error",
            "the provider's answer is not a completion",
        )
        .response();
    };
    match answer.get("usage").and_then(Usage::of) {
        Some(usage) => metered.bill(usage, false, "ok"),
        // Served without a usage report: the prompt and the completion counted by a tokenizer.
        None => {
            let text: String = answer["choices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["message"]["content"].as_str().or(c["text"].as_str()))
                .collect();
            let estimate = Usage {
                prompt: estimate_prompt_tokens(request),
                completion: text.chars().count().div_ceil(4) as u64,
            };
            bill_counted(
                metered,
                estimate,
                provider.clone(),
                prompt_text(request),
                Some(text),
                "ok",
            );
        }
    }
    json_response(StatusCode::OK, &answer)
}

/// A provider's event stream on its way to the client: each event read, its usage and tokens noted, the usage
/// chunk left out when the client did not ask for it. Billed when it ends, or when it is dropped (the client went
/// away: the provider's connection closes with it, and what was streamed until then is billed).
pub struct Stream {
    upstream: Incoming,
    clock: Clock,
    /// How it ended, for the metrics: `cancelled` until it ends otherwise (a stream dropped before its end lost
    /// its client).
    outcome: &'static str,
    /// The provider's name, for its errors' metric.
    provider: String,
    reader: sse::Reader,
    out: VecDeque<Bytes>,
    meter: Meter,
    /// OpenAI's chunks as they come, or an Anthropic stream translated into them.
    format: provider::StreamFormat,
    /// The provider and the prompt's text, for a stream it reports no usage for (its prompt is counted then).
    tokenize: Option<Box<(Provider, String)>>,
    strip_usage: bool,
    ended: bool,
    token_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    metered: Option<Metered>,
}

impl Stream {
    fn new(
        upstream: Incoming,
        provider: &Provider,
        metered: Metered,
        usage_asked: bool,
        prompt_estimate: u64,
        tokenize: Box<(Provider, String)>,
    ) -> Stream {
        Stream {
            upstream,
            clock: Clock::start(&metered.metrics.llm, metered.label()),
            outcome: "cancelled",
            provider: provider.name.clone(),
            reader: sse::Reader::default(),
            out: VecDeque::new(),
            meter: Meter::new(prompt_estimate, metered.settings.log_bodies),
            format: provider::StreamFormat::of(provider, &metered.model),
            tokenize: Some(tokenize),
            strip_usage: !usage_asked,
            ended: false,
            token_timeout: provider.token_timeout,
            // Until the first token, the provider has its first_token_timeout; then token_timeout between chunks.
            timer: Box::pin(tokio::time::sleep(provider.first_token_timeout)),
            metered: Some(metered),
        }
    }

    /// Reads the provider's stream up to its first token (or its end), keeping what it read for the client; true
    /// when it failed before a token (broke off, stalled, sent an error or garbage).
    async fn failed_before_first_token(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            // Events without a token (a role, empty deltas) are held back a while, not without bound.
            while !(self.ended || self.meter.started() || self.out.len() >= MAX_HELD_EVENTS) {
                std::task::ready!(self.poll_upstream(cx));
            }
            Poll::Ready(())
        })
        .await;
        self.outcome == "error" && !self.meter.started()
    }

    /// Gives up on a stream nothing of which reached the client: what billing needs, for the next provider.
    fn abandon(&mut self) -> Option<Metered> {
        self.metered.take()
    }

    /// The answer to the client: 200 and the event stream, from what was read so far on.
    fn respond(self) -> Response<Body> {
        let mut resp = Response::new(Body::Stream(Box::new(self)));
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if let Some(bytes) = self.out.pop_front() {
                return Poll::Ready(Some(bytes));
            }
            if self.ended {
                self.finish();
                return Poll::Ready(None);
            }
            std::task::ready!(self.poll_upstream(cx));
        }
    }

    /// One step of the provider's stream: a piece of it read, its end, its failure or its timer.
    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match Pin::new(&mut self.upstream).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    self.read(&data);
                    if self.meter.started() {
                        self.timer.as_mut().reset(Instant::now() + self.token_timeout);
                    }
                }
            }
            Poll::Ready(None) => {
                self.ended = true;
                if self.outcome == "cancelled" {
                    self.outcome = "ok";
                }
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %e, "LLM provider's stream broke off");
                self.fail("the provider's stream broke off");
            }
            Poll::Pending => {
                if self.timer.as_mut().poll(cx).is_ready() {
                    tracing::warn!(first_token = !self.meter.started(), "LLM provider's stream stalled");
                    self.fail("the provider sent no token in time");
                } else {
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(())
    }

    fn read(&mut self, data: &[u8]) {
        let mut events = Vec::new();
        if self.reader.feed(data, |e| events.push(e)).is_err() {
            self.fail("the provider sent an oversized event");
            return;
        }
        let events: Vec<(Option<String>, String)> = events
            .into_iter()
            .flat_map(|event| self.format.openai_events(event))
            .collect();
        for (name, data) in events {
            let chunk = Chunk::read(&data);
            if chunk.json.is_none() && !chunk.done {
                self.fail("the provider sent an event that is not JSON");
                return;
            }
            if let Some(why) = &chunk.error {
                // The provider's own words are logged, not passed on.
                tracing::warn!(provider = %self.provider, error = %why, "LLM provider's stream carried an error");
                self.fail("the provider's stream failed");
                return;
            }
            self.meter.note(&chunk);
            if chunk.progress {
                self.clock.token();
            }
            if !(chunk.usage_only && self.strip_usage) {
                self.out.push_back(Bytes::from(sse::encode(name.as_deref(), &data)));
            }
            if chunk.progress
                && let Some(metered) = &self.metered
                && self
                    .meter
                    .spends_budget(&metered.key, &metered.settings, &metered.model)
            {
                self.end_for_budget(chunk.json.as_ref());
                return;
            }
        }
    }

    /// The key's budget is spent: the stream ends cleanly here, as a completion cut at its length limit would (a
    /// last chunk with `finish_reason: "length"`, then `[DONE]`); the provider's connection closes with it.
    fn end_for_budget(&mut self, last: Option<&Value>) {
        let mut end = last
            .cloned()
            .unwrap_or_else(|| json!({"object": "chat.completion.chunk"}));
        end["choices"] = json!([{"index": 0, "delta": {}, "finish_reason": "length"}]);
        if let Some(o) = end.as_object_mut() {
            o.remove("usage");
        }
        self.out.push_back(Bytes::from(sse::encode(None, &end.to_string())));
        self.out.push_back(Bytes::from(sse::encode(None, "[DONE]")));
        self.ended = true;
        self.outcome = "budget";
    }

    /// Ends the stream with an error event (OpenAI's shape) after what was passed on.
    fn fail(&mut self, message: &str) {
        let error =
            json!({"error": {"message": message, "type": "api_error", "param": null, "code": "provider_error"}});
        self.out.push_back(Bytes::from(sse::encode(None, &error.to_string())));
        self.ended = true;
        self.outcome = "error";
        if let Some(m) = &self.metered {
            m.metrics.llm.provider_error(&self.provider, "stream");
        }
    }

    fn finish(&mut self) {
        let Some(metered) = self.metered.take() else {
            return;
        };
        if let Some(text) = self.meter.text() {
            tracing::debug!(key = metered.key.id(), model = %metered.model, completion = %text, "LLM completion");
        }
        let (usage, counted) = self.meter.usage();
        if !counted {
            metered.bill(usage, false, self.outcome);
        } else if self.outcome == "error" && !self.meter.started() {
            // It failed before its first token, and reported nothing: not served, so not billed.
            metered.metrics.llm.failed(metered.label());
        } else if let Some(tokenize) = self.tokenize.take() {
            let (provider, prompt) = *tokenize;
            bill_counted(metered, usage, provider, prompt, None, self.outcome);
        } else {
            metered.bill(usage, true, self.outcome);
        }
    }
}

/// Bills a request the provider reported no usage for once its prompt (and a whole answer's `completion` text) is
/// counted: by the provider's tokenize endpoint on a task of its own, or by the local tokenizer on a blocking thread
/// (which a runtime shutting down waits for, so the bill is not lost). `estimate` is billed when neither can run.
fn bill_counted(
    metered: Metered,
    estimate: Usage,
    provider: Provider,
    prompt: String,
    completion: Option<String>,
    outcome: &'static str,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        metered.bill(estimate, true, outcome);
        return;
    };
    let mut usage = estimate;
    if provider.tokenize_url.is_some() {
        runtime.spawn(async move {
            if let Some(n) = provider::count_prompt(&provider, &metered.model, prompt).await {
                usage.prompt = n;
            }
            if let Some(text) = completion
                && let Some(n) = provider::count_prompt(&provider, &metered.model, text).await
            {
                usage.completion = n;
            }
            metered.bill(usage, true, outcome);
        });
    } else {
        runtime.spawn_blocking(move || {
            usage.prompt = super::meter::local_tokens(&metered.model, &prompt);
            if let Some(text) = completion {
                usage.completion = super::meter::local_tokens(&metered.model, &text);
            }
            metered.bill(usage, true, outcome);
        });
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Metered {
    /// Bills a request's tokens to its key: the key's windows at once, the usage row through the database thread.
    pub fn bill(self, usage: Usage, counted: bool, outcome: &'static str) {
        let row = self.charge(usage, counted, outcome);
        if !self.db.record(row) {
            tracing::error!(key = self.key.id(), model = %self.model, "usage row lost: the key database's queue is full");
        }
    }

    /// [`Metered::bill`], the usage row written before it returns where the key's limits are counted in a shared
    /// database (so that the check that follows sees it); queued as usual where they are counted here, or when the
    /// shared database does not take it now.
    pub async fn bill_now(self, usage: Usage, counted: bool, outcome: &'static str) {
        let row = self.charge(usage, counted, outcome);
        let queued = match &self.db {
            super::Db::Redis(redis) => match redis.record_now(row).await {
                Ok(()) => return,
                Err(row) => self.db.record(*row),
            },
            db => db.record(row),
        };
        if !queued {
            tracing::error!(key = self.key.id(), model = %self.model, "usage row lost: the key database's queue is full");
        }
    }

    /// Counts a request's usage in the metrics and the key's windows here: its usage row.
    fn charge(&self, usage: Usage, counted: bool, outcome: &'static str) -> UsageDelta {
        let cost = self.settings.cost(&self.model, usage.prompt, usage.completion);
        self.metrics.llm.billed(self.label(), outcome, usage, cost);
        let today = day_of(SystemTime::now());
        self.key.charge(usage.total(), cost, Instant::now(), &today);
        UsageDelta {
            key_id: self.key.id(),
            model: self.model.clone(),
            day: today,
            counted,
            requests: 1,
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            cost,
        }
    }
}
