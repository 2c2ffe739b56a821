//! Upstream resilience with real sockets, real WebSocket clients and backends: retries hide a server that refuses
//! (and outlier detection ejects it), without retries it shows; a server that answers 5xx is ejected for its time
//! and then tried again, its answers passed on as they are (with passing health checks, only after `rise` of them
//! in a row); `max_connections` and `max_pending_handshakes` answer 503 with `Retry-After`; a backup takes over from
//! a dead primary and hands back when it returns; a drained server's connections close at `drain_rate` (1012 in
//! frames mode, a TCP close in tunnel mode); a server removed by a reload keeps its connections until the drain
//! timeout; `rebalance` evens out live connections after a server joins.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::raw::{header_value, read_head};
use support::scripted::{Fake, Script};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use wsgate::upstream::now_ms;

/// Config text: a listener on a free port, one route to upstream `app` in `relay` mode, and `upstream`: the rest of
/// the `[[upstream]]` (its keys, then its servers and sub-tables).
fn config(relay: &str, upstream: &str) -> String {
    format!(
        "[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\n[[route]]\nupstream = \"app\"\n\
         relay = \"{relay}\"\n\n[[upstream]]\nname = \"app\"\n{upstream}\n"
    )
}

/// One `[[upstream.server]]` per address.
fn servers(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("[[upstream.server]]\naddress = \"{a}\"\n"))
        .collect()
}

/// An answer that refused a WebSocket handshake.
#[derive(Debug)]
struct Refused {
    status: u16,
    headers: http::HeaderMap,
}

/// A real WebSocket handshake through the proxy: the client, or the answer that refused it.
async fn try_connect(url: &str) -> Result<Client, Refused> {
    let handshake = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true);
    match within("a WebSocket handshake", handshake).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(Refused {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
        }),
        Err(e) => panic!("handshake to {url}: {e}"),
    }
}

/// Sends `text` and checks that it comes back.
async fn echo(ws: &mut Client, text: &str) {
    within("sending a message", ws.send(Message::text(text)))
        .await
        .expect("send");
    assert_eq!(next_text(ws).await, text, "echo");
}

/// An upgrade request on a raw socket: the answer's status and head, and the socket (still open after a 101).
async fn raw_upgrade(addr: SocketAddr) -> (u16, String, TcpStream) {
    let mut stream = within("connect", TcpStream::connect(addr)).await.expect("connect");
    stream
        .write_all(upgrade_request("/", "").as_bytes())
        .await
        .expect("write upgrade");
    let (head, _) = read_head(&mut stream).await;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, stream)
}

/// Polls `cond` every 10 ms until it holds; fails the test after `limit`.
/// Every task's result, waiting at most `limit` for all of them (the test fails after that, saying `what`).
async fn join_all<T: 'static>(tasks: &mut JoinSet<T>, limit: Duration, what: &str) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    let all = async {
        while let Some(done) = tasks.join_next().await {
            results.push(done.expect("test task"));
        }
    };
    tokio::time::timeout(limit, all)
        .await
        .unwrap_or_else(|_| panic!("{what} within {limit:?}"));
    results
}

/// Reads what is left of a closed WebSocket (its TCP close), bounded.
async fn drain_rest(ws: &mut Client) {
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while ws.next().await.is_some() {} }).await;
}

/// The first connection let in, trying while the answers are 503 (a close on the proxy's side takes a moment).
async fn admitted(url: &str, what: &str) -> Client {
    let mut admitted = None;
    wait_until(what, WAIT, async || {
        match try_connect(url).await {
            Ok(ws) => admitted = Some(ws),
            Err(r) => assert_eq!(r.status, 503, "{r:?}"),
        }
        admitted.is_some()
    })
    .await;
    admitted.expect("admitted")
}

async fn wait_until(what: &str, limit: Duration, cond: impl AsyncFnMut() -> bool) {
    if let Err(e) = poll_until(what, limit, cond).await {
        panic!("{e}");
    }
}

