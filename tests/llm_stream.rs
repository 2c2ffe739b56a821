//! The LLM gateway's WebSocket protocol (`/v1/stream`, docs/llm-protocol.md) through wsgate in front of the
//! OpenAI-compatible stand-in: requests multiplexed on one socket, cancel, a client gone mid-stream, and every
//! bad message answered with an `error` while the socket goes on.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use support::openai_standin::Standin;
use support::{Client, Proxy, TempDir, within};
use wsgate::llm::store::{NewKey, Store, UsageFilter};

/// wsgate with one provider (the stand-in) and a key; the folder holding the database.
fn gateway(name: &str, standin: &Standin, new: NewKey) -> (Proxy, String, TempDir) {
    gateway_over(name, &[standin], new)
}

/// [`gateway`] with several providers, tried in order.
fn gateway_over(name: &str, standins: &[&Standin], new: NewKey) -> (Proxy, String, TempDir) {
    let dir = TempDir::new(&format!("llm-stream-{name}"));
    let db = dir.join("llm.db");
    let mut text = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\n[llm]\ndatabase = \"{}\"\n\
         [[llm.price]]\nmodel = \"*\"\ninput = 1.0\noutput = 2.0\n\
         [[route]]\npath_prefix = \"/v1\"\nkind = \"llm\"\n",
        db.display(),
    );
    for (i, standin) in standins.iter().enumerate() {
        text.push_str(&format!(
            "[[llm.provider]]\nname = \"p{i}\"\nkind = \"openai\"\nbase_url = \"{}\"\n\
             models = [\"tiny\", \"paced\", \"slow\", \"broken\", \"garbage\"]\n",
            standin.base_url()
        ));
    }
    let proxy = Proxy::from_toml(&text);
    let key = Store::open(&db).unwrap().add_key(&new).unwrap().key;
    (proxy, key, dir)
}

fn owner(name: &str) -> NewKey {
    NewKey {
        owner: name.into(),
        ..NewKey::default()
    }
}

async fn open(proxy: &Proxy, key: &str) -> Client {
    let mut request = proxy.url("/v1/stream").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    within("the upgrade", tokio_tungstenite::connect_async(request))
        .await
        .expect("upgrade")
        .0
}

async fn send(ws: &mut Client, message: Value) {
    ws.send(Message::text(message.to_string())).await.unwrap();
}

fn request(id: &str, model: &str) -> Value {
    json!({"type": "request", "id": id, "model": model, "max_tokens": 50,
        "messages": [{"role": "user", "content": "Tell me a story."}]})
}

