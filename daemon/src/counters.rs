//! Every scalar counter and gauge of the daemon, declared once ([`counters`]): `/metrics`
//! renders them, the connector's Stats reply carries them and `kvtier status` prints them from
//! there, as CacheLib's `getCounters` feeds every exporter from one visitor. Labelled families
//! (latency histograms, errors by code, namespaces, parts) stay with their renderers in
//! `metrics.rs`.

use crate::metrics::{Metrics, Readings};
use kvtier_core::cache::{CacheStats, DiskStats};
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

/// One exported number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    /// Its Prometheus name (`kvtier_...`).
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
    /// Only ever grows (a Prometheus counter), else a gauge.
    pub monotonic: bool,
    /// Its value now.
    pub value: u64,
}

impl Counter {
    /// Its Prometheus type.
    pub fn kind(&self) -> &'static str {
        if self.monotonic {
            "counter"
        } else {
            "gauge"
        }
    }
}

/// Prometheus text of `counters` (HELP, TYPE and value of each).
pub fn exposition(counters: &[Counter]) -> String {
    let mut o = String::with_capacity(64 * counters.len());
    for c in counters {
        let (name, help, kind, value) = (c.name, c.help, c.kind(), c.value);
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    o
}

/// Every scalar counter and gauge, in exposition order: the cache's, the disk tier's (when one
/// is configured), the servers' and the mechanism's readings.
pub fn counters(m: &Metrics, cache: &CacheStats, disk: Option<&DiskStats>, now: &Readings) -> Vec<Counter> {
    let mut out = Vec::with_capacity(64);
    let mut gauge = |name: &'static str, help: &'static str, kind: &str, value: u64| {
        out.push(Counter { name, help, monotonic: kind == "counter", value });
    };
    gauge("kvtier_host_capacity_bytes", "Host pool budget in bytes.", "gauge", cache.capacity_bytes);
    gauge("kvtier_host_used_bytes", "Bytes of host pool slots in use.", "gauge", cache.used_bytes);
    gauge("kvtier_host_blocks", "Committed blocks in the host tier.", "gauge", cache.blocks);
    gauge("kvtier_host_reserved_blocks", "Blocks reserved and not yet committed.", "gauge", cache.reserved_blocks);
    gauge("kvtier_host_pool_locked", "1 if the pool is mlock'd.", "gauge", now.pool_locked as u64);
    gauge(
        "kvtier_ready",
        "1 when everything configured works; 0 when a part or tier is off (kvtier status says why).",
        "gauge",
        now.ready as u64,
    );
    gauge("kvtier_namespaces", "Registered namespaces.", "gauge", cache.namespaces);
    gauge(
        "kvtier_namespaces_reclaimed_total",
        "Namespaces forgotten to make room for new ones (none registered; emptied if they held blocks).",
        "counter",
        cache.reclaimed_namespaces,
    );
    gauge(
        "kvtier_hit_blocks_total",
        "Blocks found by lookups (and by loads that no lookup of the same prefix announced).",
        "counter",
        cache.hit_blocks,
    );
    gauge(
        "kvtier_miss_blocks_total",
        "Blocks asked by lookups (and such loads) and not found.",
        "counter",
        cache.miss_blocks,
    );
    gauge("kvtier_evicted_blocks_total", "Blocks evicted from the host tier.", "counter", cache.evicted_blocks);
    gauge(
        "kvtier_discarded_blocks_total",
        "Blocks removed by an operator's Discard, from every tier.",
        "counter",
        cache.discarded_blocks,
    );
    gauge("kvtier_saved_bytes_total", "Bytes committed into the host tier.", "counter", cache.saved_bytes);
    gauge("kvtier_loaded_bytes_total", "Bytes handed out for loading.", "counter", cache.loaded_bytes);
    gauge("kvtier_disk_hit_blocks_total", "Blocks found by lookups only on disk.", "counter", cache.disk_hit_blocks);
    gauge("kvtier_disk_configured", "1 if spill directories are configured.", "gauge", disk.is_some() as u64);
    if let Some(d) = disk {
        gauge(
            "kvtier_disk_enabled",
            "1 while the disk tier works (0 after a disk failure).",
            "gauge",
            d.enabled as u64,
        );
        gauge("kvtier_disk_capacity_bytes", "Bytes of all spill slots.", "gauge", d.capacity_bytes);
        gauge("kvtier_disk_used_bytes", "Bytes of spill slots in use.", "gauge", d.used_bytes);
        gauge("kvtier_disk_blocks", "Blocks with a disk copy.", "gauge", d.blocks);
        gauge("kvtier_disk_cold_bytes", "Pool bytes queued to be dropped first.", "gauge", d.cold_bytes);
        gauge(
            "kvtier_disk_queued_ios",
            "Disk reads and writes submitted and not yet done (waiting for a ring entry or in the kernel).",
            "gauge",
            now.disk_queued_ios,
        );
        gauge("kvtier_disk_demoted_blocks_total", "Blocks written to disk.", "counter", d.demoted_blocks);
        gauge(
            "kvtier_disk_written_bytes_total",
            "Bytes written to disk, headers included.",
            "counter",
            d.written_bytes,
        );
        gauge("kvtier_disk_promoted_blocks_total", "Blocks read back and verified.", "counter", d.promoted_blocks);
        gauge("kvtier_disk_read_bytes_total", "Bytes read from disk by promotions.", "counter", d.read_bytes);
        gauge(
            "kvtier_disk_not_admitted_blocks_total",
            "Blocks that left the pool without a disk write (admission).",
            "counter",
            d.not_admitted_blocks,
        );
        gauge("kvtier_disk_evicted_blocks_total", "Disk copies dropped to make room.", "counter", d.evicted_blocks);
        gauge(
            "kvtier_disk_corrupt_blocks_total",
            "Slots found torn, corrupt or stale on promote (dropped, never served).",
            "counter",
            d.corrupt_blocks,
        );
        gauge(
            "kvtier_disk_failed_promotions_total",
            "Promotions failed by I/O errors.",
            "counter",
            d.failed_promotions,
        );
        gauge(
            "kvtier_disk_restored_blocks",
            "Blocks recovered from the disk index at start.",
            "gauge",
            d.restored_blocks,
        );
    }
    gauge("kvtier_connected_clients", "Connector clients connected now.", "gauge", m.connected_clients.load(Relaxed));
    gauge("kvtier_connections_total", "Connector connections accepted.", "counter", m.connections_total.load(Relaxed));
    gauge("kvtier_feed_watchers", "Router-feed event streams open now.", "gauge", m.feed_watchers.load(Relaxed));
    gauge("kvtier_peer_offers_total", "Offers of blocks made to peer daemons.", "counter", m.peer_offers.load(Relaxed));
    gauge(
        "kvtier_peer_offers_limited_total",
        "Offers cut short by the offer quotas (transfer.offer_pool_share, transfer.offer_caller_share).",
        "counter",
        m.peer_offers_limited.load(Relaxed),
    );
    gauge(
        "kvtier_connection_panics_total",
        "Connector connection tasks that panicked (a bug: logged; what they held was released).",
        "counter",
        m.connection_panics.load(Relaxed),
    );
    gauge(
        "kvtier_grpc_refused_total",
        "gRPC unix-socket connections refused: uid not allowed.",
        "counter",
        m.grpc_refused.load(Relaxed),
    );
    gauge(
        "kvtier_peer_pulled_blocks_total",
        "Blocks shipped in from peers, verified.",
        "counter",
        m.peer_pulled_blocks.load(Relaxed),
    );
    gauge(
        "kvtier_peer_pulled_bytes_total",
        "Bytes shipped in from peers.",
        "counter",
        m.peer_pulled_bytes.load(Relaxed),
    );
    gauge(
        "kvtier_peer_pull_failures_total",
        "Pulls that failed; nothing of them was kept.",
        "counter",
        m.peer_pull_failures.load(Relaxed),
    );
    gauge(
        "kvtier_peer_shipped_blocks_total",
        "Blocks shipped out to peers.",
        "counter",
        m.peer_shipped_blocks.load(Relaxed),
    );
    gauge(
        "kvtier_peer_shipped_bytes_total",
        "Bytes shipped out to peers.",
        "counter",
        m.peer_shipped_bytes.load(Relaxed),
    );
    gauge(
        "kvtier_peer_ship_failures_total",
        "Shipments to peers that failed.",
        "counter",
        m.peer_ship_failures.load(Relaxed),
    );
    gauge(
        "kvtier_peer_shipments_in_flight",
        "Shipments to peers sending now.",
        "gauge",
        m.peer_shipments_in_flight.load(Relaxed),
    );
    gauge(
        "kvtier_peer_pulls_in_flight",
        "Pulls reading from a peer now.",
        "gauge",
        m.peer_pulls_in_flight.load(Relaxed),
    );
    gauge(
        "kvtier_device_saved_bytes_total",
        "Bytes the daemon copied from engines' KV tensors into the pool (SaveKv).",
        "counter",
        m.device_copied_bytes[0].load(Relaxed),
    );
    gauge(
        "kvtier_device_loaded_bytes_total",
        "Bytes the daemon copied from the pool into engines' KV tensors (LoadKv).",
        "counter",
        m.device_copied_bytes[1].load(Relaxed),
    );
    gauge(
        "kvtier_device_copy_failures_total",
        "Daemon-side copies of engine memory that failed.",
        "counter",
        m.device_copy_failures.load(Relaxed),
    );
    gauge(
        "kvtier_connections_refused_total",
        "Connector connections refused: uid not allowed, or a connection limit reached.",
        "counter",
        m.connections_refused.load(Relaxed),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_named_once_with_help_and_the_disk_tiers_only_with_a_disk() {
        let (m, cache) = (Metrics::default(), CacheStats::default());
        let now = Readings { pool_locked: true, disk_queued_ios: 0, namespaces: vec![], parts: vec![], ready: true };
        let host_only = counters(&m, &cache, None, &now);
        let with_disk = counters(&m, &cache, Some(&DiskStats::default()), &now);
        assert!(host_only.len() > 30 && with_disk.len() > host_only.len());
        let cache = CacheStats { capacity_bytes: 7, ..Default::default() };
        assert!(exposition(&counters(&m, &cache, None, &now)).contains(
            "# HELP kvtier_host_capacity_bytes Host pool budget in bytes.\n# TYPE kvtier_host_capacity_bytes gauge\nkvtier_host_capacity_bytes 7\n"
        ));
        let mut names: Vec<_> = with_disk.iter().map(|c| c.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), with_disk.len(), "a name declared twice");
        for c in &with_disk {
            assert!(c.name.starts_with("kvtier_") && !c.help.is_empty(), "{c:?}");
            assert_eq!(c.monotonic, c.name.ends_with("_total"), "{}: counters and only counters end in _total", c.name);
        }
        let host_names: Vec<_> = host_only.iter().map(|c| c.name).collect();
        for c in with_disk.iter().filter(|c| !host_names.contains(&c.name)) {
            assert!(c.name.starts_with("kvtier_disk_"), "{} is reported only with a disk tier", c.name);
        }
    }
}
