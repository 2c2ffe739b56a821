//! The relay after the `101 Switching Protocols`: data of every size, fragments, control frames and close
//! handshakes pass unchanged; ends, idle timeouts, half-closes and backpressure behave; many connections at once
//! keep their order.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Bytes, Message};

use support::raw::{header_value, read_head};
use support::*;
use wsgate::config::Relay;
use wsgate::ws::accept_key;

/// The key in [`upgrade_request`].
const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

// ---------------------------------------------------------------------------------------------------------------
// Helpers of this file
// ---------------------------------------------------------------------------------------------------------------

fn text_of_len(len: usize) -> String {
    (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

fn binary_of_len(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(7) ^ (i >> 8)) as u8).collect()
}

/// Byte `pos` of the stream the backpressure test sends: a cycle of a prime length, so that a byte lost, doubled
/// or reordered shows.
fn pattern_byte(pos: u64) -> u8 {
    (pos % 251) as u8
}

async fn send(ws: &mut Client, msg: Message) {
    within("a send", ws.send(msg)).await.expect("send");
}

/// The next message of any kind, pings and pongs included.
async fn next_raw(ws: &mut Client) -> Message {
    match within("a message", ws.next()).await {
        Some(Ok(m)) => m,
        Some(Err(e)) => panic!("client error: {e}"),
        None => panic!("connection closed while waiting for a message"),
    }
}

/// Reads until the connection ends (EOF or error) within `limit`, and returns how long that took. Panics on a
/// data message: nothing more is expected on this connection.
async fn until_end(ws: &mut Client, limit: Duration) -> Duration {
    let started = Instant::now();
    let ended = timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => continue,
                Some(Ok(m)) => panic!("expected the connection to end, got {m:?}"),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client connection was still open after {limit:?}");
    started.elapsed()
}

/// A backend that takes one connection, answers its upgrade with a correct `101`, and hands the socket (and any
/// bytes read past the request head) to the test.
async fn raw_backend() -> (SocketAddr, oneshot::Receiver<(TcpStream, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let (head, rest) = read_head(&mut stream).await;
        let key = header_value(&head, "sec-websocket-key").expect("a Sec-WebSocket-Key");
        let accept = accept_key(key.as_bytes());
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            std::str::from_utf8(&accept).expect("ascii")
        );
        stream.write_all(answer.as_bytes()).await.expect("write 101");
        let _ = tx.send((stream, rest));
    });
    (addr, rx)
}

/// A raw client through the proxy: sends the upgrade, checks the `101`, and returns the socket and any bytes read
/// past the answer head.
async fn raw_client(proxy: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut stream = within("connect", TcpStream::connect(proxy)).await.expect("connect");
    stream
        .write_all(upgrade_request("/raw", "").as_bytes())
        .await
        .expect("write upgrade");
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "expected a 101: {head}");
    let accept = accept_key(CLIENT_KEY.as_bytes());
    assert_eq!(
        header_value(&head, "sec-websocket-accept").map(str::as_bytes),
        Some(&accept[..]),
        "accept key in {head}"
    );
    (stream, rest)
}

