//! Listeners, accept loops, worker threads, config reloads and the drain on shutdown.
//!
//! wsgate runs one single-threaded tokio runtime per worker thread, each accepting on its own `SO_REUSEPORT`
//! socket for every listener: the kernel spreads new connections over the workers, and a connection lives on one
//! thread for its whole life, with no cross-thread wake-ups on the relay path.
//!
//! Reload: [`Running::reload`] builds a new snapshot from a validated config (the upstreams' state carried over),
//! opens the sockets of listeners the new config adds, swaps the snapshot in, then closes the listeners it
//! dropped. A listener whose address stays keeps its sockets, so no connection is refused during a reload; live
//! connections keep the snapshot they started with.
//!
//! Shutdown: [`Running::shutdown`] closes every listener at once; live sessions run on until they end or the
//! drain timeout passes, when the rest are closed.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, StartError, Writer};
use crate::admin::Admin;
use crate::config::{Config, ServerSettings};
use crate::otlp::Exporter;
use crate::session::{Accepted, session};
use crate::state::{Shared, Snapshot};
use crate::supervise::Supervisor;

/// How long sessions get to finish after the drain timeout has closed them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pause after an accept error such as running out of file descriptors, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start worker thread: {0}")]
    Worker(#[source] io::Error),
    #[error("cannot start the control thread: {0}")]
    Control(#[source] io::Error),
    #[error("worker threads have stopped")]
    Stopped,
    #[error("cannot start the OTLP exporter thread: {0}")]
    Exporter(#[source] io::Error),
    #[error(transparent)]
    AccessLog(#[from] StartError),
    #[error("cannot open the LLM key database: {0}")]
    LlmDatabase(#[source] crate::llm::DbError),
    #[error("[cluster] redis: {0}")]
    Cluster(#[source] crate::cluster::redis::RedisError),
    #[error("cannot open the admin listener on {address}: {source}")]
    Admin {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A started server.
pub struct Running {
    shared: Arc<Shared>,
    /// The open listeners: configured address, bound address, and the token that closes it.
    listeners: Vec<Open>,
    workers: Vec<WorkerHandle>,
    /// Health checks, drains and rebalancing.
    supervisor: Supervisor,
    /// The admin listener, when the config has one.
    admin: Option<Admin>,
    /// The OTLP exporter (`[tracing]`).
    exporter: Exporter,
    /// The admin API's reload requests, until [`Running::take_reload_requests`] takes them.
    reload_requests: Option<mpsc::UnboundedReceiver<crate::state::ReloadRequest>>,
    /// The access log's writer thread, stopped once the sessions are done.
    access_log: Writer,
}

struct Open {
    configured: SocketAddr,
    bound: SocketAddr,
    stop: CancellationToken,
}

struct WorkerHandle {
    control: mpsc::UnboundedSender<Listen>,
    thread: JoinHandle<()>,
}

/// A listening socket handed to a worker, with the token that closes it.
struct Listen {
    socket: Socket,
    /// The listener's address as configured (how a session finds the listener's name in its snapshot).
    configured: SocketAddr,
    stop: CancellationToken,
}

impl Running {
    /// The address the first listener is bound to (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners
            .first()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |l| l.bound)
    }

    /// The snapshot new connections get.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Serves `config` from now on: new connections use it; live ones keep theirs. Fails (and changes nothing)
    /// when a new listener cannot be opened.
    pub fn reload(&mut self, config: Config) -> Result<(), ServerError> {
        let result = self.swap_in(config);
        self.shared.metrics.reloaded(result.is_ok());
        result
    }

    /// A reload whose file did not load: counted in `wsgate_reloads_total{result="failed"}`.
    pub fn reload_failed(&self) {
        self.shared.metrics.reloaded(false);
    }

    /// The admin API's reload requests (`POST /api/reload`): whoever serves reloads (the command line, which knows
    /// the config file) takes them once. Until then, and in a server nobody took them from, they go unanswered and
    /// the API says so.
    pub fn take_reload_requests(&mut self) -> mpsc::UnboundedReceiver<crate::state::ReloadRequest> {
        self.reload_requests
            .take()
            .unwrap_or_else(|| mpsc::unbounded_channel().1)
    }

    /// Opens the access log file again by its name (SIGUSR1, after logrotate has renamed it); on an error the log
    /// goes on in the file it had, and the error is logged.
    pub fn reopen_access_log(&self) {
        if let Err(e) = self.shared.access_log.reopen() {
            tracing::error!(error = %e, "access log not reopened: it goes on in the file it had");
        }
    }

    /// Where the admin listener listens, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.address)
    }

    fn swap_in(&mut self, config: Config) -> Result<(), ServerError> {
        warn_insecure(&config);
        let current = self.shared.snapshot.load_full();
        // Key sets fetched from JWKS URLs carry over to the new config's routes with the same URL.
        let previous = crate::auth::remotes(&current.config);
        for remote in crate::auth::remotes(&config) {
            for old in &previous {
                remote.adopt(old);
            }
        }
        if config.server.workers != current.config.server.workers {
            tracing::warn!("`workers` changed: it takes effect at the next start, not on reload");
        }
        if config.server.log_format != current.config.server.log_format {
            tracing::warn!("`log_format` changed: it takes effect at the next start, not on reload");
        }
        if config.admin != current.config.admin {
            tracing::warn!("`[admin]` changed: it takes effect at the next start, not on reload");
        }
        let mut added = Vec::new();
        for listener in &config.listeners {
            if self.listeners.iter().any(|l| l.configured == listener.address) {
                continue;
            }
            // Every socket is bound before anything changes: a failure leaves the old config serving.
            let sockets = bind_all(listener.address, self.workers.len(), &config.server)?;
            added.push((listener.address, sockets));
        }
        // The last step that may fail: the sockets bound above close again when it does.
        self.shared
            .access_log
            .retarget(&config.server.access_log)
            .map_err(StartError::from)?;
        self.exporter
            .apply(config.tracing.as_ref())
            .map_err(ServerError::Exporter)?;
        self.shared
            .llm
            .apply(config.llm.as_deref())
            .map_err(ServerError::LlmDatabase)?;
        self.shared
            .cluster
            .apply(config.cluster.as_ref())
            .map_err(ServerError::Cluster)?;
        let snapshot = Arc::new(Snapshot::new(config, Some(&current)));
        self.shared.snapshot.store(snapshot.clone());
        self.supervisor.update(snapshot.clone());
        for (configured, (bound, sockets)) in added {
            let stop = CancellationToken::new();
            self.hand_out(configured, sockets, &stop)?;
            tracing::info!(address = %bound, "listening");
            self.listeners.push(Open {
                configured,
                bound,
                stop,
            });
        }
        let config = &snapshot.config;
        self.listeners.retain(|l| {
            let keep = config.listeners.iter().any(|c| c.address == l.configured);
            if !keep {
                tracing::info!(address = %l.bound, "listener removed: no longer accepting");
                l.stop.cancel();
            }
            keep
        });
        Ok(())
    }

    fn hand_out(
        &self,
        configured: SocketAddr,
        sockets: Vec<Socket>,
        stop: &CancellationToken,
    ) -> Result<(), ServerError> {
        for (worker, socket) in self.workers.iter().zip(sockets) {
            let listen = Listen {
                socket,
                configured,
                stop: stop.clone(),
            };
            worker.control.send(listen).map_err(|_| ServerError::Stopped)?;
        }
        Ok(())
    }

    /// Stops accepting at once and lets live connections drain (up to the drain timeout). Returns at once.
    pub fn shutdown(&self) {
        self.shared.phase.start_shutdown();
        self.shared.draining.cancel();
        self.shared.sessions.wake_all();
        // A draining instance takes no new sessions: it leaves the fleet (its sessions stop counting in the shared
        // limits, and in the others' even share).
        self.shared.cluster.close();
    }

    /// Waits until every worker has finished (after [`Running::shutdown`] and the drain).
    pub fn join(self) {
        for worker in self.workers {
            drop(worker.control);
            let _ = worker.thread.join();
        }
        // After the workers: every session has queued its span, and every request its usage row.
        self.shared.llm.close();
        self.exporter.stop();
        self.supervisor.stop();
        if let Some(admin) = self.admin {
            admin.stop();
        }
        self.shared.access_log.stop(self.access_log);
    }
}

/// Binds the listening sockets and starts the worker threads.
/// Says loudly, at start and at every reload, which upstreams take any certificate, and which JWKS URLs are
/// fetched without TLS.
fn warn_insecure(config: &Config) {
    for remote in crate::auth::remotes(config) {
        if remote.url().scheme_str() == Some("http") {
            tracing::warn!(
                jwks_url = %remote.url(),
                "INSECURE: a JWKS URL over plain http: anyone on the path to it can serve keys and sign tokens"
            );
        }
    }
    for upstream in &config.upstreams {
        if upstream.tls.as_ref().is_some_and(|t| t.settings().insecure_skip_verify) {
            tracing::warn!(
                upstream = %upstream.name,
                "INSECURE: `insecure_skip_verify = true`: the servers' certificates are NOT verified; anyone on the \
                 path to them can read and change this traffic"
            );
        }
    }
}

/// Says at start how many sessions the open-files limit leaves room for, and returns that number (`None` with no
/// limit to speak of): without `max_connections`, it is the limit above which new connections get 503, so that
/// running out of descriptors shows as a refusal, not as failed accepts and connects.
fn say_descriptor_limit(config: &Config) -> Option<u32> {
    let Some(open_files) = crate::sys::open_files_limit() else {
        tracing::info!("no open-files limit: sessions are limited by memory and `max_connections` only");
        return None;
    };
    let sessions = crate::sys::sessions_allowed(open_files);
    crate::relay::set_pipe_budget(crate::sys::pipes_allowed(open_files));
    match config.server.max_connections {
        None => tracing::info!(
            open_files,
            sessions,
            "the open-files limit leaves room for {sessions} sessions (two descriptors each): `max_connections` \
             is {sessions}, new connections above it get 503 (raise `nofile` for more)"
        ),
        Some(max) if max > sessions => tracing::warn!(
            open_files,
            sessions,
            max_connections = max,
            "`max_connections` is above the {sessions} sessions the open-files limit leaves room for: past them, \
             connecting to backends fails (503) instead; raise `nofile`"
        ),
        Some(_) => {}
    }
    Some(sessions)
}

pub fn start(config: Config) -> Result<Running, ServerError> {
    warn_insecure(&config);
    let descriptor_limit = say_descriptor_limit(&config);
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let mut bound = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        bound.push((listener.address, bind_all(listener.address, workers, &config.server)?));
    }
    let config_admin = config.admin.clone();
    let (access_log, access_log_writer) = AccessLog::start(&config.server.access_log)?;
    let (reloads, reload_requests) = mpsc::unbounded_channel();
    let (spans, receiving) = crate::otlp::queue();
    let mut exporter = Exporter::new(receiving);
    exporter.apply(config.tracing.as_ref()).map_err(ServerError::Exporter)?;
    let llm = crate::llm::Gateway::default();
    llm.apply(config.llm.as_deref()).map_err(ServerError::LlmDatabase)?;
    let snapshot = Arc::new(Snapshot::new(config, None));
    let supervisor = Supervisor::start(snapshot.clone()).map_err(ServerError::Control)?;
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::new(snapshot),
        draining: CancellationToken::new(),
        phase: crate::signal::Phase::default(),
        admission: Arc::default(),
        force_close: CancellationToken::new(),
        metrics: Arc::default(),
        sessions: Default::default(),
        reloads,
        spans,
        access_log,
        llm,
        cluster: Default::default(),
    });
    shared.metrics.attach(&shared);
    let (counting, shedding) = (Arc::downgrade(&shared), Arc::downgrade(&shared));
    shared.cluster.attach(crate::cluster::limits::Local {
        counts: Arc::new(move || {
            counting
                .upgrade()
                .map_or((0, 0), |s| (u64::from(s.admission.total()), s.sessions.len() as u64))
        }),
        shed: Arc::new(move |n, keep| shedding.upgrade().map_or(0, |s| s.sessions.shed_newest(n, keep))),
    });
    shared
        .cluster
        .apply(shared.snapshot.load().config.cluster.as_ref())
        .map_err(ServerError::Cluster)?;
    if let Some(sessions) = descriptor_limit {
        shared.admission.set_descriptor_limit(sessions);
    }
    let admin = match config_admin {
        Some(settings) => {
            let address = settings.address;
            Some(Admin::start(settings, shared.clone()).map_err(|source| ServerError::Admin { address, source })?)
        }
        None => None,
    };
    let next_id = Arc::new(AtomicU64::new(1));
    let mut handles = Vec::with_capacity(workers);
    for i in 0..workers {
        let (control, requests) = mpsc::unbounded_channel();
        let worker = Worker {
            shared: shared.clone(),
            next_id: next_id.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("wsgate-worker-{i}"))
            .spawn(move || worker.run(requests))
            .map_err(ServerError::Worker)?;
        handles.push(WorkerHandle { control, thread });
    }
    let mut running = Running {
        shared,
        listeners: Vec::new(),
        workers: handles,
        supervisor,
        admin,
        exporter,
        reload_requests: Some(reload_requests),
        access_log: access_log_writer,
    };
    for (configured, (address, sockets)) in bound {
        let stop = CancellationToken::new();
        running.hand_out(configured, sockets, &stop)?;
        tracing::info!(address = %address, workers, "listening");
        running.listeners.push(Open {
            configured,
            bound: address,
            stop,
        });
    }
    Ok(running)
}

/// One socket per worker on `address`; with port 0, the first bind picks the port and the others join it.
fn bind_all(
    address: SocketAddr,
    workers: usize,
    settings: &ServerSettings,
) -> Result<(SocketAddr, Vec<Socket>), ServerError> {
    let mut sockets = Vec::with_capacity(workers);
    let mut bound = address;
    for _ in 0..workers {
        let socket = bind(bound, settings).map_err(|source| ServerError::Listen { address, source })?;
        bound = socket.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(bound);
        sockets.push(socket);
    }
    Ok((bound, sockets))
}

fn bind(address: SocketAddr, settings: &ServerSettings) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY and the keepalive settings from the listener: no system call per
    // connection for them.
    socket.set_tcp_nodelay(true)?;
    if let Some(idle) = settings.tcp_keepalive {
        crate::sys::set_keepalive(&socket, idle)?;
    }
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(settings.listen_backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

struct Worker {
    shared: Arc<Shared>,
    next_id: Arc<AtomicU64>,
}

impl Worker {
    fn run(self, requests: mpsc::UnboundedReceiver<Listen>) {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a worker runtime");
                return;
            }
        };
        runtime.block_on(self.serve(requests));
    }

    async fn serve(self, mut requests: mpsc::UnboundedReceiver<Listen>) {
        let sessions = TaskTracker::new();
        let accepting = TaskTracker::new();
        let draining = self.shared.draining.clone();
        loop {
            let listen = tokio::select! {
                biased;
                () = draining.cancelled() => break,
                listen = requests.recv() => listen,
            };
            let Some(listen) = listen else { break };
            let listener = match TcpListener::from_std(listen.socket.into()) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register a listener");
                    continue;
                }
            };
            accepting.spawn(accept_loop(
                listener,
                listen.configured,
                listen.stop,
                self.shared.clone(),
                sessions.clone(),
                self.next_id.clone(),
            ));
        }
        accepting.close();
        accepting.wait().await;
        sessions.close();
        let drain = self.shared.snapshot.load().config.server.drain_timeout;
        if !sessions.is_empty() {
            tracing::info!(live = sessions.len(), ?drain, "draining connections");
        }
        if tokio::time::timeout(drain, sessions.wait()).await.is_err() {
            tracing::info!(
                left = sessions.len(),
                "drain timeout reached: closing the remaining connections"
            );
            self.shared.phase.start_force_close();
            self.shared.force_close.cancel();
            self.shared.sessions.wake_all();
            let _ = tokio::time::timeout(CLOSE_GRACE, sessions.wait()).await;
        }
    }
}

/// Accepts on one listener until it is removed or the server drains.
async fn accept_loop(
    listener: TcpListener,
    configured: SocketAddr,
    stop: CancellationToken,
    shared: Arc<Shared>,
    sessions: TaskTracker,
    next_id: Arc<AtomicU64>,
) {
    let draining = shared.draining.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            () = draining.cancelled() => return,
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let accepted = Accepted {
                    stream,
                    peer,
                    id: next_id.fetch_add(1, Ordering::Relaxed),
                    listener: configured,
                };
                sessions.spawn(session(shared.clone(), accepted));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    () = draining.cancelled() => return,
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}
