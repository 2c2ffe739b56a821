//! A health endpoint that hangs, answers garbage or closes mid-answer marks its server down, and leaks nothing: each
//! check's socket is closed when the check ends, and once the proxies have stopped the process holds no more file
//! descriptors than before they started. One test in its own binary, so that no other test's sockets blur the count.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use support::Proxy;
use support::scripted::{Fake, Script, config, wait_state};

/// File descriptors the process holds.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// A health endpoint that hangs, answers garbage or closes mid-answer marks its server down, and each check's
/// socket is closed when the check ends: the servers never see more than a couple of wsgate's sockets open at a
/// time, and none once the proxy has stopped.
#[tokio::test]
async fn broken_health_endpoints_mark_down_without_leaking_sockets_or_descriptors() {
    support::init();
    let before = open_fds();
    let fast = "interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 2\n";
    let hang = Fake::start(Script::Hang).await;
    let garbage = Fake::start(Script::Garbage).await;
    let mid = Fake::start(Script::CloseMidAnswer).await;
    let fakes = [&hang, &garbage, &mid];
    let mut proxies = Vec::new();
    for kind in ["http", "websocket"] {
        for fake in fakes {
            let text = config(&[fake.addr], &format!("kind = \"{kind}\"\n{fast}"));
            proxies.push((kind, fake.addr, Proxy::from_toml(&text)));
        }
    }
    for (kind, addr, proxy) in &proxies {
        let took = wait_state(proxy, 0, true, Duration::from_secs(3)).await;
        eprintln!("{kind} check of {addr}: down after {took:?}");
    }
    // Let each server see a couple of dozen checks.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fakes.iter().any(|f| f.accepted() < 2 * 20) {
        assert!(Instant::now() < deadline, "checks kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for fake in fakes {
        // Two proxies check each server, each check at most `timeout` long, one `interval` apart.
        let most = fake.most_open.load(Ordering::SeqCst);
        assert!(most <= 4, "{:?}: {most} of wsgate's sockets open at once", fake.addr);
    }
    for (_, _, proxy) in proxies {
        tokio::task::spawn_blocking(move || proxy.shutdown_and_join())
            .await
            .expect("joined");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while fakes.iter().any(|f| f.open.load(Ordering::SeqCst) > 0) {
        assert!(Instant::now() < deadline, "a check's socket outlived the proxy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The three servers' listening sockets are the only descriptors added since the start.
    let after = open_fds();
    assert!(after <= before + 3, "{before} descriptors before, {after} after");
}
