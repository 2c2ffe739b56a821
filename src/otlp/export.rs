//! The exporter: a thread of its own (`wsgate-otlp`, a single-threaded runtime, apart from the workers) started
//! with the first config that has `[tracing]`. It takes spans off the queue in batches of up to [`MAX_BATCH`] or
//! every [`BATCH_WAIT`], whichever comes first, and POSTs each batch to the endpoint on one kept-alive HTTP/1.1
//! connection, within [`POST_TIMEOUT`]. A failed batch is tried once more on a new connection (not after a 4xx
//! other than 408 and 429, which another try would get again), then dropped. Failures and spans dropped for a full
//! queue are logged at most every [`REPORT_EVERY`].
//!
//! Reload: a changed `[tracing]` first sends what is queued at that moment to the old endpoint, then uses the new
//! one; with `[tracing]` removed, spans still coming from sessions of the old config are dropped.
//! Shutdown: [`Exporter::stop`] (after the workers have finished, so every session's span is queued) sends what is
//! left within [`FLUSH_BOUND`]; whatever is not sent by then is dropped.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::Receiving;
use super::span::{Span, encode};
use crate::config::TracingSettings;
use crate::conn::Conn;

/// The most spans one request carries.
pub const MAX_BATCH: usize = 512;
/// The longest a span waits for its batch to fill.
pub const BATCH_WAIT: Duration = Duration::from_secs(1);
/// The time one export request may take, connection included.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the exporter may take at shutdown to send what is left.
pub const FLUSH_BOUND: Duration = Duration::from_secs(2);
/// Failures and drops are logged at most this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// The most of a collector's answer read (and dropped) so that its connection can be used again.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

type Settings = Option<Arc<TracingSettings>>;

/// The handle on the exporter thread, held by the server; the thread starts with the first `[tracing]`.
pub(crate) struct Exporter {
    /// The queue's far end until the thread starts.
    waiting: Option<Receiving>,
    running: Option<Thread>,
}

struct Thread {
    settings: watch::Sender<Settings>,
    stop: CancellationToken,
    thread: JoinHandle<()>,
}

impl Exporter {
    pub(crate) fn new(receiving: Receiving) -> Exporter {
        Exporter {
            waiting: Some(receiving),
            running: None,
        }
    }

    /// Follows a config's `[tracing]`: starts the thread for the first one, hands later changes to it. Fails only
    /// when the thread cannot be started (nothing has changed then).
    pub(crate) fn apply(&mut self, tracing: Option<&TracingSettings>) -> io::Result<()> {
        if let Some(running) = &self.running {
            running.settings.send_if_modified(|current| {
                let changed = current.as_deref() != tracing;
                if changed {
                    match tracing {
                        Some(t) => tracing::info!(endpoint = %t.endpoint, "OTLP export settings changed"),
                        None => tracing::info!("`[tracing]` removed: no more spans are exported"),
                    }
                    *current = tracing.cloned().map(Arc::new);
                }
                changed
            });
            return Ok(());
        }
        let (Some(tracing), Some(_)) = (tracing, &self.waiting) else {
            return Ok(());
        };
        let (settings, settings_rx) = watch::channel(Some(Arc::new(tracing.clone())));
        let stop = CancellationToken::new();
        let token = stop.clone();
        // The queue goes to the thread once it runs, so that a thread that cannot start leaves it here.
        let (handover, taken) = oneshot::channel::<Receiving>();
        let thread = std::thread::Builder::new().name("wsgate-otlp".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the OTLP exporter's runtime: no spans are exported");
                    return;
                }
            };
            runtime.block_on(async move {
                if let Ok(receiving) = taken.await {
                    run(receiving, settings_rx, token).await;
                }
            });
        })?;
        if let Some(receiving) = self.waiting.take() {
            let _ = handover.send(receiving);
        }
        tracing::info!(endpoint = %tracing.endpoint, "exporting spans by OTLP/HTTP");
        self.running = Some(Thread { settings, stop, thread });
        Ok(())
    }

    /// Sends what is queued (within [`FLUSH_BOUND`]) and waits for the thread.
    pub(crate) fn stop(self) {
        if let Some(running) = self.running {
            running.stop.cancel();
            let _ = running.thread.join();
        }
    }
}

