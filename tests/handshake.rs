//! The opening handshake as clients and backends see it: every refusal of a client's head, the head the backend
//! receives, subprotocols, upstream failures, non-101 answers passed through, and round robin.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use support::*;

/// The key `upgrade_request` sends.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

// ---------------------------------------------------------------------------------------------------------------
// Raw HTTP on the client side
// ---------------------------------------------------------------------------------------------------------------

/// A client TCP connection read by hand, with what has been read but not yet consumed.
struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    async fn open(addr: SocketAddr) -> RawConn {
        let stream = within("connect", TcpStream::connect(addr)).await.expect("connect");
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("a write", self.stream.write_all(bytes)).await.expect("write");
    }

    /// One read into the buffer; the number of bytes read (0 at end of stream). A reset fails the test.
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = within("a read", self.stream.read(&mut chunk))
            .await
            .expect("read (the connection must close cleanly, not reset)");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads until the buffer holds `needle`; returns the bytes up to and including it, leaving the rest.
    async fn read_through(&mut self, needle: &[u8]) -> Vec<u8> {
        loop {
            if let Some(at) = self.buf.windows(needle.len()).position(|w| w == needle) {
                return self.buf.drain(..at + needle.len()).collect();
            }
            if self.fill().await == 0 {
                panic!(
                    "connection closed before {:?}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// Reads a response head (through the blank line).
    async fn read_head(&mut self) -> String {
        String::from_utf8(self.read_through(b"\r\n\r\n").await).expect("UTF-8 head")
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill().await == 0 {
                panic!("connection closed in the middle of a frame");
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one unmasked WebSocket frame from the server: its first byte (FIN + opcode) and payload.
    async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let start = self.read_exact(2).await;
        assert_eq!(start[1] & 0x80, 0, "frames from the server are never masked");
        let len = match start[1] & 0x7f {
            126 => u16::from_be_bytes(self.read_exact(2).await.try_into().unwrap()) as usize,
            127 => u64::from_be_bytes(self.read_exact(8).await.try_into().unwrap()) as usize,
            n => n as usize,
        };
        (start[0], self.read_exact(len).await)
    }

    /// Sends a short text frame, masked (with a zero key) as a client must.
    async fn send_text_frame(&mut self, text: &str) {
        assert!(text.len() < 126);
        let mut frame = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(text.as_bytes());
        self.send(&frame).await;
    }

    /// Reads until the server closes; returns everything not consumed yet.
    async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }
}

/// A complete HTTP response as the client received it.
#[derive(Debug)]
struct Reply {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn parse(bytes: &[u8]) -> Reply {
        let at = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(bytes)));
        let head = std::str::from_utf8(&bytes[..at]).expect("UTF-8 head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap_or_else(|| panic!("bad line {l:?}"));
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect();
        Reply {
            status_line,
            headers,
            body: bytes[at + 4..].to_vec(),
        }
    }

    /// Every value of a header, by case-insensitive name.
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn body_text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }
}

/// Sends `request` on a fresh connection and reads the answer until the proxy closes (cleanly).
async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut conn = RawConn::open(addr).await;
    conn.send(request).await;
    Reply::parse(&conn.read_to_end().await)
}

/// Checks an answer written by wsgate itself: the status line, `Connection: close`, and a one-line plain-text
/// body of the declared length. Returns the reason (the body without its newline).
fn refusal_reason(reply: &Reply, status: u16, phrase: &str) -> String {
    assert_eq!(reply.status_line, format!("HTTP/1.1 {status} {phrase}"), "{reply:?}");
    assert_eq!(reply.header("connection"), ["close"], "{reply:?}");
    assert_eq!(reply.header("content-type"), ["text/plain; charset=utf-8"], "{reply:?}");
    assert_eq!(
        reply.header("content-length"),
        [reply.body.len().to_string().as_str()],
        "{reply:?}"
    );
    let body = reply.body_text();
    let reason = body
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("body {body:?} does not end in a newline"));
    assert!(
        !reason.is_empty() && !reason.contains('\n'),
        "body {body:?} is not one line"
    );
    reason.to_string()
}

