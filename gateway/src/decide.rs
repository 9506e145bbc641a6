//! One routing decision: request body -> model, salt and tokens -> block keys -> the engines
//! ranked by what their nodes hold and their load. Shared by the HTTP gateway and the endpoint
//! picker; metrics and the log line per decision are kept here too.

use super::engines::Engines;
use super::openai::{parse, Api, PromptInput, Request};
use super::pick::{rank, Ranking};
use super::tokenize::ModelTokenizer;
use kvtier_core::histogram::Histogram;
use kvtier_router::feed::Shared;
use kvtier_router::score::{Reason, Weights};
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where one request goes.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Engines to try, best first (the first that accepts a connection serves it).
    pub endpoints: Vec<String>,
    /// Leading blocks of the prompt the first engine's node holds in the host tier.
    pub host_blocks: u32,
    /// Leading blocks held only on its disk.
    pub disk_blocks: u32,
    /// The prompt's full blocks (0 when not keyed).
    pub blocks: u32,
    /// Prompt tokens (0 when not keyed).
    pub tokens: usize,
    /// "prefix", "least-loaded", or "unkeyed: why".
    pub reason: String,
    /// Time the decision took, tokenization included.
    pub took: Duration,
    /// Of which tokenizing.
    pub tokenizing: Duration,
    /// The parsed request (None for requests routed without a body).
    pub request: Option<Request>,
}

/// Why no endpoint was chosen.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The body is malformed (400).
    BadRequest(String),
    /// No engine may take it (503).
    NoEndpoint(String),
    /// Every engine has its most requests in flight (429).
    Overloaded(String),
}

/// The tokenizers of the models a gateway serves.
#[derive(Default)]
pub struct Tokenizers {
    /// By served model name.
    pub by_model: HashMap<String, Arc<ModelTokenizer>>,
    /// For models not named there.
    pub fallback: Option<Arc<ModelTokenizer>>,
}

/// Counters of the gateway, rendered as Prometheus text.
#[derive(Default)]
pub struct Metrics {
    by_prefix: AtomicU64,
    by_load: AtomicU64,
    unkeyed: AtomicU64,
    no_endpoint: AtomicU64,
    bad_request: AtomicU64,
    overloaded: AtomicU64,
    host_blocks: AtomicU64,
    disk_blocks: AtomicU64,
    prompt_blocks: AtomicU64,
    /// Connections refused by an engine, each followed by a try on the next candidate.
    pub retries: AtomicU64,
    /// Requests that failed upstream after the connection (answered 502).
    pub upstream_errors: AtomicU64,
    decision: Histogram,
    tokenize: Histogram,
}

/// The gateway's decision state.
pub struct Gateway {
    /// The followed daemons' index and engines.
    pub feed: Arc<Shared>,
    /// The engines requests may go to.
    pub engines: Arc<Engines>,
    tokenizers: HashMap<String, Arc<ModelTokenizer>>,
    fallback: Option<Arc<ModelTokenizer>>,
    weights: Weights,
    max_in_flight: Option<u32>,
    turn: AtomicUsize,
    /// Counters.
    pub metrics: Metrics,
}

impl Gateway {
    /// A gateway over `feed` and `engines`, tokenizing with `tokenizers`; `max_in_flight`:
    /// requests refused (429) while every engine has that many in flight.
    pub fn new(
        feed: Arc<Shared>,
        engines: Arc<Engines>,
        tokenizers: Tokenizers,
        weights: Weights,
        max_in_flight: Option<u32>,
    ) -> Arc<Self> {
        Arc::new(Self {
            feed,
            engines,
            tokenizers: tokenizers.by_model,
            fallback: tokenizers.fallback,
            weights,
            max_in_flight,
            turn: AtomicUsize::new(0),
            metrics: Metrics::default(),
        })
    }

    /// Decides where a request of `api` with `body` goes; only engines in `subset` when given
    /// (the data plane's subset hint).
    pub fn decide(&self, api: Api, body: &[u8], subset: Option<&[String]>) -> Result<Decision, Refusal> {
        let started = Instant::now();
        let request = parse(api, body).map_err(|e| {
            self.metrics.bad_request.fetch_add(1, Relaxed);
            Refusal::BadRequest(e.0)
        })?;
        // An adapter is tokenized as its base model (vLLM does the same).
        let base = || self.engines.adapter(&request.model).and_then(|a| self.tokenizers.get(&a.base).cloned());
        let tokenizer = self.tokenizers.get(&request.model).cloned().or_else(base).or_else(|| self.fallback.clone());
        let tokens = match (&request.prompt, tokenizer) {
            (None, _) => Err("no prompt the gateway can key".to_string()),
            (Some(PromptInput::Tokens(t)), _) => Ok(t.clone()),
            (Some(_), None) => Err(format!("no tokenizer for model {:?}", request.model)),
            (Some(p), Some(t)) => t.tokens(p).map_err(|e| e.0),
        };
        let tokenizing = started.elapsed();
        self.metrics.tokenize.observe(tokenizing);
        let mut d = self.choose(&request.model, &request.cache_salt, tokens.as_deref().ok(), subset, started)?;
        d.tokenizing = tokenizing;
        if let Err(why) = tokens {
            self.metrics.unkeyed.fetch_add(1, Relaxed);
            d.reason = format!("unkeyed: {why}");
        }
        d.request = Some(request);
        self.log(&d);
        Ok(d)
    }

