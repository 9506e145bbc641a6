//! Configuration: embedded defaults, then a TOML file, then environment variables and flags.
//!
//! Every setting has a default that works on a laptop: the socket under a per-user runtime
//! directory, a 256 MiB pool, metrics on localhost. `kvtierd --print-config` shows the result.

use crate::device::BackendKind;
use bytesize::ByteSize;
use kvtier_core::policy::{AdmissionKind, PolicyKind};
use kvtier_net::paths::{daemon_socket, default_grpc_socket};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Most lanes a daemon runs, and a shipment may name.
pub const MAX_LANES: usize = 16;

/// The whole daemon configuration (the TOML file's shape).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    /// Connector socket and limits.
    pub server: ServerConfig,
    /// Host pool.
    pub pool: PoolConfig,
    /// Eviction and admission.
    pub policy: PolicyConfig,
    /// Disk tier (spill files).
    pub disk: DiskConfig,
    /// Router feed (`kvtier.v1.CacheService` over gRPC).
    pub grpc: GrpcConfig,
    /// How blocks move between engine memory and the pool.
    pub device: DeviceConfig,
    /// Daemon-to-daemon transfer: shipping blocks between daemons over UCX (`[peer]`, its name
    /// in earlier releases, is read as an alias).
    #[serde(alias = "peer")]
    pub transfer: TransferConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
}

/// The connector (unix socket) server.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Path of the unix socket engines connect to.
    pub socket: PathBuf,
    /// Largest accepted frame body.
    pub max_frame_bytes: ByteSize,
    /// Most requests of one connection read before their answers are written.
    pub max_inflight: u32,
    /// Most hashes in one request.
    pub max_hashes_per_request: u32,
    /// Most reserved plus pinned blocks one connection may hold.
    pub max_held_blocks_per_client: u64,
    /// Unix uids allowed to connect besides root and the daemon's own uid (checked with
    /// SO_PEERCRED). Empty: only those two.
    pub allowed_uids: Vec<u32>,
    /// Uids whose clients map the whole pool (one copy, no isolation from other tenants:
    /// `docs/security.md`). Everyone else gets a private staging window.
    pub trusted_uids: Vec<u32>,
    /// Bytes of the private window through which an untrusted client's blocks are copied in and
    /// out of the pool (per connection; its pages are handed back when it idles).
    pub staging_bytes: ByteSize,
    /// Connections served at once; more are refused at accept.
    pub max_connections: u32,
    /// Connections of one uid served at once.
    pub max_connections_per_uid: u32,
    /// A connection that has not sent Hello within this time is closed.
    pub hello_timeout_ms: u64,
    /// Namespaces the daemon keeps (unused empty ones are reclaimed, and unused ones emptied,
    /// when a new one needs the room).
    pub max_namespaces: u32,
    /// Namespaces one connection may register.
    pub max_namespaces_per_client: u32,
    /// A background part (demoter, persister, disk ring, peer lane) that makes no progress for
    /// this long while it has work is declared stalled, and what it serves is turned off.
    pub stall_after_secs: u64,
}

/// The pinned host-memory pool.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Budget of the pool; it never uses more.
    pub bytes: ByteSize,
    /// Largest single memfd segment.
    pub segment_bytes: ByteSize,
    /// Slab size: the unit handed to a namespace, and the largest block the pool can hold.
    pub slab_bytes: ByteSize,
    /// Back the pool with huge pages (needs /proc/sys/vm/nr_hugepages reserved).
    pub hugetlb: bool,
    /// Run with an unlocked pool when mlock is refused (development only; logs a warning).
    pub allow_unlocked: bool,
}

/// Placement policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Host-tier eviction policy: "lru" or "prefix-lfu".
    pub eviction: PolicyKind,
}

/// The disk tier: spill files on local NVMe, driven by io_uring.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DiskConfig {
    /// Spill directories, one per device; empty disables the disk tier.
    pub dirs: Vec<PathBuf>,
    /// Size of the spill file in each directory (preallocated).
    pub bytes_per_dir: ByteSize,
    /// io_uring queue depth per directory.
    pub queue_depth: u32,
    /// Which blocks leaving the pool are written: "reused" (used twice) or "always".
    pub admission: AdmissionKind,
    /// Share of the pool kept free or ready to drop by demoting early (0 to 0.5).
    pub reserve_fraction: f64,
    /// Longest an acquire waits for promotions before serving what is in the pool.
    pub promote_timeout_ms: u64,
    /// On SIGTERM, how long to keep writing admitted blocks back before exiting.
    pub shutdown_flush_secs: u64,
    /// What a disk tier that cannot start does: false (default) stops the daemon with the
    /// reason; true runs host-only, reported not ready with the reason.
    pub optional: bool,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            dirs: Vec::new(),
            bytes_per_dir: ByteSize::gib(4),
            queue_depth: 32,
            admission: AdmissionKind::Reused,
            reserve_fraction: 0.125,
            promote_timeout_ms: 2000,
            shutdown_flush_secs: 10,
            optional: false,
        }
    }
}

