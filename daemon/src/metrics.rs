//! Daemon metrics: counters kept with atomics on the hot path, rendered as Prometheus text.

use kvtier_core::block::NsIdx;
use kvtier_core::histogram::Histogram;
use kvtier_core::namespace::NamespaceId;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Connector operations, for per-op counters and latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Hello.
    Hello,
    /// Register.
    Register,
    /// Lookup.
    Lookup,
    /// Reserve.
    Reserve,
    /// Commit.
    Commit,
    /// Abort.
    Abort,
    /// Acquire.
    Acquire,
    /// Release.
    Release,
    /// Stats.
    Stats,
    /// Prefetch.
    Prefetch,
    /// Pull.
    Pull,
    /// RegisterKvCache.
    RegisterKvCache,
    /// SaveKv.
    SaveKv,
    /// LoadKv.
    LoadKv,
    /// Discard.
    Discard,
    /// Clients.
    Clients,
    /// LogFilter.
    LogFilter,
}

impl Op {
    /// Every op, in metric order.
    pub const ALL: [Op; 17] = [
        Op::Hello,
        Op::Register,
        Op::Lookup,
        Op::Reserve,
        Op::Commit,
        Op::Abort,
        Op::Acquire,
        Op::Release,
        Op::Stats,
        Op::Prefetch,
        Op::Pull,
        Op::RegisterKvCache,
        Op::SaveKv,
        Op::LoadKv,
        Op::Discard,
        Op::Clients,
        Op::LogFilter,
    ];

    /// Label value.
    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Register => "register",
            Op::Lookup => "lookup",
            Op::Reserve => "reserve",
            Op::Commit => "commit",
            Op::Abort => "abort",
            Op::Acquire => "acquire",
            Op::Release => "release",
            Op::Stats => "stats",
            Op::Prefetch => "prefetch",
            Op::Pull => "pull",
            Op::RegisterKvCache => "register_kv_cache",
            Op::SaveKv => "save_kv",
            Op::LoadKv => "load_kv",
            Op::Discard => "discard",
            Op::Clients => "clients",
            Op::LogFilter => "log_filter",
        }
    }
}

/// What one registered namespace holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceUsage {
    /// Its index in this daemon.
    pub ns: NsIdx,
    /// The model of its descriptor.
    pub model: String,
    /// Its id (a hash of the whole descriptor, tenant salt included).
    pub id: NamespaceId,
    /// Bytes per block.
    pub block_bytes: u64,
    /// Committed blocks by best tier.
    pub held: kvtier_core::events::Held,
    /// Lookup outcomes since start.
    pub lookups: kvtier_core::cache::Lookups,
}

/// Counters of the servers (the cache keeps its own; both are rendered together).
#[derive(Default)]
pub struct Metrics {
    /// Clients connected now.
    pub connected_clients: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connector connections refused (uid not allowed, or a connection limit reached).
    pub connections_refused: AtomicU64,
    /// gRPC unix-socket connections refused (uid not allowed).
    pub grpc_refused: AtomicU64,
    /// Connector connection tasks that panicked (a bug; their holdings were released).
    pub connection_panics: AtomicU64,
    /// Requests answered with an error, by error code number.
    pub errors: [AtomicU64; 16],
    /// Latency per op.
    pub latency: [Histogram; Op::ALL.len()],
    /// Router-feed streams open now.
    pub feed_watchers: AtomicU64,
    /// Offers made to peers.
    pub peer_offers: AtomicU64,
    /// Offers cut short by the offer quotas (`transfer.offer_pool_share`, `offer_caller_share`).
    pub peer_offers_limited: AtomicU64,
    /// Blocks pulled from peers, verified and visible.
    pub peer_pulled_blocks: AtomicU64,
    /// Their bytes.
    pub peer_pulled_bytes: AtomicU64,
    /// Pulls that failed (nothing kept).
    pub peer_pull_failures: AtomicU64,
    /// Pulls reading from a peer now.
    pub peer_pulls_in_flight: AtomicU64,
    /// Time of successful pulls, from reserving slots to commit.
    pub peer_pull_latency: Histogram,
    /// Blocks this daemon shipped to peers (sends completed).
    pub peer_shipped_blocks: AtomicU64,
    /// Their bytes.
    pub peer_shipped_bytes: AtomicU64,
    /// Shipments that failed (puller gone, deadline, transport error).
    pub peer_ship_failures: AtomicU64,
    /// Shipments sending now.
    pub peer_shipments_in_flight: AtomicU64,
    /// Bytes the daemon copied itself from engines into the pool (index 0, SaveKv) and back (index 1, LoadKv).
    pub device_copied_bytes: [AtomicU64; 2],
    /// Daemon-side copies that failed (nothing committed; loads became misses).
    pub device_copy_failures: AtomicU64,
    /// Disk writes (demotion and write-back), submit to completion, per block.
    pub disk_write_latency: Histogram,
    /// Disk reads (promotion), submit to verified, per block.
    pub disk_read_latency: Histogram,
}

