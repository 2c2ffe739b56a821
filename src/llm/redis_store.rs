//! Virtual keys, their limits and usage in Redis (`[llm] database = "redis://…"`), shared by every instance that
//! names the same server: a key issued or revoked through any of them works or stops on all, a key's limits count
//! the requests and tokens of all, and `GET /api/llm/usage` on any shows the usage of all. One Redis server (or a
//! primary with replicas behind one address), not Redis Cluster: the scripts name keys of their own.
//!
//! What Redis holds (every name starts with `wsgate:llm:`):
//!
//! | name | type | what |
//! |---|---|---|
//! | `next-key-id` | counter | the last key id issued |
//! | `keys` | sorted set | the key ids |
//! | `key:{id}` | hash | `owner`, `models` (JSON), `hint`, `hash` (hex SHA-256), `created`, `rpm`, `tpm`, `tpd`, `budget` (limits, absent when none), `revoked` (unix second, absent while live), `spent` |
//! | `by-hash:{sha256 hex}` | string | the id of the key with that hash |
//! | `rpm:{id}:{second}`, `tpm:{id}:{second}` | counter | requests and tokens of one second of Redis's clock (expire after 61 s) |
//! | `tpd:{id}:{day}` | counter | tokens of a UTC day (expires after 3 days) |
//! | `usage:{day}:{id}:{counted}:{model}` | hash | a usage row: `requests`, `prompt_tokens`, `completion_tokens`, `cost`, and `key_id`, `model`, `day`, `counted` |
//! | `usage-days`, `usage-rows:{day}` | set | the days with usage, and the usage rows of each |
//! | `batch:{id}` | string | a batch of usage applied (kept an hour: a batch sent again after its answer was lost is applied once) |
//!
//! A request is admitted by one script (one round trip): it reads the key's limits, revocation and spending, sums
//! the last 60 seconds' counters, and counts the request. Usage is written as on SQLite, in batches at least every
//! [`USAGE_BATCH_WAIT`]: rows of the same key, model, day and origin merged, at most [`BATCH_ROWS`] to a script
//! call that applies a batch once. A batch Redis does not answer is kept and sent again, with the same id.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

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
const USAGE_DAYS: &str = "wsgate:llm:usage-days";
/// How long usage rows wait to be written together, at most.
const USAGE_BATCH_WAIT: Duration = Duration::from_millis(200);
/// Usage rows (merged) one script call applies at most.
const BATCH_ROWS: usize = 500;
/// Reads one pipeline makes at most (listing usage).
const READS_PER_PIPELINE: usize = 1000;
/// How long closing waits for the last usage rows to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// Admits a request, or says which limit stops it. KEYS: the key's hash, its day's token count. ARGV: the key id;
/// `1` to count a request (its RPM limit applies), `0` to check tokens and budget only. Returns `{verdict, seconds
/// to wait, spent}`.
const ADMIT: &str = r"
local now = tonumber(redis.call('TIME')[1])
local id = ARGV[1]
local counting = ARGV[2] == '1'
local k = redis.call('HMGET', KEYS[1], 'owner', 'revoked', 'rpm', 'tpm', 'tpd', 'budget', 'spent')
if not k[1] then return {'unknown', 0, '0'} end
local spent = tonumber(k[7] or '0')
if k[2] then return {'revoked', 0, tostring(spent)} end
local function window(kind)
  local names = {}
  for i = 1, 60 do names[i] = 'wsgate:llm:' .. kind .. ':' .. id .. ':' .. (now - 60 + i) end
  local values = redis.call('MGET', unpack(names))
  local items, sum = {}, 0
  for i = 1, 60 do
    local n = tonumber(values[i])
    if n then
      sum = sum + n
      items[#items + 1] = {now - 60 + i, n}
    end
  end
  return sum, items
end
local function wait(items, sum, limit)
  for _, item in ipairs(items) do
    sum = sum - item[2]
    if sum < limit then return 60 - (now - item[1]) end
  end
  return 60
end
if counting and k[3] then
  local rpm = tonumber(k[3])
  local sum, items = window('rpm')
  if sum >= rpm then return {'rpm', wait(items, sum, rpm), tostring(spent)} end
end
if k[4] then
  local tpm = tonumber(k[4])
  local sum, items = window('tpm')
  if sum >= tpm then return {'tpm', wait(items, sum, tpm), tostring(spent)} end
end
if k[5] and tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(k[5]) then
  return {'tpd', 0, tostring(spent)}
end
if k[6] and spent >= tonumber(k[6]) then return {'budget', 0, tostring(spent)} end
if counting and k[3] then
  local name = 'wsgate:llm:rpm:' .. id .. ':' .. now
  redis.call('INCR', name)
  redis.call('EXPIRE', name, 61)
end
return {'ok', 0, tostring(spent)}
";

/// Applies a batch of usage once. KEYS: the batch's marker. ARGV: eight per row: key id, day, counted (0 or 1),
/// model, requests, prompt tokens, completion tokens, cost. Returns -1 when the batch was applied already, else
/// how many of its commands Redis refused (a row it holds that is not what wsgate wrote; the others are applied).
const APPLY: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 3600) then return -1 end
local now = redis.call('TIME')[1]
local refused = 0
local function call(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then refused = refused + 1 end
end
for i = 1, #ARGV, 8 do
  local id, day, counted, model = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local tokens = tonumber(ARGV[i + 5]) + tonumber(ARGV[i + 6])
  if tokens > 0 then
    local tpm = 'wsgate:llm:tpm:' .. id .. ':' .. now
    call('INCRBY', tpm, tokens)
    call('EXPIRE', tpm, 61)
    local tpd = 'wsgate:llm:tpd:' .. id .. ':' .. day
    call('INCRBY', tpd, tokens)
    call('EXPIRE', tpd, 259200)
  end
  if tonumber(ARGV[i + 7]) > 0 then call('HINCRBYFLOAT', 'wsgate:llm:key:' .. id, 'spent', ARGV[i + 7]) end
  local row = 'wsgate:llm:usage:' .. day .. ':' .. id .. ':' .. counted .. ':' .. model
  call('HINCRBY', row, 'requests', ARGV[i + 4])
  call('HINCRBY', row, 'prompt_tokens', ARGV[i + 5])
  call('HINCRBY', row, 'completion_tokens', ARGV[i + 6])
  call('HINCRBYFLOAT', row, 'cost', ARGV[i + 7])
  call('HSET', row, 'key_id', id, 'model', model, 'day', day, 'counted', counted)
  call('SADD', 'wsgate:llm:usage-rows:' .. day, row)
  call('SADD', 'wsgate:llm:usage-days', day)
end
return refused
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

/// What the handles share with the usage writer: dropped with the last handle, it stops the writer (after its
/// last batch), and with it the Redis client's thread.
struct Writer {
    stop: Arc<Notify>,
    // A plain mutex: taken once, at close.
    #[allow(clippy::disallowed_types)]
    done: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.notify_one();
    }
}

