//! The command line as a user meets it: help texts, errors for bad arguments, and `wsgate demo`.
mod support;

use std::process::Stdio;

use futures_util::SinkExt;
use rustix::process::{Pid, Signal, kill_process};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

fn wsgate(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(args)
        .output()
        .expect("run wsgate")
}

#[test]
fn help_lists_the_commands_and_the_proxy_flags() {
    let top = wsgate(&["--help"]);
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    for word in ["proxy", "demo"] {
        assert!(text.contains(word), "{text}");
    }
    let proxy = wsgate(&["proxy", "--help"]);
    assert!(proxy.status.success());
    let text = String::from_utf8_lossy(&proxy.stdout);
    for flag in [
        "--listen",
        "--to",
        "--connect-timeout",
        "--handshake-timeout",
        "--idle-timeout",
        "--drain-timeout",
        "--log-format",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["proxy", "--listen", "nowhere", "--to", "127.0.0.1:1"],
            "invalid listen address `nowhere`",
        ),
        (
            &["proxy", "--listen", "127.0.0.1:0", "--to", "no-port"],
            "cannot resolve server `no-port`",
        ),
        (&["proxy", "--listen", "127.0.0.1:0"], "--to"),
        (
            &[
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--to",
                "127.0.0.1:1",
                "--idle-timeout",
                "soon",
            ],
            "invalid duration",
        ),
    ];
    for (args, expected) in cases {
        let out = wsgate(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: expected {expected:?} in:\n{err}");
    }
}

#[test]
fn listening_on_a_taken_address_fails() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = wsgate(&["proxy", "--listen", &addr, "--to", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"));
}

#[tokio::test]
async fn demo_serves_its_page_echo_and_chat_through_the_proxy_and_stops_on_ctrl_c() {
    let addr = unused_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["demo", "--listen", &addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start demo");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = within("the demo's URL", stdout.next_line())
        .await
        .expect("read")
        .expect("a line");
    assert!(first.contains(&format!("http://{addr}/")), "{first}");

    let page = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<title>wsgate demo</title>"), "{page}");

    let mut echo = connect(&format!("ws://{addr}/echo")).await;
    echo.send(Message::text("12.5")).await.expect("send");
    assert_eq!(next_text(&mut echo).await, "12.5");

    let mut alice = connect(&format!("ws://{addr}/chat")).await;
    let mut bob = connect(&format!("ws://{addr}/chat")).await;
    let said = r#"{"name":"alice","text":"hi bob"}"#;
    // Bob may join the room a moment after his handshake; repeat until he hears it.
    let heard = within("bob to hear alice", async {
        loop {
            alice.send(Message::text(said)).await.expect("send");
            if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                futures_util::StreamExt::next(&mut bob),
            )
            .await
            {
                return t.to_string();
            }
        }
    })
    .await;
    assert_eq!(heard, said);

    drop((echo, alice, bob));
    let pid = Pid::from_raw(child.id().expect("pid") as i32).expect("pid");
    kill_process(pid, Signal::INT).expect("signal");
    let status = within("the demo to stop", child.wait()).await.expect("wait");
    assert_eq!(status.code(), Some(0));
}
