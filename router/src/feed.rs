//! Following the daemons: one task per endpoint keeps its `WatchEvents` stream open, applies the
//! snapshot and every event to the global index, resumes from its last sequence after a cut,
//! re-snapshots when told to (or when the daemon restarted), and forgets a node that stayed away
//! longer than the expiry. A second task per endpoint polls `Stats` every second for the load
//! signal and the inference engines connected to the node.

use super::index::{GlobalIndex, NodeId, MAX_NODES};
use super::score::NodeView;
use kvtier_core::block::BlockHash;
use kvtier_core::cache::TierKind;
use kvtier_net::tls::ClientTls;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::cache_service_client::CacheServiceClient;
use kvtier_proto::v1::watch_events_response::Payload;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Opens a gRPC channel to `addr`: `host:port` (or `http://host:port`) or `unix:/path`.
pub async fn channel(addr: &str) -> anyhow::Result<Channel> {
    channel_with(addr, None).await
}

/// Like [`channel`], with mutual TLS over TCP when `tls` is given (unix sockets stay plain).
pub async fn channel_with(addr: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Channel> {
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = path.to_string();
        let connector = tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        });
        return Ok(Endpoint::from_static("http://localhost").connect_with_connector(connector).await?);
    }
    Ok(kvtier_net::tls::endpoint(addr, tls)?.connect().await?)
}

/// What the router knows of one endpoint.
#[derive(Clone, Debug)]
pub struct NodeState {
    /// The endpoint as configured or discovered.
    pub endpoint: String,
    /// Following its event stream now.
    pub connected: bool,
    /// When the stream last broke (or since when it never worked).
    pub down_since: Option<Instant>,
    /// Its entries were dropped after the expiry; it is not picked until it is back.
    pub expired: bool,
    /// No longer configured or discovered: the task stops.
    pub removed: bool,
    /// Daemon instance the sequence belongs to.
    pub instance: String,
    /// Last event applied (0: a snapshot is needed).
    pub sequence: u64,
    /// Load signal from `Stats`.
    pub load: f64,
    /// The inference engines connected to it and the namespaces they use (from `Stats`).
    pub engines: Vec<pb::NodeEngine>,
}

/// Counters of the router.
#[derive(Default)]
pub struct FeedCounters {
    /// Events applied.
    pub events: AtomicU64,
    /// Snapshots applied.
    pub snapshots: AtomicU64,
    /// Streams reopened from a sequence after a cut (the daemon then resumes, or, if it cannot,
    /// sends a snapshot or a resync, counted as such).
    pub resumes: AtomicU64,
    /// Re-snapshots forced by the daemon (fell behind) or by a gap.
    pub resyncs: AtomicU64,
    /// Nodes expired.
    pub expirations: AtomicU64,
}

/// State shared by the followers and the service.
pub struct Shared {
    index: Mutex<GlobalIndex>,
    nodes: Mutex<Vec<NodeState>>,
    /// Counters for metrics.
    pub counters: FeedCounters,
    /// How long a node may be unreachable before it is forgotten.
    pub expiry: Duration,
    /// Mutual TLS towards the daemons (None: plain gRPC), following its files.
    pub tls: Option<Arc<ClientTls>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tier_of(t: i32) -> Option<TierKind> {
    match pb::Tier::try_from(t) {
        Ok(pb::Tier::Host) => Some(TierKind::Host),
        Ok(pb::Tier::Disk) => Some(TierKind::Disk),
        _ => None,
    }
}

impl Shared {
    /// Empty state: an index of at most `max_blocks` blocks.
    pub fn new(max_blocks: usize, expiry: Duration) -> Arc<Self> {
        Self::with_tls(max_blocks, expiry, None)
    }

    /// Like [`new`](Self::new), dialing the daemons with mutual TLS when `tls` is given.
    pub fn with_tls(max_blocks: usize, expiry: Duration, tls: Option<Arc<ClientTls>>) -> Arc<Self> {
        Arc::new(Self {
            index: Mutex::new(GlobalIndex::new(max_blocks)),
            nodes: Mutex::new(Vec::new()),
            counters: FeedCounters::default(),
            expiry,
            tls,
        })
    }