/// The router feed: `kvtier.v1.CacheService` and `grpc.health.v1` over gRPC.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// TCP address to serve on; empty (default) disables TCP. Routers and daemons on other
    /// nodes need a routable address, with `[grpc.tls]` (or `insecure`).
    pub listen: String,
    /// Serve TCP in plain text without TLS (development and tests only: anyone who reaches the
    /// port reads the block feed and can pin blocks with offers).
    pub insecure: bool,
    /// Unix socket to serve on as well; empty disables it.
    pub socket: PathBuf,
    /// Events retained for resuming watchers; one further behind must re-snapshot.
    pub event_capacity: u64,
    /// Node name reported in Stats (default: the host name).
    pub node_name: String,
    /// Mutual TLS on the TCP listener and for pulls from other daemons (`[grpc.tls]`).
    pub tls: kvtier_net::tls::TlsConfig,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            insecure: false,
            socket: default_grpc_socket(),
            event_capacity: 1 << 18,
            node_name: String::new(),
            tls: Default::default(),
        }
    }
}

/// Daemon-to-daemon transfer: shipping blocks between daemons over UCX. Not a tier of the
/// cache: pulled blocks land in the host tier.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// Start UCX, register the pool, and serve and run transfers.
    pub enabled: bool,
    /// UCX transports (passed to UCX as `UCX_TLS`), e.g. "tcp", "shm", "rc,ud"; empty: UCX's
    /// choice. (`tls`, its name in earlier releases, is read as an alias; "tls" in this
    /// configuration means certificates only.)
    #[serde(alias = "tls")]
    pub ucx_transports: String,
    /// Network devices (`UCX_NET_DEVICES`), e.g. "mlx5_0:1" or "lo"; empty: UCX's choice.
    pub net_devices: String,
    /// Seconds an offer stays pinned if the puller never releases it; also the most a shipment
    /// may take.
    pub offer_timeout_secs: u64,
    /// What the fingerprints of pulled blocks cover: "sampled" (eight 4 KiB pages per block,
    /// chosen at random per pull) or "full" (every byte; costs a hash pass on both sides).
    pub verify: kvtier_core::fingerprint::Coverage,
    /// UCX threads (each its own worker): a pull is striped over the puller's lanes, so the
    /// copies landing its blocks run on that many cores.
    pub lanes: usize,
    /// IP address the lanes' UCX listeners bind (ports picked by the system). Senders connect to
    /// a lane at the IP address the puller's Ship call came from, on its port.
    pub listen_ip: String,
    /// Port of lane 0's listener, lane `i` on `listen_port + i`; 0: ports picked by the system.
    pub listen_port: u16,
    /// Share of the pool that offers to peers may pin at once, in all.
    pub offer_pool_share: f64,
    /// Share of the pool that offers to one caller (by IP address) may pin at once.
    pub offer_caller_share: f64,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ucx_transports: String::new(),
            net_devices: String::new(),
            offer_timeout_secs: 60,
            verify: Default::default(),
            lanes: 2,
            listen_ip: "0.0.0.0".into(),
            listen_port: 0,
            offer_pool_share: 0.9,
            offer_caller_share: 0.9,
        }
    }
}

/// The device backend.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// "auto" (default: cuda or rocm if their driver is present, else cma), "cma" (the daemon
    /// copies CPU engines' KV tensors itself), "host" (connectors always copy), "cuda", "rocm"
    /// (the daemon refuses to start without that driver).
    pub backend: BackendKind,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self { backend: BackendKind::Auto }
    }
}

/// Metrics endpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP server serving /metrics; empty disables it.
    pub listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: daemon_socket(),
            max_frame_bytes: ByteSize::mib(1),
            max_inflight: 64,
            max_hashes_per_request: 8192,
            max_held_blocks_per_client: 1 << 20,
            allowed_uids: Vec::new(),
            trusted_uids: Vec::new(),
            staging_bytes: ByteSize::mib(64),
            max_connections: 1024,
            max_connections_per_uid: 256,
            hello_timeout_ms: 5000,
            max_namespaces: 1024,
            max_namespaces_per_client: 64,
            stall_after_secs: 30,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            bytes: ByteSize::mib(256),
            segment_bytes: ByteSize::gib(1),
            slab_bytes: ByteSize::mib(16),
            hugetlb: false,
            allow_unlocked: false,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { eviction: PolicyKind::PrefixLfu }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9464".into() }
    }
}

