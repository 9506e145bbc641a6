//! One lane: a thread owning a UCX context, a worker and (unless over shared memory only) a
//! listener, running its share of every transfer as an event loop.

use super::{token, Cmd, Contact, Received, Remote, Span};
use kvtier_ucx::{Context, Endpoint, Listener, Woken, Worker};
use nix::sys::eventfd::EventFd;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc as tmpsc, oneshot};

enum Kind {
    Receive {
        events: tmpsc::UnboundedSender<Received>,
        /// (block index in the operation, its span) per message.
        blocks: Vec<(usize, Span)>,
    },
    Send {
        peer: Remote,
        /// The endpoint its messages go out on ([`Endpoint::id`]; None: none could be made).
        endpoint: Option<usize>,
        /// Messages (index in the operation, tag, span) held back until that endpoint's
        /// connection is up.
        queued: Vec<(usize, u64, Span)>,
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

/// An endpoint we send through.
struct Conn {
    ep: Endpoint,
    /// Whether its connection is set up (its first flush completed): until then sends wait,
    /// since UCX would send them eager, copied through bounce buffers, whatever their size.
    ready: bool,
}

/// The UCX thread's state.
struct Engine<'w> {
    worker: &'w Worker,
    /// Endpoints we send through, by where they go.
    endpoints: HashMap<Remote, Conn>,
    /// Flushes of new endpoints in flight, by token: (where it goes, [`Endpoint::id`]).
    connecting: HashMap<u64, (Remote, usize)>,
    /// Number of the next connection flush (its token is `token(0, n)`).
    next_flush: u32,
    /// Endpoints senders connected to our listener with (kept so their connections stay up).
    accepted: VecDeque<Endpoint>,
    ops: HashMap<u32, Op>,
    detect_peer_failure: bool,
}

/// What a lane reports once started: how senders reach it.
pub(super) type Ready = anyhow::Result<Contact>;

/// Most connections a lane keeps accepted (failed ones are closed as UCX reports them); past it,
/// the oldest is closed (a shipment still using it fails, and its sender connects anew next
/// time). Bounds what peers that connect over and over can make us hold.
const MAX_ACCEPTED: usize = 1024;

/// Empty progress rounds of a worker with receives in flight before it naps.
const IDLE_SPINS: u32 = 256;
/// Its nap.
const NAP_US: u64 = 20;
/// Naps in a row (nothing arriving for a millisecond or more: a slow or stopped sender) after
/// which a receiving lane sleeps until UCX or a command wakes it.
const QUIET_NAPS: u32 = 50;
/// Empty progress rounds of a worker with only sends in flight before it sleeps until UCX or a
/// command wakes it.
const SEND_SPINS: u32 = 16;
/// Longest sleep of a lane with something in flight: what a wake-up UCX failed to give costs at
/// most (UCX 1.13 can lose one, seen over TCP for messages sent before their connection was up,
/// which lanes avoid).
const BUSY_SLEEP: Duration = Duration::from_millis(1);
/// Longest sleep of a lane with nothing in flight (it wakes for commands and connections).
const IDLE_SLEEP: Duration = Duration::from_millis(100);
/// A lane with nothing in flight whose worker cannot sleep on events naps this long instead.
const IDLE_NAP_US: u64 = 100;
/// How long UCX gets to finish the sends of a force-closed endpoint before they are answered.
pub const GRACE: Duration = Duration::from_secs(1);

/// The lane's thread: sets up UCX (listening on `listen`, when given), reports how to reach it
/// on `ready`, then serves commands until `rx` closes; `bell` is written with every command.
pub(super) fn run(
    settings: Vec<(String, String)>,
    detect_peer_failure: bool,
    listen: Option<SocketAddr>,
    rx: mpsc::Receiver<Cmd>,
    bell: Arc<EventFd>,
    ready: mpsc::Sender<Ready>,
    part: &crate::supervise::Part,
) {
    let setup = || -> anyhow::Result<(std::sync::Arc<Context>, Worker)> {
        let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let ctx = Context::new(&pairs)?;
        let worker = Worker::new(&ctx)?;
        Ok((ctx, worker))
    };
    let (_ctx, worker) = match setup() {
        Ok(up) => up,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let listening = |at: SocketAddr| -> anyhow::Result<(Listener<'_>, Contact)> {
        let listener = worker.listen(at)?;
        let port = listener.local_addr()?.port();
        Ok((listener, Contact::Port(port)))
    };
    let (listener, contact) = match listen.map(listening) {
        Some(Ok((listener, contact))) => (Some(listener), Ok(contact)),
        Some(Err(e)) => (None, Err(e)),
        None => (None, worker.address().map(Contact::Worker).map_err(Into::into)),
    };
    let failed = contact.is_err();
    let _ = ready.send(contact);
    if failed {
        return;
    }
    let mut engine = Engine {
        worker: &worker,
        endpoints: HashMap::new(),
        connecting: HashMap::new(),
        next_flush: 0,
        accepted: VecDeque::new(),
        ops: HashMap::new(),
        detect_peer_failure,
    };
    // Empty progress rounds in a row, and UCX refusals to sleep in a row.
    let (mut idle, mut stuck, mut can_sleep) = (0u32, 0u32, true);
    'serve: loop {
        part.beat();
        crate::fault::point(&part.name);
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    engine.start(cmd);
                    idle = 0;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => break 'serve,
            }
        }
        // Bounded: a worker with a failing connection can report events forever.
        let mut events = 0;
        for _ in 0..64 {
            match engine.worker.progress() {
                0 => break,
                n => events += n,
            }
        }
        engine.drop_failed();
        if let Some(listener) = &listener {
            engine.accept(listener);
        }
        engine.complete();
        let busy = !engine.ops.is_empty();
        if busy {
            engine.expire(Instant::now());
        }
        // Nothing happening (waiting on the peer, or for work): give the CPU to whoever will
        // make something happen, often the peer daemon itself on a small machine.
        (idle, stuck) = if events == 0 { (idle + 1, stuck) } else { (0, 0) };
        // Guards in this order: which ops are in flight is looked at only once spinning stalls.
        let sleep = match busy {
            false => Some(IDLE_SLEEP),
            true if idle > SEND_SPINS && engine.sending_only() => Some(BUSY_SLEEP),
            true if idle > IDLE_SPINS + QUIET_NAPS => Some(BUSY_SLEEP),
            true => None,
        };
        match sleep.filter(|_| can_sleep) {
            // Woken by something: spin again. Timed out: still nothing, so sleep again next time.
            // UCX busy with nothing to progress (seen over shared memory with a sender stopped
            // mid-message): it cannot be slept on, so nap, longer each time up to `timeout`.
            Some(timeout) => match sleep_on_events(engine.worker, &bell, timeout) {
                Ok(Woken::Busy) => {
                    let nap = Duration::from_micros(NAP_US << stuck.min(6)).min(timeout);
                    std::thread::sleep(nap);
                    stuck += 1;
                }
                Ok(woken) => {
                    stuck = 0;
                    if woken == Woken::Ready {
                        idle = 0;
                    }
                }
                Err(e) => {
                    tracing::warn!("peer lane cannot sleep on UCX events ({e}); it naps instead");
                    can_sleep = false;
                }
            },
            None if !busy => std::thread::sleep(Duration::from_micros(IDLE_NAP_US)),
            None if idle > IDLE_SPINS => std::thread::sleep(Duration::from_micros(NAP_US)),
            None => {}
        }
    }
    engine.endpoints.clear();
    engine.accepted.clear();
}

