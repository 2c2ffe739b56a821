//! Who the client is behind a proxy: `X-Forwarded-For` / `Forwarded` believed from a listener's `trusted_proxies`
//! only (and replaced from anyone else), on the upgrade fast path, on plain HTTP and on an upgrade after a plain
//! request on a keep-alive connection; the PROXY protocol (v1 and v2) from a trusted proxy, whose source is the
//! client for admission, per-IP limits and forwarding. 127.0.0.1 is the trusted proxy; clients bound to 127.0.0.2
//! are anyone else.

mod support;

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::binary::Binary;
use support::raw::{Peer, connect_from, read_head};
use support::*;

const TRUSTED: u8 = 1;
const UNTRUSTED: u8 = 2;

fn status_of(head: &str) -> u16 {
    head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The headers a backend got, lowercase names, in order.
type Headers = Vec<(String, String)>;

/// Every value of `name` in `headers`.
fn values<'a>(headers: &'a Headers, name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// What wsgate answered an upgrade; on a `101` to `/headers...`, the headers the WebSocket backend got, and the
/// connection (open while the test holds it).
struct Upgraded {
    status: u16,
    head: String,
    headers: Headers,
    _stream: TcpStream,
}

/// Reads the answer to an upgrade already written on `stream`, and the backend's report of the headers it got.
async fn upgrade_answer(mut stream: TcpStream) -> Upgraded {
    let (head, rest) = read_head(&mut stream).await;
    let status = status_of(&head);
    if status != 101 {
        return Upgraded {
            status,
            head,
            headers: Vec::new(),
            _stream: stream,
        };
    }
    let mut peer = Peer {
        stream,
        buf: rest,
        mask: None,
    };
    let frame = peer.next_frame().await.expect("the backend's report");
    let report: serde_json::Value = serde_json::from_slice(&frame.payload).expect("a JSON report");
    let headers = report["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|pair| {
            let text = |i: usize| pair[i].as_str().expect("a string").to_string();
            (text(0), text(1))
        })
        .collect();
    Upgraded {
        status,
        head,
        headers,
        _stream: peer.stream,
    }
}

/// An upgrade to `path` from 127.0.0.`from`, with `preface` (a PROXY protocol header) first and `extra` header lines.
async fn upgrade_via(addr: SocketAddr, from: u8, preface: &[u8], path: &str, extra: &str) -> Upgraded {
    let mut stream = connect_from(from, addr).await;
    let request = [preface, upgrade_request(path, extra).as_bytes()].concat();
    stream.write_all(&request).await.expect("write");
    upgrade_answer(stream).await
}

/// A plain `GET path` (closing) from 127.0.0.`from`: the status and the headers the HTTP backend got.
async fn plain_via(addr: SocketAddr, from: u8, preface: &[u8], path: &str, extra: &str) -> (u16, Headers) {
    let mut stream = connect_from(from, addr).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n{extra}Connection: close\r\n\r\n");
    stream
        .write_all(&[preface, request.as_bytes()].concat())
        .await
        .expect("write");
    let answer = read_to_close(&mut stream).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (status_of(head), backend_saw(body))
}

