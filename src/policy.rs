//! What admits a client before any backend sees it: its address (`allow` / `deny` on a listener and on a route),
//! the `Origin` of its WebSocket upgrades, and the connection limits per client, per API key and overall. The rules are config
//! data; this module matches requests against them and keeps the shared counts the limits need. It answers
//! nothing itself: the session turns a "no" into a refusal.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Access, HandshakeRate, Listener, OriginPattern, OriginRule};

impl Access {
    /// Whether a client at `ip` is let in: in no `deny` network and, when `allow` lists any, in one of those.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        !self.deny.iter().any(|n| n.contains(&ip))
            && (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip)))
    }
}

impl OriginRule {
    /// Whether an upgrade with this `Origin` header (none: `None`) may go on.
    pub fn admits(&self, origin: Option<&[u8]>) -> bool {
        let Some(origin) = origin else {
            return self.allow_missing;
        };
        let Ok(origin) = std::str::from_utf8(origin) else {
            return false;
        };
        self.allowed.iter().any(|p| p.matches(origin.trim()))
    }
}

impl OriginPattern {
    /// Whether a serialized origin (`scheme://host[:port]`, RFC 6454) is this one. Scheme and host compare
    /// case-insensitively; a port left out is the scheme's default. `null` and anything malformed match nothing.
    fn matches(&self, origin: &str) -> bool {
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(&self.scheme) || rest.contains(['/', '?', '#', '@']) {
            return false;
        }
        let default = if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
            443
        } else {
            80
        };
        let Some((host, port)) = crate::config::file::split_port(rest, default) else {
            return false;
        };
        if port != self.port {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len()
                && host
                    .get(host.len() - self.host.len()..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(&self.host))
        } else {
            host.eq_ignore_ascii_case(&self.host)
        }
    }
}

/// The client a per-IP limit counts: an IPv4 address, or the IPv6 prefix of `v6_prefix` bits the address is in.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = match v6_prefix.min(128) {
                0 => 0,
                n => u128::MAX << (128 - u32::from(n)),
            };
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

/// What an identity's limits on a route are counted by: a hash, apart from every API key's and from the same
/// identity's on other routes (each route sets its own limits).
pub fn identity_hash(route: &str, identity: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    hash.update(b"identity\0");
    hash.update(route.as_bytes());
    hash.update(b"\0");
    hash.update(identity.as_bytes());
    hash.finalize().into()
}

/// Why a connection or a handshake is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// wsgate holds its `max_connections` already.
    Overall(u32),
    /// This client holds the listener's `max_connections_per_ip` already.
    PerClient(u32),
    /// This client starts handshakes faster than the listener's `handshakes_per_second_per_ip`; the next one is
    /// allowed after this many seconds (rounded up).
    Rate { per_second: u32, retry_after: u32 },
    /// The client's API key holds its `max_connections` already.
    PerKey(u32),
    /// The client's API key starts handshakes faster than its `handshakes_per_second`.
    KeyRate { per_second: u32, retry_after: u32 },
    /// The identity holds the route's `max_connections_per_identity` already.
    PerIdentity(u32),
    /// The identity starts handshakes faster than the route's `handshakes_per_second_per_identity`.
    IdentityRate { per_second: u32, retry_after: u32 },
}

/// Live client connections per listener and client, as the listeners' `max_connections_per_ip` need them. Locked
/// once when a connection opens and once when it closes (only on listeners with such a limit), never per message:
/// a plain mutex is the cheapest correct tool here (the project-wide ban on `std::sync::Mutex` is meant for the
/// relay path).
#[allow(clippy::disallowed_types)]
type PerClient = std::sync::Mutex<HashMap<(SocketAddr, IpAddr), u32>>;

/// Each client's handshake schedule (GCRA: the time at which its bucket is full again), pruned of clients whose
/// bucket is full when it grows. Locked once per handshake on listeners with a rate.
#[allow(clippy::disallowed_types)]
type Schedules = std::sync::Mutex<HashMap<(SocketAddr, IpAddr), Instant>>;

