//! Virtual keys and usage, in SQLite: the keys wsgate issues to LLM clients (only a SHA-256 of each is kept, with
//! its owner, models and limits) and the requests, tokens and cost each key used per model and day.
//!
//! The store is blocking: the gateway runs it on a thread of its own. The file is in WAL mode with a busy timeout,
//! so `wsgate llm-key` and a running gateway can use it at the same time, each seeing the other's writes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params};
use sha2::{Digest, Sha256};

/// What every key wsgate issues starts with.
pub const KEY_PREFIX: &str = "sk-wsg-";
/// The longest owner a key may have, in characters.
pub const MAX_OWNER_CHARS: usize = 200;
/// The schema this build creates and reads (`PRAGMA user_version`). A file with another version is refused rather
/// than rewritten: a newer wsgate may have written it.
pub const SCHEMA_VERSION: i32 = 1;
/// Marks the file as a wsgate store (`PRAGMA application_id`, "wsgt" in ASCII).
const APPLICATION_ID: i32 = 0x7773_6774;
/// How long a statement waits for a lock another process holds (the CLI beside a running gateway).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys and usage. `keys.hash` is the SHA-256 of the key (unique, so indexed); `models` a JSON array of model names
/// (empty: every model); `revoked` the unix second of the revocation, NULL while the key is live. Usage rows add
/// up per key, model, UTC day and whether wsgate counted the tokens itself (`counted`) or the provider reported
/// them. Key ids are never reused (AUTOINCREMENT), as usage rows refer to them.
const SCHEMA: &str = "
CREATE TABLE keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    hint TEXT NOT NULL,
    owner TEXT NOT NULL,
    models TEXT NOT NULL,
    requests_per_minute INTEGER,
    tokens_per_minute INTEGER,
    tokens_per_day INTEGER,
    budget REAL,
    created INTEGER NOT NULL,
    revoked INTEGER
);
CREATE TABLE usage (
    key_id INTEGER NOT NULL REFERENCES keys (id),
    model TEXT NOT NULL,
    day TEXT NOT NULL,
    counted INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    PRIMARY KEY (key_id, model, day, counted)
) WITHOUT ROWID;
CREATE INDEX usage_by_day ON usage (day);
";

const KEY_COLUMNS: &str = "id, owner, models, requests_per_minute, tokens_per_minute, tokens_per_day, budget, hint, \
                           created, revoked IS NOT NULL";

/// Why the store failed. Errors about the file name it; errors about what was asked say what is wrong with it.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    #[error("{}: the directory {} does not exist", .path.display(), .dir.display())]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("{}: is a directory, not a key store file", .path.display())]
    IsDirectory { path: PathBuf },
    #[error("{}: not an SQLite database", .path.display())]
    NotADatabase { path: PathBuf },
    #[error("{}: an SQLite database, but not a wsgate key store", .path.display())]
    NotAStore { path: PathBuf },
    #[error(
        "{}: schema version {found}, which this wsgate does not know (it uses version {SCHEMA_VERSION}); \
         was the file written by a newer wsgate?",
        .path.display()
    )]
    UnknownSchema { path: PathBuf, found: i32 },
    #[error("{}: cannot use WAL mode (the journal mode stayed {mode:?})", .path.display())]
    NoWal { path: PathBuf, mode: String },
    #[error("{}: {context}: {error}", .path.display())]
    Sqlite {
        path: PathBuf,
        context: &'static str,
        error: rusqlite::Error,
    },
    #[error("{}: {detail}", .path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("{}: no key {id}", .path.display())]
    UnknownKey { path: PathBuf, id: i64 },
    #[error("no random bytes for a new key: {0}")]
    Random(getrandom::Error),
    #[error("the owner is empty")]
    EmptyOwner,
    #[error("the owner is {0} characters long; at most {MAX_OWNER_CHARS} are allowed")]
    OwnerTooLong(usize),
    #[error("the owner has a control character")]
    OwnerControl,
    #[error("a model name is empty")]
    EmptyModel,
    #[error("{0} must be at least 1 (leave it out for no limit)")]
    ZeroLimit(&'static str),
    #[error("{what} is {value}, more than the store holds (at most {max})", max = i64::MAX)]
    TooLarge { what: &'static str, value: u64 },
    #[error("the budget must be a finite amount above 0 (got {0})")]
    BadBudget(f64),
    #[error("the cost must be a finite amount, 0 or more (got {0})")]
    BadCost(f64),
    #[error("{0:?} is not a day (YYYY-MM-DD)")]
    BadDay(String),
}

impl StoreError {
    /// Whether the request was wrong (a bad owner, limit, budget, cost or day), not the file.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::EmptyOwner
                | Self::OwnerTooLong(_)
                | Self::OwnerControl
                | Self::EmptyModel
                | Self::ZeroLimit(_)
                | Self::TooLarge { .. }
                | Self::BadBudget(_)
                | Self::BadCost(_)
                | Self::BadDay(_)
        )
    }
}

/// A key to issue. An empty `models` allows every model; a limit left out is no limit.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub owner: String,
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    /// The most the key may spend, over all days, in the unit of the model prices.
    pub budget: Option<f64>,
}

impl NewKey {
    /// Checks what a key is to be issued with, as every store does before it issues one.
    pub fn check(&self) -> Result<(), StoreError> {
        let owner_chars = self.owner.chars().count();
        if owner_chars == 0 {
            return Err(StoreError::EmptyOwner);
        }
        if owner_chars > MAX_OWNER_CHARS {
            return Err(StoreError::OwnerTooLong(owner_chars));
        }
        if self.owner.chars().any(char::is_control) {
            return Err(StoreError::OwnerControl);
        }
        if self.models.iter().any(|m| m.trim().is_empty()) {
            return Err(StoreError::EmptyModel);
        }
        if self.requests_per_minute == Some(0) {
            return Err(StoreError::ZeroLimit("requests_per_minute"));
        }
        limit("tokens_per_minute", self.tokens_per_minute)?;
        limit("tokens_per_day", self.tokens_per_day)?;
        if let Some(budget) = self.budget
            && !(budget.is_finite() && budget > 0.0)
        {
            return Err(StoreError::BadBudget(budget));
        }
        Ok(())
    }
}

