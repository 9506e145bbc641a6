//! Trace-driven simulation of the host tier: replays request traces through the real
//! [`BlockCache`] (index, policy, allocator) with no pool, file or socket behind it.
//!
//! A request hits on the longest leading run of its blocks the cache holds; after it is served,
//! all its blocks are stored (as a connector saves a finished prompt).

use crate::alloc::SlabAllocator;
use crate::block::{BlockHash, BlockKey};
use crate::cache::{BlockCache, CacheLimits, ClientId};
use crate::namespace::NamespaceId;
use crate::policy::PolicyKind;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One request of a trace.
#[derive(Clone, Debug, Deserialize)]
pub struct TraceRequest {
    /// Arrival time in milliseconds from the start of the trace.
    #[serde(default)]
    pub timestamp: u64,
    /// Chained prefix hash ids, one per block, in prompt order.
    pub hash_ids: Vec<u64>,
}

/// A request trace (Mooncake FAST'25 JSONL format).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Requests in arrival order.
    pub requests: Vec<TraceRequest>,
}

impl Trace {
    /// Parses one JSON object per line; blank lines are skipped.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let requests = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { requests })
    }

    /// Reads and parses a trace file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::parse(&text)
    }

    /// Number of distinct block ids.
    pub fn unique_blocks(&self) -> usize {
        self.requests.iter().flat_map(|r| &r.hash_ids).collect::<HashSet<_>>().len()
    }

    /// Total blocks over all requests.
    pub fn total_blocks(&self) -> u64 {
        self.requests.iter().map(|r| r.hash_ids.len() as u64).sum()
    }
}

/// Outcome of one simulation run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SimResult {
    /// Cache capacity as a percentage of the trace's unique blocks.
    pub capacity_pct: f64,
    /// Policy name.
    pub policy: String,
    /// Prefix-hit blocks over all requested blocks.
    pub hit_rate: f64,
}

/// Per-hash request positions, so an offline policy can be told each block's next use.
struct Future {
    uses: HashMap<u64, Vec<u32>>,
    now: AtomicU64,
}

impl Future {
    fn new(trace: &Trace) -> Self {
        let mut uses: HashMap<u64, Vec<u32>> = HashMap::new();
        for (i, r) in trace.requests.iter().enumerate() {
            for &id in &r.hash_ids {
                let v = uses.entry(id).or_default();
                if v.last() != Some(&(i as u32)) {
                    v.push(i as u32);
                }
            }
        }
        Self { uses, now: AtomicU64::new(0) }
    }

    fn next_use(&self, id: u64) -> Option<u64> {
        let now = self.now.load(Ordering::Relaxed) as u32;
        let v = self.uses.get(&id)?;
        let i = v.partition_point(|&t| t <= now);
        v.get(i).map(|&t| t as u64)
    }
}

fn id_of(key: &BlockKey) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key.hash.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Bytes per simulated block: one aligned slot.
const SIM_BLOCK_BYTES: u64 = 4096;

/// Replays `trace` through a host tier of `capacity_blocks` blocks evicting with `policy`;
/// returns (hit blocks, total blocks).
pub fn simulate(trace: &Trace, capacity_blocks: usize, policy: PolicyKind) -> (u64, u64) {
    let cap = capacity_blocks.max(1) as u64;
    let alloc = SlabAllocator::new(1, cap * SIM_BLOCK_BYTES, 1);
    let mut cache = BlockCache::new(alloc, policy, CacheLimits::default());
    let ns = cache.register(NamespaceId([0; 16]), SIM_BLOCK_BYTES).expect("block fits");
    let future = policy.is_offline().then(|| Arc::new(Future::new(trace)));
    if let Some(f) = &future {
        let f = Arc::clone(f);
        cache.set_oracle(Box::new(move |key| f.next_use(id_of(key))));
    }
    let client = ClientId(0);
    let (mut hits, mut total) = (0u64, 0u64);
    for (i, req) in trace.requests.iter().enumerate() {
        if let Some(f) = &future {
            f.now.store(i as u64, Ordering::Relaxed);
        }
        let hashes: Vec<BlockHash> = req.hash_ids.iter().map(|&id| BlockHash::from_u64(id)).collect();
        let matched = cache.lookup(ns, &hashes);
        hits += matched as u64;
        total += hashes.len() as u64;
        let (lease, _) = cache.acquire(client, ns, &hashes[..matched]).expect("within limits");
        if lease != 0 {
            cache.release(client, lease).expect("own lease");
        }
        let (res, _) = cache.reserve(client, ns, &hashes, None).expect("within limits");
        if res != 0 {
            cache.commit(client, res).expect("own reservation");
        }
    }
    (hits, total)
}

