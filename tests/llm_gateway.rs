//! The LLM gateway's OpenAI-compatible HTTP API, through wsgate in front of the OpenAI-compatible stand-in of
//! `support::openai_standin`: keys, limits, streams and their usage, failover, and every refusal's answer.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::gateway_http::{Answer, request};
use support::openai_standin::Standin;
use support::{Proxy, unused_addr, within};
use wsgate::llm::store::{NewKey, Store, UsageFilter};

/// A temp folder for a test's database and key files, removed at the end.
struct Dir(support::TempDir);

impl Dir {
    fn new(name: &str) -> Dir {
        Dir(support::TempDir::new(&format!("llm-{name}")))
    }

    fn db(&self) -> PathBuf {
        self.0.join("llm.db")
    }
}

const PROVIDER_KEY: &str = "sk-provider-secret-0123";

/// A config with providers at `urls` (in order) serving the stand-in's models, and a
/// price for `tiny`.
fn config(dir: &Dir, urls: &[String]) -> String {
    std::fs::write(dir.0.0.join("provider.key"), format!("{PROVIDER_KEY}\n")).unwrap();
    let mut text = format!(
        r#"
[[listener]]
name = "main"
address = "127.0.0.1:0"

[llm]
database = "{}"

[[llm.price]]
model = "tiny"
input = 1.0
output = 2.0
"#,
        dir.db().display()
    );
    for (i, url) in urls.iter().enumerate() {
        text.push_str(&format!(
            r#"
[[llm.provider]]
name = "p{i}"
kind = "openai"
base_url = "{url}"
api_key_file = "{}"
models = ["tiny", "busy", "broken", "cut", "slow", "paced", "garbage"]
connect_timeout = "1s"
token_timeout = "3s"
"#,
            dir.0.0.join("provider.key").display()
        ));
    }
    text.push_str("\n[[route]]\npath_prefix = \"/v1\"\nkind = \"llm\"\n");
    text
}

fn issue(db: &Path, new: NewKey) -> String {
    Store::open(db).unwrap().add_key(&new).unwrap().key
}

fn key_for(owner: &str) -> NewKey {
    NewKey {
        owner: owner.into(),
        ..NewKey::default()
    }
}

/// What the tests check of every refusal.
trait ErrorAnswer {
    fn assert_error(&self, status: u16, code: &str);
}

impl ErrorAnswer for Answer {
    /// An OpenAI-style error body with this code.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{}", self.body);
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!self.body.contains(PROVIDER_KEY), "the provider's key reached a client");
        assert!(
            !self.body.contains("127.0.0.1"),
            "an address reached a client: {}",
            self.body
        );
    }
}

/// A chat completion of `model` with `key`, on its own connection.
async fn complete(addr: SocketAddr, key: &str, model: &str, stream: bool) -> Answer {
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(key),
        Some(&chat(model, stream)),
    )
    .await
}

fn chat(model: &str, stream: bool) -> Vec<u8> {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Say something, please."}]})
        .to_string()
        .into_bytes()
}

