//! The admin listener's `GET /metrics`: each metric family moves with what the proxy does (a session opened, a
//! message relayed, a close, a refusal, a reload), the token guards it as configured, and `[admin]` mistakes are
//! refused by the config check.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use support::*;

/// Sends `GET /metrics` to the admin listener (with `token` as a bearer token); the whole answer.
async fn scrape(proxy: &Proxy, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET /metrics HTTP/1.1\r\nHost: admin\r\n{auth}Connection: close\r\n\r\n");
    raw_exchange(proxy.admin_addr(), request.as_bytes()).await
}

/// The value of one series (`name{labels}` exactly as Prometheus text writes it), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Scrapes until `series` has `expected`, within the test wait.
async fn wait_for(proxy: &Proxy, series: &str, expected: f64) -> String {
    let started = tokio::time::Instant::now();
    loop {
        let text = scrape(proxy, None).await;
        if value(&text, series) == Some(expected) {
            return text;
        }
        assert!(started.elapsed() < WAIT, "{series} never became {expected}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`config`] with one more server before the backend, its lines `extra` after its address.
fn config_with_server_before(backend: std::net::SocketAddr, other: std::net::SocketAddr, extra: &str) -> String {
    config(backend, "").replace(
        "[[upstream.server]]",
        &format!("[[upstream.server]]\naddress = \"{other}\"\n{extra}[[upstream.server]]"),
    )
}

fn config(backend: std::net::SocketAddr, admin: &str) -> String {
    format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n{admin}\n\n[[listener]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n\n\
         [[route]]\nname = \"echo\"\npath_prefix = \"/ws\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\n[[upstream.server]]\naddress = \"{backend}\"\n"
    )
}

#[tokio::test]
async fn metrics_move_with_sessions_messages_closes_refusals_and_reloads() {
    let backend = ws_backend("b").await;
    let text = config(backend.addr, "");
    let mut proxy = Proxy::from_toml(&text);
    let session = format!(
        "{{listener=\"public\",route=\"echo\",upstream=\"app\",server=\"{}\"}}",
        backend.addr
    );
    let before = scrape(&proxy, None).await;
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    assert!(before.contains("text/plain; version=0.0.4"), "{before}");
    assert_eq!(value(&before, "wsgate_config_generation"), Some(1.0), "{before}");

    let mut ws = connect(&proxy.url("/ws")).await;
    ws.send(Message::text("hello")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "hello");
    let open = wait_for(&proxy, &format!("wsgate_sessions_active{session}"), 1.0).await;
    // A live session's counts are folded in within about a second, without waiting for its end.
    let place = session.trim_end_matches('}');
    let live = wait_for(
        &proxy,
        &format!("wsgate_messages_total{place},direction=\"client_to_backend\"}}"),
        1.0,
    )
    .await;
    assert_eq!(
        value(
            &live,
            &format!("wsgate_messages_total{place},direction=\"backend_to_client\"}}")
        ),
        Some(1.0),
        "{live}"
    );
    assert_eq!(
        value(
            &live,
            "wsgate_message_size_bytes_bucket{le=\"64.0\",direction=\"client_to_backend\"}"
        ),
        Some(1.0),
        "{live}"
    );
    assert_eq!(
        value(&live, "wsgate_message_size_bytes_sum{direction=\"client_to_backend\"}"),
        Some(5.0),
        "{live}"
    );
    assert_eq!(
        value(&open, &format!("wsgate_sessions_total{session}")),
        Some(1.0),
        "{open}"
    );
    assert_eq!(
        value(&open, "wsgate_handshakes_total{outcome=\"switched\",status=\"101\"}"),
        Some(1.0),
        "{open}"
    );
    assert_eq!(
        value(&open, "wsgate_handshake_duration_seconds_count"),
        Some(1.0),
        "{open}"
    );
    assert_eq!(
        value(&open, "wsgate_upstream_connect_duration_seconds_count"),
        Some(1.0),
        "{open}"
    );
    assert!(
        value(&open, "wsgate_handshake_duration_seconds_sum").is_some_and(|s| s > 0.0),
        "{open}"
    );

    ws.close(None).await.expect("close");
    wait_for(&proxy, &format!("wsgate_sessions_active{session}"), 0.0).await;
    // A scrape reads each family in turn, so the close may be counted just after the active gauge was read.
    let closed = wait_for(&proxy, "wsgate_closes_total{code=\"none\",side=\"client\"}", 1.0).await;
    let up = value(
        &closed,
        &format!("wsgate_bytes_total{place},direction=\"client_to_backend\"}}"),
    )
    .unwrap_or(0.0);
    let down = value(
        &closed,
        &format!("wsgate_bytes_total{place},direction=\"backend_to_client\"}}"),
    )
    .unwrap_or(0.0);
    // The client's masked 5-byte text frame (11 bytes) and its close frame (6) at least.
    assert!(up >= 17.0 && down >= 7.0, "{closed}");
    assert_eq!(
        value(
            &closed,
            &format!("wsgate_messages_total{place},direction=\"client_to_backend\"}}")
        ),
        Some(1.0),
        "{closed}"
    );
    // A text frame and a close frame each way.
    assert_eq!(
        value(
            &closed,
            &format!("wsgate_frames_total{place},direction=\"client_to_backend\"}}")
        ),
        Some(2.0),
        "{closed}"
    );

    // Refusals: no route (an upgrade and a plain request), and a bad upgrade.
    let answer = raw_exchange(proxy.addr, upgrade_request("/elsewhere", "").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let plain = raw_exchange(
        proxy.addr,
        b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 404"), "{plain}");
    let refused = wait_for(&proxy, "wsgate_rejections_total{reason=\"no_route\"}", 2.0).await;
    assert_eq!(
        value(&refused, "wsgate_handshakes_total{outcome=\"refused\",status=\"404\"}"),
        Some(1.0),
        "only the upgrade is a handshake: {refused}"
    );

    proxy.reload(&text);
    let reloaded = scrape(&proxy, None).await;
    assert_eq!(
        value(&reloaded, "wsgate_reloads_total{result=\"ok\"}"),
        Some(1.0),
        "{reloaded}"
    );
    assert_eq!(value(&reloaded, "wsgate_config_generation"), Some(2.0), "{reloaded}");
    // No client address or connection id in any label.
    assert!(!reloaded.contains("id=") && !reloaded.contains("client="), "{reloaded}");
}

#[tokio::test]
async fn the_admin_token_guards_posts_and_protected_reads() {
    let backend = ws_backend("b").await;
    let dir = support::peers::unique_temp_dir("admin-token");
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, "s3cret-token\n").expect("write token");
    let guarded = format!("token_file = \"{}\"\nprotect_reads = true", token_file.display());
    let proxy = Proxy::from_toml(&config(backend.addr, &guarded));
    let without = scrape(&proxy, None).await;
    assert!(without.starts_with("HTTP/1.1 401"), "{without}");
    assert!(
        without.contains("WWW-Authenticate") || without.contains("www-authenticate"),
        "{without}"
    );
    let wrong = scrape(&proxy, Some("s3cret-tokeN")).await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    // The file's trailing newline is not part of the token.
    let right = scrape(&proxy, Some("s3cret-token")).await;
    assert!(right.starts_with("HTTP/1.1 200"), "{right}");
    let post = "POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(proxy.admin_addr(), post.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let unknown = "GET /nothing HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s3cret-token\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(proxy.admin_addr(), unknown.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("{\"error\":"), "{answer}");

    // Without protect_reads, Prometheus scrapes without the token.
    let open = format!("token_file = \"{}\"", token_file.display());
    let proxy = Proxy::from_toml(&config(backend.addr, &open));
    let answer = scrape(&proxy, None).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn admin_mistakes_are_refused_by_the_config_check() {
    let upstream = unused_addr();
    let public = config(upstream, "").replace(
        "[admin]\naddress = \"127.0.0.1:0\"",
        "[admin]\naddress = \"0.0.0.0:9090\"",
    );
    let problems = wsgate::config::file::parse(&public, "t.toml").expect_err("refused");
    assert!(problems[0].to_string().contains("needs `token_file`"), "{problems:?}");
    let missing = config(upstream, "token_file = \"/nonexistent/admin.token\"");
    let problems = wsgate::config::file::parse(&missing, "t.toml").expect_err("refused");
    assert!(
        problems[0].to_string().contains("admin.token: cannot read"),
        "{problems:?}"
    );
    let protect = config(upstream, "protect_reads = true");
    let problems = wsgate::config::file::parse(&protect, "t.toml").expect_err("refused");
    assert!(problems[0].to_string().contains("protect_reads"), "{problems:?}");
}

#[tokio::test]
async fn servers_and_the_process_are_read_at_each_scrape_and_openmetrics_is_served_when_asked() {
    let backend = ws_backend("b").await;
    let down = unused_addr();
    let proxy = Proxy::from_toml(&config_with_server_before(backend.addr, down, "drain = true\n"));
    let _ws = connect(&proxy.url("/ws")).await;
    let live = format!("{{upstream=\"app\",server=\"{}\"}}", backend.addr);
    let scraped = wait_for(&proxy, &format!("wsgate_upstream_server_connections{live}"), 1.0).await;
    assert_eq!(
        value(&scraped, &format!("wsgate_upstream_server_up{live}")),
        Some(1.0),
        "{scraped}"
    );
    let drained = format!("{{upstream=\"app\",server=\"{down}\"}}");
    assert_eq!(
        value(&scraped, &format!("wsgate_upstream_server_draining{drained}")),
        Some(1.0),
        "{scraped}"
    );
    assert_eq!(
        value(&scraped, &format!("wsgate_upstream_server_ejected{live}")),
        Some(0.0),
        "{scraped}"
    );
    assert!(
        value(&scraped, "wsgate_process_open_fds").is_some_and(|n| n > 2.0),
        "{scraped}"
    );
    assert!(
        value(&scraped, "wsgate_process_resident_memory_bytes").is_some_and(|n| n > 1e6),
        "{scraped}"
    );
    assert!(
        value(&scraped, "wsgate_process_cpu_seconds_total").is_some(),
        "{scraped}"
    );
    for dropped in [
        "wsgate_access_log_lines_dropped_total",
        "wsgate_otlp_spans_dropped_total",
    ] {
        assert_eq!(value(&scraped, dropped), Some(0.0), "{scraped}");
    }
    assert!(
        !scraped.contains("# EOF"),
        "the text format has no end marker: {scraped}"
    );

    let request = "GET /metrics HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\nConnection: close\r\n\r\n";
    let open = raw_exchange(proxy.admin_addr(), request.as_bytes()).await;
    assert!(open.contains("application/openmetrics-text; version=1.0.0"), "{open}");
    assert!(open.trim_end().ends_with("# EOF"), "{open}");
}

/// How long a real Prometheus gets to start and scrape (it scrapes every second here).
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_real_prometheus_scrapes_the_active_session_count() {
    assert!(
        std::path::Path::new("/usr/bin/prometheus").is_file(),
        "Prometheus is not installed (Debian package `prometheus`). Run scripts/test, which installs it."
    );
    let backend = ws_backend("b").await;
    let proxy = Proxy::from_toml(&config(backend.addr, ""));
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(connect(&proxy.url("/ws")).await);
    }
    wait_for(
        &proxy,
        &format!(
            "wsgate_sessions_active{{listener=\"public\",route=\"echo\",upstream=\"app\",server=\"{}\"}}",
            backend.addr
        ),
        3.0,
    )
    .await;
    let dir = support::peers::unique_temp_dir("prometheus");
    let config_file = dir.join("prometheus.yml");
    std::fs::write(
        &config_file,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: wsgate\n    static_configs:\n      - targets: [\"{}\"]\n",
            proxy.admin_addr()
        ),
    )
    .expect("write the scrape config");
    let web = unused_addr();
    let _prometheus = tokio::process::Command::new("/usr/bin/prometheus")
        .arg(format!("--config.file={}", config_file.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus");
    let query = format!(
        "GET /api/v1/query?query=sum(wsgate_sessions_active) HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
    );
    let started = tokio::time::Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(web)).await
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.write_all(query.as_bytes()).await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
            last = String::from_utf8_lossy(&answer).into_owned();
            let body = last.split("\r\n\r\n").nth(1).unwrap_or("");
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(body)
                && json["data"]["result"][0]["value"][1] == "3"
            {
                break;
            }
        }
        assert!(
            started.elapsed() < PROMETHEUS_WAIT,
            "Prometheus never reported 3 active sessions within {PROMETHEUS_WAIT:?}; last answer:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(sessions);
}

#[tokio::test]
async fn a_server_tried_again_counts_as_a_retry() {
    let backend = ws_backend("b").await;
    let dead = unused_addr();
    let proxy = Proxy::from_toml(&config_with_server_before(backend.addr, dead, ""));
    // Round robin: one of two handshakes goes to the dead server first, and on to the live one.
    for _ in 0..2 {
        let mut ws = connect(&proxy.url("/ws")).await;
        assert_eq!(backend_name(&mut ws).await, "b");
    }
    let scraped = scrape(&proxy, None).await;
    assert!(
        value(&scraped, "wsgate_retries_total").is_some_and(|n| n >= 1.0),
        "{scraped}"
    );
}

#[test]
fn the_alert_rules_pass_promtool_and_name_only_metrics_wsgate_has() {
    assert!(
        std::path::Path::new("/usr/bin/promtool").is_file(),
        "promtool is not installed (Debian package `prometheus`). Run scripts/test, which installs it."
    );
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let out = std::process::Command::new("/usr/bin/promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(out.status.success(), "{}{}", text_of(&out.stdout), text_of(&out.stderr));
    let docs = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/observability.md"))
        .expect("docs");
    let text = std::fs::read_to_string(&rules).expect("rules");
    for name in text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("wsgate_"))
    {
        assert!(
            docs.contains(&format!("`{name}`")),
            "{name} is in the alert rules but not in docs/observability.md"
        );
    }
}

#[test]
fn the_grafana_dashboard_queries_are_valid_promql_on_metrics_wsgate_has() {
    assert!(
        std::path::Path::new("/usr/bin/promtool").is_file(),
        "promtool is not installed (Debian package `prometheus`). Run scripts/test, which installs it."
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("deploy/grafana/wsgate.json")).expect("dashboard"))
            .expect("the dashboard is JSON");
    let docs = std::fs::read_to_string(root.join("docs/observability.md")).expect("docs");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("an expr").to_string());
        }
    }
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    // Each query as a recording rule, Grafana's variables replaced, for promtool to parse.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("wsgate_"))
        {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                docs.contains(&format!("`{family}`")),
                "{family} is in the dashboard but not in docs/observability.md"
            );
        }
        let promql = expr.replace("$__rate_interval", "5m").replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&promql).expect("quote")
        ));
    }
    let dir = support::peers::unique_temp_dir("dashboard");
    let file = dir.join("queries.yml");
    std::fs::write(&file, rules).expect("write");
    let out = std::process::Command::new("/usr/bin/promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(out.status.success(), "{}{}", text_of(&out.stdout), text_of(&out.stderr));
}

