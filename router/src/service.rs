//! `kvtier.v1.RouterService` over gRPC and the router's Prometheus metrics. Translation only:
//! decisions come from [`super::score`] over the followed index.

use super::feed::Shared;
use super::prefetch::Prefetcher;
use super::score::{pick, score, Reason, Weights};
use kvtier_core::block::BlockHash;
use kvtier_core::histogram::Histogram;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::router_service_server::{RouterService, RouterServiceServer};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

/// The router's service state.
pub struct Router {
    shared: Arc<Shared>,
    weights: Weights,
    turn: AtomicUsize,
    by_prefix: AtomicU64,
    by_load: AtomicU64,
    no_endpoint: AtomicU64,
    latency: Histogram,
    prefetcher: Arc<Prefetcher>,
}

impl Router {
    /// A router deciding over `shared` with `weights`; with `prefetch`, a request sent to a node
    /// holding part of its prefix only on disk has that node start reading it back.
    pub fn new(shared: Arc<Shared>, weights: Weights, prefetch: bool) -> Arc<Self> {
        let prefetcher = Prefetcher::new(prefetch, shared.tls.clone());
        Arc::new(Self {
            shared,
            weights,
            turn: AtomicUsize::new(0),
            by_prefix: AtomicU64::new(0),
            by_load: AtomicU64::new(0),
            no_endpoint: AtomicU64::new(0),
            latency: Histogram::default(),
            prefetcher,
        })
    }

    fn scored(&self, req: &pb::RouteRequest) -> Result<Vec<(pb::EndpointScore, u8)>, Status> {
        let ns: [u8; 16] = req.namespace_id[..].try_into().map_err(|_| {
            Status::invalid_argument(format!("namespace_id has {} bytes, not 16", req.namespace_id.len()))
        })?;
        let hashes = req
            .hashes
            .iter()
            .map(|h| BlockHash::new(h).ok_or_else(|| Status::invalid_argument("hashes must have 1 to 32 bytes")))
            .collect::<Result<Vec<_>, _>>()?;
        let nodes = self.shared.nodes();
        let views = self.shared.views();
        let scored = score(&self.shared.index(), &ns, &hashes, &views, &self.weights);
        Ok(scored
            .iter()
            .map(|s| {
                let e = pb::EndpointScore {
                    endpoint: nodes[s.node as usize].endpoint.clone(),
                    score: s.score,
                    matched_blocks: s.matched,
                    host_blocks: s.host,
                    load: s.load,
                    healthy: s.healthy,
                };
                (e, s.node)
            })
            .collect())
    }

    /// Decides one request.
    pub fn route(&self, req: &pb::RouteRequest) -> Result<pb::RouteResponse, Status> {
        let started = Instant::now();
        let ns: [u8; 16] = req.namespace_id[..].try_into().unwrap_or([0; 16]);
        let hashes: Vec<BlockHash> = req.hashes.iter().filter_map(|h| BlockHash::new(h)).collect();
        if hashes.len() != req.hashes.len() || req.namespace_id.len() != 16 {
            return Err(Status::invalid_argument("namespace_id must have 16 bytes and hashes 1 to 32"));
        }
        let views = self.shared.views();
        let scored = score(&self.shared.index(), &ns, &hashes, &views, &self.weights);
        let choice = pick(&scored, self.turn.fetch_add(1, Relaxed));
        self.latency.observe(started.elapsed());
        let Some((node, reason)) = choice else {
            self.no_endpoint.fetch_add(1, Relaxed);
            return Ok(pb::RouteResponse {
                endpoint: String::new(),
                matched_blocks: 0,
                reason: "no healthy endpoint".into(),
            });
        };
        match reason {
            Reason::Prefix => self.by_prefix.fetch_add(1, Relaxed),
            Reason::LeastLoaded => self.by_load.fetch_add(1, Relaxed),
        };
        let (matched, host) = scored.iter().find(|s| s.node == node).map_or((0, 0), |s| (s.matched, s.host));
        let endpoint = self.shared.nodes()[node as usize].endpoint.clone();
        if self.prefetcher.wanted(matched, host) {
            let prefix = req.hashes[..matched as usize].to_vec();
            self.prefetcher.send(endpoint.clone(), req.namespace_id.clone(), prefix);
        }
        Ok(pb::RouteResponse { endpoint, matched_blocks: matched, reason: reason.name().into() })
    }

