//! Limits every instance shares (`[cluster] redis`): per-IP, per-key and per-identity connection counts and
//! handshake rates, kept in Redis, and each instance's presence and counts for the fleet view (`GET /api/cluster`).
//!
//! A handshake costs one round trip: one script checks every limit that applies to it and, when all admit it,
//! counts it in all, on Redis's clock. Requests from every session share one multiplexed connection, so handshakes
//! in flight together are pipelined. Releases are batched: a closed session only lowers this instance's local
//! count, and a flusher writes the counts that changed (absolute values, so a write may be repeated or lost
//! without drift) a few times a second.
//!
//! A connection count is a hash per limit, with a field per instance (its name and a boot id). Fields of an
//! instance that no longer beats (its presence key expired: crashed, or cut off) are left out of the sum and
//! deleted, so a dead instance's connections stop counting within [`PRESENCE_TTL`]. When Redis has lost this
//! instance's presence (a restart without persistence), the instance writes all its live counts again.
//!
//! While Redis does not answer, a limit fails open (the local limits still apply) or closed (503), per
//! `on_redis_down`; the outage and the recovery are logged once each, and counted in the metrics.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use ::redis::{Script, cmd};
use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, mpsc, oneshot};

use super::redis::{Redis, RedisError};
use crate::config::{self, HandshakeRate, OnRedisDown};

/// Every key this module writes starts with this.
const PREFIX: &str = "wsgate:cluster:";
/// How often an instance writes its presence and counts.
pub const BEAT_EVERY: Duration = Duration::from_secs(2);
/// An instance that has not beaten for this long is gone: its connections no longer count.
pub const PRESENCE_TTL: Duration = Duration::from_secs(10);
/// How often changed counts are written at most.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// After a command timed out, handshakes skip Redis for this long (answered as `on_redis_down` says).
const BREAKER: Duration = Duration::from_secs(1);
/// Every live count is written again this often (in beats: half an hour), so that its hash never expires.
const REWRITE_EVERY_BEATS: u64 = 900;
/// Counts written in one round trip at most.
const FLUSH_BATCH: usize = 1000;
/// A count hash lives this long after its last change (every write renews it).
const COUNT_TTL_MS: u64 = 24 * 3600 * 1000;

