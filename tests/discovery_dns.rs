//! Servers found in DNS (`discovery = { dns = "…", … }`), by the built binary against a real DNS server (dnsmasq,
//! private to each test, every record with a TTL of 1 s): A records bring servers in and out as they change, the
//! removed ones drained with close 1012 as servers removed from the config are; SRV records give each server its
//! port, and a higher priority number makes a backup; a failed or empty lookup keeps the servers known last.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use support::binary::Binary;
use support::dnsmasq::{Dnsmasq, RCODE_REFUSED, TYPE_A};
use support::{
    Backend, Client, TempDir, backend_name, close_frame, connect, unused_addr, within, ws_backend, ws_backend_on,
};

/// How long wsgate may take to find that a resolver that answers nothing failed it: the 1 s TTL, then tries
/// that time out after 2 s each.
const DEAD_RESOLVER: Duration = Duration::from_secs(20);

/// A config whose only upstream gets all its servers from `discovery` (no server of its own).
fn config(listen: SocketAddr, discovery: &str) -> String {
    format!(
        "[server]\ndrain_timeout = \"1s\"\n\
         [[listener]]\nname = \"m\"\naddress = \"{listen}\"\n\
         [[route]]\nupstream = \"app\"\nrelay = \"frames\"\n\
         [[upstream]]\nname = \"app\"\ndrain_rate = 1000\ndiscovery = {discovery}\n"
    )
}

/// wsgate run from `config`, once it listens, and the summary of the config it started with (a start waits briefly
/// for discovery's first servers: "… 1 upstream (N servers)").
async fn start_wsgate(dir: &TempDir, config: &str) -> (Binary, String) {
    let file = dir.join("wsgate.toml");
    std::fs::write(&file, config).unwrap();
    let mut wsgate = Binary::spawn(["run", "--config", file.to_str().unwrap()]);
    let summary = wsgate.wait_for_log(&["1 upstream ("]).await;
    wsgate.wait_for_log(&["listening"]).await;
    (wsgate, summary)
}

fn loopback(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A hosts file that gives `name` these addresses.
fn hosts(name: &str, ips: &[Ipv4Addr]) -> String {
    ips.iter().map(|ip| format!("{ip} {name}\n")).collect()
}

/// Backends named `names` on these addresses, all on one port (A records carry no port: the config gives it).
async fn backends_on_one_port<const N: usize>(names: [&str; N], ips: [IpAddr; N]) -> [Backend; N] {
    'port: for _ in 0..20 {
        let port = unused_addr().port();
        // Free at every address, or another port.
        for ip in ips {
            if std::net::TcpListener::bind((ip, port)).is_err() {
                continue 'port;
            }
        }
        let mut backends = Vec::new();
        for (name, ip) in names.iter().zip(ips) {
            backends.push(ws_backend_on(name, SocketAddr::new(ip, port)).await);
        }
        return backends.try_into().unwrap_or_else(|_| unreachable!());
    }
    panic!("no port free at all of {ips:?}");
}

/// The name of the backend a new connection lands on.
async fn lands_on(url: &str) -> String {
    let mut ws = connect(url).await;
    let name = backend_name(&mut ws).await;
    let _ = ws.close(None).await;
    name
}

