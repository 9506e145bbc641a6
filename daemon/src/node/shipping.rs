//! Shipping blocks between daemons. The puller asks the source for an offer (the source pins the
//! held prefix), reserves slots, posts a tagged receive into each, and asks the source to ship;
//! the source sends every block from its pinned slot and answers with their fingerprints, which
//! the puller has been computing over what arrived meanwhile. Only when every block arrived and
//! matched does the reservation commit: nothing partial is ever visible.

use super::source::{GrpcSource, ShipOrder, Source};
use super::{Node, ReservedAt};
use crate::supervise::Role;
use crate::transfer::{Receipts, Received, Remote, Span, MAX_LANES};
use kvtier_core::block::{BlockHash, NsIdx};
use kvtier_core::cache::ClientId;
use kvtier_core::fingerprint::{block_seed, fingerprint, Coverage};
use kvtier_core::namespace::NamespaceId;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Daemon-to-daemon transfers as the node keeps them.
pub(crate) struct Transfers {
    /// The UCX thread, when peer transfers are enabled.
    pub(crate) peer: Option<crate::transfer::Peer>,
    /// Offers held for pullers, by id.
    pub(crate) offers: std::sync::Mutex<HashMap<u64, Offered>>,
    /// Sequence of transfer client ids.
    pub(crate) next_id: std::sync::atomic::AtomicU64,
    /// gRPC channels to the TransferServices pulled from, by address (with mutual TLS when
    /// `grpc.tls` is set): a pull per request must not pay a connection handshake each time.
    pub(crate) sources: kvtier_net::tls::Channels,
}

/// Client ids of transfers, far from connector connections' ids.
const TRANSFER_CLIENTS: u64 = 1 << 62;

/// What an offer answers.
#[derive(Debug, Default)]
pub struct Offer {
    /// Id for shipping and release (0: nothing held).
    pub id: u64,
    /// Bytes per block.
    pub block_bytes: u64,
    /// Blocks offered (the held prefix).
    pub blocks: usize,
}

/// An offer held for a peer.
#[derive(Debug)]
pub(crate) struct Offered {
    client: ClientId,
    /// Who asked for it (the caller's IP address, or "local"): its pins count against its quota.
    caller: String,
    block_bytes: u64,
    /// (segment, payload offset) per offered block.
    blocks: Vec<(u32, u64)>,
    /// Shipments reading the blocks now: release waits for them.
    shipping: usize,
    released: bool,
}

/// Pool locations pinned by offers, with their block sizes.
pub type Pinned = HashMap<(u32, u64), u64>;

/// How many leading blocks of a new offer, at pool locations `new` of `block_bytes` each, fit
/// under `(in all, per caller)` byte limits, given what offers pin now in all (`all`) and for
/// this caller (`mine`). A block some offer pins already costs nothing more: pins count blocks
/// held, not offers.
///
/// ```
/// use kvtier_daemon::node::offer_fit;
/// use std::collections::HashMap;
/// let none = HashMap::new();
/// let at = |i: u64| (0u32, i * 100);
/// let new: Vec<_> = (0..10).map(at).collect();
/// assert_eq!(offer_fit(&new, 100, &none, &none, (2000, 500)), 5, "the caller's share");
/// let others: HashMap<_, _> = (20..38).map(|i| (at(i), 100)).collect();
/// assert_eq!(offer_fit(&new, 100, &others, &none, (2000, 500)), 2, "what is left in all");
/// let mine: HashMap<_, _> = (0..10).map(|i| (at(i), 100)).collect();
/// assert_eq!(offer_fit(&new, 100, &mine, &mine, (500, 500)), 10, "the same blocks again cost nothing");
/// ```
pub fn offer_fit(new: &[(u32, u64)], block_bytes: u64, all: &Pinned, mine: &Pinned, limits: (u64, u64)) -> usize {
    let (mut in_all, mut of_mine) = (all.values().sum::<u64>(), mine.values().sum::<u64>());
    let mut seen = std::collections::HashSet::new();
    for (i, at) in new.iter().enumerate() {
        if !seen.insert(at) {
            continue;
        }
        let cost_all = if all.contains_key(at) { 0 } else { block_bytes };
        let cost_mine = if mine.contains_key(at) { 0 } else { block_bytes };
        if cost_mine > 0 && (in_all + cost_all > limits.0 || of_mine + cost_mine > limits.1) {
            return i;
        }
        in_all += cost_all;
        of_mine += cost_mine;
    }
    new.len()
}

