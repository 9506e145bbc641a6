//! Belady's optimum: evict the block whose next use lies farthest in the future.
//!
//! It needs the future, so only the trace simulator can drive it (through `Access::next_use`).
//! It is the yardstick the online policies are measured against.

use super::heap::{pop_accepted, IndexedHeap};
use super::{Access, Eviction};
use crate::block::Handle;

/// Offline optimal eviction (for simulation).
#[derive(Default)]
pub struct Belady {
    /// Key: distance from the far future, so the smallest key is the farthest next use.
    heap: IndexedHeap<u64>,
}

fn key(access: &Access) -> u64 {
    u64::MAX - access.next_use.unwrap_or(u64::MAX)
}

impl Eviction for Belady {
    fn name(&self) -> &'static str {
        "belady"
    }

    fn insert(&mut self, h: Handle, access: &Access) {
        self.heap.push(h, key(access));
    }

    fn touch(&mut self, h: Handle, access: &Access) {
        self.heap.update(h, key(access));
    }

    fn remove(&mut self, h: Handle) {
        self.heap.remove(h);
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(Handle) -> bool) -> Option<Handle> {
        pop_accepted(&mut self.heap, evictable).map(|(h, _)| h)
    }

    fn len(&self) -> usize {
        self.heap.len()
    }

    fn heap_bytes(&self) -> usize {
        self.heap.heap_bytes()
    }
}
