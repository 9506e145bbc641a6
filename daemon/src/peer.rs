//! The peer tier's mechanism: `peer.lanes` threads, each owning a UCX context and worker, run
//! many transfers at once as tagged messages (the protocol `ucx_perftest -t tag_bw` measures):
//! - receiving: a receive per block is posted straight into its reserved pool slot (zero copy
//!   where the transport allows: rendezvous into the slot). A receive writes only while pending:
//!   cancelled before a sender matched it, its slot is ours again, which a remote write into our
//!   pool could never promise;
//! - sending: one message per block straight from its pinned slot, to the receiver's worker.
//!
//! A transfer is striped over the puller's lanes: block `j` goes to lane `j % lanes`, so the
//! copies that land blocks (the receiver's, over shared memory; both sides', over TCP) run on
//! that many cores at once. Each thread spins on its worker while anything is in flight, naps
//! after a while of nothing happening, and waits 100 us between commands when idle.

use crate::config::PeerConfig;
use kvtier_ucx::{Context, Endpoint, Worker};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc as tmpsc, oneshot};

/// What callers get when a UCX thread is gone.
const STOPPED: &str = "UCX thread stopped";

/// Most lanes a daemon runs, and a shipment may name.
pub const MAX_LANES: usize = 16;

/// One block's bytes in our pool: (address, length).
pub type Span = (usize, usize);

/// What a receive reports, block by block, then once at the end.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Block `j` of the receive arrived whole (Ok) or failed (cancelled, short, transport error).
    Block(usize, Result<(), String>),
    /// No receive of this operation is in flight any more: its slots are the caller's again.
    Finished,
}

/// A receive in flight: its tag base (the sender tags block `j` `tag_base + j`), the worker
/// addresses of the lanes it is striped over (block `j` to `lanes[j % lanes.len()]`) and its op
/// id (to cancel it).
#[derive(Clone, Debug)]
pub struct Receiving {
    /// Tag of block 0; block `j` is `tag_base + j`.
    pub tag_base: u64,
    /// Where the sender sends block `j`: `lanes[j % lanes.len()]`.
    pub lanes: Vec<Vec<u8>>,
    op: u32,
}

/// The event stream of a receive: [`Received::Finished`] comes once, after every lane's.
pub struct Receipts {
    rx: tmpsc::UnboundedReceiver<Received>,
    /// Lanes whose receives are still in flight.
    lanes_left: usize,
}

impl Receipts {
    /// Folds one lane's event: a lane's `Finished` counts down, the last one passes.
    fn fold(&mut self, ev: Received) -> Option<Received> {
        if ev != Received::Finished {
            return Some(ev);
        }
        self.lanes_left = self.lanes_left.saturating_sub(1);
        (self.lanes_left == 0).then_some(Received::Finished)
    }

