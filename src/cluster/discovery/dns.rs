//! Servers from DNS: A, AAAA or SRV records of a name, looked up again when the shortest TTL among them has passed
//! (at least [`MIN_TTL`], at most [`MAX_TTL`]). A failed lookup, or one with no record, keeps the servers known
//! last and is logged; the next try follows with a growing backoff.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

use super::{Found, Reporter, backoff};
use crate::config::{DEFAULT_WEIGHT, DnsDiscovery, DnsKind, MAX_WEIGHT};

/// Records are looked up again at most this often, whatever their TTL.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Records are looked up again at least this often, whatever their TTL.
pub const MAX_TTL: Duration = Duration::from_secs(300);

/// Why a lookup found no server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set up the resolver: {0}")]
    Resolver(String),
    #[error("lookup of {kind} `{name}` failed: {reason}")]
    Lookup {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("no {kind} record for `{name}`")]
    Empty { kind: &'static str, name: String },
}

/// Looks `dns` up for as long as the task runs, reporting each changed set of servers.
pub async fn watch(dns: DnsDiscovery, mut reporter: Reporter) {
    let mut failures = 0u32;
    // A resolver that cannot be set up (no /etc/resolv.conf yet) is tried again, as a lookup is.
    let resolver = loop {
        match resolver(&dns) {
            Ok(resolver) => break resolver,
            Err(e) => {
                let wait = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::error!(
                    upstream = reporter.upstream(),
                    "DNS discovery: {e}; next try in {wait:?}"
                );
                tokio::time::sleep(wait).await;
            }
        }
    };
    failures = 0;
    loop {
        let wait = match lookup(&resolver, &dns).await {
            Ok((servers, ttl)) => {
                if failures > 0 {
                    tracing::info!(
                        upstream = reporter.upstream(),
                        name = %dns.name,
                        servers = servers.len(),
                        "DNS discovery: lookups succeed again"
                    );
                }
                failures = 0;
                if !reporter.report(servers).await {
                    return;
                }
                next_lookup(ttl)
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures - 1).min(MAX_TTL);
                tracing::warn!(
                    upstream = reporter.upstream(),
                    "DNS discovery: {e}: the servers known last stay; next try in {wait:?}"
                );
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// When the records are looked up again: at their TTL, within [`MIN_TTL`] and [`MAX_TTL`].
fn next_lookup(ttl: Duration) -> Duration {
    ttl.clamp(MIN_TTL, MAX_TTL)
}

/// A resolver that asks `dns.resolver` (or the system's name servers), caching nothing: each lookup asks again.
fn resolver(dns: &DnsDiscovery) -> Result<TokioResolver, DnsError> {
    let mut builder = match dns.resolver {
        Some(address) => {
            let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                .into_iter()
                .map(|mut c| {
                    c.port = address.port();
                    c
                })
                .collect();
            let server = NameServerConfig::new(address.ip(), true, connections);
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|e| DnsError::Resolver(e.to_string()))?,
    };
    let options = builder.options_mut();
    options.cache_size = 0;
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    builder.build().map_err(|e| DnsError::Resolver(e.to_string()))
}

/// The servers `dns` names now, and the shortest TTL of the records that named them.
async fn lookup(resolver: &TokioResolver, dns: &DnsDiscovery) -> Result<(Vec<Found>, Duration), DnsError> {
    let failed = |kind, e: &dyn std::fmt::Display| DnsError::Lookup {
        kind,
        name: dns.name.clone(),
        reason: e.to_string(),
    };
    let name = fully_qualified(&dns.name);
    let mut found = Vec::new();
    let mut ttl = MAX_TTL;
    let kinds: &[(RecordType, &'static str)] = match dns.kind {
        DnsKind::A => &[(RecordType::A, "A")],
        DnsKind::Aaaa => &[(RecordType::AAAA, "AAAA")],
        DnsKind::Ip => &[(RecordType::A, "A"), (RecordType::AAAA, "AAAA")],
        DnsKind::Srv => &[(RecordType::SRV, "SRV")],
    };
    let mut last_error = None;
    for &(record_type, kind) in kinds {
        let answer = match resolver.lookup(name.as_str(), record_type).await {
            Ok(answer) => answer,
            // A name with A records and no AAAA ones (or the reverse) is fine for `ip`.
            Err(e) if e.is_no_records_found() && kinds.len() > 1 => continue,
            Err(e) => {
                last_error = Some(failed(kind, &e));
                continue;
            }
        };
        for record in answer.answers() {
            let ip = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                RData::SRV(srv) => {
                    // The root as a target says "no service here" (RFC 2782).
                    if srv.target.is_root() {
                        continue;
                    }
                    let target = srv.target.to_string();
                    let (addresses, target_ttl) = match target_addresses(resolver, &target).await {
                        Ok(found) => found,
                        // A target that names nothing (a stale record) is left out; the others still serve.
                        Err(TargetError::NoRecords) => {
                            tracing::warn!(name = %dns.name, target, "DNS discovery: an SRV target has no address");
                            continue;
                        }
                        Err(TargetError::Failed(e)) => {
                            return Err(failed("SRV target", &format!("`{target}`: {e}")));
                        }
                    };
                    ttl = ttl.min(target_ttl);
                    for ip in addresses {
                        found.push(srv_server(ip, srv.port, srv.weight, srv.priority));
                    }
                    ttl = ttl.min(Duration::from_secs(u64::from(record.ttl)));
                    continue;
                }
                _ => continue,
            };
            ttl = ttl.min(Duration::from_secs(u64::from(record.ttl)));
            found.push(Found {
                address: SocketAddr::new(ip, dns.port),
                weight: DEFAULT_WEIGHT,
                backup: false,
            });
        }
    }
    // A lookup that failed is a failure even when another kind answered (`ip`: the A lookup timed out, the AAAA
    // one did not): its servers are unknown, not gone, and the answered ones alone would drain them.
    if let Some(e) = last_error {
        return Err(e);
    }
    if found.is_empty() {
        return Err(DnsError::Empty {
            kind: kinds.first().map_or("", |k| k.1),
            name: dns.name.clone(),
        });
    }
    if dns.kind == DnsKind::Srv {
        // RFC 2782: the lowest priority number is tried first; the rest are there when none of those can serve.
        let best = found.iter().map(|f| f.weight >> 16).min().unwrap_or(0);
        for f in &mut found {
            f.backup = f.weight >> 16 != best;
            f.weight &= 0xffff;
        }
        // A server that records of several priorities name is as good as the best of them (the report keeps one
        // entry per address: the first in order, which could be a backup's).
        found.sort_unstable_by_key(|f| (f.address, f.backup));
        found.dedup_by_key(|f| f.address);
    }
    Ok((found, ttl))
}

/// A server of an SRV record, its priority kept in the weight's high bits until the lowest priority is known.
fn srv_server(ip: IpAddr, port: u16, weight: u16, priority: u16) -> Found {
    // A weight of 0 means "rarely" (RFC 2782): the smallest share wsgate gives.
    let weight = u32::from(weight).clamp(1, MAX_WEIGHT);
    Found {
        address: SocketAddr::new(ip, port),
        weight: (u32::from(priority) << 16) | weight,
        backup: false,
    }
}

/// Why an SRV target gave no address.
enum TargetError {
    /// The name has no A or AAAA record (or does not exist).
    NoRecords,
    Failed(String),
}

/// The addresses an SRV target names (A and AAAA), and their shortest TTL.
async fn target_addresses(resolver: &TokioResolver, target: &str) -> Result<(Vec<IpAddr>, Duration), TargetError> {
    let answer = resolver.lookup_ip(target).await.map_err(|e| {
        if e.is_no_records_found() {
            TargetError::NoRecords
        } else {
            TargetError::Failed(e.to_string())
        }
    })?;
    let ttl = answer
        .as_lookup()
        .answers()
        .iter()
        .map(|r| Duration::from_secs(u64::from(r.ttl)))
        .min()
        .unwrap_or(MAX_TTL);
    Ok((answer.iter().collect(), ttl))
}

/// The name with a final dot: asked as written, never with the system's search domains appended.
fn fully_qualified(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_priorities_make_backups_and_weights_are_kept() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut found = [
            srv_server(ip, 1, 10, 5),
            srv_server(ip, 2, 0, 5),
            srv_server(ip, 3, 7, 9),
        ];
        let best = found.iter().map(|f| f.weight >> 16).min().unwrap();
        for f in &mut found {
            f.backup = f.weight >> 16 != best;
            f.weight &= 0xffff;
        }
        assert_eq!((found[0].weight, found[0].backup), (10, false));
        assert_eq!(
            (found[1].weight, found[1].backup),
            (1, false),
            "weight 0 is the smallest share"
        );
        assert_eq!((found[2].weight, found[2].backup), (7, true));
        assert_eq!(fully_qualified("app.internal."), "app.internal.");
    }

    #[test]
    fn records_are_looked_up_again_at_their_ttl_within_the_floor_and_the_ceiling() {
        assert_eq!(
            next_lookup(Duration::ZERO),
            MIN_TTL,
            "a TTL of 0 is asked again after a second"
        );
        assert_eq!(next_lookup(Duration::from_secs(30)), Duration::from_secs(30));
        assert_eq!(
            next_lookup(Duration::from_secs(86_400)),
            MAX_TTL,
            "a day's TTL, after five minutes"
        );
    }
}