/// A key just issued: the only time its secret is seen, as only its hash is stored.
pub struct Issued {
    pub id: i64,
    pub key: String,
}

/// Shows the key's hint, not the key, so that a debug print does not leak it.
impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("id", &self.id)
            .field("key", &hint(&self.key))
            .finish()
    }
}

/// A stored key, without its secret.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyRecord {
    pub id: i64,
    pub owner: String,
    /// The models the key may use; empty: every model.
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub budget: Option<f64>,
    /// `sk-wsg-…` and the last 4 characters of the key, to tell keys apart.
    pub hint: String,
    /// When the key was issued, in unix seconds.
    pub created: u64,
    pub revoked: bool,
}

/// Usage to add to a key's row for a model and day.
#[derive(Clone, Debug)]
pub struct UsageDelta {
    pub key_id: i64,
    pub model: String,
    /// The UTC day, `YYYY-MM-DD` (see [`day_of`]).
    pub day: String,
    /// The tokens were counted by wsgate, not reported by the provider.
    pub counted: bool,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
}

/// Which usage rows to read; each field left out matches every row. Days are inclusive.
#[derive(Clone, Debug, Default)]
pub struct UsageFilter {
    pub key_id: Option<i64>,
    pub owner: Option<String>,
    pub model: Option<String>,
    pub from_day: Option<String>,
    pub to_day: Option<String>,
}

/// One key's usage of one model on one day, counted or reported.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UsageRow {
    pub key_id: i64,
    pub owner: String,
    pub model: String,
    pub day: String,
    pub counted: bool,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
}

/// An open store file.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// A key row as SQLite gives it, checked into a [`KeyRecord`] by [`Store::record`].
struct RawKey {
    id: i64,
    owner: String,
    models: String,
    requests_per_minute: Option<i64>,
    tokens_per_minute: Option<i64>,
    tokens_per_day: Option<i64>,
    budget: Option<f64>,
    hint: String,
    created: i64,
    revoked: bool,
}

impl RawKey {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawKey> {
        Ok(RawKey {
            id: row.get(0)?,
            owner: row.get(1)?,
            models: row.get(2)?,
            requests_per_minute: row.get(3)?,
            tokens_per_minute: row.get(4)?,
            tokens_per_day: row.get(5)?,
            budget: row.get(6)?,
            hint: row.get(7)?,
            created: row.get(8)?,
            revoked: row.get(9)?,
        })
    }
}

/// A usage row as SQLite gives it, checked into a [`UsageRow`] by [`Store::usage`].
struct RawUsage {
    key_id: i64,
    owner: String,
    model: String,
    day: String,
    counted: bool,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost: f64,
}

impl Store {
    /// Opens the store at `path`, creating the file and its schema when missing (its directory must exist). A file
    /// that is not SQLite, an SQLite file of something else, or a schema version this build does not know is
    /// refused before anything in it is changed.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if path.is_dir() {
            return Err(StoreError::IsDirectory { path: path.into() });
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(StoreError::NoDirectory {
                path: path.into(),
                dir: dir.into(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite_error(path, "cannot open it"))?;
        let store = Store {
            conn,
            path: path.into(),
        };
        store
            .conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(store.sqlite("cannot set the busy timeout"))?;
        let fresh = store.check_schema()?;
        let mode: String = store
            .conn
            .pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))
            .map_err(store.sqlite("cannot switch it to WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path: store.path, mode });
        }
        // With WAL, NORMAL keeps the file consistent on a crash and saves a sync per transaction.
        store
            .conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(store.sqlite("cannot set synchronous"))?;
        store
            .conn
            .pragma_update(None, "foreign_keys", true)
            .map_err(store.sqlite("cannot enable foreign keys"))?;
        if fresh {
            store.create_schema()?;
        }
        Ok(store)
    }

