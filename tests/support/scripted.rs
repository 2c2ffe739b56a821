//! Scripted TCP servers for the tests of health checks and upstream failures: each connection is treated as a
//! [`Script`] says (hang, answer garbage, close mid-answer, answer a status, upgrade with a wrong key, ...), and the
//! server counts the connections it accepted, those still open and the most open at once. And the config and the
//! waits the health check tests share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// How a fake server treats each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Accepts and never answers.
    Hang,
    /// Answers the request head with bytes that are not HTTP.
    Garbage,
    /// Starts an answer and closes in the middle of it.
    CloseMidAnswer,
    /// Answers with this status (and an empty body).
    Status(u16),
    /// Answers with these bytes and closes its side.
    Answer(&'static str),
    /// Answers an upgrade with a 101 whose accept key is wrong.
    WrongAccept,
    /// Completes the upgrade, then never answers a frame.
    SilentAfter101,
    /// Completes the upgrade for WebSocket requests (then stays silent) and answers plain requests to `/health`
    /// with this status.
    UpgradeAndHealth(u16),
}

/// A scripted TCP server (a health endpoint or a backend) that counts the connections it accepted and those still open.
pub struct Fake {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    pub most_open: Arc<AtomicUsize>,
    pub upgrades: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    pub async fn start(script: Script) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let most_open = Arc::new(AtomicUsize::new(0));
        let upgrades = Arc::new(AtomicUsize::new(0));
        let counters = (accepted.clone(), open.clone(), most_open.clone(), upgrades.clone());
        let task = tokio::spawn(async move {
            let (accepted, open, most_open, upgrades) = counters;
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                most_open.fetch_max(now_open, Ordering::SeqCst);
                let (open, upgrades) = (open.clone(), upgrades.clone());
                conns.spawn(async move {
                    serve(stream, script, &upgrades).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Fake {
            addr,
            accepted,
            open,
            most_open,
            upgrades,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until this server has accepted `n` connections in all; fails with `what` after `limit`.
    pub async fn wait_accepted(&self, n: usize, limit: Duration, what: &str) {
        let start = Instant::now();
        while self.accepted() < n {
            assert!(
                start.elapsed() < limit,
                "{what}: {} of {n} connections within {limit:?}",
                self.accepted()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Reads a request head (up to 16 KiB); `None` when the peer closed first.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 16 * 1024 {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn key_of(head: &str) -> Option<String> {
    head.lines()
        .find_map(|l| {
            l.strip_prefix("Sec-WebSocket-Key: ")
                .or_else(|| l.strip_prefix("sec-websocket-key: "))
        })
        .map(|k| k.trim().to_string())
}

/// Waits for the peer to close (reading and dropping what it sends).
async fn until_closed(stream: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

async fn switch(stream: &mut TcpStream, head: &str) {
    let accept = derive_accept_key(key_of(head).unwrap_or_default().as_bytes());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    let _ = stream.write_all(answer.as_bytes()).await;
}

async fn serve(mut stream: TcpStream, script: Script, upgrades: &AtomicUsize) {
    if script == Script::Hang {
        return until_closed(&mut stream).await;
    }
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let status = |code: u16| format!("HTTP/1.1 {code} Status\r\nContent-Length: 0\r\n\r\n");
    match script {
        Script::Hang => {}
        Script::Garbage => {
            let _ = stream.write_all(b"\x00\xff\x13 this is not HTTP\r\n\r\n").await;
        }
        Script::CloseMidAnswer => {
            let _ = stream.write_all(b"HTTP/1.1 101 Swit").await;
            return;
        }
        Script::Status(code) => {
            let _ = stream.write_all(status(code).as_bytes()).await;
        }
        Script::Answer(answer) => {
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Script::WrongAccept => {
            let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                          Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n";
            let _ = stream.write_all(answer.as_bytes()).await;
        }
        Script::SilentAfter101 => switch(&mut stream, &head).await,
        Script::UpgradeAndHealth(code) => {
            if key_of(&head).is_some() {
                upgrades.fetch_add(1, Ordering::SeqCst);
                switch(&mut stream, &head).await;
            } else {
                let _ = stream.write_all(status(code).as_bytes()).await;
            }
        }
    }
    until_closed(&mut stream).await;
}

/// One upstream `app` over `servers`, checked as `health` says; retries and outlier detection off, so that only
/// the health checks decide where connections go.
pub fn config(servers: &[SocketAddr], health: &str) -> String {
    let mut text = String::from(
        "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n\n[[route]]\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nretries = 0\n",
    );
    for s in servers {
        text.push_str(&format!("[[upstream.server]]\naddress = \"{s}\"\n"));
    }
    text.push_str("[upstream.outlier]\nconsecutive_failures = 0\n[upstream.health]\n");
    text.push_str(health);
    text
}

/// Whether server `i` of the first upstream is down, as new connections see it.
pub fn is_down(proxy: &super::Proxy, i: usize) -> bool {
    proxy.snapshot().upstreams[0].servers()[i].is_down()
}

/// Waits until server `i` is down (or up); returns how long that took.
pub async fn wait_state(proxy: &super::Proxy, i: usize, down: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    while is_down(proxy, i) != down {
        assert!(
            start.elapsed() < limit,
            "server {i} not {} within {limit:?}",
            if down { "down" } else { "up" }
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}