/// Checks the handshakes of a batch, in order, each against every limit that applies to it and, when none
/// refuses, counts it in all: one round trip for every handshake that arrived while the previous batch was out.
/// KEYS: every handshake's keys, one after the other. ARGV[1]: this instance's field; ARGV[2]: the presence keys'
/// prefix; then for each handshake the number n of its keys and three values a key: `c` (a connection count),
/// its limit, 0; or `r` (a rate: GCRA), the interval and the tolerance in µs. Returns two numbers a handshake:
/// {0, 0} when admitted, else {i, µs to wait} for its first key i (1-based) that refuses.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local field, prefix = ARGV[1], ARGV[2]
local results = {}
local k, a = 1, 3
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  a = a + 1
  local verdict, wait = 0, 0
  local next_at, fresh = {}, {}
  for j = 0, n - 1 do
    local key, kind = KEYS[k + j], ARGV[a + 3 * j]
    local x, y = tonumber(ARGV[a + 3 * j + 1]), tonumber(ARGV[a + 3 * j + 2])
    if kind == 'c' then
      local all = redis.call('HGETALL', key)
      local sum = 0
      for m = 1, #all, 2 do
        local f = all[m]
        if f ~= field and redis.call('EXISTS', prefix .. f) == 0 then
          redis.call('HDEL', key, f)
        else
          sum = sum + (tonumber(all[m + 1]) or 0)
        end
      end
      if sum >= x then verdict = j + 1 break end
      fresh[j] = sum == 0
    else
      local tat = tonumber(redis.call('GET', key) or '0') or 0
      if tat < now then tat = now end
      if tat - y > now then verdict, wait = j + 1, tat - y - now break end
      next_at[j] = tat + x
    end
  end
  if verdict == 0 then
    for j = 0, n - 1 do
      local key = KEYS[k + j]
      if ARGV[a + 3 * j] == 'c' then
        redis.call('HINCRBY', key, field, 1)
        -- A key held all along keeps the expiry its first holder (or this instance's last write) gave it.
        if fresh[j] then redis.call('PEXPIRE', key, 86400000) end
      else
        redis.call('SET', key, string.format('%.0f', next_at[j]), 'PX', math.floor((next_at[j] - now) / 1000) + 1000)
      end
    end
  end
  results[#results + 1] = verdict
  results[#results + 1] = wait
  k = k + n
  a = a + 3 * n
end
return results
";

/// Writes this instance's presence and adds it to the members. KEYS: presence, members. ARGV: what it says of
/// itself, its TTL in ms, its field. Returns whether the presence was there before (0: Redis lost it).
const BEAT: &str = r"
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return existed
";

/// What one check of a handshake counts against.
#[derive(Debug, Clone)]
pub struct Check {
    /// The limit's key without the prefix (`ip:edge:192.0.2.1`, `key:…`, `id:…`).
    pub key: String,
    pub kind: CheckKind,
    /// What the check does while Redis does not answer.
    pub on_down: OnRedisDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// Live connections, at most this many across the fleet.
    Connections(u32),
    /// Handshakes, at this rate with its burst across the fleet.
    Rate(HandshakeRate),
}

/// Why a handshake is not admitted by the shared limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Check `index` refused it; a rate's next handshake is allowed after `retry_after` seconds.
    Limit { index: usize, retry_after: u32 },
    /// Redis did not answer and a check fails closed.
    Unavailable,
}

/// The shared limits of the config in force, kept across reloads that do not change `[cluster]`.
#[derive(Default)]
pub struct Cluster {
    current: ArcSwapOption<Limits>,
    /// What the presence reports: this server's live connections and sessions.
    counts: std::sync::OnceLock<Counts>,
    pub stats: Arc<Stats>,
    tally: Arc<Tally>,
}

/// What the metrics say of the shared limits.
#[derive(Debug, Default)]
pub struct Stats {
    /// Handshakes admitted without the shared check: Redis did not answer and their limits fail open.
    pub admitted_unchecked: AtomicU64,
    /// Handshakes refused because Redis did not answer and a limit fails closed.
    pub refused_unavailable: AtomicU64,
    /// Redis did not answer the last check.
    pub down: AtomicBool,
}

/// What the presence sees of this server and does to it.
#[derive(Clone)]
pub struct Local {
    /// This server's live connections and WebSocket sessions.
    pub counts: Arc<dyn Fn() -> (u64, u64) + Send + Sync>,
    /// Closes WebSocket sessions with 1012, the newest first: at most the first number, keeping the second (sessions
    /// closing already are not counted); how many it closed.
    pub shed: Arc<dyn Fn(usize, usize) -> usize + Send + Sync>,
}

type Counts = Local;

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Gives the presence its counts (once, when the server starts).
    pub fn attach(&self, counts: Counts) {
        let _ = self.counts.set(counts);
    }

    /// Serves `cluster` from now on: a new Redis URL or instance name opens a new client (the old one's
    /// presence is withdrawn); the same ones keep theirs, with the new `on_redis_down`.
    pub fn apply(&self, cluster: Option<&config::Cluster>) -> Result<(), RedisError> {
        let current = self.current.load_full();
        let wanted = cluster.and_then(|c| c.redis.as_deref().map(|url| (url, c)));
        let Some((url, settings)) = wanted else {
            if let Some(old) = self.current.swap(None) {
                old.withdraw();
            }
            return Ok(());
        };
        if let Some(old) = &current
            && old.url == url
            && old.instance == settings.instance
        {
            old.on_redis_down
                .store(settings.on_redis_down == OnRedisDown::Closed, Ordering::Relaxed);
            old.rebalance
                .store(Arc::new((settings.rebalance, settings.rebalance_rate)));
            return Ok(());
        }
        let counts = self.counts.get().cloned().unwrap_or_else(|| Local {
            counts: Arc::new(|| (0, 0)),
            shed: Arc::new(|_, _| 0),
        });
        let limits = Limits::start(url, settings, counts, self.stats.clone(), self.tally.clone())?;
        // What the previous generation counted is this one's to write (it is dirty there already, if at all).
        self.tally.rewrite_all();
        if let Some(old) = self.current.swap(Some(limits)) {
            old.withdraw();
        }
        Ok(())
    }

    /// The shared limits in force; `None` when every limit is local.
    pub fn limits(&self) -> Option<Arc<Limits>> {
        self.current.load_full()
    }

    /// Withdraws this instance's presence (shutdown): the others stop counting its connections at once.
    pub fn close(&self) {
        if let Some(old) = self.current.swap(None) {
            old.withdraw();
        }
    }
}

/// This instance's connection counts, and the changes not yet written.
#[derive(Debug, Default)]
struct Live {
    counts: HashMap<Arc<str>, u32>,
    dirty: HashSet<Arc<str>>,
    /// Handshakes counted here whose script has not answered yet: their keys are not written meanwhile, so that
    /// an absolute write never crosses a script's increment.
    in_flight: HashMap<Arc<str>, u32>,
}

/// This instance's counts and the flusher's wake-up, shared by every generation of [`Limits`] (a reload that
/// changes the Redis URL or the instance's name carries its live counts over to the new one).
#[derive(Debug, Default)]
struct Tally {
    live: LiveLock,
    flush: Notify,
}

impl Tally {
    /// Marks every live count to be written again (Redis lost them, or a new generation writes them).
    fn rewrite_all(&self) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let Live { counts, dirty, .. } = &mut *live;
        dirty.extend(counts.keys().cloned());
        drop(live);
        self.flush.notify_one();
    }
}

