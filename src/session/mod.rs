//! The per-connection pipeline. [`session`] reads like the data path: read and validate the request head,
//! pick and connect a backend server, forward the head, check the answer, then relay; or hand a plain HTTP
//! request to [`plain`]. Each step is a module of its own; this one only passes what one step found to the next
//! and turns failures into answers.

mod plain;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::http::handshake::{
    self, Answer, BodyEnd, HandshakeError, Inspected, MAX_HEAD_BYTES, ResponseError, Upgrade,
};
use crate::observe::ConnectionRecord;
use crate::relay;
use crate::upstream::{self, Pool, UpstreamError};

/// What every session of a server shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub pool: Pool,
    /// Cancelled when the server starts draining: listeners close, and frames-mode sessions close with 1001.
    pub draining: CancellationToken,
    /// Cancelled when the drain timeout has run out: sessions still open then are closed.
    pub force_close: CancellationToken,
}

/// Why a client gets an error answer instead of its WebSocket. Each maps to one status in [`Refusal::status`].
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("client sent no complete request head within {0:?}")]
    HeadTimeout(Duration),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("{server}: {source}")]
    Answer { server: SocketAddr, source: ResponseError },
}

impl Refusal {
    fn status(&self) -> u16 {
        match self {
            Self::HeadTimeout(_) => 408,
            Self::Handshake(e) => e.status(),
            Self::Upstream(e) => e.status(),
            Self::Answer { .. } => 502,
        }
    }
}

/// Serves one client connection from accept to close, and writes its access log line.
pub async fn session(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr, id: u64) {
    let started = Instant::now();
    let mut record = ConnectionRecord::new(id, peer);
    tokio::select! {
        () = run(&shared, client, &mut record) => {}
        () = shared.force_close.cancelled() => {
            record.end = "closed: drain timeout reached during shutdown".into();
        }
    }
    record.log(started.elapsed());
}

async fn run(shared: &Arc<Shared>, client: TcpStream, record: &mut ConnectionRecord) {
    // The handshake runs in a future of its own on the heap, freed before the relay starts: a long-lived session
    // keeps only the relay's small state.
    let Some(switched) = Box::pin(open(shared, client, record)).await else {
        return;
    };
    record.end = relay_switched(shared, switched, &mut record.bytes).await.to_string();
}

/// A connection both sides have switched to WebSocket.
struct Switched {
    client: TcpStream,
    backend: TcpStream,
    /// The backend accepted permessage-deflate.
    deflate: bool,
    /// Bytes read with the handshake heads: client to backend, backend to client.
    early: [Vec<u8>; 2],
}

/// Relays a switched connection in the configured mode.
async fn relay_switched(shared: &Shared, switched: Switched, counters: &mut crate::observe::Counters) -> relay::End {
    let Switched {
        client,
        backend,
        deflate,
        early,
    } = switched;
    let frames = match shared.config.relay {
        config::Relay::Tunnel => None,
        config::Relay::Frames(rules) => Some(relay::Frames::new(
            rules,
            deflate,
            shared.draining.clone().cancelled_owned(),
        )),
    };
    relay::relay(&client, &backend, shared.config.timeouts.idle, frames, early, counters).await
}

