//! Connector requests to `Node` calls: validation, translation, typed errors.

use crate::clients::Connection;
use crate::device::layout::{KvLayout, LayerPlacement};
use crate::device::EngineTensor;
use crate::metrics::Op;
use crate::node::{Blocks, KvCache, KvCopyError, Node, ReservedAt};
use crate::staging::{Staging, Window};
use bytes::Bytes;
use kvtier_core::block::{BlockHash, NsIdx};
use kvtier_core::cache::{CacheError, ClientId};
use kvtier_core::namespace::{NamespaceId, NamespaceSelector, Naming};
use kvtier_proto::v1::{self as pb, request, response, ErrorCode, ReserveStatus};
use kvtier_proto::PROTOCOL_VERSION;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

/// A protocol error: answered with a typed reply, then the connection is closed.
#[derive(Debug, Clone)]
pub struct Fatal {
    /// Wire error code.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub reason: String,
}

impl Fatal {
    /// A fatal error with `code` and `reason`.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }

    /// The error as a response to request `id`.
    pub fn into_response(self, id: u64) -> pb::Response {
        pb::Response {
            id,
            result: Some(response::Result::Error(pb::Error { code: self.code as i32, reason: self.reason })),
        }
    }
}

impl From<CacheError> for Fatal {
    fn from(e: CacheError) -> Self {
        let code = match e {
            CacheError::WrongBlockSize(_) => ErrorCode::WrongBlockSize,
            CacheError::TooManyNamespaces(_) => ErrorCode::ResourceExhausted,
            CacheError::UnknownId(_) => ErrorCode::UnknownId,
            CacheError::TooManyHeld { .. } => ErrorCode::TooManyHeld,
        };
        Fatal::new(code, e.to_string())
    }
}

/// Most KV caches one connection may register (one per engine worker and namespace).
const MAX_KV_CACHES: usize = 64;

/// What one connection has established so far.
pub struct Session {
    /// Owner id of the connection's reservations and pins.
    pub client: ClientId,
    /// The connected process (SO_PEERCRED, whose memory daemon-side copies reach) and what
    /// the admin view shows of the connection.
    pub record: Arc<Connection>,
    /// Whether the connected process may send admin requests (root or the daemon's own uid).
    pub admin: bool,
    /// Whether the client maps the pool itself (`server.trusted_uids`) rather than a window.
    pub trusted: bool,
    /// The private window of an untrusted client (made at Hello).
    pub staging: Option<Staging>,
    /// Whether Hello was received.
    pub greeted: bool,
    /// The last Lookup (namespace, first hash, length): an Acquire of the same prefix right
    /// after it is not counted again in the hit and miss counters.
    looked_up: Option<(NsIdx, BlockHash, usize)>,
    /// Namespaces registered on this connection, by handle.
    pub handles: Vec<NsIdx>,
    /// KV caches registered for daemon-side copies, by id.
    pub kv_caches: Vec<KvCache>,
    /// Loads answered before their copy completed, which unpin their blocks once it has.
    pub pending_loads: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    /// A session for a new connection (`admin`, `trusted`: see [`Session::admin`],
    /// [`Session::trusted`]).
    pub fn new(record: Arc<Connection>, admin: bool, trusted: bool) -> Self {
        Self {
            client: record.client,
            record,
            admin,
            trusted,
            staging: None,
            greeted: false,
            looked_up: None,
            handles: Vec::new(),
            kv_caches: Vec::new(),
            pending_loads: Vec::new(),
        }
    }

    /// Waits for the connection's queued loads to complete (before its pins are dropped).
    pub async fn settle(&mut self) {
        for pending in self.pending_loads.drain(..) {
            let _ = pending.await;
        }
    }

    /// The fds the Hello reply carries: the pool's segments for a trusted client, else its window.
    pub fn hello_fds<'a>(&'a self, node: &'a Node) -> Vec<BorrowedFd<'a>> {
        match &self.staging {
            Some(st) => vec![st.window().fd()],
            None => node.pool().segments().iter().map(|seg| seg.fd()).collect(),
        }
    }

    fn admin_only(&self, what: &str) -> Result<(), Fatal> {
        match self.admin {
            true => Ok(()),
            false => Err(Fatal::new(
                ErrorCode::PermissionDenied,
                format!("{what} is an admin request: root or the daemon's uid"),
            )),
        }
    }

    fn kv_cache(&self, id: u32) -> Result<&KvCache, Fatal> {
        self.kv_caches.get(id as usize).ok_or_else(|| {
            Fatal::new(ErrorCode::UnknownId, format!("KV cache {id} was not registered on this connection"))
        })
    }

