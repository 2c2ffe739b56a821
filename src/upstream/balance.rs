//! Which server of an upstream a new connection tries first: smooth weighted round robin, least connections,
//! a consistent-hash ring, or the power of two random choices. Pure: no sockets and no health state; the caller
//! passes live connection counts when a strategy needs them. Picks come from several worker threads at once, so
//! every piece of mutable state is an atomic.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
    /// Unique within the upstream: the ring's points are derived from it.
    pub identity: String,
    /// 1 or more.
    pub weight: u32,
}

/// Ring points per unit of weight: enough for an even spread (about ±10 % with a few servers).
const POINTS_PER_WEIGHT: usize = 160;
/// The ring never holds more points than this, whatever the weights.
const MAX_POINTS: usize = 160_000;
/// The round-robin schedule never grows past this (weights are scaled down to fit).
const MAX_SCHEDULE: u64 = 1 << 16;
/// splitmix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    weights: Vec<u64>,
    /// One cycle of smooth weighted round robin, as member indexes.
    schedule: Vec<u32>,
    /// Picks made so far: the position in `schedule`.
    counter: AtomicU64,
    /// Where the least-connections scan starts, so ties go round robin.
    cursor: AtomicUsize,
    /// (point, member), sorted by point.
    ring: Vec<(u64, u32)>,
    /// Cumulative weights, for drawing a member in proportion to its weight.
    cumulative: Vec<u64>,
    rng: AtomicU64,
}

impl Balancer {
    /// Builds the balancer for `members`. `previous` is the balancer of the same upstream before a reload: the
    /// round-robin position, the least-connections cursor and the random generator carry over. `seed` seeds the
    /// random generator.
    pub fn new(strategy: Strategy, members: &[Member], previous: Option<&Balancer>, seed: u64) -> Balancer {
        let weights: Vec<u64> = members.iter().map(|m| u64::from(m.weight.max(1))).collect();
        let mut total = 0;
        let cumulative = weights
            .iter()
            .map(|w| {
                total += w;
                total
            })
            .collect();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Balancer {
            strategy,
            schedule: smooth_schedule(&weights),
            ring: ring(members),
            cumulative,
            weights,
            counter: AtomicU64::new(previous.map_or(0, |p| load(&p.counter))),
            cursor: AtomicUsize::new(previous.map_or(0, |p| p.cursor.load(Ordering::Relaxed))),
            rng: AtomicU64::new(previous.map_or(seed, |p| load(&p.rng))),
        }
    }

    /// Index of the server a new connection tries first. `key`: the hash of the request's key for
    /// `ConsistentHash` (without one it falls back to round robin). `active(i)`: live connections of server i.
    pub fn pick(&self, key: Option<u64>, active: impl Fn(usize) -> u32) -> usize {
        let n = self.weights.len();
        if n <= 1 {
            return 0;
        }
        match (self.strategy, key) {
            (Strategy::ConsistentHash, Some(key)) => self.ring_owner(key),
            (Strategy::RoundRobin | Strategy::ConsistentHash, _) => self.round_robin(),
            (Strategy::LeastConn, _) => self.least_conn(&active),
            (Strategy::RandomTwo, _) => self.random_two(&active),
        }
    }

    /// The server owning `key` on the consistent-hash ring, whatever the strategy.
    pub fn ring_owner(&self, key: u64) -> usize {
        if self.ring.is_empty() {
            return 0;
        }
        let at = self.ring.partition_point(|&(point, _)| point < key);
        let (_, member) = self.ring[at % self.ring.len()];
        member as usize
    }

    fn round_robin(&self) -> usize {
        let len = self.schedule.len() as u64;
        if len == 0 {
            return 0;
        }
        let at = self.counter.fetch_add(1, Ordering::Relaxed) % len;
        self.schedule[at as usize] as usize
    }

    /// Fewest live connections for its weight (compared as cross products, no division); ties to the first found
    /// from a cursor that advances on every pick.
    fn least_conn(&self, active: &impl Fn(usize) -> u32) -> usize {
        let n = self.weights.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        for i in (0..n).map(|k| (start + k) % n).skip(1) {
            if self.lighter(i, best, active) {
                best = i;
            }
        }
        best
    }

