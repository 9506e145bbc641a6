//! The router feed: `kvtier.v1.CacheService` (batched lookup, the resumable event stream, node
//! stats, health) and the standard `grpc.health.v1` service, over TCP and a unix socket, next to
//! `kvtier.v1.TransferService` (`super::transfer`) on the same ports.
//! Translation only: every answer comes from `Node`.

use super::{parse_prefix, tier_stats, wire_tier};
use crate::node::Node;
use bytes::Bytes;
use kvtier_core::block::{BlockHash, BlockKey};
use kvtier_core::cache::TierKind;
use kvtier_core::events::{Event, EventKind};
use kvtier_core::namespace::NamespaceId;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::cache_service_server::{CacheService, CacheServiceServer};
use kvtier_proto::v1::watch_events_response::Payload;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Most queries in one `Lookup`.
pub const MAX_QUERIES: usize = 1024;
/// Blocks per snapshot page and events per batch on the stream.
pub const PAGE: usize = 4096;
/// Pages a watcher may have unread before the daemon stops producing for it (it then falls
/// behind the event log's window and is told to re-snapshot).
const STREAM_BUFFER: usize = 4;

/// The `CacheService` of one node.
#[derive(Clone)]
pub struct FeedService {
    node: Arc<Node>,
}

fn stored(id: &NamespaceId, sequence: u64, key: &BlockKey, t: TierKind) -> pb::BlockEvent {
    pb::BlockEvent {
        sequence,
        kind: pb::block_event::Kind::Stored as i32,
        namespace_id: Bytes::copy_from_slice(&id.0),
        hash: Bytes::copy_from_slice(key.hash.as_bytes()),
        tier: wire_tier(t) as i32,
        ..Default::default()
    }
}

fn to_pb(e: &Event) -> pb::BlockEvent {
    let mut ev = stored(&e.namespace, e.sequence, &e.key, TierKind::Host);
    match e.kind {
        EventKind::Stored { tier: t, parent } => {
            ev.tier = wire_tier(t) as i32;
            ev.parent = parent.map(|p| Bytes::copy_from_slice(p.as_bytes())).unwrap_or_default();
        }
        EventKind::TierChanged { from, to } => {
            ev.kind = pb::block_event::Kind::TierChanged as i32;
            ev.from_tier = wire_tier(from) as i32;
            ev.tier = wire_tier(to) as i32;
        }
        EventKind::Removed { .. } => {
            ev.kind = pb::block_event::Kind::Removed as i32;
            ev.tier = pb::Tier::Unspecified as i32;
        }
    }
    ev
}

