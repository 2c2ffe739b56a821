//! The live stats page on the admin listener: `GET /stats` is one self-contained page, `GET /stats/ws` sends
//! snapshots that follow the proxy's sessions, the token guards both with `protect_reads` (bearer or `?token=`),
//! the stats socket is no session, and the page itself, in headless Chromium, shows sessions open and close.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use support::*;

const TOKEN: &str = "stats/se+cret";
/// `TOKEN` as `?token=` carries it (what the page's `encodeURIComponent` makes of it).
const TOKEN_IN_QUERY: &str = "stats%2Fse%2Bcret";

fn config(backend: SocketAddr, admin: &str) -> String {
    format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n{admin}\n\n[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\n\
         [[route]]\nname = \"echo\"\npath_prefix = \"/ws\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{backend}\"\n"
    )
}

/// `[admin]` lines for a token (written to a fresh file), with or without `protect_reads`.
fn token_lines(protect_reads: bool) -> String {
    let dir = support::peers::unique_temp_dir("stats-token");
    let file = dir.join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("token file");
    format!("token_file = \"{}\"\nprotect_reads = {protect_reads}", file.display())
}

/// A GET to the admin listener with extra header lines; the whole answer.
async fn get(proxy: &Proxy, path: &str, extra: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{extra}Connection: close\r\n\r\n");
    raw_exchange(proxy.admin_addr(), request.as_bytes()).await
}

fn status(answer: &str) -> u16 {
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

type StatsClient = support::Client;

/// Opens the stats socket (`query` after `/stats/ws`, extra request headers); the client, or the HTTP status it
/// was refused with.
async fn open_stats(proxy: &Proxy, query: &str, headers: &[(&str, &str)]) -> Result<StatsClient, u16> {
    let url = format!("ws://{}/stats/ws{query}", proxy.admin_addr());
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
        request.headers_mut().insert(name, value.parse().expect("header value"));
    }
    match within(
        "the stats socket's handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("stats socket: {e}"),
    }
}

/// The next snapshot the stats socket sends.
async fn next_snapshot(ws: &mut StatsClient) -> serde_json::Value {
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("a snapshot is JSON ({e}): {text}"))
}

/// Reads snapshots until one satisfies `done`, within the test wait; that one.
async fn snapshot_where(
    ws: &mut StatsClient,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    within(what, async {
        loop {
            let snapshot = next_snapshot(ws).await;
            if done(&snapshot) {
                return snapshot;
            }
        }
    })
    .await
}