    /// The file the store is in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Issues a key: random, returned once in [`Issued`]; only its SHA-256 and a hint are stored.
    pub fn add_key(&self, new: &NewKey) -> Result<Issued, StoreError> {
        new.check()?;
        let tokens_per_minute = limit("tokens_per_minute", new.tokens_per_minute)?;
        let tokens_per_day = limit("tokens_per_day", new.tokens_per_day)?;
        let models = serde_json::to_string(&new.models).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("cannot write the models as JSON: {e}"),
        })?;
        let key = new_secret()?;
        self.conn
            .execute(
                "INSERT INTO keys (hash, hint, owner, models, requests_per_minute, tokens_per_minute, tokens_per_day, \
                 budget, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    hash_key(&key),
                    hint(&key),
                    new.owner,
                    models,
                    new.requests_per_minute,
                    tokens_per_minute,
                    tokens_per_day,
                    new.budget,
                    unix_now(),
                ],
            )
            .map_err(self.sqlite("cannot add the key"))?;
        Ok(Issued {
            id: self.conn.last_insert_rowid(),
            key,
        })
    }

    /// Every key, revoked ones too, by id.
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY id"))
            .map_err(self.sqlite("cannot list the keys"))?;
        let raw = statement
            .query_map([], RawKey::from_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(self.sqlite("cannot list the keys"))?;
        raw.into_iter().map(|raw| self.record(raw)).collect()
    }

    /// The key with this id, if any.
    pub fn key(&self, id: i64) -> Result<Option<KeyRecord>, StoreError> {
        let raw = self
            .conn
            .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"))
            .and_then(|mut statement| statement.query_row([id], RawKey::from_row).optional())
            .map_err(self.sqlite("cannot read the key"))?;
        raw.map(|raw| self.record(raw)).transpose()
    }

    /// Revokes a key: it is kept (with its usage) but marked revoked. False when there is no such key or it was
    /// revoked already.
    pub fn revoke(&self, id: i64) -> Result<bool, StoreError> {
        let changed = self
            .conn
            .execute(
                "UPDATE keys SET revoked = ?1 WHERE id = ?2 AND revoked IS NULL",
                params![unix_now(), id],
            )
            .map_err(self.sqlite("cannot revoke the key"))?;
        Ok(changed == 1)
    }

    /// The key whose secret this is, found by its SHA-256 (an index lookup compares hashes, so its timing tells
    /// nothing about keys). A revoked key is returned too, with `revoked` set, so that the caller can say so.
    pub fn find_key(&self, secret: &str) -> Result<Option<KeyRecord>, StoreError> {
        let raw = self
            .conn
            .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE hash = ?1"))
            .and_then(|mut statement| statement.query_row([hash_key(secret)], RawKey::from_row).optional())
            .map_err(self.sqlite("cannot look the key up"))?;
        raw.map(|raw| self.record(raw)).transpose()
    }

    /// Adds usage to the rows of (key, model, day, counted), creating them when missing, all in one transaction:
    /// either every delta is recorded or none is. Revoked keys still take usage (requests that were under way).
    pub fn record_usage(&self, rows: &[UsageDelta]) -> Result<(), StoreError> {
        let mut checked = Vec::with_capacity(rows.len());
        for row in rows {
            check_day(&row.day)?;
            if !(row.cost.is_finite() && row.cost >= 0.0) {
                return Err(StoreError::BadCost(row.cost));
            }
            checked.push((
                to_i64("requests", row.requests)?,
                to_i64("prompt_tokens", row.prompt_tokens)?,
                to_i64("completion_tokens", row.completion_tokens)?,
            ));
        }
        if rows.is_empty() {
            return Ok(());
        }
        // IMMEDIATE takes the write lock up front, so the busy timeout applies instead of a failed lock upgrade.
        let transaction = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(self.sqlite("cannot start recording usage"))?;
        {
            let mut exists = transaction
                .prepare_cached("SELECT 1 FROM keys WHERE id = ?1")
                .map_err(self.sqlite("cannot record usage"))?;
            let mut upsert = transaction
                .prepare_cached(
                    "INSERT INTO usage (key_id, model, day, counted, requests, prompt_tokens, completion_tokens, cost) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT (key_id, model, day, counted) DO UPDATE SET \
                     requests = requests + excluded.requests, \
                     prompt_tokens = prompt_tokens + excluded.prompt_tokens, \
                     completion_tokens = completion_tokens + excluded.completion_tokens, \
                     cost = cost + excluded.cost",
                )
                .map_err(self.sqlite("cannot record usage"))?;
            for (row, (requests, prompt, completion)) in rows.iter().zip(checked) {
                if !exists
                    .exists([row.key_id])
                    .map_err(self.sqlite("cannot record usage"))?
                {
                    return Err(StoreError::UnknownKey {
                        path: self.path.clone(),
                        id: row.key_id,
                    });
                }
                upsert
                    .execute(params![
                        row.key_id,
                        row.model,
                        row.day,
                        row.counted,
                        requests,
                        prompt,
                        completion,
                        row.cost
                    ])
                    .map_err(self.sqlite("cannot record usage"))?;
            }
        }
        transaction.commit().map_err(self.sqlite("cannot save the usage"))
    }

    /// The usage rows the filter matches, by day, key, model (reported before counted), with each key's owner.
    pub fn usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRow>, StoreError> {
        let mut sql = String::from(
            "SELECT u.key_id, k.owner, u.model, u.day, u.counted, u.requests, u.prompt_tokens, u.completion_tokens, \
             u.cost FROM usage u JOIN keys k ON k.id = u.key_id WHERE 1 = 1",
        );
        let mut args: Vec<Value> = Vec::new();
        if let Some(id) = filter.key_id {
            sql.push_str(" AND u.key_id = ?");
            args.push(Value::Integer(id));
        }
        if let Some(owner) = &filter.owner {
            sql.push_str(" AND k.owner = ?");
            args.push(Value::Text(owner.clone()));
        }
        if let Some(model) = &filter.model {
            sql.push_str(" AND u.model = ?");
            args.push(Value::Text(model.clone()));
        }
        if let Some(day) = &filter.from_day {
            check_day(day)?;
            sql.push_str(" AND u.day >= ?");
            args.push(Value::Text(day.clone()));
        }
        if let Some(day) = &filter.to_day {
            check_day(day)?;
            sql.push_str(" AND u.day <= ?");
            args.push(Value::Text(day.clone()));
        }
        sql.push_str(" ORDER BY u.day, u.key_id, u.model, u.counted");
        let mut statement = self.conn.prepare(&sql).map_err(self.sqlite("cannot read usage"))?;
        let raw = statement
            .query_map(rusqlite::params_from_iter(args), |row| {
                Ok(RawUsage {
                    key_id: row.get(0)?,
                    owner: row.get(1)?,
                    model: row.get(2)?,
                    day: row.get(3)?,
                    counted: row.get(4)?,
                    requests: row.get(5)?,
                    prompt_tokens: row.get(6)?,
                    completion_tokens: row.get(7)?,
                    cost: row.get(8)?,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(self.sqlite("cannot read usage"))?;
        raw.into_iter()
            .map(|raw| {
                Ok(UsageRow {
                    requests: self.unsigned(&format!("usage of key {}: requests", raw.key_id), raw.requests)?,
                    prompt_tokens: self.unsigned(
                        &format!("usage of key {}: prompt_tokens", raw.key_id),
                        raw.prompt_tokens,
                    )?,
                    completion_tokens: self.unsigned(
                        &format!("usage of key {}: completion_tokens", raw.key_id),
                        raw.completion_tokens,
                    )?,
                    key_id: raw.key_id,
                    owner: raw.owner,
                    model: raw.model,
                    day: raw.day,
                    counted: raw.counted,
                    cost: raw.cost,
                })
            })
            .collect()
    }

    /// What the key has spent, over all days (0 without usage).
    pub fn spent(&self, key_id: i64) -> Result<f64, StoreError> {
        self.conn
            .prepare_cached("SELECT COALESCE(SUM(cost), 0.0) FROM usage WHERE key_id = ?1")
            .and_then(|mut statement| statement.query_row([key_id], |row| row.get(0)))
            .map_err(self.sqlite("cannot sum the key's cost"))
    }

    /// The tokens (prompt and completion, counted or reported) the key used on `day` (`YYYY-MM-DD`).
    pub fn tokens_on(&self, key_id: i64, day: &str) -> Result<u64, StoreError> {
        check_day(day)?;
        let total: i64 = self
            .conn
            .prepare_cached(
                "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage WHERE key_id = ?1 AND day = ?2",
            )
            .and_then(|mut statement| statement.query_row(params![key_id, day], |row| row.get(0)))
            .map_err(self.sqlite("cannot sum the key's tokens"))?;
        self.unsigned(&format!("key {key_id}: the tokens of {day}"), total)
    }

    /// Checks what is in the file: true when it is new (no schema yet), an error when it is not a store this
    /// build knows. Only reads.
    fn check_schema(&self) -> Result<bool, StoreError> {
        let (version, application, tables): (i32, i32, i64) = self
            .conn
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), \
                 (SELECT application_id FROM pragma_application_id), \
                 (SELECT COUNT(*) FROM sqlite_schema)",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .map_err(self.sqlite("cannot read the schema"))?;
        match version {
            0 if tables == 0 && application == 0 => Ok(true),
            0 => Err(StoreError::NotAStore {
                path: self.path.clone(),
            }),
            SCHEMA_VERSION if application == APPLICATION_ID => Ok(false),
            _ if application != APPLICATION_ID => Err(StoreError::NotAStore {
                path: self.path.clone(),
            }),
            found => Err(StoreError::UnknownSchema {
                path: self.path.clone(),
                found,
            }),
        }
    }

    /// Creates the schema, unless another process did since [`Store::check_schema`].
    fn create_schema(&self) -> Result<(), StoreError> {
        let transaction = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(self.sqlite("cannot create the schema"))?;
        if self.check_schema()? {
            transaction
                .execute_batch(SCHEMA)
                .and_then(|()| transaction.pragma_update(None, "application_id", APPLICATION_ID))
                .and_then(|()| transaction.pragma_update(None, "user_version", SCHEMA_VERSION))
                .map_err(self.sqlite("cannot create the schema"))?;
        }
        transaction.commit().map_err(self.sqlite("cannot create the schema"))
    }

    /// Checks a key row from the file.
    fn record(&self, raw: RawKey) -> Result<KeyRecord, StoreError> {
        let models = serde_json::from_str(&raw.models).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("key {}: the models are not a JSON array of names: {e}", raw.id),
        })?;
        let requests_per_minute = raw
            .requests_per_minute
            .map(|n| {
                u32::try_from(n).map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("key {}: requests_per_minute is {n}", raw.id),
                })
            })
            .transpose()?;
        Ok(KeyRecord {
            id: raw.id,
            owner: raw.owner,
            models,
            requests_per_minute,
            tokens_per_minute: raw
                .tokens_per_minute
                .map(|n| self.unsigned(&format!("key {}: tokens_per_minute", raw.id), n))
                .transpose()?,
            tokens_per_day: raw
                .tokens_per_day
                .map(|n| self.unsigned(&format!("key {}: tokens_per_day", raw.id), n))
                .transpose()?,
            budget: raw.budget,
            hint: raw.hint,
            created: self.unsigned(&format!("key {}: created", raw.id), raw.created)?,
            revoked: raw.revoked,
        })
    }

    /// A count from the file, which must not be negative.
    fn unsigned(&self, what: &str, n: i64) -> Result<u64, StoreError> {
        u64::try_from(n).map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!("{what} is {n}"),
        })
    }

    fn sqlite(&self, context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        sqlite_error(&self.path, context)
    }
}

