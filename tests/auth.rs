//! Authentication at the handshake: JWTs (every way a token can be wrong, in each place it can travel: bearer,
//! cookie, query, subprotocol), RS256, ES256 and EdDSA keys, JWKS files and URLs, a session closed with 1008 when
//! its token expires, API keys with their per-key limits, and the command line (`hash-key`, `check`). Real
//! sockets, real backends; the keys under `tests/auth/` are test-only.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::raw::{header_value, read_head};
use support::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/auth").join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// A token signed with `alg` and the private key (or secret) `key`, with `kid` when given.
fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

fn rs_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read("rs.key.pem")).expect("RSA key")
}
fn es_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&read("es.key.pem")).expect("EC key")
}
fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_pem(&read("ed.key.pem")).expect("Ed25519 key")
}

/// Claims that pass the table route's checks, with `extra` on top.
fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "sub": "alice", "iss": "https://issuer.test", "aud": "wsgate", "exp": now() + 600, "nbf": now() - 10,
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Config text: one listener, `routes`, and the upstreams `ws` (a WebSocket backend) and `http` (when given).
fn config(routes: &str, ws: SocketAddr, http: Option<SocketAddr>) -> String {
    let mut text = format!(
        "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n{routes}\n\
         [[upstream]]\nname = \"ws\"\n[[upstream.server]]\naddress = \"{ws}\"\n"
    );
    if let Some(http) = http {
        text.push_str(&format!(
            "[[upstream]]\nname = \"http\"\n[[upstream.server]]\naddress = \"{http}\"\n"
        ));
    }
    text
}

/// Sends `request`; the answer's status and head, and the connection (open after a 101).
async fn ask(addr: SocketAddr, request: &str) -> (u16, String, TcpStream) {
    let mut stream = within("connect", TcpStream::connect(addr)).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let (head, _) = within("an answer", read_head(&mut stream)).await;
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, stream)
}

/// The backend's next upgrade (ends of earlier connections passed over): its path and headers.
async fn next_upgrade(backend: &mut Backend) -> (String, Vec<(String, String)>) {
    loop {
        if let Event::Upgraded { path, headers } = backend.next_event().await {
            return (path, headers);
        }
    }
}

/// Reads a whole answer with a `Content-Length`: its head and its body.
async fn read_answer(stream: &mut TcpStream) -> (String, String) {
    let (head, mut body) = read_head(stream).await;
    let length: usize = header_value(&head, "content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no length: {head}"));
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = within("the body", stream.read(&mut chunk)).await.expect("read");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Where the token travels.
#[derive(Debug, Clone, Copy)]
enum Form {
    Bearer,
    Cookie,
    Query,
    Subprotocol,
}

/// An upgrade request for `/ws` with `token` in `form`, and forged identity headers (one spelled with
/// underscores, which CGI-style backends read as the same header).
fn upgrade_with(form: Form, token: &str) -> String {
    let forged = "X-Auth-Subject: admin\r\nX_Auth_Subject: admin\r\n";
    match form {
        Form::Bearer => upgrade_request("/ws?x=1", &format!("{forged}Authorization: Bearer {token}\r\n")),
        Form::Cookie => upgrade_request("/ws?x=1", &format!("{forged}Cookie: theme=dark; session={token}\r\n")),
        Form::Query => upgrade_request(&format!("/ws?x=1&token={token}"), forged),
        Form::Subprotocol => upgrade_request(
            "/ws?x=1",
            &format!("{forged}Sec-WebSocket-Protocol: chat, bearer.{token}\r\n"),
        ),
    }
}

const TABLE_ROUTE: &str = r#"
[[route]]
path_prefix = "/ws"
upstream = "ws"
[route.auth.jwt]
public_key_file = "RS_PUB"
algorithms = ["RS256"]
issuer = "https://issuer.test"
audience = "wsgate"
from = ["bearer", "cookie:session", "query:token", "subprotocol"]
"#;

