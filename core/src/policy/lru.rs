//! Least recently used, as an intrusive doubly-linked list over handle-indexed arrays
//! (8 bytes per block).

use super::{ensure_len, Access, Eviction};
use crate::block::Handle;

const NIL: u32 = u32::MAX;

/// Least-recently-used eviction.
///
/// ```
/// use kvtier_core::block::Handle;
/// use kvtier_core::policy::{Access, Eviction, Lru};
/// let mut lru = Lru::default();
/// for i in 0..3 { lru.insert(Handle(i), &Access::default()); }
/// lru.touch(Handle(0), &Access::default());
/// assert_eq!(lru.evict(&mut |_| true), Some(Handle(1)));
/// ```
#[derive(Default)]
pub struct Lru {
    /// `links[h] = (prev, next)`; prev points toward the most recent end.
    links: Vec<(u32, u32)>,
    /// Most recently used.
    head: Option<u32>,
    /// Least recently used.
    tail: Option<u32>,
    len: usize,
}

impl Lru {
    fn unlink(&mut self, h: u32) {
        let (prev, next) = self.links[h as usize];
        match prev {
            NIL => self.head = (next != NIL).then_some(next),
            p => self.links[p as usize].1 = next,
        }
        match next {
            NIL => self.tail = (prev != NIL).then_some(prev),
            n => self.links[n as usize].0 = prev,
        }
        self.links[h as usize] = (NIL, NIL);
    }

    fn push_front(&mut self, h: u32) {
        let old = self.head.unwrap_or(NIL);
        self.links[h as usize] = (NIL, old);
        if old != NIL {
            self.links[old as usize].0 = h;
        } else {
            self.tail = Some(h);
        }
        self.head = Some(h);
    }
}

impl Eviction for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, h: Handle, _: &Access) {
        ensure_len(&mut self.links, h, (NIL, NIL));
        self.push_front(h.0);
        self.len += 1;
    }

    fn touch(&mut self, h: Handle, _: &Access) {
        self.unlink(h.0);
        self.push_front(h.0);
    }

    fn remove(&mut self, h: Handle) {
        self.unlink(h.0);
        self.len -= 1;
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(Handle) -> bool) -> Option<Handle> {
        let mut cur = self.tail;
        while let Some(h) = cur {
            if evictable(Handle(h)) {
                self.remove(Handle(h));
                return Some(Handle(h));
            }
            cur = match self.links[h as usize].0 {
                NIL => None,
                p => Some(p),
            };
        }
        None
    }

    fn len(&self) -> usize {
        self.len
    }

    fn heap_bytes(&self) -> usize {
        self.links.capacity() * 8
    }
}