/// Live connections per API key (by the key's hash). Locked once per handshake and once per close of a connection
/// admitted with a key that has a connection limit.
#[allow(clippy::disallowed_types)]
type PerKey = std::sync::Mutex<HashMap<[u8; 32], u32>>;

/// Each API key's handshake schedule (GCRA, as for clients), for keys with a rate: as many as the keys files list.
#[allow(clippy::disallowed_types)]
type KeySchedules = std::sync::Mutex<HashMap<[u8; 32], Instant>>;

/// Clients whose schedules are kept before the full ones are pruned (each prune at least doubles the room).
const SCHEDULES_BEFORE_PRUNE: usize = 4096;

/// The counts behind the connection limits, shared by every worker and kept across reloads.
#[derive(Debug, Default)]
pub struct Admission {
    total: AtomicU32,
    per_client: PerClient,
    schedules: Schedules,
    prune_at: AtomicUsize,
    per_key: PerKey,
    key_schedules: KeySchedules,
    /// The sessions the open-files limit leaves room for (set at start).
    descriptor_limit: std::sync::OnceLock<u32>,
}

/// A connection counted against its API key's `max_connections` while this lives.
#[derive(Debug)]
pub struct KeyAdmitted {
    admission: Arc<Admission>,
    key: [u8; 32],
}

/// A client connection counted against the limits while this lives. It stays small (two words): every live
/// session holds one.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    /// The client's key, on a listener with a per-client limit.
    client: Option<Box<(SocketAddr, IpAddr)>>,
}

impl Admission {
    /// The sessions the open-files limit leaves room for: the overall limit where `max_connections` sets none.
    pub fn set_descriptor_limit(&self, sessions: u32) {
        let _ = self.descriptor_limit.set(sessions.max(1));
    }

    /// The overall limit in force: `max_connections`, or what the descriptors allow.
    pub fn overall_limit(&self, max_connections: Option<u32>) -> Option<u32> {
        max_connections.or_else(|| self.descriptor_limit.get().copied())
    }

    /// Counts a connection from `ip` on `listener`, unless wsgate (`max_connections`) or the client
    /// (`listener.max_connections_per_ip`) is at its limit.
    pub fn admit(
        self: &Arc<Self>,
        listener: &Listener,
        max_connections: Option<u32>,
        ip: IpAddr,
    ) -> Result<Admitted, Limit> {
        let before = self.total.fetch_add(1, Ordering::Relaxed);
        let mut admitted = Admitted {
            admission: self.clone(),
            client: None,
        };
        if let Some(limit) = max_connections.filter(|&l| before >= l) {
            return Err(Limit::Overall(limit));
        }
        if let Some(limit) = listener.max_connections_per_ip {
            let key = (listener.address, client_key(ip, listener.ipv6_prefix));
            // A poisoned lock still holds valid counts (each change is one statement): go on with them.
            let mut counts = self.per_client.lock().unwrap_or_else(PoisonError::into_inner);
            let count = counts.entry(key).or_insert(0);
            if *count >= limit {
                return Err(Limit::PerClient(limit));
            }
            *count += 1;
            admitted.client = Some(Box::new(key));
        }
        Ok(admitted)
    }