    /// The client TLS a new connection to a daemon uses now.
    fn tls_now(&self) -> Option<ClientTlsConfig> {
        self.tls.as_ref().map(|t| t.current().1)
    }

    /// The global index, locked.
    pub fn index(&self) -> MutexGuard<'_, GlobalIndex> {
        lock(&self.index)
    }

    /// A copy of every endpoint's state, by node id.
    pub fn nodes(&self) -> Vec<NodeState> {
        lock(&self.nodes).clone()
    }

    /// Views for scoring: healthy = following now, or down for less than the expiry.
    pub fn views(&self) -> Vec<NodeView> {
        lock(&self.nodes)
            .iter()
            .enumerate()
            .map(|(i, n)| NodeView {
                node: i as NodeId,
                load: n.load,
                healthy: !n.removed
                    && !n.expired
                    && (n.connected || n.down_since.is_some_and(|t| t.elapsed() < self.expiry)),
            })
            .collect()
    }

    /// Adds an endpoint (or finds it); starts following it. `None` past [`MAX_NODES`].
    pub fn add(self: &Arc<Self>, endpoint: &str) -> Option<NodeId> {
        let mut nodes = lock(&self.nodes);
        if let Some(i) = nodes.iter().position(|n| n.endpoint == endpoint && !n.removed) {
            return Some(i as NodeId);
        }
        if nodes.len() >= MAX_NODES {
            tracing::error!("not following {endpoint}: a router follows at most {MAX_NODES} nodes");
            return None;
        }
        nodes.push(NodeState {
            endpoint: endpoint.to_string(),
            connected: false,
            down_since: Some(Instant::now()),
            expired: false,
            removed: false,
            instance: String::new(),
            sequence: 0,
            load: 0.0,
            engines: Vec::new(),
        });
        let node = (nodes.len() - 1) as NodeId;
        drop(nodes);
        tokio::spawn(Arc::clone(self).follow(node));
        tokio::spawn(Arc::clone(self).poll_stats(node));
        Some(node)
    }

    /// Stops following an endpoint and forgets its blocks.
    pub fn remove(&self, endpoint: &str) {
        let mut nodes = lock(&self.nodes);
        if let Some(i) = nodes.iter().position(|n| n.endpoint == endpoint && !n.removed) {
            nodes[i].removed = true;
            drop(nodes);
            self.index().clear_node(i as NodeId);
        }
    }

    fn with_node<R>(&self, node: NodeId, f: impl FnOnce(&mut NodeState) -> R) -> R {
        f(&mut lock(&self.nodes)[node as usize])
    }

