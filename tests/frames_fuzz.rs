//! Frames mode against bad input: 10 000 random client byte streams (frames that look valid, lying lengths,
//! invalid UTF-8 and close codes, garbage) through the built binary, each ending with a close code of wsgate's or
//! the client's own, while another connection stays unaffected. The streams are seeded (`WSGATE_FUZZ_SEED`).
//!
//! The test loads both cores: it has this binary to itself, so no test with timers of a few hundred milliseconds
//! runs beside it.

mod support;

use std::fs;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use rustix::process::Signal;
use support::binary::BinaryProxy;
use support::frames::*;
use support::raw::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use wsgate::ws::frame::{apply_mask, opcode, parse_header};

// ---------------------------------------------------------------------------------------------------------------
// Bad input: random frame streams
// ---------------------------------------------------------------------------------------------------------------

const FUZZ_STREAMS: u64 = 10_000;
/// Connections open at once.
const FUZZ_CONCURRENCY: usize = 250;
/// One connection's whole life: handshake, its bytes, and the end.
const FUZZ_CONN_WAIT: Duration = Duration::from_secs(15);
/// All of them.
const FUZZ_TOTAL_WAIT: Duration = Duration::from_secs(60);
/// The seed of stream `i` is derived from this and `i`; `WSGATE_FUZZ_SEED` picks another run.
const FUZZ_SEED: u64 = 0x5eed_0ff2_a3e5;

/// Close codes wsgate may answer random bytes with (and a backend's close, relayed).
const FUZZ_CODES: [u16; 6] = [1001, 1002, 1007, 1008, 1009, 1011];

