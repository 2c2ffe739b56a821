//! wsgate between real, independent WebSocket implementations running as separate processes on 127.0.0.1:
//! Python `websockets` (client and backend, with permessage-deflate) and Tomcat 10 (JSR 356 backend, plus its
//! plain HTTP pages), through the default relay and through frames mode. The peers are started by
//! `tests/support/peers.rs` and installed by `scripts/test`; when one is missing the test fails and says so.

mod support;

use support::frames::*;
use support::peers::*;
use support::raw::frames;
use support::*;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::RwLock;
use tokio::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes as WsBytes, Message};
use wsgate::config::FrameRules;

/// The Python client's whole run (it bounds each of its own waits much lower).
const PYTHON_CLIENT_WAIT: Duration = Duration::from_secs(60);

/// A Tomcat's start keeps both cores busy: it takes this for writing; the frames-mode Tomcat test, whose keepalive
/// runs on timers of a few hundred milliseconds, takes it for reading, so the two never overlap.
static CPU: RwLock<()> = RwLock::const_new(());

// ---------------------------------------------------------------------------------------------------------------
// Python websockets, permessage-deflate
// ---------------------------------------------------------------------------------------------------------------

/// `deflate_backend.py` (Python `websockets` with permessage-deflate) on a free port, once it has said which.
async fn python_deflate_backend() -> (tokio::process::Child, SocketAddr) {
    require_python_websockets();
    let mut backend = tokio::process::Command::new("python3")
        .arg(peers_dir().join("deflate_backend.py"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python3 deflate_backend.py");
    let stdout = backend.stdout.take().expect("backend stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = within("the Python backend to print its port", lines.next_line())
        .await
        .expect("read the backend's stdout");
    let Some(line) = line else {
        backend.start_kill().ok();
        let out = within("the Python backend to exit", backend.wait_with_output())
            .await
            .expect("backend output");
        panic!(
            "the Python backend exited without printing its port: {}\n{}",
            out.status,
            text_of(&out.stderr)
        );
    };
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the Python backend printed {line:?}, not a port"));
    (backend, SocketAddr::from(([127, 0, 0, 1], port)))
}

#[tokio::test]
async fn permessage_deflate_negotiates_end_to_end_with_python_websockets() {
    let (mut backend, backend_addr) = python_deflate_backend().await;
    let proxy = Proxy::start(&[backend_addr]);

    let client = tokio::process::Command::new("python3")
        .arg(peers_dir().join("deflate_client.py"))
        .arg(proxy.addr.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(PYTHON_CLIENT_WAIT, client).await {
        Ok(out) => out.expect("run python3 deflate_client.py"),
        Err(_) => panic!("the Python client did not finish within {PYTHON_CLIENT_WAIT:?}"),
    };
    let report = format!(
        "client {}\n--- client stdout ---\n{}--- client stderr ---\n{}",
        out.status,
        text_of(&out.stdout),
        text_of(&out.stderr)
    );
    if !out.status.success() {
        backend.start_kill().ok();
        let backend_out = within("the Python backend to exit", backend.wait_with_output())
            .await
            .expect("backend output");
        panic!(
            "the Python client failed through wsgate:\n{report}--- backend stderr ---\n{}",
            text_of(&backend_out.stderr)
        );
    }
    println!("{report}");
}

/// Frames-mode limits count wire bytes: with permessage-deflate passed through, a 70 000-byte message of one repeated
/// byte crosses a 64 KiB `max_message_size` as a few hundred bytes. `permessage_deflate = "strip"` takes the offer
/// out of the forwarded handshake: both sides speak uncompressed and the limit sees the real size (1009).
#[tokio::test]
async fn permessage_deflate_strip_makes_the_message_limit_see_real_sizes() {
    let (_backend, backend_addr) = python_deflate_backend().await;
    let route = |path: &str, deflate: &str| {
        format!(
            "[[route]]\npath = \"{path}\"\nupstream = \"py\"\nmax_message_size = \"64KiB\"\n\
             permessage_deflate = \"{deflate}\"\n"
        )
    };
    let proxy = Proxy::from_toml(&format!(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n{}{}\
         [[upstream]]\nname = \"py\"\n[[upstream.server]]\naddress = \"{backend_addr}\"\n",
        route("/pass", "pass"),
        route("/strip", "strip"),
    ));
    let run = |path: &str| {
        let url = proxy.url(path);
        async move {
            let client = tokio::process::Command::new("python3")
                .arg(peers_dir().join("bomb_client.py"))
                .arg(&url)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(PYTHON_CLIENT_WAIT, client)
                .await
                .unwrap_or_else(|_| panic!("bomb_client.py did not finish within {PYTHON_CLIENT_WAIT:?}"))
                .expect("run python3 bomb_client.py");
            assert!(out.status.success(), "bomb_client.py {url}: {}", text_of(&out.stderr));
            let line = text_of(&out.stdout);
            serde_json::from_str::<serde_json::Value>(line.trim())
                .unwrap_or_else(|e| panic!("bomb_client.py printed {line:?}: {e}"))
        }
    };

    let passed = run("/pass").await;
    assert!(
        passed["client_ext"]
            .as_str()
            .is_some_and(|e| e.contains("permessage-deflate")),
        "{passed}"
    );
    assert_eq!(passed["outcome"], "echo", "compressed, it passes the limit: {passed}");
    assert_eq!(passed["length"], 70_000, "{passed}");

    let stripped = run("/strip").await;
    assert_eq!(stripped["client_ext"], "", "the client negotiated nothing: {stripped}");
    assert_eq!(
        stripped["backend_ext"], "",
        "the backend was offered nothing: {stripped}"
    );
    assert_eq!(stripped["outcome"], "closed", "{stripped}");
    assert_eq!(stripped["code"], 1009, "{stripped}");
}

// ---------------------------------------------------------------------------------------------------------------
// Tomcat 10 (JSR 356)
// ---------------------------------------------------------------------------------------------------------------

/// Small and 70 000-byte text (with multi-byte characters) and binary messages, each echoed intact.
async fn echo_texts_and_binaries(ws: &mut Client, path: &str) {
    let big = long_text(70_000);
    assert_eq!(big.len(), 70_000);
    for text in ["hello Tomcat", "ünïcødé ✓", big.as_str(), "after the big one"] {
        ws.send(Message::text(text)).await.expect("send text");
        let echo = next_text(ws).await;
        assert!(
            echo == text,
            "{path}: text echo of {} bytes came back as {} bytes",
            text.len(),
            echo.len()
        );
    }
    let binary: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for payload in [vec![0u8, 1, 2, 255, 254], binary] {
        ws.send(Message::binary(payload.clone())).await.expect("send binary");
        match next_message(ws).await {
            Message::Binary(b) => assert!(
                b[..] == payload[..],
                "{path}: binary echo of {} bytes came back as {} different bytes",
                payload.len(),
                b.len()
            ),
            other => panic!("{path}: expected a binary echo, got {other:?}"),
        }
    }
}

/// Text and binary echo (small and 70 000-byte messages, and a ping) on `path` through the proxy.
async fn check_echo(proxy: &Proxy, path: &str) {
    let mut ws = connect(&proxy.url(path)).await;
    echo_texts_and_binaries(&mut ws, path).await;
    // Tomcat answers a ping by itself.
    ws.send(Message::Ping(WsBytes::from_static(b"are you there")))
        .await
        .expect("send ping");
    match within("Tomcat's pong", ws.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"are you there", "{path}: pong payload"),
        Some(Ok(other)) => panic!("{path}: expected a pong, got {other:?}"),
        Some(Err(e)) => panic!("{path}: client error waiting for the pong: {e}"),
        None => panic!("{path}: closed while waiting for the pong"),
    }
    close_normally(ws, path).await;
}

/// Sends a close with code 1000 and expects Tomcat's close (code 1000) back, then the end of the connection.
async fn close_normally(mut ws: Client, path: &str) {
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .expect("send close");
    let answer = within("Tomcat's close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("{path}: expected a close frame, got {other:?}"),
                Some(Err(e)) => panic!("{path}: client error waiting for the close: {e}"),
                None => panic!("{path}: connection ended without a close frame"),
            }
        }
    })
    .await;
    let code = answer.as_ref().map(|f| u16::from(f.code));
    assert_eq!(code, Some(1000), "{path}: close answered with {answer:?}");
    within("the connection to end after the close", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// A plain HTTP/1.1 request through the proxy; returns the status code and the whole response.
async fn http_request(proxy: &Proxy, request: &str) -> (u16, String) {
    let response = raw_exchange(proxy.addr, request.as_bytes()).await;
    let status = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {response:?}"));
    (status, response)
}

#[tokio::test]
async fn tomcat_jsr356_echo_through_wsgate() {
    let test_started = Instant::now();
    let (tomcat, ready_after) = {
        // Tomcat's start keeps both cores busy.
        let _cpu = CPU.write().await;
        let mut tomcat = Tomcat::start();
        let ready_after = tomcat.wait_ready().await;
        (tomcat, ready_after)
    };
    println!("Tomcat ready after {ready_after:.1?}");
    let proxy = Proxy::start(&[SocketAddr::from(([127, 0, 0, 1], tomcat.port))]);

    check_echo(&proxy, "/examples/websocket/echoAnnotation").await;
    check_echo(&proxy, "/examples/websocket/echoProgrammatic").await;

    // Plain HTTP through wsgate: a static page and a servlet, GET and POST.
    let host = format!("127.0.0.1:{}", proxy.addr.port());
    let (status, page) = http_request(
        &proxy,
        &format!("GET /examples/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "GET /examples/ through wsgate:\n{page}");
    assert!(
        page.contains("Apache Tomcat Examples"),
        "GET /examples/ is not the examples index:\n{page}"
    );

    let (status, page) = http_request(
        &proxy,
        &format!(
            "GET /examples/servlets/servlet/RequestParamExample?firstname=Ada&lastname=Lovelace HTTP/1.1\r\n\
             Host: {host}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "GET RequestParamExample through wsgate:\n{page}");
    assert!(
        page.contains("Ada") && page.contains("Lovelace"),
        "the servlet did not see the query parameters:\n{page}"
    );

    let form = "firstname=Grace&lastname=Hopper";
    let (status, page) = http_request(
        &proxy,
        &format!(
            "POST /examples/servlets/servlet/RequestParamExample HTTP/1.1\r\nHost: {host}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{form}",
            form.len()
        ),
    )
    .await;
    assert_eq!(status, 200, "POST RequestParamExample through wsgate:\n{page}");
    assert!(
        page.contains("Grace") && page.contains("Hopper"),
        "the servlet did not see the posted form:\n{page}"
    );

    println!(
        "Tomcat test took {:.1?} in all ({ready_after:.1?} of it waiting for Tomcat)",
        test_started.elapsed()
    );
    drop(proxy);
    drop(tomcat);
}

// ---------------------------------------------------------------------------------------------------------------
// Tomcat 10 (JSR 356) through frames mode
// ---------------------------------------------------------------------------------------------------------------

/// Text and binary echo (small and 70 000-byte messages), a ping, an idle spell kept alive by wsgate's pings, and
/// close 1000, on `path` through the proxy.
async fn tomcat_echo(proxy: &Proxy, path: &str) {
    let mut ws = connect(&proxy.url(path)).await;
    echo_texts_and_binaries(&mut ws, path).await;
    // Tomcat answers a ping by itself; the pong comes back through wsgate.
    ws.send(Message::Ping(WsBytes::from_static(b"are you there")))
        .await
        .expect("send ping");
    match next_raw_skipping_wsgate_pings(&mut ws).await {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there", "{path}: pong payload"),
        other => panic!("{path}: expected a pong, got {other:?}"),
    }
    // Idle longer than ping interval + pong timeout: Tomcat answers wsgate's pings, so nothing is closed.
    let quiet = tokio::time::sleep(Duration::from_millis(2500));
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            _ = &mut quiet => break,
            m = ws.next() => match m {
                Some(Ok(Message::Ping(_))) => {}
                other => panic!("{path}: the idle connection got {other:?}"),
            },
        }
    }
    ws.send(Message::text("after the silence")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "after the silence");

    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .expect("send close");
    let (data, close) = close_after(&mut ws).await;
    assert!(data.is_empty(), "{path}: {data:?}");
    assert_eq!(close.map(|c| c.0), Some(1000), "{path}: Tomcat's close");
    ws_end(&mut ws).await;
}

#[tokio::test]
async fn tomcat_jsr356_echo_through_frames_mode() {
    let test_started = Instant::now();
    let (mut tomcat, ready_after) = {
        // Tomcat's start keeps both cores busy.
        let _cpu = CPU.write().await;
        let mut tomcat = Tomcat::start();
        let ready_after = tomcat.wait_ready().await;
        (tomcat, ready_after)
    };
    println!("Tomcat ready after {ready_after:.1?}");
    let _cpu = CPU.read().await;
    let rules = FrameRules {
        validate_utf8: true,
        ping_interval: Some(Duration::from_millis(200)),
        pong_timeout: Duration::from_secs(1),
        ..FrameRules::default()
    };
    let proxy = Proxy::start_with(&[SocketAddr::from(([127, 0, 0, 1], tomcat.port))], frames(rules));
    tomcat_echo(&proxy, "/examples/websocket/echoAnnotation").await;
    tomcat_echo(&proxy, "/examples/websocket/echoProgrammatic").await;
    println!("Tomcat test took {:.1?} in all", test_started.elapsed());
    drop(proxy);
    if let Some(child) = tomcat.child.as_mut() {
        assert!(child.try_wait().ok().flatten().is_none(), "Tomcat is still running");
    }
}
