//! The key and usage database on a thread of its own: SQLite calls block, and the workers' runtimes must not.
//! Requests come through a bounded queue and are answered through a oneshot. Usage rows do not share that queue
//! (a flood of unknown keys must not crowd bills out): they are put in a buffer of their own, which the thread
//! writes at least every [`USAGE_BATCH_WAIT`], and once more when it stops (at shutdown, after the workers).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::llm::LlmDatabase;

use super::redis_store::RedisDb;
use super::store::{Issued, KeyRecord, NewKey, Store, StoreError, UsageDelta, UsageFilter, UsageRow};

/// Requests waiting for the database at most; more are refused at once (503) rather than queued without bound.
const QUEUE: usize = 4096;
/// How long usage rows wait to be written together, at most.
const USAGE_BATCH_WAIT: Duration = Duration::from_millis(200);
/// Usage rows waiting at most (a database that cannot be written for long): more are dropped, and logged.
pub(super) const MAX_PENDING_USAGE: usize = 1_000_000;

/// Why the database could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the key database is busy (its queue is full)")]
    Busy,
    #[error("the key database is closed")]
    Closed,
    #[error("cannot start the key database's thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Redis(#[from] crate::cluster::redis::RedisError),
}

enum Command {
    FindKey(String, oneshot::Sender<Result<Option<KeyRecord>, StoreError>>),
    Key(i64, oneshot::Sender<Result<Option<KeyRecord>, StoreError>>),
    AddKey(NewKey, oneshot::Sender<Result<Issued, StoreError>>),
    ListKeys(oneshot::Sender<Result<Vec<KeyRecord>, StoreError>>),
    Revoke(i64, oneshot::Sender<Result<bool, StoreError>>),
    Usage(UsageFilter, oneshot::Sender<Result<Vec<UsageRow>, StoreError>>),
    Totals(i64, String, oneshot::Sender<Result<(f64, u64), StoreError>>),
    /// Write what is pending and end.
    Stop,
}

// Plain mutexes: a push or a swap of a vector under them, never held across an await (the project-wide ban on
// `std::sync::Mutex` is meant for the relay path).
#[allow(clippy::disallowed_types)]
pub(super) type Pending = std::sync::Mutex<Vec<UsageDelta>>;
#[allow(clippy::disallowed_types)]
type Thread = std::sync::Mutex<Option<JoinHandle<()>>>;

/// Where keys and usage are: an SQLite file (one host) or a Redis server (every instance that names it).
#[derive(Clone)]
pub enum Db {
    Sqlite(SqliteDb),
    Redis(RedisDb),
}

impl Db {
    /// Opens the database `[llm] database` names.
    pub fn open(database: &LlmDatabase) -> Result<Db, DbError> {
        Ok(match database {
            LlmDatabase::File(path) => Db::Sqlite(SqliteDb::open(path)?),
            LlmDatabase::Redis(url) => Db::Redis(RedisDb::open(url)?),
        })
    }

    /// Whether this is the database `database` names.
    pub fn is(&self, database: &LlmDatabase) -> bool {
        match (self, database) {
            (Db::Sqlite(db), LlmDatabase::File(path)) => db.path == *path,
            (Db::Redis(db), LlmDatabase::Redis(url)) => db.is(url),
            _ => false,
        }
    }

    pub async fn find_key(&self, secret: &str) -> Result<Option<KeyRecord>, DbError> {
        match self {
            Db::Sqlite(db) => db.find_key(secret).await,
            Db::Redis(db) => db.find_key(secret).await,
        }
    }

    pub async fn key(&self, id: i64) -> Result<Option<KeyRecord>, DbError> {
        match self {
            Db::Sqlite(db) => db.key(id).await,
            Db::Redis(db) => db.key(id).await,
        }
    }

    pub async fn add_key(&self, new: NewKey) -> Result<Issued, DbError> {
        match self {
            Db::Sqlite(db) => db.add_key(new).await,
            Db::Redis(db) => db.add_key(new).await,
        }
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, DbError> {
        match self {
            Db::Sqlite(db) => db.list_keys().await,
            Db::Redis(db) => db.list_keys().await,
        }
    }

    pub async fn revoke(&self, id: i64) -> Result<bool, DbError> {
        match self {
            Db::Sqlite(db) => db.revoke(id).await,
            Db::Redis(db) => db.revoke(id).await,
        }
    }

    pub async fn usage(&self, filter: UsageFilter) -> Result<Vec<UsageRow>, DbError> {
        match self {
            Db::Sqlite(db) => db.usage(filter).await,
            Db::Redis(db) => db.usage(filter).await,
        }
    }

    /// What a key has spent in all, and its tokens on `day`: what its limits start from on this instance. In
    /// Redis, the limits are checked against Redis's counts, not this instance's (see [`RedisDb::admit`]).
    pub async fn totals(&self, key_id: i64, day: String) -> Result<(f64, u64), DbError> {
        match self {
            Db::Sqlite(db) => db.totals(key_id, day).await,
            Db::Redis(_) => Ok((0.0, 0)),
        }
    }

    /// Puts a usage row in the buffer the database's writer writes; `false` when the buffer is full.
    pub fn record(&self, delta: UsageDelta) -> bool {
        match self {
            Db::Sqlite(db) => db.record(delta),
            Db::Redis(db) => db.record(delta),
        }
    }

    /// Writes what is pending and stops the writer (at shutdown, once nothing bills any more).
    pub fn close(&self) {
        match self {
            Db::Sqlite(db) => db.close(),
            Db::Redis(db) => db.close(),
        }
    }
}

/// The file, or the server's URL (its password hidden).
impl std::fmt::Display for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Sqlite(db) => write!(f, "{}", db.path.display()),
            Db::Redis(db) => f.write_str(db.url()),
        }
    }
}