    /// Whether server `a` has fewer live connections for its weight than `b`.
    fn lighter(&self, a: usize, b: usize, active: &impl Fn(usize) -> u32) -> bool {
        u64::from(active(a)) * self.weights[b] < u64::from(active(b)) * self.weights[a]
    }

    fn random_two(&self, active: &impl Fn(usize) -> u32) -> usize {
        let first = self.draw();
        let mut second = self.draw();
        // Two distinct servers: redraw a few times, then take the next one.
        for _ in 0..4 {
            if second != first {
                break;
            }
            second = self.draw();
        }
        if second == first {
            second = (first + 1) % self.weights.len();
        }
        if self.lighter(second, first, active) {
            second
        } else {
            first
        }
    }

    /// A member drawn in proportion to its weight.
    fn draw(&self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1).max(1);
        let x = splitmix(self.rng.fetch_add(GAMMA, Ordering::Relaxed).wrapping_add(GAMMA)) % total;
        self.cumulative.partition_point(|&c| c <= x).min(self.weights.len() - 1)
    }
}

/// splitmix64's output function.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One cycle of nginx's smooth weighted round robin: each step every member's current weight grows by its
/// weight, the highest (first on ties) is chosen and loses the total. Weights are divided by their gcd (and
/// scaled down if the cycle would be huge), so the cycle is as short as the ratios allow.
fn smooth_schedule(weights: &[u64]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut weights: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
    let sum: u64 = weights.iter().sum();
    if sum > MAX_SCHEDULE {
        weights = weights.iter().map(|w| (w * MAX_SCHEDULE / sum).max(1)).collect();
    }
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The hash ring: `POINTS_PER_WEIGHT` points per unit of weight for each member, at the hash of
/// `identity#i`, so a member's points depend on it alone and adding or removing one moves only its keys.
fn ring(members: &[Member]) -> Vec<(u64, u32)> {
    let total_weight: usize = members.iter().map(|m| m.weight.max(1) as usize).sum();
    let per_weight = POINTS_PER_WEIGHT.min(MAX_POINTS / total_weight.max(1)).max(1);
    let mut ring = Vec::with_capacity(total_weight * per_weight);
    for (index, member) in members.iter().enumerate() {
        for i in 0..member.weight.max(1) as usize * per_weight {
            ring.push((hash_bytes(format!("{}#{i}", member.identity).as_bytes()), index as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// A stable 64-bit hash: FNV-1a 64 followed by murmur3's fmix64 finalizer for avalanche on short keys. The same
/// on every machine, Rust version and process (unlike std's `DefaultHasher`), so every wsgate instance maps a
/// key to the same server.
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

    fn counts(picks: impl Iterator<Item = usize>, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for p in picks {
            c[p] += 1;
        }
        c
    }

    #[test]
    fn smooth_round_robin_follows_nginx() {
        let b = Balancer::new(Strategy::RoundRobin, &members(&[5, 1, 1]), None, 1);
        let cycle: Vec<usize> = (0..7).map(|_| b.pick(None, |_| 0)).collect();
        assert_eq!(cycle, [0, 0, 1, 0, 2, 0, 0]);
        let c = counts((0..10_000).map(|_| b.pick(None, |_| 0)), 3);
        for (got, weight) in c.iter().zip([5, 1, 1]) {
            let want = 10_000 * weight / 7;
            assert!(got.abs_diff(want) <= 1, "{c:?}");
        }
        let equal = Balancer::new(Strategy::RoundRobin, &members(&[2, 2, 2]), None, 1);
        let picks: Vec<usize> = (0..6).map(|_| equal.pick(None, |_| 0)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_position_carries_over_a_rebuild() {
        let old = Balancer::new(Strategy::RoundRobin, &members(&[1, 1, 1]), None, 1);
        assert_eq!(old.pick(None, |_| 0), 0);
        let new = Balancer::new(Strategy::RoundRobin, &members(&[1, 1, 1]), Some(&old), 1);
        assert_eq!(new.pick(None, |_| 0), 1);
    }

    #[test]
    fn least_conn_weighs_loads_and_rotates_ties() {
        let b = Balancer::new(Strategy::LeastConn, &members(&[1, 1, 2]), None, 1);
        let loads = [3, 1, 3];
        // Per unit of weight: 3, 1 and 1.5.
        assert_eq!(b.pick(None, |i| loads[i]), 1);
        let loads = [3, 3, 4];
        assert_eq!(b.pick(None, |i| loads[i]), 2, "4 over weight 2 is the lightest");
        let even = Balancer::new(Strategy::LeastConn, &members(&[1, 1, 1, 1]), None, 1);
        assert_eq!(counts((0..10_000).map(|_| even.pick(None, |_| 0)), 4), [2500; 4]);
    }

    fn ring_picks(b: &Balancer, keys: usize) -> Vec<usize> {
        (0..keys)
            .map(|k| b.pick(Some(hash_bytes(format!("user-{k}").as_bytes())), |_| 0))
            .collect()
    }

    #[test]
    fn consistent_hash_spreads_keys_by_weight() {
        let b = Balancer::new(Strategy::ConsistentHash, &members(&[1; 5]), None, 1);
        let c = counts(ring_picks(&b, 10_000).into_iter(), 5);
        // Measured: every server between 16 % and 24 % of 10 000 keys.
        assert!(c.iter().all(|&n| (1_400..=2_600).contains(&n)), "{c:?}");
        let weighted = Balancer::new(Strategy::ConsistentHash, &members(&[1, 2]), None, 1);
        let c = counts(ring_picks(&weighted, 10_000).into_iter(), 2);
        let ratio = c[1] as f64 / c[0] as f64;
        assert!((1.6..=2.5).contains(&ratio), "{c:?}");
        assert_eq!(b.pick(None, |_| 0), 0, "no key: round robin");
        assert_eq!(b.pick(None, |_| 0), 1);
    }

    #[test]
    fn consistent_hash_moves_about_one_in_n_keys() {
        let ten = members(&[1; 10]);
        let before = ring_picks(&Balancer::new(Strategy::ConsistentHash, &ten, None, 1), 10_000);
        // Remove server 3: only its keys move.
        let mut nine = ten.clone();
        nine.remove(3);
        let after = ring_picks(&Balancer::new(Strategy::ConsistentHash, &nine, None, 1), 10_000);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            let a_identity = &nine[*a].identity;
            if *a_identity != ten[*b].identity {
                assert_eq!(*b, 3, "a key moved off a server that stayed");
                moved += 1;
            }
        }
        assert!((600..=1_400).contains(&moved), "{moved} of 10 000 moved");
        // Add an eleventh: the keys that move all go to it.
        let mut eleven = ten.clone();
        eleven.push(Member {
            identity: "10.0.0.99:8080".into(),
            weight: 1,
        });
        let grown = ring_picks(&Balancer::new(Strategy::ConsistentHash, &eleven, None, 1), 10_000);
        let moved = before.iter().zip(&grown).filter(|(b, g)| b != g).count();
        assert!(before.iter().zip(&grown).all(|(b, g)| b == g || *g == 10));
        assert!((500..=1_300).contains(&moved), "{moved} of 10 000 moved");
    }

    #[test]
    fn random_two_is_even_seeded_and_avoids_the_loaded_server() {
        let b = Balancer::new(Strategy::RandomTwo, &members(&[1; 4]), None, 7);
        let c = counts((0..10_000).map(|_| b.pick(None, |_| 0)), 4);
        assert!(c.iter().all(|&n| (2_000..=3_000).contains(&n)), "{c:?}");
        let loads = [100, 0, 0, 0];
        let c = counts((0..10_000).map(|_| b.pick(None, |i| loads[i])), 4);
        assert!(c[0] < 500, "{c:?}");
        let again = |seed| {
            let b = Balancer::new(Strategy::RandomTwo, &members(&[1, 2, 3]), None, seed);
            (0..1_000).map(|_| b.pick(None, |_| 0)).collect::<Vec<_>>()
        };
        assert_eq!(again(42), again(42));
        assert_ne!(again(42), again(43));
    }

    /// Instances agree on key placement only while the hash stays the same: a change must be deliberate.
    #[test]
    fn hash_is_pinned() {
        let pinned = [hash_bytes(b""), hash_bytes(b"a"), hash_bytes(b"user-1")];
        assert_eq!(pinned, [17280346270528514342, 9413272369427828315, 4729620347622785477]);
    }
}
