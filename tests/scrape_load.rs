//! A scrape of `GET /metrics` while wsgate holds as many WebSocket sessions as this machine allows answers in well
//! under a second, and its answer does not grow with the sessions (every series is per place, never per session).
//!
//! The open-files hard limit here is 20 000 per process and every session holds two descriptors in wsgate (client
//! and backend), so 9 900 sessions is as near to 10 000 as one process can go; the test's own process holds the
//! other ends (9 900 clients and 9 900 backend connections). `max_connections` is set to it: wsgate's default, from
//! its descriptors, keeps a larger reserve (9 671 sessions). It runs alone in its own test binary.

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use support::*;

const SESSIONS: usize = 9_900;
/// Handshakes in flight at once while the sessions are opened.
const AT_ONCE: usize = 100;

/// One session through wsgate: the upgrade, its 101 read whole; the socket is kept open.
async fn open_session(addr: std::net::SocketAddr) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(upgrade_request("/", "").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&head)));
        }
        head.extend_from_slice(&buf[..n]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(format!("answered {:?}", String::from_utf8_lossy(&head)));
    }
    Ok(stream)
}

/// `GET /metrics`, and how long the whole answer took.
async fn scrape(admin: std::net::SocketAddr) -> (String, Duration) {
    let started = tokio::time::Instant::now();
    let text = raw_exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    (text, started.elapsed())
}

/// The sum of a family's series values.
fn total(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// wsgate's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_with_ten_thousand_sessions_open_is_quick_and_does_not_grow_with_them() {
    support::init();
    let backend = ws_backend("b").await;
    let dir = support::peers::unique_temp_dir("scrape-load");
    let (admin, listen) = (unused_addr(), unused_addr());
    let file = dir.join("wsgate.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nmax_connections = {SESSIONS}\n\n[admin]\naddress = \"{admin}\"\n\n[[listener]]\nname = \"public\"\naddress = \"{listen}\"\n\n\
             [[route]]\nupstream = \"app\"\n\n[[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{}\"\n",
            backend.addr
        ),
    )
    .expect("config");
    let mut wsgate = support::binary::Binary::spawn(["run", "--config", &file.display().to_string()]);
    wsgate.wait_for_log(&["admin listening"]).await;
    wsgate.wait_for_log(&["listening"]).await;
    let pid = wsgate.child.id().expect("pid");

    // One session first: its place's series exist from then on, so the answer's size is the one to keep.
    let mut held = vec![
        within("the first session", open_session(listen))
            .await
            .expect("first session"),
    ];
    let (one, _) = scrape(admin).await;
    assert_eq!(total(&one, "wsgate_sessions_active"), 1.0, "{one}");
    let lines_with_one = one.lines().count();

    let opened = within_long("9 900 sessions", async {
        let mut streams = Vec::with_capacity(SESSIONS);
        let mut tasks = JoinSet::new();
        let mut started = 1;
        while started < SESSIONS || !tasks.is_empty() {
            while started < SESSIONS && tasks.len() < AT_ONCE {
                tasks.spawn(open_session(listen));
                started += 1;
            }
            match tasks.join_next().await {
                Some(Ok(Ok(stream))) => streams.push(stream),
                Some(Ok(Err(e))) => panic!("session {} of {SESSIONS}: {e}", streams.len() + 1),
                Some(Err(e)) => panic!("a session task failed: {e}"),
                None => {}
            }
        }
        streams
    })
    .await;
    held.extend(opened);
    assert_eq!(held.len(), SESSIONS);

    // The registry counts them all (the count of a live session is in the totals at once).
    let rss_before = rss_kib(pid);
    let mut slowest = Duration::ZERO;
    let mut text = String::new();
    for _ in 0..20 {
        let (answer, took) = scrape(admin).await;
        slowest = slowest.max(took);
        text = answer;
    }
    let rss_after = rss_kib(pid);
    eprintln!(
        "{SESSIONS} sessions: slowest of 20 scrapes {slowest:?}, {} bytes, wsgate RSS {rss_before} KiB -> {rss_after} KiB",
        text.len()
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(total(&text, "wsgate_sessions_active"), SESSIONS as f64);
    assert!(slowest < Duration::from_secs(1), "a scrape took {slowest:?}");
    // The answer holds exactly the series it held with one session: nothing per session.
    assert_eq!(text.lines().count(), lines_with_one, "{text}");
    // Scrapes keep nothing: 20 of them leave the resident memory where it was (within 1 MiB of allocator slack).
    assert!(
        rss_after <= rss_before + 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over 20 scrapes"
    );
    drop(held);
}

/// Like [`within`], with the longer bound that opening thousands of sessions in a debug build needs.
async fn within_long<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(120), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after 120 s waiting for {what}"),
    }
}