/// The header lines of an `http_backend` answer's body.
fn backend_saw(body: &str) -> Headers {
    body.lines()
        .skip(1)
        .filter_map(|line| line.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// From 127.0.0.`from`: a plain `GET /page` with `first_extra` on a keep-alive connection, then on the same
/// connection an upgrade to `path` with `extra` (served by the plain-HTTP path). The plain request's backend view,
/// and the upgrade's answer.
async fn upgrade_after_plain(
    addr: SocketAddr,
    from: u8,
    first_extra: &str,
    path: &str,
    extra: &str,
) -> (Headers, Upgraded) {
    let mut stream = connect_from(from, addr).await;
    let first = format!("GET /page HTTP/1.1\r\nHost: test.local\r\n{first_extra}\r\n");
    stream.write_all(first.as_bytes()).await.expect("write");
    let (head, mut body) = read_head(&mut stream).await;
    assert_eq!(status_of(&head), 200, "{head}");
    let length: usize = support::raw::header_value(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .expect("a Content-Length");
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = within("the body", tokio::io::AsyncReadExt::read(&mut stream, &mut chunk))
            .await
            .expect("read");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), length, "nothing after the body");
    let seen = backend_saw(&String::from_utf8_lossy(&body));
    stream
        .write_all(upgrade_request(path, extra).as_bytes())
        .await
        .expect("write");
    (seen, upgrade_answer(stream).await)
}

/// One listener with `listener` keys; `/headers/admin` (WebSocket) and `/admin` (plain) deny 198.51.100.0/24;
/// `/headers...` goes to a WebSocket backend, everything else to a plain HTTP one.
fn config(listener: &str, ws: SocketAddr, web: SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n{listener}\n\
         [[route]]\npath_prefix = \"/headers/admin\"\nupstream = \"ws\"\ndeny = [\"198.51.100.0/24\"]\n\
         [[route]]\npath_prefix = \"/admin\"\nupstream = \"web\"\ndeny = [\"198.51.100.0/24\"]\n\
         [[route]]\npath_prefix = \"/headers\"\nupstream = \"ws\"\n\
         [[route]]\nupstream = \"web\"\n\
         [[upstream]]\nname = \"ws\"\n[[upstream.server]]\naddress = \"{ws}\"\n\
         [[upstream]]\nname = \"web\"\n[[upstream.server]]\naddress = \"{web}\"\n"
    )
}

const TRUST_LOOPBACK: &str = "trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]";

/// What a client behind two proxies (10.0.0.5, then 127.0.0.1) sends: chains naming 198.51.100.1, and the first
/// proxy's proto and host.
const CHAIN: &str = "X-Forwarded-For: 198.51.100.1, 10.0.0.5\r\n\
                     Forwarded: for=198.51.100.1;proto=https, for=10.0.0.5\r\n\
                     X-Forwarded-Proto: https\r\nX-Forwarded-Host: public.example\r\nX-Real-IP: 6.6.6.6\r\n";

/// The forwarding headers a backend got: each exactly once, and as expected.
fn assert_forwarding(headers: &Headers, want: [(&str, &str); 5], what: &str) {
    for (name, value) in want {
        assert_eq!(values(headers, name), [value], "{what}: {name} in {headers:?}");
    }
}