/// The exporter's loop, until `stop` (or the server is gone); then what is left is sent within [`FLUSH_BOUND`].
async fn run(mut receiving: Receiving, mut settings: watch::Receiver<Settings>, stop: CancellationToken) {
    let mut client = Client::new(settings.borrow_and_update().clone());
    let mut report = Report::default();
    let mut batch: Vec<Span> = Vec::with_capacity(MAX_BATCH);
    let mut due: Option<Instant> = None;
    let mut tick = tokio::time::interval_at(Instant::now() + REPORT_EVERY, REPORT_EVERY);
    loop {
        let room = MAX_BATCH - batch.len();
        let send_now = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            changed = settings.changed() => {
                if changed.is_err() {
                    break;
                }
                let new = settings.borrow_and_update().clone();
                // What was queued under the old settings goes to the old endpoint.
                while batch.len() < MAX_BATCH * 4 && let Ok(span) = receiving.spans.try_recv() {
                    batch.push(span);
                }
                for chunk in batch.chunks(MAX_BATCH) {
                    tokio::select! {
                        () = client.export(chunk, &mut report) => {}
                        () = stop.cancelled() => break,
                    }
                }
                batch.clear();
                due = None;
                client = Client::new(new);
                false
            }
            received = receiving.spans.recv_many(&mut batch, room) => {
                if received == 0 {
                    break;
                }
                due.get_or_insert_with(|| Instant::now() + BATCH_WAIT);
                batch.len() >= MAX_BATCH
            }
            () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => true,
            _ = tick.tick() => {
                report.queue_full(receiving.dropped.swap(0, Ordering::Relaxed));
                report.tick(client.endpoint());
                false
            }
        };
        if send_now {
            tokio::select! {
                () = client.export(&batch, &mut report) => {}
                // The batch is kept for the last flush.
                () = stop.cancelled() => break,
            }
            batch.clear();
            due = None;
        }
    }
    let last = async {
        loop {
            while batch.len() < MAX_BATCH
                && let Ok(span) = receiving.spans.try_recv()
            {
                batch.push(span);
            }
            if batch.is_empty() {
                return;
            }
            client.export(&batch, &mut report).await;
            batch.clear();
        }
    };
    if timeout(FLUSH_BOUND, last).await.is_err() {
        tracing::warn!("OTLP export: spans still queued at shutdown were dropped (not sent within {FLUSH_BOUND:?})");
    }
    report.queue_full(receiving.dropped.swap(0, Ordering::Relaxed));
    report.flush(client.endpoint());
}

/// Why an export request failed.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("timed out after {POST_TIMEOUT:?}")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("cannot build the request: {0}")]
    Request(#[from] http::Error),
}

impl ExportError {
    /// Whether the same request may succeed when tried again.
    fn retry(&self) -> bool {
        match self {
            ExportError::Status(status) if status.is_client_error() => {
                matches!(status.as_u16(), 408 | 429)
            }
            ExportError::Request(_) => false,
            _ => true,
        }
    }
}

/// What failed since the last log line, logged at most every [`REPORT_EVERY`].
#[derive(Default)]
struct Report {
    last_logged: Option<Instant>,
    failed_batches: u64,
    failed_spans: u64,
    last_error: Option<String>,
    queue_full: u64,
}

impl Report {
    fn failed(&mut self, error: &ExportError, spans: usize, endpoint: &str) {
        self.failed_batches += 1;
        self.failed_spans += spans as u64;
        self.last_error = Some(error.to_string());
        if self.last_logged.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            self.flush(endpoint);
        }
    }

    fn queue_full(&mut self, dropped: u64) {
        self.queue_full += dropped;
    }

    /// Every [`REPORT_EVERY`]: the spans dropped for a full queue, and the failures not logged yet once the last
    /// failure line is old enough.
    fn tick(&mut self, endpoint: &str) {
        if self.last_logged.is_some_and(|at| at.elapsed() < REPORT_EVERY) {
            let failures = self.last_error.take();
            self.flush(endpoint);
            self.last_error = failures;
        } else {
            self.flush(endpoint);
        }
    }

    /// Logs what was counted since the last line, if anything.
    fn flush(&mut self, endpoint: &str) {
        if self.queue_full > 0 {
            tracing::warn!(
                dropped = self.queue_full,
                capacity = super::QUEUE_CAPACITY,
                "OTLP export queue full: spans dropped"
            );
            self.queue_full = 0;
        }
        if let Some(error) = self.last_error.take() {
            tracing::warn!(
                endpoint,
                %error,
                batches = self.failed_batches,
                spans = self.failed_spans,
                "OTLP export failed: spans dropped"
            );
            self.failed_batches = 0;
            self.failed_spans = 0;
            self.last_logged = Some(Instant::now());
        }
    }
}

