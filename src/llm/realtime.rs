//! Realtime passthrough (`…/realtime?model=…`): an OpenAI-style Realtime WebSocket session relayed in frames mode
//! (the relay every WebSocket route uses) between the client and the model's provider, with the provider's key put
//! on the upstream handshake (the client's virtual key never goes upstream). The relay's frame tracker keeps the
//! provider's text messages that name `response.done` as they pass (every other message goes through untouched,
//! looked at only in its first bytes), and this module meters each one: a usage row, then the key's token limits,
//! budget and revocation checked, and a session that has reached one is closed with 1008 and a reason. The relay
//! pings a side silent for `[llm] ping_interval` (the client stays alive while the model is silent) and closes both sides with 1001
//! on shutdown.

use std::sync::Arc;

use http::{HeaderValue, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::http::ApiError;
use super::keys::{KeyRefusal, KeyState, Limit, OverLimit};
use super::meter::{MAX_TOKENS, Usage};
use super::provider::{self, ProviderError};
use super::ws::{WRITE_TIMEOUT, refuse_upgrade, switch};
use super::{Db, Metered};
use crate::config::FrameRules;
use crate::config::llm::{LlmSettings, Provider, ProviderKind};
use crate::conn::Conn;
use crate::http::handshake::{BackendAnswer, inspect_response};
use crate::observe::Counters;
use crate::relay;
use crate::signal::StopSignal;
use crate::state::Shared;
use crate::ws::frame::Capture;

/// The largest message either side may send (audio deltas are base64 in JSON); over it, close 1009.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// What the provider's messages that are metered carry near their start.
const MARKER: &[u8] = b"\"response.done\"";

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
    let (key, db, model, (mut upstream, upstream_early)) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            e.count(&shared.metrics.llm);
            return refuse_upgrade(&mut client, &e).await;
        }
    };
    if let Err(e) = switch(&mut client, &accept).await {
        return (101, format!("error: client: {e}"));
    }
    let rules = FrameRules {
        max_message_size: Some(MAX_MESSAGE as u64),
        ping_interval: Some(settings.ping_interval),
        validate_utf8: true,
        write_timeout: WRITE_TIMEOUT,
        ..FrameRules::default()
    };
    // No extension was offered either way: frames are uncompressed, and the tap reads them as they are.
    let mut frames = relay::Frames::new(&rules, false);
    let (tap, tapped) = mpsc::unbounded_channel();
    frames.tap_backend(Capture::new(MARKER, MAX_MESSAGE, move |message| {
        // A receiver gone (the metering ended) wants nothing more.
        let _ = tap.send(message);
    }));
    let signal = StopSignal::new();
    let session = Session {
        shared: shared.clone(),
        settings: settings.clone(),
        key,
        secret: secret.unwrap_or_default().to_string(),
        db,
        model,
    };
    let timeouts = relay::Timeouts {
        idle: None,
        write: WRITE_TIMEOUT,
        splice: false,
    };
    let mut counters = Counters::default();
    let stop = relay::Stop::new(&signal, &shared.phase, true);
    let relayed = relay::relay(
        &mut client,
        &mut upstream,
        timeouts,
        Some(frames),
        [early, upstream_early],
        &mut counters,
        stop,
        None,
    );
    let draining = shared.draining.clone();
    let relay_to_end = async {
        tokio::pin!(relayed);
        tokio::select! {
            end = &mut relayed => end,
            // The relay reads the server's phase when woken: a shutdown closes it with 1001.
            () = draining.cancelled() => {
                signal.wake();
                relayed.await
            }
        }
    };
    // The tap's sender goes with the relay: the metering ends once the last message kept is billed.
    let (end, ()) = tokio::join!(relay_to_end, session.meter(tapped, &signal));
    (101, end.to_string())
}

/// The provider's WebSocket connection and the bytes it sent after its 101.
type Upstream = (Conn, Vec<u8>);

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

