//! The access log as an operator reads it: one JSON line per WebSocket session, per plain HTTP request and per
//! connection refused before a request, for each way one ends (closed by either side with a code, a tunnel, an
//! idle timeout, a refusal, an authenticated session, a subprotocol and extensions chosen by the backend, a head
//! too slow, an address denied), with secret query values replaced; written to a file that a reload can change
//! and SIGUSR1 reopens after logrotate has renamed it, or to nothing at all.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use futures_util::{SinkExt, StreamExt};
use rustix::process::Signal;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use support::binary::Binary;
use support::peers::unique_temp_dir;
use support::raw::read_head;
use support::*;

/// The API key of `alice` on the `keyed` route.
const ALICE_KEY: &str = "alice-key-0123";

/// A proxy whose access log goes to a file of a fresh folder, with the routes every test here uses.
struct Logged {
    proxy: Proxy,
    log: PathBuf,
    ws: SocketAddr,
    web: SocketAddr,
    _backend: Option<Backend>,
    _web_task: tokio::task::JoinHandle<()>,
}

async fn logged(what: &str) -> Logged {
    let backend = ws_backend("ws").await;
    let mut logged = logged_with(what, "", backend.addr).await;
    logged._backend = Some(backend);
    logged
}

/// [`logged`] with extra `[server]` lines, in front of the WebSocket backend at `ws`.
async fn logged_with(what: &str, server: &str, ws: SocketAddr) -> Logged {
    let (web, web_task) = http_backend("web").await;
    let dir = unique_temp_dir(what);
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[key]]\nhash = \"{}\"\nidentity = \"alice\"\n",
            wsgate::auth::api_keys::hash_hex(ALICE_KEY.as_bytes())
        ),
    )
    .expect("write keys");
    let log = dir.join("access.log");
    let proxy = Proxy::from_toml(&config(&log, server, ws, web, &keys));
    Logged {
        proxy,
        log,
        ws,
        web,
        _backend: None,
        _web_task: web_task,
    }
}

fn config(log: &Path, server: &str, ws: SocketAddr, web: SocketAddr, keys: &Path) -> String {
    format!(
        "[server]\naccess_log = \"{}\"\naccess_log_redact = [\"Session\"]\n{server}\n\
         [[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"tunnel\"\npath_prefix = \"/tunnel\"\nupstream = \"ws\"\nrelay = \"tunnel\"\n\
         [[route]]\nname = \"idle\"\npath_prefix = \"/idle\"\nupstream = \"ws\"\nidle_timeout = \"300ms\"\n\
         [[route]]\nname = \"keyed\"\npath_prefix = \"/keyed\"\nupstream = \"ws\"\n\
         [route.auth.api_keys]\nfile = \"{}\"\n\
         [[route]]\nname = \"chat\"\npath_prefix = \"/chat\"\nupstream = \"ws\"\n\
         [[route]]\nname = \"web\"\npath_prefix = \"/page\"\nupstream = \"web\"\n\
         [[upstream]]\nname = \"ws\"\n[[upstream.server]]\naddress = \"{ws}\"\n\
         [[upstream]]\nname = \"web\"\n[[upstream.server]]\naddress = \"{web}\"\n",
        log.display(),
        keys.display()
    )
}

impl Logged {
    /// The first line with this route (waiting for it).
    async fn line_of_route(&self, route: &str) -> Value {
        self.lines(1, |v| v["route"] == route).await.remove(0)
    }

    async fn lines(&self, n: usize, matches: impl Fn(&Value) -> bool) -> Vec<Value> {
        access_lines(&self.log, n, matches).await
    }
}