/// Waits until the usage rows of `key_id` count `requests` requests (usage is written in batches).
async fn usage_rows(db: &Path, key_id: i64, requests: u64) -> Vec<wsgate::llm::store::UsageRow> {
    within("the usage rows", async {
        loop {
            let rows = Store::open(db)
                .unwrap()
                .usage(&UsageFilter {
                    key_id: Some(key_id),
                    ..UsageFilter::default()
                })
                .unwrap();
            if rows.iter().map(|r| r.requests).sum::<u64>() >= requests {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn key_id(db: &Path, secret: &str) -> i64 {
    Store::open(db).unwrap().find_key(secret).unwrap().unwrap().id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_and_a_stream_are_served_billed_and_the_usage_chunk_goes_only_to_who_asked() {
    let dir = Dir::new("serve");
    let standin = Standin::start(5).await;
    let proxy = Proxy::from_toml(&config(&dir, &[standin.base_url()]));
    let key = issue(&dir.db(), key_for("team-a"));

    let whole = complete(proxy.addr, &key, "tiny", false).await;
    assert_eq!(whole.status, 200, "{}", whole.body);
    let body = whole.json();
    assert_eq!(body["choices"][0]["message"]["content"], "tok0 tok1 tok2 tok3 tok4 ");
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();

    // A stream without include_usage: the provider was asked for usage, the client gets none.
    let streamed = complete(proxy.addr, &key, "tiny", true).await;
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert_eq!(streamed.header("content-type"), Some("text/event-stream"));
    let events = streamed.events();
    let (chunks, text) = support::gateway_http::chat_chunks(&events);
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "{events:?}");
    let asked = &standin.requests()[1].body;
    assert_eq!(asked["stream_options"]["include_usage"], true);

    // With include_usage, the usage chunk comes through.
    let mut with_usage: Value = serde_json::from_slice(&chat("tiny", true)).unwrap();
    with_usage["stream_options"] = json!({"include_usage": true});
    let streamed = request(
        proxy.addr,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(with_usage.to_string().as_bytes()),
    )
    .await;
    let events = streamed.events();
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    // Every request was billed from the provider's own figures, with the price of `tiny`.
    let id = key_id(&dir.db(), &key);
    let rows = usage_rows(&dir.db(), id, 3).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(
        (row.owner.as_str(), row.model.as_str(), row.counted),
        ("team-a", "tiny", false)
    );
    assert_eq!(
        (row.requests, row.prompt_tokens, row.completion_tokens),
        (3, 3 * prompt, 15)
    );
    let cost = (3.0 * prompt as f64 * 1.0 + 15.0 * 2.0) / 1_000_000.0;
    assert!((row.cost - cost).abs() < 1e-12, "{} against {cost}", row.cost);

    // The provider got its own key, never the client's.
    for seen in standin.requests() {
        assert_eq!(seen.authorization.as_deref(), Some(&*format!("Bearer {PROVIDER_KEY}")));
        assert_eq!(seen.path, "/v1/chat/completions");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_what_the_key_may_use() {
    let dir = Dir::new("models");
    let standin = Standin::start(1).await;
    let proxy = Proxy::from_toml(&config(&dir, &[standin.base_url()]));
    let all = issue(&dir.db(), key_for("a"));
    let only_tiny = issue(
        &dir.db(),
        NewKey {
            models: vec!["tiny".into()],
            ..key_for("b")
        },
    );
    let ids = |a: &Answer| -> Vec<String> {
        a.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let listed = request(proxy.addr, "GET", "/v1/models", Some(&all), None).await;
    assert_eq!(listed.status, 200);
    assert_eq!(
        ids(&listed),
        ["tiny", "busy", "broken", "cut", "slow", "paced", "garbage"]
    );
    assert_eq!(
        ids(&request(proxy.addr, "GET", "/v1/models", Some(&only_tiny), None).await),
        ["tiny"]
    );
    let refused = complete(proxy.addr, &only_tiny, "busy", false).await;
    refused.assert_error(403, "model_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_an_openai_style_error_and_nothing_is_sent_upstream() {
    let dir = Dir::new("bad");
    let standin = Standin::start(1).await;
    let proxy = Proxy::from_toml(&config(&dir, &[standin.base_url()]));
    let key = issue(&dir.db(), key_for("a"));
    let revoked = issue(&dir.db(), key_for("b"));
    let store = Store::open(&dir.db()).unwrap();
    store.revoke(store.find_key(&revoked).unwrap().unwrap().id).unwrap();
    let post = |key: Option<&'static str>, body: Vec<u8>| {
        let addr = proxy.addr;
        async move { request(addr, "POST", "/v1/chat/completions", key, Some(&body)).await }
    };
    let key: &'static str = Box::leak(key.into_boxed_str());
    let revoked: &'static str = Box::leak(revoked.into_boxed_str());

    post(None, chat("tiny", false))
        .await
        .assert_error(401, "missing_api_key");
    post(Some("sk-wsg-unknown"), chat("tiny", false))
        .await
        .assert_error(401, "invalid_api_key");
    post(Some(revoked), chat("tiny", false))
        .await
        .assert_error(401, "revoked_api_key");
    post(Some(key), b"{not json".to_vec())
        .await
        .assert_error(400, "invalid_json");
    post(Some(key), b"[1, 2]".to_vec())
        .await
        .assert_error(400, "invalid_json");
    post(Some(key), br#"{"messages": []}"#.to_vec())
        .await
        .assert_error(400, "missing_model");
    post(Some(key), chat("no-such-model", false))
        .await
        .assert_error(404, "model_not_found");
    let huge = vec![b'x'; 10 * 1024 * 1024];
    post(Some(key), huge).await.assert_error(413, "request_too_large");
    request(proxy.addr, "GET", "/v1/chat/completions", Some(key), None)
        .await
        .assert_error(405, "method_not_allowed");
    request(proxy.addr, "GET", "/v1/embeddings", Some(key), None)
        .await
        .assert_error(404, "unknown_url");
    assert!(standin.requests().is_empty(), "{:?}", standin.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_refuses_the_request_after_it_is_reached() {
    let dir = Dir::new("limits");
    let standin = Standin::start(10).await;
    let proxy = Proxy::from_toml(&config(&dir, &[standin.base_url()]));
    let send = |key: String, stream: bool| {
        let addr = proxy.addr;
        async move {
            request(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(&key),
                Some(&chat("tiny", stream)),
            )
            .await
        }
    };

    let rpm = issue(
        &dir.db(),
        NewKey {
            requests_per_minute: Some(2),
            ..key_for("rpm")
        },
    );
    assert_eq!(send(rpm.clone(), false).await.status, 200);
    assert_eq!(send(rpm.clone(), true).await.status, 200);
    let refused = send(rpm, false).await;
    refused.assert_error(429, "rate_limit_exceeded");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");

    // 10 completion tokens and 6 prompt tokens per request: the second request crosses 20, the third is refused.
    let tpm = issue(
        &dir.db(),
        NewKey {
            tokens_per_minute: Some(20),
            ..key_for("tpm")
        },
    );
    assert_eq!(send(tpm.clone(), true).await.status, 200);
    assert_eq!(send(tpm.clone(), false).await.status, 200);
    send(tpm, false).await.assert_error(429, "rate_limit_exceeded");

    let tpd = issue(
        &dir.db(),
        NewKey {
            tokens_per_day: Some(5),
            ..key_for("tpd")
        },
    );
    assert_eq!(send(tpd.clone(), false).await.status, 200);
    let refused = send(tpd, false).await;
    refused.assert_error(429, "rate_limit_exceeded");
    assert!(refused.header("retry-after").is_some());

    // `tiny` costs 2 per million completion tokens: 10 tokens cost 0.00002 and more.
    let budget = issue(
        &dir.db(),
        NewKey {
            budget: Some(0.00001),
            ..key_for("budget")
        },
    );
    assert_eq!(send(budget.clone(), false).await.status, 200);
    let refused = send(budget, false).await;
    refused.assert_error(429, "insufficient_quota");
    assert_eq!(refused.header("retry-after"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_down_busy_or_failing_hands_over_to_the_next_before_the_first_token() {
    let dir = Dir::new("failover");
    let standin = Standin::start(3).await;
    let down = format!("http://{}/v1", unused_addr());
    let proxy = Proxy::from_toml(&config(&dir, &[down, standin.base_url()]));
    let key = issue(&dir.db(), key_for("a"));
    let served = complete(proxy.addr, &key, "tiny", true).await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(standin.requests().len(), 1);

    // The only provider busy: its 429 and Retry-After reach the client, in the gateway's words.
    let busy = complete(proxy.addr, &key, "busy", false).await;
    busy.assert_error(429, "provider_busy");
    assert_eq!(busy.header("retry-after"), Some("7"));
    let broken = complete(proxy.addr, &key, "broken", false).await;
    broken.assert_error(502, "provider_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_before_its_first_token_hands_over_to_the_next_provider_and_is_billed_once() {
    let dir = Dir::new("first-token");
    let failing = Standin::start(3).await;
    failing.failing_streams.store(true, std::sync::atomic::Ordering::SeqCst);
    let standin = Standin::start(3).await;
    let proxy = Proxy::from_toml(&config(&dir, &[failing.base_url(), standin.base_url()]));
    let key = issue(&dir.db(), key_for("a"));
    let served = complete(proxy.addr, &key, "tiny", true).await;
    assert_eq!(served.status, 200, "{}", served.body);
    let events = served.events();
    assert!(!served.body.contains("error"), "{}", served.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    assert_eq!(events.iter().filter(|e| e.contains("tok")).count(), 3, "{events:?}");
    assert_eq!((failing.requests().len(), standin.requests().len()), (1, 1));
    let rows = usage_rows(&dir.db(), key_id(&dir.db(), &key), 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].requests, rows[0].completion_tokens), (1, 3));

    // With no provider left to try, the failure is passed on as the stream has it.
    standin.failing_streams.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = complete(proxy.addr, &key, "tiny", true).await;
    assert_eq!(failed.status, 200);
    let events = failed.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let error: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(error["error"]["code"], "provider_error");
    assert!(
        !failed.body.contains("overloaded"),
        "the provider's words reached the client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_provider_ends_with_an_error_event_and_bills_what_was_streamed() {
    let dir = Dir::new("cut");
    let standin = Standin::start(5).await;
    let proxy = Proxy::from_toml(&config(&dir, &[standin.base_url()]));
    let key = issue(&dir.db(), key_for("a"));
    let cut = complete(proxy.addr, &key, "cut", true).await;
    assert_eq!(cut.status, 200);
    let events = cut.events();
    assert_eq!(events.len(), 3, "{events:?}");
    let error: Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(error["error"]["code"], "provider_error");
    // No usage report came: the two tokens streamed are counted, the prompt by the local tokenizer ("Say",
    // " something", ",", " please", "." in tiktoken's o200k_base), and the row says so.
    let rows = usage_rows(&dir.db(), key_id(&dir.db(), &key), 1).await;
    assert_eq!(
        (rows[0].counted, rows[0].prompt_tokens, rows[0].completion_tokens),
        (true, 5, 2),
        "{rows:?}"
    );

    // A provider that answers garbage: a whole answer is a 502, a stream ends at the first unreadable event.
    let garbage = complete(proxy.addr, &key, "garbage", false).await;
    garbage.assert_error(502, "provider_error");
    let garbage = complete(proxy.addr, &key, "garbage", true).await;
    let events = garbage.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[1].contains("not JSON"), "{events:?}");
    assert!(!garbage.body.contains("<html>"));
    // Billed once each: the cut stream, and the garbage stream's one chunk (the whole garbage answer is not billed).
    let rows = usage_rows(&dir.db(), key_id(&dir.db(), &key), 2).await;
    let requests: u64 = rows.iter().map(|r| r.requests).sum();
    assert_eq!(requests, 2, "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_stream_stops_the_upstream_request_and_is_billed_for_what_streamed() {
    let dir = Dir::new("gone");
    let standin = Standin::start(50).await;
    let proxy = Proxy::from_toml(&config(&dir, &[standin.base_url()]));
    let key = issue(&dir.db(), key_for("a"));
    let body = chat("slow", true);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    // Read until the first token is through, then go away.
    let mut seen = Vec::new();
    within("the first token", async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("tok0") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert_eq!(standin.open_streams.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(stream);
    within("the provider's stream to stop", async {
        while standin.open_streams.load(std::sync::atomic::Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let rows = usage_rows(&dir.db(), key_id(&dir.db(), &key), 1).await;
    assert!(
        rows[0].counted && (1..5).contains(&rows[0].completion_tokens),
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_on_an_llm_route_is_refused_and_config_mistakes_are_named() {
    let dir = Dir::new("config");
    let standin = Standin::start(1).await;
    let text = config(&dir, &[standin.base_url()]);
    let proxy = Proxy::from_toml(&text);
    let answer = support::raw_exchange(
        proxy.addr,
        b"GET /v1/chat/completions HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    let problems = |text: &str| {
        wsgate::config::file::parse(text, "t.toml")
            .err()
            .map(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    };
    let no_section = "[[listener]]\nname = \"m\"\naddress = \"127.0.0.1:0\"\n[[route]]\nkind = \"llm\"\n";
    assert!(
        problems(no_section).contains("an `llm` route needs an [llm] section"),
        "{}",
        problems(no_section)
    );
    let with_upstream = text.replace("kind = \"llm\"", "kind = \"llm\"\nupstream = \"x\"");
    assert!(problems(&with_upstream).contains("leave `upstream` out"));
    let bad_url = text.replace(&standin.base_url(), "ftp://x");
    assert!(problems(&bad_url).contains("`llm.provider.base_url`"));
    let missing_key = text.replace("provider.key", "nope.key");
    assert!(problems(&missing_key).contains("cannot read"));
    let no_upstream = "[[listener]]\nname = \"m\"\naddress = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\n";
    assert!(problems(no_upstream).contains("`upstream` is required"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_issued_and_revoked_and_usage_is_read_through_the_admin_api() {
    let dir = Dir::new("admin");
    let standin = Standin::start(4).await;
    let text = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n{}",
        config(&dir, &[standin.base_url()])
    );
    let proxy = Proxy::from_toml(&text);
    let admin = proxy.admin_addr();

    let issued = request(
        admin,
        "POST",
        "/api/llm/keys",
        None,
        Some(br#"{"owner": "team-x", "models": ["tiny"], "tokens_per_day": 1000}"#),
    )
    .await;
    assert_eq!(issued.status, 201, "{}", issued.body);
    let issued = issued.json();
    let key = issued["key"].as_str().unwrap().to_string();
    let id = issued["id"].as_i64().unwrap();
    assert!(key.starts_with("sk-wsg-"));
    assert_eq!(
        (issued["owner"].as_str(), issued["tokens_per_day"].as_u64()),
        (Some("team-x"), Some(1000))
    );

    let served = complete(proxy.addr, &key, "tiny", false).await;
    assert_eq!(served.status, 200, "{}", served.body);
    let prompt = served.json()["usage"]["prompt_tokens"].as_u64().unwrap();

    let rows = within("the usage row", async {
        loop {
            let usage = request(
                admin,
                "GET",
                &format!("/api/llm/usage?key_id={id}&model=tiny"),
                None,
                None,
            )
            .await;
            assert_eq!(usage.status, 200, "{}", usage.body);
            let rows = usage.json()["usage"].as_array().unwrap().clone();
            if !rows.is_empty() {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["owner"], "team-x");
    assert_eq!(
        (row["prompt_tokens"].as_u64(), row["completion_tokens"].as_u64()),
        (Some(prompt), Some(4))
    );
    assert_eq!(row["requests"], 1);
    let bad_filter = request(admin, "GET", "/api/llm/usage?from=yesterday", None, None).await;
    assert_eq!(bad_filter.status, 400, "{}", bad_filter.body);

    let listed = request(admin, "GET", "/api/llm/keys", None, None).await.json();
    let listed = listed["keys"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].to_string().contains(&key[7..]), "the key's secret is listed");

    // Revoked through the API: refused at once, without waiting for the keys to be read again.
    assert_eq!(
        request(admin, "DELETE", &format!("/api/llm/keys/{id}"), None, None)
            .await
            .status,
        200
    );
    let refused = complete(proxy.addr, &key, "tiny", false).await;
    refused.assert_error(401, "revoked_api_key");
    assert_eq!(
        request(admin, "DELETE", &format!("/api/llm/keys/{id}"), None, None)
            .await
            .status,
        404
    );
    let bad = request(admin, "POST", "/api/llm/keys", None, Some(br#"{"owner": ""}"#)).await;
    assert_eq!(bad.status, 400, "{}", bad.body);

    // The metrics: the request billed with its tokens and cost, a stream's first token and gaps, the refusal.
    let streaming = issue(&dir.db(), key_for("s"));
    let streamed = complete(proxy.addr, &streaming, "tiny", true).await;
    assert_eq!(streamed.status, 200);
    let metrics = within("the stream's metrics", async {
        loop {
            let text = request(admin, "GET", "/metrics", None, None).await.body;
            if text.contains("wsgate_llm_requests_total{model=\"tiny\",outcome=\"ok\"} 2") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    assert_eq!(
        value("wsgate_llm_tokens_total{model=\"tiny\",kind=\"completion\"}"),
        8.0
    );
    assert_eq!(
        value("wsgate_llm_tokens_total{model=\"tiny\",kind=\"prompt\"}"),
        2.0 * prompt as f64
    );
    let cost = (2.0 * prompt as f64 + 16.0) / 1_000_000.0;
    assert!((value("wsgate_llm_cost_total{model=\"tiny\"}") - cost).abs() < 1e-12);
    assert_eq!(
        value("wsgate_llm_time_to_first_token_seconds_count{model=\"tiny\"}"),
        1.0
    );
    assert_eq!(value("wsgate_llm_inter_token_seconds_count{model=\"tiny\"}"), 3.0);
    assert_eq!(value("wsgate_llm_refusals_total{reason=\"revoked_api_key\"}"), 1.0);
}

#[test]
fn llm_key_add_prints_the_key_once_list_shows_its_hint_and_revoke_revokes_it() {
    let dir = Dir::new("cli");
    let path = dir.0.0.join("wsgate.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"m\"\naddress = \"127.0.0.1:0\"\n[llm]\ndatabase = \"keys.db\"\n\
         [[llm.provider]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"tiny\"]\n\
         [[route]]\nkind = \"llm\"\n",
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&[
        "llm-key",
        "add",
        "--config",
        config,
        "--owner",
        "team-cli",
        "--models",
        "tiny,tiny-*",
        "--tokens-per-day",
        "5000",
        "--budget",
        "2.5",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let key = stdout.trim();
    assert!(
        key.starts_with("sk-wsg-") && !key.contains(char::is_whitespace),
        "{stdout}"
    );
    // The database is the one the config names, relative to the config file.
    let stored = Store::open(&dir.0.0.join("keys.db"))
        .unwrap()
        .find_key(key)
        .unwrap()
        .unwrap();
    assert_eq!(stored.models, ["tiny", "tiny-*"]);
    assert_eq!((stored.tokens_per_day, stored.budget), (Some(5000), Some(2.5)));

    let (code, table, _) = run(&["llm-key", "list", "--config", config]);
    assert_eq!(code, Some(0));
    assert!(
        table.contains("team-cli") && table.contains(&key[key.len() - 4..]),
        "{table}"
    );
    assert!(!table.contains(key), "the list shows the whole key");

    let id = stored.id.to_string();
    assert_eq!(run(&["llm-key", "revoke", "--config", config, &id]).0, Some(0));
    let (code, _, stderr) = run(&["llm-key", "revoke", "--config", config, &id]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no key"), "{stderr}");
    let (code, _, stderr) = run(&[
        "llm-key",
        "add",
        "--config",
        config,
        "--owner",
        "x",
        "--tokens-per-minute",
        "0",
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("at least 1"), "{stderr}");
}

/// The gateway as its own process with debug logging, for what its log says.
async fn gateway_binary(dir: &Dir, standin: &Standin, log_bodies: bool) -> (support::binary::Binary, SocketAddr) {
    let addr = unused_addr();
    let text = config(dir, &[standin.base_url()])
        .replace("address = \"127.0.0.1:0\"", &format!("address = \"{addr}\""))
        .replace("[llm]\n", &format!("[llm]\nlog_bodies = {log_bodies}\n"));
    let path = dir.0.0.join(format!("wsgate-{log_bodies}.toml"));
    std::fs::write(&path, text).unwrap();
    let mut wsgate = support::binary::Binary::spawn_with_env(
        ["run", "--config", path.to_str().unwrap()],
        &[("RUST_LOG", "wsgate=debug")],
    );
    wsgate.wait_for_log(&["listening"]).await;
    (wsgate, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_completions_and_keys_stay_out_of_the_log_unless_log_bodies_is_on() {
    let dir = Dir::new("logs");
    let standin = Standin::start(3).await;
    let key = issue(&dir.db(), key_for("a"));
    let prompt = json!({"model": "tiny", "stream": true,
        "messages": [{"role": "user", "content": "PROMPT-MARKER-7731"}]})
    .to_string();

    let (mut wsgate, addr) = gateway_binary(&dir, &standin, false).await;
    for body in [prompt.clone(), prompt.replace("\"stream\":true", "\"stream\":false")] {
        let answer = request(addr, "POST", "/v1/chat/completions", Some(&key), Some(body.as_bytes())).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        wsgate
            .wait_for_access(|line| line["path"] == "/v1/chat/completions" && line["status"] == 200)
            .await;
    }
    let failing = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(&chat("broken", false)),
    )
    .await;
    assert_eq!(failing.status, 502);
    wsgate.wait_for_log(&["LLM provider failed"]).await;
    let log = wsgate.drain_log().join("\n");
    for secret in ["PROMPT-MARKER-7731", "tok0", PROVIDER_KEY, &key[7..]] {
        assert!(!log.contains(secret), "`{secret}` is in the log:\n{log}");
    }
    drop(wsgate);

    let (mut wsgate, addr) = gateway_binary(&dir, &standin, true).await;
    let answer = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(prompt.as_bytes()),
    )
    .await;
    assert_eq!(answer.status, 200);
    wsgate.wait_for_log(&["PROMPT-MARKER-7731"]).await;
    let completion = wsgate.wait_for_log(&["LLM completion"]).await;
    assert!(completion.contains("tok0 tok1 tok2 "), "{completion}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_tries_are_spread_over_a_models_providers_by_weight() {
    let dir = Dir::new("weights");
    let (a, b) = (Standin::start(1).await, Standin::start(1).await);
    let text = config(&dir, &[a.base_url(), b.base_url()]).replace("name = \"p0\"", "name = \"p0\"\nweight = 3");
    let proxy = Proxy::from_toml(&text);
    let key = issue(&dir.db(), key_for("w"));
    for _ in 0..8 {
        let answer = complete(proxy.addr, &key, "tiny", false).await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!((a.requests().len(), b.requests().len()), (6, 2));
    let bad = config(&dir, &[a.base_url()]).replace("name = \"p0\"", "name = \"p0\"\nweight = 0");
    let problems = wsgate::config::file::parse(&bad, "t.toml").err().unwrap();
    assert!(
        problems[0]
            .to_string()
            .contains("`llm.provider.weight`: expected 1 to 1000"),
        "{problems:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stalls_before_or_after_its_first_token_ends_at_the_providers_timeouts() {
    let dir = Dir::new("timeouts");
    let standin = Standin::start(5).await;
    let text = config(&dir, &[standin.base_url()])
        .replace(
            "token_timeout = \"3s\"",
            "token_timeout = \"300ms\"\nfirst_token_timeout = \"2s\"",
        )
        .replace("\"garbage\"]", "\"garbage\", \"late\"]");
    let proxy = Proxy::from_toml(&text);
    let key = issue(&dir.db(), key_for("t"));
    // The first token after 1 s is within first_token_timeout; the gaps after it are not within token_timeout.
    let late = complete(proxy.addr, &key, "late", true).await;
    assert!(late.body.contains("tok4"), "{}", late.body);
    let slow = complete(proxy.addr, &key, "slow", true).await;
    let events = slow.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events[0].contains("tok0") && events[1].contains("no token in time"),
        "{events:?}"
    );

    let tight = text.replace("first_token_timeout = \"2s\"", "first_token_timeout = \"300ms\"");
    let proxy = Proxy::from_toml(&tight);
    let late = complete(proxy.addr, &key, "late", true).await;
    let events = late.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains("no token in time"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_refusal_fails_over_or_is_passed_on_without_its_insides() {
    let dir = Dir::new("refusals");
    let (a, b) = (Standin::start(2).await, Standin::start(2).await);
    let text = config(&dir, &[a.base_url(), b.base_url()])
        .replace("\"garbage\"]", "\"garbage\", \"unauthorized\", \"rejected\"]");
    let proxy = Proxy::from_toml(&text);
    let key = issue(&dir.db(), key_for("r"));
    // Both providers refuse wsgate's key: tried in turn, and the client learns only that the provider failed.
    let refused = complete(proxy.addr, &key, "unauthorized", false).await;
    refused.assert_error(502, "provider_unavailable");
    assert!(!refused.body.contains("sk-prov"), "{}", refused.body);
    assert_eq!(a.requests().len() + b.requests().len(), 2);
    // A request the provider finds wrong: its status and its message, in OpenAI's shape.
    let rejected = complete(proxy.addr, &key, "rejected", false).await;
    rejected.assert_error(400, "provider_rejected");
    assert!(rejected.body.contains("max_tokens is too large"), "{}", rejected.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_of_a_key_share_its_limits() {
    let dir = Dir::new("concurrent");
    let standin = Standin::start(1).await;
    let proxy = Proxy::from_toml(&config(&dir, &[standin.base_url()]));
    let key = issue(
        &dir.db(),
        NewKey {
            requests_per_minute: Some(1),
            ..key_for("c")
        },
    );
    let addr = proxy.addr;
    let answers = futures_util::future::join_all((0..8).map(|_| {
        let key = key.clone();
        async move {
            request(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(&key),
                Some(&chat("tiny", false)),
            )
            .await
            .status
        }
    }))
    .await;
    assert_eq!(answers.iter().filter(|s| **s == 200).count(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|s| **s == 429).count(), 7, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_billed_just_before_a_shutdown_is_written() {
    let dir = Dir::new("shutdown");
    let standin = Standin::start(3).await;
    let key = issue(&dir.db(), key_for("s"));
    let (mut wsgate, addr) = gateway_binary(&dir, &standin, false).await;
    for _ in 0..3 {
        let answer = request(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(&chat("tiny", false)),
        )
        .await;
        assert_eq!(answer.status, 200);
    }
    wsgate.signal(rustix::process::Signal::TERM);
    let status = within("wsgate to exit", wsgate.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");
    let rows = Store::open(&dir.db()).unwrap().usage(&UsageFilter::default()).unwrap();
    assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), 3, "{rows:?}");
}
