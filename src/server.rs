//! Listeners, accept loops, worker threads and the drain on shutdown.
//!
//! wsgate runs one single-threaded tokio runtime per worker thread, each accepting on its own `SO_REUSEPORT`
//! socket bound to the same address: the kernel spreads new connections over the workers, and a connection lives
//! on one thread for its whole life, with no cross-thread wake-ups on the relay path.
//!
//! Shutdown: [`Running::shutdown`] closes every listener at once; live sessions run on until they end or the
//! drain timeout passes, when the rest are closed.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::session::{Shared, session};
use crate::upstream::Pool;

/// How long sessions get to finish after the drain timeout has closed them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pause after an accept error such as running out of file descriptors, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const LISTEN_BACKLOG: i32 = 4096;

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
}

/// A started server.
pub struct Running {
    local_addr: SocketAddr,
    stop_accepting: CancellationToken,
    workers: Vec<JoinHandle<()>>,
}

impl Running {
    /// The address the listener is bound to (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting at once and lets live connections drain (up to the drain timeout). Returns at once.
    pub fn shutdown(&self) {
        self.stop_accepting.cancel();
    }

    /// Waits until every worker has finished (after [`Running::shutdown`] and the drain).
    pub fn join(self) {
        for worker in self.workers {
            let _ = worker.join();
        }
    }
}

/// Binds the listening sockets and starts the worker threads.
pub fn start(config: Config) -> Result<Running, ServerError> {
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let mut listeners = Vec::with_capacity(workers);
    let mut address = config.listen;
    for _ in 0..workers {
        let socket = bind(address).map_err(|source| ServerError::Listen { address, source })?;
        // With port 0, the first bind picks the port and the others join it.
        address = socket.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(address);
        listeners.push(socket);
    }
    let stop_accepting = CancellationToken::new();
    let shared = Arc::new(Shared {
        pool: Pool::new(config.servers.clone()),
        config,
        draining: stop_accepting.clone(),
        force_close: CancellationToken::new(),
    });
    let next_id = Arc::new(AtomicU64::new(1));
    let mut handles = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        let worker = Worker {
            shared: shared.clone(),
            stop_accepting: stop_accepting.clone(),
            next_id: next_id.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("wsgate-worker-{i}"))
            .spawn(move || worker.run(listener))
            .map_err(ServerError::Worker)?;
        handles.push(handle);
    }
    tracing::info!(address = %address, workers, servers = shared.pool.len(), "listening");
    Ok(Running {
        local_addr: address,
        stop_accepting,
        workers: handles,
    })
}

fn bind(address: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener: one system call saved per connection.
    socket.set_tcp_nodelay(true)?;
    // And TCP_NOTSENT_LOWAT (see `upstream::NOTSENT_LOWAT`).
    socket.set_tcp_notsent_lowat(crate::upstream::NOTSENT_LOWAT)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

struct Worker {
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
    next_id: Arc<AtomicU64>,
}

impl Worker {
    fn run(self, listener: Socket) {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a worker runtime");
                return;
            }
        };
        runtime.block_on(self.serve(listener));
    }

    async fn serve(self, listener: Socket) {
        let listener = match TcpListener::from_std(listener.into()) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot register a listener");
                return;
            }
        };
        let sessions = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.stop_accepting.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    sessions.spawn(session(self.shared.clone(), stream, peer, id));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        drop(listener);
        sessions.close();
        let drain = self.shared.config.timeouts.drain;
        if !sessions.is_empty() {
            tracing::info!(live = sessions.len(), ?drain, "draining connections");
        }
        if tokio::time::timeout(drain, sessions.wait()).await.is_err() {
            tracing::info!(
                left = sessions.len(),
                "drain timeout reached: closing the remaining connections"
            );
            self.shared.force_close.cancel();
            let _ = tokio::time::timeout(CLOSE_GRACE, sessions.wait()).await;
        }
    }
}
