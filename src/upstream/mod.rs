//! Backend servers: the live state of each upstream as of one config snapshot (its servers and balancers) and which
//! server a new connection tries first and in what order the others follow. The rest is split by concern:
//! [`server`] (one server's live state and its connection count), [`sticky`] (what a request asks for: sticky cookie,
//! ring keys), [`attempts`] (the tries of one request: retries, their budget, pending-handshake limit, connecting),
//! [`outlier`] (passive ejection), [`error`] (why a request got no connection, who caused it, whether to retry),
//! [`balance`] (the pure balancers and the stable hash), [`health`] (active checks).
//!
//! State is rebuilt on every config reload from the previous state: a server that stays (same upstream, same
//! name) keeps its live connection count, and the balancer keeps its position.

mod attempts;
pub(crate) mod balance;
mod error;
pub(crate) mod health;
mod outlier;
mod server;
mod sticky;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

pub(crate) use attempts::{Attempts, connect};
use balance::{Balancer, Member, Strategy, hash_bytes};
use error::Unavailable;
pub(crate) use error::{Cause, RETRY_AFTER_BUSY, UpstreamError};
pub(crate) use server::{Active, ShedReason};
pub use server::{ServerState, now_ms};

use crate::config::{self, Balance};

/// One upstream's servers and balancers, as of one config snapshot.
#[derive(Debug)]
pub struct Upstream {
    pub config: config::Upstream,
    servers: Vec<Arc<ServerState>>,
    /// The value of the sticky cookie that names each server (a keyed hash: it reveals no address). Computed
    /// for each snapshot, so a new secret takes effect on reload.
    cookie_ids: Vec<String>,
    /// The primary servers and their balancer; the backup servers and theirs.
    primary: Group,
    backup: Group,
    /// What outlives a snapshot: counts over the whole upstream.
    pub shared: Arc<UpstreamShared>,
    /// TCP keepalive on its connections (`[server] tcp_keepalive`): idle time before the first probe.
    pub(crate) keepalive: Option<std::time::Duration>,
}

/// Some of an upstream's servers with a balancer over them (member i is server `members[i]`).
#[derive(Debug)]
struct Group {
    members: Vec<usize>,
    balancer: Balancer,
}

/// An upstream's state that carries over reloads.
#[derive(Debug, Default)]
pub struct UpstreamShared {
    /// Live connections to any of its servers.
    active: AtomicU32,
    /// Handshakes waiting for a server's answer.
    pending: AtomicU32,
    /// Of those, the ones on a second or later server.
    retrying: AtomicU32,
    /// A server has joined or returned: the rebalancer looks at the spread of live connections.
    pub rebalance_armed: AtomicBool,
}

/// What a request says about which server it should go to, found by the session from the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Choice {
    /// The server the client's sticky cookie names (index into the upstream's servers), tried first.
    pub sticky: Option<usize>,
    /// The hash of the request's sticky header or IP: its owner on the ring is tried first.
    pub ring_key: Option<u64>,
    /// The hash of the request's key, for a hashing balancer.
    pub key: Option<u64>,
}

impl Upstream {
    /// Opens a connection to one of its servers: TCP, and TLS on an upstream with `tls`, within the connect timeout.
    pub(crate) async fn connect(&self, server: &ServerState) -> Result<crate::conn::Conn, UpstreamError> {
        connect(
            server.address,
            &server.name,
            self.config.tls.as_deref(),
            self.config.connect_timeout,
            self.keepalive,
        )
        .await
    }

