//! The daemon blocks are pulled from, as the puller sees it: the outbound calls of
//! `kvtier.v1.TransferService` in domain types, behind [`Source`], so that the pull logic
//! (`transfer.rs`) never builds a wire message. [`GrpcSource`] speaks the service over a cached
//! channel.

use crate::transfer::Contact;
use bytes::Bytes;
use kvtier_core::block::BlockHash;
use kvtier_core::fingerprint::Coverage;
use kvtier_core::namespace::NamespaceId;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_client::TransferServiceClient;
use std::future::Future;

/// What a source answers to an offer request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceOffer {
    /// Id for shipping and release (0: the source holds none of the blocks).
    pub id: u64,
    /// The source's bytes per block.
    pub block_bytes: u64,
    /// Leading blocks the source pinned.
    pub blocks: usize,
}

/// A shipment of offered blocks into a puller's receives: what the puller orders (lanes named
/// as [`Contact`]s, [`ShipOrder`]) and what the source carries out (lanes resolved to
/// addresses, [`Shipment`](super::Shipment)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ship<Lane> {
    /// The offer shipped from.
    pub offer: u64,
    /// The puller's receiving lanes (message `j` goes to lane `j % len`).
    pub lanes: Vec<Lane>,
    /// Tag of the first shipped block; the `j`-th is `tag_base + j`.
    pub tag_base: u64,
    /// Which offered blocks to ship, by position in the offer, in message order.
    pub blocks: Vec<u32>,
    /// How much of each block the fingerprints cover.
    pub coverage: Coverage,
    /// The puller's fingerprint seed.
    pub seed: u64,
}

/// What the puller asks a source to ship.
pub type ShipOrder = Ship<Contact>;

/// Wire form of a coverage.
fn wire_verify(c: Coverage) -> pb::Verify {
    match c {
        Coverage::Sampled => pb::Verify::Sampled,
        Coverage::Full => pb::Verify::Full,
    }
}

/// The coverage a wire `Verify` names (None: a value this build does not know).
pub fn verify_from_wire(v: i32) -> Option<Coverage> {
    match pb::Verify::try_from(v).ok()? {
        pb::Verify::Sampled => Some(Coverage::Sampled),
        pb::Verify::Full => Some(Coverage::Full),
    }
}

/// A daemon that ships blocks to this one. Errors are messages naming the source.
pub trait Source: Send {
    /// Asks the source to pin the held prefix of `hashes` in namespace `id`.
    fn offer(
        &mut self,
        id: &NamespaceId,
        hashes: &[BlockHash],
    ) -> impl Future<Output = Result<SourceOffer, String>> + Send;
    /// Has the source send the ordered blocks; answers their fingerprints, in order.
    fn ship(&mut self, order: ShipOrder) -> impl Future<Output = Result<Vec<u64>, String>> + Send;
    /// Releases offer `id` (its pins); failures are ignored: offers expire on their own.
    fn release(&mut self, id: u64) -> impl Future<Output = ()> + Send;
}

/// A source reached through its TransferService.
#[derive(Clone)]
pub struct GrpcSource {
    /// "host:port" of the source's gRPC server.
    addr: String,
    client: TransferServiceClient<tonic::transport::Channel>,
}

impl GrpcSource {
    /// The source at `addr` over `channel`.
    pub fn new(addr: &str, channel: tonic::transport::Channel) -> Self {
        Self { addr: addr.to_string(), client: TransferServiceClient::new(channel) }
    }
}

impl Source for GrpcSource {
    async fn offer(&mut self, id: &NamespaceId, hashes: &[BlockHash]) -> Result<SourceOffer, String> {
        let request = pb::OfferRequest {
            namespace_id: Bytes::copy_from_slice(&id.0),
            hashes: hashes.iter().map(|h| Bytes::copy_from_slice(h.as_bytes())).collect(),
        };
        let reply = self.client.offer(request).await;
        let r = reply.map_err(|e| format!("source {}: offer failed: {}", self.addr, e.message()))?.into_inner();
        Ok(SourceOffer { id: r.offer, block_bytes: r.block_bytes, blocks: r.blocks as usize })
    }

    async fn ship(&mut self, order: ShipOrder) -> Result<Vec<u64>, String> {
        let (mut worker_addresses, mut lane_ports) = (Vec::new(), Vec::new());
        for lane in &order.lanes {
            match lane {
                Contact::Port(port) => lane_ports.push(u32::from(*port)),
                Contact::Worker(a) => worker_addresses.push(Bytes::copy_from_slice(a)),
            }
        }
        let request = pb::ShipRequest {
            offer: order.offer,
            worker_addresses,
            lane_ports,
            tag_base: order.tag_base,
            blocks: order.blocks,
            verify: wire_verify(order.coverage) as i32,
            seed: order.seed,
        };
        match self.client.ship(request).await {
            Ok(r) => Ok(r.into_inner().fingerprints),
            Err(e) => Err(format!("source failed to ship: {}", e.message())),
        }
    }

    async fn release(&mut self, id: u64) {
        let _ = self.client.release_offer(pb::ReleaseOfferRequest { offer: id }).await;
    }
}
