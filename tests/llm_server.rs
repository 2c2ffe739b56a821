//! The LLM test server on its own, without wsgate: llama.cpp's OpenAI-compatible server (llama-cpp-python) on the
//! tiny generated model answers the calls the gateway tests build on: the model list, streamed and whole chat
//! completions, the official `openai` Python client, and a client that leaves mid-stream. The server and its
//! virtualenv come from `tests/support/llm.rs` and `scripts/test`.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::llm::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A Python client's whole run: starting Python and importing the client takes most of it.
const PYTHON_CLIENT_WAIT: Duration = Duration::from_secs(30);

fn chat(stream: bool, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something."}],
        "stream": stream,
        "max_tokens": max_tokens,
    })
}

/// The JSON chunks of a chat completion stream, checked to end with `[DONE]`.
fn chunks(events: &[String]) -> Vec<Value> {
    let (last, chunks) = events.split_last().expect("events in the stream");
    assert_eq!(last, "[DONE]", "the stream ends with [DONE]: {events:?}");
    chunks
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("chunk not JSON ({err}): {e}")))
        .collect()
}

fn delta_content(chunk: &Value) -> &str {
    chunk["choices"][0]["delta"]["content"].as_str().unwrap_or("")
}

#[tokio::test]
async fn models_lists_the_tiny_model() {
    let server = LlamaServer::start().await;
    let (status, body) = get(server.addr, "/v1/models").await;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(list["object"], "list", "{list}");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, [server.model_name()], "{list}");
    assert_eq!(server.base_url(), format!("http://{}/v1", server.addr));
}

#[tokio::test]
async fn streamed_chat_completion_comes_one_token_a_chunk_then_done() {
    let server = LlamaServer::start().await;
    let response = post_json(server.addr, "/v1/chat/completions", &chat(true, 16)).await;
    assert_eq!(response.status, 200, "{}", response.body());
    let content_type = response.headers["content-type"].to_str().unwrap_or("");
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");

    let chunks = chunks(&response.events());
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["model"], MODEL, "{chunk}");
    }
    let pieces: Vec<&str> = chunks.iter().map(delta_content).filter(|c| !c.is_empty()).collect();
    // One token a chunk; the server may hold back a piece that could start a stop sequence and send it with the
    // next, so a few fewer than 16.
    assert!(pieces.len() >= 8, "content chunks: {pieces:?}");
    let text = pieces.concat();
    assert!(
        text.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
        "printable ASCII: {text:?}"
    );
    // Every reply runs to max_tokens: the model never picks the end token.
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
}

#[tokio::test]
async fn whole_chat_completion_carries_usage() {
    let server = LlamaServer::start().await;
    let response = post_json(server.addr, "/v1/chat/completions", &chat(false, 16)).await;
    assert_eq!(response.status, 200, "{}", response.body());
    let completion: Value = serde_json::from_str(&response.body()).expect("JSON");
    assert_eq!(completion["object"], "chat.completion", "{completion}");
    assert_eq!(completion["model"], MODEL, "{completion}");
    let choice = &completion["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant", "{completion}");
    assert!(
        !choice["message"]["content"].as_str().unwrap_or("").is_empty(),
        "{completion}"
    );
    assert_eq!(choice["finish_reason"], "length", "{completion}");

    let usage = &completion["usage"];
    let prompt = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    let completion_tokens = usage["completion_tokens"].as_u64().expect("completion_tokens");
    // The ChatML prompt around "Say something." is well over ten tokens.
    assert!(prompt > 10, "{usage}");
    assert_eq!(completion_tokens, 16, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(prompt + completion_tokens),
        "{usage}"
    );
}

#[tokio::test]
async fn official_openai_client_streams_in_several_chunks() {
    let server = LlamaServer::start().await;
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="x", max_retries=0, timeout=20)
stream = client.chat.completions.create(
    model=sys.argv[2],
    messages=[{"role": "user", "content": "Say something."}],
    max_tokens=16,
    stream=True,
)
pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
print(json.dumps({"text": "".join(pieces), "chunks": sum(1 for p in pieces if p)}))
"#;
    let result = run_python_json(script, &[&server.base_url(), server.model_name()], PYTHON_CLIENT_WAIT).await;
    let chunks = result["chunks"].as_u64().expect("chunks");
    assert!(chunks > 1, "{result}");
    assert!(!result["text"].as_str().unwrap_or("").is_empty(), "{result}");
}

#[tokio::test]
async fn client_leaving_mid_stream_stops_the_generation() {
    let server = LlamaServer::start().await;
    // About two seconds of reply: far from done when the client leaves.
    let body = chat(true, 1500).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        server.addr,
        body.len()
    );
    let mut stream = within("connect", TcpStream::connect(server.addr))
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write the request");
    let mut seen = Vec::new();
    within("the first content chunk", async {
        let mut buf = [0u8; 4096];
        while !text_of(&seen).contains("\"content\":") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before a content chunk: {}", text_of(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(text_of(&seen).starts_with("HTTP/1.1 200"), "{}", text_of(&seen));
    drop(stream);
    server.wait_for_log("Disconnected from client").await;
    // The server is free again for the next request.
    let response = post_json(server.addr, "/v1/chat/completions", &chat(false, 4)).await;
    assert_eq!(response.status, 200, "{}", response.body());
}