    /// Builds an upstream's state, keeping from `previous` (the same upstream before a reload) the state of the
    /// servers that stay and the balancers' positions. A server new in a reload ramps up like one coming back.
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
                    None => {
                        let new = ServerState::new(&s.name, s.address);
                        if previous.is_some() {
                            new.ramp_start.store(now_ms(), Ordering::Relaxed);
                        }
                        Arc::new(new)
                    }
                }
            })
            .collect();
        let strategy = match config.balance {
            Balance::RoundRobin => Strategy::RoundRobin,
            Balance::LeastConn => Strategy::LeastConn,
            Balance::ConsistentHash | Balance::SourceIp => Strategy::ConsistentHash,
            Balance::RandomTwo => Strategy::RandomTwo,
        };
        let seed = hash_bytes(config.name.as_bytes());
        let group = |backup: bool, previous: Option<&Group>| {
            let members: Vec<usize> = (0..config.servers.len())
                .filter(|&i| config.servers[i].backup == backup)
                .collect();
            let balancer_members: Vec<Member> = members
                .iter()
                .map(|&i| Member {
                    identity: config.servers[i].name.clone(),
                    weight: config.servers[i].weight,
                })
                .collect();
            let balancer = Balancer::new(strategy, &balancer_members, previous.map(|g| &g.balancer), seed);
            Group { members, balancer }
        };
        let shared = previous.map_or_else(Arc::default, |p| p.shared.clone());
        Upstream {
            cookie_ids: config
                .servers
                .iter()
                .map(|s| sticky::cookie_id(config, &s.name))
                .collect(),
            primary: group(false, previous.map(|p| &p.primary)),
            backup: group(true, previous.map(|p| &p.backup)),
            config: config.clone(),
            servers,
            shared,
            keepalive: None,
        }
    }

    pub fn servers(&self) -> &[Arc<ServerState>] {
        &self.servers
    }

    /// Whether server `i` may take new connections as far as its health goes: not down, not ejected, not draining.
    pub fn healthy(&self, i: usize, now: u64) -> bool {
        let (Some(state), Some(config)) = (self.servers.get(i), self.config.servers.get(i)) else {
            return false;
        };
        !state.draining(config) && !state.is_down() && !state.is_ejected(now)
    }

    /// Whether `server` (of this upstream) may take new requests: a keep-alive backend connection to a server that
    /// went down, was ejected or is in drain is not reused.
    pub fn takes_new(&self, server: &ServerState) -> bool {
        let now = now_ms();
        self.servers
            .iter()
            .position(|s| std::ptr::eq(&**s, server))
            .is_some_and(|i| self.healthy(i, now))
    }

    /// The group new connections go to: the primaries while one of them is healthy, else the backups.
    fn group(&self, now: u64) -> Option<&Group> {
        [&self.primary, &self.backup]
            .into_iter()
            .find(|g| g.members.iter().any(|&i| self.healthy(i, now)))
    }

    /// Server `i`'s share of its weight for a new connection (see [`Balancer::pick_usable`]).
    fn share(&self, i: usize, now: u64, tried: &[usize]) -> u32 {
        if tried.contains(&i) || !self.healthy(i, now) {
            return 0;
        }
        let full = self.config.servers[i]
            .max_connections
            .is_some_and(|l| self.servers[i].active() >= l);
        if full {
            return 0;
        }
        self.servers[i].ramp(self.config.slow_start, now)
    }

    /// The server a request must go to when one is determined by it: the sticky server, or the owner of its key
    /// on the ring, if it can take the connection. A plain HTTP connection reuses its backend connection only for
    /// that server.
    pub fn preferred(&self, choice: Choice) -> Option<usize> {
        let now = now_ms();
        let group = self.group(now)?;
        self.determined(group, choice, now, &[])
    }

    fn determined(&self, group: &Group, choice: Choice, now: u64, tried: &[usize]) -> Option<usize> {
        let share = |m: usize| self.share(group.members[m], now, tried);
        if let Some(i) = choice.sticky
            && group.members.contains(&i)
            && self.share(i, now, tried) > 0
        {
            return Some(i);
        }
        let hashing = matches!(self.config.balance, Balance::ConsistentHash | Balance::SourceIp);
        let key = choice.ring_key.or(choice.key.filter(|_| hashing))?;
        group.balancer.ring_walk(key, &share).map(|m| group.members[m])
    }

    /// The next server to try for a request, none of `tried`: the sticky server or the owner of the request's key if
    /// it can take the connection, else the balancer's pick among the servers that can. Backup servers only when
    /// no primary is healthy, or when every healthy primary has been tried for this request (as nginx does).
    pub fn next(&self, choice: Choice, tried: &[usize]) -> Result<usize, Unavailable> {
        if self.servers.is_empty() {
            return Err(Unavailable::NoServers);
        }
        let now = now_ms();
        let mut result = Err(Unavailable::AllDown);
        for group in [&self.primary, &self.backup] {
            if !group.members.iter().any(|&i| self.healthy(i, now)) {
                continue;
            }
            result = self.next_in(group, choice, tried, now);
            if result != Err(Unavailable::Exhausted) {
                break;
            }
        }
        result
    }

    fn next_in(&self, group: &Group, choice: Choice, tried: &[usize], now: u64) -> Result<usize, Unavailable> {
        if let Some(i) = self.determined(group, choice, now, tried) {
            return Ok(i);
        }
        let share = |m: usize| self.share(group.members[m], now, tried);
        let active = |m: usize| self.servers[group.members[m]].active();
        let pick = if tried.is_empty() {
            group.balancer.pick_usable(choice.key, active, share)
        } else {
            group.balancer.pick_retry(choice.key, active, share)
        };
        match pick {
            Some(m) => Ok(group.members[m]),
            None if group
                .members
                .iter()
                .any(|&i| !tried.contains(&i) && self.healthy(i, now)) =>
            {
                Err(Unavailable::Full)
            }
            None => Err(Unavailable::Exhausted),
        }
    }

    /// Counts a connection to server `i`; `None` when it is at its own or the upstream's `max_connections`.
    pub fn connect_to(&self, i: usize) -> Option<Active> {
        Active::try_new(self, i)
    }

    /// Whether the upstream is at its own `max_connections`.
    fn is_full(&self) -> bool {
        self.config
            .max_connections
            .is_some_and(|limit| self.shared.active.load(Ordering::Relaxed) >= limit)
    }
}

