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
pub mod balance;
mod error;
pub mod health;
mod outlier;
mod server;
mod sticky;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

pub use attempts::{Attempts, Pending, connect};
pub use balance::hash_bytes;
use balance::{Balancer, Member, Strategy};
pub use error::{Cause, Retry, Unavailable, UpstreamError};
pub use outlier::{Outcome, ejection_time};
pub use server::{Active, ServerState, ShedReason, now_ms, ramp_share};

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
        !config.drain && !state.is_down() && !state.is_ejected(now)
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::config::MAX_EJECTION;
    use crate::signal::StopSignal;
    use balance::FULL;

    fn upstream(n: u16, sticky: Option<config::Sticky>) -> config::Upstream {
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
    fn ports(u: &Upstream, choice: Choice) -> Vec<u16> {
        let mut tried = Vec::new();
        while let Ok(i) = u.next(choice, &tried) {
            tried.push(i);
        }
        tried.iter().map(|&i| u.servers()[i].address.port()).collect()
    }

    fn picks(u: &Upstream, n: usize) -> Vec<usize> {
        let mut counts = vec![0; u.servers().len()];
        for _ in 0..n {
            if let Ok(i) = u.next(Choice::default(), &[]) {
                counts[i] += 1;
            }
        }
        counts
    }

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
    fn pending_handshakes_are_limited_and_retries_budgeted() {
        let mut config = upstream(3, None);
        config.max_pending_handshakes = Some(20);
        let u = Upstream::new(&config, None);
        let mut pending: Vec<Pending> = (0..20).map(|_| u.begin().expect("room")).collect();
        assert_eq!(u.begin().err(), Some(Unavailable::TooManyPending));
        // 20 % of 20 in flight: 4 may retry at once.
        let allowed = pending.iter_mut().map(|p| p.may_retry()).filter(|&ok| ok).count();
        assert_eq!(allowed, 4);
        drop(pending);
        // With 3 in flight the floor of 3 applies: all may retry.
        let mut quiet: Vec<Pending> = (0..3).map(|_| u.begin().expect("room")).collect();
        assert_eq!(quiet.iter_mut().map(|p| p.may_retry()).filter(|&ok| ok).count(), 3);
        drop(quiet);
        assert_eq!(u.shared.pending.load(Ordering::Relaxed), 0);
        assert_eq!(u.shared.retrying.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn consecutive_failures_eject_within_the_max_percentage() {
        let mut config = upstream(4, None);
        config.outlier.consecutive_failures = 3;
        let u = Upstream::new(&config, None);
        u.report(0, Outcome::Failure("refused"));
        u.report(0, Outcome::Failure("refused"));
        u.report(0, Outcome::Success);
        u.report(0, Outcome::Failure("refused"));
        u.report(0, Outcome::Failure("refused"));
        assert!(!u.servers()[0].is_ejected(now_ms()), "a success restarts the count");
        u.report(0, Outcome::Failure("refused"));
        assert!(u.servers()[0].is_ejected(now_ms()));
        for _ in 0..3 {
            u.report(1, Outcome::Failure("refused"));
        }
        for _ in 0..3 {
            u.report(2, Outcome::Failure("refused"));
        }
        let ejected = u.servers().iter().filter(|s| s.is_ejected(now_ms())).count();
        assert_eq!(ejected, 2, "max_ejected_percent 50 of 4 servers");
        assert_eq!(picks(&u, 10), [0, 0, 5, 5]);
    }

    #[test]
    fn ejections_double_for_repeat_offenders_up_to_five_minutes() {
        let base = Duration::from_secs(30);
        assert_eq!(ejection_time(base, 1), base);
        assert_eq!(ejection_time(base, 2), Duration::from_secs(60));
        assert_eq!(ejection_time(base, 3), Duration::from_secs(120));
        assert_eq!(ejection_time(base, 5), MAX_EJECTION);
        assert_eq!(ejection_time(base, 40), MAX_EJECTION);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_ends_after_its_time_and_a_repeat_lasts_twice_as_long() {
        let mut config = upstream(2, None);
        config.outlier.consecutive_failures = 1;
        config.outlier.ejection = Duration::from_secs(10);
        let u = Upstream::new(&config, None);
        u.report(0, Outcome::Failure("refused"));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(u.servers()[0].is_ejected(now_ms()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!u.servers()[0].is_ejected(now_ms()));
        assert!(u.servers()[0].ejection_over(now_ms()));
        assert!(u.servers()[0].end_ejection(now_ms()));
        u.report(0, Outcome::Failure("refused again"));
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(u.servers()[0].is_ejected(now_ms()), "the second ejection lasts 20 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!u.servers()[0].is_ejected(now_ms()));
    }

    #[test]
    fn health_results_need_rise_successes_and_fall_failures_in_a_row() {
        let u = Upstream::new(&upstream(1, None), None);
        let s = &u.servers()[0];
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(true, 2, 3), None, "a success breaks the failure run");
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), Some(true));
        assert_eq!(s.record_check(false, 2, 3), Some(true));
        assert_eq!(s.record_check(true, 2, 3), None);
        assert_eq!(s.record_check(true, 2, 3), Some(false));
        // An ejection restarts the success run: passing checks end it early only after `rise` more.
        let mut config = upstream(2, None);
        config.outlier.consecutive_failures = 1;
        let u = Upstream::new(&config, None);
        let s = &u.servers()[0];
        for _ in 0..5 {
            s.record_check(true, 3, 3);
        }
        u.report(0, Outcome::Failure("refused"));
        assert!(s.is_ejected(now_ms()));
        assert_eq!(s.record_check(true, 3, 3), None);
        assert_eq!(s.record_check(true, 3, 3), None);
        assert_eq!(s.record_check(true, 3, 3), Some(false));
    }

    #[test]
    fn ramp_share_grows_from_a_tenth_to_full() {
        let d = Duration::from_secs(30);
        assert_eq!(ramp_share(Duration::ZERO, d), 100);
        assert_eq!(ramp_share(Duration::from_secs(15), d), 500);
        assert_eq!(ramp_share(Duration::from_secs(30), d), FULL);
        assert_eq!(ramp_share(Duration::from_secs(1), Duration::ZERO), FULL);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_a_returning_server() {
        let mut config = upstream(2, None);
        config.slow_start = Some(Duration::from_secs(10));
        let u = Upstream::new(&config, None);
        u.servers()[1].set_down(true);
        u.servers()[1].set_down(false);
        let early = picks(&u, 10_000);
        assert!(early[1] < 1_500, "{early:?}: about 10 % of its share at first");
        tokio::time::advance(Duration::from_secs(5)).await;
        let half = picks(&u, 10_000);
        assert!((2_500..4_200).contains(&half[1]), "{half:?}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let full = picks(&u, 10_000);
        assert!((4_800..=5_200).contains(&full[1]), "{full:?}");
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

    #[test]
    fn registered_sessions_are_shed_one_at_a_time() {
        let u = Upstream::new(&upstream(1, None), None);
        let signals: Vec<Arc<StopSignal>> = (0..3)
            .map(|_| Arc::new(StopSignal::new(tokio_util::sync::CancellationToken::new())))
            .collect();
        let mut held: Vec<Active> = signals
            .iter()
            .enumerate()
            .map(|(id, s)| {
                let mut a = u.connect_to(0).expect("room");
                a.register(id as u64, s.clone());
                a
            })
            .collect();
        assert_eq!(u.servers()[0].sessions(), 3);
        assert!(u.servers()[0].shed_one(ShedReason::Rebalancing));
        let shed: Vec<_> = signals.iter().filter(|s| s.token().is_cancelled()).collect();
        assert_eq!(shed.len(), 1);
        assert_eq!(shed[0].reason(), Some("rebalancing connections"));
        held.pop();
        assert!(u.servers()[0].sessions() <= 2);
        drop(held);
        assert_eq!(u.servers()[0].sessions(), 0);
        assert!(!u.servers()[0].shed_one(ShedReason::Draining));
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
