//! One backend server's live state, shared by every snapshot that lists it: its live connection count, what health
//! checks and outlier detection say of it, its slow-start ramp, and the registry of its live WebSocket sessions
//! (through which a drain or a rebalance closes them). [`Active`] counts one connection to it while it lives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::balance::FULL;
use super::{Upstream, UpstreamShared};
use crate::live::LiveSession;

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
    pub(super) active: AtomicU32,
    /// Active health checks say it is down.
    pub(super) down: AtomicBool,
    /// Active health checks: successes and failures in a row.
    pub(super) check_successes: AtomicU32,
    pub(super) check_failures: AtomicU32,
    /// Passive outlier detection: failures since the last success.
    pub(super) failures: AtomicU32,
    /// Ejected until this time ([`now_ms`]); 0 = not ejected. Kept after it passes until the supervisor notes the
    /// return.
    pub(super) ejected_until: AtomicU64,
    /// Ejections in a row, each within [`MAX_EJECTION`] of the return from the one before.
    pub(super) ejections: AtomicU32,
    /// When the last ejection ended ([`now_ms`]; 0 = never ejected).
    pub(super) returned_at: AtomicU64,
    /// Slow start: when the server came back ([`now_ms`]); 0 = not ramping.
    pub(super) ramp_start: AtomicU64,
    /// Live WebSocket sessions, by connection id, with the signal that makes each close itself.
    pub(super) sessions: Registry,
    /// Ejections since start (outlier detection).
    pub(super) ejections_total: AtomicU64,
    /// Put in drain through the admin API (as `drain = true` in the config does), until undrained there.
    pub(super) admin_drain: AtomicBool,
}

/// The live sessions of a server. Locked once when a session starts relaying and once when it ends (and by the
/// control thread to shed one), never per message and never across an await: a plain mutex is the cheapest correct
/// tool here, which is why the project-wide ban on `std::sync::Mutex` (meant for the relay path) is lifted for it.
#[allow(clippy::disallowed_types)]
type Registry = std::sync::Mutex<HashMap<u64, Arc<LiveSession>>>;

impl ServerState {
    pub(super) fn new(name: &str, address: SocketAddr) -> ServerState {
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
            admin_drain: AtomicBool::new(false),
            ejections_total: AtomicU64::new(0),
        }
    }

    /// Puts the server in drain, or takes it out (the admin API); returns whether that changed anything. A server
    /// the config drains stays in drain either way.
    pub fn set_admin_drain(&self, drain: bool) -> bool {
        let was = self.admin_drain.swap(drain, Ordering::Relaxed);
        if was && !drain {
            self.ramp_start.store(now_ms(), Ordering::Relaxed);
        }
        was != drain
    }

    /// Whether the server is in drain: by the config's `drain` or through the admin API.
    pub fn draining(&self, config: &crate::config::Server) -> bool {
        config.drain || self.admin_drain.load(Ordering::Relaxed)
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
    /// Times outlier detection has ejected the server since start.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

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
    pub(super) fn ramp(&self, slow_start: Option<Duration>, now: u64) -> u32 {
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
        signal.map(|s| s.stop.stop(reason.text())).is_some()
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
    pub(super) fn try_new(upstream: &Upstream, index: usize) -> Option<Active> {
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

    /// Registers the live WebSocket `session` so that a drain or a rebalance can close it through its stop signal.
    pub fn register(&mut self, session: Arc<LiveSession>) {
        if let Ok(mut sessions) = self.server.sessions.lock() {
            let id = session.id;
            sessions.insert(id, session);
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

#[cfg(test)]
mod tests {
    use super::super::outlier::Outcome;
    use super::super::testing::{picks, upstream};
    use super::*;

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
    fn registered_sessions_are_shed_one_at_a_time() {
        let u = Upstream::new(&upstream(1, None), None);
        let live = crate::live::Sessions::default();
        let registered: Vec<_> = (0..3)
            .map(|id| {
                live.start(crate::live::NewSession {
                    id,
                    client: std::net::IpAddr::from([127, 0, 0, 1]),
                    identity: None,
                    mode: "frames",
                    place: crate::live::PlaceRef::default(),
                })
            })
            .collect();
        let mut held: Vec<Active> = registered
            .iter()
            .map(|r| {
                let mut a = u.connect_to(0).expect("room");
                a.register(r.session.clone());
                a
            })
            .collect();
        assert_eq!(u.servers()[0].sessions(), 3);
        assert!(u.servers()[0].shed_one(ShedReason::Rebalancing));
        let shed: Vec<_> = registered.iter().filter_map(|r| r.session.stop.reason()).collect();
        assert_eq!(shed, [("rebalancing connections", 1012)]);
        held.pop();
        assert!(u.servers()[0].sessions() <= 2);
        drop(held);
        assert_eq!(u.servers()[0].sessions(), 0);
        assert!(!u.servers()[0].shed_one(ShedReason::Draining));
    }
}