/// What the unit tests of the upstream's files share: an upstream of `n` servers on ports 9000.., and what it
/// picks.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;

    use super::{Choice, Upstream};
    use crate::config;

    pub(crate) fn upstream(n: u16, sticky: Option<config::Sticky>) -> config::Upstream {
        let servers = (0..n)
            .map(|i| config::Server {
                name: format!("127.0.0.1:{}", 9000 + i),
                address: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                weight: 1,
                backup: false,
                drain: false,
                max_connections: None,
            })
            .collect();
        config::Upstream {
            sticky,
            ..config::Upstream::new("app", servers)
        }
    }

    /// The ports of the servers a request would try in turn (each failing), as `next` gives them.
    pub(crate) fn ports(u: &Upstream, choice: Choice) -> Vec<u16> {
        let mut tried = Vec::new();
        while let Ok(i) = u.next(choice, &tried) {
            tried.push(i);
        }
        tried.iter().map(|&i| u.servers()[i].address.port()).collect()
    }

    pub(crate) fn picks(u: &Upstream, n: usize) -> Vec<usize> {
        let mut counts = vec![0; u.servers().len()];
        for _ in 0..n {
            if let Ok(i) = u.next(Choice::default(), &[]) {
                counts[i] += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::testing::{picks, ports, upstream};
    use super::*;

    #[test]
    fn next_starts_at_the_pick_or_the_sticky_server_and_tries_each_once() {
        let u = Upstream::new(&upstream(3, None), None);
        assert_eq!(ports(&u, Choice::default()), [9000, 9001, 9002]);
        let sticky = Choice {
            sticky: Some(2),
            ..Choice::default()
        };
        assert_eq!(ports(&u, sticky)[0], 9002);
        assert_eq!(ports(&u, sticky).len(), 3);
        assert_eq!(
            Upstream::new(&upstream(0, None), None).next(Choice::default(), &[]),
            Err(Unavailable::NoServers)
        );
    }

    #[test]
    fn down_ejected_and_draining_servers_take_no_new_connections() {
        let mut config = upstream(4, None);
        config.servers[3].drain = true;
        let u = Upstream::new(&config, None);
        u.servers()[0].set_down(true);
        u.servers()[1].ejected_until.store(now_ms() + 60_000, Ordering::Relaxed);
        assert_eq!(picks(&u, 100), [0, 0, 100, 0]);
        let sticky = Choice {
            sticky: Some(0),
            ..Choice::default()
        };
        assert_eq!(
            ports(&u, sticky),
            [9002],
            "a sticky server that is down falls back to the balancer"
        );
        u.servers()[2].set_down(true);
        assert_eq!(u.next(Choice::default(), &[]), Err(Unavailable::AllDown));
        u.servers()[0].set_down(false);
        assert_eq!(picks(&u, 10), [10, 0, 0, 0]);
    }

    #[test]
    fn backups_serve_only_while_every_primary_is_out() {
        let mut config = upstream(3, None);
        config.servers[2].backup = true;
        let u = Upstream::new(&config, None);
        assert_eq!(picks(&u, 100), [50, 50, 0]);
        assert_eq!(
            u.next(Choice::default(), &[0, 1]),
            Ok(2),
            "a retry after every primary failed"
        );
        u.servers()[0].set_down(true);
        assert_eq!(picks(&u, 100), [0, 100, 0]);
        u.servers()[1].set_down(true);
        assert_eq!(picks(&u, 100), [0, 0, 100], "the backup takes over");
        u.servers()[1].set_down(false);
        assert_eq!(picks(&u, 100), [0, 100, 0], "and hands back");
    }

    #[test]
    fn max_connections_per_server_and_per_upstream() {
        let mut config = upstream(2, None);
        config.servers[0].max_connections = Some(2);
        config.max_connections = Some(5);
        let u = Upstream::new(&config, None);
        let mut held = Vec::new();
        for _ in 0..5 {
            let i = u.next(Choice::default(), &[]).expect("a server");
            held.push(u.connect_to(i).expect("room"));
        }
        let on_first = held.iter().filter(|a| a.server().address.port() == 9000).count();
        assert_eq!(on_first, 2, "server 9000 stops at its limit");
        // The upstream is full: the pick still names a server, but counting the connection fails.
        let i = u.next(Choice::default(), &[]).expect("9001 has no limit of its own");
        assert!(u.connect_to(i).is_none());
        held.pop();
        assert!(u.connect_to(1).is_some());
        config.servers[1].max_connections = Some(1);
        let tight = Upstream::new(&config, None);
        let _a = tight.connect_to(0);
        let _b = tight.connect_to(0);
        let _c = tight.connect_to(1);
        assert_eq!(tight.next(Choice::default(), &[]), Err(Unavailable::Full));
    }

    #[test]
    fn sticky_ring_keys_move_only_off_a_down_server() {
        let config = config::Upstream {
            sticky: Some(config::Sticky::Header("x-user".into())),
            ..upstream(5, None)
        };
        let u = Upstream::new(&config, None);
        let owner = |k: u64| {
            u.next(
                Choice {
                    ring_key: Some(k),
                    ..Choice::default()
                },
                &[],
            )
        };
        let keys: Vec<u64> = (0..2_000u64).map(|k| hash_bytes(&k.to_be_bytes())).collect();
        let before: Vec<usize> = keys.iter().map(|&k| owner(k).expect("up")).collect();
        u.servers()[3].set_down(true);
        let after: Vec<usize> = keys.iter().map(|&k| owner(k).expect("up")).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 3 {
                assert_eq!(a, b, "keys of servers that stay up do not move");
            } else {
                assert_ne!(*a, 3);
            }
        }
        u.servers()[3].set_down(false);
        let back: Vec<usize> = keys.iter().map(|&k| owner(k).expect("up")).collect();
        assert_eq!(back, before);
    }

    #[test]
    fn state_of_servers_that_stay_survives_a_rebuild() {
        let old = Upstream::new(&upstream(2, None), None);
        let guard = old.connect_to(1).expect("room");
        let mut changed = upstream(3, None);
        changed.servers.remove(0);
        let new = Upstream::new(&changed, Some(&old));
        assert_eq!(new.servers()[0].active(), 1, "9001 kept its live connection");
        assert_eq!(new.servers()[1].active(), 0);
        drop(guard);
        assert_eq!(new.servers()[0].active(), 0);
    }
}
