//! Virtual keys at request time: a key presented by a client is found by its hash (cached, re-read from the
//! database at most every [`RECHECK`], so that a key revoked by `wsgate llm-key revoke` in another process stops
//! working within that), and its limits are checked against what it has used: requests and tokens in the last
//! minute, tokens today (UTC), and its spending budget. A request is refused once a count has reached its limit, so
//! one request in flight may cross it and the next one is refused.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::db::{Db, DbError};
use super::store::{self, KeyRecord, day_of};
use crate::config::llm::ModelPattern;

/// How long a key found in the database is trusted before it is read again.
pub const RECHECK: Duration = Duration::from_secs(10);
/// The window of the per-minute limits.
const MINUTE: Duration = Duration::from_secs(60);

/// Why a key is not let through.
#[derive(Debug, thiserror::Error)]
pub enum KeyRefusal {
    #[error("no API key (give one as `Authorization: Bearer KEY`)")]
    Missing,
    #[error("unknown API key")]
    Unknown,
    #[error("API key {0} is revoked")]
    Revoked(i64),
    #[error("the key database cannot answer: {0}")]
    Unavailable(#[from] DbError),
}

/// A limit a key has reached.
#[derive(Debug, Clone, PartialEq)]
pub enum Limit {
    RequestsPerMinute(u32),
    TokensPerMinute(u64),
    TokensPerDay(u64),
    Budget(f64),
    /// The key may not use this model.
    Model,
    /// The key was revoked (an open socket's key).
    Revoked,
    /// The key's limits cannot be checked (the shared database does not answer).
    Unavailable,
}

/// A refusal by a key's limits: which, and when to try again (`None`: not by waiting).
#[derive(Debug, Clone, PartialEq)]
pub struct OverLimit {
    pub limit: Limit,
    pub retry_after: Option<Duration>,
}

impl OverLimit {
    pub fn message(&self) -> String {
        match &self.limit {
            Limit::RequestsPerMinute(n) => format!("this key's limit of {n} requests per minute is reached"),
            Limit::TokensPerMinute(n) => format!("this key's limit of {n} tokens per minute is reached"),
            Limit::TokensPerDay(n) => format!("this key's limit of {n} tokens per day is reached"),
            Limit::Budget(b) => format!("this key's budget of {b} is spent"),
            Limit::Model => "this key may not use this model".into(),
            Limit::Revoked => "this API key has been revoked".into(),
            Limit::Unavailable => "API keys cannot be checked right now".into(),
        }
    }
}

/// What the gateway keeps of one key: its record (read from the database, updated in place when read again) and
/// what it has used. One per key id, whoever presents it: every request of the key charges the same windows.
pub struct KeyState {
    id: i64,
    revoked: AtomicBool,
    // A plain mutex: held for a few comparisons, never across an await (the project-wide ban on `std::sync::Mutex`
    // is meant for the relay path).
    #[allow(clippy::disallowed_types)]
    inner: std::sync::Mutex<Inner>,
}

struct Inner {
    record: KeyRecord,
    models: Vec<ModelPattern>,
    used: Used,
}

/// A key's use in its windows.
struct Used {
    /// Start times of the requests of the last minute.
    requests: VecDeque<Instant>,
    /// Tokens of the last minute, by the time they were counted.
    tokens: VecDeque<(Instant, u64)>,
    /// The UTC day `day_tokens` counts.
    day: String,
    day_tokens: u64,
    /// All it has spent.
    spent: f64,
}

impl KeyState {
    fn new(record: KeyRecord, spent: f64, day: String, day_tokens: u64) -> KeyState {
        KeyState {
            id: record.id,
            revoked: AtomicBool::new(record.revoked),
            #[allow(clippy::disallowed_types)]
            inner: std::sync::Mutex::new(Inner {
                models: models_of(&record),
                record,
                used: Used {
                    requests: VecDeque::new(),
                    tokens: VecDeque::new(),
                    day,
                    day_tokens,
                    spent,
                },
            }),
        }
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn allows_model(&self, model: &str) -> bool {
        let inner = self.lock();
        inner.models.is_empty() || inner.models.iter().any(|m| m.matches(model))
    }

    /// Lets a request to `model` start, counting it, or says which limit stops it: by this instance's counts with
    /// SQLite, by every instance's with Redis (where a key revoked through any instance is refused at once).
    pub async fn admit(&self, db: &Db, model: &str) -> Result<(), OverLimit> {
        let Db::Redis(redis) = db else {
            return self.admit_at(model, Instant::now(), &day_of(SystemTime::now()));
        };
        self.may_use(model)?;
        match redis.admit(self.id, true).await {
            Ok(verdict) => self.shared_verdict(verdict),
            Err(e) => {
                tracing::debug!(key = self.id, error = %e, "cannot check the key's limits");
                Err(OverLimit {
                    limit: Limit::Unavailable,
                    retry_after: Some(Duration::from_secs(1)),
                })
            }
        }
    }

    /// Whether the key is revoked, or has reached a token or budget limit: what ends a Realtime session mid-way.
    /// A shared database that cannot answer does not end it (the session was admitted; it is logged).
    pub async fn check_tokens(&self, db: &Db) -> Result<(), OverLimit> {
        let Db::Redis(redis) = db else {
            return self.check_tokens_at(Instant::now(), &day_of(SystemTime::now()));
        };
        match redis.admit(self.id, false).await {
            Ok(verdict) => self.shared_verdict(verdict),
            Err(e) => {
                tracing::warn!(key = self.id, error = %e, "cannot check the key's limits; the session goes on");
                Ok(())
            }
        }
    }

    /// Keeps what Redis says the key has spent (for [`KeyState::budget_left`]) and its revocation.
    fn shared_verdict(&self, verdict: Result<f64, OverLimit>) -> Result<(), OverLimit> {
        match verdict {
            Ok(spent) => {
                self.lock().used.spent = spent;
                Ok(())
            }
            Err(over) => {
                if over.limit == Limit::Revoked {
                    self.revoked.store(true, Ordering::Relaxed);
                }
                Err(over)
            }
        }
    }

    /// Whether the key is live and may use `model`.
    fn may_use(&self, model: &str) -> Result<(), OverLimit> {
        if self.is_revoked() {
            return Err(OverLimit {
                limit: Limit::Revoked,
                retry_after: None,
            });
        }
        if !self.allows_model(model) {
            return Err(OverLimit {
                limit: Limit::Model,
                retry_after: None,
            });
        }
        Ok(())
    }

    /// [`KeyState::admit`] by this instance's counts, at `now`.
    pub fn admit_at(&self, model: &str, now: Instant, today: &str) -> Result<(), OverLimit> {
        self.may_use(model)?;
        let mut inner = self.lock();
        let Inner { record, used, .. } = &mut *inner;
        used.prune(now, today);
        if let Some(rpm) = record.requests_per_minute
            && used.requests.len() >= rpm as usize
        {
            let oldest = used.requests.front().copied().unwrap_or(now);
            return Err(OverLimit {
                limit: Limit::RequestsPerMinute(rpm),
                retry_after: Some(MINUTE.saturating_sub(now - oldest)),
            });
        }
        token_limits(record, used, now)?;
        used.requests.push_back(now);
        Ok(())
    }

    /// [`KeyState::check_tokens`] by this instance's counts, at `now`.
    pub fn check_tokens_at(&self, now: Instant, today: &str) -> Result<(), OverLimit> {
        if self.is_revoked() {
            return Err(OverLimit {
                limit: Limit::Revoked,
                retry_after: None,
            });
        }
        let mut inner = self.lock();
        let Inner { record, used, .. } = &mut *inner;
        used.prune(now, today);
        token_limits(record, used, now)
    }

    /// Counts what a request used.
    pub fn charge(&self, tokens: u64, cost: f64, now: Instant, today: &str) {
        let mut inner = self.lock();
        let used = &mut inner.used;
        used.prune(now, today);
        if tokens > 0 {
            used.tokens.push_back((now, tokens));
        }
        used.day_tokens = used.day_tokens.saturating_add(tokens);
        if cost.is_finite() {
            used.spent += cost;
        }
    }

    /// How much of its budget a key has left (`None`: no budget).
    pub fn budget_left(&self) -> Option<f64> {
        let inner = self.lock();
        Some(inner.record.budget? - inner.used.spent)
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }

    /// The key as the database has it now: its limits, models and revocation, in place (what it used stays).
    fn update(&self, record: KeyRecord) {
        self.revoked.store(record.revoked, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.models = models_of(&record);
        inner.record = record;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it leaves counts that are still counts.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn models_of(record: &KeyRecord) -> Vec<ModelPattern> {
    record.models.iter().map(|m| ModelPattern(m.clone())).collect()
}

/// The token and budget limits `record` sets, against what was `used`.
fn token_limits(record: &KeyRecord, used: &Used, now: Instant) -> Result<(), OverLimit> {
    if let Some(tpm) = record.tokens_per_minute {
        let mut sum: u64 = used.tokens.iter().map(|(_, n)| n).fold(0, |a, n| a.saturating_add(*n));
        if sum >= tpm {
            // Waiting until enough of the minute's tokens have aged out brings the count under the limit.
            let mut wait = Duration::ZERO;
            for (at, n) in &used.tokens {
                sum = sum.saturating_sub(*n);
                wait = MINUTE.saturating_sub(now - *at);
                if sum < tpm {
                    break;
                }
            }
            return Err(OverLimit {
                limit: Limit::TokensPerMinute(tpm),
                retry_after: Some(wait),
            });
        }
    }
    if let Some(tpd) = record.tokens_per_day
        && used.day_tokens >= tpd
    {
        return Err(OverLimit {
            limit: Limit::TokensPerDay(tpd),
            retry_after: Some(until_next_utc_day(SystemTime::now())),
        });
    }
    if let Some(budget) = record.budget
        && used.spent >= budget
    {
        return Err(OverLimit {
            limit: Limit::Budget(budget),
            retry_after: None,
        });
    }
    Ok(())
}

impl Used {
    fn prune(&mut self, now: Instant, today: &str) {
        while self.requests.front().is_some_and(|at| now - *at >= MINUTE) {
            self.requests.pop_front();
        }
        while self.tokens.front().is_some_and(|(at, _)| now - *at >= MINUTE) {
            self.tokens.pop_front();
        }
        if self.day != today {
            self.day = today.to_string();
            self.day_tokens = 0;
        }
    }
}

/// Time until the next UTC midnight.
pub(super) fn until_next_utc_day(now: SystemTime) -> Duration {
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Duration::from_secs(86_400 - secs % 86_400)
}

/// When a secret was last found to name a key.
struct Cached {
    id: i64,
    checked: Instant,
}

/// The keys seen so far: their states by id, and which id each secret names (by the secret's hash).
#[derive(Default)]
pub struct Keys {
    // A plain mutex: map lookups and inserts under it, never held across an await.
    #[allow(clippy::disallowed_types)]
    maps: std::sync::Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    by_hash: HashMap<[u8; 32], Cached>,
    by_id: HashMap<i64, Arc<KeyState>>,
}

impl Keys {
    /// The key `secret` names, from the cache or the database, or why it is refused.
    pub async fn authenticate(&self, db: &Db, secret: &str) -> Result<Arc<KeyState>, KeyRefusal> {
        let hash = store::hash_key(secret);
        let now = Instant::now();
        let fresh = {
            let maps = self.maps();
            maps.by_hash
                .get(&hash)
                .filter(|c| now - c.checked < RECHECK)
                .and_then(|c| maps.by_id.get(&c.id).cloned())
        };
        let key = match fresh {
            Some(key) => key,
            None => {
                let Some(record) = db.find_key(secret).await? else {
                    self.maps().by_hash.remove(&hash);
                    return Err(KeyRefusal::Unknown);
                };
                let id = record.id;
                let known = self.maps().by_id.get(&id).cloned();
                let key = match known {
                    Some(key) => {
                        key.update(record);
                        key
                    }
                    None => {
                        let today = store::day_of(SystemTime::now());
                        let (spent, day_tokens) = db.totals(id, today.clone()).await?;
                        // Another request may have made the key's state meanwhile: there is one per id.
                        let mut maps = self.maps();
                        maps.by_id
                            .entry(id)
                            .or_insert_with(|| Arc::new(KeyState::new(record, spent, today, day_tokens)))
                            .clone()
                    }
                };
                self.maps().by_hash.insert(hash, Cached { id, checked: now });
                key
            }
        };
        if key.is_revoked() {
            return Err(KeyRefusal::Revoked(key.id()));
        }
        Ok(key)
    }

    /// A key revoked through this gateway stops working at once, on open sockets too.
    pub fn revoked(&self, id: i64) {
        if let Some(key) = self.maps().by_id.get(&id) {
            key.revoked.store(true, Ordering::Relaxed);
        }
    }

    /// Forgets every key (the database changed: its ids name other keys).
    pub fn clear(&self) {
        let mut maps = self.maps();
        maps.by_hash.clear();
        maps.by_id.clear();
    }

    #[allow(clippy::disallowed_types)]
    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rpm: Option<u32>, tpm: Option<u64>, tpd: Option<u64>, budget: Option<f64>) -> KeyRecord {
        KeyRecord {
            id: 7,
            owner: "team".into(),
            models: vec!["tiny*".into()],
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            tokens_per_day: tpd,
            budget,
            hint: "sk-wsg-…abcd".into(),
            created: 0,
            revoked: false,
        }
    }

    #[test]
    fn requests_per_minute_refuse_the_next_request_until_the_oldest_ages_out() {
        let key = KeyState::new(record(Some(2), None, None, None), 0.0, "2026-12-06".into(), 0);
        let t0 = Instant::now();
        key.admit_at("tiny", t0, "2026-12-06").unwrap();
        key.admit_at("tiny", t0 + Duration::from_secs(10), "2026-12-06")
            .unwrap();
        let refused = key
            .admit_at("tiny", t0 + Duration::from_secs(20), "2026-12-06")
            .unwrap_err();
        assert_eq!(refused.limit, Limit::RequestsPerMinute(2));
        assert_eq!(refused.retry_after, Some(Duration::from_secs(40)));
        key.admit_at("tiny", t0 + Duration::from_secs(60), "2026-12-06")
            .unwrap();
    }

    #[test]
    fn token_limits_refuse_once_reached_and_a_new_day_starts_over() {
        let key = KeyState::new(record(None, Some(100), Some(150), None), 0.0, "2026-12-06".into(), 0);
        let t0 = Instant::now();
        key.admit_at("tiny", t0, "2026-12-06").unwrap();
        // One request may cross the limit; the next is refused.
        key.charge(120, 0.0, t0, "2026-12-06");
        let refused = key
            .admit_at("tiny", t0 + Duration::from_secs(1), "2026-12-06")
            .unwrap_err();
        assert_eq!(refused.limit, Limit::TokensPerMinute(100));
        assert_eq!(refused.retry_after, Some(Duration::from_secs(59)));
        // A minute later the minute's tokens are gone, but the day's count holds.
        key.admit_at("tiny", t0 + MINUTE, "2026-12-06").unwrap();
        key.charge(40, 0.0, t0 + MINUTE, "2026-12-06");
        let refused = key.admit_at("tiny", t0 + 2 * MINUTE, "2026-12-06").unwrap_err();
        assert_eq!(refused.limit, Limit::TokensPerDay(150));
        key.admit_at("tiny", t0 + 3 * MINUTE, "2026-12-07").unwrap();
    }

    #[test]
    fn a_spent_budget_and_other_models_are_refused() {
        let key = KeyState::new(record(None, None, None, Some(1.0)), 0.5, "2026-12-06".into(), 0);
        let t0 = Instant::now();
        assert_eq!(key.admit_at("other", t0, "2026-12-06").unwrap_err().limit, Limit::Model);
        key.admit_at("tiny-2", t0, "2026-12-06").unwrap();
        key.charge(10, 0.5, t0, "2026-12-06");
        let refused = key.admit_at("tiny", t0, "2026-12-06").unwrap_err();
        assert_eq!(refused.limit, Limit::Budget(1.0));
        assert_eq!(refused.retry_after, None);
        assert_eq!(key.budget_left(), Some(0.0));
    }
}
