//! Which server of an upstream a new connection tries first: smooth weighted round robin, least connections,
//! a consistent-hash ring, or the power of two random choices.
//!
//! The module is pure: it holds no sockets and no health state, and the caller passes live connection counts when
//! a strategy needs them. Picks come from several worker threads at once, so every piece of mutable state is a
//! single atomic and everything else is computed once, when the balancer is built (on start and on each reload).

use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Ring points per unit of weight: with 160 the share of each of a handful of equal servers stays within a few
/// percentage points of even (the same figure nginx's and ketama's rings use).
const POINTS_PER_WEIGHT: u64 = 160;
/// The ring never holds many more points than this (16 bytes each), however large the upstream.
const MAX_POINTS: u64 = 160_000;
/// The round-robin schedule never holds more entries than this (4 bytes each).
const MAX_SCHEDULE: u64 = 1 << 16;
/// Building the schedule costs (servers × schedule length) steps; past this budget the schedule gets shorter, so
/// that a reload of an upstream with thousands of servers still takes milliseconds, not seconds.
const SCHEDULE_WORK: u64 = 1 << 24;
/// A member's whole share of its weight, in thousandths (see [`Balancer::pick_usable`]).
pub const FULL: u32 = 1000;
/// splitmix64's increment (the golden ratio in 64-bit fixed point).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// How an upstream spreads new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    LeastConn,
    ConsistentHash,
    RandomTwo,
}

/// A server as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The server as written in the config, unique within the upstream. The ring's points are derived from it
    /// alone, so that every wsgate instance with the same servers builds the same ring.
    pub identity: String,
    /// 1 to 1000 (a 0 is treated as 1 rather than trusted to mean "never").
    pub weight: u32,
}

/// The balancer of one upstream, as of one config snapshot: immutable tables built once, plus three atomics that
/// every worker thread advances without a lock.
pub struct Balancer {
    strategy: Strategy,
    /// Members' weights, at least 1 each.
    weights: Vec<u64>,
    /// Running sums of `weights`, to draw a member in proportion to its weight with a binary search.
    cumulative: Vec<u64>,
    /// One full cycle of smooth weighted round robin, as member indexes. Precomputed so that a pick is one
    /// `fetch_add` instead of a locked update of every member's current weight.
    schedule: Vec<u32>,
    /// Round-robin picks made so far: the position in `schedule`.
    counter: AtomicU64,
    /// Where the least-connections scan starts, so that ties go round robin instead of always to the first server.
    cursor: AtomicUsize,
    /// (point, member), sorted by point then member.
    ring: Vec<(u64, u32)>,
    /// splitmix64 state for `RandomTwo`.
    rng: AtomicU64,
}