    fn ns(&self, handle: u32) -> Result<NsIdx, Fatal> {
        self.handles.get(handle as usize).copied().ok_or_else(|| {
            Fatal::new(
                ErrorCode::UnregisteredNamespace,
                format!("namespace handle {handle} was not registered on this connection"),
            )
        })
    }
}

/// Which op a request is (for metrics).
pub fn op_of(op: &request::Op) -> Op {
    match op {
        request::Op::Hello(_) => Op::Hello,
        request::Op::Register(_) => Op::Register,
        request::Op::Lookup(_) => Op::Lookup,
        request::Op::Reserve(_) => Op::Reserve,
        request::Op::Commit(_) => Op::Commit,
        request::Op::Abort(_) => Op::Abort,
        request::Op::Acquire(_) => Op::Acquire,
        request::Op::Release(_) => Op::Release,
        request::Op::Stats(_) => Op::Stats,
        request::Op::Prefetch(_) => Op::Prefetch,
        request::Op::Pull(_) => Op::Pull,
        request::Op::RegisterKvCache(_) => Op::RegisterKvCache,
        request::Op::SaveKv(_) => Op::SaveKv,
        request::Op::LoadKv(_) => Op::LoadKv,
        request::Op::Discard(_) => Op::Discard,
        request::Op::Clients(_) => Op::Clients,
        request::Op::LogFilter(_) => Op::LogFilter,
    }
}

fn hashes(node: &Node, raw: &[Bytes]) -> Result<Vec<BlockHash>, Fatal> {
    let max = node.config.server.max_hashes_per_request as usize;
    if raw.len() > max {
        return Err(Fatal::new(ErrorCode::BadArgument, format!("{} hashes in one request, limit {max}", raw.len())));
    }
    raw.iter()
        .enumerate()
        .map(|(i, h)| {
            BlockHash::new(h).ok_or_else(|| {
                Fatal::new(ErrorCode::BadArgument, format!("hash {i} has {} bytes; must be 1 to 32", h.len()))
            })
        })
        .collect()
}

/// The optional parent hash of a Reserve, Pull or SaveKv (empty: none), validated like any hash.
fn parent(raw: &Bytes) -> Result<Option<BlockHash>, Fatal> {
    match raw.is_empty() {
        true => Ok(None),
        false => BlockHash::new(raw).map(Some).ok_or_else(|| {
            Fatal::new(ErrorCode::BadArgument, format!("parent hash has {} bytes; must be 1 to 32", raw.len()))
        }),
    }
}

/// An engine announced in Hello, within its documented limits.
fn checked_engine(e: pb::EngineInfo) -> Result<pb::EngineInfo, Fatal> {
    let bad = |why: String| Err(Fatal::new(ErrorCode::BadArgument, format!("Hello.engine: {why}")));
    if e.address.is_empty() || e.address.len() > 256 {
        return bad(format!("address has {} bytes; must be 1 to 256", e.address.len()));
    }
    if e.served_models.len() > 16 {
        return bad(format!("{} served models; at most 16", e.served_models.len()));
    }
    if let Some(m) = e.served_models.iter().find(|m| m.is_empty() || m.len() > 256) {
        return bad(format!("a served model name has {} bytes; must be 1 to 256", m.len()));
    }
    Ok(e)
}