/// A handle on the keys and usage in Redis.
#[derive(Clone)]
pub struct RedisDb {
    redis: Redis,
    /// The URL as configured (with its password): another one, on a reload, is another database.
    url: Arc<str>,
    pending: Arc<Pending>,
    writer: Arc<Writer>,
    admit: Arc<Script>,
    revoke: Arc<Script>,
    apply: Arc<Script>,
}

impl RedisDb {
    /// A client for the server at `url`, with its usage writer; it connects on first use.
    pub fn open(url: &str) -> Result<RedisDb, DbError> {
        let redis = Redis::open(url)?;
        let pending = Arc::new(Pending::default());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(Notify::new());
        let writer = Arc::new(Writer {
            stop: stop.clone(),
            #[allow(clippy::disallowed_types)]
            done: std::sync::Mutex::new(Some(done_rx)),
        });
        let mut usage = UsageWriter {
            redis: redis.clone(),
            script: Arc::new(Script::new(APPLY)),
            queue: VecDeque::new(),
            failing: false,
        };
        let rows = pending.clone();
        redis.spawn(async move {
            loop {
                let last = tokio::select! {
                    () = tokio::time::sleep(USAGE_BATCH_WAIT) => false,
                    () = stop.notified() => true,
                };
                let new = std::mem::take(&mut *rows.lock().unwrap_or_else(PoisonError::into_inner));
                usage.write(new, last).await;
                if last {
                    break;
                }
            }
            let _ = done_tx.send(());
        });
        Ok(RedisDb {
            redis,
            url: url.into(),
            pending,
            writer,
            admit: Arc::new(Script::new(ADMIT)),
            revoke: Arc::new(Script::new(REVOKE)),
            apply: Arc::new(Script::new(APPLY)),
        })
    }

