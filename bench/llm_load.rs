//! Load for `scripts/bench-llm`: streamed chat completions over HTTP/1.1 through an OpenAI-compatible endpoint (an
//! LLM proxy, or the upstream itself), with the time to first token and every gap between tokens measured, and the
//! CPU time and RSS of watched processes read from /proc. One JSON line per run.
//!
//!   llm_load --target http://127.0.0.1:PORT/v1 [--key KEY] --concurrency C (--requests N | --duration S)
//!            --tokens T [--token-delay-ms D] [--model M] [--warmup W] [--warmup-model M] [--timeout S]
//!            [--name NAME] [--watch name=PID,...]
//!
//! C workers each keep one keep-alive connection and send one request after another. First W requests (20 by
//! default), of the model `--warmup-model` (the model itself by default), run at concurrency min(C, W) and are not
//! counted; once they are all done, the watched processes' CPU time (utime + stime) and RSS are read (`start`), the
//! measured window begins, and all C workers start. The window is N requests in all, or every request begun within
//! S seconds, and ends when the last of them ends; RSS is sampled every 100 ms in it (`peak`) and at its end.
//! `max_open_streams` is the most streams under way at once: first token in, end not yet (a proxy may answer with a
//! head at once and queue the request itself).
//!
//! Each request asks for T tokens (`max_tokens`) and `stream: true`. Time to first token: from the request being
//! written to the first event with text. Inter-token gap: between two events with text (events read at once share
//! a time). Token transit time: from when `llm_fake` wrote the token (the `@T` of its text, system-clock
//! microseconds) to when it was read here; absent for tokens without a stamp. A request counts as an error (and its
//! samples are dropped) when its connection fails, its status is not 200, an event is not JSON or carries an
//! `error`, its stream ends without `data: [DONE]`, it brings other than T tokens, or it lasts longer than the
//! timeout (120 s by default). Errors are counted and the first few shown.
//!
//! `--token-delay-ms D` is sent to the upstream as `metadata.token_delay_ms` and the `x-fake-token-delay-ms` header
//! (`llm_fake` honours both; a proxy may pass on neither) and reported.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// The most inter-token gaps, and transit times, kept (4 bytes each): a run past it says `samples_capped`.
const MAX_SAMPLES: usize = 25_000_000;
/// The most distinct error messages shown.
const MAX_ERROR_SAMPLES: usize = 5;
/// How often RSS is sampled in the window.
const RSS_EVERY: Duration = Duration::from_millis(100);

struct Args {
    addr: SocketAddr,
    path: String,
    authority: String,
    key: Option<String>,
    concurrency: usize,
    requests: Option<u64>,
    duration: Option<Duration>,
    tokens: u64,
    token_delay_ms: Option<u64>,
    model: String,
    warmup: u64,
    warmup_model: Option<String>,
    timeout: Duration,
    name: String,
    watch: Vec<(String, u32)>,
}

