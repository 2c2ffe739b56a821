//! wsgate's own answers look the same whichever path refused the request: an upgrade (the fast path) and a plain
//! request (through hyper) to a refusing, a timing-out and a garbage-answering backend get the same status, the same
//! headers and the same one-line body, and no answer names a backend address or port. The access log line names the
//! route, the upstream and the server, for upgrades and plain requests alike, and says how many servers were tried.

mod support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use support::binary::Binary;
use support::*;

/// An answer read off the wire: status line, header lines as sent, body.
#[derive(Debug)]
struct Wire {
    status_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Wire {
    fn parse(text: &str) -> Wire {
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no head end in {text:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let headers = lines
            .map(|l| {
                let (name, value) = l.split_once(':').unwrap_or_else(|| panic!("bad header line {l:?}"));
                (name.to_string(), value.trim().to_string())
            })
            .collect();
        Wire {
            status_line,
            headers,
            body: body.to_string(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The header lines that make an answer's shape: every name as written, and every value but the date's.
    /// `Connection` is left out: whether to close differs by path (the fast path serves one request per connection).
    fn shape(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case("connection"))
            .map(|(n, v)| {
                let v = if n.eq_ignore_ascii_case("date") { "<date>" } else { v };
                (n.clone(), v.to_string())
            })
            .collect()
    }
}

/// A backend that answers every request head with bytes that are not HTTP, then closes.
async fn garbage_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(b"this is not HTTP at all\r\n\r\n").await;
            });
        }
    });
    (addr, task)
}

/// The answers to an upgrade and to a plain request through a proxy in front of `server` alone.
async fn both_answers(server: SocketAddr) -> (Wire, Wire) {
    let proxy = Proxy::start_with(&[server], |c| {
        c.upstreams[0].connect_timeout = Duration::from_millis(500);
        c.upstreams[0].retries = 0;
    });
    let upgrade = raw_exchange(proxy.addr, upgrade_request("/chat", "").as_bytes()).await;
    let plain = raw_exchange(
        proxy.addr,
        b"GET /page HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    (Wire::parse(&upgrade), Wire::parse(&plain))
}

/// Both answers have the same shape, the expected status and reason, and name nothing of `server`.
fn assert_same_shape(upgrade: &Wire, plain: &Wire, status_line: &str, reason: &str, server: SocketAddr) {
    for (path, answer) in [("upgrade", upgrade), ("plain", plain)] {
        assert_eq!(answer.status_line, status_line, "{path}: {answer:?}");
        assert_eq!(
            answer.header("Content-Type"),
            Some("text/plain; charset=utf-8"),
            "{path}: {answer:?}"
        );
        assert_eq!(answer.body, format!("{reason}\n"), "{path}: {answer:?}");
        assert_eq!(
            answer.header("Content-Length"),
            Some(answer.body.len().to_string().as_str()),
            "{path}: {answer:?}"
        );
        assert!(answer.header("Date").is_some(), "{path}: {answer:?}");
        let all = format!("{answer:?}");
        for secret in [server.to_string(), server.port().to_string(), server.ip().to_string()] {
            assert!(!all.contains(&secret), "{path}: the answer names {secret}: {answer:?}");
        }
    }
    assert_eq!(upgrade.shape(), plain.shape(), "upgrade and plain answers differ");
    assert_eq!(upgrade.header("Connection"), Some("close"));
}

#[tokio::test]
async fn refusing_backend_gets_the_same_502_on_both_paths_without_its_address() {
    let dead = unused_addr();
    let (upgrade, plain) = both_answers(dead).await;
    assert_same_shape(
        &upgrade,
        &plain,
        "HTTP/1.1 502 Bad Gateway",
        "upstream connect failed",
        dead,
    );
}

#[tokio::test]
async fn timing_out_backend_gets_the_same_504_on_both_paths_without_its_address() {
    let full = FullBackend::start().await;
    let (upgrade, plain) = both_answers(full.addr).await;
    assert_same_shape(
        &upgrade,
        &plain,
        "HTTP/1.1 504 Gateway Timeout",
        "upstream connect timeout",
        full.addr,
    );
}

#[tokio::test]
async fn garbage_answering_backend_gets_the_same_502_on_both_paths_without_its_address() {
    let (garbage, _task) = garbage_backend().await;
    let (upgrade, plain) = both_answers(garbage).await;
    assert_same_shape(
        &upgrade,
        &plain,
        "HTTP/1.1 502 Bad Gateway",
        "bad answer from upstream",
        garbage,
    );
}

#[tokio::test]
async fn no_route_gets_the_same_404_on_both_paths() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::from_toml(&format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n\
         [[route]]\npath = \"/only\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{}\"\n",
        backend.addr
    ));
    let upgrade = Wire::parse(&raw_exchange(proxy.addr, upgrade_request("/elsewhere", "").as_bytes()).await);
    let plain = Wire::parse(
        &raw_exchange(
            proxy.addr,
            b"GET /elsewhere HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n",
        )
        .await,
    );
    let reason = "no route for host `test.local` and path `/elsewhere`";
    assert_same_shape(&upgrade, &plain, "HTTP/1.1 404 Not Found", reason, backend.addr);
}

