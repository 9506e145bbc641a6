//! An async connection to kvtierd's connector socket.

use crate::pool::{OutOfBounds, PoolMapping, Slot};
use bytes::Bytes;
use kvtier_proto::frame::{encode_into, FrameDecoder, FrameError};
use kvtier_proto::v1::{self as pb, request, response, ErrorCode, NamespaceDescriptor, ReserveStatus};
use kvtier_proto::PROTOCOL_VERSION;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use prost::Message;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The daemon answered with an error (and closed the connection).
    #[error("daemon error {code:?}: {reason}")]
    Daemon {
        /// Error code.
        code: ErrorCode,
        /// The daemon's reason.
        reason: String,
    },
    /// The daemon's reply did not make sense.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A slot location outside the mapping.
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
}

/// Result of client calls.
pub type Result<T> = std::result::Result<T, ClientError>;

/// What the daemon did with one hash of a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Write the block into this slot, then commit.
    Slot(Slot),
    /// Already held; nothing to write.
    Present,
    /// No room; this and every later block of the request are not saved.
    NoSpace,
}

/// A namespace registered on this connection.
#[derive(Clone, Debug)]
pub struct Namespace {
    /// Connection-local handle.
    pub handle: u32,
    /// Stable 16-byte id.
    pub id: Bytes,
    /// Bytes per block.
    pub block_bytes: u64,
}

/// What a save did with each block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SaveReport {
    /// Blocks written and committed.
    pub stored: usize,
    /// Blocks already held.
    pub present: usize,
    /// Blocks refused for lack of room.
    pub no_space: usize,
}

/// A connection to kvtierd with the pool mapped.
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
    next_id: u64,
    /// Id of the oldest request whose reply has not been read.
    next_reply: u64,
    pool: PoolMapping,
    hello: pb::HelloReply,
    out: Vec<u8>,
}

impl Client {
    /// Connects, says Hello and maps the pool segments the daemon passes.
    pub async fn connect(path: &Path, client_name: &str) -> Result<Self> {
        Self::connect_as(path, client_name, None).await
    }

