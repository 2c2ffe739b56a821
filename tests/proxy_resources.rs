//! File descriptors. Without `max_connections`, wsgate limits itself to the sessions its open-files limit leaves room
//! for, which it says at start: the next client gets 503, nothing fails for want of a descriptor. With a
//! `max_connections` set above that, connecting to a backend fails with EMFILE: that is wsgate's failure, not the
//! server's. The client gets 503 with `Retry-After`, the request is not retried on another server, and no healthy
//! server is ejected for it: once descriptors are free again, every server takes connections at once. And TCP
//! keepalive is on, on both sides of a session.

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
    let dir = support::peers::unique_temp_dir("emfile");
    let file = dir.join("wsgate.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nworkers = 1\nlog_format = \"json\"\nmax_connections = 1000\n\
             [[listener]]\nname = \"public\"\naddress = \"{addr}\"\n[[route]]\nupstream = \"app\"\n\
             [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{}\"\n\
             [[upstream.server]]\naddress = \"{}\"\n",
            a.addr, b.addr
        ),
    )
    .expect("config");
    let mut wsgate = Binary::spawn_with_open_files(OPEN_FILES, ["run", "--config", &file.display().to_string()]);
    let warned = wsgate
        .wait_for_log(&["open-files limit leaves room", "is above the"])
        .await;
    assert!(warned.contains("is above the"), "{warned}");
    wsgate.wait_for_log(&["listening"]).await;

    let started = tokio::time::Instant::now();
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
    // Out of descriptors, accepting pauses (100 ms) after each failure instead of spinning: at most ten failures a
    // second on the one worker.
    let failed_accepts = log.iter().filter(|l| l.contains("accept failed")).count();
    let allowed = (started.elapsed().as_secs_f64() * 10.0).ceil() as usize + 2;
    eprintln!(
        "{failed_accepts} failed accepts in {:?} (at most {allowed})",
        started.elapsed()
    );
    assert!(
        failed_accepts <= allowed,
        "{failed_accepts} failed accepts in {:?}: accepting spins",
        started.elapsed()
    );

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_max_connections_the_open_files_limit_sets_it_and_the_next_client_gets_503() {
    init();
    let backend = ws_backend("a").await;
    let addr = unused_addr();
    let (listen, to) = (addr.to_string(), backend.addr.to_string());
    let args = [
        "proxy",
        "--listen",
        &listen,
        "--to",
        &to,
        "--workers",
        "1",
        "--log-format",
        "json",
    ];
    let mut wsgate = Binary::spawn_with_open_files(200, args);
    let said = wsgate.wait_for_log(&["open-files limit leaves room"]).await;
    let line: serde_json::Value = serde_json::from_str(&said).unwrap_or_else(|e| panic!("{e}: {said}"));
    assert_eq!(line["open_files"], 200, "{said}");
    let sessions = line["sessions"].as_u64().unwrap_or_else(|| panic!("{said}")) as usize;
    assert!((50..100).contains(&sessions), "{said}");
    wsgate.wait_for_log(&["listening"]).await;

    let mut held = Vec::new();
    for i in 0..sessions {
        let (status, text, stream) = try_upgrade(addr).await;
        assert_eq!(status, 101, "session {} of {sessions}: {text}", i + 1);
        held.extend(stream);
    }
    for _ in 0..3 {
        let (status, text, _) = try_upgrade(addr).await;
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("server at its connection limit"), "{text}");
        assert_eq!(header_value(&text, "retry-after"), Some("1"), "{text}");
    }
    // Nothing failed for want of a descriptor.
    for line in wsgate.drain_log() {
        assert!(
            !line.contains("Too many open files") && !line.contains("accept failed"),
            "{line}"
        );
    }
    // A session ends: its place is taken again.
    drop(held.pop());
    within("a session once one has ended", async {
        loop {
            let (status, _, stream) = try_upgrade(addr).await;
            if status == 101 {
                held.extend(stream);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The keepalive timers `ss` shows on wsgate's sockets with `port` at one end.
fn keepalive_timers(port: u16) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!(":{port} ")))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn tcp_keepalive_is_on_for_both_sides_of_a_session() {
    init();
    let backend = ws_backend("a").await;
    let dir = support::peers::unique_temp_dir("keepalive");
    let file = dir.join("wsgate.toml");
    let addr = unused_addr();
    std::fs::write(
        &file,
        format!(
            "[server]\ntcp_keepalive = \"45s\"\nlisten_backlog = 128\n\
             [[listener]]\nname = \"public\"\naddress = \"{addr}\"\n[[route]]\nupstream = \"app\"\n\
             [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{}\"\n",
            backend.addr
        ),
    )
    .expect("config");
    let mut wsgate = Binary::spawn(["run", "--config", &file.display().to_string()]);
    wsgate.wait_for_log(&["listening"]).await;
    let (status, text, _held) = try_upgrade(addr).await;
    assert_eq!(status, 101, "{text}");
    // wsgate's accepted socket (local port = the listener's) and its socket to the backend (peer port = the
    // backend's) both carry a keepalive timer, due within the 45 s asked for.
    let sides = || {
        let client_side: Vec<String> = keepalive_timers(addr.port())
            .into_iter()
            .filter(|l| {
                l.split_whitespace()
                    .nth(2)
                    .is_some_and(|local| local.ends_with(&format!(":{}", addr.port())))
            })
            .collect();
        let backend_side: Vec<String> = keepalive_timers(backend.addr.port())
            .into_iter()
            .filter(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|peer| peer.ends_with(&format!(":{}", backend.addr.port())))
            })
            .collect();
        [("client", client_side), ("backend", backend_side)]
    };
    let sides = within("both sides' sockets in `ss`", async {
        loop {
            let sides = sides();
            if sides.iter().all(|(_, lines)| lines.len() == 1) {
                return sides;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for (side, lines) in &sides {
        assert!(
            lines[0].contains("timer:(keepalive,"),
            "{side} side has no keepalive: {lines:?}"
        );
        assert!(
            !lines[0].contains("timer:(keepalive,1min"),
            "{side} side: the 45 s asked for: {lines:?}"
        );
    }
}