/// Executes one request. `Ok` carries the result to send; `Err` is fatal for the connection.
pub async fn dispatch(node: &Arc<Node>, s: &mut Session, op: request::Op) -> Result<response::Result, Fatal> {
    use request::Op as R;
    use response::Result as A;
    match op {
        R::Hello(h) => {
            if s.greeted {
                return Err(Fatal::new(ErrorCode::NotHello, "Hello sent twice"));
            }
            if h.protocol_version < 1 {
                return Err(Fatal::new(
                    ErrorCode::UnsupportedVersion,
                    format!("client speaks up to protocol {}, daemon needs >= 1", h.protocol_version),
                ));
            }
            if let Some(engine) = h.engine {
                s.record.announced(checked_engine(engine)?);
            }
            s.greeted = true;
            s.record.named(&h.client_name);
            if !s.trusted {
                let bytes = node.config.server.staging_bytes.as_u64().next_multiple_of(4096);
                let window = Window::create(bytes, s.client.0)
                    .map_err(|e| Fatal::new(ErrorCode::Internal, format!("creating a staging window: {e}")))?;
                s.staging = Some(Staging::new(window));
            }
            let segments = match &s.staging {
                Some(st) => vec![pb::SegmentInfo { bytes: st.window().len() }],
                None => node.pool().segments().iter().map(|seg| pb::SegmentInfo { bytes: seg.len() }).collect(),
            };
            Ok(A::Hello(pb::HelloReply {
                protocol_version: h.protocol_version.min(PROTOCOL_VERSION),
                daemon_version: env!("CARGO_PKG_VERSION").into(),
                segments,
                max_frame_bytes: node.config.server.max_frame_bytes.as_u64(),
                max_inflight: node.config.server.max_inflight,
                device_backend: node.device().name().into(),
                device_dma: node.device().offers_dma(),
                staged: s.staging.is_some(),
            }))
        }
        _ if !s.greeted => Err(Fatal::new(ErrorCode::NotHello, "the first request must be Hello")),
        R::Register(r) => {
            let desc = r.namespace.ok_or_else(|| Fatal::new(ErrorCode::BadArgument, "Register without a namespace"))?;
            let id = NamespaceId::of(&desc);
            let quota = node.config.server.max_namespaces_per_client as usize;
            if s.handles.len() >= quota && !s.handles.iter().any(|&ns| node.namespace_id(ns) == id) {
                return Err(Fatal::new(
                    ErrorCode::ResourceExhausted,
                    format!("this connection registered {quota} namespaces (server.max_namespaces_per_client)"),
                ));
            }
            let naming = Naming { model: desc.model.clone(), cache_salt: desc.cache_salt.clone() };
            let (ns, stride) = node.register(s.client, id, desc.block_bytes, naming)?;
            s.record.registered(ns);
            s.record.registered_descriptor(&desc);
            let handle = match s.handles.iter().position(|&h| h == ns) {
                Some(i) => i,
                None => {
                    s.handles.push(ns);
                    s.handles.len() - 1
                }
            };
            Ok(A::Register(pb::RegisterReply {
                handle: handle as u32,
                namespace_id: Bytes::copy_from_slice(&id.0),
                block_bytes: desc.block_bytes,
                slot_stride: stride,
            }))
        }
        R::Lookup(l) => {
            let ns = s.ns(l.handle)?;
            let hs = hashes(node, &l.hashes)?;
            let tiers = node.lookup(ns, &hs);
            s.looked_up = hs.first().map(|&h| (ns, h, hs.len()));
            let tiers: Vec<i32> = tiers.into_iter().map(|t| super::wire_tier(t) as i32).collect();
            Ok(A::Lookup(pb::LookupReply { matched: tiers.len() as u32, tiers }))
        }
        R::Pull(p) => {
            let ns = s.ns(p.handle)?;
            let hs = hashes(node, &p.hashes)?;
            let parent = parent(&p.parent)?;
            let reply = match node.pull(&p.source, ns, &hs, parent).await {
                Ok(r) => pb::PullReply { pulled: r.pulled as u32, present: r.present as u32, error: String::new() },
                Err(error) => pb::PullReply { error, ..Default::default() },
            };
            Ok(A::Pull(reply))
        }
        R::Discard(d) => {
            s.admin_only("Discard")?;
            let selector = NamespaceSelector::new(&d.model, &d.cache_salt, &d.id_prefix, d.all)
                .map_err(|e| Fatal::new(ErrorCode::BadArgument, e))?;
            let worker = Arc::clone(node);
            let (chosen, out) = tokio::task::spawn_blocking(move || worker.discard(&selector, d.dry_run))
                .await
                .map_err(|e| Fatal::new(ErrorCode::Internal, format!("discard failed: {e}")))?;
            let matched = namespace_refs(&node.namespace_usage(), &chosen);
            Ok(A::Discard(pb::DiscardReply {
                namespaces: chosen.len() as u32,
                host_blocks: out.host,
                disk_blocks: out.disk,
                busy_blocks: out.busy,
                matched,
            }))
        }
        R::Clients(_) => {
            s.admin_only("Clients")?;
            Ok(A::Clients(clients_reply(node)))
        }
        R::LogFilter(f) => {
            s.admin_only("LogFilter")?;
            let (before, after) =
                crate::logging::set_filter(&f.filter).map_err(|e| Fatal::new(ErrorCode::BadArgument, e))?;
            Ok(A::LogFilter(pb::LogFilterReply { before, after }))
        }
        R::Prefetch(p) => {
            let ns = s.ns(p.handle)?;
            let hs = hashes(node, &p.hashes)?;
            Ok(A::Prefetch(pb::PrefetchReply { queued: node.prefetch(ns, hs) as u32 }))
        }
        R::Reserve(r) => {
            let ns = s.ns(r.handle)?;
            let hs = hashes(node, &r.hashes)?;
            let parent = parent(&r.parent)?;
            Ok(A::Reserve(reserve(node, s, ns, &hs, parent)?))
        }
        R::Commit(c) => Ok(A::Commit(pb::CommitReply { committed: commit(node, s, c.reservation).await? })),
        R::Abort(a) => {
            if let Some(st) = s.staging.as_mut() {
                st.finish(a.reservation, true);
            }
            node.abort(s.client, a.reservation)?;
            Ok(A::Abort(pb::AbortReply {}))
        }
        R::Acquire(a) => {
            let ns = s.ns(a.handle)?;
            let hs = hashes(node, &a.hashes)?;
            // A load not announced by a Lookup of the same prefix counts as one (trust report:
            // clients that only acquire showed a hit rate of 0).
            if s.looked_up.take() != hs.first().map(|&h| (ns, h, hs.len())) {
                node.lookup(ns, &hs);
            }
            Ok(A::Acquire(acquire(node, s, ns, &hs).await?))
        }
        R::Release(r) => {
            // A staged lease's blocks were unpinned once copied: only its window ranges are held.
            let staged = s.staging.as_mut().is_some_and(|st| st.finish(r.lease, false));
            if !staged {
                node.release(s.client, r.lease)?;
            }
            Ok(A::Release(pb::ReleaseReply {}))
        }
        R::Stats(_) => Ok(A::Stats(stats_reply(node))),
        R::RegisterKvCache(r) => {
            let ns = s.ns(r.handle)?;
            if s.kv_caches.len() >= MAX_KV_CACHES {
                return Err(Fatal::new(ErrorCode::BadArgument, format!("more than {MAX_KV_CACHES} KV caches")));
            }
            let (layout, tensors) = kv_layout(r);
            let reply = match node.register_kv_cache(ns, s.record.pid, layout, &tensors) {
                Ok(cache) => {
                    s.kv_caches.push(cache);
                    s.record.registered_kv_cache();
                    pb::RegisterKvCacheReply { cache: s.kv_caches.len() as u32 - 1, error: String::new() }
                }
                Err(KvCopyError::Memory(error)) => pb::RegisterKvCacheReply { cache: 0, error },
                Err(e) => return Err(kv_fatal(e)),
            };
            Ok(A::RegisterKvCache(reply))
        }
        R::SaveKv(r) => {
            let hs = hashes(node, &r.hashes)?;
            let parent = parent(&r.parent)?;
            let blocks = Blocks { hashes: &hs, ids: &r.block_ids };
            let reply = match node.save_kv(s.client, s.kv_cache(r.cache)?, blocks, parent).await {
                Ok(o) => pb::SaveKvReply {
                    saved: o.saved as u32,
                    present: o.present as u32,
                    no_space: o.no_space as u32,
                    error: String::new(),
                },
                Err(KvCopyError::Memory(error)) => pb::SaveKvReply { error, ..Default::default() },
                Err(e) => return Err(kv_fatal(e)),
            };
            Ok(A::SaveKv(reply))
        }
        R::LoadKv(r) => {
            let hs = hashes(node, &r.hashes)?;
            let blocks = Blocks { hashes: &hs, ids: &r.block_ids };
            let loaded = node.load_kv(s.client, s.kv_cache(r.cache)?, blocks, &r.wait_event, r.return_event).await;
            let reply = match loaded {
                Ok(l) => {
                    s.pending_loads.retain(|p| !p.is_finished());
                    s.pending_loads.extend(l.pending);
                    pb::LoadKvReply { loaded: l.blocks as u32, error: String::new(), done_event: l.event.into() }
                }
                Err(KvCopyError::Memory(error)) => pb::LoadKvReply { error, ..Default::default() },
                Err(e) => return Err(kv_fatal(e)),
            };
            Ok(A::LoadKv(reply))
        }
    }
}

