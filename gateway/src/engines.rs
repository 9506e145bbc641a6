//! The engines a gateway sends requests to: the configured (or discovered) addresses, the
//! requests in flight on each, which refused connections lately, and which node each one
//! announced itself to (from the followed daemons' `Stats`), and the LoRA adapters it serves
//! (from its `/v1/models`, [`super::adapters`]).

use super::adapters::{Adapter, Lister};
use super::pick::Candidate;
use kvtier_core::block_key::Extra;
use kvtier_router::feed::Shared;
use kvtier_router::index::NodeId;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long an engine that refused a connection is tried only after the others.
pub const DOWN_FOR: Duration = Duration::from_secs(5);

#[derive(Default)]
struct EngineState {
    in_flight: Arc<AtomicU32>,
    down_until: Option<Instant>,
    adapters: Vec<Adapter>,
}

/// The engine table.
#[derive(Default)]
pub struct Engines {
    table: Mutex<BTreeMap<String, EngineState>>,
}

/// One request in flight on an engine: counted until dropped (the response ended).
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Engines {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, EngineState>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an engine ("host:port"); known ones are kept as they are.
    pub fn add(&self, address: &str) {
        self.lock().entry(address.to_string()).or_default();
    }

    /// Removes an engine (requests in flight on it finish).
    pub fn remove(&self, address: &str) {
        self.lock().remove(address);
    }

    /// The configured engines' addresses.
    pub fn addresses(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Counts a request on `address` until the returned guard is dropped.
    pub fn start(&self, address: &str) -> InFlight {
        let counter = Arc::clone(&self.lock().entry(address.to_string()).or_default().in_flight);
        counter.fetch_add(1, Relaxed);
        InFlight(counter)
    }

    /// Records that `address` refused a connection: it is tried last for [`DOWN_FOR`].
    pub fn refused(&self, address: &str) {
        if let Some(e) = self.lock().get_mut(address) {
            e.down_until = Some(Instant::now() + DOWN_FOR);
        }
    }

    /// Records that `address` answered.
    pub fn answered(&self, address: &str) {
        if let Some(e) = self.lock().get_mut(address) {
            e.down_until = None;
        }
    }

    /// Records the LoRA adapters `address` serves now.
    pub fn set_adapters(&self, address: &str, adapters: Vec<Adapter>) {
        if let Some(e) = self.lock().get_mut(address) {
            e.adapters = adapters;
        }
    }

    /// The adapter named `model` on the first engine that serves one by that name (its base
    /// model names the tokenizer).
    pub fn adapter(&self, model: &str) -> Option<Adapter> {
        self.lock().values().find_map(|e| e.adapters.iter().find(|a| a.name == model).cloned())
    }

    /// How many adapters `address` listed last.
    pub fn adapter_count(&self, address: &str) -> usize {
        self.lock().get(address).map_or(0, |e| e.adapters.len())
    }

    /// Requests in flight on `address`.
    pub fn in_flight(&self, address: &str) -> u32 {
        self.lock().get(address).map_or(0, |e| e.in_flight.load(Relaxed))
    }

    /// The candidates for a request for `model`: the configured engines (only those in
    /// `subset` when given), each with the node it announced itself to and that node's
    /// namespaces for it, and the adapter `model` names on it. Engines that serve neither a
    /// model nor an adapter named `model` (by their announced served models and listed
    /// adapters) are left out, unless that leaves none (or `model` is empty: a request for no
    /// model).
    pub fn candidates(&self, feed: &Shared, model: &str, subset: Option<&[String]>) -> Vec<Candidate> {
        let nodes = feed.nodes();
        let views = feed.views();
        let now = Instant::now();
        let table = self.lock();
        // A name some engine lists as an adapter is served only by the engines listing it.
        let an_adapter = table.values().any(|s| s.adapters.iter().any(|a| a.name == model));
        let mut all: Vec<(Candidate, bool)> = table
            .iter()
            .filter(|(address, _)| subset.is_none_or(|s| s.iter().any(|a| a == *address)))
            .map(|(address, state)| {
                // The first healthy node it announced itself to.
                let announced = nodes.iter().enumerate().find_map(|(i, n)| {
                    let healthy = views.get(i).is_some_and(|v| v.healthy);
                    let e = n.engines.iter().find(|e| e.engine.as_ref().is_some_and(|e| &e.address == address))?;
                    healthy.then(|| (i as NodeId, e.clone()))
                });
                let adapter = state.adapters.iter().find(|a| a.name == model);
                let serves = model.is_empty()
                    || adapter.is_some()
                    || !an_adapter
                        && announced.as_ref().is_none_or(|(_, e)| {
                            let models = &e.engine.as_ref().map(|e| e.served_models.clone()).unwrap_or_default();
                            models.is_empty() || models.iter().any(|m| m == model)
                        });
                let candidate = Candidate {
                    lora: adapter.map(|a| Extra::lora(&a.name, &a.path)),
                    address: address.clone(),
                    node: announced.as_ref().map(|(n, _)| *n),
                    namespaces: announced.map(|(_, e)| e.namespaces).unwrap_or_default(),
                    in_flight: state.in_flight.load(Relaxed),
                    healthy: state.down_until.is_none_or(|t| t <= now),
                };
                (candidate, serves)
            })
            .collect();
        if all.iter().any(|(_, serves)| *serves) {
            all.retain(|(_, serves)| *serves);
        }
        all.into_iter().map(|(c, _)| c).collect()
    }
}

/// Follows the engines `name` resolves to ("host:port", e.g. a headless Service over the engine
/// pods), re-resolving every `every`.
pub async fn discover(engines: Arc<Engines>, name: String, every: Duration) {
    kvtier_router::feed::follow_dns(name, every, |a| engines.add(a), |a| engines.remove(a)).await
}

/// Asks every engine for its LoRA adapters every `every`, forever; an engine that does not
/// answer keeps what it listed last (its refusals already move requests away from it).
pub async fn follow_adapters(engines: Arc<Engines>, every: Duration) {
    let lister = Lister::default();
    loop {
        let mut polls = tokio::task::JoinSet::new();
        for address in engines.addresses() {
            let lister = lister.clone();
            polls.spawn(async move { (lister.list(&address).await, address) });
        }
        while let Some(Ok((listed, address))) = polls.join_next().await {
            match listed {
                Ok(adapters) => engines.set_adapters(&address, adapters),
                Err(e) => tracing::debug!(engine = %address, "listing adapters: {e}"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_until_the_guard_drops_and_refusals_mark_down() {
        let e = Engines::default();
        e.add("a:1");
        let (g1, g2) = (e.start("a:1"), e.start("a:1"));
        assert_eq!(e.in_flight("a:1"), 2);
        drop(g1);
        assert_eq!(e.in_flight("a:1"), 1);
        drop(g2);
        assert_eq!(e.in_flight("a:1"), 0);
        e.refused("a:1");
        let feed = Shared::new(10, Duration::from_secs(1));
        assert!(!e.candidates(&feed, "m", None)[0].healthy);
        e.answered("a:1");
        assert!(e.candidates(&feed, "m", None)[0].healthy);
    }

    #[test]
    fn a_subset_limits_the_candidates() {
        let e = Engines::default();
        e.add("a:1");
        e.add("b:1");
        let feed = Shared::new(10, Duration::from_secs(1));
        assert_eq!(e.candidates(&feed, "m", None).len(), 2);
        let only = ["b:1".to_string()];
        let c = e.candidates(&feed, "m", Some(&only));
        assert_eq!(c.iter().map(|c| c.address.as_str()).collect::<Vec<_>>(), vec!["b:1"]);
        assert!(e.candidates(&feed, "m", Some(&[])).is_empty());
    }

    #[test]
    fn an_adapter_request_goes_to_the_engines_serving_it_keyed_by_their_path() {
        let e = Engines::default();
        for a in ["a:1", "b:1", "c:1"] {
            e.add(a);
        }
        let sql = |path: &str| Adapter { name: "sql".into(), path: path.into(), base: "m".into() };
        e.set_adapters("a:1", vec![sql("/a/sql")]);
        e.set_adapters("c:1", vec![sql("/c/sql")]);
        e.set_adapters("gone:1", vec![sql("/x")]);
        let feed = Shared::new(10, Duration::from_secs(1));
        let c = e.candidates(&feed, "sql", None);
        let got: Vec<_> = c.iter().map(|c| (c.address.as_str(), c.lora.clone())).collect();
        assert_eq!(got, vec![("a:1", Some(Extra::lora("sql", "/a/sql"))), ("c:1", Some(Extra::lora("sql", "/c/sql")))]);
        assert_eq!(e.adapter("sql").map(|a| a.base), Some("m".into()));
        assert!(e.candidates(&feed, "m", None).iter().all(|c| c.lora.is_none()));
        assert_eq!(e.candidates(&feed, "other", None).len(), 3, "nobody serves it: every engine may try");
        e.set_adapters("a:1", vec![]);
        assert_eq!(e.candidates(&feed, "sql", None).len(), 1, "unloaded adapters are forgotten");
    }
}
