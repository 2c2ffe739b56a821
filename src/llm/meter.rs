//! What a provider's stream carries, read chunk by chunk as it passes: the text, the finish reason, the provider's
//! own usage report; and the count of a stream whose provider reports none (one token per chunk with text, as
//! OpenAI-compatible servers send them, and the prompt estimated from its characters).

use serde_json::Value;

use super::keys::KeyState;
use crate::config::llm::LlmSettings;

/// The most tokens one request is billed for, each way.
pub const MAX_TOKENS: u64 = 1 << 40;

/// Token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    /// An OpenAI `usage` object (counts beyond [`MAX_TOKENS`] are taken as that: a provider's nonsense must not
    /// overflow a key's counts).
    pub fn of(v: &Value) -> Option<Usage> {
        Some(Usage {
            prompt: v.get("prompt_tokens")?.as_u64()?.min(MAX_TOKENS),
            completion: v.get("completion_tokens")?.as_u64()?.min(MAX_TOKENS),
        })
    }

    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// One event of an OpenAI-compatible stream.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The `[DONE]` event.
    pub done: bool,
    /// Generated text (chat `delta.content`, or completion `text`).
    pub content: String,
    /// The chunk carries something generated: text, a piece of a tool call, reasoning, a refusal.
    pub progress: bool,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    /// Only a usage report (no choices): what wsgate asked for itself and the client may not have.
    pub usage_only: bool,
    /// An error object the provider put in its stream.
    pub error: Option<String>,
    /// The chunk as sent (`None` for `[DONE]` or what is not JSON).
    pub json: Option<Value>,
}

impl Chunk {
    pub fn read(data: &str) -> Chunk {
        if data.trim() == "[DONE]" {
            return Chunk {
                done: true,
                ..Chunk::default()
            };
        }
        let Ok(json) = serde_json::from_str::<Value>(data) else {
            return Chunk::default();
        };
        let choices = json.get("choices").and_then(Value::as_array);
        let mut chunk = Chunk::default();
        for choice in choices.into_iter().flatten() {
            let text = choice
                .get("delta")
                .and_then(|d| d.get("content"))
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str);
            if let Some(text) = text {
                chunk.content.push_str(text);
            }
            let delta = choice.get("delta");
            let generated = |name: &str| {
                delta.and_then(|d| d.get(name)).is_some_and(|v| {
                    !v.is_null() && v.as_str() != Some("") && v.as_array().is_none_or(|a| !a.is_empty())
                })
            };
            if [
                "tool_calls",
                "function_call",
                "reasoning_content",
                "reasoning",
                "refusal",
                "audio",
            ]
            .into_iter()
            .any(generated)
            {
                chunk.progress = true;
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                chunk.finish_reason = Some(reason.to_string());
            }
        }
        chunk.progress |= !chunk.content.is_empty();
        chunk.usage = json.get("usage").and_then(Usage::of);
        chunk.usage_only = chunk.usage.is_some() && choices.is_none_or(Vec::is_empty);
        chunk.error = json.get("error").map(|e| {
            e.get("message")
                .and_then(Value::as_str)
                .map_or_else(|| e.to_string(), str::to_string)
        });
        chunk.json = Some(json);
        chunk
    }
}

/// A stream's tokens so far.
#[derive(Debug, Clone)]
pub struct Meter {
    reported: Option<Usage>,
    /// Chunks with something generated (text, a tool call's piece, reasoning): one token each.
    chunks: u64,
    prompt_estimate: u64,
    /// The text so far, kept only with `log_bodies`.
    text: Option<String>,
}

impl Meter {
    pub fn new(prompt_estimate: u64, keep_text: bool) -> Meter {
        Meter {
            reported: None,
            chunks: 0,
            prompt_estimate,
            text: keep_text.then(String::new),
        }
    }

    /// Forgets what a stream that failed before its first token reported, for the next provider's.
    pub fn restart(&mut self) {
        self.reported = None;
        self.chunks = 0;
        if let Some(text) = &mut self.text {
            text.clear();
        }
    }

    pub fn note(&mut self, chunk: &Chunk) {
        if let Some(usage) = chunk.usage {
            self.reported = Some(usage);
        }
        if chunk.progress {
            self.chunks += 1;
            if let Some(text) = &mut self.text {
                text.push_str(&chunk.content);
            }
        }
    }

    /// Whether any text has come yet (the first token).
    /// Whether the provider has sent its first token (text, a tool call's piece, reasoning).
    pub fn started(&self) -> bool {
        self.chunks > 0
    }

    /// Whether the provider reported the usage itself.
    pub fn reported(&self) -> bool {
        self.reported.is_some()
    }

    /// The prompt's count, from the provider's tokenize endpoint, for a stream it reports no usage for.
    pub fn set_prompt(&mut self, tokens: u64) {
        self.prompt_estimate = tokens;
    }

    /// The text so far, when kept (`log_bodies`).
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// What to bill, and whether wsgate counted it (the provider reported nothing).
    pub fn usage(&self) -> (Usage, bool) {
        match self.reported {
            Some(usage) => (usage, false),
            None => (
                Usage {
                    prompt: self.prompt_estimate,
                    completion: self.chunks,
                },
                true,
            ),
        }
    }

