//! Limits shared by several instances through a real Redis (`[cluster] redis`): three `wsgate run` processes, each
//! on its own address, count one client's connections, one API key's and one identity's together; Redis killed
//! and started again mid-test (failing open, and failing closed where a listener says so), and Redis losing its
//! data (each instance writes its live counts again). `GET /api/cluster` shows the fleet.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::binary::Binary;
use support::llm::get;
use support::raw::{connect_from, header_value, read_head};
use support::redis::RedisServer;
use support::*;

/// One instance: its proxy and admin addresses, and the process.
struct Instance {
    addr: SocketAddr,
    admin: SocketAddr,
    binary: Binary,
}

/// Starts `wsgate run` with `[cluster]` on `redis` as `name`; `listener` and `route` add keys to the listener
/// and the route.
async fn instance(
    dir: &TempDir,
    name: &str,
    redis: &str,
    cluster: &str,
    listener: &str,
    route: &str,
    backend: SocketAddr,
) -> Instance {
    let (addr, admin) = (unused_addr(), unused_addr());
    let text = format!(
        "[cluster]\nredis = \"{redis}\"\ninstance = \"{name}\"\n{cluster}\n\
         [admin]\naddress = \"{admin}\"\n\
         [[listener]]\nname = \"public\"\naddress = \"{addr}\"\n{listener}\n\
         [[route]]\nupstream = \"app\"\n{route}\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{backend}\"\n"
    );
    let file = dir.join(&format!("{name}.toml"));
    std::fs::write(&file, text).expect("write config");
    let mut binary = Binary::spawn(["run", "--config", file.to_str().expect("utf-8 path")]);
    binary.wait_for_log(&["listening"]).await;
    Instance { addr, admin, binary }
}

/// An upgrade from 127.0.0.`last` with `extra` header lines: the status, the answer's head and body, and the
/// connection (open for a 101).
async fn upgrade_from(last: u8, addr: SocketAddr, extra: &str) -> (u16, String, TcpStream) {
    let mut stream = connect_from(last, addr).await;
    stream
        .write_all(upgrade_request("/", extra).as_bytes())
        .await
        .expect("write");
    let (head, rest) = within("an answer", read_head(&mut stream)).await;
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, format!("{head}{}", String::from_utf8_lossy(&rest)), stream)
}

