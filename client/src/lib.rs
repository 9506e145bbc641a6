//! Rust client of kvtierd.
