//! Request smuggling and header hygiene, with real sockets: known smuggling patterns (CL.TE, TE.CL, obfuscated
//! `Transfer-Encoding`, duplicate or malformed `Content-Length`, obsolete line folding, bare LF, NUL, a space
//! before the colon), each sent as the first request of a connection (read by the upgrade path's parser) and as the
//! second request on a keep-alive connection (read by hyper alone). Each is refused with 400 or read one
//! unambiguous way, and a backend that records every request it parses never sees the smuggled one. Plus: a target
//! in absolute form is routed by its path and forwarded in origin form with its authority as `Host`, on both
//! paths; an upgrade with a body is refused; `Proxy-*` headers never reach a backend.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use support::*;

/// A request the recording backend parsed: method, target, and header lines.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A plain HTTP backend (hyper) that records every request it parses, reads its body, and answers `200 ok`.
async fn recording_backend() -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = Log::default();
    let seen = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                            .collect();
                        seen.lock().await.push(Seen {
                            method: req.method().to_string(),
                            uri: req.uri().to_string(),
                            headers,
                        });
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, log)
}

async fn seen(log: &Log) -> Vec<Seen> {
    log.lock().await.clone()
}

/// The status codes of the answers in what a connection received, in order.
fn statuses(received: &str) -> Vec<u16> {
    received
        .split("\r\n")
        .filter_map(|line| line.strip_prefix("HTTP/1.1 "))
        .filter_map(|rest| rest.get(..3)?.parse().ok())
        .collect()
}

/// What the proxy must do with a pattern.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// 400, nothing forwarded.
    Refused,
    /// Read one unambiguous way: forwarded as one request, to `/`, answered 200.
    OneRequest,
}

/// The request a smuggling pattern tries to hide.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

struct Pattern {
    name: &'static str,
    bytes: String,
    /// As the first request of a connection (read by the upgrade path's parser).
    first: Expect,
    /// As the second request on a keep-alive connection (read by hyper).
    later: Expect,
}

fn pattern(name: &'static str, bytes: String, first: Expect, later: Expect) -> Pattern {
    Pattern {
        name,
        bytes,
        first,
        later,
    }
}

