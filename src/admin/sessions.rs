//! The admin API's view of live sessions and of the config in force: `GET /api/connections` (paged, filtered),
//! `POST /api/connections/{id}/close` and `GET /api/config` (secrets redacted).

use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;

use crate::live::LiveSession;
use crate::state::Shared;

/// The most sessions one page lists, and how many it lists when not told.
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

/// An admin answer: its status and JSON body.
pub type Answer = (StatusCode, serde_json::Value);

/// An error answer's body.
pub fn error(message: &str) -> serde_json::Value {
    serde_json::json!({ "error": message })
}

/// `GET /api/connections?route=R&upstream=U&server=S&listener=L&identity=I&limit=N&after=ID`: the live WebSocket
/// sessions matching every filter given, in id order, `limit` at most (100 unless told, 1000 at most), from the
/// first id above `after`. `next` is the `after` of the next page (`null` on the last); `total` counts every
/// matching session. Counts are as of each session's last fold (at most a second old while it moves).
pub fn list(shared: &Shared, query: Option<&str>) -> Answer {
    let mut filters: Vec<(&str, String)> = Vec::new();
    let mut limit = DEFAULT_PAGE;
    let mut after = 0u64;
    for (key, value) in query_pairs(query.unwrap_or("")) {
        let Some(value) = value else {
            return (
                StatusCode::BAD_REQUEST,
                error(&format!("malformed query parameter `{key}`")),
            );
        };
        match key {
            "route" | "upstream" | "server" | "listener" | "identity" => filters.push((key, value)),
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                _ => {
                    return (
                        StatusCode::BAD_REQUEST,
                        error(&format!("`limit` must be a number from 1 to {MAX_PAGE}")),
                    );
                }
            },
            "after" => match value.parse::<u64>() {
                Ok(n) => after = n,
                Err(_) => return (StatusCode::BAD_REQUEST, error("`after` must be a connection id")),
            },
            other => {
                return (
                    StatusCode::BAD_REQUEST,
                    error(&format!(
                        "unknown query parameter `{other}` (expected route, upstream, server, listener, identity, \
                         limit, after)"
                    )),
                );
            }
        }
    }
    let keep = |s: &LiveSession| {
        filters.iter().all(|(key, value)| {
            let place = &s.totals.place;
            match *key {
                "route" => place.route == *value,
                "upstream" => place.upstream == *value,
                "server" => place.server == *value,
                "listener" => place.listener == *value,
                _ => s.identity.as_deref() == Some(value.as_str()),
            }
        })
    };
    let (page, total) = shared.sessions.list(after, limit, keep);
    let next = (page.len() == limit).then(|| page.last().map(|s| s.id)).flatten();
    let now = SystemTime::now();
    let connections: Vec<serde_json::Value> = page.iter().map(|s| describe(s, now)).collect();
    (
        StatusCode::OK,
        serde_json::json!({ "connections": connections, "total": total, "next": next }),
    )
}

fn describe(s: &LiveSession, now: SystemTime) -> serde_json::Value {
    let counted = s.counted();
    let place = &s.totals.place;
    let started_ms = s.started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let age = now.duration_since(s.started).unwrap_or_default();
    let mut v = serde_json::json!({
        "id": s.id,
        "client": s.client.to_string(),
        "listener": place.listener,
        "route": place.route,
        "upstream": place.upstream,
        "server": place.server,
        "identity": s.identity,
        "mode": s.mode,
        "started_unix_ms": started_ms,
        "age_seconds": age.as_secs(),
        "bytes_in": counted.bytes[0],
        "bytes_out": counted.bytes[1],
    });
    if s.mode == "frames" {
        v["messages_in"] = counted.messages[0].into();
        v["messages_out"] = counted.messages[1].into();
    }
    v
}

/// `POST /api/connections/{id}/close`, with an optional JSON body `{"code": N}`: a frames-mode session is closed
/// with close frames carrying the code (1000 unless told) to both sides, a tunnel by closing its TCP connections.
pub fn close(shared: &Shared, id: &str, body: &[u8]) -> Answer {
    let Some(session) = id.parse::<u64>().ok().and_then(|id| shared.sessions.get(id)) else {
        return (StatusCode::NOT_FOUND, error(&format!("no live connection `{id}`")));
    };
    let code = if body.iter().all(u8::is_ascii_whitespace) {
        1000
    } else {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct CloseBody {
            code: Option<u16>,
        }
        match serde_json::from_slice::<CloseBody>(body) {
            Ok(b) => b.code.unwrap_or(1000),
            Err(e) => return (StatusCode::BAD_REQUEST, error(&format!("malformed JSON body: {e}"))),
        }
    };
    if !sendable_close_code(code) {
        return (
            StatusCode::BAD_REQUEST,
            error(&format!(
                "close code {code} cannot be sent (use 1000-1003, 1007-1014 or 3000-4999)"
            )),
        );
    }
    if !session.stop.stop_with(code, "closed by the operator") {
        let why = session.stop.reason().map_or("", |(reason, _)| reason);
        return (
            StatusCode::CONFLICT,
            error(&format!("connection {} is closing already ({why})", session.id)),
        );
    }
    let tunnel = session.mode == "tunnel";
    (
        StatusCode::ACCEPTED,
        serde_json::json!({
            "id": session.id,
            "closing": true,
            "code": (!tunnel).then_some(code),
            "how": if tunnel { "tcp close" } else { "close frames" },
        }),
    )
}