/// A session on the backend `name` (new connections are made until one lands there), and the names of the
/// backends the others landed on.
async fn session_on(url: &str, name: &str) -> (Client, Vec<String>) {
    within(&format!("a connection on {name}"), async {
        let mut elsewhere = Vec::new();
        loop {
            let mut ws = connect(url).await;
            let on = backend_name(&mut ws).await;
            if on == name {
                return (ws, elsewhere);
            }
            let _ = ws.close(None).await;
            elsewhere.push(on);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_follow_the_a_records_joining_and_draining_with_1012() {
    let (ip2, ip3, ip4) = (loopback(2), loopback(3), loopback(4));
    let [b2, _b3, _b4] = backends_on_one_port(["b2", "b3", "b4"], [ip2, ip3, ip4].map(IpAddr::V4)).await;
    let port = b2.addr.port();
    let dns = Dnsmasq::start("a", &hosts("app.test", &[ip2, ip3]), &[]).await;
    let dir = TempDir::new("discovery-dns-a");
    let listen = unused_addr();
    let discovery = format!(
        "{{ dns = \"app.test\", port = {port}, resolver = \"{}\", kind = \"a\" }}",
        dns.addr()
    );
    let (mut wsgate, first) = start_wsgate(&dir, &config(listen, &discovery)).await;
    assert!(first.contains("(2 servers)"), "{first}");
    let url = format!("ws://{listen}/");

    // Both servers of the A records take connections, on the configured port.
    let (mut on_b3, _) = session_on(&url, "b3").await;
    let (mut on_b2, _) = session_on(&url, "b2").await;

    // 127.0.0.3 leaves the records: its session is drained with 1012 (after the 1 s drain timeout), and new
    // connections all go to b2.
    dns.set_hosts(&hosts("app.test", &[ip2]));
    dns.wait_for_a("app.test", &[ip2]).await;
    let close = close_frame("b3's session drained", &mut on_b3).await;
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    let said = wsgate.wait_for_log(&["discovery: servers changed"]).await;
    assert!(
        said.contains(&format!("{ip3}:{port}")),
        "the log names the server leaving: {said}"
    );
    for _ in 0..6 {
        assert_eq!(lands_on(&url).await, "b2");
    }

    // 127.0.0.4 joins: new connections reach it, and b2's session is left alone.
    dns.set_hosts(&hosts("app.test", &[ip2, ip4]));
    dns.wait_for_a("app.test", &[ip2, ip4]).await;
    let (_on_b4, elsewhere) = session_on(&url, "b4").await;
    assert!(elsewhere.iter().all(|n| n == "b2"), "{elsewhere:?}");
    assert_eq!(backend_name(&mut on_b2).await, "b2");
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(lands_on(&url).await);
    }
    assert!(
        seen.contains(&"b2".to_string()) && seen.contains(&"b4".to_string()),
        "{seen:?}"
    );
    assert!(!seen.contains(&"b3".to_string()), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_empty_lookup_keeps_the_servers_known_last() {
    let (ip2, ip3) = (loopback(2), loopback(3));
    let [b2, _b3] = backends_on_one_port(["b2", "b3"], [ip2, ip3].map(IpAddr::V4)).await;
    let port = b2.addr.port();
    let mut dns = Dnsmasq::start("fail", &hosts("app.test", &[ip2]), &[]).await;
    let dir = TempDir::new("discovery-dns-fail");
    let listen = unused_addr();
    let discovery = format!(
        "{{ dns = \"app.test\", port = {port}, resolver = \"{}\", kind = \"a\" }}",
        dns.addr()
    );
    let (mut wsgate, first) = start_wsgate(&dir, &config(listen, &discovery)).await;
    assert!(first.contains("(1 server)"), "{first}");
    let url = format!("ws://{listen}/");
    let mut on_b2 = connect(&url).await;
    assert_eq!(backend_name(&mut on_b2).await, "b2");

    // The resolver is gone: the lookup fails, with a warning, and b2 stays, its session too. (Nothing answers,
    // not even with an error: the lookup ends when its tries have timed out, 2 s each, some 6 s.)
    dns.kill();
    let said = wsgate
        .wait_for_log_within(DEAD_RESOLVER, &["DNS discovery:", "discovery: servers changed"])
        .await;
    assert!(
        said.contains("the servers known last stay") && said.contains("`app.test`"),
        "{said}"
    );
    for _ in 0..4 {
        assert_eq!(lands_on(&url).await, "b2");
    }
    assert_eq!(backend_name(&mut on_b2).await, "b2");

    // Back on the same port, with 127.0.0.3 added meanwhile: lookups succeed again and b3 joins.
    dns.set_hosts(&hosts("app.test", &[ip2, ip3]));
    dns.restart().await;
    let said = wsgate.wait_for_log(&["lookups succeed again"]).await;
    assert!(said.contains("app.test"), "{said}");
    let said = wsgate.wait_for_log(&["discovery: servers changed"]).await;
    assert!(said.contains(&format!("joined [\"{ip3}:{port}\"]")), "{said}");
    let (_on_b3, _) = session_on(&url, "b3").await;

    // An answer without any A record (the name has only an IPv6 address now) changes nothing either.
    dns.set_hosts("::1 app.test\n");
    dns.wait_for_a("app.test", &[]).await;
    let said = wsgate
        .wait_for_log(&["DNS discovery:", "discovery: servers changed"])
        .await;
    assert!(
        said.contains("the servers known last stay") && said.contains("`app.test`"),
        "{said}"
    );
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(lands_on(&url).await);
    }
    assert!(
        seen.contains(&"b2".to_string()) && seen.contains(&"b3".to_string()),
        "{seen:?}"
    );
    assert_eq!(backend_name(&mut on_b2).await, "b2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_ip_keeps_the_ipv4_servers_when_the_a_lookup_fails_and_the_aaaa_one_succeeds() {
    let (v4, v6) = (IpAddr::V4(loopback(2)), IpAddr::V6(Ipv6Addr::LOCALHOST));
    let [on_ipv4, _on_ipv6] = backends_on_one_port(["v4", "v6"], [v4, v6]).await;
    let port = on_ipv4.addr.port();
    // A name outside `.test`: dnsmasq refuses the queries of the types its hosts file lacks for it.
    let dns = Dnsmasq::start("ip", &format!("{v4} app.example\n{v6} app.example\n"), &[]).await;
    let dir = TempDir::new("discovery-dns-ip");
    let listen = unused_addr();
    let discovery = format!(
        "{{ dns = \"app.example\", port = {port}, resolver = \"{}\", kind = \"ip\" }}",
        dns.addr()
    );
    let (mut wsgate, first) = start_wsgate(&dir, &config(listen, &discovery)).await;
    assert!(first.contains("(2 servers)"), "{first}");
    let url = format!("ws://{listen}/");
    let (mut on_v4, _) = session_on(&url, "v4").await;
    session_on(&url, "v6").await;

    // The A lookup fails (refused) while the AAAA one still answers: a failed lookup, so the servers known last
    // stay, the IPv4 one too; it is not a set without IPv4 servers, which would drain them.
    dns.set_hosts(&format!("{v6} app.example\n"));
    dns.wait_for_rcode("app.example", TYPE_A, RCODE_REFUSED).await;
    let said = wsgate
        .wait_for_log(&["DNS discovery:", "discovery: servers changed"])
        .await;
    assert!(
        said.contains("lookup of A `app.example` failed") && said.contains("the servers known last stay"),
        "{said}"
    );
    session_on(&url, "v4").await;
    assert_eq!(backend_name(&mut on_v4).await, "v4");

    // Both answer again: nothing changed, nothing is reported but the recovery.
    dns.set_hosts(&format!("{v4} app.example\n{v6} app.example\n"));
    let said = wsgate
        .wait_for_log(&["lookups succeed again", "discovery: servers changed"])
        .await;
    assert!(said.contains("lookups succeed again"), "{said}");
    assert_eq!(backend_name(&mut on_v4).await, "v4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_ports_and_priorities_and_their_changes_drain_and_join() {
    let (b1, b2, b3, b4) = (
        ws_backend("b1").await,
        ws_backend("b2").await,
        ws_backend("b3").await,
        ws_backend("b4").await,
    );
    let srv = |target: &str, backend: &Backend, priority: u16| {
        format!("_ws._tcp.app.test,{target}.test,{},{priority},10", backend.addr.port())
    };
    let targets = "127.0.0.1 b1.test b2.test b3.test b4.test\n";
    let lines = [srv("b1", &b1, 0), srv("b2", &b2, 0), srv("b3", &b3, 1)];
    let mut dns = Dnsmasq::start("srv", targets, &lines.each_ref().map(String::as_str)).await;
    let records = dns.srv_records("_ws._tcp.app.test").await.expect("an answer");
    assert_eq!(records.len(), 3, "{records:?}");
    let dir = TempDir::new("discovery-dns-srv");
    let listen = unused_addr();
    let discovery = format!(
        "{{ dns = \"_ws._tcp.app.test\", resolver = \"{}\", kind = \"srv\" }}",
        dns.addr()
    );
    let (mut wsgate, first) = start_wsgate(&dir, &config(listen, &discovery)).await;
    assert!(first.contains("(3 servers)"), "{first}");
    let url = format!("ws://{listen}/");

    // Each server on its own port from its record; b3, of priority 1, is a backup: no connection reaches it while
    // the priority-0 servers are up.
    let (_on_b1, before) = session_on(&url, "b1").await;
    let (mut on_b2, more) = session_on(&url, "b2").await;
    let mut seen: Vec<String> = before.into_iter().chain(more).collect();
    for _ in 0..8 {
        seen.push(lands_on(&url).await);
    }
    assert!(
        !seen.contains(&"b3".to_string()),
        "the backup took connections: {seen:?}"
    );
    assert!(
        seen.contains(&"b1".to_string()) && seen.contains(&"b2".to_string()),
        "{seen:?}"
    );

    // Other records (dnsmasq reads SRV lines only at start: it is started again on its port): b2 leaves, drained
    // with 1012; b4 joins; b3 is still a backup.
    let lines = [srv("b1", &b1, 0), srv("b4", &b4, 0), srv("b3", &b3, 1)];
    dns.restart_with_srv(&lines.each_ref().map(String::as_str)).await;
    let close = close_frame("b2's session drained", &mut on_b2).await;
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    let said = wsgate.wait_for_log(&["discovery: servers changed"]).await;
    assert!(
        said.contains(&format!("joined [\"{}\"], leaving [\"{}\"]", b4.addr, b2.addr)),
        "{said}"
    );
    let (_on_b4, elsewhere) = session_on(&url, "b4").await;
    let mut seen = elsewhere;
    for _ in 0..8 {
        seen.push(lands_on(&url).await);
    }
    assert!(seen.iter().all(|n| n == "b1" || n == "b4"), "{seen:?}");
    assert!(
        seen.contains(&"b1".to_string()) && seen.contains(&"b4".to_string()),
        "{seen:?}"
    );

    // The priorities turn around: b3 alone has the lowest number and takes every new connection; b1 and b4 are
    // backups now.
    let lines = [srv("b1", &b1, 2), srv("b4", &b4, 2), srv("b3", &b3, 1)];
    dns.restart_with_srv(&lines.each_ref().map(String::as_str)).await;
    session_on(&url, "b3").await;
    for _ in 0..6 {
        assert_eq!(lands_on(&url).await, "b3");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_named_by_srv_records_of_two_priorities_is_as_good_as_the_best() {
    let (b1, b2) = (ws_backend("b1").await, ws_backend("b2").await);
    let srv = |target: &str, backend: &Backend, priority: u16, weight: u16| {
        format!(
            "_ws._tcp.app.test,{target}.test,{},{priority},{weight}",
            backend.addr.port()
        )
    };
    // b2 is in priority 0 with b1, and again in priority 1 with a smaller weight.
    let lines = [srv("b1", &b1, 0, 10), srv("b2", &b2, 0, 10), srv("b2", &b2, 1, 5)];
    let dns = Dnsmasq::start(
        "srv-twice",
        "127.0.0.1 b1.test b2.test\n",
        &lines.each_ref().map(String::as_str),
    )
    .await;
    let records = dns.srv_records("_ws._tcp.app.test").await.expect("an answer");
    assert_eq!(records.len(), 3, "{records:?}");
    let dir = TempDir::new("discovery-dns-srv-twice");
    let listen = unused_addr();
    let discovery = format!(
        "{{ dns = \"_ws._tcp.app.test\", resolver = \"{}\", kind = \"srv\" }}",
        dns.addr()
    );
    let (_wsgate, first) = start_wsgate(&dir, &config(listen, &discovery)).await;
    assert!(first.contains("(2 servers)"), "one server each: {first}");
    let url = format!("ws://{listen}/");
    // Round robin over the two primaries.
    session_on(&url, "b2").await;
    session_on(&url, "b1").await;
}

/// `wsgate check` on `text`: whether it passed, and what it said on stderr.
fn check(name: &str, text: &str) -> (bool, String) {
    let dir = TempDir::new(name);
    let file = dir.join("wsgate.toml");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Where `value` starts in the `discovery = …` line of `text`, as `wsgate check` places a problem: `LINE:COLUMN`.
fn place_in_discovery(text: &str, value: &str) -> String {
    let (n, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with("discovery ="))
        .expect("a discovery line");
    let column = line.find(value).expect("the value in the discovery line") + 1;
    format!("{}:{column}", n + 1)
}

#[test]
fn check_refuses_srv_with_a_port_and_a_records_without_one() {
    let listen = unused_addr();
    let text = config(
        listen,
        "{ dns = \"_ws._tcp.app.test\", port = 8080, resolver = \"127.0.0.1:5353\", kind = \"srv\" }",
    );
    let (ok, said) = check("discovery-dns-check-srv", &text);
    assert!(!ok, "{said}");
    let at = place_in_discovery(&text, "8080");
    assert!(
        said.contains(&format!(
            "wsgate.toml:{at}: `discovery.port`: SRV records carry their own ports: leave `port` out"
        )),
        "{said}"
    );

    let text = config(
        listen,
        "{ dns = \"app.test\", resolver = \"127.0.0.1:5353\", kind = \"a\" }",
    );
    let (ok, said) = check("discovery-dns-check-a", &text);
    assert!(!ok, "{said}");
    let at = place_in_discovery(&text, "\"app.test\"");
    assert!(
        said.contains(&format!(
            "wsgate.toml:{at}: `discovery.port`: give the servers' `port` (or `kind = \"srv\"`)"
        )),
        "{said}"
    );

    // Each one right passes.
    for (name, discovery) in [
        (
            "discovery-dns-check-srv-ok",
            "{ dns = \"_ws._tcp.app.test\", resolver = \"127.0.0.1:5353\", kind = \"srv\" }",
        ),
        (
            "discovery-dns-check-a-ok",
            "{ dns = \"app.test\", port = 8080, resolver = \"127.0.0.1:5353\", kind = \"a\" }",
        ),
    ] {
        let (ok, said) = check(name, &config(listen, discovery));
        assert!(ok, "{discovery}: {said}");
    }
}
