//! The live WebSocket sessions of a server, as the admin API lists them and closes them, and the totals they add
//! to: per listener, route, upstream and server ([`Totals`]), which `GET /metrics` and the stats page read.
//!
//! Counting stays off the relay's path: a relay counts bytes, messages and frames in its own fields, and folds what
//! changed into its [`LiveSession`] and its [`Totals`] at most once a second (a timer armed by the first activity
//! after a fold) and once more when it ends. A scrape or a listing reads those atomics; nothing walks sessions per
//! message.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::SystemTime;

use crate::signal::StopSignal;

/// Where a session runs: the labels of its totals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Place {
    pub listener: String,
    pub route: String,
    pub upstream: String,
    pub server: String,
}

/// A [`Place`] named by borrowed names: how a session asks for its totals without allocating them each time.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, Default)]
pub struct PlaceRef<'a> {
    pub listener: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    pub server: &'a str,
}

impl Place {
    fn is(&self, place: PlaceRef<'_>) -> bool {
        self.listener == place.listener
            && self.route == place.route
            && self.upstream == place.upstream
            && self.server == place.server
    }
}

impl PlaceRef<'_> {
    fn to_owned(self) -> Place {
        Place {
            listener: self.listener.to_string(),
            route: self.route.to_string(),
            upstream: self.upstream.to_string(),
            server: self.server.to_string(),
        }
    }
}

/// What the sessions of one [`Place`] add up to, since start. Directions are numbered as the relay's: 0 is client
/// to backend, 1 backend to client.
#[derive(Debug, Default)]
pub struct Totals {
    pub place: Place,
    /// Sessions relaying now.
    pub active: AtomicI64,
    /// Sessions relayed since start.
    pub sessions: AtomicU64,
    pub bytes: [AtomicU64; 2],
    /// Data messages (frames mode).
    pub messages: [AtomicU64; 2],
    /// Frames, data and control (frames mode).
    pub frames: [AtomicU64; 2],
}

/// Upper bounds of the message size histogram's buckets (bytes; a last bucket takes the rest).
pub const SIZE_BOUNDS: [u64; 9] = [64, 256, 1024, 4096, 16384, 65536, 262_144, 1_048_576, 4_194_304];
pub const SIZE_BUCKETS: usize = SIZE_BOUNDS.len() + 1;

/// Sizes of messages seen in one direction since the last fold: what a frame tracker keeps, drained at each fold.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SizeCounts {
    pub buckets: [u32; SIZE_BUCKETS],
    pub sum: u64,
}

impl SizeCounts {
    pub fn observe(&mut self, size: u64) {
        let bucket = SIZE_BOUNDS.iter().position(|&b| size <= b).unwrap_or(SIZE_BOUNDS.len());
        self.buckets[bucket] = self.buckets[bucket].saturating_add(1);
        self.sum = self.sum.saturating_add(size);
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|&n| n == 0)
    }
}

/// The message size histogram of every session, each direction.
#[derive(Debug, Default)]
pub struct Sizes {
    pub buckets: [[AtomicU64; SIZE_BUCKETS]; 2],
    pub sum: [AtomicU64; 2],
}

impl Sizes {
    fn add(&self, direction: usize, counts: &SizeCounts) {
        for (cell, &n) in self.buckets[direction].iter().zip(&counts.buckets) {
            if n > 0 {
                cell.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
        self.sum[direction].fetch_add(counts.sum, Ordering::Relaxed);
    }
}

/// What a relay has counted so far, as it hands it to [`LiveSession::fold`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Counted {
    pub bytes: [u64; 2],
    pub messages: [u64; 2],
    pub frames: [u64; 2],
}

/// One relayed WebSocket session, registered while it lives.
#[derive(Debug)]
pub struct LiveSession {
    pub id: u64,
    pub started: SystemTime,
    /// The client (a trusted proxy's forwarded client, when there is one).
    pub client: IpAddr,
    /// Who the route's authentication admitted, when it has any.
    pub identity: Option<String>,
    /// `frames` or `tunnel`.
    pub mode: &'static str,
    pub totals: Arc<Totals>,
    sizes: Arc<Sizes>,
    /// Closes the session (a drain, the admin API) and wakes it (a shutdown).
    pub stop: StopSignal,
    /// What has been folded so far (absolute counts since the session started).
    bytes: [AtomicU64; 2],
    messages: [AtomicU64; 2],
    frames: [AtomicU64; 2],
}

impl LiveSession {
    /// What the session had counted at its last fold.
    pub fn counted(&self) -> Counted {
        let read = |cells: &[AtomicU64; 2]| [0, 1].map(|i| cells[i].load(Ordering::Relaxed));
        Counted {
            bytes: read(&self.bytes),
            messages: read(&self.messages),
            frames: read(&self.frames),
        }
    }