    /// Counts a WebSocket handshake from `ip` on `listener` against its `handshakes_per_second_per_ip` (a token
    /// bucket of `burst + 1` handshakes refilled at the rate, as GCRA keeps it: one instant per client).
    pub fn handshake(&self, listener: &Listener, ip: IpAddr) -> Result<(), Limit> {
        let Some(rate) = listener.handshake_rate else {
            return Ok(());
        };
        let now = Instant::now();
        let key = (listener.address, client_key(ip, listener.ipv6_prefix));
        let mut schedules = self.schedules.lock().unwrap_or_else(PoisonError::into_inner);
        let full_at = schedules.get(&key).copied().unwrap_or(now).max(now);
        let next = gcra(rate, full_at, now).map_err(|retry_after| Limit::Rate {
            per_second: rate.per_second,
            retry_after,
        })?;
        schedules.insert(key, next);
        let prune_at = self.prune_at.load(Ordering::Relaxed).max(SCHEDULES_BEFORE_PRUNE);
        if schedules.len() >= prune_at {
            schedules.retain(|_, full| *full > now);
            self.prune_at.store(
                schedules.len().saturating_mul(2).max(SCHEDULES_BEFORE_PRUNE),
                Ordering::Relaxed,
            );
        }
        Ok(())
    }

    /// Counts a handshake with the API key `key` against its `rate` and, with a `max_connections`, a connection
    /// against it (released when the returned guard is dropped). Kept across reloads, like the other counts.
    pub fn admit_key(
        self: &Arc<Self>,
        key: [u8; 32],
        max_connections: Option<u32>,
        rate: Option<HandshakeRate>,
    ) -> Result<Option<KeyAdmitted>, Limit> {
        self.admit_hashed(key, max_connections, rate, Limit::PerKey, |per_second, retry_after| {
            Limit::KeyRate {
                per_second,
                retry_after,
            }
        })
    }

    /// Counts a handshake of `identity` on `route` against the route's per-identity `rate` and, with a `max_connections`, a
    /// connection against it, as [`Admission::admit_key`] does for a key.
    pub fn admit_identity(
        self: &Arc<Self>,
        route: &str,
        identity: &str,
        max_connections: Option<u32>,
        rate: Option<HandshakeRate>,
    ) -> Result<Option<KeyAdmitted>, Limit> {
        self.admit_hashed(
            identity_hash(route, identity),
            max_connections,
            rate,
            Limit::PerIdentity,
            |per_second, retry_after| Limit::IdentityRate {
                per_second,
                retry_after,
            },
        )
    }

    /// A handshake and a connection counted under `key` (an API key's hash, or an identity's).
    fn admit_hashed(
        self: &Arc<Self>,
        key: [u8; 32],
        max_connections: Option<u32>,
        rate: Option<HandshakeRate>,
        held: fn(u32) -> Limit,
        too_fast: fn(u32, u32) -> Limit,
    ) -> Result<Option<KeyAdmitted>, Limit> {
        if let Some(rate) = rate {
            let now = Instant::now();
            let mut schedules = self.key_schedules.lock().unwrap_or_else(PoisonError::into_inner);
            let full_at = schedules.get(&key).copied().unwrap_or(now).max(now);
            let next = gcra(rate, full_at, now).map_err(|retry_after| too_fast(rate.per_second, retry_after))?;
            schedules.insert(key, next);
        }
        let Some(limit) = max_connections else {
            return Ok(None);
        };
        let mut counts = self.per_key.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(key).or_insert(0);
        if *count >= limit {
            return Err(held(limit));
        }
        *count += 1;
        Ok(Some(KeyAdmitted {
            admission: self.clone(),
            key,
        }))
    }

    /// Live client connections.
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
        let Some(key) = self.client.as_deref() else {
            return;
        };
        let mut counts = self.admission.per_client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(key);
            }
        }
    }
}

/// One handshake against a GCRA schedule: a bucket of `burst + 1` handshakes refilled at the rate, kept as the
/// instant it is full again (`full_at`, not before `now`). The new instant, or the seconds to wait (rounded up).
fn gcra(rate: HandshakeRate, full_at: Instant, now: Instant) -> Result<Instant, u32> {
    let interval = Duration::from_secs(1) / rate.per_second.max(1);
    let tolerance = interval * rate.burst;
    let earliest = full_at.checked_sub(tolerance).unwrap_or(now);
    if earliest > now {
        let wait = earliest - now;
        let retry_after = u32::try_from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).unwrap_or(u32::MAX);
        return Err(retry_after.max(1));
    }
    Ok(full_at + interval)
}

