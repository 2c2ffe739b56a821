//! Plain HTTP (no upgrade) on the WebSocket listener: proxied to the same servers with keep-alive and bodies
//! streamed both ways.
mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;

async fn client<B>(proxy: &Proxy) -> SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn body_text(resp: hyper::Response<hyper::body::Incoming>) -> String {
    let bytes = within("the response body", resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn get_requests_share_one_keep_alive_connection_with_forwarding_headers() {
    let (backend, _task) = http_backend("plain").await;
    let proxy = Proxy::start(&[backend]);
    let mut sender = client::<Empty<Bytes>>(&proxy).await;
    for path in ["/first?x=1", "/second"] {
        let req = hyper::Request::get(path)
            .header("host", "www.example.com")
            .header("x-forwarded-for", "6.6.6.6")
            .header("keep-alive", "timeout=5")
            .body(Empty::new())
            .unwrap();
        let resp = within("a response", sender.send_request(req)).await.expect("response");
        assert_eq!(resp.status(), 200);
        let text = body_text(resp).await;
        assert!(text.starts_with(&format!("plain {path}\n")), "{text}");
        assert!(text.contains("host: www.example.com\n"), "{text}");
        assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
        assert!(text.contains("x-forwarded-host: www.example.com\n"), "{text}");
        assert!(text.contains("x-real-ip: 127.0.0.1\n"), "{text}");
        assert!(
            text.contains("forwarded: for=127.0.0.1;proto=http;host=\"www.example.com\"\n"),
            "{text}"
        );
        assert!(!text.contains("6.6.6.6"), "{text}");
        assert!(!text.contains("keep-alive"), "{text}");
    }
    assert!(!sender.is_closed(), "the client connection was kept alive");
}

#[tokio::test]
async fn chunked_post_streams_both_ways_then_the_connection_is_reused() {
    let (backend, _task) = http_backend("plain").await;
    let proxy = Proxy::start(&[backend]);
    let mut sender = client::<StreamBody<tokio_stream_shim::Chunks>>(&proxy).await;
    let (tx, chunks) = tokio_stream_shim::channel();
    let req = hyper::Request::post("/upload")
        .header("host", "h")
        .body(StreamBody::new(chunks))
        .unwrap();
    let pending = tokio::spawn(sender.send_request(req));
    // The body goes out in pieces, with no length known in advance: chunked on the wire.
    let mut expected = String::new();
    for i in 0..5 {
        let piece = format!("piece {i} {}\n", "x".repeat(1000 * i));
        expected.push_str(&piece);
        tx.send(Ok(Frame::data(Bytes::from(piece)))).await.expect("send chunk");
    }
    drop(tx);
    let resp = within("the echoed body", pending)
        .await
        .expect("task")
        .expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(body_text(resp).await, expected);

    let (tx, chunks) = tokio_stream_shim::channel();
    tx.send(Ok(Frame::data(Bytes::from_static(b"again"))))
        .await
        .expect("send");
    drop(tx);
    let req = hyper::Request::post("/again")
        .header("host", "h")
        .body(StreamBody::new(chunks))
        .unwrap();
    let resp = within("a second response", sender.send_request(req))
        .await
        .expect("response");
    assert_eq!(body_text(resp).await, "again");
}

#[tokio::test]
async fn fixed_length_post_is_echoed() {
    let (backend, _task) = http_backend("plain").await;
    let proxy = Proxy::start(&[backend]);
    let mut sender = client::<Full<Bytes>>(&proxy).await;
    let body = "y".repeat(300_000);
    let req = hyper::Request::post("/fixed")
        .header("host", "h")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let resp = within("a response", sender.send_request(req)).await.expect("response");
    assert_eq!(body_text(resp).await, body);
}

#[tokio::test]
async fn plain_request_with_every_server_down_gets_502() {
    let proxy = Proxy::start(&[unused_addr(), unused_addr()]);
    let mut sender = client::<Empty<Bytes>>(&proxy).await;
    let req = hyper::Request::get("/").header("host", "h").body(Empty::new()).unwrap();
    let resp = within("a response", sender.send_request(req)).await.expect("response");
    assert_eq!(resp.status(), 502);
    assert_eq!(body_text(resp).await, "upstream connect failed\n");
}

#[tokio::test]
async fn plain_requests_round_robin_over_servers() {
    let (a, _ta) = http_backend("a").await;
    let (b, _tb) = http_backend("b").await;
    let proxy = Proxy::start(&[a, b]);
    let mut names = Vec::new();
    for _ in 0..4 {
        let response = raw_exchange(proxy.addr, b"GET /who HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        names.push(body.split(' ').next().unwrap_or_default().to_string());
    }
    assert_eq!(names, ["a", "b", "a", "b"]);
}

/// A body stream fed through a channel, without pulling in another crate for it.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use hyper::body::Frame;
    use tokio::sync::mpsc;

    pub type Item = Result<Frame<Bytes>, std::convert::Infallible>;

    pub struct Chunks(mpsc::Receiver<Item>);

    pub fn channel() -> (mpsc::Sender<Item>, Chunks) {
        let (tx, rx) = mpsc::channel(4);
        (tx, Chunks(rx))
    }

    impl futures_util::Stream for Chunks {
        type Item = Item;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
            self.0.poll_recv(cx)
        }
    }
}

/// Reads one response head byte by byte, so nothing after it is consumed.
async fn read_head(stream: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    within("a response head", async {
        while !head.ends_with(b"\r\n\r\n") {
            let byte = stream.read_u8().await.expect("read");
            head.push(byte);
        }
    })
    .await;
    String::from_utf8_lossy(&head).into_owned()
}

async fn read_body(stream: &mut TcpStream, head: &str) -> String {
    use tokio::io::AsyncReadExt;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    let mut body = vec![0u8; length];
    within("a response body", stream.read_exact(&mut body))
        .await
        .expect("body");
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn websocket_upgrade_after_a_plain_request_on_the_same_connection_is_relayed() {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let backend = wsgate::demo::start_backend().await.expect("demo backend");
    let proxy = Proxy::start(&[backend]);
    let mut stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(read_body(&mut stream, &head).await.contains("wsgate demo"));

    stream
        .write_all(upgrade_request("/echo", "").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    for text in ["one", "two"] {
        futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("send");
        match within("an echo", futures_util::StreamExt::next(&mut ws)).await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => assert_eq!(t.as_str(), text),
            other => panic!("expected the echo, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_websocket_upgrade_after_a_plain_request_gets_426() {
    use tokio::io::AsyncWriteExt;
    let backend = wsgate::demo::start_backend().await.expect("demo backend");
    let proxy = Proxy::start(&[backend]);
    let mut stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut stream).await;
    read_body(&mut stream, &head).await;
    let request = upgrade_request("/echo", "").replace("Version: 13", "Version: 8");
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("sec-websocket-version: 13"),
        "{head}"
    );
}

/// A config with one listener and one route to `backend`.
fn one_route(backend: std::net::SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{backend}\"\n"
    )
}

#[tokio::test]
async fn shutdown_closes_keep_alive_connections_gracefully_not_at_the_drain_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that takes its time over `/slow`, so that a request is in flight when the shutdown starts; it says
    // when such a request has reached it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    let (slow_seen, mut slow_arrived) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let slow_seen = slow_seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    if seen.starts_with(b"GET /slow") {
                        let _ = slow_seen.send(());
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    seen.clear();
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let proxy = Proxy::from_toml_with_drain(&one_route(backend), std::time::Duration::from_secs(30));
    let mut idle = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut busy = TcpStream::connect(proxy.addr).await.expect("connect");
    for stream in [&mut idle, &mut busy] {
        stream
            .write_all(b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .expect("write");
        let head = read_head(stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(read_body(stream, &head).await, "ok");
    }
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .expect("write");
    // Once the request is at the backend (it takes 500 ms over it), shut down.
    within("the /slow request to reach the backend", slow_arrived.recv())
        .await
        .expect("the backend is running");
    let started = tokio::time::Instant::now();
    drop(proxy);
    // The idle connection is closed at once; the busy one gets its answer, marked as the last, then the close.
    let mut rest = Vec::new();
    within("the idle connection's close", idle.read_to_end(&mut rest))
        .await
        .expect("eof");
    assert!(rest.is_empty());
    let head = read_head(&mut busy).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    assert_eq!(read_body(&mut busy, &head).await, "ok");
    within("the busy connection's close", busy.read_to_end(&mut rest))
        .await
        .expect("eof");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
