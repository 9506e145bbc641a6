//! `kvtierd`: runs the node-local KV-cache tiering daemon.

use bytesize::ByteSize;
use clap::Parser;
use kvtier_core::policy::{AdmissionKind, PolicyKind};
use kvtier_daemon::config::Config;
use kvtier_daemon::device::BackendKind;
use kvtier_daemon::node::Node;
use kvtier_daemon::server::{connector, grpc, http};
use kvtier_daemon::supervise::{self, Role};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

/// kvtierd: node-local KV-cache tiering daemon. Settings come from embedded defaults, then the
/// TOML file, then environment variables, then flags.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "KVTIER_CONFIG")]
    config: Option<PathBuf>,
    /// Connector unix socket path [default: $XDG_RUNTIME_DIR/kvtier/kvtierd.sock or /tmp/kvtier-$UID/kvtierd.sock].
    #[arg(long, env = "KVTIER_SOCKET")]
    socket: Option<PathBuf>,
    /// Host pool budget, e.g. "4 GiB".
    #[arg(long, env = "KVTIER_POOL_BYTES")]
    pool_bytes: Option<ByteSize>,
    /// Slab size (largest block), e.g. "16 MiB".
    #[arg(long, env = "KVTIER_SLAB_BYTES")]
    slab_bytes: Option<ByteSize>,
    /// Back the pool with huge pages.
    #[arg(long, env = "KVTIER_HUGETLB")]
    hugetlb: bool,
    /// Run with an unlocked pool if mlock is refused (development only).
    #[arg(long, env = "KVTIER_ALLOW_UNLOCKED")]
    allow_unlocked: bool,
    /// Host-tier eviction policy.
    #[arg(long, env = "KVTIER_EVICTION")]
    eviction: Option<PolicyKind>,
    /// Address for /metrics ("" disables).
    #[arg(long, env = "KVTIER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Unix uid allowed to connect besides root and the daemon's own (repeatable).
    #[arg(long = "allowed-uid", env = "KVTIER_ALLOWED_UIDS", value_delimiter = ',')]
    allowed_uids: Vec<u32>,
    /// Unix uid whose clients map the whole pool (repeatable; no isolation from other tenants).
    #[arg(long = "trusted-uid", env = "KVTIER_TRUSTED_UIDS", value_delimiter = ',')]
    trusted_uids: Vec<u32>,
    /// Spill directory of the disk tier (repeatable, one per device; replaces the file's list).
    #[arg(long = "disk-dir", env = "KVTIER_DISK_DIRS", value_delimiter = ',')]
    disk_dirs: Vec<PathBuf>,
    /// Spill file size per directory, e.g. "100 GiB".
    #[arg(long, env = "KVTIER_DISK_BYTES_PER_DIR")]
    disk_bytes_per_dir: Option<ByteSize>,
    /// Which blocks leaving the pool are written to disk.
    #[arg(long, env = "KVTIER_DISK_ADMISSION")]
    disk_admission: Option<AdmissionKind>,
    /// Run host-only (reported not ready) when the disk tier cannot start, instead of exiting.
    #[arg(long, env = "KVTIER_DISK_OPTIONAL")]
    disk_optional: bool,
    /// Address of the router feed (gRPC), "" disables TCP.
    #[arg(long, env = "KVTIER_GRPC_LISTEN")]
    grpc_listen: Option<String>,
    /// Serve gRPC over TCP in plain text without TLS (development and tests only).
    #[arg(long, env = "KVTIER_GRPC_INSECURE")]
    grpc_insecure: bool,
    /// Unix socket of the router feed (gRPC), "" disables it.
    #[arg(long, env = "KVTIER_GRPC_SOCKET")]
    grpc_socket: Option<String>,
    /// Mutual TLS on the gRPC TCP port: this daemon's certificate (PEM; with the key and CA).
    #[arg(long, env = "KVTIER_GRPC_TLS_CERT")]
    grpc_tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "KVTIER_GRPC_TLS_KEY")]
    grpc_tls_key: Option<PathBuf>,
    /// The CA that signed every daemon's and router's certificate.
    #[arg(long, env = "KVTIER_GRPC_TLS_CA")]
    grpc_tls_ca: Option<PathBuf>,
    /// Device backend: auto (default), cma, host, cuda or rocm.
    #[arg(long, env = "KVTIER_DEVICE_BACKEND")]
    device_backend: Option<BackendKind>,
    /// Enable daemon-to-daemon transfer (UCX shipping; transfer.enabled). `--peer`: its earlier name.
    #[arg(long, alias = "peer", env = "KVTIER_TRANSFER")]
    transfer: bool,
    /// UCX transports for transfers (UCX_TLS; transfer.ucx_transports), e.g. "tcp" or "shm".
    /// `--ucx-transports`: its earlier name.
    #[arg(long, alias = "peer-tls", env = "KVTIER_UCX_TRANSPORTS")]
    ucx_transports: Option<String>,
    /// Network devices for transfers (UCX_NET_DEVICES), e.g. "lo". `--transfer-net-devices`: its
    /// earlier name.
    #[arg(long, alias = "peer-net-devices", env = "KVTIER_TRANSFER_NET_DEVICES")]
    transfer_net_devices: Option<String>,
    /// What fingerprints of pulled blocks cover (transfer.verify). `--transfer-verify`: its earlier name.
    #[arg(long, alias = "peer-verify", env = "KVTIER_TRANSFER_VERIFY", value_enum)]
    transfer_verify: Option<kvtier_core::fingerprint::Coverage>,
    /// UCX threads a pull is striped over (transfer.lanes). `--transfer-lanes`: its earlier name.
    #[arg(long, alias = "peer-lanes", env = "KVTIER_TRANSFER_LANES")]
    transfer_lanes: Option<usize>,
    /// Seconds without progress after which a background part is declared stalled.
    #[arg(long, env = "KVTIER_STALL_AFTER_SECS")]
    stall_after_secs: Option<u64>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

