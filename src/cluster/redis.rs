//! One Redis server, shared by every instance: a multiplexed connection (one socket, requests pipelined on it by
//! every task that uses it), made lazily and made again after a failure.
//!
//! The connection's driver runs on a thread of its own (a current-thread runtime), so it outlives any worker's
//! runtime and a reload. Every call is bounded: a server that does not answer within [`RESPONSE_TIMEOUT`] is an
//! error, never a hang, and while the server is unreachable calls fail at once for [`RETRY_AFTER`] before the
//! next attempt to connect, so that an outage costs requests no waiting. The connection is pinged every
//! [`PING_EVERY`] while idle, so that one the server or the network dropped is found (and made again) by the ping
//! rather than by a request. An outage and the recovery are logged once each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, IntoConnectionInfo};
use arc_swap::ArcSwapOption;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one command (or one pipeline) may take.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed attempt to connect, calls fail at once for this long.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// How often the connection is checked (and, after an outage, made again) without a request.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Why Redis did not answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("{url}: not a Redis URL: {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: TLS to Redis (rediss://) is not supported; use redis:// on a trusted network")]
    Tls { url: String },
    #[error("{url}: cannot connect: {reason}")]
    Down { url: String, reason: String },
    #[error("{url}: no answer within {RESPONSE_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("{url}: {reason}")]
    Command { url: String, reason: String },
    #[error("{url}: {key}: {detail}")]
    Corrupt { url: String, key: String, detail: String },
    #[error("cannot start the Redis client's thread: {0}")]
    Thread(std::io::Error),
}

/// Checks a Redis URL as a config file gives it: `redis://[user:password@]host[:port][/db]` or
/// `redis+unix:///path`. What is wrong, as a sentence, when it is not one.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("rediss://") {
        return Err("TLS to Redis (rediss://) is not supported; use redis://".into());
    }
    url.into_connection_info().map(drop).map_err(|e| e.to_string())
}

/// A URL with its password hidden: what logs and errors show.
pub fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((credentials, host)) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

struct Inner {
    client: Client,
    url: String,
    connection: ArcSwapOption<MultiplexedConnection>,
    /// Held by the one task that connects; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
    /// When the last attempt to connect failed, in milliseconds since `epoch` (0: none since the last success).
    failed_at: AtomicU64,
    epoch: Instant,
    /// Whether the outage was logged (so that it is logged once).
    down: AtomicBool,
    runtime: tokio::runtime::Handle,
    /// Dropped with the last handle: the thread's runtime ends.
    _stop: oneshot::Sender<()>,
}

/// A connection of this thread's own to a client's server (see [`Redis::run_here`]).
type Here = (std::sync::Weak<Inner>, Arc<MultiplexedConnection>);

