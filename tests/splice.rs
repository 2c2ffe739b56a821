//! The tunnel's splice path (`src/relay/splice.rs`) carries large transfers byte for byte and keeps the copy path's
//! half-close. Each scenario runs through the built binary with splice on (the default), then off (`--no-splice`);
//! with it on, the pipes in wsgate's descriptor table show that the splice path was taken. A session gives its
//! pipes back once its transfer is over, and holds none while it idles.

mod support;

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::binary::{Binary, BinaryProxy};
use support::raw::{RawBackend, raw_client};
use support::*;

const MIB: usize = 1024 * 1024;
/// Splice on (the default), then off.
const SWITCHES: [bool; 2] = [true, false];

async fn tunnel_proxy(backend: SocketAddr, splice: bool) -> BinaryProxy {
    let off: &[&str] = if splice { &[] } else { &["--no-splice"] };
    let args: Vec<&str> = ["--mode", "tunnel"].iter().chain(off).copied().collect();
    BinaryProxy::start(backend, &args).await
}

/// `len` bytes in a cycle of a prime length, shifted by `seed`: a byte lost, doubled or reordered shows, and so
/// does a message delivered in another's place.
fn stream_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i % 251) as u8).wrapping_add(seed)).collect()
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    let first_difference = got.iter().zip(want).position(|(g, w)| g != w);
    assert!(
        got.len() == want.len() && first_difference.is_none(),
        "{what}: got {} bytes for {}, first difference at {first_difference:?}",
        got.len(),
        want.len()
    );
}

