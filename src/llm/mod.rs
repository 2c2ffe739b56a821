//! The LLM gateway: routes of `kind = "llm"` serve the OpenAI-compatible HTTP API (with SSE streams) and a
//! WebSocket streaming protocol in front of LLM providers, with virtual keys, token limits, usage and cost.

pub mod store;