/// The HTTP client of one endpoint, with its kept-alive connection.
struct Client {
    settings: Settings,
    /// The endpoint as log lines name it.
    endpoint: String,
    /// `host:port` to connect to.
    authority: String,
    connection: Option<Connection>,
}

struct Connection {
    sender: SendRequest<Full<Bytes>>,
    /// Drives the connection; aborted when the connection is dropped.
    _driver: AbortOnDropHandle<()>,
}

impl Client {
    fn new(settings: Settings) -> Client {
        let authority = settings.as_ref().map_or(String::new(), |s| {
            let default_port = if s.tls.is_some() { 443 } else { 80 };
            match s.endpoint.authority() {
                Some(a) if a.port_u16().is_some() => a.to_string(),
                Some(a) => format!("{}:{default_port}", a.host()),
                None => String::new(),
            }
        });
        Client {
            endpoint: settings.as_ref().map_or(String::new(), |s| s.endpoint.to_string()),
            settings,
            authority,
            connection: None,
        }
    }

    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends `spans`, tried once more after a failure that another try may not share; reports a failure.
    async fn export(&mut self, spans: &[Span], report: &mut Report) {
        let Some(settings) = self.settings.clone() else {
            tracing::debug!(spans = spans.len(), "`[tracing]` removed: spans dropped");
            return;
        };
        if spans.is_empty() {
            return;
        }
        let body = Bytes::from(encode(spans, &settings.service_name));
        let mut result = self.post(&settings, body.clone()).await;
        if result.as_ref().is_err_and(ExportError::retry) {
            result = self.post(&settings, body).await;
        }
        if let Err(error) = result {
            report.failed(&error, spans.len(), &self.endpoint);
        }
    }

    /// One export request within [`POST_TIMEOUT`]; a failure drops the connection.
    async fn post(&mut self, settings: &TracingSettings, body: Bytes) -> Result<(), ExportError> {
        let result = timeout(POST_TIMEOUT, self.try_post(settings, body))
            .await
            .unwrap_or(Err(ExportError::Timeout));
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    async fn try_post(&mut self, settings: &TracingSettings, body: Bytes) -> Result<(), ExportError> {
        let connection = match self.connection.take() {
            Some(c) if !c.sender.is_closed() => c,
            _ => self.connect(settings).await?,
        };
        let connection = self.connection.insert(connection);
        connection.sender.ready().await?;
        let path = settings.endpoint.path_and_query().map_or("/", |p| p.as_str());
        let host = settings.endpoint.authority().map_or("", |a| a.as_str());
        let mut request = http::Request::post(path)
            .header(HOST, host)
            .header(CONTENT_TYPE, "application/json");
        for (name, value) in &settings.headers {
            request = request.header(name, value);
        }
        let answer = connection.sender.send_request(request.body(Full::new(body))?).await?;
        let status = answer.status();
        // Read to its end, so that the connection can carry the next batch; a long answer closes it instead.
        if Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .is_err()
        {
            self.connection = None;
        }
        if status.is_success() {
            Ok(())
        } else {
            Err(ExportError::Status(status))
        }
    }

    async fn connect(&self, settings: &TracingSettings) -> Result<Connection, ExportError> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(ExportError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let stream = match &settings.tls {
            None => Conn::Tcp(tcp),
            Some(tls) => {
                let host = settings.endpoint.host().unwrap_or_default();
                let name = tls.server_name(host).map_err(|e| ExportError::Tls(e.to_string()))?;
                let stream = tls
                    .connect(tcp, name)
                    .await
                    .map_err(|e| ExportError::Tls(e.to_string()))?;
                Conn::ClientTls(Box::new(stream))
            }
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = connection.await;
        }));
        Ok(Connection {
            sender,
            _driver: driver,
        })
    }
}