impl Drop for KeyAdmitted {
    fn drop(&mut self) {
        let mut counts = self.admission.per_key.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::parse;

    fn route_rules(extra: &str) -> (Access, Option<OriginRule>) {
        let text = format!(
            "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"u\"\n{extra}\n\
             [[upstream]]\nname = \"u\"\n[[upstream.server]]\naddress = \"127.0.0.1:1\"\n"
        );
        let config = parse(&text, "t.toml").unwrap_or_else(|p| panic!("{}", p[0]));
        let route = &config.routes[0];
        (route.access.clone(), route.origins.clone())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_an_allow_list_shuts_out_the_rest() {
        let (open, _) = route_rules("");
        assert!(open.admits(ip("203.0.113.9")));
        let (access, _) = route_rules("allow = [\"10.0.0.0/8\", \"2001:db8::/32\"]\ndeny = [\"10.6.6.6\"]");
        assert!(access.admits(ip("10.1.2.3")));
        assert!(!access.admits(ip("10.6.6.6")), "deny wins");
        assert!(!access.admits(ip("192.0.2.1")), "not in allow");
        assert!(access.admits(ip("2001:db8::1")));
        assert!(!access.admits(ip("2001:db9::1")));
        assert!(
            access.admits(ip("::ffff:10.9.9.9")),
            "IPv4-mapped addresses count as IPv4"
        );
        let (mapped, _) = route_rules("deny = [\"::ffff:10.0.0.0/104\", \"::ffff:192.0.2.7\"]");
        assert!(
            !mapped.admits(ip("10.1.1.1")),
            "a mapped network in the file is the IPv4 one"
        );
        assert!(!mapped.admits(ip("::ffff:10.1.1.1")));
        assert!(!mapped.admits(ip("192.0.2.7")));
        assert!(mapped.admits(ip("192.0.2.8")));
    }

    #[test]
    fn origins_match_scheme_host_and_port() {
        let (_, rule) = route_rules(
            "allowed_origins = [\"https://app.example.com\", \"https://*.example.com\", \"http://localhost:3000\"]",
        );
        let rule = rule.expect("a rule");
        let admits = |o: &str| rule.admits(Some(o.as_bytes()));
        assert!(admits("https://app.example.com"));
        assert!(admits("HTTPS://App.Example.COM"));
        assert!(admits("https://app.example.com:443"));
        assert!(admits("https://a.b.example.com"));
        assert!(admits("http://localhost:3000"));
        assert!(!admits("https://example.com"), "the wildcard needs a subdomain");
        assert!(!admits("http://app.example.com"), "another scheme");
        assert!(!admits("https://app.example.com:8443"), "another port");
        assert!(!admits("https://evil-example.com"));
        assert!(!admits("https://app.example.com.evil.net"));
        assert!(!admits("null"));
        assert!(!admits("http://localhost:3000/path"));
        assert!(rule.admits(None), "no Origin: allowed by default");
        let (_, strict) = route_rules("allowed_origins = [\"https://a.example\"]\nallow_missing_origin = false");
        assert!(!strict.expect("a rule").admits(None));
    }

    #[tokio::test(start_paused = true)]
    async fn handshakes_are_limited_per_client_to_the_rate_and_its_burst() {
        let mut listener = Listener::new("l", "127.0.0.1:1".parse().unwrap());
        listener.handshake_rate = Some(crate::config::HandshakeRate {
            per_second: 10,
            burst: 4,
        });
        let admission = Admission::default();
        let a = ip("10.0.0.1");
        for i in 0..5 {
            assert_eq!(admission.handshake(&listener, a), Ok(()), "burst: handshake {i}");
        }
        assert_eq!(
            admission.handshake(&listener, a),
            Err(Limit::Rate {
                per_second: 10,
                retry_after: 1
            })
        );
        assert_eq!(admission.handshake(&listener, ip("10.0.0.2")), Ok(()), "another client");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(admission.handshake(&listener, a), Ok(()), "one more every 100 ms");
        assert!(admission.handshake(&listener, a).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        for i in 0..5 {
            assert_eq!(admission.handshake(&listener, a), Ok(()), "refilled: handshake {i}");
        }
        // Over a long run the rate holds: 10 per second.
        let mut allowed = 0;
        for _ in 0..300 {
            tokio::time::advance(Duration::from_millis(10)).await;
            allowed += usize::from(admission.handshake(&listener, a).is_ok());
        }
        assert!((29..=31).contains(&allowed), "{allowed} in 3 s");
    }

    #[tokio::test(start_paused = true)]
    async fn schedules_of_clients_gone_quiet_are_pruned() {
        let mut listener = Listener::new("l", "127.0.0.1:1".parse().unwrap());
        listener.handshake_rate = Some(crate::config::HandshakeRate {
            per_second: 1,
            burst: 0,
        });
        let admission = Admission::default();
        for i in 0..SCHEDULES_BEFORE_PRUNE as u32 - 1 {
            let _ = admission.handshake(&listener, IpAddr::from(std::net::Ipv4Addr::from(i)));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let _ = admission.handshake(&listener, ip("192.0.2.1"));
        assert_eq!(
            admission.schedules.lock().unwrap().len(),
            1,
            "only the client just seen"
        );
    }

    #[test]
    fn ipv6_clients_are_counted_per_prefix() {
        assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6"), 64), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6"), 128), ip("2001:db8:1:2:3:4:5:6"));
        assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6"), 0), ip("::"));
        assert_eq!(client_key(ip("192.0.2.1"), 64), ip("192.0.2.1"));
        assert_eq!(client_key(ip("::ffff:192.0.2.1"), 64), ip("192.0.2.1"));
    }

    #[test]
    fn limits_count_live_connections_per_client_and_overall() {
        let mut listener = Listener::new("l", "127.0.0.1:1".parse().unwrap());
        listener.max_connections_per_ip = Some(2);
        let admission = Arc::new(Admission::default());
        let a1 = admission.admit(&listener, Some(3), ip("10.0.0.1")).expect("first");
        let _a2 = admission.admit(&listener, Some(3), ip("10.0.0.1")).expect("second");
        assert_eq!(
            admission.admit(&listener, Some(3), ip("10.0.0.1")).err(),
            Some(Limit::PerClient(2))
        );
        let _b = admission
            .admit(&listener, Some(3), ip("10.0.0.2"))
            .expect("another client");
        assert_eq!(
            admission.admit(&listener, Some(3), ip("10.0.0.3")).err(),
            Some(Limit::Overall(3))
        );
        drop(a1);
        assert_eq!(admission.total(), 3 - 1);
        let _a3 = admission.admit(&listener, Some(3), ip("10.0.0.1")).expect("room again");
        assert_eq!(admission.total(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn api_keys_are_limited_in_connections_and_handshakes() {
        let admission = Arc::new(Admission::default());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let first = admission.admit_key(a, Some(2), None).expect("first");
        let _second = admission.admit_key(a, Some(2), None).expect("second");
        assert_eq!(admission.admit_key(a, Some(2), None).err(), Some(Limit::PerKey(2)));
        assert!(admission.admit_key(b, Some(2), None).is_ok(), "another key");
        drop(first);
        assert!(admission.admit_key(a, Some(2), None).is_ok(), "room again");
        let rate = Some(HandshakeRate {
            per_second: 1,
            burst: 1,
        });
        assert!(admission.admit_key(b, None, rate).is_ok());
        assert!(admission.admit_key(b, None, rate).is_ok(), "the burst");
        assert_eq!(
            admission.admit_key(b, None, rate).err(),
            Some(Limit::KeyRate {
                per_second: 1,
                retry_after: 1
            })
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(admission.admit_key(b, None, rate).is_ok());
    }
}
