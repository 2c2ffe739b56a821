//! Who may connect: `allow` / `deny` on a listener and on a route (403), the `Origin` of upgrades (403), connections
//! per client address on a listener (429) and overall (503 + `Retry-After`). Clients come from several loopback
//! addresses (127.0.0.2 ...), as they would from several hosts.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::raw::{connect_from, header_value, read_head};
use support::*;

/// Sends `request` from 127.0.0.`last`; the answer's status and head, and the connection (open for a 101).
async fn ask_from(last: u8, addr: SocketAddr, request: &str) -> (u16, String, TcpStream) {
    let mut stream = connect_from(last, addr).await;
    stream.write_all(request.as_bytes()).await.expect("write");
    let (head, rest) = within("an answer", read_head(&mut stream)).await;
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let text = format!("{head}{}", String::from_utf8_lossy(&rest));
    (status, text, stream)
}

async fn upgrade_from(last: u8, addr: SocketAddr, path: &str, extra: &str) -> (u16, String, TcpStream) {
    ask_from(last, addr, &upgrade_request(path, extra)).await
}

fn plain_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n")
}

/// Config text: one listener with `listener` keys, the routes given, one upstream on `backend`.
fn config(server: &str, listener: &str, routes: &str, backend: SocketAddr) -> String {
    format!(
        "[server]\n{server}\n[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n{listener}\n{routes}\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{backend}\"\n"
    )
}

#[tokio::test]
async fn listener_deny_and_allow_lists_answer_403() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::from_toml(&config(
        "",
        "allow = [\"127.0.0.0/29\"]\ndeny = [\"127.0.0.2\"]",
        "[[route]]\nupstream = \"app\"\n",
        backend.addr,
    ));
    let (status, answer, _) = upgrade_from(2, proxy.addr, "/", "").await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.ends_with("\r\n\r\nforbidden\n"), "{answer}");
    let (status, answer, _) = ask_from(2, proxy.addr, &plain_request("/")).await;
    assert_eq!(status, 403, "plain requests too: {answer}");
    let (status, answer, _) = upgrade_from(9, proxy.addr, "/", "").await;
    assert_eq!(status, 403, "127.0.0.9 is outside the allow list: {answer}");
    let (status, answer, _) = upgrade_from(1, proxy.addr, "/", "").await;
    assert_eq!(status, 101, "{answer}");
}

#[tokio::test]
async fn route_allow_list_answers_403_on_that_route_only() {
    let backend = ws_backend("a").await;
    let routes = "[[route]]\npath_prefix = \"/admin\"\nupstream = \"app\"\nallow = [\"127.0.0.3/32\"]\n\
                  [[route]]\nupstream = \"app\"\n";
    let proxy = Proxy::from_toml(&config("", "", routes, backend.addr));
    let (status, answer, _) = upgrade_from(1, proxy.addr, "/admin", "").await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer, _) = ask_from(1, proxy.addr, &plain_request("/admin/page")).await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer, _) = upgrade_from(1, proxy.addr, "/chat", "").await;
    assert_eq!(status, 101, "{answer}");
    let (status, answer, _) = upgrade_from(3, proxy.addr, "/admin", "").await;
    assert_eq!(status, 101, "{answer}");
}

#[tokio::test]
async fn upgrade_from_an_origin_not_allowed_answers_403() {
    let backend = ws_backend("a").await;
    let routes = "[[route]]\npath = \"/strict\"\nupstream = \"app\"\nallowed_origins = [\"https://app.example.com\"]\n\
                  allow_missing_origin = false\n\
                  [[route]]\nupstream = \"app\"\nallowed_origins = [\"https://app.example.com\", \"https://*.example.com\"]\n";
    let proxy = Proxy::from_toml(&config("", "", routes, backend.addr));
    for (path, origin, expected) in [
        ("/", Some("https://evil.example.net"), 403),
        ("/", Some("https://example.com"), 403),
        ("/", Some("http://app.example.com"), 403),
        ("/", Some("https://app.example.com"), 101),
        ("/", Some("https://eu.example.com"), 101),
        ("/", None, 101),
        ("/strict", None, 403),
        ("/strict", Some("https://app.example.com"), 101),
    ] {
        let extra = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        let (status, answer, _) = upgrade_from(1, proxy.addr, path, &extra).await;
        assert_eq!(status, expected, "{path} from {origin:?}: {answer}");
        if expected == 403 {
            assert!(answer.ends_with("\r\n\r\norigin not allowed\n"), "{answer}");
        }
    }
    // Two origins could be read two ways: refused.
    let two = "Origin: https://app.example.com\r\nOrigin: https://evil.example.net\r\n";
    let (status, answer, _) = upgrade_from(1, proxy.addr, "/", two).await;
    assert_eq!(status, 400, "{answer}");
    // A plain request is no cross-site WebSocket: the rule applies to upgrades only.
    let (status, answer, _) = ask_from(1, proxy.addr, &plain_request("/page")).await;
    assert_ne!(status, 403, "{answer}");
}

