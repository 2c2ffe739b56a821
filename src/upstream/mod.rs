//! Backend servers: the live state of each upstream (its servers, their live connection counts, the balancer),
//! which server a new connection tries first and in what order the others follow (each at most once per
//! handshake), the sticky-cookie ids, and connecting within the connect timeout.
//!
//! State is rebuilt on every config reload from the previous state: a server that stays (same upstream, same
//! name) keeps its live connection count, and the balancer keeps its position.

pub mod balance;
pub mod health;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha1::{Digest, Sha1};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use balance::hash_bytes;
use balance::{Balancer, FULL, Member, Strategy};

use crate::config::{self, Balance, MAX_EJECTION, MIN_RETRY_CONCURRENCY};
use crate::signal::StopSignal;

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

/// Milliseconds on the process clock (tokio's, so that tests with a paused clock control it), never 0: 0 stands for
/// "not set" in the atomics below.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    1 + Instant::now().saturating_duration_since(epoch).as_millis() as u64
}

/// Why a server's live connections are being closed by wsgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    Draining,
    Removed,
    Rebalancing,
}

impl ShedReason {
    /// The reason sent with close 1012 and written to the access log.
    pub fn text(self) -> &'static str {
        match self {
            ShedReason::Draining => "server draining",
            ShedReason::Removed => "server removed from the configuration",
            ShedReason::Rebalancing => "rebalancing connections",
        }
    }
}

/// A server's live state, shared by every snapshot that still lists it.
#[derive(Debug)]
pub struct ServerState {
    /// As written in the config: the server's identity.
    pub name: String,
    pub address: SocketAddr,
    /// Live connections (WebSocket sessions and plain HTTP backend connections) to this server.
    active: AtomicU32,
    /// Active health checks say it is down.
    down: AtomicBool,
    /// Active health checks: successes and failures in a row.
    check_successes: AtomicU32,
    check_failures: AtomicU32,
    /// Passive outlier detection: failures since the last success.
    failures: AtomicU32,
    /// Ejected until this time ([`now_ms`]); 0 = not ejected. Kept after it passes until the supervisor notes the
    /// return.
    ejected_until: AtomicU64,
    /// Ejections in a row, each within [`MAX_EJECTION`] of the return from the one before.
    ejections: AtomicU32,
    /// When the last ejection ended ([`now_ms`]; 0 = never ejected).
    returned_at: AtomicU64,
    /// Slow start: when the server came back ([`now_ms`]); 0 = not ramping.
    ramp_start: AtomicU64,
    /// Live WebSocket sessions, by connection id, with the signal that makes each close itself.
    sessions: Registry,
}

/// The live sessions of a server. Locked once when a session starts relaying and once when it ends (and by the
/// control thread to shed one), never per message and never across an await: a plain mutex is the cheapest correct
/// tool here, which is why the project-wide ban on `std::sync::Mutex` (meant for the relay path) is lifted for it.
#[allow(clippy::disallowed_types)]
type Registry = std::sync::Mutex<HashMap<u64, Arc<StopSignal>>>;

