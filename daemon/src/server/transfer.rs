//! `kvtier.v1.TransferService` over gRPC: offers of pinned blocks to peers, and pulls from them.
//! Translation only: the work is in `Node::offer` and `Node::pull_from`.

use crate::node::Node;
use bytes::Bytes;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_server::TransferService;
use std::sync::Arc;
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

#[tonic::async_trait]
impl TransferService for TransferGrpc {
    async fn offer(&self, req: Request<pb::OfferRequest>) -> Result<Response<pb::OfferResponse>, Status> {
        let exposure = self
            .node
            .peer_exposure()
            .ok_or_else(|| Status::failed_precondition("peer tier disabled (peer.enabled)"))?;
        let r = req.into_inner();
        let (id, hashes) = super::parse_prefix(&r.namespace_id, &r.hashes)?;
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
        let (id, hashes) = super::parse_prefix(&r.namespace_id, &r.hashes)?;
        let ns = self
            .node
            .cache()
            .find_namespace(&id)
            .ok_or_else(|| Status::failed_precondition("namespace not registered on this daemon"))?;
        let pulled = self.node.pull(&r.source, ns, &hashes).await.map_err(Status::aborted)?;
        Ok(Response::new(pb::PullResponse { pulled: pulled.pulled as u32, present: pulled.present as u32 }))
    }
}
