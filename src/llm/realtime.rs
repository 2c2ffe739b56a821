//! Realtime passthrough (`…/realtime?model=…`): an OpenAI-style Realtime WebSocket session relayed message by
//! message between the client and the model's provider, with the provider's key put on the upstream handshake (the
//! client's virtual key never goes upstream). The provider's `response.done` events are metered as they pass (one
//! usage row each), the key's token limits and budget are checked after each, and a session that has reached one
//! is closed with 1008 and a reason. wsgate pings the client while the model is silent, and closes both sides with
//! 1001 on shutdown.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use super::http::ApiError;
use super::keys::KeyState;
use super::meter::Usage;
use super::provider::{self, ProviderError};
use super::ws::{PING_EVERY, Prefixed, WRITE_TIMEOUT, refuse_upgrade, switch};
use super::{Db, Metered};
use crate::config::llm::{LlmSettings, Provider, ProviderKind};
use crate::conn::Conn;
use crate::state::Shared;

/// The largest message a provider may send (audio deltas are base64 in JSON).
const MAX_PROVIDER_MESSAGE: usize = 16 * 1024 * 1024;

/// Why a Realtime session ended (for the access log).
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("closed by client")]
    ClientClosed,
    #[error("closed by provider")]
    ProviderClosed,
    #[error("client gone: {0}")]
    Client(tungstenite::Error),
    #[error("provider gone: {0}")]
    Provider(tungstenite::Error),
    #[error("closed by wsgate: {0}")]
    Limit(String),
    #[error("closed by wsgate: server shutting down")]
    ShuttingDown,
    #[error("closed by wsgate: a side did not read within {WRITE_TIMEOUT:?}")]
    WriteTimeout,
}

/// Serves a Realtime upgrade: the key and the model checked, the provider's WebSocket opened (failing over to the
/// next provider on a connect error, 429 or 5xx), then the client switched and the session relayed. Returns the
/// HTTP status answered and how it ended.
pub async fn serve(
    shared: &Arc<Shared>,
    settings: &Arc<LlmSettings>,
    mut client: Conn,
    secret: Option<&str>,
    realtime: super::ws::Realtime,
    accept: [u8; 28],
    early: Vec<u8>,
) -> (u16, String) {
    let opened = open(shared, settings, secret, realtime.model.as_deref(), realtime.beta).await;
    let (key, db, model, upstream) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            e.count(&shared.metrics.llm);
            return refuse_upgrade(&mut client, &e).await;
        }
    };
    if let Err(e) = switch(&mut client, &accept).await {
        return (101, format!("error: client: {e}"));
    }
    let limit = usize::try_from(settings.max_request_body).unwrap_or(usize::MAX);
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let io = Prefixed::new(early, client);
    let client = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let session = Session {
        shared: shared.clone(),
        settings: settings.clone(),
        key,
        secret: secret.unwrap_or_default().to_string(),
        db,
        model,
    };
    (101, session.relay(client, upstream).await.to_string())
}

type Upstream = WebSocketStream<Conn>;

async fn open(
    shared: &Shared,
    settings: &LlmSettings,
    secret: Option<&str>,
    model: Option<&str>,
    beta: Option<HeaderValue>,
) -> Result<(Arc<KeyState>, Db, String, Upstream), ApiError> {
    let db = shared
        .llm
        .db()
        .ok_or_else(|| ApiError::from_key(&super::keys::KeyRefusal::Unavailable(super::DbError::Closed)))?;
    let secret = secret.ok_or_else(|| ApiError::from_key(&super::keys::KeyRefusal::Missing))?;
    let key = shared
        .llm
        .keys
        .authenticate(&db, secret)
        .await
        .map_err(|e| ApiError::from_key(&e))?;
    let Some(model) = model.filter(|m| !m.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_model",
            "`?model=` is required",
        ));
    };
    let providers = shared.llm.order(
        settings
            .providers_for(model)
            .filter(|p| p.kind == ProviderKind::OpenAi)
            .collect(),
    );
    if providers.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "no Realtime provider serves `{}`",
                model.chars().take(200).collect::<String>()
            ),
        ));
    }
    key.admit(&db, model)
        .await
        .map_err(|over| ApiError::from_limit(&over))?;
    let mut last = None;
    for provider in providers {
        match connect(provider, model, beta.as_ref()).await {
            Ok(upstream) => return Ok((key, db, model.to_string(), upstream)),
            Err(e) => {
                tracing::warn!(model, error = %e, "LLM Realtime provider failed");
                shared.metrics.llm.provider_error(&provider.name, e.kind());
                let fails_over = e.fails_over();
                provider::keep_failure(&mut last, e);
                if !fails_over {
                    break;
                }
            }
        }
    }
    shared.metrics.llm.failed(settings.model_label(model));
    Err(super::http::provider_failed(last))
}

