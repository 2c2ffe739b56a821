//! The LLM gateway in front of a real LLM server: llama.cpp's OpenAI-compatible server (llama-cpp-python) on the
//! tiny generated model (`tests/support/llm.rs`). The official `openai` Python client streams through wsgate; usage
//! rows match the server's own figures; its streams, which carry no usage, are counted; the WebSocket protocol
//! streams its tokens; a cancel stops its generation.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use support::llm::{LlamaServer, run_python_json};
use support::{Proxy, within};
use wsgate::llm::store::{Store, UsageFilter, UsageRow};

const PYTHON_CLIENT_WAIT: Duration = Duration::from_secs(30);

/// The next JSON message of a socket (others skipped).
async fn next(ws: &mut support::Client) -> Value {
    within("a message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str::<Value>(t.as_str()).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
}

struct Gateway {
    proxy: Proxy,
    key: String,
    db: PathBuf,
    _dir: support::TempDir,
}

fn gateway(name: &str, server: &LlamaServer) -> Gateway {
    let dir = support::TempDir::new(&format!("llm-real-{name}"));
    let db = dir.join("llm.db");
    let proxy = Proxy::from_toml(&format!(
        "[[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\n[llm]\ndatabase = \"{}\"\n\
         [[llm.price]]\nmodel = \"tiny\"\ninput = 0.5\noutput = 1.5\n\
         [[llm.provider]]\nname = \"llama\"\nkind = \"openai\"\nbase_url = \"{}\"\nmodels = [\"tiny\"]\n\
         tokenize_url = \"http://{}/extras/tokenize/count\"\n\
         [[route]]\npath_prefix = \"/v1\"\nkind = \"llm\"\n",
        db.display(),
        server.base_url(),
        server.addr
    ));
    let key = support::gateway_http::issue_key(&db, "tests");
    Gateway {
        proxy,
        key,
        db,
        _dir: dir,
    }
}

async fn rows(db: &Path, requests: u64) -> Vec<UsageRow> {
    within("the usage rows", async {
        loop {
            let rows = Store::open(db).unwrap().usage(&UsageFilter::default()).unwrap();
            if rows.iter().map(|r| r.requests).sum::<u64>() >= requests {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_streams_through_wsgate_and_usage_matches_the_server() {
    let server = LlamaServer::start().await;
    let g = gateway("openai", &server);
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0, timeout=20)
stream = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "Say something."}], max_tokens=16, stream=True)
pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
whole = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "Say something."}], max_tokens=12)
try:
    client.chat.completions.create(model="tiny", messages=[], max_tokens=1, extra_headers={"Authorization": "Bearer nope"})
    refused = None
except Exception as e:
    refused = getattr(e, "status_code", None)
print(json.dumps({"text": "".join(pieces), "chunks": sum(1 for p in pieces if p),
    "usage": whole.usage.model_dump(), "refused": refused}))
"#;
    let base = format!("http://{}/v1", g.proxy.addr);
    let result = run_python_json(script, &[&base, &g.key], PYTHON_CLIENT_WAIT).await;
    let chunks = result["chunks"].as_u64().unwrap();
    assert!(chunks > 1, "{result}");
    assert_eq!(result["refused"], 401, "{result}");
    let usage = &result["usage"];
    // The whole completion was billed with the server's own figures; the stream, which carries no usage from this
    // server, with what wsgate counted: one token per chunk.
    let rows = rows(&g.db, 2).await;
    let reported = rows.iter().find(|r| !r.counted).expect("a reported row");
    assert_eq!(
        Some(reported.prompt_tokens),
        usage["prompt_tokens"].as_u64(),
        "{rows:?}"
    );
    assert_eq!(
        Some(reported.completion_tokens),
        usage["completion_tokens"].as_u64(),
        "{rows:?}"
    );
    let cost = (reported.prompt_tokens as f64 * 0.5 + reported.completion_tokens as f64 * 1.5) / 1e6;
    assert!((reported.cost - cost).abs() < 1e-12);
    let counted = rows.iter().find(|r| r.counted).expect("a counted row");
    assert_eq!(counted.completion_tokens, 16, "{rows:?}");
    // The prompt of the stream was counted by the server's own tokenizer (not estimated from its characters).
    let tokenized = support::llm::post_json(
        server.addr,
        "/extras/tokenize/count",
        &json!({"input": "Say something."}),
    )
    .await;
    let count: Value = serde_json::from_str(&tokenized.body()).unwrap();
    assert_eq!(Some(counted.prompt_tokens), count["count"].as_u64(), "{rows:?}");
    assert_ne!(counted.prompt_tokens, "Say something.".len().div_ceil(4) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_protocol_streams_the_servers_tokens_and_cancel_stops_its_generation() {
    let server = LlamaServer::start().await;
    let g = gateway("ws", &server);
    let url = g.proxy.url(&format!("/v1/stream?api_key={}", g.key));
    let (mut ws, _) = within("the upgrade", tokio_tungstenite::connect_async(url))
        .await
        .unwrap();
    let request = |id: &str, max_tokens: u32| {
        json!({"type": "request", "id": id, "model": "tiny", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Say something."}]})
        .to_string()
    };
    ws.send(Message::text(request("short", 12))).await.unwrap();
    let mut deltas = 0;
    let done = loop {
        let m = next(&mut ws).await;
        match m["type"].as_str() {
            Some("delta") => deltas += 1,
            Some("done") => break m,
            _ => panic!("{m}"),
        }
    };
    assert_eq!(done["finish_reason"], "length", "{done}");
    assert_eq!(done["usage"]["completion_tokens"], deltas);
    assert_eq!(done["counted"], true);

    // A long answer, cancelled after its first token: the server hears its client go.
    ws.send(Message::text(request("long", 1500))).await.unwrap();
    assert_eq!(next(&mut ws).await["type"], "delta");
    ws.send(Message::text(json!({"type": "cancel", "id": "long"}).to_string()))
        .await
        .unwrap();
    let done = loop {
        let m = next(&mut ws).await;
        if m["type"] == "done" {
            break m;
        }
    };
    assert_eq!(done["finish_reason"], "cancelled");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() < 1500);
    server.wait_for_log("Disconnected from client").await;
}
