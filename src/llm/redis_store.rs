//! Virtual keys, their limits and usage in Redis (`[llm] database = "redis://…"`), shared by every instance that
//! names the same server: a key issued or revoked through any of them works or stops on all, a key's limits count
//! the requests and tokens of all, and `GET /api/llm/usage` on any shows the usage of all.
//!
//! What Redis holds (every name starts with `wsgate:llm:`):
//!
//! | name | type | what |
//! |---|---|---|
//! | `next-key-id` | counter | the last key id issued |
//! | `keys` | sorted set | the key ids |
//! | `key:{id}` | hash | `owner`, `models` (JSON), `hint`, `hash` (hex SHA-256), `created`, `rpm`, `tpm`, `tpd`, `budget` (limits, absent when none), `revoked` (unix second, absent while live), `spent` |
//! | `by-hash:{sha256 hex}` | string | the id of the key with that hash |
//! | `rpm:{id}`, `tpm:{id}` | hash | requests and tokens per unix second, the last minute's (expire after 2 minutes) |
//! | `tpd:{id}:{day}` | counter | tokens of a UTC day (expires after 3 days) |
//! | `usage:{day}:{id}:{counted}:{model}` | hash | a usage row: `requests`, `prompt_tokens`, `completion_tokens`, `cost`, and `key_id`, `model`, `day`, `counted` |
//! | `usage-rows` | set | the usage rows' names |
//!
//! A request is admitted by one script (one round trip): it reads the key's limits, revocation and spending, prunes
//! and sums the minute's windows, and counts the request. Usage is written as on SQLite, in batches at least every
//! [`USAGE_BATCH_WAIT`], each batch in one transaction; a batch Redis does not take is kept and tried again.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::{Script, cmd, pipe};
use tokio::sync::Notify;

use super::DbError;
use super::db::{MAX_PENDING_USAGE, Pending, queue_usage};
use super::keys::{Limit, OverLimit, until_next_utc_day};
use super::store::{self, Issued, KeyRecord, NewKey, UsageDelta, UsageFilter, UsageRow};
use crate::cluster::redis::{Redis, RedisError};

const PREFIX: &str = "wsgate:llm:";
const NEXT_ID: &str = "wsgate:llm:next-key-id";
const KEYS: &str = "wsgate:llm:keys";
const USAGE_ROWS: &str = "wsgate:llm:usage-rows";
/// How long usage rows wait to be written together, at most.
const USAGE_BATCH_WAIT: Duration = Duration::from_millis(200);
/// How long the minute windows' counts are kept (a minute, and a margin).
const WINDOW_TTL_SECS: u64 = 120;
/// How long a day's token count is kept.
const DAY_TTL_SECS: u64 = 3 * 86_400;
/// How long closing waits for the last usage rows to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// Admits a request, or says which limit stops it. KEYS: the key's hash, its `rpm` and `tpm` windows, its day's
/// token count. ARGV: the unix second now; `1` to count a request (its RPM limit applies), `0` to check tokens and
/// budget only. Returns `{verdict, seconds to wait, spent}`.
const ADMIT: &str = r"
local now = tonumber(ARGV[1])
local k = redis.call('HMGET', KEYS[1], 'owner', 'revoked', 'rpm', 'tpm', 'tpd', 'budget', 'spent')
if not k[1] then return {'unknown', 0, '0'} end
local spent = k[7] or '0'
if k[2] then return {'revoked', 0, spent} end
local function window(name)
  local all = redis.call('HGETALL', name)
  local items, old, sum = {}, {}, 0
  for i = 1, #all, 2 do
    local second, n = tonumber(all[i]), tonumber(all[i + 1])
    if now - second >= 60 then
      table.insert(old, all[i])
    else
      table.insert(items, {second, n})
      sum = sum + n
    end
  end
  if #old > 0 then redis.call('HDEL', name, unpack(old)) end
  table.sort(items, function(a, b) return a[1] < b[1] end)
  return sum, items
end
local function wait(items, sum, limit)
  for _, item in ipairs(items) do
    sum = sum - item[2]
    if sum < limit then return 60 - (now - item[1]) end
  end
  return 60
end
local counting = ARGV[2] == '1'
if counting and k[3] then
  local rpm = tonumber(k[3])
  local sum, items = window(KEYS[2])
  if sum >= rpm then return {'rpm', wait(items, sum, rpm), spent} end
end
if k[4] then
  local tpm = tonumber(k[4])
  local sum, items = window(KEYS[3])
  if sum >= tpm then return {'tpm', wait(items, sum, tpm), spent} end