    /// Like [`connect`](Self::connect), announcing the inference engine this connection speaks
    /// for (as an engine's connector does, so that gateways route to it by its node's blocks).
    pub async fn connect_as(path: &Path, client_name: &str, engine: Option<pb::EngineInfo>) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display())))?;
        let mut decoder = FrameDecoder::new(64 << 20);
        let hello = request::Op::Hello(pb::Hello {
            client_name: client_name.into(),
            protocol_version: PROTOCOL_VERSION,
            engine,
        });
        let mut out = Vec::new();
        encode_into(&pb::Request { id: 0, op: Some(hello) }, &mut out);
        let mut stream = stream;
        // A daemon that refuses the connection (a uid not allowed, a limit reached) answers and
        // closes before reading: its reason comes before a broken pipe.
        let sent = stream.write_all(&out).await;
        let (frame, fds) = match (recv_frame_with_fds(&stream, &mut decoder).await, sent) {
            (Ok(got), _) => got,
            (Err(_), Err(e)) => return Err(e.into()),
            (Err(e), Ok(())) => return Err(e),
        };
        let reply = pb::Response::decode(&frame[..]).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let hello = match into_result(reply)? {
            response::Result::Hello(h) => h,
            other => return Err(ClientError::Protocol(format!("expected HelloReply, got {other:?}"))),
        };
        let sizes: Vec<u64> = hello.segments.iter().map(|s| s.bytes).collect();
        let pool = PoolMapping::map(fds, &sizes)?;
        Ok(Self { stream, decoder, next_id: 1, next_reply: 1, pool, hello, out })
    }

    /// The daemon's Hello reply (version, segments, limits).
    pub fn hello(&self) -> &pb::HelloReply {
        &self.hello
    }

    /// The mapped pool (or, for a client the daemon does not trust, its staging window).
    pub fn pool(&self) -> &PoolMapping {
        &self.pool
    }

    /// Blocks per request of [`save`](Self::save) and [`load`](Self::load) in `ns`.
    fn chunk_blocks(&self, ns: &Namespace) -> usize {
        let window = self.hello.staged.then(|| self.hello.segments.first().map_or(0, |s| s.bytes));
        chunk_blocks(window, ns.block_bytes)
    }

    /// Sends `ops` back to back, then reads all replies (in order).
    pub async fn pipeline(&mut self, ops: Vec<request::Op>) -> Result<Vec<response::Result>> {
        let n = ops.len();
        self.send_all(ops).await?;
        let mut results = Vec::with_capacity(n);
        for _ in 0..n {
            results.push(self.recv().await?);
        }
        Ok(results)
    }

    /// Sends requests without waiting; their replies come back in order through [`recv`](Self::recv).
    pub async fn send_all(&mut self, ops: Vec<request::Op>) -> Result<()> {
        self.out.clear();
        for op in ops {
            encode_into(&pb::Request { id: self.next_id, op: Some(op) }, &mut self.out);
            self.next_id += 1;
        }
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    /// The reply to the oldest request not yet answered.
    pub async fn recv(&mut self) -> Result<response::Result> {
        let resp = self.read_response().await?;
        let id = self.next_reply;
        if resp.id != id && !matches!(resp.result, Some(response::Result::Error(_))) {
            return Err(ClientError::Protocol(format!("reply id {} where {id} was expected", resp.id)));
        }
        self.next_reply += 1;
        into_result(resp)
    }

    /// Sends one request and waits for its reply.
    pub async fn call(&mut self, op: request::Op) -> Result<response::Result> {
        Ok(self.pipeline(vec![op]).await?.pop().expect("one reply"))
    }

    async fn read_response(&mut self) -> Result<pb::Response> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(body)) => {
                    return pb::Response::decode(&body[..]).map_err(|e| ClientError::Protocol(e.to_string()))
                }
                Ok(None) => {}
                Err(FrameError::TooLarge { len, .. }) => {
                    return Err(ClientError::Protocol(format!("reply of {len} bytes")))
                }
            }
            const READ: usize = 64 * 1024;
            let n = self.stream.read(self.decoder.spare(READ)).await;
            let n = n.inspect_err(|_| self.decoder.commit(0, READ))?;
            self.decoder.commit(n, READ);
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "daemon closed the connection").into());
            }
        }
    }

    /// Registers a namespace.
    pub async fn register(&mut self, desc: NamespaceDescriptor) -> Result<Namespace> {
        let r = reply!(self.call(request::Op::Register(pb::Register { namespace: Some(desc) })).await?, Register)?;
        Ok(Namespace { handle: r.handle, id: r.namespace_id, block_bytes: r.block_bytes })
    }

    /// Number of leading `hashes` held.
    pub async fn lookup(&mut self, ns: &Namespace, hashes: &[Bytes]) -> Result<usize> {
        Ok(self.lookup_tiers(ns, hashes).await?.len())
    }

    /// Like [`lookup`](Self::lookup), with the tier each block of the held prefix is in.
    pub async fn lookup_tiers(&mut self, ns: &Namespace, hashes: &[Bytes]) -> Result<Vec<pb::Tier>> {
        let op = request::Op::Lookup(pb::Lookup { handle: ns.handle, hashes: hashes.to_vec() });
        reply!(self.call(op).await?, Lookup).map(|r| r.tiers().collect())
    }

    /// Asks the daemon to promote the disk-only blocks of the held prefix of `hashes` into the
    /// pool ahead of a load; returns how many it started. Returns at once.
    pub async fn prefetch(&mut self, ns: &Namespace, hashes: &[Bytes]) -> Result<usize> {
        reply!(
            self.call(request::Op::Prefetch(pb::Prefetch { handle: ns.handle, hashes: hashes.to_vec() })).await?,
            Prefetch
        )
        .map(|r| r.queued as usize)
    }

    /// Reserves slots for `hashes` (`parent`: the hash before `hashes[0]`, if any); returns the
    /// reservation id (0 if nothing was reserved) and one outcome per hash.
    pub async fn reserve(
        &mut self,
        ns: &Namespace,
        hashes: &[Bytes],
        parent: Option<Bytes>,
    ) -> Result<(u64, Vec<Reservation>)> {
        reply!(self.call(reserve_op(ns, hashes, parent)).await?, Reserve)
            .and_then(|r| parse_reservation(r, hashes.len()))
    }

    /// Commits a reservation.
    pub async fn commit(&mut self, reservation: u64) -> Result<u32> {
        reply!(self.call(request::Op::Commit(pb::Commit { reservation })).await?, Commit).map(|r| r.committed)
    }

    /// Pins the longest held prefix of `hashes`; returns the lease and slots.
    pub async fn acquire(&mut self, ns: &Namespace, hashes: &[Bytes]) -> Result<(u64, Vec<Slot>)> {
        let reply = self.call(acquire_op(ns, hashes)).await?;
        parse_lease(reply)
    }

    /// Releases a lease.
    pub async fn release(&mut self, lease: u64) -> Result<()> {
        reply!(self.call(request::Op::Release(pb::Release { lease })).await?, Release).map(|_| ())
    }

    /// Registers the engine's KV tensors for daemon-side copies (when `hello().device_dma`); the
    /// reply's `error` says why the daemon cannot reach them, if it cannot.
    pub async fn register_kv_cache(&mut self, r: pb::RegisterKvCache) -> Result<pb::RegisterKvCacheReply> {
        reply!(self.call(request::Op::RegisterKvCache(r)).await?, RegisterKvCache)
    }

    /// Has the daemon copy engine blocks into the pool and commit them.
    pub async fn save_kv(&mut self, r: pb::SaveKv) -> Result<pb::SaveKvReply> {
        reply!(self.call(request::Op::SaveKv(r)).await?, SaveKv)
    }

    /// Has the daemon copy the held prefix into engine blocks.
    pub async fn load_kv(&mut self, r: pb::LoadKv) -> Result<pb::LoadKvReply> {
        reply!(self.call(request::Op::LoadKv(r)).await?, LoadKv)
    }

    /// Admin: removes the blocks of the namespaces `r` selects from every tier (root or the
    /// daemon's uid only).
    pub async fn discard(&mut self, r: pb::Discard) -> Result<pb::DiscardReply> {
        reply!(self.call(request::Op::Discard(r)).await?, Discard)
    }

    /// Admin: the daemon's connections (root or the daemon's uid only).
    pub async fn clients(&mut self) -> Result<pb::ClientsReply> {
        reply!(self.call(request::Op::Clients(pb::Clients {})).await?, Clients)
    }

    /// Admin: replaces the daemon's log filter (empty: reads it); returns it before and after.
    pub async fn log_filter(&mut self, filter: &str) -> Result<pb::LogFilterReply> {
        reply!(self.call(request::Op::LogFilter(pb::LogFilter { filter: filter.into() })).await?, LogFilter)
    }

    /// Daemon statistics.
    pub async fn stats(&mut self) -> Result<pb::StatsReply> {
        reply!(self.call(request::Op::Stats(pb::Stats {})).await?, Stats)
    }

    /// Saves blocks: reserve, copy each into its slot, commit. `blocks[i]` is the content of
    /// `hashes[i]` and must be `block_bytes` long. Long runs go in chunks of [`CHUNK_BLOCKS`],
    /// the reservation of the next chunk in flight while this one is copied.
    pub async fn save(&mut self, ns: &Namespace, hashes: &[Bytes], blocks: &[&[u8]]) -> Result<SaveReport> {
        assert_eq!(hashes.len(), blocks.len(), "one block per hash");
        let chunks = chunk_ranges(hashes.len(), self.chunk_blocks(ns));
        let mut report = SaveReport::default();
        let mut commits_in_flight = 0;
        let mut next_reserved = None; // the chunk whose reservation is in flight
        if let Some(&(a, b)) = chunks.first() {
            self.send_all(vec![reserve_op(ns, &hashes[a..b], None)]).await?;
            next_reserved = Some(0);
        }
        while let Some(k) = next_reserved.take() {
            let (a, b) = chunks[k];
            let (reservation, slots) = loop {
                match self.recv().await? {
                    response::Result::Commit(_) => commits_in_flight -= 1,
                    response::Result::Reserve(r) => break parse_reservation(r, b - a)?,
                    other => return Err(unexpected(other)),
                }
            };
            let complete = !slots.contains(&Reservation::NoSpace);
            let mut ops = Vec::new();
            if complete && k + 1 < chunks.len() {
                let (c, d) = chunks[k + 1];
                ops.push(reserve_op(ns, &hashes[c..d], Some(hashes[b - 1].clone())));
                next_reserved = Some(k + 1);
            }
            if !ops.is_empty() {
                self.send_all(ops).await?;
            }
            for (slot, data) in slots.iter().zip(&blocks[a..b]) {
                match slot {
                    Reservation::Slot(s) => {
                        self.pool.write(*s, data)?;
                        report.stored += 1;
                    }
                    Reservation::Present => report.present += 1,
                    Reservation::NoSpace => report.no_space += 1,
                }
            }
            if reservation != 0 {
                self.send_all(vec![request::Op::Commit(pb::Commit { reservation })]).await?;
                commits_in_flight += 1;
            }
            if !complete {
                // A prefix with a hole is useless: the rest is not saved.
                report.no_space += hashes.len() - b;
            }
        }
        for _ in 0..commits_in_flight {
            match self.recv().await? {
                response::Result::Commit(_) => {}
                other => return Err(unexpected(other)),
            }
        }
        Ok(report)
    }

    /// Loads the longest held prefix of `hashes`: acquire, visit, release. Calls `visit(i, block)`
    /// for each held block in prefix order with the block's bytes in the pool, pinned for the
    /// duration of the call: copy them where they belong. Returns how many blocks were visited.
    /// Long runs go in chunks, the next chunk acquired while this one is visited.
    pub async fn load(
        &mut self,
        ns: &Namespace,
        hashes: &[Bytes],
        mut visit: impl FnMut(usize, &[u8]),
    ) -> Result<usize> {
        let chunks = chunk_ranges(hashes.len(), self.chunk_blocks(ns));
        let Some(&(a, b)) = chunks.first() else { return Ok(0) };
        self.send_all(vec![acquire_op(ns, &hashes[a..b])]).await?;
        let mut loaded = 0;
        let mut releases = 0;
        for (k, &(a, b)) in chunks.iter().enumerate() {
            let (lease, slots) = loop {
                match self.recv().await? {
                    response::Result::Release(_) => releases -= 1,
                    reply @ response::Result::Acquire(_) => break parse_lease(reply)?,
                    other => return Err(unexpected(other)),
                }
            };
            let whole = slots.len() == b - a;
            let mut ops = Vec::new();
            if whole && k + 1 < chunks.len() {
                let (c, d) = chunks[k + 1];
                ops.push(acquire_op(ns, &hashes[c..d]));
            }
            if !ops.is_empty() {
                self.send_all(ops).await?;
            }
            for (i, slot) in slots.iter().enumerate() {
                visit(a + i, self.pool.slice(*slot, ns.block_bytes as usize)?);
            }
            loaded += slots.len();
            if lease != 0 {
                self.send_all(vec![request::Op::Release(pb::Release { lease })]).await?;
                releases += 1;
            }
            if !whole {
                break;
            }
        }
        for _ in 0..releases {
            match self.recv().await? {
                response::Result::Release(_) => {}
                other => return Err(unexpected(other)),
            }
        }
        Ok(loaded)
    }
}

