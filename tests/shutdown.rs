//! Graceful shutdown of the built binary: SIGTERM stops accepting at once, live connections keep working until
//! they end or the drain timeout passes, and the process exits 0; a second signal exits at once.
mod support;

use std::time::Duration;

use futures_util::SinkExt;
use rustix::process::Signal;
use support::binary::BinaryProxy;
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

async fn echo(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    assert_eq!(next_text(ws).await, text);
}

#[tokio::test]
async fn sigterm_stops_accepting_keeps_live_sessions_and_exits_zero_when_they_end() {
    let backend = ws_backend("b").await;
    let mut proxy = BinaryProxy::start(backend.addr, &["--mode", "tunnel", "--drain-timeout", "30s"]).await;
    let url = format!("ws://{}/echo", proxy.addr);
    let mut live = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&url).await;
        echo(&mut ws, "before").await;
        live.push(ws);
    }
    proxy.signal(Signal::TERM);
    proxy.wait_for_log(&["shutting down"]).await;
    within("the listener to close", async {
        while TcpStream::connect(proxy.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for ws in &mut live {
        echo(ws, "during the drain").await;
    }
    for mut ws in live {
        ws.close(None).await.expect("close");
        while let Some(Ok(_)) = within("the close reply", futures_util::StreamExt::next(&mut ws)).await {}
    }
    assert_eq!(proxy.exit_code().await, Some(0));
}

#[tokio::test]
async fn drain_timeout_closes_remaining_sessions_and_exits_zero() {
    let backend = ws_backend("b").await;
    let mut proxy = BinaryProxy::start(backend.addr, &["--mode", "tunnel", "--drain-timeout", "1s"]).await;
    let mut ws = connect(&format!("ws://{}/echo", proxy.addr)).await;
    echo(&mut ws, "hello").await;
    let signalled = tokio::time::Instant::now();
    proxy.signal(Signal::TERM);
    let line = proxy.wait_for_log(&["drain timeout reached during shutdown"]).await;
    assert!(line.contains("\"status\":101"), "{line}");
    assert_eq!(proxy.exit_code().await, Some(0));
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "the drain lasted its timeout"
    );
    // The client's connection was closed by the proxy.
    let end = within("the client to see the close", futures_util::StreamExt::next(&mut ws)).await;
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let backend = ws_backend("b").await;
    let mut proxy = BinaryProxy::start(backend.addr, &["--mode", "tunnel", "--drain-timeout", "60s"]).await;
    let mut ws = connect(&format!("ws://{}/echo", proxy.addr)).await;
    echo(&mut ws, "hello").await;
    proxy.signal(Signal::TERM);
    proxy.wait_for_log(&["shutting down"]).await;
    proxy.signal(Signal::INT);
    assert_eq!(proxy.exit_code().await, Some(1));
}

#[tokio::test]
async fn sigint_with_no_connections_exits_zero_at_once() {
    let backend = ws_backend("b").await;
    let mut proxy = BinaryProxy::start(backend.addr, &[]).await;
    proxy.signal(Signal::INT);
    assert_eq!(proxy.exit_code().await, Some(0));
}