/// Sleeps until UCX has events for the lane's worker, a command rings `bell`, or `timeout`
/// passes; [`Woken::Ready`] at once when `bell` had rung, [`Woken::Busy`] at once when UCX
/// says events are pending.
fn sleep_on_events(worker: &Worker, bell: &EventFd, timeout: Duration) -> kvtier_ucx::Result<Woken> {
    // Reset the bell. If it had rung, a command may have come after the loop last took the
    // queue: go round again. Once reset, any command queued rings it and ends the wait at once.
    if bell.read().is_ok() {
        return Ok(Woken::Ready);
    }
    worker.wait(Some(bell.as_fd()), timeout)
}

impl Engine<'_> {
    /// Whether every operation in flight is a send: the lane mostly waits for its receivers then
    /// (over shared memory, they even do the copying).
    fn sending_only(&self) -> bool {
        self.ops.values().all(|op| matches!(op.kind, Kind::Send { .. }))
    }

    /// Closes the endpoints UCX reported failed (their operations fail on their own): a peer
    /// gone, or a connection lost. A sender reconnects on its next shipment.
    fn drop_failed(&mut self) {
        let failed = self.worker.take_failed_endpoints();
        if !failed.is_empty() {
            self.accepted.retain(|ep| !failed.contains(&ep.id()));
            self.endpoints.retain(|_, c| !failed.contains(&c.ep.id()));
            for id in failed {
                self.fail_queued(id, "connection to the puller failed (gone or unreachable)");
            }
        }
    }

    /// Accepts the connections senders asked for.
    fn accept(&mut self, listener: &Listener) {
        for request in listener.take_requests() {
            match self.worker.accept(request, true) {
                Ok(ep) => self.accepted.push_back(ep),
                Err(e) => tracing::warn!("peer connection refused: {e}"),
            }
            if self.accepted.len() > MAX_ACCEPTED {
                self.accepted.pop_front();
            }
        }
    }

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
                let (mut error, mut endpoint, mut ready) = (None, None, false);
                match self.endpoint(&peer) {
                    Err(e) => error = Some(e),
                    Ok(conn) => (endpoint, ready) = (Some(conn.ep.id()), conn.ready),
                }
                let queued = match error {
                    None => messages.iter().enumerate().map(|(k, &(tag, span))| (k, tag, span)).collect(),
                    Some(_) => Vec::new(),
                };
                let kind = Kind::Send { peer: peer.clone(), endpoint, queued, deadline, forced_at: None, done, error };
                let mut state = Op { kind, pending: vec![false; messages.len()], left: 0 };
                if let Some(conn) = self.endpoints.get(&peer).filter(|_| ready) {
                    Self::post_queued(self.worker, conn, op, &mut state);
                }
                self.ops.insert(op, state);
            }
        }
    }

    /// Posts the sends `state` (operation `op`) holds back, over `conn`.
    fn post_queued(worker: &Worker, conn: &Conn, op: u32, state: &mut Op) {
        let Kind::Send { queued, error, .. } = &mut state.kind else { return };
        for (k, tag, (addr, len)) in std::mem::take(queued) {
            // SAFETY: the caller of `Peer::send` keeps the spans until done.
            match unsafe { worker.tag_send(&conn.ep, addr as *const u8, len, None, tag, token(op, k)) } {
                Ok(()) => {
                    state.pending[k] = true;
                    state.left += 1;
                }
                Err(e) => {
                    error.get_or_insert(e.to_string());
                    break;
                }
            }
        }
    }

    /// Fails the sends held back for endpoint `id` (its connection never came up).
    fn fail_queued(&mut self, id: usize, why: &str) {
        for state in self.ops.values_mut() {
            if let Kind::Send { endpoint: Some(e), queued, error, .. } = &mut state.kind {
                if *e == id && !queued.is_empty() {
                    queued.clear();
                    error.get_or_insert_with(|| why.to_string());
                }
            }
        }
    }

    /// A connection flush completed: the endpoint is ready and its held-back sends go out, or
    /// it failed and so do they.
    fn connected(&mut self, flush: u64, result: Result<(), String>) {
        let Some((peer, id)) = self.connecting.remove(&flush) else { return };
        let Some(conn) = self.endpoints.get_mut(&peer).filter(|c| c.ep.id() == id) else {
            // Closed meanwhile (failed, forced): its sends were failed then.
            return self.fail_queued(id, "connection closed");
        };
        if let Err(e) = result {
            tracing::debug!(?peer, "peer connection failed: {e}");
            self.endpoints.remove(&peer);
            return self.fail_queued(id, &format!("connecting: {e}"));
        }
        conn.ready = true;
        let conn = &self.endpoints[&peer];
        for (&op, state) in self.ops.iter_mut() {
            if matches!(state.kind, Kind::Send { endpoint: Some(e), .. } if e == id) {
                Self::post_queued(self.worker, conn, op, state);
            }
        }
    }

    /// The endpoint to `peer`, connected on first use (and flushed, to learn when it is up).
    fn endpoint(&mut self, peer: &Remote) -> Result<&Conn, String> {
        if !self.endpoints.contains_key(peer) {
            tracing::debug!(?peer, "peer lane connecting");
            let ep = match peer {
                Remote::Socket(at) => self.worker.connect_to(*at, true),
                Remote::Worker(address) => self.worker.connect(address, self.detect_peer_failure),
            }
            .map_err(|e| e.to_string())?;
            let flush = token(0, self.next_flush as usize);
            self.next_flush = self.next_flush.wrapping_add(1);
            // Unflushable: send at once (eager, slower, still correct).
            let ready = self.worker.flush_endpoint(&ep, flush).is_err();
            if !ready {
                self.connecting.insert(flush, (peer.clone(), ep.id()));
            }
            self.endpoints.insert(peer.clone(), Conn { ep, ready });
        }
        Ok(&self.endpoints[peer])
    }

    /// Routes completions to their operations and ends the operations with nothing in flight.
    fn complete(&mut self) {
        for c in self.worker.take_completions() {
            let (op, k) = ((c.token >> 32) as u32, (c.token & 0xffff_ffff) as usize);
            if op == 0 {
                self.connected(c.token, c.result.map_err(|e| e.to_string()));
                continue;
            }
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
        let finished: Vec<u32> = (self.ops.iter())
            .filter(|(_, s)| s.left == 0 && !matches!(&s.kind, Kind::Send { queued, .. } if !queued.is_empty()))
            .map(|(&op, _)| op)
            .collect();
        for op in finished {
            let Some(state) = self.ops.remove(&op) else { continue };
            match state.kind {
                Kind::Receive { events, .. } => {
                    let _ = events.send(Received::Finished);
                }
                Kind::Send { peer, endpoint, done, error, .. } => {
                    // A failed endpoint is not reused; one made since (after UCX reported this
                    // one failed) is another's and stays.
                    if error.is_some() && self.endpoints.get(&peer).map(|c| c.ep.id()) == endpoint {
                        self.endpoints.remove(&peer);
                    }
                    let _ = done.send(error.map_or(Ok(()), Err));
                }
            }
        }
    }

    /// Force-closes the endpoint to `peer`, failing its sends with `why`.
    fn force(&mut self, peer: &Remote, why: &str, now: Instant) {
        // Dropping the endpoint force-closes it: its sends complete with errors.
        self.endpoints.remove(peer);
        for state in self.ops.values_mut() {
            if let Kind::Send { peer: p, forced_at, error, queued, .. } = &mut state.kind {
                if p == peer && forced_at.is_none() {
                    queued.clear();
                    error.get_or_insert_with(|| why.to_string());
                    *forced_at = Some(now);
                }
            }
        }
    }

    /// Sends past their deadline are forced; forced sends UCX has not finished within
    /// [`GRACE`] are answered anyway (the endpoint is gone: nothing reads their memory).
    fn expire(&mut self, now: Instant) {
        let late: Vec<Remote> = (self.ops.values())
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