/// Blocks per request when [`Client::save`] and [`Client::load`] move long runs.
pub const CHUNK_BLOCKS: usize = 512;

/// Blocks per chunk for blocks of `block_bytes` through a staging window of `window` bytes
/// (`None`: the pool is mapped): two chunks are in flight at once, so each takes at most half
/// the window.
///
/// ```
/// use kvtier_client::chunk_blocks;
/// assert_eq!(chunk_blocks(None, 1 << 20), 512);
/// assert_eq!(chunk_blocks(Some(64 << 20), 2 << 20), 16);
/// assert_eq!(chunk_blocks(Some(64 << 20), 4096), 512);
/// assert_eq!(chunk_blocks(Some(4 << 20), 3 << 20), 1, "at least one");
/// ```
pub fn chunk_blocks(window: Option<u64>, block_bytes: u64) -> usize {
    let Some(window) = window else { return CHUNK_BLOCKS };
    let range = block_bytes.div_ceil(4096).max(1) * 4096;
    ((window / range / 2) as usize).clamp(1, CHUNK_BLOCKS)
}

/// `(start, end)` of each chunk of at most `chunk` blocks in a run of `n` blocks.
fn chunk_ranges(n: usize, chunk: usize) -> Vec<(usize, usize)> {
    (0..n).step_by(chunk).map(|i| (i, (i + chunk).min(n))).collect()
}