/// Everything before the relay. Returns the client's and the backend's sockets once the backend's 101 has been
/// passed to the client (and whether it negotiated permessage-deflate); `None` when the connection was answered otherwise (a refusal, plain HTTP, a backend's
/// non-101 answer) and is done.
async fn open(shared: &Arc<Shared>, mut client: TcpStream, record: &mut ConnectionRecord) -> Option<Switched> {
    let timeouts = shared.config.timeouts;
    let mut head = Vec::with_capacity(1024);
    let read = timeout(timeouts.handshake, read_request(&mut client, &mut head, record.client));
    let upgrade = match read.await {
        Err(_) => return refuse(client, record, Refusal::HeadTimeout(timeouts.handshake)).await,
        Ok(Err(ReadError::Closed)) => {
            record.end = "client closed before sending a request".into();
            return None;
        }
        Ok(Err(ReadError::Io(e))) => {
            record.end = format!("error: client: {e}");
            return None;
        }
        Ok(Err(ReadError::Refused(e))) => return refuse(client, record, e.into()).await,
        Ok(Ok(None)) => {
            plain::serve(shared.clone(), client, head, record).await;
            return None;
        }
        Ok(Ok(Some(upgrade))) => upgrade,
    };
    let Upgrade {
        head_len,
        forward,
        accept,
    } = upgrade;
    // Bytes the client sent after its head already belong to the WebSocket stream: they go to the relay.
    let client_early = head.get(head_len..).unwrap_or_default().to_vec();
    drop(head);

    let (mut backend, answer, answer_head) = match open_backend(shared, &forward, &accept, record).await {
        Ok(opened) => opened,
        Err(refusal) => return refuse(client, record, refusal).await,
    };
    match answer_head {
        AnswerHead::Switching { deflate, head_len } => {
            record.status = 101;
            let (head, backend_early) = answer.split_at(head_len.min(answer.len()));
            if let Err(e) = write_within(&mut client, head, timeouts.handshake).await {
                record.end = format!("error: client: {e}");
                return None;
            }
            Some(Switched {
                client,
                backend,
                deflate,
                early: [client_early, backend_early.to_vec()],
            })
        }
        AnswerHead::Other { status, head, body } => {
            record.status = status;
            let passed = pass_answer(&mut client, &mut backend, &head, &answer, body, timeouts.handshake);
            record.end = match passed.await {
                Ok(()) => format!("backend answered {status} to the upgrade"),
                Err(e) => format!("error: while passing the backend's {status} answer: {e}"),
            };
            lingering_close(client).await;
            None
        }
    }
}

enum ReadError {
    Closed,
    Io(std::io::Error),
    Refused(HandshakeError),
}

/// Reads the client's request head into `buf`: `Some` for a valid upgrade, `None` for a plain HTTP request.
async fn read_request(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    peer: SocketAddr,
) -> Result<Option<Upgrade>, ReadError> {
    loop {
        let room = MAX_HEAD_BYTES.saturating_sub(buf.len()).max(1);
        buf.reserve(room.min(4096));
        let n = (&mut *client)
            .take(room as u64)
            .read_buf(buf)
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        match handshake::inspect_request(buf, peer.ip(), "http") {
            Ok(Inspected::Partial) => continue,
            Ok(Inspected::Plain { .. }) => return Ok(None),
            Ok(Inspected::Upgrade(up)) => return Ok(Some(up)),
            Err(e) => return Err(ReadError::Refused(e)),
        }
    }
}

/// The parts of a backend's answer the session acts on.
enum AnswerHead {
    Switching {
        deflate: bool,
        head_len: usize,
    },
    Other {
        status: u16,
        /// The head to write to the client.
        head: Vec<u8>,
        /// How to find the end of the body, and where it starts in the answer buffer.
        body: Option<(BodyEnd, usize)>,
    },
}

/// Connects to a backend server, forwards the request head, and reads its answer. Refused or reset connections
/// move on to the next server (each at most once); a timeout ends the attempt.
async fn open_backend(
    shared: &Shared,
    forward: &[u8],
    accept: &[u8; 28],
    record: &mut ConnectionRecord,
) -> Result<(TcpStream, Vec<u8>, AnswerHead), Refusal> {
    if shared.pool.is_empty() {
        return Err(UpstreamError::NoServers.into());
    }
    let timeouts = shared.config.timeouts;
    let mut last = None;
    for server in shared.pool.order() {
        record.backend = Some(server);
        let mut backend = match upstream::connect(server, timeouts.connect).await {
            Ok(b) => b,
            Err(e @ UpstreamError::AllFailed { .. }) => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let exchange = timeout(timeouts.handshake, exchange_heads(&mut backend, forward, accept));
        match exchange.await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    server,
                    during: "waiting for the handshake answer from",
                    after: timeouts.handshake,
                }
                .into());
            }
            Ok(Ok((answer, head))) => return Ok((backend, answer, head)),
            Ok(Err(Exchange::Io(source))) => last = Some(UpstreamError::AllFailed { server, source }),
            Ok(Err(Exchange::Answer(source))) => return Err(Refusal::Answer { server, source }),
        }
    }
    Err(last.unwrap_or(UpstreamError::NoServers).into())
}

