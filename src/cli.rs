//! The command line: `wsgate proxy` (quick mode), `wsgate run` and `wsgate check` (config file), `wsgate demo`,
//! `wsgate hash-key` (a line for an API keys file);
//! signals (SIGTERM/SIGINT drain, SIGHUP reloads, SIGUSR1 reopens the access log), watching the config file, and
//! exit codes. Nothing else lives
//! here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

use crate::cluster::discovery::{Update, Watches};
use crate::config::{self, Config, FrameRules, LogFormat, Relay, Timeouts, TunnelRules, parse_duration, parse_size};
use crate::{demo, observe, server};

#[derive(Parser, Debug)]
#[command(name = "wsgate", version, about = "A WebSocket reverse proxy and gateway.", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Proxy WebSocket (and plain HTTP) connections from one address to one or more backend servers, round robin.
    ///
    /// Example: wsgate proxy --listen 0.0.0.0:8080 --to 127.0.0.1:9001 --to 127.0.0.1:9002
    Proxy(ProxyArgs),
    /// Serve a config file: its listeners, routes and upstreams. SIGHUP (or a change of the file, with
    /// `watch = true`) reloads it without dropping a connection; SIGTERM drains; SIGUSR1 reopens the access log
    /// file (after logrotate has renamed it).
    ///
    /// Example: wsgate run --config /etc/wsgate/wsgate.toml
    Run(FileArgs),
    /// Check a config file and exit: 0 with a one-line summary, or 1 with every problem (file:line:column).
    Check(FileArgs),
    /// Run an embedded WebSocket echo and chat backend with wsgate in front of it, and print a URL to try it.
    Demo(DemoArgs),
    /// Print the hex SHA-256 of an API key (read from standard input, without its trailing newline, or given with
    /// --key): the `hash` of its entry in an API keys file.
    ///
    /// Example: printf '%s' "$KEY" | wsgate hash-key
    HashKey(HashKeyArgs),
    /// Issue, list and revoke the LLM gateway's virtual keys, in the database of the config file's `[llm]`. A new
    /// key is printed once, on standard output; only its hash is stored.
    ///
    /// Example: wsgate llm-key add --config wsgate.toml --owner team-a --models tiny --tokens-per-day 100000
    #[command(subcommand)]
    LlmKey(LlmKeyCommand),
}

#[derive(Subcommand, Debug)]
enum LlmKeyCommand {
    /// Issue a key and print it (`sk-wsg-...`): it is not shown again.
    Add(LlmKeyAdd),
    /// List the keys (never the keys themselves: their last characters).
    List(FileArgs),
    /// Revoke a key by its id: requests with it are refused (a running gateway re-reads keys within 10 s).
    Revoke(LlmKeyRevoke),
}

#[derive(Args, Debug)]
struct LlmKeyAdd {
    #[command(flatten)]
    file: FileArgs,
    /// Who the key is for (shown in usage rows).
    #[arg(long)]
    owner: String,
    /// The models the key may use, comma-separated (`name*` for a prefix); all when left out.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    #[arg(long, value_name = "N")]
    requests_per_minute: Option<u32>,
    /// Prompt and completion tokens together.
    #[arg(long, value_name = "N")]
    tokens_per_minute: Option<u64>,
    /// Prompt and completion tokens together, per UTC day.
    #[arg(long, value_name = "N")]
    tokens_per_day: Option<u64>,
    /// What the key may spend in all, in the price table's currency.
    #[arg(long, value_name = "AMOUNT")]
    budget: Option<f64>,
}

#[derive(Args, Debug)]
struct LlmKeyRevoke {
    #[command(flatten)]
    file: FileArgs,
    /// The key's id (see `wsgate llm-key list`).
    id: i64,
}