/// Known smuggling patterns. Each hides [`SMUGGLED`] where a parser reading the framing the other way would find a
/// second request.
fn patterns() -> Vec<Pattern> {
    use Expect::*;
    let s = SMUGGLED;
    let post = "POST / HTTP/1.1\r\nHost: a\r\n";
    // The chunked body's end, followed by the smuggled request: a length covering both hides it from a parser
    // that reads Content-Length; one that reads chunked finds it after the body.
    let chunked_then_smuggled = format!("0\r\n\r\n{s}");
    let cl_covering = chunked_then_smuggled.len();
    // The smuggled request as chunk data: a parser that reads chunked sees it as the body; one that reads the
    // short Content-Length finds it after the chunk size line.
    let size_line = format!("{:x}\r\n", s.len());
    let smuggled_as_chunk = format!("{size_line}{s}\r\n0\r\n\r\n");
    let sl = size_line.len();
    let n = s.len();
    vec![
        pattern(
            "CL.TE",
            format!("{post}Content-Length: {cl_covering}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_then_smuggled}"),
            Refused,
            OneRequest,
        ),
        pattern(
            "TE.CL",
            format!("{post}Transfer-Encoding: chunked\r\nContent-Length: {sl}\r\n\r\n{smuggled_as_chunk}"),
            Refused,
            OneRequest,
        ),
        pattern(
            "TE.TE xchunked",
            format!(
                "{post}Content-Length: {cl_covering}\r\nTransfer-Encoding: xchunked\r\n\r\n{chunked_then_smuggled}"
            ),
            Refused,
            Refused,
        ),
        pattern(
            "TE.TE leading space",
            format!(
                "{post}Content-Length: {cl_covering}\r\nTransfer-Encoding:  chunked\r\n\r\n{chunked_then_smuggled}"
            ),
            Refused,
            OneRequest,
        ),
        pattern(
            "TE.TE chunked, identity",
            format!(
                "{post}Content-Length: {cl_covering}\r\nTransfer-Encoding: chunked, identity\r\n\r\n{chunked_then_smuggled}"
            ),
            Refused,
            Refused,
        ),
        pattern(
            "TE identity, chunked",
            format!("{post}Transfer-Encoding: identity, chunked\r\n\r\n{chunked_then_smuggled}"),
            Refused,
            Refused,
        ),
        pattern(
            "TE.TE two headers",
            format!("{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n{chunked_then_smuggled}"),
            Refused,
            Refused,
        ),
        pattern(
            "duplicate CL, different",
            format!("{post}Content-Length: 0\r\nContent-Length: {n}\r\n\r\n{s}"),
            Refused,
            Refused,
        ),
        pattern(
            "duplicate CL, same",
            format!("{post}Content-Length: {n}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{s}"),
            Refused,
            OneRequest,
        ),
        pattern(
            "CL list",
            format!("{post}Content-Length: {n}, 0\r\n\r\n{s}"),
            Refused,
            Refused,
        ),
        pattern(
            "CL plus sign",
            format!("{post}Content-Length: +{n}\r\n\r\n{s}"),
            Refused,
            Refused,
        ),
        pattern(
            "CL inner space",
            format!("{post}Content-Length: 0 {n}\r\n\r\n{s}"),
            Refused,
            Refused,
        ),
        pattern(
            "obs-fold",
            format!(
                "{post}Content-Length: {cl_covering}\r\nX-Fold: a\r\n Transfer-Encoding: chunked\r\n\r\n{chunked_then_smuggled}"
            ),
            Refused,
            Refused,
        ),
        pattern(
            "bare LF",
            format!("{post}X-A: 1\nContent-Length: {n}\r\nConnection: close\r\n\r\n{s}"),
            Refused,
            OneRequest,
        ),
        pattern(
            "NUL in header",
            format!("{post}X-A: a\0b\r\nContent-Length: {n}\r\n\r\n{s}"),
            Refused,
            Refused,
        ),
        pattern(
            "space before colon",
            format!(
                "{post}Content-Length: {cl_covering}\r\nTransfer-Encoding : chunked\r\n\r\n{chunked_then_smuggled}"
            ),
            Refused,
            Refused,
        ),
        pattern(
            "absolute form, conflicting Host",
            "GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n".to_string(),
            OneRequest,
            OneRequest,
        ),
    ]
}

