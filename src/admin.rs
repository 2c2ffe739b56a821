//! The admin listener (`[admin]`): `GET /metrics` in the Prometheus text format, on an address of its own, on a
//! thread of its own so that a scrape never waits behind the proxy's sessions (and theirs never behind a scrape).
//!
//! With a token (`token_file`), every POST needs `Authorization: Bearer TOKEN`, and GETs too with `protect_reads`;
//! the token is compared in constant time. A wrong or missing token gets 401 and a log line. Answers other than the
//! metrics are JSON: `{"error": "..."}`. The admin listener's own connections are not sessions: they count in no
//! session metric.

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

/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
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
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (settings, shared, stop) = (settings.clone(), shared.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handle(&settings, &shared, peer, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn handle(
    settings: &AdminSettings,
    shared: &Shared,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let needs_token = settings.token.is_some() && (req.method() != Method::GET || settings.protect_reads);
    if needs_token && !authorized(settings, req) {
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
        _ => json(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
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

fn json(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut answer = Response::new(Full::new(Bytes::from(body)));
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    answer
}
