//! Subcommands of the `kvtier` CLI, one module each.

pub mod sim;
