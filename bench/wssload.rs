//! Load over TLS for `scripts/bench-tls`: a WebSocket echo backend, and wss clients that measure a proxy in front
//! of it. One JSON line per run.
//!
//!   wssload backend --listen ADDR
//!   wssload handshake --target ADDR --name NAME --ca FILE -c C -d SECS --watch PID[,PID..]
//!   wssload throughput --target ADDR --name NAME --ca FILE -c C -w W -s SIZE -d SECS --watch PID[,PID..]
//!
//! `--header NAME:VALUE` (repeatable) adds a header to every upgrade request (a bearer token, say).
//!
//! `handshake`: C loops of TCP connect + a full TLS handshake (no resumption) + WebSocket upgrade + one echo +
//! close. `throughput`: C connections with W messages of SIZE bytes in flight each, every echo checked; like
//! ../shared/bench's wsload and echo-backend, the client and the backend answer every message already read with
//! one flush. Both warm
//! up for a second, then count for SECS and read the CPU time (user + system) the watched processes spent in that
//! window from /proc, so start-up and teardown are not counted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

struct Args {
    mode: String,
    listen: Option<SocketAddr>,
    target: Option<SocketAddr>,
    name: String,
    ca: Option<PathBuf>,
    conns: usize,
    window: usize,
    size: usize,
    duration: Duration,
    watch: Vec<u32>,
    /// Extra upgrade request headers (`--header NAME:VALUE`).
    headers: Vec<(String, String)>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("usage: wssload backend|handshake|throughput ...")?;
    let mut args = Args {
        mode,
        listen: None,
        target: None,
        name: "localhost".into(),
        ca: None,
        conns: 32,
        window: 16,
        size: 64,
        duration: Duration::from_secs(5),
        watch: Vec::new(),
        headers: Vec::new(),
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => args.listen = Some(value.parse().map_err(|e| bad(&e))?),
            "--target" => args.target = Some(value.parse().map_err(|e| bad(&e))?),
            "--name" => args.name = value,
            "--ca" => args.ca = Some(value.into()),
            "-c" => args.conns = value.parse().map_err(|e| bad(&e))?,
            "-w" => args.window = value.parse().map_err(|e| bad(&e))?,
            "-s" => args.size = value.parse().map_err(|e| bad(&e))?,
            "-d" => args.duration = Duration::from_secs_f64(value.parse().map_err(|e| bad(&e))?),
            "--header" => {
                let (name, value) = value.split_once(':').ok_or(format!("--header {value}: NAME:VALUE"))?;
                args.headers.push((name.trim().to_string(), value.trim().to_string()));
            }
            "--watch" => {
                args.watch = value
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse().map_err(|e| bad(&e)))
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("wssload: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async {
        match args.mode.as_str() {
            "backend" => backend(args.listen.ok_or("--listen is needed")?).await,
            "handshake" | "throughput" => load(&args).await,
            other => Err(format!("unknown mode {other}")),
        }
    });
    if let Err(e) = result {
        eprintln!("wssload: {e}");
        std::process::exit(1);
    }
}

/// Echoes every message on every connection, batching replies as ../shared/bench's echo-backend does: every
/// message already read is answered with one flush.
async fn backend(listen: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(listen).await.map_err(|e| e.to_string())?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(first)) = ws.next().await {
                let echo = |msg: Message| Ok((msg.is_text() || msg.is_binary()).then_some(msg));
                if answer_ready(&mut ws, first, echo).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Answers `first` and every message already read after it (`reply` gives each one's answer, or `Err` to end the
/// connection), then flushes once, as ../shared/bench's wsload and echo-backend batch. `Err` when the connection
/// is done.
async fn answer_ready<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    first: Message,
    mut reply: impl FnMut(Message) -> Result<Option<Message>, ()>,
) -> Result<(), ()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        if let Some(answer) = reply(msg)? {
            ws.feed(answer).await.map_err(drop)?;
        }
        next = match ws.next().now_or_never() {
            Some(Some(Ok(msg))) => Some(msg),
            Some(_) => return Err(()),
            None => None,
        };
    }
    ws.flush().await.map_err(drop)
}

/// User + system CPU seconds of these processes so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / 100.0
}

fn client_config(ca: &PathBuf) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake a full one.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// What every connection needs to open.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    headers: Arc<Vec<(String, String)>>,
}

async fn open(target: &Target) -> Result<Wss, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = TcpStream::connect(target.addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let stream = target
        .tls
        .connect(target.name.clone(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut request = format!("wss://{}/", target.name.to_str())
        .into_client_request()
        .map_err(|e| e.to_string())?;
    for (name, value) in target.headers.iter() {
        let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = http::HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        request.headers_mut().append(name, value);
    }
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn load(args: &Args) -> Result<(), String> {
    let ca = args.ca.as_ref().ok_or("--ca is needed")?;
    let target = Target {
        addr: args.target.ok_or("--target is needed")?,
        name: ServerName::try_from(args.name.clone()).map_err(|e| e.to_string())?,
        tls: tokio_rustls::TlsConnector::from(client_config(ca)?),
        headers: Arc::new(args.headers.clone()),
    };
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.conns);
    let payload = vec![b'x'; args.size];
    for _ in 0..args.conns {
        let (target, payload) = (target.clone(), payload.clone());
        let (counting, stop, done, errors) = (counting.clone(), stop.clone(), done.clone(), errors.clone());
        let (mode, window) = (args.mode.clone(), args.window);
        tasks.push(tokio::spawn(async move {
            let count = |n: u64| {
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(n, Ordering::Relaxed);
                }
            };
            if mode == "handshake" {
                while !stop.load(Ordering::Relaxed) {
                    match handshake_once(&target, &payload).await {
                        Ok(()) => count(1),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                return;
            }
            let Ok(ws) = open(&target).await else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut ws = ws;
            for _ in 0..window {
                if ws.feed(Message::binary(payload.clone())).await.is_err() {
                    return;
                }
            }
            if ws.flush().await.is_err() {
                return;
            }
            // As ../shared/bench's wsload: every echo already read is counted and answered, then one flush.
            while !stop.load(Ordering::Relaxed) {
                let Some(Ok(first)) = ws.next().await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let next = |msg: Message| match msg {
                    Message::Binary(b) if b.len() == payload.len() => {
                        count(1);
                        Ok(Some(Message::binary(payload.clone())))
                    }
                    Message::Binary(_) | Message::Text(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        Err(())
                    }
                    _ => Ok(None),
                };
                if answer_ready(&mut ws, first, next).await.is_err() {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before = cpu_seconds(&args.watch);
    let started = tokio::time::Instant::now();
    counting.store(true, Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&args.watch) - cpu_before;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    let n = done.load(Ordering::Relaxed);
    let per = if n > 0 { cpu / n as f64 * 1e6 } else { 0.0 };
    println!(
        "{{\"mode\":\"{}\",\"count\":{n},\"per_second\":{:.1},\"duration_s\":{elapsed:.3},\"cpu_s\":{cpu:.3},\
         \"cpu_us_each\":{per:.2},\"errors\":{}}}",
        args.mode,
        n as f64 / elapsed,
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn handshake_once(target: &Target, payload: &[u8]) -> Result<(), String> {
    let mut ws = tokio::time::timeout(Duration::from_secs(10), open(target))
        .await
        .map_err(|_| "timeout".to_string())??;
    ws.send(Message::binary(payload.to_vec()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.len() == payload.len() => break,
            Some(Ok(_)) => continue,
            other => return Err(format!("no echo: {other:?}")),
        }
    }
    let _ = ws.close(None).await;
    // The server's close and the FIN.
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}
