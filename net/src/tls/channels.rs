//! gRPC channels kept by address, made again once the TLS files have changed.

use super::ClientTls;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tonic::transport::{Channel, ClientTlsConfig};

/// Channels to other servers by address (they reconnect by themselves), each with the
/// generation of the client TLS it was made with: after the certificate files change, the next
/// call to an address makes a new channel with the new ones.
pub struct Channels {
    tls: Option<Arc<ClientTls>>,
    made: Mutex<HashMap<String, (u64, Channel)>>,
}

impl Channels {
    /// No channels yet; they will be made with `tls` (None: plain text).
    pub fn new(tls: Option<Arc<ClientTls>>) -> Self {
        Self { tls, made: Mutex::new(HashMap::new()) }
    }

    /// The channel to `addr`: the one kept, or a new one from `connect` (given the TLS to use)
    /// if none was made with the current certificate files.
    pub async fn get<F, Fut>(&self, addr: &str, connect: F) -> anyhow::Result<Channel>
    where
        F: FnOnce(Option<ClientTlsConfig>) -> Fut,
        Fut: Future<Output = anyhow::Result<Channel>>,
    {
        let (generation, tls) = self.tls.as_ref().map(|t| t.current()).unzip();
        let generation = generation.unwrap_or(0);
        let made = || self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, channel)) = made().get(addr).filter(|(with, _)| *with == generation) {
            return Ok(channel.clone());
        }
        let channel = connect(tls).await?;
        made().insert(addr.to_string(), (generation, channel.clone()));
        Ok(channel)
    }

    /// Drops the channel to `addr` (after a failure): the next call makes a new one.
    pub fn forget(&self, addr: &str) {
        self.made.lock().unwrap_or_else(|e| e.into_inner()).remove(addr);
    }
}
