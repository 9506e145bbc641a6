//! kvtierd: the node-local KV-cache tiering daemon.
//!
//! Policy (what to keep, where) is pure logic in the `kvtier-core` crate; this crate is the
//! mechanism that carries it out: memory ([`pool`], [`staging`]), files ([`disk_io`]), device copies
//! ([`device`]), daemon-to-daemon transfer ([`transfer`]), the servers that translate the wire to
//! [`node`] calls ([`server`]), and supervision of the background parts ([`supervise`]).

#![warn(missing_docs)]

pub mod clients;
pub mod config;
pub mod counters;
pub mod device;
pub mod disk_io;
pub mod fault;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod pool;
pub mod server;
pub mod staging;
pub mod supervise;
pub mod transfer;