/// xorshift64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, index: u64) -> Rng {
        let mut rng = Rng((seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
        for _ in 0..4 {
            rng.next();
        }
        rng
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A random client byte stream: frames that look valid (any opcode, flags, mask or none, lengths that lie now
/// and then, valid and invalid UTF-8 and close codes) mixed with garbage.
fn random_stream(rng: &mut Rng) -> Vec<u8> {
    const TEXTS: [&str; 6] = ["hello", "€", "h\u{e9}llo w\u{f6}rld", "😀😀", "name?", ""];
    const CODES: [u16; 16] = [
        1000, 1001, 1002, 1003, 1005, 1006, 1007, 1011, 1012, 1015, 999, 0, 2999, 3000, 4999, 5000,
    ];
    let mut out = Vec::new();
    if rng.chance(5) {
        // A flood of small valid messages, over the rate limit.
        for _ in 0..5 + rng.below(20) {
            let text = rng.pick(&TEXTS).as_bytes();
            out.extend(frame_bytes(true, 0, opcode::TEXT, text, Some(CLIENT_MASK)));
        }
    }
    for _ in 0..1 + rng.below(8) {
        match rng.below(20) {
            0..=13 => {
                let fin = rng.chance(70);
                let rsv = if rng.chance(90) { 0 } else { rng.below(8) as u8 };
                let op = match rng.below(12) {
                    0..=2 => opcode::TEXT,
                    3..=4 => opcode::BINARY,
                    5..=6 => opcode::CONTINUATION,
                    7 => opcode::CLOSE,
                    8 => opcode::PING,
                    9 => opcode::PONG,
                    _ => rng.below(16) as u8,
                };
                let len = match rng.below(50) {
                    0..=29 => rng.below(32),
                    30..=34 => 124 + rng.below(4),
                    35..=44 => rng.below(400),
                    45..=48 => rng.below(4000),
                    _ => rng.below(70_000),
                } as usize;
                let payload = if op == opcode::CLOSE && rng.chance(70) {
                    let mut p = rng.pick(&CODES).to_be_bytes().to_vec();
                    if rng.chance(50) {
                        p.extend_from_slice(rng.pick(&TEXTS).as_bytes());
                    }
                    if rng.chance(10) {
                        p.truncate(1);
                    }
                    p
                } else if matches!(op, opcode::TEXT | opcode::CONTINUATION) && rng.chance(60) {
                    let mut p = Vec::new();
                    while p.len() < len.min(300) {
                        p.extend_from_slice(rng.pick(&TEXTS).as_bytes());
                    }
                    if rng.chance(20) && !p.is_empty() {
                        let at = rng.below(p.len() as u64) as usize;
                        p.truncate(at);
                    }
                    p
                } else {
                    rng.bytes(len)
                };
                let mask = rng.chance(92).then(|| {
                    let k = rng.next().to_le_bytes();
                    [k[0], k[1], k[2], k[3]]
                });
                let mut wire = frame_bytes(fin, rsv, op, &payload, mask);
                if rng.chance(8) {
                    // A frame cut short: its header promises more than comes.
                    let keep = rng.below(wire.len() as u64) as usize;
                    wire.truncate(keep);
                }
                if rng.chance(4) && !wire.is_empty() {
                    let at = rng.below(wire.len() as u64) as usize;
                    wire[at] ^= 1 << rng.below(8);
                }
                out.extend_from_slice(&wire);
            }
            14..=17 => {
                let n = 1 + rng.below(40) as usize;
                out.extend(rng.bytes(n));
            }
            _ => {
                // A header with a 64-bit length, its top bit set or not, and a few bytes of payload.
                out.push(rng.next() as u8);
                out.push(0x80 | 127);
                out.extend_from_slice(&rng.next().to_be_bytes());
                let n = rng.below(12) as usize;
                out.extend(rng.bytes(n));
            }
        }
    }
    out
}

/// Every close code the client's own bytes could be sending (a valid close of the client's is echoed by the
/// backend): any position that parses as a close frame header counts, valid or not.
fn close_codes_in(stream: &[u8]) -> Vec<Option<u16>> {
    let mut codes = Vec::new();
    for i in 0..stream.len() {
        if stream[i] & 0x0F != opcode::CLOSE {
            continue;
        }
        let Ok(Some(h)) = parse_header(&stream[i..]) else {
            continue;
        };
        match h.payload_len {
            0 => codes.push(None),
            1 => {}
            _ => {
                if let Some(bytes) = stream.get(i + h.len..i + h.len + 2) {
                    let mut code = [bytes[0], bytes[1]];
                    if let Some(key) = h.mask {
                        apply_mask(&mut code, key, 0);
                    }
                    codes.push(Some(u16::from_be_bytes(code)));
                }
            }
        }
    }
    codes
}

/// How one random connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FuzzEnd {
    Close(Option<u16>),
    Tcp,
}

/// Sends stream `index` on a fresh connection after a valid handshake, then half-closes, and reads until wsgate
/// closes; checks what came back.
async fn fuzz_one(proxy: SocketAddr, seed: u64, index: u64) -> Result<FuzzEnd, String> {
    let mut rng = Rng::new(seed, index);
    let stream = random_stream(&mut rng);
    let cuts = {
        let mut cuts: Vec<usize> = (0..rng.below(3))
            .map(|_| rng.below(stream.len() as u64 + 1) as usize)
            .collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort_unstable();
        cuts
    };
    let mut socket = TcpStream::connect(proxy).await.map_err(|e| format!("connect: {e}"))?;
    socket
        .write_all(upgrade_request("/fuzz", "").as_bytes())
        .await
        .map_err(|e| format!("write upgrade: {e}"))?;
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(format!("no 101: {}", text_of(&got))),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    };
    if !got.starts_with(b"HTTP/1.1 101") {
        return Err(format!("no 101: {}", text_of(&got)));
    }
    got.drain(..head_end);
    let (mut rd, mut wr) = socket.into_split();
    let writer = async {
        for w in cuts.windows(2) {
            if wr.write_all(&stream[w[0]..w[1]]).await.is_err() {
                // wsgate has closed the connection already.
                return;
            }
            tokio::task::yield_now().await;
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::join!(writer, reader);

    // What wsgate sent: unmasked frames, at most one close and nothing after it.
    let mut close = None;
    while let Some(header) = parse_header(&got).map_err(|_| "a bad length from wsgate".to_string())? {
        let total = header.len + header.payload_len as usize;
        if got.len() < total {
            break;
        }
        if close.is_some() {
            return Err(format!("a frame after the close frame: {header:?}"));
        }
        if header.mask.is_some() || header.rsv != 0 {
            return Err(format!("a masked or RSV frame to the client: {header:?}"));
        }
        if header.opcode == opcode::CLOSE {
            let payload = &got[header.len..total];
            close = Some(match payload {
                [] => None,
                [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
                _ => return Err("a 1-byte close payload to the client".into()),
            });
        }
        got.drain(..total);
    }
    if close.is_some() && !got.is_empty() {
        return Err(format!("{} bytes after the close frame", got.len()));
    }
    match close {
        None => Ok(FuzzEnd::Tcp),
        Some(Some(code)) if FUZZ_CODES.contains(&code) => Ok(FuzzEnd::Close(Some(code))),
        Some(code) if close_codes_in(&stream).contains(&code) => Ok(FuzzEnd::Close(code)),
        Some(code) => Err(format!("close code {code:?}, neither wsgate's nor the client's own")),
    }
}

/// The peak memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_frame_streams_end_cleanly_and_other_connections_are_unaffected() {
    let seed = std::env::var("WSGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(FUZZ_SEED);
    let backend = ws_backend("b").await;
    let mut proxy = BinaryProxy::start(
        backend.addr,
        &[
            "--mode",
            "frames",
            "--validate-utf8",
            "--max-message-size",
            "100000",
            "--max-frame-size",
            "60000",
            "--messages-per-second",
            "2",
            "--burst",
            "3",
            "--close-timeout",
            "300ms",
            "--drain-timeout",
            "5s",
        ],
    )
    .await;
    let pid = proxy.child.id().expect("pid");
    let mut bystander = connect(&format!("ws://{}/bystander", proxy.addr)).await;
    echo(&mut bystander, "before the storm").await;

    let started = Instant::now();
    let mut counts = [0u64; 8];
    let mut failures = Vec::new();
    let addr = proxy.addr;
    let run = async {
        let mut running = tokio::task::JoinSet::new();
        let mut next = 0u64;
        loop {
            while running.len() < FUZZ_CONCURRENCY && next < FUZZ_STREAMS {
                let index = next;
                running.spawn(async move { (index, timeout(FUZZ_CONN_WAIT, fuzz_one(addr, seed, index)).await) });
                next += 1;
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let (index, result) = done.expect("a fuzz task");
            let slot = match result {
                Ok(Ok(FuzzEnd::Tcp)) => 0,
                Ok(Ok(FuzzEnd::Close(Some(code)))) => FUZZ_CODES.iter().position(|&c| c == code).map_or(7, |i| i + 1),
                Ok(Ok(FuzzEnd::Close(None))) => 7,
                Ok(Err(e)) => {
                    failures.push(format!("stream {index}: {e}"));
                    continue;
                }
                Err(_) => {
                    failures.push(format!("stream {index}: no end within {FUZZ_CONN_WAIT:?}"));
                    continue;
                }
            };
            counts[slot] += 1;
        }
    };
    if timeout(FUZZ_TOTAL_WAIT, run).await.is_err() {
        panic!("the random streams did not all end within {FUZZ_TOTAL_WAIT:?}");
    }
    let took = started.elapsed();
    println!(
        "{FUZZ_STREAMS} random streams (seed {seed:#x}) in {took:.1?}: TCP close {}, close codes {:?}, client's own \
         codes {}, failures {}",
        counts[0],
        FUZZ_CODES.iter().zip(&counts[1..7]).collect::<Vec<_>>(),
        counts[7],
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {FUZZ_STREAMS} streams (seed {seed:#x}, rerun with WSGATE_FUZZ_SEED) failed, first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    assert_eq!(counts.iter().sum::<u64>(), FUZZ_STREAMS);
    // The generator reaches each of wsgate's checks.
    for (i, code) in FUZZ_CODES.iter().enumerate() {
        if [1002, 1007, 1008, 1009].contains(code) {
            assert!(counts[i + 1] > 0, "no stream got {code}: {counts:?}");
        }
    }

    // Nothing panicked, wsgate is still up and kept its memory in bounds, and the other connections still work.
    let log = proxy.drain_log();
    let panics: Vec<&String> = log.iter().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "wsgate panicked: {panics:?}");
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "wsgate is still running"
    );
    if let Some(kib) = peak_rss_kib(pid) {
        println!("wsgate's peak memory: {} MiB", kib / 1024);
        assert!(kib < 512 * 1024, "wsgate's peak memory was {kib} KiB");
    }
    echo(&mut bystander, "after the storm").await;
    let mut fresh = connect(&format!("ws://{}/fresh", proxy.addr)).await;
    for text in ["a fresh connection", "€ still works", ""] {
        echo(&mut fresh, text).await;
    }
    // Just under --max-frame-size; four messages stay within --messages-per-second 2 plus --burst 3.
    let big = vec![42u8; 50_000];
    fresh.send(Message::binary(big.clone())).await.expect("send");
    match next_message(&mut fresh).await {
        Message::Binary(b) => assert!(b[..] == big[..], "the echo of 50 000 bytes differs ({} bytes)", b.len()),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    fresh.close(None).await.expect("close");
    ws_end(&mut fresh).await;

    // And it still shuts down cleanly.
    proxy.signal(Signal::TERM);
    let (_, close) = close_after(&mut bystander).await;
    assert_eq!(close, Some((1001, "going away".into())));
    ws_end(&mut bystander).await;
    assert_eq!(proxy.exit_code().await, Some(0));
}