impl ServerState {
    fn new(name: &str, address: SocketAddr) -> ServerState {
        ServerState {
            name: name.to_string(),
            address,
            active: AtomicU32::new(0),
            down: AtomicBool::new(false),
            check_successes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            returned_at: AtomicU64::new(0),
            ramp_start: AtomicU64::new(0),
            sessions: Registry::default(),
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Marks the server down or up (active health checks); returns whether that changed anything.
    pub fn set_down(&self, down: bool) -> bool {
        let was = self.down.swap(down, Ordering::Relaxed);
        if was && !down {
            self.ramp_start.store(now_ms(), Ordering::Relaxed);
        }
        was != down
    }

    /// Records a health check's result: returns whether the server should now be down (`Some(true)`: `fall`
    /// failures in a row), up (`Some(false)`: `rise` successes in a row), or stay as it is (`None`).
    pub fn record_check(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        let (reset, count, needed) = if ok {
            (&self.check_failures, &self.check_successes, rise)
        } else {
            (&self.check_successes, &self.check_failures, fall)
        };
        reset.store(0, Ordering::Relaxed);
        let run = count.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        (run >= needed.max(1)).then_some(!ok)
    }

    /// Whether the server is ejected at `now` ([`now_ms`]).
    pub fn is_ejected(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    /// Ends an ejection, because its time has passed or because health checks say the server is up. Returns
    /// whether the server was ejected.
    pub fn end_ejection(&self, now: u64) -> bool {
        let until = self.ejected_until.swap(0, Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.ramp_start.store(now, Ordering::Relaxed);
        self.returned_at.store(now, Ordering::Relaxed);
        true
    }

    /// An ejection whose time has passed and that nobody has ended yet.
    pub fn ejection_over(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now >= until
    }

    /// The part of its weight a server ramping up after coming back gets at `now`, in thousandths.
    fn ramp(&self, slow_start: Option<Duration>, now: u64) -> u32 {
        let start = self.ramp_start.load(Ordering::Relaxed);
        let Some(slow_start) = slow_start.filter(|_| start != 0) else {
            return FULL;
        };
        let ramp = ramp_share(Duration::from_millis(now.saturating_sub(start)), slow_start);
        if ramp == FULL {
            self.ramp_start.store(0, Ordering::Relaxed);
        }
        ramp
    }

    /// Live WebSocket sessions registered for shedding.
    pub fn sessions(&self) -> usize {
        self.sessions.lock().map_or(0, |s| s.len())
    }

    /// Closes one live session (any one), saying `reason`; false when there is none.
    pub fn shed_one(&self, reason: ShedReason) -> bool {
        let signal = {
            let Ok(mut sessions) = self.sessions.lock() else {
                return false;
            };
            let Some(&id) = sessions.keys().next() else {
                return false;
            };
            sessions.remove(&id)
        };
        signal.map(|s| s.stop(reason.text())).is_some()
    }
}

/// Slow start: a server back for `elapsed` of `slow_start` gets that fraction of its weight, at least 10 %.
pub fn ramp_share(elapsed: Duration, slow_start: Duration) -> u32 {
    if elapsed >= slow_start || slow_start.is_zero() {
        return FULL;
    }
    let share = (elapsed.as_millis() * u128::from(FULL) / slow_start.as_millis().max(1)) as u32;
    share.clamp(FULL / 10, FULL)
}

/// How long an ejection lasts: `base` doubled for each ejection in a row before it, at most [`MAX_EJECTION`].
pub fn ejection_time(base: Duration, in_a_row: u32) -> Duration {
    let doubled = base.saturating_mul(1u32 << in_a_row.saturating_sub(1).min(16));
    doubled.min(MAX_EJECTION).max(base.min(MAX_EJECTION))
}

/// A live connection to a server, counted on the server and its upstream while this lives.
#[derive(Debug)]
pub struct Active {
    server: Arc<ServerState>,
    upstream: Arc<UpstreamShared>,
    /// The session's id in the server's registry of sessions, once registered.
    registered: Option<u64>,
}

impl Active {
    /// Counts a new connection, unless the server or the upstream is at its `max_connections`.
    fn try_new(upstream: &Upstream, index: usize) -> Option<Active> {
        let server = upstream.servers.get(index)?;
        let limit = upstream.config.servers.get(index).and_then(|s| s.max_connections);
        let before = server.active.fetch_add(1, Ordering::Relaxed);
        let total = upstream.shared.active.fetch_add(1, Ordering::Relaxed);
        let active = Active {
            server: server.clone(),
            upstream: upstream.shared.clone(),
            registered: None,
        };
        let over = limit.is_some_and(|l| before >= l) || upstream.config.max_connections.is_some_and(|l| total >= l);
        (!over).then_some(active)
    }

    pub fn server(&self) -> &ServerState {
        &self.server
    }

    /// Registers the WebSocket session `id` so that a drain or a rebalance can close it through `stop`.
    pub fn register(&mut self, id: u64, stop: Arc<StopSignal>) {
        if let Ok(mut sessions) = self.server.sessions.lock() {
            sessions.insert(id, stop);
            self.registered = Some(id);
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::Relaxed);
        self.upstream.active.fetch_sub(1, Ordering::Relaxed);
        if let Some(id) = self.registered
            && let Ok(mut sessions) = self.server.sessions.lock()
        {
            sessions.remove(&id);
        }
    }
}

/// A handshake waiting for a server's answer, counted while this lives.
#[derive(Debug)]
pub struct Pending {
    upstream: Arc<UpstreamShared>,
    budget_percent: u32,
    retrying: bool,
}

impl Pending {
    /// Whether the retry budget lets this handshake go on to another server: retries in flight stay within the
    /// budget's share of handshakes in flight (at least [`MIN_RETRY_CONCURRENCY`]).
    pub fn may_retry(&mut self) -> bool {
        if self.retrying {
            return true;
        }
        let pending = u64::from(self.upstream.pending.load(Ordering::Relaxed));
        let allowed = (pending * u64::from(self.budget_percent) / 100).max(u64::from(MIN_RETRY_CONCURRENCY));
        let retrying = self.upstream.retrying.fetch_add(1, Ordering::Relaxed);
        if u64::from(retrying) < allowed {
            self.retrying = true;
            true
        } else {
            self.upstream.retrying.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.upstream.pending.fetch_sub(1, Ordering::Relaxed);
        if self.retrying {
            self.upstream.retrying.fetch_sub(1, Ordering::Relaxed);
        }
    }
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

/// How a handshake to a backend server went, for passive outlier detection.
#[derive(Debug)]
pub enum Outcome<'a> {
    Success,
    /// Connect failure, reset or timeout before the answer, 5xx to the upgrade: why.
    Failure(&'a str),
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
            cookie_ids: config.servers.iter().map(|s| cookie_id(config, &s.name)).collect(),
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

    /// The server whose sticky cookie has this value.
    pub fn server_by_cookie(&self, value: &[u8]) -> Option<usize> {
        self.cookie_ids.iter().position(|id| id.as_bytes() == value)
    }

    /// The value of the sticky cookie naming `server` (`None` for a server this upstream does not list).
    pub fn cookie_id(&self, server: &ServerState) -> Option<&str> {
        let index = self.servers.iter().position(|s| std::ptr::eq(&**s, server))?;
        self.cookie_ids.get(index).map(String::as_str)
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

    /// Counts a handshake in flight; `Err` when the upstream has `max_pending_handshakes` already.
    pub fn begin(&self) -> Result<Pending, Unavailable> {
        let before = self.shared.pending.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            upstream: self.shared.clone(),
            budget_percent: self.config.retry_budget_percent,
            retrying: false,
        };
        match self.config.max_pending_handshakes {
            Some(limit) if before >= limit => Err(Unavailable::TooManyPending),
            _ => Ok(pending),
        }
    }

    /// Notes how a handshake to server `i` went: failures in a row eject it (passive outlier detection).
    pub fn report(&self, i: usize, outcome: Outcome<'_>) {
        let Some(server) = self.servers.get(i) else {
            return;
        };
        let why = match outcome {
            Outcome::Success => {
                if server.failures.load(Ordering::Relaxed) != 0 {
                    server.failures.store(0, Ordering::Relaxed);
                }
                return;
            }
            Outcome::Failure(why) => why,
        };
        let failures = server.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let outlier = self.config.outlier;
        if outlier.consecutive_failures == 0 || failures < outlier.consecutive_failures {
            return;
        }
        let now = now_ms();
        if server.is_ejected(now) {
            return;
        }
        let ejected = self.servers.iter().filter(|s| s.is_ejected(now)).count();
        if (ejected + 1) * 100 > outlier.max_ejected_percent as usize * self.servers.len() {
            tracing::warn!(
                upstream = %self.config.name,
                server = %server.name,
                failures,
                ejected,
                "not ejecting a failing server: max_ejected_percent reached"
            );
            return;
        }
        // One thread ejects: the one that moves `ejected_until` from "not ejected" (or a past ejection) to the new end.
        let seen = server.ejected_until.load(Ordering::Relaxed);
        if seen > now {
            return;
        }
        // A repeat offender: ejected again within MAX_EJECTION of its return (or before its return was even noted).
        let returned_at = server.returned_at.load(Ordering::Relaxed);
        let repeat =
            seen != 0 || (returned_at != 0 && now.saturating_sub(returned_at) < MAX_EJECTION.as_millis() as u64);
        let in_a_row = if repeat {
            server.ejections.load(Ordering::Relaxed) + 1
        } else {
            1
        };
        let time = ejection_time(outlier.ejection, in_a_row);
        let until = now + time.as_millis() as u64;
        if server
            .ejected_until
            .compare_exchange(seen, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        server.ejections.store(in_a_row, Ordering::Relaxed);
        server.failures.store(0, Ordering::Relaxed);
        // Health checks bring it back early only with `rise` successes counted from now.
        server.check_successes.store(0, Ordering::Relaxed);
        tracing::warn!(
            upstream = %self.config.name,
            server = %server.name,
            failures,
            ejection = ?time,
            last_failure = why,
            "server ejected: up -> ejected"
        );
    }
}

/// Why no server of an upstream can take a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("no backend servers configured")]
    NoServers,
    #[error("every backend server is down, ejected or draining")]
    AllDown,
    #[error("every available backend server is at its max_connections")]
    Full,
    #[error("the upstream is at its max_pending_handshakes")]
    TooManyPending,
    /// Every server that could take the connection has been tried.
    #[error("every backend server has been tried")]
    Exhausted,
}

/// The servers one request tries in turn: each at most once, at most `retries` after the first, within the
/// upstream's retry budget. Failures feed outlier detection.
#[derive(Debug)]
pub struct Attempts<'a> {
    upstream: &'a Upstream,
    choice: Choice,
    tried: Vec<usize>,
    pending: Pending,
    last: Option<UpstreamError>,
}

impl<'a> Attempts<'a> {
    /// Starts a request's attempts; `Err` when the upstream cannot take another handshake now.
    pub fn start(upstream: &'a Upstream, choice: Choice) -> Result<Attempts<'a>, UpstreamError> {
        let pending = upstream.begin().map_err(UpstreamError::Unavailable)?;
        Ok(Attempts {
            upstream,
            choice,
            tried: Vec::with_capacity(2),
            pending,
            last: None,
        })
    }

    /// The next server to try and its counted connection; `Err` with the reason to give the client when no server
    /// is left to try.
    pub fn next_server(&mut self) -> Result<(usize, Active), UpstreamError> {
        loop {
            if !self.tried.is_empty() {
                if self.tried.len() > self.upstream.config.retries as usize {
                    return Err(self.give_up());
                }
                if !self.pending.may_retry() {
                    tracing::debug!(upstream = %self.upstream.config.name, "retry budget spent: no retry");
                    return Err(self.give_up());
                }
            }
            let i = match self.upstream.next(self.choice, &self.tried) {
                Ok(i) => i,
                Err(Unavailable::Exhausted) => return Err(self.give_up()),
                Err(e) => return Err(self.last.take().unwrap_or(UpstreamError::Unavailable(e))),
            };
            self.tried.push(i);
            match self.upstream.connect_to(i) {
                Some(active) => return Ok((i, active)),
                // The whole upstream is full: no other server can take it either.
                None if self.upstream.is_full() => return Err(UpstreamError::Unavailable(Unavailable::Full)),
                // This server filled up since it was picked: another may have room.
                None => self.last = Some(UpstreamError::Unavailable(Unavailable::Full)),
            }
        }
    }

    fn give_up(&mut self) -> UpstreamError {
        self.last
            .take()
            .unwrap_or(UpstreamError::Unavailable(Unavailable::AllDown))
    }

    /// Server `i` failed before answering: the next attempt goes elsewhere, and `error` is what the client hears
    /// when none is left.
    pub fn failed(&mut self, i: usize, error: UpstreamError) {
        self.upstream.report(i, Outcome::Failure(&error.to_string()));
        self.last = Some(error);
    }

    /// Server `i` answered (`error_status`: with a 5xx, which counts against it but is passed to the client).
    pub fn answered(&self, i: usize, error_status: bool) {
        let outcome = if error_status {
            Outcome::Failure("answered the upgrade with a 5xx status")
        } else {
            Outcome::Success
        };
        self.upstream.report(i, outcome);
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
    #[error("{0}")]
    Unavailable(Unavailable),
    #[error("every backend server tried failed; last: {server}: {source}")]
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
            Self::Unavailable(_) => 503,
            Self::AllFailed { .. } => 502,
            Self::Timeout { .. } => 504,
        }
    }

    /// Seconds the client is told to wait before trying again (`Retry-After`), for an answer that says the upstream
    /// is overloaded or out of servers for now.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Unavailable(Unavailable::Full | Unavailable::TooManyPending) => Some(1),
            Self::Unavailable(_) => Some(5),
            _ => None,
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