/// What the mechanism and the cache report at render time (pool, disk rings, namespaces), next
/// to the counters.
#[derive(Debug, Default, Clone)]
pub struct Readings {
    /// Whether the pool is mlock'd.
    pub pool_locked: bool,
    /// Disk transfers submitted and not yet done, over all spill files.
    pub disk_queued_ios: u64,
    /// What each namespace holds and how its lookups went.
    pub namespaces: Vec<NamespaceUsage>,
    /// Each supervised part: (name, role, up).
    pub parts: Vec<(String, &'static str, bool)>,
    /// Whether everything configured works (no part down, no tier off).
    pub ready: bool,
}

/// A Prometheus label value: backslashes, quotes and newlines escaped, at most 128 characters
/// (model names come from clients, so a hostile one must not forge lines).
fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(128));
    for c in s.chars().take(128) {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `kvtier_part_up` of every supervised part.
fn render_parts(o: &mut String, parts: &[(String, &'static str, bool)]) {
    let name = "kvtier_part_up";
    let help = "1 while a supervised background part (task or thread) works; 0 once it panicked, exited or stalled (what it served is off).";
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (part, role, up) in parts {
        let _ = writeln!(o, "{name}{{part=\"{}\",serves=\"{}\"}} {}", label_value(part), label_value(role), *up as u8);
    }
}

/// The per-namespace families: blocks by tier, lookup hits (disk-only hits apart) and misses,
/// labelled by model and namespace id prefix (tenants of one model differ in the prefix).
fn render_namespaces(o: &mut String, namespaces: &[NamespaceUsage]) {
    let labels: Vec<String> = namespaces
        .iter()
        .map(|u| format!("model=\"{}\",namespace=\"{}\"", label_value(&u.model), u.id.short()))
        .collect();
    let family = |o: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(o, "kvtier_namespace_blocks", "Committed blocks of a namespace by best tier.", "gauge");
    for (u, l) in namespaces.iter().zip(&labels) {
        let _ = writeln!(o, "kvtier_namespace_blocks{{{l},tier=\"host\"}} {}", u.held.host);
        let _ = writeln!(o, "kvtier_namespace_blocks{{{l},tier=\"disk\"}} {}", u.held.disk);
    }
    let counters = [
        ("kvtier_namespace_hit_blocks_total", "Blocks of a namespace found by lookups."),
        ("kvtier_namespace_disk_hit_blocks_total", "Of those, blocks found only on disk."),
        ("kvtier_namespace_miss_blocks_total", "Blocks of a namespace asked by lookups and not found."),
    ];
    for (i, (name, help)) in counters.into_iter().enumerate() {
        family(o, name, help, "counter");
        for (u, l) in namespaces.iter().zip(&labels) {
            let value = [u.lookups.hit_blocks, u.lookups.disk_hit_blocks, u.lookups.miss_blocks][i];
            let _ = writeln!(o, "{name}{{{l}}} {value}");
        }
    }
}

impl Metrics {
    /// Records the time one op took.
    pub fn observe(&self, op: Op, d: Duration) {
        self.latency[op as usize].observe(d);
    }

    /// Counts an error reply with wire code `code`.
    pub fn error(&self, code: i32) {
        self.errors[(code.max(0) as usize).min(15)].fetch_add(1, Relaxed);
    }

    /// Prometheus text of the labelled families (errors by code, latency histograms, namespaces,
    /// parts); the scalars come from `counters.rs`. `disk`: whether a disk tier is
    /// configured (its histogram is shown then).
    pub fn render_families(&self, disk: bool, now: &Readings) -> String {
        let mut o = String::with_capacity(8192);
        let _ = writeln!(o, "# HELP kvtier_errors_total Error replies by code.\n# TYPE kvtier_errors_total counter");
        for (code, n) in self.errors.iter().enumerate() {
            let n = n.load(Relaxed);
            if n > 0 {
                let name = kvtier_proto::v1::ErrorCode::try_from(code as i32).map_or("UNKNOWN", |c| c.as_str_name());
                let _ = writeln!(o, "kvtier_errors_total{{code=\"{name}\"}} {n}");
            }
        }
        let name = "kvtier_request_duration_seconds";
        let _ = writeln!(o, "# HELP {name} Connector request latency by op.\n# TYPE {name} histogram");
        for op in Op::ALL {
            self.latency[op as usize].render(&mut o, name, &format!("op=\"{}\"", op.name()));
        }
        let name = "kvtier_peer_pull_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} Time of one successful pull: its blocks shipped and verified.\n# TYPE {name} histogram"
        );
        self.peer_pull_latency.render(&mut o, name, "dir=\"in\"");
        if disk {
            let name = "kvtier_disk_move_seconds";
            let _ = writeln!(
                o,
                "# HELP {name} Latency of one block's move between pool and disk.\n# TYPE {name} histogram"
            );
            self.disk_write_latency.render(&mut o, name, "dir=\"write\"");
            self.disk_read_latency.render(&mut o, name, "dir=\"read\"");
        }
        render_namespaces(&mut o, &now.namespaces);
        render_parts(&mut o, &now.parts);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_secs(1));
        let mut s = String::new();
        h.render(&mut s, "x", "op=\"a\"");
        assert!(s.contains("x_bucket{op=\"a\",le=\"0.000005\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{op=\"a\",le=\"0.00005\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{op=\"a\",le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count{op=\"a\"} 3\n"));
    }

    #[test]
    fn renders_error_counters_by_code() {
        let m = Metrics::default();
        m.error(kvtier_proto::v1::ErrorCode::Malformed as i32);
        let text = m.render_families(false, &Readings::default());
        assert!(text.contains("kvtier_errors_total{code=\"MALFORMED\"} 1\n"));
        assert!(!text.contains("kvtier_disk_move_seconds"), "no disk tier, no disk histogram");
    }

    #[test]
    fn namespace_labels_cannot_forge_lines() {
        let hostile = NamespaceUsage {
            ns: kvtier_core::block::NsIdx(0),
            model: "m\"} 1\nkvtier_fake 9\\".into(),
            id: kvtier_core::namespace::NamespaceId([0xab; 16]),
            block_bytes: 4096,
            held: kvtier_core::events::Held { host: 3, disk: 1 },
            lookups: kvtier_core::cache::Lookups { hit_blocks: 5, disk_hit_blocks: 1, miss_blocks: 2 },
        };
        let now = Readings { namespaces: vec![hostile], ..Default::default() };
        let text = Metrics::default().render_families(false, &now);
        let l = r#"model="m\"} 1\nkvtier_fake 9\\",namespace="abababab""#;
        assert!(text.contains(&format!("kvtier_namespace_blocks{{{l},tier=\"host\"}} 3\n")), "{text}");
        assert!(text.contains(&format!("kvtier_namespace_hit_blocks_total{{{l}}} 5\n")), "{text}");
        assert!(text.contains(&format!("kvtier_namespace_miss_blocks_total{{{l}}} 2\n")), "{text}");
        assert!(!text.lines().any(|line| line.starts_with("kvtier_fake")), "{text}");
        assert_eq!(label_value(&"x".repeat(500)).len(), 128);
    }
}
