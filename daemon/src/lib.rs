//! kvtierd: the node-local KV-cache tiering daemon.
//!
//! Policy (what to keep, where) is pure logic in [`block`], [`index`], [`policy`], [`alloc`] and
//! [`cache`]; mechanism (memory, files, sockets) lives in [`pool`], [`disk`] and [`server`]. [`sim`] replays traces
//! through the same policy code.

#![warn(missing_docs)]

pub mod alloc;
pub mod block;
pub mod cache;
pub mod clients;
pub mod config;
pub mod device;
pub mod disk;
pub mod events;
pub mod fault;
pub mod fingerprint;
pub mod index;
pub mod logging;
pub mod metrics;
pub mod namespace;
pub mod node;
pub mod peer;
pub mod policy;
pub mod pool;
pub mod server;
pub mod sim;
pub mod staging;
pub mod supervise;
pub mod tls;