enum Exchange {
    Io(std::io::Error),
    Answer(ResponseError),
}

async fn exchange_heads(
    backend: &mut TcpStream,
    forward: &[u8],
    accept: &[u8; 28],
) -> Result<(Vec<u8>, AnswerHead), Exchange> {
    backend.write_all(forward).await.map_err(Exchange::Io)?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let room = MAX_HEAD_BYTES.saturating_sub(buf.len()).max(1);
        buf.reserve(room.min(4096));
        let n = (&mut *backend)
            .take(room as u64)
            .read_buf(&mut buf)
            .await
            .map_err(Exchange::Io)?;
        if n == 0 {
            return Err(Exchange::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "backend closed the connection before answering the handshake",
            )));
        }
        let head = match handshake::inspect_response(&buf, accept).map_err(Exchange::Answer)? {
            Answer::Partial => continue,
            Answer::Switching { deflate, head_len } => AnswerHead::Switching { deflate, head_len },
            Answer::Other {
                status,
                head_len,
                head,
                framing,
            } => AnswerHead::Other {
                status,
                head,
                body: BodyEnd::new(framing).map(|end| (end, head_len)),
            },
        };
        return Ok((buf, head));
    }
}

/// Passes a backend's non-101 answer to the client: its head, then its body up to where the body ends. Each read
/// from the backend and each write to the client must complete within `read_timeout`.
async fn pass_answer(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    head: &[u8],
    answer: &[u8],
    body: Option<(BodyEnd, usize)>,
    read_timeout: Duration,
) -> std::io::Result<()> {
    write_within(client, head, read_timeout).await?;
    let Some((mut end, body_start)) = body else {
        return Ok(());
    };
    let malformed = |e| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut chunk = answer.get(body_start..).unwrap_or_default().to_vec();
    loop {
        let done = end.feed(&chunk).map_err(malformed)?;
        write_within(client, &chunk[..done.unwrap_or(chunk.len())], read_timeout).await?;
        if done.is_some() {
            return Ok(());
        }
        chunk.clear();
        chunk.reserve(16 * 1024);
        let n = timeout(read_timeout, backend.read_buf(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "backend stalled"))??;
        if n == 0 {
            return match end {
                BodyEnd::UntilClose => Ok(()),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "backend closed before the end of the body",
                )),
            };
        }
    }
}

/// Writes all of `bytes` unless the peer takes none of them for `limit`.
async fn write_within(stream: &mut TcpStream, bytes: &[u8], limit: Duration) -> std::io::Result<()> {
    timeout(limit, stream.write_all(bytes))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "peer stopped reading"))?
}

/// Answers the client with an error status and closes. Returns `None`: the connection is done.
async fn refuse(mut client: TcpStream, record: &mut ConnectionRecord, refusal: Refusal) -> Option<Switched> {
    let status = refusal.status();
    let reason = refusal.to_string();
    let answer = crate::http::error_response(status, &reason);
    record.status = status;
    record.end = format!("refused: {reason}");
    if timeout(Duration::from_secs(5), client.write_all(&answer)).await.is_ok() {
        lingering_close(client).await;
    }
    None
}

/// Closes after an answer so that the client reads it: shut down our side, then read and drop what the client
/// still sends (bounded in time and bytes) so the kernel does not reset the connection under unread data.
async fn lingering_close(mut client: TcpStream) {
    const LINGER: Duration = Duration::from_secs(2);
    const MAX_DISCARD: usize = 256 * 1024;
    if client.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    let _ = timeout(LINGER, async {
        while discarded < MAX_DISCARD {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}
