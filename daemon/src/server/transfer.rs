//! `kvtier.v1.TransferService` over gRPC: offers of pinned blocks to peers, and pulls from them.
//! Translation only: the work is in `Node::offer`, `Node::ship` and `Node::pull`.

use crate::node::{verify_from_wire, Node, Shipment};
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
        self.node.peer().ok_or_else(|| Status::failed_precondition("peer tier disabled (peer.enabled)"))?;
        let r = req.into_inner();
        let (id, hashes) = super::parse_prefix(&r.namespace_id, &r.hashes)?;
        let offer = self.node.offer(&id, &hashes).await;
        Ok(Response::new(pb::OfferResponse {
            offer: offer.id,
            block_bytes: offer.block_bytes,
            blocks: offer.blocks as u32,
        }))
    }

    async fn ship(&self, req: Request<pb::ShipRequest>) -> Result<Response<pb::ShipResponse>, Status> {
        let r = req.into_inner();
        let coverage = verify_from_wire(r.verify)
            .ok_or_else(|| Status::invalid_argument(format!("unknown verify mode {}", r.verify)))?;
        let shipment = Shipment {
            offer: r.offer,
            worker_addresses: r.worker_addresses.iter().map(|a| a.to_vec()).collect(),
            tag_base: r.tag_base,
            blocks: r.blocks,
            coverage,
            seed: r.seed,
        };
        let fingerprints = self.node.ship(shipment).await.map_err(Status::aborted)?;
        Ok(Response::new(pb::ShipResponse { fingerprints }))
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