/// Live connections per limit key, locked once per counted handshake and once per close (never per message): a
/// plain mutex is the cheapest correct tool here (the project-wide ban on `std::sync::Mutex` is meant for the
/// relay path).
#[allow(clippy::disallowed_types)]
type LiveLock = std::sync::Mutex<Live>;

/// One Redis server's shared limits, as one instance sees them.
pub struct Limits {
    redis: Redis,
    url: String,
    instance: String,
    /// The instance's name and boot id: its field in every count, and its presence key's suffix.
    field: String,
    /// `[cluster] on_redis_down = "closed"`: the default for checks that do not say.
    on_redis_down: AtomicBool,
    admit: Script,
    tally: Arc<Tally>,
    /// Redis did not answer the last handshake's check (the outage is logged once).
    down: AtomicBool,
    /// What the metrics report, kept across reloads.
    stats: Arc<Stats>,
    /// `[cluster] rebalance` (its threshold) and `rebalance_rate`.
    rebalance: arc_swap::ArcSwap<(Option<f64>, u32)>,
    /// Until when (`upstream::now_ms`) handshakes skip Redis after a timeout.
    broken_until: AtomicU64,
    /// Ends the presence and the flusher.
    stop: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("redis", &self.redis)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Limits {
    fn start(
        url: &str,
        settings: &config::Cluster,
        counts: Counts,
        stats: Arc<Stats>,
        tally: Arc<Tally>,
    ) -> Result<Arc<Limits>, RedisError> {
        let redis = Redis::open(url)?;
        let mut boot = [0u8; 6];
        // Without the system's randomness, the time keeps two boots of one instance apart just as well.
        if getrandom::fill(&mut boot).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            boot.copy_from_slice(&nanos.to_le_bytes()[..6]);
        }
        let boot: String = boot.iter().map(|b| format!("{b:02x}")).collect();
        let limits = Arc::new(Limits {
            redis,
            url: url.to_string(),
            instance: settings.instance.clone(),
            field: format!("{}#{boot}", settings.instance),
            on_redis_down: AtomicBool::new(settings.on_redis_down == OnRedisDown::Closed),
            admit: Script::new(ADMIT),
            tally,
            down: AtomicBool::new(false),
            stats,
            rebalance: arc_swap::ArcSwap::from_pointee((settings.rebalance, settings.rebalance_rate)),
            broken_until: AtomicU64::new(0),
            stop: tokio_util::sync::CancellationToken::new(),
        });
        // Both tasks hold the limits weakly: they end with the last handle, or at `withdraw`.
        let weak = Arc::downgrade(&limits);
        limits
            .redis
            .spawn(flusher(weak.clone(), limits.tally.clone(), limits.stop.clone()));
        limits.redis.spawn(presence(weak, limits.stop.clone(), counts));
        Ok(limits)
    }

    /// The instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The default of checks that do not say what to do while Redis is down.
    pub fn on_redis_down(&self) -> OnRedisDown {
        if self.on_redis_down.load(Ordering::Relaxed) {
            OnRedisDown::Closed
        } else {
            OnRedisDown::Open
        }
    }

