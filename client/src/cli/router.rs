//! `kvtier router`: the thin cluster router. Follows the daemons' router feeds and answers
//! `kvtier.v1.RouterService` (Route, Score) and `grpc.health.v1`, plus Prometheus metrics and
//! `/healthz`.

use kvtier_net::tls::{server_tls, TlsConfig};
use kvtier_proto::v1::router_service_server::RouterServiceServer;
use kvtier_router::feed::{discover, Shared};
use kvtier_router::score::Weights;
use kvtier_router::service::{grpc, Router, RouterGrpc};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::server::TcpIncoming;

/// How a router, gateway or picker follows the daemons' router feeds.
#[derive(clap::Args, Debug)]
pub struct FeedArgs {
    /// A daemon's router feed, `host:port` (or `unix:/path`); repeatable.
    #[arg(long = "daemon", env = "KVTIER_ROUTER_DAEMONS", value_delimiter = ',')]
    pub daemons: Vec<String>,
    /// Discover daemons by resolving `name:port` (e.g. a headless Kubernetes Service).
    #[arg(long, env = "KVTIER_ROUTER_DNS")]
    pub dns: Option<String>,
    /// Seconds between DNS resolutions.
    #[arg(long, default_value_t = 10)]
    pub dns_interval_secs: u64,
    /// Seconds a daemon may be unreachable before its blocks are forgotten and it is not picked.
    #[arg(long, default_value_t = 30)]
    pub expiry_secs: u64,
    /// Most blocks in the global index (bounded memory; about 80 bytes each).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_blocks: usize,
    /// Value of a disk-only block relative to a host block.
    #[arg(long, default_value_t = Weights::default().disk)]
    pub disk_weight: f64,
    /// Penalty of the busiest endpoint relative to holding the whole prompt.
    #[arg(long, default_value_t = Weights::default().load)]
    pub load_weight: f64,
    /// Dial the daemons with mutual TLS (their `[grpc.tls]`): this process's certificate (PEM).
    #[arg(long, env = "KVTIER_ROUTER_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Its private key.
    #[arg(long, env = "KVTIER_ROUTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA that signed the daemons' certificates (and this process's).
    #[arg(long, env = "KVTIER_ROUTER_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name the daemons' certificates carry.
    #[arg(long, default_value = "kvtierd")]
    pub tls_server_name: String,
}

impl FeedArgs {
    /// The certificate files, if given.
    pub fn tls_files(&self) -> Option<TlsConfig> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else { return None };
        Some(TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            server_name: self.tls_server_name.clone(),
        })
    }

    /// The scoring weights.
    pub fn weights(&self) -> Weights {
        Weights { disk: self.disk_weight, load: self.load_weight }
    }

    /// Starts following the daemons (and discovering them, with `--dns`).
    pub fn follow(&self) -> anyhow::Result<Arc<Shared>> {
        anyhow::ensure!(
            !self.daemons.is_empty() || self.dns.is_some(),
            "give --daemon ADDR (repeatable) or --dns NAME:PORT"
        );
        let tls = self.tls_files().map(|f| kvtier_net::tls::client_tls(&f)).transpose()?;
        let shared = Shared::with_tls(self.max_blocks, Duration::from_secs(self.expiry_secs), tls);
        for d in &self.daemons {
            shared.add(d);
        }
        if let Some(name) = self.dns.clone() {
            tokio::spawn(discover(Arc::clone(&shared), name, Duration::from_secs(self.dns_interval_secs)));
        }
        Ok(shared)
    }

    /// "N daemon(s) and NAME" for the start line.
    pub fn describe(&self) -> String {
        format!(
            "{} daemon(s){}",
            self.daemons.len(),
            self.dns.as_ref().map(|d| format!(" and {d}")).unwrap_or_default()
        )
    }
}

/// Serves `/metrics` (rendered by `render`) and `/healthz` on `listen` ("" disables).
pub async fn serve_metrics(
    listen: &str,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> anyhow::Result<()> {
    if listen.is_empty() {
        return Ok(());
    }
    let tcp =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("--metrics-listen {listen}: {e}"))?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(move || std::future::ready(render())))
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(tcp, app).await });
    Ok(())
}

/// Arguments of `kvtier router`.
#[derive(clap::Args, Debug)]
pub struct RouterArgs {
    #[command(flatten)]
    pub feed: FeedArgs,
    /// Address to serve RouterService on.
    #[arg(long, env = "KVTIER_ROUTER_LISTEN", default_value = "127.0.0.1:9470")]
    pub listen: String,
    /// Address for /metrics ("" disables).
    #[arg(long, env = "KVTIER_ROUTER_METRICS_LISTEN", default_value = "127.0.0.1:9471")]
    pub metrics_listen: String,
    /// Have the chosen node start reading a prefix it holds only partly in memory back from
    /// its disk while the request travels there.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefetch: bool,
    /// Serve RouterService (and its `grpc.health.v1`) with mutual TLS too, with the same
    /// certificate: callers then need one from the same CA.
    #[arg(long, requires = "tls_cert")]
    pub serve_tls: bool,
}

/// Runs the router until the process is stopped.
pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    let shared = args.feed.follow()?;
    let router = Router::new(shared, args.feed.weights(), args.prefetch);
    let r = Arc::clone(&router);
    serve_metrics(&args.metrics_listen, move || r.render_metrics()).await?;
    let tcp = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
    eprintln!(
        "kvtier router on {}{} following {}",
        tcp.local_addr()?,
        if args.serve_tls { " (mutual TLS)" } else { "" },
        args.feed.describe()
    );
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<RouterServiceServer<RouterGrpc>>().await;
    let server = tonic::transport::Server::builder().add_service(health).add_service(grpc(router));
    match args.feed.tls_files().filter(|_| args.serve_tls) {
        Some(files) => server.serve_with_incoming(kvtier_net::tls::incoming(tcp, server_tls(&files)?)).await?,
        None => server.serve_with_incoming(TcpIncoming::from(tcp).with_nodelay(Some(true))).await?,
    }
    Ok(())
}