    /// Prometheus text of the router's state.
    pub fn render_metrics(&self) -> String {
        let mut o = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let nodes = self.shared.nodes();
        let views = self.shared.views();
        let (blocks, dropped, bytes) = {
            let idx = self.shared.index();
            (idx.len(), idx.dropped(), idx.heap_bytes())
        };
        let c = &self.shared.counters;
        gauge(
            "kvtier_router_endpoints",
            "Endpoints followed.",
            "gauge",
            nodes.iter().filter(|n| !n.removed).count() as f64,
        );
        gauge(
            "kvtier_router_endpoints_healthy",
            "Endpoints that may be picked.",
            "gauge",
            views.iter().filter(|v| v.healthy).count() as f64,
        );
        gauge("kvtier_router_index_blocks", "Distinct blocks in the global index.", "gauge", blocks as f64);
        gauge("kvtier_router_index_bytes", "Approximate heap bytes of the global index.", "gauge", bytes as f64);
        gauge(
            "kvtier_router_index_dropped_total",
            "Stores not indexed: the index was full.",
            "counter",
            dropped as f64,
        );
        gauge("kvtier_router_events_total", "Events applied.", "counter", c.events.load(Relaxed) as f64);
        gauge("kvtier_router_snapshots_total", "Snapshots applied.", "counter", c.snapshots.load(Relaxed) as f64);
        gauge("kvtier_router_resumes_total", "Streams resumed after a cut.", "counter", c.resumes.load(Relaxed) as f64);
        gauge("kvtier_router_resyncs_total", "Forced re-snapshots.", "counter", c.resyncs.load(Relaxed) as f64);
        gauge(
            "kvtier_router_expirations_total",
            "Endpoints forgotten after the expiry.",
            "counter",
            c.expirations.load(Relaxed) as f64,
        );
        let _ = writeln!(o, "# HELP kvtier_router_decisions_total Route decisions by reason.\n# TYPE kvtier_router_decisions_total counter");
        let _ = writeln!(o, "kvtier_router_decisions_total{{reason=\"prefix\"}} {}", self.by_prefix.load(Relaxed));
        let _ = writeln!(o, "kvtier_router_decisions_total{{reason=\"least-loaded\"}} {}", self.by_load.load(Relaxed));
        let _ = writeln!(o, "kvtier_router_decisions_total{{reason=\"none\"}} {}", self.no_endpoint.load(Relaxed));
        let p = &self.prefetcher;
        let _ = writeln!(o, "# HELP kvtier_router_prefetches_total Prefetches of disk-only prefixes on the chosen node, by outcome.\n# TYPE kvtier_router_prefetches_total counter");
        for (outcome, n) in [("sent", &p.sent), ("failed", &p.failed), ("skipped", &p.skipped)] {
            let _ = writeln!(o, "kvtier_router_prefetches_total{{outcome=\"{outcome}\"}} {}", n.load(Relaxed));
        }
        let name = "kvtier_router_decision_seconds";
        let _ = writeln!(o, "# HELP {name} Time to decide one Route.\n# TYPE {name} histogram");
        self.latency.render(&mut o, name, "op=\"route\"");
        o
    }
}

/// The gRPC face of a [`Router`].
#[derive(Clone)]
pub struct RouterGrpc(pub Arc<Router>);

#[tonic::async_trait]
impl RouterService for RouterGrpc {
    async fn route(&self, req: Request<pb::RouteRequest>) -> Result<Response<pb::RouteResponse>, Status> {
        self.0.route(req.get_ref()).map(Response::new)
    }

    async fn score(&self, req: Request<pb::RouteRequest>) -> Result<Response<pb::ScoreResponse>, Status> {
        let endpoints = self.0.scored(req.get_ref())?.into_iter().map(|(e, _)| e).collect();
        Ok(Response::new(pb::ScoreResponse { endpoints }))
    }
}

/// The tonic service of a [`Router`].
pub fn grpc(router: Arc<Router>) -> RouterServiceServer<RouterGrpc> {
    RouterServiceServer::new(RouterGrpc(router))
}