/// Reads from `stream` until `received` holds `n` complete answers of the recording backend (`ok` bodies).
async fn read_answers(stream: &mut TcpStream, n: usize) -> String {
    let mut out = Vec::new();
    within("the first answer", async {
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&out).matches("\r\n\r\nok").count() < n {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => out.extend_from_slice(&buf[..k]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a pattern on a fresh connection, after one good request when `later`; returns the status codes of the
/// answers to the pattern and the requests the backend parsed for it.
async fn send_pattern(proxy: &Proxy, log: &Log, pattern: &Pattern, later: bool) -> (Vec<u16>, Vec<Seen>) {
    let before = seen(log).await.len();
    let mut stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    if later {
        stream
            .write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let first = read_answers(&mut stream, 1).await;
        assert_eq!(statuses(&first), [200], "{}: first request: {first:?}", pattern.name);
    }
    let before_pattern = seen(log).await.len();
    stream.write_all(pattern.bytes.as_bytes()).await.expect("write");
    let received = read_to_close(&mut stream).await;
    let all = seen(log).await;
    assert!(
        all[before..].iter().all(|s| !s.uri.contains("smuggled")),
        "{}: the backend received a smuggled request: {all:?}",
        pattern.name
    );
    (statuses(&received), all[before_pattern..].to_vec())
}

#[tokio::test]
async fn smuggling_patterns_are_refused_or_read_one_way_first_and_on_keep_alive() {
    let (backend, log) = recording_backend().await;
    let proxy = Proxy::start(&[backend]);
    for pattern in patterns() {
        for later in [false, true] {
            let expect = if later { pattern.later } else { pattern.first };
            let (statuses, forwarded) = send_pattern(&proxy, &log, &pattern, later).await;
            let case = format!("{} ({})", pattern.name, if later { "keep-alive" } else { "first" });
            match expect {
                Expect::Refused => {
                    assert_eq!(statuses, [400], "{case}");
                    assert!(forwarded.is_empty(), "{case}: forwarded {forwarded:?}");
                }
                Expect::OneRequest => {
                    assert_eq!(statuses, [200], "{case}");
                    assert_eq!(forwarded.len(), 1, "{case}: forwarded {forwarded:?}");
                    assert_eq!(forwarded[0].uri, "/", "{case}");
                    assert!(
                        forwarded[0].header("content-length").len() <= 1
                            && forwarded[0].header("transfer-encoding").len() <= 1
                            && (forwarded[0].header("content-length").is_empty()
                                || forwarded[0].header("transfer-encoding").is_empty()),
                        "{case}: forwarded with ambiguous framing: {forwarded:?}"
                    );
                }
            }
        }
    }
}

/// Routes: `/ws` to a WebSocket backend, `/p` to one recording backend, anything else to another.
fn routes(ws: SocketAddr, p: SocketAddr, other: SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n\n\
         [[route]]\npath_prefix = \"/ws\"\nupstream = \"ws\"\n\n\
         [[route]]\npath_prefix = \"/p\"\nupstream = \"p\"\n\n\
         [[route]]\nupstream = \"other\"\n\n\
         [[upstream]]\nname = \"ws\"\n[[upstream.server]]\naddress = \"{ws}\"\n\n\
         [[upstream]]\nname = \"p\"\n[[upstream.server]]\naddress = \"{p}\"\n\n\
         [[upstream]]\nname = \"other\"\n[[upstream.server]]\naddress = \"{other}\"\n"
    )
}

fn headers_named<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A connection to the proxy; when `later`, one plain request has gone first, so the next is read by hyper.
async fn connection(proxy: SocketAddr, later: bool) -> TcpStream {
    let mut stream = within("connect", TcpStream::connect(proxy)).await.expect("connect");
    if later {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        read_answers(&mut stream, 1).await;
    }
    stream
}

#[tokio::test]
async fn absolute_form_upgrade_is_routed_by_path_with_its_authority_as_host() {
    let mut ws = ws_backend("ws").await;
    let (p, _) = recording_backend().await;
    let (other, other_log) = recording_backend().await;
    let proxy = Proxy::from_toml(&routes(ws.addr, p, other));
    // Kept open until the end, so that the backend reports no close between the upgrades.
    let mut open = Vec::new();
    for later in [false, true] {
        let mut stream = connection(proxy.addr, later).await;
        let request = upgrade_request("http://chat.example:8080/ws/room?x=1", "");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut head = [0u8; 12];
        within("the 101", stream.read_exact(&mut head)).await.expect("read");
        assert_eq!(&head, b"HTTP/1.1 101", "keep-alive: {later}");
        match ws.next_event().await {
            Event::Upgraded { path, headers } => {
                assert_eq!(path, "/ws/room?x=1", "keep-alive: {later}");
                assert_eq!(headers_named(&headers, "host"), ["chat.example:8080"], "{headers:?}");
                assert_eq!(
                    headers_named(&headers, "x-forwarded-host"),
                    ["chat.example:8080"],
                    "{headers:?}"
                );
            }
            other => panic!("expected an upgrade, got {other:?}"),
        }
        open.push(stream);
    }
    assert_eq!(
        seen(&other_log).await.len(),
        1,
        "only the keep-alive case's first request"
    );
}

#[tokio::test]
async fn absolute_form_plain_request_is_routed_by_path_with_its_authority_as_host() {
    let ws = ws_backend("ws").await;
    let (p, p_log) = recording_backend().await;
    let (other, other_log) = recording_backend().await;
    let proxy = Proxy::from_toml(&routes(ws.addr, p, other));
    for later in [false, true] {
        let mut stream = connection(proxy.addr, later).await;
        stream
            .write_all(b"GET http://app.example/p/x?y=1 HTTP/1.1\r\nHost: other.example\r\n\r\n")
            .await
            .expect("write");
        let answer = read_answers(&mut stream, 1).await;
        assert_eq!(statuses(&answer), [200], "{answer}");
        let last = seen(&p_log).await.pop().expect("the /p backend got the request");
        assert_eq!((last.method.as_str(), last.uri.as_str()), ("GET", "/p/x?y=1"));
        assert_eq!(last.header("host"), ["app.example"], "{last:?}");
        assert_eq!(last.header("x-forwarded-host"), ["app.example"], "{last:?}");
    }
    assert_eq!(seen(&p_log).await.len(), 2);
    assert_eq!(
        seen(&other_log).await.len(),
        1,
        "only the keep-alive case's first request"
    );
}

#[tokio::test]
async fn upgrade_with_a_body_is_refused_first_and_on_keep_alive() {
    let mut ws = ws_backend("ws").await;
    let (p, _) = recording_backend().await;
    let (other, _) = recording_backend().await;
    let proxy = Proxy::from_toml(&routes(ws.addr, p, other));
    for extra in ["Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n"] {
        let body = if extra.starts_with("Content") {
            "hello"
        } else {
            "5\r\nhello\r\n0\r\n\r\n"
        };
        let request = format!("{}{body}", upgrade_request("/ws", extra));
        let answer = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&answer), [400], "{extra}: {answer}");

        let mut stream = connection(proxy.addr, true).await;
        stream.write_all(request.as_bytes()).await.expect("write");
        let answer = read_to_close(&mut stream).await;
        assert_eq!(statuses(&answer), [400], "keep-alive, {extra}: {answer}");
    }
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), ws.events.recv())
            .await
            .is_err(),
        "the WebSocket backend saw an upgrade"
    );
}

