//! Servers: each translates its wire format into calls on [`crate::node::Node`].

pub mod connector;
pub mod dispatch;
pub mod grpc;
pub mod http;
pub mod transfer;

use kvtier_core::block::BlockHash;
use kvtier_core::cache::{CacheStats, DiskStats, TierKind};
use kvtier_core::namespace::NamespaceId;
use kvtier_proto::v1 as pb;

/// A tier as the wire names it.
pub(crate) fn wire_tier(t: TierKind) -> pb::Tier {
    match t {
        TierKind::Host => pb::Tier::Host,
        TierKind::Disk => pb::Tier::Disk,
    }
}

/// Capacity and use of the host tier and, if configured, the disk tier.
pub(crate) fn tier_stats(host: &CacheStats, disk: Option<&DiskStats>) -> Vec<pb::TierStats> {
    let mut tiers = vec![pb::TierStats {
        tier: pb::Tier::Host as i32,
        capacity_bytes: host.capacity_bytes,
        used_bytes: host.used_bytes,
        blocks: host.blocks,
    }];
    if let Some(d) = disk {
        tiers.push(pb::TierStats {
            tier: pb::Tier::Disk as i32,
            capacity_bytes: d.capacity_bytes,
            used_bytes: d.used_bytes,
            blocks: d.blocks,
        });
    }
    tiers
}

/// A namespace id and block hashes from gRPC bytes, or `InvalidArgument` saying which is wrong.
pub(crate) fn parse_prefix(
    namespace_id: &[u8],
    hashes: &[bytes::Bytes],
) -> Result<(NamespaceId, Vec<BlockHash>), tonic::Status> {
    let id = NamespaceId::from_slice(namespace_id).ok_or_else(|| {
        tonic::Status::invalid_argument(format!("namespace_id has {} bytes, not 16", namespace_id.len()))
    })?;
    let hashes = hashes
        .iter()
        .enumerate()
        .map(|(i, h)| {
            BlockHash::new(h).ok_or_else(|| {
                tonic::Status::invalid_argument(format!("hash {i} has {} bytes; must be 1 to 32", h.len()))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((id, hashes))
}
