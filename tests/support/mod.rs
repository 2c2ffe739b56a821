//! Shared pieces for the integration tests: wsgate started in-process on a free port, real WebSocket and HTTP
//! backends, and clients that never wait without a timeout; the built binary in a child process ([`binary`]),
//! WebSocket peers on raw sockets ([`raw`]), the expectations of the frames-mode tests ([`frames`]) and real peers
//! in their own processes: Tomcat, Python and Node ([`peers`]); llama.cpp's OpenAI-compatible server on a tiny
//! model ([`llm`]); Redis ([`redis`]) and a DNS server, dnsmasq ([`dnsmasq`]).
#![allow(dead_code, clippy::result_large_err)]

pub mod anthropic_standin;
pub mod binary;
pub mod dnsmasq;
pub mod frames;
pub mod gateway_http;
pub mod llm;
pub mod openai_standin;
pub mod peers;
pub mod raw;
pub mod redis;
pub mod scripted;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes as WsBytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use wsgate::config::{AccessLogTarget, Config, LogFormat, Timeouts};

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Raises the open-files limit (the 1 000-connection tests need it) and installs logging once.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Nofile);
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
        // Logs go through the test harness's capture: shown only for failing tests.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    });
}

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// wsgate running in this process, on a free loopback port. Dropping it starts its shutdown.
pub struct Proxy {
    pub addr: SocketAddr,
    running: Option<wsgate::server::Running>,
}

impl Proxy {
    pub fn start(servers: &[SocketAddr]) -> Proxy {
        Self::start_with(servers, |_| {})
    }

    /// Starts with test defaults (one worker, short drain), after `tweak` has changed the config.
    pub fn start_with(servers: &[SocketAddr], tweak: impl FnOnce(&mut Config)) -> Proxy {
        init();
        let names: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
        let timeouts = Timeouts {
            drain: Duration::from_secs(1),
            ..Timeouts::default()
        };
        let mut config = Config::quick("127.0.0.1:0", &names, timeouts, LogFormat::Text).expect("test config");
        config.server.workers = 1;
        // The test harness does not capture what goes to stdout: the access log is off unless a test wants it.
        config.server.access_log = AccessLogTarget::Off;
        tweak(&mut config);
        let running = wsgate::server::start(config).expect("proxy starts");
        Proxy {
            addr: running.local_addr(),
            running: Some(running),
        }
    }

    /// Starts from config file text, with one worker and a short drain.
    pub fn from_toml(text: &str) -> Proxy {
        Self::from_toml_with_drain(text, Duration::from_secs(1))
    }

    /// [`Proxy::from_toml`] with the given drain timeout (reloads keep it).
    pub fn from_toml_with_drain(text: &str, drain_timeout: Duration) -> Proxy {
        init();
        let mut config = wsgate::config::file::parse(text, "test.toml").unwrap_or_else(|problems| {
            let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
            panic!("test config refused:\n{}\n{text}", lines.join("\n"))
        });
        config.server.workers = 1;
        config.server.drain_timeout = drain_timeout;
        quiet_access_log(&mut config, text);
        let running = wsgate::server::start(config).expect("proxy starts");
        Proxy {
            addr: running.local_addr(),
            running: Some(running),
        }
    }

    /// The admin listener's address (a config with `[admin]`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.running
            .as_ref()
            .and_then(|r| r.admin_addr())
            .expect("an admin listener")
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Reloads from config file text (one worker; the drain timeout the proxy has), as SIGHUP would.
    pub fn reload(&mut self, text: &str) {
        let running = self.running.as_mut().expect("running");
        let mut config = wsgate::config::file::parse(text, "test.toml").unwrap_or_else(|problems| {
            let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
            panic!("test config refused:\n{}\n{text}", lines.join("\n"))
        });
        config.server.workers = 1;
        config.server.drain_timeout = running.snapshot().config.server.drain_timeout;
        quiet_access_log(&mut config, text);
        running.reload(config).expect("reload");
    }

    /// The config and upstream state new connections get.
    pub fn snapshot(&self) -> std::sync::Arc<wsgate::state::Snapshot> {
        self.running.as_ref().expect("running").snapshot()
    }

    /// Stops accepting and waits for the drain to finish.
    pub fn shutdown_and_join(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
            running.join();
        }
    }
}

/// The access log off when the config text does not say where it goes (the test harness does not capture stdout).
fn quiet_access_log(config: &mut Config, text: &str) {
    if !text.contains("access_log") {
        config.server.access_log = AccessLogTarget::Off;
    }
}