#[tokio::test]
async fn an_ejection_is_counted_per_server() {
    let backend = ws_backend("b").await;
    let dead = unused_addr();
    let text = config(backend.addr, "").replace(
        "[[upstream.server]]",
        &format!("[[upstream.server]]\naddress = \"{dead}\"\n[[upstream.server]]"),
    );
    let proxy = Proxy::from_toml(&text);
    let series = format!("wsgate_upstream_server_ejections_total{{upstream=\"app\",server=\"{dead}\"}}");
    assert_eq!(value(&scrape(&proxy, None).await, &series), Some(0.0));
    // Retries hide the dead server from clients; its failures in a row (5 by default) eject it.
    let mut scraped = String::new();
    for _ in 0..40 {
        let mut ws = connect(&proxy.url("/ws")).await;
        ws.send(Message::text("x")).await.expect("send");
        assert_eq!(next_text(&mut ws).await, "x");
        scraped = scrape(&proxy, None).await;
        if value(&scraped, &series) == Some(1.0) {
            break;
        }
    }
    assert_eq!(value(&scraped, &series), Some(1.0), "{scraped}");
    assert_eq!(
        value(
            &scraped,
            &format!("wsgate_upstream_server_ejected{{upstream=\"app\",server=\"{dead}\"}}")
        ),
        Some(1.0),
        "{scraped}"
    );
    assert!(
        value(&scraped, "wsgate_retries_total").is_some_and(|n| n >= 5.0),
        "{scraped}"
    );
}
