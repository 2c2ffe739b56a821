//! Upstream servers found at run time: from DNS ([`dns`]) and from the Kubernetes API ([`kubernetes`]). (A
//! discovery file is read with the config, which its change reloads.)
//!
//! Each upstream with such a `discovery` has a watch: a task that looks its servers up as often as the source
//! says (a record's TTL, a watch event) and reports the whole set when it has changed. A failed or empty lookup
//! reports nothing, so the servers known last stay. The command line's serve loop owns the [`Watches`]: on a
//! report it serves the config file's upstreams with the servers known now, as a reload does, so that new servers
//! join (ramping up) and removed ones are drained like servers removed from the file.

pub mod dns;
pub mod kubernetes;

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{self, Config, Discovery};

/// One server a source found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Found {
    pub address: SocketAddr,
    /// Its share of new connections (1 to [`config::MAX_WEIGHT`]).
    pub weight: u32,
    /// Takes connections only when no primary can (SRV records of a higher priority number).
    pub backup: bool,
}

/// A source's whole set of servers for one upstream, sorted.
#[derive(Debug)]
pub struct Update {
    pub upstream: String,
    pub servers: Vec<Found>,
    /// Which watch sent it (a report queued by a watch since replaced is dropped).
    generation: u64,
}

/// Where a watch reports; it reports a set only when it differs from the one it reported before.
#[derive(Debug, Clone)]
pub struct Reporter {
    upstream: String,
    tx: mpsc::Sender<Update>,
    last: Option<Vec<Found>>,
    generation: u64,
}

impl Reporter {
    /// Reports `servers` (in any order) if they differ from the last report. An empty set is not reported: the
    /// servers known last stay, and the caller logs why it found none. Returns whether the serve loop still listens.
    pub async fn report(&mut self, mut servers: Vec<Found>) -> bool {
        if servers.is_empty() {
            return !self.tx.is_closed();
        }
        servers.sort_unstable();
        servers.dedup_by_key(|f| f.address);
        if self.last.as_ref() == Some(&servers) {
            return !self.tx.is_closed();
        }
        self.last = Some(servers.clone());
        let update = Update {
            upstream: self.upstream.clone(),
            servers,
            generation: self.generation,
        };
        self.tx.send(update).await.is_ok()
    }

    /// The upstream this watch finds servers for.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }
}

/// The running watches and what they found, per upstream.
#[derive(Debug)]
pub struct Watches {
    running: HashMap<String, (Discovery, JoinHandle<()>, u64)>,
    known: HashMap<String, Vec<Found>>,
    generations: u64,
    tx: mpsc::Sender<Update>,
    rx: mpsc::Receiver<Update>,
}

impl Default for Watches {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(64);
        Self {
            running: HashMap::new(),
            known: HashMap::new(),
            generations: 0,
            tx,
            rx,
        }
    }
}

impl Watches {
    /// Starts a watch for every upstream of `config` with a DNS or Kubernetes discovery that has none with the same
    /// settings, and stops the others. What a watch found stays known until its upstream no longer has one (a
    /// changed source's first report replaces it).
    pub fn sync(&mut self, config: &Config) {
        let wanted: HashMap<&str, &Discovery> = config
            .upstreams
            .iter()
            .filter_map(|u| match &u.discovery {
                Some(d @ (Discovery::Dns(_) | Discovery::Kubernetes(_))) => Some((u.name.as_str(), d)),
                _ => None,
            })
            .collect();
        self.running.retain(|name, (discovery, task, _)| {
            let keep = wanted.get(name.as_str()) == Some(&&*discovery);
            if !keep {
                task.abort();
            }
            keep
        });
        self.known.retain(|name, _| wanted.contains_key(name.as_str()));
        for (name, discovery) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            self.generations += 1;
            let reporter = Reporter {
                upstream: name.to_string(),
                tx: self.tx.clone(),
                last: None,
                generation: self.generations,
            };
            let task = match discovery.clone() {
                Discovery::Dns(dns) => tokio::spawn(dns::watch(dns, reporter)),
                Discovery::Kubernetes(k) => tokio::spawn(kubernetes::watch(k, reporter)),
                Discovery::File(_) => continue,
            };
            self.running
                .insert(name.to_string(), (discovery.clone(), task, self.generations));
        }
    }

    /// Waits for a watch's report of a changed set, and keeps it; returns its upstream. Pending forever when no
    /// watch runs.
    pub async fn changed(&mut self) -> Update {
        loop {
            // The channel never closes: `self` holds a sender.
            let Some(update) = self.rx.recv().await else {
                std::future::pending::<()>().await;
                continue;
            };
            let current = self.running.get(&update.upstream).map(|(_, _, g)| *g);
            if current != Some(update.generation) {
                continue;
            }
            self.known.insert(update.upstream.clone(), update.servers.clone());
            return update;
        }
    }

    /// Waits, at most `limit`, until every upstream of `config` that has only discovered servers has a first
    /// report, so that a server starts with its servers; logs the upstreams still without one.
    pub async fn first_reports(&mut self, config: &Config, limit: std::time::Duration) {
        let waiting = |known: &HashMap<String, Vec<Found>>| -> Vec<String> {
            config
                .upstreams
                .iter()
                .filter(|u| matches!(u.discovery, Some(Discovery::Dns(_) | Discovery::Kubernetes(_))))
                .filter(|u| u.servers.is_empty() && !known.contains_key(&u.name))
                .map(|u| u.name.clone())
                .collect()
        };
        let deadline = tokio::time::Instant::now() + limit;
        while !waiting(&self.known).is_empty() {
            if tokio::time::timeout_at(deadline, self.changed()).await.is_err() {
                break;
            }
        }
        for name in waiting(&self.known) {
            tracing::warn!(
                upstream = %name,
                "discovery has found no server yet: the upstream answers 503 until it does"
            );
        }
    }

    /// Adds the servers found to their upstreams in `config` (the config file's, as loaded), after its own: a
    /// server the file lists already keeps its settings. A found server is named by its address.
    pub fn merge(&self, config: &mut Config) {
        for upstream in &mut config.upstreams {
            if !matches!(upstream.discovery, Some(Discovery::Dns(_) | Discovery::Kubernetes(_))) {
                continue;
            }
            let Some(found) = self.known.get(&upstream.name) else {
                continue;
            };
            for f in found {
                if upstream.servers.iter().any(|s| s.address == f.address) {
                    continue;
                }
                upstream.servers.push(config::Server {
                    name: f.address.to_string(),
                    address: f.address,
                    weight: f.weight.clamp(1, config::MAX_WEIGHT),
                    backup: f.backup,
                    drain: false,
                    max_connections: None,
                });
            }
            // A source that found only backups leaves none of its servers idle.
            if !upstream.servers.is_empty() && upstream.servers.iter().all(|s| s.backup) {
                for s in &mut upstream.servers {
                    s.backup = false;
                }
            }
        }
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        for (_, task, _) in self.running.values() {
            task.abort();
        }
    }
}

/// How long a source waits before it tries again after a failure: doubling from 1 s to 30 s.
pub(crate) fn backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_secs(1u64 << failures.min(5)).min(std::time::Duration::from_secs(30))
}
