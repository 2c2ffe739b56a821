//! The LLM gateway's Prometheus metrics (registered with the rest in `crate::metrics`): requests by outcome,
//! tokens, cost, time to the first token and between tokens, refusals by reason and provider errors. The `model`
//! label is the config's name or pattern that matched the request's model (a client's own model names never
//! become labels), and `provider` a provider's name from the config.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::meter::Usage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelOutcome {
    model: String,
    /// `ok`, `cancelled` (by the client, or its socket closing), `budget` (ended for the key's budget), `error`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelTokens {
    model: String,
    /// `prompt` or `completion`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderError {
    provider: String,
    /// `connect`, `tls`, `timeout`, `status_429`, `status_5xx`, `http`, `stream`.
    error: &'static str,
}

fn model_histogram() -> Family<ModelLabel, Histogram> {
    // 1 ms to about 65 s.
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 17)))
}

/// The gateway's metric families.
pub struct LlmMetrics {
    requests: Family<ModelOutcome, Counter>,
    tokens: Family<ModelTokens, Counter>,
    cost: Family<ModelLabel, Counter<f64, AtomicU64>>,
    first_token: Family<ModelLabel, Histogram>,
    between_tokens: Family<ModelLabel, Histogram>,
    refusals: Family<Reason, Counter>,
    provider_errors: Family<ProviderError, Counter>,
}

impl LlmMetrics {
    pub fn new(registry: &mut Registry) -> LlmMetrics {
        let m = LlmMetrics {
            requests: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            first_token: model_histogram(),
            between_tokens: model_histogram(),
            refusals: Family::default(),
            provider_errors: Family::default(),
        };
        registry.register(
            "llm_requests",
            "LLM requests served (completions, streams), by model and outcome",
            m.requests.clone(),
        );
        registry.register(
            "llm_tokens",
            "Tokens billed, by model and kind (prompt, completion)",
            m.tokens.clone(),
        );
        registry.register(
            "llm_cost",
            "Cost billed, in the price table's currency, by model",
            m.cost.clone(),
        );
        registry.register(
            "llm_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first token",
            m.first_token.clone(),
        );
        registry.register(
            "llm_inter_token_seconds",
            "Time between the tokens of a stream",
            m.between_tokens.clone(),
        );
        registry.register(
            "llm_refusals",
            "LLM requests refused before a provider was asked, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "llm_provider_errors",
            "Provider failures, by provider and kind",
            m.provider_errors.clone(),
        );
        m
    }

    /// A request billed.
    pub fn billed(&self, model: &str, outcome: &'static str, usage: Usage, cost: f64) {
        let model = model.to_string();
        self.requests
            .get_or_create(&ModelOutcome {
                model: model.clone(),
                outcome,
            })
            .inc();
        for (kind, n) in [("prompt", usage.prompt), ("completion", usage.completion)] {
            self.tokens
                .get_or_create(&ModelTokens {
                    model: model.clone(),
                    kind,
                })
                .inc_by(n);
        }
        self.cost.get_or_create(&ModelLabel { model }).inc_by(cost);
    }

    /// A request that no provider served (it is not billed).
    pub fn failed(&self, model: &str) {
        self.requests
            .get_or_create(&ModelOutcome {
                model: model.to_string(),
                outcome: "error",
            })
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&Reason { reason }).inc();
    }

    pub fn provider_error(&self, provider: &str, error: &'static str) {
        self.provider_errors
            .get_or_create(&ProviderError {
                provider: provider.to_string(),
                error,
            })
            .inc();
    }
}

/// A stream's token clock: the first token's delay from the request, then each gap (its model's histograms taken
/// once, not looked up per token).
pub struct Clock {
    started: Instant,
    last: Option<Instant>,
    first_token: Histogram,
    between_tokens: Histogram,
}

impl Clock {
    pub fn start(metrics: &LlmMetrics, model: &str) -> Clock {
        let label = ModelLabel {
            model: model.to_string(),
        };
        Clock {
            started: Instant::now(),
            last: None,
            first_token: metrics.first_token.get_or_create(&label).clone(),
            between_tokens: metrics.between_tokens.get_or_create(&label).clone(),
        }
    }

    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.first_token.observe((now - self.started).as_secs_f64()),
            Some(last) => self.between_tokens.observe((now - last).as_secs_f64()),
        }
        self.last = Some(now);
    }
}