/// Waits, within [`WAIT`], until the access log file at `path` holds `n` lines for which `matches` holds, and
/// returns them parsed (every line of the file must be a JSON object).
pub async fn access_lines(
    path: &std::path::Path,
    n: usize,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    within(&format!("{n} matching lines in {}", path.display()), async {
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            // Only whole lines: the writer may be in the middle of one.
            let complete = text.rfind('\n').map_or("", |end| &text[..end]);
            let found: Vec<serde_json::Value> = complete
                .lines()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
                .filter(|value| matches(value))
                .collect();
            if found.len() >= n {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.shutdown();
        }
    }
}

/// Bytes (a child's output, a peer's answer) as text for a message.
pub fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A loopback address on which nothing listens: connections to it are refused.
pub fn unused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// What a test backend saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An upgrade request: its path and headers, in order.
    Upgraded {
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A close frame received from the proxy side (`None` for a close without a code).
    Closed(Option<(u16, String)>),
    /// The connection ended without a close frame.
    Dropped,
    /// A TLS backend's handshake with wsgate failed: why.
    TlsFailed(String),
}

/// A WebSocket backend (tokio-tungstenite) with scripted behaviour, driven by the messages it receives:
/// - on connect to a path starting `/headers`, it first sends `{"backend":NAME,"path":..,"headers":[[k,v],..]}`;
/// - `name?` is answered with its name;
/// - `ping-me:DATA` makes it send a ping with DATA; the pong that comes back is reported as text `pong:DATA`;
/// - `close:CODE:REASON` makes it send a close frame with that code and reason;
/// - anything else, text or binary, is echoed.
///
/// Subprotocols: it picks the last protocol the client offered. Every upgrade and close is sent to `events`.
pub struct Backend {
    pub addr: SocketAddr,
    pub events: mpsc::UnboundedReceiver<Event>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn next_event(&mut self) -> Event {
        within("a backend event", self.events.recv())
            .await
            .expect("backend running")
    }

    /// Stops the backend: its listener and every connection it holds are closed at once.
    pub fn kill(&self) {
        self.task.abort();
    }
}

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(None).max_frame_size(None)
}

pub async fn ws_backend(name: &str) -> Backend {
    ws_backend_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// [`ws_backend`] on a given address (to start a killed backend again on its port).
pub async fn ws_backend_on(name: &str, addr: SocketAddr) -> Backend {
    ws_backend_with(name, addr, None).await
}

/// [`ws_backend`] that runs TLS with `tls` on every connection before the WebSocket handshake.
pub async fn tls_ws_backend(name: &str, tls: tokio_rustls::TlsAcceptor) -> Backend {
    ws_backend_with(name, SocketAddr::from(([127, 0, 0, 1], 0)), Some(tls)).await
}

async fn ws_backend_with(name: &str, addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Backend {
    let listener = TcpListener::bind(addr).await.expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let (tx, events) = mpsc::unbounded_channel();
    let name = name.to_string();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (name, tx) = (name.clone(), tx.clone());
            match &tls {
                None => conns.spawn(backend_conn(stream, name, tx)),
                Some(tls) => {
                    let accept = tls.accept(stream);
                    conns.spawn(async move {
                        match accept.await {
                            Ok(stream) => backend_conn(stream, name, tx).await,
                            Err(e) => {
                                let _ = tx.send(Event::TlsFailed(e.to_string()));
                            }
                        }
                    })
                }
            };
        }
    });
    Backend { addr, events, task }
}

async fn backend_conn<S>(stream: S, name: String, events: mpsc::UnboundedSender<Event>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut seen: Option<(String, Vec<(String, String)>)> = None;
    let callback = |req: &Request, mut resp: Response| {
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        seen = Some((req.uri().to_string(), headers));
        let offered: Vec<String> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .flat_map(|v| {
                v.to_str()
                    .unwrap_or("")
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .filter(|p| !p.is_empty())
            .collect();
        if let Some(last) = offered.last() {
            resp.headers_mut()
                .insert("sec-websocket-protocol", last.parse().expect("protocol"));
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config())).await else {
        return;
    };
    let (path, headers) = seen.unwrap_or_default();
    let _ = events.send(Event::Upgraded {
        path: path.clone(),
        headers: headers.clone(),
    });
    if path.starts_with("/headers") {
        let report = serde_json::json!({ "backend": name, "path": path, "headers": headers });
        if ws.send(Message::text(report.to_string())).await.is_err() {
            return;
        }
    }
    while let Some(msg) = ws.next().await {
        let reply = match msg {
            Ok(Message::Text(t)) if t.as_str() == "name?" => Message::text(name.clone()),
            Ok(Message::Text(t)) if t.starts_with("ping-me:") => {
                Message::Ping(WsBytes::copy_from_slice(&t.as_bytes()["ping-me:".len()..]))
            }
            Ok(Message::Text(t)) if t.starts_with("close:") => {
                let mut parts = t.as_str()["close:".len()..].splitn(2, ':');
                let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1000);
                let reason = parts.next().unwrap_or("").to_string();
                Message::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                }))
            }
            Ok(Message::Pong(p)) => Message::text(format!("pong:{}", String::from_utf8_lossy(&p))),
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => m,
            Ok(Message::Close(frame)) => {
                let _ = events.send(Event::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string()))));
                // tungstenite answers the close; drive it out.
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            Ok(_) => continue,
            Err(_) => break,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
    let _ = events.send(Event::Dropped);
}

/// Connects a tokio-tungstenite client to `url`, with unlimited message sizes.
pub async fn connect(url: &str) -> Client {
    let (ws, _) = within(
        "the WebSocket handshake",
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
    )
    .await
    .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    ws
}