/// A Reserve, staged through the window of an untrusted client.
fn reserve(
    node: &Node,
    s: &mut Session,
    ns: NsIdx,
    hashes: &[BlockHash],
    parent: Option<BlockHash>,
) -> Result<pb::ReserveReply, Fatal> {
    let (reservation, outcomes) = match s.staging.as_mut() {
        Some(st) => node.reserve_staged(s.client, st, ns, hashes, parent)?,
        None => node.reserve(s.client, ns, hashes, parent)?,
    };
    let mut reply = pb::ReserveReply { reservation, ..Default::default() };
    for o in outcomes {
        let status = match o {
            ReservedAt::Slot((segment, offset)) => {
                reply.segments.push(segment);
                reply.offsets.push(offset);
                ReserveStatus::Reserved
            }
            ReservedAt::Present => ReserveStatus::Present,
            ReservedAt::NoSpace => ReserveStatus::NoSpace,
        };
        reply.status.push(status as i32);
    }
    Ok(reply)
}

/// A Commit, staged through the window of an untrusted client.
async fn commit(node: &Node, s: &mut Session, reservation: u64) -> Result<u32, Fatal> {
    let n = match s.staging.as_mut() {
        Some(st) => node.commit_staged(s.client, st, reservation).await?,
        None => node.commit(s.client, reservation)?,
    };
    Ok(n as u32)
}