/// Sends `request` to a proxy in front of a working backend (so that anything let through would be upgraded) and
/// checks it is refused with `status` and exactly `reason`.
async fn assert_refused(request: &[u8], status: u16, phrase: &str, reason: &str) -> Reply {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let reply = exchange(proxy.addr, request).await;
    assert_eq!(refusal_reason(&reply, status, phrase), reason);
    reply
}

// ---------------------------------------------------------------------------------------------------------------
// Raw backends
// ---------------------------------------------------------------------------------------------------------------

type Script = Arc<dyn Fn(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A backend on raw TCP: for each connection it reads the request head, reports it on `requests`, then runs
/// its script on the connection. Dropping it closes the listener and every connection.
struct RawBackend {
    addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<String>,
    task: JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    async fn next_request(&mut self) -> String {
        within("a request at the raw backend", self.requests.recv())
            .await
            .expect("raw backend running")
    }
}

async fn raw_backend<F, Fut>(script: F) -> RawBackend
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let script: Script = Arc::new(move |s| Box::pin(script(s)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, requests) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let (tx, script) = (tx.clone(), script.clone());
            conns.spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                script(stream).await;
            });
        }
    });
    RawBackend { addr, requests, task }
}

/// Keeps a connection open, unanswered, until the backend is dropped.
async fn hold(stream: TcpStream) {
    let _stream = stream;
    std::future::pending::<()>().await;
}

/// The names the backends answer, in order, for `n` sequential connections.
async fn names_over(proxy: &Proxy, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        let mut ws = connect(&proxy.url("/")).await;
        ws.send(Message::text("name?")).await.expect("send");
        names.push(next_text(&mut ws).await);
    }
    names
}

/// The path of the next upgrade a backend saw, skipping the ends of earlier connections.
async fn next_upgrade_path(backend: &mut Backend) -> String {
    loop {
        if let Event::Upgraded { path, .. } = backend.next_event().await {
            return path;
        }
    }
}