/// What every line has, whatever it is about.
fn assert_common(line: &Value) {
    let time = line["time"].as_str().unwrap_or_else(|| panic!("no time: {line}"));
    assert_eq!(time.len(), "2024-01-01T00:00:00.000Z".len(), "{line}");
    assert!(
        time.ends_with('Z') && time.as_bytes()[10] == b'T' && time.as_bytes()[19] == b'.',
        "{line}"
    );
    assert!(line["id"].as_u64().is_some(), "{line}");
    assert!(
        line["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert!(line["duration_ms"].as_u64().is_some(), "{line}");
    assert!(
        line["bytes_in"].as_u64().is_some() && line["bytes_out"].as_u64().is_some(),
        "{line}"
    );
    assert!(line["end"].as_str().is_some(), "{line}");
    for (key, value) in line.as_object().expect("an object") {
        assert!(
            !value.is_null(),
            "absent values are left out, not null: {key} in {line}"
        );
    }
}

/// A session the client closes with a code, in frames mode: messages counted each way, the code and its side.
#[tokio::test]
async fn a_session_the_client_closes_with_a_code() {
    let logged = logged("access-client-close").await;
    let (mut ws, _) = connect_with(
        &logged.proxy.url("/chat/room?x=1"),
        &[("User-Agent", "access-test/1.0")],
    )
    .await;
    for text in ["one", "two"] {
        ws.send(Message::text(text)).await.expect("send");
        assert_eq!(next_text(&mut ws).await, text);
    }
    let close = CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye".into(),
    };
    ws.close(Some(close)).await.expect("close");
    while let Some(Ok(_)) = within("the close reply", ws.next()).await {}

    let line = logged.line_of_route("chat").await;
    assert_common(&line);
    assert_eq!(line["kind"], "websocket", "{line}");
    assert_eq!(line["listener"], "public", "{line}");
    assert_eq!(line["upstream"], "ws", "{line}");
    assert_eq!(line["server"], logged.ws.to_string(), "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/chat/room?x=1", "{line}");
    assert_eq!(line["host"], logged.proxy.addr.to_string(), "{line}");
    assert_eq!(line["user_agent"], "access-test/1.0", "{line}");
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["messages_in"], 2, "{line}");
    assert_eq!(line["messages_out"], 2, "{line}");
    assert_eq!(line["close_code"], 4000, "{line}");
    assert_eq!(line["close_side"], "client", "{line}");
    assert_eq!(line["end"], "client closed with 4000", "{line}");
    assert!(line.get("error").is_none() && line.get("identity").is_none(), "{line}");
    assert!(
        line["bytes_in"].as_u64() > Some(0) && line["bytes_out"].as_u64() > Some(0),
        "{line}"
    );
    let trace = line["trace_id"].as_str().unwrap_or_default();
    assert!(
        trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()),
        "{line}"
    );
}

#[tokio::test]
async fn a_session_the_backend_closes_with_a_code() {
    let logged = logged("access-backend-close").await;
    let mut ws = connect(&logged.proxy.url("/chat/b")).await;
    ws.send(Message::text("close:4001:done")).await.expect("send");
    match next_message(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4001),
        other => panic!("expected the backend's close, got {other:?}"),
    }
    while let Some(Ok(_)) = within("the end", ws.next()).await {}

    let line = logged.line_of_route("chat").await;
    assert_common(&line);
    assert_eq!(line["close_code"], 4001, "{line}");
    assert_eq!(line["close_side"], "backend", "{line}");
    assert_eq!(line["end"], "backend closed with 4001", "{line}");
    assert_eq!(line["messages_in"], 1, "{line}");
    assert_eq!(line["messages_out"], 0, "{line}");
}

/// Tunnel mode knows bytes, not messages nor close codes.
#[tokio::test]
async fn a_tunnel_session_counts_bytes_but_no_messages() {
    let logged = logged("access-tunnel").await;
    let mut ws = connect(&logged.proxy.url("/tunnel")).await;
    ws.send(Message::text("through the tunnel")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "through the tunnel");
    drop(ws);

    let line = logged.line_of_route("tunnel").await;
    assert_common(&line);
    assert_eq!(line["kind"], "websocket", "{line}");
    assert_eq!(line["status"], 101, "{line}");
    for absent in ["messages_in", "messages_out", "close_code", "error"] {
        assert!(line.get(absent).is_none(), "no {absent}: {line}");
    }
    // The masked frame the client sent, and the unmasked echo.
    let text = "through the tunnel".len() as u64;
    assert_eq!(line["bytes_in"].as_u64(), Some(text + 6), "{line}");
    assert_eq!(line["bytes_out"].as_u64(), Some(text + 2), "{line}");
    assert_eq!(line["close_side"], "client", "{line}");
    assert_eq!(line["end"], "client closed", "{line}");
}