/// By hand rather than derived: the schedule and the ring hold up to hundreds of thousands of entries, which
/// would flood any log line that prints an upstream.
impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("strategy", &self.strategy)
            .field("weights", &self.weights)
            .field("schedule_len", &self.schedule.len())
            .field("ring_points", &self.ring.len())
            .field("counter", &self.counter.load(Ordering::Relaxed))
            .field("cursor", &self.cursor.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// Builds the balancer for `members`. `previous` is the balancer of the same upstream before a config reload
    /// (if any): state worth keeping carries over (the round-robin position; the random generator state). `seed`
    /// seeds the random generator of RandomTwo (tests pass fixed seeds).
    ///
    /// Only the three counters carry over, as plain values: a reload must not send every upstream back to its
    /// first server, nor replay the same random sequence. The tables are rebuilt from `members` because the
    /// servers or weights may have changed.
    pub fn new(strategy: Strategy, members: &[Member], previous: Option<&Balancer>, seed: u64) -> Balancer {
        let weights: Vec<u64> = members.iter().map(|m| u64::from(m.weight.max(1))).collect();
        let cumulative = weights
            .iter()
            .scan(0, |sum, w| {
                *sum += w;
                Some(*sum)
            })
            .collect();
        Balancer {
            strategy,
            schedule: smooth_schedule(&weights),
            ring: ring(members),
            cumulative,
            weights,
            counter: AtomicU64::new(previous.map_or(0, |p| p.counter.load(Ordering::Relaxed))),
            cursor: AtomicUsize::new(previous.map_or(0, |p| p.cursor.load(Ordering::Relaxed))),
            rng: AtomicU64::new(previous.map_or(seed, |p| p.rng.load(Ordering::Relaxed))),
        }
    }

    /// Index (into `members`) of the server a new connection tries first, ignoring availability (tests).
    #[cfg(test)]
    pub fn pick(&self, key: Option<u64>, active: impl Fn(usize) -> u32) -> usize {
        self.pick_usable(key, active, |_| FULL).unwrap_or(0)
    }

    /// Index (into `members`) of the server a new connection tries, among those `share(i)` lets take connections.
    /// `key`: the hash of the request's key for ConsistentHash (from `hash_key`); with `None`, ConsistentHash falls
    /// back to round robin. `active(i)`: live connections of server i (LeastConn and RandomTwo). `share(i)`: the part
    /// of its weight server i has now, in thousandths: 0 for a server that must not be tried (down, ejected,
    /// draining, full, already tried), [`FULL`] normally, in between while it ramps up after coming back (slow start).
    /// `None` when no member may be tried.
    pub fn pick_usable(
        &self,
        key: Option<u64>,
        active: impl Fn(usize) -> u32,
        share: impl Fn(usize) -> u32,
    ) -> Option<usize> {
        let n = self.weights.len();
        if n <= 1 {
            return (n == 1 && share(0) > 0).then_some(0);
        }
        match (self.strategy, key) {
            (Strategy::ConsistentHash, Some(key)) => self.ring_walk(key, &share),
            (Strategy::RoundRobin | Strategy::ConsistentHash, _) => self.round_robin(&active, &share),
            (Strategy::LeastConn, _) => self.least_conn(&active, &share),
            (Strategy::RandomTwo, _) => self.random_two(&active, &share),
        }
    }

    /// [`Balancer::pick_usable`] for a retry: round robin takes the next member of the schedule that may be tried
    /// without moving the schedule on, so that retries do not shift the rotation of first attempts (with one
    /// failing server out of two, it would otherwise get every first attempt).
    pub fn pick_retry(
        &self,
        key: Option<u64>,
        active: impl Fn(usize) -> u32,
        share: impl Fn(usize) -> u32,
    ) -> Option<usize> {
        let round_robin = match (self.strategy, key) {
            (Strategy::RoundRobin, _) | (Strategy::ConsistentHash, None) => self.weights.len() > 1,
            _ => false,
        };
        if !round_robin {
            return self.pick_usable(key, active, share);
        }
        let len = self.schedule.len() as u64;
        let at = self.counter.load(Ordering::Relaxed);
        (0..len.min(4 * self.weights.len() as u64 + 16))
            .map(|k| self.schedule.get(((at + k) % len) as usize).map_or(0, |&m| m as usize))
            .find(|&m| share(m) > 0)
            .or_else(|| self.least_conn(&active, &share))
    }

    /// Index of the server owning `key` on the consistent-hash ring, every server taken: what [`Balancer::ring_walk`]
    /// starts from, as the tests read it.
    #[cfg(test)]
    pub fn ring_owner(&self, key: u64) -> usize {
        let at = self.ring.partition_point(|&(point, _)| point < key);
        // Past the last point the ring wraps around to the first.
        self.ring
            .get(at)
            .or(self.ring.first())
            .map_or(0, |&(_, member)| member as usize)
    }

    /// The owner of `key` on the ring or, when it may not be tried, the next member along the ring that may: the keys
    /// of a server that is down move to their neighbours only, the same on every instance, and come back with it.
    pub fn ring_walk(&self, key: u64, share: &impl Fn(usize) -> u32) -> Option<usize> {
        let n = self.weights.len();
        if !(0..n).any(|i| share(i) > 0) {
            return None;
        }
        let at = self.ring.partition_point(|&(point, _)| point < key);
        let (after, before) = self.ring.split_at(at.min(self.ring.len()));
        before
            .iter()
            .chain(after)
            .map(|&(_, member)| member as usize)
            .find(|&m| share(m) > 0)
    }

    /// The next member of the smooth schedule that may be tried. A member ramping up is taken with a probability
    /// equal to its share, and skipped otherwise. Past a bounded number of skips (most members unavailable), the
    /// least loaded available member for its weight.
    fn round_robin(&self, active: &impl Fn(usize) -> u32, share: &impl Fn(usize) -> u32) -> Option<usize> {
        let len = self.schedule.len() as u64;
        let tries = len.min(4 * self.weights.len() as u64 + 16);
        for _ in 0..tries {
            let at = self.counter.fetch_add(1, Ordering::Relaxed) % len;
            let member = self.schedule.get(at as usize).map_or(0, |&m| m as usize);
            let s = share(member);
            if s >= FULL || (s > 0 && self.random_below(u64::from(FULL)) < u64::from(s)) {
                return Some(member);
            }
        }
        self.least_conn(active, share)
    }

    /// Fewest live connections for its weight (times its share), compared as cross products so that no division
    /// rounds a difference away. Ties go to the first one found scanning from a cursor that advances on every pick,
    /// so idle servers take turns. Each server's count is read once: the counts move while we scan, and comparing
    /// against a re-read value could make the comparison inconsistent.
    fn least_conn(&self, active: &impl Fn(usize) -> u32, share: &impl Fn(usize) -> u32) -> Option<usize> {
        let n = self.weights.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u64, u64)> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            let s = u64::from(share(i));
            if s == 0 {
                continue;
            }
            let load = u64::from(active(i));
            let capacity = self.weights[i] * s;
            match best {
                Some((_, best_load, best_capacity)) if load * best_capacity >= best_load * capacity => {}
                _ => best = Some((i, load, capacity)),
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// The power of two random choices: two distinct servers drawn in proportion to their weights, and the one with
    /// fewer live connections for its weight wins (the first drawn on a tie). It avoids both the herd effect of
    /// everyone choosing the same least-loaded server and a scan of every server's count.
    fn random_two(&self, active: &impl Fn(usize) -> u32, share: &impl Fn(usize) -> u32) -> Option<usize> {
        let total = self.cumulative.last().copied().unwrap_or(0);
        let first = self.member_at(self.random_below(total));
        // The second is drawn from the others only, still in proportion to their weights: draw below the total
        // without the first's weight, then skip over the first's range. One draw, no retry loop.
        let first_weight = self.weights[first];
        let first_start = self.cumulative[first] - first_weight;
        let mut x = self.random_below(total - first_weight);
        if x >= first_start {
            x += first_weight;
        }
        let second = self.member_at(x);
        let (share_first, share_second) = (u64::from(share(first)), u64::from(share(second)));
        if share_first == 0 || share_second == 0 {
            // Some members are unavailable: drawing again could take long; the least loaded of the rest is as good.
            return self.least_conn(active, share);
        }
        let load_first = u64::from(active(first));
        let load_second = u64::from(active(second));
        if load_second * self.weights[first] * share_first < load_first * self.weights[second] * share_second {
            Some(second)
        } else {
            Some(first)
        }
    }

    /// The member whose slice of the cumulative weights holds `x`.
    fn member_at(&self, x: u64) -> usize {
        self.cumulative
            .partition_point(|&sum| sum <= x)
            .min(self.weights.len().saturating_sub(1))
    }

    /// A random number below `bound` (0 if `bound` is 0). splitmix64 needs only an addition to advance, so one
    /// `fetch_add` makes it safe to share between threads. The modulo bias is at most `bound / 2^64`, nothing
    /// with weights summing to a few million.
    fn random_below(&self, bound: u64) -> u64 {
        let state = self.rng.fetch_add(GAMMA, Ordering::Relaxed).wrapping_add(GAMMA);
        splitmix64_mix(state) % bound.max(1)
    }
}

/// splitmix64's output function (Steele, Lea and Flood, 2014).
fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One full cycle of nginx's smooth weighted round robin: at each step every member's current weight grows by its
/// weight, the highest (the lowest index on ties) is chosen and loses the total. Weights are first divided by their
/// gcd, so the cycle is as short as the ratios allow and equal weights give a plain rotation.
///
/// A cycle longer than the cap (weights up to 1000 over hundreds of servers) is shortened by scaling the weights
/// down, rounding, to fit: the ratios then hold to within about one part in the scaled weight, and in exchange the
/// schedule stays a few hundred KiB and quick to build.
fn smooth_schedule(weights: &[u64]) -> Vec<u32> {
    let mut weights = divide_by_gcd(weights);
    let sum: u64 = weights.iter().sum();
    let limit = (SCHEDULE_WORK / (weights.len() as u64).max(1)).clamp(1, MAX_SCHEDULE);
    if sum > limit {
        let scaled: Vec<u64> = weights.iter().map(|w| ((w * limit + sum / 2) / sum).max(1)).collect();
        weights = divide_by_gcd(&scaled);
    }
    let total: u64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &weight) in weights.iter().enumerate() {
            current[i] += weight as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        schedule.push(best as u32);
    }
    schedule
}