    /// Adds what changed since the last fold to the session's place and the size histogram. Called only by the
    /// session's own task, so the loads and stores of its cells do not race.
    pub fn fold(&self, now: &Counted, sizes: [Option<&mut SizeCounts>; 2]) {
        let pairs = [
            (&self.bytes, &self.totals.bytes, &now.bytes),
            (&self.messages, &self.totals.messages, &now.messages),
            (&self.frames, &self.totals.frames, &now.frames),
        ];
        for (mine, total, now) in pairs {
            for i in 0..2 {
                let before = mine[i].load(Ordering::Relaxed);
                if now[i] > before {
                    mine[i].store(now[i], Ordering::Relaxed);
                    total[i].fetch_add(now[i] - before, Ordering::Relaxed);
                }
            }
        }
        for (direction, counts) in sizes.into_iter().enumerate() {
            if let Some(counts) = counts.filter(|c| !c.is_empty()) {
                self.sizes.add(direction, counts);
                *counts = SizeCounts::default();
            }
        }
    }
}

/// Shards of the registry: sessions start and end on every worker thread.
const SHARDS: usize = 16;

/// One shard of the registry. Locked once when a session starts relaying and once when it ends, and by the admin
/// API to list or close, never per message and never across an await: a plain mutex is the cheapest correct tool,
/// which is why the project-wide ban on `std::sync::Mutex` (meant for the relay path) is lifted for it.
#[allow(clippy::disallowed_types)]
type Shard = std::sync::Mutex<HashMap<u64, Arc<LiveSession>>>;

/// The totals of every place, made on a place's first session and kept (a scrape reports them all), by the hash
/// of the place's names (a place is found from borrowed names, without allocating).
#[allow(clippy::disallowed_types)]
type Places = std::sync::Mutex<HashMap<u64, Vec<Arc<Totals>>>>;

/// Every live session of a server, and the totals of every place.
#[derive(Debug, Default)]
pub struct Sessions {
    shards: [Shard; SHARDS],
    places: Places,
    hasher: std::hash::RandomState,
    pub sizes: Arc<Sizes>,
}

/// What starts a session's registration.
#[derive(Debug)]
pub struct NewSession<'a> {
    pub id: u64,
    pub client: IpAddr,
    pub identity: Option<String>,
    pub mode: &'static str,
    pub place: PlaceRef<'a>,
}

impl Sessions {
    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// The totals of `place`, made on first use.
    pub fn totals(&self, place: PlaceRef<'_>) -> Arc<Totals> {
        let key = self.hasher.hash_one(place);
        let mut places = self.places.lock().unwrap_or_else(|e| e.into_inner());
        let same_hash = places.entry(key).or_default();
        if let Some(totals) = same_hash.iter().find(|t| t.place.is(place)) {
            return totals.clone();
        }
        let totals = Arc::new(Totals {
            place: place.to_owned(),
            ..Totals::default()
        });
        same_hash.push(totals.clone());
        totals
    }

    /// Every place's totals, in no particular order.
    pub fn all_totals(&self) -> Vec<Arc<Totals>> {
        let places = self.places.lock().unwrap_or_else(|e| e.into_inner());
        places.values().flatten().cloned().collect()
    }

    /// Registers a session that has started relaying: counted as active until the returned guard is dropped.
    pub fn start(&self, new: NewSession) -> Registered<'_> {
        let totals = self.totals(new.place);
        totals.active.fetch_add(1, Ordering::Relaxed);
        totals.sessions.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(LiveSession {
            id: new.id,
            started: SystemTime::now(),
            client: new.client,
            identity: new.identity,
            mode: new.mode,
            totals,
            sizes: self.sizes.clone(),
            stop: StopSignal::new(),
            bytes: Default::default(),
            messages: Default::default(),
            frames: Default::default(),
        });
        let mut shard = self.shard(new.id).lock().unwrap_or_else(|e| e.into_inner());
        shard.insert(new.id, session.clone());
        Registered {
            sessions: self,
            session,
        }
    }

    /// The session with this id, if it is live.
    pub fn get(&self, id: u64) -> Option<Arc<LiveSession>> {
        let shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(&id).cloned()
    }

    /// The live sessions `keep` accepts with an id above `after`, the `limit` lowest, and how many it accepts in all.
    pub fn list(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&LiveSession) -> bool,
    ) -> (Vec<Arc<LiveSession>>, usize) {
        let mut page: Vec<Arc<LiveSession>> = Vec::new();
        let mut matching = 0;
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for session in shard.values().filter(|s| keep(s)) {
                matching += 1;
                if session.id > after {
                    page.push(session.clone());
                }
            }
        }
        page.sort_unstable_by_key(|s| s.id);
        page.truncate(limit);
        (page, matching)
    }

    /// Closes the newest live sessions that are not closing already, with 1012 (frames mode; a tunnel's TCP
    /// close), so that their clients reconnect elsewhere: at most `n`, and none of the oldest `keep`; how many it
    /// closed.
    pub fn shed_newest(&self, n: usize, keep: usize) -> usize {
        let mut live: Vec<Arc<LiveSession>> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            live.extend(shard.values().filter(|s| s.stop.reason().is_none()).cloned());
        }
        live.sort_unstable_by_key(|s| std::cmp::Reverse(s.id));
        let n = n.min(live.len().saturating_sub(keep));
        live.iter()
            .filter(|s| s.stop.stop_with(1012, "rebalancing the fleet"))
            .take(n)
            .count()
    }

    /// Sessions live now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every live session, to read the server's phase (a shutdown, a forced close).
    pub fn wake_all(&self) {
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for session in shard.values() {
                session.stop.wake();
            }
        }
    }
}

