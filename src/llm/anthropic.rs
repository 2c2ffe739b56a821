//! Translation between the OpenAI chat API that clients speak and the Anthropic Messages API that providers of
//! `kind = "anthropic"` serve: requests one way, answers and streams the other, so that a client of the
//! OpenAI-compatible routes sees an OpenAI answer whichever provider served it. Pure data, no I/O.
//!
//! Tools are translated both ways (`tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls`, `tool`
//! messages; `tool_use` blocks back as `tool_calls`), and so are images given as `image_url` parts. What Anthropic
//! cannot do is refused (`n` above 1, the legacy `functions`); other parameters it has no equivalent for
//! (penalties, `seed`, `logprobs`, `response_format`, …) are dropped.

use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde_json::{Map, Value, json};

use super::sse;

/// The `max_tokens` sent when the client gave none (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Why a request or an answer could not be translated.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    /// The client's request has no Anthropic equivalent; the message is fit for the client.
    #[error("{0}")]
    Request(String),
    /// The provider answered an Anthropic error body: its `error.type` and the provider's own message (for logs).
    #[error("the provider answered an error ({kind}): {message}")]
    Provider { kind: String, message: String },
    /// The provider's answer is not an Anthropic message.
    #[error("the provider's answer is not a message: {0}")]
    Answer(&'static str),
}

impl TranslateError {
    /// What the client is answered: 400 for a request that cannot be translated, 502 for a provider's answer.
    pub fn status(&self) -> StatusCode {
        match self {
            TranslateError::Request(_) => StatusCode::BAD_REQUEST,
            TranslateError::Provider { .. } | TranslateError::Answer(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

fn invalid(message: impl Into<String>) -> TranslateError {
    TranslateError::Request(message.into())
}

/// An OpenAI chat request → the body of an Anthropic `POST /messages`.
///
/// System and developer messages become the top-level `system` (joined, wherever they stood); `tool` messages
/// become `tool_result` blocks of a user turn; consecutive turns of one role are merged, as Anthropic requires
/// alternating roles. A temperature above Anthropic's maximum of 1 is sent as 1.
pub fn request(openai: &Map<String, Value>) -> Result<Value, TranslateError> {
    let model = match openai.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model,
        _ => return Err(invalid("`model` (a string) is required")),
    };
    let Some(Value::Array(messages)) = openai.get("messages") else {
        return Err(invalid("`messages` (an array) is required"));
    };
    if openai.get("functions").is_some_and(|f| !f.is_null())
        || openai.get("function_call").is_some_and(|f| !f.is_null())
    {
        return Err(invalid(
            "`functions` and `function_call` are not supported: use `tools`",
        ));
    }
    match openai.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(_) => return Err(invalid("`n` must be 1 for this model")),
    }

    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let mut has_user = false;
    for (i, message) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Some(message) = message.as_object() else {
            return Err(invalid(format!("`{at}` is not an object")));
        };
        let content = message.get("content").unwrap_or(&Value::Null);
        let (role, blocks) = match message.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => {
                let text = text_of(content, &at)?;
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            Some("user") => {
                let blocks = content_blocks(content, &at, true)?;
                has_user |= !blocks.is_empty();
                ("user", blocks)
            }
            Some("assistant") => ("assistant", assistant_blocks(message, content, &at)?),
            Some("tool") => ("user", vec![tool_result(message, content, &at)?]),
            Some(role) => {
                let role: String = role.chars().take(50).collect();
                return Err(invalid(format!("`{at}.role`: the role `{role}` is not supported")));
            }
            None => return Err(invalid(format!("`{at}.role` (a string) is required"))),
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, previous)) if *last == role => previous.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    if !has_user {
        return Err(invalid(
            "`messages` must hold at least one message of role `user` with content",
        ));
    }

    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let turns: Vec<Value> = turns
        .into_iter()
        .map(|(role, mut blocks)| {
            let content = match blocks.as_mut_slice() {
                [one] if one["type"] == "text" => one["text"].take(),
                _ => Value::Array(blocks),
            };
            json!({"role": role, "content": content})
        })
        .collect();
    out.insert("messages".into(), Value::Array(turns));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    let max_tokens = match ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| openai.get(*k).filter(|v| !v.is_null()))
    {
        None => DEFAULT_MAX_TOKENS,
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => n,
            _ => return Err(invalid("`max_tokens` must be a positive integer")),
        },
    };
    out.insert("max_tokens".into(), json!(max_tokens));
    if let Some(t) = number(openai, "temperature")? {
        out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    if let Some(p) = number(openai, "top_p")? {
        out.insert("top_p".into(), json!(p));
    }
    if let Some(k) = openai.get("top_k").and_then(Value::as_u64) {
        out.insert("top_k".into(), json!(k));
    }
    match openai.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(stops)) => {
            if !stops.iter().all(Value::is_string) {
                return Err(invalid("`stop` must be a string or an array of strings"));
            }
            if !stops.is_empty() {
                out.insert("stop_sequences".into(), Value::Array(stops.clone()));
            }
        }
        Some(_) => return Err(invalid("`stop` must be a string or an array of strings")),
    }
    if let Some(stream) = openai.get("stream").and_then(Value::as_bool) {
        out.insert("stream".into(), json!(stream));
    }
    if let Some(user) = openai.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    tools(openai, &mut out)?;
    Ok(Value::Object(out))
}