fn table_route() -> String {
    TABLE_ROUTE.replace("RS_PUB", &fixture("rs.pub.pem").display().to_string())
}

#[tokio::test]
async fn every_bad_token_is_refused_in_every_form_and_a_good_one_forwards_only_the_identity() {
    let mut backend = ws_backend("app").await;
    let proxy = Proxy::from_toml(&config(&table_route(), backend.addr, None));
    let rs = rs_key();
    let valid = sign(Algorithm::RS256, &rs, None, claims(serde_json::json!({})));
    let parts: Vec<&str> = valid.split('.').collect();
    let tampered = format!(
        "{}.{}.{}A",
        parts[0],
        b64(br#"{"sub":"root","exp":9999999999}"#),
        parts[2]
    );
    let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let not_json = format!("{}.{}.{}", b64(b"this is no json"), parts[1], parts[2]);
    // Algorithm confusion: an HS256 token whose secret is the RSA public key's PEM.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&read("rs.pub.pem")),
        None,
        claims(serde_json::json!({})),
    );
    let cases: [(&str, String); 9] = [
        (
            "expired",
            sign(
                Algorithm::RS256,
                &rs,
                None,
                claims(serde_json::json!({"exp": now() - 120})),
            ),
        ),
        (
            "not yet valid",
            sign(
                Algorithm::RS256,
                &rs,
                None,
                claims(serde_json::json!({"nbf": now() + 120})),
            ),
        ),
        (
            "wrong audience",
            sign(Algorithm::RS256, &rs, None, claims(serde_json::json!({"aud": "other"}))),
        ),
        (
            "wrong issuer",
            sign(
                Algorithm::RS256,
                &rs,
                None,
                claims(serde_json::json!({"iss": "https://evil.test"})),
            ),
        ),
        ("alg none", none),
        ("HS/RS confusion", confused),
        ("tampered signature", tampered),
        ("header not JSON", not_json),
        ("garbage", "abc".into()),
    ];
    for form in [Form::Bearer, Form::Cookie, Form::Query, Form::Subprotocol] {
        for (case, token) in &cases {
            let (status, head, _) = ask(proxy.addr, &upgrade_with(form, token)).await;
            assert_eq!(status, 401, "{case} in {form:?}: {head}");
            assert_eq!(
                header_value(&head, "www-authenticate"),
                Some(r#"Bearer realm="wsgate", error="invalid_token""#),
                "{case} in {form:?}: {head}"
            );
            assert!(!head.contains(token.as_str()) || token.len() < 4, "{head}");
        }
        let (status, head, _stream) = ask(proxy.addr, &upgrade_with(form, &valid)).await;
        assert_eq!(status, 101, "valid token in {form:?}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("bearer."),
            "the 101 echoes no token: {head}"
        );
        let (path, headers) = next_upgrade(&mut backend).await;
        assert_eq!(path, "/ws?x=1", "{form:?}: the token is not forwarded in the query");
        let values = |name: &str| -> Vec<&str> {
            headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(values("x-auth-subject"), ["alice"], "{form:?}: {headers:?}");
        assert!(values("x_auth_subject").is_empty(), "{form:?}: {headers:?}");
        assert!(values("authorization").is_empty(), "{form:?}: {headers:?}");
        assert!(
            values("cookie").iter().all(|c| !c.contains("session=")),
            "{form:?}: {headers:?}"
        );
        let protocols = values("sec-websocket-protocol");
        assert!(
            protocols.iter().all(|p| !p.contains("bearer.")),
            "{form:?}: {headers:?}"
        );
        if matches!(form, Form::Subprotocol) {
            assert_eq!(protocols, ["chat"]);
            assert_eq!(header_value(&head, "sec-websocket-protocol"), Some("chat"), "{head}");
        }
        if matches!(form, Form::Cookie) {
            assert_eq!(values("cookie"), ["theme=dark"]);
        }
    }
}

#[tokio::test]
async fn a_missing_token_gets_a_challenge_without_an_error_and_a_huge_one_431() {
    let backend = ws_backend("app").await;
    let proxy = Proxy::from_toml(&config(&table_route(), backend.addr, None));
    let (status, head, _) = ask(proxy.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status, 401, "{head}");
    assert_eq!(
        header_value(&head, "www-authenticate"),
        Some(r#"Bearer realm="wsgate""#)
    );
    let plain = "GET /ws/page HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(proxy.addr, plain.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 401 "), "a plain request too: {answer}");
    assert!(answer.ends_with("\r\n\r\nunauthorized\n"), "{answer}");
    // 100 KiB is beyond any request head wsgate reads (32 KiB): refused before routing, as any such head is.
    let huge = "a".repeat(100 * 1024);
    let answer = raw_exchange(proxy.addr, upgrade_with(Form::Bearer, &huge).as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431 "),
        "{}",
        &answer[..answer.len().min(200)]
    );
}

#[tokio::test]
async fn plain_requests_and_keep_alive_upgrades_are_authenticated_through_hyper() {
    let mut backend = ws_backend("app").await;
    let (http, _task) = http_backend("web").await;
    let secret = fixture("hs.key").display().to_string();
    let routes = format!(
        "[[route]]\npath_prefix = \"/page\"\nupstream = \"http\"\n[route.auth.jwt]\nsecret_file = \"{secret}\"\n\
         algorithms = [\"HS256\"]\nfrom = [\"bearer\", \"query:token\"]\n\
         claims_to_headers = {{ sub = \"X-User\", tenant = \"X-Tenant\" }}\n\
         [[route]]\npath_prefix = \"/ws\"\nupstream = \"ws\"\n[route.auth.jwt]\nsecret_file = \"{secret}\"\n\
         algorithms = [\"HS256\"]\nfrom = [\"bearer\", \"query:token\", \"subprotocol\"]\n\
         claims_to_headers = {{ sub = \"X-User\", tenant = \"X-Tenant\" }}\n"
    );
    let proxy = Proxy::from_toml(&config(&routes, backend.addr, Some(http)));
    // The secret is the file's content without its trailing newline.
    let key = hs_key();
    let token = sign(
        Algorithm::HS256,
        &key,
        None,
        serde_json::json!({"sub": "bob", "tenant": 42, "exp": now() + 600}),
    );
    let mut stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    let get = |auth: &str| format!("GET /page?a=1 HTTP/1.1\r\nHost: test.local\r\nX-User: forged\r\n{auth}\r\n");
    stream.write_all(get("").as_bytes()).await.expect("write");
    let (head, _) = read_answer(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
    let bearer = format!("Authorization: Bearer {token}\r\n");
    stream.write_all(get(&bearer).as_bytes()).await.expect("write");
    let (head, body) = read_answer(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(body.contains("x-user: bob\n"), "{body}");
    assert!(body.contains("x-tenant: 42\n"), "{body}");
    assert!(!body.contains("forged") && !body.contains("authorization"), "{body}");
    // An upgrade on the same keep-alive connection goes through hyper: a bad token first, then a good one.
    stream
        .write_all(upgrade_request("/ws?token=nope", "").as_bytes())
        .await
        .expect("write");
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
    assert!(head.contains(r#"error="invalid_token""#), "{head}");
    let mut stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    stream.write_all(get(&bearer).as_bytes()).await.expect("write");
    let (head, _) = read_answer(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let upgrade = upgrade_request(
        &format!("/ws?token={token}&b=2"),
        "X-User: forged\r\nSec-WebSocket-Protocol: bearer.x, v1\r\n",
    );
    stream.write_all(upgrade.as_bytes()).await.expect("write");
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(!head.contains("bearer."), "{head}");
    let (path, headers) = next_upgrade(&mut backend).await;
    assert_eq!(path, "/ws?b=2");
    let users: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k == "x-user")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(users, ["bob"], "{headers:?}");
    assert!(
        headers.iter().any(|(k, v)| k == "sec-websocket-protocol" && v == "v1"),
        "{headers:?}"
    );
}

#[tokio::test]
async fn es256_eddsa_and_rs256_public_keys_and_a_jwks_file_verify_their_tokens() {
    let mut backend = ws_backend("app").await;
    let route = |prefix: &str, key: &str, file: &str, algs: &str| {
        format!(
            "[[route]]\npath_prefix = \"{prefix}\"\nupstream = \"ws\"\n[route.auth.jwt]\n{key} = \"{}\"\n\
             algorithms = {algs}\n",
            fixture(file).display()
        )
    };
    let routes = [
        route("/es", "public_key_file", "es.pub.pem", "[\"ES256\"]"),
        route("/ed", "public_key_file", "ed.pub.pem", "[\"EdDSA\"]"),
        route("/rs", "public_key_file", "rs.pub.pem", "[\"RS256\"]"),
        route(
            "/set",
            "jwks_file",
            "keys.jwks.json",
            "[\"ES256\", \"RS256\", \"EdDSA\"]",
        ),
    ]
    .concat();
    let proxy = Proxy::from_toml(&config(&routes, backend.addr, None));
    let c = || serde_json::json!({"sub": "carol", "exp": now() + 600});
    let es = sign(Algorithm::ES256, &es_key(), None, c());
    let ed = sign(Algorithm::EdDSA, &ed_key(), None, c());
    let rs = sign(Algorithm::RS256, &rs_key(), None, c());
    for (path, token, expected) in [
        ("/es", &es, 101),
        ("/ed", &ed, 101),
        ("/rs", &rs, 101),
        ("/es", &rs, 401),
        ("/rs", &ed, 401),
    ] {
        let (status, head, _stream) = ask(proxy.addr, &upgrade_with_bearer(path, token)).await;
        assert_eq!(status, expected, "{path}: {head}");
        if status == 101 {
            next_upgrade(&mut backend).await;
        }
    }
    let kid = |alg, key: &EncodingKey, kid| sign(alg, key, Some(kid), c());
    for (token, expected) in [
        (kid(Algorithm::ES256, &es_key(), "es-1"), 101),
        (kid(Algorithm::RS256, &rs_key(), "rs-1"), 101),
        (kid(Algorithm::EdDSA, &ed_key(), "ed-1"), 101),
        (es.clone(), 101),
        (kid(Algorithm::ES256, &es_key(), "unknown"), 401),
        (kid(Algorithm::ES256, &es_key(), "rs-1"), 401),
    ] {
        let (status, head, _stream) = ask(proxy.addr, &upgrade_with_bearer("/set", &token)).await;
        assert_eq!(status, expected, "{head}");
        if status == 101 {
            next_upgrade(&mut backend).await;
        }
    }
}

fn upgrade_with_bearer(path: &str, token: &str) -> String {
    upgrade_request(path, &format!("Authorization: Bearer {token}\r\n"))
}

/// A tiny HTTP server that serves `body` at any path and counts the requests.
async fn jwks_server(body: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let (_head, _) = read_head(&mut stream).await;
            counted.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_jwks_url_is_fetched_and_unknown_kids_refetch_it_at_most_every_30_seconds() {
    let mut backend = ws_backend("app").await;
    let (jwks, fetches) = jwks_server(read("keys.jwks.json")).await;
    let routes = format!(
        "[[route]]\nupstream = \"ws\"\n[route.auth.jwt]\njwks_url = \"http://{jwks}/.well-known/jwks.json\"\n\
         algorithms = [\"ES256\"]\n"
    );
    let proxy = Proxy::from_toml(&config(&routes, backend.addr, None));
    let c = serde_json::json!({"sub": "dave", "exp": now() + 600});
    let good = sign(Algorithm::ES256, &es_key(), Some("es-1"), c.clone());
    let (status, head, _stream) = ask(proxy.addr, &upgrade_with_bearer("/", &good)).await;
    assert_eq!(status, 101, "{head}");
    backend.next_event().await;
    let fetched = fetches.load(Ordering::SeqCst);
    assert!((1..=2).contains(&fetched), "{fetched} fetches");
    for i in 0..5 {
        let unknown = sign(Algorithm::ES256, &es_key(), Some(&format!("rotated-{i}")), c.clone());
        let (status, head, _) = ask(proxy.addr, &upgrade_with_bearer("/", &unknown)).await;
        assert_eq!(status, 401, "{head}");
    }
    let after = fetches.load(Ordering::SeqCst);
    assert!(
        after <= fetched + 1,
        "unknown kids may refetch the set at most once in 30 s: {fetched} then {after}"
    );
}

#[tokio::test]
async fn a_session_is_closed_with_1008_when_its_token_expires() {
    let mut backend = ws_backend("app").await;
    let routes = format!(
        "[[route]]\nupstream = \"ws\"\nrelay = \"frames\"\n[route.auth.jwt]\nsecret_file = \"{}\"\n\
         algorithms = [\"HS256\"]\nclose_on_expiry = true\nleeway = \"0s\"\n",
        fixture("hs.key").display()
    );
    let proxy = Proxy::from_toml(&config(&routes, backend.addr, None));
    let key = hs_key();
    let token = sign(
        Algorithm::HS256,
        &key,
        None,
        serde_json::json!({"sub": "eve", "exp": now() + 2}),
    );
    let auth = format!("Bearer {token}");
    let (mut ws, _) = connect_with(&proxy.url("/"), &[("Authorization", &auth)]).await;
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));
    let close = close_frame("the close at expiry", &mut ws).await;
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "token expired");
    assert_eq!(
        backend.next_event().await,
        Event::Closed(Some((1001, "going away".into())))
    );
}

/// A keys file in a fresh temporary folder: `(key, identity, extra lines)`.
fn keys_file(entries: &[(&str, &str, &str)]) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wsgate-auth-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let text = api_keys_text(entries);
    let path = dir.join("keys.toml");
    std::fs::write(&path, text).expect("write keys");
    path
}

#[tokio::test]
async fn api_keys_admit_in_the_header_or_the_query_and_count_their_connections() {
    let mut backend = ws_backend("app").await;
    let file = keys_file(&[("alice-key", "alice", ""), ("bob-key", "bob", "max_connections = 1")]);
    let routes = format!(
        "[[route]]\nupstream = \"ws\"\n[route.auth.api_keys]\nfile = \"{}\"\nquery = \"api_key\"\n",
        file.display()
    );
    let proxy = Proxy::from_toml(&config(&routes, backend.addr, None));
    let forged = "X-Auth-Subject: root\r\n";
    let (status, head, _a) = ask(
        proxy.addr,
        &upgrade_request("/", &format!("{forged}X-API-Key: alice-key\r\n")),
    )
    .await;
    assert_eq!(status, 101, "{head}");
    let (_, headers) = next_upgrade(&mut backend).await;
    let subject: Vec<_> = headers.iter().filter(|(k, _)| k == "x-auth-subject").collect();
    assert_eq!(subject, [&("x-auth-subject".to_string(), "alice".to_string())]);
    assert!(!headers.iter().any(|(k, _)| k == "x-api-key"), "{headers:?}");
    let (status, head, _b) = ask(proxy.addr, &upgrade_request("/p?api_key=bob-key&q=1", "")).await;
    assert_eq!(status, 101, "{head}");
    let (path, _) = next_upgrade(&mut backend).await;
    assert_eq!(path, "/p?q=1");
    let (status, head, _) = ask(proxy.addr, &upgrade_request("/", "X-API-Key: bob-key\r\n")).await;
    assert_eq!(status, 429, "bob holds his one connection: {head}");
    let (status, head, _) = ask(proxy.addr, &upgrade_request("/", "X-API-Key: mallory\r\n")).await;
    assert_eq!(status, 401, "{head}");
    assert_eq!(
        header_value(&head, "www-authenticate"),
        Some(r#"ApiKey realm="wsgate""#)
    );
    let (status, _, _) = ask(proxy.addr, &upgrade_request("/", "")).await;
    assert_eq!(status, 401);
    // Bob's connection ends: his count is released.
    drop(_b);
    within("bob's count to be released", async {
        loop {
            let (status, _, _s) = ask(proxy.addr, &upgrade_request("/", "X-API-Key: bob-key\r\n")).await;
            if status == 101 {
                return;
            }
            assert_eq!(status, 429);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[test]
fn hash_key_prints_the_sha256_of_the_key() {
    use std::io::Write;
    let expected = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\n";
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run wsgate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"secret\n")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "the newline is not part of the key"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["hash-key", "--key", "secret"])
        .output()
        .expect("run wsgate");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn check_names_a_missing_secret_file_and_a_jwks_file_that_is_not_json() {
    let dir = keys_file(&[("k", "k", "")]).parent().expect("dir").to_path_buf();
    std::fs::write(dir.join("bad.json"), "this is not json").expect("write");
    let text = "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n\
                [[route]]\npath_prefix = \"/a\"\nupstream = \"u\"\n[route.auth.jwt]\nsecret_file = \"missing.key\"\n\
                algorithms = [\"HS256\"]\n\
                [[route]]\nupstream = \"u\"\n[route.auth.jwt]\njwks_file = \"bad.json\"\nalgorithms = [\"RS256\"]\n\
                [[upstream]]\nname = \"u\"\n[[upstream.server]]\naddress = \"127.0.0.1:9\"\n";
    let config = dir.join("wsgate.toml");
    std::fs::write(&config, text).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run wsgate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{said}");
    let missing = format!("{}:8:", config.display());
    assert!(said.contains(&missing), "{said}");
    assert!(
        said.contains(&format!("{}: cannot read it", dir.join("missing.key").display())),
        "{said}"
    );
    assert!(
        said.contains(&format!("{}: not JSON", dir.join("bad.json").display())),
        "{said}"
    );
}

#[tokio::test]
async fn a_reload_reads_the_key_files_again() {
    let mut backend = ws_backend("app").await;
    let dir = keys_file(&[("k", "k", "")]).parent().expect("dir").to_path_buf();
    let secret = dir.join("hs.key");
    std::fs::write(&secret, "first-secret\n").expect("write");
    let routes = format!(
        "[[route]]\nupstream = \"ws\"\n[route.auth.jwt]\nsecret_file = \"{}\"\nalgorithms = [\"HS256\"]\n",
        secret.display()
    );
    let text = config(&routes, backend.addr, None);
    let mut proxy = Proxy::from_toml(&text);
    let token = |s: &[u8]| {
        let c = serde_json::json!({"sub": "frank", "exp": now() + 600});
        sign(Algorithm::HS256, &EncodingKey::from_secret(s), None, c)
    };
    let (first, second) = (token(b"first-secret"), token(b"second-secret"));
    let (status, head, _s) = ask(proxy.addr, &upgrade_with_bearer("/", &first)).await;
    assert_eq!(status, 101, "{head}");
    next_upgrade(&mut backend).await;
    std::fs::write(&secret, "second-secret").expect("rotate");
    proxy.reload(&text);
    let (status, _, _) = ask(proxy.addr, &upgrade_with_bearer("/", &first)).await;
    assert_eq!(status, 401, "the old secret is gone");
    let (status, head, _s) = ask(proxy.addr, &upgrade_with_bearer("/", &second)).await;
    assert_eq!(status, 101, "{head}");
}

/// The HS secret of tests/auth/hs.key: the file's content without its trailing newline.
fn hs_key() -> EncodingKey {
    let secret = read("hs.key");
    EncodingKey::from_secret(secret.strip_suffix(b"\n").expect("a newline"))
}

/// A JWKS over https from a server whose certificate chains to `jwks_ca`.
async fn tls_jwks_server(body: Vec<u8>, tls: tokio_rustls::TlsAcceptor) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(mut stream) = tls.accept(stream).await else {
                continue;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        }
    });
    addr
}

#[tokio::test]
async fn a_jwks_url_over_https_is_verified_against_jwks_ca() {
    let mut backend = ws_backend("app").await;
    let ca = support::tls::TestCa::new("jwks");
    let site = ca.issue("jwks", &["localhost"]);
    let jwks = tls_jwks_server(read("keys.jwks.json"), ca.server_config(&site, false).into()).await;
    let routes = format!(
        "[[route]]\nupstream = \"ws\"\n[route.auth.jwt]\njwks_url = \"https://localhost:{}/.well-known/jwks.json\"\n\
         jwks_ca = \"{}\"\nalgorithms = [\"ES256\"]\n",
        jwks.port(),
        ca.ca_file.display()
    );
    let proxy = Proxy::from_toml(&config(&routes, backend.addr, None));
    let c = serde_json::json!({"sub": "frank", "exp": now() + 600});
    let good = sign(Algorithm::ES256, &es_key(), Some("es-1"), c);
    let (status, head, _stream) = ask(proxy.addr, &upgrade_with_bearer("/", &good)).await;
    assert_eq!(status, 101, "{head}");
    backend.next_event().await;
}

/// Failed credentials count against the listener's handshake rate: a client guessing tokens or keys is throttled
/// (429 + Retry-After), on the fast path and on an upgrade after a plain request.
#[tokio::test]
async fn failed_credentials_cost_handshakes_of_the_clients_rate() {
    let backend = ws_backend("app").await;
    let text = config(&table_route(), backend.addr, None).replace(
        "address = \"127.0.0.1:0\"\n",
        "address = \"127.0.0.1:0\"\nhandshakes_per_second_per_ip = 1\nhandshake_burst = 2\n",
    );
    let proxy = Proxy::from_toml(&text);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, _, _) = ask(proxy.addr, &upgrade_with_bearer("/ws", "not.a.token")).await;
        statuses.push(status);
    }
    assert_eq!(statuses[0], 401, "{statuses:?}");
    assert!(statuses.contains(&429), "guessing is never throttled: {statuses:?}");
    let (status, head, _) = ask(proxy.addr, &upgrade_with_bearer("/ws", "not.a.token")).await;
    assert_eq!(status, 429, "{head}");
    assert!(header_value(&head, "retry-after").is_some(), "{head}");
}

/// A reload keeps the keys fetched from a JWKS URL that stays: with the issuer unreachable since the first fetch,
/// tokens still verify after the reload (the new config's key set starts with the old one's keys).
#[tokio::test]
async fn a_reload_keeps_the_keys_of_a_jwks_url_whose_issuer_is_gone() {
    let mut backend = ws_backend("app").await;
    // Serves the set once, then is gone.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let jwks = listener.local_addr().expect("addr");
    let body = read("keys.jwks.json");
    let served = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let _ = read_head(&mut stream).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(&body).await;
    });
    let routes = format!(
        "[[route]]\nupstream = \"ws\"\n[route.auth.jwt]\njwks_url = \"http://{jwks}/keys\"\nalgorithms = [\"ES256\"]\n"
    );
    let text = config(&routes, backend.addr, None);
    let mut proxy = Proxy::from_toml(&text);
    let c = serde_json::json!({"sub": "grace", "exp": now() + 600});
    let token = sign(Algorithm::ES256, &es_key(), Some("es-1"), c);
    let (status, head, _held) = ask(proxy.addr, &upgrade_with_bearer("/", &token)).await;
    assert_eq!(status, 101, "{head}");
    backend.next_event().await;
    within("the one fetch", served).await.expect("served");
    proxy.reload(&text);
    let (status, head, _held) = ask(proxy.addr, &upgrade_with_bearer("/", &token)).await;
    assert_eq!(status, 101, "after the reload: {head}");
}