    /// Whether what has streamed so far costs the rest of the key's budget: the stream ends there.
    pub fn spends_budget(&self, key: &KeyState, settings: &LlmSettings, model: &str) -> bool {
        let Some(left) = key.budget_left() else {
            return false;
        };
        let (usage, _) = self.usage();
        settings.cost(model, usage.prompt, usage.completion) >= left
    }
}

/// A request's prompt as text (the messages' contents, one a line; or the legacy `prompt`): what a provider's
/// tokenize endpoint counts.
pub fn prompt_text(request: &serde_json::Map<String, Value>) -> String {
    fn text(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(s);
            }
            Value::Array(items) => items.iter().for_each(|i| text(i, out)),
            Value::Object(o) => {
                for key in ["content", "text"] {
                    if let Some(v) = o.get(key) {
                        text(v, out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = String::new();
    for key in ["messages", "prompt"] {
        if let Some(v) = request.get(key) {
            text(v, &mut out);
        }
    }
    out
}

/// The tokens of `text` by a local tokenizer: tiktoken's `cl100k_base` for GPT-3.5 and GPT-4 models, its
/// `o200k_base` for every other model (GPT-4o and later; for other vendors' models, a count in a vocabulary of the
/// same kind rather than their own). The first use loads the encoding (a few hundred milliseconds): call it on a
/// blocking thread.
pub fn local_tokens(model: &str, text: &str) -> u64 {
    let name = model.rsplit('/').next().unwrap_or(model);
    let older = name.starts_with("gpt-3.5")
        || (name.starts_with("gpt-4") && !name.starts_with("gpt-4o") && !name.starts_with("gpt-4."));
    let bpe = if older {
        tiktoken_rs::cl100k_base_singleton()
    } else {
        tiktoken_rs::o200k_base_singleton()
    };
    bpe.encode_ordinary(text).len() as u64
}

/// A rough count of a request's prompt tokens, about four characters a token: what a stream's budget check uses
/// until the stream's end, and what is billed when nothing can count them.
pub fn estimate_prompt_tokens(request: &serde_json::Map<String, Value>) -> u64 {
    // Text only: an image's or an audio clip's base64 data, and ids, are no prompt tokens.
    fn chars(v: &Value) -> usize {
        match v {
            Value::String(s) => s.chars().count(),
            Value::Array(items) => items.iter().map(chars).sum(),
            Value::Object(o) => o
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "image_url" | "input_audio" | "file" | "id" | "tool_call_id"))
                .map(|(_, v)| chars(v))
                .sum(),
            _ => 0,
        }
    }
    let text: usize = ["messages", "prompt"]
        .iter()
        .filter_map(|k| request.get(*k))
        .map(chars)
        .sum();
    text.div_ceil(4) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_and_reasoning_are_tokens_a_role_is_not() {
        let c = Chunk::read(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]}}]}"#,
        );
        assert!(c.progress && c.content.is_empty());
        let c = Chunk::read(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#);
        assert!(!c.progress);
        let c = Chunk::read(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm","tool_calls":[]}}]}"#);
        assert!(c.progress);
        let mut meter = Meter::new(3, false);
        meter.note(&Chunk::read(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1"}]}}]}"#,
        ));
        assert!(meter.started());
        assert_eq!(meter.usage().0.completion, 1);
    }

    #[test]
    fn the_local_tokenizer_uses_the_models_encoding() {
        let text = "Привет, как дела? Всё хорошо.";
        // o200k_base for GPT-4o and for models of other vendors; cl100k_base for GPT-4 and GPT-3.5.
        assert_eq!(local_tokens("gpt-4o-mini", text), 9);
        assert_eq!(local_tokens("tiny", text), 9);
        assert_eq!(local_tokens("gpt-4-turbo", text), 17);
        assert_eq!(local_tokens("openai/gpt-3.5-turbo", text), 17);
        assert_eq!(local_tokens("tiny", ""), 0);
    }

    #[test]
    fn chunks_give_text_finish_usage_and_errors() {
        let c = Chunk::read(r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#);
        assert_eq!((c.content.as_str(), c.finish_reason, c.usage_only), ("hi", None, false));
        let c = Chunk::read(r#"{"choices":[{"text":" there","finish_reason":"length"}]}"#);
        assert_eq!(
            (c.content.as_str(), c.finish_reason.as_deref()),
            (" there", Some("length"))
        );
        let c = Chunk::read(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#);
        assert!(c.usage_only);
        assert_eq!(c.usage.map(Usage::total), Some(7));
        assert!(Chunk::read("[DONE]").done);
        assert_eq!(
            Chunk::read(r#"{"error":{"message":"boom"}}"#).error.as_deref(),
            Some("boom")
        );
        assert!(Chunk::read("garbage").json.is_none());
    }

    #[test]
    fn a_meter_counts_when_the_provider_reports_nothing() {
        let mut meter = Meter::new(9, true);
        for text in ["a", "", "b"] {
            meter.note(&Chunk {
                content: text.into(),
                progress: !text.is_empty(),
                ..Chunk::default()
            });
        }
        assert_eq!(
            meter.usage(),
            (
                Usage {
                    prompt: 9,
                    completion: 2
                },
                true
            )
        );
        assert_eq!(meter.text(), Some("ab"));
        meter.note(&Chunk {
            usage: Some(Usage {
                prompt: 5,
                completion: 6,
            }),
            ..Chunk::default()
        });
        assert_eq!(
            meter.usage(),
            (
                Usage {
                    prompt: 5,
                    completion: 6
                },
                false
            )
        );
    }
}
