//! WebSocket peers on raw sockets, for the frames relay's tests: frames built and read by hand (so that a test can
//! send what a real library would refuse to), a client after a checked `101`, and a backend that answers each
//! upgrade with a correct `101` and hands the connection to the test.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wsgate::config::{Config, FrameRules, Relay};
use wsgate::ws::accept_key;
use wsgate::ws::frame::{MAX_HEADER, apply_mask, close_frame, opcode, parse_header, write_header};

use super::{upgrade_request, within};

/// The mask key of every hand-built client frame.
pub const CLIENT_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A config tweak for [`super::Proxy::start_with`]: the first route relays in frames mode with `rules`.
pub fn frames(rules: FrameRules) -> impl FnOnce(&mut Config) {
    move |c| c.routes[0].relay = Relay::Frames(rules)
}

/// A frame as a peer puts it on the wire: `rsv` holds RSV1..RSV3 as its low three bits (RSV1 = 0b100); the
/// payload is masked with `mask` when there is one.
pub fn frame_bytes(fin: bool, rsv: u8, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut header = [0u8; MAX_HEADER];
    let n = write_header(&mut header, fin, op, mask, payload.len() as u64);
    header[0] |= (rsv & 0x7) << 4;
    let mut out = header[..n].to_vec();
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
    out
}

/// A masked client frame.
pub fn client_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    frame_bytes(fin, 0, op, payload, Some(CLIENT_MASK))
}

/// `len` bytes that are not all alike, so that a lost or moved byte shows.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A frame read from a raw socket, its payload unmasked, with its bytes as they were on the wire.
#[derive(Debug, Clone)]
pub struct Got {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload: Vec<u8>,
    pub wire: Vec<u8>,
}

impl Got {
    /// The close frame's code and reason (`None` for a close without a code); panics on another frame.
    pub fn close(&self) -> Option<(u16, String)> {
        assert_eq!(self.opcode, opcode::CLOSE, "expected a close frame, got {self:?}");
        let code = u16::from_be_bytes([*self.payload.first()?, *self.payload.get(1)?]);
        Some((code, String::from_utf8_lossy(&self.payload[2..]).into_owned()))
    }

    /// Short enough to print: a data frame's payload is shown by its length only.
    pub fn brief(&self) -> String {
        match self.opcode {
            opcode::CLOSE => format!("close {:?}", self.close()),
            op => format!("opcode {op:#x}, {} bytes", self.payload.len()),
        }
    }
}

/// [`Got::brief`] of each frame.
pub fn brief(frames: &[Got]) -> Vec<String> {
    frames.iter().map(Got::brief).collect()
}

/// Takes the first complete frame off the front of `buf`.
pub fn take_frame(buf: &mut Vec<u8>) -> Option<Got> {
    let header = parse_header(buf).expect("a valid payload length")?;
    let total = header.len + usize::try_from(header.payload_len).expect("length");
    if buf.len() < total {
        return None;
    }
    let wire: Vec<u8> = buf.drain(..total).collect();
    let mut payload = wire[header.len..].to_vec();
    if let Some(key) = header.mask {
        apply_mask(&mut payload, key, 0);
    }
    Some(Got {
        fin: header.fin,
        rsv: header.rsv,
        opcode: header.opcode,
        mask: header.mask,
        payload,
        wire,
    })
}

/// One end of a WebSocket connection on a raw socket: a client (its frames masked) or a backend (unmasked).
pub struct Peer {
    pub stream: TcpStream,
    /// Bytes read but not yet taken as frames.
    pub buf: Vec<u8>,
    /// The mask key of the frames this peer sends.
    pub mask: Option<[u8; 4]>,
}

impl Peer {
    pub async fn send(&mut self, bytes: &[u8]) {
        within("a write", self.stream.write_all(bytes))
            .await
            .expect("write to wsgate");
    }

    /// Sends one frame, masked when this peer is a client.
    pub async fn send_frame(&mut self, fin: bool, op: u8, payload: &[u8]) {
        let frame = frame_bytes(fin, 0, op, payload, self.mask);
        self.send(&frame).await;
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) {
        let frame = close_frame(code, reason, self.mask);
        self.send(&frame).await;
    }

