//! Passive outlier detection: handshakes that fail in a row eject their server for a while (doubling for repeat
//! offenders, never more than a set share of the upstream at once). Only failures the server caused count: a
//! failure of wsgate's own (out of file descriptors, say) says nothing about the server.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Upstream;
use super::server::now_ms;
use crate::config::MAX_EJECTION;

/// How a handshake to a backend server went, for passive outlier detection.
#[derive(Debug)]
pub enum Outcome<'a> {
    Success,
    /// Connect failure, reset or timeout before the answer, 5xx to the upgrade: why.
    Failure(&'a str),
}

impl Upstream {
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
        server.ejections_total.fetch_add(1, Ordering::Relaxed);
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

/// How long an ejection lasts: `base` doubled for each ejection in a row before it, at most [`MAX_EJECTION`].
pub fn ejection_time(base: Duration, in_a_row: u32) -> Duration {
    let doubled = base.saturating_mul(1u32 << in_a_row.saturating_sub(1).min(16));
    doubled.min(MAX_EJECTION).max(base.min(MAX_EJECTION))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{picks, upstream};
    use super::*;

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
}
