//! Eviction policies (which committed block of a namespace goes next) and disk admission.
//!
//! One algorithm per file, all behind [`Eviction`]. Policies are pure logic: they see handles and
//! access events, never memory, files or sockets, so a trace simulation runs them unchanged.

mod admission;
mod belady;
mod heap;
mod lru;
mod prefix_lfu;

pub use admission::{Admission, AdmissionKind};
pub use belady::Belady;
pub use heap::IndexedHeap;
pub use lru::Lru;
pub use prefix_lfu::PrefixLfu;

use crate::block::Handle;
use serde::{Deserialize, Serialize};

/// What a policy learns about a block when it is stored or used.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    /// The block before this one in the prompt, if held (set on insert; ignored on touch).
    pub parent: Option<Handle>,
    /// When the block will next be used, in request order. Only an offline simulation knows
    /// this; `None` means unknown (or never). Online policies ignore it.
    pub next_use: Option<u64>,
}

/// The contract every eviction policy keeps.
///
/// A policy tracks a set of handles. The caller guarantees that `insert` is only called for a
/// handle not tracked, and `touch`/`remove` only for tracked ones. The implementation MUST return
/// from `evict` only a tracked handle for which `evictable` returned true, and MUST stop tracking it.
pub trait Eviction: Send {
    /// Short name, as used in config and reports (e.g. `"lru"`).
    fn name(&self) -> &'static str;
    /// Starts tracking `h`, a block just stored.
    fn insert(&mut self, h: Handle, access: &Access);
    /// Records a use of tracked `h`.
    fn touch(&mut self, h: Handle, access: &Access);
    /// Stops tracking `h` (removed for another reason than eviction).
    fn remove(&mut self, h: Handle);
    /// Chooses the next victim among tracked handles that `evictable` accepts, and untracks it.
    fn evict(&mut self, evictable: &mut dyn FnMut(Handle) -> bool) -> Option<Handle>;
    /// Number of tracked handles.
    fn len(&self) -> usize;
    /// True when nothing is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Approximate heap bytes of the policy's own state.
    fn heap_bytes(&self) -> usize;
}

/// The policies a daemon or a simulation can be configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// Frequency- and prefix-aware: aged frequency, tails before the prefixes they extend.
    PrefixLfu,
    /// Belady's optimum (evicts the block used farthest in the future); simulation only.
    Belady,
}

impl PolicyKind {
    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn Eviction> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::PrefixLfu => Box::new(PrefixLfu::default()),
            PolicyKind::Belady => Box::new(Belady::default()),
        }
    }

    /// The policy's name, as in config files and reports (e.g. `"prefix-lfu"`).
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::PrefixLfu => "prefix-lfu",
            PolicyKind::Belady => "belady",
        }
    }

    /// Whether the policy needs knowledge of the future (simulation only).
    pub fn is_offline(self) -> bool {
        matches!(self, PolicyKind::Belady)
    }
}

/// Grows a per-handle array so that `h` is a valid index.
fn ensure_len<T: Clone>(v: &mut Vec<T>, h: Handle, fill: T) {
    if v.len() <= h.idx() {
        v.resize(h.idx() + 1, fill);
    }
}

#[cfg(test)]
mod contract_tests;
