//! Reading a Stats reply's counters by name. The daemon declares every counter once
//! (`daemon/src/counters.rs`) and sends them all; clients look up the ones they show.

use kvtier_proto::v1::StatsReply;
use std::collections::BTreeMap;

/// Names of the counters `kvtier status` and `kvtier top` show.
pub mod names {
    /// Registered namespaces.
    pub const NAMESPACES: &str = "kvtier_namespaces";
    /// Connector clients connected now.
    pub const CLIENTS: &str = "kvtier_connected_clients";
    /// Blocks found by lookups.
    pub const HITS: &str = "kvtier_hit_blocks_total";
    /// Blocks lookups did not find.
    pub const MISSES: &str = "kvtier_miss_blocks_total";
    /// Of the hits, blocks found only on disk.
    pub const DISK_HITS: &str = "kvtier_disk_hit_blocks_total";
    /// Blocks evicted from the host tier.
    pub const EVICTED: &str = "kvtier_evicted_blocks_total";
    /// Blocks removed by Discard.
    pub const DISCARDED: &str = "kvtier_discarded_blocks_total";
    /// Bytes committed.
    pub const SAVED_BYTES: &str = "kvtier_saved_bytes_total";
    /// Bytes handed out for loading.
    pub const LOADED_BYTES: &str = "kvtier_loaded_bytes_total";
    /// Blocks written to disk.
    pub const DEMOTED: &str = "kvtier_disk_demoted_blocks_total";
    /// Blocks read back from disk.
    pub const PROMOTED: &str = "kvtier_disk_promoted_blocks_total";
    /// Bytes written to disk.
    pub const DISK_WRITTEN_BYTES: &str = "kvtier_disk_written_bytes_total";
    /// Blocks that left the pool without a disk write.
    pub const NOT_ADMITTED: &str = "kvtier_disk_not_admitted_blocks_total";
    /// Disk slots found corrupt (never served).
    pub const CORRUPT: &str = "kvtier_disk_corrupt_blocks_total";
}

/// Counters of a Stats reply by name.
pub trait Counters {
    /// The value of counter `name` (0 when the daemon does not report it, e.g. a disk tier's
    /// counter on a daemon without one).
    fn counter(&self, name: &str) -> u64;
    /// Every counter, by name.
    fn counter_map(&self) -> BTreeMap<String, u64>;
}

impl Counters for StatsReply {
    fn counter(&self, name: &str) -> u64 {
        self.counters.iter().find(|c| c.name == name).map_or(0, |c| c.value)
    }

    fn counter_map(&self) -> BTreeMap<String, u64> {
        self.counters.iter().map(|c| (c.name.clone(), c.value)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_proto::v1::Counter;

    #[test]
    fn counters_are_found_by_name_and_missing_ones_read_zero() {
        let s = StatsReply {
            counters: vec![Counter { name: names::HITS.into(), help: "h".into(), monotonic: true, value: 7 }],
            ..Default::default()
        };
        assert_eq!(s.counter(names::HITS), 7);
        assert_eq!(s.counter(names::CORRUPT), 0);
        assert_eq!(s.counter_map().into_iter().collect::<Vec<_>>(), vec![(names::HITS.to_string(), 7)]);
    }
}