/// Opens upgrades from 127.0.0.`last` until one gets `status` (earlier ones fail the test), within [`WAIT`].
async fn until_status(last: u8, addr: SocketAddr, status: u16) -> TcpStream {
    within(&format!("a {status} from 127.0.0.{last}"), async {
        loop {
            let (got, answer, stream) = upgrade_from(last, addr, "/", "").await;
            if got == status {
                return stream;
            }
            assert!(got == 429 || got == 503, "{answer}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn connections_over_max_connections_per_ip_answer_429() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::from_toml(&config(
        "",
        "max_connections_per_ip = 2",
        "[[route]]\nupstream = \"app\"\n",
        backend.addr,
    ));
    let (s1, answer, first) = upgrade_from(4, proxy.addr, "/", "").await;
    assert_eq!(s1, 101, "{answer}");
    let (s2, answer, _second) = upgrade_from(4, proxy.addr, "/", "").await;
    assert_eq!(s2, 101, "{answer}");
    let (status, answer, _) = upgrade_from(4, proxy.addr, "/", "").await;
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer.ends_with("\r\n\r\ntoo many connections from this address\n"),
        "{answer}"
    );
    let (status, answer, _other) = upgrade_from(5, proxy.addr, "/", "").await;
    assert_eq!(status, 101, "another client is not held back: {answer}");
    // Room comes back when a connection of that client ends.
    drop(first);
    let _again = until_status(4, proxy.addr, 101).await;
}

#[tokio::test]
async fn connections_over_the_overall_max_connections_answer_503_with_retry_after() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::from_toml(&config(
        "max_connections = 3",
        "",
        "[[route]]\nupstream = \"app\"\n",
        backend.addr,
    ));
    let mut held = Vec::new();
    for last in [2, 3, 4] {
        let (status, answer, stream) = upgrade_from(last, proxy.addr, "/", "").await;
        assert_eq!(status, 101, "{answer}");
        held.push(stream);
    }
    let (status, answer, _) = upgrade_from(5, proxy.addr, "/", "").await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(header_value(&answer, "retry-after"), Some("1"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nserver at its connection limit\n"), "{answer}");
    held.pop();
    let _again = until_status(5, proxy.addr, 101).await;
}

#[tokio::test]
async fn handshakes_faster_than_the_rate_per_ip_answer_429_with_retry_after() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::from_toml(&config(
        "",
        "handshakes_per_second_per_ip = 1\nhandshake_burst = 1",
        "[[route]]\nupstream = \"app\"\n",
        backend.addr,
    ));
    // A rate of 1 per second with a burst of 1: two at once, then one a second.
    for _ in 0..2 {
        let (status, answer, _) = upgrade_from(6, proxy.addr, "/", "").await;
        assert_eq!(status, 101, "{answer}");
    }
    let (status, answer, _) = upgrade_from(6, proxy.addr, "/", "").await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(header_value(&answer, "retry-after"), Some("1"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\ntoo many handshakes from this address\n"),
        "{answer}"
    );
    let (status, answer, _) = upgrade_from(7, proxy.addr, "/", "").await;
    assert_eq!(status, 101, "another client has its own rate: {answer}");
    // Plain requests are no handshakes.
    let (status, answer, _) = ask_from(6, proxy.addr, &plain_request("/")).await;
    assert_ne!(status, 429, "{answer}");
    // A second later there is room again.
    let _again = until_status(6, proxy.addr, 101).await;
}
