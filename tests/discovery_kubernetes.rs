//! Servers found through the Kubernetes API (`discovery = { kubernetes = { … } }`), by the built binary against a
//! test API server: HTTPS with a CA of the test's own (given as `ca_file`), a bearer token from `token_file`, and
//! answers replayed from an exchange in the API server's form (`tests/kubernetes/`) whose endpoints are real
//! WebSocket backends on loopback. Each test checks the exact requests wsgate makes (the list, then the watch from the list's version)
//! and what users see: the listed servers take connections, watch events bring servers in and drain removed or
//! unready ones with close 1012, `410 Gone` makes wsgate list again, and a refused token or a lost connection
//! keeps the servers known last, with a log line that does not show the token.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::Message;

use support::binary::Binary;
use support::tls::TestCa;
use support::ws_backend_on;
use support::{Backend, Client, TempDir, backend_name, close_frame, connect, next_text, unused_addr, within};

const TOKEN: &str =
    "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDplZGdlIn0.c2lnbmF0dXJl";

const LIST: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices\
                    ?labelSelector=kubernetes.io%2Fservice-name%3Dapp";

/// The watch request that resumes from `version`.
fn watch_from(version: &str) -> String {
    format!("{LIST}&watch=1&resourceVersion={version}&allowWatchBookmarks=true&timeoutSeconds=300")
}

/// A fixture of `tests/kubernetes/`, its pod IPs and ports made those of the test's backends.
struct Fixtures {
    /// The port of the `ws` port 8080 (backends a and c).
    port: u16,
    /// The port of the `ws` port 8081 (backend b's slice).
    other_port: u16,
}

impl Fixtures {
    fn read(&self, name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/kubernetes")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut text = text
            .replace("\"10.244.1.17\"", "\"127.0.0.2\"")
            .replace("\"10.244.2.23\"", "\"127.0.0.3\"")
            .replace("\"10.244.3.5\"", "\"127.0.0.4\"")
            .replace("\"10.244.2.9\"", "\"127.0.0.5\"");
        for (recorded, port) in [(8080, self.port), (8081, self.other_port)] {
            text = text
                .replace(&format!("\"port\": {recorded}"), &format!("\"port\": {port}"))
                .replace(&format!("\"port\":{recorded}"), &format!("\"port\":{port}"));
        }
        text
    }

    /// The lines of a `.jsonl` fixture, one event each.
    fn events(&self, name: &str) -> Vec<String> {
        self.read(name).lines().map(str::to_string).collect()
    }
}

/// One request to the test API server: its target and `Authorization`, and the connection to answer on.
struct ApiRequest {
    target: String,
    authorization: Option<String>,
    stream: TlsStream<TcpStream>,
}