    /// The next event (None: a UCX thread is gone, which ends the receive too).
    pub async fn recv(&mut self) -> Option<Received> {
        loop {
            let ev = self.rx.recv().await?;
            if let Some(ev) = self.fold(ev) {
                return Some(ev);
            }
        }
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Received> {
        while let Ok(ev) = self.rx.try_recv() {
            if let Some(ev) = self.fold(ev) {
                return Some(ev);
            }
        }
        None
    }
}

enum Cmd {
    Receive {
        op: u32,
        /// (block index in the operation, its span).
        blocks: Vec<(usize, Span)>,
        events: tmpsc::UnboundedSender<Received>,
    },
    Cancel {
        op: u32,
    },
    Abort {
        peer: Vec<u8>,
    },
    Send {
        op: u32,
        peer: Vec<u8>,
        /// (tag, span) per message.
        messages: Vec<(u64, Span)>,
        deadline: Instant,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Whether `tls` (a `UCX_TLS` value) names only shared-memory transports, over which UCX 1.13
/// cannot detect a failed peer (endpoints there must not ask for it, or UCX finds no transport).
/// An empty value (UCX's choice) or an exclusion list ("^...") is not: asked for failure
/// detection, UCX picks transports that have it.
fn shared_memory_only(tls: &str) -> bool {
    const SHARED: [&str; 9] = ["shm", "sm", "sysv", "posix", "cma", "knem", "xpmem", "self", "mm"];
    let names: Vec<&str> = tls.split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
    !tls.trim_start().starts_with('^') && !names.is_empty() && names.iter().all(|t| SHARED.contains(t))
}

/// Block indices `0..blocks` of lane `lane` of `lanes`.
fn striped(blocks: usize, lane: usize, lanes: usize) -> impl Iterator<Item = usize> {
    (lane..blocks).step_by(lanes)
}

/// Handle to the UCX threads.
pub struct Peer {
    lanes: Vec<mpsc::Sender<Cmd>>,
    worker_addresses: Vec<Vec<u8>>,
    next_op: AtomicU32,
}

impl Peer {
    /// Starts `cfg.lanes` UCX threads with `cfg`'s transports.
    pub fn start(cfg: &PeerConfig) -> anyhow::Result<Peer> {
        let mut settings: Vec<(String, String)> = Vec::new();
        if !cfg.tls.is_empty() {
            settings.push(("TLS".into(), cfg.tls.clone()));
        }
        if !cfg.net_devices.is_empty() {
            settings.push(("NET_DEVICES".into(), cfg.net_devices.clone()));
        }
        let detect = !shared_memory_only(&cfg.tls);
        if !detect {
            tracing::warn!(
                tls = %cfg.tls,
                "peer tier over shared memory only: UCX detects no peer failure there, so a peer dying \
                 mid-transfer may stop this daemon; use tcp or RDMA transports in production"
            );
        }
        let (mut lanes, mut worker_addresses) = (Vec::new(), Vec::new());
        for lane in 0..cfg.lanes.clamp(1, MAX_LANES) {
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::channel();
            let settings = settings.clone();
            let thread = std::thread::Builder::new().name(format!("kvtier-ucx-{lane}"));
            thread.spawn(move || run(settings, detect, rx, ready_tx))?;
            let address = ready_rx.recv().map_err(|_| anyhow::anyhow!("UCX thread died at start"))??;
            lanes.push(tx);
            worker_addresses.push(address);
        }
        Ok(Peer { lanes, worker_addresses, next_op: AtomicU32::new(1) })
    }

    /// The UCX worker address of each lane: where peers send blocks to us.
    pub fn worker_addresses(&self) -> &[Vec<u8>] {
        &self.worker_addresses
    }

    fn op(&self) -> u32 {
        self.next_op.fetch_add(1, Relaxed)
    }

    /// Posts a receive of block `j` into `spans[j]` for every `j`, striped over the lanes; events
    /// arrive on the returned stream, ending with [`Received::Finished`] (after which the spans
    /// are free).
    ///
    /// # Safety
    /// The spans must be memory of ours that nobody else touches until `Finished`.
    pub unsafe fn receive(&self, spans: Vec<Span>) -> Result<(Receiving, Receipts), String> {
        let op = self.op();
        let (events, rx) = tmpsc::unbounded_channel();
        let used = self.lanes.len().min(spans.len()).max(1);
        for (lane, tx) in self.lanes[..used].iter().enumerate() {
            let blocks = striped(spans.len(), lane, used).map(|j| (j, spans[j])).collect();
            let cmd = Cmd::Receive { op, blocks, events: events.clone() };
            if tx.send(cmd).is_err() {
                // A lane thread is gone (the daemon is stopping). No sender ever learns these
                // tags, so the receives posted on other lanes can only end cancelled.
                self.cancel(&Receiving { tag_base: 0, lanes: Vec::new(), op });
                return Err(STOPPED.to_string());
            }
        }
        let lanes = self.worker_addresses[..used].to_vec();
        Ok((Receiving { tag_base: token(op, 0), lanes, op }, Receipts { rx, lanes_left: used }))
    }

    /// Cancels what of `r` no sender has started filling yet (its `Finished` follows).
    pub fn cancel(&self, r: &Receiving) {
        for tx in &self.lanes {
            let _ = tx.send(Cmd::Cancel { op: r.op });
        }
    }

    /// Fails every send to the workers at `peers` (their puller is gone): the endpoints are
    /// closed and the sends end within [`GRACE`].
    pub fn abort_sends_to(&self, peers: &[Vec<u8>]) {
        for tx in &self.lanes {
            for peer in peers {
                let _ = tx.send(Cmd::Abort { peer: peer.clone() });
            }
        }
    }

    /// Sends `spans[j]` tagged `tag_base + j` to the worker at `peers[j % peers.len()]`; done
    /// when every send completed, or failed at `deadline` (the endpoints are then closed,
    /// forcing what is left). Returns only when no send reads the spans any more.
    ///
    /// # Safety
    /// The spans must stay valid and unchanged until this returns.
    pub async unsafe fn send(
        &self,
        peers: &[Vec<u8>],
        spans: Vec<Span>,
        tag_base: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        let mut waiting = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            let messages: Vec<(u64, Span)> =
                striped(spans.len(), i, peers.len()).map(|j| (tag_base + j as u64, spans[j])).collect();
            if messages.is_empty() {
                continue;
            }
            let (done, rx) = oneshot::channel();
            let cmd = Cmd::Send { op: self.op(), peer: peer.clone(), messages, deadline, done };
            if self.lanes[i % self.lanes.len()].send(cmd).is_ok() {
                waiting.push(rx);
            }
        }
        let mut result = if waiting.len() < peers.len().min(spans.len()) { Err(STOPPED.to_string()) } else { Ok(()) };
        // Every lane's sends must end before the spans are the caller's again.
        for rx in waiting {
            let r = rx.await.unwrap_or_else(|_| Err(STOPPED.to_string()));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

/// Token of message `k` of operation `op` on its lane; `token(op, 0)` is also the tag base of a
/// receive (block `j` is tagged `token(op, 0) + j`).
fn token(op: u32, k: usize) -> u64 {
    (u64::from(op) << 32) | k as u64
}

enum Kind {
    Receive {
        events: tmpsc::UnboundedSender<Received>,
        /// (block index in the operation, its span) per message.
        blocks: Vec<(usize, Span)>,
    },
    Send {
        peer: Vec<u8>,
        deadline: Instant,
        /// When the endpoint was force-closed under it (deadline or abort).
        forced_at: Option<Instant>,
        done: oneshot::Sender<Result<(), String>>,
        error: Option<String>,
    },
}

/// One operation in flight on the UCX thread.
struct Op {
    kind: Kind,
    /// Blocks still in flight.
    pending: Vec<bool>,
    left: usize,
}

/// The UCX thread's state.
struct Engine {
    worker: Worker,
    endpoints: HashMap<Vec<u8>, Endpoint>,
    ops: HashMap<u32, Op>,
    detect_peer_failure: bool,
}

type Ready = anyhow::Result<Vec<u8>>;

/// Empty progress rounds of a busy worker before it naps.
const IDLE_SPINS: u32 = 256;
/// Its nap.
const NAP_US: u64 = 20;
/// How long UCX gets to finish the sends of a force-closed endpoint before they are answered.
pub const GRACE: Duration = Duration::from_secs(1);

fn run(
    settings: Vec<(String, String)>,
    detect_peer_failure: bool,
    rx: mpsc::Receiver<Cmd>,
    ready: mpsc::Sender<Ready>,
) {
    let setup = || -> anyhow::Result<(std::sync::Arc<Context>, Worker, Vec<u8>)> {
        let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let ctx = Context::new(&pairs)?;
        let worker = Worker::new(&ctx)?;
        let address = worker.address()?;
        Ok((ctx, worker, address))
    };
    let (_ctx, worker) = match setup() {
        Ok((ctx, worker, address)) => {
            let _ = ready.send(Ok(address));
            (ctx, worker)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut engine = Engine { worker, endpoints: HashMap::new(), ops: HashMap::new(), detect_peer_failure };
    let mut idle = 0u32;
    loop {
        let busy = !engine.ops.is_empty();
        let cmd = if busy {
            rx.try_recv().map_err(|e| e == mpsc::TryRecvError::Disconnected)
        } else {
            rx.recv_timeout(Duration::from_micros(100)).map_err(|e| e == mpsc::RecvTimeoutError::Disconnected)
        };
        match cmd {
            Ok(cmd) => engine.start(cmd),
            Err(true) => break,
            Err(false) => {}
        }
        // Bounded: a worker with a failing connection can report events forever.
        let mut events = 0;
        for _ in 0..64 {
            match engine.worker.progress() {
                0 => break,
                n => events += n,
            }
        }
        engine.complete();
        // Busy but nothing happening (waiting on the peer): give the CPU to whoever will make
        // something happen, often the peer daemon itself on a small machine.
        idle = if events == 0 { idle + 1 } else { 0 };
        if busy {
            if idle > IDLE_SPINS {
                std::thread::sleep(Duration::from_micros(NAP_US));
            }
            engine.expire(Instant::now());
        }
    }
    engine.endpoints.clear();
}

impl Engine {
    fn start(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Receive { op, blocks, events } => {
                let (mut pending, mut left) = (vec![false; blocks.len()], 0);
                let tag_base = token(op, 0);
                for (k, &(j, (addr, len))) in blocks.iter().enumerate() {
                    // SAFETY: the caller of `Peer::receive` gave us these spans until Finished.
                    match unsafe { self.worker.tag_recv(addr as *mut u8, len, None, tag_base + j as u64, token(op, k)) }
                    {
                        Ok(()) => {
                            pending[k] = true;
                            left += 1;
                        }
                        Err(e) => {
                            let _ = events.send(Received::Block(j, Err(e.to_string())));
                        }
                    }
                }
                self.ops.insert(op, Op { kind: Kind::Receive { events, blocks }, pending, left });
            }
            Cmd::Cancel { op } => {
                if let Some(state) = self.ops.get(&op) {
                    for k in state.pending.iter().enumerate().filter(|p| *p.1).map(|p| p.0) {
                        self.worker.cancel(token(op, k));
                    }
                }
            }
            Cmd::Abort { peer } => self.force(&peer, "aborted: the puller is gone", Instant::now()),
            Cmd::Send { op, peer, messages, deadline, done } => {
                let (mut pending, mut left, mut error) = (vec![false; messages.len()], 0, None);
                match Self::endpoint(&self.worker, &mut self.endpoints, &peer, self.detect_peer_failure) {
                    Err(e) => error = Some(e),
                    Ok(ep) => {
                        for (k, &(tag, (addr, len))) in messages.iter().enumerate() {
                            // SAFETY: the caller of `Peer::send` keeps the spans until done.
                            match unsafe { self.worker.tag_send(ep, addr as *const u8, len, None, tag, token(op, k)) } {
                                Ok(()) => {
                                    pending[k] = true;
                                    left += 1;
                                }
                                Err(e) => {
                                    error = Some(e.to_string());
                                    break;
                                }
                            }
                        }
                    }
                }
                let kind = Kind::Send { peer, deadline, forced_at: None, done, error };
                self.ops.insert(op, Op { kind, pending, left });
            }
        }
    }

    /// The endpoint to `peer` (connected on first use).
    fn endpoint<'a>(
        worker: &Worker,
        endpoints: &'a mut HashMap<Vec<u8>, Endpoint>,
        peer: &[u8],
        detect_peer_failure: bool,
    ) -> Result<&'a Endpoint, String> {
        if !endpoints.contains_key(peer) {
            let ep = worker.connect(peer, detect_peer_failure).map_err(|e| e.to_string())?;
            endpoints.insert(peer.to_vec(), ep);
        }
        Ok(&endpoints[peer])
    }

    /// Routes completions to their operations and ends the operations with nothing in flight.
    fn complete(&mut self) {
        for c in self.worker.take_completions() {
            let (op, k) = ((c.token >> 32) as u32, (c.token & 0xffff_ffff) as usize);
            let Some(state) = self.ops.get_mut(&op) else { continue };
            if !std::mem::replace(&mut state.pending[k], false) {
                continue;
            }
            state.left -= 1;
            let result = c.result.map_err(|e| e.to_string());
            match &mut state.kind {
                Kind::Receive { events, blocks } => {
                    let (j, (_, want)) = blocks[k];
                    let result = result.and_then(|()| {
                        (c.length == want)
                            .then_some(())
                            .ok_or(format!("message of {} bytes, block is {want}", c.length))
                    });
                    let _ = events.send(Received::Block(j, result));
                }
                Kind::Send { error, .. } => {
                    if let Err(e) = result {
                        error.get_or_insert(e);
                    }
                }
            }
        }
        let finished: Vec<u32> = self.ops.iter().filter(|(_, s)| s.left == 0).map(|(&op, _)| op).collect();
        for op in finished {
            let Some(state) = self.ops.remove(&op) else { continue };
            match state.kind {
                Kind::Receive { events, .. } => {
                    let _ = events.send(Received::Finished);
                }
                Kind::Send { peer, done, error, .. } => {
                    if error.is_some() {
                        // A failed endpoint is not reused.
                        self.endpoints.remove(&peer);
                    }
                    let _ = done.send(error.map_or(Ok(()), Err));
                }
            }
        }
    }

    /// Force-closes the endpoint to `peer`, failing its sends with `why`.
    fn force(&mut self, peer: &[u8], why: &str, now: Instant) {
        // Dropping the endpoint force-closes it: its sends complete with errors.
        self.endpoints.remove(peer);
        for state in self.ops.values_mut() {
            if let Kind::Send { peer: p, forced_at, error, .. } = &mut state.kind {
                if p == peer && forced_at.is_none() {
                    error.get_or_insert_with(|| why.to_string());
                    *forced_at = Some(now);
                }
            }
        }
    }

    /// Sends past their deadline are forced; forced sends UCX has not finished within
    /// [`GRACE`] are answered anyway (the endpoint is gone: nothing reads their memory).
    fn expire(&mut self, now: Instant) {
        let late: Vec<Vec<u8>> = (self.ops.values())
            .filter_map(|s| match &s.kind {
                Kind::Send { peer, deadline, forced_at: None, .. } if *deadline <= now => Some(peer.clone()),
                _ => None,
            })
            .collect();
        for peer in late {
            self.force(&peer, "send deadline passed", now);
        }
        let given_up: Vec<u32> = (self.ops.iter())
            .filter(|(_, s)| matches!(s.kind, Kind::Send { forced_at: Some(t), .. } if now - t >= GRACE))
            .map(|(&op, _)| op)
            .collect();
        for op in given_up {
            if let Some(Op { kind: Kind::Send { done, error, .. }, .. }) = self.ops.remove(&op) {
                let _ = done.send(Err(error.unwrap_or_default()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_operation_and_block() {
        let t = token(7, 12345);
        assert_eq!(((t >> 32) as u32, (t & 0xffff_ffff) as usize), (7, 12345));
        assert_eq!(token(7, 0) + 12345, t, "a receive's tags are its tag base plus the block index");
    }

    #[test]
    fn failure_detection_is_off_only_for_shared_memory_alone() {
        for tls in ["shm", "shm,self", "sysv, cma", "posix,cma,self"] {
            assert!(shared_memory_only(tls), "{tls}");
        }
        for tls in ["", "tcp", "shm,tcp", "rc,ud", "rc_x,sm", "^shm"] {
            assert!(!shared_memory_only(tls), "{tls}");
        }
    }

    #[test]
    fn stripes_cover_every_block_once() {
        for lanes in 1..5 {
            for blocks in 0..12 {
                let mut all: Vec<usize> = (0..lanes).flat_map(|l| striped(blocks, l, lanes)).collect();
                all.sort_unstable();
                assert_eq!(all, (0..blocks).collect::<Vec<_>>(), "{blocks} blocks over {lanes} lanes");
            }
        }
        assert_eq!(striped(7, 1, 3).collect::<Vec<_>>(), [1, 4], "lane 1 of 3 takes j % 3 == 1");
    }

    #[test]
    fn receipts_finish_once_after_every_lane() {
        let (tx, rx) = tmpsc::unbounded_channel();
        let mut receipts = Receipts { rx, lanes_left: 2 };
        tx.send(Received::Block(0, Ok(()))).unwrap();
        tx.send(Received::Finished).unwrap();
        tx.send(Received::Block(1, Err("cancelled".into()))).unwrap();
        assert_eq!(receipts.try_recv(), Some(Received::Block(0, Ok(()))));
        assert_eq!(
            receipts.try_recv(),
            Some(Received::Block(1, Err("cancelled".into()))),
            "lane 0's end passes silently"
        );
        assert_eq!(receipts.try_recv(), None);
        tx.send(Received::Finished).unwrap();
        assert_eq!(receipts.try_recv(), Some(Received::Finished), "the last lane's end is the receive's");
    }
}
