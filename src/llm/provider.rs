//! Requests to a provider: one HTTP/1.1 connection per request (plain or TLS), with the provider's key added and
//! its connect and first-token timeouts. The answer's body is read by the caller, as it arrives.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::timeout;

use crate::config::llm::{Provider, ProviderKind};
use crate::conn::Conn;

/// Why a provider gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider `{provider}`: connect: {error}")]
    Connect { provider: String, error: std::io::Error },
    #[error("provider `{provider}`: TLS: {error}")]
    Tls { provider: String, error: String },
    #[error("provider `{provider}`: no answer within {after:?}")]
    Timeout { provider: String, after: Duration },
    #[error("provider `{provider}`: {error}")]
    Http { provider: String, error: hyper::Error },
    #[error("provider `{provider}` answered {status}")]
    Status {
        provider: String,
        status: StatusCode,
        /// Seconds, from the provider's `Retry-After`.
        retry_after: Option<u32>,
    },
    #[error("provider `{provider}`: base_url has no host")]
    NoHost { provider: String },
}

impl ProviderError {
    /// The `error` label of `wsgate_llm_provider_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } | Self::NoHost { .. } => "connect",
            Self::Tls { .. } => "tls",
            Self::Timeout { .. } => "timeout",
            Self::Http { .. } => "http",
            Self::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => "status_429",
            Self::Status { status, .. } if status.is_client_error() => "status_4xx",
            Self::Status { .. } => "status_5xx",
        }
    }

    /// Whether the next provider may serve the request instead: nothing reached the client yet, and this one could
    /// not connect, was busy (429) or failed (5xx).
    pub fn fails_over(&self) -> bool {
        match self {
            Self::Status { status, .. } => fails_over(*status),
            Self::NoHost { .. } => false,
            _ => true,
        }
    }
}

/// Whether a provider's answer with `status` is the provider's failure, which the next provider may not have: busy
/// (429), failing (5xx), or refusing wsgate itself (401, 403: its key; 404: the model is not there). Its body is
/// logged, never passed on: it may name the provider's key or its insides.
fn fails_over(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() || matches!(status.as_u16(), 401 | 403 | 404)
}

/// A connection to `provider` (TCP, and TLS for an https one) within its connect timeout, and the authority to
/// name in requests (`host` or `host:port`).
pub async fn connect(provider: &Provider) -> Result<(Conn, String), ProviderError> {
    connect_to(provider, &provider.base_url).await
}

/// A connection to `url`'s host for `provider` (its TLS and connect timeout).
async fn connect_to(provider: &Provider, url: &http::Uri) -> Result<(Conn, String), ProviderError> {
    let name = || provider.name.clone();
    let (host, port) =
        crate::config::llm::authority_of(url).ok_or_else(|| ProviderError::NoHost { provider: name() })?;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|error| ProviderError::Connect {
                provider: name(),
                error,
            })?;
        let _ = tcp.set_nodelay(true);
        match &provider.tls {
            None => Ok(Conn::Tcp(tcp)),
            Some(tls) => {
                let tls_error = |e: &dyn std::fmt::Display| ProviderError::Tls {
                    provider: name(),
                    error: e.to_string(),
                };
                let server_name = tls.server_name(host).map_err(|e| tls_error(&e))?;
                let stream = tls.connect(tcp, server_name).await.map_err(|e| tls_error(&e))?;
                Ok(Conn::ClientTls(Box::new(stream)))
            }
        }
    };
    let conn = timeout(provider.connect_timeout, connect)
        .await
        .map_err(|_| ProviderError::Timeout {
            provider: name(),
            after: provider.connect_timeout,
        })??;
    let authority = match port {
        80 | 443 => host.to_string(),
        port => format!("{host}:{port}"),
    };
    Ok((conn, authority))
}

/// Sends `body` as a POST (or a GET without one) to `endpoint` (such as `/chat/completions`) of `provider`, and
/// returns its answer once its head is in, whatever its status.
pub async fn send(
    provider: &Provider,
    method: Method,
    endpoint: &str,
    body: Option<Bytes>,
    stream: bool,
) -> Result<Response<Incoming>, ProviderError> {
    let name = || provider.name.clone();
    let (conn, authority) = connect(provider).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(conn))
        .await
        .map_err(|error| ProviderError::Http {
            provider: name(),
            error,
        })?;
    // The connection lives as long as its answer's body is read: dropping the body (a client gone, a cancel)
    // closes it, which is how the provider learns to stop generating.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(provider.path(endpoint))
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, concat!("wsgate/", env!("CARGO_PKG_VERSION")));
    if body.is_some() {
        request = request.header(http::header::CONTENT_TYPE, "application/json");
    }
    if stream {
        request = request.header(http::header::ACCEPT, "text/event-stream");
    }
    if let Some(key) = &provider.api_key {
        request = match provider.kind {
            ProviderKind::OpenAi => request.header(http::header::AUTHORIZATION, format!("Bearer {}", key.expose())),
            ProviderKind::Anthropic => request
                .header("x-api-key", key.expose())
                .header("anthropic-version", "2023-06-01"),
        };
    }
    let request = request
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|_| ProviderError::NoHost { provider: name() })?;
    let answer = timeout(provider.first_token_timeout, sender.send_request(request))
        .await
        .map_err(|_| ProviderError::Timeout {
            provider: name(),
            after: provider.first_token_timeout,
        })?
        .map_err(|error| ProviderError::Http {
            provider: name(),
            error,
        })?;
    let status = answer.status();
    if fails_over(status) {
        let retry_after = answer
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        return Err(ProviderError::Status {
            provider: name(),
            status,
            retry_after,
        });
    }
    Ok(answer)
}

