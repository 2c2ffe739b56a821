//! TLS on both sides, with certificates made by a test CA (rcgen): wss and https through a TLS listener, the
//! certificate chosen by SNI (exact, wildcard, default, none), certificates swapped on disk under 100 live wss
//! sessions, handshake failures that end only their own connection, `redirect_https`, and TLS to backends
//! (verified by a CA, a wrong CA refused, client certificates, health checks over TLS).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::tls::{Issued, TestCa, WssClient, presented, tls_connect, wss};
use support::{Event, Proxy, WAIT, http_backend, tls_ws_backend, within, ws_backend};

fn listener_with(tls: &str, upstream: SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\n{tls}\n\n[[route]]\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{upstream}\"\n"
    )
}

fn single(issued: &Issued, upstream: SocketAddr) -> String {
    listener_with(
        &format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            issued.cert_file.display(),
            issued.key_file.display()
        ),
        upstream,
    )
}

async fn echo_over(ws: &mut WssClient, text: &str) {
    within("the echo", ws.send(Message::text(text))).await.expect("send");
    loop {
        match within("the echo", ws.next()).await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), text);
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected the echo of {text:?}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn wss_relays_with_forwarded_proto_https_and_https_serves_plain_requests() {
    let ca = TestCa::new("wss");
    let site = ca.issue("site", &["localhost"]);
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&single(&site, backend.addr));

    let (mut ws, cert) = wss(proxy.addr, "localhost", "/headers", ca.client_config()).await;
    assert_eq!(cert, site.der);
    let report = match within("the header report", ws.next()).await {
        Some(Ok(Message::Text(t))) => serde_json::from_str::<serde_json::Value>(t.as_str()).expect("json"),
        other => panic!("expected the backend's header report, got {other:?}"),
    };
    let headers = report["headers"].as_array().expect("headers");
    let proto: Vec<&str> = headers
        .iter()
        .filter(|h| h[0] == "x-forwarded-proto")
        .filter_map(|h| h[1].as_str())
        .collect();
    assert_eq!(proto, ["https"], "{report}");
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "forwarded" && h[1].as_str().is_some_and(|v| v.contains("proto=https"))),
        "{report}"
    );
    echo_over(&mut ws, "over tls").await;
    let big = "x".repeat(300_000);
    echo_over(&mut ws, &big).await;
    ws.close(None).await.expect("close");

    // Plain HTTP on the same TLS listener.
    let (http, _task) = http_backend("h").await;
    let proxy = Proxy::from_toml(&single(&site, http));
    let mut stream = tls_connect(proxy.addr, "localhost", ca.client_config())
        .await
        .expect("TLS");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    stream
        .write_all(b"GET /page HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    within("the https answer", stream.read_to_end(&mut answer))
        .await
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-forwarded-proto: https"), "{answer}");
}

