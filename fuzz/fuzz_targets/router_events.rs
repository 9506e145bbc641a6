//! The router's application of daemons' feed events to its global index: any batch of events,
//! from any of its nodes, is applied without a panic; the index never exceeds its bound, and a
//! block a node removed last is never routed to that node.

#![no_main]

use kvtier_core::block::BlockHash;
use kvtier_proto::v1::{block_event::Kind, EventBatch};
use kvtier_router::feed::apply;
use kvtier_router::index::{GlobalIndex, MAX_NODES};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = EventBatch::decode(data) else { return };
    let mut index = GlobalIndex::new(64);
    for e in &batch.events {
        let node = (e.sequence % MAX_NODES as u64) as u8;
        apply(&mut index, node, e);
        assert!(index.len() <= 64);
        let (Ok(ns), Some(hash)) = (<[u8; 16]>::try_from(&e.namespace_id[..]), BlockHash::new(&e.hash)) else {
            continue;
        };
        let prefixes = index.prefixes(&ns, &[hash]);
        if Kind::try_from(e.kind) == Ok(Kind::Removed) {
            assert!(index.tier_of(node, &ns, &hash).is_none(), "removed, yet held");
            assert!(prefixes.iter().all(|p| p.node != node || p.matched == 0), "{prefixes:?}");
        }
    }
});
