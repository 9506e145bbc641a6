//! Trace-driven simulation of the tiers: replays request traces through the real [`BlockCache`]
//! (index, policies, admission, allocators) with no pool, file or socket behind it.
//!
//! A request hits on the longest leading run of its blocks the cache holds; after it is served,
//! all its blocks are stored (as a connector saves a finished prompt).

use crate::alloc::SlabAllocator;
use crate::block::{BlockHash, BlockKey};
use crate::cache::{BlockCache, CacheLimits, ClientId, DiskSetup, PromotionOutcome, TierKind};
use crate::namespace::NamespaceId;
use crate::policy::{AdmissionKind, PolicyKind};
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

/// What one replay counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requested blocks found in the host tier (as part of the held prefix).
    pub host_hits: u64,
    /// Requested blocks found only on disk.
    pub disk_hits: u64,
    /// Requested blocks.
    pub total: u64,
    /// Blocks stored (new blocks of finished requests).
    pub saved: u64,
    /// Blocks written to disk.
    pub written: u64,
}

/// A disk tier for a simulation.
#[derive(Clone, Copy, Debug)]
pub struct SimDisk {
    /// Disk capacity in blocks.
    pub blocks: usize,
    /// Admission rule.
    pub admission: AdmissionKind,
}

fn sim_cache(host_blocks: usize, disk: Option<SimDisk>, policy: PolicyKind) -> BlockCache {
    let slab = |blocks: usize| blocks.max(1) as u64 * SIM_BLOCK_BYTES;
    let host = SlabAllocator::new(1, slab(host_blocks), 1);
    match disk {
        None => BlockCache::new(host, policy, CacheLimits::default()),
        Some(d) => {
            let setup = DiskSetup {
                alloc: SlabAllocator::new(1, slab(d.blocks), 1),
                header_bytes: 0,
                admission: d.admission,
                reserve_fraction: 0.125,
            };
            BlockCache::with_disk(host, policy, CacheLimits::default(), setup)
        }
    }
}

/// Replays `trace` through a host tier of `host_blocks` blocks (and a disk tier if `disk`)
/// evicting with `policy`. Disk moves complete at once: time is request order.
pub fn replay(trace: &Trace, host_blocks: usize, disk: Option<SimDisk>, policy: PolicyKind) -> Counts {
    let mut cache = sim_cache(host_blocks, disk, policy);
    let ns = cache.register(NamespaceId([0; 16]), SIM_BLOCK_BYTES).expect("block fits");
    let future = policy.is_offline().then(|| Arc::new(Future::new(trace)));
    if let Some(f) = &future {
        let f = Arc::clone(f);
        cache.set_oracle(Box::new(move |key| f.next_use(id_of(key))));
    }
    let client = ClientId(0);
    let mut n = Counts::default();
    for (i, req) in trace.requests.iter().enumerate() {
        if let Some(f) = &future {
            f.now.store(i as u64, Ordering::Relaxed);
        }
        let hashes: Vec<BlockHash> = req.hash_ids.iter().map(|&id| BlockHash::from_u64(id)).collect();
        let tiers = cache.lookup_tiers(ns, &hashes);
        n.host_hits += tiers.iter().filter(|&&t| t == TierKind::Host).count() as u64;
        n.disk_hits += tiers.iter().filter(|&&t| t == TierKind::Disk).count() as u64;
        n.total += hashes.len() as u64;
        for p in cache.begin_promotions(ns, &hashes[..tiers.len()]).started {
            cache.complete_promotion(&p, PromotionOutcome::Verified);
        }
        let (lease, _) = cache.acquire(client, ns, &hashes[..tiers.len()]).expect("within limits");
        if lease != 0 {
            cache.release(client, lease).expect("own lease");
        }
        let (res, _) = cache.reserve(client, ns, &hashes, None).expect("within limits");
        if res != 0 {
            n.saved += cache.commit(client, res).expect("own reservation") as u64;
        }
        for d in cache.plan_demotions(usize::MAX) {
            cache.complete_demotion(&d, Some(0));
        }
    }
    n.written = cache.disk_stats().map_or(0, |d| d.demoted_blocks);
    n
}

/// Replays `trace` through a host tier of `capacity_blocks` blocks evicting with `policy`;
/// returns (hit blocks, total blocks).
pub fn simulate(trace: &Trace, capacity_blocks: usize, policy: PolicyKind) -> (u64, u64) {
    let n = replay(trace, capacity_blocks, None, policy);
    (n.host_hits, n.total)
}

/// Capacities reported by `kvtier sim`, in percent of unique blocks.
pub const DEFAULT_CAPACITY_PCTS: [f64; 6] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0];

/// Runs `f` over `jobs` on all cores; results in job order.
fn parallel_map<J: Sync, R: Send>(jobs: &[J], f: impl Fn(&J) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len().max(1));
    let next = AtomicU64::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> = jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(job) = jobs.get(j) else { break };
                *results[j].lock().expect("unpoisoned") = Some(f(job));
            });
        }
    });
    results.into_iter().map(|r| r.into_inner().expect("unpoisoned").expect("every job ran")).collect()
}