/// Capacities reported by `kvtier sim`, in percent of unique blocks.
pub const DEFAULT_CAPACITY_PCTS: [f64; 6] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0];

/// Runs every (capacity, policy) pair, in parallel over the machine's cores.
pub fn sweep(trace: &Trace, pcts: &[f64], policies: &[PolicyKind]) -> Vec<SimResult> {
    let unique = trace.unique_blocks();
    let jobs: Vec<(f64, PolicyKind)> = pcts.iter().flat_map(|&p| policies.iter().map(move |&k| (p, k))).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len().max(1));
    let next = AtomicU64::new(0);
    let mut results: Vec<Option<SimResult>> = vec![None; jobs.len()];
    let slots: Vec<std::sync::Mutex<&mut Option<SimResult>>> = results.iter_mut().map(std::sync::Mutex::new).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&(pct, kind)) = jobs.get(j) else {
                    break;
                };
                let cap = ((unique as f64) * pct / 100.0).round() as usize;
                let (hits, total) = simulate(trace, cap, kind);
                **slots[j].lock().expect("unpoisoned") = Some(SimResult {
                    capacity_pct: pct,
                    policy: kind.name().to_string(),
                    hit_rate: hits as f64 / total.max(1) as f64,
                });
            });
        }
    });
    drop(slots);
    results.into_iter().map(|r| r.expect("every job ran")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(reqs: &[&[u64]]) -> Trace {
        Trace { requests: reqs.iter().map(|h| TraceRequest { timestamp: 0, hash_ids: h.to_vec() }).collect() }
    }

    #[test]
    fn parses_the_trace_format() {
        let t =
            Trace::parse("{\"timestamp\": 5, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1, 2]}\n\n")
                .unwrap();
        assert_eq!(t.requests.len(), 1);
        assert_eq!(t.requests[0].hash_ids, vec![1, 2]);
        assert!(Trace::parse("{\"hash_ids\": [1,").is_err());
    }

    #[test]
    fn counts_longest_leading_run_only() {
        // Second request shares blocks 1,2 then differs; third shares 1 only; block 9 is held but
        // not leading.
        let t = trace(&[&[1, 2, 3, 9], &[1, 2, 4], &[1, 5, 9]]);
        let (hits, total) = simulate(&t, 100, PolicyKind::Lru);
        assert_eq!((hits, total), (2 + 1, 10));
    }

    #[test]
    fn belady_is_at_least_as_good_as_online_policies() {
        // Cyclic access over 5 blocks with room for 3: LRU gets nothing, Belady gets something.
        let reqs: Vec<Vec<u64>> = (0..30).map(|i| vec![i % 5]).collect();
        let t = Trace { requests: reqs.into_iter().map(|h| TraceRequest { timestamp: 0, hash_ids: h }).collect() };
        let lru = simulate(&t, 3, PolicyKind::Lru).0;
        let opt = simulate(&t, 3, PolicyKind::Belady).0;
        assert_eq!(lru, 0);
        assert!(opt >= 10, "belady hits {opt}, lru {lru}");
    }

    #[test]
    fn sweep_reports_every_pair() {
        let t = trace(&[&[1, 2], &[1, 2], &[3]]);
        let r = sweep(&t, &[50.0, 100.0], &[PolicyKind::Lru, PolicyKind::Belady]);
        assert_eq!(r.len(), 4);
        assert_eq!(r[3].policy, "belady");
        assert!((r[2].hit_rate - 0.4).abs() < 1e-9, "{r:?}");
    }
}