/// A number parameter, when given.
fn number(openai: &Map<String, Value>, key: &str) -> Result<Option<f64>, TranslateError> {
    match openai.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(format!("`{key}` must be a number"))),
    }
}

/// The text of a system, developer or tool message: a string, or its text parts joined.
fn text_of(content: &Value, at: &str) -> Result<String, TranslateError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            for part in parts {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => texts.push(text),
                    _ => return Err(invalid(format!("`{at}.content` may hold only text parts"))),
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(invalid(format!("`{at}.content` must be a string or an array of parts"))),
    }
}

/// A message's content as Anthropic blocks: text (empty text left out, as Anthropic refuses it) and, for a user,
/// images.
fn content_blocks(content: &Value, at: &str, user: bool) -> Result<Vec<Value>, TranslateError> {
    let text = |s: &str| (!s.is_empty()).then(|| json!({"type": "text", "text": s}));
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(text(s).into_iter().collect()),
        Value::Array(parts) => {
            let mut blocks = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                match part["type"].as_str() {
                    Some("text") => match part["text"].as_str() {
                        Some(s) => blocks.extend(text(s)),
                        None => return Err(invalid(format!("`{at}.content[{j}].text` (a string) is required"))),
                    },
                    Some("image_url") if user => blocks.push(image(&part["image_url"], &format!("{at}.content[{j}]"))?),
                    // An assistant's refusal is its text.
                    Some("refusal") if !user => blocks.extend(part["refusal"].as_str().and_then(text)),
                    Some(kind) => {
                        let kind: String = kind.chars().take(50).collect();
                        return Err(invalid(format!(
                            "`{at}.content[{j}]`: content parts of type `{kind}` are not supported"
                        )));
                    }
                    None => return Err(invalid(format!("`{at}.content[{j}].type` (a string) is required"))),
                }
            }
            Ok(blocks)
        }
        _ => Err(invalid(format!("`{at}.content` must be a string or an array of parts"))),
    }
}

/// An `image_url` part → an image block: a `data:` URL as base64, any other URL by reference.
fn image(image_url: &Value, at: &str) -> Result<Value, TranslateError> {
    let url = image_url
        .get("url")
        .or(Some(image_url))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("`{at}.image_url.url` (a string) is required")))?;
    if let Some(data_url) = url.strip_prefix("data:") {
        let Some((media_type, data)) = data_url.split_once(";base64,") else {
            return Err(invalid(format!("`{at}.image_url.url`: a data URL must be base64")));
        };
        return Ok(json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}));
    }
    Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
}

/// An assistant message: its text, then its tool calls as `tool_use` blocks.
fn assistant_blocks(message: &Map<String, Value>, content: &Value, at: &str) -> Result<Vec<Value>, TranslateError> {
    let mut blocks = content_blocks(content, at, false)?;
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(blocks),
        Some(Value::Array(calls)) => calls,
        Some(_) => return Err(invalid(format!("`{at}.tool_calls` must be an array"))),
    };
    for (j, call) in calls.iter().enumerate() {
        let at = format!("{at}.tool_calls[{j}]");
        let (Some(id), Some(name)) = (call["id"].as_str(), call["function"]["name"].as_str()) else {
            return Err(invalid(format!("`{at}` needs an `id` and a `function.name`")));
        };
        let input = match &call["function"]["arguments"] {
            Value::Null => json!({}),
            Value::String(s) if s.trim().is_empty() => json!({}),
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(v @ Value::Object(_)) => v,
                _ => return Err(invalid(format!("`{at}.function.arguments` must be a JSON object"))),
            },
            v @ Value::Object(_) => v.clone(),
            _ => return Err(invalid(format!("`{at}.function.arguments` must be a JSON object"))),
        };
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(blocks)
}