async fn echo_once(proxy: &Proxy, text: &str) {
    let mut ws = connect(&proxy.url("/echo")).await;
    ws.send(Message::text(text)).await.expect("send");
    assert_eq!(next_text(&mut ws).await, text);
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Refusals of the client's handshake
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn post_upgrade_gets_400() {
    let req = upgrade_request("/", "").replacen("GET", "POST", 1);
    assert_refused(req.as_bytes(), 400, "Bad Request", "WebSocket upgrade must use GET").await;
}

#[tokio::test]
async fn http_1_0_upgrade_gets_400() {
    let req = upgrade_request("/", "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    assert_refused(
        req.as_bytes(),
        400,
        "Bad Request",
        "WebSocket upgrade must use HTTP/1.1",
    )
    .await;
}

#[tokio::test]
async fn upgrade_without_host_gets_400() {
    let req = upgrade_request("/", "").replacen("Host: test.local\r\n", "", 1);
    assert_refused(req.as_bytes(), 400, "Bad Request", "missing Host header").await;
}

#[tokio::test]
async fn connection_without_upgrade_token_gets_400() {
    let req = upgrade_request("/", "").replacen("Connection: Upgrade", "Connection: keep-alive", 1);
    assert_refused(
        req.as_bytes(),
        400,
        "Bad Request",
        "Connection header lacks the upgrade token",
    )
    .await;
}

#[tokio::test]
async fn key_that_is_not_base64_of_16_bytes_gets_400() {
    // Valid base64, but of 5 bytes ("short").
    let req = upgrade_request("/", "").replacen(KEY, "c2hvcnQ=", 1);
    assert_refused(
        req.as_bytes(),
        400,
        "Bad Request",
        "Sec-WebSocket-Key is not the base64 encoding of 16 bytes",
    )
    .await;
    // 24 characters, but not base64.
    let req = upgrade_request("/", "").replacen(KEY, "!!!!!!!!!!!!!!!!!!!!!!==", 1);
    assert_refused(
        req.as_bytes(),
        400,
        "Bad Request",
        "Sec-WebSocket-Key is not the base64 encoding of 16 bytes",
    )
    .await;
}

#[tokio::test]
async fn missing_version_gets_400() {
    let req = upgrade_request("/", "").replacen("Sec-WebSocket-Version: 13\r\n", "", 1);
    assert_refused(
        req.as_bytes(),
        400,
        "Bad Request",
        "missing Sec-WebSocket-Version header",
    )
    .await;
}

#[tokio::test]
async fn version_8_gets_426_with_supported_version() {
    let req = upgrade_request("/", "").replacen("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8", 1);
    let reply = assert_refused(
        req.as_bytes(),
        426,
        "Upgrade Required",
        "unsupported Sec-WebSocket-Version (only 13 is supported)",
    )
    .await;
    assert_eq!(reply.header("sec-websocket-version"), ["13"], "{reply:?}");
}

#[tokio::test]
async fn head_over_32_kib_gets_431() {
    let big = format!("X-Big: {}\r\n", "a".repeat(33 * 1024));
    let req = upgrade_request("/", &big);
    assert_refused(
        req.as_bytes(),
        431,
        "Request Header Fields Too Large",
        "request head larger than 32768 bytes",
    )
    .await;
}

#[tokio::test]
async fn more_than_100_header_fields_gets_431() {
    // 5 fields from upgrade_request, plus 96: 101 in all.
    let extra: String = (0..96).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
    let req = upgrade_request("/", &extra);
    assert_refused(
        req.as_bytes(),
        431,
        "Request Header Fields Too Large",
        "more than 100 header fields",
    )
    .await;
}

#[tokio::test]
async fn exactly_100_header_fields_are_accepted() {
    // The boundary of the test above: 5 + 95 = 100 fields is still an upgrade.
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let extra: String = (0..95).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
    let mut conn = RawConn::open(proxy.addr).await;
    conn.send(upgrade_request("/", &extra).as_bytes()).await;
    let head = conn.read_head().await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");

    // Any extension the backend accepts when none was offered is refused, not only permessage-deflate.
    let mut other = raw_backend(|mut s: TcpStream| async move {
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
                  Sec-WebSocket-Extensions: x-custom; level=2\r\n\r\n",
            )
            .await;
        hold(s).await;
    })
    .await;
    let proxy = Proxy::from_toml(&format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n\
         [[route]]\nupstream = \"u\"\npermessage_deflate = \"strip\"\n\
         [[upstream]]\nname = \"u\"\n[[upstream.server]]\naddress = \"{}\"\n",
        other.addr
    ));
    let reply = exchange(
        proxy.addr,
        upgrade_request("/", "Sec-WebSocket-Extensions: x-custom\r\n").as_bytes(),
    )
    .await;
    other.next_request().await;
    assert_eq!(refusal_reason(&reply, 502, "Bad Gateway"), "bad answer from upstream");
}

#[tokio::test]
async fn slow_client_gets_408_after_handshake_timeout() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start_with(&[backend.addr], |c| c.server.handshake_timeout = Duration::from_secs(1));
    let mut conn = RawConn::open(proxy.addr).await;
    let started = Instant::now();
    // Half a head, then nothing: the connection stays open on our side.
    conn.send(b"GET /chat HTTP/1.1\r\nHost: test.local\r\nUpgrade: webso")
        .await;
    let reply = Reply::parse(&conn.read_to_end().await);
    let waited = started.elapsed();
    assert_eq!(
        refusal_reason(&reply, 408, "Request Timeout"),
        "client sent no complete request head within 1s"
    );
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "answered after {waited:?}, expected about 1s"
    );
}