/// Polls `cond` every 10 ms until it holds; `Err` after `limit`.
async fn poll_until(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The live state of the server at `addr` in upstream `app`.
fn server_state(proxy: &Proxy, addr: SocketAddr) -> Arc<wsgate::upstream::ServerState> {
    let snapshot = proxy.snapshot();
    snapshot.upstreams[0]
        .servers()
        .iter()
        .find(|s| s.address == addr)
        .unwrap_or_else(|| panic!("{addr} is not a server of the upstream"))
        .clone()
}

/// WebSocket upgrades a test backend has seen (its events are read up to now).
fn upgrades_seen(backend: &mut Backend) -> usize {
    let mut n = 0;
    while let Ok(event) = backend.events.try_recv() {
        if matches!(event, Event::Upgraded { .. }) {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_refusing_server_from_a_thousand_handshakes_and_outlier_detection_ejects_it() {
    let mut a = ws_backend("a").await;
    let mut b = ws_backend("b").await;
    let dead = unused_addr();
    let proxy = Proxy::from_toml(&config("frames", &servers(&[a.addr, b.addr, dead])));
    let url = proxy.url("/");

    // 1 000 handshakes, 8 at a time, each followed by one echo.
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for w in 0..8 {
        let url = url.clone();
        workers.spawn(async move {
            let mut failures = Vec::new();
            for i in 0..125 {
                match try_connect(&url).await {
                    Ok(mut ws) => {
                        echo(&mut ws, &format!("worker {w} handshake {i}")).await;
                        let _ = ws.close(None).await;
                    }
                    Err(refused) => failures.push(format!("worker {w} handshake {i}: {refused:?}")),
                }
            }
            failures
        });
    }
    let failures: Vec<String> = join_all(&mut workers, Duration::from_secs(40), "1 000 handshakes")
        .await
        .into_iter()
        .flatten()
        .collect();
    eprintln!("1 000 handshakes and echoes in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of 1 000 handshakes failed; first ones: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Both live servers took their share.
    let (on_a, on_b) = (upgrades_seen(&mut a), upgrades_seen(&mut b));
    assert_eq!(on_a + on_b, 1_000);
    assert!(on_a >= 400 && on_b >= 400, "a {on_a}, b {on_b}");
    // After its failures in a row (5 by default), the refusing server is ejected: no new handshake tries it.
    assert!(
        server_state(&proxy, dead).is_ejected(now_ms()),
        "the refusing server should be ejected (default ejection 30 s)"
    );
    for addr in [a.addr, b.addr] {
        assert!(!server_state(&proxy, addr).is_ejected(now_ms()), "{addr} ejected");
    }
}

#[tokio::test]
async fn without_retries_a_refusing_server_shows_as_502() {
    let a = ws_backend("a").await;
    let dead = unused_addr();
    let upstream = format!(
        "retries = 0\n{}[upstream.outlier]\nconsecutive_failures = 0\n",
        servers(&[a.addr, dead])
    );
    let proxy = Proxy::from_toml(&config("frames", &upstream));
    let url = proxy.url("/");
    let mut statuses = Vec::new();
    for i in 0..40 {
        match try_connect(&url).await {
            Ok(mut ws) => {
                echo(&mut ws, &format!("handshake {i}")).await;
                let _ = ws.close(None).await;
                statuses.push(101);
            }
            Err(refused) => statuses.push(refused.status),
        }
    }
    let bad: Vec<u16> = statuses.iter().copied().filter(|&s| s != 101).collect();
    assert!(bad.iter().all(|&s| s == 502), "only 502s expected: {statuses:?}");
    // Round robin over two servers, one refusing, no retry, never ejected: every other handshake fails, to the end.
    assert!((10..=30).contains(&bad.len()), "{statuses:?}");
    assert!(
        statuses[20..].contains(&502),
        "the refusing server was left out: {statuses:?}"
    );
}

const ANSWER_503: &str = "HTTP/1.1 503 Service Unavailable\r\nX-Backend: bad\r\nContent-Length: 11\r\n\
                          Connection: close\r\n\r\nbad backend";

#[tokio::test]
async fn a_server_answering_503_is_ejected_for_its_time_then_tried_again() {
    let bad = Fake::start(Script::Answer(ANSWER_503)).await;
    let good = ws_backend("good").await;
    let upstream = format!(
        "{}[upstream.outlier]\nconsecutive_failures = 3\nejection = \"1s\"\n",
        servers(&[bad.addr, good.addr])
    );
    let proxy = Proxy::from_toml(&config("frames", &upstream));
    let url = proxy.url("/");

    // Round robin: every other handshake reaches the bad server until its third 503, each passed on as it is.
    let mut refused = 0;
    for i in 0..10 {
        match try_connect(&url).await {
            Ok(mut ws) => {
                assert_eq!(backend_name(&mut ws).await, "good");
                let _ = ws.close(None).await;
            }
            Err(r) => {
                assert_eq!(r.status, 503, "handshake {i}: {r:?}");
                assert_eq!(
                    r.headers.get("x-backend").map(|v| v.as_bytes()),
                    Some(&b"bad"[..]),
                    "the backend's own 503, as it is: {r:?}"
                );
                assert!(r.headers.get("retry-after").is_none(), "{r:?}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused, 3, "three 503s within ten handshakes");
    let ejected_at = Instant::now();
    assert_eq!(bad.accepted(), 3);
    assert!(server_state(&proxy, bad.addr).is_ejected(now_ms()));

    // Ejected for 1 s: every handshake meanwhile reaches the good server.
    let mut during = 0;
    while during < 20 && ejected_at.elapsed() < Duration::from_millis(800) {
        let mut ws = try_connect(&url)
            .await
            .unwrap_or_else(|r| panic!("handshake {during} during the ejection: {r:?}"));
        assert_eq!(backend_name(&mut ws).await, "good");
        let _ = ws.close(None).await;
        during += 1;
    }
    assert!(during >= 5, "only {during} handshakes in the 800 ms of the ejection");
    assert_eq!(bad.accepted(), 3, "the ejected server got a connection");

    // Then it is tried again, and its 503 is passed on again.
    let mut again = None;
    wait_until("the bad server to be tried again", Duration::from_secs(5), async || {
        match try_connect(&url).await {
            Ok(mut ws) => {
                let _ = ws.close(None).await;
            }
            Err(r) => again = Some(r),
        }
        bad.accepted() > 3
    })
    .await;
    let back_after = ejected_at.elapsed();
    eprintln!("the bad server was tried again {back_after:?} after its ejection");
    assert!(
        back_after >= Duration::from_millis(900),
        "ejection of 1 s ended after {back_after:?}"
    );
    let again = again.expect("the returning server's answer reached the client");
    assert_eq!(again.status, 503);
    assert!(again.headers.get("x-backend").is_some());
}

#[tokio::test]
async fn an_ejected_server_whose_health_checks_pass_stays_out_until_rise_checks_in_a_row() {
    // Its TCP health check passes all along; only its answers to upgrades fail.
    let bad = Fake::start(Script::Answer(ANSWER_503)).await;
    let good = ws_backend("good").await;
    let upstream = format!(
        "{}[upstream.health]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 5\nfall = 5\n\
         [upstream.outlier]\nconsecutive_failures = 3\nejection = \"5s\"\n",
        servers(&[bad.addr, good.addr])
    );
    let proxy = Proxy::from_toml(&config("frames", &upstream));
    let url = proxy.url("/");
    wait_until("five health checks of the bad server", WAIT, async || {
        bad.accepted() >= 5
    })
    .await;

    let mut refused = 0;
    for _ in 0..10 {
        match try_connect(&url).await {
            Ok(mut ws) => {
                let _ = ws.close(None).await;
            }
            Err(r) => {
                assert_eq!(r.status, 503, "{r:?}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused, 3, "three 503s within ten handshakes");
    let ejected_at = Instant::now();
    assert!(server_state(&proxy, bad.addr).is_ejected(now_ms()));

    // Ejected for 5 s, or until 5 checks pass in a row while it is out: 4 intervals of at least 90 ms after the
    // first. For 300 ms every handshake must reach the good server.
    let mut handshakes = 0;
    while ejected_at.elapsed() < Duration::from_millis(300) {
        if let Err(r) = try_connect(&url).await {
            panic!(
                "handshake {handshakes}, {:?} after the ejection (5 s; rise = 5 checks 100 ms apart): the ejected \
                 server answered again: {r:?}",
                ejected_at.elapsed()
            );
        }
        handshakes += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(handshakes >= 10, "only {handshakes} handshakes in 300 ms");
}

/// A 503 from wsgate for a full upstream or server: `Retry-After: 1` and the reason.
fn assert_full(status: u16, head: &str, why: &str) {
    assert_eq!(status, 503, "{why}: {head}");
    assert_eq!(header_value(head, "retry-after"), Some("1"), "{why}: {head}");
}

#[tokio::test]
async fn max_connections_of_a_server_and_of_the_upstream_answer_503_with_retry_after() {
    // Per server: a takes 1, b takes 2; a full server is skipped.
    let a = ws_backend("a").await;
    let b = ws_backend("b").await;
    let upstream = format!(
        "[[upstream.server]]\naddress = \"{}\"\nmax_connections = 1\n\
         [[upstream.server]]\naddress = \"{}\"\nmax_connections = 2\n",
        a.addr, b.addr
    );
    let proxy = Proxy::from_toml(&config("frames", &upstream));
    let url = proxy.url("/");
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&url).await;
        let name = backend_name(&mut ws).await;
        open.push((name, ws));
    }
    let mut names: Vec<&str> = open.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "b"]);
    let (status, head, _) = raw_upgrade(proxy.addr).await;
    assert_full(status, &head, "both servers full");
    assert!(head.contains("HTTP/1.1 503 Service Unavailable"), "{head}");
    let answer = raw_exchange(proxy.addr, upgrade_request("/", "").as_bytes()).await;
    assert!(
        answer.ends_with("\r\n\r\nupstream at its connection limit\n"),
        "the reason is given: {answer}"
    );

    // Closing a's connection makes room on a, and only there.
    let at = open.iter().position(|(n, _)| n == "a").expect("a");
    let (_, mut ws) = open.remove(at);
    ws.close(None).await.expect("close");
    let mut ws = admitted(&url, "room after a close").await;
    assert_eq!(backend_name(&mut ws).await, "a");
    let (status, head, _) = raw_upgrade(proxy.addr).await;
    assert_full(status, &head, "full again");
    drop(ws);
    drop(open);

    // Per upstream: 2 in all, over two servers without limits of their own.
    let upstream = format!("max_connections = 2\n{}", servers(&[a.addr, b.addr]));
    let proxy = Proxy::from_toml(&config("tunnel", &upstream));
    let url = proxy.url("/");
    let mut first = connect(&url).await;
    let mut second = connect(&url).await;
    let mut names = [backend_name(&mut first).await, backend_name(&mut second).await];
    names.sort();
    assert_eq!(names, ["a", "b"]);
    let (status, head, _) = raw_upgrade(proxy.addr).await;
    assert_full(status, &head, "upstream full");
    first.close(None).await.expect("close");
    let mut third = admitted(&url, "room in the upstream after a close").await;
    echo(&mut third, "in").await;
    echo(&mut second, "still here").await;
    let (status, head, _) = raw_upgrade(proxy.addr).await;
    assert_full(status, &head, "upstream full again");
}

#[tokio::test]
async fn max_pending_handshakes_answers_503_at_once_while_a_backend_hangs() {
    let hanging = Fake::start(Script::Hang).await;
    let text = format!(
        "[server]\nhandshake_timeout = \"1s\"\n\n{}",
        config(
            "frames",
            &format!("max_pending_handshakes = 2\n{}", servers(&[hanging.addr]))
        )
    );
    let proxy = Proxy::from_toml(&text);

    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut stream = within("connect", TcpStream::connect(proxy.addr))
            .await
            .expect("connect");
        stream
            .write_all(upgrade_request("/", "").as_bytes())
            .await
            .expect("write");
        waiting.push(stream);
    }
    wait_until("two handshakes to reach the hanging backend", WAIT, async || {
        hanging.accepted() == 2
    })
    .await;

    let asked = Instant::now();
    let (status, head, _) = raw_upgrade(proxy.addr).await;
    let took = asked.elapsed();
    assert_full(status, &head, "third pending handshake");
    assert!(took < Duration::from_millis(500), "the 503 took {took:?}");
    assert_eq!(hanging.accepted(), 2, "the refused handshake never reached the backend");

    // The two hanging handshakes time out (504 after handshake_timeout); then a new one is let through.
    for mut stream in waiting {
        let (head, _) = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 504 "), "{head}");
    }
    let mut fourth = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    fourth
        .write_all(upgrade_request("/", "").as_bytes())
        .await
        .expect("write");
    wait_until("a handshake after the hanging ones ended", WAIT, async || {
        hanging.accepted() == 3
    })
    .await;
}

/// Waits until nothing listens on `addr` any more (a killed backend's listener is dropped by its runtime).
async fn wait_port_free(addr: SocketAddr) {
    wait_until("the killed backend's port to be free", WAIT, async || {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return false;
        };
        // With SO_REUSEADDR, bind fails only while a socket listens on the port (not for TIME_WAIT leftovers).
        socket.set_reuseaddr(true).is_ok() && socket.bind(addr).is_ok()
    })
    .await;
}

/// The name of the backend a new WebSocket reaches, or the status that refused it.
async fn reaches(url: &str) -> Result<String, u16> {
    match try_connect(url).await {
        Ok(mut ws) => {
            let name = backend_name(&mut ws).await;
            let _ = ws.close(None).await;
            Ok(name)
        }
        Err(r) => Err(r.status),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_over_from_a_dead_primary_and_hands_back_when_it_returns() {
    let primary = ws_backend("primary").await;
    let backup = ws_backend("backup").await;
    let primary_addr = primary.addr;
    let upstream = format!(
        "[[upstream.server]]\naddress = \"{primary_addr}\"\n[[upstream.server]]\naddress = \"{}\"\nbackup = true\n\
         [upstream.health]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n",
        backup.addr
    );
    let proxy = Proxy::from_toml(&config("frames", &upstream));
    let url = proxy.url("/");
    for _ in 0..10 {
        assert_eq!(reaches(&url).await, Ok("primary".into()));
    }

    // The primary dies: a handshake that finds it refusing is retried on the backup at once (every primary has
    // been tried), and once its health check fails (or outlier detection ejects it), new connections go straight
    // to the backup.
    primary.kill();
    let killed = Instant::now();
    for i in 0..5 {
        assert_eq!(
            reaches(&url).await,
            Ok("backup".into()),
            "connection {i} right after the kill"
        );
    }
    wait_until("the primary to be out", WAIT, async || {
        let state = server_state(&proxy, primary_addr);
        state.is_down() || state.is_ejected(now_ms())
    })
    .await;
    eprintln!("primary out {:?} after the kill", killed.elapsed());
    for i in 0..10 {
        assert_eq!(
            reaches(&url).await,
            Ok("backup".into()),
            "connection {i} with the primary down"
        );
    }
    let mut on_backup = connect(&url).await;
    assert_eq!(backend_name(&mut on_backup).await, "backup");

    // The primary comes back on its port: new connections go to it again; the backup's live ones stay.
    wait_port_free(primary_addr).await;
    let _restarted = ws_backend_on("primary", primary_addr).await;
    wait_until("new connections to reach the primary again", WAIT, async || {
        reaches(&url).await == Ok("primary".into())
    })
    .await;
    for i in 0..10 {
        assert_eq!(
            reaches(&url).await,
            Ok("primary".into()),
            "connection {i} after the return"
        );
    }
    echo(&mut on_backup, "still on the backup").await;
}

/// How a client connection ended.
#[derive(Debug)]
enum End {
    /// A close frame arrived.
    Frame { at: Instant, code: u16, reason: String },
    /// The connection ended without a close frame.
    Tcp { at: Instant },
    /// Nothing came before the deadline.
    TimedOut,
}

/// Reads `ws` until it is closed (or `deadline`); after a close frame, lets the client's reply go out.
async fn until_closed(mut ws: Client, deadline: Instant) -> End {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return End::TimedOut,
            Ok(Some(Ok(Message::Close(frame)))) => {
                let at = Instant::now();
                let (code, reason) = frame.map_or((0, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                drain_rest(&mut ws).await;
                return End::Frame { at, code, reason };
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return End::Tcp { at: Instant::now() },
        }
    }
}

/// The most of `times` (seconds, sorted) within any window of `width` seconds.
fn most_in_window(times: &[f64], width: f64) -> usize {
    let mut most = 0;
    let mut start = 0;
    for (end, &t) in times.iter().enumerate() {
        while t - times[start] >= width {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

/// Opens `n` connections to server A, then reloads with A in drain and B added; returns when each client saw its
/// connection end, in seconds after the reload, sorted, and the ends themselves.
async fn drain(relay: &str, n: usize, rate: u32) -> (Vec<f64>, Vec<End>) {
    let a = ws_backend("a").await;
    let b = ws_backend("b").await;
    let before = config(relay, &format!("drain_rate = {rate}\n{}", servers(&[a.addr])));
    let after = config(
        relay,
        &format!(
            "drain_rate = {rate}\n[[upstream.server]]\naddress = \"{}\"\ndrain = true\n{}",
            a.addr,
            servers(&[b.addr])
        ),
    );
    let mut proxy = Proxy::from_toml(&before);
    let url = proxy.url("/");
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(connect(&url).await);
    }
    echo(&mut clients[0], "before the drain").await;
    let a_state = server_state(&proxy, a.addr);
    assert_eq!(a_state.sessions(), n, "every connection is on A");

    let deadline = Instant::now() + Duration::from_secs(3 * n as u64 / u64::from(rate) + 10);
    let mut readers = JoinSet::new();
    for ws in clients {
        readers.spawn(until_closed(ws, deadline));
    }
    proxy.reload(&after);
    let reloaded = Instant::now();
    assert_eq!(reaches(&url).await, Ok("b".into()), "new connections go to B");

    let limit = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    let ends = join_all(&mut readers, limit, "the readers to end by their deadline").await;
    let mut times: Vec<f64> = ends
        .iter()
        .filter_map(|e| match e {
            End::Frame { at, .. } | End::Tcp { at } => Some(at.saturating_duration_since(reloaded).as_secs_f64()),
            End::TimedOut => None,
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times, ends)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_closes_500_frames_connections_with_1012_at_the_drain_rate() {
    let (times, ends) = drain("frames", 500, 100).await;
    let wrong: Vec<&End> = ends
        .iter()
        .filter(|e| !matches!(e, End::Frame { code: 1012, reason, .. } if reason == "server draining"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of 500 did not get 1012 \"server draining\"; first ones: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    let (first, last) = (times[0], times[times.len() - 1]);
    let busiest = most_in_window(&times, 1.0);
    eprintln!("500 closes from {first:.2}s to {last:.2}s after the reload; at most {busiest} in one second");
    assert!(first < 1.0, "the drain started {first:.2}s after the reload");
    assert!(last - first >= 3.5, "500 at 100/s closed within {:.2}s", last - first);
    assert!(last - first <= 15.0, "500 at 100/s took {:.2}s", last - first);
    assert!(busiest <= 200, "{busiest} closes in one second at a rate of 100/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_closes_tunnel_connections_at_the_drain_rate_without_a_close_frame() {
    let (times, ends) = drain("tunnel", 50, 50).await;
    let wrong: Vec<&End> = ends.iter().filter(|e| !matches!(e, End::Tcp { .. })).collect();
    assert!(
        wrong.is_empty(),
        "tunnel connections end with a TCP close only: {wrong:?}"
    );
    let (first, last) = (times[0], times[times.len() - 1]);
    let busiest = most_in_window(&times, 0.25);
    eprintln!("50 closes from {first:.2}s to {last:.2}s after the reload; at most {busiest} in 250 ms");
    assert!(first < 1.0, "the drain started {first:.2}s after the reload");
    assert!(last - first >= 0.6, "50 at 50/s closed within {:.2}s", last - first);
    assert!(busiest <= 25, "{busiest} closes in 250 ms at a rate of 50/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_removed_by_a_reload_keeps_its_connections_until_the_drain_timeout() {
    let a = ws_backend("a").await;
    let b = ws_backend("b").await;
    let drain_timeout = Duration::from_secs(2);
    let mut proxy = Proxy::from_toml_with_drain(&config("frames", &servers(&[a.addr])), drain_timeout);
    let url = proxy.url("/");
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(connect(&url).await);
    }
    proxy.reload(&config("frames", &servers(&[b.addr])));
    let reloaded = Instant::now();
    assert_eq!(
        reaches(&url).await,
        Ok("b".into()),
        "new connections go to the server that stays"
    );

    // Each client keeps talking every 50 ms until its connection is closed.
    let mut talkers = JoinSet::new();
    for (n, mut ws) in clients.into_iter().enumerate() {
        talkers.spawn(async move {
            let mut last_echo = None;
            for seq in 0..200 {
                let text = format!("client {n} message {seq}");
                if ws.send(Message::text(text.clone())).await.is_err() {
                    return (last_echo, End::Tcp { at: Instant::now() });
                }
                match within("an echo or a close", ws.next()).await {
                    Some(Ok(Message::Text(t))) if t.as_str() == text => last_echo = Some(Instant::now()),
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) =
                            frame.map_or((0, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                        return (
                            last_echo,
                            End::Frame {
                                at: Instant::now(),
                                code,
                                reason,
                            },
                        );
                    }
                    other => panic!("client {n}: sent {text:?}, got {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (last_echo, End::TimedOut)
        });
    }
    let results = join_all(&mut talkers, Duration::from_secs(15), "the clients to end").await;
    let since = |at: &Instant| at.saturating_duration_since(reloaded);
    let closes: Vec<Duration> = results
        .iter()
        .filter_map(|(_, end)| match end {
            End::Frame { at, .. } => Some(since(at)),
            _ => None,
        })
        .collect();
    eprintln!(
        "removed server's connections closed from {:?} to {:?} after the reload",
        closes.iter().min(),
        closes.iter().max()
    );
    for (last_echo, end) in &results {
        let End::Frame { at, code, reason } = end else {
            panic!("expected close 1012, got {end:?}");
        };
        assert_eq!(
            (*code, reason.as_str()),
            (1012, "server removed from the configuration")
        );
        let closed = since(at);
        assert!(
            closed >= drain_timeout - Duration::from_millis(50),
            "closed {closed:?} after the reload, before the drain timeout of {drain_timeout:?}"
        );
        assert!(
            closed <= drain_timeout + Duration::from_secs(3),
            "closed {closed:?} after the reload"
        );
        let echoed = since(&last_echo.expect("at least one echo"));
        assert!(
            echoed >= Duration::from_millis(1_700),
            "last echo {echoed:?} after the reload"
        );
    }
    assert_eq!(results.len(), 20);
}

/// Server names of the rebalancing test, as indexes.
const NAMES: [&str; 3] = ["a", "b", "c"];

/// A client that reconnects (at most `MAX_CONNECTS` times in all) when its connection is shed with 1012, counting
/// itself on the server it is on.
async fn rebalanced_client(
    url: String,
    counts: Arc<[AtomicI64; 3]>,
    sheds: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> Result<(), String> {
    const MAX_CONNECTS: usize = 6;
    for _ in 0..MAX_CONNECTS {
        let mut ws = try_connect(&url).await.map_err(|r| format!("refused: {r:?}"))?;
        let name = backend_name(&mut ws).await;
        let i = NAMES.iter().position(|n| *n == name).ok_or(name)?;
        counts[i].fetch_add(1, Ordering::SeqCst);
        let ended = tokio::select! {
            () = stop.cancelled() => None,
            m = ws.next() => Some(m),
        };
        counts[i].fetch_sub(1, Ordering::SeqCst);
        match ended {
            None => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            Some(Some(Ok(Message::Close(Some(f))))) if u16::from(f.code) == 1012 => {
                if f.reason.as_str() != "rebalancing connections" {
                    return Err(format!("close 1012 with reason {:?}", f.reason.as_str()));
                }
                sheds.fetch_add(1, Ordering::SeqCst);
                drain_rest(&mut ws).await;
            }
            Some(other) => return Err(format!("unexpected end: {other:?}")),
        }
    }
    Err(format!("shed {MAX_CONNECTS} times"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_evens_out_live_connections_after_a_server_joins() {
    let a = ws_backend("a").await;
    let b = ws_backend("b").await;
    let c = ws_backend("c").await;
    let keys = "balance = \"least_conn\"\nrebalance = true\ndrain_rate = 200\n";
    let mut proxy = Proxy::from_toml(&config("frames", &format!("{keys}{}", servers(&[a.addr, b.addr]))));
    let url = proxy.url("/");
    let counts: Arc<[AtomicI64; 3]> = Arc::new(Default::default());
    let sheds = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut clients = JoinSet::new();
    for _ in 0..200 {
        clients.spawn(rebalanced_client(
            url.clone(),
            counts.clone(),
            sheds.clone(),
            stop.clone(),
        ));
    }
    let snapshot = |counts: &[AtomicI64; 3]| -> [i64; 3] { std::array::from_fn(|i| counts[i].load(Ordering::SeqCst)) };
    wait_until("200 clients connected", WAIT, async || {
        snapshot(&counts).iter().sum::<i64>() == 200
    })
    .await;
    let start = snapshot(&counts);
    assert!(
        (90..=110).contains(&start[0]) && start[2] == 0,
        "least_conn over a and b: {start:?}"
    );

    proxy.reload(&config(
        "frames",
        &format!("{keys}{}", servers(&[a.addr, b.addr, c.addr])),
    ));
    let reloaded = Instant::now();
    let shared = proxy.snapshot().upstreams[0].shared.clone();
    let mut seen = Vec::new();
    let mut started = false;
    // The rebalancer's round ends (it was armed by the join), and every client it shed is back.
    poll_until(
        "the rebalancer to finish and every client to be back",
        WAIT,
        async || {
            let now = snapshot(&counts);
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            // The control thread arms the rebalancer when it takes the reload in: wait for that first.
            let armed = shared.rebalance_armed.load(Ordering::Relaxed);
            started |= armed || sheds.load(Ordering::SeqCst) > 0;
            started && !armed && now.iter().sum::<i64>() == 200
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; counts a, b, c seen: {seen:?}; {} shed",
            sheds.load(Ordering::SeqCst)
        )
    });
    let took = reloaded.elapsed();
    let end = snapshot(&counts);
    let shed = sheds.load(Ordering::SeqCst);
    eprintln!("{start:?} -> {end:?} in {took:?}, {shed} connections shed; counts seen: {seen:?}");
    let from_proxy: Vec<u32> = [a.addr, b.addr, c.addr]
        .iter()
        .map(|&addr| server_state(&proxy, addr).active())
        .collect();
    assert_eq!(
        from_proxy,
        end.map(|n| n as u32),
        "wsgate's live counts and the clients' agree"
    );
    assert!((50..200).contains(&shed), "{shed} sheds to move about 67 connections");
    let even = 200.0 / 3.0;
    // What the rebalancer stops on: no server more than rebalance_threshold (0.1) over or under its fair share.
    assert!(
        end.iter()
            .all(|&n| (even * 0.9 - 0.5..=even * 1.1 + 0.5).contains(&(n as f64))),
        "{end:?}"
    );

    stop.cancel();
    let errors: Vec<String> = join_all(&mut clients, WAIT, "the clients to stop")
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(
        errors.is_empty(),
        "{} clients failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(sheds.load(Ordering::SeqCst), shed, "no shed after the round ended");
    // And the spread it leaves: every server within 10 % of even, the joined one too.
    assert!(
        // |n - 200/3| <= 10 % of 200/3, in whole numbers: |3n - 200| <= 20.
        end.iter().all(|&n| (3 * n - 200).abs() <= 20),
        "live connections on a, b, c after the rebalance: {end:?}, not within 10 % of {even:.1} each \
         (counts seen: {seen:?})"
    );
}