    async fn follow(self: Arc<Self>, node: NodeId) {
        let endpoint = self.with_node(node, |n| n.endpoint.clone());
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.with_node(node, |n| n.removed) {
                return;
            }
            match self.follow_once(node, &endpoint).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::debug!(%endpoint, "event stream: {e:#}"),
            }
            let expire = self.with_node(node, |n| {
                if n.connected {
                    n.connected = false;
                    n.down_since = Some(Instant::now());
                }
                let due = !n.expired && n.down_since.is_some_and(|t| t.elapsed() >= self.expiry);
                if due {
                    n.expired = true;
                    n.sequence = 0;
                }
                due
            });
            if expire {
                tracing::warn!(%endpoint, "unreachable for {:?}: its blocks are forgotten", self.expiry);
                // Counted first: whoever sees the node's blocks gone sees the expiry counted.
                self.counters.expirations.fetch_add(1, Relaxed);
                self.index().clear_node(node);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn follow_once(&self, node: NodeId, endpoint: &str) -> anyhow::Result<()> {
        let mut client = CacheServiceClient::new(channel_with(endpoint, self.tls_now().as_ref()).await?);
        let (after_sequence, instance_id) = self.with_node(node, |n| (n.sequence, n.instance.clone()));
        let request = pb::WatchEventsRequest { after_sequence, instance_id };
        let mut stream = client.watch_events(request).await?.into_inner();
        // The daemon answered: following it (an idle stream sends nothing until events come).
        self.with_node(node, |n| {
            n.connected = true;
            n.down_since = None;
            n.expired = false;
        });
        if after_sequence > 0 {
            self.counters.resumes.fetch_add(1, Relaxed);
        }
        let mut in_snapshot = false;
        while let Some(msg) = stream.message().await? {
            match msg.payload {
                Some(Payload::Snapshot(s)) => {
                    let mut index = self.index();
                    if !in_snapshot {
                        index.clear_node(node);
                        in_snapshot = true;
                    }
                    for b in &s.blocks {
                        apply(&mut index, node, b);
                    }
                    drop(index);
                    if s.last_page {
                        in_snapshot = false;
                        self.with_node(node, |n| {
                            n.sequence = s.as_of_sequence;
                            n.instance = msg.instance_id.clone();
                        });
                        self.counters.snapshots.fetch_add(1, Relaxed);
                    }
                }
                Some(Payload::Events(batch)) => {
                    let mut expected = self.with_node(node, |n| n.sequence);
                    let mut index = self.index();
                    for e in &batch.events {
                        if e.sequence != expected + 1 {
                            drop(index);
                            self.with_node(node, |n| n.sequence = 0);
                            self.counters.resyncs.fetch_add(1, Relaxed);
                            anyhow::bail!("gap: event {} after {expected}", e.sequence);
                        }
                        apply(&mut index, node, e);
                        expected = e.sequence;
                    }
                    drop(index);
                    self.counters.events.fetch_add(batch.events.len() as u64, Relaxed);
                    self.with_node(node, |n| n.sequence = expected);
                }
                Some(Payload::ResyncRequired(_)) | None => {
                    self.with_node(node, |n| n.sequence = 0);
                    self.counters.resyncs.fetch_add(1, Relaxed);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn poll_stats(self: Arc<Self>, node: NodeId) {
        let endpoint = self.with_node(node, |n| n.endpoint.clone());
        let mut client = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !self.with_node(node, |n| n.removed) {
            tick.tick().await;
            if client.is_none() {
                client = channel_with(&endpoint, self.tls_now().as_ref()).await.ok().map(CacheServiceClient::new);
            }
            let Some(c) = client.as_mut() else { continue };
            match c.stats(pb::NodeStatsRequest {}).await {
                Ok(r) => {
                    let r = r.into_inner();
                    self.with_node(node, |n| {
                        n.load = r.lookups_per_second;
                        n.engines = r.engines;
                    })
                }
                Err(_) => client = None,
            }
        }
    }
}

/// Applies one feed event (or snapshot block) of daemon `node` to the global index; events that
/// do not parse (a bad namespace id or hash) are skipped.
pub fn apply(index: &mut GlobalIndex, node: NodeId, e: &pb::BlockEvent) {
    let (Ok(ns), Some(hash)) = (<[u8; 16]>::try_from(&e.namespace_id[..]), BlockHash::new(&e.hash)) else { return };
    let tier = match pb::block_event::Kind::try_from(e.kind) {
        Ok(pb::block_event::Kind::Removed) => None,
        _ => tier_of(e.tier),
    };
    index.set(node, &ns, hash, tier);
}

/// Re-resolves `name` (`host:port`, e.g. a headless Kubernetes Service) every `every`, calling
/// `added` for each new address and `removed` for each vanished one.
pub async fn follow_dns(name: String, every: Duration, mut added: impl FnMut(&str), mut removed: impl FnMut(&str)) {
    let mut known: Vec<String> = Vec::new();
    loop {
        match tokio::net::lookup_host(&name).await {
            Ok(addrs) => {
                let now: Vec<String> = addrs.map(|a| a.to_string()).collect();
                known.iter().filter(|a| !now.contains(a)).for_each(|a| removed(a));
                now.iter().filter(|a| !known.contains(a)).for_each(|a| added(a));
                known = now;
            }
            Err(e) => tracing::warn!("resolving {name}: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Follows the daemons `name` resolves to (see [`follow_dns`]): new addresses are followed,
/// vanished ones dropped.
pub async fn discover(shared: Arc<Shared>, name: String, every: Duration) {
    let label = name.clone();
    let added = |a: &str| {
        tracing::info!("{a} found in {label}");
        shared.add(a);
    };
    let removed = |a: &str| {
        tracing::info!("{a} left {label}");
        shared.remove(a);
    };
    follow_dns(name, every, added, removed).await
}