    /// Checks a handshake against every shared limit in `checks`, in one round trip, and counts it in all when
    /// none refuses. The connection counts are held while the returned guard lives. While Redis does not
    /// answer, the handshake is refused if a check fails closed; else it is admitted, counted here and written to
    /// Redis when it answers again.
    pub async fn admit(self: &Arc<Self>, checks: &[Check]) -> Result<Option<Held>, Denied> {
        if checks.is_empty() {
            return Ok(None);
        }
        let keys: Vec<Arc<str>> = checks
            .iter()
            .filter(|c| matches!(c.kind, CheckKind::Connections(_)))
            .map(|c| Arc::from(format!("{PREFIX}c:{}", c.key)))
            .collect();
        // Counted here first, and in flight until the script answers: the flusher leaves these keys alone meanwhile.
        let held = Held {
            tally: self.tally.clone(),
            keys,
        };
        held.count(1);
        let in_flight = InFlight::new(&held);
        let job: Vec<(String, &'static str, u64, u64)> = checks
            .iter()
            .map(|check| match check.kind {
                CheckKind::Connections(limit) => (format!("{PREFIX}c:{}", check.key), "c", u64::from(limit), 0),
                CheckKind::Rate(rate) => {
                    let interval = 1_000_000 / u64::from(rate.per_second.max(1));
                    let tolerance = interval * u64::from(rate.burst);
                    (format!("{PREFIX}r:{}", check.key), "r", interval, tolerance)
                }
            })
            .collect();
        let answer: Result<(usize, u64), RedisError> = if self.broken() {
            Err(RedisError::Timeout {
                url: self.redis.url().to_string(),
            })
        } else {
            self.batched(job).await
        };
        if matches!(answer, Err(RedisError::Timeout { .. })) {
            // A Redis that accepts but does not answer (a stall) would cost every handshake the whole timeout:
            // the next ones go without asking for a while.
            self.broken_until.store(
                crate::upstream::now_ms() + BREAKER.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        // Counted in Redis by the script, refused, or to be written once Redis answers: no longer in flight.
        drop(in_flight);
        match answer {
            Ok((0, _)) => {
                self.stats.down.store(false, Ordering::Relaxed);
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(redis = %self.redis.url(), "cluster: Redis answers again: shared limits in force");
                }
                Ok(Some(held))
            }
            Ok((index, wait_us)) => {
                self.stats.down.store(false, Ordering::Relaxed);
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(redis = %self.redis.url(), "cluster: Redis answers again: shared limits in force");
                }
                let retry_after = u32::try_from(wait_us.div_ceil(1_000_000)).unwrap_or(u32::MAX).max(1);
                Err(Denied::Limit {
                    index: index - 1,
                    retry_after,
                })
            }
            Err(e) => {
                let closed = checks.iter().any(|c| c.on_down == OnRedisDown::Closed);
                self.stats.down.store(true, Ordering::Relaxed);
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        redis = %self.redis.url(),
                        "cluster: shared limits unavailable ({e}): handshakes under limits that fail closed are \
                         refused (503), the others are admitted under this instance's local limits"
                    );
                }
                if closed {
                    self.stats.refused_unavailable.fetch_add(1, Ordering::Relaxed);
                    Err(Denied::Unavailable)
                } else {
                    // Counted here, and written to Redis by the flusher once it answers again: a session admitted
                    // during an outage counts across the fleet for the rest of its life.
                    self.stats.admitted_unchecked.fetch_add(1, Ordering::Relaxed);
                    held.mark_dirty();
                    Ok(Some(held))
                }
            }
        }
    }

    /// Every instance that beats now, as each reported itself (JSON objects), and how many of them Redis lists.
    pub async fn fleet(&self) -> Result<Vec<serde_json::Value>, RedisError> {
        let members_key = format!("{PREFIX}members");
        let members: Vec<String> = self
            .redis
            .run(|mut c| {
                let key = members_key.clone();
                async move { cmd("SMEMBERS").arg(key).query_async(&mut c).await }
            })
            .await?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let presence: Vec<String> = members.iter().map(|m| format!("{PREFIX}alive:{m}")).collect();
        let said: Vec<Option<String>> = self
            .redis
            .run(|mut c| async move { cmd("MGET").arg(presence).query_async(&mut c).await })
            .await?;
        let mut fleet = Vec::new();
        let mut gone = Vec::new();
        for (member, said) in members.iter().zip(said) {
            match said.and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok()) {
                Some(value) => fleet.push(value),
                None => gone.push(member.clone()),
            }
        }
        if !gone.is_empty() {
            let _ = self
                .redis
                .run(|mut c| async move { cmd("SREM").arg(members_key).arg(gone).query_async::<i64>(&mut c).await })
                .await;
        }
        fleet.sort_by(|a, b| a["instance"].as_str().cmp(&b["instance"].as_str()));
        Ok(fleet)
    }

    /// Ends the presence and withdraws it from Redis: the instance's connections stop counting at once.
    fn withdraw(&self) {
        self.stop.cancel();
        let (redis, presence, members, field) = (
            self.redis.clone(),
            format!("{PREFIX}alive:{}", self.field),
            format!("{PREFIX}members"),
            self.field.clone(),
        );
        self.redis.spawn(async move {
            let _ = redis
                .run(|mut c| async move {
                    ::redis::pipe()
                        .cmd("DEL")
                        .arg(presence)
                        .ignore()
                        .cmd("SREM")
                        .arg(members)
                        .arg(field)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
        });
    }

    /// One handshake's checks, sent with the others of this worker that wait for Redis now: through the worker's
    /// batcher (made on first use), or alone where there is no runtime to run one.
    async fn batched(self: &Arc<Self>, job: Job) -> Result<(usize, u64), RedisError> {
        let (reply, answer) = oneshot::channel();
        let Some(batcher) = self.batcher() else {
            let mut answers = self.run_batch(vec![job]).await?;
            return answers.pop().ok_or_else(|| self.redis.corrupt("admit", "no answer"));
        };
        if batcher.send((job, reply)).is_err() {
            return Err(self.redis.corrupt("admit", "the batcher has stopped"));
        }
        match answer.await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(Failed::Timeout)) => Err(RedisError::Timeout {
                url: self.redis.url().to_string(),
            }),
            Ok(Err(Failed::Other(reason))) => Err(RedisError::Command {
                url: self.redis.url().to_string(),
                reason,
            }),
            Err(_) => Err(self.redis.corrupt("admit", "the batcher has stopped")),
        }
    }

    /// This thread's batcher for these limits, started on the thread's runtime on first use.
    fn batcher(self: &Arc<Self>) -> Option<mpsc::UnboundedSender<(Job, Reply)>> {
        // A batcher that has ended (its runtime gone) is replaced.
        let mine = |entry: &BatcherEntry| std::ptr::eq(entry.0.as_ptr(), Arc::as_ptr(self)) && !entry.1.is_closed();
        if let Some(found) = BATCHERS.with(|b| b.borrow().iter().find(|e| mine(e)).map(|e| e.1.clone())) {
            return Some(found);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = mpsc::unbounded_channel();
        runtime.spawn(batcher(Arc::downgrade(self), rx, self.stop.clone()));
        BATCHERS.with(|b| {
            let mut b = b.borrow_mut();
            // Batchers of limits gone (a reload's old ones) have ended: their entries go.
            b.retain(|e| e.0.strong_count() > 0 && !e.1.is_closed());
            b.push((Arc::downgrade(self), tx.clone()));
        });
        Some(tx)
    }

    /// Runs the script once for `jobs`: their answers, in order.
    async fn run_batch(&self, jobs: Vec<Job>) -> Result<Vec<(usize, u64)>, RedisError> {
        let count = jobs.len();
        let mut invocation = self.admit.prepare_invoke();
        invocation.arg(&self.field).arg(format!("{PREFIX}alive:"));
        for job in jobs {
            invocation.arg(job.len());
            for (key, kind, x, y) in job {
                invocation.key(key).arg(kind).arg(x).arg(y);
            }
        }
        let flat: Vec<u64> = self
            .redis
            .run_here(|mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        if flat.len() != count * 2 {
            return Err(self
                .redis
                .corrupt("admit", format!("{} answers for {count} handshakes", flat.len() / 2)));
        }
        Ok(flat
            .chunks_exact(2)
            .map(|pair| (usize::try_from(pair[0]).unwrap_or(usize::MAX), pair[1]))
            .collect())
    }

    /// Whether handshakes skip Redis for now, after a timeout.
    fn broken(&self) -> bool {
        crate::upstream::now_ms() < self.broken_until.load(Ordering::Relaxed)
    }
}

/// A handshake's keys in flight while this lives (also when the handshake's future is dropped while it waits).
struct InFlight<'a>(&'a Held);

