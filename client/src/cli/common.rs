//! Options shared by the subcommands that talk to a daemon.

use kvtier_client::{Client, Namespace, NamespaceDescriptor};
use std::path::PathBuf;

/// Where the daemon is.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Connector socket of kvtierd.
    #[arg(long, env = "KVTIER_SOCKET", default_value_os_t = kvtier_client::default_socket())]
    pub socket: PathBuf,
}

impl ConnectArgs {
    /// Connects as `kvtier-<what>`.
    pub async fn connect(&self, what: &str) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.socket, &format!("kvtier-{what}")).await?)
    }
}

/// The namespace test blocks go to.
#[derive(clap::Args, Debug, Clone)]
pub struct NamespaceArgs {
    /// Model name of the namespace.
    #[arg(long, default_value = "kvtier-cli-test")]
    pub model: String,
    /// Bytes per block.
    #[arg(long, default_value_t = 64 * 1024)]
    pub block_bytes: u64,
    /// Tenant cache salt.
    #[arg(long, default_value = "")]
    pub cache_salt: String,
}

impl NamespaceArgs {
    /// Registers the namespace on `client`.
    pub async fn register(&self, client: &mut Client) -> anyhow::Result<Namespace> {
        let desc = NamespaceDescriptor {
            model: self.model.clone(),
            cache_salt: self.cache_salt.clone(),
            // Test blocks of different sizes are different namespaces.
            layout: format!("opaque-{}", self.block_bytes),
            block_bytes: self.block_bytes,
            ..Default::default()
        };
        Ok(client.register(desc).await?)
    }
}

/// A prompt of deterministic test blocks.
#[derive(clap::Args, Debug, Clone)]
pub struct BlocksArgs {
    /// Number of blocks in the prompt.
    #[arg(long, default_value_t = 16)]
    pub count: usize,
    /// Seed naming the prompt (same seed, same hashes and bytes).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Formats bytes per second.
pub fn rate(bytes: u64, secs: f64) -> String {
    format!("{:.2} GB/s", bytes as f64 / secs.max(1e-12) / 1e9)
}

/// One tier of a Stats reply as `kvtier status --json` and `kvtier top --json` print it.
pub fn tier_json(t: &kvtier_proto::v1::TierStats) -> serde_json::Value {
    serde_json::json!({"tier": t.tier().as_str_name(), "capacity_bytes": t.capacity_bytes,
        "used_bytes": t.used_bytes, "blocks": t.blocks})
}

/// One tier of a Stats reply as a line: name, use of capacity, blocks.
pub fn tier_line(t: &kvtier_proto::v1::TierStats) -> String {
    let pct = 100.0 * t.used_bytes as f64 / t.capacity_bytes.max(1) as f64;
    format!(
        "  {:<5} {:>10} / {:>10} used ({pct:.1}%), {} blocks",
        t.tier().as_str_name().trim_start_matches("TIER_").to_lowercase(),
        bytesize::ByteSize(t.used_bytes).to_string(),
        bytesize::ByteSize(t.capacity_bytes).to_string(),
        t.blocks
    )
}

/// Bytes from hex digits (an even number of them).
pub fn parse_hex(s: &str) -> anyhow::Result<kvtier_client::Bytes> {
    anyhow::ensure!(s.len().is_multiple_of(2), "{s:?} has an odd number of hex digits");
    let v: Vec<u8> = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16)).collect::<Result<_, _>>()?;
    Ok(v.into())
}