fn acquire_op(ns: &Namespace, hashes: &[Bytes]) -> request::Op {
    request::Op::Acquire(pb::Acquire { handle: ns.handle, hashes: hashes.to_vec() })
}

fn parse_lease(reply: response::Result) -> Result<(u64, Vec<Slot>)> {
    match reply {
        response::Result::Acquire(r) if r.segments.len() == r.offsets.len() => Ok((
            r.lease,
            r.segments.iter().zip(&r.offsets).map(|(&segment, &offset)| Slot { segment, offset }).collect(),
        )),
        other => Err(unexpected(other)),
    }
}

fn reserve_op(ns: &Namespace, hashes: &[Bytes], parent: Option<Bytes>) -> request::Op {
    request::Op::Reserve(pb::Reserve { handle: ns.handle, hashes: hashes.to_vec(), parent: parent.unwrap_or_default() })
}

fn parse_reservation(r: pb::ReserveReply, asked: usize) -> Result<(u64, Vec<Reservation>)> {
    if r.status.len() != asked || r.segments.len() != r.offsets.len() {
        return Err(ClientError::Protocol("reserve reply does not match the request".into()));
    }
    let mut slots = r.segments.iter().zip(&r.offsets).map(|(&segment, &offset)| Slot { segment, offset });
    let out = r
        .status
        .iter()
        .map(|&st| match ReserveStatus::try_from(st) {
            Ok(ReserveStatus::Reserved) => slots
                .next()
                .map(Reservation::Slot)
                .ok_or_else(|| ClientError::Protocol("fewer slots than RESERVED statuses".into())),
            Ok(ReserveStatus::Present) => Ok(Reservation::Present),
            _ => Ok(Reservation::NoSpace),
        })
        .collect::<Result<_>>()?;
    Ok((r.reservation, out))
}

