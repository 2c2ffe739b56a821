//! Active health checks: one task per server of an upstream with `[upstream.health]`, probing it every `interval`
//! (with jitter, so that checks of many servers do not fire together) and marking it down after `fall` failures in
//! a row, up after `rise` successes in a row. A server starts up. A success run of `rise` also ends a passive
//! ejection early.
//!
//! Probes: `tcp` connects; `http` sends `GET path` and reads the status line; `websocket` does a full upgrade
//! handshake (the accept key checked), one round trip (a text message, or a ping), and a clean close 1000. Every
//! probe runs within `timeout` and holds its socket only while it runs.

use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use super::{ServerState, UpstreamShared, now_ms};
use crate::config::{HealthCheck, HealthKind};

/// The largest answer head an `http` probe reads.
const MAX_ANSWER_HEAD: usize = 16 * 1024;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed before the answer")]
    Closed,
    #[error("answered {0}, not an expected status")]
    Status(u16),
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("WebSocket check failed: {0}")]
    WebSocket(String),
}

/// Probes `address` once, as `check` says, within its timeout. `host` is the `Host` of http and websocket checks.
pub async fn probe(check: &HealthCheck, address: SocketAddr, host: &str) -> Result<(), ProbeError> {
    let run = async {
        let stream = TcpStream::connect(address).await.map_err(ProbeError::Connect)?;
        match check.kind {
            HealthKind::Tcp => Ok(()),
            HealthKind::Http => probe_http(stream, check, host).await,
            HealthKind::WebSocket => probe_websocket(stream, check, host).await,
        }
    };
    tokio::time::timeout(check.timeout, run)
        .await
        .map_err(|_| ProbeError::Timeout(check.timeout))?
}

async fn probe_http(mut stream: TcpStream, check: &HealthCheck, host: &str) -> Result<(), ProbeError> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wsgate-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        check.path
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_ANSWER_HEAD {
            return Err(ProbeError::Malformed(format!(
                "answer head over {MAX_ANSWER_HEAD} bytes"
            )));
        }
        buf.reserve(1024);
        let n = (&mut stream)
            .take((MAX_ANSWER_HEAD - buf.len()) as u64)
            .read_buf(&mut buf)
            .await?;
        if n == 0 {
            return Err(ProbeError::Closed);
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut answer = httparse::Response::new(&mut headers);
        match answer.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(_)) => {
                let status = answer.code.unwrap_or(0);
                let accepted = if check.expect_status.is_empty() {
                    (200..300).contains(&status)
                } else {
                    check.expect_status.contains(&status)
                };
                return if accepted {
                    Ok(())
                } else {
                    Err(ProbeError::Status(status))
                };
            }
            Err(e) => return Err(ProbeError::Malformed(e.to_string())),
        }
    }
}

async fn probe_websocket(stream: TcpStream, check: &HealthCheck, host: &str) -> Result<(), ProbeError> {
    let url = format!("ws://{host}{}", check.path);
    let failed = |e: tokio_tungstenite::tungstenite::Error| ProbeError::WebSocket(e.to_string());
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), stream)
        .await
        .map_err(failed)?;
    let payload = random_u64().to_be_bytes();
    match &check.send {
        Some(text) => ws.send(Message::text(text.as_str())).await.map_err(failed)?,
        None => ws.send(Message::Ping(payload.to_vec().into())).await.map_err(failed)?,
    }
    loop {
        let message = ws
            .next()
            .await
            .ok_or_else(|| ProbeError::WebSocket("closed before the reply".into()))?
            .map_err(failed)?;
        let replied = match (&message, &check.send) {
            (Message::Text(_) | Message::Binary(_), Some(_)) => true,
            (Message::Pong(p), None) => p.as_ref() == payload,
            (Message::Close(frame), _) => {
                return Err(ProbeError::WebSocket(format!(
                    "server closed instead of replying ({})",
                    frame.as_ref().map_or(0, |f| u16::from(f.code))
                )));
            }
            _ => false,
        };
        if replied {
            break;
        }
    }
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "health check".into(),
    };
    ws.close(Some(close)).await.map_err(failed)?;
    // The server's close reply ends the exchange cleanly.
    while let Some(message) = ws.next().await {
        if message.is_err() {
            break;
        }
    }
    Ok(())
}

/// Consecutive results, and the state they call for.
#[derive(Debug, Clone, Copy)]
pub struct Streak {
    rise: u32,
    fall: u32,
    successes: u32,
    failures: u32,
}

impl Streak {
    pub fn new(rise: u32, fall: u32) -> Streak {
        Streak {
            rise: rise.max(1),
            fall: fall.max(1),
            successes: 0,
            failures: 0,
        }
    }

    /// Records a result; returns whether the server should now be down (`Some(true)`), up (`Some(false)`), or
    /// stay as it is (`None`).
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.successes >= self.rise).then_some(false)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures >= self.fall).then_some(true)
        }
    }
}

/// Checks `server` until `stop` is cancelled (the server or its upstream removed, or the check changed by a reload).
pub async fn run(
    check: HealthCheck,
    upstream: String,
    server: Arc<ServerState>,
    shared: Arc<UpstreamShared>,
    stop: CancellationToken,
) {
    let host = check.host.clone().unwrap_or_else(|| server.name.clone());
    let mut streak = Streak::new(check.rise, check.fall);
    // The first check comes at a random point of the first interval.
    let mut wait = check.interval.mul_f64(unit_random());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = probe(&check, server.address, &host) => result,
        };
        let ok = result.is_ok();
        let wanted = streak.record(ok);
        if wanted == Some(false) && server.end_ejection(now_ms()) {
            tracing::info!(upstream, server = %server.name, "server back early: ejected -> up (health checks pass)");
            shared.rebalance_armed.store(true, Ordering::Relaxed);
        }
        if let Some(down) = wanted
            && server.set_down(down)
        {
            if down {
                let reason = result.err().map_or_else(String::new, |e| e.to_string());
                tracing::warn!(upstream, server = %server.name, %reason, "health check: up -> down");
            } else {
                tracing::info!(upstream, server = %server.name, "health check: down -> up");
                shared.rebalance_armed.store(true, Ordering::Relaxed);
            }
        }
        // Each interval varies by up to a tenth either way.
        wait = check.interval.mul_f64(0.9 + 0.2 * unit_random());
    }
}

fn random_u64() -> u64 {
    std::hash::RandomState::new().hash_one(0u8)
}

/// A random number in [0, 1).
pub fn unit_random() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaks_need_rise_successes_and_fall_failures_in_a_row() {
        let mut s = Streak::new(2, 3);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(true), None, "a success breaks the failure run");
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), None);
        assert_eq!(s.record(false), Some(true));
        assert_eq!(s.record(false), Some(true));
        assert_eq!(s.record(true), None);
        assert_eq!(s.record(true), Some(false));
    }

    #[test]
    fn unit_random_stays_in_range() {
        for _ in 0..1000 {
            let x = unit_random();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