impl ApiRequest {
    /// Asserts the request is `target` with the right token.
    fn expect(&self, target: &str) {
        assert_eq!(self.target, target, "the request's path and query");
        assert_eq!(
            self.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str()),
            "the request's token"
        );
    }

    /// Answers with `status` and a JSON body, and closes.
    async fn answer(mut self, status: u16, reason: &str, body: &str) {
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nAudit-Id: 3f6e1c2a-7d4b-4e9a-8b1c-2d3e4f5a6b7c\r\n\
             Cache-Control: no-cache, private\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        within("the answer written", async {
            self.stream.write_all(head.as_bytes()).await.unwrap();
            self.stream.write_all(body.as_bytes()).await.unwrap();
            // wsgate may have read the whole answer and closed first: the close_notify then finds no one.
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    /// Starts a watch's answer: 200, chunked, one event a chunk.
    async fn start_watch(&mut self) {
        let head = "HTTP/1.1 200 OK\r\nAudit-Id: 8a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d\r\n\
                    Cache-Control: no-cache, private\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\n\r\n";
        within("the watch's head written", self.stream.write_all(head.as_bytes()))
            .await
            .unwrap();
    }

    async fn event(&mut self, line: &str) {
        let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
        within("a watch event written", async {
            self.stream.write_all(chunk.as_bytes()).await.unwrap();
            self.stream.flush().await.unwrap();
        })
        .await;
    }

    /// Ends the watch as the API server does at its `timeoutSeconds`.
    async fn end_watch(mut self) {
        within("the watch ended", async {
            self.stream.write_all(b"0\r\n\r\n").await.unwrap();
            // wsgate may have read the last chunk and closed first.
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// The test API server: HTTPS on loopback with a certificate for 127.0.0.1 from the test's CA; every request is
/// handed to the test, which answers it.
struct ApiServer {
    addr: SocketAddr,
    ca: TestCa,
    requests: mpsc::UnboundedReceiver<ApiRequest>,
    task: JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    async fn start(name: &str) -> ApiServer {
        let ca = TestCa::new(name);
        let issued = ca.issue("apiserver", &["127.0.0.1", "kubernetes.default.svc"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(&issued, false));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                conns.spawn(async move {
                    let Ok(mut stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Some((target, authorization)) = read_head(&mut stream).await {
                        let _ = tx.send(ApiRequest {
                            target,
                            authorization,
                            stream,
                        });
                    }
                });
            }
        });
        ApiServer {
            addr,
            ca,
            requests,
            task,
        }
    }

    async fn next(&mut self) -> ApiRequest {
        within("a request to the API server", self.requests.recv())
            .await
            .expect("the API server runs")
    }
}

/// A GET request's target and `Authorization` header (the head only: these requests have no body).
async fn read_head(stream: &mut TlsStream<TcpStream>) -> Option<(String, Option<String>)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut request = lines.next()?.split(' ');
    assert_eq!(request.next(), Some("GET"), "{text}");
    let target = request.next()?.to_string();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.trim().to_string());
    Some((target, authorization))
}

/// A test's wsgate, API server, token file and fixtures.
struct Setup {
    api: ApiServer,
    wsgate: Binary,
    url: String,
    token_file: std::path::PathBuf,
    fixtures: Fixtures,
    _dir: TempDir,
}

/// wsgate with one upstream whose servers are the Service `app`'s (port `ws`), from the test API server.
async fn start(name: &str, fixtures: Fixtures) -> Setup {
    let dir = TempDir::new(name);
    let api = ApiServer::start(name).await;
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let listen = unused_addr();
    let config = format!(
        "[server]\ndrain_timeout = \"1s\"\n\
         [[listener]]\nname = \"m\"\naddress = \"{listen}\"\n\
         [[route]]\nupstream = \"app\"\nrelay = \"frames\"\n\
         [[upstream]]\nname = \"app\"\ndrain_rate = 1000\n\
         discovery = {{ kubernetes = {{ namespace = \"default\", service = \"app\", port = \"ws\", \
         api = \"https://{}\", token_file = \"{}\", ca_file = \"{}\" }} }}\n",
        api.addr,
        token_file.display(),
        api.ca.ca_file.display()
    );
    let file = dir.join("wsgate.toml");
    std::fs::write(&file, config).unwrap();
    let wsgate = Binary::spawn(["run", "--config", file.to_str().unwrap()]);
    Setup {
        api,
        wsgate,
        url: format!("ws://{listen}/"),
        token_file,
        fixtures,
        _dir: dir,
    }
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Backends a (127.0.0.2) and c (127.0.0.4) on one port, b (127.0.0.3) on another: one EndpointSlice's port is
/// every endpoint's of that slice.
async fn backends() -> (Backend, Backend, Backend, Fixtures) {
    for _ in 0..20 {
        let port = unused_addr().port();
        // Free at both addresses, or another port.
        if std::net::TcpListener::bind((loopback(2), port)).is_err()
            || std::net::TcpListener::bind((loopback(4), port)).is_err()
        {
            continue;
        }
        let a = ws_backend_on("a", SocketAddr::new(loopback(2), port)).await;
        let c = ws_backend_on("c", SocketAddr::new(loopback(4), port)).await;
        let b = ws_backend_on("b", SocketAddr::new(loopback(3), 0)).await;
        let fixtures = Fixtures {
            port,
            other_port: b.addr.port(),
        };
        return (a, b, c, fixtures);
    }
    panic!("no port free at both 127.0.0.2 and 127.0.0.4");
}

/// The name of the backend a new connection lands on.
async fn lands_on(url: &str) -> String {
    let mut ws = connect(url).await;
    let name = backend_name(&mut ws).await;
    let _ = ws.close(None).await;
    name
}

/// A session on the backend `name`: new connections are made until one lands there.
async fn session_on(url: &str, name: &str) -> Client {
    within(&format!("a connection on {name}"), async {
        loop {
            let mut ws = connect(url).await;
            if backend_name(&mut ws).await == name {
                return ws;
            }
            let _ = ws.close(None).await;
        }
    })
    .await
}

/// Asserts that the session still relays.
async fn still_open(ws: &mut Client, name: &str) {
    within("an echo", ws.send(Message::text("still there?"))).await.unwrap();
    assert_eq!(next_text(ws).await, "still there?", "the session on {name}");
}

/// Lists (answering with `list.json`) and waits for wsgate to serve what it found (it starts with the first
/// list's servers); a session on a.
async fn listed(s: &mut Setup) -> Client {
    let list = s.api.next().await;
    list.expect(LIST);
    list.answer(200, "OK", &s.fixtures.read("list.json")).await;
    let said = s.wsgate.wait_for_log(&["listed the Service's EndpointSlices"]).await;
    assert!(
        said.contains("slices=1 servers=1"),
        "the endpoint that is not ready is no server: {said}"
    );
    let summary = s.wsgate.wait_for_log(&["1 upstream ("]).await;
    assert!(summary.contains("(1 server)"), "{summary}");
    s.wsgate.wait_for_log(&["listening"]).await;
    session_on(&s.url, "a").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_endpoints_serve_and_watch_events_add_and_drain_servers() {
    let (_a, _b, _c, fixtures) = backends().await;
    let mut s = start("k8s-watch", fixtures).await;
    let mut on_a = listed(&mut s).await;
    // The listed endpoint that is not ready (127.0.0.5, where nothing listens) takes nothing.
    for _ in 0..4 {
        assert_eq!(lands_on(&s.url).await, "a");
    }
    let events = s.fixtures.events("watch.jsonl");

    // The watch from the list's version; a bookmark, then the API server ends it: the next one resumes from the
    // bookmark's version.
    let mut watch = s.api.next().await;
    watch.expect(&watch_from("48213"));
    watch.start_watch().await;
    watch.event(&events[0]).await;
    watch.end_watch().await;
    let mut watch = s.api.next().await;
    watch.expect(&watch_from("48250"));
    watch.start_watch().await;

    // ADDED: a second slice, b on its own port, joins.
    watch.event(&events[1]).await;
    let mut on_b = session_on(&s.url, "b").await;

    // MODIFIED: a terminating (not ready) and c ready: a's session is drained with 1012, c joins.
    watch.event(&events[2]).await;
    let close = close_frame("a's session drained", &mut on_a).await;
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    let mut on_c = session_on(&s.url, "c").await;

    // DELETED: b's slice goes, and b's session is drained; new connections go to c only.
    watch.event(&events[3]).await;
    let close = close_frame("b's session drained", &mut on_b).await;
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    for _ in 0..4 {
        assert_eq!(lands_on(&s.url).await, "c");
    }

    // MODIFIED: c terminating too, so no endpoint is ready: logged, and c stays (a proxy with no server would
    // refuse everyone).
    watch.event(&events[4]).await;
    let said = s.wsgate.wait_for_log(&["no ready endpoint"]).await;
    assert!(said.contains("app"), "{said}");
    still_open(&mut on_c, "c").await;
    assert_eq!(lands_on(&s.url).await, "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_makes_wsgate_list_again() {
    let (_a, _b, _c, fixtures) = backends().await;
    let mut s = start("k8s-gone", fixtures).await;
    let mut on_a = listed(&mut s).await;

    // The version watched from has been compacted away: an ERROR event with code 410 ends the watch.
    let mut watch = s.api.next().await;
    watch.expect(&watch_from("48213"));
    watch.start_watch().await;
    watch.event(&s.fixtures.events("gone-event.jsonl")[0]).await;

    // wsgate lists again; what changed meanwhile (a gone, c ready) is served.
    let list = s.api.next().await;
    list.expect(LIST);
    list.answer(200, "OK", &s.fixtures.read("list-after-gone.json")).await;
    let close = close_frame("a's session drained", &mut on_a).await;
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    for _ in 0..4 {
        assert_eq!(lands_on(&s.url).await, "c");
    }
    drop(watch);

    // A 410 as the answer's status does the same.
    let watch = s.api.next().await;
    watch.expect(&watch_from("48390"));
    watch.answer(410, "Gone", &s.fixtures.read("gone.json")).await;
    let list = s.api.next().await;
    list.expect(LIST);
    list.answer(200, "OK", &s.fixtures.read("list-after-gone.json")).await;
    s.api.next().await.expect(&watch_from("48390"));
    s.wsgate.wait_for_log(&["listing again"]).await;
    assert_eq!(lands_on(&s.url).await, "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_or_a_lost_connection_keeps_the_servers_known_last() {
    let (_a, _b, _c, fixtures) = backends().await;
    let mut s = start("k8s-token", fixtures).await;
    let mut on_a = listed(&mut s).await;
    let mut watch = s.api.next().await;
    watch.expect(&watch_from("48213"));
    watch.start_watch().await;

    // The token file now holds a token the API server does not take (wsgate reads it for every request); the
    // watch ends, and the next one is refused.
    let wrong = "eyJhbGciOiJSUzI1NiJ9.revoked.c2lnbmF0dXJl";
    std::fs::write(&s.token_file, wrong).unwrap();
    watch.end_watch().await;
    let refused = s.api.next().await;
    assert_eq!(refused.target, watch_from("48213"));
    assert_eq!(
        refused.authorization.as_deref(),
        Some(format!("Bearer {wrong}").as_str())
    );
    refused
        .answer(401, "Unauthorized", &s.fixtures.read("unauthorized.json"))
        .await;
    let said = s.wsgate.wait_for_log(&["refused the token"]).await;
    assert!(
        said.contains(s.token_file.to_str().unwrap()),
        "the log names the token's file: {said}"
    );
    assert!(
        said.contains("401") && said.contains("the servers known last stay"),
        "{said}"
    );
    assert!(
        !said.contains(wrong) && !said.contains(TOKEN),
        "the log shows the token: {said}"
    );
    still_open(&mut on_a, "a").await;
    assert_eq!(lands_on(&s.url).await, "a");

    // The next try (after the backoff) loses its connection before any answer: the same.
    drop(s.api.next().await);
    let said = s.wsgate.wait_for_log(&["the servers known last stay"]).await;
    assert!(!said.contains(wrong), "{said}");
    still_open(&mut on_a, "a").await;
    assert_eq!(lands_on(&s.url).await, "a");

    // A good token again: the watch resumes from the version it had, and its events are served.
    std::fs::write(&s.token_file, TOKEN).unwrap();
    let mut watch = within("a request with the good token", async {
        loop {
            let request = s.api.next().await;
            if request.authorization.as_deref() == Some(format!("Bearer {TOKEN}").as_str()) {
                return request;
            }
            request
                .answer(401, "Unauthorized", &s.fixtures.read("unauthorized.json"))
                .await;
        }
    })
    .await;
    watch.expect(&watch_from("48213"));
    watch.start_watch().await;
    watch.event(&s.fixtures.events("watch-after-401.jsonl")[0]).await;
    session_on(&s.url, "b").await;
    s.wsgate.wait_for_log(&["answers again"]).await;
    still_open(&mut on_a, "a").await;
}