/// The sum of every `wsgate_sessions_active` series of a scrape.
fn sessions_active(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("wsgate_sessions_active{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_stats_page_is_one_self_contained_html_page() {
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(backend.addr, ""));
    let answer = get(&proxy, "/stats", "").await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(header(&answer, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(header(&answer, "cache-control"), Some("no-store"));
    let csp = header(&answer, "content-security-policy").expect("a Content-Security-Policy");
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(body.contains("<span id=\"sessions-active\">"), "{body}");
    for external in [
        "http://",
        "https://",
        "<script src",
        "<link href=\"http",
        "@import",
        "url(",
    ] {
        assert!(!body.contains(external), "the page refers to `{external}`");
    }

    let answer = raw_exchange(
        proxy.admin_addr(),
        b"POST /stats HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 405, "{answer}");
    assert!(answer.contains("{\"error\":"), "{answer}");
    let answer = get(&proxy, "/stats/ws", "").await;
    assert_eq!(status(&answer), 400, "a GET that is no upgrade: {answer}");
    assert!(answer.contains("{\"error\":"), "{answer}");
}

#[tokio::test]
async fn the_stats_socket_follows_sessions_and_is_no_session_itself() {
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(backend.addr, ""));
    let mut stats = open_stats(&proxy, "", &[]).await.expect("the stats socket");
    let first = next_snapshot(&mut stats).await;
    assert_eq!(first["active"], 0, "{first}");
    assert!(first["time"].as_u64().is_some_and(|t| t > 0), "{first}");
    let server = &first["servers"][0];
    assert_eq!(server["upstream"], "app", "{first}");
    assert_eq!(server["server"], backend.addr.to_string(), "{first}");
    assert_eq!(
        (&server["up"], &server["ejected"], &server["draining"]),
        (&true.into(), &false.into(), &false.into()),
        "{first}"
    );

    let mut one = connect(&proxy.url("/ws")).await;
    let two = connect(&proxy.url("/ws")).await;
    one.send(Message::text("hello")).await.expect("send");
    assert_eq!(next_text(&mut one).await, "hello");
    let open = snapshot_where(&mut stats, "2 active sessions with a message each way", |s| {
        s["active"] == 2 && s["places"][0]["messages_in"] == 1 && s["places"][0]["messages_out"] == 1
    })
    .await;
    let place = &open["places"][0];
    assert_eq!(
        (&place["listener"], &place["route"], &place["upstream"]),
        (&"public".into(), &"echo".into(), &"app".into()),
        "{open}"
    );
    assert_eq!(place["server"], backend.addr.to_string(), "{open}");
    assert_eq!(place["sessions"], 2, "{open}");
    assert!(place["bytes_in"].as_u64().is_some_and(|b| b > 0), "{open}");
    // The stats socket is the admin listener's own: the proxy counts two sessions, not three.
    let metrics = get(&proxy, "/metrics", "").await;
    assert_eq!(sessions_active(&metrics), 2.0, "{metrics}");

    drop(one);
    drop(two);
    snapshot_where(&mut stats, "no active session", |s| s["active"] == 0).await;
    let metrics = get(&proxy, "/metrics", "").await;
    assert_eq!(sessions_active(&metrics), 0.0, "{metrics}");

    // Pings are answered; text is ignored; anything else ends the socket with 1003.
    stats.send(Message::Ping("are you there".into())).await.expect("ping");
    stats.send(Message::text("ignored")).await.expect("text");
    within("the pong", async {
        loop {
            match stats.next().await {
                Some(Ok(Message::Pong(data))) => break assert_eq!(&data[..], b"are you there"),
                Some(Ok(Message::Text(_))) => continue,
                other => panic!("expected a pong: {other:?}"),
            }
        }
    })
    .await;
    stats.send(Message::binary(vec![1, 2, 3])).await.expect("binary");
    let close = within("the close", async {
        loop {
            match stats.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1003));
}

#[tokio::test]
async fn with_protect_reads_the_page_and_its_socket_need_the_token_as_bearer_or_query() {
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(backend.addr, &token_lines(true)));
    let bearer = format!("Bearer {TOKEN}");

    let answer = get(&proxy, "/stats", "").await;
    assert_eq!(status(&answer), 401, "{answer}");
    assert!(!answer.contains("sessions-active"), "{answer}");
    assert_eq!(status(&get(&proxy, "/stats?token=wrong", "").await), 401);
    assert_eq!(
        status(&get(&proxy, &format!("/stats?token={TOKEN_IN_QUERY}"), "").await),
        200
    );
    let answer = get(&proxy, "/stats", &format!("Authorization: {bearer}\r\n")).await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(!answer.contains(TOKEN), "the page never echoes the token");
    // `?token=` is for the stats page only: the other endpoints want the header.
    assert_eq!(
        status(&get(&proxy, &format!("/metrics?token={TOKEN_IN_QUERY}"), "").await),
        401
    );

    assert_eq!(open_stats(&proxy, "", &[]).await.err(), Some(401));
    assert_eq!(open_stats(&proxy, "?token=wrong", &[]).await.err(), Some(401));
    let mut by_query = open_stats(&proxy, &format!("?token={TOKEN_IN_QUERY}"), &[])
        .await
        .expect("the token as ?token=");
    assert_eq!(next_snapshot(&mut by_query).await["active"], 0);
    let mut by_header = open_stats(&proxy, "", &[("authorization", &bearer)])
        .await
        .expect("the token as a bearer token");
    assert_eq!(next_snapshot(&mut by_header).await["active"], 0);
}

#[tokio::test]
async fn without_protect_reads_the_stats_page_needs_no_token() {
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(backend.addr, &token_lines(false)));
    assert_eq!(status(&get(&proxy, "/stats", "").await), 200);
    let mut stats = open_stats(&proxy, "", &[]).await.expect("no token needed");
    assert_eq!(next_snapshot(&mut stats).await["active"], 0);
}

#[tokio::test]
async fn stats_sockets_are_bounded_refuse_other_origins_and_close_when_the_admin_listener_stops() {
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(backend.addr, ""));
    let admin = proxy.admin_addr().to_string();

    assert_eq!(
        open_stats(&proxy, "", &[("origin", "https://elsewhere.example")])
            .await
            .err(),
        Some(403),
        "a page of another origin may not read the stats"
    );
    let origin = format!("http://{admin}");
    let mut open = vec![
        open_stats(&proxy, "", &[("origin", &origin)])
            .await
            .expect("a page of the admin listener's own"),
    ];
    for _ in 1..16 {
        open.push(open_stats(&proxy, "", &[]).await.expect("up to 16 stats sockets"));
    }
    assert_eq!(open_stats(&proxy, "", &[]).await.err(), Some(503), "the 17th");
    // One closes: its place is free again (once the admin listener has seen it go).
    let mut closing = open.pop().expect("one");
    closing.close(None).await.expect("close");
    within("a free place", async {
        loop {
            match open_stats(&proxy, "", &[]).await {
                Ok(ws) => break open.push(ws),
                Err(503) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(status) => panic!("refused with {status}"),
            }
        }
    })
    .await;

    tokio::task::spawn_blocking(move || proxy.shutdown_and_join())
        .await
        .expect("the proxy stops");
    for ws in &mut open {
        let close = within("the close on stop", async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => break frame,
                    Some(Ok(_)) => continue,
                    other => panic!("expected a close: {other:?}"),
                }
            }
        })
        .await;
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    }
}