/// `wsgate llm-key`: the database of the config file's `[llm]`, opened directly (a running gateway shares it).
fn llm_key(command: &LlmKeyCommand) -> anyhow::Result<ExitCode> {
    let file = match command {
        LlmKeyCommand::Add(add) => &add.file,
        LlmKeyCommand::List(file) => file,
        LlmKeyCommand::Revoke(revoke) => &revoke.file,
    };
    let config = config::file::load(&file.config)?;
    let Some(llm) = &config.llm else {
        anyhow::bail!("{}: no [llm] section: it names the key database", file.config.display());
    };
    let db = crate::llm::Gateway::open_db(&llm.database)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let done = runtime.block_on(async {
        match command {
            LlmKeyCommand::Add(add) => {
                let issued = db
                    .add_key(crate::llm::store::NewKey {
                        owner: add.owner.clone(),
                        models: add.models.clone(),
                        requests_per_minute: add.requests_per_minute,
                        tokens_per_minute: add.tokens_per_minute,
                        tokens_per_day: add.tokens_per_day,
                        budget: add.budget,
                    })
                    .await?;
                eprintln!("key {} issued for {}; it is shown once:", issued.id, add.owner);
                println!("{}", issued.key);
            }
            LlmKeyCommand::List(_) => print!("{}", crate::llm::store::key_table(&db.list_keys().await?)),
            LlmKeyCommand::Revoke(revoke) => {
                anyhow::ensure!(
                    db.revoke(revoke.id).await?,
                    "no key {} to revoke (unknown, or revoked already)",
                    revoke.id
                );
                eprintln!("key {} revoked", revoke.id);
            }
        }
        anyhow::Ok(())
    });
    db.close();
    done?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
struct HashKeyArgs {
    /// The key (it then shows in the shell's history and the process list: prefer standard input).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
}

/// Prints the hash of the key given or read from standard input.
fn hash_key(args: &HashKeyArgs) -> anyhow::Result<ExitCode> {
    let key = match &args.key {
        Some(key) => key.clone().into_bytes(),
        None => {
            let mut key = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut key).context("cannot read the key from stdin")?;
            for end in [&b"\n"[..], b"\r"] {
                if key.ends_with(end) {
                    key.truncate(key.len() - 1);
                }
            }
            key
        }
    };
    anyhow::ensure!(!key.is_empty(), "no key: give one on standard input or with --key");
    println!("{}", crate::auth::api_keys::hash_hex(&key));
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
struct FileArgs {
    /// The config file (TOML; its keys are documented in docs/config.md).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
}

#[derive(Args, Debug)]
struct ProxyArgs {
    /// Address to accept client connections on (IP:PORT).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Backend server (HOST:PORT); repeat for several, used in round-robin order.
    #[arg(long = "to", value_name = "ADDR", required = true)]
    to: Vec<String>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Address the demo proxy listens on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: String,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Debug)]
