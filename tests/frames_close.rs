//! Frames mode closing connections, with real peers over real sockets: close codes and reasons passing through
//! unchanged both ways (TCP closed once both closes are seen), a backend that dies without a close frame (1011 to
//! the client), and 1001 on SIGTERM seen by tokio-tungstenite, Python `websockets` and Node `ws` clients.
//!
//! The Python and Node clients (tests/frames_peers, `ws` in its node_modules) are installed by `scripts/test`;
//! when one is missing its test fails and says so.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use rustix::process::Signal;
use support::binary::BinaryProxy;
use support::frames::*;
use support::peers::*;
use support::raw::*;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::config::FrameRules;
use wsgate::ws::frame::{close_frame, control_frame, opcode};

// ---------------------------------------------------------------------------------------------------------------
// Close codes and reasons pass through
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_close_code_and_reason_pass_unchanged_and_tcp_closes_after_both_closes() {
    let mut backend = RawBackend::start().await;
    let proxy = Proxy::start_with(&[backend.addr], frames(FrameRules::default()));
    let mut client = raw_client(proxy.addr, "/close").await;
    let mut server = backend.next_conn().await;

    let close = close_frame(4321, "client says bye ✓", Some(CLIENT_MASK));
    client.send(&close).await;
    let got = server.next_frame().await.expect("the client's close");
    assert_eq!(
        got.wire, close,
        "the close frame reaches the backend byte for byte, masked as sent"
    );
    assert_eq!(got.close(), Some((4321, "client says bye ✓".into())));

    // wsgate waits for the backend's reply: idle time before it must not end the connection. A deliberate quiet
    // period (nothing is awaited here): the reply comes only after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = close_frame(4322, "backend agrees", None);
    server.send(&reply).await;
    let got = client.next_frame().await.expect("the backend's close");
    assert_eq!(got.wire, reply, "the reply reaches the client byte for byte");
    assert!(
        client.until_eof().await.is_empty(),
        "the client's TCP connection closes"
    );
    assert!(
        server.until_eof().await.is_empty(),
        "the backend's TCP connection closes"
    );
}

#[tokio::test]
async fn backend_close_code_and_reason_pass_unchanged_and_tcp_closes_after_both_closes() {
    let mut backend = RawBackend::start().await;
    let proxy = Proxy::start_with(&[backend.addr], frames(FrameRules::default()));
    let mut client = raw_client(proxy.addr, "/close").await;
    let mut server = backend.next_conn().await;

    let close = close_frame(3999, "maintenance", None);
    server.send(&close).await;
    let got = client.next_frame().await.expect("the backend's close");
    assert_eq!(got.wire, close);
    assert_eq!(got.close(), Some((3999, "maintenance".into())));

    // The same deliberate quiet period before the client's reply.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = close_frame(1000, "ok", Some(CLIENT_MASK));
    client.send(&reply).await;
    let got = server.next_frame().await.expect("the client's close");
    assert_eq!(got.wire, reply);
    assert!(
        server.until_eof().await.is_empty(),
        "the backend's TCP connection closes"
    );
    assert!(
        client.until_eof().await.is_empty(),
        "the client's TCP connection closes"
    );

    // The same with real peers both ways, and a close without a code.
    let mut real = ws_backend("b").await;
    let proxy = Proxy::start_with(&[real.addr], frames(FrameRules::default()));
    let mut ws = connect(&proxy.url("/close")).await;
    expect_upgraded(&mut real).await;
    ws.send(Message::text("close:4444:from the backend"))
        .await
        .expect("send");
    let (data, close) = close_after(&mut ws).await;
    assert!(data.is_empty(), "{data:?}");
    assert_eq!(close, Some((4444, "from the backend".into())));
    ws_end(&mut ws).await;
    // tungstenite's reply echoes the code and reason.
    assert_eq!(
        expect_backend_close(&mut real, 4444).await,
        "from the backend",
        "the client's reply reached the backend unchanged"
    );
    let mut client = raw_client(proxy.addr, "/close").await;
    expect_upgraded(&mut real).await;
    client.send(&control_frame(opcode::CLOSE, b"", Some(CLIENT_MASK))).await;
    assert_eq!(
        client.expect_close().await.close(),
        None,
        "an empty close comes back empty"
    );
    assert!(client.until_eof().await.is_empty());
    assert_eq!(real.next_event().await, Event::Closed(None));
}

// ---------------------------------------------------------------------------------------------------------------
// A backend that dies
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn backend_dying_without_a_close_frame_gives_the_client_1011_backend_connection_lost() {
    let mut backend = ws_backend("b").await;
    let proxy = Proxy::start_with(&[backend.addr], frames(FrameRules::default()));
    let mut ws = connect(&proxy.url("/dies")).await;
    expect_upgraded(&mut backend).await;
    echo(&mut ws, "alive").await;
    backend.kill();
    let (data, close) = close_after(&mut ws).await;
    assert!(data.is_empty(), "{data:?}");
    assert_eq!(close, Some((1011, "backend connection lost".into())));
    ws_end(&mut ws).await;
}

// ---------------------------------------------------------------------------------------------------------------
// 1001 on SIGTERM, seen by three client libraries
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_sends_1001_going_away_to_tungstenite_python_and_node_clients() {
    require_python_websockets();
    require_node_ws();
    let mut backend = ws_backend("b").await;
    let mut proxy = BinaryProxy::start(backend.addr, &["--mode", "frames", "--drain-timeout", "20s"]).await;
    let base = format!("ws://{}", proxy.addr);

    let mut ws = connect(&format!("{base}/tungstenite")).await;
    echo(&mut ws, "hello from tungstenite").await;
    let mut scripts = [
        Script::start(
            "Python websockets",
            "python3",
            "close_client.py",
            &format!("{base}/python"),
        ),
        Script::start("Node ws", "node", "close_client.js", &format!("{base}/node")),
    ];
    for script in &mut scripts {
        let line = script.line().await;
        assert!(line.starts_with("ready hello from"), "{}: {line}", script.name);
    }

    let signalled = Instant::now();
    proxy.signal(Signal::TERM);
    let (data, close) = close_after(&mut ws).await;
    assert!(data.is_empty(), "{data:?}");
    assert_eq!(close, Some((1001, "going away".into())), "tokio-tungstenite");
    ws_end(&mut ws).await;
    for script in &mut scripts {
        assert_eq!(script.line().await, "closed 1001 going away", "{}", script.name);
        script.exit_ok().await;
    }
    assert_eq!(proxy.exit_code().await, Some(0));
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "exit {took:?} after SIGTERM (drain timeout 20 s)"
    );

    // The backend was told too, on each of the three connections.
    let mut closes = 0;
    while closes < 3 {
        match backend.next_event().await {
            Event::Upgraded { .. } => {}
            Event::Closed(Some((1001, reason))) if reason == "going away" => closes += 1,
            other => panic!("the backend got {other:?}"),
        }
    }
}
