//! What the gateway reads from an OpenAI request body: the model, the tenant's cache salt and
//! the prompt, in the shape vLLM's OpenAI server gives them meaning. Pure.

use serde_json::{Map, Value};

/// The API a request is for, from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

impl Api {
    /// The API of a request path (`None` for the ones the gateway only forwards).
    pub fn of_path(path: &str) -> Option<Self> {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Api::Chat)
        } else if path.ends_with("/completions") {
            Some(Api::Completions)
        } else {
            None
        }
    }
}

/// A prompt as the request gives it.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    /// Text, tokenized with the model's tokenizer (`add_special_tokens` as requested).
    Text {
        /// The text.
        text: String,
        /// Whether the tokenizer adds its special tokens (vLLM: true for completions).
        add_special_tokens: bool,
    },
    /// Token ids given by the client.
    Tokens(Vec<u32>),
    /// Chat messages, rendered with the model's chat template.
    Chat(Box<ChatInput>),
}

/// The chat fields vLLM renders a conversation with.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatInput {
    /// `messages`, as sent.
    pub messages: Vec<Value>,
    /// `tools`, if any.
    pub tools: Option<Value>,
    /// `documents`, if any.
    pub documents: Option<Value>,
    /// `add_generation_prompt` (vLLM's default: true).
    pub add_generation_prompt: bool,
    /// `continue_final_message` (default false).
    pub continue_final_message: bool,
    /// `chat_template_kwargs`, passed to the template.
    pub template_kwargs: Map<String, Value>,
    /// `chat_template` given in the request (vLLM refuses it unless trusted; the gateway then
    /// does not key the request).
    pub template: Option<String>,
    /// `add_special_tokens` (vLLM's default for chat: false).
    pub add_special_tokens: bool,
}

/// What routing needs from a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// `model`.
    pub model: String,
    /// `cache_salt` ("" when absent).
    pub cache_salt: String,
    /// The (first) prompt; `None` when the request has none the gateway can key (e.g.
    /// multimodal content): it is then routed by load alone.
    pub prompt: Option<PromptInput>,
    /// `stream`.
    pub stream: bool,
}

/// Why a body is refused (the gateway answers 400 with it).
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn flag(body: &Map<String, Value>, key: &str, default: bool) -> bool {
    body.get(key).and_then(Value::as_bool).unwrap_or(default)
}

/// Parses a request body of `api`.
pub fn parse(api: Api, body: &[u8]) -> Result<Request, BadRequest> {
    let value: Value = serde_json::from_slice(body).map_err(|e| BadRequest(format!("body is not JSON: {e}")))?;
    let Value::Object(body) = value else { return Err(BadRequest("body is not a JSON object".into())) };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(BadRequest("model not found in request body".into())),
    };
    let cache_salt = body.get("cache_salt").and_then(Value::as_str).unwrap_or_default().to_string();
    let stream = flag(&body, "stream", false);
    let prompt = match api {
        Api::Completions => completion_prompt(&body)?,
        Api::Chat => Some(chat_prompt(&body)?),
    };
    Ok(Request { model, cache_salt, prompt, stream })
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
}

fn completion_prompt(body: &Map<String, Value>) -> Result<Option<PromptInput>, BadRequest> {
    let add_special_tokens = flag(body, "add_special_tokens", true);
    let text = |t: &str| PromptInput::Text { text: t.to_string(), add_special_tokens };
    match body.get("prompt") {
        Some(Value::String(t)) if !t.is_empty() => Ok(Some(text(t))),
        Some(Value::Array(items)) if !items.is_empty() => Ok(match &items[0] {
            // A batch of prompts: routed by the first.
            Value::String(t) => Some(text(t)),
            Value::Array(ids) => token_ids(ids).map(PromptInput::Tokens),
            _ => token_ids(items).map(PromptInput::Tokens),
        }),
        _ => Err(BadRequest("prompt must be a non-empty string, list of strings or token ids".into())),
    }
}

fn chat_prompt(body: &Map<String, Value>) -> Result<PromptInput, BadRequest> {
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m.clone(),
        _ => return Err(BadRequest("messages must be a non-empty list".into())),
    };
    let object = |key: &str| body.get(key).filter(|v| !v.is_null()).cloned();
    Ok(PromptInput::Chat(Box::new(ChatInput {
        messages,
        tools: object("tools"),
        documents: object("documents"),
        add_generation_prompt: flag(body, "add_generation_prompt", true),
        continue_final_message: flag(body, "continue_final_message", false),
        template_kwargs: body.get("chat_template_kwargs").and_then(Value::as_object).cloned().unwrap_or_default(),
        template: body.get("chat_template").and_then(Value::as_str).map(str::to_string),
        add_special_tokens: flag(body, "add_special_tokens", false),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(api: Api, body: &str) -> Result<Request, BadRequest> {
        parse(api, body.as_bytes())
    }

    #[test]
    fn paths_name_their_api() {
        assert_eq!(Api::of_path("/v1/completions"), Some(Api::Completions));
        assert_eq!(Api::of_path("/v1/chat/completions?x=1"), Some(Api::Chat));
        assert_eq!(Api::of_path("/v1/models"), None);
    }

    #[test]
    fn completions_take_text_tokens_and_batches() {
        let r = parse_str(Api::Completions, r#"{"model":"m","prompt":"hi","cache_salt":"s","stream":true}"#).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.cache_salt, "s");
        assert!(r.stream);
        assert_eq!(r.prompt, Some(PromptInput::Text { text: "hi".into(), add_special_tokens: true }));
        let r = parse_str(Api::Completions, r#"{"model":"m","prompt":[5,6,7]}"#).unwrap();
        assert_eq!(r.prompt, Some(PromptInput::Tokens(vec![5, 6, 7])));
        let r = parse_str(Api::Completions, r#"{"model":"m","prompt":[[1,2],[3]]}"#).unwrap();
        assert_eq!(r.prompt, Some(PromptInput::Tokens(vec![1, 2])));
        let r = parse_str(Api::Completions, r#"{"model":"m","prompt":["a","b"],"add_special_tokens":false}"#).unwrap();
        assert_eq!(r.prompt, Some(PromptInput::Text { text: "a".into(), add_special_tokens: false }));
        let r = parse_str(Api::Completions, r#"{"model":"m","prompt":[1,-2]}"#).unwrap();
        assert_eq!(r.prompt, None, "ids that are not token ids: not keyed, still routed");
    }

    #[test]
    fn chat_defaults_follow_vllm() {
        let r = parse_str(Api::Chat, r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        let Some(PromptInput::Chat(c)) = r.prompt else { panic!() };
        assert!(c.add_generation_prompt && !c.continue_final_message && !c.add_special_tokens);
        assert_eq!(c.messages.len(), 1);
    }

    #[test]
    fn malformed_bodies_say_why() {
        for (api, body, why) in [
            (Api::Chat, "{", "not JSON"),
            (Api::Chat, "[1]", "not a JSON object"),
            (Api::Chat, r#"{"messages":[{"role":"user","content":"x"}]}"#, "model not found"),
            (Api::Chat, r#"{"model":"m","messages":[]}"#, "messages"),
            (Api::Completions, r#"{"model":"m","prompt":""}"#, "prompt"),
            (Api::Completions, r#"{"model":"m"}"#, "prompt"),
        ] {
            let e = parse_str(api, body).unwrap_err();
            assert!(e.0.contains(why), "{body}: {e}");
        }
    }
}