/// The next JSON message (pings are answered by the client and skipped).
async fn next(ws: &mut Client) -> Value {
    within("a message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(text.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    })
    .await
}

/// Messages until the `done` or `error` of `id`.
async fn until_end(ws: &mut Client, id: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = next(ws).await;
        let end = m["id"] == id && (m["type"] == "done" || m["type"] == "error");
        seen.push(m);
        if end {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_requests_interleave_on_one_socket_and_each_ends_with_its_usage_and_cost() {
    let standin = Standin::start(6).await;
    let (proxy, key, _dir) = gateway("two", &standin, owner("a"));
    let mut ws = open(&proxy, &key).await;
    send(&mut ws, request("r1", "paced")).await;
    send(&mut ws, request("r2", "paced")).await;
    let mut text = [String::new(), String::new()];
    let mut done = [None, None];
    let mut order = Vec::new();
    while done.iter().any(Option::is_none) {
        let m = next(&mut ws).await;
        let i = match m["id"].as_str() {
            Some("r1") => 0,
            Some("r2") => 1,
            other => panic!("unexpected id {other:?}: {m}"),
        };
        match m["type"].as_str() {
            Some("delta") => {
                text[i].push_str(m["content"].as_str().unwrap());
                order.push(i);
            }
            Some("done") => done[i] = Some(m),
            _ => panic!("unexpected {m}"),
        }
    }
    assert_eq!(
        text,
        ["tok0 tok1 tok2 tok3 tok4 tok5 ", "tok0 tok1 tok2 tok3 tok4 tok5 "]
    );
    // Interleaved: r2's deltas did not wait for r1's end.
    let first_r2 = order.iter().position(|&i| i == 1).unwrap();
    assert!(order[first_r2..].contains(&0), "{order:?}");
    for d in done.iter().flatten() {
        assert_eq!(d["finish_reason"], "stop", "{d}");
        assert_eq!(d["usage"]["completion_tokens"], 6);
        let prompt = d["usage"]["prompt_tokens"].as_u64().unwrap();
        let cost = (prompt as f64 + 12.0) / 1_000_000.0;
        assert!((d["cost"].as_f64().unwrap() - cost).abs() < 1e-12, "{d}");
    }
    // The provider was asked to stream, with usage.
    for seen in standin.requests() {
        assert_eq!(seen.body["stream"], true);
        assert_eq!(seen.body["stream_options"]["include_usage"], true);
        assert!(seen.body.get("type").is_none() && seen.body.get("id").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_upstream_generation_and_bills_what_streamed() {
    let standin = Standin::start(50).await;
    let (proxy, key, dir) = gateway("cancel", &standin, owner("a"));
    let mut ws = open(&proxy, &key).await;
    send(&mut ws, request("r1", "slow")).await;
    let first = next(&mut ws).await;
    assert_eq!(
        (first["type"].as_str(), first["content"].as_str()),
        (Some("delta"), Some("tok0 "))
    );
    assert_eq!(standin.open_streams.load(Ordering::SeqCst), 1);
    send(&mut ws, json!({"type": "cancel", "id": "r1"})).await;
    let end = until_end(&mut ws, "r1").await;
    let done = end.last().unwrap();
    assert_eq!(
        (done["type"].as_str(), done["finish_reason"].as_str()),
        (Some("done"), Some("cancelled"))
    );
    let completion = done["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..50).contains(&completion), "{done}");
    within("the provider's stream to stop", async {
        while standin.open_streams.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Billed once, with what streamed; the id is free again.
    let db = dir.join("llm.db");
    let rows = within("the usage row", async {
        loop {
            let rows = Store::open(&db).unwrap().usage(&UsageFilter::default()).unwrap();
            if !rows.is_empty() {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!((rows[0].requests, rows[0].completion_tokens), (1, completion));
    send(&mut ws, request("r1", "tiny")).await;
    assert_eq!(until_end(&mut ws, "r1").await.last().unwrap()["type"], "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closed_mid_stream_leaves_no_upstream_request_running() {
    let standin = Standin::start(50).await;
    let (proxy, key, _dir) = gateway("gone", &standin, owner("a"));
    let mut ws = open(&proxy, &key).await;
    send(&mut ws, request("r1", "slow")).await;
    assert_eq!(next(&mut ws).await["type"], "delta");
    drop(ws);
    within("the provider's stream to stop", async {
        while standin.open_streams.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_errors_and_the_socket_goes_on() {
    let standin = Standin::start(30).await;
    let (proxy, key, _dir) = gateway("bad", &standin, owner("a"));
    let mut ws = open(&proxy, &key).await;
    let expect_error = |m: Value, id: Option<&str>, status: u16| {
        assert_eq!(m["type"], "error", "{m}");
        assert_eq!(m["id"].as_str(), id, "{m}");
        assert_eq!(m["status"], status, "{m}");
        assert!(m["message"].as_str().is_some_and(|s| !s.is_empty()));
    };
    ws.send(Message::text("not json")).await.unwrap();
    expect_error(next(&mut ws).await, None, 400);
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    expect_error(next(&mut ws).await, None, 400);
    send(&mut ws, json!({"type": "request", "model": "tiny", "messages": []})).await;
    expect_error(next(&mut ws).await, None, 400);
    send(&mut ws, json!({"type": "hello", "id": "x"})).await;
    expect_error(next(&mut ws).await, Some("x"), 400);
    send(&mut ws, json!({"type": "request", "id": "m", "messages": []})).await;
    expect_error(next(&mut ws).await, Some("m"), 400);
    send(&mut ws, request("u", "no-such-model")).await;
    expect_error(next(&mut ws).await, Some("u"), 404);
    send(&mut ws, json!({"type": "cancel", "id": "nothing"})).await;
    expect_error(next(&mut ws).await, Some("nothing"), 404);
    // An id reused while in flight is refused; the first request goes on.
    send(&mut ws, request("r", "slow")).await;
    assert_eq!(next(&mut ws).await["type"], "delta");
    send(&mut ws, request("r", "tiny")).await;
    expect_error(next(&mut ws).await, Some("r"), 409);
    send(&mut ws, json!({"type": "cancel", "id": "r"})).await;
    assert_eq!(
        until_end(&mut ws, "r").await.last().unwrap()["finish_reason"],
        "cancelled"
    );
    // A provider failing before the first token: an error, and the socket goes on.
    send(&mut ws, request("b", "broken")).await;
    expect_error(until_end(&mut ws, "b").await.pop().unwrap(), Some("b"), 502);
    // One that answers garbage mid-stream: what came is passed on, then `done` says the stream failed.
    send(&mut ws, request("g", "garbage")).await;
    let end = until_end(&mut ws, "g").await;
    let done = end.last().unwrap();
    assert_eq!(
        (done["type"].as_str(), done["finish_reason"].as_str()),
        (Some("done"), Some("error")),
        "{done}"
    );
    assert!(done["message"].as_str().unwrap().contains("not JSON"));
    send(&mut ws, request("ok", "tiny")).await;
    let end = until_end(&mut ws, "ok").await;
    assert_eq!(end.last().unwrap()["finish_reason"], "stop");
    assert_eq!(end.len(), 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_checked_before_the_upgrade_and_limits_answer_with_errors() {
    let standin = Standin::start(3).await;
    let (proxy, key, _dir) = gateway(
        "keys",
        &standin,
        NewKey {
            requests_per_minute: Some(1),
            ..owner("a")
        },
    );
    let refused = tokio_tungstenite::connect_async(proxy.url("/v1/stream")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "missing_api_key");
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    let wrong = tokio_tungstenite::connect_async(proxy.url("/v1/stream?api_key=sk-wsg-wrong")).await;
    assert!(matches!(wrong, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 401));
    // The key in the query, as a browser sends it.
    let (mut ws, _) = within(
        "the upgrade",
        tokio_tungstenite::connect_async(proxy.url(&format!("/v1/stream?api_key={key}"))),
    )
    .await
    .unwrap();
    send(&mut ws, request("r1", "tiny")).await;
    assert_eq!(until_end(&mut ws, "r1").await.last().unwrap()["type"], "done");
    send(&mut ws, request("r2", "tiny")).await;
    let m = next(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["id"].as_str(), m["status"].as_u64()),
        (Some("error"), Some("r2"), Some(429))
    );
    assert!(m["retry_after"].as_u64().is_some_and(|s| (1..=60).contains(&s)), "{m}");
    // Other paths of the route take no upgrade.
    let other = tokio_tungstenite::connect_async(proxy.url(&format!("/v1/models?api_key={key}"))).await;
    assert!(matches!(other, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_spends_the_budget_ends_with_length() {
    let standin = Standin::start(40).await;
    // 2 per million completion tokens and 1 per million prompt tokens: 0.00002 lasts about six tokens.
    let (proxy, key, _dir) = gateway(
        "budget",
        &standin,
        NewKey {
            budget: Some(0.00002),
            ..owner("a")
        },
    );
    let mut ws = open(&proxy, &key).await;
    send(&mut ws, request("r1", "paced")).await;
    let end = until_end(&mut ws, "r1").await;
    let done = end.last().unwrap();
    assert_eq!(done["finish_reason"], "length", "{done}");
    let completion = done["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..40).contains(&completion), "{done}");
    send(&mut ws, request("r2", "tiny")).await;
    let m = next(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["status"].as_u64()),
        (Some("error"), Some(429)),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_while_its_socket_is_open_is_refused_on_the_next_request() {
    let standin = Standin::start(2).await;
    let (proxy, key, dir) = gateway("revoked", &standin, owner("a"));
    let mut ws = open(&proxy, &key).await;
    send(&mut ws, request("r1", "tiny")).await;
    assert_eq!(until_end(&mut ws, "r1").await.last().unwrap()["type"], "done");
    let id = Store::open(&dir.join("llm.db"))
        .unwrap()
        .find_key(&key)
        .unwrap()
        .unwrap()
        .id;
    let answer = support::raw_exchange(
        proxy.admin_addr(),
        format!("DELETE /api/llm/keys/{id} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    send(&mut ws, request("r2", "tiny")).await;
    let m = next(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["status"].as_u64()),
        (Some("error"), Some(401)),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_before_its_first_token_hands_over_to_the_next_provider() {
    let failing = Standin::start(4).await;
    failing.failing_streams.store(true, std::sync::atomic::Ordering::SeqCst);
    let standin = Standin::start(4).await;
    let (proxy, key, _dir) = gateway_over("first-token", &[&failing, &standin], owner("a"));
    let mut ws = open(&proxy, &key).await;
    send(&mut ws, request("r1", "tiny")).await;
    let seen = until_end(&mut ws, "r1").await;
    let deltas: Vec<&Value> = seen.iter().filter(|m| m["type"] == "delta").collect();
    assert_eq!(deltas.len(), 4, "{seen:?}");
    let done = seen.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["usage"]["completion_tokens"], 4);
    assert_eq!((failing.requests().len(), standin.requests().len()), (1, 1));
}
