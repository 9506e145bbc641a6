//! kvtier's pure core: what to keep and where, with no I/O.
//!
//! [`block`] names blocks and tiers, [`block_key`] keys them by their tokens, [`index`] finds them, [`alloc`] places them in slabs,
//! [`policy`] chooses what to evict and what to admit to disk, [`cache`] ties those into the
//! tiered block cache (its disk plan in `cache/disk_plan.rs`; the daemon executes it), [`events`] is
//! the log routers follow, [`namespace`] the ids of models and tenants, [`fingerprint`] the
//! end-to-end check of shipped blocks, [`histogram`] a latency histogram, and [`sim`] replays
//! traces through the same code. The daemon (`kvtier-daemon`) supplies the mechanism: memory,
//! files, sockets and device copies.

#![warn(missing_docs)]

pub mod alloc;
pub mod block;
pub mod block_key;
pub mod cache;
pub mod events;
pub mod fingerprint;
pub mod histogram;
pub mod index;
pub mod namespace;
pub mod policy;
pub mod sim;
