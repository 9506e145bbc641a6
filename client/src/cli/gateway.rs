//! `kvtier gateway` (an OpenAI-compatible HTTP reverse proxy) and `kvtier picker` (an Envoy
//! ext_proc endpoint picker for the Gateway API Inference Extension): both send each request
//! to the engine whose node holds the longest part of its prompt, balanced against load.

use super::router::{serve_metrics, FeedArgs};
use kvtier_gateway::decide::{Gateway, Tokenizers};
use kvtier_gateway::engines::{discover, Engines};
use kvtier_gateway::tokenize::ModelTokenizer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The engines requests go to and the tokenizers of their models.
#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    #[command(flatten)]
    pub feed: FeedArgs,
    /// An inference engine's OpenAI server, `host:port`, as its connector announces it
    /// (`engine_address`); repeatable. Requests go only to engines named here or found with
    /// `--engine-dns`.
    #[arg(long = "engine", env = "KVTIER_GATEWAY_ENGINES", value_delimiter = ',')]
    pub engines: Vec<String>,
    /// Discover engines by resolving `name:port` (e.g. a headless Service over the engine pods).
    #[arg(long, env = "KVTIER_GATEWAY_ENGINE_DNS")]
    pub engine_dns: Option<String>,
    /// A served model's tokenizer: `NAME=DIR` (DIR holds tokenizer.json and, for chat,
    /// tokenizer_config.json or chat_template.jinja); repeatable.
    #[arg(long = "model", value_name = "NAME=DIR")]
    pub models: Vec<String>,
    /// The tokenizer for models not named with --model.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Refuse requests (429) while every engine has this many in flight (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_in_flight: u32,
    /// Seconds between asking each engine for its LoRA adapters (`/v1/models`), which requests
    /// for an adapter are keyed and routed by (0: never; adapter requests go by load).
    #[arg(long, default_value_t = 2)]
    pub adapter_poll_secs: u64,
}

impl EngineArgs {
    fn tokenizers(&self) -> anyhow::Result<Tokenizers> {
        let load = |dir: &std::path::Path| -> anyhow::Result<Arc<ModelTokenizer>> {
            ModelTokenizer::load(dir).map(Arc::new).map_err(|e| anyhow::anyhow!("tokenizer {}: {e:#}", dir.display()))
        };
        let mut t = Tokenizers::default();
        for m in &self.models {
            let (name, dir) = m.split_once('=').ok_or_else(|| anyhow::anyhow!("--model {m}: give NAME=DIR"))?;
            t.by_model.insert(name.to_string(), load(dir.as_ref())?);
        }
        t.fallback = self.tokenizer.as_deref().map(load).transpose()?;
        Ok(t)
    }

    /// Follows the daemons and the engines; the decision state.
    fn start(&self) -> anyhow::Result<Arc<Gateway>> {
        let tokenizers = self.tokenizers()?;
        let feed = self.feed.follow()?;
        let engines = Arc::new(Engines::default());
        self.engines.iter().for_each(|e| engines.add(e));
        if let Some(name) = self.engine_dns.clone() {
            tokio::spawn(discover(Arc::clone(&engines), name, Duration::from_secs(self.feed.dns_interval_secs)));
        }
        if self.adapter_poll_secs > 0 {
            let every = Duration::from_secs(self.adapter_poll_secs);
            tokio::spawn(kvtier_gateway::engines::follow_adapters(Arc::clone(&engines), every));
        }
        let max = (self.max_in_flight > 0).then_some(self.max_in_flight);
        Ok(Gateway::new(feed, engines, tokenizers, self.feed.weights(), max))
    }

    fn describe(&self) -> String {
        format!(
            "{} engine(s){}, following {}",
            self.engines.len(),
            self.engine_dns.as_ref().map(|d| format!(" and {d}")).unwrap_or_default(),
            self.feed.describe()
        )
    }
}

/// Arguments of `kvtier gateway`.
#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub engines: EngineArgs,
    /// Address to serve the OpenAI API (and /health, /metrics) on.
    #[arg(long, env = "KVTIER_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
}

/// Runs the HTTP gateway until the process is stopped.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let gateway = args.engines.start()?;
    let tcp = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
    eprintln!("kvtier gateway on http://{} to {}", tcp.local_addr()?, args.engines.describe());
    axum::serve(tcp, kvtier_gateway::http::router(gateway)).await?;
    Ok(())
}

/// Arguments of `kvtier picker`.
#[derive(clap::Args, Debug)]
pub struct PickerArgs {
    #[command(flatten)]
    pub engines: EngineArgs,
    /// Address of the ext_proc service (the Endpoint Picker Protocol's default port is 9002).
    #[arg(long, env = "KVTIER_PICKER_LISTEN", default_value = "0.0.0.0:9002")]
    pub listen: String,
    /// Address of the gRPC health services `liveness`, `readiness` and the ext_proc service
    /// (also served on --listen).
    #[arg(long, env = "KVTIER_PICKER_HEALTH_LISTEN", default_value = "0.0.0.0:9003")]
    pub health_listen: String,
    /// Address for /metrics ("" disables).
    #[arg(long, env = "KVTIER_PICKER_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,
}

/// Runs the endpoint picker until the process is stopped.
pub async fn run_picker(args: PickerArgs) -> anyhow::Result<()> {
    use tonic_health::ServingStatus;
    let gateway = args.engines.start()?;
    let g = Arc::clone(&gateway);
    serve_metrics(&args.metrics_listen, move || g.render_metrics()).await?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("liveness", ServingStatus::Serving).await;
    // Ready (and the ext_proc service serving) while there is an engine to pick.
    let engines = Arc::clone(&gateway.engines);
    tokio::spawn(async move {
        loop {
            let status =
                if engines.addresses().is_empty() { ServingStatus::NotServing } else { ServingStatus::Serving };
            for service in ["readiness", "envoy.service.ext_proc.v3.ExternalProcessor", ""] {
                reporter.set_service_status(service, status).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let tcp = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
    if !args.health_listen.is_empty() {
        let health_tcp = tokio::net::TcpListener::bind(&args.health_listen)
            .await
            .map_err(|e| anyhow::anyhow!("--health-listen {}: {e}", args.health_listen))?;
        let health = health.clone();
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(health_tcp);
            tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming).await
        });
    }
    eprintln!("kvtier picker (ext_proc) on {} to {}", tcp.local_addr()?, args.engines.describe());
    let incoming = tonic::transport::server::TcpIncoming::from(tcp).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(kvtier_gateway::ext_proc::service(gateway))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
