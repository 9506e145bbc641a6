//! Subcommands of the `kvtier` CLI, one module each.

pub mod bench;
pub mod blocks;
pub mod clients;
pub mod common;
pub mod discard;
pub mod gateway;
pub mod log_filter;
pub mod router;
pub mod sim;
pub mod status;
pub mod top;