fn appended_chain(peer: &str) -> [(&'static str, String); 5] {
    [
        ("x-forwarded-for", format!("198.51.100.1, 10.0.0.5, {peer}")),
        ("x-real-ip", "198.51.100.1".into()),
        (
            "forwarded",
            format!("for=198.51.100.1;proto=https, for=10.0.0.5, for={peer};proto=http;host=\"test.local\""),
        ),
        ("x-forwarded-proto", "https".into()),
        ("x-forwarded-host", "public.example".into()),
    ]
}

fn replaced_by(peer: &str) -> [(&'static str, String); 5] {
    [
        ("x-forwarded-for", peer.into()),
        ("x-real-ip", peer.into()),
        ("forwarded", format!("for={peer};proto=http;host=\"test.local\"")),
        ("x-forwarded-proto", "http".into()),
        ("x-forwarded-host", "test.local".into()),
    ]
}

fn as_refs<'a>(want: &'a [(&'static str, String); 5]) -> [(&'static str, &'a str); 5] {
    std::array::from_fn(|i| (want[i].0, want[i].1.as_str()))
}

#[tokio::test]
async fn a_trusted_peers_chain_is_appended_and_names_the_client_on_the_upgrade_fast_path() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let proxy = Proxy::from_toml(&config(TRUST_LOOPBACK, ws.addr, web));

    let up = upgrade_via(proxy.addr, TRUSTED, b"", "/headers", CHAIN).await;
    assert_eq!(up.status, 101, "{}", up.head);
    assert_forwarding(&up.headers, as_refs(&appended_chain("127.0.0.1")), "trusted");
    // The derived client is what the route's deny reads.
    let up = upgrade_via(proxy.addr, TRUSTED, b"", "/headers/admin", CHAIN).await;
    assert_eq!(up.status, 403, "{}", up.head);
    // Forwarded alone names the client too (quoted IPv6 with a port).
    let only = "Forwarded: for=\"[2001:db8::7]:4711\", for=10.0.0.5\r\n";
    let up = upgrade_via(proxy.addr, TRUSTED, b"", "/headers", only).await;
    assert_eq!(values(&up.headers, "x-real-ip"), ["2001:db8::7"]);
    assert_eq!(values(&up.headers, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(
        values(&up.headers, "forwarded"),
        ["for=\"[2001:db8::7]:4711\", for=10.0.0.5, for=127.0.0.1;proto=http;host=\"test.local\""]
    );
    // An entry naming no address ends the walk at the trusted hop after it: what lies left of it (perhaps written
    // by the client) is not believed.
    let odd = "X-Forwarded-For: 198.51.100.9, not-an-address, unknown, 10.0.0.5\r\n";
    let up = upgrade_via(proxy.addr, TRUSTED, b"", "/headers", odd).await;
    assert_eq!(values(&up.headers, "x-real-ip"), ["10.0.0.5"]);
}

#[tokio::test]
async fn an_untrusted_peers_forwarding_headers_are_replaced_on_the_upgrade_fast_path() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let proxy = Proxy::from_toml(&config(TRUST_LOOPBACK, ws.addr, web));
    let up = upgrade_via(proxy.addr, UNTRUSTED, b"", "/headers", CHAIN).await;
    assert_eq!(up.status, 101, "{}", up.head);
    assert_forwarding(&up.headers, as_refs(&replaced_by("127.0.0.2")), "untrusted");
    // The chain names no one: the route's deny sees 127.0.0.2.
    let up = upgrade_via(proxy.addr, UNTRUSTED, b"", "/headers/admin", CHAIN).await;
    assert_eq!(up.status, 101, "{}", up.head);
}

#[tokio::test]
async fn forwarding_headers_on_plain_requests_follow_the_same_rules() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let proxy = Proxy::from_toml(&config(TRUST_LOOPBACK, ws.addr, web));
    let (status, seen) = plain_via(proxy.addr, TRUSTED, b"", "/page", CHAIN).await;
    assert_eq!(status, 200, "{seen:?}");
    assert_forwarding(&seen, as_refs(&appended_chain("127.0.0.1")), "trusted");
    let (status, _) = plain_via(proxy.addr, TRUSTED, b"", "/admin", CHAIN).await;
    assert_eq!(status, 403);
    let (status, seen) = plain_via(proxy.addr, UNTRUSTED, b"", "/page", CHAIN).await;
    assert_eq!(status, 200, "{seen:?}");
    assert_forwarding(&seen, as_refs(&replaced_by("127.0.0.2")), "untrusted");
    let (status, _) = plain_via(proxy.addr, UNTRUSTED, b"", "/admin", CHAIN).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_upgrade_after_a_plain_request_derives_its_own_client() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let proxy = Proxy::from_toml(&config(TRUST_LOOPBACK, ws.addr, web));
    let other = "X-Forwarded-For: 203.0.113.9\r\n";

    let (first, up) = upgrade_after_plain(proxy.addr, TRUSTED, other, "/headers", CHAIN).await;
    assert_eq!(values(&first, "x-real-ip"), ["203.0.113.9"]);
    assert_eq!(up.status, 101, "{}", up.head);
    assert_forwarding(
        &up.headers,
        as_refs(&appended_chain("127.0.0.1")),
        "trusted, keep-alive",
    );
    // Each request's own chain: the first named 203.0.113.9, the upgrade's names a denied client.
    let (_, up) = upgrade_after_plain(proxy.addr, TRUSTED, other, "/headers/admin", CHAIN).await;
    assert_eq!(up.status, 403, "{}", up.head);

    let (first, up) = upgrade_after_plain(proxy.addr, UNTRUSTED, other, "/headers", CHAIN).await;
    assert_eq!(values(&first, "x-real-ip"), ["127.0.0.2"]);
    assert_eq!(up.status, 101, "{}", up.head);
    assert_forwarding(&up.headers, as_refs(&replaced_by("127.0.0.2")), "untrusted, keep-alive");
    let (_, up) = upgrade_after_plain(proxy.addr, UNTRUSTED, other, "/headers/admin", CHAIN).await;
    assert_eq!(up.status, 101, "{}", up.head);
}

#[tokio::test]
async fn the_handshake_rate_counts_the_derived_client() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let listener = format!("{TRUST_LOOPBACK}\nhandshakes_per_second_per_ip = 1\nhandshake_burst = 0");
    let proxy = Proxy::from_toml(&config(&listener, ws.addr, web));
    let from = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    let up = upgrade_via(proxy.addr, TRUSTED, b"", "/headers", &from("198.51.100.1")).await;
    assert_eq!(up.status, 101, "{}", up.head);
    let up = upgrade_via(proxy.addr, TRUSTED, b"", "/headers", &from("198.51.100.1")).await;
    assert_eq!(up.status, 429, "{}", up.head);
    let up = upgrade_via(proxy.addr, TRUSTED, b"", "/headers", &from("198.51.100.2")).await;
    assert_eq!(up.status, 101, "another client behind the same proxy: {}", up.head);
}

/// A PROXY protocol v1 line for a connection from `source`.
fn v1(source: SocketAddr) -> Vec<u8> {
    let (family, destination) = if source.is_ipv4() {
        ("TCP4", "127.0.0.1")
    } else {
        ("TCP6", "::1")
    };
    format!("PROXY {family} {} {destination} {} 443\r\n", source.ip(), source.port()).into_bytes()
}

/// A PROXY protocol v2 header (command PROXY) for a connection from `source`, with a TLV after the addresses.
fn v2(source: SocketAddr) -> Vec<u8> {
    let (family, mut block) = match source {
        SocketAddr::V4(s) => (0x11, [&s.ip().octets()[..], &[127, 0, 0, 1]].concat()),
        SocketAddr::V6(s) => (0x21, [&s.ip().octets()[..], &[0; 15], &[1]].concat()),
    };
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    block.extend_from_slice(&[0x04, 0, 5, b'n', b'o', b'i', b's', b'e']);
    v2_header(0x21, family, &block)
}

fn v2_header(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(version_command);
    out.push(family);
    out.extend_from_slice(&u16::try_from(block.len()).expect("short").to_be_bytes());
    out.extend_from_slice(block);
    out
}

fn socket(text: &str) -> SocketAddr {
    text.parse().expect("an address")
}

const PROXY_PROTOCOL: &str = "trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\nproxy_protocol = true";

#[tokio::test]
async fn a_proxy_protocol_source_is_the_client_the_backend_hears_of() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let proxy = Proxy::from_toml(&config(PROXY_PROTOCOL, ws.addr, web));
    let v4 = socket("203.0.113.7:5555");
    let v6 = socket("[2001:db8::7]:5555");
    for (header, ip, forwarded_for) in [
        (v1(v4), "203.0.113.7", "for=203.0.113.7"),
        (v2(v4), "203.0.113.7", "for=203.0.113.7"),
        (v1(v6), "2001:db8::7", "for=\"[2001:db8::7]\""),
        (v2(v6), "2001:db8::7", "for=\"[2001:db8::7]\""),
    ] {
        let what = String::from_utf8_lossy(&header[..14]).into_owned();
        let up = upgrade_via(proxy.addr, TRUSTED, &header, "/headers", CHAIN).await;
        assert_eq!(up.status, 101, "{what}: {}", up.head);
        assert_eq!(values(&up.headers, "x-forwarded-for"), [ip], "{what}");
        assert_eq!(values(&up.headers, "x-real-ip"), [ip], "{what}");
        let forwarded = format!("{forwarded_for};proto=http;host=\"test.local\"");
        assert_eq!(values(&up.headers, "forwarded"), [forwarded.as_str()], "{what}");
        let (status, seen) = plain_via(proxy.addr, TRUSTED, &header, "/page", CHAIN).await;
        assert_eq!(status, 200, "{what}");
        assert_eq!(values(&seen, "x-real-ip"), [ip], "{what}: plain");
        assert_eq!(values(&seen, "x-forwarded-for"), [ip], "{what}: plain");
    }
    // A source that is itself a trusted proxy: its forwarding headers are believed.
    let up = upgrade_via(proxy.addr, TRUSTED, &v2(socket("10.0.0.3:80")), "/headers", CHAIN).await;
    assert_forwarding(
        &up.headers,
        as_refs(&appended_chain("10.0.0.3")),
        "PROXY source 10.0.0.3",
    );
    // LOCAL (a proxy's health check) and UNKNOWN: the TCP peer stands.
    for header in [
        v2_header(0x20, 0x00, &[]),
        v2_header(0x20, 0x11, &[1; 12]),
        b"PROXY UNKNOWN\r\n".to_vec(),
    ] {
        let up = upgrade_via(proxy.addr, TRUSTED, &header, "/headers", "").await;
        assert_eq!(up.status, 101, "{header:?}: {}", up.head);
        assert_eq!(values(&up.headers, "x-real-ip"), ["127.0.0.1"], "{header:?}");
    }
}

