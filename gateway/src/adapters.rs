//! The LoRA adapters each engine serves, learned from its OpenAI `/v1/models`: vLLM lists every
//! loaded adapter as a card whose `id` is the adapter's name, `root` the path it was loaded
//! from and `parent` its base model. The path is part of the adapter's block keys (vLLM keys
//! a block of an adapter request with `("lora", name, path)`), so a gateway can key an adapter
//! request only once it knows where that engine loaded the adapter from. Adapters loaded or
//! unloaded at run time (`/v1/load_lora_adapter`) are seen at the next poll
//! (the engine table polls every engine with a [`Lister`]).

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;

/// Most adapters kept per engine (vLLM's own limit on loaded adapters is far lower).
pub const MAX_ADAPTERS: usize = 1024;
/// Longest adapter name or path kept, in bytes.
pub const MAX_FIELD_BYTES: usize = 4096;
/// Largest `/v1/models` body read.
pub const MAX_MODELS_BYTES: usize = 4 << 20;
/// How long one poll of one engine may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// A LoRA adapter one engine serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adapter {
    /// The name requests give as `model`.
    pub name: String,
    /// Where the engine loaded it from (its `lora_path`).
    pub path: String,
    /// The served name of its base model (whose tokenizer the engine uses for it).
    pub base: String,
}

/// The adapters listed in an OpenAI `/v1/models` body: the cards with a `parent`. Cards with
/// a name or path longer than [`MAX_FIELD_BYTES`] are skipped, and at most [`MAX_ADAPTERS`]
/// kept.
pub fn adapters_of(body: &[u8]) -> Result<Vec<Adapter>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("/v1/models is not JSON: {e}"))?;
    let cards = value.get("data").and_then(Value::as_array).ok_or("/v1/models has no `data` list")?;
    let field = |card: &Value, key: &str| {
        card.get(key).and_then(Value::as_str).filter(|s| !s.is_empty() && s.len() <= MAX_FIELD_BYTES).map(String::from)
    };
    Ok(cards
        .iter()
        .filter_map(|card| {
            Some(Adapter { name: field(card, "id")?, path: field(card, "root")?, base: field(card, "parent")? })
        })
        .take(MAX_ADAPTERS)
        .collect())
}

/// Asks engines for their adapters over HTTP.
#[derive(Clone)]
pub struct Lister {
    client: Client<HttpConnector, Empty<bytes::Bytes>>,
}

impl Default for Lister {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(POLL_TIMEOUT));
        Self { client: Client::builder(TokioExecutor::new()).build(connector) }
    }
}

impl Lister {
    /// The adapters the engine at `address` ("host:port") lists now.
    pub async fn list(&self, address: &str) -> Result<Vec<Adapter>, String> {
        tokio::time::timeout(POLL_TIMEOUT, self.get(address)).await.unwrap_or_else(|_| Err("timed out".into()))
    }

    async fn get(&self, address: &str) -> Result<Vec<Adapter>, String> {
        let uri: hyper::Uri = format!("http://{address}/v1/models").parse().map_err(|e| format!("{e}"))?;
        let response = self.client.get(uri).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("/v1/models answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_MODELS_BYTES).collect().await.map_err(|e| e.to_string())?;
        adapters_of(&body.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cards_with_a_parent_are_the_adapters() {
        let body = br#"{"object":"list","data":[
            {"id":"tiny","object":"model","root":"/models/tiny","parent":null},
            {"id":"sql","object":"model","root":"/adapters/sql","parent":"tiny"},
            {"id":"odd","root":"","parent":"tiny"},
            {"id":"chat","root":"/adapters/chat","parent":"tiny","max_model_len":null}]}"#;
        let a = adapters_of(body).unwrap();
        assert_eq!(a.len(), 2, "the base model and the card without a path are not adapters");
        assert_eq!(a[0], Adapter { name: "sql".into(), path: "/adapters/sql".into(), base: "tiny".into() });
        assert_eq!(a[1].name, "chat");
    }

    #[test]
    fn malformed_or_oversized_listings_are_refused_or_cut() {
        assert!(adapters_of(b"not json").is_err());
        assert!(adapters_of(br#"{"data": 3}"#).is_err());
        let long = "x".repeat(MAX_FIELD_BYTES + 1);
        let body = serde_json::json!({"data": [{"id": "a", "root": long, "parent": "m"}]}).to_string();
        assert!(adapters_of(body.as_bytes()).unwrap().is_empty());
        let many: Vec<Value> = (0..MAX_ADAPTERS + 5)
            .map(|i| serde_json::json!({"id": format!("a{i}"), "root": "/p", "parent": "m"}))
            .collect();
        let body = serde_json::json!({ "data": many }).to_string();
        assert_eq!(adapters_of(body.as_bytes()).unwrap().len(), MAX_ADAPTERS);
    }
}