impl Args {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(s) = &self.socket {
            c.server.socket = s.clone();
        }
        if let Some(b) = self.pool_bytes {
            c.pool.bytes = b;
        }
        if let Some(b) = self.slab_bytes {
            c.pool.slab_bytes = b;
        }
        c.pool.hugetlb |= self.hugetlb;
        c.pool.allow_unlocked |= self.allow_unlocked;
        if let Some(e) = self.eviction {
            c.policy.eviction = e;
        }
        if let Some(m) = &self.metrics_listen {
            c.metrics.listen = m.clone();
        }
        c.transfer.enabled |= self.transfer;
        if let Some(t) = &self.ucx_transports {
            c.transfer.ucx_transports = t.clone();
        }
        if let Some(d) = &self.transfer_net_devices {
            c.transfer.net_devices = d.clone();
        }
        if let Some(v) = self.transfer_verify {
            c.transfer.verify = v;
        }
        if let Some(l) = self.transfer_lanes {
            c.transfer.lanes = l;
        }
        if let Some(b) = self.device_backend {
            c.device.backend = b;
        }
        if let Some(l) = &self.grpc_listen {
            c.grpc.listen = l.clone();
        }
        if let Some(s) = &self.grpc_socket {
            c.grpc.socket = PathBuf::from(s);
        }
        let tls = &mut c.grpc.tls;
        for (flag, field) in
            [(&self.grpc_tls_cert, &mut tls.cert), (&self.grpc_tls_key, &mut tls.key), (&self.grpc_tls_ca, &mut tls.ca)]
        {
            if let Some(path) = flag {
                *field = path.clone();
            }
        }
        if !self.disk_dirs.is_empty() {
            c.disk.dirs = self.disk_dirs.clone();
        }
        if let Some(b) = self.disk_bytes_per_dir {
            c.disk.bytes_per_dir = b;
        }
        if let Some(a) = self.disk_admission {
            c.disk.admission = a;
        }
        c.disk.optional |= self.disk_optional;
        if let Some(s) = self.stall_after_secs {
            c.server.stall_after_secs = s;
        }
        c.grpc.insecure |= self.grpc_insecure;
        if !self.trusted_uids.is_empty() {
            c.server.trusted_uids = self.trusted_uids.clone();
        }
        if !self.allowed_uids.is_empty() {
            c.server.allowed_uids = self.allowed_uids.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() -> std::process::ExitCode {
    kvtier_daemon::logging::init();
    let args = Args::parse();
    let result = args.config().and_then(|config| {
        if args.print_config {
            print!("{}", config.to_toml());
            return Ok(());
        }
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(config))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Lets the daemon hold as many descriptors as the system allows it (each connection takes two:
/// its socket and its staging window); the soft limit is often 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            tracing::warn!("could not raise the open-file limit from {soft} to {hard}");
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    raise_fd_limit();
    if std::os::unix::net::UnixStream::connect(&config.server.socket).is_ok() {
        anyhow::bail!("another daemon is listening on {}", config.server.socket.display());
    }
    let node = Arc::new(Node::new(config)?);
    let cfg = &node.config;
    // The connector socket is bound last: once it accepts, every other endpoint is up too.
    if !cfg.metrics.listen.is_empty() {
        let tcp = tokio::net::TcpListener::bind(&cfg.metrics.listen)
            .await
            .map_err(|e| anyhow::anyhow!("metrics listen {}: {e}", cfg.metrics.listen))?;
        info!("metrics on http://{}/metrics", tcp.local_addr()?);
        let served = Arc::clone(&node);
        let part = node.parts.add("metrics", Role::Metrics, None);
        supervise::task(part, async move {
            if let Err(e) = http::serve(served, tcp).await {
                error!("metrics server: {e}");
            }
        });
    }
    node.start_background();
    grpc::serve(Arc::clone(&node)).await?;
    let listener = connector::bind(&cfg.server.socket)?;
    if !cfg.server.allowed_uids.is_empty() {
        // The allowlist decides who may talk to us (SO_PEERCRED); the file mode must not stop
        // the uids it names first.
        connector::open_to_all(&cfg.server.socket)?;
    }
    let socket = cfg.server.socket.clone();
    let geometry = node.pool().geometry();
    info!(
        socket = %socket.display(),
        pool = %ByteSize(geometry.total_bytes()),
        segments = geometry.segments(),
        locked = node.pool().is_locked(),
        eviction = node.policy_name(),
        device = node.device().name(),
        "kvtierd {} ready",
        env!("CARGO_PKG_VERSION")
    );
    tokio::spawn(connector::serve(Arc::clone(&node), listener));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    let _ = std::fs::remove_file(&socket);
    if !cfg.grpc.socket.as_os_str().is_empty() {
        let _ = std::fs::remove_file(&cfg.grpc.socket);
    }
    node.shutdown(std::time::Duration::from_secs(cfg.disk.shutdown_flush_secs)).await;
    Ok(())
}