fn divide_by_gcd(weights: &[u64]) -> Vec<u64> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    weights.iter().map(|w| w / divisor).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The hash ring: member i gets points at `hash_bytes("{identity}#0")`, `"#1"`, ... A member's points depend on its
/// identity and weight alone, so adding or removing one server moves only the keys that land on its points (about
/// 1/N of them), and every instance with the same servers builds the same ring whatever their order in the config.
///
/// Normally each member gets `POINTS_PER_WEIGHT` points per unit of weight. Past `MAX_POINTS` in total, every member
/// gets a proportional share of `MAX_POINTS` instead (at least one point). Because a member's points are always a
/// prefix of the same sequence, a change in share only adds or removes points at its end; but in that regime a
/// change of servers also shifts every member's share slightly, so a bit more than 1/N of the keys move.
fn ring(members: &[Member]) -> Vec<(u64, u32)> {
    let total_weight: u64 = members.iter().map(|m| u64::from(m.weight.max(1))).sum();
    let points = |weight: u64| {
        if total_weight * POINTS_PER_WEIGHT <= MAX_POINTS {
            weight * POINTS_PER_WEIGHT
        } else {
            (weight * MAX_POINTS / total_weight).max(1)
        }
    };
    let mut ring = Vec::with_capacity(MAX_POINTS.min(total_weight * POINTS_PER_WEIGHT) as usize);
    let mut label = String::new();
    for (index, member) in members.iter().enumerate() {
        for i in 0..points(u64::from(member.weight.max(1))) {
            label.clear();
            // Writing to a String cannot fail.
            let _ = write!(label, "{}#{i}", member.identity);
            ring.push((hash_bytes(label.as_bytes()), index as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// A stable 64-bit hash of bytes: the same on every machine, Rust version and process (unlike std's DefaultHasher),
/// so that N wsgate instances map a key to the same server.
///
/// FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3) followed by MurmurHash3's fmix64 finalizer. FNV-1a
/// alone is well defined and cheap but mixes poorly: keys differing in their last byte land close together, which
/// would put "user-1" and "user-2" on the same stretch of the ring. The finalizer makes every input bit flip about
/// half of the output bits. Not meant to resist an attacker choosing keys: that could only unbalance the ring.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member {
                identity: format!("10.0.0.{i}:8080"),
                weight,
            })
            .collect()
    }

    fn counts(picks: impl IntoIterator<Item = usize>, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for p in picks {
            c[p] += 1;
        }
        c
    }

    fn picks(b: &Balancer, n: usize, loads: &[u32]) -> Vec<usize> {
        (0..n).map(|_| b.pick(None, |i| loads[i])).collect()
    }

    /// Where 10 000 keys `user-0` ... `user-9999` land.
    fn ring_picks(b: &Balancer) -> Vec<usize> {
        (0..10_000)
            .map(|k| b.pick(Some(hash_bytes(format!("user-{k}").as_bytes())), |_| 0))
            .collect()
    }

    #[test]
    fn smooth_round_robin_follows_nginx() {
        let b = Balancer::new(Strategy::RoundRobin, &members(&[5, 1, 1]), None, 1);
        // nginx's documented sequence for weights a=5, b=1, c=1: a a b a c a a.
        assert_eq!(picks(&b, 7, &[0; 3]), [0, 0, 1, 0, 2, 0, 0]);
        let c = counts(picks(&b, 10_000, &[0; 3]), 3);
        for (got, weight) in c.iter().zip([5, 1, 1]) {
            assert!(got.abs_diff(10_000 * weight / 7) <= 1, "{c:?}");
        }
        // Weights are divided by their gcd: 10, 2, 2 is the same 7-pick cycle.
        let scaled = Balancer::new(Strategy::RoundRobin, &members(&[10, 2, 2]), None, 1);
        assert_eq!(picks(&scaled, 7, &[0; 3]), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn retries_do_not_shift_the_round_robin_rotation() {
        let b = Balancer::new(Strategy::RoundRobin, &members(&[1, 1, 1]), None, 1);
        let mut firsts = Vec::new();
        for _ in 0..6 {
            let first = b.pick_usable(None, |_| 0, |_| FULL).expect("a member");
            firsts.push(first);
            let retry = b.pick_retry(None, |_| 0, |m| if m == first { 0 } else { FULL });
            assert_eq!(retry, Some((first + 1) % 3), "the retry takes the next one along");
        }
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert_eq!(b.pick_retry(None, |_| 0, |_| 0), None);
    }

    #[test]
    fn unavailable_members_are_skipped_by_every_strategy() {
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastConn,
            Strategy::RandomTwo,
            Strategy::ConsistentHash,
        ] {
            let b = Balancer::new(strategy, &members(&[1, 2, 1, 1]), None, 7);
            let share = |m: usize| if m == 1 || m == 3 { 0 } else { FULL };
            let c = counts(
                (0..1_000u64).map(|k| b.pick_usable(Some(k.wrapping_mul(GAMMA)), |_| 0, share).expect("some")),
                4,
            );
            assert_eq!((c[1], c[3]), (0, 0), "{strategy:?}: {c:?}");
            assert!(c[0] > 200 && c[2] > 200, "{strategy:?}: {c:?}");
            assert_eq!(b.pick_usable(None, |_| 0, |_| 0), None, "{strategy:?}");
        }
    }

    #[test]
    fn equal_weights_rotate() {
        let b = Balancer::new(Strategy::RoundRobin, &members(&[2, 2, 2]), None, 1);
        assert_eq!(picks(&b, 6, &[0; 3]), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_shares_hold_across_threads() {
        // Each fetch_add takes a distinct schedule slot, so two threads together make exactly one thread's picks.
        let b = Balancer::new(Strategy::RoundRobin, &members(&[5, 1, 1]), None, 1);
        let c = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2).map(|_| s.spawn(|| picks(&b, 7_000, &[0; 3]))).collect();
            counts(workers.into_iter().flat_map(|w| w.join().unwrap_or_default()), 3)
        });
        assert_eq!(c, [10_000, 2_000, 2_000]);
    }

    #[test]
    fn huge_schedules_are_scaled_down() {
        // 3 000 servers with coprime-ish weights would need a cycle of about 1.5 million picks.
        let weights: Vec<u32> = (0..3_000).map(|i| 1 + i % 1000).collect();
        let b = Balancer::new(Strategy::RoundRobin, &members(&weights), None, 1);
        let limit = (SCHEDULE_WORK / 3_000) as usize;
        assert!(b.schedule.len() <= limit + 3_000, "{}", b.schedule.len());
        // Every server still appears, and the heaviest more often than the lightest.
        let c = counts(b.schedule.iter().map(|&m| m as usize), 3_000);
        assert!(c.iter().all(|&n| n >= 1));
        assert!(c[999] > c[0], "{} vs {}", c[999], c[0]);
    }

    #[test]
    fn round_robin_position_carries_over_a_rebuild() {
        let old = Balancer::new(Strategy::RoundRobin, &members(&[1, 1, 1]), None, 1);
        assert_eq!(picks(&old, 2, &[0; 3]), [0, 1]);
        let new = Balancer::new(Strategy::RoundRobin, &members(&[1, 1, 1]), Some(&old), 1);
        assert_eq!(picks(&new, 4, &[0; 3]), [2, 0, 1, 2]);
    }

    #[test]
    fn random_state_carries_over_a_rebuild() {
        let ms = members(&[1; 4]);
        let reference = Balancer::new(Strategy::RandomTwo, &ms, None, 9);
        let expected = picks(&reference, 200, &[0; 4]);
        let old = Balancer::new(Strategy::RandomTwo, &ms, None, 9);
        let mut got = picks(&old, 100, &[0; 4]);
        // The new seed is ignored: the sequence continues where the old balancer left it.
        let new = Balancer::new(Strategy::RandomTwo, &ms, Some(&old), 12345);
        got.extend(picks(&new, 100, &[0; 4]));
        assert_eq!(got, expected);
    }

    #[test]
    fn least_conn_weighs_loads_and_rotates_ties() {
        let b = Balancer::new(Strategy::LeastConn, &members(&[1, 1, 2]), None, 1);
        // Per unit of weight: 3, 1 and 1.5.
        assert_eq!(b.pick(None, |i| [3, 1, 3][i]), 1);
        // Per unit of weight: 3, 3 and 2.
        assert_eq!(b.pick(None, |i| [3, 3, 4][i]), 2);
        // 5/1 against 9/2: the weight decides.
        assert_eq!(b.pick(None, |i| [5, 9, 9][i]), 2);
        let even = Balancer::new(Strategy::LeastConn, &members(&[1; 4]), None, 1);
        assert_eq!(counts(picks(&even, 10_000, &[0; 4]), 4), [2_500; 4]);
        // Ties rotate among the least loaded only.
        let c = counts(picks(&even, 1_000, &[2, 0, 7, 0]), 4);
        assert_eq!(c, [0, 500, 0, 500]);
    }

    #[test]
    fn consistent_hash_spreads_keys_by_weight() {
        let b = Balancer::new(Strategy::ConsistentHash, &members(&[1; 5]), None, 1);
        let c = counts(ring_picks(&b), 5);
        // Measured: 1 777, 2 109, 1 995, 2 059, 2 060 (17.8 % to 21.1 %); bound 14 % to 26 %.
        assert!(c.iter().all(|&n| (1_400..=2_600).contains(&n)), "{c:?}");
        let weighted = Balancer::new(Strategy::ConsistentHash, &members(&[1, 2]), None, 1);
        let c = counts(ring_picks(&weighted), 2);
        // Expected 1 : 2, i.e. 33.3 % on the first. With 160 and 320 points, one standard deviation of a share is
        // about 2.5 points. Measured: 2 963 and 7 037 (29.6 %, 1 : 2.37); bound 27 % to 40 % (1 : 1.5 to 1 : 2.7).
        assert!((2_700..=4_000).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn consistent_hash_without_a_key_is_round_robin() {
        let b = Balancer::new(Strategy::ConsistentHash, &members(&[1; 3]), None, 1);
        assert_eq!(picks(&b, 4, &[0; 3]), [0, 1, 2, 0]);
    }

    #[test]
    fn ring_ignores_the_strategy_and_the_order_of_servers() {
        let ms = members(&[1, 3, 2, 1]);
        let hashing = Balancer::new(Strategy::ConsistentHash, &ms, None, 1);
        let rotating = Balancer::new(Strategy::RoundRobin, &ms, None, 1);
        let mut reversed = ms.clone();
        reversed.reverse();
        let reversed = Balancer::new(Strategy::LeastConn, &reversed, None, 1);
        for k in 0..2_000u64 {
            let key = hash_bytes(&k.to_le_bytes());
            let owner = hashing.ring_owner(key);
            assert_eq!(rotating.ring_owner(key), owner);
            assert_eq!(reversed.ring_owner(key), ms.len() - 1 - owner);
        }
        // Keys past the last point wrap to the first.
        assert_eq!(hashing.ring_owner(u64::MAX), hashing.ring_owner(0));
    }

    #[test]
    fn consistent_hash_moves_about_one_in_n_keys() {
        let ten = members(&[1; 10]);
        let before = ring_picks(&Balancer::new(Strategy::ConsistentHash, &ten, None, 1));
        // Remove server 3: only its keys move.
        let mut nine = ten.clone();
        nine.remove(3);
        let after = ring_picks(&Balancer::new(Strategy::ConsistentHash, &nine, None, 1));
        let mut moved = 0;
        for (&b, &a) in before.iter().zip(&after) {
            if nine[a].identity != ten[b].identity {
                assert_eq!(b, 3, "a key moved off a server that stayed");
                moved += 1;
            }
        }
        // Measured: 982 keys (9.8 %), exactly those server 3 held; bound 6 % to 14 %.
        assert!((600..=1_400).contains(&moved), "{moved} of 10 000 moved");
        // Add an eleventh: the keys that move all go to it.
        let mut eleven = ten.clone();
        eleven.push(Member {
            identity: "10.0.0.99:8080".into(),
            weight: 1,
        });
        let grown = ring_picks(&Balancer::new(Strategy::ConsistentHash, &eleven, None, 1));
        let mut moved = 0;
        for (&b, &g) in before.iter().zip(&grown) {
            if b != g {
                assert_eq!(g, 10, "a key moved between servers that stayed");
                moved += 1;
            }
        }
        // Measured: 946 keys (9.5 %; 1/11 is 9.1 %); bound 5 % to 13 %.
        assert!((500..=1_300).contains(&moved), "{moved} of 10 000 moved");
    }

    #[test]
    fn huge_rings_are_capped() {
        let b = Balancer::new(Strategy::ConsistentHash, &members(&[1000; 300]), None, 1);
        assert!(b.ring.len() as u64 <= MAX_POINTS + 300, "{}", b.ring.len());
        let c = counts((0..3_000u64).map(|k| b.ring_owner(hash_bytes(&k.to_le_bytes()))), 300);
        assert!(c.iter().all(|&n| n > 0 && n < 40), "{c:?}");
    }

    #[test]
    fn random_two_is_even_and_avoids_the_loaded_server() {
        let b = Balancer::new(Strategy::RandomTwo, &members(&[1; 4]), None, 7);
        let c = counts(picks(&b, 10_000, &[0; 4]), 4);
        // Measured: 2 501, 2 504, 2 449, 2 546; bound 20 % to 30 %.
        assert!(c.iter().all(|&n| (2_000..=3_000).contains(&n)), "{c:?}");
        // The two drawn servers are distinct, so the loaded one always meets a lighter one.
        let c = counts(picks(&b, 10_000, &[100, 0, 0, 0]), 4);
        // Measured: 0; bound under 5 %.
        assert!(c[0] < 500, "{c:?}");
    }

    #[test]
    fn random_two_draws_in_proportion_to_weight() {
        let b = Balancer::new(Strategy::RandomTwo, &members(&[1, 3]), None, 7);
        // With no load the first drawn wins, and it is drawn in proportion to weight.
        let c = counts(picks(&b, 10_000, &[0; 2]), 2);
        // Measured: 2 501 and 7 499; bound 22 % to 28 % for weight 1 of 4.
        assert!((2_200..=2_800).contains(&c[0]), "{c:?}");
        // With two servers both are always drawn, so the lighter per unit of weight always wins: 2/1 > 5/3.
        assert_eq!(counts(picks(&b, 1_000, &[2, 5]), 2), [0, 1_000]);
        assert_eq!(counts(picks(&b, 1_000, &[1, 5]), 2), [1_000, 0]);
    }

    #[test]
    fn random_two_is_deterministic_for_a_seed() {
        let run = |seed| {
            let b = Balancer::new(Strategy::RandomTwo, &members(&[1, 2, 3]), None, seed);
            picks(&b, 1_000, &[0; 3])
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn a_single_server_is_always_picked() {
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastConn,
            Strategy::ConsistentHash,
            Strategy::RandomTwo,
        ] {
            let b = Balancer::new(strategy, &members(&[7]), None, 3);
            for k in 0..100 {
                assert_eq!(b.pick(Some(hash_bytes(&[k])), |_| u32::MAX), 0);
                assert_eq!(b.pick(None, |_| 0), 0);
                assert_eq!(b.ring_owner(hash_bytes(&[k])), 0);
            }
        }
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        // Weight 0 is treated as 1; loads at u32::MAX with weight 1000 still fit the u64 cross products.
        let ms = vec![
            Member {
                identity: "a:1".into(),
                weight: 0,
            },
            Member {
                identity: "b:1".into(),
                weight: 1000,
            },
        ];
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastConn,
            Strategy::ConsistentHash,
            Strategy::RandomTwo,
        ] {
            let b = Balancer::new(strategy, &ms, None, u64::MAX);
            for k in [0, 1, u64::MAX] {
                assert!(b.pick(Some(k), |_| u32::MAX) < 2);
                assert!(b.pick(None, |i| [u32::MAX, 0][i]) < 2);
            }
        }
        // The caller never passes an empty list, but it must not panic either.
        let empty = Balancer::new(Strategy::RandomTwo, &[], None, 1);
        assert_eq!(empty.pick(None, |_| 0), 0);
        assert_eq!(empty.ring_owner(5), 0);
    }

    #[test]
    fn debug_output_stays_short() {
        let b = Balancer::new(Strategy::ConsistentHash, &members(&[1000; 4]), None, 1);
        assert!(format!("{b:?}").len() < 300, "{b:?}");
    }

    /// Instances agree on key placement only while the hash stays the same: a change must be deliberate. The values
    /// were checked against an independent FNV-1a + fmix64 implementation.
    #[test]
    fn hash_is_pinned() {
        let pinned = [
            hash_bytes(b""),
            hash_bytes(b"a"),
            hash_bytes(b"user-1"),
            hash_bytes(b"10.0.0.5:8080#0"),
        ];
        assert_eq!(
            pinned,
            [
                17280346270528514342,
                9413272369427828315,
                4729620347622785477,
                16071780903786241934
            ]
        );
    }
}
