//! The control thread: everything that acts on upstreams over time rather than on one connection. It runs the
//! active health checks (one task per upstream with `[upstream.health]`, which probes all its servers together in
//! one round every interval), notes the return of ejected servers, and closes live connections at a paced rate:
//! those of a server in drain, of a server a reload removed (once the drain timeout has passed), and those shed to
//! even out an upstream after a server joins or returns (`rebalance`).
//!
//! It runs on a thread of its own with a single-threaded runtime, apart from the workers: a slow health endpoint
//! or a long drain never takes time from the relays. It follows config reloads through [`Supervisor::update`]: the
//! check of an upstream whose check settings and servers stay the same keeps running; any other is stopped and,
//! if the upstream is still checked, started again (the rise and fall streaks live in each server's shared state,
//! so they survive); checks of upstreams removed or no longer checked stop, new ones start.
//!
//! It also refreshes the key sets of routes with a `jwks_url` (one task per route; a reload builds new sets, whose
//! tasks replace the old ones).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::jwks::Remote;
use crate::config::HealthCheck;
use crate::state::Snapshot;
use crate::tls::client::ClientTls;
use crate::upstream::health::{self, unit_random};
use crate::upstream::{ServerState, ShedReason, Upstream, now_ms};

/// How often the supervisor looks at its upstreams while it is closing connections.
const BUSY_TICK: Duration = Duration::from_millis(20);
/// How often it looks otherwise (returns from ejection are noted this late at most; routing does not wait for it).
const IDLE_TICK: Duration = Duration::from_millis(250);
/// How often the TLS listeners' certificate files are looked at for changes.
const TLS_LOOK: Duration = Duration::from_secs(1);

/// The handle on the control thread.
pub struct Supervisor {
    updates: watch::Sender<Arc<Snapshot>>,
    stop: CancellationToken,
    thread: JoinHandle<()>,
}

impl Supervisor {
    /// Starts the control thread for `snapshot`.
    pub fn start(snapshot: Arc<Snapshot>) -> io::Result<Supervisor> {
        let (updates, receiver) = watch::channel(snapshot);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wsgate-control".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the control runtime: no health checks or drains");
                        return;
                    }
                };
                runtime.block_on(Control::default().run(receiver, token));
            })?;
        Ok(Supervisor { updates, stop, thread })
    }

    /// Follows a config reload.
    pub fn update(&self, snapshot: Arc<Snapshot>) {
        let _ = self.updates.send(snapshot);
    }

    /// Stops every check and drain, and waits for the thread.
    pub fn stop(self) {
        self.stop.cancel();
        let _ = self.thread.join();
    }
}

/// The running health checks of one upstream.
struct Check {
    check: HealthCheck,
    /// The upstream's TLS as the check task uses it.
    tls: Option<Arc<ClientTls>>,
    servers: Vec<Arc<ServerState>>,
    stop: CancellationToken,
}

/// Paced closing of connections: when the next one is due.
struct Pace {
    next: Instant,
}

impl Pace {
    fn now() -> Pace {
        Pace { next: Instant::now() }
    }

    /// Closes the connections due by `now` at `rate` per second (each interval jittered between half and one and
    /// a half times the mean); `shed` closes one and says whether there was one. Returns how many it closed.
    fn run(&mut self, now: Instant, rate: u32, mut shed: impl FnMut() -> bool) -> usize {
        let mean = Duration::from_secs(1) / rate.max(1);
        // What is owed from before is at most what two looks apart or one interval makes: after a pause with
        // nothing to close, the pace starts afresh instead of closing a burst.
        if let Some(oldest) = now.checked_sub(mean.max(2 * BUSY_TICK))
            && self.next < oldest
        {
            self.next = oldest;
        }
        let mut closed = 0;
        while self.next <= now && shed() {
            closed += 1;
            self.next += mean.mul_f64(0.5 + unit_random());
        }
        closed
    }
}

/// A server a reload removed, whose live connections are closed once the drain timeout has passed.
struct Removed {
    server: Arc<ServerState>,
    upstream: String,
    after: Instant,
    rate: u32,
    pace: Option<Pace>,
}