/// Reads until EOF (within [`WAIT`]).
async fn read_all(stream: &mut TcpStream, mut out: Vec<u8>) -> Vec<u8> {
    within("EOF", async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await.expect("read") {
                0 => return out,
                n => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn echo_is_exact_at_frame_length_boundaries() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/echo")).await;
    // 125: the largest 7-bit length; 126: the first 16-bit one; 65535: the largest 16-bit; 65536: the first 64-bit.
    for len in [125, 126, 65535, 65536] {
        let text = text_of_len(len);
        send(&mut ws, Message::text(text.clone())).await;
        let got = next_text(&mut ws).await;
        assert_eq!(got.len(), len, "text echo length");
        assert!(got == text, "text echo of {len} bytes differs");

        let data = binary_of_len(len);
        send(&mut ws, Message::binary(data.clone())).await;
        match next_message(&mut ws).await {
            Message::Binary(got) => {
                assert_eq!(got.len(), len, "binary echo length");
                assert!(got == data, "binary echo of {len} bytes differs");
            }
            other => panic!("expected binary, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn sixteen_mib_binary_message_echoes_intact() {
    const LEN: usize = 16 * 1024 * 1024;
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/big")).await;
    let data = Bytes::from(binary_of_len(LEN));
    send(&mut ws, Message::Binary(data.clone())).await;
    match next_message(&mut ws).await {
        Message::Binary(got) => {
            assert_eq!(got.len(), LEN, "echo length");
            let first_diff = got.iter().zip(data.iter()).position(|(a, b)| a != b);
            assert_eq!(first_diff, None, "echo differs from the sent message");
        }
        other => panic!("expected binary, got {:?}", short(&other)),
    }
}

fn short(m: &Message) -> String {
    let s = format!("{m:?}");
    s.chars().take(200).collect()
}

#[tokio::test]
async fn fragmented_message_is_echoed_whole() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/fragments")).await;

    let fragments = [
        Frame::message("three ", OpCode::Data(Data::Text), false),
        Frame::message("fragments, ", OpCode::Data(Data::Continue), false),
        Frame::message("one message", OpCode::Data(Data::Continue), true),
    ];
    for frame in fragments {
        send(&mut ws, Message::Frame(frame)).await;
    }
    assert_eq!(next_text(&mut ws).await, "three fragments, one message");

    let fragments = [
        Frame::message(vec![0u8, 1, 2], OpCode::Data(Data::Binary), false),
        Frame::message(vec![3u8; 70_000], OpCode::Data(Data::Continue), false),
        Frame::message(vec![255u8], OpCode::Data(Data::Continue), true),
    ];
    let mut whole = vec![0u8, 1, 2];
    whole.extend_from_slice(&[3u8; 70_000]);
    whole.push(255);
    for frame in fragments {
        send(&mut ws, Message::Frame(frame)).await;
    }
    match next_message(&mut ws).await {
        Message::Binary(got) => assert!(got == whole, "binary reassembly differs"),
        other => panic!("expected binary, got {:?}", short(&other)),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Control frames
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_ping_gets_backend_pong_with_same_payload() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/ping")).await;
    send(&mut ws, Message::Ping(Bytes::from_static(b"are you there?"))).await;
    match next_raw(&mut ws).await {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there?"),
        other => panic!("expected a pong, got {other:?}"),
    }
    // The session goes on.
    send(&mut ws, Message::text("after ping")).await;
    assert_eq!(next_text(&mut ws).await, "after ping");
}

#[tokio::test]
async fn backend_ping_reaches_client_and_its_pong_returns() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/ping")).await;
    send(&mut ws, Message::text("ping-me:abc")).await;
    match next_raw(&mut ws).await {
        Message::Ping(p) => assert_eq!(&p[..], b"abc"),
        other => panic!("expected the backend's ping, got {other:?}"),
    }
    // Polling the client again flushes its automatic pong; the backend reports it.
    match next_raw(&mut ws).await {
        Message::Text(t) => assert_eq!(t.as_str(), "pong:abc"),
        other => panic!("expected the backend's pong report, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Closing
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_close_code_and_reason_reach_backend() {
    let mut backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/close")).await;
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));

    let frame = CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye now".into(),
    };
    within("close", ws.close(Some(frame))).await.expect("close");
    assert_eq!(
        backend.next_event().await,
        Event::Closed(Some((4001, "bye now".to_string())))
    );
    // The backend (tungstenite) answers with the same code and reason.
    match next_raw(&mut ws).await {
        Message::Close(Some(reply)) => {
            assert_eq!(u16::from(reply.code), 4001);
            assert_eq!(reply.reason.as_str(), "bye now");
        }
        other => panic!("expected the backend's close reply, got {other:?}"),
    }
    until_end(&mut ws, WAIT).await;
}

#[tokio::test]
async fn backend_close_code_and_reason_reach_client() {
    let mut backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/close")).await;
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));

    send(&mut ws, Message::text("close:4002:going")).await;
    match next_raw(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 4002);
            assert_eq!(frame.reason.as_str(), "going");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    // Polling on sends the client's reply, which echoes the frame; the backend receives it unchanged.
    until_end(&mut ws, WAIT).await;
    assert_eq!(
        backend.next_event().await,
        Event::Closed(Some((4002, "going".to_string())))
    );
}

#[tokio::test]
async fn backend_killed_mid_session_closes_client() {
    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let mut ws = connect(&proxy.url("/kill")).await;
    send(&mut ws, Message::text("still there?")).await;
    assert_eq!(next_text(&mut ws).await, "still there?");

    backend.kill();
    let took = until_end(&mut ws, Duration::from_secs(3)).await;
    eprintln!("client saw the end {took:?} after the backend was killed");
}

// ---------------------------------------------------------------------------------------------------------------
// Idle timeout
// ---------------------------------------------------------------------------------------------------------------

const IDLE: Duration = Duration::from_millis(500);

#[tokio::test]
async fn silent_session_is_closed_after_idle_timeout() {
    let mut backend = ws_backend("a").await;
    let proxy = Proxy::start_with(&[backend.addr], |c| c.routes[0].idle_timeout = Some(IDLE));
    let mut ws = connect(&proxy.url("/idle")).await;
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));
    send(&mut ws, Message::text("one")).await;
    assert_eq!(next_text(&mut ws).await, "one");

    // Measured from after the last byte the proxy relayed, so it cannot be shorter than the timeout (less a
    // little for timer granularity).
    let took = until_end(&mut ws, Duration::from_secs(5)).await;
    assert!(
        took >= IDLE - Duration::from_millis(50),
        "closed after {took:?}, before the {IDLE:?} idle timeout"
    );
    assert_eq!(backend.next_event().await, Event::Dropped);
}

