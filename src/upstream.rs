//! Backend server pools: which server a new connection goes to (round robin, each server at most once per
//! handshake) and connecting to it within the connect timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config;

/// The servers of one upstream and its round-robin cursor.
#[derive(Debug)]
pub struct Pool {
    servers: Vec<config::Server>,
    next: AtomicUsize,
}

/// Why no backend connection could be had. Each maps to one HTTP status in [`UpstreamError::status`].
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no backend servers configured")]
    NoServers,
    #[error("every backend server failed; last: {server}: {source}")]
    AllFailed {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {after:?} {during} {server}")]
    Timeout {
        server: SocketAddr,
        during: &'static str,
        after: Duration,
    },
}

impl UpstreamError {
    pub fn status(&self) -> u16 {
        match self {
            Self::NoServers => 503,
            Self::AllFailed { .. } => 502,
            Self::Timeout { .. } => 504,
        }
    }
}

impl Pool {
    pub fn new(servers: Vec<config::Server>) -> Self {
        Self {
            servers,
            next: AtomicUsize::new(0),
        }
    }

    /// The servers in the order a new connection should try them: round robin for the first, then the others.
    pub fn order(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.servers.len();
        let start = if n == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n).map(move |i| self.servers[(start + i) % n].address)
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }
}

/// Unsent bytes a relayed socket may hold in the kernel before it stops taking writes. Without a cap the kernel
/// takes up to the autotuned send buffer (4 MB and more) from a connection whose reader is slow, and reports the
/// socket writable again only when a third of it has gone: a reader taking 1 MB/s steadily would show no progress
/// for over a second, and a write timeout could not tell it from a reader that stopped. With the cap, every
/// NOTSENT_LOWAT the reader takes is seen as progress, and the kernel memory a slow reader pins stays small.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Opens a TCP connection to `server` within `timeout`, with `TCP_NODELAY` and `TCP_NOTSENT_LOWAT` set.
pub async fn connect(server: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let failed = |source| UpstreamError::AllFailed { server, source };
    let stream = tokio::time::timeout(timeout, TcpStream::connect(server))
        .await
        .map_err(|_| UpstreamError::Timeout {
            server,
            during: "connecting to",
            after: timeout,
        })?
        .map_err(failed)?;
    stream.set_nodelay(true).map_err(failed)?;
    socket2::SockRef::from(&stream)
        .set_tcp_notsent_lowat(NOTSENT_LOWAT)
        .map_err(failed)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u16) -> Pool {
        Pool::new(
            (0..n)
                .map(|i| config::Server {
                    name: format!("s{i}"),
                    address: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                })
                .collect(),
        )
    }

    #[test]
    fn round_robin_starts_at_the_next_server_and_tries_each_once() {
        let p = pool(3);
        let first: Vec<u16> = p.order().map(|a| a.port()).collect();
        let second: Vec<u16> = p.order().map(|a| a.port()).collect();
        assert_eq!(first, [9000, 9001, 9002]);
        assert_eq!(second, [9001, 9002, 9000]);
        assert_eq!(pool(0).order().count(), 0);
    }
}
