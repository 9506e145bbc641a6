//! Subcommands of the `kvtier` CLI, one module each.

pub mod bench;
pub mod blocks;
pub mod common;
pub mod sim;
pub mod status;