/// Upgrades from 127.0.0.`last` until one gets `status` (each earlier one must be a 429 or a 503).
async fn until_status(last: u8, addr: SocketAddr, extra: &str, status: u16) -> (String, TcpStream) {
    within(&format!("a {status} from 127.0.0.{last}"), async {
        loop {
            let (got, answer, stream) = upgrade_from(last, addr, extra).await;
            if got == status {
                return (answer, stream);
            }
            assert!(got == 429 || got == 503 || got == 101, "{answer}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// What Redis holds for a count key: the sum over the instances' fields.
fn count_in_redis(redis: &RedisServer, key: &str) -> i64 {
    let mut c = redis.client();
    let fields: Vec<(String, i64)> = ::redis::cmd("HGETALL").arg(key).query(&mut c).expect("HGETALL");
    fields.iter().map(|(_, n)| n).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_ip_limit_of_10_holds_across_three_instances_through_redis_outages() {
    let dir = TempDir::new("cluster-limits");
    let mut redis = RedisServer::start("cluster-limits").await;
    let backend = ws_backend("app").await;
    let mut fleet = Vec::new();
    for name in ["edge-1", "edge-2", "edge-3"] {
        let limit = "max_connections_per_ip = 10";
        fleet.push(instance(&dir, name, &redis.url(), "", limit, "", backend.addr).await);
    }
    // Ten connections from one client, spread over the three instances: all admitted.
    let mut held = Vec::new();
    for i in 0..10 {
        let (status, answer, stream) = upgrade_from(7, fleet[i % 3].addr, "").await;
        assert_eq!(status, 101, "connection {i}: {answer}");
        held.push(stream);
    }
    // The 11th is refused on any instance, though none holds more than four.
    for edge in &fleet {
        let (status, answer, _) = upgrade_from(7, edge.addr, "").await;
        assert_eq!(status, 429, "{answer}");
        assert!(answer.ends_with("too many connections from this address\n"), "{answer}");
    }
    let (status, answer, _other) = upgrade_from(8, fleet[0].addr, "").await;
    assert_eq!(status, 101, "another client is not held back: {answer}");
    let said = fleet[1].binary.wait_for_log(&["across the cluster"]).await;
    assert!(said.contains("max_connections_per_ip (10)"), "{said}");

    // A connection ends on the first instance: the room it leaves is taken on the third.
    drop(held.remove(0));
    let (_, again) = until_status(7, fleet[2].addr, "", 101).await;
    held.push(again);
    let (status, answer, _) = upgrade_from(7, fleet[1].addr, "").await;
    assert_eq!(status, 429, "ten again: {answer}");

    // The fleet as any instance sees it: three instances, twelve sessions (ten and the other client's one).
    let fleet_view = within("the fleet's counts to arrive", async {
        loop {
            let (status, body) = get(fleet[0].admin, "/api/cluster").await;
            assert_eq!(status, 200, "{body}");
            let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            if view["total"]["sessions"] == 11 {
                return view;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let names: Vec<&str> = fleet_view["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["instance"].as_str())
        .collect();
    assert_eq!(names, ["edge-1", "edge-2", "edge-3"], "{fleet_view}");
    assert_eq!(fleet_view["this"]["instance"], "edge-1");

    // Redis is killed: the limit fails open (the default); each instance's local limit of ten still holds, and
    // the outage is logged and counted.
    redis.kill();
    let (status, answer, open) = upgrade_from(7, fleet[0].addr, "").await;
    assert_eq!(status, 101, "failing open: {answer}");
    fleet[0].binary.wait_for_log(&["shared limits unavailable"]).await;
    let (_, metrics) = get(fleet[0].admin, "/metrics").await;
    assert!(
        metrics.contains("wsgate_cluster_handshakes_unchecked_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("wsgate_cluster_redis_up 0"), "{metrics}");
    drop(open);

    // Redis is back, with its data: the instances see it again and the shared limit holds again.
    redis.restart().await;
    let (answer, _) = until_status(7, fleet[0].addr, "", 429).await;
    assert!(answer.contains("too many connections from this address"), "{answer}");
    fleet[0].binary.wait_for_log(&["Redis answers again"]).await;

    // Redis loses every count (a restart without persistence): each instance notices its presence gone at its
    // next beat and writes its live counts again, so the limit holds again within seconds.
    let key = "wsgate:cluster:c:ip:public:127.0.0.7";
    assert_eq!(count_in_redis(&redis, key), 10);
    let mut c = redis.client();
    let _: () = ::redis::cmd("FLUSHALL").query(&mut c).expect("FLUSHALL");
    within("the counts written again", async {
        while count_in_redis(&redis, key) != 10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    for edge in &mut fleet {
        let (status, answer, _) = upgrade_from(7, edge.addr, "").await;
        if status != 429 {
            let log = edge.binary.drain_log();
            panic!("{answer}\n{}", log.join("\n"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_that_fails_closed_refuses_while_redis_is_down() {
    let dir = TempDir::new("cluster-closed");
    let mut redis = RedisServer::start("cluster-closed").await;
    let backend = ws_backend("app").await;
    let cluster = "on_redis_down = \"open\"";
    let listener = "max_connections_per_ip = 5\non_redis_down = \"closed\"";
    let mut edge = instance(&dir, "edge-1", &redis.url(), cluster, listener, "", backend.addr).await;
    let (status, answer, _held) = upgrade_from(9, edge.addr, "").await;
    assert_eq!(status, 101, "{answer}");

    redis.kill();
    let started = tokio::time::Instant::now();
    let (status, answer, _) = upgrade_from(9, edge.addr, "").await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no hang: {:?}",
        started.elapsed()
    );
    assert_eq!(header_value(&answer, "retry-after"), Some("1"), "{answer}");
    assert!(answer.ends_with("connection limits unavailable\n"), "{answer}");
    assert!(
        !answer.contains("redis") && !answer.contains("127.0.0.1"),
        "nothing internal: {answer}"
    );
    edge.binary.wait_for_log(&["shared limits unavailable"]).await;
    let (_, metrics) = get(edge.admin, "/metrics").await;
    assert!(
        metrics.contains("wsgate_cluster_handshakes_refused_unavailable_total 1"),
        "{metrics}"
    );

    redis.restart().await;
    let _ = until_status(9, edge.addr, "", 101).await;
}

/// A keys file: three keys, two of them of one identity (`team-a`).
fn keys_file(dir: &TempDir) -> std::path::PathBuf {
    let text = api_keys_text(&[
        ("key-a1", "team-a", "max_connections = 2"),
        ("key-a2", "team-a", ""),
        ("key-b", "team-b", ""),
    ]);
    let path = dir.join("keys.toml");
    std::fs::write(&path, text).expect("write keys");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_and_identity_limits_hold_across_instances() {
    let dir = TempDir::new("cluster-keys");
    let redis = RedisServer::start("cluster-keys").await;
    let backend = ws_backend("app").await;
    let keys = keys_file(&dir);
    let route = format!(
        "[route.auth]\nmax_connections_per_identity = 3\n[route.auth.api_keys]\nfile = \"{}\"\n",
        keys.display()
    );
    let a = instance(&dir, "edge-a", &redis.url(), "", "", &route, backend.addr).await;
    let b = instance(&dir, "edge-b", &redis.url(), "", "", &route, backend.addr).await;
    let key = |k: &str| format!("X-API-Key: {k}\r\n");

    // The key's own limit: two connections, one on each instance; a third on either is refused.
    let (status, answer, _a1) = upgrade_from(2, a.addr, &key("key-a1")).await;
    assert_eq!(status, 101, "{answer}");
    let (status, answer, _a2) = upgrade_from(3, b.addr, &key("key-a1")).await;
    assert_eq!(status, 101, "{answer}");
    let (status, answer, _) = upgrade_from(4, a.addr, &key("key-a1")).await;
    assert_eq!(status, 429, "{answer}");
    assert!(answer.ends_with("too many connections with this API key\n"), "{answer}");

    // The identity's limit: team-a holds two with key-a1; one more with key-a2 on B, then none on either.
    let (status, answer, _a3) = upgrade_from(5, b.addr, &key("key-a2")).await;
    assert_eq!(status, 101, "{answer}");
    for edge in [&a, &b] {
        let (status, answer, _) = upgrade_from(6, edge.addr, &key("key-a2")).await;
        assert_eq!(status, 429, "{answer}");
        assert!(answer.ends_with("too many connections for this identity\n"), "{answer}");
    }
    // Another identity is not held back.
    let (status, answer, _b1) = upgrade_from(7, a.addr, &key("key-b")).await;
    assert_eq!(status, 101, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_holding_far_more_than_its_share_sheds_the_excess_with_1012() {
    let dir = TempDir::new("cluster-rebalance");
    let redis = RedisServer::start("cluster-rebalance").await;
    let backend = ws_backend("app").await;
    let cluster = "rebalance = true\nrebalance_threshold = 0.25\nrebalance_rate = 10";
    let mut a = instance(&dir, "edge-a", &redis.url(), cluster, "", "", backend.addr).await;
    let _b = instance(&dir, "edge-b", &redis.url(), cluster, "", "", backend.addr).await;
    // Eight sessions on A, none on B: the even share is four, and A holds more than 125 % of it.
    let url = format!("ws://{}/", a.addr);
    let mut sessions = Vec::new();
    for _ in 0..8 {
        let mut ws = connect(&url).await;
        assert_eq!(backend_name(&mut ws).await, "app");
        sessions.push(ws);
    }
    // A sheds down to its share: the four newest are closed with 1012, so that their clients reconnect through
    // the balancer in front; the four oldest stay.
    for ws in sessions.iter_mut().skip(4) {
        let close = close_frame("a newest session shed", ws).await;
        assert_eq!(u16::from(close.code), 1012, "{close:?}");
    }
    for ws in sessions.iter_mut().take(4) {
        assert_eq!(backend_name(ws).await, "app", "the oldest sessions stay");
    }
    let said = a.binary.wait_for_log(&["more than its share"]).await;
    assert!(said.contains("\"shed\":4") || said.contains("shed=4"), "{said}");
}
