//! The admin API: `GET /api/upstreams` shows each server's state; `POST /api/servers/{upstream}/{server}/drain`
//! puts a server in drain (no new sessions; live ones closed at the drain rate with 1012) and `/undrain` takes it
//! back; POSTs need the token; unknown names get 404.

mod support;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use support::*;

const TOKEN: &str = "admin-secret";

fn config(a: std::net::SocketAddr, b: std::net::SocketAddr, token_file: &std::path::Path) -> String {
    format!(
        "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\n\
         [[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\n[[route]]\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\ndrain_rate = 100\n[[upstream.server]]\naddress = \"{a}\"\n\
         [[upstream.server]]\naddress = \"{b}\"\n",
        token_file.display()
    )
}

/// An admin request; the status and the JSON body.
async fn admin(proxy: &Proxy, method: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange(proxy.admin_addr(), request.as_bytes()).await;
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn a_server_drained_through_the_admin_api_takes_no_sessions_and_closes_its_own_with_1012() {
    let a = ws_backend("a").await;
    let b = ws_backend("b").await;
    let dir = support::peers::unique_temp_dir("admin-api");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let proxy = Proxy::from_toml(&config(a.addr, b.addr, &token_file));

    // A session on each server.
    let mut on_a = None;
    let mut on_b = None;
    for _ in 0..4 {
        let mut ws = connect(&proxy.url("/")).await;
        match backend_name(&mut ws).await.as_str() {
            "a" if on_a.is_none() => on_a = Some(ws),
            "b" if on_b.is_none() => on_b = Some(ws),
            _ => {}
        }
    }
    let (mut on_a, mut on_b) = (on_a.expect("a session on a"), on_b.expect("a session on b"));

    let (status, _) = admin(&proxy, "POST", &format!("/api/servers/app/{}/drain", a.addr), None).await;
    assert_eq!(status, 401, "a POST needs the token");
    let (status, body) = admin(
        &proxy,
        "POST",
        &format!("/api/servers/app/{}/drain", a.addr),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        (status, &body["draining"]),
        (200, &serde_json::Value::Bool(true)),
        "{body}"
    );

    // a's session is closed with 1012; b's goes on; new sessions all go to b.
    let close = within("the drain's close", async {
        loop {
            match on_a.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close code");
    assert_eq!(u16::from(close.code), 1012);
    for _ in 0..4 {
        let mut ws = connect(&proxy.url("/")).await;
        assert_eq!(backend_name(&mut ws).await, "b");
    }
    support::frames::echo(&mut on_b, "still here").await;

    let (status, body) = admin(&proxy, "GET", "/api/upstreams", None).await;
    assert_eq!(status, 200, "{body}");
    let servers = body["upstreams"][0]["servers"].as_array().expect("servers").clone();
    let state = |name: String| {
        servers
            .iter()
            .find(|s| s["server"] == name.as_str())
            .cloned()
            .expect("listed")
    };
    assert_eq!(state(a.addr.to_string())["draining"], true, "{body}");
    assert_eq!(state(b.addr.to_string())["draining"], false, "{body}");
    assert_eq!(state(b.addr.to_string())["up"], true, "{body}");

    let (status, body) = admin(
        &proxy,
        "POST",
        &format!("/api/servers/app/{}/undrain", a.addr),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        (status, &body["draining"]),
        (200, &serde_json::Value::Bool(false)),
        "{body}"
    );
    let mut names = Vec::new();
    for _ in 0..4 {
        let mut ws = connect(&proxy.url("/")).await;
        names.push(backend_name(&mut ws).await);
    }
    assert!(names.iter().any(|n| n == "a"), "a takes sessions again: {names:?}");

    let (status, body) = admin(&proxy, "POST", "/api/servers/app/10.9.9.9:1/drain", Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("no server")),
        "{body}"
    );
    let (status, _) = admin(&proxy, "POST", "/api/servers/nope/x/drain", Some(TOKEN)).await;
    assert_eq!(status, 404);
    let (status, _) = admin(
        &proxy,
        "GET",
        &format!("/api/servers/app/{}/drain", a.addr),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn post_api_reload_loads_the_file_again_and_answers_what_is_wrong_with_a_bad_one() {
    let a = ws_backend("a").await;
    let b = ws_backend("b").await;
    let dir = support::peers::unique_temp_dir("admin-reload");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let admin_addr = unused_addr();
    let listen = unused_addr();
    let text = config(a.addr, b.addr, &token_file)
        .replacen("127.0.0.1:0", &admin_addr.to_string(), 1)
        .replacen("127.0.0.1:0", &listen.to_string(), 1);
    let file = dir.join("wsgate.toml");
    std::fs::write(&file, &text).expect("config");
    let mut wsgate = support::binary::Binary::spawn(["run", "--config", &file.display().to_string()]);
    wsgate.wait_for_log(&["admin listening"]).await;
    wsgate.wait_for_log(&["listening"]).await;
    let post = |token: Option<&str>| {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        format!("POST /api/reload HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
    };
    let body = |answer: &str| -> serde_json::Value {
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap_or(serde_json::Value::Null)
    };

    let answer = raw_exchange(admin_addr, post(None).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    let answer = raw_exchange(admin_addr, post(Some(TOKEN)).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        body(&answer)["reloaded"]
            .as_str()
            .is_some_and(|s| s.contains("2 servers")),
        "{answer}"
    );

    std::fs::write(&file, text.replace("drain_rate = 100", "drain_rate = \"fast\"")).expect("break it");
    let answer = raw_exchange(admin_addr, post(Some(TOKEN)).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let problems = body(&answer)["problems"].as_array().cloned().unwrap_or_default();
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.contains("wsgate.toml:") && p.contains("\"fast\""))),
        "{answer}"
    );
    // The running config stays: the proxy still serves.
    let mut ws = connect(&format!("ws://{listen}/")).await;
    assert!(["a", "b"].contains(&backend_name(&mut ws).await.as_str()));
    let metrics = raw_exchange(
        admin_addr,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        metrics.contains("wsgate_reloads_total{result=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("wsgate_reloads_total{result=\"ok\"} 1"), "{metrics}");
}