/// A session's registration: uncounts and unregisters it when dropped, however the session ends.
#[derive(Debug)]
pub struct Registered<'a> {
    sessions: &'a Sessions,
    pub session: Arc<LiveSession>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.session.totals.active.fetch_sub(1, Ordering::Relaxed);
        let mut shard = self
            .sessions
            .shard(self.session.id)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        shard.remove(&self.session.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(id: u64, route: &str) -> NewSession<'_> {
        NewSession {
            id,
            client: IpAddr::from([127, 0, 0, 1]),
            identity: None,
            mode: "frames",
            place: PlaceRef {
                route,
                ..PlaceRef::default()
            },
        }
    }

    #[test]
    fn folds_add_only_what_changed() {
        let sessions = Sessions::default();
        let a = sessions.start(new(1, "r"));
        let b = sessions.start(new(2, "r"));
        let mut sizes = SizeCounts::default();
        sizes.observe(10);
        sizes.observe(5000);
        let now = Counted {
            bytes: [100, 50],
            messages: [2, 0],
            frames: [2, 1],
        };
        a.session.fold(&now, [Some(&mut sizes), None]);
        assert!(sizes.is_empty(), "a fold drains the tracker's sizes");
        a.session.fold(&now, [Some(&mut sizes), None]);
        b.session.fold(
            &Counted {
                bytes: [1, 1],
                ..Counted::default()
            },
            [None, None],
        );
        let totals = sessions.totals(PlaceRef {
            route: "r",
            ..PlaceRef::default()
        });
        assert_eq!(totals.bytes[0].load(Ordering::Relaxed), 101);
        assert_eq!(totals.bytes[1].load(Ordering::Relaxed), 51);
        assert_eq!(totals.messages[0].load(Ordering::Relaxed), 2);
        assert_eq!(totals.frames[1].load(Ordering::Relaxed), 1);
        assert_eq!(totals.active.load(Ordering::Relaxed), 2);
        assert_eq!(sessions.sizes.buckets[0][0].load(Ordering::Relaxed), 1);
        assert_eq!(sessions.sizes.buckets[0][4].load(Ordering::Relaxed), 1);
        assert_eq!(sessions.sizes.sum[0].load(Ordering::Relaxed), 5010);
        drop(a);
        assert_eq!(totals.active.load(Ordering::Relaxed), 1);
        assert_eq!(totals.sessions.load(Ordering::Relaxed), 2);
        assert!(sessions.get(1).is_none());
        assert_eq!(sessions.get(2).map(|s| s.id), Some(2));
    }

    #[test]
    fn lists_pages_in_id_order_with_a_filter() {
        let sessions = Sessions::default();
        let held: Vec<_> = (1..=40)
            .map(|id| sessions.start(new(id, if id % 2 == 0 { "even" } else { "odd" })))
            .collect();
        let (page, total) = sessions.list(0, 5, |s| s.totals.place.route == "even");
        assert_eq!(total, 20);
        assert_eq!(page.iter().map(|s| s.id).collect::<Vec<_>>(), [2, 4, 6, 8, 10]);
        let (page, _) = sessions.list(36, 5, |s| s.totals.place.route == "even");
        assert_eq!(page.iter().map(|s| s.id).collect::<Vec<_>>(), [38, 40]);
        assert_eq!(sessions.len(), 40);
        drop(held);
        assert!(sessions.is_empty());
    }
}