/// A handle on the SQLite database's thread.
#[derive(Clone)]
pub struct SqliteDb {
    path: PathBuf,
    commands: mpsc::SyncSender<Command>,
    pending: Arc<Pending>,
    thread: Arc<Thread>,
}

impl SqliteDb {
    /// Opens (or creates) the database at `path` and starts its thread.
    pub fn open(path: &Path) -> Result<SqliteDb, DbError> {
        let store = Store::open(path)?;
        let (commands, receiver) = mpsc::sync_channel(QUEUE);
        let pending = Arc::new(Pending::default());
        let file = path.display().to_string();
        let rows = pending.clone();
        let thread = std::thread::Builder::new()
            .name("wsgate-llm-db".into())
            .spawn(move || run(store, receiver, rows, file))
            .map_err(DbError::Thread)?;
        Ok(SqliteDb {
            path: path.to_path_buf(),
            commands,
            pending,
            #[allow(clippy::disallowed_types)]
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, DbError> {
        let (tx, rx) = oneshot::channel();
        self.commands.try_send(command(tx)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => DbError::Busy,
            mpsc::TrySendError::Disconnected(_) => DbError::Closed,
        })?;
        Ok(rx.await.map_err(|_| DbError::Closed)??)
    }

    pub async fn find_key(&self, secret: &str) -> Result<Option<KeyRecord>, DbError> {
        let secret = secret.to_string();
        self.ask(|tx| Command::FindKey(secret, tx)).await
    }

    pub async fn key(&self, id: i64) -> Result<Option<KeyRecord>, DbError> {
        self.ask(|tx| Command::Key(id, tx)).await
    }

    pub async fn add_key(&self, new: NewKey) -> Result<Issued, DbError> {
        self.ask(|tx| Command::AddKey(new, tx)).await
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, DbError> {
        self.ask(Command::ListKeys).await
    }

    pub async fn revoke(&self, id: i64) -> Result<bool, DbError> {
        self.ask(|tx| Command::Revoke(id, tx)).await
    }

    pub async fn usage(&self, filter: UsageFilter) -> Result<Vec<UsageRow>, DbError> {
        self.ask(|tx| Command::Usage(filter, tx)).await
    }

    /// What a key has spent in all, and its tokens on `day`.
    pub async fn totals(&self, key_id: i64, day: String) -> Result<(f64, u64), DbError> {
        self.ask(|tx| Command::Totals(key_id, day, tx)).await
    }

    /// Puts a usage row in the buffer the thread writes; `false` when the buffer is full (the row is lost, and the
    /// caller says so in the log).
    pub fn record(&self, delta: UsageDelta) -> bool {
        queue_usage(&self.pending, delta)
    }

    /// Writes what is pending and ends the thread, waiting for it (at shutdown, once nothing bills any more).
    pub fn close(&self) {
        let _ = self.commands.send(Command::Stop);
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!(file = %self.path.display(), "the key database's thread failed");
        }
    }
}

/// Puts a usage row in a writer's buffer; `false` when the buffer is full.
pub(super) fn queue_usage(pending: &Pending, delta: UsageDelta) -> bool {
    let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
    if pending.len() >= MAX_PENDING_USAGE {
        return false;
    }
    pending.push(delta);
    true
}

fn run(store: Store, commands: mpsc::Receiver<Command>, pending: Arc<Pending>, file: String) {
    loop {
        let command = match commands.recv_timeout(USAGE_BATCH_WAIT) {
            Ok(Command::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(command) => Some(command),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
        };
        // Reads see every row recorded before them.
        write_usage(&store, &pending, &file);
        let Some(command) = command else { continue };
        match command {
            Command::FindKey(secret, tx) => drop(tx.send(store.find_key(&secret))),
            Command::Key(id, tx) => drop(tx.send(store.key(id))),
            Command::AddKey(new, tx) => drop(tx.send(store.add_key(&new))),
            Command::ListKeys(tx) => drop(tx.send(store.list_keys())),
            Command::Revoke(id, tx) => drop(tx.send(store.revoke(id))),
            Command::Usage(filter, tx) => drop(tx.send(store.usage(&filter))),
            Command::Totals(id, day, tx) => {
                let totals = store
                    .spent(id)
                    .and_then(|spent| Ok((spent, store.tokens_on(id, &day)?)));
                drop(tx.send(totals));
            }
            Command::Stop => break,
        }
    }
    write_usage(&store, &pending, &file);
}

/// Writes the pending rows in one transaction; when that fails, row by row, so that one bad row (or a busy
/// moment) costs no other row.
fn write_usage(store: &Store, pending: &Pending, file: &str) {
    let rows = std::mem::take(&mut *pending.lock().unwrap_or_else(PoisonError::into_inner));
    if rows.is_empty() || store.record_usage(&rows).is_ok() {
        return;
    }
    for row in rows {
        if let Err(e) = store.record_usage(std::slice::from_ref(&row)) {
            tracing::error!(file, key = row.key_id, model = %row.model, error = %e, "usage row not written");
        }
    }
}
