//! The servers one request tries in turn, and what limits them: the upstream's pending-handshake limit, its
//! `retries`, and the retry budget (retries in flight stay within a share of handshakes in flight). Each failure
//! says whether another server may help; those the server caused feed outlier detection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;
use tokio::net::TcpStream;

use super::error::{Cause, Retry, Unavailable, UpstreamError};
use super::outlier::Outcome;
use super::server::Active;
use super::{Choice, Upstream, UpstreamShared};
use crate::config::MIN_RETRY_CONCURRENCY;
use crate::conn::Conn;
use crate::tls::client::{ClientTls, host_of};

/// A handshake waiting for a server's answer, counted while this lives.
#[derive(Debug)]
pub struct Pending {
    upstream: Arc<UpstreamShared>,
    budget_percent: u32,
    retrying: bool,
}

impl Pending {
    /// Whether the retry budget lets this handshake go on to another server: retries in flight stay within the
    /// budget's share of handshakes in flight (at least [`MIN_RETRY_CONCURRENCY`]).
    pub fn may_retry(&mut self) -> bool {
        if self.retrying {
            return true;
        }
        let pending = u64::from(self.upstream.pending.load(Ordering::Relaxed));
        let allowed = (pending * u64::from(self.budget_percent) / 100).max(u64::from(MIN_RETRY_CONCURRENCY));
        let retrying = self.upstream.retrying.fetch_add(1, Ordering::Relaxed);
        if u64::from(retrying) < allowed {
            self.retrying = true;
            true
        } else {
            self.upstream.retrying.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.upstream.pending.fetch_sub(1, Ordering::Relaxed);
        if self.retrying {
            self.upstream.retrying.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Upstream {
    /// Counts a handshake in flight; `Err` when the upstream has `max_pending_handshakes` already.
    pub fn begin(&self) -> Result<Pending, Unavailable> {
        let before = self.shared.pending.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            upstream: self.shared.clone(),
            budget_percent: self.config.retry_budget_percent,
            retrying: false,
        };
        match self.config.max_pending_handshakes {
            Some(limit) if before >= limit => Err(Unavailable::TooManyPending),
            _ => Ok(pending),
        }
    }
}

/// The servers one request tries in turn: each at most once, at most `retries` after the first, within the
/// upstream's retry budget. Failures the server caused feed outlier detection.
#[derive(Debug)]
pub struct Attempts<'a> {
    upstream: &'a Upstream,
    choice: Choice,
    /// Servers picked, in order (a server found full once picked is among them, as it is not tried again).
    tried: Vec<usize>,
    /// Servers actually given a connection to try.
    contacted: usize,
    pending: Pending,
    last: Option<UpstreamError>,
}

impl<'a> Attempts<'a> {
    /// Starts a request's attempts; `Err` when the upstream cannot take another handshake now.
    pub fn start(upstream: &'a Upstream, choice: Choice) -> Result<Attempts<'a>, UpstreamError> {
        let pending = upstream.begin().map_err(UpstreamError::Unavailable)?;
        Ok(Attempts {
            upstream,
            choice,
            tried: Vec::with_capacity(2),
            contacted: 0,
            pending,
            last: None,
        })
    }

    /// The next server to try and its counted connection; `Err` with the reason to give the client when no server
    /// is left to try.
    pub fn next_server(&mut self) -> Result<(usize, Active), UpstreamError> {
        loop {
            if !self.tried.is_empty() {
                if self.tried.len() > self.upstream.config.retries as usize {
                    return Err(self.give_up());
                }
                if !self.pending.may_retry() {
                    tracing::debug!(upstream = %self.upstream.config.name, "retry budget spent: no retry");
                    return Err(self.give_up());
                }
            }
            let i = match self.upstream.next(self.choice, &self.tried) {
                Ok(i) => i,
                Err(Unavailable::Exhausted) => return Err(self.give_up()),
                Err(e) => return Err(self.last.take().unwrap_or(UpstreamError::Unavailable(e))),
            };
            self.tried.push(i);
            match self.upstream.connect_to(i) {
                Some(active) => {
                    self.contacted += 1;
                    return Ok((i, active));
                }
                // The whole upstream is full: no other server can take it either.
                None if self.upstream.is_full() => return Err(UpstreamError::Unavailable(Unavailable::Full)),
                // This server filled up since it was picked: another may have room.
                None => self.last = Some(UpstreamError::Unavailable(Unavailable::Full)),
            }
        }
    }

    fn give_up(&mut self) -> UpstreamError {
        self.last
            .take()
            .unwrap_or(UpstreamError::Unavailable(Unavailable::AllDown))
    }

    /// How many servers this request has tried to connect to so far.
    pub fn tries(&self) -> usize {
        self.contacted
    }

    /// Server `i` failed. A failure the server caused counts toward its ejection. `Ok` when the request may go on to
    /// another server (the error is what the client hears if none is left); `Err` with the error when no other try
    /// could help (a bad answer, wsgate's own lack of resources).
    pub fn failed(&mut self, i: usize, error: UpstreamError) -> Result<(), UpstreamError> {
        if error.cause() == Cause::Server {
            self.upstream.report(i, Outcome::Failure(&error.to_string()));
        }
        match error.retry() {
            Retry::OtherServer => {
                self.last = Some(error);
                Ok(())
            }
            Retry::No => Err(error),
        }
    }

    /// Server `i` answered (`error_status`: with a 5xx, which counts against it but is passed to the client).
    pub fn answered(&self, i: usize, error_status: bool) {
        let outcome = if error_status {
            Outcome::Failure("answered the upgrade with a 5xx status")
        } else {
            Outcome::Success
        };
        self.upstream.report(i, outcome);
    }
}

/// Opens a connection to `server` (named `name` in the config) within `timeout`, with `TCP_NODELAY` set and TCP
/// keepalive after `keepalive` idle, and on an upstream with `tls` runs the TLS handshake within the same time.
pub async fn connect(
    server: SocketAddr,
    name: &str,
    tls: Option<&ClientTls>,
    timeout: Duration,
    keepalive: Option<Duration>,
) -> Result<Conn, UpstreamError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = tokio::time::timeout_at(deadline, TcpStream::connect(server))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { server, after: timeout })?
        .map_err(|e| UpstreamError::connect(server, e))?;
    stream
        .set_nodelay(true)
        .map_err(|e| UpstreamError::connect(server, e))?;
    if let Some(idle) = keepalive {
        crate::sys::set_keepalive(&socket2::SockRef::from(&stream), idle)
            .map_err(|e| UpstreamError::connect(server, e))?;
    }
    let Some(tls) = tls else {
        return Ok(Conn::Tcp(stream));
    };
    let failed = |reason: String| UpstreamError::Tls { server, reason };
    let sni = tls.server_name(host_of(name)).map_err(|e| failed(e.to_string()))?;
    match tokio::time::timeout_at(deadline, tls.connect(stream, sni)).await {
        Ok(Ok(stream)) => Ok(Conn::ClientTls(Box::new(stream))),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(UpstreamError::ConnectTimeout { server, after: timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::upstream;
    use super::*;

    #[test]
    fn pending_handshakes_are_limited_and_retries_budgeted() {
        let mut config = upstream(3, None);
        config.max_pending_handshakes = Some(20);
        let u = Upstream::new(&config, None);
        let mut pending: Vec<Pending> = (0..20).map(|_| u.begin().expect("room")).collect();
        assert_eq!(u.begin().err(), Some(Unavailable::TooManyPending));
        // 20 % of 20 in flight: 4 may retry at once.
        let allowed = pending.iter_mut().map(|p| p.may_retry()).filter(|&ok| ok).count();
        assert_eq!(allowed, 4);
        drop(pending);
        // With 3 in flight the floor of 3 applies: all may retry.
        let mut quiet: Vec<Pending> = (0..3).map(|_| u.begin().expect("room")).collect();
        assert_eq!(quiet.iter_mut().map(|p| p.may_retry()).filter(|&ok| ok).count(), 3);
        drop(quiet);
        assert_eq!(u.shared.pending.load(Ordering::Relaxed), 0);
        assert_eq!(u.shared.retrying.load(Ordering::Relaxed), 0);
    }
}
