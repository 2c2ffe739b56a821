//! Stickiness that needs no shared state: three `wsgate run` processes with the same config (each on its own
//! listener) in front of the same three backends send a request to the same backend whichever instance it reaches,
//! by the hash ring (`balance = "consistent_hash"`) and by the sticky cookie one of them set.

mod support;

use std::collections::BTreeSet;

use support::binary::Binary;
use support::{Backend, TempDir, backend_name, connect_with, unused_addr, ws_backend};

/// Three `wsgate run` processes, their config the same but for the listener's address.
struct Cluster {
    urls: Vec<String>,
    _instances: Vec<Binary>,
    _dir: TempDir,
}

impl Cluster {
    /// Starts the three instances with `upstream` (keys of the `[[upstream]]` named "app") in front of `backends`,
    /// once each has logged "listening".
    async fn start(name: &str, backends: &[Backend], upstream: &str) -> Cluster {
        let dir = TempDir::new(name);
        let servers: String = backends
            .iter()
            .map(|b| format!("[[upstream.server]]\naddress = \"{}\"\n", b.addr))
            .collect();
        let (mut urls, mut instances) = (Vec::new(), Vec::new());
        for i in 1..=3 {
            let listen = unused_addr();
            let file = dir.join(&format!("wsgate-{i}.toml"));
            let text = format!(
                "[server]\naccess_log = \"off\"\n[[listener]]\nname = \"l\"\naddress = \"{listen}\"\n\
                 [[route]]\nupstream = \"app\"\n[[upstream]]\nname = \"app\"\n{upstream}{servers}"
            );
            std::fs::write(&file, text).unwrap();
            let mut wsgate = Binary::spawn(["run", "--config", file.to_str().unwrap()]);
            wsgate.wait_for_log(&["listening"]).await;
            urls.push(format!("ws://{listen}/"));
            instances.push(wsgate);
        }
        Cluster {
            urls,
            _instances: instances,
            _dir: dir,
        }
    }
}

/// The backend a new connection to `url` with `headers` lands on, and the sticky cookie (`NAME=VALUE`, without
/// its attributes) the 101 sets, if any.
async fn lands_on(url: &str, headers: &[(&str, &str)]) -> (String, Option<String>) {
    let (mut ws, answer) = connect_with(url, headers).await;
    let name = backend_name(&mut ws).await;
    let _ = ws.close(None).await;
    let cookie = answer.get("set-cookie").map(|v| {
        let v = v.to_str().expect("an ASCII cookie");
        assert!(v.ends_with("; Path=/; HttpOnly; SameSite=Lax"), "{v}");
        v.split(';').next().unwrap_or_default().to_string()
    });
    (name, cookie)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hashed_header_lands_on_the_same_backend_through_every_instance() {
    let backends = [ws_backend("a").await, ws_backend("b").await, ws_backend("c").await];
    let upstream = "balance = \"consistent_hash\"\nhash_key = \"header:X-User\"\n";
    let cluster = Cluster::start("cluster-hash", &backends, upstream).await;

    // Each instance sees the 20 keys in an order of its own (steps 1, 3 and 7 modulo 20), so that a balancer that
    // ignored the key (round robin, in step on three fresh instances) would not agree by accident.
    let mut owners: Vec<Vec<String>> = Vec::new();
    for (url, step) in cluster.urls.iter().zip([1, 3, 7]) {
        let mut owner = vec![String::new(); 20];
        for k in 0..20 {
            let user = (k * step) % 20;
            owner[user] = lands_on(url, &[("X-User", &format!("user-{user}"))]).await.0;
        }
        owners.push(owner);
    }
    assert_eq!(owners[0], owners[1], "instances 1 and 2 disagree");
    assert_eq!(owners[0], owners[2], "instances 1 and 3 disagree");
    let used: BTreeSet<&String> = owners[0].iter().collect();
    assert!(used.len() > 1, "20 keys all on one backend: {:?}", owners[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_set_by_one_instance_holds_on_the_others() {
    let backends = [ws_backend("a").await, ws_backend("b").await, ws_backend("c").await];
    let upstream = "sticky = { cookie = \"SERVERID\", secret = \"shared-by-the-cluster\" }\n";
    let cluster = Cluster::start("cluster-cookie", &backends, upstream).await;

    // Instance 1 balances round robin: three new clients land on the three backends, each given a cookie.
    let mut stuck = Vec::new();
    for _ in 0..3 {
        let (name, cookie) = lands_on(&cluster.urls[0], &[]).await;
        stuck.push((name, cookie.expect("the first 101 sets the sticky cookie")));
    }
    let names: BTreeSet<&str> = stuck.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.len(), 3, "{stuck:?}");

    // Each cookie, sent through instances 2 and 3 three times (round robin alone would visit every backend), keeps
    // its client on the backend that instance 1 chose, and no new cookie is set.
    for (name, cookie) in &stuck {
        let header = format!("app=1; {cookie}");
        for url in &cluster.urls[1..] {
            for _ in 0..3 {
                let (landed, set) = lands_on(url, &[("Cookie", &header)]).await;
                assert_eq!(&landed, name, "{cookie} through {url}");
                assert_eq!(set, None, "{cookie} through {url} named its server already");
            }
        }
    }
}
