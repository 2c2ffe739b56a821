//! What the frames-mode tests expect of the peers around wsgate: a client's data and close, the end of its
//! connection, an echo, and the events of a scripted [`Backend`](super::Backend).

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{Backend, Client, Event, next_text, within};

/// The data messages before the next close frame, and the close's code and reason.
pub async fn close_after(ws: &mut Client) -> (Vec<Message>, Option<(u16, String)>) {
    let mut data = Vec::new();
    within("a close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return (data, frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => data.push(m),
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
}

/// Reads until the connection ends (this also sends tungstenite's queued close reply).
pub async fn ws_end(ws: &mut Client) {
    within("the connection to end", async {
        while let Some(Ok(m)) = ws.next().await {
            assert!(
                matches!(m, Message::Ping(_) | Message::Pong(_) | Message::Close(_)),
                "data after the close: {m:?}"
            );
        }
    })
    .await;
}

pub async fn echo(ws: &mut Client, text: &str) {
    within("a send", ws.send(Message::text(text))).await.expect("send");
    assert_eq!(next_text(ws).await, text);
}

/// The backend's next event is its `Upgraded`.
pub async fn expect_upgraded(backend: &mut Backend) {
    match backend.next_event().await {
        Event::Upgraded { .. } => {}
        other => panic!("expected the upgrade, got {other:?}"),
    }
}

/// The backend's next event is a close frame with `code`; returns its reason.
pub async fn expect_backend_close(backend: &mut Backend, code: u16) -> String {
    match backend.next_event().await {
        Event::Closed(Some((c, reason))) if c == code => reason,
        other => panic!("expected the backend to get close {code}, got {other:?}"),
    }
}

/// The backend saw nothing after the upgrade so far.
pub fn assert_no_backend_event(backend: &mut Backend) {
    match backend.events.try_recv() {
        Err(mpsc::error::TryRecvError::Empty) => {}
        other => panic!("the backend saw {other:?}"),
    }
}

/// The next message, skipping wsgate's own pings (8-byte payloads).
pub async fn next_raw_skipping_wsgate_pings(ws: &mut Client) -> Message {
    loop {
        match within("a message", ws.next()).await {
            Some(Ok(Message::Ping(p))) if p.len() == 8 => continue,
            Some(Ok(m)) => return m,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}