    /// Writes one usage row at once (a batch of its own); the row back when Redis does not take it.
    pub async fn record_now(&self, row: UsageDelta) -> Result<(), Box<UsageDelta>> {
        let batch = batch(std::slice::from_ref(&row));
        match apply(&self.redis, &self.apply, &batch).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(redis = %self.redis.url(), error = %e, "a usage row not written to Redis at once; queued");
                Err(Box::new(row))
            }
        }
    }

    /// Whether this is the server at `url` (as configured, password included).
    pub fn is(&self, url: &str) -> bool {
        *self.url == *url
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
                    .key(format!("{PREFIX}tpd:{id}:{day}"))
                    .arg(id)
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
    /// Only the days asked for are read, a thousand rows to a round trip.
    pub async fn usage(&self, filter: UsageFilter) -> Result<Vec<UsageRow>, DbError> {
        for day in [&filter.from_day, &filter.to_day].into_iter().flatten() {
            store::check_day(day)?;
        }
        let days: Vec<String> = self
            .redis
            .run(|mut c| async move { cmd("SMEMBERS").arg(USAGE_DAYS).query_async(&mut c).await })
            .await?;
        let days: Vec<String> = days
            .into_iter()
            .filter(|d| filter.from_day.as_ref().is_none_or(|from| d >= from))
            .filter(|d| filter.to_day.as_ref().is_none_or(|to| d <= to))
            .collect();
        let mut names: Vec<String> = Vec::new();
        for days in days.chunks(READS_PER_PIPELINE) {
            let mut p = pipe();
            for day in days {
                p.cmd("SMEMBERS").arg(format!("{PREFIX}usage-rows:{day}"));
            }
            let rows: Vec<Vec<String>> = self.pipeline(p).await?;
            names.extend(rows.into_iter().flatten());
        }
        let mut all: Vec<HashMap<String, String>> = Vec::with_capacity(names.len());
        for chunk in names.chunks(READS_PER_PIPELINE) {
            let mut p = pipe();
            for name in chunk {
                p.cmd("HGETALL").arg(name);
            }
            let read: Vec<HashMap<String, String>> = self.pipeline(p).await?;
            all.extend(read);
        }
        let mut rows = Vec::new();
        for (name, fields) in names.iter().zip(&all) {
            if fields.is_empty() {
                continue;
            }
            let row = self.usage_row(name, fields)?;
            let wanted = filter.key_id.is_none_or(|id| id == row.key_id)
                && filter.model.as_ref().is_none_or(|m| *m == row.model);
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

/// The usage writer: merges the rows billed since its last turn into batches, and applies them in order, each once.
struct UsageWriter {
    redis: Redis,
    script: Arc<Script>,
    /// Batches not applied yet, oldest first: one Redis did not answer is sent again, with the same id.
    queue: VecDeque<Batch>,
    /// Redis took nothing the last time (logged once until it takes a batch again).
    failing: bool,
}

/// Usage rows applied together, once (by their batch id).
struct Batch {
    id: String,
    rows: usize,
    args: Vec<String>,
}

impl UsageWriter {
    /// Queues `rows` and applies what is queued, until Redis fails to take a batch; `last`: at shutdown, when what
    /// is not applied now is lost.
    async fn write(&mut self, rows: Vec<UsageDelta>, last: bool) {
        for chunk in merge(rows).chunks(BATCH_ROWS) {
            self.queue.push_back(batch(chunk));
        }
        let mut queued: usize = self.queue.iter().map(|b| b.rows).sum();
        while queued > MAX_PENDING_USAGE
            && let Some(oldest) = self.queue.pop_front()
        {
            queued -= oldest.rows;
            tracing::error!(redis = %self.redis.url(), lost = oldest.rows, "usage rows lost: Redis has not taken them for long, and the buffer is full");
        }
        while let Some(batch) = self.queue.front() {
            match apply(&self.redis, &self.script, batch).await {
                Ok(refused) => {
                    if refused > 0 {
                        tracing::warn!(redis = %self.redis.url(), refused, "Redis refused some usage commands (a key of wsgate:llm: holds something else)");
                    }
                    queued -= batch.rows;
                    self.queue.pop_front();
                    if std::mem::take(&mut self.failing) {
                        tracing::info!(redis = %self.redis.url(), "usage rows are written to Redis again");
                    }
                }
                Err(e) if last => {
                    tracing::error!(redis = %self.redis.url(), lost = queued, error = %e, "usage rows lost: Redis did not take them at shutdown");
                    return;
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.failing, true) {
                        tracing::warn!(redis = %self.redis.url(), rows = queued, error = %e, "usage rows not written to Redis; kept to try again");
                    }
                    return;
                }
            }
        }
    }
}

/// Applies a batch (once, by its id): how many of its commands Redis refused (-1: it was applied already).
async fn apply(redis: &Redis, script: &Arc<Script>, batch: &Batch) -> Result<i64, RedisError> {
    let script = script.clone();
    let marker = format!("{PREFIX}batch:{}", batch.id);
    let args = batch.args.clone();
    redis
        .run(|mut c| async move { script.key(marker).arg(args).invoke_async(&mut c).await })
        .await
}

/// Rows of the same key, model, day and origin added up.
fn merge(rows: Vec<UsageDelta>) -> Vec<UsageDelta> {
    let mut merged: HashMap<(i64, String, bool, String), UsageDelta> = HashMap::new();
    for row in rows {
        let key = (row.key_id, row.day.clone(), row.counted, row.model.clone());
        match merged.get_mut(&key) {
            Some(sum) => {
                sum.requests = sum.requests.saturating_add(row.requests);
                sum.prompt_tokens = sum.prompt_tokens.saturating_add(row.prompt_tokens);
                sum.completion_tokens = sum.completion_tokens.saturating_add(row.completion_tokens);
                sum.cost += clean_cost(row.cost);
            }
            None => {
                merged.insert(
                    key,
                    UsageDelta {
                        cost: clean_cost(row.cost),
                        ..row
                    },
                );
            }
        }
    }
    merged.into_values().collect()
}

fn clean_cost(cost: f64) -> f64 {
    if cost.is_finite() && cost > 0.0 { cost } else { 0.0 }
}

/// A batch of rows with an id of its own (random: unique among the instances sharing the server).
fn batch(rows: &[UsageDelta]) -> Batch {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        // No random bytes: the time and a counter are unique enough on this instance, with the pid among them.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id[..8].copy_from_slice(&(t as u64 ^ u64::from(std::process::id())).to_le_bytes());
        id[8..].copy_from_slice(&n.to_le_bytes());
    }
    let mut args = Vec::with_capacity(rows.len() * 8);
    for row in rows {
        args.extend([
            row.key_id.to_string(),
            row.day.clone(),
            u8::from(row.counted).to_string(),
            row.model.clone(),
            row.requests.to_string(),
            row.prompt_tokens.to_string(),
            row.completion_tokens.to_string(),
            row.cost.to_string(),
        ]);
    }
    Batch {
        id: id.iter().map(|b| format!("{b:02x}")).collect(),
        rows: rows.len(),
        args,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private `redis-server` (installed by `scripts/test`) on a free port, killed when dropped.
    struct Server(std::process::Child, u16);

    impl Server {
        async fn start() -> Server {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (scripts/test installs it)");
            let server = Server(child, port);
            for _ in 0..500 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("redis-server did not start");
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn row(key_id: i64, model: &str, prompt: u64, cost: f64) -> UsageDelta {
        UsageDelta {
            key_id,
            model: model.into(),
            day: "2026-12-06".into(),
            counted: false,
            requests: 1,
            prompt_tokens: prompt,
            completion_tokens: 2,
            cost,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_applied_once_and_a_bad_row_costs_no_other_row() {
        let server = Server::start().await;
        let redis = Redis::open(&format!("redis://127.0.0.1:{}/0", server.1)).unwrap();
        let script = Arc::new(Script::new(APPLY));
        // Rows of one key, model and day are merged; a bad cost counts as none.
        let merged = merge(vec![
            row(1, "tiny", 5, 0.5),
            row(1, "tiny", 7, f64::NAN),
            row(2, "tiny", 1, 0.25),
        ]);
        assert_eq!(merged.len(), 2);
        let first = batch(&merged);
        assert_eq!(apply(&redis, &script, &first).await.unwrap(), 0);
        // Sent again (its answer lost, say): not applied twice.
        assert_eq!(apply(&redis, &script, &first).await.unwrap(), -1);
        let read = |name: &'static str| {
            let redis = redis.clone();
            async move {
                redis
                    .run(|mut c| async move {
                        cmd("HGETALL")
                            .arg(name)
                            .query_async::<HashMap<String, String>>(&mut c)
                            .await
                    })
                    .await
                    .unwrap()
            }
        };
        let one = read("wsgate:llm:usage:2026-12-06:1:0:tiny").await;
        assert_eq!(one["requests"], "2");
        assert_eq!(one["prompt_tokens"], "12");
        assert_eq!(one["completion_tokens"], "4");
        assert_eq!(one["cost"].parse::<f64>().unwrap(), 0.5);
        assert_eq!(read("wsgate:llm:key:2").await["spent"].parse::<f64>().unwrap(), 0.25);

        // Key 3's spending is held as something else: its commands are refused, the other rows applied.
        redis
            .run(|mut c| async move {
                cmd("SET")
                    .arg("wsgate:llm:key:3")
                    .arg("x")
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .unwrap();
        let mixed = batch(&[row(3, "tiny", 1, 1.0), row(4, "tiny", 1, 1.0)]);
        assert_eq!(apply(&redis, &script, &mixed).await.unwrap(), 1);
        assert_eq!(read("wsgate:llm:key:4").await["spent"], "1");
        assert_eq!(read("wsgate:llm:usage:2026-12-06:3:0:tiny").await["requests"], "1");
    }
}
