//! Virtual keys and usage, in SQLite: a key is kept as the SHA-256 of its secret (the secret is shown once, when
//! it is issued), with its owner, models and limits; usage is one row per key, model, UTC day and origin of the
//! counts (reported by the provider, or counted by wsgate), added to as requests end. The file is shared by a
//! running gateway and `wsgate llm-key` (WAL mode, a busy timeout).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

/// The schema this version writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;
/// What a new key starts with.
pub const KEY_PREFIX: &str = "sk-wsg-";
/// The longest owner name.
const MAX_OWNER: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{file}: {error}")]
    Sqlite { file: String, error: rusqlite::Error },
    #[error("{file}: written by a newer wsgate (schema {found}; this one knows {SCHEMA_VERSION})")]
    NewerSchema { file: String, found: i64 },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot make a key: no random bytes from the system: {0}")]
    Random(String),
}

/// A key to issue.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub owner: String,
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub budget: Option<f64>,
}

/// A key just issued: its secret, shown this once.
#[derive(Debug)]
pub struct Issued {
    pub id: i64,
    pub key: String,
}

/// A key as stored (never its secret).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyRecord {
    pub id: i64,
    pub owner: String,
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub budget: Option<f64>,
    /// `sk-wsg-…` and the secret's last four characters, to tell keys apart.
    pub hint: String,
    /// Unix seconds.
    pub created: u64,
    pub revoked: bool,
}

/// Usage to add to a key's row of a model and day.
#[derive(Clone, Debug)]
pub struct UsageDelta {
    pub key_id: i64,
    pub model: String,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// Counted by wsgate (the provider reported none).
    pub counted: bool,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
}

/// Which usage rows to list; `None` = any.
#[derive(Clone, Debug, Default)]
pub struct UsageFilter {
    pub key_id: Option<i64>,
    pub owner: Option<String>,
    pub model: Option<String>,
    pub from_day: Option<String>,
    pub to_day: Option<String>,
}

/// A usage row.
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

pub struct Store {
    conn: Connection,
    file: String,
}

