//! Backend servers: the live state of each upstream (its servers, their live connection counts, the balancer),
//! which server a new connection tries first and in what order the others follow (each at most once per
//! handshake), the sticky-cookie ids, and connecting within the connect timeout.
//!
//! State is rebuilt on every config reload from the previous state: a server that stays (same upstream, same
//! name) keeps its live connection count, and the balancer keeps its position.

pub mod balance;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sha1::{Digest, Sha1};
use tokio::net::TcpStream;

pub use balance::hash_bytes;
use balance::{Balancer, Member, Strategy};

use crate::config::{self, Balance};

/// One upstream's servers and balancer, as of one config snapshot.
#[derive(Debug)]
pub struct Upstream {
    pub config: config::Upstream,
    servers: Vec<Arc<ServerState>>,
    /// The value of the sticky cookie that names each server (a keyed hash: it reveals no address). Computed
    /// for each snapshot, so a new secret takes effect on reload.
    cookie_ids: Vec<String>,
    balancer: Balancer,
}

/// A server's live state, shared by every snapshot that still lists it.
#[derive(Debug)]
pub struct ServerState {
    /// As written in the config: the server's identity.
    pub name: String,
    pub address: SocketAddr,
    /// Live connections (WebSocket sessions and plain HTTP backend connections) to this server.
    active: AtomicU32,
}

impl ServerState {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
}

/// A live connection to a server, counted while this lives.
#[derive(Debug)]
pub struct Active(Arc<ServerState>);

impl Active {
    pub fn new(server: Arc<ServerState>) -> Self {
        server.active.fetch_add(1, Ordering::Relaxed);
        Active(server)
    }

