//! The block index: key -> entry, nothing else (CacheLib's "access container").
//!
//! Entries live in a dense array addressed by [`Handle`]; a hash table of handles finds them by key.
//! At one million blocks this costs about 70 bytes per block (see `docs/benchmarks.md`).

use crate::block::{BlockKey, Handle, SlotId};
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;

/// Life-cycle state of an index entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EntryState {
    /// A slot is reserved and being written; invisible to lookups.
    Reserved,
    /// Written and committed; visible and servable.
    Committed,
}

/// Flag bits of an [`Entry`]: where a committed block is in its life between the tiers.
pub mod flags {
    /// Used at least once since it was stored (a hit, or saved again after being dropped).
    pub const REUSED: u8 = 1;
    /// Host copy taken out of the host policy, waiting in the cold queue to be dropped.
    pub const COLD: u8 = 2;
    /// Host copy being written to disk (pinned, out of the host policy).
    pub const DEMOTING: u8 = 4;
    /// Host slot being filled from disk (pinned, not servable from the host yet).
    pub const PROMOTING: u8 = 8;
    /// Used while demoting: goes back into the host policy, not the cold queue.
    pub const WANTED: u8 = 16;
    /// A disk write of this block is in flight (a demotion or a write-back): it must not be
    /// planned again until that write completes.
    pub const WRITING: u8 = 32;
}

/// One block known to the index.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The block's key.
    pub key: BlockKey,
    /// Reserved or committed.
    pub state: EntryState,
    /// Readers currently holding the block; a pinned block is never evicted.
    pub pins: u16,
    /// [`flags`] bits.
    pub flags: u8,
    /// Where the bytes live in the host pool ([`SlotId::NONE`] if only on disk).
    pub slot: SlotId,
    /// Where the bytes live on disk ([`SlotId::NONE`] if not there).
    pub disk: SlotId,
    /// The previous block of the prefix, if it was held when this one was stored.
    pub parent: Option<Handle>,
}

/// Maps block keys to entries with stable handles.
///
/// ```
/// use kvtier_core::block::{BlockHash, BlockKey, NsIdx, SlotId};
/// use kvtier_core::index::{BlockIndex, EntryState};
/// let mut idx = BlockIndex::default();
/// let key = BlockKey { ns: NsIdx(0), hash: BlockHash::from_u64(7) };
/// let h = idx.insert(key, SlotId { slab: 0, slot: 0 }, None);
/// assert_eq!(idx.find(&key), Some(h));
/// assert_eq!(idx.get(h).state, EntryState::Reserved);
/// idx.remove(h);
/// assert_eq!(idx.find(&key), None);
/// ```
#[derive(Default)]
pub struct BlockIndex {
    table: HashTable<u32>,
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
    hasher: DefaultHashBuilder,
}

impl BlockIndex {
    /// An index with room for `n` blocks before it grows.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            table: HashTable::with_capacity(n),
            entries: Vec::with_capacity(n),
            free: Vec::new(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// Number of entries, reserved and committed.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// One past the largest handle ever handed out: the size policies' arrays must cover.
    pub fn handle_bound(&self) -> usize {
        self.entries.len()
    }

    /// Finds the entry of `key`, whatever its state.
    pub fn find(&self, key: &BlockKey) -> Option<Handle> {
        let entries = &self.entries;
        self.table
            .find(self.hasher.hash_one(key), |&h| entries[h as usize].as_ref().is_some_and(|e| e.key == *key))
            .map(|&h| Handle(h))
    }

    /// Inserts a new reserved entry. The caller guarantees `key` is not already present.
    pub fn insert(&mut self, key: BlockKey, slot: SlotId, parent: Option<Handle>) -> Handle {
        debug_assert!(self.find(&key).is_none(), "duplicate key {key:?}");
        let entry = Entry { key, state: EntryState::Reserved, pins: 0, flags: 0, slot, disk: SlotId::NONE, parent };
        let h = match self.free.pop() {
            Some(h) => {
                self.entries[h as usize] = Some(entry);
                h
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as u32
            }
        };
        let hasher = &self.hasher;
        let entries = &self.entries;
        self.table.insert_unique(hasher.hash_one(key), h, |&o| {
            hasher.hash_one(entries[o as usize].as_ref().expect("live entry").key)
        });
        Handle(h)
    }

    /// The entry behind a live handle. Panics on a removed handle (a caller bug).
    pub fn get(&self, h: Handle) -> &Entry {
        self.entries[h.idx()].as_ref().expect("live handle")
    }

    /// Mutable access to a live entry.
    pub fn get_mut(&mut self, h: Handle) -> &mut Entry {
        self.entries[h.idx()].as_mut().expect("live handle")
    }

    /// The entry behind `h` if it is live.
    pub fn try_get(&self, h: Handle) -> Option<&Entry> {
        self.entries.get(h.idx()).and_then(|e| e.as_ref())
    }

    /// Removes a live entry and returns it; its handle may be reused afterwards.
    pub fn remove(&mut self, h: Handle) -> Entry {
        let entry = self.entries[h.idx()].take().expect("live handle");
        let hash = self.hasher.hash_one(entry.key);
        self.table.find_entry(hash, |&o| o == h.0).expect("indexed handle").remove();
        self.free.push(h.0);
        entry
    }

    /// Iterates over all live entries.
    pub fn iter(&self) -> impl Iterator<Item = (Handle, &Entry)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| e.as_ref().map(|e| (Handle(i as u32), e)))
    }

    /// Approximate heap bytes used by the index itself.
    pub fn heap_bytes(&self) -> usize {
        self.table.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.entries.capacity() * std::mem::size_of::<Option<Entry>>()
            + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockHash, NsIdx};

    fn key(ns: u16, id: u64) -> BlockKey {
        BlockKey { ns: NsIdx(ns), hash: BlockHash::from_u64(id) }
    }
    const SLOT: SlotId = SlotId { slab: 0, slot: 0 };

    #[test]
    fn namespaces_keep_equal_hashes_apart() {
        let mut idx = BlockIndex::default();
        let a = idx.insert(key(0, 1), SLOT, None);
        let b = idx.insert(key(1, 1), SLOT, None);
        assert_ne!(a, b);
        assert_eq!(idx.find(&key(0, 1)), Some(a));
        assert_eq!(idx.find(&key(1, 1)), Some(b));
        assert_eq!(idx.find(&key(2, 1)), None);
    }

    #[test]
    fn handles_are_reused_after_remove() {
        let mut idx = BlockIndex::default();
        let a = idx.insert(key(0, 1), SLOT, None);
        idx.remove(a);
        assert!(idx.try_get(a).is_none());
        let b = idx.insert(key(0, 2), SLOT, None);
        assert_eq!(a, b);
        assert_eq!(idx.find(&key(0, 2)), Some(b));
        assert_eq!(idx.find(&key(0, 1)), None);
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn many_inserts_and_removes_stay_consistent() {
        let mut idx = BlockIndex::default();
        let hs: Vec<_> = (0..10_000).map(|i| idx.insert(key(0, i), SLOT, None)).collect();
        for (i, h) in hs.iter().enumerate() {
            if i % 3 == 0 {
                idx.remove(*h);
            }
        }
        for i in 0..10_000u64 {
            assert_eq!(idx.find(&key(0, i)).is_some(), i % 3 != 0, "key {i}");
        }
        assert_eq!(idx.iter().count(), idx.len());
    }

    #[test]
    fn entry_stays_small() {
        assert!(std::mem::size_of::<Option<Entry>>() <= 64, "{}", std::mem::size_of::<Option<Entry>>());
    }
}