/// What a pull did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pulled {
    /// Blocks that arrived, verified, and are visible now.
    pub pulled: usize,
    /// Blocks held here already.
    pub present: usize,
}

/// Aborts the sends to a puller whose Ship call went away (its future dropped mid-way): UCX
/// cannot be relied on to notice a dead receiver that no longer answers.
struct AbortOnDrop<'a> {
    node: &'a Node,
    lanes: Vec<Remote>,
    armed: bool,
}

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if let (true, Some(peer)) = (self.armed, self.node.transfers.peer.as_ref()) {
            peer.abort_sends_to(&self.lanes);
        }
    }
}

/// A shipment request as the source sees it (decoded by the server): lanes resolved to addresses.
pub type Shipment = super::source::Ship<Remote>;

/// Fingerprints of the blocks in `spans`, each given as (its position in the shipment, its
/// span), computed off the runtime.
async fn fingerprints(spans: Vec<(usize, Span)>, coverage: Coverage, seed: u64) -> Vec<u64> {
    let work = move || {
        spans
            .iter()
            .map(|&(j, (addr, len))| {
                // SAFETY: pool memory the caller keeps pinned or reserved and unwritten meanwhile.
                let data = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                fingerprint(data, coverage, block_seed(seed, j))
            })
            .collect()
    };
    tokio::task::spawn_blocking(work).await.unwrap_or_default()
}

/// Refuses a shipment's lanes unless there are 1..=MAX_LANES of plausible ones.
fn check_lanes(lanes: &[Remote]) -> Result<(), String> {
    if !(1..=MAX_LANES).contains(&lanes.len()) {
        return Err(format!("{} lanes; a shipment names 1..={MAX_LANES}", lanes.len()));
    }
    for (i, lane) in lanes.iter().enumerate() {
        match lane {
            Remote::Worker(a) => {
                kvtier_ucx::check_worker_address(a).map_err(|e| format!("worker address {i}: {e}"))?;
            }
            Remote::Socket(at) if at.port() == 0 => return Err(format!("lane {i}: port 0")),
            Remote::Socket(_) => {}
        }
    }
    Ok(())
}

/// Files one receive event (None: the UCX thread is gone, which ends the receive too).
fn note(ev: Option<Received>, arrived: &mut Vec<usize>, failure: &mut Option<String>, finished: &mut bool) {
    match ev {
        Some(Received::Block(j, Ok(()))) => arrived.push(j),
        Some(Received::Block(j, Err(e))) => {
            failure.get_or_insert(format!("block {j}: {e}"));
        }
        Some(Received::Finished) | None => *finished = true,
    }
}

impl Node {
    /// The TransferService of the daemon at `addr` ("host:port"), over a cached channel (with
    /// mutual TLS when `grpc.tls` is set: every daemon of the cluster then speaks it).
    async fn source(&self, addr: &str) -> Result<GrpcSource, String> {
        let connect =
            |tls: Option<_>| async move { Ok(kvtier_net::tls::endpoint(addr, tls.as_ref())?.connect().await?) };
        let channel = self.transfers.sources.get(addr, connect).await.map_err(|e| format!("source {addr}: {e}"))?;
        Ok(GrpcSource::new(addr, channel))
    }

    /// `Err` once peer transfers were turned off by a failed lane.
    fn peer_on(&self) -> Result<(), String> {
        match self.role_down(Role::Transfer) {
            Some(why) => Err(format!("daemon-to-daemon transfers are off after a failure ({why})")),
            None => Ok(()),
        }
    }

    fn transfer_client(&self) -> ClientId {
        ClientId(TRANSFER_CLIENTS + self.transfers.next_id.fetch_add(1, Relaxed))
    }

    fn span(&self, (segment, offset): (u32, u64), bytes: u64) -> Span {
        (self.pool.segments()[segment as usize].as_ptr() as usize + offset as usize, bytes as usize)
    }