#[tokio::test]
async fn a_listener_deny_refuses_a_proxy_protocol_source() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let listener = format!("{PROXY_PROTOCOL}\ndeny = [\"203.0.113.66\", \"2001:db8::66\"]");
    let proxy = Proxy::from_toml(&config(&listener, ws.addr, web));
    for source in ["203.0.113.66:1000", "[2001:db8::66]:1000"] {
        for header in [v1(socket(source)), v2(socket(source))] {
            let up = upgrade_via(proxy.addr, TRUSTED, &header, "/headers", "").await;
            assert_eq!(up.status, 403, "{source}: {}", up.head);
            let (status, _) = plain_via(proxy.addr, TRUSTED, &header, "/page", "").await;
            assert_eq!(status, 403, "{source}: plain");
        }
    }
    let up = upgrade_via(proxy.addr, TRUSTED, &v1(socket("203.0.113.67:1000")), "/headers", "").await;
    assert_eq!(up.status, 101, "{}", up.head);
}

#[tokio::test]
async fn per_ip_limits_count_the_proxy_protocol_source() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let listener = format!("{PROXY_PROTOCOL}\nmax_connections_per_ip = 1");
    let proxy = Proxy::from_toml(&config(&listener, ws.addr, web));
    let held = upgrade_via(proxy.addr, TRUSTED, &v1(socket("203.0.113.1:1")), "/headers", "").await;
    assert_eq!(held.status, 101, "{}", held.head);
    let again = upgrade_via(proxy.addr, TRUSTED, &v2(socket("203.0.113.1:2")), "/headers", "").await;
    assert_eq!(again.status, 429, "the same source: {}", again.head);
    let other = upgrade_via(proxy.addr, TRUSTED, &v2(socket("203.0.113.2:1")), "/headers", "").await;
    assert_eq!(
        other.status, 101,
        "another source through the same proxy: {}",
        other.head
    );
    drop(held);
}

