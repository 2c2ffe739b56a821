//! The soak of `scripts/soak`: a steady population of WebSocket sessions through a proxy to an echo
//! backend, churned at a steady rate, each sending messages of mixed sizes and kinds and checking every echo, for
//! as long as asked, while the proxy's RSS and CPU are read from /proc. One JSON line per report, a summary JSON
//! line at the end, and exit 1 when the verdict is not `ok` (any error, any lost message, or RSS grown more than
//! `--max-growth` percent from the end of the warm-up to the end).
//!
//!   soak --target ADDR [--sessions N] [--rate MSGS/S] [--churn SESSIONS/S] [--duration S] [--warmup S]
//!        [--report S] [--watch PID] [--source-ips M] [--in-flight K] [--seed X] [--max-growth PCT]
//!
//! Sessions come from 127.0.0.2..127.0.0.(M+1) (as ../shared/bench's wsload does) so that the local port range is
//! not the limit. Every message is a deterministic function of (seed, session, sequence number): 16 B to 64 KiB,
//! a third of them text; the sequence number is in its first bytes. An echo must be the same bytes, in order; a
//! different one is a mismatch and ends the session, and whatever was in flight when a session fails is lost.
//! At most K messages are in flight per session: a send that would exceed it is skipped and counted (`deferred`).
//! Churn: R times a second one open session, picked pseudo-randomly from the seed, is closed (close 1000, and the
//! close reply awaited) and its slot opens a new one, so lives are random-ish and deterministic in distribution.
//! Every step is bounded: connect, upgrade, send, echo and close each have a timeout, the final drain a deadline,
//! and the whole run a deadline of its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed open, before the slot tries again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// For every session to drain its echoes and close at the end (each echo already has ECHO_TIMEOUT).
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// Beyond duration + drain: the whole run's deadline.
const SLACK: Duration = Duration::from_secs(60);
/// Errors described on stderr; later ones are only counted.
const ERRORS_DESCRIBED: u64 = 20;
const MAX_MESSAGE: usize = 64 << 10;

type Ws = WebSocketStream<TcpStream>;

