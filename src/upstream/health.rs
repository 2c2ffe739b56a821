//! Active health checks: one task per upstream with `[upstream.health]`. Every `interval` (±10 % jitter; the first
//! round at a random point of the first interval) it probes all the upstream's servers at once, each probe on its
//! own socket within `timeout`: a round wakes the control thread a few times for all the servers together instead
//! of a few times per server, which is what keeps checking a hundred servers every second under 1 % of a core. A
//! server goes down after `fall` failures in a row and up after `rise` successes in a row (the counts live in the
//! server's shared state, so they survive reloads); servers start up. `rise` successes while ejected also end a
//! passive ejection early.
//!
//! Probes: `tcp` connects (and resets, leaving no TIME_WAIT behind); `http` sends `GET path` and reads the status
//! line; `websocket` does a full upgrade handshake (the accept key checked), one round trip (a text message, or a
//! ping), and a clean close 1000. Each holds its socket only while it runs.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ServerState, UpstreamShared, now_ms};
use crate::config::{HealthCheck, HealthKind};
use crate::conn::Conn;
use crate::http::handshake::{self, BackendAnswer};
use crate::tls::client::{ClientTls, host_of};
use crate::ws::frame::{self, opcode};

/// The largest answer head, or WebSocket frame, a probe reads.
const MAX_READ: usize = 16 * 1024;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
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

/// Probes `server` once, as `check` says, within its timeout, over TLS when the upstream has `tls` (a `tcp`
/// check then completes the TLS handshake). `host` is the `Host` of http and websocket checks.
pub async fn probe(
    check: &HealthCheck,
    tls: Option<&ClientTls>,
    server: &ServerState,
    host: &str,
) -> Result<(), ProbeError> {
    let run = async {
        let stream = TcpStream::connect(server.address).await.map_err(ProbeError::Connect)?;
        let stream = match tls {
            None => Conn::Tcp(stream),
            Some(tls) => {
                let name = tls
                    .server_name(host_of(&server.name))
                    .map_err(|e| ProbeError::Tls(e.to_string()))?;
                let stream = tls
                    .connect(stream, name)
                    .await
                    .map_err(|e| ProbeError::Tls(e.to_string()))?;
                Conn::ClientTls(Box::new(stream))
            }
        };
        match check.kind {
            HealthKind::Tcp => {
                // A reset instead of a FIN: no TIME_WAIT socket per check (HAProxy's checks do the same).
                let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
                Ok(())
            }
            HealthKind::Http => probe_http(stream, check, host).await,
            HealthKind::WebSocket => probe_websocket(stream, check, host).await,
        }
    };
    tokio::time::timeout(check.timeout, run)
        .await
        .map_err(|_| ProbeError::Timeout(check.timeout))?
}

/// Reads into `buf` until `done` says what it holds is enough (`Some`), at most [`MAX_READ`] bytes.
async fn read_until<T>(
    stream: &mut Conn,
    buf: &mut Vec<u8>,
    mut done: impl FnMut(&[u8]) -> Result<Option<T>, ProbeError>,
) -> Result<T, ProbeError> {
    loop {
        if let Some(t) = done(buf)? {
            return Ok(t);
        }
        if buf.len() >= MAX_READ {
            return Err(ProbeError::Malformed(format!(
                "more than {MAX_READ} bytes without an answer"
            )));
        }
        buf.reserve(1024);
        let n = (&mut *stream).take((MAX_READ - buf.len()) as u64).read_buf(buf).await?;
        if n == 0 {
            return Err(ProbeError::Closed);
        }
    }
}

