//! The admin API: `GET /api/upstreams` shows each server's state; `POST /api/servers/{upstream}/{server}/drain`
//! puts a server in drain (no new sessions; live ones closed at the drain rate with 1012) and `/undrain` takes it
//! back; POSTs need the token; unknown names get 404.

mod support;

use futures_util::StreamExt;

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
    let close = close_frame("the drain's close", &mut on_a).await;
    assert_eq!(u16::from(close.code), 1012);
    for _ in 0..4 {
        let mut ws = connect(&proxy.url("/")).await;
        assert_eq!(backend_name(&mut ws).await, "b");
    }
    support::frames::echo(&mut on_b, "still here").await;

    let (status, body) = admin(&proxy, "GET", "/api/upstreams", Some(TOKEN)).await;
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

/// An admin request with a body; the status and the JSON body.
async fn admin_with_body(proxy: &Proxy, path: &str, body: &str) -> (u16, serde_json::Value) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_exchange(proxy.admin_addr(), request.as_bytes()).await;
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

/// The ids of a `GET /api/connections` answer.
fn ids(body: &serde_json::Value) -> Vec<u64> {
    body["connections"]
        .as_array()
        .map(|list| list.iter().filter_map(|c| c["id"].as_u64()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn live_connections_are_listed_filtered_paged_and_closed_with_a_code() {
    let backend = ws_backend("app").await;
    let dir = support::peers::unique_temp_dir("admin-connections");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[key]]\nhash = \"{}\"\nidentity = \"alice\"\n",
            wsgate::auth::api_keys::hash_hex(b"alice-key")
        ),
    )
    .expect("keys");
    let text = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\n\
         [[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\n\
         [[route]]\nname = \"keyed\"\npath_prefix = \"/keyed\"\nupstream = \"app\"\n\
         [route.auth.api_keys]\nfile = \"{}\"\nquery = \"api_key\"\n\n\
         [[route]]\nname = \"tunnel\"\npath_prefix = \"/tunnel\"\nupstream = \"app\"\nrelay = \"tunnel\"\n\n\
         [[route]]\nname = \"open\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{}\"\n",
        token_file.display(),
        keys.display(),
        backend.addr
    );
    let proxy = Proxy::from_toml(&text);

    let mut open: Vec<Client> = Vec::new();
    for _ in 0..5 {
        open.push(connect(&proxy.url("/")).await);
    }
    let mut keyed = connect(&proxy.url("/keyed?api_key=alice-key")).await;
    let mut tunnel = connect(&proxy.url("/tunnel")).await;
    support::frames::echo(&mut keyed, "counted").await;

    // With a token, the API's reads need it too (only /metrics and the stats page are open without protect_reads).
    let (status, _) = admin(&proxy, "GET", "/api/connections", None).await;
    assert_eq!(status, 401);
    // All seven are listed, with their place; pages of 3 walk them in id order.
    let (status, all) = admin(&proxy, "GET", "/api/connections", Some(TOKEN)).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["total"], 7, "{all}");
    let every = ids(&all);
    assert!(every.windows(2).all(|w| w[0] < w[1]), "{all}");
    let mut walked = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = admin(
            &proxy,
            "GET",
            &format!("/api/connections?limit=3&after={after}"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        walked.extend(ids(&page));
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(walked, every);
    let (_, open_only) = admin(
        &proxy,
        "GET",
        &format!("/api/connections?route=open&server={}", backend.addr),
        Some(TOKEN),
    )
    .await;
    assert_eq!(open_only["total"], 5, "{open_only}");
    let (_, alice) = admin(&proxy, "GET", "/api/connections?identity=alice", Some(TOKEN)).await;
    assert_eq!(alice["total"], 1, "{alice}");
    let alice = alice["connections"][0].clone();
    assert_eq!(
        (&alice["route"], &alice["upstream"], &alice["mode"], &alice["client"]),
        (
            &serde_json::json!("keyed"),
            &serde_json::json!("app"),
            &serde_json::json!("frames"),
            &serde_json::json!("127.0.0.1")
        ),
        "{alice}"
    );
    // Its counts are folded in within about a second.
    let keyed_id = alice["id"].as_u64().expect("id");
    within("the keyed session's message count", async {
        loop {
            let (_, body) = admin(&proxy, "GET", "/api/connections?identity=alice", Some(TOKEN)).await;
            if body["connections"][0]["messages_in"] == 1 && body["connections"][0]["messages_out"] == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let (status, body) = admin(&proxy, "GET", "/api/connections?route=open&bogus=1", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = admin(&proxy, "GET", "/api/connections?limit=0", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");

    // Closing: the token is needed; a frames-mode session gets the close code asked for, a tunnel a TCP close.
    let close_keyed = format!("/api/connections/{keyed_id}/close");
    let (status, _) = admin(&proxy, "POST", &close_keyed, None).await;
    assert_eq!(status, 401);
    let (status, body) = admin_with_body(&proxy, &close_keyed, "{\"code\": 4001").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("malformed JSON")),
        "{body}"
    );
    let (status, body) = admin_with_body(&proxy, &close_keyed, "{\"code\": 1006}").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = admin_with_body(&proxy, &close_keyed, "{\"code\": 4001}").await;
    assert_eq!((status, &body["code"]), (202, &serde_json::json!(4001)), "{body}");
    let frame = close_frame("the operator's close", &mut keyed).await;
    assert_eq!(u16::from(frame.code), 4001);

    let (_, tunnels) = admin(&proxy, "GET", "/api/connections?route=tunnel", Some(TOKEN)).await;
    let tunnel_id = tunnels["connections"][0]["id"].as_u64().expect("the tunnel is listed");
    let (status, body) = admin_with_body(&proxy, &format!("/api/connections/{tunnel_id}/close"), "").await;
    assert_eq!((status, &body["how"]), (202, &serde_json::json!("tcp close")), "{body}");
    within("the tunnel's end", async {
        while let Some(Ok(_)) = tunnel.next().await {}
    })
    .await;

    within("both gone from the list", async {
        loop {
            let (_, body) = admin(&proxy, "GET", "/api/connections", Some(TOKEN)).await;
            if body["total"] == 5 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let (status, body) = admin(&proxy, "POST", &close_keyed, Some(TOKEN)).await;
    assert_eq!(status, 404, "a closed session is unknown: {body}");
    let (status, _) = admin(&proxy, "POST", "/api/connections/not-a-number/close", Some(TOKEN)).await;
    assert_eq!(status, 404);
    // The others are untouched.
    for ws in &mut open {
        support::frames::echo(ws, "still here").await;
    }

    // The config in force, its secrets redacted.
    let (status, body) = admin(&proxy, "GET", "/api/config", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["generation"], 1, "{body}");
    assert_eq!(body["config"]["route"][0]["name"], "keyed", "{body}");
    assert_eq!(
        body["config"]["admin"]["token_file"],
        token_file.display().to_string(),
        "{body}"
    );
}

#[tokio::test]
async fn the_config_shown_hides_inline_secrets() {
    let backend = ws_backend("app").await;
    let dir = support::peers::unique_temp_dir("admin-config");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let text = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\n\
         [[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\n\
         [[route]]\nupstream = \"app\"\nheaders = {{ Authorization = \"Bearer inline-bearer-value\" }}\n\n\
         [[upstream]]\nname = \"app\"\nsticky = {{ cookie = \"wsg\", secret = \"very-secret-signing-key\" }}\n\
         [[upstream.server]]\naddress = \"{}\"\n",
        token_file.display(),
        backend.addr
    );
    let proxy = Proxy::from_toml(&text);
    let (status, _) = admin(&proxy, "GET", "/api/config", None).await;
    assert_eq!(status, 401, "the token guards the config");
    let (status, body) = admin(&proxy, "GET", "/api/config", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["config"]["upstream"][0]["sticky"]["secret"], "REDACTED", "{body}");
    assert_eq!(
        body["config"]["route"][0]["headers"]["Authorization"], "REDACTED",
        "{body}"
    );
    assert_eq!(body["config"]["upstream"][0]["sticky"]["cookie"], "wsg", "{body}");
    for secret in ["very-secret-signing-key", "inline-bearer-value"] {
        assert!(!body.to_string().contains(secret), "{body}");
    }
}