    /// One read into `buf`; panics if the connection ends.
    pub async fn read_more(&mut self) {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = within("bytes from wsgate", self.stream.read(&mut chunk))
            .await
            .unwrap_or(0);
        assert!(n > 0, "the connection ended after {} unparsed bytes", self.buf.len());
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Reads until at least `n` bytes are held, without taking them as frames.
    pub async fn fill(&mut self, n: usize) {
        while self.buf.len() < n {
            self.read_more().await;
        }
    }

    /// The next frame, or `None` when the connection ends (EOF or reset), within [`super::WAIT`].
    pub async fn next_frame(&mut self) -> Option<Got> {
        within("a frame or the end of the connection", async {
            loop {
                if let Some(frame) = take_frame(&mut self.buf) {
                    assert_eq!(frame.rsv, 0, "no extension was negotiated: {frame:?}");
                    return Some(frame);
                }
                let mut chunk = vec![0u8; 64 * 1024];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        assert!(
                            self.buf.is_empty(),
                            "the connection ended inside a frame ({} bytes of it, starting {:?})",
                            self.buf.len(),
                            &self.buf[..self.buf.len().min(64)]
                        );
                        return None;
                    }
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }

    /// The next frame that is not one of wsgate's pings (each is answered with its pong); panics at the end of the
    /// connection.
    pub async fn next_answering_pings(&mut self) -> Got {
        loop {
            let f = self.next_frame().await.expect("a frame, not the end of the connection");
            if f.opcode == opcode::PING {
                self.send_frame(true, opcode::PONG, &f.payload).await;
                continue;
            }
            return f;
        }
    }

    /// The next close frame (pings and pongs are skipped); panics on a data frame or the end of the connection.
    pub async fn expect_close(&mut self) -> Got {
        loop {
            match self.next_frame().await {
                Some(f) if f.opcode == opcode::CLOSE => return f,
                Some(f) if f.opcode == opcode::PING || f.opcode == opcode::PONG => continue,
                Some(f) => panic!("expected a close frame, got {f:?}"),
                None => panic!("the connection ended without a close frame"),
            }
        }
    }

    /// Reads until the connection ends; returns the frames that came before, within [`super::WAIT`] each.
    pub async fn until_eof(&mut self) -> Vec<Got> {
        let mut frames = Vec::new();
        while let Some(f) = self.next_frame().await {
            frames.push(f);
        }
        frames
    }
}

/// Reads an HTTP head; returns it and the bytes read past its end.
pub async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    within("an HTTP head", async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = buf.split_off(end + 4);
                return (String::from_utf8_lossy(&buf).into_owned(), rest);
            }
            let n = stream.read(&mut chunk).await.expect("read head");
            assert!(n > 0, "connection closed inside an HTTP head: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
}

pub fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A raw client through the proxy, after a checked `101`.
pub async fn raw_client(proxy: SocketAddr, path: &str) -> Peer {
    let mut stream = within("connect", TcpStream::connect(proxy)).await.expect("connect");
    stream
        .write_all(upgrade_request(path, "").as_bytes())
        .await
        .expect("write upgrade");
    let (head, rest) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "expected a 101: {head}");
    Peer {
        stream,
        buf: rest,
        mask: Some(CLIENT_MASK),
    }
}

/// A backend on raw sockets: each connection's upgrade is answered with a correct `101`, and the connection is
/// handed to the test.
pub struct RawBackend {
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<Peer>,
    task: JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    pub async fn start() -> RawBackend {
        Self::start_with_greeting(Vec::new()).await
    }

    /// Each connection's `101` is followed by `greeting` in the same write (so wsgate reads them together).
    pub async fn start_with_greeting(greeting: Vec<u8>) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let (head, rest) = read_head(&mut stream).await;
                let key = header_value(&head, "sec-websocket-key").expect("a Sec-WebSocket-Key");
                let accept = accept_key(key.as_bytes());
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {}\r\n\r\n",
                    std::str::from_utf8(&accept).expect("ascii")
                );
                let mut answer = answer.into_bytes();
                answer.extend_from_slice(&greeting);
                stream.write_all(&answer).await.expect("write 101");
                let _ = tx.send(Peer {
                    stream,
                    buf: rest,
                    mask: None,
                });
            }
        });
        RawBackend { addr, conns, task }
    }

    pub async fn next_conn(&mut self) -> Peer {
        within("a connection to the raw backend", self.conns.recv())
            .await
            .expect("raw backend running")
    }
}

/// A backend that records every frame it receives, in order, until its connection ends: it answers pings when
/// `answer_pings`, echoes the data frames whose opcode is in `echoed` and answers a close with close 1000.
pub async fn recording_backend(mut server: Peer, answer_pings: bool, echoed: &[u8]) -> Vec<Got> {
    let mut seen = Vec::new();
    while let Some(f) = server.next_frame().await {
        match f.opcode {
            opcode::PING if answer_pings => server.send_frame(true, opcode::PONG, &f.payload).await,
            op if echoed.contains(&op) => server.send_frame(true, op, &f.payload).await,
            opcode::CLOSE => server.send_close(1000, "").await,
            _ => {}
        }
        seen.push(f);
    }
    seen
}

/// A connection to `addr` from the loopback address 127.0.0.`last` (tests of per-client rules need several).
pub async fn connect_from(last: u8, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from((
            std::net::Ipv4Addr::new(127, 0, 0, last),
            0,
        )))
        .expect("bind a loopback source address");
    super::within("connect", socket.connect(addr)).await.expect("connect")
}
