//! The LLM gateway's keys, limits and usage in a real Redis (`[llm] database = "redis://…"`), shared by three
//! wsgate instances in front of the OpenAI-compatible stand-in: a key issued on one works on all, its limits count
//! the requests of all, usage read on any shows all, a revocation anywhere stops it everywhere at once; Redis
//! killed and restarted mid-test; and `wsgate llm-key` on a Redis database.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use support::binary::Binary;
use support::gateway_http::{Answer, request};
use support::openai_standin::Standin;
use support::redis::RedisServer;
use support::{Proxy, TempDir, within};

const PROVIDER_KEY: &str = "sk-provider-secret-redis";
/// Tokens the stand-in streams per request.
const COMPLETION: u64 = 5;

/// A config for one instance: the stand-in as the provider, `tiny` priced at 1 and 2 per million tokens, the keys
/// in `redis`, an admin listener.
fn config(dir: &TempDir, redis: &str, standin: &Standin) -> String {
    let key_file = dir.join("provider.key");
    std::fs::write(&key_file, format!("{PROVIDER_KEY}\n")).unwrap();
    format!(
        r#"
[[listener]]
name = "main"
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[llm]
database = "{redis}"

[[llm.provider]]
name = "stand-in"
kind = "openai"
base_url = "{}"
api_key_file = "{}"
models = ["tiny"]

[[llm.price]]
model = "tiny"
input = 1.0
output = 2.0

[[route]]
path_prefix = "/v1"
kind = "llm"
"#,
        standin.base_url(),
        key_file.display()
    )
}

const PROMPT: &str = "Say something, please.";

fn chat() -> Vec<u8> {
    json!({"model": "tiny", "messages": [{"role": "user", "content": PROMPT}]})
        .to_string()
        .into_bytes()
}

/// The prompt tokens the stand-in reports for [`chat`].
fn prompt_tokens() -> u64 {
    Standin::prompt_tokens(&json!({"messages": [{"content": PROMPT}]}))
}

async fn ask(instance: &Proxy, key: &str) -> Answer {
    request(instance.addr, "POST", "/v1/chat/completions", Some(key), Some(&chat())).await
}

