//! Active health checks against real servers: a killed backend is marked down within `fall` intervals and up
//! again within `rise` intervals of its restart; each kind of check fails against a server that breaks it; checks
//! of a server removed by a reload stop, and a server that stays keeps its state; bad `[upstream.health]` keys are
//! refused with their line. (Broken health endpoints and leaks: `health_faults.rs`.)

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::scripted::{Fake, Script, config, is_down, wait_state};
use support::{Proxy, WAIT, backend_name, connect, unused_addr, ws_backend, ws_backend_on};

/// The backends that `n` new connections reach, in order.
async fn reached(proxy: &Proxy, n: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ws = connect(&proxy.url("/")).await;
        names.push(backend_name(&mut ws).await);
    }
    names
}

#[tokio::test]
async fn a_killed_backend_is_down_within_fall_intervals_and_up_within_rise_intervals_of_its_restart() {
    let mut a = ws_backend("a").await;
    let b = ws_backend("b").await;
    let a_addr = a.addr;
    let interval = Duration::from_millis(200);
    let proxy = Proxy::from_toml(&config(
        &[a.addr, b.addr],
        "kind = \"websocket\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 3\n",
    ));
    // Checks pass (each one a close 1000 on the backend): the server stays up, and connections go to both.
    for _ in 0..2 {
        while !matches!(a.next_event().await, support::Event::Closed(Some((1000, _)))) {}
    }
    assert!(!is_down(&proxy, 0));
    let names = reached(&proxy, 4).await;
    assert!(
        names.contains(&"a".to_string()) && names.contains(&"b".to_string()),
        "{names:?}"
    );

    a.kill();
    // fall checks, one interval apart (±10 % jitter), the first within one interval of the kill.
    let took = wait_state(
        &proxy,
        0,
        true,
        interval.mul_f64(3.0 * 1.1) + Duration::from_millis(150),
    )
    .await;
    eprintln!("marked down {took:?} after the kill (fall 3 x interval 200ms)");
    // Down: every new connection goes to b, with retries off (a dead server picked would be a 502).
    assert!(reached(&proxy, 20).await.iter().all(|n| n == "b"));

    let restarted = ws_backend_on("a", a_addr).await;
    let took = wait_state(
        &proxy,
        0,
        false,
        interval.mul_f64(2.0 * 1.1) + Duration::from_millis(150),
    )
    .await;
    eprintln!("marked up {took:?} after the restart (rise 2 x interval 200ms)");
    let names = reached(&proxy, 4).await;
    assert!(names.contains(&"a".to_string()), "{names:?}");
    drop(restarted);
}

#[tokio::test]
async fn a_server_failing_its_http_check_gets_no_new_handshake() {
    // The server still upgrades WebSockets, but its /health says 503: once down, no handshake reaches it.
    let sick = Fake::start(Script::UpgradeAndHealth(503)).await;
    let well = Fake::start(Script::UpgradeAndHealth(200)).await;
    let proxy = Proxy::from_toml(&config(
        &[sick.addr, well.addr],
        "kind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 2\n",
    ));
    wait_state(&proxy, 0, true, Duration::from_secs(2)).await;
    let before = sick.upgrades.load(Ordering::SeqCst);
    let well_before = well.upgrades.load(Ordering::SeqCst);
    for _ in 0..30 {
        let _ws = connect(&proxy.url("/")).await;
    }
    assert_eq!(sick.upgrades.load(Ordering::SeqCst), before);
    assert_eq!(well.upgrades.load(Ordering::SeqCst), well_before + 30);
}

/// Every kind of check marks down a server that fails it, and keeps up one that passes it.
#[tokio::test]
async fn each_kind_of_check_fails_against_a_server_that_breaks_it() {
    let fast = "interval = \"100ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 2\n";
    let http_ok = Fake::start(Script::Status(200)).await;
    let http_500 = Fake::start(Script::Status(500)).await;
    let http_204 = Fake::start(Script::Status(204)).await;
    let echo = ws_backend("echo").await;
    let wrong_accept = Fake::start(Script::WrongAccept).await;
    let silent = Fake::start(Script::SilentAfter101).await;
    let refused = unused_addr();
    let cases: Vec<(&str, SocketAddr, String, bool)> = vec![
        ("tcp, refused", refused, format!("kind = \"tcp\"\n{fast}"), true),
        (
            "tcp, listening",
            http_500.addr,
            format!("kind = \"tcp\"\n{fast}"),
            false,
        ),
        ("http, 500", http_500.addr, format!("kind = \"http\"\n{fast}"), true),
        ("http, 200", http_ok.addr, format!("kind = \"http\"\n{fast}"), false),
        (
            "http, 204 not in expect_status",
            http_204.addr,
            format!("kind = \"http\"\nexpect_status = [200]\n{fast}"),
            true,
        ),
        (
            "websocket, wrong accept key",
            wrong_accept.addr,
            format!("kind = \"websocket\"\n{fast}"),
            true,
        ),
        (
            "websocket, ping never answered",
            silent.addr,
            format!("kind = \"websocket\"\n{fast}"),
            true,
        ),
        (
            "websocket, ping answered",
            echo.addr,
            format!("kind = \"websocket\"\n{fast}"),
            false,
        ),
        (
            "websocket, text echoed",
            echo.addr,
            format!("kind = \"websocket\"\nsend = \"are you there\"\n{fast}"),
            false,
        ),
    ];
    let proxies: Vec<(&str, Proxy, bool)> = cases
        .into_iter()
        .map(|(name, addr, health, fails)| (name, Proxy::from_toml(&config(&[addr], &health)), fails))
        .collect();
    for (name, proxy, fails) in &proxies {
        if *fails {
            let took = wait_state(proxy, 0, true, Duration::from_secs(3)).await;
            eprintln!("{name}: down after {took:?}");
        }
    }
    // The passing ones have had several checks by now: still up.
    for (name, proxy, fails) in &proxies {
        assert_eq!(is_down(proxy, 0), *fails, "{name}");
    }
    // A passing WebSocket check ends with a clean close 1000 on the backend.
    let mut echo = echo;
    let mut saw_close = false;
    for _ in 0..20 {
        if let support::Event::Closed(Some((1000, _))) = echo.next_event().await {
            saw_close = true;
            break;
        }
    }
    assert!(saw_close, "the echo backend saw a close 1000 from the checks");
}