#[tokio::test]
async fn an_idle_session_is_closed_by_the_proxy() {
    let logged = logged("access-idle").await;
    let mut ws = connect(&logged.proxy.url("/idle")).await;
    // The client waits: wsgate ends the session after 300 ms without a byte.
    while let Some(Ok(_)) = within("the idle timeout", ws.next()).await {}

    let line = logged.line_of_route("idle").await;
    assert_common(&line);
    assert_eq!(line["end"], "idle timeout", "{line}");
    assert_eq!(line["close_side"], "proxy", "{line}");
    assert!(line["duration_ms"].as_u64() >= Some(300), "{line}");
}

/// Refused upgrades: no route (404) and no credentials (401); no identity, and the reason in `error`.
#[tokio::test]
async fn refused_upgrades_say_their_status_and_why() {
    let logged = logged("access-refused").await;
    let answer = raw_exchange(logged.proxy.addr, upgrade_request("/nowhere?q=1", "").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    let line = logged.lines(1, |v| v["status"] == 404).await.remove(0);
    assert_common(&line);
    assert_eq!(line["kind"], "websocket", "{line}");
    assert_eq!(line["path"], "/nowhere?q=1", "{line}");
    assert_eq!(line["host"], "test.local", "{line}");
    assert_eq!(
        line["error"], "no route for host `test.local` and path `/nowhere`",
        "{line}"
    );
    assert_eq!(
        line["end"], "refused: no route for host `test.local` and path `/nowhere`",
        "{line}"
    );
    assert!(line.get("route").is_none() && line.get("server").is_none(), "{line}");

    let answer = raw_exchange(
        logged.proxy.addr,
        upgrade_request("/keyed", "X-API-Key: wrong\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    let line = logged.lines(1, |v| v["status"] == 401).await.remove(0);
    assert_common(&line);
    assert_eq!(line["kind"], "websocket", "{line}");
    assert!(line.get("identity").is_none(), "{line}");
    assert_eq!(
        line["error"], "unauthorized on route `keyed`: API key not known",
        "{line}"
    );
    assert!(
        !line.to_string().contains("wrong"),
        "the presented key is not logged: {line}"
    );
}

#[tokio::test]
async fn an_authenticated_session_names_its_identity() {
    let logged = logged("access-identity").await;
    let (mut ws, _) = connect_with(&logged.proxy.url("/keyed/x"), &[("X-API-Key", ALICE_KEY)]).await;
    assert_eq!(backend_name(&mut ws).await, "ws");
    ws.close(None).await.expect("close");
    while let Some(Ok(_)) = within("the close reply", ws.next()).await {}

    let line = logged.line_of_route("keyed").await;
    assert_common(&line);
    assert_eq!(line["identity"], "alice", "{line}");
    assert_eq!(line["status"], 101, "{line}");
    assert!(!line.to_string().contains(ALICE_KEY), "{line}");
}

/// The subprotocol and extensions of the backend's 101, as it wrote them.
#[tokio::test]
async fn the_subprotocol_and_extensions_the_backend_chose() {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = backend.local_addr().expect("addr");
    let _backend = tokio::spawn(async move {
        let Ok((mut stream, _)) = backend.accept().await else {
            return;
        };
        let (head, _) = read_head(&mut stream).await;
        let key = support::raw::header_value(&head, "sec-websocket-key").unwrap_or_default();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: v2.chat\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n\r\n"
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let logged = logged_with("access-subprotocol", "", backend_addr).await;
    let mut stream = TcpStream::connect(logged.proxy.addr).await.expect("connect");
    let offer = "Sec-WebSocket-Protocol: v1.chat, v2.chat\r\n\
                 Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n";
    stream
        .write_all(upgrade_request("/tunnel/p", offer).as_bytes())
        .await
        .expect("write");
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    drop(stream);

    let line = logged.line_of_route("tunnel").await;
    assert_common(&line);
    assert_eq!(line["subprotocol"], "v2.chat", "{line}");
    assert_eq!(
        line["extensions"], "permessage-deflate; client_no_context_takeover",
        "{line}"
    );
}

/// Bytes that came with the handshake heads (a frame the client wrote with its upgrade request, one the backend
/// wrote with its 101) are counted like every other byte, in both relay modes.
#[tokio::test]
async fn bytes_sent_with_the_heads_are_counted() {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = backend.local_addr().expect("addr");
    let _backend = tokio::spawn(async move {
        while let Ok((mut stream, _)) = backend.accept().await {
            tokio::spawn(async move {
                let (head, _) = read_head(&mut stream).await;
                let key = support::raw::header_value(&head, "sec-websocket-key").unwrap_or_default();
                let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                // The 101 and a text frame "early" in one write.
                let mut answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {accept}\r\n\r\n"
                )
                .into_bytes();
                answer.extend_from_slice(b"\x81\x05early");
                let _ = stream.write_all(&answer).await;
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    let logged = logged_with("access-early", "", backend_addr).await;
    for route in ["tunnel", "chat"] {
        let mut stream = TcpStream::connect(logged.proxy.addr).await.expect("connect");
        // The upgrade request and a masked text frame "hi" (mask 0) in one write.
        let mut request = upgrade_request(&format!("/{route}/e"), "").into_bytes();
        request.extend_from_slice(b"\x81\x82\0\0\0\0hi");
        stream.write_all(&request).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\x81\x05early") {
            let n = within("the 101 and the early frame", stream.read(&mut buf))
                .await
                .expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        drop(stream);
        let line = logged.line_of_route(route).await;
        assert_eq!(line["bytes_in"].as_u64(), Some(8), "{line}");
        assert_eq!(line["bytes_out"].as_u64(), Some(7), "{line}");
    }
}

/// Plain HTTP: one line per request of a keep-alive connection, with that request's own bytes.
#[tokio::test]
async fn plain_keep_alive_requests_get_a_line_each() {
    let logged = logged("access-plain").await;
    let mut stream = TcpStream::connect(logged.proxy.addr).await.expect("connect");
    let first = "GET /page/one HTTP/1.1\r\nHost: web.test\r\nUser-Agent: curl/8\r\n\r\n";
    stream.write_all(first.as_bytes()).await.expect("write");
    let (head, body) = read_answer(&mut stream).await;
    let first_answer = head.len() + body.len();
    let second = "POST /page/two?password=hunter2&n=2 HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n\
                  Connection: close\r\n\r\nhello";
    stream.write_all(second.as_bytes()).await.expect("write");
    let second_answer = read_to_close(&mut stream).await;
    assert!(second_answer.starts_with("HTTP/1.1 200 "), "{second_answer}");

    let lines = logged.lines(2, |v| v["route"] == "web").await;
    for line in &lines {
        assert_common(line);
        assert_eq!(line["kind"], "http", "{line}");
        assert_eq!(line["listener"], "public", "{line}");
        assert_eq!(line["upstream"], "web", "{line}");
        assert_eq!(line["server"], logged.web.to_string(), "{line}");
        assert_eq!(line["host"], "web.test", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["end"], "answered", "{line}");
        assert!(
            line.get("messages_in").is_none() && line.get("close_side").is_none(),
            "{line}"
        );
    }
    assert_eq!(lines[0]["id"], lines[1]["id"], "one connection");
    assert_eq!(lines[0]["method"], "GET");
    assert_eq!(lines[0]["path"], "/page/one");
    assert_eq!(lines[0]["user_agent"], "curl/8");
    assert_eq!(lines[0]["bytes_in"].as_u64(), Some(first.len() as u64), "{}", lines[0]);
    assert_eq!(
        lines[0]["bytes_out"].as_u64(),
        Some(first_answer as u64),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1]["method"], "POST");
    assert_eq!(lines[1]["path"], "/page/two?password=REDACTED&n=2");
    assert_eq!(lines[1]["bytes_in"].as_u64(), Some(second.len() as u64), "{}", lines[1]);
    assert_eq!(
        lines[1]["bytes_out"].as_u64(),
        Some(second_answer.len() as u64),
        "{}",
        lines[1]
    );
    assert!(!std::fs::read_to_string(&logged.log).expect("log").contains("hunter2"));
}

/// `?token=abc&x=1` is logged as `token=REDACTED&x=1`, on either request path, and the secret is nowhere in the line
/// (nor a name added with `access_log_redact`).
#[tokio::test]
async fn secret_query_values_are_redacted() {
    let logged = logged("access-redact").await;
    let mut ws = connect(&logged.proxy.url("/chat/r?token=abc1secret&x=1&SESSION=abc2secret")).await;
    assert_eq!(backend_name(&mut ws).await, "ws");
    drop(ws);
    let answer = raw_exchange(
        logged.proxy.addr,
        b"GET /page/p?Api_Key=abc3secret&x=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

    let ws_line = logged.line_of_route("chat").await;
    assert_eq!(
        ws_line["path"], "/chat/r?token=REDACTED&x=1&SESSION=REDACTED",
        "{ws_line}"
    );
    let http_line = logged.line_of_route("web").await;
    assert_eq!(http_line["path"], "/page/p?Api_Key=REDACTED&x=1", "{http_line}");
    let text = std::fs::read_to_string(&logged.log).expect("log");
    assert!(!text.contains("secret"), "{text}");
}

/// Connections that got no request through: a head too slow (408), and an address a listener denies (403); a
/// client that connects and leaves without a byte leaves no line.
#[tokio::test]
async fn connections_refused_before_a_request_get_a_connection_line() {
    let backend = ws_backend("ws").await;
    let logged = logged_with("access-connection", "handshake_timeout = \"300ms\"", backend.addr).await;
    drop(TcpStream::connect(logged.proxy.addr).await.expect("connect"));
    let mut slow = TcpStream::connect(logged.proxy.addr).await.expect("connect");
    let answer = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    let lines = logged.lines(1, |_| true).await;
    assert_eq!(lines.len(), 1, "the silent connection left no line: {lines:?}");
    let line = &lines[0];
    assert_common(line);
    assert_eq!(line["kind"], "connection", "{line}");
    assert_eq!(line["status"], 408, "{line}");
    assert_eq!(
        line["error"], "client sent no complete request head within 300ms",
        "{line}"
    );
    assert_eq!(line["listener"], "public", "{line}");
    assert!(line.get("method").is_none() && line.get("route").is_none(), "{line}");

    let dir = unique_temp_dir("access-denied");
    let log = dir.join("access.log");
    let denied = Proxy::from_toml(&format!(
        "[server]\naccess_log = \"{}\"\n[[listener]]\nname = \"closed\"\naddress = \"127.0.0.1:0\"\n\
         deny = [\"127.0.0.0/8\"]\n[[route]]\nupstream = \"u\"\n[[upstream]]\nname = \"u\"\n\
         [[upstream.server]]\naddress = \"{}\"\n",
        log.display(),
        logged.ws
    ));
    let answer = raw_exchange(denied.addr, upgrade_request("/", "").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    let line = access_lines(&log, 1, |_| true).await.remove(0);
    assert_common(&line);
    assert_eq!(line["kind"], "connection", "{line}");
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(line["listener"], "closed", "{line}");
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("client 127.0.0.1 denied by listener `closed`")),
        "{line}"
    );
}

/// A reload moves the log to another file, or turns it off (nothing is written then).
#[tokio::test]
async fn a_reload_moves_the_log_or_turns_it_off() {
    let mut logged = logged("access-reload").await;
    let keys = logged.log.with_file_name("keys.toml");
    let other = logged.log.with_file_name("other.log");
    let page = |n: u32| format!("GET /page/{n} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    raw_exchange(logged.proxy.addr, page(1).as_bytes()).await;
    logged.lines(1, |v| v["path"] == "/page/1").await;

    logged.proxy.reload(&config(&other, "", logged.ws, logged.web, &keys));
    raw_exchange(logged.proxy.addr, page(2).as_bytes()).await;
    access_lines(&other, 1, |v| v["path"] == "/page/2").await;

    let off = config(&other, "", logged.ws, logged.web, &keys)
        .replace(&format!("access_log = \"{}\"", other.display()), "access_log = \"off\"");
    logged.proxy.reload(&off);
    raw_exchange(logged.proxy.addr, page(3).as_bytes()).await;
    logged.proxy.reload(&config(&other, "", logged.ws, logged.web, &keys));
    raw_exchange(logged.proxy.addr, page(4).as_bytes()).await;
    let lines = access_lines(&other, 2, |_| true).await;
    let paths: Vec<&Value> = lines.iter().map(|v| &v["path"]).collect();
    assert_eq!(paths, ["/page/2", "/page/4"], "nothing while off");
    let first = std::fs::read_to_string(&logged.log).expect("log");
    assert_eq!(first.lines().count(), 1, "{first}");
}

/// logrotate's `create` pattern with the binary: rename the file, SIGUSR1, and new lines go to a new file.
#[tokio::test]
async fn the_file_is_reopened_on_sigusr1_after_a_rename() {
    let backend = ws_backend("ws").await;
    let dir = unique_temp_dir("access-rotate");
    let addr = unused_addr();
    let path = dir.join("wsgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\naccess_log = \"access.log\"\n[[listener]]\nname = \"public\"\naddress = \"{addr}\"\n\
             [[route]]\nupstream = \"ws\"\n[[upstream]]\nname = \"ws\"\n[[upstream.server]]\naddress = \"{}\"\n",
            backend.addr
        ),
    )
    .expect("write config");
    let mut wsgate = Binary::spawn(["run", "--config", path.to_str().expect("path")]);
    wsgate.wait_for_log(&["listening"]).await;
    // Relative to the config file.
    let log = dir.join("access.log");
    let session = |path: &'static str| {
        let url = format!("ws://{addr}{path}");
        async move {
            let mut ws = connect(&url).await;
            assert_eq!(backend_name(&mut ws).await, "ws");
        }
    };
    session("/before").await;
    access_lines(&log, 1, |v| v["path"] == "/before").await;
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rename");
    session("/renamed").await;
    access_lines(&rotated, 1, |v| v["path"] == "/renamed").await;
    wsgate.signal(Signal::USR1);
    wsgate.wait_for_log(&["access log reopened"]).await;
    session("/after").await;
    let lines = access_lines(&log, 1, |_| true).await;
    assert_eq!(lines[0]["path"], "/after", "{lines:?}");
    let old = access_lines(&rotated, 2, |_| true).await;
    assert_eq!(old.len(), 2, "{old:?}");
    wsgate.signal(Signal::TERM);
    assert_eq!(wsgate.exit_code().await, Some(0));
}

/// An answer with a `Content-Length` body, read whole from a kept-alive connection: its head and its body.
async fn read_answer(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let (head, mut body) = read_head(stream).await;
    let length: usize = support::raw::header_value(&head, "content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("a length: {head}"));
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = within("the body", stream.read(&mut chunk)).await.expect("read");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, body)
}

/// The built binary with a config file of its own (in a fresh directory named after `what`): `server` lines, one
/// public listener, `routes`, and the upstreams `ws` (at `ws`) and `web` (at `web`). The directory, the listener's
/// address, and the running binary.
fn binary_with(
    what: &str,
    server: &str,
    routes: &str,
    ws: SocketAddr,
    web: SocketAddr,
) -> (PathBuf, SocketAddr, Binary) {
    let dir = unique_temp_dir(what);
    let addr = unused_addr();
    let path = dir.join("wsgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\n{server}\n[[listener]]\nname = \"public\"\naddress = \"{addr}\"\n{routes}\n\
             [[upstream]]\nname = \"ws\"\n[[upstream.server]]\naddress = \"{ws}\"\n\
             [[upstream]]\nname = \"web\"\n[[upstream.server]]\naddress = \"{web}\"\n"
        ),
    )
    .expect("write config");
    let wsgate = Binary::spawn(["run", "--config", path.to_str().expect("path")]);
    (dir, addr, wsgate)
}

/// `access_log = "off"`: not a line, on stdout or anywhere, for sessions and requests alike.
#[tokio::test]
async fn access_log_off_writes_nothing() {
    let backend = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let (dir, addr, mut wsgate) = binary_with(
        "access-off",
        "access_log = \"off\"\nlog_format = \"json\"",
        "[[route]]\npath_prefix = \"/page\"\nupstream = \"web\"\n[[route]]\nupstream = \"ws\"",
        backend.addr,
        web,
    );
    wsgate.wait_for_log(&["listening"]).await;
    let mut ws = connect(&format!("ws://{addr}/ws")).await;
    assert_eq!(backend_name(&mut ws).await, "ws");
    drop(ws);
    let answer = raw_exchange(addr, b"GET /page HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let answer = raw_exchange(addr, upgrade_request("/", "Sec-WebSocket-Version: 8\r\n").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    wsgate.signal(Signal::TERM);
    assert_eq!(wsgate.exit_code().await, Some(0));
    let output = wsgate.rest_of_log().await;
    assert!(output.iter().any(|l| l.contains("shutdown complete")), "{output:?}");
    let access: Vec<&String> = output.iter().filter(|l| l.contains("\"kind\"")).collect();
    assert!(access.is_empty(), "{access:?}");
    let files: Vec<_> = std::fs::read_dir(&dir).expect("dir").collect();
    assert_eq!(files.len(), 1, "only the config file: {files:?}");
}

/// A forced close at shutdown (the drain timeout) still writes the line of a tunnel session that began as an upgrade
/// on a keep-alive connection (served by the plain HTTP path), saying so, and no line of the connection's own.
#[tokio::test]
async fn a_keep_alive_upgrade_cut_by_the_drain_timeout_keeps_its_line() {
    let backend = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let (dir, addr, mut wsgate) = binary_with(
        "access-forced",
        "access_log = \"access.log\"\ndrain_timeout = \"300ms\"",
        "[[route]]\nname = \"tunnel\"\npath_prefix = \"/tunnel\"\nupstream = \"ws\"\nrelay = \"tunnel\"\n\
         [[route]]\nname = \"web\"\nupstream = \"web\"",
        backend.addr,
        web,
    );
    wsgate.wait_for_log(&["listening"]).await;
    let log = dir.join("access.log");

    // A plain request, then an upgrade on the same connection: the plain path relays it.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /page HTTP/1.1\r\nHost: web.test\r\n\r\n")
        .await
        .expect("write");
    read_answer(&mut stream).await;
    stream
        .write_all(upgrade_request("/tunnel/x", "").as_bytes())
        .await
        .expect("write upgrade");
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    access_lines(&log, 1, |v| v["route"] == "web").await;

    // A tunnel is not closed when the drain starts: the drain timeout cuts it.
    wsgate.signal(Signal::TERM);
    assert_eq!(wsgate.exit_code().await, Some(0));
    let lines = access_lines(&log, 2, |_| true).await;
    let session = lines
        .iter()
        .find(|v| v["route"] == "tunnel")
        .unwrap_or_else(|| panic!("no line for the tunnel session: {lines:?}"));
    assert_common(session);
    assert_eq!(session["kind"], "websocket", "{session}");
    assert_eq!(session["status"], 101, "{session}");
    assert_eq!(session["close_side"], "proxy", "{session}");
    assert!(
        session["end"].as_str().is_some_and(|e| e.contains("drain timeout")),
        "{session}"
    );
    let all = std::fs::read_to_string(&log).expect("log");
    assert_eq!(
        all.lines().count(),
        2,
        "one line per request, none of the connection's own: {all}"
    );
}
