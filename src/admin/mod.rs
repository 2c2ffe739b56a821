//! The admin listener (`[admin]`): `GET /metrics` in the Prometheus text format, `GET /api/upstreams`,
//! `POST /api/servers/{upstream}/{server}/drain` / `undrain`, `POST /api/reload`, `GET /api/connections`,
//! `POST /api/connections/{id}/close`, `GET /api/config`, and the live stats page `GET /stats` with its WebSocket
//! `GET /stats/ws` (`stats.rs`), on an address of its own, on a thread of its own so that a scrape never waits behind
//! the proxy's sessions (and theirs never behind a scrape).
//!
//! With a token (`token_file`), every request needs `Authorization: Bearer TOKEN` but the reads of `GET /metrics` and
//! the stats page, which need it too only with `protect_reads` (the stats page also takes it as `?token=`, which is
//! all a browser's WebSocket can send); the token is compared
//! in constant time. A wrong or missing token gets 401 and a log line. Answers other than the metrics and the stats
//! page are JSON: `{"error": "..."}`. The admin listener's own connections (the stats page's WebSocket included) are
//! not sessions: they count in no session metric.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AdminSettings;
use crate::state::Shared;

mod llm;
mod sessions;
mod stats;

/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long an admin client gets to send a request head.
const ADMIN_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// OpenMetrics, for a scraper that asks for it (Prometheus does).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running admin listener.
pub struct Admin {
    pub address: SocketAddr,
    stop: CancellationToken,
    thread: JoinHandle<()>,
}

impl Admin {
    /// Binds `settings.address` (failing at once if it cannot) and serves it on a thread of its own.
    pub fn start(settings: AdminSettings, shared: Arc<Shared>) -> std::io::Result<Admin> {
        let listener = std::net::TcpListener::bind(settings.address)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new().name("wsgate-admin".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the admin runtime: no /metrics");
                    return;
                }
            };
            runtime.block_on(serve(listener, Arc::new(settings), shared, token));
        })?;
        tracing::info!(address = %address, "admin listening");
        Ok(Admin { address, stop, thread })
    }

    /// Stops serving and waits for the thread.
    pub fn stop(self) {
        self.stop.cancel();
        let _ = self.thread.join();
    }
}

