//! The LLM gateway: routes of `kind = "llm"` serve the OpenAI-compatible HTTP API (with SSE streams) in front of
//! LLM providers, with virtual keys, token limits, usage and cost.
//!
//! - `http`: the endpoints, streams passed on event by event and metered as they pass;
//! - `provider`: one request to a provider (its key added, its timeouts);
//! - `keys`: keys found by hash, and their limits; `db`: the key database, the SQLite `store` on a thread of its
//!   own or `redis_store` for several instances;
//! - `sse`: server-sent events read incrementally;
//! - `anthropic`: requests, answers and streams translated between the OpenAI API and Anthropic's Messages API.

pub mod anthropic;
mod db;
pub mod http;
pub mod keys;
pub mod meter;
pub mod metrics;
mod provider;
mod realtime;
mod redis_store;
pub mod sse;
pub mod store;
pub mod ws;

use std::sync::Arc;

use arc_swap::ArcSwapOption;

pub use db::{Db, DbError};
use keys::{KeyState, Keys};

use crate::config::LlmSettings;
use crate::config::llm::{LlmDatabase, Provider};

/// What the gateway keeps across reloads: the database it has open and the keys it has seen (with what they used).
#[derive(Default)]
pub struct Gateway {
    db: ArcSwapOption<Db>,
    pub keys: Keys,
    /// Counts first tries, to spread them over a model's providers by weight.
    turn: std::sync::atomic::AtomicU64,
}

impl Gateway {
    /// Opens the database `settings` names, unless it is open already (a reload that keeps it keeps everything).
    pub fn apply(&self, settings: Option<&LlmSettings>) -> Result<(), DbError> {
        let Some(settings) = settings else {
            return Ok(());
        };
        if self.db.load().as_deref().is_some_and(|db| db.is(&settings.database)) {
            return Ok(());
        }
        let db = Db::open(&settings.database)?;
        tracing::info!(database = %settings.database, "LLM key database open");
        // Another database: its ids name other keys. The old one's thread ends once the requests still holding it
        // are done, writing their usage rows.
        self.keys.clear();
        self.db.store(Some(Arc::new(db)));
        Ok(())
    }

    /// Writes the usage still pending and closes the database (at shutdown, after the workers).
    pub fn close(&self) {
        if let Some(db) = self.db.swap(None) {
            db.close();
        }
    }

    /// A model's providers in the order to try them: the first chosen by weight (weighted round robin over every
    /// request's first try), then the others in file order, for failover.
    pub fn order<'a>(&self, mut providers: Vec<&'a Provider>) -> Vec<&'a Provider> {
        let total: u64 = providers.iter().map(|p| u64::from(p.weight)).sum();
        if providers.len() < 2 || total == 0 {
            return providers;
        }
        let mut at = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % total;
        let first = providers
            .iter()
            .position(|p| {
                let w = u64::from(p.weight);
                if at < w {
                    return true;
                }
                at -= w;
                false
            })
            .unwrap_or(0);
        let chosen = providers.remove(first);
        providers.insert(0, chosen);
        providers
    }

    /// The key database, once a config with `[llm]` has opened it.
    pub fn db(&self) -> Option<Db> {
        self.db.load().as_deref().cloned()
    }

    /// Opens the database `[llm] database` names for a command (`wsgate llm-key`), outside a running gateway.
    pub fn open_db(database: &LlmDatabase) -> Result<Db, DbError> {
        Db::open(database)
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let db = self.db.load();
        f.debug_struct("Gateway")
            .field("database", &db.as_deref().map(Db::to_string))
            .finish_non_exhaustive()
    }
}

/// What billing a request needs once its tokens are known.
pub struct Metered {
    settings: Arc<LlmSettings>,
    key: Arc<KeyState>,
    model: String,
    db: Db,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Metered {
    /// What metrics call the request's model.
    fn label(&self) -> &str {
        self.settings.model_label(&self.model)
    }
}