/// Names the file in an SQLite error; "file is not a database" gets its own error.
fn sqlite_error(path: &Path, context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |error| match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotADatabase { path: path.into() },
        _ => StoreError::Sqlite {
            path: path.into(),
            context,
            error,
        },
    }
}

/// A limit as stored: at least 1 and within SQLite's integers.
fn limit(what: &'static str, value: Option<u64>) -> Result<Option<i64>, StoreError> {
    match value {
        Some(0) => Err(StoreError::ZeroLimit(what)),
        Some(n) => to_i64(what, n).map(Some),
        None => Ok(None),
    }
}

fn to_i64(what: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::TooLarge { what, value })
}

/// A new key: the prefix and 32 random bytes in unpadded base64url (43 characters).
pub(super) fn new_secret() -> Result<String, StoreError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(StoreError::Random)?;
    Ok(format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// `sk-wsg-…` and the last 4 characters of a key.
pub(super) fn hint(key: &str) -> String {
    let tail: Vec<char> = key.chars().rev().take(4).collect();
    let tail: String = tail.into_iter().rev().collect();
    format!("{KEY_PREFIX}…{tail}")
}

pub(super) fn unix_now() -> i64 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// The SHA-256 of a key: what the store keeps and looks keys up by.
pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The UTC day of a time, `YYYY-MM-DD`: what usage rows are kept by.
pub fn day_of(t: SystemTime) -> String {
    let days = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs() / 86_400).unwrap_or(i64::MAX),
        Err(before) => {
            let before = before.duration();
            // A time before 1970 rounds down to the start of its day: -1 s is 1969-12-31.
            let secs = i64::try_from(before.as_secs())
                .unwrap_or(i64::MAX)
                .saturating_add(i64::from(before.subsec_nanos() > 0));
            (-secs).div_euclid(86_400)
        }
    };
    day_of_days(days)
}

