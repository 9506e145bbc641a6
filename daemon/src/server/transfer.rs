//! `kvtier.v1.TransferService` over gRPC: offers of pinned blocks to peers, and pulls from them.
//! Translation only: the work is in `Node::offer`, `Node::ship` and `Node::pull`.

use crate::node::{verify_from_wire, Node, Shipment};
use crate::transfer::Remote;
use bytes::Bytes;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_server::TransferService;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The puller lanes a Ship names: listener ports at the caller's IP address (a caller over the
/// unix socket is on this host), or UCX worker addresses, taken from callers on this host only
/// (they serve shared memory, which reaches no further).
pub fn ship_lanes(ports: &[u32], workers: &[Bytes], caller: Option<SocketAddr>) -> Result<Vec<Remote>, String> {
    let caller_ip = caller.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| a.ip().to_canonical());
    match (ports.is_empty(), workers.is_empty()) {
        (false, false) => Err("a shipment names lane ports or worker addresses, not both".into()),
        (false, true) => (ports.iter())
            .map(|&p| match u16::try_from(p) {
                Ok(port) if port != 0 => Ok(Remote::Socket(SocketAddr::new(caller_ip, port))),
                _ => Err(format!("lane port {p} is not a port")),
            })
            .collect(),
        (true, false) if !caller_ip.is_loopback() => {
            Err("worker addresses are taken from callers on this host only (shared memory); name lane ports".into())
        }
        _ => Ok(workers.iter().map(|w| Remote::Worker(w.to_vec())).collect()),
    }
}

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
        self.node
            .peer()
            .ok_or_else(|| Status::failed_precondition("daemon-to-daemon transfer is off (transfer.enabled)"))?;
        let caller = req.remote_addr().map_or_else(|| "local".to_string(), |a| a.ip().to_canonical().to_string());
        let r = req.into_inner();
        let (id, hashes) = super::parse_prefix(&r.namespace_id, &r.hashes)?;
        let offer = self.node.offer(&id, &hashes, &caller).await;
        Ok(Response::new(pb::OfferResponse {
            offer: offer.id,
            block_bytes: offer.block_bytes,
            blocks: offer.blocks as u32,
        }))
    }

    async fn ship(&self, req: Request<pb::ShipRequest>) -> Result<Response<pb::ShipResponse>, Status> {
        let caller = req.remote_addr();
        let r = req.into_inner();
        let lanes = ship_lanes(&r.lane_ports, &r.worker_addresses, caller).map_err(Status::invalid_argument)?;
        let coverage = verify_from_wire(r.verify)
            .ok_or_else(|| Status::invalid_argument(format!("unknown verify mode {}", r.verify)))?;
        let shipment =
            Shipment { offer: r.offer, lanes, tag_base: r.tag_base, blocks: r.blocks, coverage, seed: r.seed };
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
            .find_namespace(&id)
            .ok_or_else(|| Status::failed_precondition("namespace not registered on this daemon"))?;
        let pulled = self.node.pull(&r.source, ns, &hashes, None).await.map_err(Status::aborted)?;
        Ok(Response::new(pb::PullResponse { pulled: pulled.pulled as u32, present: pulled.present as u32 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_ports_at_the_callers_address_or_local_worker_addresses() {
        let remote: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let at = |ip: &str, port| Remote::Socket(SocketAddr::new(ip.parse().unwrap(), port));
        assert_eq!(ship_lanes(&[7000, 7001], &[], Some(remote)), Ok(vec![at("10.1.2.3", 7000), at("10.1.2.3", 7001)]));
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5555".parse().unwrap();
        assert_eq!(ship_lanes(&[7000], &[], Some(mapped)), Ok(vec![at("10.1.2.3", 7000)]), "v4-mapped caller");
        assert_eq!(ship_lanes(&[7000], &[], None), Ok(vec![at("127.0.0.1", 7000)]), "unix-socket caller");
        for bad in [0, 65536, u32::MAX] {
            assert!(ship_lanes(&[7000, bad], &[], Some(remote)).unwrap_err().contains("not a port"));
        }
        let worker = Bytes::from_static(b"some worker address");
        let local: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        assert_eq!(
            ship_lanes(&[], std::slice::from_ref(&worker), Some(local)),
            Ok(vec![Remote::Worker(worker.to_vec())])
        );
        assert_eq!(ship_lanes(&[], std::slice::from_ref(&worker), None), Ok(vec![Remote::Worker(worker.to_vec())]));
        assert!(ship_lanes(&[], std::slice::from_ref(&worker), Some(remote)).unwrap_err().contains("this host only"));
        assert!(ship_lanes(&[7000], &[worker], Some(local)).unwrap_err().contains("not both"));
        assert_eq!(ship_lanes(&[], &[], Some(remote)), Ok(vec![]), "counted (and refused) by the node");
    }
}