async fn serve(
    listener: std::net::TcpListener,
    settings: Arc<AdminSettings>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the admin listener");
            return;
        }
    };
    let stats = Arc::new(stats::StatsSockets::new(stop.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return stats.closed().await,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (settings, shared, stop, stats) = (settings.clone(), shared.clone(), stop.clone(), stats.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (settings, shared, stats) = (settings.clone(), shared.clone(), stats.clone());
                async move { Ok::<_, Infallible>(handle(&settings, &shared, &stats, peer, req).await) }
            });
            // A client that never finishes its request head is dropped: the admin listener is no place to hold sockets.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn handle(
    settings: &AdminSettings,
    shared: &Arc<Shared>,
    stats: &stats::StatsSockets,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    // With a token, only the metrics and the stats page are read without it (unless `protect_reads`): the API's
    // reads show clients, identities and backend addresses.
    let open_read = req.method() == Method::GET
        && !settings.protect_reads
        && matches!(req.uri().path(), "/metrics" | "/stats" | "/stats/ws");
    let needs_token = settings.token.is_some() && !open_read;
    if needs_token && !authorized(settings, &req) && !stats::authorized_by_query(settings, &req) {
        tracing::warn!(client = %peer, method = %req.method(), path = req.uri().path(), "admin request without the right token");
        let mut answer = json(StatusCode::UNAUTHORIZED, "a valid admin token is needed");
        answer.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"wsgate-admin\""),
        );
        return answer;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .any(|v| contains(v.as_bytes(), b"application/openmetrics-text"));
            let mut text = shared.metrics.encode();
            if !openmetrics && text.ends_with("# EOF\n") {
                // The end marker is OpenMetrics's; the older text format has none.
                text.truncate(text.len() - "# EOF\n".len());
            }
            let mut answer = Response::new(Full::new(Bytes::from(text)));
            let content_type = if openmetrics { OPENMETRICS } else { PROMETHEUS_TEXT };
            answer
                .headers_mut()
                .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
            answer
        }
        (_, "/metrics") => json(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (&Method::GET, "/stats") => stats::page_answer(),
        (&Method::GET, "/stats/ws") => stats::upgrade(shared, stats, peer, req),
        (_, "/stats" | "/stats/ws") => json(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (&Method::GET, "/api/upstreams") => answer(StatusCode::OK, upstreams(shared)),
        (&Method::GET, "/api/connections") => {
            let (status, body) = sessions::list(shared, req.uri().query());
            answer(status, body)
        }
        (&Method::GET, "/api/config") => {
            let (status, body) = sessions::config(shared);
            answer(status, body)
        }
        (_, "/api/upstreams" | "/api/connections" | "/api/config") => json(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (method, path) if path.starts_with("/api/connections/") => {
            let Some(id) = path.trim_start_matches("/api/connections/").strip_suffix("/close") else {
                return json(StatusCode::NOT_FOUND, "expected /api/connections/{id}/close");
            };
            if method != Method::POST {
                return json(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            let id = id.to_string();
            let body = match read_body(req).await {
                Ok(body) => body,
                Err(answer) => return answer,
            };
            let (status, body) = sessions::close(shared, &id, &body);
            if status == StatusCode::ACCEPTED {
                tracing::info!(client = %peer, connection = %id, "admin API: connection closed");
            }
            answer(status, body)
        }
        (&Method::GET, "/api/llm/keys") => {
            let (status, body) = llm::list_keys(shared).await;
            answer(status, body)
        }
        (&Method::POST, "/api/llm/keys") => {
            let body = match read_body(req).await {
                Ok(body) => body,
                Err(answer) => return answer,
            };
            let (status, body) = llm::add_key(shared, &body).await;
            if status == StatusCode::CREATED {
                tracing::info!(client = %peer, key = %body["id"], owner = %body["owner"], "admin API: LLM key issued");
            }
            answer(status, body)
        }
        (_, "/api/llm/keys") => json(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST"),
        (method, path) if path.starts_with("/api/llm/keys/") => {
            if method != Method::DELETE {
                return json(StatusCode::METHOD_NOT_ALLOWED, "use DELETE");
            }
            let id = path.trim_start_matches("/api/llm/keys/");
            let (status, body) = llm::revoke_key(shared, id).await;
            if status == StatusCode::OK {
                tracing::info!(client = %peer, key = id, "admin API: LLM key revoked");
            }
            answer(status, body)
        }
        (&Method::GET, "/api/llm/usage") => {
            let (status, body) = llm::usage(shared, req.uri().query()).await;
            answer(status, body)
        }
        (_, "/api/llm/usage") => json(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (&Method::GET, "/api/cluster") => {
            let (status, body) = cluster(shared).await;
            answer(status, body)
        }
        (_, "/api/cluster") => json(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (&Method::POST, "/api/reload") => reload(shared, peer).await,
        (_, "/api/reload") => json(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (method, path) if path.starts_with("/api/servers/") => {
            if method != Method::POST {
                return json(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            drain(shared, peer, path)
        }
        _ => json(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

/// The largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// A request's body, up to [`MAX_BODY`] bytes (a larger one gets 413), read within the head timeout.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(ADMIN_HEAD_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(json(StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large"))
        }
        Ok(Err(_)) => Err(json(StatusCode::BAD_REQUEST, "the request body could not be read")),
        Err(_) => Err(json(StatusCode::REQUEST_TIMEOUT, "the request body took too long")),
    }
}

/// How long `POST /api/reload` waits for the reload's result.
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST /api/reload`: the config file is loaded again, as on SIGHUP; the answer says what is in force now, or
/// what is wrong with the file (`400`, the running config staying in force).
async fn reload(shared: &Shared, peer: SocketAddr) -> Response<Full<Bytes>> {
    tracing::info!(client = %peer, "admin API: reload asked for");
    let (reply, result) = tokio::sync::oneshot::channel();
    if shared.reloads.send(reply).is_err() {
        return json(StatusCode::SERVICE_UNAVAILABLE, "reloads are not served");
    }
    match tokio::time::timeout(RELOAD_WAIT, result).await {
        Ok(Ok(Ok(summary))) => answer(StatusCode::OK, serde_json::json!({ "reloaded": summary })),
        Ok(Ok(Err(problems))) => answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({
                "error": "the config file was refused: the running config stays in force",
                "problems": problems,
            }),
        ),
        Ok(Err(_)) => json(StatusCode::SERVICE_UNAVAILABLE, "reloads are not served"),
        Err(_) => json(StatusCode::GATEWAY_TIMEOUT, "the reload did not finish in time"),
    }
}

/// `GET /api/upstreams`: every upstream of the config in force with its servers' state.
fn upstreams(shared: &Shared) -> serde_json::Value {
    let snapshot = shared.snapshot.load();
    let now = crate::upstream::now_ms();
    let list: Vec<serde_json::Value> = snapshot
        .upstreams
        .iter()
        .map(|u| {
            let servers: Vec<serde_json::Value> = u
                .servers()
                .iter()
                .zip(&u.config.servers)
                .map(|(state, config)| {
                    serde_json::json!({
                        "server": state.name,
                        "address": state.address.to_string(),
                        "up": !state.is_down(),
                        "ejected": state.is_ejected(now),
                        "draining": state.draining(config),
                        "backup": config.backup,
                        "weight": config.weight,
                        "connections": state.active(),
                        "sessions": state.sessions(),
                    })
                })
                .collect();
            serde_json::json!({ "name": u.config.name, "servers": servers })
        })
        .collect();
    serde_json::json!({ "upstreams": list })
}

/// `POST /api/servers/{upstream}/{server}/drain` or `/undrain`: the server (named as in the config; percent-encoded
/// where it must be, as `%5B::1%5D:9000`) goes into drain, its sessions closed at the upstream's `drain_rate` with
/// 1012 in frames mode, or comes back.
fn drain(shared: &Shared, peer: SocketAddr, path: &str) -> Response<Full<Bytes>> {
    let parts: Vec<&str> = path.trim_start_matches("/api/servers/").split('/').collect();
    let [upstream_name, server_name, action] = parts[..] else {
        return json(
            StatusCode::NOT_FOUND,
            "expected /api/servers/{upstream}/{server}/drain or /undrain",
        );
    };
    let drain = match action {
        "drain" => true,
        "undrain" => false,
        _ => return json(StatusCode::NOT_FOUND, "expected .../drain or .../undrain"),
    };
    let (Some(upstream_name), Some(server_name)) = (percent_decoded(upstream_name), percent_decoded(server_name))
    else {
        return json(StatusCode::BAD_REQUEST, "malformed percent-encoding in the path");
    };
    let snapshot = shared.snapshot.load();
    let Some(upstream) = snapshot.upstreams.iter().find(|u| u.config.name == upstream_name) else {
        return json(StatusCode::NOT_FOUND, &format!("no upstream `{upstream_name}`"));
    };
    let Some((state, config)) = upstream
        .servers()
        .iter()
        .zip(&upstream.config.servers)
        .find(|(s, _)| s.name == server_name)
    else {
        return json(
            StatusCode::NOT_FOUND,
            &format!("upstream `{upstream_name}` has no server `{server_name}`"),
        );
    };
    let changed = state.set_admin_drain(drain);
    tracing::info!(
        client = %peer,
        upstream = %upstream_name,
        server = %server_name,
        changed,
        "admin API: server {}", if drain { "put in drain" } else { "taken out of drain" }
    );
    answer(
        StatusCode::OK,
        serde_json::json!({
            "upstream": upstream_name,
            "server": server_name,
            "draining": state.draining(config),
            "changed": changed,
        }),
    )
}

/// A path segment with its `%XX` escapes decoded; `None` when one is malformed or the result is not UTF-8.
fn percent_decoded(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `GET /api/cluster`: every instance that shares this one's Redis (`[cluster] redis`), with its live connections
/// and sessions as it last reported them (every 2 s), the totals and each instance's even share; without Redis,
/// this instance alone.
async fn cluster(shared: &Shared) -> (StatusCode, serde_json::Value) {
    let local = serde_json::json!({
        "instance": shared.snapshot.load().config.cluster.as_ref().map(|c| c.instance.clone()),
        "connections": shared.admission.total(),
        "sessions": shared.sessions.len(),
    });
    let Some(limits) = shared.cluster.limits() else {
        return (
            StatusCode::OK,
            serde_json::json!({ "shared": false, "this": local, "instances": [local] }),
        );
    };
    let fleet = match limits.fleet().await {
        Ok(fleet) => fleet,
        Err(e) => {
            tracing::warn!("admin API: /api/cluster: {e}");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": "Redis does not answer", "this": local }),
            );
        }
    };
    let total = |what: &str| fleet.iter().filter_map(|i| i[what].as_u64()).sum::<u64>();
    let (connections, sessions) = (total("connections"), total("sessions"));
    let share = if fleet.is_empty() {
        0.0
    } else {
        sessions as f64 / fleet.len() as f64
    };
    (
        StatusCode::OK,
        serde_json::json!({
            "shared": true,
            "this": local,
            "instances": fleet,
            "total": { "instances": fleet.len(), "connections": connections, "sessions": sessions },
            "even_share": share,
        }),
    )
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut answer = Response::new(Full::new(Bytes::from(body.to_string())));
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    answer
}

/// Whether `hay` holds `needle`, ASCII case aside.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// Whether the request carries the admin token as a bearer token.
fn authorized(settings: &AdminSettings, req: &Request<Incoming>) -> bool {
    let Some(token) = &settings.token else {
        return true;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    presented.len() == token.len() && bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
}

/// An error answer: `{"error": MESSAGE}`.
fn json(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    answer(status, serde_json::json!({ "error": message }))
}