#[tokio::test]
async fn sni_chooses_exact_then_wildcard_then_default_and_no_match_fails_only_that_handshake() {
    let ca = TestCa::new("sni");
    let a = ca.issue("a", &["a.test"]);
    let b = ca.issue("b", &["*.b.test"]);
    let fallback = ca.issue("fallback", &["fallback.test"]);
    let backend = ws_backend("b").await;
    let entry = |i: &Issued, extra: &str| {
        format!(
            "[[listener.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n",
            i.cert_file.display(),
            i.key_file.display()
        )
    };
    // No default: a name no certificate answers for fails its handshake.
    let strict = listener_with(&format!("{}{}", entry(&a, ""), entry(&b, "")), backend.addr);
    let proxy = Proxy::from_toml(&strict);
    let (mut held, cert) = wss(proxy.addr, "a.test", "/", ca.client_config()).await;
    assert_eq!(cert, a.der);
    let (_, cert) = wss(proxy.addr, "x.b.test", "/", ca.client_config()).await;
    assert_eq!(cert, b.der);
    for name in ["other.test", "deep.x.b.test", "b.test"] {
        let failed = tls_connect(proxy.addr, name, ca.client_config()).await;
        assert!(
            failed.is_err(),
            "{name}: a handshake with no certificate for it must fail"
        );
    }
    // Garbage instead of a ClientHello ends that connection only.
    let mut garbage = TcpStream::connect(proxy.addr).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    // Closed by wsgate (with an alert, or a reset): the read ends either way, within the wait.
    let _ = within("the close of a garbage connection", garbage.read_to_end(&mut sink)).await;
    assert!(
        !String::from_utf8_lossy(&sink).contains("HTTP/1.1 "),
        "no plain answer on TLS"
    );
    echo_over(&mut held, "still here").await;

    // With a default: names without a certificate of their own get it, and so do clients naming no server.
    let lenient = listener_with(
        &format!(
            "{}{}{}",
            entry(&a, ""),
            entry(&b, ""),
            entry(&fallback, "default = true")
        ),
        backend.addr,
    );
    let proxy = Proxy::from_toml(&lenient);
    let stream = tls_connect(proxy.addr, "other.test", insecure_client())
        .await
        .expect("default certificate");
    assert_eq!(presented(&stream), fallback.der);
    // An IP address is not sent as SNI: the client names no server.
    let stream = tls_connect(proxy.addr, "127.0.0.1", insecure_client())
        .await
        .expect("default certificate without SNI");
    assert_eq!(presented(&stream), fallback.der);
    // Names given in the config answer instead of those in the certificate.
    let renamed = listener_with(&entry(&a, "names = [\"renamed.test\"]"), backend.addr);
    let proxy = Proxy::from_toml(&renamed);
    let stream = tls_connect(proxy.addr, "renamed.test", insecure_client())
        .await
        .expect("named by config");
    assert_eq!(presented(&stream), a.der);
}

/// A client that takes any certificate (to see which one a server presents for a name it is not valid for).
fn insecure_client() -> std::sync::Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct Any;
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            wsgate::tls::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Any))
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_serves_new_handshakes_while_100_sessions_stay_up() {
    let ca = TestCa::new("swap");
    let old = ca.issue("site", &["localhost"]);
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&single(&old, backend.addr));
    let mut sessions = Vec::with_capacity(100);
    for _ in 0..100 {
        let (ws, cert) = wss(proxy.addr, "localhost", "/", ca.client_config()).await;
        assert_eq!(cert, old.der);
        sessions.push(ws);
    }
    // A new key and certificate, written over the old files.
    let new = ca.issue("site-next", &["localhost"]);
    new.write_to(&old.cert_file, &old.key_file);
    let start = tokio::time::Instant::now();
    loop {
        let (_ws, cert) = wss(proxy.addr, "localhost", "/", ca.client_config()).await;
        if cert == new.der {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "the new certificate was not served within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, ws) in sessions.iter_mut().enumerate() {
        echo_over(ws, &format!("session {i} after the swap")).await;
    }
}

