//! A provider of `kind = "anthropic"` behind the gateway's OpenAI-shaped API: requests translated to the Messages
//! API, answers and streams translated back (`tests/support/anthropic_standin.rs` plays Anthropic), over HTTP and
//! the WebSocket protocol, with its usage billed and its errors in OpenAI's shape.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::anthropic_standin::Standin;
use support::{Proxy, within};
use wsgate::llm::store::{Store, UsageFilter, UsageRow};

const PROVIDER_KEY: &str = "sk-ant-provider-4242";

struct Gateway {
    proxy: Proxy,
    key: String,
    db: PathBuf,
    _dir: support::TempDir,
}

fn gateway(name: &str, standin: &Standin) -> Gateway {
    let dir = support::TempDir::new(&format!("llm-anthropic-{name}"));
    std::fs::write(dir.join("anthropic.key"), PROVIDER_KEY).unwrap();
    let db = dir.join("llm.db");
    let proxy = Proxy::from_toml(&format!(
        "[[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\n[llm]\ndatabase = \"{}\"\n\
         [[llm.provider]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\
         models = [\"claude-*\", \"busy\", \"invalid\", \"paced\"]\n\
         [[route]]\npath_prefix = \"/v1\"\nkind = \"llm\"\n",
        db.display(),
        standin.base_url(),
        dir.join("anthropic.key").display()
    ));
    let key = support::gateway_http::issue_key(&db, "tests");
    Gateway {
        proxy,
        key,
        db,
        _dir: dir,
    }
}

/// A request on its own connection; status, headers and the (de-chunked) body.
async fn post(g: &Gateway, path: &str, body: &Value) -> (u16, String, String) {
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: g\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        g.key,
        body.len()
    );
    let mut stream = TcpStream::connect(g.proxy.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    within("the answer", stream.read_to_end(&mut raw)).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        support::dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, head.to_string(), body)
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 5, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say something."}]})
}

async fn usage_rows(g: &Gateway, requests: u64) -> Vec<UsageRow> {
    within("the usage rows", async {
        loop {
            let rows = Store::open(&g.db).unwrap().usage(&UsageFilter::default()).unwrap();
            if rows.iter().map(|r| r.requests).sum::<u64>() >= requests {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_provider_answers_in_openai_shape_whole_and_streamed_and_is_billed_from_its_usage() {
    let standin = Standin::start(8).await;
    let g = gateway("serve", &standin);

    let (status, _, body) = post(&g, "/v1/chat/completions", &chat("claude-test", false)).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let sent = &standin.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.api_key.as_deref(), Some(PROVIDER_KEY));
    assert!(sent.version.is_some());
    assert_eq!(sent.body["system"], "Be brief.");
    assert_eq!(sent.body["max_tokens"], 5);
    let input = Standin::input_tokens(&sent.body);
    assert_eq!(answer["usage"]["prompt_tokens"], input);

    let (status, head, body) = post(&g, "/v1/chat/completions", &chat("claude-test", true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("content-type: text/event-stream"),
        "{head}"
    );
    let events: Vec<&str> = body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    let (chunks, text) = support::gateway_http::chat_chunks(&events);
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    // The usage chunk wsgate asked for is not passed on: the client did not ask.
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{body}"
    );

    let rows = usage_rows(&g, 2).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(!rows[0].counted);
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (2 * input, 10));
    assert!(!body.contains(PROVIDER_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_errors_reach_the_client_in_openai_shape_and_legacy_completions_are_refused() {
    let standin = Standin::start(3).await;
    let g = gateway("errors", &standin);
    let (status, head, body) = post(&g, "/v1/chat/completions", &chat("busy", false)).await;
    assert_eq!(status, 429, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 3"), "{head}");
    let (status, _, body) = post(&g, "/v1/chat/completions", &chat("invalid", false)).await;
    assert_eq!(status, 400, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    let (status, _, body) = post(&g, "/v1/completions", &json!({"model": "claude-x", "prompt": "hi"})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "unsupported_endpoint"
    );
    // A request with nothing Anthropic can take: the client's 400, and nothing sent.
    let before = standin.requests().len();
    let (status, _, body) = post(
        &g,
        "/v1/chat/completions",
        &json!({"model": "claude-x", "messages": [{"role": "system", "content": "only a system message"}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(standin.requests().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_protocol_streams_from_an_anthropic_provider() {
    let standin = Standin::start(6).await;
    let g = gateway("ws", &standin);
    let url = g.proxy.url(&format!("/v1/stream?api_key={}", g.key));
    let (mut ws, _) = within("the upgrade", tokio_tungstenite::connect_async(url))
        .await
        .unwrap();
    let request = json!({"type": "request", "id": "a", "model": "paced",
        "messages": [{"role": "user", "content": "Say something."}]});
    ws.send(Message::text(request.to_string())).await.unwrap();
    let mut text = String::new();
    let done = within("the done message", async {
        loop {
            let Some(Ok(Message::Text(t))) = ws.next().await else {
                continue;
            };
            let m: Value = serde_json::from_str(t.as_str()).unwrap();
            match m["type"].as_str() {
                Some("delta") => text.push_str(m["content"].as_str().unwrap()),
                Some("done") => return m,
                _ => panic!("{m}"),
            }
        }
    })
    .await;
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 tok5 ");
    assert_eq!(done["finish_reason"], "stop", "{done}");
    assert_eq!(done["counted"], false, "{done}");
    assert_eq!(done["usage"]["completion_tokens"], 6);
}
