//! `[llm]`: the LLM gateway's providers, prices and key database, as validated from the file (see
//! `config::file`). Routes of `kind = "llm"` serve them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::client::ClientTls;

/// How long connecting to a provider may take, unless its `connect_timeout` says otherwise.
pub const DEFAULT_LLM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a provider may take to send its answer's head and first token, unless `first_token_timeout` says
/// otherwise (a long prompt on a busy server takes a while).
pub const DEFAULT_FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stream may go without a token, unless `token_timeout` says otherwise.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// A provider's weight when its `weight` is left out.
pub const DEFAULT_LLM_WEIGHT: u32 = 1;
/// The largest `weight`.
pub const MAX_LLM_WEIGHT: u32 = 1000;
/// How long a gateway WebSocket may be silent before wsgate pings it, unless `[llm] ping_interval` says otherwise.
pub const DEFAULT_LLM_PING_INTERVAL: Duration = Duration::from_secs(30);
/// The largest request body a client may send (a long conversation fits; a 10 MiB one does not).
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 4 * 1024 * 1024;

/// Where the LLM gateway keeps its virtual keys and usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmDatabase {
    /// An SQLite file (a relative path is relative to the config file), for one host.
    File(PathBuf),
    /// A Redis server (`redis://…`), shared by every instance that names it.
    Redis(String),
}

/// The file, or the URL with its password hidden: what logs show.
impl fmt::Display for LlmDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LlmDatabase::File(path) => write!(f, "{}", path.display()),
            LlmDatabase::Redis(url) => f.write_str(&crate::cluster::redis::shown_url(url)),
        }
    }
}

/// `[llm]`.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// Where virtual keys and usage are kept.
    pub database: LlmDatabase,
    /// In file order: for a model, the first provider that serves it is tried first, then the next (failover).
    pub providers: Vec<Provider>,
    pub prices: Vec<Price>,
    /// Prompts and completions in the log (debug level); off by default.
    pub log_bodies: bool,
    /// The largest request body accepted from a client (413 above it).
    pub max_request_body: u64,
    /// How long a WebSocket of the gateway (`…/stream`, `…/realtime`) may be silent before wsgate pings it.
    pub ping_interval: Duration,
}

impl LlmSettings {
    /// The providers that serve `model`, in the order they are tried.
    pub fn providers_for<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a Provider> + 'a {
        self.providers.iter().filter(move |p| p.serves(model))
    }

    /// What metrics call `model`: the config's name or pattern that matched it (so that a client's own model
    /// names never become labels).
    pub fn model_label(&self, model: &str) -> &str {
        self.providers
            .iter()
            .flat_map(|p| &p.models)
            .find(|m| m.matches(model))
            .map_or("other", |m| m.0.as_str())
    }

    /// The price of `model`: the first entry of the table that matches it.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.iter().find(|p| p.model.matches(model))
    }

    /// What a request to `model` costs, in the price table's currency (0 for a model without a price).
    pub fn cost(&self, model: &str, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        self.price(model).map_or(0.0, |p| {
            (prompt_tokens as f64 * p.input + completion_tokens as f64 * p.output) / 1_000_000.0
        })
    }
}

/// The API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// Any OpenAI-compatible server: OpenAI, vLLM, llama.cpp's server, Ollama.
    OpenAi,
    /// The Anthropic Messages API.
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

/// `[[llm.provider]]`.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// `http://` or `https://`, with the path the API's own paths follow (such as `/v1`), without a trailing `/`.
    pub base_url: http::Uri,
    /// Sent to the provider; never shown to clients or written to logs.
    pub api_key: Option<Secret>,
    pub models: Vec<ModelPattern>,
    /// For an https provider: its TLS (the system's CA certificates, or `ca`).
    pub tls: Option<Arc<ClientTls>>,
    pub connect_timeout: Duration,
    pub first_token_timeout: Duration,
    pub token_timeout: Duration,
    /// Its share of a model's first tries among the providers that serve it.
    pub weight: u32,
    /// Where a prompt's tokens are counted for a stream the provider reports no usage for (llama-cpp-python's
    /// `/extras/tokenize/count`, llama.cpp's `/tokenize`); `None`: estimated from the prompt's characters.
    pub tokenize_url: Option<http::Uri>,
}

impl Provider {
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m.matches(model))
    }

    /// The host and port to connect to.
    pub fn authority(&self) -> Option<(&str, u16)> {
        authority_of(&self.base_url)
    }

    /// The URL path of one of the API's endpoints (`endpoint` starts with `/`).
    pub fn path(&self, endpoint: &str) -> String {
        format!("{}{endpoint}", self.base_url.path().trim_end_matches('/'))
    }
}

/// The host and port of an http(s) URL (the scheme's port when it names none).
pub fn authority_of(url: &http::Uri) -> Option<(&str, u16)> {
    let authority = url.authority()?;
    let https = url.scheme_str() == Some("https");
    Some((
        authority.host(),
        authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
    ))
}

/// A model name, or a prefix when written with a trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPattern(pub String);

impl ModelPattern {
    pub fn matches(&self, model: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => self.0 == model,
        }
    }

    /// The model's own name, when the pattern names one model (no `*`).
    pub fn exact(&self) -> Option<&str> {
        (!self.0.ends_with('*')).then_some(self.0.as_str())
    }
}

/// `[[llm.price]]`: per million tokens.
#[derive(Debug, Clone)]
pub struct Price {
    pub model: ModelPattern,
    pub input: f64,
    pub output: f64,
}

/// A credential read from a file: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_prefixes() {
        let exact = ModelPattern("tiny".into());
        let prefix = ModelPattern("tiny-*".into());
        assert!(exact.matches("tiny"));
        assert!(!exact.matches("tiny-2"));
        assert!(prefix.matches("tiny-2"));
        assert!(!prefix.matches("tiny"));
        assert_eq!(exact.exact(), Some("tiny"));
        assert_eq!(prefix.exact(), None);
    }

    #[test]
    fn cost_is_per_million_tokens_from_the_first_matching_price() {
        let settings = LlmSettings {
            database: LlmDatabase::File(PathBuf::from("x.db")),
            providers: Vec::new(),
            prices: vec![
                Price {
                    model: ModelPattern("tiny".into()),
                    input: 0.5,
                    output: 1.5,
                },
                Price {
                    model: ModelPattern("*".into()),
                    input: 10.0,
                    output: 10.0,
                },
            ],
            log_bodies: false,
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            ping_interval: DEFAULT_LLM_PING_INTERVAL,
        };
        assert!((settings.cost("tiny", 1_000_000, 2_000_000) - 3.5).abs() < 1e-9);
        assert!((settings.cost("other", 100_000, 0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_secret_is_not_shown_by_debug() {
        assert_eq!(format!("{:?}", Secret::new("sk-provider".into())), "Secret(..)");
    }
}