impl<'a> InFlight<'a> {
    fn new(held: &'a Held) -> Self {
        held.in_flight(1);
        InFlight(held)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight(-1);
    }
}

/// One handshake's checks as the script takes them: key, kind, and two numbers.
type Job = Vec<(String, &'static str, u64, u64)>;
/// Where a handshake's answer goes.
type Reply = oneshot::Sender<Result<(usize, u64), Failed>>;
/// A batcher of this thread's, for one generation of limits.
type BatcherEntry = (std::sync::Weak<Limits>, mpsc::UnboundedSender<(Job, Reply)>);

/// Why a batch got no answer, as each of its handshakes hears it.
#[derive(Debug, Clone)]
enum Failed {
    Timeout,
    Other(String),
}

thread_local! {
    /// This thread's batchers, one per generation of limits.
    static BATCHERS: std::cell::RefCell<Vec<BatcherEntry>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Handshakes sent together at most.
const MAX_BATCH: usize = 64;

/// Sends the handshakes that wait, in one script call; those that arrive while it is out go in the next.
async fn batcher(
    limits: std::sync::Weak<Limits>,
    mut jobs: mpsc::UnboundedReceiver<(Job, Reply)>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        // Withdrawn limits (a reload, the drain): the batcher ends; handshakes still queued hear so.
        let first = tokio::select! {
            job = jobs.recv() => job,
            () = stop.cancelled() => None,
        };
        let Some(first) = first else { return };
        // The worker's other ready tasks run first (at once when there are none): handshakes they bring to this
        // point join the batch, so that under load each round trip carries more of them.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(limits) = limits.upgrade() else { return };
        // Handshakes given up on meanwhile (their clients gone) are not sent.
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (work, replies): (Vec<Job>, Vec<Reply>) = batch.into_iter().unzip();
        // After a timeout, what is queued is answered at once, as the next handshakes are.
        let answered = if limits.broken() {
            Err(RedisError::Timeout {
                url: limits.redis.url().to_string(),
            })
        } else {
            limits.run_batch(work).await
        };
        match answered {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(e) => {
                let failed = match e {
                    RedisError::Timeout { .. } => Failed::Timeout,
                    e => Failed::Other(e.to_string()),
                };
                for reply in replies {
                    let _ = reply.send(Err(failed.clone()));
                }
            }
        }
    }
}

/// A handshake's connections, counted in the shared limits while this lives.
#[derive(Debug)]
pub struct Held {
    tally: Arc<Tally>,
    keys: Vec<Arc<str>>,
}

impl Held {
    fn count(&self, delta: i32) {
        self.each(|live, key| {
            let count = live.counts.entry(key.clone()).or_insert(0);
            *count = count.saturating_add_signed(delta);
            if *count == 0 {
                live.counts.remove(key);
            }
            if delta < 0 {
                live.dirty.insert(key.clone());
            }
        });
    }

    fn in_flight(&self, delta: i32) {
        self.each(|live, key| {
            let n = live.in_flight.entry(key.clone()).or_insert(0);
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                live.in_flight.remove(key);
            }
        });
        if delta < 0 {
            self.tally.flush.notify_one();
        }
    }

    fn mark_dirty(&self) {
        self.each(|live, key| {
            live.dirty.insert(key.clone());
        });
        self.tally.flush.notify_one();
    }

    fn each(&self, mut change: impl FnMut(&mut Live, &Arc<str>)) {
        if self.keys.is_empty() {
            return;
        }
        let mut live = self.tally.live.lock().unwrap_or_else(PoisonError::into_inner);
        for key in &self.keys {
            change(&mut live, key);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        self.count(-1);
        self.tally.flush.notify_one();
    }
}

/// Writes the counts that changed, at most every [`FLUSH_EVERY`]; a failed write is tried again.
async fn flusher(limits: std::sync::Weak<Limits>, tally: Arc<Tally>, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = tally.flush.notified() => {}
            () = stop.cancelled() => return,
        }
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(limits) = limits.upgrade() else { return };
        let batch: Vec<(Arc<str>, u32)> = {
            let mut live = tally.live.lock().unwrap_or_else(PoisonError::into_inner);
            let Live {
                counts,
                dirty,
                in_flight,
            } = &mut *live;
            let take: Vec<Arc<str>> = dirty
                .iter()
                .filter(|k| !in_flight.contains_key(*k))
                .take(FLUSH_BATCH)
                .cloned()
                .collect();
            take.into_iter()
                .map(|key| {
                    dirty.remove(&key);
                    let count = counts.get(&key).copied().unwrap_or(0);
                    (key, count)
                })
                .collect()
        };
        if batch.is_empty() {
            continue;
        }
        let field = limits.field.clone();
        let mut pipe = ::redis::pipe();
        for (key, count) in &batch {
            if *count == 0 {
                pipe.cmd("HDEL").arg(&**key).arg(&field).ignore();
            } else {
                pipe.cmd("HSET").arg(&**key).arg(&field).arg(*count).ignore();
            }
            // Every write renews the hash's expiry, for the other instances' fields too.
            pipe.cmd("PEXPIRE").arg(&**key).arg(COUNT_TTL_MS).ignore();
        }
        let written = limits
            .redis
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await;
        let more = {
            let mut live = tally.live.lock().unwrap_or_else(PoisonError::into_inner);
            if written.is_err() {
                live.dirty.extend(batch.into_iter().map(|(key, _)| key));
            }
            live.dirty.iter().any(|k| !live.in_flight.contains_key(k))
        };
        drop(limits);
        if written.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if more {
            tally.flush.notify_one();
        }
    }
}