fn parse() -> Result<Args, String> {
    let mut target = None;
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        path: String::new(),
        authority: String::new(),
        key: None,
        concurrency: 1,
        requests: None,
        duration: None,
        tokens: 100,
        token_delay_ms: None,
        model: "fake".into(),
        warmup: 20,
        warmup_model: None,
        timeout: Duration::from_secs(120),
        name: String::new(),
        watch: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--target" => target = Some(value),
            "--key" => args.key = Some(value),
            "--concurrency" => args.concurrency = value.parse().map_err(|e| bad(&e))?,
            "--requests" => args.requests = Some(value.parse().map_err(|e| bad(&e))?),
            "--duration" => args.duration = Some(Duration::from_secs_f64(value.parse().map_err(|e| bad(&e))?)),
            "--tokens" => args.tokens = value.parse().map_err(|e| bad(&e))?,
            "--token-delay-ms" => args.token_delay_ms = Some(value.parse().map_err(|e| bad(&e))?),
            "--model" => args.model = value,
            "--warmup" => args.warmup = value.parse().map_err(|e| bad(&e))?,
            "--warmup-model" => args.warmup_model = Some(value),
            "--timeout" => args.timeout = Duration::from_secs_f64(value.parse().map_err(|e| bad(&e))?),
            "--name" => args.name = value,
            "--watch" => {
                for item in value.split(',').filter(|p| !p.is_empty()) {
                    let (name, pid) = item.split_once('=').ok_or(format!("--watch {item}: NAME=PID"))?;
                    let pid = pid.parse().map_err(|e| format!("--watch {item}: {e}"))?;
                    args.watch.push((name.to_string(), pid));
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let target = target.ok_or("--target http://IP:PORT/PREFIX is needed")?;
    let rest = target
        .strip_prefix("http://")
        .ok_or(format!("--target {target}: http:// only"))?;
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    args.addr = authority
        .parse()
        .map_err(|e| format!("--target {target}: {authority}: {e} (an IP address and a port)"))?;
    args.authority = authority.to_string();
    args.path = format!("/{}/chat/completions", prefix.trim_end_matches('/')).replace("//", "/");
    if args.requests.is_some() == args.duration.is_some() {
        return Err("one of --requests N and --duration S is needed".into());
    }
    if args.concurrency == 0 || args.tokens == 0 {
        return Err("--concurrency and --tokens must be at least 1".into());
    }
    if args.concurrency > 100_000 {
        return Err("--concurrency: at most 100000".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("llm_load: {e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("llm_load: runtime: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("llm_load: {e}");
            std::process::exit(1);
        }
    }
}

/// What the workers of one phase gather (one thread: plain cells).
#[derive(Default)]
struct Tally {
    requests: Cell<u64>,
    errors: Cell<u64>,
    error_samples: RefCell<Vec<String>>,
    tokens: Cell<u64>,
    ttft_us: RefCell<Vec<u32>>,
    gaps_us: RefCell<Vec<u32>>,
    transit_us: RefCell<Vec<u32>>,
    samples_capped: Cell<bool>,
    /// Streams whose first token is in and whose end is not.
    open: Cell<u64>,
    max_open: Cell<u64>,
}

impl Tally {
    fn error(&self, message: String) {
        self.errors.set(self.errors.get() + 1);
        let mut samples = self.error_samples.borrow_mut();
        if samples.len() < MAX_ERROR_SAMPLES && !samples.contains(&message) {
            samples.push(message);
        }
    }
}

/// Counts a stream open while it lives.
struct Open<'a>(&'a Tally);

impl<'a> Open<'a> {
    fn new(tally: &'a Tally) -> Open<'a> {
        tally.open.set(tally.open.get() + 1);
        tally.max_open.set(tally.max_open.get().max(tally.open.get()));
        Open(tally)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
    }
}

/// The requests a phase may still begin: a count, or a deadline.
enum Budget {
    Count(Cell<u64>),
    Until(Instant),
}

impl Budget {
    fn take(&self) -> bool {
        match self {
            Budget::Count(left) => {
                let n = left.get();
                if n == 0 {
                    return false;
                }
                left.set(n - 1);
                true
            }
            Budget::Until(deadline) => Instant::now() < *deadline,
        }
    }
}

type Sender = SendRequest<Full<Bytes>>;

async fn run(args: &Args) -> Result<String, String> {
    let request_body = |model: &str| {
        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Count to a hundred, one word at a time."}],
            "max_tokens": args.tokens,
            "stream": true,
        });
        if let Some(delay) = args.token_delay_ms {
            body["metadata"] = json!({"token_delay_ms": delay});
        }
        Bytes::from(body.to_string())
    };
    let body = request_body(&args.model);
    let conns: Vec<RefCell<Option<Sender>>> = (0..args.concurrency).map(|_| RefCell::new(None)).collect();

    // Warm-up: not counted.
    let warm = Tally::default();
    if args.warmup > 0 {
        let budget = Budget::Count(Cell::new(args.warmup));
        let body = request_body(args.warmup_model.as_deref().unwrap_or(&args.model));
        let n = args.concurrency.min(usize::try_from(args.warmup).unwrap_or(usize::MAX));
        join_all(conns[..n].iter().map(|c| worker(args, &body, c, &budget, &warm))).await;
    }

    // The measured window.
    let watched: Vec<Watched> = args
        .watch
        .iter()
        .map(|(name, pid)| Watched::start(name, *pid))
        .collect::<Result<_, _>>()?;
    let tally = Tally::default();
    let budget = match (args.requests, args.duration) {
        (Some(n), _) => Budget::Count(Cell::new(n)),
        (None, Some(d)) => Budget::Until(Instant::now() + d),
        (None, None) => return Err("no --requests or --duration".into()),
    };
    let started = Instant::now();
    let workers = join_all(conns.iter().map(|c| worker(args, &body, c, &budget, &tally)));
    let sampler = async {
        // Ends with the workers (below), which are bounded by their budget and the timeout of each request.
        loop {
            tokio::time::sleep(RSS_EVERY).await;
            for w in &watched {
                w.sample();
            }
        }
    };
    tokio::select! {
        _ = workers => {}
        _ = sampler => {}
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut cpu = serde_json::Map::new();
    let mut rss = serde_json::Map::new();
    for w in &watched {
        w.sample();
        let (cpu_s, rss_kib) = w.finish();
        cpu.insert(w.name.clone(), cpu_s);
        rss.insert(w.name.clone(), rss_kib);
    }
    let tokens = tally.tokens.get();
    let line = json!({
        "name": args.name,
        "model": args.model,
        "concurrency": args.concurrency,
        "tokens_per_request": args.tokens,
        "token_delay_ms": args.token_delay_ms,
        "warmup_requests": warm.requests.get(),
        "warmup_errors": warm.errors.get(),
        "requests": tally.requests.get(),
        "errors": tally.errors.get(),
        "error_samples": warm.error_samples.borrow().iter().chain(tally.error_samples.borrow().iter())
            .take(MAX_ERROR_SAMPLES).collect::<Vec<_>>(),
        "tokens": tokens,
        "duration_s": round(elapsed, 3),
        "tokens_per_s": round(tokens as f64 / elapsed.max(1e-9), 0),
        "max_open_streams": tally.max_open.get(),
        "ttft_us": stats(&mut tally.ttft_us.borrow_mut()),
        "inter_token_us": stats(&mut tally.gaps_us.borrow_mut()),
        "token_transit_us": stats(&mut tally.transit_us.borrow_mut()),
        "samples_capped": tally.samples_capped.get(),
        "cpu_s": cpu,
        "rss_kib": rss,
    });
    Ok(line.to_string())
}

/// One connection's loop: requests one after another while the budget allows.
async fn worker(args: &Args, body: &Bytes, conn: &RefCell<Option<Sender>>, budget: &Budget, tally: &Tally) {
    while budget.take() {
        tally.requests.set(tally.requests.get() + 1);
        let reused = conn.borrow_mut().take();
        let mut sender = match reused {
            Some(s) if !s.is_closed() => s,
            _ => match connect(args).await {
                Ok(s) => s,
                Err(e) => {
                    tally.error(e);
                    // Not a tight loop against a server that refuses.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match timeout(args.timeout, request(args, body, &mut sender, tally)).await {
            Ok(Ok(())) => *conn.borrow_mut() = Some(sender),
            Ok(Err(e)) => tally.error(e),
            Err(_) => tally.error(format!("no complete answer within {:?}", args.timeout)),
        }
    }
}

async fn connect(args: &Args) -> Result<Sender, String> {
    let tcp = TcpStream::connect(args.addr)
        .await
        .map_err(|e| format!("connect to {}: {e}", args.addr))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

/// One streamed completion; its samples go to `tally` only when it succeeds.
async fn request(args: &Args, body: &Bytes, sender: &mut Sender, tally: &Tally) -> Result<(), String> {
    sender.ready().await.map_err(|e| format!("connection: {e}"))?;
    let mut req = Request::post(&args.path)
        .header(hyper::header::HOST, &args.authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "text/event-stream");
    if let Some(key) = &args.key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if let Some(delay) = args.token_delay_ms {
        req = req.header("x-fake-token-delay-ms", delay);
    }
    let req = req.body(Full::new(body.clone())).map_err(|e| format!("request: {e}"))?;
    let sent = Instant::now();
    let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    if status != StatusCode::OK {
        let text = match Limited::new(resp.into_body(), 64 * 1024).collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).chars().take(300).collect(),
            Err(e) => format!("(body unread: {e})"),
        };
        return Err(format!("status {status}: {text}"));
    }
    let mut open: Option<Open> = None;
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut ttft: Option<u32> = None;
    let mut gaps: Vec<u32> = Vec::with_capacity(usize::try_from(args.tokens).unwrap_or(0).min(1 << 16));
    let mut transits: Vec<u32> = Vec::with_capacity(gaps.capacity());
    let mut last = sent;
    let mut tokens = 0u64;
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("stream: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        buf.extend_from_slice(&data);
        let mut start = 0;
        while let Some(at) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + at];
            start += at + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(payload) = line.strip_prefix(b"data:") else {
                continue;
            };
            let payload = payload.strip_prefix(b" ").unwrap_or(payload);
            if done {
                continue;
            }
            if payload == b"[DONE]" {
                done = true;
                continue;
            }
            let event: Event = serde_json::from_slice(payload).map_err(|e| {
                format!(
                    "an event that is not a chunk ({e}): {}",
                    String::from_utf8_lossy(payload).chars().take(200).collect::<String>()
                )
            })?;
            if let Some(error) = event.error {
                return Err(format!("error event: {error}"));
            }
            let text = event
                .choices
                .iter()
                .filter_map(|c| c.delta.as_ref()?.content.as_deref())
                .find(|t| !t.is_empty());
            if let Some(text) = text {
                if let Some(at) = text
                    .trim_end()
                    .rsplit_once('@')
                    .and_then(|(_, at)| at.parse::<u128>().ok())
                {
                    transits.push(u32::try_from(wall_us.saturating_sub(at)).unwrap_or(u32::MAX));
                }
                tokens += 1;
                let us = micros(now - last);
                if ttft.is_none() {
                    ttft = Some(us);
                    open = Some(Open::new(tally));
                } else {
                    gaps.push(us);
                }
                last = now;
            }
        }
        buf.drain(..start);
    }
    drop(open);
    if !done {
        return Err(format!("the stream ended without [DONE] after {tokens} tokens"));
    }
    if tokens != args.tokens {
        return Err(format!("{tokens} tokens, not {}", args.tokens));
    }
    tally.tokens.set(tally.tokens.get() + tokens);
    if let Some(ttft) = ttft {
        tally.ttft_us.borrow_mut().push(ttft);
    }
    for (all, mine) in [(&tally.gaps_us, &gaps), (&tally.transit_us, &transits)] {
        let mut all = all.borrow_mut();
        if all.len() + mine.len() <= MAX_SAMPLES {
            all.extend_from_slice(mine);
        } else {
            tally.samples_capped.set(true);
        }
    }
    Ok(())
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// p50, p90, p99 and mean of microsecond samples (sorted here).
fn stats(samples: &mut [u32]) -> Value {
    if samples.is_empty() {
        return json!({"n": 0, "p50": null, "p90": null, "p99": null, "mean": null});
    }
    samples.sort_unstable();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let mean = samples.iter().map(|&s| u64::from(s)).sum::<u64>() as f64 / samples.len() as f64;
    json!({"n": samples.len(), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": round(mean, 1)})
}

/// A watched process: its CPU time at the window's start, and its RSS at the start and at its highest.
struct Watched {
    name: String,
    pid: u32,
    cpu_start: f64,
    rss_start: u64,
    rss_peak: Cell<u64>,
    rss_last: Cell<u64>,
}

impl Watched {
    fn start(name: &str, pid: u32) -> Result<Watched, String> {
        let cpu_start = cpu_seconds(pid).ok_or(format!("--watch {name}={pid}: no such process"))?;
        let rss_start = rss_kib(pid).ok_or(format!("--watch {name}={pid}: no VmRSS"))?;
        Ok(Watched {
            name: name.to_string(),
            pid,
            cpu_start,
            rss_start,
            rss_peak: Cell::new(rss_start),
            rss_last: Cell::new(rss_start),
        })
    }

    fn sample(&self) {
        if let Some(rss) = rss_kib(self.pid) {
            self.rss_last.set(rss);
            self.rss_peak.set(self.rss_peak.get().max(rss));
        }
    }

    /// CPU seconds in the window (null if the process is gone) and RSS figures.
    fn finish(&self) -> (Value, Value) {
        let cpu = match cpu_seconds(self.pid) {
            Some(end) => json!(round(end - self.cpu_start, 3)),
            None => {
                eprintln!("llm_load: the watched process {}={} is gone", self.name, self.pid);
                Value::Null
            }
        };
        let rss = json!({
            "start": self.rss_start,
            "end": self.rss_last.get(),
            "peak": self.rss_peak.get(),
        });
        (cpu, rss)
    }
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU seconds of a process so far (all its threads), at 100 ticks a second.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}