/// The pipes open in wsgate's process (its stdout and stderr among them).
fn pipes(binary: &Binary) -> usize {
    let pid = binary.child.id().expect("pid");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("wsgate's descriptors")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// Reads until EOF (within [`WAIT`]), after the bytes already in `out`.
async fn read_to_eof(stream: &mut TcpStream, mut out: Vec<u8>) -> Vec<u8> {
    within("EOF", stream.read_to_end(&mut out)).await.expect("read");
    out
}

#[tokio::test]
async fn megabyte_messages_cross_the_tunnel_exactly_with_and_without_splice() {
    init();
    let backend = ws_backend("echo").await;
    for splice in SWITCHES {
        let proxy = tunnel_proxy(backend.addr, splice).await;
        let before = pipes(&proxy);
        let ws = connect(&format!("ws://{}/large", proxy.addr)).await;
        let (mut tx, mut rx) = ws.split();
        // Sent and echoed at once, so that both directions carry a large transfer together.
        let send = async {
            for seed in 0..20 {
                tx.send(Message::binary(stream_of(MIB, seed))).await.expect("send");
            }
        };
        let receive = async {
            for seed in 0..20 {
                match within("an echo", rx.next()).await {
                    Some(Ok(Message::Binary(got))) => {
                        assert_same(&format!("echo {seed} (splice {splice})"), &got, &stream_of(MIB, seed))
                    }
                    other => panic!("echo {seed} (splice {splice}): expected binary, got {other:?}"),
                }
            }
        };
        within("20 MiB each way", async { tokio::join!(send, receive) }).await;
        // Each direction took a pipe (two descriptors) on its first full read: in use, or kept for the next
        // transfer once given back.
        let made = if splice { 4 } else { 0 };
        assert_eq!(pipes(&proxy), before + made, "pipes with splice {splice}");
    }
}

#[tokio::test]
async fn backend_answers_after_client_half_close_of_large_upload_with_and_without_splice() {
    init();
    let mut backend = RawBackend::start().await;
    for splice in SWITCHES {
        let mut proxy = tunnel_proxy(backend.addr, splice).await;
        let before = pipes(&proxy);
        let mut client = raw_client(proxy.addr, "/half-close").await;
        let mut server = backend.next_conn().await;
        assert!(
            client.buf.is_empty() && server.buf.is_empty(),
            "unexpected bytes after the handshake"
        );

        let upload = stream_of(2 * MIB, 1);
        let send = async {
            client.stream.write_all(&upload).await.expect("client write");
            client
                .stream
                .shutdown()
                .await
                .expect("client shuts down its write half");
        };
        let (_, got) = within("the upload", async {
            tokio::join!(send, read_to_eof(&mut server.stream, Vec::new()))
        })
        .await;
        assert_same(&format!("upload (splice {splice})"), &got, &upload);
        let made = if splice { 2 } else { 0 };
        assert_eq!(
            pipes(&proxy),
            before + made,
            "pipes after the upload with splice {splice}"
        );

        // The backend still answers, within the half-close linger, then closes its own half.
        let answer = stream_of(2 * MIB, 2);
        let send = async {
            server.stream.write_all(&answer).await.expect("backend can still write");
            server
                .stream
                .shutdown()
                .await
                .expect("backend shuts down its write half");
        };
        let (_, got) = within("the answer", async {
            tokio::join!(send, read_to_eof(&mut client.stream, Vec::new()))
        })
        .await;
        assert_same(&format!("answer (splice {splice})"), &got, &answer);

        let record = proxy.wait_for_access(|v| v["status"] == 101).await;
        assert_eq!(record["end"], "client closed", "{record}");
        assert_eq!(record["bytes_in"], 2 * MIB, "{record}");
        assert_eq!(record["bytes_out"], 2 * MIB, "{record}");
        // Given back when the relay ended, and kept (empty) for the next transfer: the answer's direction took the
        // upload's pipe again if it had been given back by then, or one of its own.
        let after = pipes(&proxy);
        assert!(
            (before + made..=before + 2 * made).contains(&after),
            "pipes after the relay ended with splice {splice}: {after}, {before} before"
        );
    }
}

/// The value of one series of the admin listener's `GET /metrics`.
async fn metric(proxy: &Proxy, series: &str) -> Option<f64> {
    let request = "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
    let text = raw_exchange(proxy.admin_addr(), request.as_bytes()).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Scrapes until the pipes in use and kept are as expected, within the test wait.
async fn wait_for_pipes(proxy: &Proxy, in_use: f64, kept: f64) {
    let started = tokio::time::Instant::now();
    loop {
        let now = (
            metric(proxy, "wsgate_splice_pipes_in_use").await,
            metric(proxy, "wsgate_splice_pipes_kept").await,
        );
        if now == (Some(in_use), Some(kept)) {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "pipes in use and kept: {now:?}, expected {in_use} and {kept}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A pipe is borrowed for a transfer: once the session goes quiet (at its next fold of counts, within about a
/// second) it is given back, kept for the next transfer, and taken again by the next one; the session, still open,
/// holds none. A route with `splice = false` never takes one.
#[tokio::test]
async fn an_idle_session_gives_its_pipes_back_and_the_next_transfer_takes_them_again() {
    init();
    let backend = ws_backend("splice").await;
    let proxy = Proxy::from_toml(&format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{}\"\n\
         [[route]]\nname = \"spliced\"\npath_prefix = \"/spliced\"\nupstream = \"app\"\nrelay = \"tunnel\"\n\
         [[route]]\nname = \"copied\"\npath_prefix = \"/copied\"\nupstream = \"app\"\nrelay = \"tunnel\"\n\
         splice = false\n",
        backend.addr
    ));
    wait_for_pipes(&proxy, 0.0, 0.0).await;
    let mut ws = connect(&proxy.url("/spliced")).await;
    for round in 0..2u8 {
        let payload = stream_of(MIB, round);
        ws.send(Message::binary(payload.clone())).await.expect("send");
        match within("the echo", ws.next()).await {
            Some(Ok(Message::Binary(got))) => assert_same(&format!("echo {round}"), &got, &payload),
            other => panic!("expected the echo, got {other:?}"),
        }
        // Both directions took a pipe; both are given back while the session stays open.
        wait_for_pipes(&proxy, 0.0, 2.0).await;
    }
    let mut copied = connect(&proxy.url("/copied")).await;
    let payload = stream_of(MIB, 9);
    copied.send(Message::binary(payload.clone())).await.expect("send");
    match within("the copied echo", copied.next()).await {
        Some(Ok(Message::Binary(got))) => assert_same("copied echo", &got, &payload),
        other => panic!("expected the echo, got {other:?}"),
    }
    assert_eq!(metric(&proxy, "wsgate_splice_pipes_in_use").await, Some(0.0));
    assert_eq!(metric(&proxy, "wsgate_splice_pipes_kept").await, Some(2.0));
    drop((ws, copied));
}