/// Issues a key through an instance's admin API: its id and secret.
async fn issue(instance: &Proxy, body: Value) -> (i64, String) {
    let answer = request(
        instance.admin_addr(),
        "POST",
        "/api/llm/keys",
        None,
        Some(body.to_string().as_bytes()),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let issued = answer.json();
    (
        issued["id"].as_i64().unwrap(),
        issued["key"].as_str().unwrap().to_string(),
    )
}

/// The usage rows of `key_id` as an instance's admin API reads them, once they count `requests` requests (usage
/// is written in batches).
async fn usage(instance: &Proxy, key_id: i64, requests: u64) -> Vec<Value> {
    within("the usage rows", async {
        loop {
            let answer = request(
                instance.admin_addr(),
                "GET",
                &format!("/api/llm/usage?key_id={key_id}"),
                None,
                None,
            )
            .await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            let rows = answer.json()["usage"].as_array().cloned().unwrap_or_default();
            if rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum::<u64>() >= requests {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn assert_refused(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.json()["error"]["code"], code, "{}", answer.body);
    assert!(
        !answer.body.contains("127.0.0.1"),
        "an address reached a client: {}",
        answer.body
    );
    assert!(!answer.body.contains(PROVIDER_KEY));
}

struct Fleet {
    redis: RedisServer,
    standin: Standin,
    instances: Vec<Proxy>,
    _dir: TempDir,
}

async fn fleet(name: &str, n: usize) -> Fleet {
    let redis = RedisServer::start(name).await;
    let standin = Standin::start(COMPLETION as usize).await;
    let dir = TempDir::new(&format!("llm-redis-{name}"));
    let text = config(&dir, &redis.url(), &standin);
    let instances = (0..n).map(|_| Proxy::from_toml(&text)).collect();
    Fleet {
        redis,
        standin,
        instances,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_keys_limits_usage_and_revocations() {
    let f = fleet("shared", 3).await;
    let [a, b, c] = &f.instances[..] else { unreachable!() };

    // Issued on A, it works on B and C; its limit of 4 requests a minute counts the requests of all three.
    let (id, key) = issue(a, json!({"owner": "team", "requests_per_minute": 4})).await;
    for instance in [b, c, a, b] {
        let answer = ask(instance, &key).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let refused = ask(c, &key).await;
    assert_refused(&refused, 429, "rate_limit_exceeded");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    assert_eq!(f.standin.requests().len(), 4, "a refused request reached the provider");

    // Usage read on C counts the requests of all three, with the provider's own figures.
    let rows = usage(c, id, 4).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["owner"], "team");
    assert_eq!(row["counted"], false);
    assert_eq!(row["requests"], 4);
    assert_eq!(row["prompt_tokens"], 4 * prompt_tokens());
    assert_eq!(row["completion_tokens"], 4 * COMPLETION);
    let cost = 4.0 * (prompt_tokens() as f64 + 2.0 * COMPLETION as f64) / 1e6;
    assert!((row["cost"].as_f64().unwrap() - cost).abs() < 1e-12, "{row}");

    // Listed on B; revoked on B, refused at once on A, which had it in its cache.
    let listed = request(b.admin_addr(), "GET", "/api/llm/keys", None, None).await.json();
    assert_eq!(listed["keys"][0]["id"], id);
    assert_eq!(listed["keys"][0]["requests_per_minute"], 4);
    let other = issue(b, json!({"owner": "other"})).await;
    assert_eq!(ask(a, &other.1).await.status, 200);
    let revoked = request(
        b.admin_addr(),
        "DELETE",
        &format!("/api/llm/keys/{}", other.0),
        None,
        None,
    )
    .await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert_refused(&ask(a, &other.1).await, 401, "revoked_api_key");
    assert_refused(&ask(c, &other.1).await, 401, "revoked_api_key");

    // Only hashes at rest: neither secret is anywhere in Redis, in a name or a value.
    let mut redis = f.redis.client();
    let names: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut redis).unwrap();
    let mut everything = names.join("\n");
    for name in &names {
        let kind: String = redis::cmd("TYPE").arg(name).query(&mut redis).unwrap();
        let values: Vec<String> = match kind.as_str() {
            "string" => vec![redis::cmd("GET").arg(name).query(&mut redis).unwrap()],
            "hash" => redis::cmd("HGETALL").arg(name).query(&mut redis).unwrap(),
            "set" => redis::cmd("SMEMBERS").arg(name).query(&mut redis).unwrap(),
            "zset" => redis::cmd("ZRANGE").arg(name).arg(0).arg(-1).query(&mut redis).unwrap(),
            other => panic!("{name} is a {other}"),
        };
        everything.push_str(&values.join("\n"));
    }
    for secret in [&key, &other.1] {
        assert!(!everything.contains(&secret[7..]), "a key's secret is stored in Redis");
    }
    assert!(everything.contains("wsgate:llm:by-hash:"), "{everything}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_day_and_budget_limits_hold_across_instances() {
    let f = fleet("tokens", 2).await;
    let [a, b] = &f.instances[..] else { unreachable!() };
    let per_request = prompt_tokens() + COMPLETION;
    let cost_per_request = (prompt_tokens() as f64 + 2.0 * COMPLETION as f64) / 1e6;

    // Each limit lets through the requests before it is reached (one may cross it), on either instance, and
    // refuses the next one on the other.
    let cases = [
        (
            json!({"owner": "tpm", "tokens_per_minute": 2 * per_request + 1}),
            3,
            "rate_limit_exceeded",
            "tokens per minute",
        ),
        (
            json!({"owner": "tpd", "tokens_per_day": per_request + 1}),
            2,
            "rate_limit_exceeded",
            "tokens per day",
        ),
        (
            json!({"owner": "budget", "budget": 1.5 * cost_per_request}),
            2,
            "insufficient_quota",
            "budget",
        ),
    ];
    for (limits, allowed, code, named) in cases {
        let (id, key) = issue(a, limits.clone()).await;
        for i in 0..allowed {
            let instance = if i % 2 == 0 { a } else { b };
            let answer = ask(instance, &key).await;
            assert_eq!(answer.status, 200, "{limits}: {}", answer.body);
            // The next request must see this one's tokens, which reach Redis with its usage row.
            usage(b, id, i + 1).await;
        }
        let last = if allowed % 2 == 0 { a } else { b };
        let refused = ask(last, &key).await;
        assert_refused(&refused, 429, code);
        // Waiting helps with a token limit (the minute moves on, the day ends), not with a spent budget.
        assert_eq!(
            refused.header("retry-after").is_some(),
            code == "rate_limit_exceeded",
            "{limits}"
        );
        let message = refused.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(named), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_a_quick_503_and_its_return_is_picked_up() {
    let mut f = fleet("down", 1).await;
    let a = &f.instances[0];
    let (_, key) = issue(a, json!({"owner": "team"})).await;
    assert_eq!(ask(a, &key).await.status, 200);

    f.redis.kill();
    // Known (cached) keys and unknown ones alike: 503 without waiting on the dead server.
    for secret in [key.as_str(), "sk-wsg-not-a-known-key"] {
        let started = Instant::now();
        let refused = ask(a, secret).await;
        assert_refused(&refused, 503, "keys_unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
    let admin = request(a.admin_addr(), "GET", "/api/llm/keys", None, None).await;
    assert_eq!(admin.status, 503, "{}", admin.body);
    assert!(!admin.body.contains("127.0.0.1"), "{}", admin.body);

    // Back on the same port with its data: the instance connects again by itself.
    f.redis.restart().await;
    within("the gateway to reach Redis again", async {
        loop {
            if ask(a, &key).await.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let key_id = request(a.admin_addr(), "GET", "/api/llm/keys", None, None).await.json()["keys"][0]["id"]
        .as_i64()
        .unwrap();
    usage(a, key_id, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_key_issues_lists_and_revokes_keys_in_redis_for_running_instances() {
    let f = fleet("cli", 1).await;
    let a = &f.instances[0];
    let dir = TempDir::new("llm-redis-cli-config");
    let path = dir.join("wsgate.toml");
    std::fs::write(&path, config(&dir, &f.redis.url(), &f.standin)).unwrap();
    let config = path.to_str().unwrap();

    let added = run(&[
        "llm-key",
        "add",
        "--config",
        config,
        "--owner",
        "ops",
        "--requests-per-minute",
        "9",
    ])
    .await;
    let key = added.trim().to_string();
    assert!(key.starts_with("sk-wsg-"), "{added}");
    assert_eq!(ask(a, &key).await.status, 200);

    let listed = run(&["llm-key", "list", "--config", config]).await;
    assert!(
        listed.contains("ops") && listed.contains(&key[key.len() - 4..]),
        "{listed}"
    );
    assert!(!listed.contains(&key[7..]), "list shows the secret");

    let id = listed
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    run(&["llm-key", "revoke", "--config", config, &id]).await;
    assert_refused(&ask(a, &key).await, 401, "revoked_api_key");

    // A Redis URL that is not one is named by `wsgate check`.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace(&f.redis.url(), "rediss://127.0.0.1:1/0"),
    )
    .unwrap();
    let mut check = Binary::spawn(["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(check.exit_code().await, Some(1));
    let log = check.rest_of_log().await.join("\n");
    assert!(log.contains("llm.database") && log.contains("TLS"), "{log}");
}

/// Runs `wsgate ARGS` to its end; its standard output, and stderr in the panic message when it fails.
async fn run(args: &[&str]) -> String {
    let args_owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = within(
        "wsgate llm-key",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
                .args(&args_owned)
                .output()
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        output.status.success(),
        "wsgate {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
