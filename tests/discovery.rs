//! Servers found in a discovery file (`discovery = { file = "…" }`), watched by the running binary: a server added
//! to the file joins the balancer, a removed one is drained (close 1012, as a server removed from the config is),
//! and a file that lists nothing, or cannot be read, leaves the servers known last in force, with a log line.

mod support;

use std::net::SocketAddr;

use support::binary::Binary;
use support::{TempDir, backend_name, close_frame, connect, unused_addr, within, ws_backend};

fn config(listen: SocketAddr, servers: &str) -> String {
    format!(
        "[server]\ndrain_timeout = \"1s\"\n\
         [[listener]]\nname = \"m\"\naddress = \"{listen}\"\n\
         [[route]]\nupstream = \"app\"\nrelay = \"frames\"\n\
         [[upstream]]\nname = \"app\"\ndrain_rate = 1000\ndiscovery = {{ file = \"{servers}\" }}\n"
    )
}

/// The name of the backend a new connection lands on.
async fn lands_on(url: &str) -> String {
    let mut ws = connect(url).await;
    let name = backend_name(&mut ws).await;
    let _ = ws.close(None).await;
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_join_and_leave_with_the_discovery_file_and_an_empty_one_changes_nothing() {
    let dir = TempDir::new("discovery");
    let (a, b) = (ws_backend("a").await, ws_backend("b").await);
    let servers = dir.join("servers.txt");
    std::fs::write(&servers, format!("# the app's servers\n{}\n", a.addr)).unwrap();
    let listen = unused_addr();
    let file = dir.join("wsgate.toml");
    std::fs::write(&file, config(listen, servers.to_str().unwrap())).unwrap();
    let mut wsgate = Binary::spawn(["run", "--config", file.to_str().unwrap()]);
    wsgate.wait_for_log(&["listening"]).await;
    let url = format!("ws://{listen}/");

    let mut on_a = connect(&url).await;
    assert_eq!(backend_name(&mut on_a).await, "a");

    // B joins: new connections reach it (round robin).
    std::fs::write(&servers, format!("{}\n{}  # joined\n", a.addr, b.addr)).unwrap();
    within("a connection on b", async { while lands_on(&url).await != "b" {} }).await;

    // A leaves: its session is drained with 1012 once the drain timeout has passed, as for a server removed from the
    // config; new connections go to B.
    std::fs::write(&servers, format!("{}\n", b.addr)).unwrap();
    let close = close_frame("a's session drained", &mut on_a).await;
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    for _ in 0..4 {
        assert_eq!(lands_on(&url).await, "b");
    }

    // An empty file is refused, with a log line, and B stays.
    std::fs::write(&servers, "# nothing here\n").unwrap();
    let said = wsgate.wait_for_log(&["lists no server"]).await;
    assert!(said.contains("servers.txt"), "{said}");
    for _ in 0..4 {
        assert_eq!(lands_on(&url).await, "b");
    }
    // And so is a file that is gone.
    std::fs::remove_file(&servers).unwrap();
    wsgate.wait_for_log(&["cannot read"]).await;
    assert_eq!(lands_on(&url).await, "b");
}

#[test]
fn check_names_the_line_of_a_discovery_file_that_does_not_resolve() {
    let dir = TempDir::new("discovery-check");
    let servers = dir.join("servers.txt");
    std::fs::write(&servers, "127.0.0.1:9001\nnot an address\n127.0.0.1:9001\n").unwrap();
    let file = dir.join("wsgate.toml");
    std::fs::write(&file, config(unused_addr(), servers.to_str().unwrap())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("servers.txt:2: cannot resolve `not an address`"),
        "{said}"
    );
    assert!(
        said.contains("servers.txt:3: server `127.0.0.1:9001` is listed twice"),
        "{said}"
    );
}