/// Connects to `url` with extra request headers; returns the client and the 101's headers.
pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> (Client, http::HeaderMap) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
        request.headers_mut().insert(name, value.parse().expect("header value"));
    }
    let (ws, response) = within(
        "the WebSocket handshake",
        tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true),
    )
    .await
    .unwrap_or_else(|e| panic!("connect {url} with {headers:?}: {e}"));
    (ws, response.headers().clone())
}

/// Asks a test backend its name over `ws`.
pub async fn backend_name(ws: &mut Client) -> String {
    within("sending name?", ws.send(Message::text("name?")))
        .await
        .expect("send");
    next_text(ws).await
}

/// The next data or close message (pings and pongs are skipped), within [`WAIT`].
pub async fn next_message(ws: &mut Client) -> Message {
    loop {
        match within("a message", ws.next()).await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return m,
            Some(Err(e)) => panic!("client error: {e}"),
            None => panic!("connection closed while waiting for a message"),
        }
    }
}

pub async fn next_text(ws: &mut Client) -> String {
    match next_message(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// A backend whose accept queue is full: it drops new SYNs, so connecting to it hangs until the connect timeout.
pub struct FullBackend {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    /// Connections the backend never accepts, filling its queue.
    _fillers: Vec<TcpStream>,
}

impl FullBackend {
    pub async fn start() -> FullBackend {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener.local_addr().ok().and_then(|a| a.as_socket()).expect("addr");
        let mut fillers = Vec::new();
        for _ in 0..8 {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                fillers.push(s);
            }
        }
        let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
        assert!(probe.is_err(), "the accept queue should be full, so a connect hangs");
        FullBackend {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// A valid upgrade request for `path` with extra header lines (each ending in `\r\n`).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test.local\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// The close frame the client gets next (messages before it passed over), within [`WAIT`]; it must carry a code.
pub async fn close_frame(what: &str, ws: &mut Client) -> CloseFrame {
    within(what, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close code")
}

/// Sends `request` on a fresh connection and reads until the server closes, within [`WAIT`].
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = within("connect", TcpStream::connect(addr)).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    read_to_close(&mut stream).await
}

pub async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    within("the server to close", async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

mod wsgate_test_io {
    //! A test server's connection: plain or TLS.
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;

    pub enum Io {
        Plain(TcpStream),
        Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    }

    impl AsyncRead for Io {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
                Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for Io {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            match self.get_mut() {
                Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
                Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            }
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Io::Plain(s) => Pin::new(s).poll_flush(cx),
                Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            }
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
                Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            }
        }
    }
}

/// A plain HTTP backend (hyper): `GET` answers `NAME PATH` plus one `name: value` line per request header;
/// `POST` streams the request body back.
pub async fn http_backend(name: &str) -> (SocketAddr, JoinHandle<()>) {
    http_backend_with(name, None).await
}

/// [`http_backend`] behind TLS.
pub async fn tls_http_backend(name: &str, tls: tokio_rustls::TlsAcceptor) -> (SocketAddr, JoinHandle<()>) {
    http_backend_with(name, Some(tls)).await
}

async fn http_backend_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let name = name.to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let stream = match &tls {
                    None => wsgate_test_io::Io::Plain(stream),
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => wsgate_test_io::Io::Tls(Box::new(stream)),
                        Err(_) => return,
                    },
                };
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let name = name.clone();
                    async move {
                        if req.method() == hyper::Method::POST {
                            let body = req.into_body().boxed();
                            return Ok::<_, std::convert::Infallible>(hyper::Response::new(body));
                        }
                        let mut text = format!("{name} {}\n", req.uri());
                        for (k, v) in req.headers() {
                            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
                        }
                        let body = Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed();
                        Ok(hyper::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// The body of a test server's answers.
pub type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Serves HTTP/1.1 on `listener`, every request answered by `answer`, until the returned task is aborted.
pub fn serve_http<F, Fut>(listener: TcpListener, answer: F) -> JoinHandle<()>
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<TestBody>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    })
}

/// A JSON answer of a test server.
pub fn json_answer(status: u16, value: &serde_json::Value) -> hyper::Response<TestBody> {
    let body = Full::new(Bytes::from(value.to_string())).map_err(|never| match never {});
    let mut resp = hyper::Response::new(body.boxed());
    *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("a status");
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("a header value"));
    resp
}

/// A folder of a test's own under the system's temp folder (named after the test and the process), removed when
/// dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("wsgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temp folder");
        TempDir(dir)
    }

    pub fn join(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A chunked HTTP/1.1 body (as read to its end) without its chunk framing.
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size + 2 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// The text of an API keys file: a `[[key]]` entry for each `(key, identity, extra lines)`, the key hashed.
pub fn api_keys_text(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(key, identity, extra)| {
            format!(
                "[[key]]\nhash = \"{}\"\nidentity = \"{identity}\"\n{extra}\n",
                wsgate::auth::api_keys::hash_hex(key.as_bytes())
            )
        })
        .collect()
}