#[tokio::test]
async fn redirect_https_answers_308_to_the_same_host_and_target() {
    let backend = ws_backend("b").await;
    let text = |port: &str| {
        format!(
            "[[listener]]\nname = \"plain\"\naddress = \"127.0.0.1:0\"\nredirect_https = true\n{port}\n\n\
             [[route]]\nupstream = \"app\"\n\n[[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{}\"\n",
            backend.addr
        )
    };
    let proxy = Proxy::from_toml(&text(""));
    let answer = support::raw_exchange(
        proxy.addr,
        b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    assert!(answer.contains("Location: https://example.com/a/b?c=d\r\n"), "{answer}");
    let upgrade = support::upgrade_request("/ws?x=1", "");
    let answer = support::raw_exchange(proxy.addr, upgrade.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    assert!(answer.contains("Location: https://"), "{answer}");
    assert!(answer.contains("/ws?x=1\r\n"), "{answer}");

    let proxy = Proxy::from_toml(&text("redirect_https_port = 8443"));
    let answer = support::raw_exchange(
        proxy.addr,
        b"GET /p HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("Location: https://[::1]:8443/p\r\n"), "{answer}");
}

fn tls_upstream(backend: SocketAddr, tls: &str) -> String {
    format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n\n[[route]]\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nretries = 0\ntls = {{ {tls} }}\n[[upstream.server]]\naddress = \"{backend}\"\n\
         [upstream.outlier]\nconsecutive_failures = 0\n"
    )
}

#[tokio::test]
async fn tls_to_a_backend_is_verified_against_the_ca_and_a_wrong_ca_is_refused() {
    let ca = TestCa::new("upstream");
    let server = ca.issue("backend", &["backend.internal"]);
    let mut backend = tls_ws_backend("tls-b", ca.server_config(&server, false).into()).await;
    let ca_file = ca.ca_file.display().to_string();

    let proxy = Proxy::from_toml(&tls_upstream(
        backend.addr,
        &format!("ca = \"{ca_file}\", server_name = \"backend.internal\""),
    ));
    let mut ws = support::connect(&proxy.url("/")).await;
    assert_eq!(support::backend_name(&mut ws).await, "tls-b");
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));

    // The certificate is not for the name asked: refused, 502, nothing internal in the answer.
    let proxy = Proxy::from_toml(&tls_upstream(
        backend.addr,
        &format!("ca = \"{ca_file}\", server_name = \"other.internal\""),
    ));
    let answer = support::raw_exchange(proxy.addr, support::upgrade_request("/", "").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("upstream TLS handshake failed"), "{answer}");
    assert!(!answer.contains("127.0.0.1"), "{answer}");

    // Another CA: refused.
    let other = TestCa::new("other");
    let proxy = Proxy::from_toml(&tls_upstream(
        backend.addr,
        &format!(
            "ca = \"{}\", server_name = \"backend.internal\"",
            other.ca_file.display()
        ),
    ));
    let answer = support::raw_exchange(proxy.addr, support::upgrade_request("/", "").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");

    // insecure_skip_verify, written out in full, takes it.
    let proxy = Proxy::from_toml(&tls_upstream(backend.addr, "insecure_skip_verify = true"));
    let mut ws = support::connect(&proxy.url("/")).await;
    assert_eq!(support::backend_name(&mut ws).await, "tls-b");
    let refused = wsgate::config::file::parse(&tls_upstream(backend.addr, "insecure = true"), "t.toml");
    assert!(refused.is_err(), "only the full key turns verification off");

    // Plain HTTP goes over TLS to the backend too.
    let (http, _task) = support::tls_http_backend("tls-h", ca.server_config(&server, false).into()).await;
    let proxy = Proxy::from_toml(&tls_upstream(
        http,
        &format!("ca = \"{ca_file}\", server_name = \"backend.internal\""),
    ));
    let answer = support::raw_exchange(
        proxy.addr,
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("tls-h /plain"), "{answer}");
}

#[tokio::test]
async fn a_backend_requiring_a_client_certificate_takes_wsgate_only_with_one() {
    let ca = TestCa::new("mtls");
    let server = ca.issue("backend", &["backend.internal"]);
    let client = ca.issue("wsgate-client", &["wsgate.internal"]);
    let mut backend = tls_ws_backend("mtls-b", ca.server_config(&server, true).into()).await;
    let base = format!("ca = \"{}\", server_name = \"backend.internal\"", ca.ca_file.display());
    let with_cert = format!(
        "{base}, cert = \"{}\", key = \"{}\"",
        client.cert_file.display(),
        client.key_file.display()
    );
    let proxy = Proxy::from_toml(&tls_upstream(backend.addr, &with_cert));
    let mut ws = support::connect(&proxy.url("/")).await;
    assert_eq!(support::backend_name(&mut ws).await, "mtls-b");
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));

    let proxy = Proxy::from_toml(&tls_upstream(backend.addr, &base));
    let answer = support::raw_exchange(proxy.addr, support::upgrade_request("/", "").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    match backend.next_event().await {
        Event::TlsFailed(why) => assert!(why.to_lowercase().contains("certificate"), "{why}"),
        other => panic!("expected the backend to refuse the handshake, got {other:?}"),
    }
}