impl FeedService {
    /// The service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn reply(&self, payload: Payload) -> Result<pb::WatchEventsResponse, Status> {
        Ok(pb::WatchEventsResponse { instance_id: self.node.feed.instance_id.clone(), payload: Some(payload) })
    }

    /// Streams a snapshot (unless resuming) and then every event, until the watcher goes away
    /// or falls too far behind.
    async fn feed(self, req: pb::WatchEventsRequest, tx: mpsc::Sender<Result<pb::WatchEventsResponse, Status>>) {
        let node = Arc::clone(&self.node);
        let mut seen = node.watch_events();
        let resume = req.after_sequence > 0 && req.instance_id == node.feed.instance_id;
        let mut cursor = req.after_sequence;
        if !resume {
            // Compact under the lock; wire messages are built a page at a time.
            let (as_of, blocks) = node.feed_snapshot();
            let pages = blocks.chunks(PAGE).count().max(1);
            let mut chunks = blocks.chunks(PAGE);
            for i in 0..pages {
                let page = chunks.next().unwrap_or_default().iter().map(|(k, id, t)| stored(id, 0, k, *t)).collect();
                let snap = pb::Snapshot { blocks: page, as_of_sequence: as_of, last_page: i + 1 == pages };
                if tx.send(self.reply(Payload::Snapshot(snap))).await.is_err() {
                    return;
                }
            }
            cursor = as_of;
        }
        loop {
            seen.borrow_and_update();
            let batch = node.feed_events(cursor, PAGE).map(|evs| evs.iter().map(to_pb).collect::<Vec<_>>());
            let events = match batch {
                Ok(events) => events,
                Err(r) => {
                    let resync = pb::ResyncRequired { oldest_retained: r.oldest_retained };
                    let _ = tx.send(self.reply(Payload::ResyncRequired(resync))).await;
                    return;
                }
            };
            if let Some(last) = events.last() {
                cursor = last.sequence;
                if tx.send(self.reply(Payload::Events(pb::EventBatch { events }))).await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                changed = seen.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    }
}

fn parse_query(q: &pb::PrefixQuery) -> Result<(NamespaceId, Vec<BlockHash>), Status> {
    parse_prefix(&q.namespace_id, &q.hashes)
}

#[tonic::async_trait]
impl CacheService for FeedService {
    async fn lookup(&self, req: Request<pb::BatchLookupRequest>) -> Result<Response<pb::BatchLookupResponse>, Status> {
        let queries = req.into_inner().queries;
        if queries.len() > MAX_QUERIES {
            return Err(Status::invalid_argument(format!("{} queries, limit {MAX_QUERIES}", queries.len())));
        }
        let parsed = queries.iter().map(parse_query).collect::<Result<Vec<_>, _>>()?;
        let matches = (self.node.held_prefixes(&parsed).into_iter())
            .map(|tiers| pb::PrefixMatch {
                matched: tiers.len() as u32,
                tiers: tiers.into_iter().map(|t| wire_tier(t) as i32).collect(),
            })
            .collect();
        Ok(Response::new(pb::BatchLookupResponse { matches }))
    }

    type WatchEventsStream = ReceiverStream<Result<pb::WatchEventsResponse, Status>>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (service, node) = (self.clone(), Arc::clone(&self.node));
        tokio::spawn(async move {
            node.metrics.feed_watchers.fetch_add(1, Relaxed);
            service.feed(req.into_inner(), tx).await;
            node.metrics.feed_watchers.fetch_sub(1, Relaxed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn stats(&self, _: Request<pb::NodeStatsRequest>) -> Result<Response<pb::NodeStatsResponse>, Status> {
        let node = &self.node;
        let st = node.stats();
        let tiers = tier_stats(&st, node.disk_stats().as_ref());
        Ok(Response::new(pb::NodeStatsResponse {
            node: node.node_name(),
            tiers,
            clients: node.metrics.connected_clients.load(Relaxed) as u32,
            lookups_per_second: node.requests_per_second(),
            hit_blocks: st.hit_blocks,
            miss_blocks: st.miss_blocks,
            engines: node.clients.connections.engines(),
        }))
    }

    async fn prefetch(&self, req: Request<pb::PrefixQuery>) -> Result<Response<pb::PrefetchResponse>, Status> {
        let (id, hashes) = parse_query(req.get_ref())?;
        let most = self.node.config.server.max_hashes_per_request as usize;
        if hashes.len() > most {
            return Err(Status::invalid_argument(format!("{} hashes, limit {most}", hashes.len())));
        }
        let ns = self.node.find_namespace(&id);
        let promoting = ns.map_or(0, |ns| self.node.prefetch(ns, hashes));
        Ok(Response::new(pb::PrefetchResponse { promoting: promoting as u32 }))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        let problems = self.node.problems();
        let (status, detail) = match problems.is_empty() {
            true => (pb::health_response::Status::Serving, "serving".to_string()),
            false => (pb::health_response::Status::Degraded, format!("host tier serving; {}", problems.join("; "))),
        };
        Ok(Response::new(pb::HealthResponse { status: status as i32, detail }))
    }
}

/// Serves the feed, TransferService and `grpc.health.v1` on the configured TCP address (with
/// mutual TLS when `grpc.tls` is set) and unix socket until the process ends. Binding (and
/// reading the TLS files) happens before this returns, so errors surface at start.
pub async fn serve(node: Arc<Node>) -> anyhow::Result<()> {
    let cfg = node.config.grpc.clone();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<CacheServiceServer<FeedService>>().await;
    let transfer = super::transfer::TransferGrpc::new(Arc::clone(&node));
    let services = |mut builder: tonic::transport::Server| {
        builder
            .add_service(health.clone())
            .add_service(CacheServiceServer::new(FeedService::new(Arc::clone(&node))))
            .add_service(kvtier_proto::v1::transfer_service_server::TransferServiceServer::new(transfer.clone()))
    };
    let router = services(tonic::transport::Server::builder());
    if !cfg.listen.is_empty() {
        let tls = cfg.tls.enabled().then(|| kvtier_net::tls::server_tls(&cfg.tls)).transpose()?;
        let tcp = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("grpc.listen {}: {e}", cfg.listen))?;
        let security = if tls.is_some() { "mutual TLS" } else { "plain text" };
        tracing::info!("router feed (gRPC) on {} ({security})", tcp.local_addr()?);
        let router = router.clone();
        let part = node.parts.add("grpc-tcp", crate::supervise::Role::Grpc, None);
        crate::supervise::task(part, async move {
            // No Nagle either way: a small reply must not wait for the peer's delayed ACK (40 ms).
            let served = match tls {
                Some(tls) => router.serve_with_incoming(kvtier_net::tls::incoming(tcp, tls)).await,
                None => {
                    let incoming = tonic::transport::server::TcpIncoming::from(tcp).with_nodelay(Some(true));
                    router.serve_with_incoming(incoming).await
                }
            };
            if let Err(e) = served {
                tracing::error!("gRPC (TCP) server: {e}");
            }
        });
    }
    if !cfg.socket.as_os_str().is_empty() {
        let uds = super::connector::bind(&cfg.socket)?;
        if !node.config.server.allowed_uids.is_empty() {
            super::connector::open_to_all(&cfg.socket)?;
        }
        tracing::info!("router feed (gRPC) on unix:{}", cfg.socket.display());
        // The same uids as the connector socket (SO_PEERCRED): the feed names every block held.
        let gate = Arc::clone(&node);
        let incoming = tokio_stream::StreamExt::filter(
            tokio_stream::wrappers::UnixListenerStream::new(uds),
            move |conn| match conn.as_ref().map(|s| s.peer_cred()) {
                Ok(Ok(cred)) if super::connector::uid_allowed(&gate, cred.uid()) => true,
                Err(_) => true,
                _ => {
                    gate.metrics.grpc_refused.fetch_add(1, Relaxed);
                    false
                }
            },
        );
        let part = node.parts.add("grpc-unix", crate::supervise::Role::Grpc, None);
        crate::supervise::task(part, async move {
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::error!("gRPC (unix socket) server: {e}");
            }
        });
    }
    Ok(())
}