struct CommonArgs {
    /// Time to establish a TCP connection to a backend server.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Time a client gets to send its whole request head, and a backend to answer the handshake.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Close a WebSocket connection after this long without a byte either way (default: never).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT, time live connections get to finish before they are closed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormatArg,
    /// Worker threads, each with its own event loop (default: one per available core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    workers: usize,
    /// Relay mode after the 101: `frames` understands WebSocket frames (limits, keepalive, protocol checks, close
    /// codes, 1001 on shutdown) at about the tunnel's cost; `tunnel` copies bytes blindly.
    #[arg(long, value_enum, default_value = "frames")]
    mode: ModeArg,
    /// Close a WebSocket connection when a side leaves bytes for it unread this long (either mode).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    write_timeout: Duration,
    /// Tunnel mode: copy large transfers through wsgate's memory instead of moving them with splice(2).
    #[arg(long)]
    no_splice: bool,
    #[command(flatten)]
    frames: FrameArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ModeArg {
    Tunnel,
    Frames,
}

/// Limits and keepalive of the frames relay (each off unless given).
#[derive(Args, Debug)]
#[command(next_help_heading = "Frames mode (--mode frames)")]
struct FrameArgs {
    /// Largest message (sum of its fragments, wire bytes), e.g. 16MiB; a bigger one closes its sender with 1009.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_message_size: Option<u64>,
    /// Largest frame payload, e.g. 1MiB; a bigger one closes its sender with 1009.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_frame_size: Option<u64>,
    /// Messages per second each side may send (plus --burst); more closes the sender with 1008.
    #[arg(long, value_name = "N")]
    messages_per_second: Option<u32>,
    /// Extra messages allowed at once on top of --messages-per-second.
    #[arg(long, value_name = "N", default_value_t = 0)]
    burst: u32,
    /// Ping a side (client or backend) that has been silent this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ping_interval: Option<Duration>,
    /// Close the connection when a ping is not answered within this.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pong_timeout: Duration,
    /// Check that text messages are valid UTF-8 (close 1007 otherwise).
    #[arg(long)]
    validate_utf8: bool,
    /// After wsgate sends close frames itself, how long it waits for the replies.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    close_timeout: Duration,
}

impl FrameArgs {
    fn rules(&self, write_timeout: Duration) -> FrameRules {
        FrameRules {
            max_message_size: self.max_message_size,
            max_frame_size: self.max_frame_size,
            messages_per_second: self.messages_per_second,
            burst: self.burst,
            ping_interval: self.ping_interval,
            pong_timeout: self.pong_timeout,
            validate_utf8: self.validate_utf8,
            close_timeout: self.close_timeout,
            write_timeout,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormatArg {
    Text,
    Json,
}

impl CommonArgs {
    fn config(&self, listen: &str, to: &[String]) -> Result<Config, config::ConfigError> {
        let timeouts = Timeouts {
            connect: self.connect_timeout,
            handshake: self.handshake_timeout,
            idle: self.idle_timeout,
            drain: self.drain_timeout,
        };
        let format = match self.log_format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        };
        let mut config = Config::quick(listen, to, timeouts, format)?.with_relay(match self.mode {
            ModeArg::Tunnel => Relay::Tunnel(TunnelRules {
                write_timeout: self.write_timeout,
                splice: !self.no_splice,
            }),
            ModeArg::Frames => Relay::Frames(self.frames.rules(self.write_timeout)),
        })?;
        config.server.workers = self.workers;
        Ok(config)
    }
}

/// Runs the command line and returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wsgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::HashKey(args) => return hash_key(args),
        Command::LlmKey(command) => return llm_key(command),
        _ => {}
    }
    raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    // Watch the signals before listening, so that a signal sent as soon as wsgate says it listens is handled.
    let signals = {
        let _runtime = runtime.enter();
        Signals::watch()?
    };
    let served = match cli.command {
        Command::Proxy(args) => {
            let config = args.common.config(&args.listen, &args.to)?;
            observe::init_logging(config.server.log_format);
            let running = server::start(config)?;
            runtime.block_on(signals.serve_until_signalled(running, None))
        }
        Command::Run(args) => {
            // What the file holds before it is loaded: a change after this point, even one made as soon as wsgate
            // says it listens, is a change the watch sees.
            let seen = std::fs::read(&args.config).ok();
            let loaded = config::file::load(&args.config)?;
            observe::init_logging(loaded.server.log_format);
            // Servers found in DNS or through the Kubernetes API: a first lookup before serving (briefly).
            let mut watches = Watches::default();
            let config = runtime.block_on(async {
                watches.sync(&loaded);
                watches.first_reports(&loaded, FIRST_DISCOVERY).await;
                let mut config = loaded.clone();
                watches.merge(&mut config);
                config
            });
            tracing::info!(config = %args.config.display(), "{}", summary(&config));
            let running = server::start(config)?;
            let file = Watched {
                path: args.config,
                seen,
                loaded,
                watches,
            };
            runtime.block_on(signals.serve_until_signalled(running, Some(file)))
        }
        Command::Check(args) => return Ok(check(&args.config)),
        Command::HashKey(args) => return hash_key(&args),
        Command::LlmKey(command) => return llm_key(&command),
        Command::Demo(args) => runtime.block_on(async {
            let backend = demo::start_backend().await.context("cannot start the demo backend")?;
            let config = args.common.config(&args.listen, &[backend.to_string()])?;
            observe::init_logging(config.server.log_format);
            let running = server::start(config)?;
            println!(
                "wsgate demo: open http://{}/ in a browser (Ctrl-C to stop)",
                running.local_addr()
            );
            println!(
                "  WebSocket echo: ws://{}/echo   chat room: ws://{}/chat",
                running.local_addr(),
                running.local_addr()
            );
            println!("  embedded backend behind the proxy: {backend}");
            signals.serve_until_signalled(running, None).await
        }),
    };
    served.map(|()| ExitCode::SUCCESS)
}

/// `wsgate check`: every problem on stderr and exit 1, or a summary on stdout and exit 0.
fn check(path: &Path) -> ExitCode {
    match config::file::load(path) {
        Ok(config) => {
            println!("{}: ok: {}", path.display(), summary(&config));
            ExitCode::SUCCESS
        }
        Err(config::file::FileError::Invalid(problems)) => {
            for problem in &problems {
                eprintln!("{problem}");
            }
            let s = if problems.len() == 1 { "" } else { "s" };
            eprintln!("wsgate: {} problem{s} in {}", problems.len(), path.display());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wsgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn summary(config: &Config) -> String {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut summary = format!(
        "{}, {}, {} ({})",
        plural(config.listeners.len(), "listener"),
        plural(config.routes.len(), "route"),
        plural(config.upstreams.len(), "upstream"),
        plural(config.server_count(), "server")
    );
    if let Some(llm) = &config.llm {
        summary.push_str(&format!(", {} (LLM)", plural(llm.providers.len(), "provider")));
    }
    summary
}

/// The config file served, its content when it was loaded, and the config it held (before discovered servers
/// were added to it).
struct Watched {
    path: PathBuf,
    seen: Option<Vec<u8>>,
    loaded: Config,
    watches: Watches,
}

/// How long a start waits for discovery's first servers.
const FIRST_DISCOVERY: Duration = Duration::from_secs(3);

/// How often a watched config file is looked at.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    user1: tokio::signal::unix::Signal,
}

impl Signals {
    fn watch() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            hangup: signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
            user1: signal(SignalKind::user_defined1()).context("cannot watch SIGUSR1")?,
        })
    }