#[tokio::test]
async fn a_proxy_protocol_header_from_an_untrusted_peer_is_a_bad_request() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let proxy = Proxy::from_toml(&config(PROXY_PROTOCOL, ws.addr, web));
    let source = socket("203.0.113.7:5555");
    for header in [v1(source), v2(source)] {
        let up = upgrade_via(proxy.addr, UNTRUSTED, &header, "/headers", "").await;
        assert_eq!(up.status, 400, "{}", up.head);
        let (status, _) = plain_via(proxy.addr, UNTRUSTED, &header, "/page", "").await;
        assert_eq!(status, 400);
    }
    // Nor from a trusted peer on a listener without proxy_protocol.
    let plain = Proxy::from_toml(&config(TRUST_LOOPBACK, ws.addr, web));
    let up = upgrade_via(plain.addr, TRUSTED, &v1(source), "/headers", "").await;
    assert_eq!(up.status, 400, "{}", up.head);
}

#[tokio::test]
async fn a_trusted_peer_without_a_valid_proxy_protocol_header_is_refused_and_closed() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let proxy = Proxy::from_toml(&config(PROXY_PROTOCOL, ws.addr, web));
    let mut bad_version = v2(socket("203.0.113.7:1"));
    bad_version[12] = 0x11;
    for preface in [
        Vec::new(),
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1\r\n".to_vec(),
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\n".to_vec(),
        bad_version,
    ] {
        let mut stream = connect_from(TRUSTED, proxy.addr).await;
        let request = [&preface[..], upgrade_request("/headers", "").as_bytes()].concat();
        stream.write_all(&request).await.expect("write");
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{preface:?}: {answer}");
        assert!(answer.contains("PROXY protocol header"), "{answer}");
    }
    // A header cut short by the peer's close: nothing to answer.
    let mut stream = connect_from(TRUSTED, proxy.addr).await;
    stream.write_all(b"PROXY TCP4 203.0").await.expect("write");
    stream.shutdown().await.expect("shutdown");
    assert_eq!(read_to_close(&mut stream).await, "");
    // A header that stops coming: 408 at the handshake timeout.
    let slow = format!(
        "[server]\nhandshake_timeout = \"300ms\"\n{}",
        config(PROXY_PROTOCOL, ws.addr, web)
    );
    let slow = Proxy::from_toml(&slow);
    let mut stream = connect_from(TRUSTED, slow.addr).await;
    stream.write_all(b"PROXY TCP4 203.0").await.expect("write");
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// The built binary with `config` (JSON logs) on a fresh port, once it listens; the port.
async fn binary_with(config: impl FnOnce(SocketAddr) -> String) -> (Binary, SocketAddr) {
    let addr = unused_addr();
    let path = std::env::temp_dir().join(format!("wsgate-forwarding-{}-{}.toml", std::process::id(), addr.port()));
    std::fs::write(&path, config(addr)).expect("write config");
    let mut wsgate = Binary::spawn(["run", "--config", path.to_str().expect("path")]);
    wsgate.wait_for_log(&["listening"]).await;
    let _ = std::fs::remove_file(&path);
    (wsgate, addr)
}