    /// Decides where a request without a prompt (e.g. `GET /v1/models`) goes: by load alone.
    pub fn decide_any(&self, subset: Option<&[String]>) -> Result<Decision, Refusal> {
        self.choose("", "", None, subset, Instant::now())
    }

    fn choose(
        &self,
        model: &str,
        salt: &str,
        tokens: Option<&[u32]>,
        subset: Option<&[String]>,
        started: Instant,
    ) -> Result<Decision, Refusal> {
        let candidates = self.engines.candidates(&self.feed, model, subset);
        if let Some(most) = self.max_in_flight {
            if !candidates.is_empty() && candidates.iter().all(|c| c.in_flight >= most) {
                self.metrics.overloaded.fetch_add(1, Relaxed);
                return Err(Refusal::Overloaded(format!("every engine has {most} requests in flight")));
            }
        }
        let Ranking { order, reason, blocks } = {
            let index = self.feed.index();
            rank(&index, tokens, salt, &candidates, &self.weights, self.turn.fetch_add(1, Relaxed))
        };
        let Some(best) = order.first().copied() else {
            self.metrics.no_endpoint.fetch_add(1, Relaxed);
            return Err(Refusal::NoEndpoint("no inference engine to send the request to".into()));
        };
        let took = started.elapsed();
        self.metrics.decision.observe(took);
        match reason {
            Reason::Prefix => self.metrics.by_prefix.fetch_add(1, Relaxed),
            Reason::LeastLoaded => self.metrics.by_load.fetch_add(1, Relaxed),
        };
        self.metrics.host_blocks.fetch_add(best.host as u64, Relaxed);
        self.metrics.disk_blocks.fetch_add((best.matched - best.host) as u64, Relaxed);
        self.metrics.prompt_blocks.fetch_add(blocks as u64, Relaxed);
        Ok(Decision {
            endpoints: order.iter().map(|r| candidates[r.candidate].address.clone()).collect(),
            host_blocks: best.host,
            disk_blocks: best.matched - best.host,
            blocks,
            tokens: tokens.map_or(0, <[u32]>::len),
            reason: reason.name().to_string(),
            took,
            tokenizing: Duration::ZERO,
            request: None,
        })
    }

    fn log(&self, d: &Decision) {
        tracing::info!(
            endpoint = %d.endpoints.first().map_or("", String::as_str),
            model = %d.request.as_ref().map_or("", |r| r.model.as_str()),
            host_blocks = d.host_blocks,
            disk_blocks = d.disk_blocks,
            blocks = d.blocks,
            tokens = d.tokens,
            reason = %d.reason,
            added_us = d.took.as_micros() as u64,
            tokenize_us = d.tokenizing.as_micros() as u64,
            "route"
        );
    }

    /// Prometheus text of the gateway's state.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let mut o = String::new();
        let mut family = |name: &str, help: &str, kind: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        family(
            "kvtier_gateway_decisions_total",
            "Routing decisions by reason (unkeyed ones are also counted under their reason).",
            "counter",
            &[
                ("{reason=\"prefix\"}", m.by_prefix.load(Relaxed)),
                ("{reason=\"least-loaded\"}", m.by_load.load(Relaxed)),
                ("{reason=\"unkeyed\"}", m.unkeyed.load(Relaxed)),
                ("{reason=\"no-endpoint\"}", m.no_endpoint.load(Relaxed)),
                ("{reason=\"bad-request\"}", m.bad_request.load(Relaxed)),
                ("{reason=\"overloaded\"}", m.overloaded.load(Relaxed)),
            ],
        );
        family(
            "kvtier_gateway_matched_blocks_total",
            "Prompt blocks the chosen engine's node held, by tier, and all prompt blocks.",
            "counter",
            &[
                ("{tier=\"host\"}", m.host_blocks.load(Relaxed)),
                ("{tier=\"disk\"}", m.disk_blocks.load(Relaxed)),
                ("{tier=\"prompt\"}", m.prompt_blocks.load(Relaxed)),
            ],
        );
        family(
            "kvtier_gateway_retries_total",
            "Connections an engine refused; the request went to the next candidate.",
            "counter",
            &[("", m.retries.load(Relaxed))],
        );
        family(
            "kvtier_gateway_upstream_errors_total",
            "Requests that failed at the engine after connecting.",
            "counter",
            &[("", m.upstream_errors.load(Relaxed))],
        );
        let engines = self.engines.addresses();
        let per_engine = |value: &dyn Fn(&str) -> u64| -> Vec<(String, u64)> {
            engines.iter().map(|a| (format!("{{endpoint=\"{a}\"}}"), value(a))).collect()
        };
        let gauges = [
            (
                "kvtier_gateway_in_flight",
                "Requests in flight per engine.",
                per_engine(&|a| self.engines.in_flight(a) as u64),
            ),
            (
                "kvtier_gateway_adapters",
                "LoRA adapters each engine lists in /v1/models.",
                per_engine(&|a| self.engines.adapter_count(a) as u64),
            ),
        ];
        for (name, help, rows) in &gauges {
            let rows: Vec<(&str, u64)> = rows.iter().map(|(l, v)| (l.as_str(), *v)).collect();
            family(name, help, "gauge", &rows);
        }
        let _ = writeln!(
            o,
            "# HELP kvtier_gateway_seconds Time the gateway adds per request.\n# TYPE kvtier_gateway_seconds histogram"
        );
        m.decision.render(&mut o, "kvtier_gateway_seconds", "op=\"decide\"");
        m.tokenize.render(&mut o, "kvtier_gateway_seconds", "op=\"tokenize\"");
        o
    }
}
