//! `kvtier.v1.TransferService` over gRPC: offers of pinned blocks to peers, and pulls from them.
//! Translation only: the work is in `Node::offer` and `Node::pull_from`.

use crate::block::BlockHash;
use crate::namespace::NamespaceId;
use crate::node::{Node, Source};
use bytes::Bytes;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_client::TransferServiceClient;
use kvtier_proto::v1::transfer_service_server::TransferService;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The `TransferService` of one node.
#[derive(Clone)]
pub struct TransferGrpc {
    node: Arc<Node>,
}

impl TransferGrpc {
    /// The service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn parse(namespace_id: &[u8], hashes: &[Bytes]) -> Result<(NamespaceId, Vec<BlockHash>), Status> {
    let id = NamespaceId::from_slice(namespace_id)
        .ok_or_else(|| Status::invalid_argument("namespace_id must have 16 bytes"))?;
    let hashes = hashes
        .iter()
        .map(|h| BlockHash::new(h).ok_or_else(|| Status::invalid_argument("hashes must have 1 to 32 bytes")))
        .collect::<Result<_, _>>()?;
    Ok((id, hashes))
}

async fn connect(addr: &str) -> Result<TransferServiceClient<tonic::transport::Channel>, Status> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| Status::invalid_argument(format!("source {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(|e| Status::unavailable(format!("source {addr}: {e}")))?;
    Ok(TransferServiceClient::new(channel))
}

#[tonic::async_trait]
impl TransferService for TransferGrpc {
    async fn offer(&self, req: Request<pb::OfferRequest>) -> Result<Response<pb::OfferResponse>, Status> {
        let exposure = self
            .node
            .peer_exposure()
            .ok_or_else(|| Status::failed_precondition("peer tier disabled (peer.enabled)"))?;
        let r = req.into_inner();
        let (id, hashes) = parse(&r.namespace_id, &r.hashes)?;
        let offer = self.node.offer(&id, &hashes).await;
        let (block_segments, block_offsets) = offer.blocks.iter().copied().unzip();
        Ok(Response::new(pb::OfferResponse {
            offer: offer.id,
            worker_address: Bytes::copy_from_slice(&exposure.worker_address),
            segments: exposure
                .segments
                .iter()
                .map(|(address, rkey)| pb::RemoteSegment { address: *address, rkey: Bytes::copy_from_slice(rkey) })
                .collect(),
            block_bytes: offer.block_bytes,
            block_segments,
            block_offsets,
            checksums: offer.checksums,
        }))
    }

    async fn release_offer(
        &self,
        req: Request<pb::ReleaseOfferRequest>,
    ) -> Result<Response<pb::ReleaseOfferResponse>, Status> {
        self.node.release_offer(req.into_inner().offer);
        Ok(Response::new(pb::ReleaseOfferResponse {}))
    }

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<pb::PullResponse>, Status> {
        let r = req.into_inner();
        let (id, hashes) = parse(&r.namespace_id, &r.hashes)?;
        let ns = self
            .node
            .cache()
            .find_namespace(&id)
            .ok_or_else(|| Status::failed_precondition("namespace not registered on this daemon"))?;
        let mut source = connect(&r.source).await?;
        let offer = source
            .offer(pb::OfferRequest { namespace_id: r.namespace_id.clone(), hashes: r.hashes.clone() })
            .await
            .map_err(|e| Status::unavailable(format!("source {}: offer failed: {}", r.source, e.message())))?
            .into_inner();
        if offer.offer == 0 {
            return Ok(Response::new(pb::PullResponse { pulled: 0, present: 0 }));
        }
        let n = offer.block_offsets.len().min(offer.block_segments.len()).min(offer.checksums.len());
        let src = Source {
            offer: offer.offer,
            worker_address: offer.worker_address.to_vec(),
            segments: offer.segments.iter().map(|s| (s.address, s.rkey.to_vec())).collect(),
            block_bytes: offer.block_bytes,
            blocks: (0..n).map(|i| (offer.block_segments[i], offer.block_offsets[i], offer.checksums[i])).collect(),
        };
        let result = self.node.pull_from(ns, &hashes, &src).await;
        let _ = source.release_offer(pb::ReleaseOfferRequest { offer: src.offer }).await;
        let pulled = result.map_err(Status::aborted)?;
        Ok(Response::new(pb::PullResponse { pulled: pulled.pulled as u32, present: pulled.present as u32 }))
    }
}