/// An upstream being evened out: how many more connections this round may shed.
struct Rebalancing {
    budget: usize,
    pace: Pace,
}

#[derive(Default)]
struct Control {
    /// Health checks by upstream name.
    checks: HashMap<String, Check>,
    /// Servers in drain, by server.
    draining: HashMap<usize, Pace>,
    removed: Vec<Removed>,
    /// Upstreams being rebalanced, by name.
    rebalancing: HashMap<String, Rebalancing>,
    /// When the listeners' certificate files are looked at next.
    next_tls_look: Option<Instant>,
    /// The last problem with each TLS listener's new files, by listener address: said once, not every look.
    tls_problems: HashMap<SocketAddr, String>,
    /// The refresh tasks of JWKS URLs, by key set.
    jwks: HashMap<usize, CancellationToken>,
}

fn key(server: &Arc<ServerState>) -> usize {
    Arc::as_ptr(server) as usize
}

impl Control {
    async fn run(mut self, mut updates: watch::Receiver<Arc<Snapshot>>, stop: CancellationToken) {
        let mut current = updates.borrow_and_update().clone();
        self.follow(&current, None);
        let mut busy = false;
        loop {
            let tick = if busy { BUSY_TICK } else { IDLE_TICK };
            tokio::select! {
                () = stop.cancelled() => break,
                changed = updates.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let next = updates.borrow_and_update().clone();
                    self.follow(&next, Some(&current));
                    current = next;
                }
                () = tokio::time::sleep(tick) => {}
            }
            busy = self.tick(&current);
            self.look_at_certificates(&current);
        }
        for check in self.checks.values() {
            check.stop.cancel();
        }
        for stop in self.jwks.values() {
            stop.cancel();
        }
    }

    /// Runs a refresh task for each JWKS URL of `snapshot`'s routes, and stops those of key sets it no longer has.
    fn follow_jwks(&mut self, snapshot: &Snapshot) {
        let remotes: Vec<Arc<Remote>> = crate::auth::remotes(&snapshot.config);
        let wanted: Vec<usize> = remotes.iter().map(|r| Arc::as_ptr(r) as usize).collect();
        self.jwks.retain(|k, stop| {
            let keep = wanted.contains(k);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (remote, k) in remotes.into_iter().zip(wanted) {
            if let std::collections::hash_map::Entry::Vacant(entry) = self.jwks.entry(k) {
                let stop = CancellationToken::new();
                tokio::spawn(remote.run(stop.clone()));
                entry.insert(stop);
            }
        }
    }

    /// Every [`TLS_LOOK`], reads the TLS listeners' certificate and key files and swaps in those that changed. New
    /// files that do not load leave the certificates in force, with one log line per problem.
    fn look_at_certificates(&mut self, snapshot: &Snapshot) {
        let now = Instant::now();
        if self.next_tls_look.is_some_and(|next| now < next) {
            return;
        }
        self.next_tls_look = Some(now + TLS_LOOK);
        for listener in &snapshot.config.listeners {
            let Some(tls) = &listener.tls else {
                continue;
            };
            match tls.refresh() {
                Ok(changed) => {
                    if self.tls_problems.remove(&listener.address).is_some() || changed {
                        tracing::info!(listener = %listener.name, "certificates reloaded from their files");
                    }
                }
                Err(e) => {
                    let problem = e.to_string();
                    if self.tls_problems.get(&listener.address) != Some(&problem) {
                        tracing::error!(
                            listener = %listener.name,
                            "new certificate files not loaded, the ones in force stay: {problem}"
                        );
                        self.tls_problems.insert(listener.address, problem);
                    }
                }
            }
        }
    }

    /// Starts and stops health checks to match `snapshot`, arms rebalancing of upstreams a server joined, and notes
    /// the servers it no longer lists.
    fn follow(&mut self, snapshot: &Snapshot, previous: Option<&Snapshot>) {
        let listed: Vec<usize> = snapshot
            .upstreams
            .iter()
            .flat_map(|u| u.servers().iter().map(key))
            .collect();
        let wanted: HashMap<&str, &Upstream> = snapshot
            .upstreams
            .iter()
            .filter(|u| u.config.health.is_some())
            .map(|u| (u.config.name.as_str(), u))
            .collect();
        self.stop_changed_checks(&wanted, &listed);
        self.start_missing_checks(wanted);
        self.follow_jwks(snapshot);
        if let Some(previous) = previous {
            Self::arm_rebalancing(snapshot, previous);
            self.note_removed(snapshot, previous, &listed);
        }
        self.forget_ended_drains(snapshot);
    }

    /// Stops the checks whose upstream is gone or changed: a check task keeps the settings and servers it started with.
    fn stop_changed_checks(&mut self, wanted: &HashMap<&str, &Upstream>, listed: &[usize]) {
        let unchanged = |running: &Check, upstream: &Upstream| {
            upstream.config.health.as_ref() == Some(&running.check)
                && match (&upstream.config.tls, &running.tls) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (a, b) => a.is_none() && b.is_none(),
                }
                && running.servers.len() == upstream.servers().len()
                && running
                    .servers
                    .iter()
                    .zip(upstream.servers())
                    .all(|(a, b)| Arc::ptr_eq(a, b))
        };
        let checked: Vec<usize> = wanted.values().flat_map(|u| u.servers().iter().map(key)).collect();
        self.checks.retain(|name, running| {
            let keep = wanted.get(name.as_str()).is_some_and(|u| unchanged(running, u));
            if !keep {
                running.stop.cancel();
                // A server that stays but is no longer checked is assumed up again, as an unchecked server is.
                for server in &running.servers {
                    let k = key(server);
                    if !checked.contains(&k) && listed.contains(&k) && server.set_down(false) {
                        tracing::info!(upstream = %name, server = %server.name, "health checks removed: down -> up");
                    }
                }
            }
            keep
        });
    }

    /// Starts a check task for every checked upstream without one: new, newly checked, or just stopped for a change.
    fn start_missing_checks(&mut self, wanted: HashMap<&str, &Upstream>) {
        for (name, upstream) in wanted {
            let Some(check) = &upstream.config.health else {
                continue;
            };
            if self.checks.contains_key(name) {
                continue;
            }
            let stop = CancellationToken::new();
            tokio::spawn(health::run(
                check.clone(),
                upstream.config.tls.clone(),
                name.to_string(),
                upstream.servers().to_vec(),
                upstream.shared.clone(),
                stop.clone(),
            ));
            self.checks.insert(
                name.to_string(),
                Check {
                    check: check.clone(),
                    tls: upstream.config.tls.clone(),
                    servers: upstream.servers().to_vec(),
                    stop,
                },
            );
        }
    }

    /// Arms rebalancing of each upstream a server joined: a newcomer has no connections, so the spread may be uneven.
    fn arm_rebalancing(snapshot: &Snapshot, previous: &Snapshot) {
        // Armed here, on the control thread, so that no look at the old snapshot can disarm it in between.
        for upstream in &snapshot.upstreams {
            let old = previous
                .upstreams
                .iter()
                .find(|o| o.config.name == upstream.config.name);
            let joined = old.is_some_and(|o| {
                upstream
                    .servers()
                    .iter()
                    .any(|s| !o.servers().iter().any(|p| Arc::ptr_eq(p, s)))
            });
            if joined {
                upstream.shared.rebalance_armed.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Notes the removed servers that still have live connections: they get the drain timeout to end on their own.
    fn note_removed(&mut self, snapshot: &Snapshot, previous: &Snapshot, listed: &[usize]) {
        let after = Instant::now() + snapshot.config.server.drain_timeout;
        for upstream in &previous.upstreams {
            for server in upstream.servers() {
                if listed.contains(&key(server)) || self.removed.iter().any(|r| Arc::ptr_eq(&r.server, server)) {
                    continue;
                }
                let live = server.sessions();
                if live > 0 {
                    tracing::info!(
                        upstream = %upstream.config.name,
                        server = %server.name,
                        live,
                        drain_timeout = ?snapshot.config.server.drain_timeout,
                        "server removed: its live connections are closed after the drain timeout"
                    );
                    self.removed.push(Removed {
                        server: server.clone(),
                        upstream: upstream.config.name.clone(),
                        after,
                        rate: upstream.config.drain_rate,
                        pace: None,
                    });
                }
            }
        }
    }

    /// Forgets the drains `snapshot` ended: a later drain starts afresh, and no entry outlives its server's address.
    fn forget_ended_drains(&mut self, snapshot: &Snapshot) {
        self.draining.retain(|k, _| {
            snapshot.upstreams.iter().any(|u| {
                u.servers()
                    .iter()
                    .zip(&u.config.servers)
                    .any(|(s, c)| key(s) == *k && s.draining(c))
            })
        });
    }

    /// One look at every upstream; returns whether connections are being closed (the next look comes sooner).
    fn tick(&mut self, snapshot: &Snapshot) -> bool {
        let now = Instant::now();
        let now_ms = now_ms();
        let mut busy = false;
        for upstream in &snapshot.upstreams {
            let name = &upstream.config.name;
            for (server, config) in upstream.servers().iter().zip(&upstream.config.servers) {
                if server.ejection_over(now_ms) && server.end_ejection(now_ms) {
                    tracing::info!(upstream = %name, server = %server.name, "server back: ejected -> up (ejection time over)");
                    upstream.shared.rebalance_armed.store(true, Ordering::Relaxed);
                }
                if server.draining(config) && server.sessions() > 0 {
                    let pace = self.draining.entry(key(server)).or_insert_with(|| {
                        tracing::info!(
                            upstream = %name,
                            server = %server.name,
                            live = server.sessions(),
                            rate = upstream.config.drain_rate,
                            "draining server: closing its live connections at a paced rate"
                        );
                        Pace::now()
                    });
                    pace.run(now, upstream.config.drain_rate, || {
                        server.shed_one(ShedReason::Draining)
                    });
                    busy = true;
                }
            }
            busy |= self.rebalance(upstream, now, now_ms);
        }
        self.removed.retain_mut(|r| {
            if now < r.after {
                return true;
            }
            let pace = r.pace.get_or_insert_with(|| {
                tracing::info!(
                    upstream = %r.upstream,
                    server = %r.server.name,
                    live = r.server.sessions(),
                    rate = r.rate,
                    "drain timeout over for a removed server: closing its live connections at a paced rate"
                );
                Pace::now()
            });
            pace.run(now, r.rate, || r.server.shed_one(ShedReason::Removed));
            r.server.sessions() > 0
        });
        busy || !self.removed.is_empty()
    }

    /// Sheds connections from the busiest server of an upstream whose spread of live connections is uneven after a
    /// server joined or returned; returns whether it is shedding.
    fn rebalance(&mut self, upstream: &Upstream, now: Instant, now_ms: u64) -> bool {
        let name = &upstream.config.name;
        let Some(threshold) = upstream.config.rebalance else {
            return false;
        };
        if !upstream.shared.rebalance_armed.load(Ordering::Relaxed) {
            return false;
        }
        let Some(spread) = Spread::of(upstream, now_ms).filter(|s| s.uneven(threshold)) else {
            if self.rebalancing.remove(name).is_some() {
                tracing::info!(upstream = %name, "rebalanced: live connections are within the threshold of even");
            }
            upstream.shared.rebalance_armed.store(false, Ordering::Relaxed);
            return false;
        };
        let state = self.rebalancing.entry(name.clone()).or_insert_with(|| {
            tracing::info!(
                upstream = %name,
                total = spread.total,
                over_even = spread.excess,
                rate = upstream.config.drain_rate,
                "rebalancing: shedding connections from the busiest servers at a paced rate"
            );
            // Each round sheds at most what is over even: clients that come back to the same server (sticky ones)
            // cannot make it churn for ever.
            Rebalancing {
                budget: spread.excess,
                pace: Pace::now(),
            }
        });
        let budget = &mut state.budget;
        let closed = state.pace.run(now, upstream.config.drain_rate, || {
            // The spread is looked at again before each shed: the busiest server changes as connections move.
            *budget > 0
                && Spread::of(upstream, now_ms)
                    .filter(|s| s.uneven(threshold))
                    .is_some_and(|s| upstream.servers()[s.busiest].shed_one(ShedReason::Rebalancing))
        });
        state.budget = state.budget.saturating_sub(closed);
        if state.budget == 0 {
            tracing::info!(upstream = %name, "rebalancing round done");
            self.rebalancing.remove(name);
            upstream.shared.rebalance_armed.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// How an upstream's live WebSocket sessions are spread over its primary servers that are up, against the share of
/// each (in proportion to its weight).
struct Spread {
    servers: usize,
    total: usize,
    /// Sessions over their server's share, summed.
    excess: usize,
    /// The server furthest over its share, and how far (count / share); the one furthest under.
    busiest: usize,
    most: f64,
    least: f64,
}

impl Spread {
    fn of(upstream: &Upstream, now_ms: u64) -> Option<Spread> {
        let members: Vec<(usize, f64, f64)> = (0..upstream.servers().len())
            .filter(|&i| upstream.healthy(i, now_ms) && !upstream.config.servers[i].backup)
            .map(|i| {
                let count = upstream.servers()[i].sessions() as f64;
                (i, count, f64::from(upstream.config.servers[i].weight))
            })
            .collect();
        let total: f64 = members.iter().map(|m| m.1).sum();
        let weights: f64 = members.iter().map(|m| m.2).sum();
        if members.len() < 2 || total < 1.0 {
            return None;
        }
        let mut spread = Spread {
            servers: members.len(),
            total: total as usize,
            excess: 0,
            busiest: members[0].0,
            most: f64::MIN,
            least: f64::MAX,
        };
        let mut excess = 0.0;
        for &(i, count, weight) in &members {
            let share = total * weight / weights;
            excess += (count - share).max(0.0);
            let ratio = count / share;
            if ratio > spread.most {
                spread.most = ratio;
                spread.busiest = i;
            }
            spread.least = spread.least.min(ratio);
        }
        spread.excess = excess.round() as usize;
        Some(spread)
    }

    /// Whether a server is more than `threshold` (a fraction of its share) over or under its share, by more than
    /// half a connection (rounding cannot make it even).
    fn uneven(&self, threshold: f64) -> bool {
        let slack = 0.5 * self.servers as f64 / (self.total as f64).max(1.0);
        self.excess > 0 && (self.most > 1.0 + threshold + slack || self.least < 1.0 - threshold - slack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pace_spreads_closes_at_the_rate_with_jitter() {
        let mut pace = Pace::now();
        let start = Instant::now();
        let mut left = 500;
        let mut closed_at = Vec::new();
        while left > 0 {
            let now = Instant::now();
            let n = pace.run(now, 50, || {
                let some = left > 0;
                left -= usize::from(some);
                some
            });
            closed_at.extend(std::iter::repeat_n(now - start, n));
            tokio::time::sleep(BUSY_TICK).await;
        }
        let last = closed_at.last().copied().unwrap_or_default();
        // 500 at 50 per second: about 10 s, not a burst.
        assert!(
            (Duration::from_secs(8)..Duration::from_secs(12)).contains(&last),
            "{last:?}"
        );
        for second in 0..9 {
            let in_second = closed_at.iter().filter(|t| t.as_secs() == second).count();
            assert!((30..=70).contains(&in_second), "second {second}: {in_second}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pace_restarts_after_a_pause() {
        let mut pace = Pace::now();
        assert_eq!(pace.run(Instant::now(), 10, || false), 0);
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Nothing was owed during the pause: one or two now, not fifty.
        let closed = pace.run(Instant::now(), 10, || true);
        assert!((1..=2).contains(&closed), "{closed}");
    }
}