/// A close code wsgate may put in a close frame (RFC 6455 §7.4: not 1004-1006 or 1015, which are never sent).
fn sendable_close_code(code: u16) -> bool {
    crate::ws::frame::valid_close_code(code)
}

/// `GET /api/config`: the config file in force as JSON, its secrets redacted, with its generation.
pub fn config(shared: &Shared) -> Answer {
    let snapshot = shared.snapshot.load();
    let generation = shared.metrics.generation();
    let Some(source) = &snapshot.config.source else {
        return (
            StatusCode::OK,
            serde_json::json!({ "generation": generation, "config": null }),
        );
    };
    let parsed: Result<toml::Table, _> = toml::from_str(source);
    match parsed
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::to_value(t).map_err(|e| e.to_string()))
    {
        Ok(mut value) => {
            redact(&mut value);
            (
                StatusCode::OK,
                serde_json::json!({ "generation": generation, "config": value }),
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "admin API: the config in force could not be shown");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                error("the config in force could not be shown"),
            )
        }
    }
}

/// Replaces the values of secret-looking keys with `"REDACTED"`, at any depth. A key naming a file (`*_file`)
/// holds a path, not the secret, and stays. In a `headers` table (matched request headers), the values of
/// credential headers (`Authorization`, `Cookie`, `X-Api-Key`, ...) go too.
fn redact(value: &mut serde_json::Value) {
    // The OTLP exporter's headers are there to carry a collector's credentials, whatever they are called.
    if let Some(headers) = value.pointer_mut("/tracing/headers").and_then(|h| h.as_object_mut()) {
        for v in headers.values_mut() {
            *v = serde_json::Value::String("REDACTED".into());
        }
    }
    redact_in(value, false);
}

fn redact_in(value: &mut serde_json::Value, headers: bool) {
    const SECRET: [&str; 8] = [
        "secret",
        "token",
        "password",
        "passwd",
        "credential",
        "api_key",
        "apikey",
        "hash",
    ];
    const SECRET_HEADER: [&str; 5] = ["authorization", "cookie", "key", "token", "secret"];
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let lower = key.to_ascii_lowercase();
                let secret = if headers {
                    SECRET_HEADER.iter().any(|s| lower.contains(s))
                } else {
                    !lower.ends_with("_file") && SECRET.iter().any(|s| lower.contains(s))
                };
                if secret && !v.is_object() && !v.is_array() {
                    *v = serde_json::Value::String("REDACTED".into());
                } else {
                    redact_in(v, lower == "headers");
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| redact_in(v, false)),
        _ => {}
    }
}

/// `key=value` pairs of a query, percent-decoded (`+` as a space); a pair whose value cannot be decoded has `None`.
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, Option<String>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key, super::percent_decoded(&value.replace('+', " ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secret_values_and_keeps_paths() {
        let mut v = serde_json::json!({
            "admin": { "token_file": "admin.token", "address": "127.0.0.1:9090" },
            "route": [{ "auth": { "jwt": { "secret": "hunter2", "secret_file": "k" } },
                        "headers": { "Authorization": "Bearer abc", "X-Plain": "ok" } }],
            "upstream": [{ "sticky": { "cookie": "SERVERID", "secret": "s3" } }],
            "keys": [{ "hash": "ab12", "identity": "alice" }],
            "tracing": { "otlp_endpoint": "http://c:4318/v1/traces", "headers": { "x-honeycomb-team": "hc1" } },
        });
        redact(&mut v);
        let text = v.to_string();
        for secret in ["hunter2", "Bearer abc", "ab12", "s3", "hc1"] {
            assert!(!text.contains(secret), "{secret} left in {text}");
        }
        for kept in ["admin.token", "127.0.0.1:9090", "\"k\"", "alice", "\"ok\"", "SERVERID"] {
            assert!(text.contains(kept), "{kept} lost from {text}");
        }
    }

    #[test]
    fn close_codes_that_may_be_sent() {
        for ok in [1000, 1001, 1008, 1011, 1012, 1013, 3000, 4999] {
            assert!(sendable_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 2000, 2999, 5000] {
            assert!(!sendable_close_code(bad), "{bad}");
        }
    }
}
