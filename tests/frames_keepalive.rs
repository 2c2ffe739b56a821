//! Frames mode keepalive, with real peers over real sockets: wsgate pings both sides, closes a side that stops
//! answering (1001 to the backend for a dead client, 1011 to the client for a dead backend), keeps an idle
//! connection that answers (a NAT's idle timeout), and never forwards the pongs to its own pings.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::frames::*;
use support::raw::*;
use support::*;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::{Bytes as WsBytes, Message};
use wsgate::config::FrameRules;
use wsgate::ws::frame::opcode;

/// The data frames a recording backend (see [`recording_backend`]) echoes.
const ECHOED: &[u8] = &[opcode::TEXT, opcode::BINARY];

// ---------------------------------------------------------------------------------------------------------------
// Keepalive
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_that_stops_answering_is_closed_and_the_backend_gets_1001() {
    let mut backend = ws_backend("b").await;
    let rules = FrameRules {
        ping_interval: Some(Duration::from_millis(200)),
        pong_timeout: Duration::from_millis(300),
        ..FrameRules::default()
    };
    let proxy = Proxy::start_with(&[backend.addr], frames(rules));
    // The handshake, then this client never reads (nor writes) again until the backend has been told.
    let mut client = raw_client(proxy.addr, "/dead-client").await;
    let silent_since = Instant::now();
    expect_upgraded(&mut backend).await;
    let reason = expect_backend_close(&mut backend, 1001).await;
    let after = silent_since.elapsed();
    assert!(reason.contains("client"), "{reason}");
    assert!(
        after >= Duration::from_millis(450),
        "the backend was told after {after:?}, before a ping could have gone unanswered"
    );
    assert!(
        after < Duration::from_secs(3),
        "the dead client was noticed only after {after:?}"
    );
    // When the client reads at last, it finds wsgate's pings and then the end of the connection.
    let frames = timeout(Duration::from_secs(3), client.until_eof())
        .await
        .expect("the dead client's connection was closed within 3 s");
    assert!(!frames.is_empty(), "at least one ping went to the client");
    for f in &frames {
        assert_eq!((f.opcode, f.payload.len()), (opcode::PING, 8), "{f:?}");
    }
}

#[tokio::test]
async fn nat_idle_client_that_answers_pings_stays_connected() {
    let mut backend = ws_backend("b").await;
    let rules = FrameRules {
        ping_interval: Some(Duration::from_millis(200)),
        pong_timeout: Duration::from_millis(500),
        ..FrameRules::default()
    };
    let proxy = Proxy::start_with(&[backend.addr], frames(rules));
    let mut ws = connect(&proxy.url("/idle")).await;
    expect_upgraded(&mut backend).await;
    echo(&mut ws, "before the silence").await;
    // Two seconds without sending anything; reading lets tungstenite answer the pings.
    let mut pings = 0;
    let quiet = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            _ = &mut quiet => break,
            m = ws.next() => match m {
                Some(Ok(Message::Ping(p))) => {
                    assert_eq!(p.len(), 8);
                    pings += 1;
                }
                other => panic!("the idle connection got {other:?}"),
            },
        }
    }
    assert!(pings >= 4, "only {pings} pings in 2 s with a 200 ms interval");
    echo(&mut ws, "after the silence").await;
    assert_no_backend_event(&mut backend);
    ws.close(None).await.expect("close");
    ws_end(&mut ws).await;
}

