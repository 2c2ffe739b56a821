//! Routing and server choice from a config file, with real backends and clients: host, wildcard host, path
//! prefix, exact path, regex and header routes with the first-match rule; 404 when nothing matches; plain HTTP
//! routed by the same rules; sticky cookies through real reconnecting clients; consistent hashing on a header.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Request headers a case sends.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// A config with one upstream per backend (`up0`, `up1`, ...) and the given route tables before them.
fn config(routes: &str, backends: &[SocketAddr]) -> String {
    let mut text = format!("[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\n{routes}\n");
    for (i, addr) in backends.iter().enumerate() {
        text.push_str(&format!(
            "[[upstream]]\nname = \"up{i}\"\n[[upstream.server]]\naddress = \"{addr}\"\n\n"
        ));
    }
    text
}

/// The name of the backend a WebSocket to `path` with these headers reaches.
async fn reached(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> String {
    let (mut ws, _) = connect_with(&proxy.url(path), headers).await;
    let name = backend_name(&mut ws).await;
    let _ = ws.close(None).await;
    name
}

#[tokio::test]
async fn routes_by_host_wildcard_path_regex_and_header_with_the_first_match_winning() {
    let mut backends = Vec::new();
    for name in ["tenant-a", "exact", "wild", "rooms", "api"] {
        backends.push(ws_backend(name).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let routes = r#"
[[route]]
headers = { "X-Tenant" = "a" }
upstream = "up0"

[[route]]
host = "chat.example.com"
path = "/ws"
upstream = "up1"

[[route]]
host = "*.example.com"
path_prefix = "/ws"
upstream = "up2"

[[route]]
path_regex = "^/rooms/[0-9]+$"
upstream = "up3"

[[route]]
host = "api.example.org"
upstream = "up4"
"#;
    let proxy = Proxy::from_toml(&config(routes, &addrs));
    let cases: [(&str, Headers, &str); 8] = [
        ("/ws", &[("Host", "chat.example.com")], "exact"),
        ("/ws?room=1", &[("Host", "CHAT.example.com:8080")], "exact"),
        ("/ws/more", &[("Host", "chat.example.com")], "wild"),
        ("/wsx", &[("Host", "a.b.example.com")], "wild"),
        ("/rooms/42", &[("Host", "elsewhere.org")], "rooms"),
        ("/anything", &[("Host", "api.example.org")], "api"),
        // The header route comes first: it wins over the exact host and path.
        ("/ws", &[("Host", "chat.example.com"), ("X-Tenant", "a")], "tenant-a"),
        // Header values compare exactly.
        ("/ws", &[("Host", "chat.example.com"), ("X-Tenant", "A")], "exact"),
    ];
    for (path, headers, want) in cases {
        assert_eq!(reached(&proxy, path, headers).await, want, "{path} with {headers:?}");
    }

    // Nothing matches: 404 with the reason, and the backends see nothing.
    for (path, host) in [("/ws", "example.com"), ("/rooms/42a", "elsewhere.org")] {
        let request = upgrade_request(path, "").replace("Host: test.local", &format!("Host: {host}"));
        let answer = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 404 "), "{host}{path}: {answer}");
        assert!(
            answer.contains(&format!("no route for host `{host}` and path `{path}`")),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn plain_http_requests_follow_the_same_routes_on_one_keep_alive_connection() {
    let (a, _a) = http_backend("alpha").await;
    let (b, _b) = http_backend("beta").await;
    let routes = r#"
[[route]]
path_prefix = "/alpha"
upstream = "up0"

[[route]]
path_prefix = "/beta"
upstream = "up1"
"#;
    let proxy = Proxy::from_toml(&config(routes, &[a, b]));
    // Three requests on one connection: each goes where its path says, the last one closes.
    let requests = "GET /alpha/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /beta/2 HTTP/1.1\r\nHost: x\r\n\r\n\
                    GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(proxy.addr, requests.as_bytes()).await;
    let alpha = answer.find("alpha /alpha/1").expect(&answer);
    let beta = answer.find("beta /beta/2").expect(&answer);
    let missing = answer.find("HTTP/1.1 404 ").expect(&answer);
    assert!(alpha < beta && beta < missing, "{answer}");
    assert!(answer.contains("no route for host `x` and path `/nowhere`"), "{answer}");
}

fn set_cookie(headers: &http::HeaderMap) -> Option<String> {
    headers.get_all("set-cookie").iter().find_map(|v| {
        v.to_str()
            .ok()
            .filter(|v| v.starts_with("SERVERID="))
            .map(str::to_string)
    })
}

fn cookie_value(set_cookie: &str) -> &str {
    set_cookie
        .split(';')
        .next()
        .and_then(|p| p.strip_prefix("SERVERID="))
        .expect("SERVERID value")
}

#[tokio::test]
async fn sticky_cookie_brings_a_reconnecting_client_back_and_moves_it_when_its_backend_stops() {
    let mut backends = Vec::new();
    for name in ["s0", "s1", "s2"] {
        backends.push(ws_backend(name).await);
    }
    let servers: String = backends
        .iter()
        .map(|b| format!("[[upstream.server]]\naddress = \"{}\"\n", b.addr))
        .collect();
    let text = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"

[[route]]
upstream = "app"

[[upstream]]
name = "app"
sticky = {{ cookie = "SERVERID", secret = "test-secret", max_age = "1h" }}
{servers}"#
    );
    let proxy = Proxy::from_toml(&text);

    let (mut ws, headers) = connect_with(&proxy.url("/"), &[]).await;
    let first = backend_name(&mut ws).await;
    let cookie = set_cookie(&headers).expect("the first 101 sets the sticky cookie");
    assert!(
        cookie.contains("; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600"),
        "{cookie}"
    );
    let id = cookie_value(&cookie).to_string();
    assert!(!id.contains("127.0.0.1"), "the cookie reveals no address: {id}");
    drop(ws);

    let header = format!("other=1; SERVERID={id}");
    for i in 0..20 {
        let (mut ws, headers) = connect_with(&proxy.url("/headers"), &[("Cookie", &header)]).await;
        // The backend's report: the sticky cookie was taken out of the forwarded request, the other kept.
        let report: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).expect("json");
        assert_eq!(report["backend"], first.as_str(), "reconnect {i} landed elsewhere");
        let cookies: Vec<&str> = report["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case("cookie")))
            .filter_map(|h| h[1].as_str())
            .collect();
        assert_eq!(cookies, ["other=1"], "what the backend got");
        assert_eq!(
            set_cookie(&headers),
            None,
            "a client stuck to its server gets no new cookie"
        );
    }

    // Its backend stops: the client lands on another and is given a cookie naming that one.
    let index = ["s0", "s1", "s2"]
        .iter()
        .position(|n| *n == first)
        .expect("known backend");
    backends[index].kill();
    let (mut ws, headers) = connect_with(&proxy.url("/"), &[("Cookie", &header)]).await;
    let moved = backend_name(&mut ws).await;
    assert_ne!(moved, first);
    let new_cookie = set_cookie(&headers).expect("a new cookie after the move");
    assert_ne!(cookie_value(&new_cookie), id);
    let (mut ws, _) = connect_with(
        &proxy.url("/"),
        &[("Cookie", &format!("SERVERID={}", cookie_value(&new_cookie)))],
    )
    .await;
    assert_eq!(backend_name(&mut ws).await, moved, "the new cookie sticks");
}

#[tokio::test]
async fn plain_http_answers_carry_the_sticky_cookie() {
    let (a, _a) = http_backend("alpha").await;
    let (b, _b) = http_backend("beta").await;
    let text = format!(
        r#"
[[listener]]
name = "public"
address = "127.0.0.1:0"
[[route]]
upstream = "app"
[[upstream]]
name = "app"
sticky = {{ cookie = "SERVERID" }}
[[upstream.server]]
address = "{a}"
[[upstream.server]]
address = "{b}"
"#
    );
    let proxy = Proxy::from_toml(&text);
    let answer = raw_exchange(proxy.addr, b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let line = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: serverid="))
        .unwrap_or_else(|| panic!("no sticky cookie: {answer}"));
    let id = line
        .split_once('=')
        .and_then(|(_, v)| v.split(';').next())
        .expect("value");
    let name = if answer.contains("alpha /p") { "alpha" } else { "beta" };
    for _ in 0..5 {
        let request = format!("GET /q HTTP/1.1\r\nHost: x\r\nCookie: SERVERID={id}\r\nConnection: close\r\n\r\n");
        let again = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(again.contains(&format!("{name} /q")), "{again}");
        assert!(!again.to_ascii_lowercase().contains("set-cookie"), "{again}");
        assert!(
            !again.contains("cookie: SERVERID"),
            "the cookie is not forwarded: {again}"
        );
    }
}

#[tokio::test]
async fn consistent_hash_on_a_header_keeps_each_key_on_one_backend() {
    let mut backends = Vec::new();
    for name in ["h0", "h1", "h2"] {
        backends.push(ws_backend(name).await);
    }
    let servers: String = backends
        .iter()
        .map(|b| format!("[[upstream.server]]\naddress = \"{}\"\n", b.addr))
        .collect();
    let text = format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"app\"\n[[upstream]]\nname = \"app\"\n\
         balance = \"consistent_hash\"\nhash_key = \"header:X-User\"\n{servers}"
    );
    let proxy = Proxy::from_toml(&text);
    let mut seen: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for user in 0..12 {
            let user = format!("user-{user}");
            let (mut ws, _) = connect_with(&proxy.url("/"), &[("X-User", &user)]).await;
            ws.send(Message::text("name?")).await.expect("send");
            let name = next_text(&mut ws).await;
            let first = seen.entry(user.clone()).or_insert_with(|| name.clone());
            assert_eq!(*first, name, "{user} moved in round {round}");
        }
    }
    let used: HashSet<&String> = seen.values().collect();
    assert!(used.len() >= 2, "12 keys all hashed to one of 3 servers: {seen:?}");
}

#[tokio::test]
async fn plain_http_requests_on_one_connection_are_each_hashed_to_their_server() {
    let (a, _a) = http_backend("alpha").await;
    let (b, _b) = http_backend("beta").await;
    let text = format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"app\"\n[[upstream]]\nname = \"app\"\n\
         balance = \"consistent_hash\"\nhash_key = \"path\"\n[[upstream.server]]\naddress = \"{a}\"\n\
         [[upstream.server]]\naddress = \"{b}\"\n"
    );
    let proxy = Proxy::from_toml(&text);
    // Where each path goes on a connection of its own.
    let mut owner = Vec::new();
    for i in 0..10 {
        let request = format!("GET /p{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(proxy.addr, request.as_bytes()).await;
        owner.push(if answer.contains(&format!("alpha /p{i}")) {
            "alpha"
        } else {
            "beta"
        });
    }
    assert!(owner.contains(&"alpha") && owner.contains(&"beta"), "{owner:?}");
    // The same paths on one keep-alive connection go to the same servers.
    let mut requests: String = (0..10)
        .map(|i| format!("GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n"))
        .collect();
    requests.push_str("GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange(proxy.addr, requests.as_bytes()).await;
    for (i, name) in owner.iter().enumerate() {
        assert!(
            answer.contains(&format!("{name} /p{i}\n")),
            "/p{i} should reach {name}: {answer}"
        );
    }
}
