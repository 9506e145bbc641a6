//! Shipping blocks between daemons: offering pinned blocks to a peer, and pulling a peer's blocks
//! into reserved slots of our pool that become visible only when all arrived and verified.

use super::{Node, ReservedAt};
use crate::block::{BlockHash, NsIdx};
use crate::cache::ClientId;
use crate::disk::format::SlotHeader;
use crate::namespace::NamespaceId;
use crate::peer::ReadOp;
use bytes::Bytes;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_client::TransferServiceClient;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Client ids of transfers, far from connector connections' ids.
const TRANSFER_CLIENTS: u64 = 1 << 62;

/// Blocks pinned for a peer: where they are and their checksums.
#[derive(Debug, Default)]
pub struct Offer {
    /// Id for release (0: nothing held).
    pub id: u64,
    /// Bytes per block.
    pub block_bytes: u64,
    /// (segment, payload offset) per block of the held prefix.
    pub blocks: Vec<(u32, u64)>,
    /// xxh3-64 of each block.
    pub checksums: Vec<u64>,
}

/// What a pull did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pulled {
    /// Blocks that arrived, verified, and are visible now.
    pub pulled: usize,
    /// Blocks held here already.
    pub present: usize,
}

/// What the puller got from the source (the wire form, decoded by the server).
pub struct Source {
    /// The offer id, to release.
    pub offer: u64,
    /// The source's UCX worker address.
    pub worker_address: Vec<u8>,
    /// Per source pool segment: address and packed remote key.
    pub segments: Vec<(u64, Vec<u8>)>,
    /// Bytes per block.
    pub block_bytes: u64,
    /// Per offered block: (segment, offset, checksum).
    pub blocks: Vec<(u32, u64, u64)>,
}

/// The TransferService of the daemon at `addr` ("host:port").
async fn source_client(addr: &str) -> Result<TransferServiceClient<tonic::transport::Channel>, String> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| format!("source {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(|e| format!("source {addr}: {e}"))?;
    Ok(TransferServiceClient::new(channel))
}

impl Node {
    /// Pulls the held prefix of `hashes` from the daemon whose TransferService is at `source`:
    /// asks it for an offer, reads it ([`pull_from`](Self::pull_from)), releases the offer.
    pub async fn pull(&self, source: &str, ns: NsIdx, hashes: &[BlockHash]) -> Result<Pulled, String> {
        self.peer.as_ref().ok_or("peer tier disabled on this daemon (peer.enabled)")?;
        let id = self.cache().namespace(ns).id;
        let mut client = source_client(source).await?;
        let request = pb::OfferRequest {
            namespace_id: Bytes::copy_from_slice(&id.0),
            hashes: hashes.iter().map(|h| Bytes::copy_from_slice(h.as_bytes())).collect(),
        };
        let offer = client
            .offer(request)
            .await
            .map_err(|e| format!("source {source}: offer failed: {}", e.message()))?
            .into_inner();
        if offer.offer == 0 {
            return Ok(Pulled::default());
        }
        let n = offer.block_offsets.len().min(offer.block_segments.len()).min(offer.checksums.len());
        let src = Source {
            offer: offer.offer,
            worker_address: offer.worker_address.to_vec(),
            segments: offer.segments.iter().map(|s| (s.address, s.rkey.to_vec())).collect(),
            block_bytes: offer.block_bytes,
            blocks: (0..n).map(|i| (offer.block_segments[i], offer.block_offsets[i], offer.checksums[i])).collect(),
        };
        let result = self.pull_from(ns, hashes, &src).await;
        let _ = client.release_offer(pb::ReleaseOfferRequest { offer: src.offer }).await;
        result
    }

    fn transfer_client(&self) -> ClientId {
        ClientId(TRANSFER_CLIENTS + self.next_transfer.fetch_add(1, Relaxed))
    }

    fn block_checksum(&self, (segment, offset): (u32, u64), bytes: u64) -> u64 {
        let seg = &self.pool.segments()[segment as usize];
        // SAFETY: a pinned, committed block inside the pool: nobody writes it.
        let data = unsafe { std::slice::from_raw_parts(seg.as_ptr().add(offset as usize), bytes as usize) };
        SlotHeader::checksum_of(data)
    }