#[tokio::test]
async fn wsgate_pongs_are_not_forwarded_either_way() {
    let mut backend = ws_backend("b").await;
    let rules = FrameRules {
        ping_interval: Some(Duration::from_millis(200)),
        pong_timeout: Duration::from_secs(1),
        ..FrameRules::default()
    };
    let proxy = Proxy::start_with(&[backend.addr], frames(rules));
    let mut ws = connect(&proxy.url("/pongs")).await;
    expect_upgraded(&mut backend).await;

    /// Reads for `how_long`: counts wsgate's pings and fails on anything else (a forwarded pong shows as an
    /// unrequested `Pong` from the backend, or as `pong:..` text from the scripted backend).
    async fn quiet_period(ws: &mut Client, how_long: Duration) -> usize {
        let mut pings = 0;
        let end = tokio::time::sleep(how_long);
        tokio::pin!(end);
        loop {
            tokio::select! {
                _ = &mut end => return pings,
                m = ws.next() => match m {
                    Some(Ok(Message::Ping(_))) => pings += 1,
                    other => panic!("unexpected during the quiet period: {other:?}"),
                },
            }
        }
    }
    assert!(quiet_period(&mut ws, Duration::from_millis(1500)).await >= 3);

    // The control: pings and pongs of the peers' own still pass both ways.
    ws.send(Message::text("ping-me:from the backend")).await.expect("send");
    match next_raw_skipping_wsgate_pings(&mut ws).await {
        Message::Ping(p) => assert_eq!(&p[..], b"from the backend"),
        other => panic!("expected the backend's ping, got {other:?}"),
    }
    assert_eq!(next_text(&mut ws).await, "pong:from the backend");
    ws.send(Message::Ping(WsBytes::from_static(b"from the client")))
        .await
        .expect("send");
    match next_raw_skipping_wsgate_pings(&mut ws).await {
        Message::Pong(p) => assert_eq!(&p[..], b"from the client"),
        other => panic!("expected the backend's pong, got {other:?}"),
    }

    assert!(quiet_period(&mut ws, Duration::from_millis(1000)).await >= 2);
    assert_no_backend_event(&mut backend);
}

#[tokio::test]
async fn silent_backend_is_pinged_too_and_its_pongs_keep_it() {
    let mut backend = RawBackend::start().await;
    let rules = FrameRules {
        ping_interval: Some(Duration::from_millis(200)),
        pong_timeout: Duration::from_millis(500),
        ..FrameRules::default()
    };
    let proxy = Proxy::start_with(&[backend.addr], frames(rules));
    let mut ws = connect(&proxy.url("/silent-backend")).await;
    let recorder = tokio::spawn(recording_backend(backend.next_conn().await, true, ECHOED));
    // Both sides silent for 1.5 s; the client answers wsgate's pings as it reads.
    let quiet = tokio::time::sleep(Duration::from_millis(1500));
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            _ = &mut quiet => break,
            m = ws.next() => match m {
                Some(Ok(Message::Ping(p))) => assert_eq!(p.len(), 8),
                other => panic!("the client got {other:?}"),
            },
        }
    }
    echo(&mut ws, "still connected").await;
    ws.close(None).await.expect("close");
    ws_end(&mut ws).await;
    let seen = within("the backend's connection to end", recorder)
        .await
        .expect("recorder");
    let pings: Vec<&Got> = seen.iter().filter(|f| f.opcode == opcode::PING).collect();
    assert!(
        pings.len() >= 4,
        "only {} pings reached the silent backend: {seen:?}",
        pings.len()
    );
    for p in &pings {
        assert!(p.mask.is_some(), "a ping to the backend is masked: {p:?}");
        assert_eq!(p.payload.len(), 8);
    }
    assert!(
        seen.iter().all(|f| f.opcode != opcode::PONG),
        "the client's pongs to wsgate were forwarded: {seen:?}"
    );
    let data: Vec<&[u8]> = seen
        .iter()
        .filter(|f| f.opcode == opcode::TEXT)
        .map(|f| &f.payload[..])
        .collect();
    assert_eq!(data, [&b"still connected"[..]]);
    assert!(seen.last().is_some_and(|f| f.opcode == opcode::CLOSE), "{seen:?}");
}

#[tokio::test]
async fn backend_that_stops_answering_pings_gives_the_client_1011() {
    let mut backend = RawBackend::start().await;
    let rules = FrameRules {
        ping_interval: Some(Duration::from_millis(200)),
        pong_timeout: Duration::from_millis(300),
        ..FrameRules::default()
    };
    let proxy = Proxy::start_with(&[backend.addr], frames(rules));
    let mut ws = connect(&proxy.url("/dead-backend")).await;
    let recorder = tokio::spawn(recording_backend(backend.next_conn().await, false, ECHOED));
    let (data, close) = close_after(&mut ws).await;
    assert!(data.is_empty(), "{data:?}");
    assert_eq!(close, Some((1011, "backend connection lost".into())));
    ws_end(&mut ws).await;
    let seen = within("the backend's connection to end", recorder)
        .await
        .expect("recorder");
    assert!(!seen.is_empty(), "the backend was pinged");
    assert!(seen.iter().all(|f| f.opcode == opcode::PING), "{seen:?}");
}