/// A `tool` message → a `tool_result` block (of a user turn).
fn tool_result(message: &Map<String, Value>, content: &Value, at: &str) -> Result<Value, TranslateError> {
    let Some(id) = message.get("tool_call_id").and_then(Value::as_str) else {
        return Err(invalid(format!("`{at}.tool_call_id` (a string) is required")));
    };
    let text = text_of(content, at)?;
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    if !text.is_empty() {
        block["content"] = json!(text);
    }
    Ok(block)
}

/// `tools`, `tool_choice` and `parallel_tool_calls` → Anthropic's `tools` and `tool_choice`.
fn tools(openai: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), TranslateError> {
    let tools = match openai.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(tools)) if tools.is_empty() => return Ok(()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(invalid("`tools` must be an array")),
    };
    let mut translated = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let function = &tool["function"];
        let (Some("function"), Some(name)) = (tool["type"].as_str(), function["name"].as_str()) else {
            return Err(invalid(format!(
                "`tools[{i}]` must be of type `function` with a `function.name`"
            )));
        };
        let mut t = json!({"name": name});
        if let Some(description) = function["description"].as_str() {
            t["description"] = json!(description);
        }
        t["input_schema"] = match &function["parameters"] {
            Value::Null => json!({"type": "object", "properties": {}}),
            schema => schema.clone(),
        };
        translated.push(t);
    }
    out.insert("tools".into(), Value::Array(translated));
    let mut choice = match openai.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            _ => {
                return Err(invalid(
                    "`tool_choice` must be `none`, `auto`, `required` or a function",
                ));
            }
        },
        Some(c) => match c["function"]["name"].as_str() {
            Some(name) => Some(json!({"type": "tool", "name": name})),
            None => {
                return Err(invalid(
                    "`tool_choice` must be `none`, `auto`, `required` or a function",
                ));
            }
        },
    };
    if openai.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false) {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = json!(true);
        }
    }
    if let Some(choice) = choice {
        out.insert("tool_choice".into(), choice);
    }
    Ok(())
}

/// An Anthropic `stop_reason` → an OpenAI `finish_reason`.
fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Anthropic token counts, as the OpenAI `usage` object: the prompt counts cache writes and reads too.
#[derive(Debug, Default, Clone, Copy)]
struct Tokens {
    input: u64,
    cache_creation: u64,
    cache_read: u64,
    output: u64,
}

impl Tokens {
    /// Updates the counts an Anthropic `usage` object gives (those it leaves out stay as they were).
    fn read(&mut self, usage: &Value) {
        for (key, field) in [
            ("input_tokens", &mut self.input),
            ("cache_creation_input_tokens", &mut self.cache_creation),
            ("cache_read_input_tokens", &mut self.cache_read),
            ("output_tokens", &mut self.output),
        ] {
            if let Some(n) = usage.get(key).and_then(Value::as_u64) {
                *field = n;
            }
        }
    }

    fn openai(self) -> Value {
        let prompt = self.input + self.cache_creation + self.cache_read;
        let mut usage = json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output,
            "total_tokens": prompt + self.output,
        });
        if self.cache_read > 0 {
            usage["prompt_tokens_details"] = json!({"cached_tokens": self.cache_read});
        }
        usage
    }
}

/// An Anthropic error body (`{"type":"error","error":{…}}`), when `v` is one.
fn provider_error(v: &Value) -> Option<(String, String)> {
    if v["type"] != "error" {
        return None;
    }
    let kind = v["error"]["type"].as_str().unwrap_or("error").to_string();
    let message = v["error"]["message"].as_str().unwrap_or("").to_string();
    Some((kind, message))
}

