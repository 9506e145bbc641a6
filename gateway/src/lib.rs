//! kvtier's inference gateway. An OpenAI request becomes the token ids vLLM will compute
//! ([`openai`], [`tokenize`]), those become the exact block keys the engines' connectors saved
//! the prompt under (`kvtier_core::block_key`), and the engines are ranked by the prefix their
//! node holds in its host and disk tiers against their load ([`pick`], [`engines`],
//! [`decide`]); LoRA adapters are keyed as each engine loaded them ([`adapters`]). Two faces:
//! an HTTP reverse proxy ([`http`], `kvtier gateway`) and an Envoy ext_proc endpoint picker for
//! the Gateway API Inference Extension ([`ext_proc`], `kvtier picker`). The index comes from the daemons' router feed (`kvtier_router::feed`).

#![warn(missing_docs)]

pub mod adapters;
pub mod decide;
pub mod engines;
pub mod ext_proc;
pub mod http;
pub mod openai;
pub mod pick;
pub mod tokenize;
