//! The key and usage database on a thread of its own: SQLite calls block, and the workers' runtimes must not.
//! Requests come through a bounded queue and are answered through a oneshot; usage rows are written in batches.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::store::{Issued, KeyRecord, NewKey, Store, StoreError, UsageDelta, UsageFilter, UsageRow};

/// Requests waiting for the database at most; more are refused at once (503) rather than queued without bound.
const QUEUE: usize = 4096;
/// How long usage rows wait to be written together.
const USAGE_BATCH_WAIT: Duration = Duration::from_millis(200);

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
}

enum Command {
    FindKey(String, oneshot::Sender<Result<Option<KeyRecord>, StoreError>>),
    Key(i64, oneshot::Sender<Result<Option<KeyRecord>, StoreError>>),
    AddKey(NewKey, oneshot::Sender<Result<Issued, StoreError>>),
    ListKeys(oneshot::Sender<Result<Vec<KeyRecord>, StoreError>>),
    Revoke(i64, oneshot::Sender<Result<bool, StoreError>>),
    Usage(UsageFilter, oneshot::Sender<Result<Vec<UsageRow>, StoreError>>),
    Totals(i64, String, oneshot::Sender<Result<(f64, u64), StoreError>>),
    Record(UsageDelta),
}

/// A handle on the database thread; the thread ends when the last handle is dropped, after writing what it holds.
#[derive(Clone)]
pub struct Db {
    path: PathBuf,
    commands: mpsc::SyncSender<Command>,
}

impl Db {
    /// Opens (or creates) the database at `path` and starts its thread.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let store = Store::open(path)?;
        let (commands, receiver) = mpsc::sync_channel(QUEUE);
        let file = path.display().to_string();
        std::thread::Builder::new()
            .name("wsgate-llm-db".into())
            .spawn(move || run(store, receiver, file))
            .map_err(DbError::Thread)?;
        Ok(Db {
            path: path.to_path_buf(),
            commands,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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

    /// Queues a usage row; `false` when the queue is full (the row is lost, and the caller says so in the log).
    pub fn record(&self, delta: UsageDelta) -> bool {
        self.commands.try_send(Command::Record(delta)).is_ok()
    }
}

fn run(store: Store, commands: mpsc::Receiver<Command>, file: String) {
    let mut pending: Vec<UsageDelta> = Vec::new();
    loop {
        let command = if pending.is_empty() {
            match commands.recv() {
                Ok(command) => command,
                Err(_) => break,
            }
        } else {
            match commands.recv_timeout(USAGE_BATCH_WAIT) {
                Ok(command) => command,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    write_usage(&store, &mut pending, &file);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        // Reads see every row recorded before them.
        if !matches!(command, Command::Record(_)) {
            write_usage(&store, &mut pending, &file);
        }
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
            Command::Record(delta) => pending.push(delta),
        }
    }
    write_usage(&store, &mut pending, &file);
}

fn write_usage(store: &Store, pending: &mut Vec<UsageDelta>, file: &str) {
    if pending.is_empty() {
        return;
    }
    if let Err(e) = store.record_usage(pending) {
        tracing::error!(file, rows = pending.len(), error = %e, "usage rows not written");
    }
    pending.clear();
}
