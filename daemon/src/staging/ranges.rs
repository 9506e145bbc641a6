//! Free space of a staging window: first-fit ranges, merged again when freed. Pure bookkeeping.

use std::collections::BTreeMap;

/// The free ranges of a window of `len` bytes.
///
/// ```
/// use kvtier_daemon::staging::Ranges;
/// let mut r = Ranges::new(16384);
/// let a = r.take(8192).unwrap();
/// let b = r.take(8192).unwrap();
/// assert_eq!((a, b, r.take(4096)), (0, 8192, None));
/// r.give(a, 8192);
/// assert_eq!(r.take(4096), Some(0));
/// ```
#[derive(Debug)]
pub struct Ranges {
    /// Free ranges: start -> length, never adjacent (merged on free).
    free: BTreeMap<u64, u64>,
    len: u64,
    used: u64,
}

impl Ranges {
    /// A window of `len` bytes, all free.
    pub fn new(len: u64) -> Self {
        let free = if len > 0 { BTreeMap::from([(0, len)]) } else { BTreeMap::new() };
        Self { free, len, used: 0 }
    }

    /// Takes `len` bytes (the lowest free range that fits); `None` if none does.
    pub fn take(&mut self, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let (&start, &have) = self.free.iter().find(|(_, &have)| have >= len)?;
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        self.used += len;
        Some(start)
    }

    /// Takes up to `n` ranges of `len` bytes each; fewer when the window runs out.
    pub fn take_many(&mut self, n: usize, len: u64) -> Vec<u64> {
        (0..n).map_while(|_| self.take(len)).collect()
    }

    /// Returns a range taken before.
    pub fn give(&mut self, start: u64, len: u64) {
        debug_assert!(start + len <= self.len, "range past the window");
        debug_assert!(self.is_free_gap(start, len), "range {start}+{len} freed twice");
        let (mut start, mut len) = (start, len);
        self.used -= len;
        if let Some((&before, &blen)) = self.free.range(..start).next_back() {
            if before + blen == start {
                self.free.remove(&before);
                start = before;
                len += blen;
            }
        }
        if let Some(&alen) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += alen;
        }
        self.free.insert(start, len);
    }

    fn is_free_gap(&self, start: u64, len: u64) -> bool {
        let before_ok = self.free.range(..=start).next_back().is_none_or(|(&s, &l)| s + l <= start);
        let after_ok = self.free.range(start..).next().is_none_or(|(&s, _)| s >= start + len);
        before_ok && after_ok
    }

    /// Bytes taken now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes of the window.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a window of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_ranges_merge_back_into_one() {
        let mut r = Ranges::new(10 * 4096);
        let got = r.take_many(10, 4096);
        assert_eq!(got.len(), 10);
        assert_eq!(r.take(4096), None);
        for &at in got.iter().rev().step_by(2) {
            r.give(at, 4096);
        }
        for &at in got.iter().step_by(2) {
            r.give(at, 4096);
        }
        assert_eq!(r.used(), 0);
        assert_eq!(r.take(10 * 4096), Some(0), "one free range again");
    }

    #[test]
    fn take_many_stops_when_the_window_is_full() {
        let mut r = Ranges::new(5 * 8192);
        assert_eq!(r.take_many(8, 8192).len(), 5);
        assert!(r.take_many(1, 4096).is_empty());
        assert!(Ranges::new(0).take(4096).is_none());
        assert!(Ranges::new(4096).take(0).is_none(), "nothing to take");
    }

    #[test]
    fn random_takes_and_gives_never_overlap() {
        let mut r = Ranges::new(64 * 4096);
        let mut held: Vec<(u64, u64)> = Vec::new();
        let mut x = 12345u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !x.is_multiple_of(3) {
                let len = 4096 * (1 + x % 4);
                if let Some(at) = r.take(len) {
                    assert!(held.iter().all(|&(s, l)| at + len <= s || s + l <= at), "overlap at {at}");
                    assert!(at + len <= r.len());
                    held.push((at, len));
                }
            } else if !held.is_empty() {
                let (s, l) = held.swap_remove((x as usize / 3) % held.len());
                r.give(s, l);
            }
            assert_eq!(r.used(), held.iter().map(|h| h.1).sum::<u64>());
        }
    }
}