impl Config {
    /// Parses a TOML document over the defaults (missing keys keep their default).
    ///
    /// ```
    /// use kvtier_daemon::config::Config;
    /// let c = Config::from_toml("[pool]\nbytes = \"64 MiB\"\n").unwrap();
    /// assert_eq!(c.pool.bytes.as_u64(), 64 << 20);
    /// assert!(Config::from_toml("[pool]\nbyte = 1\n").is_err());
    /// ```
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// Reads a TOML file over the defaults.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.server.max_inflight > 0, "server.max_inflight must be > 0");
        anyhow::ensure!(self.server.max_frame_bytes.as_u64() >= 1024, "server.max_frame_bytes must be >= 1 KiB");
        anyhow::ensure!(
            self.transfer.listen_ip.parse::<std::net::IpAddr>().is_ok(),
            "transfer.listen_ip must be an IP address, not {:?}",
            self.transfer.listen_ip
        );
        anyhow::ensure!(
            self.transfer.listen_port == 0
                || u32::from(self.transfer.listen_port) + self.transfer.lanes as u32 <= 65536,
            "transfer.listen_port + transfer.lanes runs past port 65535"
        );
        anyhow::ensure!((1..=MAX_LANES).contains(&self.transfer.lanes), "transfer.lanes must be in 1..={}", MAX_LANES);
        self.grpc.tls.validate()?;
        let p = &self.transfer;
        anyhow::ensure!(
            (0.0..=1.0).contains(&p.offer_pool_share) && (0.0..=p.offer_pool_share).contains(&p.offer_caller_share),
            "transfer.offer_pool_share must be in 0..=1 and transfer.offer_caller_share in 0..=offer_pool_share"
        );
        anyhow::ensure!(
            self.grpc.listen.is_empty() || self.grpc.tls.enabled() || self.grpc.insecure,
            "grpc.listen {:?} needs mutual TLS ([grpc.tls] cert, key and ca) so that only daemons and \
             routers of this cluster read the block feed and ship blocks; grpc.insecure = true \
             (--grpc-insecure) serves plain text for development",
            self.grpc.listen
        );
        let s = &self.server;
        anyhow::ensure!(s.max_connections > 0 && s.max_connections_per_uid > 0, "server.max_connections must be > 0");
        anyhow::ensure!(
            (1..=u16::MAX as u32).contains(&s.max_namespaces) && s.max_namespaces_per_client > 0,
            "server.max_namespaces must be in 1..=65535 and max_namespaces_per_client > 0"
        );
        anyhow::ensure!(
            s.staging_bytes.as_u64() >= 2 * self.pool.slab_bytes.as_u64(),
            "server.staging_bytes ({}) must hold two of the largest blocks (2 x pool.slab_bytes = {})",
            s.staging_bytes,
            ByteSize(2 * self.pool.slab_bytes.as_u64())
        );
        anyhow::ensure!(self.policy.eviction != PolicyKind::Belady, "belady needs the future: simulation only");
        let d = &self.disk;
        anyhow::ensure!((0.0..=0.5).contains(&d.reserve_fraction), "disk.reserve_fraction must be in 0..=0.5");
        anyhow::ensure!((1..=4096).contains(&d.queue_depth), "disk.queue_depth must be in 1..=4096");
        if !d.dirs.is_empty() {
            anyhow::ensure!(
                d.bytes_per_dir.as_u64() >= self.pool.slab_bytes.as_u64(),
                "disk.bytes_per_dir ({}) must hold at least one slab (pool.slab_bytes = {})",
                d.bytes_per_dir,
                self.pool.slab_bytes
            );
            anyhow::ensure!(
                self.pool.segment_bytes.as_u64() <= 1 << 30,
                "pool.segment_bytes must be <= 1 GiB with a disk tier (io_uring fixed buffers)"
            );
        }
        crate::pool::PoolGeometry::plan(
            self.pool.bytes.as_u64(),
            self.pool.segment_bytes.as_u64(),
            self.pool.slab_bytes.as_u64(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        c.validate().unwrap();
    }

    #[test]
    fn belady_is_refused_for_the_daemon() {
        let c = Config::from_toml("[policy]\neviction = \"belady\"\n").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn transfer_lanes_and_listeners_are_checked() {
        let refused = |toml: &str, why: &str| {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(why), "{toml}: {err}");
        };
        refused("[transfer]\nlanes = 0\n", "transfer.lanes");
        refused("[transfer]\nlanes = 17\n", "transfer.lanes");
        refused("[transfer]\nlisten_ip = \"eth0\"\n", "transfer.listen_ip");
        refused("[transfer]\nlisten_port = 65535\n", "past port 65535");
        let c = Config::from_toml("[transfer]\nlanes = 4\nlisten_ip = \"::\"\nlisten_port = 65532\n").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn earlier_releases_peer_section_and_tls_key_still_configure_transfers() {
        let old = Config::from_toml("[peer]\nenabled = true\ntls = \"tcp\"\nlanes = 3\n").unwrap();
        let new = Config::from_toml("[transfer]\nenabled = true\nucx_transports = \"tcp\"\nlanes = 3\n").unwrap();
        assert_eq!(old, new);
        assert!(new.transfer.enabled && new.transfer.ucx_transports == "tcp" && new.transfer.lanes == 3);
        assert!(Config::from_toml("[peer]\nlanes = 3\n[transfer]\nlanes = 2\n").is_err(), "both names at once");
    }

    #[test]
    fn pool_smaller_than_a_slab_is_refused() {
        let c = Config::from_toml("[pool]\nbytes = \"1 MiB\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("smaller than one slab"));
    }
}
