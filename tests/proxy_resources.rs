//! When wsgate itself runs out of file descriptors, connecting to a backend fails with EMFILE: that is wsgate's
//! failure, not the server's. The client gets 503 with `Retry-After`, the request is not retried on another server,
//! and no healthy server is ejected for it: once descriptors are free again, every server takes connections at once.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::binary::Binary;
use support::raw::{header_value, read_head};
use support::*;

/// Open files wsgate may hold: a few dozen sessions' worth.
const OPEN_FILES: u32 = 64;
/// Clients that try at once: more than that limit lets through.
const CLIENTS: usize = 100;
/// How long a client waits for its answer; one still waiting then sits in the accept queue, not yet accepted.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// What one client got: its status (0 = no answer in time) and, for a refusal, the answer's head and body.
async fn try_upgrade(addr: SocketAddr) -> (u16, String, Option<TcpStream>) {
    let Ok(Ok(mut stream)) = tokio::time::timeout(ANSWER_WAIT, TcpStream::connect(addr)).await else {
        return (0, String::new(), None);
    };
    if stream.write_all(upgrade_request("/", "").as_bytes()).await.is_err() {
        return (0, String::new(), None);
    }
    match tokio::time::timeout(ANSWER_WAIT, read_head(&mut stream)).await {
        Ok((head, rest)) => {
            let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let text = format!("{head}{}", String::from_utf8_lossy(&rest));
            (status, text, Some(stream))
        }
        Err(_) => (0, String::new(), None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_answers_503_without_retry_or_ejection() {
    init();
    let mut a = ws_backend("a").await;
    let mut b = ws_backend("b").await;
    let addr = unused_addr();
    let (listen, to_a, to_b) = (addr.to_string(), a.addr.to_string(), b.addr.to_string());
    let args = [
        "proxy",
        "--listen",
        &listen,
        "--to",
        &to_a,
        "--to",
        &to_b,
        "--workers",
        "1",
        "--log-format",
        "json",
    ];
    let mut wsgate = Binary::spawn_with_open_files(OPEN_FILES, args);
    wsgate.wait_for_log(&["listening"]).await;

    let tries: Vec<_> = (0..CLIENTS).map(|_| tokio::spawn(try_upgrade(addr))).collect();
    let mut held = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut refusal = None;
    for t in tries {
        let (status, text, stream) = t.await.expect("client task");
        *statuses.entry(status).or_default() += 1;
        if status == 503 {
            refusal = Some(text);
        }
        held.extend(stream);
    }
    let refusal = refusal.unwrap_or_else(|| panic!("no 503 among the answers: {statuses:?}"));
    let only_expected = statuses.keys().all(|s| [0, 101, 503].contains(s));
    assert!(only_expected, "a 502 or other status: {statuses:?}");
    assert_eq!(header_value(&refusal, "retry-after"), Some("1"), "{refusal}");
    assert!(
        refusal.ends_with("\r\n\r\nproxy out of resources, try again\n"),
        "{refusal}"
    );
    assert!(!refusal.contains("127.0.0.1"), "{refusal}");

    // Every client goes; descriptors come back.
    drop(held);
    let log = wsgate.drain_log();
    let refused: Vec<&String> = log.iter().filter(|l| l.contains("\"status\":503")).collect();
    assert!(!refused.is_empty(), "no 503 in the access log");
    for line in &refused {
        assert!(line.contains("Too many open files"), "{line}");
        assert!(!line.contains("servers tried"), "retried on another server: {line}");
    }
    for line in &log {
        assert!(!line.contains("ejected") && !line.contains("not ejecting"), "{line}");
    }

    // Both servers take connections again at once: neither was ejected.
    for backend in [&mut a, &mut b] {
        while backend.events.try_recv().is_ok() {}
    }
    let mut reached = [0, 0];
    for _ in 0..4 {
        let status = within("a handshake once descriptors are free", async {
            loop {
                let (status, _, _) = try_upgrade(addr).await;
                if status != 503 && status != 0 {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(status, 101);
    }
    for (i, backend) in [&mut a, &mut b].into_iter().enumerate() {
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), backend.events.recv()).await {
            if matches!(event, Event::Upgraded { .. }) {
                reached[i] += 1;
            }
        }
    }
    assert!(
        reached[0] > 0 && reached[1] > 0,
        "connections per server after the shortage: {reached:?}"
    );
    for line in wsgate.drain_log() {
        assert!(!line.contains("ejected"), "{line}");
    }
}
