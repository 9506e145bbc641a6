//! What servers read from the cache without changing it: the router feed (snapshot and pages of
//! events), held prefixes by namespace id for cluster lookups, and who holds what for the admin
//! view. Servers translate these to the wire; they never take the cache lock themselves.

use super::Node;
use kvtier_core::block::{BlockHash, BlockKey, NsIdx, TierKind};
use kvtier_core::cache::{BlockCache, ClientId};
use kvtier_core::events::{Event, Resync};
use kvtier_core::namespace::NamespaceId;
use std::sync::MutexGuard;

/// The router feed's state.
pub struct Feed {
    /// Random id of this daemon run: routers re-snapshot when it changes.
    pub instance_id: String,
    /// Sequence of the newest router-feed event, published after every change.
    pub(crate) events: tokio::sync::watch::Sender<u64>,
}

/// The cache, locked for reading (checks and tests; nothing can change through it).
pub struct CacheView<'a>(MutexGuard<'a, BlockCache>);

impl std::ops::Deref for CacheView<'_> {
    type Target = BlockCache;
    fn deref(&self) -> &BlockCache {
        &self.0
    }
}

impl Node {
    /// Every committed block (key, namespace id, best tier) and the event sequence the snapshot
    /// is as of: a compact copy (56 bytes a block) made under the lock.
    pub fn feed_snapshot(&self) -> (u64, Vec<(BlockKey, NamespaceId, TierKind)>) {
        self.cache().snapshot()
    }

    /// Up to `max` feed events after sequence `after`; `Err` when the log no longer holds them
    /// (the watcher must take a new snapshot).
    pub fn feed_events(&self, after: u64, max: usize) -> Result<Vec<Event>, Resync> {
        self.cache().events().since_at_most(after, max)
    }

    /// For each (namespace id, hashes) query, the tier of every block of the held prefix; empty
    /// for a namespace not registered here. Not counted as lookups.
    pub fn held_prefixes(&self, queries: &[(NamespaceId, Vec<BlockHash>)]) -> Vec<Vec<TierKind>> {
        let c = self.cache();
        (queries.iter())
            .map(|(id, hashes)| c.find_namespace(id).map(|ns| c.peek_tiers(ns, hashes)).unwrap_or_default())
            .collect()
    }

    /// The index of namespace `id` on this daemon, if registered (or restored from disk).
    pub fn find_namespace(&self, id: &NamespaceId) -> Option<NsIdx> {
        self.cache().find_namespace(id)
    }

    /// The id of registered namespace `ns`.
    pub fn namespace_id(&self, ns: NsIdx) -> NamespaceId {
        self.cache().namespace(ns).id
    }

    /// How many blocks each of `clients` holds now (reserved or pinned).
    pub fn held_by(&self, clients: &[ClientId]) -> Vec<usize> {
        let c = self.cache();
        clients.iter().map(|&client| c.held_by(client)).collect()
    }

    /// The cache, read-only, for invariant checks (fuzzing, tests). Holds the cache lock: drop
    /// it before calling the node again.
    pub fn cache_view(&self) -> CacheView<'_> {
        CacheView(self.lock_cache())
    }
}