#[tokio::test]
async fn health_checks_use_the_upstream_tls() {
    let ca = TestCa::new("health");
    let server = ca.issue("backend", &["backend.internal"]);
    let backend = tls_ws_backend("hb", ca.server_config(&server, false).into()).await;
    let check =
        "[upstream.health]\nkind = \"websocket\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n";
    let good = format!(
        "{}{check}",
        tls_upstream(
            backend.addr,
            &format!("ca = \"{}\", server_name = \"backend.internal\"", ca.ca_file.display()),
        )
    );
    let other = TestCa::new("health-other");
    let bad = format!(
        "{}{check}",
        tls_upstream(
            backend.addr,
            &format!(
                "ca = \"{}\", server_name = \"backend.internal\"",
                other.ca_file.display()
            ),
        )
    );
    // A CA the server's certificate does not chain to: the check fails and the server goes down...
    let mut proxy = Proxy::from_toml(&bad);
    support::scripted::wait_state(&proxy, 0, true, WAIT).await;
    // ...and with the right CA the check passes and it comes back up.
    proxy.reload(&good);
    support::scripted::wait_state(&proxy, 0, false, WAIT).await;
}

#[tokio::test]
async fn python_websockets_speaks_wss_through_wsgate() {
    support::peers::require_python_websockets();
    let ca = TestCa::new("python");
    let site = ca.issue("site", &["localhost"]);
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&single(&site, backend.addr));
    let url = format!("wss://localhost:{}/", proxy.addr.port());
    let client = tokio::process::Command::new("python3")
        .arg(support::peers::peers_dir().join("wss_client.py"))
        .arg(&url)
        .arg(&ca.ca_file)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within("the Python wss client", client).await.expect("run python3");
    assert!(out.status.success(), "{}", support::text_of(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(support::text_of(&out.stdout).trim()).expect("json");
    assert_eq!(report["echo"], "hello over wss", "{report}");
    assert_eq!(report["alpn"], "http/1.1", "{report}");
    assert_eq!(report["version"], "TLSv1.3", "{report}");
}

/// Runs tests/peers/tls_hello.py against `addr` for `case`: its JSON report.
async fn refused_hello(addr: SocketAddr, case: &str) -> serde_json::Value {
    let client = tokio::process::Command::new("python3")
        .arg(support::peers::peers_dir().join("tls_hello.py"))
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(case)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within("the Python TLS client", client).await.expect("run python3");
    assert!(out.status.success(), "{}", support::text_of(&out.stderr));
    serde_json::from_str(support::text_of(&out.stdout).trim()).expect("json")
}

#[tokio::test]
async fn old_protocols_no_shared_cipher_and_garbage_end_only_their_own_connection_with_a_log_line() {
    let ca = TestCa::new("bad-hello");
    let dir = &ca.dir;
    let site = ca.issue("site", &["localhost"]);
    let backend = ws_backend("b").await;
    let address = support::unused_addr();
    let config = dir.join("wsgate.toml");
    let text = single(&site, backend.addr).replace("127.0.0.1:0", &address.to_string());
    std::fs::write(&config, text).expect("write config");
    let mut wsgate = support::binary::Binary::spawn(["run", "--config", &config.display().to_string()]);
    wsgate.wait_for_log(&["listening"]).await;
    let (mut held, _) = wss(address, "localhost", "/", ca.client_config()).await;

    let report = refused_hello(address, "tls11").await;
    assert_eq!(report["handshake"], "failed", "{report}");
    // A TLS 1.1 ClientHello lacks what TLS 1.2 requires (signature_algorithms): rustls says so.
    let line = wsgate.wait_for_log(&["TLS handshake"]).await;
    assert!(line.contains("peer is incompatible"), "{line}");

    let report = refused_hello(address, "no-shared").await;
    assert_eq!(report["handshake"], "failed", "{report}");
    let line = wsgate.wait_for_log(&["TLS handshake"]).await;
    assert!(line.contains("NoCipherSuitesInCommon"), "{line}");

    let mut garbage = TcpStream::connect(address).await.expect("connect");
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
        .await
        .expect("write");
    garbage.write_all(&[0u8; 512]).await.expect("write");
    let line = wsgate.wait_for_log(&["TLS handshake"]).await;
    assert!(line.contains("error"), "{line}");

    echo_over(&mut held, "unaffected").await;
}

#[tokio::test]
async fn certificate_files_reload_on_change_and_sighup_and_bad_ones_keep_the_old() {
    let ca = TestCa::new("reload");
    let dir = &ca.dir;
    let site = ca.issue("site", &["localhost"]);
    let backend = ws_backend("b").await;
    let address = support::unused_addr();
    let config = dir.join("wsgate.toml");
    // Paths relative to the config file.
    let text = listener_with("tls = { cert = \"site.pem\", key = \"site.key\" }", backend.addr)
        .replace("127.0.0.1:0", &address.to_string());
    std::fs::write(&config, text).expect("write config");
    let mut wsgate = support::binary::Binary::spawn(["run", "--config", &config.display().to_string()]);
    wsgate.wait_for_log(&["listening"]).await;
    let (mut held, cert) = wss(address, "localhost", "/", ca.client_config()).await;
    assert_eq!(cert, site.der);

    // Not PEM: the old certificate stays, and the log says which file and why.
    std::fs::write(&site.cert_file, "this is not a certificate\n").expect("write");
    let line = wsgate.wait_for_log(&["not loaded"]).await;
    assert!(line.contains("site.pem") && line.contains("no certificate"), "{line}");
    let (_, cert) = wss(address, "localhost", "/", ca.client_config()).await;
    assert_eq!(cert, site.der, "the old certificate is still served");
    // SIGHUP with the bad file: the reload is refused, the old config and certificate stay.
    wsgate.signal(rustix::process::Signal::HUP);
    let line = wsgate.wait_for_log(&["reload refused"]).await;
    assert!(line.contains("site.pem"), "{line}");
    let (_, cert) = wss(address, "localhost", "/", ca.client_config()).await;
    assert_eq!(cert, site.der);

    // A key that does not match the certificate.
    let other = ca.issue("other", &["localhost"]);
    std::fs::write(&site.cert_file, &site.cert_pem).expect("write");
    std::fs::write(&site.key_file, &other.key_pem).expect("write");
    let line = wsgate.wait_for_log(&["not loaded"]).await;
    assert!(line.contains("does not match"), "{line}");

    // A good new pair is taken on change; live sessions stay.
    let next = ca.issue("next", &["localhost"]);
    next.write_to(&site.cert_file, &site.key_file);
    wsgate.wait_for_log(&["certificates reloaded"]).await;
    let (_, cert) = wss(address, "localhost", "/", ca.client_config()).await;
    assert_eq!(cert, next.der);
    // And on SIGHUP.
    let last = ca.issue("last", &["localhost"]);
    last.write_to(&site.cert_file, &site.key_file);
    wsgate.signal(rustix::process::Signal::HUP);
    wsgate.wait_for_log(&["reloaded:", "certificates reloaded"]).await;
    let (_, cert) = wss(address, "localhost", "/", ca.client_config()).await;
    assert_eq!(cert, last.der);
    echo_over(&mut held, "through every reload").await;
}

#[test]
fn check_names_the_certificate_file_and_what_is_wrong() {
    let ca = TestCa::new("check");
    let site = ca.issue("site", &["localhost"]);
    let other = ca.issue("other", &["localhost"]);
    let not_pem = ca.dir.join("not.pem");
    std::fs::write(&not_pem, "garbage\n").expect("write");
    let upstream = support::unused_addr();
    let cases = [
        (
            format!(
                "tls = {{ cert = \"{}\", key = \"{}\" }}",
                not_pem.display(),
                site.key_file.display()
            ),
            "not.pem: no certificate",
        ),
        (
            format!(
                "tls = {{ cert = \"{}\", key = \"{}\" }}",
                site.cert_file.display(),
                other.key_file.display()
            ),
            "does not match the certificate",
        ),
        (
            format!(
                "tls = {{ cert = \"{}\", key = \"missing.key\" }}",
                site.cert_file.display()
            ),
            "missing.key: cannot read",
        ),
        (
            format!(
                "tls = {{ cert = \"{}\", key = \"{}\" }}",
                site.cert_file.display(),
                not_pem.display()
            ),
            "not.pem: no private key",
        ),
    ];
    for (tls, expected) in cases {
        let config = ca.dir.join("check.toml");
        std::fs::write(&config, listener_with(&tls, upstream)).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("run wsgate check");
        let stderr = support::text_of(&out.stderr);
        assert!(!out.status.success(), "{tls}: accepted");
        assert!(stderr.contains("check.toml:"), "{stderr}");
        assert!(stderr.contains(expected), "{tls}: expected {expected:?} in {stderr}");
    }
    // An upstream CA that is not PEM, and a client certificate without its key.
    let bad_ca = format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"app\"\n[[upstream]]\nname = \"app\"\n\
         tls = {{ ca = \"{}\" }}\n[[upstream.server]]\naddress = \"{upstream}\"\n",
        not_pem.display()
    );
    let problems = wsgate::config::file::parse(&bad_ca, "t.toml").expect_err("refused");
    assert!(
        problems[0].to_string().contains("not.pem: no certificate"),
        "{problems:?}"
    );
    let no_key = bad_ca.replace(
        &format!("ca = \"{}\"", not_pem.display()),
        &format!(
            "ca = \"{}\", cert = \"{}\"",
            ca.ca_file.display(),
            site.cert_file.display()
        ),
    );
    let problems = wsgate::config::file::parse(&no_key, "t.toml").expect_err("refused");
    assert!(problems[0].to_string().contains("go together"), "{problems:?}");
    let no_ca = bad_ca.replace(&format!("ca = \"{}\"", not_pem.display()), "server_name = \"x\"");
    let problems = wsgate::config::file::parse(&no_ca, "t.toml").expect_err("refused");
    assert!(problems[0].to_string().contains("needs `ca`"), "{problems:?}");
}

