//! The control thread: everything that acts on upstreams over time rather than on one connection. It runs the
//! active health checks (one task per checked server), notes the return of ejected servers, and closes live
//! connections at a paced rate: those of a server in drain, of a server a reload removed (once the drain timeout
//! has passed), and those shed to even out an upstream after a server joins or returns (`rebalance`).
//!
//! It runs on a thread of its own with a single-threaded runtime, apart from the workers: a slow health endpoint
//! or a long drain never takes time from the relays. It follows config reloads through [`Supervisor::update`]:
//! checks of servers that stay keep running (their state lives in the server's shared state anyway), checks of
//! removed servers stop, new ones start.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::HealthCheck;
use crate::session::Snapshot;
use crate::upstream::health::{self, unit_random};
use crate::upstream::{ServerState, ShedReason, Upstream, now_ms};

/// How often the supervisor looks at its upstreams while it is closing connections.
const BUSY_TICK: Duration = Duration::from_millis(20);
/// How often it looks otherwise (returns from ejection are noted this late at most; routing does not wait for it).
const IDLE_TICK: Duration = Duration::from_millis(250);

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

/// A running health check.
struct Check {
    check: HealthCheck,
    server: Arc<ServerState>,
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
    /// Health checks by server (the address of its shared state).
    checks: HashMap<usize, Check>,
    /// Servers in drain, by server.
    draining: HashMap<usize, Pace>,
    removed: Vec<Removed>,
    /// Upstreams being rebalanced, by name.
    rebalancing: HashMap<String, Rebalancing>,
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
        }
        for check in self.checks.values() {
            check.stop.cancel();
        }
    }

    /// Starts and stops health checks to match `snapshot`, and notes the servers it no longer lists.
    fn follow(&mut self, snapshot: &Snapshot, previous: Option<&Snapshot>) {
        let mut wanted = HashMap::new();
        for upstream in &snapshot.upstreams {
            let Some(check) = &upstream.config.health else {
                continue;
            };
            for server in upstream.servers() {
                wanted.insert(key(server), (check, upstream, server));
            }
        }
        let listed: Vec<usize> = snapshot
            .upstreams
            .iter()
            .flat_map(|u| u.servers().iter().map(key))
            .collect();
        self.checks.retain(|k, running| {
            let keep = wanted.get(k).is_some_and(|(check, _, _)| **check == running.check);
            if !keep {
                running.stop.cancel();
                // A server that stays but is no longer checked is assumed up again, as an unchecked server is.
                if !wanted.contains_key(k) && listed.contains(k) && running.server.set_down(false) {
                    tracing::info!(server = %running.server.name, "health checks removed: down -> up");
                }
            }
            keep
        });
        for (k, (check, upstream, server)) in wanted {
            if self.checks.contains_key(&k) {
                continue;
            }
            let stop = CancellationToken::new();
            tokio::spawn(health::run(
                check.clone(),
                upstream.config.name.clone(),
                server.clone(),
                upstream.shared.clone(),
                stop.clone(),
            ));
            self.checks.insert(
                k,
                Check {
                    check: check.clone(),
                    server: server.clone(),
                    stop,
                },
            );
        }
        let after = Instant::now() + snapshot.config.server.drain_timeout;
        for upstream in previous.map_or(&[][..], |p| &p.upstreams) {
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
        // Drains of servers the snapshot no longer has in drain stop.
        self.draining.retain(|k, _| {
            snapshot
                .upstreams
                .iter()
                .any(|u| u.servers().iter().zip(&u.config.servers).any(|(s, c)| key(s) == *k && c.drain))
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
                if config.drain && server.sessions() > 0 {
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
                    pace.run(now, upstream.config.drain_rate, || server.shed_one(ShedReason::Draining));
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
        let members: Vec<(usize, f64)> = (0..upstream.servers().len())
            .filter(|&i| upstream.healthy(i, now_ms) && !upstream.config.servers[i].backup)
            .map(|i| (upstream.servers()[i].sessions(), f64::from(upstream.config.servers[i].weight)))
            .collect();
        let total: usize = members.iter().map(|m| m.0).sum();
        let weights: f64 = members.iter().map(|m| m.1).sum();
        // The server furthest over its fair share, and how many connections are over their share in all.
        let mut busiest: Option<(usize, f64)> = None;
        let mut excess = 0.0;
        for (i, &(count, weight)) in members.iter().enumerate() {
            let fair = total as f64 * weight / weights;
            excess += (count as f64 - fair).max(0.0);
            let over = count as f64 / fair.max(f64::MIN_POSITIVE);
            if count as f64 > fair * (1.0 + threshold) + 0.5 && busiest.is_none_or(|(_, o)| over > o) {
                busiest = Some((i, over));
            }
        }
        let Some((busiest, _)) = busiest.filter(|_| members.len() > 1) else {
            if self.rebalancing.remove(name).is_some() {
                tracing::info!(upstream = %name, total, "rebalanced: live connections are within the threshold of even");
            }
            upstream.shared.rebalance_armed.store(false, Ordering::Relaxed);
            return false;
        };
        let state = self.rebalancing.entry(name.clone()).or_insert_with(|| {
            tracing::info!(
                upstream = %name,
                total,
                over_even = excess.round(),
                rate = upstream.config.drain_rate,
                "rebalancing: shedding connections from the busiest servers at a paced rate"
            );
            // Each round sheds at most what is over even: clients that come back to the same server (sticky ones)
            // cannot make it churn for ever.
            Rebalancing {
                budget: excess.ceil() as usize,
                pace: Pace::now(),
            }
        });
        let server = upstream
            .servers()
            .iter()
            .enumerate()
            .filter(|&(i, _)| upstream.healthy(i, now_ms) && !upstream.config.servers[i].backup)
            .nth(busiest)
            .map(|(_, s)| s.clone());
        let Some(server) = server else {
            return false;
        };
        let budget = &mut state.budget;
        let closed = state.pace.run(now, upstream.config.drain_rate, || {
            *budget > 0 && server.shed_one(ShedReason::Rebalancing)
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
