//! The peer tier's mechanism: one thread owns this daemon's UCX context and worker and runs many
//! transfers at once as tagged messages (the protocol `ucx_perftest -t tag_bw` measures):
//! - receiving: a receive per block is posted straight into its reserved pool slot (zero copy
//!   where the transport allows: rendezvous into the slot). A receive writes only while pending:
//!   cancelled before a sender matched it, its slot is ours again, which a remote write into our
//!   pool could never promise;
//! - sending: one message per block straight from its pinned slot, to the receiver's worker.
//!
//! The thread spins on the worker while anything is in flight and naps 100 us between commands
//! when idle.

use crate::config::PeerConfig;
use kvtier_ucx::{Context, Endpoint, Worker};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc as tmpsc, oneshot};

/// What callers get when the UCX thread is gone.
const STOPPED: &str = "UCX thread stopped";

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

/// A receive in flight: its tag base (the sender tags block `j` `tag_base + j`) and its op id
/// (to cancel it).
#[derive(Clone, Copy, Debug)]
pub struct Receiving {
    /// Tag of block 0; block `j` is `tag_base + j`.
    pub tag_base: u64,
    op: u32,
}

enum Cmd {
    Receive {
        op: u32,
        spans: Vec<Span>,
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
        spans: Vec<Span>,
        tag_base: u64,
        deadline: Instant,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Handle to the UCX thread.
pub struct Peer {
    tx: mpsc::Sender<Cmd>,
    worker_address: Vec<u8>,
    next_op: AtomicU32,
}

impl Peer {
    /// Starts the UCX thread with `cfg`'s transports.
    pub fn start(cfg: &PeerConfig) -> anyhow::Result<Peer> {
        let mut settings: Vec<(String, String)> = Vec::new();
        if !cfg.tls.is_empty() {
            settings.push(("TLS".into(), cfg.tls.clone()));
        }
        if !cfg.net_devices.is_empty() {
            settings.push(("NET_DEVICES".into(), cfg.net_devices.clone()));
        }
        let detect = !cfg.tls.contains("shm");
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new().name("kvtier-ucx".into()).spawn(move || run(settings, detect, rx, ready_tx))?;
        let worker_address = ready_rx.recv().map_err(|_| anyhow::anyhow!("UCX thread died at start"))??;
        Ok(Peer { tx, worker_address, next_op: AtomicU32::new(1) })
    }

    /// This daemon's UCX worker address: where peers send blocks to us.
    pub fn worker_address(&self) -> &[u8] {
        &self.worker_address
    }

    fn op(&self) -> u32 {
        self.next_op.fetch_add(1, Relaxed)
    }

    /// Posts a receive of block `j` into `spans[j]` for every `j`; events arrive on the
    /// returned channel, ending with [`Received::Finished`] (after which the spans are free).
    ///
    /// # Safety
    /// The spans must be memory of ours that nobody else touches until `Finished`.
    pub unsafe fn receive(&self, spans: Vec<Span>) -> Result<(Receiving, tmpsc::UnboundedReceiver<Received>), String> {
        let op = self.op();
        let (events, rx) = tmpsc::unbounded_channel();
        self.tx.send(Cmd::Receive { op, spans, events }).map_err(|_| STOPPED.to_string())?;
        Ok((Receiving { tag_base: token(op, 0), op }, rx))
    }

    /// Cancels what of `r` no sender has started filling yet (its `Finished` follows).
    pub fn cancel(&self, r: Receiving) {
        let _ = self.tx.send(Cmd::Cancel { op: r.op });
    }

    /// Fails every send to the worker at `peer` (its puller is gone): the endpoint is closed and
    /// the sends end within [`GRACE`].
    pub fn abort_sends_to(&self, peer: Vec<u8>) {
        let _ = self.tx.send(Cmd::Abort { peer });
    }

    /// Sends `spans[j]` tagged `tag_base + j` to the worker at `peer`; done when every send
    /// completed, or failed at `deadline` (the endpoint is then closed, forcing what is left).
    ///
    /// # Safety
    /// The spans must stay valid and unchanged until this returns.
    pub async unsafe fn send(
        &self,
        peer: Vec<u8>,
        spans: Vec<Span>,
        tag_base: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        let op = self.op();
        self.tx.send(Cmd::Send { op, peer, spans, tag_base, deadline, done }).map_err(|_| STOPPED.to_string())?;
        rx.await.map_err(|_| STOPPED.to_string())?
    }
}

/// Token of block `j` of operation `op` (also the tag of a receive's block).
fn token(op: u32, j: usize) -> u64 {
    (u64::from(op) << 32) | j as u64
}

enum Kind {
    Receive {
        events: tmpsc::UnboundedSender<Received>,
        spans: Vec<Span>,
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
            Cmd::Receive { op, spans, events } => {
                let (mut pending, mut left) = (vec![false; spans.len()], 0);
                for (j, &(addr, len)) in spans.iter().enumerate() {
                    let t = token(op, j);
                    // SAFETY: the caller of `Peer::receive` gave us these spans until Finished.
                    match unsafe { self.worker.tag_recv(addr as *mut u8, len, None, t, t) } {
                        Ok(()) => {
                            pending[j] = true;
                            left += 1;
                        }
                        Err(e) => {
                            let _ = events.send(Received::Block(j, Err(e.to_string())));
                        }
                    }
                }
                self.ops.insert(op, Op { kind: Kind::Receive { events, spans }, pending, left });
            }
            Cmd::Cancel { op } => {
                if let Some(state) = self.ops.get(&op) {
                    for j in state.pending.iter().enumerate().filter(|p| *p.1).map(|p| p.0) {
                        self.worker.cancel(token(op, j));
                    }
                }
            }
            Cmd::Abort { peer } => self.force(&peer, "aborted: the puller is gone", Instant::now()),
            Cmd::Send { op, peer, spans, tag_base, deadline, done } => {
                let (mut pending, mut left, mut error) = (vec![false; spans.len()], 0, None);
                match Self::endpoint(&self.worker, &mut self.endpoints, &peer, self.detect_peer_failure) {
                    Err(e) => error = Some(e),
                    Ok(ep) => {
                        for (j, &(addr, len)) in spans.iter().enumerate() {
                            let (tag, t) = (tag_base + j as u64, token(op, j));
                            // SAFETY: the caller of `Peer::send` keeps the spans until done.
                            match unsafe { self.worker.tag_send(ep, addr as *const u8, len, None, tag, t) } {
                                Ok(()) => {
                                    pending[j] = true;
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
            let (op, j) = ((c.token >> 32) as u32, (c.token & 0xffff_ffff) as usize);
            let Some(state) = self.ops.get_mut(&op) else { continue };
            if !std::mem::replace(&mut state.pending[j], false) {
                continue;
            }
            state.left -= 1;
            let result = c.result.map_err(|e| e.to_string());
            match &mut state.kind {
                Kind::Receive { events, spans } => {
                    let result = result.and_then(|()| {
                        let want = spans[j].1;
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
}