/// Writes the instance's presence every [`BEAT_EVERY`], with its counts, and writes all its live counts again
/// when Redis had lost the presence.
async fn presence(limits: std::sync::Weak<Limits>, stop: tokio_util::sync::CancellationToken, counts: Counts) {
    let script = Script::new(BEAT);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut beat = tokio::time::interval(BEAT_EVERY);
    let mut beats = 0u64;
    loop {
        tokio::select! {
            _ = beat.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(limits) = limits.upgrade() else { return };
        let (connections, sessions) = (counts.counts)();
        let said = serde_json::json!({
            "instance": limits.instance,
            "boot": limits.field,
            "connections": connections,
            "sessions": sessions,
            "started": started,
            "version": env!("CARGO_PKG_VERSION"),
        })
        .to_string();
        let mut invocation = script.prepare_invoke();
        invocation
            .key(format!("{PREFIX}alive:{}", limits.field))
            .key(format!("{PREFIX}members"))
            .arg(said)
            .arg(PRESENCE_TTL.as_millis() as u64)
            .arg(&limits.field);
        let existed: Result<i64, RedisError> = limits
            .redis
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await;
        beats = beats.wrapping_add(1);
        // A count hash expires a day after its last write: sessions that outlive that are written again.
        if matches!(existed, Ok(0)) || beats.is_multiple_of(REWRITE_EVERY_BEATS) {
            limits.tally.rewrite_all();
        }
        limits.stats.down.store(existed.is_err(), Ordering::Relaxed);
        let (threshold, rate) = **limits.rebalance.load();
        if let Some(threshold) = threshold
            && existed.is_ok()
        {
            rebalance(&limits, sessions, threshold, rate, &counts).await;
        }
    }
}

/// Sheds this instance's sessions above its even share of the fleet's (by more than `threshold`), at most `rate`
/// a second: each beat closes up to a beat's worth with 1012, so that their clients reconnect through the balancer
/// in front, which spreads them over the fleet.
async fn rebalance(limits: &Limits, sessions: u64, threshold: f64, rate: u32, local: &Local) {
    let fleet = match limits.fleet().await {
        Ok(fleet) if fleet.len() > 1 => fleet,
        _ => return,
    };
    let total: u64 = fleet.iter().filter_map(|i| i["sessions"].as_u64()).sum();
    let share = total as f64 / fleet.len() as f64;
    let allowed = (share * (1.0 + threshold)).ceil() as u64;
    if sessions <= allowed {
        return;
    }
    // Down to the even share, not just below the threshold, so that the next arrivals do not start it again.
    let keep = usize::try_from(share.ceil() as u64).unwrap_or(usize::MAX);
    let per_beat = usize::try_from(u64::from(rate) * BEAT_EVERY.as_secs()).unwrap_or(usize::MAX);
    let shed = (local.shed)(per_beat, keep);
    if shed == 0 {
        return;
    }
    tracing::info!(
        instance = %limits.instance,
        sessions,
        even_share = share,
        shed,
        "cluster: this instance holds more than its share of the fleet's sessions: shedding with 1012"
    );
}