#[tokio::test]
async fn trickling_client_gets_408_after_handshake_timeout_in_all() {
    // The timeout covers the whole head, not each read: a byte every 100 ms does not keep a client alive.
    let backend = ws_backend("a").await;
    let proxy = Proxy::start_with(&[backend.addr], |c| c.server.handshake_timeout = Duration::from_secs(1));
    let stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for &b in b"GET /chat HTTP/1.1\r\nHost: test.local\r\nX-Slow: ".iter().cycle() {
            if write.write_all(&[b]).await.is_err() {
                return;
            }
            // Only to keep this client slow.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    within("the 408", read.read_to_end(&mut answer))
        .await
        .expect("a clean close");
    let waited = started.elapsed();
    trickle.abort();
    let reply = Reply::parse(&answer);
    assert_eq!(
        refusal_reason(&reply, 408, "Request Timeout"),
        "client sent no complete request head within 1s"
    );
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "answered after {waited:?}, expected about 1s"
    );
}

#[tokio::test]
async fn garbage_that_is_not_http_gets_400() {
    // The start of a TLS ClientHello, as sent by a client speaking https to a plain port.
    let garbage = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0xde, 0xad, 0xbe, 0xef,
    ];
    assert_refused(&garbage, 400, "Bad Request", "malformed request head: invalid token").await;
}

// ---------------------------------------------------------------------------------------------------------------
// 2. One client never stalls another
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn stalled_client_does_not_hold_up_another_connection() {
    let backend = ws_backend("a").await;
    // One worker thread (the test default): both connections share it.
    let proxy = Proxy::start(&[backend.addr]);
    let mut slow = RawConn::open(proxy.addr).await;
    let request = upgrade_request("/slow", "");
    let (first, rest) = request.split_at(request.len() / 2);
    slow.send(first.as_bytes()).await;

    echo_once(&proxy, "while another client is stalled").await;

    // The stalled client got nothing yet and is still being served once it finishes its head.
    let mut probe = [0u8; 64];
    match slow.stream.try_read(&mut probe) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the stalled client should have received nothing, got {other:?}"),
    }
    slow.send(rest.as_bytes()).await;
    let head = slow.read_head().await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    slow.send_text_frame("late but fine").await;
    assert_eq!(slow.read_frame().await, (0x81, b"late but fine".to_vec()));
}

// ---------------------------------------------------------------------------------------------------------------
// 3. The head the backend receives
// ---------------------------------------------------------------------------------------------------------------

const HOST: &str = "chat.example.com:8443";
const TARGET: &str = "/headers/room?id=42&q=a%20b";

/// What the backend reported for one upgrade through the proxy.
struct Seen {
    path: String,
    headers: HashMap<String, Vec<String>>,
}