    /// Serves until SIGTERM or SIGINT, then drains; a second signal exits at once. SIGHUP (and, with `watch =
    /// true`, a change of the file's content) reloads `config_file`; SIGUSR1 reopens the access log file (logrotate).
    async fn serve_until_signalled(self, mut running: server::Running, watched: Option<Watched>) -> anyhow::Result<()> {
        let Signals {
            mut terminate,
            mut interrupt,
            mut hangup,
            mut user1,
        } = self;
        let (config_file, mut last_seen, loaded, watches) = match watched {
            Some(Watched {
                path,
                seen,
                loaded,
                watches,
            }) => (Some(path), seen, Some(loaded), watches),
            None => (None, None, None, Watches::default()),
        };
        // Servers found in DNS or through the Kubernetes API, added to the loaded config's upstreams.
        let mut found = Found { loaded, watches };
        let mut watch = tokio::time::interval(WATCH_INTERVAL);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Reloads asked for through the admin API (`POST /api/reload`), answered with their result.
        let mut reloads = running.take_reload_requests();
        let systemd = crate::notify::Notifier::from_env();
        systemd.ready("serving");
        // Discovery files are always watched: a change reloads the config, which reads them again.
        let mut discovery = tokio::time::interval(WATCH_INTERVAL);
        discovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut discovered = discovery_files(&running);
        loop {
            tokio::select! {
                _ = terminate.recv() => {
                    tracing::info!(signal = "SIGTERM", "shutting down: no new connections, draining live ones");
                    break;
                }
                _ = interrupt.recv() => {
                    tracing::info!(signal = "SIGINT", "shutting down: no new connections, draining live ones");
                    break;
                }
                _ = hangup.recv() => match &config_file {
                    Some(path) => {
                        tracing::info!(signal = "SIGHUP", config = %path.display(), "reloading");
                        last_seen = std::fs::read(path).ok();
                        let _ = reload(&mut running, path, &systemd, &mut found).await;
                    }
                    None => tracing::info!(signal = "SIGHUP", "no config file to reload (quick mode)"),
                },
                _ = user1.recv() => running.reopen_access_log(),
                _ = watch.tick(), if config_file.is_some() && running.snapshot().config.server.watch => {
                    let Some(path) = &config_file else { continue };
                    let now = std::fs::read(path).ok();
                    if now.is_some() && now != last_seen {
                        tracing::info!(config = %path.display(), "config file changed: reloading");
                        last_seen = now;
                        let _ = reload(&mut running, path, &systemd, &mut found).await;
                    }
                }
                _ = discovery.tick(), if config_file.is_some() => {
                    let now = discovery_files(&running);
                    if now != discovered {
                        let Some(path) = &config_file else { continue };
                        tracing::info!(config = %path.display(), "a discovery file changed: reloading");
                        let _ = reload(&mut running, path, &systemd, &mut found).await;
                        // A refused reload keeps the servers known last; the file is read again at its next change.
                        discovered = now;
                    }
                }
                update = found.watches.changed() => found.serve(&mut running, &update, &systemd),
                Some(reply) = reloads.recv() => {
                    let result = match &config_file {
                        Some(path) => {
                            tracing::info!(config = %path.display(), "admin API: reloading");
                            last_seen = std::fs::read(path).ok();
                            reload(&mut running, path, &systemd, &mut found).await
                        }
                        None => Err(vec!["no config file to reload (quick mode)".to_string()]),
                    };
                    let _ = reply.send(result);
                }
            }
        }
        systemd.stopping();
        running.shutdown();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            running.join();
            let _ = done_tx.send(());
        });
        tokio::select! {
            _ = done_rx => {
                tracing::info!("shutdown complete");
                Ok(())
            }
            _ = terminate.recv() => second_signal(),
            _ = interrupt.recv() => second_signal(),
        }
    }
}