/// The access log lines (JSON) of a built wsgate whose config names its route and upstreams.
#[tokio::test]
async fn access_log_names_route_upstream_and_server_for_upgrades_and_plain_requests() {
    let ws = ws_backend("ws").await;
    let (web, _web_task) = http_backend("web").await;
    let dead = unused_addr();
    let addr = unused_addr();
    let mut file = tempfile();
    write!(
        file.1,
        "[server]\nlog_format = \"json\"\n\
         [[listener]]\nname = \"public\"\naddress = \"{addr}\"\n\
         [[route]]\nname = \"chat\"\npath_prefix = \"/chat\"\nupstream = \"app\"\n\
         [[route]]\npath_prefix = \"/dead\"\nupstream = \"gone\"\n\
         [[route]]\nupstream = \"web\"\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{}\"\n\
         [[upstream]]\nname = \"web\"\n[[upstream.server]]\naddress = \"{}\"\n\
         [[upstream]]\nname = \"gone\"\nretries = 0\n[[upstream.server]]\naddress = \"{dead}\"\n",
        ws.addr, web
    )
    .expect("write config");
    let mut wsgate = Binary::spawn(["run", "--config", file.0.to_str().expect("path")]);
    wsgate.wait_for_log(&["listening"]).await;

    let mut client = connect(&format!("ws://{addr}/chat/room")).await;
    assert_eq!(backend_name(&mut client).await, "ws");
    drop(client);
    let line = wsgate.wait_for_log(&["\"status\":101"]).await;
    let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(record["route"], "chat", "{line}");
    assert_eq!(record["upstream"], "app", "{line}");
    assert_eq!(record["server"], ws.addr.to_string(), "{line}");

    let page = raw_exchange(addr, b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let line = wsgate.wait_for_log(&["\"kind\":\"http\""]).await;
    let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(record["route"], "route #3", "{line}");
    assert_eq!(record["upstream"], "web", "{line}");
    assert_eq!(record["server"], web.to_string(), "{line}");

    // A refusal: the client is told nothing of the server, the log line names it; one try is one try.
    let refused = raw_exchange(addr, upgrade_request("/dead", "").as_bytes()).await;
    assert!(refused.starts_with("HTTP/1.1 502"), "{refused}");
    assert!(!refused.contains(&dead.port().to_string()), "{refused}");
    let line = wsgate.wait_for_log(&["\"status\":502"]).await;
    let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(record["route"], "route #2", "{line}");
    assert_eq!(record["upstream"], "gone", "{line}");
    assert_eq!(record["server"], dead.to_string(), "{line}");
    let end = record["end"].as_str().unwrap_or_default();
    assert_eq!(end, format!("refused: connection to {dead} refused"), "{line}");
    let _ = std::fs::remove_file(&file.0);
}

#[tokio::test]
async fn a_refusal_after_several_servers_says_how_many_were_tried() {
    let (a, b) = (unused_addr(), unused_addr());
    let addr = unused_addr();
    let listen = addr.to_string();
    let (a, b) = (a.to_string(), b.to_string());
    let args = [
        "proxy",
        "--listen",
        &listen,
        "--to",
        &a,
        "--to",
        &b,
        "--log-format",
        "json",
    ];
    let mut wsgate = Binary::spawn(args);
    wsgate.wait_for_log(&["listening"]).await;
    let refused = raw_exchange(addr, upgrade_request("/", "").as_bytes()).await;
    assert!(refused.ends_with("\r\n\r\nupstream connect failed\n"), "{refused}");
    let line = wsgate.wait_for_log(&["\"status\":502"]).await;
    let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(record["route"], "quick", "{line}");
    assert_eq!(record["upstream"], "quick", "{line}");
    let end = record["end"].as_str().unwrap_or_default();
    assert!(end.ends_with("refused (2 servers tried)"), "{line}");
}

/// A fresh config file in the temp folder, removed with the test's process.
fn tempfile() -> (std::path::PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!(
        "wsgate-answers-{}-{}.toml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let file = std::fs::File::create(&path).expect("create config");
    (path, file)
}

/// Plain HTTP through hyper keeps the case of header names both ways, as the upgrade path passes heads on: the
/// backend sees the client's names as sent (the forwarding headers wsgate adds in title case), and the client the
/// backend's.
#[tokio::test]
async fn plain_requests_and_answers_keep_their_header_case() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let _task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (head, _) = support::raw::read_head(&mut stream).await;
            let _ = seen_tx.send(head);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nX-Custom-CASE: yes\r\nCONTENT-length: 2\r\n\r\nok")
                .await;
        }
    });
    let proxy = Proxy::start(&[backend]);
    let answer = raw_exchange(
        proxy.addr,
        b"GET /case HTTP/1.1\r\nHost: test.local\r\nx-MiXeD-Name: 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    let request = within("the forwarded request", seen.recv()).await.expect("a request");
    assert!(request.contains("\r\nx-MiXeD-Name: 1\r\n"), "{request}");
    assert!(request.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"), "{request}");
    assert!(answer.contains("\r\nX-Custom-CASE: yes\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
}

/// With the text log format, the access log is JSON all the same (on stdout), with the same fields.
#[tokio::test]
async fn access_log_is_json_on_stdout_with_text_logs_too() {
    let ws = ws_backend("ws").await;
    let addr = unused_addr();
    let (listen, to) = (addr.to_string(), ws.addr.to_string());
    let mut wsgate = Binary::spawn(["proxy", "--listen", &listen, "--to", &to]);
    wsgate.wait_for_log(&["listening"]).await;
    let mut client = connect(&format!("ws://{addr}/")).await;
    assert_eq!(backend_name(&mut client).await, "ws");
    drop(client);
    let record = wsgate.wait_for_access(|v| v["status"] == 101).await;
    assert_eq!(record["route"], "quick", "{record}");
    assert_eq!(record["upstream"], "quick", "{record}");
    assert_eq!(record["server"], ws.addr.to_string(), "{record}");
    assert_eq!(record["listener"], "quick", "{record}");
}