/// An Anthropic error type → the OpenAI error type a client is shown.
fn error_type(kind: &str) -> &'static str {
    match kind {
        "rate_limit_error" => "rate_limit_error",
        "invalid_request_error" | "request_too_large" | "not_found_error" => "invalid_request_error",
        _ => "api_error",
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An Anthropic answer (non-streamed) → an OpenAI `chat.completion` for `model` (the model the client named).
/// An error body, or an answer that is no message with usage, is an error (the client is answered 502).
pub fn response(anthropic: &Value, model: &str) -> Result<Value, TranslateError> {
    if let Some((kind, message)) = provider_error(anthropic) {
        return Err(TranslateError::Provider { kind, message });
    }
    if anthropic["type"] != "message" {
        return Err(TranslateError::Answer("its type is not `message`"));
    }
    let Some(blocks) = anthropic["content"].as_array() else {
        return Err(TranslateError::Answer("it has no content"));
    };
    if !anthropic["usage"].is_object() {
        return Err(TranslateError::Answer("it has no usage"));
    }
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            // Thinking and other blocks have no place in an OpenAI message.
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = Value::Array(calls);
    }
    let mut tokens = Tokens::default();
    tokens.read(&anthropic["usage"]);
    Ok(json!({
        "id": anthropic["id"].as_str().unwrap_or(""),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(anthropic["stop_reason"].as_str()),
        }],
        "usage": tokens.openai(),
    }))
}

/// An Anthropic event stream, read event by event, as the `data:` payloads of an OpenAI chat stream: the
/// assistant's role first, then its text (and tool calls) as they come, the finish reason, a usage-only chunk
/// (always: the gateway meters it, and leaves it out for a client that did not ask for one) and `[DONE]`.
#[derive(Debug)]
pub struct StreamTranslator {
    model: String,
    id: String,
    created: u64,
    tokens: Tokens,
    /// The role chunk went out.
    started: bool,
    finished: bool,
    usage_sent: bool,
    /// `[DONE]` or an error went out: nothing follows.
    done: bool,
    /// Anthropic content block index → OpenAI tool call index, for the tool calls so far.
    tool_blocks: Vec<(u64, usize)>,
}

impl StreamTranslator {
    /// A translator for a stream of `model` (the model the client named).
    pub fn new(model: &str) -> Self {
        Self::at(model, now())
    }

    fn at(model: &str, created: u64) -> Self {
        StreamTranslator {
            model: model.to_string(),
            id: String::new(),
            created,
            tokens: Tokens::default(),
            started: false,
            finished: false,
            usage_sent: false,
            done: false,
            tool_blocks: Vec::new(),
        }
    }

    /// Whether the stream is over (`[DONE]` or an error went out).
    pub fn done(&self) -> bool {
        self.done
    }