    /// Pins the held prefix of `hashes` (promoting disk blocks) for peer `caller`; released by
    /// [`release_offer`](Self::release_offer) or after `peer.offer_timeout_secs`. Offers pin at
    /// most `peer.offer_pool_share` of the pool in all and `peer.offer_caller_share` per caller:
    /// past that the prefix offered is shorter (a partial hit for the puller).
    pub async fn offer(self: &Arc<Self>, id: &NamespaceId, hashes: &[BlockHash], caller: &str) -> Offer {
        if self.role_down(Role::Transfer).is_some() {
            return Offer::default();
        }
        let Some(ns) = self.cache().find_namespace(id) else { return Offer::default() };
        let block_bytes = self.cache().namespace(ns).block_bytes;
        let client = self.transfer_client();
        let Ok((mut lease, mut blocks)) = self.acquire(client, ns, hashes).await else { return Offer::default() };
        let fit = self.offer_fit(&blocks, block_bytes, caller);
        if fit < blocks.len() {
            self.metrics.peer_offers_limited.fetch_add(1, Relaxed);
            let _ = self.release(client, lease);
            (lease, blocks) = match fit {
                0 => (0, Vec::new()),
                _ => self.acquire(client, ns, &hashes[..fit]).await.unwrap_or_default(),
            };
        }
        if lease == 0 {
            return Offer::default();
        }
        let offer = Offer { id: lease, block_bytes, blocks: blocks.len() };
        let held = Offered { client, caller: caller.to_string(), block_bytes, blocks, shipping: 0, released: false };
        self.transfers.offers.lock().unwrap_or_else(|e| e.into_inner()).insert(lease, held);
        let (node, timeout) = (Arc::clone(self), Duration::from_secs(self.config.transfer.offer_timeout_secs));
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            node.release_offer(lease);
        });
        self.metrics.peer_offers.fetch_add(1, Relaxed);
        offer
    }

    /// How many leading blocks at `new` (pool locations) a new offer for `caller` may keep
    /// pinned under `peer.offer_pool_share` and `peer.offer_caller_share`.
    fn offer_fit(&self, new: &[(u32, u64)], block_bytes: u64, caller: &str) -> usize {
        let offers = self.transfers.offers.lock().unwrap_or_else(|e| e.into_inner());
        let pinned = |mine: bool| -> HashMap<(u32, u64), u64> {
            (offers.values().filter(|o| !mine || o.caller == caller))
                .flat_map(|o| o.blocks.iter().map(|&at| (at, o.block_bytes)))
                .collect()
        };
        let pool = self.pool.geometry().total_bytes() as f64;
        let p = &self.config.transfer;
        let limits = ((pool * p.offer_pool_share) as u64, (pool * p.offer_caller_share) as u64);
        offer_fit(new, block_bytes, &pinned(false), &pinned(true), limits)
    }

    /// Unpins an offer (idempotent); one being shipped is unpinned when its shipments end.
    pub fn release_offer(&self, id: u64) {
        let mut offers = self.transfers.offers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(held) = offers.get_mut(&id) else { return };
        held.released = true;
        if held.shipping == 0 {
            let client = held.client;
            offers.remove(&id);
            drop(offers);
            self.disconnect(client);
        }
    }

    /// Sends the blocks `s` names of an offer to the puller's worker and returns their
    /// fingerprints (computed while the sends run). The shipment runs to its end even if the
    /// caller stops waiting (a puller gone): the offer stays pinned until UCX is done with it.
    pub async fn ship(self: &Arc<Self>, s: Shipment) -> Result<Vec<u64>, String> {
        self.transfers.peer.as_ref().ok_or("daemon-to-daemon transfer is off on this daemon (transfer.enabled)")?;
        self.peer_on()?;
        check_lanes(&s.lanes)?;
        let spans: Vec<Span> = {
            let mut offers = self.transfers.offers.lock().unwrap_or_else(|e| e.into_inner());
            let held = offers.get_mut(&s.offer).filter(|h| !h.released).ok_or("no such offer (released or expired)")?;
            let mut spans = Vec::with_capacity(s.blocks.len());
            for &i in &s.blocks {
                let at = *held.blocks.get(i as usize).ok_or(format!("offer has no block {i}"))?;
                spans.push(self.span(at, held.block_bytes));
            }
            held.shipping += 1;
            spans
        };
        let mut puller_gone = AbortOnDrop { node: self, lanes: s.lanes.clone(), armed: true };
        let node = Arc::clone(self);
        let task = tokio::spawn(async move { node.send_pinned(s, spans).await });
        let result = task.await.map_err(|e| format!("shipment task: {e}"));
        puller_gone.armed = false;
        result?
    }

    async fn send_pinned(&self, s: Shipment, spans: Vec<Span>) -> Result<Vec<u64>, String> {
        let peer = self.transfers.peer.as_ref().ok_or("daemon-to-daemon transfer is off")?;
        let deadline = Instant::now() + Duration::from_secs(self.config.transfer.offer_timeout_secs);
        let numbered = spans.iter().copied().enumerate().collect();
        let bytes = spans.iter().map(|s| s.1 as u64).sum();
        // SAFETY: the offer pins these slots until this shipment ends (release waits for it).
        let send = unsafe { peer.send(&s.lanes, spans, s.tag_base, deadline) };
        self.metrics.peer_shipments_in_flight.fetch_add(1, Relaxed);
        let (sent, sums) = tokio::join!(send, fingerprints(numbered, s.coverage, s.seed));
        self.metrics.peer_shipments_in_flight.fetch_sub(1, Relaxed);
        let release = {
            let mut offers = self.transfers.offers.lock().unwrap_or_else(|e| e.into_inner());
            let held = offers.get_mut(&s.offer).expect("a shipping offer stays held");
            held.shipping -= 1;
            held.released && held.shipping == 0
        };
        if release {
            self.release_offer(s.offer);
        }
        match sent {
            Ok(()) => {
                self.metrics.peer_shipped_blocks.fetch_add(sums.len() as u64, Relaxed);
                self.metrics.peer_shipped_bytes.fetch_add(bytes, Relaxed);
                Ok(sums)
            }
            Err(e) => {
                self.metrics.peer_ship_failures.fetch_add(1, Relaxed);
                tracing::warn!(offer = s.offer, "shipment failed: {e}");
                Err(e)
            }
        }
    }

    /// Pulls the held prefix of `hashes` from the daemon whose TransferService is at `source`;
    /// `parent` is the block they continue, if any (kept as the first one's parent).
    pub async fn pull(
        self: &Arc<Self>,
        source: &str,
        ns: NsIdx,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
    ) -> Result<Pulled, String> {
        self.transfers.peer.as_ref().ok_or("daemon-to-daemon transfer is off on this daemon (transfer.enabled)")?;
        self.peer_on()?;
        let (id, block_bytes) = {
            let c = self.cache();
            let n = c.namespace(ns);
            (n.id, n.block_bytes)
        };
        let started = Instant::now();
        let mut from = self.source(source).await?;
        let offer = from.offer(&id, hashes).await?;
        if offer.id == 0 {
            return Ok(Pulled::default());
        }
        let offered = started.elapsed();
        let result = if offer.block_bytes != block_bytes {
            Err(format!("source blocks are {} bytes, ours {block_bytes}", offer.block_bytes))
        } else {
            let n = offer.blocks.min(hashes.len());
            self.receive(&mut from, offer.id, ns, &hashes[..n], parent, block_bytes).await
        };
        // Released in the background: the pulled blocks are ours already, and a source that
        // stalls now must not hold the pull (the offer also expires on its own).
        let expiry = Duration::from_secs(self.config.transfer.offer_timeout_secs);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(expiry, from.release(offer.id)).await;
        });
        let (offer_us, total_us) = (offered.as_micros(), started.elapsed().as_micros());
        tracing::debug!(source, offer_us, total_us, outcome = ?result, "pull finished");
        result
    }

    /// Reserves slots for `hashes` (offered as `offer`), has the source ship the missing ones
    /// into them, verifies, commits.
    async fn receive(
        self: &Arc<Self>,
        source: &mut impl Source,
        offer: u64,
        ns: NsIdx,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
        block_bytes: u64,
    ) -> Result<Pulled, String> {
        let peer = self.transfers.peer.as_ref().ok_or("daemon-to-daemon transfer is off")?;
        let client = self.transfer_client();
        let (reservation, outcomes) = self.reserve(client, ns, hashes, parent).map_err(|e| e.to_string())?;
        let (mut wanted, mut spans, mut present) = (Vec::new(), Vec::new(), 0);
        for (i, o) in outcomes.iter().enumerate() {
            match *o {
                ReservedAt::Slot(at) => {
                    wanted.push(i as u32);
                    spans.push(self.span(at, block_bytes));
                }
                ReservedAt::Present => present += 1,
                ReservedAt::NoSpace => break,
            }
        }
        if wanted.is_empty() {
            self.disconnect(client);
            return Ok(Pulled { pulled: 0, present });
        }
        let (coverage, seed) =
            (self.config.transfer.verify, std::collections::hash_map::RandomState::new().hash_one(offer));
        let started = Instant::now();
        self.metrics.peer_pulls_in_flight.fetch_add(1, Relaxed);
        let outcome = self.ship_into(peer, source, offer, &wanted, spans, coverage, seed).await;
        self.metrics.peer_pulls_in_flight.fetch_sub(1, Relaxed);
        let pulled = wanted.len();
        match outcome {
            Ok(()) => {
                self.commit(client, reservation).map_err(|e| e.to_string())?;
                self.metrics.peer_pulled_blocks.fetch_add(pulled as u64, Relaxed);
                self.metrics.peer_pulled_bytes.fetch_add(pulled as u64 * block_bytes, Relaxed);
                self.metrics.peer_pull_latency.observe(started.elapsed());
                Ok(Pulled { pulled, present })
            }
            Err((e, events)) => {
                self.metrics.peer_pull_failures.fetch_add(1, Relaxed);
                // The reservation is freed only when no receive can write into it any more.
                let node = Arc::clone(self);
                tokio::spawn(async move {
                    if let Some(mut events) = events {
                        while !matches!(events.recv().await, Some(Received::Finished) | None) {}
                    }
                    node.disconnect(client);
                });
                Err(format!("pull failed, nothing kept: {e}"))
            }
        }
    }

    /// Posts the receives, asks the source to ship, fingerprints what arrives meanwhile, and
    /// compares. On failure, the receives are cancelled and their event stream is handed back
    /// (its `Finished` says the slots are free).
    #[allow(clippy::too_many_arguments)]
    async fn ship_into(
        &self,
        peer: &crate::transfer::Peer,
        source: &mut impl Source,
        offer: u64,
        wanted: &[u32],
        spans: Vec<Span>,
        coverage: Coverage,
        seed: u64,
    ) -> Result<(), (String, Option<Receipts>)> {
        // SAFETY: reserved slots of ours, invisible and unwritten until this pull ends.
        let (receiving, mut events) = unsafe { peer.receive(spans.clone()) }.map_err(|e| (e, None))?;
        let order = ShipOrder {
            offer,
            lanes: receiving.lanes.clone(),
            tag_base: receiving.tag_base,
            blocks: wanted.to_vec(),
            coverage,
            seed,
        };
        let ship = source.ship(order);
        tokio::pin!(ship);
        let (mut theirs, mut ours) = (None, vec![None; spans.len()]);
        let mut failure: Option<String> = None;
        let mut finished = false;
        while !(finished && theirs.is_some()) && failure.is_none() {
            let mut arrived = Vec::new();
            tokio::select! {
                r = &mut ship, if theirs.is_none() => match r {
                    Ok(sums) => theirs = Some(sums),
                    Err(e) => failure = Some(e),
                },
                ev = events.recv(), if !finished => note(ev, &mut arrived, &mut failure, &mut finished),
            }
            // Whatever else arrived meanwhile joins this batch.
            while let Some(ev) = events.try_recv() {
                note(Some(ev), &mut arrived, &mut failure, &mut finished);
            }
            if !arrived.is_empty() && failure.is_none() {
                let batch = arrived.iter().map(|&j| (j, spans[j])).collect();
                for (&j, sum) in arrived.iter().zip(fingerprints(batch, coverage, seed).await) {
                    ours[j] = Some(sum);
                }
            }
        }
        if let Some(e) = failure {
            peer.cancel(&receiving);
            return Err((e, (!finished).then_some(events)));
        }
        let theirs = theirs.unwrap_or_default();
        if theirs.len() != ours.len() {
            return Err((format!("source sent {} fingerprints for {} blocks", theirs.len(), ours.len()), None));
        }
        if let Some(j) = (0..ours.len()).find(|&j| ours[j] != Some(theirs[j])) {
            return Err((format!("block {} arrived with another fingerprint than shipped", wanted[j]), None));
        }
        Ok(())
    }
}