thread_local! {
    /// The connections this thread's runtime drives, one per client.
    static HERE: std::cell::RefCell<Vec<Here>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A handle on one Redis server; clones share the connection.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// A client for `url`, with its thread; it connects on first use.
    pub fn open(url: &str) -> Result<Redis, RedisError> {
        let shown = shown_url(url);
        if url.starts_with("rediss://") {
            return Err(RedisError::Tls { url: shown });
        }
        // Small requests go out at once (no Nagle delay behind an unacknowledged one): Redis clients' usual setting.
        // Keepalive probes find a connection a NAT or a failover dropped while it was idle (workers' connections
        // are not pinged).
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(15))
            .with_interval(Duration::from_secs(5));
        let tcp = ::redis::io::tcp::TcpSettings::default()
            .set_nodelay(true)
            .set_keepalive(keepalive);
        let info = url.into_connection_info().map(|info| info.set_tcp_settings(tcp));
        let client = info.and_then(Client::open).map_err(|e| RedisError::Url {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("wsgate-redis".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(RedisError::Thread)?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| RedisError::Thread(std::io::Error::other("the thread ended at once")))?
            .map_err(RedisError::Thread)?;
        let inner = Arc::new(Inner {
            client,
            url: shown,
            connection: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            failed_at: AtomicU64::new(0),
            epoch: Instant::now(),
            down: AtomicBool::new(false),
            runtime: runtime.clone(),
            _stop: stop,
        });
        // The pinger holds the client weakly: it ends with the last handle.
        let weak = Arc::downgrade(&inner);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(PING_EVERY).await;
                let Some(inner) = weak.upgrade() else { return };
                let redis = Redis { inner };
                // A failure is logged and the connection dropped by `run`; the next ping or request connects again.
                let _ = redis
                    .run(|mut c| async move { ::redis::cmd("PING").query_async::<String>(&mut c).await })
                    .await;
            }
        });
        Ok(Redis { inner })
    }

    /// The URL, its password hidden.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Runs one exchange (a command, a pipeline or a script) on the connection, bounded by [`RESPONSE_TIMEOUT`].
    /// A failed connection is dropped, so that the next call makes a new one.
    pub async fn run<T, F, Fut>(&self, exchange: F) -> Result<T, RedisError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let connection = self.connection().await?;
        match tokio::time::timeout(RESPONSE_TIMEOUT, exchange((*connection).clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
                    self.lost(&connection, &e.to_string());
                }
                Err(RedisError::Command {
                    url: self.inner.url.clone(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                self.lost(&connection, "no answer in time");
                Err(RedisError::Timeout {
                    url: self.inner.url.clone(),
                })
            }
        }
    }

    /// Runs one exchange as [`Redis::run`] does, on a connection of the calling thread's own, made on its first use
    /// and driven by the caller's runtime (a worker's): no hop to the client's thread and back, for exchanges on a
    /// worker's hot path (a handshake's limits). Such a connection is not pinged: one found broken (Redis restarted
    /// since its last use) is made again and the exchange tried once more on the new one.
    pub async fn run_here<T, F, Fut>(&self, exchange: F) -> Result<T, RedisError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = ::redis::RedisResult<T>>,
    {
        let mine = |entry: &Here| std::ptr::eq(entry.0.as_ptr(), Arc::as_ptr(&self.inner));
        let forget = || HERE.with(|here| here.borrow_mut().retain(|e| !mine(e)));
        let mut tries = 0;
        loop {
            tries += 1;
            let existing = HERE.with(|here| here.borrow().iter().find(|e| mine(e)).map(|e| e.1.clone()));
            let (connection, fresh) = match existing {
                Some(connection) => (connection, false),
                None => (self.connect_here().await?, true),
            };
            match tokio::time::timeout(RESPONSE_TIMEOUT, exchange((*connection).clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => {
                    let broken =
                        e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout();
                    if broken {
                        forget();
                        // A connection whose driver had died (Redis restarted since its last use) sent nothing:
                        // the exchange is tried once on a new one. Anything else may have run, and is not repeated.
                        if !fresh && tries < 2 && e.is_connection_dropped() && !e.is_timeout() {
                            continue;
                        }
                    }
                    return Err(RedisError::Command {
                        url: self.inner.url.clone(),
                        reason: e.to_string(),
                    });
                }
                Err(_) => {
                    forget();
                    return Err(RedisError::Timeout {
                        url: self.inner.url.clone(),
                    });
                }
            }
        }
    }

    /// Makes this thread's connection (see [`Redis::run_here`]).
    async fn connect_here(&self) -> Result<Arc<MultiplexedConnection>, RedisError> {
        if self.recently_failed() {
            return Err(self.down("unreachable; retrying shortly"));
        }
        // No response timeout of the connection's own: `run_here`'s is the one that says Timeout.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let made = self.inner.client.get_multiplexed_async_connection_with_config(&config);
        match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_millis(200), made).await {
            Ok(Ok(connection)) => {
                self.inner.failed_at.store(0, Ordering::Relaxed);
                if self.inner.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(redis = %self.inner.url, "Redis reachable again");
                }
                let connection = Arc::new(connection);
                HERE.with(|here| {
                    let mut here = here.borrow_mut();
                    // Connections of clients gone (a reload's old one) are closed here.
                    here.retain(|e| e.0.strong_count() > 0 && !std::ptr::eq(e.0.as_ptr(), Arc::as_ptr(&self.inner)));
                    here.push((Arc::downgrade(&self.inner), connection.clone()));
                });
                Ok(connection)
            }
            Ok(Err(e)) => Err(self.failed_to_connect(e.to_string())),
            Err(_) => Err(self.failed_to_connect("no connection in time".to_string())),
        }
    }

    /// A failed attempt to connect: calls fail at once for a while, and the outage is logged once.
    fn failed_to_connect(&self, reason: String) -> RedisError {
        let now = u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.failed_at.store(now.max(1), Ordering::Relaxed);
        if !self.inner.down.swap(true, Ordering::Relaxed) {
            tracing::error!(redis = %self.inner.url, error = %reason, "Redis unreachable");
        }
        self.down(&reason)
    }

    /// Runs a task on the client's own thread (it lives as long as a handle does).
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.runtime.spawn(task)
    }

    /// An error about what Redis holds under `key`.
    pub fn corrupt(&self, key: impl Into<String>, detail: impl Into<String>) -> RedisError {
        RedisError::Corrupt {
            url: self.inner.url.clone(),
            key: key.into(),
            detail: detail.into(),
        }
    }

    /// Drops `used`, which failed, unless another task has made a new connection meanwhile.
    fn lost(&self, used: &Arc<MultiplexedConnection>, why: &str) {
        let previous = self.inner.connection.compare_and_swap(&Some(used.clone()), None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, used)) {
            tracing::warn!(redis = %self.inner.url, error = why, "Redis connection lost");
        }
    }

    async fn connection(&self) -> Result<Arc<MultiplexedConnection>, RedisError> {
        if let Some(connection) = self.inner.connection.load_full() {
            return Ok(connection);
        }
        if self.recently_failed() {
            return Err(self.down("unreachable; retrying shortly"));
        }
        let _connecting = self.inner.connecting.lock().await;
        // Another task may have connected, or failed, while this one waited.
        if let Some(connection) = self.inner.connection.load_full() {
            return Ok(connection);
        }
        if self.recently_failed() {
            return Err(self.down("unreachable; retrying shortly"));
        }
        let client = self.inner.client.clone();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            // `run` bounds each exchange itself, and calls it a timeout.
            .set_response_timeout(None);
        // Made on the client's own runtime, which runs the connection's driver from then on.
        let made = self
            .inner
            .runtime
            .spawn(async move { client.get_multiplexed_async_connection_with_config(&config).await });
        let outcome = match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_millis(200), made).await {
            Ok(Ok(Ok(connection))) => Ok(connection),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(format!("the connecting task failed: {e}")),
            Err(_) => Err("no connection in time".to_string()),
        };
        match outcome {
            Ok(connection) => {
                self.inner.failed_at.store(0, Ordering::Relaxed);
                if self.inner.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(redis = %self.inner.url, "Redis reachable again");
                }
                let connection = Arc::new(connection);
                self.inner.connection.store(Some(connection.clone()));
                Ok(connection)
            }
            Err(reason) => Err(self.failed_to_connect(reason)),
        }
    }

    fn recently_failed(&self) -> bool {
        let failed = self.inner.failed_at.load(Ordering::Relaxed);
        failed != 0 && self.inner.epoch.elapsed().as_millis() < u128::from(failed) + RETRY_AFTER.as_millis()
    }

    fn down(&self, reason: &str) -> RedisError {
        RedisError::Down {
            url: self.inner.url.clone(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_and_odd_urls_refused() {
        assert_eq!(
            shown_url("redis://app:secret@10.0.0.1:6379/0"),
            "redis://app:***@10.0.0.1:6379/0"
        );
        assert_eq!(shown_url("redis://10.0.0.1:6379/0"), "redis://10.0.0.1:6379/0");
        assert!(check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url("rediss://127.0.0.1:6379/0").unwrap_err().contains("TLS"));
        assert!(check_url("http://127.0.0.1/").is_err());
    }
}