#[tokio::test]
async fn checks_of_a_server_removed_by_a_reload_stop() {
    let checked = Fake::start(Script::Status(200)).await;
    let other = Fake::start(Script::Status(200)).await;
    let health = "kind = \"http\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n";
    let mut proxy = Proxy::from_toml(&config(&[checked.addr, other.addr], health));
    checked.wait_accepted(3, Duration::from_secs(3), "no checks").await;
    proxy.reload(&config(&[other.addr], health));
    // A check in flight at the reload may still land, within its 100 ms timeout; after that, none. Four more checks
    // of the server that stays take at least three intervals (90 ms or more each).
    let at_reload = other.accepted();
    other
        .wait_accepted(at_reload + 4, WAIT, "the server that stays is still checked")
        .await;
    let after = checked.accepted();
    let still = other.accepted();
    // While the server that stays gets four more checks, the removed one would get about as many.
    other
        .wait_accepted(still + 4, WAIT, "the server that stays is still checked")
        .await;
    assert_eq!(checked.accepted(), after, "the removed server is no longer checked");
    assert!(other.accepted() >= still + 4, "the server that stays is still checked");
}

#[tokio::test]
async fn a_down_server_stays_down_across_a_reload_that_keeps_it() {
    let dead = unused_addr();
    let well = ws_backend("well").await;
    let other = ws_backend("other").await;
    let fast = "kind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n";
    let mut proxy = Proxy::from_toml(&config(&[dead, well.addr], fast));
    wait_state(&proxy, 0, true, Duration::from_secs(2)).await;
    // A new check config restarts the checks: with a long interval, no check comes soon enough to decide anything
    // again, so what the server is after the reload is what it was before.
    let slow = "kind = \"tcp\"\ninterval = \"30s\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n";
    proxy.reload(&config(&[dead, well.addr, other.addr], slow));
    assert!(is_down(&proxy, 0), "the reload kept the server's health state");
    // Retries are off: a connection sent to the dead server would fail (`connect` panics on its 502), so all of
    // them reaching the two live servers shows the dead one is still out.
    let names = reached(&proxy, 10).await;
    assert!(names.iter().all(|n| n == "well" || n == "other"), "{names:?}");
}

#[test]
fn bad_health_keys_are_refused_with_their_line() {
    let base = config(&[SocketAddr::from(([127, 0, 0, 1], 9))], "");
    let cases = [
        (
            "kind = \"tcp\"\nrise = 0\n",
            "`health.rise`: must be from 1 to 1000, not 0",
        ),
        (
            "kind = \"tcp\"\ninterval = \"50ms\"\n",
            "`health.interval`: must be at least 100ms",
        ),
        ("kind = \"smoke-signals\"\n", "unknown variant `smoke-signals`"),
        (
            "kind = \"tcp\"\npath = \"/health\"\n",
            "`health.path` is used only by http and websocket checks",
        ),
        ("kind = \"http\"\nexpect_status = [700]\n", "700 is not an HTTP status"),
        (
            "kind = \"http\"\nsend = \"hi\"\n",
            "`health.send` is used only by websocket checks",
        ),
        ("interval = \"1s\"\n", "missing field `kind`"),
    ];
    let health_line = base.lines().count();
    for (health, expected) in cases {
        let text = format!("{base}{health}");
        let problems = wsgate::config::file::parse(&text, "t.toml").expect_err(health);
        let first = problems.first().expect("a problem");
        assert!(first.message.contains(expected), "{health}: {}", first.message);
        assert!(first.line >= health_line, "{health}: placed at line {}", first.line);
    }
}