/// The provider's Realtime WebSocket for `model`, with its key.
async fn connect(provider: &Provider, model: &str, beta: Option<&HeaderValue>) -> Result<Upstream, ProviderError> {
    let name = || provider.name.clone();
    let (conn, authority) = provider::connect(provider).await?;
    let scheme = if provider.tls.is_some() { "wss" } else { "ws" };
    let path = provider.path("/realtime");
    let model: String = model
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect();
    let url = format!("{scheme}://{authority}{path}?model={model}");
    let mut request = url.into_client_request().map_err(|e| ProviderError::Tls {
        provider: name(),
        error: e.to_string(),
    })?;
    if let Some(key) = &provider.api_key
        && let Ok(value) = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
    {
        request.headers_mut().insert(http::header::AUTHORIZATION, value);
    }
    if let Some(beta) = beta {
        request.headers_mut().insert("openai-beta", beta.clone());
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_PROVIDER_MESSAGE))
        .max_frame_size(Some(MAX_PROVIDER_MESSAGE));
    let handshake = tokio_tungstenite::client_async_with_config(request, conn, Some(config));
    match tokio::time::timeout(provider.first_token_timeout, handshake).await {
        Err(_) => Err(ProviderError::Timeout {
            provider: name(),
            after: provider.first_token_timeout,
        }),
        Ok(Ok((upstream, _))) => Ok(upstream),
        Ok(Err(tungstenite::Error::Http(resp))) => Err(ProviderError::Status {
            provider: name(),
            status: resp.status(),
            retry_after: resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        }),
        Ok(Err(e)) => Err(ProviderError::Tls {
            provider: name(),
            error: e.to_string(),
        }),
    }
}

struct Session {
    shared: Arc<Shared>,
    settings: Arc<LlmSettings>,
    key: Arc<KeyState>,
    /// The client's key, read again after each response (a key revoked elsewhere ends the session).
    secret: String,
    db: Db,
    model: String,
}

impl Session {
    async fn relay<S: AsyncRead + AsyncWrite + Unpin>(self, client: WebSocketStream<S>, upstream: Upstream) -> Ended {
        let (mut to_client, mut from_client) = client.split();
        let (mut to_provider, mut from_provider) = upstream.split();
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        let draining = self.shared.draining.clone();
        let close = |code: CloseCode, reason: &str| {
            Message::Close(Some(CloseFrame {
                code,
                reason: reason.to_string().into(),
            }))
        };
        let ended = loop {
            tokio::select! {
                m = from_client.next() => match m {
                    None => break Ended::ClientClosed,
                    Some(Err(e)) => break Ended::Client(e),
                    Some(Ok(m @ Message::Close(_))) => {
                        let _ = tokio::time::timeout(WRITE_TIMEOUT, to_provider.send(m)).await;
                        break Ended::ClientClosed;
                    }
                    // Pings are answered by each side's own WebSocket; data goes on as it came.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(m)) => match tokio::time::timeout(WRITE_TIMEOUT, to_provider.send(m)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Ended::Provider(e),
                        Err(_) => break Ended::WriteTimeout,
                    },
                },
                m = from_provider.next() => match m {
                    None => break Ended::ProviderClosed,
                    Some(Err(e)) => break Ended::Provider(e),
                    Some(Ok(m @ Message::Close(_))) => {
                        let _ = tokio::time::timeout(WRITE_TIMEOUT, to_client.send(m)).await;
                        break Ended::ProviderClosed;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(m)) => {
                        let (done, mut over) = match &m {
                            Message::Text(text) => self.meter(text.as_str()).await,
                            _ => (false, None),
                        };
                        // After each response the key is read again (at most every 10 s from the database): a key
                        // revoked meanwhile ends the session.
                        if done && over.is_none() && self.shared.llm.keys.authenticate(&self.db, &self.secret).await.is_err() {
                            over = Some("this API key has been revoked or can no longer be checked".to_string());
                        }
                        match tokio::time::timeout(WRITE_TIMEOUT, to_client.send(m)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => break Ended::Client(e),
                            Err(_) => break Ended::WriteTimeout,
                        }
                        if let Some(why) = over {
                            let reason: String = why.chars().take(120).collect();
                            let _ = tokio::time::timeout(WRITE_TIMEOUT, to_client.send(close(CloseCode::Policy, &reason))).await;
                            let _ = tokio::time::timeout(WRITE_TIMEOUT, to_provider.send(close(CloseCode::Normal, ""))).await;
                            break Ended::Limit(why);
                        }
                    }
                },
                _ = ping.tick() => {
                    if tokio::time::timeout(WRITE_TIMEOUT, to_client.send(Message::Ping(Bytes::new()))).await.is_err() {
                        break Ended::WriteTimeout;
                    }
                }
                () = draining.cancelled() => {
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, to_client.send(close(CloseCode::Away, "server shutting down"))).await;
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, to_provider.send(close(CloseCode::Away, ""))).await;
                    break Ended::ShuttingDown;
                }
            }
        };
        // The other side's socket closes as the streams drop.
        ended
    }

    /// Bills a `response.done` event's usage; `Some(why)` when the key has now reached a token limit or its budget.
    async fn meter(&self, text: &str) -> (bool, Option<String>) {
        // Only the events that carry usage are parsed: the rest pass without a look inside.
        if !text.contains("response.done") {
            return (false, None);
        }
        let Ok(event) = serde_json::from_str::<Value>(text) else {
            return (false, None);
        };
        if event.get("type").and_then(Value::as_str) != Some("response.done") {
            return (false, None);
        }
        let Some(usage) = event.get("response").and_then(|r| r.get("usage")) else {
            return (true, None);
        };
        let usage = Usage {
            prompt: usage.get("input_tokens").and_then(Value::as_u64).unwrap_or(0),
            completion: usage.get("output_tokens").and_then(Value::as_u64).unwrap_or(0),
        };
        let metered = Metered {
            settings: self.settings.clone(),
            key: self.key.clone(),
            model: self.model.clone(),
            db: self.db.clone(),
            metrics: self.shared.metrics.clone(),
        };
        metered.bill(usage, false, "ok");
        let over = self.key.check_tokens(&self.db).await.err().map(|over| over.message());
        (true, over)
    }
}