/// The discovery files of the config in force, and what each holds (`None`: unreadable).
fn discovery_files(running: &server::Running) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let snapshot = running.snapshot();
    snapshot
        .config
        .upstreams
        .iter()
        .filter_map(|u| u.discovery_file().map(Path::to_path_buf))
        .map(|path| {
            let content = std::fs::read(&path).ok();
            (path, content)
        })
        .collect()
}

/// The config file as loaded, and the servers discovered for its upstreams.
struct Found {
    loaded: Option<Config>,
    watches: Watches,
}

impl Found {
    /// Serves the loaded config with the servers known now, after a watch has found its upstream's servers changed.
    fn serve(&self, running: &mut server::Running, update: &Update, systemd: &crate::notify::Notifier) {
        let Some(loaded) = &self.loaded else { return };
        let mut config = loaded.clone();
        self.watches.merge(&mut config);
        let before = running.snapshot();
        let names = |c: &Config| -> Vec<String> {
            c.upstreams
                .iter()
                .find(|u| u.name == update.upstream)
                .map(|u| u.servers.iter().map(|s| s.name.clone()).collect())
                .unwrap_or_default()
        };
        let (old, new) = (names(&before.config), names(&config));
        let joined: Vec<&String> = new.iter().filter(|n| !old.contains(n)).collect();
        let left: Vec<&String> = old.iter().filter(|n| !new.contains(n)).collect();
        systemd.reloading();
        match running.reload(config) {
            Ok(()) => tracing::info!(
                upstream = %update.upstream,
                servers = new.len(),
                "discovery: servers changed: joined {joined:?}, leaving {left:?}"
            ),
            Err(e) => tracing::error!(upstream = %update.upstream, "discovery: servers not changed: {e}"),
        }
        systemd.ready("serving");
    }
}

/// Loads the config file and serves it; a file that does not load leaves the running config as it is. Returns the
/// new config's summary, or the problems that refused it.
async fn reload(
    running: &mut server::Running,
    path: &Path,
    systemd: &crate::notify::Notifier,
    found: &mut Found,
) -> Result<String, Vec<String>> {
    systemd.reloading();
    let reloaded = load_and_apply(running, path, found).await;
    systemd.ready(if reloaded.is_ok() {
        "serving"
    } else {
        "serving (the last reload was refused)"
    });
    reloaded
}

async fn load_and_apply(running: &mut server::Running, path: &Path, found: &mut Found) -> Result<String, Vec<String>> {
    let owned = path.to_path_buf();
    // Loading resolves server names: off the signal-handling thread.
    let loaded = tokio::task::spawn_blocking(move || config::file::load(&owned)).await;
    let config = match loaded {
        Ok(Ok(config)) => config,
        Ok(Err(e)) => {
            let problems: Vec<String> = e.to_string().lines().map(str::to_string).collect();
            for line in &problems {
                tracing::error!(config = %path.display(), "reload refused: {line}");
            }
            tracing::error!(config = %path.display(), "reload refused: the running config stays in force");
            running.reload_failed();
            return Err(problems);
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed");
            running.reload_failed();
            return Err(vec![format!("reload failed: {e}")]);
        }
    };
    let loaded = config.clone();
    let mut config = config;
    found.watches.merge(&mut config);
    let summary = summary(&config);
    match running.reload(config) {
        Ok(()) => {
            found.watches.sync(&loaded);
            found.loaded = Some(loaded);
            tracing::info!(config = %path.display(), "reloaded: {summary}");
            Ok(summary)
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the running config stays in force");
            Err(vec![e.to_string()])
        }
    }
}

fn second_signal() -> ! {
    tracing::warn!("second signal: exiting now without draining");
    std::process::exit(1)
}

/// A proxy holds two sockets per connection: use every file descriptor the hard limit allows.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            eprintln!("wsgate: cannot raise the open files limit: {e}");
        }
    }
}