struct Args {
    target: SocketAddr,
    sessions: usize,
    rate: f64,
    churn: f64,
    duration: Duration,
    warmup: Duration,
    report: Duration,
    watch: Option<u32>,
    source_ips: u32,
    in_flight: usize,
    seed: u64,
    max_growth: f64,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut target = None;
    let mut args = Args {
        target: SocketAddr::from(([127, 0, 0, 1], 0)),
        sessions: 500,
        rate: 1000.0,
        churn: 5.0,
        duration: Duration::from_secs(600),
        warmup: Duration::from_secs(60),
        report: Duration::from_secs(10),
        watch: None,
        source_ips: 50,
        in_flight: 4,
        seed: 13,
        max_growth: 5.0,
    };
    let secs = |s: f64| Duration::try_from_secs_f64(s).map_err(|e| e.to_string());
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--target" => target = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--sessions" => args.sessions = value.parse().map_err(|e| bad(&e))?,
            "--rate" => args.rate = value.parse().map_err(|e| bad(&e))?,
            "--churn" => args.churn = value.parse().map_err(|e| bad(&e))?,
            "--duration" => args.duration = secs(value.parse().map_err(|e| bad(&e))?).map_err(|e| bad(&e))?,
            "--warmup" => args.warmup = secs(value.parse().map_err(|e| bad(&e))?).map_err(|e| bad(&e))?,
            "--report" => args.report = secs(value.parse().map_err(|e| bad(&e))?).map_err(|e| bad(&e))?,
            "--watch" => args.watch = Some(value.parse().map_err(|e| bad(&e))?),
            "--source-ips" => args.source_ips = value.parse().map_err(|e| bad(&e))?,
            "--in-flight" => args.in_flight = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.seed = value.parse().map_err(|e| bad(&e))?,
            "--max-growth" => args.max_growth = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    args.target = target.ok_or("--target ADDR is needed")?;
    match args.target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {}
        other => return Err(format!("--target {other}: only 127.0.0.0/8")),
    }
    if args.sessions == 0 || args.in_flight == 0 || !(1..=250).contains(&args.source_ips) {
        return Err("--sessions and --in-flight must be at least 1, --source-ips 1..250".into());
    }
    let rate_ok = args.rate > 0.0 && args.rate.is_finite();
    let churn_ok = args.churn >= 0.0 && args.churn.is_finite();
    if !rate_ok || !churn_ok {
        return Err("--rate must be above 0 and --churn at least 0".into());
    }
    if args.report.is_zero() {
        return Err("--report must be above 0".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let deadline = args.duration + DRAIN_DEADLINE + SLACK;
    let ok = runtime.block_on(async {
        match timeout(deadline, soak(Arc::new(args))).await {
            Ok(ok) => ok,
            Err(_) => {
                eprintln!("soak: the run's deadline ({} s) passed", deadline.as_secs());
                false
            }
        }
    });
    // Sessions still closing are not waited for.
    runtime.shutdown_background();
    std::process::exit(if ok { 0 } else { 1 });
}

/// How a session went wrong.
#[derive(Clone, Copy)]
enum Kind {
    /// The TCP connect failed or timed out.
    Connect,
    /// The upgrade failed or timed out.
    Handshake,
    /// The connection ended, or a close frame came, while the session was live.
    Closed,
    /// An echo that is not the next message sent.
    Mismatch,
    /// A send or an echo took longer than its timeout.
    Timeout,
    /// Our close got no proper reply (close 1000) in time.
    Close,
}

const KINDS: [(Kind, &str); 6] = [
    (Kind::Connect, "connect"),
    (Kind::Handshake, "handshake"),
    (Kind::Closed, "closed_unexpectedly"),
    (Kind::Mismatch, "mismatch"),
    (Kind::Timeout, "timeout"),
    (Kind::Close, "close"),
];

#[derive(Default)]
struct Stats {
    open: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    echoed: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_echoed: AtomicU64,
    deferred: AtomicU64,
    lost: AtomicU64,
    churn_missed: AtomicU64,
    errors: [AtomicU64; KINDS.len()],
}

impl Stats {
    fn error(&self, kind: Kind, session: u64, detail: impl std::fmt::Display) {
        let n: u64 = self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum();
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        if n < ERRORS_DESCRIBED {
            let name = KINDS[kind as usize].1;
            eprintln!("soak: session {session}: {name}: {detail}");
        }
    }

    fn errors(&self) -> (serde_json::Value, u64) {
        let mut map = serde_json::Map::new();
        let mut total = 0;
        for (i, (_, name)) in KINDS.iter().enumerate() {
            let n = self.errors[i].load(Ordering::Relaxed);
            total += n;
            map.insert((*name).into(), n.into());
        }
        map.insert("total".into(), total.into());
        (map.into(), total)
    }

    fn get(&self, counter: impl Fn(&Stats) -> &AtomicU64) -> u64 {
        counter(self).load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One place in the population: a session at a time, replaced when it closes.
#[derive(Default)]
struct Slot {
    /// A live session that may be churned.
    open: AtomicBool,
    close: Notify,
}

struct Ctx {
    args: Arc<Args>,
    stats: Stats,
    slots: Vec<Slot>,
    /// The next session number: its source address, its messages and its send phase follow from it.
    next_session: AtomicU64,
    stop: CancellationToken,
    config: WebSocketConfig,
}

async fn soak(args: Arc<Args>) -> bool {
    let ctx = Arc::new(Ctx {
        slots: (0..args.sessions).map(|_| Slot::default()).collect(),
        args: args.clone(),
        stats: Stats::default(),
        next_session: AtomicU64::new(0),
        stop: CancellationToken::new(),
        config: WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(MAX_MESSAGE * 2))
            .max_frame_size(Some(MAX_MESSAGE * 2)),
    });
    let started = Instant::now();
    let mut rss = Rss {
        first: args.watch.and_then(rss_kib),
        ..Rss::default()
    };
    let mut tasks = JoinSet::new();
    for slot in 0..args.sessions {
        tasks.spawn(run_slot(ctx.clone(), slot));
    }
    let churner = tokio::spawn(churn(ctx.clone()));

    // Sample RSS every second (for the maximum and the end of the warm-up), report every --report.
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next_report = started + args.report;
    let end = started + args.duration;
    let mut proxy_gone = false;
    loop {
        second.tick().await;
        let now = Instant::now();
        if let Some(pid) = args.watch {
            match rss_kib(pid) {
                Some(kib) => {
                    rss.max = rss.max.max(kib);
                    rss.last = Some(kib);
                    if rss.after_warmup.is_none() && now >= started + args.warmup {
                        rss.after_warmup = Some(kib);
                    }
                }
                None if !proxy_gone => {
                    eprintln!("soak: the watched process {pid} is gone");
                    proxy_gone = true;
                }
                None => {}
            }
        }
        if now >= end {
            break;
        }
        if now >= next_report {
            next_report += args.report;
            println!("{}", report(&ctx, started, rss.last));
        }
    }
    let rss_end = rss.last;
    let cpu_end = args.watch.and_then(cpu_seconds);
    println!("{}", report(&ctx, started, rss_end));

    // Drain: every session stops sending, waits for its echoes, closes; bounded.
    ctx.stop.cancel();
    churner.abort();
    let drain_deadline = Instant::now() + DRAIN_DEADLINE;
    let mut stuck = 0;
    while !tasks.is_empty() {
        match tokio::time::timeout_at(drain_deadline, tasks.join_next()).await {
            Ok(_) => {}
            Err(_) => {
                stuck = tasks.len();
                tasks.abort_all();
                break;
            }
        }
    }
    if stuck > 0 {
        eprintln!(
            "soak: {stuck} sessions had not closed {} s after the end",
            DRAIN_DEADLINE.as_secs()
        );
    }
    let drained_in = started.elapsed().as_secs_f64() - args.duration.as_secs_f64();
    // Let the proxy finish its side of the closes before the last look.
    tokio::time::sleep(Duration::from_secs(1)).await;
    rss.after_close = args.watch.and_then(rss_kib);

    let s = &ctx.stats;
    let (errors, error_total) = s.errors();
    let mismatched = s.get(|s| &s.errors[Kind::Mismatch as usize]);
    // Whatever is neither echoed, mismatched nor counted lost was in a session cut at the drain deadline.
    let accounted = s.get(|s| &s.echoed) + mismatched + s.get(|s| &s.lost);
    let lost = s.get(|s| &s.lost) + s.get(|s| &s.sent).saturating_sub(accounted);
    let growth = match (rss.after_warmup, rss_end) {
        (Some(base), Some(last)) if base > 0 => Some((last as f64 - base as f64) / base as f64 * 100.0),
        _ => None,
    };
    let mut why = Vec::new();
    if error_total > 0 {
        why.push(format!("{error_total} errors"));
    }
    if lost > 0 {
        why.push(format!("{lost} messages lost"));
    }
    if stuck > 0 {
        why.push(format!("{stuck} sessions not closed by the drain deadline"));
    }
    if s.get(|s| &s.echoed) == 0 {
        why.push("no message echoed".into());
    }
    if args.watch.is_some() {
        if proxy_gone {
            why.push("the watched process ended".into());
        }
        match growth {
            Some(g) if g > args.max_growth => why.push(format!("RSS grew {g:.1} % after the warm-up")),
            Some(_) => {}
            None => why.push("no RSS after the warm-up to compare with (duration shorter than warm-up?)".into()),
        }
    }
    let ok = why.is_empty();
    let summary = json!({
        "type": "summary",
        "target": args.target.to_string(),
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "drain_s": round(drained_in, 3),
        "sessions": args.sessions,
        "rate_per_s": args.rate,
        "churn_per_s": args.churn,
        "in_flight_max": args.in_flight,
        "source_ips": args.source_ips,
        "seed": args.seed,
        "message_mix": "16 B-64 KiB (20% <64 B, 25% <256 B, 20% <1 KiB, 15% <4 KiB, 10% <16 KiB, 6% <32 KiB, \
                        4% <=64 KiB), 1/3 text",
        "opened": s.get(|s| &s.opened),
        "closed": s.get(|s| &s.closed),
        "sent": s.get(|s| &s.sent),
        "echoed": s.get(|s| &s.echoed),
        "bytes_sent": s.get(|s| &s.bytes_sent),
        "bytes_echoed": s.get(|s| &s.bytes_echoed),
        "deferred": s.get(|s| &s.deferred),
        "churn_missed": s.get(|s| &s.churn_missed),
        "errors": errors,
        "lost": lost,
        "rss_kib": {
            "first": rss.first,
            "after_warmup": rss.after_warmup,
            "max": (rss.max > 0).then_some(rss.max),
            "last": rss_end,
            "after_close": rss.after_close,
        },
        "rss_growth_pct": growth.map(|g| round(g, 2)),
        "max_growth_pct": args.max_growth,
        "cpu_s": cpu_end.map(|c| round(c, 2)),
        "verdict": if ok { "ok" } else { "fail" },
        "why": why,
    });
    println!("{summary}");
    ok
}

#[derive(Default)]
struct Rss {
    first: Option<u64>,
    after_warmup: Option<u64>,
    max: u64,
    last: Option<u64>,
    after_close: Option<u64>,
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

fn report(ctx: &Ctx, started: Instant, rss: Option<u64>) -> serde_json::Value {
    let s = &ctx.stats;
    let (errors, _) = s.errors();
    let sent = s.get(|s| &s.sent);
    let done = s.get(|s| &s.echoed) + s.get(|s| &s.errors[Kind::Mismatch as usize]) + s.get(|s| &s.lost);
    json!({
        "type": "report",
        "elapsed_s": round(started.elapsed().as_secs_f64(), 1),
        "sessions_open": s.get(|s| &s.open),
        "opened": s.get(|s| &s.opened),
        "closed": s.get(|s| &s.closed),
        "sent": sent,
        "echoed": s.get(|s| &s.echoed),
        "in_flight": sent.saturating_sub(done),
        "bytes_sent": s.get(|s| &s.bytes_sent),
        "bytes_echoed": s.get(|s| &s.bytes_echoed),
        "deferred": s.get(|s| &s.deferred),
        "errors": errors,
        "lost": s.get(|s| &s.lost),
        "rss_kib": rss,
        "cpu_s": ctx.args.watch.and_then(cpu_seconds).map(|c| round(c, 2)),
    })
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// splitmix64: the one source of every choice the soak makes.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keeps a session open in this slot until the end, replacing each one that closes.
async fn run_slot(ctx: Arc<Ctx>, slot: usize) {
    while !ctx.stop.is_cancelled() {
        let session = ctx.next_session.fetch_add(1, Ordering::Relaxed);
        let ws = tokio::select! {
            ws = open(&ctx, session) => ws,
            _ = ctx.stop.cancelled() => return,
        };
        let ws = match ws {
            Ok(ws) => ws,
            Err((kind, detail)) => {
                ctx.stats.error(kind, session, detail);
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => continue,
                    _ = ctx.stop.cancelled() => return,
                }
            }
        };
        Stats::add(&ctx.stats.opened, 1);
        Stats::add(&ctx.stats.open, 1);
        run_session(&ctx, &ctx.slots[slot], session, ws).await;
        ctx.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn open(ctx: &Ctx, session: u64) -> Result<Ws, (Kind, String)> {
    let host = 2 + (session % u64::from(ctx.args.source_ips)) as u32;
    let source = IpAddr::V4(Ipv4Addr::from(0x7f00_0000u32 + host));
    let socket = TcpSocket::new_v4().map_err(|e| (Kind::Connect, format!("socket: {e}")))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| (Kind::Connect, format!("bind {source}: {e}")))?;
    let stream = match timeout(CONNECT_TIMEOUT, socket.connect(ctx.args.target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err((Kind::Connect, format!("from {source}: {e}"))),
        Err(_) => {
            return Err((
                Kind::Connect,
                format!("from {source}: no connection within {CONNECT_TIMEOUT:?}"),
            ));
        }
    };
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{}/soak/{session}", ctx.args.target);
    match timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::client_async_with_config(url, stream, Some(ctx.config)),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err((Kind::Handshake, e.to_string())),
        Err(_) => Err((Kind::Handshake, format!("no 101 within {HANDSHAKE_TIMEOUT:?}"))),
    }
}

/// One session's life: send at the per-session share of the rate and check echoes until churned or the end,
/// then drain and close properly. A failure on either side ends both (`failed`).
async fn run_session(ctx: &Ctx, slot: &Slot, session: u64, ws: Ws) {
    let churned = slot.close.notified();
    tokio::pin!(churned);
    // Registered before the slot is marked open, so a churn tick that sees it open always reaches it.
    churned.as_mut().enable();
    slot.open.store(true, Ordering::Release);
    let (sink, stream) = ws.split();
    let (tx, rx) = mpsc::channel(ctx.args.in_flight);
    let failed = CancellationToken::new();
    let (sink, stream) = tokio::join!(
        write(ctx, session, sink, tx, churned, &failed),
        read(ctx, session, stream, rx, &failed)
    );
    slot.open.store(false, Ordering::Release);
    if failed.is_cancelled() {
        return;
    }
    let Ok(ws) = sink.reunite(stream) else {
        unreachable!("the two halves of one session");
    };
    close(ctx, session, ws).await;
}

async fn write(
    ctx: &Ctx,
    session: u64,
    mut sink: SplitSink<Ws, Message>,
    tx: mpsc::Sender<Message>,
    mut churned: Pin<&mut Notified<'_>>,
    failed: &CancellationToken,
) -> SplitSink<Ws, Message> {
    // Each session sends its share of the rate, at a phase of its own.
    let period = Duration::from_secs_f64(ctx.args.sessions as f64 / ctx.args.rate);
    let phase = period.mul_f64((mix(session ^ ctx.args.seed) >> 11) as f64 / (1u64 << 53) as f64);
    let mut tick = tokio::time::interval_at(Instant::now() + phase, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = failed.cancelled() => break,
            _ = ctx.stop.cancelled() => break,
            _ = churned.as_mut() => break,
            _ = tick.tick() => {}
        }
        let permit = match tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => {
                Stats::add(&ctx.stats.deferred, 1);
                continue;
            }
            Err(mpsc::error::TrySendError::Closed(())) => break,
        };
        let msg = payload(ctx.args.seed, session, seq);
        seq += 1;
        Stats::add(&ctx.stats.sent, 1);
        Stats::add(&ctx.stats.bytes_sent, msg.len() as u64);
        permit.send(msg.clone());
        match timeout(SEND_TIMEOUT, sink.send(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                ctx.stats.error(Kind::Closed, session, format!("send: {e}"));
                failed.cancel();
                break;
            }
            Err(_) => {
                ctx.stats
                    .error(Kind::Timeout, session, format!("send took over {SEND_TIMEOUT:?}"));
                failed.cancel();
                break;
            }
        }
    }
    sink
}

/// Checks every echo against what was sent, in order, until the writer is done and every echo is in.
async fn read(
    ctx: &Ctx,
    session: u64,
    mut stream: SplitStream<Ws>,
    mut rx: mpsc::Receiver<Message>,
    failed: &CancellationToken,
) -> SplitStream<Ws> {
    loop {
        let expected = tokio::select! {
            biased;
            _ = failed.cancelled() => break,
            expected = rx.recv() => match expected {
                Some(expected) => expected,
                None => return stream,
            },
        };
        let got = tokio::select! {
            biased;
            _ = failed.cancelled() => {
                Stats::add(&ctx.stats.lost, 1);
                break;
            }
            got = timeout(ECHO_TIMEOUT, next_data(&mut stream)) => got,
        };
        match got {
            Ok(Ok(msg)) if msg == expected => {
                Stats::add(&ctx.stats.echoed, 1);
                Stats::add(&ctx.stats.bytes_echoed, msg.len() as u64);
                continue;
            }
            Ok(Ok(msg)) => {
                let detail = format!("expected {}, got {}", describe(&expected), describe(&msg));
                ctx.stats.error(Kind::Mismatch, session, detail);
            }
            Ok(Err(detail)) => {
                Stats::add(&ctx.stats.lost, 1);
                ctx.stats.error(Kind::Closed, session, detail);
            }
            Err(_) => {
                Stats::add(&ctx.stats.lost, 1);
                let detail = format!("no echo of {} within {ECHO_TIMEOUT:?}", describe(&expected));
                ctx.stats.error(Kind::Timeout, session, detail);
            }
        }
        failed.cancel();
        break;
    }
    // Everything still in flight when the session failed.
    rx.close();
    while rx.try_recv().is_ok() {
        Stats::add(&ctx.stats.lost, 1);
    }
    stream
}

/// The next text or binary message; `Err` when the connection ends or a close frame comes first.
async fn next_data(stream: &mut SplitStream<Ws>) -> Result<Message, String> {
    loop {
        match stream.next().await {
            Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => return Ok(msg),
            Some(Ok(Message::Close(frame))) => return Err(format!("close frame from the proxy: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("the connection ended".into()),
        }
    }
}

/// Close 1000, and the close reply (close 1000 too) within CLOSE_TIMEOUT.
async fn close(ctx: &Ctx, session: u64, mut ws: Ws) {
    let result = timeout(CLOSE_TIMEOUT, async {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "soak".into(),
        };
        ws.close(Some(frame))
            .await
            .map_err(|e| format!("sending the close: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(reply)))) if reply.code == CloseCode::Normal => return Ok(()),
                Some(Ok(Message::Close(other))) => return Err(format!("close reply {other:?}, not 1000")),
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    return Err(format!("{} after the close", describe(&msg)));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("waiting for the close reply: {e}")),
                None => return Err("the connection ended without a close reply".to_string()),
            }
        }
    })
    .await;
    match result {
        Ok(Ok(())) => Stats::add(&ctx.stats.closed, 1),
        Ok(Err(detail)) => ctx.stats.error(Kind::Close, session, detail),
        Err(_) => ctx
            .stats
            .error(Kind::Close, session, format!("no close reply within {CLOSE_TIMEOUT:?}")),
    }
}

/// `--churn` times a second, closes one open session picked from the seed (the next open one after it when the
/// pick is between sessions).
async fn churn(ctx: Arc<Ctx>) {
    if ctx.args.churn <= 0.0 {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / ctx.args.churn);
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let n = ctx.slots.len();
    for round in 0u64.. {
        tick.tick().await;
        let start = (mix(ctx.args.seed ^ 0xc4a2_0000_0000_0000 ^ round) % n as u64) as usize;
        let picked = (0..n)
            .map(|k| &ctx.slots[(start + k) % n])
            .find(|slot| slot.open.swap(false, Ordering::AcqRel));
        match picked {
            Some(slot) => slot.close.notify_waiters(),
            None => Stats::add(&ctx.stats.churn_missed, 1),
        }
    }
}

/// The size of message `h` picks: 16 B to 64 KiB, mostly small.
fn size(h: u64) -> usize {
    const BUCKETS: [(u64, usize, usize); 7] = [
        (20, 16, 63),
        (45, 64, 255),
        (65, 256, 1023),
        (80, 1024, 4095),
        (90, 4096, 16383),
        (96, 16384, 32767),
        (100, 32768, MAX_MESSAGE),
    ];
    let pick = (h >> 8) % 100;
    let (_, lo, hi) = BUCKETS
        .iter()
        .find(|(below, _, _)| pick < *below)
        .copied()
        .unwrap_or(BUCKETS[6]);
    lo + ((h >> 40) as usize % (hi - lo + 1))
}

/// Message `seq` of `session`: its sequence number first (8 bytes big-endian in binary, 16 hex digits in text),
/// then the session number (binary) and filler from the same seed, so any mix-up between sessions or messages
/// shows.
fn payload(seed: u64, session: u64, seq: u64) -> Message {
    let h = mix(seed ^ mix(session) ^ mix(seq.wrapping_add(0x5eed)));
    let len = size(h);
    let text = (h >> 4).is_multiple_of(3);
    let mut bytes = Vec::with_capacity(len);
    if text {
        bytes.extend_from_slice(format!("{seq:016x}").as_bytes());
    } else {
        bytes.extend_from_slice(&seq.to_be_bytes());
        bytes.extend_from_slice(&session.to_be_bytes());
    }
    let mut state = h;
    while bytes.len() < len {
        state = mix(state);
        for b in state.to_le_bytes() {
            if bytes.len() < len {
                bytes.push(if text { b'a' + b % 26 } else { b });
            }
        }
    }
    if text {
        Message::text(String::from_utf8(bytes).expect("ASCII is UTF-8"))
    } else {
        Message::binary(bytes)
    }
}

/// Kind, length and the sequence number a message carries, for error details.
fn describe(msg: &Message) -> String {
    match msg {
        Message::Binary(b) => {
            let seq = b
                .get(..8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes);
            format!("binary of {} B (seq {seq:?})", b.len())
        }
        Message::Text(t) => {
            let seq = t.as_str().get(..16).and_then(|s| u64::from_str_radix(s, 16).ok());
            format!("text of {} B (seq {seq:?})", t.len())
        }
        other => format!("{other:?}"),
    }
}
