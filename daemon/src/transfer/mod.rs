//! Daemon-to-daemon transfer's mechanism: `transfer.lanes` threads, each owning a UCX context and worker, run
//! many transfers at once as tagged messages (the protocol `ucx_perftest -t tag_bw` measures):
//! - receiving: a receive per block is posted straight into its reserved pool slot (zero copy
//!   where the transport allows: rendezvous into the slot). A receive writes only while pending:
//!   cancelled before a sender matched it, its slot is ours again, which a remote write into our
//!   pool could never promise;
//! - sending: one message per block straight from its pinned slot, to the receiver's worker.
//!   Sends over a new connection wait until it is set up (its first flush completes): UCX
//!   picks a message's protocol when it is posted, and before that it would pick eager, which
//!   the receiver copies through bounce buffers (measured: a first pull at half speed).
//!
//! Senders reach a lane through its UCX listener (a port, at the IP address the puller's Ship
//! call came from), so no UCX address taken from a request is parsed. Over shared memory only,
//! where UCX 1.13 has no connection manager, they use the lane's worker address instead, and
//! only callers on this host may hand one over (shared memory reaches no further).
//!
//! A transfer is striped over the puller's lanes: block `j` goes to lane `j % lanes`, so the
//! copies that land blocks (the receiver's, over shared memory; both sides', over TCP) run on
//! that many cores at once. Each thread spins on its worker while anything is in flight. After
//! a while of nothing happening, a lane with receives in flight naps (20 us); one with only
//! sends, or with nothing at all, sleeps until UCX (a completion, a connection) or a new
//! command wakes it (`Worker::wait`; at most 1 ms, or 100 ms when idle). A sender's messages
//! wait on the receiver, which over shared memory does the copying itself, on the cores a
//! spinning sender would take; and an idle daemon costs no CPU.

mod lane;

use crate::config::TransferConfig;
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::{mpsc as tmpsc, oneshot};

pub use lane::GRACE;

/// What callers get when a UCX thread is gone.
const STOPPED: &str = "UCX thread stopped";

/// Most lanes a daemon runs, and a shipment may name.
pub use crate::config::MAX_LANES;

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

/// How a sender reaches one of our lanes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Contact {
    /// The lane's UCX listener port, at the IP address the puller's Ship call comes from.
    Port(u16),
    /// The lane's UCX worker address (shared-memory transports only: same host).
    Worker(Vec<u8>),
}

/// Where a send goes: a puller lane's listener, or its worker address (shared memory).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Remote {
    /// A lane listening at this socket address.
    Socket(SocketAddr),
    /// A lane's UCX worker address.
    Worker(Vec<u8>),
}