    /// The OpenAI payloads one Anthropic event gives, in order (often none).
    pub fn event(&mut self, event: &sse::Event) -> Vec<String> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        if event.name == "ping" {
            return out;
        }
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            self.fail(
                &mut out,
                "api_error",
                "provider_error",
                "the provider sent an unreadable event",
            );
            return out;
        };
        let name = match event.name.as_str() {
            "" => data["type"].as_str().unwrap_or(""),
            name => name,
        };
        match name {
            "message_start" => {
                let message = &data["message"];
                if let Some(id) = message["id"].as_str() {
                    self.id = id.to_string();
                }
                self.tokens.read(&message["usage"]);
                self.start(&mut out);
            }
            "content_block_start" => {
                self.start(&mut out);
                let block = &data["content_block"];
                match block["type"].as_str() {
                    Some("text") => {
                        if let Some(text) = block["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push(self.chunk(json!({"content": text}), Value::Null));
                        }
                    }
                    Some("tool_use") => {
                        let index = self.tool_blocks.len();
                        self.tool_blocks.push((data["index"].as_u64().unwrap_or(0), index));
                        let call = json!({"index": index, "id": block["id"], "type": "function",
                            "function": {"name": block["name"], "arguments": ""}});
                        out.push(self.chunk(json!({"tool_calls": [call]}), Value::Null));
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                self.start(&mut out);
                let delta = &data["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => {
                        if let Some(text) = delta["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push(self.chunk(json!({"content": text}), Value::Null));
                        }
                    }
                    Some("input_json_delta") => {
                        let block = data["index"].as_u64().unwrap_or(0);
                        let call = self.tool_blocks.iter().find(|(b, _)| *b == block).map(|(_, c)| *c);
                        if let (Some(index), Some(json)) = (call, delta["partial_json"].as_str())
                            && !json.is_empty()
                        {
                            let call = json!({"index": index, "function": {"arguments": json}});
                            out.push(self.chunk(json!({"tool_calls": [call]}), Value::Null));
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                self.start(&mut out);
                self.tokens.read(&data["usage"]);
                if let Some(reason) = data["delta"]["stop_reason"].as_str() {
                    self.finish(&mut out, Some(reason));
                    self.usage(&mut out);
                }
            }
            "message_stop" => {
                self.start(&mut out);
                self.finish(&mut out, None);
                self.usage(&mut out);
                out.push("[DONE]".to_string());
                self.done = true;
            }
            "error" => {
                let (kind, message) = provider_error(&data).unwrap_or_default();
                let code = if kind.is_empty() {
                    "provider_error"
                } else {
                    kind.as_str()
                };
                let message = if message.is_empty() {
                    "the provider's stream failed"
                } else {
                    message.as_str()
                };
                self.fail(&mut out, error_type(&kind), code, message);
            }
            // content_block_stop, and events this translation does not know.
            _ => {}
        }
        out
    }

    fn start(&mut self, out: &mut Vec<String>) {
        if !self.started {
            self.started = true;
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), Value::Null));
        }
    }

    fn finish(&mut self, out: &mut Vec<String>, reason: Option<&str>) {
        if !self.finished {
            self.finished = true;
            out.push(self.chunk(json!({}), json!(finish_reason(reason))));
        }
    }

    fn usage(&mut self, out: &mut Vec<String>) {
        if !self.usage_sent {
            self.usage_sent = true;
            out.push(
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [], "usage": self.tokens.openai(),
                })
                .to_string(),
            );
        }
    }

    fn fail(&mut self, out: &mut Vec<String>, kind: &str, code: &str, message: &str) {
        out.push(json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string());
        self.done = true;
    }

    fn chunk(&self, delta: Value, finish_reason: Value) -> String {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::meter::Chunk;

    fn req(v: Value) -> Result<Value, TranslateError> {
        request(v.as_object().unwrap())
    }

    fn refused(v: Value) -> String {
        match req(v) {
            Err(e @ TranslateError::Request(_)) => {
                assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                e.to_string()
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_conversation_with_system_messages() {
        let out = req(json!({
            "model": "claude-x",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "How are you?"},
                {"role": "user", "content": [{"type": "text", "text": "And the weather?"}, {"type": "text", "text": ""}]},
            ],
            "max_tokens": 100,
            "temperature": 1.5,
            "top_p": 0.9,
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "u-1",
            "presence_penalty": 0.5,
            "seed": 3,
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "model": "claude-x",
                "system": "Be brief.\n\nAnswer in French.",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "How are you?"},
                        {"type": "text", "text": "And the weather?"},
                    ]},
                ],
                "max_tokens": 100,
                "temperature": 1.0,
                "top_p": 0.9,
                "stream": true,
                "metadata": {"user_id": "u-1"},
            })
        );
    }

    #[test]
    fn stop_strings_become_stop_sequences() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        let mut one = base();
        one["stop"] = json!("END");
        assert_eq!(req(one).unwrap()["stop_sequences"], json!(["END"]));
        let mut two = base();
        two["stop"] = json!(["a", "b"]);
        assert_eq!(req(two).unwrap()["stop_sequences"], json!(["a", "b"]));
        let mut none = base();
        none["stop"] = Value::Null;
        assert!(req(none).unwrap().get("stop_sequences").is_none());
        let mut bad = base();
        bad["stop"] = json!([1]);
        assert!(refused(bad).contains("`stop`"));
    }

    #[test]
    fn max_tokens_defaults_and_prefers_max_completion_tokens() {
        let out = req(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(out["max_tokens"], json!(DEFAULT_MAX_TOKENS));
        assert!(out.get("stream").is_none());
        let out = req(json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 50, "max_completion_tokens": 20}))
        .unwrap();
        assert_eq!(out["max_tokens"], json!(20));
        let bad = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0});
        assert!(refused(bad).contains("max_tokens"));
    }

    #[test]
    fn requests_that_cannot_be_translated_are_refused() {
        assert!(refused(json!({"model": "m", "messages": [{"role": "system", "content": "s"}]})).contains("`user`"));
        assert!(refused(json!({"model": "m", "messages": []})).contains("`user`"));
        let e = refused(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "function", "content": "y"}]}),
        );
        assert!(e.contains("messages[1]") && e.contains("`function`"), "{e}");
        assert!(refused(json!({"model": "m"})).contains("`messages`"));
        assert!(refused(json!({"messages": [{"role": "user", "content": "x"}]})).contains("`model`"));
        let e = refused(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}));
        assert!(e.contains("`n`"));
        let e = refused(json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}));
        assert!(e.contains("input_audio"), "{e}");
        let e = refused(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": []}));
        assert!(e.contains("tools"));
    }

    #[test]
    fn tools_and_tool_turns_are_translated() {
        let out = req(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "And this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ]},
            ],
            "tools": [
                {"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
                {"type": "function", "function": {"name": "time"}},
            ],
            "tool_choice": "required",
            "parallel_tool_calls": false,
        }))
        .unwrap();
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
                    {"type": "text", "text": "And this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                ]},
            ])
        );
        assert_eq!(
            out["tools"],
            json!([
                {"name": "weather", "description": "Weather of a city",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                {"name": "time", "input_schema": {"type": "object", "properties": {}}},
            ])
        );
        assert_eq!(
            out["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        let named = req(json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}))
        .unwrap();
        assert_eq!(named["tool_choice"], json!({"type": "tool", "name": "f"}));
        let e = refused(json!({"model": "m", "messages": [{"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]}));
        assert!(e.contains("arguments"), "{e}");
    }

    fn message(stop_reason: &str) -> Value {
        json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-real-name",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
            "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 5},
        })
    }

    #[test]
    fn answers_become_chat_completions() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
        ] {
            let out = response(&message(stop), "claude-x").unwrap();
            let created = out["created"].as_u64().unwrap();
            assert!(created > 1_600_000_000);
            assert_eq!(
                out,
                json!({
                    "id": "msg_01", "object": "chat.completion", "created": created, "model": "claude-x",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                        "logprobs": null, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
                }),
                "{stop}"
            );
        }
    }

    #[test]
    fn an_answer_with_tool_use_and_cache_tokens() {
        let answer = json!({
            "id": "msg_02", "type": "message", "role": "assistant", "model": "x",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 7, "output_tokens": 4},
        });
        let out = response(&answer, "m").unwrap();
        assert_eq!(
            out["choices"][0]["message"],
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
            ]})
        );
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24,
                "prompt_tokens_details": {"cached_tokens": 7}})
        );
    }

    #[test]
    fn error_bodies_and_other_answers_are_errors() {
        let body = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        match response(&body, "m") {
            Err(e @ TranslateError::Provider { .. }) => {
                assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
                assert!(e.to_string().contains("overloaded_error"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            response(&json!({"hello": 1}), "m"),
            Err(TranslateError::Answer(_))
        ));
        let mut no_usage = message("end_turn");
        no_usage.as_object_mut().unwrap().remove("usage");
        assert!(matches!(response(&no_usage, "m"), Err(TranslateError::Answer(_))));
    }

    /// A stream as Anthropic sends it.
    const STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-real\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\
\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\
\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\
\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\
\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\", wor\"}}\n\
\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ld!\\n\"}}\n\
\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\
\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\
\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\
\n";

    const CREATED: u64 = 1_700_000_000;

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({"id": "msg_01", "object": "chat.completion.chunk", "created": CREATED, "model": "claude-x",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    /// Payloads as values (`[DONE]` as a string).
    fn values(payloads: &[String]) -> Vec<Value> {
        payloads
            .iter()
            .map(|p| serde_json::from_str(p).unwrap_or_else(|_| json!(p)))
            .collect()
    }

    fn translate(pieces: &[&[u8]]) -> Vec<String> {
        let mut reader = sse::Reader::default();
        let mut translator = StreamTranslator::at("claude-x", CREATED);
        let mut out = Vec::new();
        for piece in pieces {
            reader.feed(piece, |e| out.extend(translator.event(&e))).unwrap();
        }
        assert!(translator.done());
        out
    }

    #[test]
    fn a_stream_translates_event_by_event() {
        let mut translator = StreamTranslator::at("claude-x", CREATED);
        let mut per_event = Vec::new();
        sse::Reader::default()
            .feed(STREAM.as_bytes(), |e| {
                per_event.push((e.name.clone(), translator.event(&e)))
            })
            .unwrap();
        let counts: Vec<(&str, usize)> = per_event.iter().map(|(n, p)| (n.as_str(), p.len())).collect();
        assert_eq!(
            counts,
            [
                ("message_start", 1),
                ("content_block_start", 0),
                ("ping", 0),
                ("content_block_delta", 1),
                ("content_block_delta", 1),
                ("content_block_delta", 1),
                ("content_block_stop", 0),
                ("message_delta", 2),
                ("message_stop", 1),
            ]
        );
        let payloads: Vec<String> = per_event.into_iter().flat_map(|(_, p)| p).collect();
        assert_eq!(
            values(&payloads),
            vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "Hello"}), Value::Null),
                chunk(json!({"content": ", wor"}), Value::Null),
                chunk(json!({"content": "ld!\n"}), Value::Null),
                chunk(json!({}), json!("stop")),
                json!({"id": "msg_01", "object": "chat.completion.chunk", "created": CREATED, "model": "claude-x",
                    "choices": [], "usage": {"prompt_tokens": 29, "completion_tokens": 15, "total_tokens": 44,
                        "prompt_tokens_details": {"cached_tokens": 4}}}),
                json!("[DONE]"),
            ]
        );
        // What the gateway's meter reads of them.
        let chunks: Vec<Chunk> = payloads.iter().map(|p| Chunk::read(p)).collect();
        let text: String = chunks.iter().map(|c| c.content.as_str()).collect();
        assert_eq!(text, "Hello, world!\n");
        assert_eq!(chunks[4].finish_reason.as_deref(), Some("stop"));
        assert!(chunks[5].usage_only);
        assert_eq!(chunks[5].usage.map(|u| (u.prompt, u.completion)), Some((29, 15)));
        assert!(chunks[6].done);

        let whole = translate(&[STREAM.as_bytes()]);
        assert_eq!(whole, payloads);
        let bytes = STREAM.as_bytes();
        for split in 1..bytes.len() {
            assert_eq!(
                translate(&[&bytes[..split], &bytes[split..]]),
                whole,
                "split at {split}"
            );
        }
    }

    fn event(name: &str, data: Value) -> sse::Event {
        sse::Event {
            name: name.into(),
            data: data.to_string(),
        }
    }

    #[test]
    fn an_error_event_ends_the_stream() {
        let mut t = StreamTranslator::at("claude-x", CREATED);
        t.event(&event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_01", "usage": {"input_tokens": 3}}}),
        ));
        let out = t.event(&event(
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ));
        assert_eq!(
            values(&out),
            vec![
                json!({"error": {"message": "Overloaded", "type": "api_error", "param": null, "code": "overloaded_error"}})
            ]
        );
        assert_eq!(Chunk::read(&out[0]).error.as_deref(), Some("Overloaded"));
        assert!(t.done());
        assert!(
            t.event(&event("message_stop", json!({"type": "message_stop"})))
                .is_empty()
        );

        let mut t = StreamTranslator::at("claude-x", CREATED);
        let out = t.event(&sse::Event {
            name: "content_block_delta".into(),
            data: "{not json".into(),
        });
        assert_eq!(values(&out)[0]["error"]["code"], json!("provider_error"));
        assert!(t.done());
    }

    #[test]
    fn a_stream_with_a_tool_call_and_a_length_stop() {
        let mut t = StreamTranslator::at("claude-x", CREATED);
        let events = [
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_01", "usage": {"input_tokens": 9, "output_tokens": 1}}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me look."}}),
            ),
            event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
            ),
            event("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
            event(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 30}}),
            ),
            event("message_stop", json!({"type": "message_stop"})),
        ];
        let out: Vec<String> = events.iter().flat_map(|e| t.event(e)).collect();
        let call = |v: Value| chunk(json!({"tool_calls": [v]}), Value::Null);
        assert_eq!(
            values(&out),
            vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "Let me look."}), Value::Null),
                call(
                    json!({"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": ""}})
                ),
                call(json!({"index": 0, "function": {"arguments": "{\"city\": "}})),
                call(json!({"index": 0, "function": {"arguments": "\"Paris\"}"}})),
                chunk(json!({}), json!("tool_calls")),
                json!({"id": "msg_01", "object": "chat.completion.chunk", "created": CREATED, "model": "claude-x",
                    "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39}}),
                json!("[DONE]"),
            ]
        );

        let mut t = StreamTranslator::at("claude-x", CREATED);
        t.event(&event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 1}}}),
        ));
        let out = t.event(&event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 2}}),
        ));
        assert_eq!(values(&out)[0]["choices"][0]["finish_reason"], json!("length"));
    }
}