async fn probe_http(mut stream: Conn, check: &HealthCheck, host: &str) -> Result<(), ProbeError> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wsgate-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        check.path
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(1024);
    let status = read_until(&mut stream, &mut buf, |bytes| {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut answer = httparse::Response::new(&mut headers);
        match answer.parse(bytes) {
            Ok(httparse::Status::Partial) => Ok(None),
            Ok(httparse::Status::Complete(_)) => Ok(Some(answer.code.unwrap_or(0))),
            Err(e) => Err(ProbeError::Malformed(e.to_string())),
        }
    })
    .await?;
    let accepted = if check.expect_status.is_empty() {
        (200..300).contains(&status)
    } else {
        check.expect_status.contains(&status)
    };
    if accepted {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

/// The next whole frame from a server at the front of `buf`: its header and payload, removed from `buf`.
fn take_frame(buf: &mut Vec<u8>) -> Result<Option<(frame::Header, Vec<u8>)>, ProbeError> {
    let header = frame::parse_header(buf).map_err(|e| ProbeError::WebSocket(e.to_string()))?;
    let Some(header) = header else {
        return Ok(None);
    };
    if header.mask.is_some() {
        return Err(ProbeError::WebSocket("the server masked a frame".into()));
    }
    let end = header.len as u64 + header.payload_len;
    if end > MAX_READ as u64 {
        return Err(ProbeError::WebSocket(format!(
            "a frame of {} bytes",
            header.payload_len
        )));
    }
    if (buf.len() as u64) < end {
        return Ok(None);
    }
    let payload = buf[header.len..end as usize].to_vec();
    buf.drain(..end as usize);
    Ok(Some((header, payload)))
}

async fn probe_websocket(mut stream: Conn, check: &HealthCheck, host: &str) -> Result<(), ProbeError> {
    let key_bytes: Vec<u8> = [random_u64(), random_u64()]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let key = base64::engine::general_purpose::STANDARD.encode(&key_bytes);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\nUser-Agent: wsgate-health-check\r\n\r\n",
        check.path
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let accept = crate::ws::accept_key(key.as_bytes());
    let mut buf = Vec::with_capacity(1024);
    let head_len = read_until(&mut stream, &mut buf, |bytes| {
        match handshake::inspect_response(bytes, &accept) {
            Ok(BackendAnswer::Partial) => Ok(None),
            Ok(BackendAnswer::Switching { head_len, .. }) => Ok(Some(head_len)),
            Ok(BackendAnswer::Other { status, .. }) => Err(ProbeError::Status(status)),
            Err(e) => Err(ProbeError::WebSocket(e.to_string())),
        }
    })
    .await?;
    buf.drain(..head_len);
    let mask = random_u64().to_le_bytes();
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    let close = frame::close_frame(1000, "health check", Some(mask));
    let Some(text) = &check.send else {
        // A ping and the close right behind it, in one write: the server's pong comes before its close reply
        // (frames are answered in order), so the round trip and the clean close take one exchange.
        let payload = random_u64().to_be_bytes();
        let mut out = frame::control_frame(opcode::PING, &payload, Some(mask));
        out.extend_from_slice(&close);
        stream.write_all(&out).await?;
        stream.flush().await?;
        let mut ponged = false;
        return read_until(&mut stream, &mut buf, |bytes| {
            let mut rest = bytes.to_vec();
            while let Some((header, body)) = take_frame(&mut rest)? {
                match header.opcode {
                    opcode::PONG if body == payload => ponged = true,
                    opcode::CLOSE if ponged => return Ok(Some(())),
                    opcode::CLOSE => return Err(ProbeError::WebSocket("the server closed without a pong".into())),
                    _ => {}
                }
            }
            Ok(None)
        })
        .await;
    };
    // A message needs the application to answer: the close waits for its reply.
    stream
        .write_all(&data_frame(opcode::TEXT, text.as_bytes(), mask))
        .await?;
    stream.flush().await?;
    read_until(&mut stream, &mut buf, |bytes| {
        let mut rest = bytes.to_vec();
        while let Some((header, _)) = take_frame(&mut rest)? {
            match header.opcode {
                opcode::TEXT | opcode::BINARY => return Ok(Some(())),
                opcode::CLOSE => return Err(ProbeError::WebSocket("the server closed instead of replying".into())),
                _ => {}
            }
        }
        Ok(None)
    })
    .await?;
    stream.write_all(&close).await?;
    stream.flush().await?;
    let mut buf = Vec::new();
    read_until(&mut stream, &mut buf, |bytes| {
        let mut rest = bytes.to_vec();
        while let Some((header, _)) = take_frame(&mut rest)? {
            if header.opcode == opcode::CLOSE {
                return Ok(Some(()));
            }
        }
        Ok(None)
    })
    .await
}

/// A whole masked data frame.
fn data_frame(op: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut header = [0u8; frame::MAX_HEADER];
    let n = frame::write_header(&mut header, true, op, Some(mask), payload.len() as u64);
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&header[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    frame::apply_mask(&mut out[start..], mask, 0);
    out
}

/// Checks the servers of `upstream` until `stop` is cancelled (the upstream removed, or its check or its servers
/// changed by a reload: a new task takes over from the servers' shared state).
pub async fn run(
    check: HealthCheck,
    tls: Option<Arc<ClientTls>>,
    upstream: String,
    servers: Vec<Arc<ServerState>>,
    shared: Arc<UpstreamShared>,
    stop: CancellationToken,
) {
    let hosts: Vec<String> = servers
        .iter()
        .map(|s| check.host.clone().unwrap_or_else(|| s.name.clone()))
        .collect();
    // The first round comes at a random point of the first interval.
    let mut next = Instant::now() + check.interval.mul_f64(unit_random());
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        // Rounds start one interval apart (±10 %), however long the probes take.
        next += check.interval.mul_f64(0.9 + 0.2 * unit_random());
        let mut round: FuturesUnordered<_> = servers
            .iter()
            .zip(&hosts)
            .map(|(server, host)| {
                let (check, tls) = (&check, tls.as_deref());
                async move { (server, probe(check, tls, server, host).await) }
            })
            .collect();
        loop {
            let done = tokio::select! {
                () = stop.cancelled() => return,
                done = round.next() => done,
            };
            let Some((server, result)) = done else {
                break;
            };
            note(&check, &upstream, server, &shared, result);
        }
        if next < Instant::now() {
            next = Instant::now();
        }
    }
}

/// Applies one probe's result to its server. A probe that could not even open its socket for lack of wsgate's own
/// resources (file descriptors, ports, memory) says nothing of the server: its streaks stay as they are.
fn note(
    check: &HealthCheck,
    upstream: &str,
    server: &ServerState,
    shared: &UpstreamShared,
    result: Result<(), ProbeError>,
) {
    if let Err(ProbeError::Connect(e)) = &result
        && super::error::is_proxy_resource(e)
    {
        tracing::warn!(upstream, server = %server.name, error = %e, "health check not counted: wsgate is short of resources");
        return;
    }
    let wanted = server.record_check(result.is_ok(), check.rise, check.fall);
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
    use crate::config::{DEFAULT_FALL, DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_TIMEOUT, DEFAULT_RISE};

    #[test]
    fn a_probe_wsgate_could_not_open_counts_neither_way() {
        let check = HealthCheck {
            kind: HealthKind::Tcp,
            path: "/".into(),
            host: None,
            expect_status: Vec::new(),
            send: None,
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        };
        let server = ServerState::new("s", std::net::SocketAddr::from(([127, 0, 0, 1], 9000)));
        let shared = UpstreamShared::default();
        let emfile = || Err(ProbeError::Connect(std::io::Error::from_raw_os_error(24)));
        for _ in 0..DEFAULT_FALL * 3 {
            note(&check, "app", &server, &shared, emfile());
        }
        assert!(!server.is_down(), "wsgate's own shortage marks no server down");
        let refused = || Err(ProbeError::Connect(std::io::ErrorKind::ConnectionRefused.into()));
        for _ in 0..DEFAULT_FALL {
            note(&check, "app", &server, &shared, refused());
        }
        assert!(server.is_down(), "refusals do");
        for _ in 0..DEFAULT_RISE * 3 {
            note(&check, "app", &server, &shared, emfile());
        }
        assert!(server.is_down(), "nor brings one back up");
    }

    #[test]
    fn unit_random_stays_in_range() {
        for _ in 0..1000 {
            let x = unit_random();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