#[tokio::test]
async fn a_proxy_protocol_header_comes_before_tls_and_names_the_client() {
    let ca = TestCa::new("proxy-tls");
    let site = ca.issue("site", &["localhost"]);
    let backend = ws_backend("b").await;
    let text = single(&site, backend.addr).replace(
        "[[route]]",
        "trusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true\n\n[[route]]",
    );
    let proxy = Proxy::from_toml(&text);
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n")
        .await
        .expect("write");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = within(
        "TLS after the PROXY header",
        tokio_rustls::TlsConnector::from(ca.client_config()).connect(name, tcp),
    )
    .await
    .expect("TLS handshake");
    let (mut ws, _) = within(
        "the upgrade",
        tokio_tungstenite::client_async("wss://localhost/headers", stream),
    )
    .await
    .expect("upgrade");
    let report = match within("the header report", ws.next()).await {
        Some(Ok(Message::Text(t))) => t.as_str().to_string(),
        other => panic!("expected the backend's header report, got {other:?}"),
    };
    assert!(report.contains("[\"x-real-ip\",\"203.0.113.7\"]"), "{report}");
    assert!(report.contains("[\"x-forwarded-proto\",\"https\"]"), "{report}");
}

/// A wss client that stops reading while its backend keeps sending: what TLS holds for it counts as bytes waiting
/// for a receiver, so the write timeout closes the connection (tunnel and frames mode), and no sooner.
#[tokio::test]
async fn a_wss_client_that_stops_reading_is_closed_after_the_write_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let ca = TestCa::new("stuck-reader");
    let site = ca.issue("site", &["localhost"]);
    let backend = ws_backend("b").await;
    for relay in ["tunnel", "frames"] {
        let text = single(&site, backend.addr).replace(
            "upstream = \"app\"\n\n",
            &format!("upstream = \"app\"\nrelay = \"{relay}\"\nwrite_timeout = \"1s\"\n\n"),
        );
        let proxy = Proxy::from_toml(&text);
        let mut stream = tls_connect(proxy.addr, "localhost", ca.client_config())
            .await
            .expect("TLS");
        stream
            .write_all(support::upgrade_request("/", "").as_bytes())
            .await
            .expect("upgrade");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            within("the 101", stream.read_exact(&mut byte)).await.expect("read");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        // Messages the backend echoes, never read back: the echoes back up into wsgate.
        let frame = support::raw::client_frame(true, 0x2, &[7u8; 64 * 1024]);
        let started = tokio::time::Instant::now();
        let written = within("wsgate to close the stuck reader's connection", async {
            let mut n = 0usize;
            while n < 4096 && stream.write_all(&frame).await.is_ok() && stream.flush().await.is_ok() {
                n += 1;
            }
            n
        })
        .await;
        let took = started.elapsed();
        assert!(written < 4096, "{relay}: every write went through: never closed");
        assert!(
            took >= TIMEOUT,
            "{relay}: closed after {took:?}, before the write timeout"
        );
    }
}