/// A receive in flight: its tag base (the sender tags block `j` `tag_base + j`), the lanes it is
/// striped over (block `j` to `lanes[j % lanes.len()]`) and its op id (to cancel it).
#[derive(Clone, Debug)]
pub struct Receiving {
    /// Tag of block 0; block `j` is `tag_base + j`.
    pub tag_base: u64,
    /// How the sender reaches the lane of block `j`: `lanes[j % lanes.len()]`.
    pub lanes: Vec<Contact>,
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
        peer: Remote,
    },
    Send {
        op: u32,
        peer: Remote,
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

/// How callers hand a lane thread work: its command queue, and the eventfd that wakes it when
/// it sleeps waiting for UCX.
struct LaneTx {
    cmds: mpsc::Sender<Cmd>,
    bell: Arc<EventFd>,
}

impl LaneTx {
    /// Queues `cmd` and wakes the lane; Err when the lane thread is gone.
    fn send(&self, cmd: Cmd) -> Result<(), ()> {
        self.cmds.send(cmd).map_err(|_| ())?;
        // Fails only when the counter would overflow: then it is set, which is all we need.
        let _ = self.bell.write(1);
        Ok(())
    }
}

/// Handle to the UCX threads.
pub struct Peer {
    lanes: Vec<LaneTx>,
    contacts: Vec<Contact>,
    next_op: AtomicU32,
}

impl Peer {
    /// Starts `cfg.lanes` UCX threads with `cfg`'s transports.
    /// Its lanes run as supervised parts of `parts`.
    pub fn start(
        cfg: &TransferConfig,
        parts: &crate::supervise::Parts,
        stall_after: std::time::Duration,
    ) -> anyhow::Result<Peer> {
        let mut settings: Vec<(String, String)> = Vec::new();
        if !cfg.ucx_transports.is_empty() {
            settings.push(("TLS".into(), cfg.ucx_transports.clone()));
        }
        if !cfg.net_devices.is_empty() {
            settings.push(("NET_DEVICES".into(), cfg.net_devices.clone()));
        }
        let detect = !shared_memory_only(&cfg.ucx_transports);
        if !detect {
            tracing::warn!(
                tls = %cfg.ucx_transports,
                "transfers over shared memory only: UCX detects no peer failure there, so a peer dying \
                 mid-transfer may stop this daemon; use tcp or RDMA transports in production"
            );
        }
        // Shared memory alone has no connection manager in UCX 1.13: no listeners then.
        let ip: IpAddr = cfg.listen_ip.parse().map_err(|e| anyhow::anyhow!("peer.listen_ip: {e}"))?;
        let (mut lanes, mut contacts) = (Vec::new(), Vec::new());
        for lane in 0..cfg.lanes.clamp(1, MAX_LANES) {
            let (cmds, rx) = mpsc::channel();
            let bell = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?);
            let (ready_tx, ready_rx) = mpsc::channel();
            let settings = settings.clone();
            let part = parts.add(format!("lane-{lane}"), crate::supervise::Role::Transfer, Some(stall_after));
            // Lane i on listen_port + i (0: the system picks).
            let port = match cfg.listen_port {
                0 => 0,
                first => {
                    first.checked_add(lane as u16).ok_or_else(|| anyhow::anyhow!("peer.listen_port + lane > 65535"))?
                }
            };
            let listen = detect.then_some(SocketAddr::new(ip, port));
            let lane_bell = Arc::clone(&bell);
            crate::supervise::thread(part, move |part| {
                lane::run(settings, detect, listen, rx, lane_bell, ready_tx, part)
            })?;
            let contact = ready_rx.recv().map_err(|_| anyhow::anyhow!("UCX thread died at start"))??;
            lanes.push(LaneTx { cmds, bell });
            contacts.push(contact);
        }
        Ok(Peer { lanes, contacts, next_op: AtomicU32::new(1) })
    }

    /// How senders reach each of our lanes.
    pub fn contacts(&self) -> &[Contact] {
        &self.contacts
    }

    /// A fresh operation id; never 0, which names a lane's own connection flushes.
    fn op(&self) -> u32 {
        loop {
            match self.next_op.fetch_add(1, Relaxed) {
                0 => continue,
                op => return op,
            }
        }
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
                self.cancel_op(op);
                return Err(STOPPED.to_string());
            }
        }
        let lanes = self.contacts[..used].to_vec();
        Ok((Receiving { tag_base: token(op, 0), lanes, op }, Receipts { rx, lanes_left: used }))
    }

    /// Cancels what of `r` no sender has started filling yet (its `Finished` follows).
    pub fn cancel(&self, r: &Receiving) {
        self.cancel_op(r.op);
    }

    fn cancel_op(&self, op: u32) {
        for tx in &self.lanes {
            let _ = tx.send(Cmd::Cancel { op });
        }
    }

    /// Fails every send to `peers` (their puller is gone): the endpoints are closed and the
    /// sends end within [`GRACE`].
    pub fn abort_sends_to(&self, peers: &[Remote]) {
        for tx in &self.lanes {
            for peer in peers {
                let _ = tx.send(Cmd::Abort { peer: peer.clone() });
            }
        }
    }

    /// Sends `spans[j]` tagged `tag_base + j` to the lane `peers[j % peers.len()]`; done
    /// when every send completed, or failed at `deadline` (the endpoints are then closed,
    /// forcing what is left). Returns only when no send reads the spans any more.
    ///
    /// # Safety
    /// The spans must stay valid and unchanged until this returns.
    pub async unsafe fn send(
        &self,
        peers: &[Remote],
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

    /// A port `p` with `p + 1` free too (both just bound and released).
    fn two_free_ports() -> u16 {
        loop {
            let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if first < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", first + 1)).is_ok() {
                return first;
            }
        }
    }

    #[test]
    fn lanes_listen_on_the_configured_ports_or_any() {
        let tcp = TransferConfig {
            ucx_transports: "tcp".into(),
            net_devices: "lo".into(),
            listen_ip: "127.0.0.1".into(),
            ..Default::default()
        };
        let first = two_free_ports();
        let parts = crate::supervise::Parts::default();
        let stall = std::time::Duration::from_secs(30);
        let fixed = Peer::start(&TransferConfig { listen_port: first, ..tcp.clone() }, &parts, stall).unwrap();
        assert_eq!(fixed.contacts(), [Contact::Port(first), Contact::Port(first + 1)]);
        let any = Peer::start(&tcp, &parts, stall).unwrap();
        assert!(any.contacts().iter().all(|c| matches!(c, Contact::Port(p) if *p != 0)), "{:?}", any.contacts());
        let shm = Peer::start(
            &TransferConfig { ucx_transports: "shm".into(), lanes: 1, ..Default::default() },
            &parts,
            stall,
        )
        .unwrap();
        assert!(matches!(shm.contacts(), [Contact::Worker(_)]), "shared memory only: worker addresses");
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