#[tokio::test]
async fn the_access_log_names_the_client_its_proxies_and_why_a_proxy_header_was_refused() {
    let ws = ws_backend("ws").await;
    let (web, _web) = http_backend("web").await;
    let (mut wsgate, addr) = binary_with(|addr| {
        format!(
            "[server]\nlog_format = \"json\"\n{}",
            config(PROXY_PROTOCOL, ws.addr, web)
        )
        .replace("127.0.0.1:0", &addr.to_string())
    })
    .await;

    let up = upgrade_via(addr, TRUSTED, &v1(socket("10.0.0.3:7000")), "/headers", CHAIN).await;
    assert_eq!(up.status, 101, "{}", up.head);
    drop(up);
    let line = wsgate.wait_for_log(&["\"status\":101"]).await;
    let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(record["client"], "198.51.100.1", "{line}");
    assert_eq!(record["via"], "10.0.0.3:7000", "{line}");
    assert!(
        record["proxy"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{line}"
    );

    let mut stream = connect_from(TRUSTED, addr).await;
    stream
        .write_all(upgrade_request("/headers", "").as_bytes())
        .await
        .expect("write");
    read_to_close(&mut stream).await;
    let line = wsgate.wait_for_log(&["PROXY protocol"]).await;
    assert!(
        line.contains("refused: trusted proxy sent no valid PROXY protocol header: no PROXY protocol signature"),
        "{line}"
    );
    assert!(line.contains("\"status\":400"), "{line}");

    let up = upgrade_via(addr, UNTRUSTED, &v2(socket("203.0.113.7:1")), "/headers", "").await;
    assert_eq!(up.status, 400, "{}", up.head);
    let line = wsgate.wait_for_log(&["PROXY protocol"]).await;
    assert!(
        line.contains("refused: PROXY protocol header from a peer it is not accepted from"),
        "{line}"
    );
    assert!(line.contains("\"client\":\"127.0.0.2:"), "{line}");
}