#[tokio::test]
async fn proxy_headers_are_not_forwarded_on_either_path() {
    let mut ws = ws_backend("ws").await;
    let (p, p_log) = recording_backend().await;
    let (other, _) = recording_backend().await;
    let proxy = Proxy::from_toml(&routes(ws.addr, p, other));
    let proxy_headers = "Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nProxy: http://evil\r\n";

    let mut stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    let request = upgrade_request("/ws", proxy_headers);
    stream.write_all(request.as_bytes()).await.expect("write");
    match ws.next_event().await {
        Event::Upgraded { headers, .. } => {
            assert!(
                headers
                    .iter()
                    .all(|(n, _)| !n.to_ascii_lowercase().starts_with("proxy")),
                "{headers:?}"
            );
        }
        other => panic!("expected an upgrade, got {other:?}"),
    }

    let request = format!("GET /p HTTP/1.1\r\nHost: a\r\n{proxy_headers}\r\n");
    let mut stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    for _ in 0..2 {
        stream.write_all(request.as_bytes()).await.expect("write");
        read_answers(&mut stream, 1).await;
    }
    let got = seen(&p_log).await;
    assert_eq!(got.len(), 2);
    for request in got {
        assert!(
            request
                .headers
                .iter()
                .all(|(n, _)| !n.to_ascii_lowercase().starts_with("proxy")),
            "{request:?}"
        );
    }
}

/// Reads one answer of wsgate's own: a head and a one-line body.
async fn read_refusal(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    within("wsgate's answer", async {
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&out);
            if text
                .split_once("\r\n\r\n")
                .is_some_and(|(_, body)| body.ends_with('\n'))
            {
                break;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => out.extend_from_slice(&buf[..k]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// What routing and a backend could read two ways is refused on both paths, first request and keep-alive alike:
/// two `Host` headers (routing reads one, a backend may read the other), user information in an absolute-form
/// target, and dot segments (a backend resolving `/p/../admin` would serve a path the routes never saw).
#[tokio::test]
async fn heads_routing_and_a_backend_could_read_two_ways_are_refused() {
    let ws = ws_backend("ws").await;
    let (p, p_log) = recording_backend().await;
    let (other, other_log) = recording_backend().await;
    let proxy = Proxy::from_toml(&routes(ws.addr, p, other));
    let cases = [
        "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: admin.example\r\n\r\n",
        "GET http://user@admin.example/x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /p/../admin HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /p/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n",
    ];
    for request in cases {
        for later in [false, true] {
            let mut stream = connection(proxy.addr, later).await;
            stream.write_all(request.as_bytes()).await.expect("write");
            let answer = read_refusal(&mut stream).await;
            assert_eq!(statuses(&answer), [400], "{request:?} (keep-alive: {later}): {answer}");
        }
    }
    let upgrade = upgrade_request("/ws/../admin", "");
    let answer = raw_exchange(proxy.addr, upgrade.as_bytes()).await;
    assert_eq!(statuses(&answer), [400], "{answer}");
    assert!(seen(&p_log).await.is_empty());
    let reached: Vec<String> = seen(&other_log).await.into_iter().map(|s| s.uri).collect();
    assert!(
        reached.iter().all(|uri| uri == "/"),
        "only the warm-up requests: {reached:?}"
    );
}