    pub fn server(&self) -> &ServerState {
        &self.0
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a request says about which server it should go to, found by the session from the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Choice {
    /// A server the client is stuck to (index into the upstream's servers), tried first.
    pub sticky: Option<usize>,
    /// The hash of the request's key, for a hashing balancer.
    pub key: Option<u64>,
}

impl Upstream {
    /// Builds an upstream's state, keeping from `previous` (the same upstream before a reload) the state of the
    /// servers that stay and the balancer's position.
    pub fn new(config: &config::Upstream, previous: Option<&Upstream>) -> Upstream {
        let servers: Vec<Arc<ServerState>> = config
            .servers
            .iter()
            .map(|s| {
                let kept = previous.and_then(|p| {
                    p.servers
                        .iter()
                        .find(|old| old.name == s.name && old.address == s.address)
                });
                match kept {
                    Some(old) => old.clone(),
                    None => Arc::new(ServerState {
                        name: s.name.clone(),
                        address: s.address,
                        active: AtomicU32::new(0),
                    }),
                }
            })
            .collect();
        let members: Vec<Member> = config
            .servers
            .iter()
            .map(|s| Member {
                identity: s.name.clone(),
                weight: s.weight,
            })
            .collect();
        let strategy = match config.balance {
            Balance::RoundRobin => Strategy::RoundRobin,
            Balance::LeastConn => Strategy::LeastConn,
            Balance::ConsistentHash | Balance::SourceIp => Strategy::ConsistentHash,
            Balance::RandomTwo => Strategy::RandomTwo,
        };
        let seed = hash_bytes(config.name.as_bytes());
        let balancer = Balancer::new(strategy, &members, previous.map(|p| &p.balancer), seed);
        Upstream {
            cookie_ids: config.servers.iter().map(|s| cookie_id(config, &s.name)).collect(),
            config: config.clone(),
            servers,
            balancer,
        }
    }

    pub fn servers(&self) -> &[Arc<ServerState>] {
        &self.servers
    }

    /// The server whose sticky cookie has this value.
    pub fn server_by_cookie(&self, value: &[u8]) -> Option<usize> {
        self.cookie_ids.iter().position(|id| id.as_bytes() == value)
    }

    /// The value of the sticky cookie naming `server` (`None` for a server this upstream does not list).
    pub fn cookie_id(&self, server: &ServerState) -> Option<&str> {
        let index = self.servers.iter().position(|s| std::ptr::eq(&**s, server))?;
        self.cookie_ids.get(index).map(String::as_str)
    }

    /// The server a request must go to when one is determined by it: the sticky server, or the owner of its key
    /// for a hashing balancer. A plain HTTP connection reuses its backend connection only for that server.
    pub fn preferred(&self, choice: Choice) -> Option<usize> {
        let hashing = matches!(self.config.balance, Balance::ConsistentHash | Balance::SourceIp);
        choice
            .sticky
            .or_else(|| choice.key.filter(|_| hashing).map(|key| self.ring_owner(key)))
    }

    /// The server that owns `key` on the hash ring (the same on every wsgate instance with the same servers).
    pub fn ring_owner(&self, key: u64) -> usize {
        self.balancer.ring_owner(key)
    }

    /// The servers in the order a new connection tries them: the sticky server or the balancer's pick first, then
    /// the others, each once.
    pub fn order(&self, choice: Choice) -> impl Iterator<Item = &Arc<ServerState>> + '_ {
        let n = self.servers.len();
        let first = match choice.sticky.filter(|&i| i < n) {
            Some(i) => i,
            None if n == 0 => 0,
            None => self
                .balancer
                .pick(choice.key, |i| self.servers.get(i).map_or(0, |s| s.active()))
                .min(n - 1),
        };
        (0..n).filter_map(move |i| self.servers.get((first + i) % n))
    }
}

/// The sticky-cookie id of a server: a keyed hash of its identity, so it names the server without revealing its
/// address, and stays the same across reloads and restarts.
fn cookie_id(upstream: &config::Upstream, server: &str) -> String {
    let secret = match &upstream.sticky {
        Some(config::Sticky::Cookie(c)) => c.secret.as_str(),
        _ => upstream.name.as_str(),
    };
    let mut sha = Sha1::new();
    sha.update((secret.len() as u64).to_be_bytes());
    sha.update(secret.as_bytes());
    sha.update(server.as_bytes());
    let digest = sha.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
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

/// Opens a TCP connection to `server` within `timeout`, with `TCP_NODELAY` set.
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
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(n: u16, sticky: Option<config::Sticky>) -> config::Upstream {
        config::Upstream {
            name: "app".into(),
            balance: Balance::RoundRobin,
            hash_key: config::HashKey::SourceIp,
            connect_timeout: Duration::from_secs(1),
            sticky,
            servers: (0..n)
                .map(|i| config::Server {
                    name: format!("127.0.0.1:{}", 9000 + i),
                    address: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                    weight: 1,
                })
                .collect(),
        }
    }

    fn ports(u: &Upstream, choice: Choice) -> Vec<u16> {
        u.order(choice).map(|s| s.address.port()).collect()
    }

    #[test]
    fn order_starts_at_the_pick_or_the_sticky_server_and_tries_each_once() {
        let u = Upstream::new(&upstream(3, None), None);
        assert_eq!(ports(&u, Choice::default()), [9000, 9001, 9002]);
        assert_eq!(ports(&u, Choice::default()), [9001, 9002, 9000]);
        let sticky = Choice {
            sticky: Some(2),
            key: None,
        };
        assert_eq!(ports(&u, sticky), [9002, 9000, 9001]);
        assert_eq!(
            Upstream::new(&upstream(0, None), None).order(Choice::default()).count(),
            0
        );
    }

    #[test]
    fn state_of_servers_that_stay_survives_a_rebuild() {
        let old = Upstream::new(&upstream(2, None), None);
        let guard = Active::new(old.servers()[1].clone());
        let mut changed = upstream(3, None);
        changed.servers.remove(0);
        let new = Upstream::new(&changed, Some(&old));
        assert_eq!(new.servers()[0].active(), 1, "9001 kept its live connection");
        assert_eq!(new.servers()[1].active(), 0);
        drop(guard);
        assert_eq!(new.servers()[0].active(), 0);
    }

    #[test]
    fn cookie_ids_are_keyed_stable_and_reveal_no_address() {
        let cookie = |secret: &str| {
            config::Sticky::Cookie(config::StickyCookie {
                name: "SERVERID".into(),
                path: "/".into(),
                max_age: None,
                forward_cookie: false,
                secret: secret.into(),
            })
        };
        let a = Upstream::new(&upstream(2, Some(cookie("s1"))), None);
        let again = Upstream::new(&upstream(2, Some(cookie("s1"))), None);
        let other_key = Upstream::new(&upstream(2, Some(cookie("s2"))), None);
        let id = a.cookie_id(&a.servers()[1]).expect("listed").to_string();
        assert_eq!(id.len(), 16);
        assert!(!id.contains("9001"));
        assert_eq!(again.cookie_id(&again.servers()[1]), Some(id.as_str()));
        assert_ne!(other_key.cookie_id(&other_key.servers()[1]), Some(id.as_str()));
        // A new secret on reload renames the servers that stay.
        let reloaded = Upstream::new(&upstream(2, Some(cookie("s2"))), Some(&a));
        assert!(Arc::ptr_eq(&reloaded.servers()[1], &a.servers()[1]));
        assert_eq!(reloaded.server_by_cookie(id.as_bytes()), None);
        assert_eq!(a.server_by_cookie(id.as_bytes()), Some(1));
        assert_eq!(a.server_by_cookie(b"nope"), None);
    }
}