#[tokio::test]
async fn busy_session_outlives_idle_timeout() {
    let mut backend = ws_backend("a").await;
    let proxy = Proxy::start_with(&[backend.addr], |c| c.routes[0].idle_timeout = Some(IDLE));
    let mut ws = connect(&proxy.url("/busy")).await;
    assert!(matches!(backend.next_event().await, Event::Upgraded { .. }));

    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let msg = format!("tick {n}");
        send(&mut ws, Message::text(msg.clone())).await;
        assert_eq!(next_text(&mut ws).await, msg, "session ended while busy");
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(n >= 7, "only {n} exchanges in 1.5 s");
    assert!(
        backend.events.try_recv().is_err(),
        "the backend saw its connection end while busy"
    );
    // The timeout was on all along: once silent, the session is closed.
    until_end(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(backend.next_event().await, Event::Dropped);
}

// ---------------------------------------------------------------------------------------------------------------
// Half-close and backpressure (raw sockets on both sides)
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_half_close_lets_backend_still_answer() {
    let (backend_addr, backend) = raw_backend().await;
    let proxy = Proxy::start_with(&[backend_addr], |c| c.routes[0].relay = Relay::tunnel());
    let (mut client, early) = raw_client(proxy.addr).await;
    assert!(early.is_empty(), "unexpected bytes after the 101");
    let (mut server, rest) = within("the backend's connection", backend)
        .await
        .expect("backend accepted");

    client.write_all(b"last words").await.expect("client write");
    client.shutdown().await.expect("client shuts down its write half");
    let got = read_all(&mut server, rest).await;
    assert_eq!(got, b"last words", "backend got the bytes, then EOF");

    let half_closed_at = Instant::now();
    server
        .write_all(b"an answer after your half-close")
        .await
        .expect("backend can still write");
    // The backend keeps its socket open: the proxy closes the connection at the end of its one-second linger.
    let got = read_all(&mut client, Vec::new()).await;
    assert_eq!(got, b"an answer after your half-close");
    let took = half_closed_at.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the client's connection closed only after {took:?}"
    );
    // ... and the backend's too: its writes soon fail (the closed socket answers with a reset).
    within("the backend's connection to be closed", async {
        while server.write_all(b"anyone?").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn slow_client_stalls_backend_without_losing_bytes() {
    /// Writes that take longer than this mean the backend is stalled.
    const STALL: Duration = Duration::from_millis(500);
    /// Kernel socket buffers along the way plus wsgate's at most 64 KiB stay well below this.
    const BOUND: u64 = 32 * 1024 * 1024;
    /// Written after the stall, while the client reads.
    const MORE: u64 = 8 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;

    let (backend_addr, backend) = raw_backend().await;
    let proxy = Proxy::start_with(&[backend_addr], |c| c.routes[0].relay = Relay::tunnel());
    let (mut client, early) = raw_client(proxy.addr).await;
    assert!(early.is_empty(), "unexpected bytes after the 101");
    let (mut server, _) = within("the backend's connection", backend)
        .await
        .expect("backend accepted");

    let (stalled_tx, stalled_rx) = oneshot::channel();
    let writer = tokio::spawn(async move {
        let cycle: Vec<u8> = (0..(CHUNK + 251) as u64).map(pattern_byte).collect();
        let mut pos: u64 = 0;
        // Phase 1: write as fast as possible until the writes stall (or too much got through).
        let mut stalled = false;
        while pos < BOUND {
            let start = (pos % 251) as usize;
            match timeout(STALL, server.write(&cycle[start..start + CHUNK])).await {
                Ok(Ok(n)) => pos += n as u64,
                Ok(Err(e)) => panic!("backend write failed: {e}"),
                Err(_) => {
                    stalled = true;
                    break;
                }
            }
        }
        let _ = stalled_tx.send((stalled, pos));
        // Phase 2: the client reads now; write some more, then close.
        let end = pos + MORE;
        while pos < end {
            let start = (pos % 251) as usize;
            let len = CHUNK.min((end - pos) as usize);
            let n = within("a backend write", server.write(&cycle[start..start + len]))
                .await
                .expect("backend write");
            pos += n as u64;
        }
        server.shutdown().await.expect("backend shutdown");
        pos
    });

    let (stalled, written) = within("the backend to stall", stalled_rx)
        .await
        .expect("writer reports");
    eprintln!("backend wrote {written} bytes before stalling");
    assert!(
        stalled && written < BOUND,
        "a client that does not read let the backend write {written} bytes"
    );

    let mut received: u64 = 0;
    within("every byte", async {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = client.read(&mut buf).await.expect("client read");
            if n == 0 {
                break;
            }
            for (i, &b) in buf[..n].iter().enumerate() {
                let at = received + i as u64;
                assert_eq!(b, pattern_byte(at), "byte {at} is wrong");
            }
            received += n as u64;
        }
    })
    .await;
    let total = within("the writer", writer).await.expect("writer task");
    assert_eq!(received, total, "client got every byte the backend wrote");
}

// ---------------------------------------------------------------------------------------------------------------
// Many connections
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_echo_in_order() {
    const CLIENTS: usize = 1000;
    const MESSAGES: usize = 20;
    const BATCH: usize = 100;

    let backend = ws_backend("a").await;
    let proxy = Proxy::start(&[backend.addr]);
    let url = proxy.url("/many");

    let run = async {
        // Every connection is open before any sends, so all 1 000 are live at once.
        let mut clients = Vec::with_capacity(CLIENTS);
        for batch in 0..CLIENTS / BATCH {
            let mut connecting = tokio::task::JoinSet::new();
            for i in 0..BATCH {
                let url = url.clone();
                connecting.spawn(async move { (batch * BATCH + i, connect(&url).await) });
            }
            while let Some(done) = connecting.join_next().await {
                clients.push(done.expect("connect task"));
            }
        }
        assert_eq!(clients.len(), CLIENTS);

        let mut sessions = tokio::task::JoinSet::new();
        for (id, mut ws) in clients {
            sessions.spawn(async move {
                for n in 0..MESSAGES {
                    ws.send(Message::text(format!("client {id} message {n}")))
                        .await
                        .unwrap_or_else(|e| panic!("client {id}: send {n}: {e}"));
                }
                for n in 0..MESSAGES {
                    let got = next_text(&mut ws).await;
                    assert_eq!(got, format!("client {id} message {n}"), "client {id}");
                }
                let _ = ws.close(None).await;
                id
            });
        }
        let mut ok = 0;
        while let Some(done) = sessions.join_next().await {
            done.expect("client task");
            ok += 1;
        }
        ok
    };
    let ok = timeout(Duration::from_secs(60), run)
        .await
        .expect("1 000 connections within 60 s");
    assert_eq!(ok, CLIENTS);
}

// ---------------------------------------------------------------------------------------------------------------
// Idle timeout and backpressure together
// ---------------------------------------------------------------------------------------------------------------

/// A client that reads steadily but slower than the backend writes is never idle: bytes flow to it all the time.
#[tokio::test]
async fn slow_steady_reader_is_not_cut_by_idle_timeout() {
    const TOTAL: usize = 8 * 1024 * 1024;
    let (backend_addr, backend) = raw_backend().await;
    let proxy = Proxy::start_with(&[backend_addr], |c| {
        c.routes[0].relay = Relay::tunnel();
        c.routes[0].idle_timeout = Some(IDLE);
    });
    let (mut client, early) = raw_client(proxy.addr).await;
    let (mut server, _) = within("the backend's connection", backend)
        .await
        .expect("backend accepted");
    // The backend writes everything at once (the kernel buffers take it), then keeps its socket open.
    let writer = tokio::spawn(async move {
        server.write_all(&vec![7u8; TOTAL]).await.expect("backend write");
        std::future::pending::<()>().await;
        drop(server);
    });

    // The client reads 64 KiB every 50 ms (about 1.3 MB/s): never silent for anywhere near the idle timeout.
    let mut got = early.len();
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let reading = timeout(Duration::from_secs(20), async {
        while got < TOTAL {
            let n = client.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            got += n;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    writer.abort();
    assert!(reading.is_ok(), "the client was still reading after 20 s");
    assert_eq!(
        got,
        TOTAL,
        "the connection ended after {:?} with {} bytes the backend wrote never delivered",
        started.elapsed(),
        TOTAL - got
    );
}
