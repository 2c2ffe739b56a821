//! HTTP requests to wsgate's LLM gateway (and its admin API) as the tests make them: one request on its own
//! connection, its whole answer read, a chunked body decoded.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::within;

/// An HTTP answer: status, headers (lowercase names), body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an event stream.
    pub fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

/// One request on its own connection (`Connection: close`), read to its end; a chunked body is decoded.
pub async fn request(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: Option<&[u8]>) -> Answer {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n");
    if let Some(key) = key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    if let Some(body) = body {
        // A refusal may come before the whole body is read: a failed write is not the test's concern.
        let _ = stream.write_all(body).await;
    }
    let mut raw = Vec::new();
    within("the answer", stream.read_to_end(&mut raw)).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an answer head");
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        super::dechunk(body)
    } else {
        body.to_string()
    };
    Answer { status, headers, body }
}

/// A chat stream's events before `[DONE]` (which must end it), parsed, and the text of their deltas.
pub fn chat_chunks<S: AsRef<str>>(events: &[S]) -> (Vec<Value>, String) {
    assert_eq!(events.last().map(AsRef::as_ref), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.as_ref()).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    (chunks, text)
}

/// A key for `owner` in the SQLite key database at `db`, with no limits.
pub fn issue_key(db: &std::path::Path, owner: &str) -> String {
    wsgate::llm::store::Store::open(db)
        .unwrap()
        .add_key(&wsgate::llm::store::NewKey {
            owner: owner.into(),
            ..Default::default()
        })
        .unwrap()
        .key
}