    /// Pins the held prefix of `hashes` (promoting disk blocks) for a peer to read; released by
    /// [`release_offer`](Self::release_offer) or after `peer.offer_timeout_secs`.
    pub async fn offer(self: &Arc<Self>, id: &NamespaceId, hashes: &[BlockHash]) -> Offer {
        let Some(ns) = self.cache().find_namespace(id) else { return Offer::default() };
        let client = self.transfer_client();
        let Ok((lease, blocks)) = self.acquire(client, ns, hashes).await else { return Offer::default() };
        if lease == 0 {
            return Offer::default();
        }
        let block_bytes = self.cache().namespace(ns).block_bytes;
        let checksums = blocks.iter().map(|&b| self.block_checksum(b, block_bytes)).collect();
        self.offers.lock().unwrap_or_else(|e| e.into_inner()).insert(lease, client);
        let (node, timeout) = (Arc::clone(self), Duration::from_secs(self.config.peer.offer_timeout_secs));
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            node.release_offer(lease);
        });
        self.metrics.peer_offers.fetch_add(1, Relaxed);
        Offer { id: lease, block_bytes, blocks, checksums }
    }

    /// Unpins an offer (idempotent).
    pub fn release_offer(&self, id: u64) {
        let client = self.offers.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        if let Some(client) = client {
            self.disconnect(client);
        }
    }

    /// Reads `source`'s offer of `hashes[..]` into our pool: reserves slots, reads them all by
    /// RMA, checks every checksum, then commits; on any failure nothing becomes visible.
    pub async fn pull_from(&self, ns: NsIdx, hashes: &[BlockHash], source: &Source) -> Result<Pulled, String> {
        let peer = self.peer.as_ref().ok_or("peer tier disabled on this daemon (peer.enabled)")?;
        let n = source.blocks.len().min(hashes.len());
        let block_bytes = self.cache().namespace(ns).block_bytes;
        if source.block_bytes != block_bytes {
            return Err(format!("source blocks are {} bytes, ours {block_bytes}", source.block_bytes));
        }
        let client = self.transfer_client();
        let (reservation, outcomes) = self.reserve(client, ns, &hashes[..n], None).map_err(|e| e.to_string())?;
        let mut ops: Vec<ReadOp> = Vec::new();
        let mut targets = Vec::new();
        let mut present = 0;
        for (i, o) in outcomes.iter().enumerate() {
            match *o {
                ReservedAt::Slot((seg, off)) => {
                    let (src_seg, src_off, sum) = source.blocks[i];
                    let base = source.segments.get(src_seg as usize).ok_or("offer names an unknown segment")?.0;
                    let local = self.pool.segments()[seg as usize].as_ptr() as usize + off as usize;
                    ops.push((local, block_bytes as usize, base + src_off, src_seg as usize));
                    targets.push(((seg, off), sum));
                }
                ReservedAt::Present => present += 1,
                ReservedAt::NoSpace => break,
            }
        }
        let started = std::time::Instant::now();
        self.metrics.peer_pulls_in_flight.fetch_add(1, Relaxed);
        let rkeys = source.segments.iter().map(|s| s.1.clone()).collect();
        let mut result = peer.pull(source.worker_address.clone(), rkeys, ops).await;
        self.metrics.peer_pulls_in_flight.fetch_sub(1, Relaxed);
        if result.is_ok() {
            if let Some(i) = targets.iter().position(|&(at, sum)| self.block_checksum(at, block_bytes) != sum) {
                result = Err(format!("block {i} arrived with another checksum than offered"));
            }
        }
        let pulled = targets.len();
        match result {
            Ok(()) => {
                if reservation != 0 {
                    self.commit(client, reservation).map_err(|e| e.to_string())?;
                }
                self.metrics.peer_pulled_blocks.fetch_add(pulled as u64, Relaxed);
                self.metrics.peer_pulled_bytes.fetch_add(pulled as u64 * block_bytes, Relaxed);
                self.metrics.peer_pull_latency.observe(started.elapsed());
                Ok(Pulled { pulled, present })
            }
            Err(e) => {
                self.disconnect(client);
                self.metrics.peer_pull_failures.fetch_add(1, Relaxed);
                Err(format!("pull failed, nothing kept: {e}"))
            }
        }
    }
}