fn blocks_at(trace_unique: usize, pct: f64) -> usize {
    ((trace_unique as f64) * pct / 100.0).round() as usize
}

/// Runs every (capacity, policy) pair, in parallel over the machine's cores.
pub fn sweep(trace: &Trace, pcts: &[f64], policies: &[PolicyKind]) -> Vec<SimResult> {
    let unique = trace.unique_blocks();
    let jobs: Vec<(f64, PolicyKind)> = pcts.iter().flat_map(|&p| policies.iter().map(move |&k| (p, k))).collect();
    parallel_map(&jobs, |&(pct, kind)| {
        let (hits, total) = simulate(trace, blocks_at(unique, pct), kind);
        SimResult { capacity_pct: pct, policy: kind.name().to_string(), hit_rate: hits as f64 / total.max(1) as f64 }
    })
}

/// Outcome of one two-tier simulation run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TieredResult {
    /// Host capacity in percent of the trace's unique blocks.
    pub host_pct: f64,
    /// Disk capacity in percent of the trace's unique blocks.
    pub disk_pct: f64,
    /// Eviction policy (both tiers).
    pub policy: String,
    /// Disk admission rule.
    pub admission: String,
    /// Prefix-hit blocks served from the host tier, over all requested blocks.
    pub host_hit_rate: f64,
    /// Prefix-hit blocks served from disk, over all requested blocks.
    pub disk_hit_rate: f64,
    /// Both together.
    pub hit_rate: f64,
    /// Blocks written to disk per block saved (the disk's write volume per saved byte).
    pub written_per_saved: f64,
    /// Belady's optimum with one pool of host plus disk capacity: the upper bound.
    pub belady_combined: f64,
}

/// Runs every (host capacity, policy, admission) triple with a disk of `disk_pct`.
pub fn sweep_tiered(
    trace: &Trace,
    host_pcts: &[f64],
    disk_pct: f64,
    policies: &[PolicyKind],
    admissions: &[AdmissionKind],
) -> Vec<TieredResult> {
    let unique = trace.unique_blocks();
    let mut jobs: Vec<(f64, Option<(PolicyKind, AdmissionKind)>)> = Vec::new();
    for &h in host_pcts {
        jobs.push((h, None));
        for &p in policies {
            jobs.extend(admissions.iter().map(|&a| (h, Some((p, a)))));
        }
    }
    let disk_blocks = blocks_at(unique, disk_pct);
    let counts = parallel_map(&jobs, |&(h, run)| match run {
        None => replay(trace, blocks_at(unique, h) + disk_blocks, None, PolicyKind::Belady),
        Some((p, a)) => replay(trace, blocks_at(unique, h), Some(SimDisk { blocks: disk_blocks, admission: a }), p),
    });
    let mut out = Vec::new();
    let mut belady = 0.0;
    for (&(h, run), n) in jobs.iter().zip(counts) {
        let rate = |x: u64| x as f64 / n.total.max(1) as f64;
        let Some((p, a)) = run else {
            belady = rate(n.host_hits);
            continue;
        };
        out.push(TieredResult {
            host_pct: h,
            disk_pct,
            policy: p.name().into(),
            admission: a.name().into(),
            host_hit_rate: rate(n.host_hits),
            disk_hit_rate: rate(n.disk_hits),
            hit_rate: rate(n.host_hits + n.disk_hits),
            written_per_saved: n.written as f64 / n.saved.max(1) as f64,
            belady_combined: belady,
        });
    }
    out
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
    fn a_disk_tier_turns_host_misses_into_disk_hits() {
        // 6 distinct one-block prompts, twice round: the host holds 2, the disk all 6.
        let t = trace(&[&[1], &[2], &[3], &[4], &[5], &[6], &[1], &[2], &[3], &[4], &[5], &[6]]);
        let host_only = replay(&t, 2, None, PolicyKind::Lru);
        assert_eq!(host_only.host_hits, 0);
        let disk = SimDisk { blocks: 6, admission: AdmissionKind::Always };
        let two = replay(&t, 2, Some(disk), PolicyKind::Lru);
        assert_eq!((two.host_hits, two.disk_hits, two.total), (0, 6, 12));
        assert_eq!((two.saved, two.written), (6, 6));
        // Reused: nothing was used twice before it left the host, so nothing is written the
        // first time round; the second round's saves are admitted (they were seen before).
        let reused = replay(&t, 2, Some(SimDisk { blocks: 6, admission: AdmissionKind::Reused }), PolicyKind::Lru);
        assert_eq!(reused.disk_hits, 0);
        assert!(reused.written <= 6);
    }

    #[test]
    fn tiered_sweep_reports_rates_and_the_combined_bound() {
        let t = trace(&[&[1, 2], &[1, 2], &[3], &[1, 2, 3]]);
        let r = sweep_tiered(&t, &[34.0], 67.0, &[PolicyKind::Lru], &[AdmissionKind::Always, AdmissionKind::Reused]);
        assert_eq!(r.len(), 2);
        assert!((r[0].hit_rate - (r[0].host_hit_rate + r[0].disk_hit_rate)).abs() < 1e-9);
        assert!(r.iter().all(|x| x.hit_rate <= x.belady_combined + 1e-9), "{r:?}");
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