end
if k[5] and tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(k[5]) then return {'tpd', 0, spent} end
if k[6] and tonumber(spent) >= tonumber(k[6]) then return {'budget', 0, spent} end
if counting and k[3] then
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  redis.call('EXPIRE', KEYS[2], 120)
end
return {'ok', 0, spent}
";

/// Revokes a key: 1 when it was live, 0 when unknown or revoked already. KEYS: the key's hash; ARGV: the unix
/// second now.
const REVOKE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'revoked', ARGV[1])
";

fn key_name(id: i64) -> String {
    format!("{PREFIX}key:{id}")
}

fn by_hash_name(hash: &[u8; 32]) -> String {
    let mut name = String::with_capacity(PREFIX.len() + 8 + 64);
    name.push_str(PREFIX);
    name.push_str("by-hash:");
    for b in hash {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

fn usage_name(d: &UsageDelta) -> String {
    format!(
        "{PREFIX}usage:{}:{}:{}:{}",
        d.day,
        d.key_id,
        u8::from(d.counted),
        d.model
    )
}

fn unix_second() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The usage writer's stop signal and the sign that it wrote its last batch.
struct Writer {
    stop: Notify,
    // A plain mutex: taken once, at close.
    #[allow(clippy::disallowed_types)]
    done: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

/// A handle on the keys and usage in Redis.
#[derive(Clone)]
pub struct RedisDb {
    redis: Redis,
    pending: Arc<Pending>,
    writer: Arc<Writer>,
    admit: Arc<Script>,
    revoke: Arc<Script>,
}

impl RedisDb {
    /// A client for the server at `url`, with its usage writer; it connects on first use.
    pub fn open(url: &str) -> Result<RedisDb, DbError> {
        let redis = Redis::open(url)?;
        let pending = Arc::new(Pending::default());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = Arc::new(Writer {
            stop: Notify::new(),
            #[allow(clippy::disallowed_types)]
            done: std::sync::Mutex::new(Some(done_rx)),
        });
        let (r, rows, w) = (redis.clone(), pending.clone(), writer.clone());
        redis.spawn(async move {
            let failing = AtomicBool::new(false);
            loop {
                let stopping = tokio::select! {
                    () = tokio::time::sleep(USAGE_BATCH_WAIT) => false,
                    () = w.stop.notified() => true,
                };
                write_usage(&r, &rows, &failing).await;
                if stopping {
                    break;
                }
            }
            let _ = done_tx.send(());
        });
        Ok(RedisDb {
            redis,
            pending,
            writer,
            admit: Arc::new(Script::new(ADMIT)),
            revoke: Arc::new(Script::new(REVOKE)),
        })
    }

    /// The server's URL, its password hidden.
    pub fn url(&self) -> &str {
        self.redis.url()
    }

    pub async fn find_key(&self, secret: &str) -> Result<Option<KeyRecord>, DbError> {
        let name = by_hash_name(&store::hash_key(secret));
        let id: Option<String> = self
            .redis
            .run(|mut c| async move { cmd("GET").arg(&name).query_async(&mut c).await })
            .await?;
        let Some(id) = id else { return Ok(None) };
        let Ok(id) = id.parse::<i64>() else {
            return Err(self.redis.corrupt("by-hash", format!("{id:?} is not a key id")).into());
        };
        self.key(id).await
    }

    pub async fn key(&self, id: i64) -> Result<Option<KeyRecord>, DbError> {
        let name = key_name(id);
        let fields: HashMap<String, String> = self
            .redis
            .run(|mut c| async move { cmd("HGETALL").arg(&name).query_async(&mut c).await })
            .await?;
        self.key_record(id, &fields)
    }

    pub async fn add_key(&self, new: NewKey) -> Result<Issued, DbError> {
        new.check()?;
        let models = serde_json::to_string(&new.models)
            .map_err(|e| self.redis.corrupt("models", format!("cannot write them as JSON: {e}")))?;
        let secret = store::new_secret()?;
        let hash = store::hash_key(&secret);
        let id: i64 = self
            .redis
            .run(|mut c| async move { cmd("INCR").arg(NEXT_ID).query_async(&mut c).await })
            .await?;
        let mut fields: Vec<(&str, String)> = vec![
            ("owner", new.owner.clone()),
            ("models", models),
            ("hint", store::hint(&secret)),
            ("hash", by_hash_name(&hash)[PREFIX.len() + 8..].to_string()),
            ("created", store::unix_now().to_string()),
        ];
        let limits = [
            ("rpm", new.requests_per_minute.map(|n| n.to_string())),
            ("tpm", new.tokens_per_minute.map(|n| n.to_string())),
            ("tpd", new.tokens_per_day.map(|n| n.to_string())),
            ("budget", new.budget.map(|b| b.to_string())),
        ];
        fields.extend(limits.into_iter().filter_map(|(name, value)| Some((name, value?))));
        let mut p = pipe();
        p.atomic()
            .cmd("HSET")
            .arg(key_name(id))
            .arg(&fields)
            .ignore()
            .cmd("SET")
            .arg(by_hash_name(&hash))
            .arg(id)
            .ignore()
            .cmd("ZADD")
            .arg(KEYS)
            .arg(id)
            .arg(id)
            .ignore();
        self.redis
            .run(|mut c| async move { p.query_async::<()>(&mut c).await })
            .await?;
        Ok(Issued { id, key: secret })
    }

    /// Every key, revoked ones too, by id.
    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, DbError> {
        let ids: Vec<i64> = self
            .redis
            .run(|mut c| async move { cmd("ZRANGE").arg(KEYS).arg(0).arg(-1).query_async(&mut c).await })
            .await?;
        let mut p = pipe();
        for id in &ids {
            p.cmd("HGETALL").arg(key_name(*id));
        }
        let all: Vec<HashMap<String, String>> = self.pipeline(p).await?;
        let mut keys = Vec::with_capacity(ids.len());
        for (id, fields) in ids.into_iter().zip(&all) {
            keys.extend(self.key_record(id, fields)?);
        }
        Ok(keys)
    }

    pub async fn revoke(&self, id: i64) -> Result<bool, DbError> {
        let script = self.revoke.clone();
        let changed: i64 = self
            .redis
            .run(|mut c| async move {
                script
                    .key(key_name(id))
                    .arg(store::unix_now())
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(changed == 1)
    }

    /// Admits a request of key `id` (`counting`: its RPM limit applies and it is counted; otherwise only its token
    /// and budget limits are checked), with what the key has spent, or the limit that stops it.
    pub async fn admit(&self, id: i64, counting: bool) -> Result<Result<f64, OverLimit>, DbError> {
        let day = store::day_of(SystemTime::now());
        let script = self.admit.clone();
        let (verdict, wait, spent): (String, i64, String) = self
            .redis
            .run(|mut c| async move {
                script
                    .key(key_name(id))
                    .key(format!("{PREFIX}rpm:{id}"))
                    .key(format!("{PREFIX}tpm:{id}"))
                    .key(format!("{PREFIX}tpd:{id}:{day}"))
                    .arg(unix_second())
                    .arg(if counting { "1" } else { "0" })
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let spent: f64 = spent.parse().unwrap_or(0.0);
        let fields = || self.key(id);
        let wait = Some(Duration::from_secs(u64::try_from(wait.max(1)).unwrap_or(60)));
        let over = |limit, retry_after| Ok(Err(OverLimit { limit, retry_after }));
        match verdict.as_str() {
            "ok" => Ok(Ok(spent)),
            "unknown" | "revoked" => over(Limit::Revoked, None),
            "rpm" | "tpm" | "tpd" | "budget" => {
                // The limit's value, for the message: the key as Redis has it.
                let Some(record) = fields().await? else {
                    return over(Limit::Revoked, None);
                };
                match verdict.as_str() {
                    "rpm" => over(Limit::RequestsPerMinute(record.requests_per_minute.unwrap_or(0)), wait),
                    "tpm" => over(Limit::TokensPerMinute(record.tokens_per_minute.unwrap_or(0)), wait),
                    "tpd" => over(
                        Limit::TokensPerDay(record.tokens_per_day.unwrap_or(0)),
                        Some(until_next_utc_day(SystemTime::now())),
                    ),
                    _ => over(Limit::Budget(record.budget.unwrap_or(0.0)), None),
                }
            }
            other => Err(self
                .redis
                .corrupt("the admission script", format!("answered {other:?}"))
                .into()),
        }
    }

    /// The usage rows `filter` asks for, ordered by day, key, model and whether counted (as SQLite orders them).
    pub async fn usage(&self, filter: UsageFilter) -> Result<Vec<UsageRow>, DbError> {
        for day in [&filter.from_day, &filter.to_day].into_iter().flatten() {
            store::check_day(day)?;
        }
        let names: Vec<String> = self
            .redis
            .run(|mut c| async move { cmd("SMEMBERS").arg(USAGE_ROWS).query_async(&mut c).await })
            .await?;
        let mut p = pipe();
        for name in &names {
            p.cmd("HGETALL").arg(name);
        }
        let all: Vec<HashMap<String, String>> = self.pipeline(p).await?;
        let mut rows = Vec::new();
        for (name, fields) in names.iter().zip(&all) {
            if fields.is_empty() {
                continue;
            }
            let row = self.usage_row(name, fields)?;
            let wanted = filter.key_id.is_none_or(|id| id == row.key_id)
                && filter.model.as_ref().is_none_or(|m| *m == row.model)
                && filter.from_day.as_ref().is_none_or(|d| row.day >= *d)
                && filter.to_day.as_ref().is_none_or(|d| row.day <= *d);
            if wanted {
                rows.push(row);
            }
        }
        let ids: BTreeSet<i64> = rows.iter().map(|r| r.key_id).collect();
        let mut p = pipe();
        for id in &ids {
            p.cmd("HGET").arg(key_name(*id)).arg("owner");
        }
        let owners: Vec<Option<String>> = self.pipeline(p).await?;
        let owners: HashMap<i64, String> = ids
            .into_iter()
            .zip(owners)
            .filter_map(|(id, owner)| Some((id, owner?)))
            .collect();
        rows.retain_mut(|row| match owners.get(&row.key_id) {
            Some(owner) => {
                row.owner.clone_from(owner);
                filter.owner.as_ref().is_none_or(|o| o == owner)
            }
            None => false,
        });
        rows.sort_by(|a, b| (&a.day, a.key_id, &a.model, a.counted).cmp(&(&b.day, b.key_id, &b.model, b.counted)));
        Ok(rows)
    }

    /// Puts a usage row in the buffer the writer writes; `false` when the buffer is full (the row is lost, and the
    /// caller says so in the log).
    pub fn record(&self, delta: UsageDelta) -> bool {
        queue_usage(&self.pending, delta)
    }

    /// Writes what is pending and stops the writer, waiting for it a while (at shutdown).
    pub fn close(&self) {
        self.writer.stop.notify_one();
        let done = self.writer.done.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(done) = done
            && done.recv_timeout(CLOSE_WAIT).is_err()
        {
            tracing::error!(redis = %self.redis.url(), "the last usage rows were not written to Redis in time");
        }
    }

    /// Runs a pipeline of reads; one without commands answers nothing, without a round trip.
    async fn pipeline<T: ::redis::FromRedisValue + Default>(&self, p: ::redis::Pipeline) -> Result<T, DbError> {
        if p.is_empty() {
            return Ok(T::default());
        }
        Ok(self
            .redis
            .run(|mut c| async move { p.query_async(&mut c).await })
            .await?)
    }

    fn key_record(&self, id: i64, fields: &HashMap<String, String>) -> Result<Option<KeyRecord>, DbError> {
        if fields.is_empty() {
            return Ok(None);
        }
        let name = key_name(id);
        let text = |field: &str| {
            fields
                .get(field)
                .cloned()
                .ok_or_else(|| self.redis.corrupt(&name, format!("no `{field}`")))
        };
        let number = |field: &str| -> Result<Option<u64>, RedisError> {
            fields
                .get(field)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| self.redis.corrupt(&name, format!("`{field}` is {v:?}, not a number")))
                })
                .transpose()
        };
        let models: Vec<String> = serde_json::from_str(&text("models")?).map_err(|e| {
            self.redis
                .corrupt(&name, format!("`models` is not a JSON list of names: {e}"))
        })?;
        let budget = fields
            .get("budget")
            .map(|v| {
                v.parse::<f64>()
                    .map_err(|_| self.redis.corrupt(&name, format!("`budget` is {v:?}, not an amount")))
            })
            .transpose()?;
        let requests_per_minute = number("rpm")?
            .map(|n| u32::try_from(n).map_err(|_| self.redis.corrupt(&name, "`rpm` is too large")))
            .transpose()?;
        Ok(Some(KeyRecord {
            id,
            owner: text("owner")?,
            models,
            requests_per_minute,
            tokens_per_minute: number("tpm")?,
            tokens_per_day: number("tpd")?,
            budget,
            hint: text("hint")?,
            created: number("created")?.unwrap_or(0),
            revoked: fields.contains_key("revoked"),
        }))
    }

    fn usage_row(&self, name: &str, fields: &HashMap<String, String>) -> Result<UsageRow, DbError> {
        let text = |field: &str| {
            fields
                .get(field)
                .cloned()
                .ok_or_else(|| self.redis.corrupt(name, format!("no `{field}`")))
        };
        let parsed = |field: &str| -> Result<u64, RedisError> {
            let v = text(field)?;
            v.parse()
                .map_err(|_| self.redis.corrupt(name, format!("`{field}` is {v:?}, not a number")))
        };
        let key_id = text("key_id")?;
        let cost = text("cost")?;
        Ok(UsageRow {
            key_id: key_id
                .parse()
                .map_err(|_| self.redis.corrupt(name, format!("`key_id` is {key_id:?}")))?,
            owner: String::new(),
            model: text("model")?,
            day: text("day")?,
            counted: text("counted")? == "1",
            requests: parsed("requests")?,
            prompt_tokens: parsed("prompt_tokens")?,
            completion_tokens: parsed("completion_tokens")?,
            cost: cost
                .parse()
                .map_err(|_| self.redis.corrupt(name, format!("`cost` is {cost:?}, not an amount")))?,
        })
    }
}

/// Writes the pending rows in one transaction: the key's windows and day count, its spending and the usage row.
/// Rows Redis does not take go back to the front of the buffer, to be tried again.
async fn write_usage(redis: &Redis, pending: &Pending, failing: &AtomicBool) {
    let rows = std::mem::take(&mut *pending.lock().unwrap_or_else(PoisonError::into_inner));
    if rows.is_empty() {
        return;
    }
    let second = unix_second();
    let mut p = pipe();
    p.atomic();
    for d in &rows {
        let tokens = d.prompt_tokens.saturating_add(d.completion_tokens);
        let cost = if d.cost.is_finite() && d.cost > 0.0 {
            d.cost
        } else {
            0.0
        };
        if tokens > 0 {
            let tpm = format!("{PREFIX}tpm:{}", d.key_id);
            let tpd = format!("{PREFIX}tpd:{}:{}", d.key_id, d.day);
            p.cmd("HINCRBY").arg(&tpm).arg(second).arg(tokens).ignore();
            p.cmd("EXPIRE").arg(&tpm).arg(WINDOW_TTL_SECS).ignore();
            p.cmd("INCRBY").arg(&tpd).arg(tokens).ignore();
            p.cmd("EXPIRE").arg(&tpd).arg(DAY_TTL_SECS).ignore();
        }
        if cost > 0.0 {
            p.cmd("HINCRBYFLOAT")
                .arg(key_name(d.key_id))
                .arg("spent")
                .arg(cost)
                .ignore();
        }
        let row = usage_name(d);
        p.cmd("HINCRBY").arg(&row).arg("requests").arg(d.requests).ignore();
        p.cmd("HINCRBY")
            .arg(&row)
            .arg("prompt_tokens")
            .arg(d.prompt_tokens)
            .ignore();
        p.cmd("HINCRBY")
            .arg(&row)
            .arg("completion_tokens")
            .arg(d.completion_tokens)
            .ignore();
        p.cmd("HINCRBYFLOAT").arg(&row).arg("cost").arg(cost).ignore();
        p.cmd("HSET")
            .arg(&row)
            .arg("key_id")
            .arg(d.key_id)
            .arg("model")
            .arg(&d.model)
            .arg("day")
            .arg(&d.day)
            .arg("counted")
            .arg(u8::from(d.counted))
            .ignore();
        p.cmd("SADD").arg(USAGE_ROWS).arg(&row).ignore();
    }
    match redis
        .run(|mut c| async move { p.query_async::<()>(&mut c).await })
        .await
    {
        Ok(()) => {
            if failing.swap(false, Ordering::Relaxed) {
                tracing::info!(redis = %redis.url(), "usage rows are written to Redis again");
            }
        }
        Err(e) => {
            let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
            let kept = MAX_PENDING_USAGE.saturating_sub(pending.len()).min(rows.len());
            let lost = rows.len() - kept;
            let newer = std::mem::replace(&mut *pending, rows);
            pending.truncate(kept);
            pending.extend(newer);
            drop(pending);
            if lost > 0 {
                tracing::error!(redis = %redis.url(), lost, error = %e, "usage rows lost: Redis takes none and the buffer is full");
            } else if !failing.swap(true, Ordering::Relaxed) {
                tracing::warn!(redis = %redis.url(), rows = kept, error = %e, "usage rows not written to Redis; kept to try again");
            }
        }
    }
}
