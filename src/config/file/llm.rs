//! The `[llm]` section (`[[llm.provider]]`, `[[llm.price]]`): checked like every other key; a provider's key file
//! is read here, so that `wsgate check` and a reload name a missing one. Relative paths are the config file's
//! folder's.

use std::collections::HashSet;

use serde::Deserialize;
use toml::Spanned;

use super::{Dur, Report, Size, unique_name};
use crate::config::llm::{
    DEFAULT_FIRST_TOKEN_TIMEOUT, DEFAULT_LLM_CONNECT_TIMEOUT, DEFAULT_LLM_PING_INTERVAL, DEFAULT_LLM_WEIGHT,
    DEFAULT_MAX_REQUEST_BODY, DEFAULT_TOKEN_TIMEOUT, LlmDatabase, LlmSettings, MAX_LLM_WEIGHT, ModelPattern, Price,
    Provider, ProviderKind, Secret,
};

/// The database file when `[llm]` names none.
pub const DEFAULT_DATABASE: &str = "wsgate-llm.db";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLlm {
    database: Option<Spanned<String>>,
    #[serde(default)]
    provider: Vec<Spanned<RawProvider>>,
    #[serde(default)]
    price: Vec<Spanned<RawPrice>>,
    #[serde(default)]
    log_bodies: bool,
    max_request_body: Option<Spanned<Size>>,
    ping_interval: Option<Spanned<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: Spanned<String>,
    kind: Spanned<RawKind>,
    base_url: Spanned<String>,
    api_key_file: Option<Spanned<String>>,
    models: Spanned<Vec<Spanned<String>>>,
    ca: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<Dur>>,
    first_token_timeout: Option<Spanned<Dur>>,
    token_timeout: Option<Spanned<Dur>>,
    weight: Option<Spanned<u32>>,
    tokenize_url: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawKind {
    Openai,
    Anthropic,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    model: Spanned<String>,
    input: Spanned<f64>,
    output: Spanned<f64>,
}

pub(super) fn build(raw: &Spanned<RawLlm>, report: &mut Report<'_>) -> Option<LlmSettings> {
    let l = raw.get_ref();
    let database = match &l.database {
        Some(path) if path.get_ref().trim().is_empty() => {
            report.key(path, "llm.database", "expected a file name or a redis:// URL");
            return None;
        }
        Some(url) if url.get_ref().starts_with("redis") && url.get_ref().contains("://") => {
            if let Err(why) = crate::cluster::redis::check_url(url.get_ref()) {
                report.key(url, "llm.database", format!("not a Redis URL: {why}"));
                return None;
            }
            LlmDatabase::Redis(url.get_ref().clone())
        }
        Some(path) => LlmDatabase::File(report.path(path.get_ref())),
        None => LlmDatabase::File(report.path(DEFAULT_DATABASE)),
    };
    let mut names = HashSet::new();
    let mut providers = Vec::with_capacity(l.provider.len());
    for p in &l.provider {
        unique_name(&mut names, &p.get_ref().name, "llm.provider", report);
        if let Some(provider) = build_provider(p.get_ref(), report) {
            providers.push(provider);
        }
    }
    let mut prices = Vec::with_capacity(l.price.len());
    for p in &l.price {
        let p = p.get_ref();
        for (value, key) in [(&p.input, "llm.price.input"), (&p.output, "llm.price.output")] {
            if !value.get_ref().is_finite() || *value.get_ref() < 0.0 {
                report.key(value, key, "expected a price of 0 or more (per million tokens)");
            }
        }
        let name = p.model.get_ref();
        if name.is_empty() || name[..name.len() - usize::from(name.ends_with('*'))].contains('*') {
            report.key(
                &p.model,
                "llm.price.model",
                "expected a model name, or a prefix ending in `*`",
            );
        }
        prices.push(Price {
            model: ModelPattern(p.model.get_ref().clone()),
            input: *p.input.get_ref(),
            output: *p.output.get_ref(),
        });
    }
    let max_request_body = match &l.max_request_body {
        Some(size) if size.get_ref().0 == 0 => {
            report.key(size, "llm.max_request_body", "must be more than 0");
            DEFAULT_MAX_REQUEST_BODY
        }
        Some(size) => size.get_ref().0,
        None => DEFAULT_MAX_REQUEST_BODY,
    };
    let ping_interval = match &l.ping_interval {
        Some(d) if d.get_ref().0.is_zero() => {
            report.key(d, "llm.ping_interval", "must be more than 0");
            DEFAULT_LLM_PING_INTERVAL
        }
        Some(d) => d.get_ref().0,
        None => DEFAULT_LLM_PING_INTERVAL,
    };
    Some(LlmSettings {
        database,
        ping_interval,
        providers,
        prices,
        log_bodies: l.log_bodies,
        max_request_body,
    })
}

fn build_provider(p: &RawProvider, report: &mut Report<'_>) -> Option<Provider> {
    const EXPECTED: &str = "expected an http:// or https:// URL with a host, such as http://127.0.0.1:8000/v1";
    let url = p.base_url.get_ref().trim_end_matches('/');
    let base_url = match url.parse::<http::Uri>() {
        Ok(uri) => {
            let problem = match (uri.scheme_str(), uri.authority()) {
                (Some("http" | "https"), Some(a)) if a.as_str().contains('@') => {
                    Some("user information in the URL is not supported: give the key in `api_key_file`".into())
                }
                (Some("http" | "https"), Some(a)) if a.host().is_empty() => Some(EXPECTED.to_string()),
                (Some("http" | "https"), Some(_)) if uri.query().is_some() => {
                    Some("a query in base_url is not supported".to_string())
                }
                (Some("http" | "https"), Some(_)) => None,
                _ => Some(EXPECTED.to_string()),
            };
            if let Some(problem) = problem {
                report.key(&p.base_url, "llm.provider.base_url", problem);
                return None;
            }
            uri
        }
        Err(_) => {
            report.key(&p.base_url, "llm.provider.base_url", EXPECTED);
            return None;
        }
    };
    let api_key = match &p.api_key_file {
        None => None,
        Some(file) => {
            let path = report.path(file.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let key = text.trim_end_matches(['\n', '\r']);
                    if key.is_empty() || key.chars().any(|c| c.is_control() || c == ' ') {
                        report.key(
                            file,
                            "llm.provider.api_key_file",
                            format!("{}: the key must be one line of visible characters", path.display()),
                        );
                        return None;
                    }
                    Some(Secret::new(key.to_string()))
                }
                Err(e) => {
                    report.key(
                        file,
                        "llm.provider.api_key_file",
                        format!("{}: cannot read: {e}", path.display()),
                    );
                    return None;
                }
            }
        }
    };
    if p.models.get_ref().is_empty() {
        report.key(
            &p.models,
            "llm.provider.models",
            "expected at least one model name (`name*` for a prefix)",
        );
    }
    let mut models = Vec::with_capacity(p.models.get_ref().len());
    for m in p.models.get_ref() {
        let name = m.get_ref();
        if name.is_empty() || name[..name.len() - usize::from(name.ends_with('*'))].contains('*') {
            report.key(
                m,
                "llm.provider.models",
                "expected a model name, or a prefix ending in `*`",
            );
        }
        models.push(ModelPattern(name.clone()));
    }
    let tls = super::https_tls(
        &base_url,
        p.ca.as_ref(),
        &p.base_url,
        ("llm.provider.ca", "llm.provider.base_url"),
        report,
    )
    .ok()?;
    let timeout = |raw: &Option<Spanned<Dur>>, key: &str, default, report: &mut Report<'_>| match raw {
        Some(d) if d.get_ref().0.is_zero() => {
            report.key(d, key, "must be more than 0");
            default
        }
        Some(d) => d.get_ref().0,
        None => default,
    };
    let weight = match &p.weight {
        Some(w) if !(1..=MAX_LLM_WEIGHT).contains(w.get_ref()) => {
            report.key(w, "llm.provider.weight", format!("expected 1 to {MAX_LLM_WEIGHT}"));
            DEFAULT_LLM_WEIGHT
        }
        Some(w) => *w.get_ref(),
        None => DEFAULT_LLM_WEIGHT,
    };
    let tokenize_url = match &p.tokenize_url {
        None => None,
        Some(url) => match url.get_ref().parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|h| !h.is_empty())
                    && uri.scheme_str() == base_url.scheme_str() =>
            {
                Some(uri)
            }
            _ => {
                report.key(
                    url,
                    "llm.provider.tokenize_url",
                    "expected an http:// or https:// URL with a host, of the same scheme as base_url",
                );
                None
            }
        },
    };
    Some(Provider {
        weight,
        tokenize_url,
        name: p.name.get_ref().clone(),
        kind: match p.kind.get_ref() {
            RawKind::Openai => ProviderKind::OpenAi,
            RawKind::Anthropic => ProviderKind::Anthropic,
        },
        base_url,
        api_key,
        models,
        tls,
        connect_timeout: timeout(
            &p.connect_timeout,
            "llm.provider.connect_timeout",
            DEFAULT_LLM_CONNECT_TIMEOUT,
            report,
        ),
        first_token_timeout: timeout(
            &p.first_token_timeout,
            "llm.provider.first_token_timeout",
            DEFAULT_FIRST_TOKEN_TIMEOUT,
            report,
        ),
        token_timeout: timeout(
            &p.token_timeout,
            "llm.provider.token_timeout",
            DEFAULT_TOKEN_TIMEOUT,
            report,
        ),
    })
}