/// The day `days` after 1970-01-01 (negative: before).
fn day_of_days(days: i64) -> String {
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Year, month and day of the day `z` after 1970-01-01, in the proleptic Gregorian calendar (Howard Hinnant's
/// `civil_from_days`: eras of 400 years, 146 097 days each, with years starting on March 1 so that the leap day
/// ends them).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], from March
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A day as usage rows keep it: `YYYY-MM-DD`, a real date (so that text order is date order).
pub(super) fn check_day(day: &str) -> Result<(), StoreError> {
    let bytes = day.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = bytes.get(range)?;
        digits
            .iter()
            .try_fold(0u32, |n, &b| b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0')))
    };
    let valid = bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && match (number(0..4), number(5..7), number(8..10)) {
            (Some(year), Some(month), Some(d)) => {
                (1..=12).contains(&month) && d >= 1 && d <= days_in_month(year, month)
            }
            _ => false,
        };
    if valid {
        Ok(())
    } else {
        Err(StoreError::BadDay(day.into()))
    }
}

/// The keys as an aligned table, for `wsgate llm-key list`: id, owner, hint, models ("*" for every model), the
/// limits ("-" for none), the UTC day the key was issued and whether it is revoked.
pub fn key_table(keys: &[KeyRecord]) -> String {
    const HEADER: [&str; 10] = [
        "ID", "OWNER", "KEY", "MODELS", "RPM", "TPM", "TPD", "BUDGET", "CREATED", "REVOKED",
    ];
    fn or_dash<T: ToString>(value: Option<T>) -> String {
        value.map_or_else(|| "-".into(), |v| v.to_string())
    }
    // Control characters (none are accepted, but the file is not trusted) would break the lines.
    fn visible(text: &str) -> String {
        text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
    }
    let mut rows: Vec<[String; 10]> = vec![HEADER.map(String::from)];
    for key in keys {
        let models = if key.models.is_empty() {
            "*".to_string()
        } else {
            visible(&key.models.join(","))
        };
        let created = day_of_days(i64::try_from(key.created / 86_400).unwrap_or(i64::MAX));
        rows.push([
            key.id.to_string(),
            visible(&key.owner),
            visible(&key.hint),
            models,
            or_dash(key.requests_per_minute),
            or_dash(key.tokens_per_minute),
            or_dash(key.tokens_per_day),
            or_dash(key.budget),
            created,
            if key.revoked { "yes" } else { "no" }.into(),
        ]);
    }
    let mut widths = [0usize; 10];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A directory of its own for one test, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("wsgate-llm-store-{}-{name}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("keys.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn owner(name: &str) -> NewKey {
        NewKey {
            owner: name.into(),
            ..NewKey::default()
        }
    }

    fn delta(
        key_id: i64,
        model: &str,
        day: &str,
        counted: bool,
        prompt: u64,
        completion: u64,
        cost: f64,
    ) -> UsageDelta {
        UsageDelta {
            key_id,
            model: model.into(),
            day: day.into(),
            counted,
            requests: 1,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost,
        }
    }

    fn at(secs: i64) -> SystemTime {
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    }

    #[test]
    fn keys_survive_reopening() {
        let dir = TempDir::new("reopen");
        let issued = {
            let store = Store::open(&dir.db()).unwrap();
            assert!(store.list_keys().unwrap().is_empty());
            let issued = store
                .add_key(&NewKey {
                    owner: "alice".into(),
                    models: vec!["llama-3".into(), "qwen".into()],
                    requests_per_minute: Some(60),
                    tokens_per_minute: Some(10_000),
                    tokens_per_day: Some(1_000_000),
                    budget: Some(2.5),
                })
                .unwrap();
            store.add_key(&owner("bob")).unwrap();
            issued
        };
        let store = Store::open(&dir.db()).unwrap();
        let keys = store.list_keys().unwrap();
        assert_eq!(keys.len(), 2);
        let alice = &keys[0];
        assert_eq!(alice.id, issued.id);
        assert_eq!(alice.owner, "alice");
        assert_eq!(alice.models, ["llama-3", "qwen"]);
        assert_eq!(alice.requests_per_minute, Some(60));
        assert_eq!(alice.tokens_per_minute, Some(10_000));
        assert_eq!(alice.tokens_per_day, Some(1_000_000));
        assert_eq!(alice.budget, Some(2.5));
        assert!(!alice.revoked);
        let now = u64::try_from(unix_now()).unwrap();
        assert!(alice.created <= now && alice.created + 60 > now);
        assert_eq!(keys[1].owner, "bob");
        assert!(keys[1].models.is_empty());
        assert_eq!(keys[1].requests_per_minute, None);
        assert_eq!(keys[1].budget, None);
        assert_eq!(store.key(issued.id).unwrap().unwrap().owner, "alice");
        assert!(store.key(999).unwrap().is_none());
        assert_eq!(store.find_key(&issued.key).unwrap().unwrap().id, issued.id);
        // A third key after reopening gets a new id.
        assert!(store.add_key(&owner("carol")).unwrap().id > keys[1].id);
    }

    #[test]
    fn keys_have_the_format_and_differ() {
        let dir = TempDir::new("format");
        let store = Store::open(&dir.db()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let issued = store.add_key(&owner("alice")).unwrap();
            let body = issued.key.strip_prefix("sk-wsg-").unwrap();
            assert_eq!(body.len(), 43, "{}", issued.key);
            assert!(
                body.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap().len(), 32);
            let record = store.key(issued.id).unwrap().unwrap();
            assert_eq!(record.hint, format!("sk-wsg-…{}", &body[39..]));
            assert!(!format!("{issued:?}").contains(body), "Debug shows only the hint");
            assert!(seen.insert(issued.key));
        }
    }

    #[test]
    fn only_the_hash_is_stored() {
        let dir = TempDir::new("hash-only");
        let issued = {
            let store = Store::open(&dir.db()).unwrap();
            let issued = store.add_key(&owner("alice")).unwrap();
            store
                .record_usage(&[delta(issued.id, "m", "2025-01-02", false, 1, 2, 0.5)])
                .unwrap();
            issued
        };
        let raw = Connection::open(dir.db()).unwrap();
        let (hash, hint): (Vec<u8>, String) = raw
            .query_row("SELECT hash, hint FROM keys", [], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap();
        assert_eq!(hash, hash_key(&issued.key));
        assert!(!issued.key.contains(&hint));
        let _: (i64, i64, i64) = raw
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .unwrap();
        drop(raw);

        let body = issued.key.strip_prefix("sk-wsg-").unwrap();
        let secret_bytes = URL_SAFE_NO_PAD.decode(body).unwrap();
        let mut files = 0;
        for entry in std::fs::read_dir(&dir.0).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            files += 1;
            let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
            assert!(!contains(issued.key.as_bytes()));
            assert!(!contains(&secret_bytes));
            for window in body.as_bytes().windows(8) {
                assert!(!contains(window), "part of the key is in the file");
            }
            for window in secret_bytes.windows(8) {
                assert!(!contains(window), "part of the key's bytes is in the file");
            }
        }
        assert!(files >= 1);
        let db = std::fs::read(dir.db()).unwrap();
        assert!(
            db.windows(32).any(|w| w == hash_key(&issued.key)),
            "the search does find what is there"
        );
    }

    #[test]
    fn keys_are_found_by_their_secret() {
        let dir = TempDir::new("find");
        let store = Store::open(&dir.db()).unwrap();
        let alice = store.add_key(&owner("alice")).unwrap();
        let bob = store.add_key(&owner("bob")).unwrap();
        assert_eq!(store.find_key(&alice.key).unwrap().unwrap().owner, "alice");
        assert_eq!(store.find_key(&bob.key).unwrap().unwrap().id, bob.id);
        assert!(store.find_key("sk-wsg-nope").unwrap().is_none());
        assert!(store.find_key("").unwrap().is_none());
        let hint = store.key(alice.id).unwrap().unwrap().hint;
        assert!(store.find_key(&hint).unwrap().is_none(), "the hint is not the key");
        let hash: String = hash_key(&alice.key).iter().map(|b| format!("{b:02x}")).collect();
        assert!(store.find_key(&hash).unwrap().is_none(), "the hash is not the key");
    }

    #[test]
    fn revoked_keys_are_found_marked() {
        let dir = TempDir::new("revoke");
        let store = Store::open(&dir.db()).unwrap();
        let alice = store.add_key(&owner("alice")).unwrap();
        let bob = store.add_key(&owner("bob")).unwrap();
        assert!(store.revoke(alice.id).unwrap());
        assert!(!store.revoke(alice.id).unwrap(), "already revoked");
        assert!(!store.revoke(12_345).unwrap(), "no such key");
        assert!(store.find_key(&alice.key).unwrap().unwrap().revoked);
        assert!(store.key(alice.id).unwrap().unwrap().revoked);
        assert!(!store.find_key(&bob.key).unwrap().unwrap().revoked);
        let listed: Vec<bool> = store.list_keys().unwrap().iter().map(|k| k.revoked).collect();
        assert_eq!(listed, [true, false]);
        // Usage of a revoked key (requests under way) is still recorded.
        store
            .record_usage(&[delta(alice.id, "m", "2025-01-01", false, 1, 1, 0.0)])
            .unwrap();
    }

    /// Key, owner, model, day, counted, requests, prompt and completion tokens, cost.
    type Summary<'a> = (i64, &'a str, &'a str, &'a str, bool, u64, u64, u64, f64);

    #[test]
    fn usage_adds_up_per_key_model_day_and_counted() {
        let dir = TempDir::new("usage");
        let store = Store::open(&dir.db()).unwrap();
        let alice = store.add_key(&owner("alice")).unwrap().id;
        let bob = store.add_key(&owner("bob")).unwrap().id;
        store
            .record_usage(&[
                delta(alice, "m1", "2025-03-01", false, 10, 20, 0.25),
                delta(alice, "m1", "2025-03-01", true, 1, 2, 0.5),
                delta(alice, "m2", "2025-03-01", false, 100, 200, 1.0),
                delta(bob, "m1", "2025-03-01", false, 5, 5, 0.125),
            ])
            .unwrap();
        store
            .record_usage(&[
                delta(alice, "m1", "2025-03-01", false, 10, 20, 0.25),
                delta(alice, "m1", "2025-03-02", false, 7, 3, 0.0),
            ])
            .unwrap();
        // In one batch, the same row twice adds up too.
        store
            .record_usage(&[
                delta(alice, "m1", "2025-03-01", true, 1, 2, 0.5),
                delta(alice, "m1", "2025-03-01", true, 1, 2, 0.5),
            ])
            .unwrap();
        store.record_usage(&[]).unwrap();

        let rows = store.usage(&UsageFilter::default()).unwrap();
        let summary: Vec<Summary<'_>> = rows
            .iter()
            .map(|r| {
                (
                    r.key_id,
                    r.owner.as_str(),
                    r.model.as_str(),
                    r.day.as_str(),
                    r.counted,
                    r.requests,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (alice, "alice", "m1", "2025-03-01", false, 2, 20, 40, 0.5),
                (alice, "alice", "m1", "2025-03-01", true, 3, 3, 6, 1.5),
                (alice, "alice", "m2", "2025-03-01", false, 1, 100, 200, 1.0),
                (bob, "bob", "m1", "2025-03-01", false, 1, 5, 5, 0.125),
                (alice, "alice", "m1", "2025-03-02", false, 1, 7, 3, 0.0),
            ]
        );

        assert_eq!(store.spent(alice).unwrap(), 3.0);
        assert_eq!(store.spent(bob).unwrap(), 0.125);
        assert_eq!(store.spent(999).unwrap(), 0.0);
        assert_eq!(store.tokens_on(alice, "2025-03-01").unwrap(), 60 + 9 + 300);
        assert_eq!(store.tokens_on(alice, "2025-03-02").unwrap(), 10);
        assert_eq!(store.tokens_on(alice, "2025-03-03").unwrap(), 0);
        assert_eq!(store.tokens_on(bob, "2025-03-01").unwrap(), 10);
    }

    #[test]
    fn a_bad_delta_records_nothing() {
        let dir = TempDir::new("bad-delta");
        let store = Store::open(&dir.db()).unwrap();
        let alice = store.add_key(&owner("alice")).unwrap().id;
        let good = delta(alice, "m", "2025-01-01", false, 1, 1, 0.5);
        let err = store
            .record_usage(&[good.clone(), delta(alice + 1, "m", "2025-01-01", false, 1, 1, 0.5)])
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownKey { id, .. } if id == alice + 1),
            "{err}"
        );
        assert!(err.to_string().contains("keys.db"), "{err}");
        assert!(matches!(
            store.record_usage(&[good.clone(), delta(alice, "m", "2025-02-30", false, 1, 1, 0.5)]),
            Err(StoreError::BadDay(_))
        ));
        assert!(matches!(
            store.record_usage(&[good.clone(), delta(alice, "m", "2025-01-01", false, 1, 1, f64::NAN)]),
            Err(StoreError::BadCost(_))
        ));
        assert!(matches!(
            store.record_usage(&[good.clone(), delta(alice, "m", "2025-01-01", false, 1, 1, -1.0)]),
            Err(StoreError::BadCost(_))
        ));
        assert!(matches!(
            store.record_usage(&[good, delta(alice, "m", "2025-01-01", false, u64::MAX, 1, 0.0)]),
            Err(StoreError::TooLarge {
                what: "prompt_tokens",
                ..
            })
        ));
        assert!(store.usage(&UsageFilter::default()).unwrap().is_empty());
        assert_eq!(store.spent(alice).unwrap(), 0.0);
    }

    #[test]
    fn usage_filters() {
        let dir = TempDir::new("filters");
        let store = Store::open(&dir.db()).unwrap();
        let alice = store.add_key(&owner("alice")).unwrap().id;
        let alice2 = store.add_key(&owner("alice")).unwrap().id;
        let bob = store.add_key(&owner("bob")).unwrap().id;
        store
            .record_usage(&[
                delta(alice, "m1", "2025-01-30", false, 1, 1, 0.0),
                delta(alice, "m2", "2025-01-31", false, 1, 1, 0.0),
                delta(alice2, "m1", "2025-02-01", false, 1, 1, 0.0),
                delta(bob, "m1", "2025-02-01", true, 1, 1, 0.0),
                delta(bob, "m2", "2025-02-02", false, 1, 1, 0.0),
            ])
            .unwrap();
        let pick = |filter: UsageFilter| -> Vec<(i64, String, String)> {
            store
                .usage(&filter)
                .unwrap()
                .into_iter()
                .map(|r| (r.key_id, r.model, r.day))
                .collect()
        };
        let row = |id: i64, model: &str, day: &str| (id, model.to_string(), day.to_string());
        assert_eq!(
            pick(UsageFilter {
                key_id: Some(bob),
                ..UsageFilter::default()
            }),
            [row(bob, "m1", "2025-02-01"), row(bob, "m2", "2025-02-02")]
        );
        assert_eq!(
            pick(UsageFilter {
                owner: Some("alice".into()),
                ..UsageFilter::default()
            }),
            [
                row(alice, "m1", "2025-01-30"),
                row(alice, "m2", "2025-01-31"),
                row(alice2, "m1", "2025-02-01")
            ]
        );
        assert_eq!(
            pick(UsageFilter {
                model: Some("m2".into()),
                ..UsageFilter::default()
            }),
            [row(alice, "m2", "2025-01-31"), row(bob, "m2", "2025-02-02")]
        );
        assert_eq!(
            pick(UsageFilter {
                from_day: Some("2025-01-31".into()),
                to_day: Some("2025-02-01".into()),
                ..UsageFilter::default()
            }),
            [
                row(alice, "m2", "2025-01-31"),
                row(alice2, "m1", "2025-02-01"),
                row(bob, "m1", "2025-02-01")
            ]
        );
        assert_eq!(
            pick(UsageFilter {
                key_id: Some(bob),
                owner: Some("bob".into()),
                model: Some("m1".into()),
                from_day: Some("2025-02-01".into()),
                to_day: Some("2025-02-01".into()),
            }),
            [row(bob, "m1", "2025-02-01")]
        );
        assert!(
            pick(UsageFilter {
                key_id: Some(alice),
                owner: Some("bob".into()),
                ..UsageFilter::default()
            })
            .is_empty()
        );
        assert!(matches!(
            store.usage(&UsageFilter {
                from_day: Some("2025-1-1".into()),
                ..UsageFilter::default()
            }),
            Err(StoreError::BadDay(_))
        ));
        assert!(matches!(
            store.tokens_on(alice, "yesterday"),
            Err(StoreError::BadDay(_))
        ));
    }

    #[test]
    fn two_stores_on_one_file_see_each_other() {
        let dir = TempDir::new("shared");
        let cli = Store::open(&dir.db()).unwrap();
        let gateway = Store::open(&dir.db()).unwrap();
        let issued = cli.add_key(&owner("alice")).unwrap();
        let found = gateway.find_key(&issued.key).unwrap().unwrap();
        assert_eq!(found.id, issued.id);
        gateway
            .record_usage(&[delta(found.id, "m", "2025-05-05", false, 3, 4, 0.75)])
            .unwrap();
        assert_eq!(cli.spent(issued.id).unwrap(), 0.75);
        assert_eq!(cli.usage(&UsageFilter::default()).unwrap().len(), 1);
        assert!(cli.revoke(issued.id).unwrap());
        assert!(gateway.find_key(&issued.key).unwrap().unwrap().revoked);
        let raw = Connection::open(dir.db()).unwrap();
        let mode: String = raw.query_row("PRAGMA journal_mode", [], |row| row.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn new_keys_are_checked() {
        let dir = TempDir::new("validate");
        let store = Store::open(&dir.db()).unwrap();
        let check = |new: NewKey| store.add_key(&new).unwrap_err();
        assert!(matches!(check(owner("")), StoreError::EmptyOwner));
        assert!(matches!(check(owner(&"é".repeat(201))), StoreError::OwnerTooLong(201)));
        store.add_key(&owner(&"é".repeat(200))).unwrap();
        assert!(matches!(check(owner("a\nb")), StoreError::OwnerControl));
        let with = |f: fn(&mut NewKey)| {
            let mut new = owner("alice");
            f(&mut new);
            new
        };
        let err = check(with(|n| n.requests_per_minute = Some(0)));
        assert_eq!(
            err.to_string(),
            "requests_per_minute must be at least 1 (leave it out for no limit)"
        );
        assert!(matches!(
            check(with(|n| n.tokens_per_minute = Some(0))),
            StoreError::ZeroLimit("tokens_per_minute")
        ));
        assert!(matches!(
            check(with(|n| n.tokens_per_day = Some(0))),
            StoreError::ZeroLimit("tokens_per_day")
        ));
        assert!(matches!(
            check(with(|n| n.tokens_per_day = Some(u64::MAX))),
            StoreError::TooLarge { .. }
        ));
        for budget in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut new = owner("alice");
            new.budget = Some(budget);
            assert!(matches!(check(new), StoreError::BadBudget(_)), "{budget}");
        }
        assert!(matches!(
            check(with(|n| n.models = vec!["a".into(), " ".into()])),
            StoreError::EmptyModel
        ));
        assert_eq!(store.list_keys().unwrap().len(), 1, "nothing else was added");
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_refused() {
        let dir = TempDir::new("not-sqlite");
        let text = "this is a text file, not a database; it is long enough to have an SQLite header\n".repeat(20);
        std::fs::write(dir.db(), &text).unwrap();
        let err = Store::open(&dir.db()).unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("{}: not an SQLite database", dir.db().display())
        );
        assert_eq!(std::fs::read_to_string(dir.db()).unwrap(), text, "left as it was");
    }

    #[test]
    fn another_sqlite_database_is_refused() {
        let dir = TempDir::new("other-db");
        let raw = Connection::open(dir.db()).unwrap();
        raw.execute_batch("CREATE TABLE notes (body TEXT)").unwrap();
        drop(raw);
        let err = Store::open(&dir.db()).unwrap_err();
        assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");
        let raw = Connection::open(dir.db()).unwrap();
        let mode: String = raw.query_row("PRAGMA journal_mode", [], |row| row.get(0)).unwrap();
        assert_eq!(mode, "delete", "not switched to WAL");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = TempDir::new("newer");
        Store::open(&dir.db()).unwrap().add_key(&owner("alice")).unwrap();
        let raw = Connection::open(dir.db()).unwrap();
        raw.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(raw);
        let err = Store::open(&dir.db()).unwrap_err();
        assert!(matches!(err, StoreError::UnknownSchema { found: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("schema version 2"), "{err}");
        assert!(err.to_string().contains("keys.db"), "{err}");
        let raw = Connection::open(dir.db()).unwrap();
        let version: i32 = raw.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
        assert_eq!(version, 2, "not overwritten");
    }

    #[test]
    fn a_missing_directory_is_named() {
        let dir = TempDir::new("no-dir");
        let path = dir.0.join("missing").join("keys.db");
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::NoDirectory { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(matches!(Store::open(&dir.0), Err(StoreError::IsDirectory { .. })));
    }

    #[test]
    fn a_corrupt_row_is_an_error() {
        let dir = TempDir::new("corrupt");
        let store = Store::open(&dir.db()).unwrap();
        let alice = store.add_key(&owner("alice")).unwrap();
        let raw = Connection::open(dir.db()).unwrap();
        raw.execute("UPDATE keys SET models = 'llama'", []).unwrap();
        let err = store.find_key(&alice.key).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        raw.execute("UPDATE keys SET models = '[]', tokens_per_day = -5", [])
            .unwrap();
        let err = store.list_keys().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string()
                .ends_with(&format!("key {}: tokens_per_day is -5", alice.id)),
            "{err}"
        );
        raw.execute("UPDATE keys SET tokens_per_day = 'many'", []).unwrap();
        assert!(matches!(store.key(alice.id), Err(StoreError::Sqlite { .. })));
    }

    #[test]
    fn days_are_utc_civil_dates() {
        for (secs, day) in [
            (0, "1970-01-01"),
            (86_399, "1970-01-01"),
            (86_400, "1970-01-02"),
            (-1, "1969-12-31"),
            (-86_400, "1969-12-31"),
            (-86_401, "1969-12-30"),
            (951_782_400, "2000-02-29"),
            (951_868_800, "2000-03-01"),
            (1_709_164_800 + 86_399, "2024-02-29"),
            (-2_203_977_600, "1900-02-28"),
            (-2_203_891_200, "1900-03-01"),
            (4_107_456_000, "2100-02-28"),
            (4_107_542_400, "2100-03-01"),
            (2_147_472_000, "2038-01-19"),
            (-11_670_998_400, "1600-02-29"),
            (253_402_214_400, "9999-12-31"),
        ] {
            assert_eq!(day_of(at(secs)), day, "{secs}");
        }
        assert_eq!(day_of(UNIX_EPOCH - Duration::from_nanos(1)), "1969-12-31");
        assert_eq!(
            day_of(UNIX_EPOCH + Duration::from_nanos(86_400_000_000_000 - 1)),
            "1970-01-01"
        );
    }

    #[test]
    fn consecutive_days_step_through_the_calendar() {
        // From 1600 to 2400 each day follows the one before: the next day of the month, or the 1st after the
        // month's last day. Every day is one `check_day` takes.
        let mut previous = day_of_days(-135_140 - 1);
        assert_eq!(previous, "1599-12-31");
        for days in -135_140..=157_054 {
            let day = day_of_days(days);
            check_day(&day).unwrap();
            let parse = |d: &str| -> (u32, u32, u32) {
                (
                    d[0..4].parse().unwrap(),
                    d[5..7].parse().unwrap(),
                    d[8..10].parse().unwrap(),
                )
            };
            let (py, pm, pd) = parse(&previous);
            let expected = if pd < days_in_month(py, pm) {
                (py, pm, pd + 1)
            } else if pm < 12 {
                (py, pm + 1, 1)
            } else {
                (py + 1, 1, 1)
            };
            assert_eq!(parse(&day), expected, "{days}");
            previous = day;
        }
        assert_eq!(previous, "2400-01-01");
    }

    #[test]
    fn days_are_checked() {
        for good in ["2024-02-29", "2000-02-29", "1970-01-01", "2025-12-31"] {
            check_day(good).unwrap();
        }
        for bad in [
            "2023-02-29",
            "1900-02-29",
            "2025-13-01",
            "2025-00-10",
            "2025-04-31",
            "2025-01-00",
            "2025-1-01",
            "2025/01/01",
            "2025-01-01 ",
            "+025-01-01",
            "",
        ] {
            assert!(matches!(check_day(bad), Err(StoreError::BadDay(_))), "{bad}");
        }
    }

    #[test]
    fn the_key_table_is_aligned() {
        let keys = [
            KeyRecord {
                id: 1,
                owner: "alice".into(),
                models: vec!["llama-3".into(), "qwen".into()],
                requests_per_minute: Some(60),
                tokens_per_minute: None,
                tokens_per_day: Some(100_000),
                budget: Some(2.5),
                hint: "sk-wsg-…AbCd".into(),
                created: 1_709_164_800,
                revoked: false,
            },
            KeyRecord {
                id: 12,
                owner: "a team\twith a tab".into(),
                models: vec![],
                requests_per_minute: None,
                tokens_per_minute: Some(5000),
                tokens_per_day: None,
                budget: None,
                hint: "sk-wsg-…x_-9".into(),
                created: 0,
                revoked: true,
            },
        ];
        let table = key_table(&keys);
        let expected = "\
ID  OWNER              KEY           MODELS        RPM  TPM   TPD     BUDGET  CREATED     REVOKED
1   alice              sk-wsg-…AbCd  llama-3,qwen  60   -     100000  2.5     2024-02-29  no
12  a team?with a tab  sk-wsg-…x_-9  *             -    5000  -       -       1970-01-01  yes
";
        assert_eq!(table, expected);
        assert_eq!(key_table(&[]).lines().count(), 1);
    }
}