/// The reply of variant `$variant` of a response's `result`; any other variant is an error.
macro_rules! reply {
    ($result:expr, $variant:ident) => {
        match $result {
            response::Result::$variant(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    };
}
use reply;

fn unexpected(r: response::Result) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {r:?}"))
}

fn into_result(resp: pb::Response) -> Result<response::Result> {
    match resp.result {
        Some(response::Result::Error(e)) => Err(ClientError::Daemon {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            reason: e.reason,
        }),
        Some(r) => Ok(r),
        None => Err(ClientError::Protocol("empty response".into())),
    }
}

/// Reads until one frame is complete, collecting fds passed with SCM_RIGHTS on the way.
async fn recv_frame_with_fds(stream: &UnixStream, decoder: &mut FrameDecoder) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut fds = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(body)) => return Ok((body, fds)),
            Ok(None) => {}
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        const READ: usize = 64 * 1024;
        let raw = stream.as_raw_fd();
        let spare = decoder.spare(READ);
        let got = stream
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(spare)];
                let mut cmsg = nix::cmsg_space!([RawFd; 64]);
                let msg = recvmsg::<()>(raw, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                let mut got_fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        got_fds.extend(list);
                    }
                }
                Ok((msg.bytes, got_fds))
            })
            .await;
        let (n, new_fds) = got.inspect_err(|_| decoder.commit(0, READ))?;
        decoder.commit(n, READ);
        // Each received fd is a fresh descriptor this process now owns.
        fds.extend(new_fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        if n == 0 {
            return Err(
                io::Error::new(io::ErrorKind::UnexpectedEof, "daemon closed the connection during Hello").into()
            );
        }
    }
}
