//! The LLM gateway's part of the admin API: virtual keys (`GET`/`POST /api/llm/keys`, `DELETE
//! /api/llm/keys/{id}`) and usage (`GET /api/llm/usage`), read from and written to the gateway's key database.

use serde::Deserialize;
use serde_json::{Value, json};

use http::StatusCode;

use crate::llm::store::{NewKey, UsageFilter};
use crate::llm::{Db, DbError};
use crate::state::Shared;

/// `POST /api/llm/keys`: what the new key may do.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    owner: String,
    #[serde(default)]
    models: Vec<String>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
    budget: Option<f64>,
}

fn database(shared: &Shared) -> Result<Db, (StatusCode, Value)> {
    shared.llm.db().ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            json!({"error": "no LLM gateway: the config has no [llm] section"}),
        )
    })
}

fn failed(e: &DbError) -> (StatusCode, Value) {
    match e {
        DbError::Store(e) if e.is_invalid_input() => (StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
        _ => {
            tracing::error!(error = %e, "admin API: the LLM key database failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "the key database cannot answer now"}),
            )
        }
    }
}

/// `GET /api/llm/keys`.
pub async fn list_keys(shared: &Shared) -> (StatusCode, Value) {
    let db = match database(shared) {
        Ok(db) => db,
        Err(answer) => return answer,
    };
    match db.list_keys().await {
        Ok(keys) => (StatusCode::OK, json!({ "keys": keys })),
        Err(e) => failed(&e),
    }
}

/// `POST /api/llm/keys`: 201 with the key's secret, shown this once.
pub async fn add_key(shared: &Shared, body: &[u8]) -> (StatusCode, Value) {
    let db = match database(shared) {
        Ok(db) => db,
        Err(answer) => return answer,
    };
    let new: NewKeyBody = match serde_json::from_slice(body) {
        Ok(new) => new,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": format!("expected a key's JSON: {e}")}),
            );
        }
    };
    let new = NewKey {
        owner: new.owner,
        models: new.models,
        requests_per_minute: new.requests_per_minute,
        tokens_per_minute: new.tokens_per_minute,
        tokens_per_day: new.tokens_per_day,
        budget: new.budget,
    };
    let issued = match db.add_key(new).await {
        Ok(issued) => issued,
        Err(e) => return failed(&e),
    };
    match db.key(issued.id).await {
        Ok(Some(record)) => {
            let mut body = json!(record);
            body["key"] = json!(issued.key);
            (StatusCode::CREATED, body)
        }
        Ok(None) => (StatusCode::CREATED, json!({"id": issued.id, "key": issued.key})),
        Err(e) => failed(&e),
    }
}

/// `DELETE /api/llm/keys/{id}`: the key stops working at once on this instance.
pub async fn revoke_key(shared: &Shared, id: &str) -> (StatusCode, Value) {
    let db = match database(shared) {
        Ok(db) => db,
        Err(answer) => return answer,
    };
    let Ok(id) = id.parse::<i64>() else {
        return (StatusCode::NOT_FOUND, json!({"error": "no such key"}));
    };
    match db.revoke(id).await {
        Ok(true) => {
            shared.llm.keys.revoked(id);
            (StatusCode::OK, json!({"revoked": id}))
        }
        Ok(false) => (
            StatusCode::NOT_FOUND,
            json!({"error": "no such key, or revoked already"}),
        ),
        Err(e) => failed(&e),
    }
}

/// `GET /api/llm/usage?key_id=&owner=&model=&from=&to=` (days as `YYYY-MM-DD`, inclusive).
pub async fn usage(shared: &Shared, query: Option<&str>) -> (StatusCode, Value) {
    let db = match database(shared) {
        Ok(db) => db,
        Err(answer) => return answer,
    };
    let mut filter = UsageFilter::default();
    for (name, value) in query.unwrap_or_default().split('&').filter_map(|p| p.split_once('=')) {
        let Some(value) = super::percent_decoded(&value.replace('+', " ")) else {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": format!("{name}: malformed %-escape")}),
            );
        };
        match name {
            "key_id" => match value.parse() {
                Ok(id) => filter.key_id = Some(id),
                Err(_) => return (StatusCode::BAD_REQUEST, json!({"error": "key_id: expected a number"})),
            },
            "owner" => filter.owner = Some(value),
            "model" => filter.model = Some(value),
            "from" | "to" => {
                if !is_day(&value) {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("{name}: expected YYYY-MM-DD")}),
                    );
                }
                if name == "from" {
                    filter.from_day = Some(value);
                } else {
                    filter.to_day = Some(value);
                }
            }
            other => {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("unknown filter `{other}` (key_id, owner, model, from, to)")}),
                );
            }
        }
    }
    match db.usage(filter).await {
        Ok(rows) => (StatusCode::OK, json!({ "usage": rows })),
        Err(e) => failed(&e),
    }
}

fn is_day(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}
