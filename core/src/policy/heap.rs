//! An indexed binary min-heap: priorities can be changed or removed by handle in O(log n).

use crate::block::Handle;

const ABSENT: u32 = u32::MAX;

/// A min-heap of handles ordered by a key `K`, with O(log n) update and removal by handle.
///
/// ```
/// use kvtier_core::block::Handle;
/// use kvtier_core::policy::IndexedHeap;
/// let mut heap = IndexedHeap::default();
/// heap.push(Handle(1), 5u64);
/// heap.push(Handle(2), 3u64);
/// heap.update(Handle(2), 9);
/// assert_eq!(heap.pop(), Some((Handle(1), 5)));
/// ```
pub struct IndexedHeap<K> {
    items: Vec<(K, u32)>,
    /// `pos[h]` = index of `h` in `items`, or ABSENT.
    pos: Vec<u32>,
}

impl<K> Default for IndexedHeap<K> {
    fn default() -> Self {
        Self { items: Vec::new(), pos: Vec::new() }
    }
}

impl<K: Ord + Copy> IndexedHeap<K> {
    /// Number of handles in the heap.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether `h` is in the heap.
    pub fn contains(&self, h: Handle) -> bool {
        self.pos.get(h.idx()).is_some_and(|&p| p != ABSENT)
    }

    /// The key of `h`, if present.
    pub fn key(&self, h: Handle) -> Option<K> {
        self.contains(h).then(|| self.items[self.pos[h.idx()] as usize].0)
    }

    /// Adds `h`, which must not be present.
    pub fn push(&mut self, h: Handle, key: K) {
        debug_assert!(!self.contains(h));
        if self.pos.len() <= h.idx() {
            self.pos.resize(h.idx() + 1, ABSENT);
        }
        self.items.push((key, h.0));
        let i = self.items.len() - 1;
        self.pos[h.idx()] = i as u32;
        self.sift_up(i);
    }

    /// Changes the key of present `h`.
    pub fn update(&mut self, h: Handle, key: K) {
        let i = self.pos[h.idx()] as usize;
        let old = self.items[i].0;
        self.items[i].0 = key;
        if key < old {
            self.sift_up(i);
        } else {
            self.sift_down(i);
        }
    }

    /// Removes present `h` and returns its key.
    pub fn remove(&mut self, h: Handle) -> K {
        let i = self.pos[h.idx()] as usize;
        let key = self.items[i].0;
        let last = self.items.len() - 1;
        self.swap(i, last);
        self.items.pop();
        self.pos[h.idx()] = ABSENT;
        if i < self.items.len() {
            self.sift_down(i);
            self.sift_up(i);
        }
        key
    }

    /// The smallest entry, without removing it.
    pub fn peek(&self) -> Option<(Handle, K)> {
        self.items.first().map(|&(k, h)| (Handle(h), k))
    }

    /// Removes and returns the smallest entry.
    pub fn pop(&mut self) -> Option<(Handle, K)> {
        let (h, k) = self.peek()?;
        self.remove(h);
        Some((h, k))
    }

    /// Approximate heap bytes.
    pub fn heap_bytes(&self) -> usize {
        self.items.capacity() * std::mem::size_of::<(K, u32)>() + self.pos.capacity() * 4
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.items.swap(a, b);
        self.pos[self.items[a].1 as usize] = a as u32;
        self.pos[self.items[b].1 as usize] = b as u32;
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.items[i].0 >= self.items[parent].0 {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut smallest = i;
            if l < self.items.len() && self.items[l].0 < self.items[smallest].0 {
                smallest = l;
            }
            if r < self.items.len() && self.items[r].0 < self.items[smallest].0 {
                smallest = r;
            }
            if smallest == i {
                break;
            }
            self.swap(i, smallest);
            i = smallest;
        }
    }
}

/// Pops the smallest entry that `accept` takes, putting back those it refused.
pub(super) fn pop_accepted<K: Ord + Copy>(
    heap: &mut IndexedHeap<K>,
    accept: &mut dyn FnMut(Handle) -> bool,
) -> Option<(Handle, K)> {
    let mut refused = Vec::new();
    let mut found = None;
    while let Some((h, k)) = heap.pop() {
        if accept(h) {
            found = Some((h, k));
            break;
        }
        refused.push((h, k));
    }
    for (h, k) in refused {
        heap.push(h, k);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_key_order_after_updates_and_removes() {
        let mut heap = IndexedHeap::default();
        // A fixed pseudo-random sequence of keys.
        let mut x = 12345u64;
        let mut expect = std::collections::BTreeMap::new();
        for h in 0..500u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let k = x >> 40;
            heap.push(Handle(h), (k, h));
            expect.insert(h, (k, h));
        }
        for h in (0..500u32).step_by(7) {
            heap.update(Handle(h), (h as u64, h));
            expect.insert(h, (h as u64, h));
        }
        for h in (0..500u32).step_by(11) {
            if expect.remove(&h).is_some() {
                heap.remove(Handle(h));
            }
        }
        let mut want: Vec<_> = expect.values().copied().collect();
        want.sort();
        let got: Vec<_> = std::iter::from_fn(|| heap.pop().map(|(_, k)| k)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn pop_accepted_puts_refused_back() {
        let mut heap = IndexedHeap::default();
        for h in 0..5u32 {
            heap.push(Handle(h), h);
        }
        let got = pop_accepted(&mut heap, &mut |h| h.0 >= 3);
        assert_eq!(got, Some((Handle(3), 3)));
        assert_eq!(heap.len(), 4);
        assert_eq!(heap.peek(), Some((Handle(0), 0)));
    }
}
