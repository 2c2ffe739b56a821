//! Hot reload of the built binary (`wsgate run --config`, SIGHUP and `watch = true`): 200 live WebSocket
//! connections keep exchanging messages through 20 reloads, good and bad, that change routes, upstreams and
//! listeners; none is dropped, no message is lost or reordered, a listener whose address stays refuses no
//! connection, new connections follow the new routes, and a bad file leaves the running config in force.

mod support;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustix::process::Signal;
use support::binary::Binary;
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A config file in the temp dir, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str) -> ConfigFile {
        ConfigFile(std::env::temp_dir().join(format!("wsgate-reload-{}-{name}.toml", std::process::id())))
    }

    fn write(&self, text: &str) {
        // Written whole and renamed into place, as deploy tools do, so a reader never sees half a file.
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.0).expect("rename config");
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The built `wsgate run --config FILE` (this file's additions to the shared [`Binary`]).
impl Binary {
    async fn start(config: &ConfigFile) -> Binary {
        let mut binary = Binary::spawn([OsStr::new("run"), OsStr::new("--config"), config.0.as_os_str()]);
        binary.wait_for_log(&["listening"]).await;
        binary
    }

    /// Sends SIGHUP and waits for the outcome: `true` when the new file was taken.
    async fn reload(&mut self) -> bool {
        self.signal(Signal::HUP);
        let line = self
            .wait_for_log(&["reloaded:", "reload refused: the running config stays in force"])
            .await;
        line.contains("reloaded:")
    }
}

fn free_addr() -> SocketAddr {
    unused_addr()
}

/// A config: one listener per address in `listeners`, one route per (path prefix, upstream) in `routes` then a
/// catch-all to `default`, and an upstream per backend named after it.
fn config(listeners: &[SocketAddr], routes: &[(&str, &str)], default: &str, backends: &[(&str, SocketAddr)]) -> String {
    let mut text = String::from("[server]\ndrain_timeout = \"5s\"\n\n");
    for (i, addr) in listeners.iter().enumerate() {
        text.push_str(&format!("[[listener]]\nname = \"l{i}\"\naddress = \"{addr}\"\n\n"));
    }
    for (prefix, upstream) in routes {
        text.push_str(&format!(
            "[[route]]\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\n\n"
        ));
    }
    text.push_str(&format!("[[route]]\nupstream = \"{default}\"\n\n"));
    for (name, addr) in backends {
        text.push_str(&format!(
            "[[upstream]]\nname = \"{name}\"\n[[upstream.server]]\naddress = \"{addr}\"\n\n"
        ));
    }
    text
}

/// Which backend a new WebSocket to `addr` + `path` reaches.
async fn reaches(addr: SocketAddr, path: &str) -> String {
    let mut ws = connect(&format!("ws://{addr}{path}")).await;
    let name = backend_name(&mut ws).await;
    let _ = ws.close(None).await;
    name
}

/// What the live connections saw.
#[derive(Default)]
struct Tally {
    exchanged: AtomicU64,
}

/// A live connection: sends numbered messages one at a time and checks each echo, until `stop`; then proves it
/// is still open with one more exchange. Panics (failing the test) on a drop, a loss or a reorder.
async fn live_connection(mut ws: Client, n: usize, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let last = stop.load(Ordering::Relaxed);
        let text = format!("conn {n} message {seq}");
        within("sending on a live connection", ws.send(Message::text(text.clone())))
            .await
            .unwrap_or_else(|e| panic!("connection {n} dropped at message {seq}: {e}"));
        let echo = within("an echo on a live connection", ws.next()).await;
        match echo {
            Some(Ok(Message::Text(t))) if t.as_str() == text => {}
            other => panic!("connection {n}: sent {text:?}, got {other:?}"),
        }
        seq += 1;
        tally.exchanged.fetch_add(1, Ordering::Relaxed);
        if last {
            break;
        }
    }
    ws.close(None).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_live_connections_survive_twenty_reloads_and_new_ones_follow_the_new_routes() {
    init();
    let mut names = Vec::new();
    let mut backends = Vec::new();
    for name in ["blue", "green", "red"] {
        let backend = ws_backend(name).await;
        names.push((name, backend.addr));
        backends.push(backend);
    }
    let main = free_addr();
    let extra = free_addr();
    let file = ConfigFile::new("live");
    file.write(&config(&[main], &[], "blue", &names));
    let mut wsgate = Binary::start(&file).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut live = Vec::new();
    for n in 0..200 {
        let ws = connect(&format!("ws://{main}/live")).await;
        live.push(tokio::spawn(live_connection(ws, n, stop.clone(), tally.clone())));
    }
    // New connections keep arriving on the listener that stays: none may be refused during the reloads.
    let refused = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let prober = {
        let (stop, refused, connected) = (stop.clone(), refused.clone(), connected.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match TcpStream::connect(main).await {
                    Ok(_) => connected.fetch_add(1, Ordering::Relaxed),
                    Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Twenty reloads: the default route and a /chat route move between upstreams, a second listener comes and
    // goes, and every fourth file is bad in a different way.
    let bad = [
        "[[listener]\nname = ",
        "[[route]]\nupstream = \"nowhere\"\n",
        "[server]\nno_such_key = 1\n",
        "[[upstream]]\nname = \"x\"\n",
        "[[upstream]]\nname = \"blue\"\n[[upstream.server]]\naddress = \"127.0.0.1:1\"\nweight = 0\n",
    ];
    let mut expect_default = "blue";
    for round in 0..20 {
        // Every live connection gets to talk between two reloads.
        let before = tally.exchanged.load(Ordering::Relaxed);
        within("the live connections to exchange messages", async {
            while tally.exchanged.load(Ordering::Relaxed) < before + 400 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if round % 4 == 3 {
            let good = config(&[main], &[("/chat", "green")], expect_default, &names);
            file.write(&format!("{good}\n{}", bad[round / 4]));
            assert!(!wsgate.reload().await, "round {round}: a bad file was taken");
            assert_eq!(
                reaches(main, "/any").await,
                expect_default,
                "round {round}: the old config stays"
            );
            continue;
        }
        let default = ["blue", "green", "red"][round % 3];
        let chat = ["red", "blue", "green"][round % 3];
        let listeners = if round % 2 == 0 { vec![main, extra] } else { vec![main] };
        file.write(&config(&listeners, &[("/chat", chat)], default, &names));
        assert!(wsgate.reload().await, "round {round}: a good file was refused");
        expect_default = default;
        assert_eq!(reaches(main, "/any").await, default, "round {round}: default route");
        assert_eq!(reaches(main, "/chat/room").await, chat, "round {round}: /chat route");
        if listeners.len() == 2 {
            assert_eq!(
                reaches(extra, "/x").await,
                default,
                "round {round}: the added listener serves"
            );
        } else {
            within("the removed listener to close", async {
                while TcpStream::connect(extra).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        }
    }

    stop.store(true, Ordering::Relaxed);
    for (n, task) in live.into_iter().enumerate() {
        within("a live connection to finish", task)
            .await
            .unwrap_or_else(|e| panic!("live connection {n} failed: {e}"));
    }
    prober.await.expect("prober");
    let (refused, connected) = (refused.load(Ordering::Relaxed), connected.load(Ordering::Relaxed));
    assert_eq!(refused, 0, "connections refused during reloads ({connected} accepted)");
    assert!(connected > 20, "the prober barely ran: {connected} connections");
    assert!(
        tally.exchanged.load(Ordering::Relaxed) >= 200 * 10,
        "the live connections barely talked"
    );

    wsgate.signal(Signal::TERM);
    assert_eq!(wsgate.exit_code().await, Some(0));
}

#[tokio::test]
async fn watch_reloads_when_the_file_changes_and_keeps_the_old_config_on_a_bad_one() {
    init();
    let blue = ws_backend("blue").await;
    let green = ws_backend("green").await;
    let names = [("blue", blue.addr), ("green", green.addr)];
    let main = free_addr();
    let file = ConfigFile::new("watch");
    let with_watch = |default: &str| {
        format!(
            "[server]\nwatch = true\n{}",
            config(&[main], &[], default, &names).replacen("[server]\n", "", 1)
        )
    };
    file.write(&with_watch("blue"));
    let mut wsgate = Binary::start(&file).await;
    assert_eq!(reaches(main, "/").await, "blue");

    file.write(&with_watch("green"));
    let line = wsgate.wait_for_log(&["reloaded:", "reload refused"]).await;
    assert!(line.contains("reloaded:"), "{line}");
    assert_eq!(reaches(main, "/").await, "green");

    file.write(&format!("{}\n[[route]]\nupstream = \"missing\"\n", with_watch("blue")));
    let problem = wsgate.wait_for_log(&["reload refused"]).await;
    assert!(problem.contains("no upstream named `missing`"), "{problem}");
    assert_eq!(reaches(main, "/").await, "green", "a bad file keeps the running config");

    wsgate.signal(Signal::TERM);
    assert_eq!(wsgate.exit_code().await, Some(0));
}