/// The provider's Realtime WebSocket for `model`, with its key: the upgrade request written and the provider's
/// answer read on the connection, which the relay then takes as it is.
async fn connect(provider: &Provider, model: &str, beta: Option<&HeaderValue>) -> Result<Upstream, ProviderError> {
    let name = || provider.name.clone();
    let failed = |error: String| ProviderError::Tls {
        provider: name(),
        error,
    };
    let (mut conn, authority) = provider::connect(provider).await?;
    let path = provider.path("/realtime");
    let model: String = model
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect();
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| failed(format!("no random bytes for the handshake: {e}")))?;
    let ws_key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, nonce);
    let mut head = format!(
        "GET {path}?model={model} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {ws_key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: wsgate\r\n"
    );
    if let Some(key) = &provider.api_key
        && HeaderValue::from_str(key.expose()).is_ok()
    {
        head.push_str(&format!("Authorization: Bearer {}\r\n", key.expose()));
    }
    if let Some(beta) = beta.and_then(|b| b.to_str().ok()) {
        head.push_str(&format!("OpenAI-Beta: {beta}\r\n"));
    }
    head.push_str("\r\n");
    let accept = crate::ws::accept_key(ws_key.as_bytes());
    let handshake = async {
        conn.write_all(head.as_bytes())
            .await
            .map_err(|e| failed(e.to_string()))?;
        conn.flush().await.map_err(|e| failed(e.to_string()))?;
        let mut buf = Vec::with_capacity(1024);
        loop {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.map_err(|e| failed(e.to_string()))?;
            if n == 0 {
                return Err(failed("the provider closed the connection during the handshake".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
            match inspect_response(&buf, &accept) {
                Ok(BackendAnswer::Partial) => continue,
                Ok(BackendAnswer::Switching { extensions: true, .. }) => {
                    return Err(failed("the provider accepted an extension it was not offered".into()));
                }
                Ok(BackendAnswer::Switching { head_len, .. }) => return Ok(buf.split_off(head_len)),
                Ok(BackendAnswer::Other { status, head, .. }) => {
                    return Err(ProviderError::Status {
                        provider: name(),
                        status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                        retry_after: retry_after(&head),
                    });
                }
                Err(e) => return Err(failed(e.to_string())),
            }
        }
    };
    match tokio::time::timeout(provider.first_token_timeout, handshake).await {
        Err(_) => Err(ProviderError::Timeout {
            provider: name(),
            after: provider.first_token_timeout,
        }),
        Ok(Ok(early)) => Ok((conn, early)),
        Ok(Err(e)) => Err(e),
    }
}

/// The seconds of an answer head's `Retry-After`, if it has one.
fn retry_after(head: &[u8]) -> Option<u32> {
    String::from_utf8_lossy(head).lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
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
    /// Meters the `response.done` events the relay kept, as they come, until the relay ends: each one billed, then
    /// the key checked; a key that has reached a limit, or is revoked, has the relay close the session with 1008.
    async fn meter(&self, mut tapped: mpsc::UnboundedReceiver<Vec<u8>>, signal: &StopSignal) {
        while let Some(message) = tapped.recv().await {
            let Some(usage) = response_usage(&message) else {
                continue;
            };
            let metered = Metered {
                settings: self.settings.clone(),
                key: self.key.clone(),
                model: self.model.clone(),
                db: self.db.clone(),
                metrics: self.shared.metrics.clone(),
            };
            // Written at once where limits are counted in a shared database, so that the check below counts it.
            metered.bill_now(usage, false, "ok").await;
            if signal.reason().is_some() {
                continue;
            }
            let over = match self.key.check_tokens(&self.db).await {
                Err(over) => Some(over),
                // Read again (at most every 10 s from the database): a key revoked or deleted meanwhile ends the
                // session; a database that cannot answer does not.
                Ok(()) => match self.shared.llm.keys.authenticate(&self.db, &self.secret).await {
                    Err(KeyRefusal::Revoked(_) | KeyRefusal::Unknown | KeyRefusal::Missing) => Some(OverLimit {
                        limit: Limit::Revoked,
                        retry_after: None,
                    }),
                    Ok(_) | Err(KeyRefusal::Unavailable(_)) => None,
                },
            };
            if let Some(over) = over {
                tracing::info!(key = self.key.id(), model = %self.model, reason = %over.message(), "LLM Realtime session closed: the key may not go on");
                signal.stop_split(1008, 1001, close_reason(&over.limit));
            }
        }
    }
}

/// The usage of a provider's `response.done` event (`None` for any other message, or one without usage).
fn response_usage(message: &[u8]) -> Option<Usage> {
    let event: Value = serde_json::from_slice(message).ok()?;
    if event.get("type").and_then(Value::as_str) != Some("response.done") {
        return None;
    }
    let usage = event.get("response")?.get("usage")?;
    let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0).min(MAX_TOKENS);
    Some(Usage {
        prompt: count("input_tokens"),
        completion: count("output_tokens"),
    })
}

/// The reason of the 1008 that closes a session whose key may not go on.
fn close_reason(limit: &Limit) -> &'static str {
    match limit {
        Limit::TokensPerMinute(_) => "this key's limit of tokens per minute is reached",
        Limit::TokensPerDay(_) => "this key's limit of tokens per day is reached",
        Limit::Budget(_) => "this key's budget is spent",
        Limit::Revoked => "this API key has been revoked or can no longer be checked",
        Limit::RequestsPerMinute(_) | Limit::Model | Limit::Unavailable => "this key's limit is reached",
    }
}