/// Headless Chromium (Debian's `chromium`) with a fresh profile, killed when dropped.
struct Chromium {
    child: std::process::Child,
    /// The DevTools HTTP endpoint.
    devtools: SocketAddr,
    profile: std::path::PathBuf,
}

const CHROMIUM: &str = "/usr/bin/chromium";

impl Chromium {
    /// Starts Chromium on `url`; fails the test (does not skip it) when Chromium is not installed.
    fn start(url: &str) -> Chromium {
        use std::io::BufRead;
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: run scripts/test, which installs Debian's chromium for this test"
        );
        let profile = support::peers::unique_temp_dir("stats-chromium");
        let mut child = std::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
        let stderr = child.stderr.take().expect("stderr");
        // The DevTools port is on stderr; a thread reads it (and keeps draining stderr, so Chromium never blocks).
        let (found, port) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                    let address = rest.split('/').next().and_then(|a| a.parse::<SocketAddr>().ok());
                    if let (Some(found), Some(address)) = (found.take(), address) {
                        let _ = found.send(address);
                    }
                }
            }
        });
        // In the guard from here on: a failed wait still kills it.
        let mut chromium = Chromium {
            child,
            devtools: SocketAddr::from(([127, 0, 0, 1], 0)),
            profile,
        };
        chromium.devtools = port
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("Chromium did not say where DevTools listens within {WAIT:?}"));
        chromium
    }

    /// `GET /json/list`: the DevTools targets. (Chromium keeps the connection open whatever the request says: the
    /// answer is read up to its `Content-Length`.)
    async fn targets(&self) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = within("connect to DevTools", tokio::net::TcpStream::connect(self.devtools))
            .await
            .expect("connect to DevTools");
        // Chromium makes the targets' WebSocket URLs from the Host header.
        let request = format!("GET /json/list HTTP/1.1\r\nHost: {}\r\n\r\n", self.devtools);
        stream.write_all(request.as_bytes()).await.expect("ask DevTools");
        let mut answer = Vec::new();
        within("the DevTools targets", async {
            let mut buf = [0u8; 8192];
            loop {
                let text = String::from_utf8_lossy(&answer).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = header(head, "content-length").and_then(|l| l.parse::<usize>().ok());
                    if length.is_some_and(|l| body.len() >= l) {
                        return serde_json::from_str(body).unwrap_or_default();
                    }
                }
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        return serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap_or_default();
                    }
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
    }

    /// The DevTools WebSocket of the page whose URL starts with `url`.
    async fn page(&self, url: &str) -> DevTools {
        let target = within("the page's DevTools target", async {
            loop {
                let targets = self.targets().await;
                let page = targets
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url)));
                if let Some(socket) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
                    break socket.to_string();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let (ws, _) = within("DevTools", tokio_tungstenite::connect_async(target))
            .await
            .expect("the page's DevTools socket");
        DevTools { ws, next_id: 0 }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A page's DevTools protocol session.
struct DevTools {
    ws: support::Client,
    next_id: u64,
}

impl DevTools {
    /// Sends a command; its result.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = serde_json::json!({ "id": id, "method": method, "params": params });
        within("a DevTools command", self.ws.send(Message::text(command.to_string())))
            .await
            .expect("send to DevTools");
        loop {
            let text = next_text(&mut self.ws).await;
            let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    async fn evaluate(&mut self, expression: &str) -> serde_json::Value {
        let result = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it gives `expected`, within the test wait.
    async fn wait_for(&mut self, expression: &str, expected: &str) {
        let started = tokio::time::Instant::now();
        loop {
            let value = self.evaluate(expression).await;
            if value == expected {
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "`{expression}` never became {expected:?}: it is {value}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn the_stats_page_in_headless_chromium_shows_sessions_open_and_close() {
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(backend.addr, ""));
    let url = format!("http://{}/stats", proxy.admin_addr());
    let chromium = Chromium::start(&url);
    let mut page = chromium.page(&url).await;
    const ACTIVE: &str = "document.getElementById('sessions-active').textContent";
    page.wait_for(ACTIVE, "0").await;

    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(connect(&proxy.url("/ws")).await);
    }
    page.wait_for(ACTIVE, "3").await;
    let live = page.evaluate("document.getElementById('status').className").await;
    assert_eq!(live, "status live");
    let rows = page
        .evaluate("document.querySelectorAll('#places tr td:nth-child(2)')[0].textContent")
        .await;
    assert_eq!(rows, "echo", "the route's row");

    for mut ws in sessions {
        ws.close(None).await.expect("close");
    }
    page.wait_for(ACTIVE, "0").await;
}
