//! The router feed's event log: every change of what a node can serve, numbered without gaps.
//!
//! The cache appends an event whenever a block becomes visible, changes its best tier, or stops
//! being held; routers replay them to keep a global index. The log keeps the newest `capacity`
//! events: a consumer that resumes from an older sequence is told to re-snapshot, so a slow or
//! absent consumer costs the daemon nothing beyond this bound. The log also keeps what the events
//! add up to per namespace (blocks whose best tier is the host pool, and disk-only blocks): the
//! node's view a router replaying them would have.

use crate::block::{BlockHash, BlockKey, NsIdx, TierKind};
use crate::namespace::NamespaceId;
use std::collections::VecDeque;

/// What happened to a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Became visible in a tier, with the hash of its parent block if known.
    Stored {
        /// Where it is now.
        tier: TierKind,
        /// The block before it in its prompt, if it was held when this one was stored.
        parent: Option<BlockHash>,
    },
    /// Its best tier changed (host copy dropped, or promoted back).
    TierChanged {
        /// Where it was.
        from: TierKind,
        /// Where it is now.
        to: TierKind,
    },
    /// No longer held anywhere.
    Removed {
        /// Where it was last.
        from: TierKind,
    },
}

/// One numbered event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Sequence number: 1, 2, 3, ... per daemon instance.
    pub sequence: u64,
    /// The block.
    pub key: BlockKey,
    /// Its namespace's id (a reclaimed namespace's index may name another one later).
    pub namespace: NamespaceId,
    /// What happened.
    pub kind: EventKind,
}

/// Why events since a sequence cannot be given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resync {
    /// Oldest sequence still retained.
    pub oldest_retained: u64,
}

/// A bounded, gap-free log of the newest events.
///
/// ```
/// use kvtier_core::block::{BlockHash, BlockKey, NsIdx};
/// use kvtier_core::cache::TierKind;
/// use kvtier_core::events::{EventKind, EventLog};
/// use kvtier_core::namespace::NamespaceId;
/// let mut log = EventLog::new(2);
/// let key = BlockKey { ns: NsIdx(0), hash: BlockHash::from_u64(1) };
/// for _ in 0..3 {
///     log.push(key, NamespaceId([0; 16]), EventKind::Removed { from: TierKind::Host });
/// }
/// assert_eq!(log.last_sequence(), 3);
/// assert_eq!(log.since(1).unwrap().len(), 2);
/// assert!(log.since(0).is_err(), "event 1 is gone");
/// ```
pub struct EventLog {
    events: VecDeque<Event>,
    capacity: usize,
    next: u64,
    /// Per namespace (by index): [best tier host, disk only] block counts.
    held: Vec<[u64; 2]>,
}

/// Blocks of one namespace by where they are best served from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// With a copy in the host pool.
    pub host: u64,
    /// Only on disk.
    pub disk: u64,
}

impl EventLog {
    /// A log retaining the newest `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self { events: VecDeque::new(), capacity: capacity.max(1), next: 1, held: Vec::new() }
    }

    /// Appends an event; the oldest goes if the log is full.
    pub fn push(&mut self, key: BlockKey, namespace: NamespaceId, kind: EventKind) {
        match kind {
            EventKind::Stored { tier, .. } => self.count(key.ns, tier, true),
            EventKind::TierChanged { from, to } => {
                self.count(key.ns, from, false);
                self.count(key.ns, to, true);
            }
            EventKind::Removed { from } => self.count(key.ns, from, false),
        }
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(Event { sequence: self.next, key, namespace, kind });
        self.next += 1;
    }

    fn count(&mut self, ns: NsIdx, tier: TierKind, up: bool) {
        let i = ns.0 as usize;
        if self.held.len() <= i {
            self.held.resize(i + 1, [0; 2]);
        }
        let n = &mut self.held[i][(tier == TierKind::Disk) as usize];
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
    }

    /// Starts the counts of a reclaimed namespace index over (its blocks are all gone).
    pub fn reset(&mut self, ns: NsIdx) {
        if let Some(n) = self.held.get_mut(ns.0 as usize) {
            *n = [0; 2];
        }
    }

    /// Blocks of `ns` the events add up to, by best tier.
    pub fn held(&self, ns: NsIdx) -> Held {
        let [host, disk] = self.held.get(ns.0 as usize).copied().unwrap_or_default();
        Held { host, disk }
    }

    /// Sequence of the newest event (0 before any).
    pub fn last_sequence(&self) -> u64 {
        self.next - 1
    }

    /// Events after `after`, in order (empty if none yet); `Err` if some were already dropped.
    pub fn since(&self, after: u64) -> Result<Vec<Event>, Resync> {
        self.since_at_most(after, usize::MAX)
    }

    /// Like [`since`](Self::since), at most `max` events.
    pub fn since_at_most(&self, after: u64, max: usize) -> Result<Vec<Event>, Resync> {
        let oldest = self.events.front().map_or(self.next, |e| e.sequence);
        if after + 1 < oldest || after > self.last_sequence() {
            return Err(Resync { oldest_retained: oldest });
        }
        let skip = (after + 1 - oldest) as usize;
        Ok(self.events.iter().skip(skip).take(max).copied().collect())
    }

    /// Events retained now.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True before the first event (or with nothing retained).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::NsIdx;

    fn key(i: u64) -> BlockKey {
        BlockKey { ns: NsIdx(0), hash: BlockHash::from_u64(i) }
    }

    #[test]
    fn sequences_have_no_gaps_and_resume_exactly() {
        let mut log = EventLog::new(100);
        for i in 0..10 {
            log.push(key(i), NamespaceId([0; 16]), EventKind::Removed { from: TierKind::Host });
        }
        let after4 = log.since(4).unwrap();
        assert_eq!(after4.iter().map(|e| e.sequence).collect::<Vec<_>>(), (5..=10).collect::<Vec<_>>());
        assert_eq!(after4[0].key, key(4));
        assert!(log.since(10).unwrap().is_empty(), "caught up");
        assert_eq!(log.since_at_most(0, 3).unwrap().len(), 3);
    }

    #[test]
    fn a_consumer_behind_the_retained_window_must_resync() {
        let mut log = EventLog::new(3);
        for i in 0..10 {
            log.push(key(i), NamespaceId([0; 16]), EventKind::Removed { from: TierKind::Host });
        }
        assert_eq!(log.len(), 3);
        assert_eq!(log.since(7).unwrap().len(), 3);
        assert_eq!(log.since(6), Err(Resync { oldest_retained: 8 }));
        assert_eq!(log.since(11), Err(Resync { oldest_retained: 8 }), "a sequence from the future (another instance)");
    }

    #[test]
    fn an_empty_log_accepts_zero() {
        let log = EventLog::new(3);
        assert_eq!(log.since(0), Ok(vec![]));
        assert!(log.since(1).is_err());
    }
}