impl Seen {
    /// Every value of a header the backend received (names are lower case).
    fn get(&self, name: &str) -> Vec<&str> {
        self.headers
            .get(name)
            .map(|vs| vs.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// Sends a raw upgrade for [`TARGET`] with `Host: HOST`, `Connection: CONNECTION` and `extra` header lines,
/// reads the 101 and then the backend's report frame by hand.
async fn seen_by_backend(connection: &str, extra: &str) -> Seen {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let request = format!(
        "GET {TARGET} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: {connection}\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    let mut conn = RawConn::open(proxy.addr).await;
    conn.send(request.as_bytes()).await;
    let head = conn.read_head().await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let (first, payload) = conn.read_frame().await;
    assert_eq!(first, 0x81, "a final text frame");
    let report: serde_json::Value = serde_json::from_slice(&payload).expect("JSON report");
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for pair in report["headers"].as_array().expect("headers") {
        let name = pair[0].as_str().expect("name").to_ascii_lowercase();
        let value = pair[1].as_str().expect("value").to_string();
        headers.entry(name).or_default().push(value);
    }
    Seen {
        path: report["path"].as_str().expect("path").to_string(),
        headers,
    }
}

#[tokio::test]
async fn backend_gets_forwarding_headers_host_and_target_exactly() {
    let seen = seen_by_backend("Upgrade", "").await;
    assert_eq!(seen.path, TARGET);
    assert_eq!(seen.get("host"), [HOST]);
    assert_eq!(seen.get("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.get("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(seen.get("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.get("x-forwarded-host"), [HOST]);
    assert_eq!(
        seen.get("forwarded"),
        [format!("for=127.0.0.1;proto=http;host=\"{HOST}\"").as_str()]
    );
    assert_eq!(seen.get("connection"), ["Upgrade"]);
    assert_eq!(seen.get("upgrade"), ["websocket"]);
}

#[tokio::test]
async fn client_forwarding_headers_are_replaced_not_appended() {
    let seen = seen_by_backend(
        "Upgrade",
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7, 8.8.8.8\r\nX-Real-IP: 6.6.6.6\r\n\
         Forwarded: for=6.6.6.6;proto=https\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n",
    )
    .await;
    assert_eq!(seen.get("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.get("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(seen.get("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.get("x-forwarded-host"), [HOST]);
    assert_eq!(
        seen.get("forwarded"),
        [format!("for=127.0.0.1;proto=http;host=\"{HOST}\"").as_str()]
    );
    let all: Vec<&String> = seen.headers.values().flatten().collect();
    assert!(
        !all.iter().any(|v| v.contains("6.6.6.6") || v.contains("evil.example")),
        "a client-sent forwarding value reached the backend: {all:?}"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed() {
    let seen = seen_by_backend(
        "Upgrade, X-Hop-Secret",
        "Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Checksum\r\nProxy-Connection: keep-alive\r\n\
         X-Hop-Secret: s3cret\r\nX-End-To-End: kept\r\n",
    )
    .await;
    for gone in ["keep-alive", "te", "trailer", "proxy-connection", "x-hop-secret"] {
        assert_eq!(seen.get(gone), Vec::<&str>::new(), "{gone} reached the backend");
    }
    assert_eq!(seen.get("connection"), ["Upgrade"]);
    assert_eq!(seen.get("x-end-to-end"), ["kept"]);
}

#[tokio::test]
async fn websocket_headers_pass_unchanged() {
    // Naming them in Connection must not strip them either.
    let seen = seen_by_backend(
        "Upgrade, Sec-WebSocket-Protocol, Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol: chat, superchat\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert_eq!(seen.get("sec-websocket-key"), [KEY]);
    assert_eq!(seen.get("sec-websocket-version"), ["13"]);
    assert_eq!(seen.get("sec-websocket-protocol"), ["chat, superchat"]);
    assert_eq!(
        seen.get("sec-websocket-extensions"),
        ["permessage-deflate; client_max_window_bits"]
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Subprotocols
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn backend_picks_the_last_offered_subprotocol_and_client_sees_it() {
    let mut backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut request = proxy.url("/chat").into_client_request().expect("request");
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("v1, v2"));
    let (mut ws, response) = within("the WebSocket handshake", tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake");
    assert_eq!(
        response.headers().get("sec-websocket-protocol"),
        Some(&HeaderValue::from_static("v2"))
    );
    match backend.next_event().await {
        Event::Upgraded { headers, .. } => {
            let offered: Vec<&str> = headers
                .iter()
                .filter(|(k, _)| k == "sec-websocket-protocol")
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(offered, ["v1, v2"]);
        }
        other => panic!("expected an upgrade, got {other:?}"),
    }
    ws.send(Message::text("on v2")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "on v2");
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Upstream failures
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn all_servers_refusing_gets_502() {
    let (dead1, dead2) = (unused_addr(), unused_addr());
    let proxy = Proxy::start(&[dead1, dead2]);
    let reply = exchange(proxy.addr, upgrade_request("/", "").as_bytes()).await;
    // A generic reason: the servers' addresses go to the log only.
    assert_eq!(refusal_reason(&reply, 502, "Bad Gateway"), "upstream connect failed");
    for dead in [dead1, dead2] {
        assert!(!reply.body_text().contains(&dead.port().to_string()), "{reply:?}");
    }
}

#[tokio::test]
async fn refusing_server_is_skipped_for_a_good_one() {
    let mut good = ws_backend("good").await;
    let proxy = Proxy::start(&[unused_addr(), good.addr]);
    // Round robin starts on the refusing server, then on the good one, and so on.
    for i in 0..4 {
        echo_once(&proxy, &format!("attempt {i}")).await;
        assert_eq!(next_upgrade_path(&mut good).await, "/echo");
    }
}

#[tokio::test]
async fn no_servers_gets_503() {
    let proxy = Proxy::start_with(&[], |c| c.upstreams[0].servers = vec![]);
    let reply = exchange(proxy.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(
        refusal_reason(&reply, 503, "Service Unavailable"),
        "no upstream available"
    );
}

#[tokio::test]
async fn silent_backend_gets_504_after_handshake_timeout() {
    let mut silent = raw_backend(hold).await;
    let proxy = Proxy::start_with(&[silent.addr], |c| c.server.handshake_timeout = Duration::from_secs(1));
    let started = Instant::now();
    let reply = exchange(proxy.addr, upgrade_request("/", "").as_bytes()).await;
    let waited = started.elapsed();
    assert_eq!(
        refusal_reason(&reply, 504, "Gateway Timeout"),
        "upstream answer timeout"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "answered after {waited:?}, expected about 1s"
    );
    // The request did reach it: the timeout is about the answer, not the connect.
    assert!(silent.next_request().await.starts_with("GET / HTTP/1.1\r\n"));
}

#[tokio::test]
async fn wrong_accept_key_from_backend_gets_502() {
    let liar = raw_backend(|mut s: TcpStream| async move {
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
            )
            .await;
        hold(s).await;
    })
    .await;
    let proxy = Proxy::start(&[liar.addr]);
    let reply = exchange(proxy.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(refusal_reason(&reply, 502, "Bad Gateway"), "bad answer from upstream");
}

#[tokio::test]
async fn backend_closing_before_answer_is_skipped_for_a_good_one() {
    let mut closer = raw_backend(|s: TcpStream| async move { drop(s) }).await;
    let mut good = ws_backend("good").await;
    let proxy = Proxy::start(&[closer.addr, good.addr]);
    for i in 0..4 {
        echo_once(&proxy, &format!("attempt {i}")).await;
        assert_eq!(next_upgrade_path(&mut good).await, "/echo");
    }
    // Round robin started on the closing server for two of the four connections.
    for _ in 0..2 {
        assert!(closer.next_request().await.starts_with("GET /echo HTTP/1.1\r\n"));
    }
    assert!(
        closer.requests.try_recv().is_err(),
        "the closing server got more than two"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 6. Non-101 answers from the backend
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn backend_403_reaches_client_with_its_body() {
    // The backend keeps its connection open after the body: the proxy must stop at Content-Length.
    let denier = raw_backend(|mut s: TcpStream| async move {
        let _ = s
            .write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Reason: policy\r\n\
                  Connection: keep-alive\r\nContent-Length: 17\r\n\r\nnot on my watch!\n",
            )
            .await;
        hold(s).await;
    })
    .await;
    let proxy = Proxy::start(&[denier.addr]);
    let reply = exchange(proxy.addr, upgrade_request("/", "").as_bytes()).await;
    assert_eq!(reply.status_line, "HTTP/1.1 403 Forbidden");
    assert_eq!(reply.header("content-length"), ["17"]);
    assert_eq!(reply.header("content-type"), ["text/plain"]);
    assert_eq!(reply.header("x-reason"), ["policy"]);
    assert_eq!(reply.header("connection"), ["close"]);
    assert_eq!(reply.body_text(), "not on my watch!\n");
}

#[tokio::test]
async fn backend_500_chunked_reaches_client_complete() {
    // The body comes in two parts; the second only once the client has the first, so the proxy must follow the
    // chunks across reads. The backend then keeps its connection open: the proxy must stop at the 0-chunk.
    let rest_may_go = Arc::new(Notify::new());
    let go = rest_may_go.clone();
    let failing = raw_backend(move |mut s: TcpStream| {
        let go = go.clone();
        async move {
            let _ = s
                .write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\
                      Content-Type: text/plain\r\n\r\n5\r\nhello\r\n",
                )
                .await;
            go.notified().await;
            let _ = s.write_all(b"7\r\n, world\r\n0\r\n\r\n").await;
            hold(s).await;
        }
    })
    .await;
    let proxy = Proxy::start(&[failing.addr]);
    let mut conn = RawConn::open(proxy.addr).await;
    conn.send(upgrade_request("/", "").as_bytes()).await;
    let head = conn.read_head().await;
    conn.read_through(b"5\r\nhello\r\n").await;
    rest_may_go.notify_one();
    let rest = conn.read_to_end().await;
    assert_eq!(String::from_utf8_lossy(&rest), "7\r\n, world\r\n0\r\n\r\n");
    let reply = Reply::parse(head.as_bytes());
    assert_eq!(reply.status_line, "HTTP/1.1 500 Internal Server Error");
    assert_eq!(reply.header("transfer-encoding"), ["chunked"]);
    assert_eq!(reply.header("content-type"), ["text/plain"]);
    assert_eq!(reply.header("connection"), ["close"]);
}

// ---------------------------------------------------------------------------------------------------------------
// 7. Round robin
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn round_robin_cycles_over_two_backends() {
    let (a, b) = (ws_backend("a").await, ws_backend("b").await);
    let proxy = Proxy::start(&[a.addr, b.addr]);
    assert_eq!(names_over(&proxy, 6).await, ["a", "b", "a", "b", "a", "b"]);
}

#[tokio::test]
async fn round_robin_cycles_over_three_backends() {
    let (a, b, c) = (ws_backend("a").await, ws_backend("b").await, ws_backend("c").await);
    let proxy = Proxy::start(&[a.addr, b.addr, c.addr]);
    assert_eq!(names_over(&proxy, 6).await, ["a", "b", "c", "a", "b", "c"]);
}

/// A backend whose accept queue is full drops new SYNs, so connecting to it hangs: the connect timeout gives 504.
#[tokio::test]
async fn backend_connect_timeout_gets_504() {
    let full = FullBackend::start().await;
    let addr = full.addr;
    let proxy = Proxy::start_with(&[addr], |c| c.upstreams[0].connect_timeout = Duration::from_millis(500));
    let started = Instant::now();
    let reply = exchange(proxy.addr, upgrade_request("/", "").as_bytes()).await;
    let waited = started.elapsed();
    assert_eq!(
        refusal_reason(&reply, 504, "Gateway Timeout"),
        "upstream connect timeout"
    );
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "answered after {waited:?}, expected about 500ms"
    );
}

/// `permessage_deflate = "strip"` leaves the client's extension offers out of the forwarded head; a backend that
/// accepts one anyway breaks the handshake (RFC 6455 §4.1) and gets the client a 502. With `"pass"` (the default)
/// the offer goes through.
#[tokio::test]
async fn stripped_extension_offer_is_not_forwarded_and_a_backend_accepting_one_anyway_gets_502() {
    let mut eager = raw_backend(|mut s: TcpStream| async move {
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
                  Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            )
            .await;
        hold(s).await;
    })
    .await;
    let proxy = Proxy::from_toml(&format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/strip\"\nupstream = \"u\"\npermessage_deflate = \"strip\"\n\
         [[route]]\npath = \"/pass\"\nupstream = \"u\"\n\
         [[upstream]]\nname = \"u\"\n[[upstream.server]]\naddress = \"{}\"\n",
        eager.addr
    ));
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

    let reply = exchange(proxy.addr, upgrade_request("/strip", offer).as_bytes()).await;
    let forwarded = eager.next_request().await;
    assert!(
        !forwarded.to_ascii_lowercase().contains("sec-websocket-extensions"),
        "{forwarded}"
    );
    assert_eq!(refusal_reason(&reply, 502, "Bad Gateway"), "bad answer from upstream");

    let mut conn = RawConn::open(proxy.addr).await;
    conn.send(upgrade_request("/pass", offer).as_bytes()).await;
    let forwarded = eager.next_request().await;
    assert!(forwarded.contains(offer), "{forwarded}");
    let head = conn.read_head().await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
}
