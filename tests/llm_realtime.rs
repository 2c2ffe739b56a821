//! Realtime passthrough (`/v1/realtime?model=…`) through the LLM gateway to a Realtime stand-in written here: the
//! session relayed both ways with the provider's key on the upstream handshake, `response.done` usage metered as it
//! passes, a key's token limit closing the session with 1008 mid-way, and refusals before any upgrade.

// tungstenite's handshake callback returns its own (large) error response type.
#![allow(clippy::result_large_err)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use support::{Client, Proxy, unused_addr, within};
use wsgate::llm::store::{NewKey, Store, UsageFilter};

const PROVIDER_KEY: &str = "sk-realtime-provider-99";

/// What the stand-in saw: each session's handshake (path and query, Authorization, OpenAI-Beta) and messages.
#[derive(Debug)]
enum Seen {
    Handshake {
        target: String,
        authorization: Option<String>,
        beta: Option<String>,
    },
    Message(Value),
    Closed(Option<u16>),
}

/// A Realtime provider: to `response.create` it answers two `response.output_text.delta` events and a
/// `response.done` with usage (10 input, 20 output tokens); anything else it echoes as `{"type": "echo"}`.
async fn realtime_standin() -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let seen = Arc::new(OnceLock::new());
                let seen2 = seen.clone();
                let callback = move |req: &Request, resp: Response| {
                    let header = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap_or("?").to_string());
                    let _ = seen2.set(Seen::Handshake {
                        target: req.uri().to_string(),
                        authorization: header("authorization"),
                        beta: header("openai-beta"),
                    });
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(socket, callback).await else {
                    return;
                };
                if let Some(h) = Arc::into_inner(seen).and_then(OnceLock::into_inner) {
                    let _ = tx.send(h);
                }
                while let Some(m) = ws.next().await {
                    match m {
                        Ok(Message::Text(t)) => {
                            let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                            let _ = tx.send(Seen::Message(v.clone()));
                            let replies = if v["type"] == "response.create" {
                                vec![
                                    json!({"type": "response.output_text.delta", "delta": "Hel"}),
                                    json!({"type": "response.output_text.delta", "delta": "lo"}),
                                    json!({"type": "response.done", "response": {"status": "completed",
                                        "usage": {"input_tokens": 10, "output_tokens": 20, "total_tokens": 30}}}),
                                ]
                            } else {
                                vec![json!({"type": "echo", "of": v})]
                            };
                            for r in replies {
                                if ws.send(Message::text(r.to_string())).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(Message::Close(frame)) => {
                            let _ = tx.send(Seen::Closed(frame.map(|f| u16::from(f.code))));
                            return;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            let _ = tx.send(Seen::Closed(None));
                            return;
                        }
                    }
                }
                let _ = tx.send(Seen::Closed(None));
            });
        }
    });
    (addr, rx)
}

struct Gateway {
    proxy: Proxy,
    db: PathBuf,
    _dir: support::TempDir,
}

fn gateway(name: &str, providers: &[SocketAddr]) -> Gateway {
    gateway_with(name, providers, "")
}

/// [`gateway`] with more keys of `[llm]`.
fn gateway_with(name: &str, providers: &[SocketAddr], llm: &str) -> Gateway {
    let dir = support::TempDir::new(&format!("llm-realtime-{name}"));
    std::fs::write(dir.join("p.key"), PROVIDER_KEY).unwrap();
    let db = dir.join("llm.db");
    // `llm` may name another database (Redis).
    let database = if llm.contains("database") {
        String::new()
    } else {
        format!("database = \"{}\"\n", db.display())
    };
    let mut text = format!(
        "[[listener]]\nname = \"main\"\naddress = \"127.0.0.1:0\"\n[llm]\n{database}{llm}\n\
         [[llm.price]]\nmodel = \"rt\"\ninput = 1.0\noutput = 1.0\n"
    );
    for (i, addr) in providers.iter().enumerate() {
        text.push_str(&format!(
            "[[llm.provider]]\nname = \"rt{i}\"\nkind = \"openai\"\nbase_url = \"http://{addr}/v1\"\n\
             api_key_file = \"{}\"\nmodels = [\"rt\"]\nconnect_timeout = \"1s\"\n",
            dir.join("p.key").display()
        ));
    }
    text.push_str("[[route]]\npath_prefix = \"/v1\"\nkind = \"llm\"\n");
    Gateway {
        proxy: Proxy::from_toml(&text),
        db,
        _dir: dir,
    }
}

