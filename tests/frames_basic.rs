//! Frames mode, first checks: echo and close pass through; protocol violations and drain close with codes.
mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::raw::frames;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::config::FrameRules;

async fn close_of(ws: &mut Client) -> Option<(u16, String)> {
    loop {
        match within("a close frame", ws.next()).await {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| (u16::from(f.code), f.reason.to_string())),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn echo_and_close_codes_pass_through_frames_mode() {
    let mut backend = ws_backend("b").await;
    let proxy = Proxy::start_with(&[backend.addr], frames(FrameRules::default()));
    let mut ws = connect(&proxy.url("/echo")).await;
    for size in [0usize, 125, 126, 65535, 65536, 200_000] {
        let text = "z".repeat(size);
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_text(&mut ws).await, text);
    }
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    assert_eq!(backend.next_event().await, Event::Closed(Some((4001, "bye".into()))));
    assert_eq!(close_of(&mut ws).await, Some((4001, "bye".into())));
}

#[tokio::test]
async fn unmasked_client_frame_gets_1002_and_backend_gets_1011() {
    let mut backend = ws_backend("b").await;
    let proxy = Proxy::start_with(&[backend.addr], frames(FrameRules::default()));
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(upgrade_request("/", "").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(within("the 101", stream.read_u8()).await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // An unmasked text frame from a client.
    stream.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    let mut reply = [0u8; 4];
    within("the close frame", stream.read_exact(&mut reply)).await.unwrap();
    assert_eq!(reply[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), 1002);
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));
    match backend.next_event().await {
        Event::Closed(Some((1011, reason))) => assert!(reason.contains("client"), "{reason}"),
        other => panic!("expected close 1011, got {other:?}"),
    }
}

#[tokio::test]
async fn drain_sends_1001_to_both_sides() {
    let mut backend = ws_backend("b").await;
    let proxy = Proxy::start_with(&[backend.addr], frames(FrameRules::default()));
    let mut ws = connect(&proxy.url("/echo")).await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hi");
    let joined = std::thread::spawn(move || proxy.shutdown_and_join());
    assert_eq!(close_of(&mut ws).await, Some((1001, "going away".into())));
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));
    assert_eq!(
        backend.next_event().await,
        Event::Closed(Some((1001, "going away".into())))
    );
    drop(ws);
    within("the proxy to stop", tokio::task::spawn_blocking(move || joined.join()))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn silent_client_is_pinged_and_stays_connected() {
    let backend = ws_backend("b").await;
    let rules = FrameRules {
        ping_interval: Some(Duration::from_millis(200)),
        ..FrameRules::default()
    };
    let proxy = Proxy::start_with(&[backend.addr], frames(rules));
    let mut ws = connect(&proxy.url("/echo")).await;
    // tungstenite answers pings on its own while it is read.
    let ping = within("a ping from wsgate", async {
        loop {
            if let Some(Ok(Message::Ping(p))) = ws.next().await {
                return p;
            }
        }
    })
    .await;
    assert_eq!(ping.len(), 8);
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "still here");
}
