//! Warming the chosen node: when a request goes to a node that holds part of its prefix only on
//! disk, the router asks that node's daemon (`CacheService.Prefetch`) to start reading those
//! blocks back into its host tier while the request travels there, so the engine's load finds
//! them in memory. Fire and forget: a failed prefetch costs only the head start.

use super::feed::channel_with;
use kvtier_net::tls::{Channels, ClientTls};
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::cache_service_client::CacheServiceClient;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tonic::transport::Channel;

/// Prefetches in flight at most; past it, new ones are skipped (the router never queues work).
const MAX_IN_FLIGHT: u64 = 64;

/// Sends prefetches to daemons, over one cached channel per endpoint.
pub struct Prefetcher {
    enabled: bool,
    channels: Channels,
    in_flight: AtomicU64,
    /// Prefetches the daemon answered.
    pub sent: AtomicU64,
    /// Prefetches that failed (unreachable daemon, refused request).
    pub failed: AtomicU64,
    /// Prefetches not sent: too many in flight.
    pub skipped: AtomicU64,
}

impl Prefetcher {
    /// A prefetcher; `enabled: false` never sends.
    pub fn new(enabled: bool, tls: Option<Arc<ClientTls>>) -> Arc<Self> {
        Arc::new(Self {
            enabled,
            channels: Channels::new(tls),
            in_flight: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        })
    }

    /// Whether a choice is worth a prefetch: of the `matched` leading blocks the chosen node
    /// holds, only `host` are in its host tier.
    pub fn wanted(&self, matched: u32, host: u32) -> bool {
        self.enabled && matched > host
    }

    /// Asks `endpoint`'s daemon, in the background, to promote the disk-only blocks among
    /// `hashes` of namespace `namespace_id`.
    pub fn send(self: &Arc<Self>, endpoint: String, namespace_id: bytes::Bytes, hashes: Vec<bytes::Bytes>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.in_flight.fetch_add(1, Relaxed) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Relaxed);
            self.skipped.fetch_add(1, Relaxed);
            return;
        }
        let me = Arc::clone(self);
        runtime.spawn(async move {
            let query = pb::PrefixQuery { namespace_id, hashes };
            let outcome = match me.channel(&endpoint).await {
                Ok(ch) => CacheServiceClient::new(ch).prefetch(query).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(r) => {
                    me.sent.fetch_add(1, Relaxed);
                    tracing::debug!(%endpoint, promoting = r.into_inner().promoting, "prefetch");
                }
                Err(e) => {
                    me.failed.fetch_add(1, Relaxed);
                    me.channels.forget(&endpoint);
                    tracing::debug!(%endpoint, "prefetch failed: {e}");
                }
            }
            me.in_flight.fetch_sub(1, Relaxed);
        });
    }

    async fn channel(&self, endpoint: &str) -> anyhow::Result<Channel> {
        self.channels.get(endpoint, |tls| async move { channel_with(endpoint, tls.as_ref()).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_prefix_partly_on_disk_is_worth_a_prefetch() {
        let p = Prefetcher::new(true, None);
        assert!(p.wanted(10, 4));
        assert!(!p.wanted(10, 10), "all in memory");
        assert!(!p.wanted(0, 0), "nothing held");
        assert!(!Prefetcher::new(false, None).wanted(10, 0), "disabled");
    }

    #[test]
    fn without_a_runtime_nothing_is_sent_or_counted() {
        let p = Prefetcher::new(true, None);
        p.send("127.0.0.1:1".into(), bytes::Bytes::new(), vec![]);
        assert_eq!(p.sent.load(Relaxed) + p.failed.load(Relaxed) + p.skipped.load(Relaxed), 0);
        assert_eq!(p.in_flight.load(Relaxed), 0);
    }
}