fn issue(g: &Gateway, new: NewKey) -> String {
    Store::open(&g.db).unwrap().add_key(&new).unwrap().key
}

fn owner() -> NewKey {
    NewKey {
        owner: "rt".into(),
        ..NewKey::default()
    }
}

async fn open(g: &Gateway, key: &str, model: &str) -> Client {
    let mut request = g
        .proxy
        .url(&format!("/v1/realtime?model={model}"))
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    headers.insert("openai-beta", "realtime=v1".parse().unwrap());
    within("the upgrade", tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .0
}

async fn next_json(ws: &mut Client) -> Value {
    within("a message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a message, got {other:?}"),
            }
        }
    })
    .await
}

/// The close frame the client gets next (messages before it skipped).
async fn close_of(ws: &mut Client) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    within("the close", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("expected a close, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame")
}

async fn seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    within("the stand-in", rx.recv()).await.expect("the stand-in's report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_session_is_relayed_with_the_providers_key_and_its_usage_is_metered() {
    let (provider, mut rx) = realtime_standin().await;
    let g = gateway("relay", &[provider]);
    let key = issue(&g, owner());
    let mut ws = open(&g, &key, "rt").await;
    match seen(&mut rx).await {
        Seen::Handshake {
            target,
            authorization,
            beta,
        } => {
            assert_eq!(target, "/v1/realtime?model=rt");
            assert_eq!(authorization.as_deref(), Some(&*format!("Bearer {PROVIDER_KEY}")));
            assert_eq!(beta.as_deref(), Some("realtime=v1"));
        }
        other => panic!("{other:?}"),
    }
    ws.send(Message::text(
        json!({"type": "session.update", "session": {"voice": "x"}}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["of"]["type"], "session.update");
    match seen(&mut rx).await {
        Seen::Message(m) => assert_eq!(m["session"]["voice"], "x"),
        other => panic!("{other:?}"),
    }
    for _ in 0..2 {
        ws.send(Message::text(json!({"type": "response.create"}).to_string()))
            .await
            .unwrap();
        let mut text = String::new();
        loop {
            let m = next_json(&mut ws).await;
            match m["type"].as_str() {
                Some("response.output_text.delta") => text.push_str(m["delta"].as_str().unwrap()),
                Some("response.done") => break,
                _ => {}
            }
        }
        assert_eq!(text, "Hello");
    }
    let rows = within("the usage rows", async {
        loop {
            let rows = Store::open(&g.db).unwrap().usage(&UsageFilter::default()).unwrap();
            if rows.first().is_some_and(|r| r.requests == 2) {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (20, 40));
    assert!((rows[0].cost - 60.0 / 1e6).abs() < 1e-12);
    ws.close(None).await.unwrap();
    // The client's close reaches the provider.
    loop {
        if let Seen::Closed(code) = seen(&mut rx).await {
            assert_eq!(code, None, "a close without a code passes as one");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_reaches_its_token_limit_mid_session_is_closed_with_1008() {
    let (provider, rx) = realtime_standin().await;
    let g = gateway("limit", &[provider]);
    let key = issue(
        &g,
        NewKey {
            tokens_per_day: Some(50),
            ..owner()
        },
    );
    closed_at_the_limit(&g, &key, rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_in_redis_the_limit_counts_the_response_that_crosses_it() {
    let redis = support::redis::RedisServer::start("realtime").await;
    let (provider, rx) = realtime_standin().await;
    let g = gateway_with("limit-redis", &[provider], &format!("database = \"{}\"", redis.url()));
    let db = wsgate::llm::Gateway::open_db(&wsgate::config::llm::LlmDatabase::Redis(redis.url())).unwrap();
    let key = db
        .add_key(NewKey {
            tokens_per_day: Some(50),
            ..owner()
        })
        .await
        .unwrap()
        .key;
    drop(db);
    closed_at_the_limit(&g, &key, rx).await;
}

/// Two responses of 30 tokens on a key with a limit of 50 tokens a day: the first goes through, the second
/// crosses the limit and the session is closed with 1008 after its events; the provider is told the client is
/// going away, and the next session is refused before it opens.
async fn closed_at_the_limit(g: &Gateway, key: &str, mut rx: mpsc::UnboundedReceiver<Seen>) {
    let mut ws = open(g, key, "rt").await;
    for round in 0..2 {
        ws.send(Message::text(json!({"type": "response.create"}).to_string()))
            .await
            .unwrap();
        loop {
            if next_json(&mut ws).await["type"] == "response.done" {
                break;
            }
        }
        if round == 0 {
            continue;
        }
        let close = close_of(&mut ws).await;
        assert_eq!(close.code, CloseCode::Policy);
        assert!(close.reason.contains("tokens per day"), "{}", close.reason);
    }
    // The provider did nothing wrong: it is told the client is going away.
    loop {
        if let Seen::Closed(code) = seen(&mut rx).await {
            assert_eq!(code, Some(1001));
            break;
        }
    }
    let refused = tokio_tungstenite::connect_async(g.proxy.url(&format!("/v1/realtime?model=rt&api_key={key}"))).await;
    assert!(matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 429));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_upgrades_are_refused_before_the_switch_and_fail_over_to_the_next_provider() {
    let (provider, _rx) = realtime_standin().await;
    let g = gateway("refused", &[unused_addr(), provider]);
    let key = issue(&g, owner());
    let status = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Ok(_) => 101,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        status(tokio_tungstenite::connect_async(g.proxy.url("/v1/realtime?model=rt")).await),
        401
    );
    let url = g.proxy.url(&format!("/v1/realtime?api_key={key}"));
    assert_eq!(status(tokio_tungstenite::connect_async(url).await), 400);
    let url = g.proxy.url(&format!("/v1/realtime?model=nope&api_key={key}"));
    assert_eq!(status(tokio_tungstenite::connect_async(url).await), 404);
    // The first provider is down: the second serves the session.
    let mut ws = open(&g, &key, "rt").await;
    ws.send(Message::text(json!({"type": "ping-me"}).to_string()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "echo");
    // No provider at all: 502 before any upgrade.
    let g2 = gateway("down", &[unused_addr()]);
    let key2 = issue(&g2, owner());
    let url = g2.proxy.url(&format!("/v1/realtime?model=rt&api_key={key2}"));
    assert_eq!(status(tokio_tungstenite::connect_async(url).await), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_is_kept_alive_with_pings_and_a_shutdown_closes_both_sides_with_1001() {
    let (provider, mut rx) = realtime_standin().await;
    let g = gateway_with("pings", &[provider], "ping_interval = \"200ms\"");
    let key = issue(&g, owner());
    let mut ws = open(&g, &key, "rt").await;
    assert!(matches!(seen(&mut rx).await, Seen::Handshake { .. }));
    // The model says nothing: wsgate pings the client (whose pongs keep the session open), more than once.
    let mut pings = 0;
    within("two pings", async {
        while pings < 2 {
            match ws.next().await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("expected a ping, got {other:?}"),
            }
        }
    })
    .await;
    ws.send(Message::text(json!({"type": "session.update"}).to_string()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "echo");

    let Gateway { proxy, db: _db, _dir } = g;
    let stopping = tokio::task::spawn_blocking(move || proxy.shutdown_and_join());
    let close = close_of(&mut ws).await;
    assert_eq!(close.code, CloseCode::Away);
    loop {
        match seen(&mut rx).await {
            Seen::Closed(code) => {
                assert_eq!(code, Some(1001));
                break;
            }
            Seen::Message(_) => {}
            other => panic!("{other:?}"),
        }
    }
    drop(ws);
    within("the shutdown", stopping).await.unwrap();
}