impl Store {
    /// Opens the database at `path`, creating the file and its tables when missing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let file = path.display().to_string();
        let sqlite = |error| StoreError::Sqlite {
            file: file.clone(),
            error,
        };
        let conn = Connection::open(path).map_err(sqlite)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sqlite)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sqlite)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { file, found: version });
        }
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sqlite)?;
        if version < SCHEMA_VERSION {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS keys (
                     id INTEGER PRIMARY KEY AUTOINCREMENT,
                     hash BLOB NOT NULL UNIQUE,
                     hint TEXT NOT NULL,
                     owner TEXT NOT NULL,
                     models TEXT NOT NULL,
                     requests_per_minute INTEGER,
                     tokens_per_minute INTEGER,
                     tokens_per_day INTEGER,
                     budget REAL,
                     created INTEGER NOT NULL,
                     revoked INTEGER NOT NULL DEFAULT 0
                 );
                 CREATE TABLE IF NOT EXISTS usage (
                     key_id INTEGER NOT NULL,
                     model TEXT NOT NULL,
                     day TEXT NOT NULL,
                     counted INTEGER NOT NULL,
                     requests INTEGER NOT NULL,
                     prompt_tokens INTEGER NOT NULL,
                     completion_tokens INTEGER NOT NULL,
                     cost REAL NOT NULL,
                     PRIMARY KEY (key_id, model, day, counted)
                 );
                 PRAGMA user_version = 1;
                 COMMIT;",
            )
            .map_err(sqlite)?;
        }
        Ok(Store { conn, file })
    }

    fn err(&self, error: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            file: self.file.clone(),
            error,
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.file)
    }

    /// Issues a key; its secret is in the answer and nowhere else.
    pub fn add_key(&self, new: &NewKey) -> Result<Issued, StoreError> {
        let owner = new.owner.trim();
        if owner.is_empty() || owner.chars().count() > MAX_OWNER || owner.chars().any(char::is_control) {
            return Err(StoreError::Invalid(format!(
                "owner: expected a name of 1 to {MAX_OWNER} visible characters"
            )));
        }
        if new.requests_per_minute == Some(0) || new.tokens_per_minute == Some(0) || new.tokens_per_day == Some(0) {
            return Err(StoreError::Invalid(
                "limits must be more than 0 (leave one out for none)".into(),
            ));
        }
        if new.budget.is_some_and(|b| !b.is_finite() || b <= 0.0) {
            return Err(StoreError::Invalid("budget: expected an amount above 0".into()));
        }
        if new.models.iter().any(|m| m.trim().is_empty()) {
            return Err(StoreError::Invalid("models: a model name is empty".into()));
        }
        let mut random = [0u8; 32];
        getrandom::fill(&mut random).map_err(|e| StoreError::Random(e.to_string()))?;
        let key = format!(
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
        );
        let hint = format!("{KEY_PREFIX}…{}", &key[key.len() - 4..]);
        let models = serde_json::to_string(&new.models).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.conn
            .execute(
                "INSERT INTO keys (hash, hint, owner, models, requests_per_minute, tokens_per_minute, tokens_per_day,
                     budget, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    hash_key(&key).as_slice(),
                    hint,
                    owner,
                    models,
                    new.requests_per_minute,
                    new.tokens_per_minute.map(to_sql),
                    new.tokens_per_day.map(to_sql),
                    new.budget,
                    to_sql(unix_now()),
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(Issued {
            id: self.conn.last_insert_rowid(),
            key,
        })
    }

    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{KEY_COLUMNS} ORDER BY id"))
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], key_record).map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn key(&self, id: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.conn
            .query_row(&format!("{KEY_COLUMNS} WHERE id = ?1"), [id], key_record)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// `false` when there is no such key, or it is revoked already.
    pub fn revoke(&self, id: i64) -> Result<bool, StoreError> {
        let changed = self
            .conn
            .execute("UPDATE keys SET revoked = 1 WHERE id = ?1 AND revoked = 0", [id])
            .map_err(|e| self.err(e))?;
        Ok(changed > 0)
    }

    /// The key whose secret this is (revoked ones too: the caller says so).
    pub fn find_key(&self, secret: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("{KEY_COLUMNS} WHERE hash = ?1"),
                [hash_key(secret).as_slice()],
                key_record,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Adds rows to the usage table, in one transaction.
    pub fn record_usage(&self, rows: &[UsageDelta]) -> Result<(), StoreError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO usage (key_id, model, day, counted, requests, prompt_tokens, completion_tokens, cost)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (key_id, model, day, counted) DO UPDATE SET
                         requests = requests + excluded.requests,
                         prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                         completion_tokens = completion_tokens + excluded.completion_tokens,
                         cost = cost + excluded.cost",
                )
                .map_err(|e| self.err(e))?;
            for r in rows {
                stmt.execute(params![
                    r.key_id,
                    r.model,
                    r.day,
                    r.counted,
                    to_sql(r.requests),
                    to_sql(r.prompt_tokens),
                    to_sql(r.completion_tokens),
                    r.cost
                ])
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    pub fn usage(&self, filter: &UsageFilter) -> Result<Vec<UsageRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT u.key_id, COALESCE(k.owner, ''), u.model, u.day, u.counted, u.requests, u.prompt_tokens,
                        u.completion_tokens, u.cost
                 FROM usage u LEFT JOIN keys k ON k.id = u.key_id
                 WHERE (?1 IS NULL OR u.key_id = ?1) AND (?2 IS NULL OR k.owner = ?2) AND (?3 IS NULL OR u.model = ?3)
                   AND (?4 IS NULL OR u.day >= ?4) AND (?5 IS NULL OR u.day <= ?5)
                 ORDER BY u.day, u.key_id, u.model, u.counted",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![
                    filter.key_id,
                    filter.owner,
                    filter.model,
                    filter.from_day,
                    filter.to_day
                ],
                |r| {
                    Ok(UsageRow {
                        key_id: r.get(0)?,
                        owner: r.get(1)?,
                        model: r.get(2)?,
                        day: r.get(3)?,
                        counted: r.get(4)?,
                        requests: from_sql(r.get(5)?),
                        prompt_tokens: from_sql(r.get(6)?),
                        completion_tokens: from_sql(r.get(7)?),
                        cost: r.get(8)?,
                    })
                },
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// What a key has spent, over all days.
    pub fn spent(&self, key_id: i64) -> Result<f64, StoreError> {
        self.conn
            .query_row(
                "SELECT COALESCE(SUM(cost), 0.0) FROM usage WHERE key_id = ?1",
                [key_id],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// A key's prompt and completion tokens on `day`.
    pub fn tokens_on(&self, key_id: i64, day: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage WHERE key_id = ?1 AND day = ?2",
                params![key_id, day],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(from_sql(n))
    }
}

const KEY_COLUMNS: &str = "SELECT id, owner, models, requests_per_minute, tokens_per_minute, tokens_per_day, budget,
    hint, created, revoked FROM keys";

fn key_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let models: String = r.get(2)?;
    Ok(KeyRecord {
        id: r.get(0)?,
        owner: r.get(1)?,
        // A models column this version did not write reads as no restriction would be wrong: as none allowed.
        models: serde_json::from_str(&models).unwrap_or_else(|_| vec![String::new()]),
        requests_per_minute: r.get(3)?,
        tokens_per_minute: r.get::<_, Option<i64>>(4)?.map(from_sql),
        tokens_per_day: r.get::<_, Option<i64>>(5)?.map(from_sql),
        budget: r.get(6)?,
        hint: r.get(7)?,
        created: from_sql(r.get(8)?),
        revoked: r.get(9)?,
    })
}

/// SQLite integers are signed: counts beyond `i64::MAX` are kept at it.
fn to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_sql(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The SHA-256 of a key's secret: what is stored, and looked up.
pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The UTC day of `t`, as `YYYY-MM-DD`.
pub fn day_of(t: SystemTime) -> String {
    let days = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The keys as a table, for `wsgate llm-key list`.
pub fn key_table(keys: &[KeyRecord]) -> String {
    let limit = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut rows = vec![[
        "id".to_string(),
        "owner".into(),
        "key".into(),
        "models".into(),
        "rpm".into(),
        "tpm".into(),
        "tpd".into(),
        "budget".into(),
        "created".into(),
        "state".into(),
    ]];
    for k in keys {
        rows.push([
            k.id.to_string(),
            k.owner.clone(),
            k.hint.clone(),
            if k.models.is_empty() {
                "*".into()
            } else {
                k.models.join(",")
            },
            limit(k.requests_per_minute.map(|n| n.to_string())),
            limit(k.tokens_per_minute.map(|n| n.to_string())),
            limit(k.tokens_per_day.map(|n| n.to_string())),
            limit(k.budget.map(|n| n.to_string())),
            day_of(SystemTime::UNIX_EPOCH + Duration::from_secs(k.created)),
            if k.revoked { "revoked" } else { "active" }.into(),
        ]);
    }
    let mut widths = [0usize; 10];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("wsgate-store-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn usage(key_id: i64, model: &str, day: &str, counted: bool, prompt: u64, completion: u64) -> UsageDelta {
        UsageDelta {
            key_id,
            model: model.into(),
            day: day.into(),
            counted,
            requests: 1,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost: 0.25,
        }
    }

    #[test]
    fn keys_are_issued_found_by_their_secret_and_revoked_and_only_their_hash_is_stored() {
        let dir = TempDir::new("keys");
        let path = dir.0.join("llm.db");
        let store = Store::open(&path).unwrap();
        let issued = store
            .add_key(&NewKey {
                owner: "team-a".into(),
                models: vec!["tiny".into()],
                tokens_per_day: Some(1000),
                ..NewKey::default()
            })
            .unwrap();
        assert!(issued.key.starts_with(KEY_PREFIX) && issued.key.len() == KEY_PREFIX.len() + 43);
        let other = store.add_key(&NewKey {
            owner: "b".into(),
            ..NewKey::default()
        });
        assert_ne!(other.unwrap().key, issued.key);
        let found = store.find_key(&issued.key).unwrap().unwrap();
        assert_eq!(
            (found.id, found.owner.as_str(), found.tokens_per_day),
            (issued.id, "team-a", Some(1000))
        );
        assert!(found.hint.ends_with(&issued.key[issued.key.len() - 4..]));
        assert!(store.find_key("sk-wsg-nope").unwrap().is_none());
        // Another handle on the file (the CLI beside a gateway) sees it, and revokes it.
        let second = Store::open(&path).unwrap();
        assert!(second.revoke(issued.id).unwrap());
        assert!(!second.revoke(issued.id).unwrap());
        assert!(store.find_key(&issued.key).unwrap().unwrap().revoked);
        drop((store, second));
        let bytes = std::fs::read(&path).unwrap();
        let wal = std::fs::read(dir.0.join("llm.db-wal")).unwrap_or_default();
        let secret = &issued.key.as_bytes()[KEY_PREFIX.len()..];
        for file in [&bytes, &wal] {
            assert!(
                !file.windows(secret.len()).any(|w| w == secret),
                "the secret is on disk"
            );
        }
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        let dir = TempDir::new("invalid");
        let store = Store::open(&dir.0.join("llm.db")).unwrap();
        for new in [
            NewKey::default(),
            NewKey {
                owner: "x".into(),
                budget: Some(-1.0),
                ..NewKey::default()
            },
            NewKey {
                owner: "x".into(),
                tokens_per_minute: Some(0),
                ..NewKey::default()
            },
        ] {
            assert!(matches!(store.add_key(&new), Err(StoreError::Invalid(_))));
        }
    }

    #[test]
    fn usage_adds_up_per_key_model_day_and_origin_and_filters_apply() {
        let dir = TempDir::new("usage");
        let store = Store::open(&dir.0.join("llm.db")).unwrap();
        let key = store
            .add_key(&NewKey {
                owner: "team".into(),
                ..NewKey::default()
            })
            .unwrap();
        store
            .record_usage(&[
                usage(key.id, "tiny", "2026-12-06", false, 10, 5),
                usage(key.id, "tiny", "2026-12-06", false, 1, 2),
                usage(key.id, "tiny", "2026-12-06", true, 3, 3),
                usage(key.id, "big", "2026-12-07", false, 100, 0),
            ])
            .unwrap();
        let all = store.usage(&UsageFilter::default()).unwrap();
        assert_eq!(all.len(), 3);
        let reported = &all[0];
        assert_eq!(
            (reported.model.as_str(), reported.counted, reported.requests),
            ("tiny", false, 2)
        );
        assert_eq!((reported.prompt_tokens, reported.completion_tokens), (11, 7));
        assert_eq!(reported.owner, "team");
        assert!((reported.cost - 0.5).abs() < 1e-9);
        let filtered = store
            .usage(&UsageFilter {
                model: Some("big".into()),
                ..UsageFilter::default()
            })
            .unwrap();
        assert_eq!(filtered.len(), 1);
        let by_day = store
            .usage(&UsageFilter {
                from_day: Some("2026-12-07".into()),
                ..UsageFilter::default()
            })
            .unwrap();
        assert_eq!(by_day.len(), 1);
        assert_eq!(store.tokens_on(key.id, "2026-12-06").unwrap(), 24);
        assert!((store.spent(key.id).unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_file_that_is_not_a_database_or_is_newer_is_refused() {
        let dir = TempDir::new("bad");
        let junk = dir.0.join("junk.db");
        std::fs::write(
            &junk,
            b"this is not a database, not even close; it goes on for a while........",
        )
        .unwrap();
        let err = Store::open(&junk).err().unwrap();
        assert!(err.to_string().starts_with(&junk.display().to_string()), "{err}");
        let newer = dir.0.join("newer.db");
        Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", 9)
            .unwrap();
        assert!(matches!(
            Store::open(&newer),
            Err(StoreError::NewerSchema { found: 9, .. })
        ));
    }

    #[test]
    fn days_are_utc_dates() {
        let at = |secs: u64| day_of(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01");
        assert_eq!(at(951_782_400), "2000-02-29");
        assert_eq!(at(1_709_164_800), "2024-02-29");
        assert_eq!(at(1_796_601_599), "2026-12-06");
        assert_eq!(at(1_796_601_600), "2026-12-07");
    }
}