/// An Acquire, staged through the window of an untrusted client.
async fn acquire(
    node: &Arc<Node>,
    s: &mut Session,
    ns: NsIdx,
    hashes: &[BlockHash],
) -> Result<pb::AcquireReply, Fatal> {
    let (lease, slots) = match s.staging.as_mut() {
        Some(st) => node.acquire_staged(s.client, st, ns, hashes).await?,
        None => node.acquire(s.client, ns, hashes).await?,
    };
    let (segments, offsets) = slots.into_iter().unzip();
    Ok(pb::AcquireReply { lease, segments, offsets })
}

/// The layout and tensors of a RegisterKvCache, as the device module describes them.
fn kv_layout(r: pb::RegisterKvCache) -> (KvLayout, Vec<EngineTensor>) {
    let layout = KvLayout {
        tensor_bytes: r.tensors.iter().map(|t| t.bytes).collect(),
        layers: (r.layers.iter())
            .map(|l| LayerPlacement {
                tensor: l.tensor,
                offset: l.offset,
                block_stride: l.block_stride,
                kv_stride: l.kv_stride,
            })
            .collect(),
        num_blocks: r.num_blocks,
        kv_parts: r.kv_parts,
        chunk_bytes: r.chunk_bytes,
    };
    let tensors = (r.tensors.into_iter())
        .map(|t| EngineTensor {
            address: t.address,
            ipc_handle: t.ipc_handle.to_vec(),
            ipc_offset: t.ipc_offset,
            device_uuid: t.device_uuid.to_vec(),
            bytes: t.bytes,
        })
        .collect();
    (layout, tensors)
}

fn kv_fatal(e: KvCopyError) -> Fatal {
    match e {
        KvCopyError::Cache(c) => c.into(),
        other => Fatal::new(ErrorCode::BadArgument, other.to_string()),
    }
}

/// How the admin replies name namespaces `ns` (model and id prefix), from `usage`.
fn namespace_refs(usage: &[crate::metrics::NamespaceUsage], ns: &[NsIdx]) -> Vec<pb::NamespaceRef> {
    (ns.iter().filter_map(|ns| usage.iter().find(|u| u.ns == *ns)))
        .map(|u| pb::NamespaceRef { model: u.model.clone(), id_prefix: u.id.short() })
        .collect()
}

fn clients_reply(node: &Node) -> pb::ClientsReply {
    let usage = node.namespace_usage();
    let connections = node.clients.connections.list();
    let held = node.held_by(&connections.iter().map(|conn| conn.client).collect::<Vec<_>>());
    let clients = (connections.iter().zip(held))
        .map(|(conn, held)| {
            let a = conn.activity();
            let namespaces = namespace_refs(&usage, &a.namespaces);
            pb::ClientInfo {
                id: conn.client.0,
                name: a.name,
                pid: conn.pid.unwrap_or(0),
                uid: conn.uid,
                connected_secs: conn.since.elapsed().as_secs(),
                requests: a.requests,
                held_blocks: held as u64,
                kv_caches: a.kv_caches,
                namespaces,
            }
        })
        .collect();
    pb::ClientsReply { clients }
}

fn stats_reply(node: &Node) -> pb::StatsReply {
    let st = node.stats();
    let disk = node.disk_stats();
    pb::StatsReply {
        tiers: super::tier_stats(&st, disk.as_ref()),
        disk_failure: node.disk_failure().unwrap_or_default(),
        eviction_policy: node.policy_name().into(),
        problems: node.problems(),
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        namespace_usage: (node.namespace_usage().into_iter())
            .map(|u| pb::NamespaceUsage {
                model: u.model,
                id_prefix: u.id.short(),
                block_bytes: u.block_bytes,
                host_blocks: u.held.host,
                disk_blocks: u.held.disk,
                hit_blocks: u.lookups.hit_blocks,
                disk_hit_blocks: u.lookups.disk_hit_blocks,
                miss_blocks: u.lookups.miss_blocks,
            })
            .collect(),
        counters: (node.counters().into_iter())
            .map(|c| pb::Counter { name: c.name.into(), help: c.help.into(), monotonic: c.monotonic, value: c.value })
            .collect(),
    }
}