/// The path and body of a chat request (or, from an OpenAI-compatible provider, a legacy completion) to
/// `provider`: as the client sent it to an OpenAI-compatible one, translated to the Messages API for an Anthropic
/// one. `None` when the provider has no such endpoint (an Anthropic provider serves chat only).
pub fn request_for(
    provider: &Provider,
    openai_path: &'static str,
    request: &serde_json::Map<String, serde_json::Value>,
) -> Option<Result<(&'static str, Bytes), super::anthropic::TranslateError>> {
    match provider.kind {
        ProviderKind::OpenAi => {
            let body = serde_json::Value::Object(request.clone()).to_string();
            Some(Ok((openai_path, Bytes::from(body))))
        }
        ProviderKind::Anthropic if openai_path == "/chat/completions" => {
            Some(super::anthropic::request(request).map(|body| ("/messages", Bytes::from(body.to_string()))))
        }
        ProviderKind::Anthropic => None,
    }
}

/// How a provider's stream reads: OpenAI's chunks as they are, or Anthropic's events translated into them.
pub enum StreamFormat {
    OpenAi,
    Anthropic(Box<super::anthropic::StreamTranslator>),
}

impl StreamFormat {
    pub fn of(provider: &Provider, model: &str) -> StreamFormat {
        match provider.kind {
            ProviderKind::OpenAi => StreamFormat::OpenAi,
            ProviderKind::Anthropic => {
                StreamFormat::Anthropic(Box::new(super::anthropic::StreamTranslator::new(model)))
            }
        }
    }

    /// The OpenAI stream events (`event:` name, `data:`) one event of the provider's stream gives.
    pub fn openai_events(&mut self, event: super::sse::Event) -> Vec<(Option<String>, String)> {
        match self {
            StreamFormat::OpenAi => vec![((!event.name.is_empty()).then_some(event.name), event.data)],
            StreamFormat::Anthropic(translator) => translator.event(&event).into_iter().map(|d| (None, d)).collect(),
        }
    }
}

/// The number of tokens in `text` by the provider's tokenize endpoint (`tokenize_url`): `{"count": N}` or
/// `{"tokens": [...]}` answered; `None` when it has none or it fails (the caller estimates then).
pub async fn count_tokens(provider: &Provider, model: &str, text: &str) -> Option<u64> {
    let url = provider.tokenize_url.as_ref()?;
    let counted = async {
        let (conn, authority) = connect_to(provider, url).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(conn))
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let body = serde_json::json!({"model": model, "input": text, "content": text}).to_string();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(key) = &provider.api_key {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {}", key.expose()));
        }
        let answer = sender
            .send_request(request.body(Full::new(Bytes::from(body))).ok()?)
            .await
            .ok()?;
        if !answer.status().is_success() {
            return None;
        }
        let bytes = http_body_util::Limited::new(answer.into_body(), 1 << 20)
            .collect()
            .await
            .ok()?
            .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        value
            .get("count")
            .and_then(serde_json::Value::as_u64)
            .or_else(|| value.get("tokens")?.as_array().map(|t| t.len() as u64))
    };
    let counted = timeout(provider.connect_timeout + provider.first_token_timeout, counted)
        .await
        .ok()?;
    if counted.is_none() {
        tracing::debug!(provider = %provider.name, "the provider's tokenize endpoint gave no count: the prompt is estimated");
    }
    counted
}

/// The tokens of a prompt (or a completion) the provider reported none for: by its tokenize endpoint where it has
/// one, else by the local tokenizer ([`super::meter::local_tokens`]), on a blocking thread.
pub async fn count_prompt(provider: &Provider, model: &str, text: String) -> Option<u64> {
    if let Some(n) = count_tokens(provider, model, &text).await {
        return Some(n);
    }
    let model = model.to_string();
    tokio::task::spawn_blocking(move || super::meter::local_tokens(&model, &text))
        .await
        .ok()
}

/// Keeps the failure to answer the client with when no provider serves a request: a provider's 429 (busy, with its
/// `Retry-After`) over any other, else the last.
pub fn keep_failure(kept: &mut Option<ProviderError>, e: ProviderError) {
    let busy = |e: &ProviderError| matches!(e, ProviderError::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS);
    if !kept.as_ref().is_some_and(busy) {
        *kept = Some(e);
    }
}
