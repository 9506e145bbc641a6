//! Disk admission: which blocks leaving the host tier are worth an NVMe write.
//!
//! Most saved blocks are never read again (58 % on the shared trace), and writing them to flash
//! costs endurance and bandwidth for nothing. With [`AdmissionKind::Reused`] a block is written
//! only once it has shown it comes back: it was hit while in the host tier, or it was dropped
//! from the host tier without a disk copy and then saved again (remembered by fingerprint in a
//! bounded "ghost" queue, as in 2Q and TinyLFU's doorkeeper).

use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};

/// Admission rules a daemon or a simulation can be configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum AdmissionKind {
    /// Write every block that leaves the host tier.
    Always,
    /// Write only blocks used at least twice (hit, or saved again after a drop).
    Reused,
}

impl AdmissionKind {
    /// The rule's name, as in config files and reports.
    pub fn name(self) -> &'static str {
        match self {
            AdmissionKind::Always => "always",
            AdmissionKind::Reused => "reused",
        }
    }
}

/// The admission filter: the rule plus its memory of recently dropped blocks.
///
/// ```
/// use kvtier_core::policy::{Admission, AdmissionKind};
/// let mut a = Admission::new(AdmissionKind::Reused, 2);
/// assert!(!a.admit(false));
/// a.dropped(7);
/// assert!(a.seen_before(7) && !a.seen_before(8));
/// assert!(a.admit(true));
/// ```
pub struct Admission {
    kind: AdmissionKind,
    ghost: HashSet<u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl Admission {
    /// A filter with rule `kind` remembering up to `ghost_capacity` dropped blocks.
    pub fn new(kind: AdmissionKind, ghost_capacity: usize) -> Self {
        Self { kind, ghost: HashSet::new(), order: VecDeque::new(), capacity: ghost_capacity }
    }

    /// The configured rule.
    pub fn kind(&self) -> AdmissionKind {
        self.kind
    }

    /// Whether a block leaving the host tier goes to disk; `reused` says it was used twice.
    pub fn admit(&self, reused: bool) -> bool {
        match self.kind {
            AdmissionKind::Always => true,
            AdmissionKind::Reused => reused,
        }
    }

    /// Remembers that the block with fingerprint `fp` was dropped without a disk copy.
    pub fn dropped(&mut self, fp: u64) {
        if self.capacity == 0 || !self.ghost.insert(fp) {
            return;
        }
        self.order.push_back(fp);
        if self.order.len() > self.capacity {
            let old = self.order.pop_front().expect("non-empty");
            self.ghost.remove(&old);
        }
    }

    /// Whether a block being saved now was dropped recently (forgets it: it is back).
    pub fn seen_before(&mut self, fp: u64) -> bool {
        // The queue keeps a stale copy until it ages out; `ghost` is the truth.
        self.ghost.remove(&fp)
    }

    /// Approximate heap bytes.
    pub fn heap_bytes(&self) -> usize {
        self.ghost.capacity() * 9 + self.order.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_admits_everything() {
        let a = Admission::new(AdmissionKind::Always, 0);
        assert!(a.admit(false) && a.admit(true));
    }

    #[test]
    fn ghost_is_bounded_and_fifo() {
        let mut a = Admission::new(AdmissionKind::Reused, 3);
        for fp in 0..5 {
            a.dropped(fp);
        }
        assert!(!a.seen_before(0) && !a.seen_before(1), "aged out");
        assert!(a.seen_before(2) && a.seen_before(4));
        assert!(!a.seen_before(4), "forgotten once seen");
        assert!(a.order.len() <= 3);
    }

    #[test]
    fn a_dropped_twice_block_is_remembered_once() {
        let mut a = Admission::new(AdmissionKind::Reused, 2);
        a.dropped(1);
        a.dropped(1);
        a.dropped(2);
        assert!(a.seen_before(1) && a.seen_before(2));
    }
}
